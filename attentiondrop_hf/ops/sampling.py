"""Every random draw AttentionDrop makes, in one place.

All draws come from the *global* torch RNG of the tensor's device. Activation checkpointing saves and restores that
state around a recomputed segment, so a recomputed forward replays the same masks and blur widths; a private
`torch.Generator` would not be restored and would silently give gradients of a different mask.
"""

import torch

__all__ = ["draw_blur_sigma", "draw_slot_uniforms"]


def draw_slot_uniforms(batch: int, heads: int, query_len: int, slots: int, device: torch.device) -> torch.Tensor:
    """One U(0, 1) per (example, head, query, top-k slot): hard masking drops slot s of row i when `u < p`.

    Returns:
        `torch.Tensor` of shape `[batch, heads, query_len, slots]`, float32.
    """
    return torch.rand(batch, heads, query_len, slots, device=device, dtype=torch.float32)


def draw_blur_sigma(
    batch: int, low: float | torch.Tensor, high: float | torch.Tensor, per: str, device: torch.device
) -> torch.Tensor:
    """Blur widths sigma ~ U(low, high), one per example (`per="example"`) or one for the batch (`per="batch"`).

    `low == high` (numbers) is a fixed sigma and consumes no random numbers. `high` may be a 0-dim tensor (a
    scheduled strength under `torch.compile`): it is then always drawn.

    Returns:
        `torch.Tensor` of shape `[batch]`, float32.
    """
    if not torch.is_tensor(high) and low == high:
        return torch.full((batch,), float(low), device=device, dtype=torch.float32)
    draws = torch.rand(batch if per == "example" else 1, device=device, dtype=torch.float32)
    return (low + (high - low) * draws).expand(batch)
