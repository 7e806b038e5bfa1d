"""Which keys each query row may attend to, read off the masks Transformers hands to an attention function.

Transformers passes `None` (no padding; causality then comes from `is_causal`), a boolean mask (True = attend) or
an additive float mask, shaped `[batch | 1, heads | 1, q_len, k_len]`. A float mask may carry more than
attendability: BEiT, Data2VecVision and Swin fold their relative position bias into it, and Swin masks its shifted
windows with -100 instead of `finfo.min`. AttentionDrop splits a mask into

- `attendable` (bool): top-k candidates are chosen among these keys, the blur renormalises over them, and the
  softmax gives every other key weight exactly 0;
- `bias` (float, 0 where not attendable): the finite part of a float mask, a term of the logits. It is added
  *before* the perturbation, like T5's `position_bias`, so hard masking ranks and zeroes the logits the model
  actually uses.

Conventions: an `attendable` of `None` means every key of every row; masks broadcast over `[B, H, Q, K]`.
"""

import torch

__all__ = ["MASKED_AT_OR_BELOW", "attendable_keys", "causal_pattern", "masked_softmax"]

# A float mask entry at or below this value masks its key. Transformers fills masked keys with `finfo.min`, Swin its
# shifted-window mask with -100 (plus a small learned bias); a logit lowered by 50 keeps less than e^-50 (2e-22) of
# its weight, below float32 resolution next to any attendable key, so treating it as masked changes no output.
MASKED_AT_OR_BELOW = -50.0


def causal_pattern(query_len: int, key_len: int, device: torch.device) -> torch.Tensor:
    """SDPA's `is_causal=True` pattern (top-left aligned, as `torch.nn.functional.scaled_dot_product_attention`).

    Returns:
        `torch.Tensor` of shape `[1, 1, query_len, key_len]`, bool.
    """
    return torch.ones(query_len, key_len, dtype=torch.bool, device=device).tril()[None, None]


def attendable_keys(
    attention_mask: torch.Tensor | None, query_len: int, key_len: int, is_causal: bool, device: torch.device
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Split a Transformers attention mask into an attendable pattern and a logit bias.

    Args:
        attention_mask (`torch.Tensor` of shape `[B | 1, H | 1, Q, K]`, *optional*): bool or additive float mask.
        query_len (`int`), key_len (`int`): Q and K.
        is_causal (`bool`): when the mask is `None`, whether the call is causal (SDPA's `is_causal`).
        device (`torch.device`): where to build a causal pattern.

    Returns:
        `attendable` (bool, broadcastable to `[B, H, Q, K]`, or `None` for all keys) and `bias` (the finite values
        of a float mask, 0 where masked, or `None` for a bool mask or no mask).
    """
    if attention_mask is None:
        # SDPA ignores `is_causal` for a single query row (decoding): it sees every cached key.
        return (causal_pattern(query_len, key_len, device) if is_causal and query_len > 1 else None), None
    if attention_mask.dtype == torch.bool:
        return attention_mask, None
    attendable = attention_mask > MASKED_AT_OR_BELOW
    return attendable, attention_mask.masked_fill(~attendable, 0.0)


def masked_softmax(logits: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the last axis restricted to `allowed` keys; a row with no allowed key gets all-zero weights.

    A plain `-inf` fill would give NaN for such rows (every key padded, or every key removed by hard masking), and a
    finite fill alone would spread weight over padding; zeroing after the softmax gives neither.
    """
    if allowed is None:
        return torch.softmax(logits, dim=-1)
    probs = torch.softmax(logits.masked_fill(~allowed, torch.finfo(logits.dtype).min), dim=-1)
    return probs.masked_fill(~allowed, 0.0)
