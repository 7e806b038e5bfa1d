"""Blurred Attention Smoothing: a Gaussian blur of each logit row along the key axis (math in `ops.blur`).

Fast path: blur the keys instead of the logits and run the base kernel (SDPA) on them. It applies whenever the
keys a row may attend to depend on the key alone (padding) plus causality, and no position bias or softcap enters
the logits; otherwise the logit-space reference runs.
"""

from ..ops import blur_keys, blur_logits, blur_offsets, blur_taps, draw_blur_sigma, key_validity
from ..registry import AttentionDropVariant, register_variant


@register_variant("blur")
class BlurredAttentionSmoothing(AttentionDropVariant):
    config_fields = ("blur_width", "blur_sigma_min", "blur_sigma_max", "blur_sigma_per")

    @staticmethod
    def is_identity(config):
        # sigma -> 0 puts all of the kernel's weight on the key itself.
        return config.blur_sigma_max == 0.0

    @staticmethod
    def sample(config, batch, heads, query_len, key_len, device):
        sigma = draw_blur_sigma(batch, config.blur_sigma_min, config.blur_sigma_max, config.blur_sigma_per, device)
        return {"sigma": sigma}

    @staticmethod
    def perturb_logits(logits, attendable, config, draws, causal):
        offsets = blur_offsets(config.blur_width, causal, logits.device)
        return blur_logits(logits, attendable, blur_taps(draws["sigma"], offsets), offsets), attendable

    @staticmethod
    def attend_fast(call, config):
        if call.has_logit_terms:
            return None
        separable, valid = key_validity(call.attendable, call.causal)
        if not separable:
            return None
        offsets = blur_offsets(config.blur_width, call.causal, call.key.device)
        blurred = blur_keys(call.key, valid, blur_taps(call.draws["sigma"], offsets), offsets)
        return call.run_base(call.query, blurred, call.value)
