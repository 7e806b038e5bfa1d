"""Hard Attention Masking: drop each of a row's top-k attendable logits with probability p (math in `ops.hard`).

No key-space fast path: the top-k needs every logit of a row. Long sequences go through the integration's chunked
logit path instead, which never holds all N × N logits.
"""

from ..ops import apply_hard_drop, draw_slot_uniforms, hard_drop_pattern
from ..registry import AttentionDropVariant, register_variant


@register_variant("hard")
class HardAttentionMasking(AttentionDropVariant):
    config_fields = ("p", "top_k", "hard_fill")

    @staticmethod
    def is_identity(config):
        return config.p == 0.0

    @staticmethod
    def sample(config, batch, heads, query_len, key_len, device):
        return {"slot_uniforms": draw_slot_uniforms(batch, heads, query_len, min(config.top_k, key_len), device)}

    @staticmethod
    def perturb_logits(logits, attendable, config, draws, causal):
        dropped = hard_drop_pattern(logits, attendable, config.top_k, config.p, draws["slot_uniforms"])
        return apply_hard_drop(logits, attendable, dropped, config.hard_fill)
