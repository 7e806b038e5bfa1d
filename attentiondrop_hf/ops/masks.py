"""Which keys each query row may attend to, read off the masks Transformers hands to an attention function.

Transformers passes `None` (no padding; causality then comes from `is_causal`), a boolean mask (True = attend) or
an additive float mask (0 = attend, a very negative value = masked), shaped `[batch | 1, heads | 1, q_len, k_len]`.
AttentionDrop needs the boolean "attendable" pattern (top-k is taken among attendable keys, the blur renormalises
over attendable neighbours) and applies the additive part only after the perturbation.

Conventions: an `attendable` of `None` means every key of every row; masks broadcast over `[B, H, Q, K]`.
"""

import torch

__all__ = [
    "attendable_keys",
    "causal_pattern",
    "key_validity",
    "masked_softmax",
]


def causal_pattern(query_len: int, key_len: int, device: torch.device) -> torch.Tensor:
    """SDPA's `is_causal=True` pattern (top-left aligned, as `torch.nn.functional.scaled_dot_product_attention`).

    Returns:
        `torch.Tensor` of shape `[1, 1, query_len, key_len]`, bool.
    """
    return torch.ones(query_len, key_len, dtype=torch.bool, device=device).tril()[None, None]


def attendable_keys(
    attention_mask: torch.Tensor | None, query_len: int, key_len: int, is_causal: bool, device: torch.device
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Split a Transformers attention mask into an attendable pattern and an additive bias.

    Args:
        attention_mask (`torch.Tensor` of shape `[B | 1, H | 1, Q, K]`, *optional*): bool or additive float mask.
        query_len (`int`), key_len (`int`): Q and K.
        is_causal (`bool`): when the mask is `None`, whether the call is causal (SDPA's `is_causal`).
        device (`torch.device`): where to build a causal pattern.

    Returns:
        `attendable` (bool, broadcastable to `[B, H, Q, K]`, or `None` for all keys) and `bias` (the finite values
        of a float mask, 0 where masked, or `None`): the part of the mask added to the logits after perturbation.
    """
    if attention_mask is None:
        # SDPA ignores `is_causal` for a single query row (decoding): it sees every cached key.
        return (causal_pattern(query_len, key_len, device) if is_causal and query_len > 1 else None), None
    if attention_mask.dtype == torch.bool:
        return attention_mask, None
    # Transformers fills masked positions with finfo.min (or -inf); anything below half of it is masked.
    attendable = attention_mask > torch.finfo(attention_mask.dtype).min / 2
    return attendable, attention_mask.masked_fill(~attendable, 0.0)


def key_validity(attendable: torch.Tensor | None, causal: bool) -> tuple[bool, torch.Tensor | None]:
    """Whether attendability depends on the key alone (plus causality), and if so which keys are valid.

    This is the condition under which a blur along the key axis can be moved from the logits onto the keys: every
    row then renormalises over the same neighbours of a key.

    Returns:
        `(separable, valid)`: `valid` is a bool tensor of shape `[B | 1, K]` (`None` = every key valid). When
        `separable` is False the mask depends on the query in another way (sliding window, packing, per-head masks).
    """
    if attendable is None:
        return True, None
    if attendable.shape[1] != 1:
        return False, None
    valid = attendable.any(dim=-2, keepdim=True)  # [B, 1, 1, K]
    expected = (
        valid & causal_pattern(attendable.shape[-2], attendable.shape[-1], attendable.device) if causal else valid
    )
    if not torch.equal(expected.expand_as(attendable), attendable):
        return False, None
    return True, valid[:, 0, 0, :]


def masked_softmax(logits: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the last axis restricted to `allowed` keys; a row with no allowed key gets all-zero weights.

    A plain `-inf` fill would give NaN for such rows (every key padded, or every key removed by hard masking), and a
    finite fill alone would spread weight over padding; zeroing after the softmax gives neither.
    """
    if allowed is None:
        return torch.softmax(logits, dim=-1)
    probs = torch.softmax(logits.masked_fill(~allowed, torch.finfo(logits.dtype).min), dim=-1)
    return probs.masked_fill(~allowed, 0.0)
