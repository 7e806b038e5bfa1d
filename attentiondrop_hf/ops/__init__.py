"""Pure tensor math of AttentionDrop (arXiv 2504.12088): no Transformers import, random draws in `sampling`."""

from .attention import (
    attention_entropy,
    attention_logits,
    chunked_logit_space_attention,
    logit_space_attention,
    repeat_kv,
    rows_of,
)
from .blur import blur_keys, blur_logits, blur_offsets, blur_taps, key_validity
from .consistency import summed_consistency_terms, summed_cross_entropy, summed_kl
from .hard import apply_hard_drop, hard_drop_pattern
from .hard_attention import hard_masked_attention
from .masks import MASKED_AT_OR_BELOW, attendable_keys, causal_pattern, masked_softmax
from .sampling import draw_blur_sigma, draw_slot_uniforms
from .schedules import depth_factor, schedule_factor

__all__ = [
    "MASKED_AT_OR_BELOW",
    "apply_hard_drop",
    "attendable_keys",
    "attention_entropy",
    "attention_logits",
    "blur_keys",
    "blur_logits",
    "blur_offsets",
    "blur_taps",
    "causal_pattern",
    "depth_factor",
    "chunked_logit_space_attention",
    "draw_blur_sigma",
    "draw_slot_uniforms",
    "hard_drop_pattern",
    "hard_masked_attention",
    "key_validity",
    "logit_space_attention",
    "masked_softmax",
    "repeat_kv",
    "rows_of",
    "schedule_factor",
    "summed_consistency_terms",
    "summed_cross_entropy",
    "summed_kl",
]
