"""Hard Attention Masking (AttentionDrop, arXiv 2504.12088, Sec. 3.1).

For each query row, take the `top_k` largest logits among the keys the row may attend to and drop each of them
with probability `p`. The paper replaces a dropped logit by 0 (`fill="zero"`); `fill="mask"` removes the key from the
softmax instead. The top-k indices are constants for the gradient: they are chosen on detached logits, so a
dropped position passes no gradient (zero fill) and a kept one passes the ordinary one.

Departures from the paper: k is clamped per row to the number of attendable keys (a row with 3 valid keys and
top_k=8 can drop at most those 3); the paper does not discuss padding.

`hard_drop_pattern` and `apply_hard_drop` act on materialised `[B, H, Q, K]` logits: the reference, with
`ops.attention.logit_space_attention`. `ops.hard_attention.hard_masked_attention` computes the same attention
without ever holding the logits.
"""

import torch

__all__ = ["apply_hard_drop", "hard_drop_pattern"]


def hard_drop_pattern(
    logits: torch.Tensor, attendable: torch.Tensor | None, top_k: int, p: float, slot_uniforms: torch.Tensor
) -> torch.Tensor:
    """Which logits hard masking drops.

    Args:
        logits (`torch.Tensor` of shape `[B, H, Q, K]`): attention logits (only their order is used).
        attendable (`torch.Tensor`, *optional*): bool, broadcastable to `[B, H, Q, K]`; `None` = every key.
        top_k (`int`): candidates per row; clamped to K and, per row, to the attendable keys.
        p (`float`): drop probability of each candidate.
        slot_uniforms (`torch.Tensor` of shape `[B, H, Q, >= min(top_k, K)]`): U(0, 1) draws, one per candidate
            slot (`ops.sampling.draw_slot_uniforms`); slot s of a row is dropped when its draw is `< p`.

    Returns:
        `torch.Tensor` of shape `[B, H, Q, K]`, bool: True where the logit is dropped.
    """
    k = min(top_k, logits.shape[-1])
    scores = logits.detach()
    if attendable is not None:
        scores = scores.masked_fill(~attendable, float("-inf"))
    candidates = scores.topk(k, dim=-1).indices  # [B, H, Q, k], slot s = the s-th largest
    drop_slot = slot_uniforms[..., :k] < p
    if attendable is not None:
        # Rows with fewer than k attendable keys fill the remaining slots with masked keys: never drop those.
        drop_slot = drop_slot & attendable.expand_as(scores).gather(-1, candidates)
    return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter_(-1, candidates, drop_slot)


def apply_hard_drop(
    logits: torch.Tensor, attendable: torch.Tensor | None, dropped: torch.Tensor, fill: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Replace the dropped logits by 0 (`fill="zero"`) or remove their keys (`fill="mask"`).

    Returns:
        `(logits, attendable)` after the drop.
    """
    if fill == "zero":
        return logits.masked_fill(dropped, 0.0), attendable
    return logits, ~dropped if attendable is None else attendable & ~dropped
