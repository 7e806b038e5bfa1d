"""A 2-D Gaussian blur of attention logits over an image's patch grid (the `blur2d` variant).

An extension of Blurred Attention Smoothing (arXiv 2504.12088, Sec. 3.2) to vision Transformers. ViT, DeiT, BEiT and
DINOv2 lay their patch tokens on a grid after a few prefix tokens (CLS, distillation, registers): a 1-D blur along
the sequence mixes the last patch of a grid row with the first patch of the next, which are not neighbours in the
image. Here each logit row is blurred over the grid instead: the logit of the patch key at (y, x) becomes the average
of the logits of the patch keys (y + dy, x + dx), |dy|, |dx| <= r, weighted by g(dy) g(dx) with g ∝ exp(-t² / 2σ²),
renormalised over the neighbours inside the grid (and attendable by the row). Prefix keys are left as they are.

Two ways to compute it, equal up to rounding:
- `blur2d_logits`: the reference, on materialised `[B, H, Q, K]` logits.
- `blur2d_keys`: the fast path. q·(Σ g k_n) = Σ g (q·k_n), so blurring the patch keys (a depthwise 2-D convolution
  per example, renormalised by the convolution of ones) blurs the logits, for every row alike when every key is
  attendable; the fused base kernel (SDPA) does the rest.
"""

import math

import torch
import torch.nn.functional as F

from .blur import blur_offsets, blur_taps

__all__ = ["blur2d_keys", "blur2d_logits", "blur2d_taps", "patch_grid"]


def patch_grid(key_len: int, prefix: int, grid: tuple[int, int] | None = None) -> tuple[int, int]:
    """The (height, width) of the patch grid after `prefix` tokens; raises `ValueError` for a sequence that is not
    `prefix` tokens followed by a square grid (or by the `grid` given)."""
    patches = key_len - prefix
    if grid is not None:
        if grid[0] * grid[1] != patches:
            raise ValueError(
                f"blur2d: a sequence of {key_len} tokens after {prefix} prefix tokens holds {patches} patches, "
                f"not the {grid[0]} x {grid[1]} grid of `blur2d_grid`"
            )
        return grid
    side = math.isqrt(max(patches, 0))
    if patches <= 0 or side * side != patches:
        raise ValueError(
            f"blur2d: a sequence of {key_len} tokens after {prefix} prefix tokens leaves {patches} patches, not a "
            "square grid; set `blur2d_grid` (height, width) or `blur2d_prefix_tokens`"
        )
    return side, side


def blur2d_taps(sigma: torch.Tensor, width: int) -> torch.Tensor:
    """The separable Gaussian kernel g(dy) g(dx), one per example, normalised to sum 1.

    Args:
        sigma (`torch.Tensor` of shape `[B]`), width (`int`): odd kernel width.

    Returns:
        `torch.Tensor` of shape `[B, width, width]`, float32.
    """
    taps = blur_taps(sigma, blur_offsets(width, causal=False))  # [B, w], each sums to 1
    return taps[:, :, None] * taps[:, None, :]


def _shift_grid(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """y[..., i, j] = x[..., i + dy, j + dx], 0 where that falls outside the grid."""
    height, width = x.shape[-2:]
    shifted = torch.zeros_like(x)
    rows_to, rows_from = slice(max(-dy, 0), height - max(dy, 0)), slice(max(dy, 0), height - max(-dy, 0))
    cols_to, cols_from = slice(max(-dx, 0), width - max(dx, 0)), slice(max(dx, 0), width - max(-dx, 0))
    shifted[..., rows_to, cols_to] = x[..., rows_from, cols_from]
    return shifted


def blur2d_logits(
    logits: torch.Tensor,
    attendable: torch.Tensor | None,
    taps: torch.Tensor,
    prefix: int,
    grid: tuple[int, int],
) -> torch.Tensor:
    """Reference: blur every logit row over the patch grid, renormalised over the attendable neighbours.

    Args:
        logits (`torch.Tensor` of shape `[B, H, Q, K]`), float32; K = prefix + height · width.
        attendable (`torch.Tensor`, *optional*): bool, broadcastable to `[B, H, Q, K]`; `None` = every key.
        taps (`torch.Tensor` of shape `[B, w, w]`): `blur2d_taps`.
        prefix (`int`), grid (`tuple[int, int]`): the prefix tokens and the (height, width) of the grid.

    Returns:
        `torch.Tensor` of shape `[B, H, Q, K]`; prefix keys and non-attendable keys unchanged.
    """
    batch, heads, rows, _ = logits.shape
    height, width = grid
    patches = logits[..., prefix:].reshape(batch, heads, rows, height, width)
    if attendable is None:
        weight = patches.new_ones(1, 1, 1, height, width)
    else:
        weight = attendable.expand(batch, heads, rows, -1)[..., prefix:].reshape(batch, heads, rows, height, width)
        weight = weight.to(logits.dtype)
    radius = taps.shape[-1] // 2
    numerator, denominator = 0.0, 0.0
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            tap = taps[:, dy + radius, dx + radius].view(-1, 1, 1, 1, 1)
            neighbour_weight = tap * _shift_grid(weight, dy, dx)
            numerator = numerator + neighbour_weight * _shift_grid(patches, dy, dx)
            denominator = denominator + neighbour_weight
    # An attendable key is its own neighbour (dy = dx = 0), so its denominator is positive.
    blurred = (numerator / denominator.clamp_min(torch.finfo(logits.dtype).tiny)).reshape(batch, heads, rows, -1)
    if attendable is not None:
        blurred = torch.where(attendable.expand(batch, heads, rows, -1)[..., prefix:], blurred, logits[..., prefix:])
    return torch.cat([logits[..., :prefix], blurred], dim=-1)


def blur2d_keys(keys: torch.Tensor, taps: torch.Tensor, prefix: int, grid: tuple[int, int]) -> torch.Tensor:
    """Fast path: blur the patch keys over the grid so that `q · k̃` equals `blur2d_logits` of `q · k` (every key
    attendable). One depthwise 2-D convolution per example, in the keys' dtype.

    Args:
        keys (`torch.Tensor` of shape `[B, H_kv, K, D]`), taps (`torch.Tensor` of shape `[B, w, w]`),
        prefix (`int`), grid (`tuple[int, int]`).

    Returns:
        `torch.Tensor` of shape `[B, H_kv, K, D]`.
    """
    batch, kv_heads, _, head_dim = keys.shape
    height, width = grid
    channels = kv_heads * head_dim
    # [B, H_kv, h·w, D] -> [1, B·H_kv·D, h, w]: every (example, channel) a group of the convolution
    patches = keys[:, :, prefix:].permute(0, 1, 3, 2).reshape(1, batch * channels, height, width)
    kernel = taps.to(keys.dtype)
    radius = kernel.shape[-1] // 2
    blurred = F.conv2d(
        patches, kernel.repeat_interleave(channels, dim=0)[:, None], padding=radius, groups=batch * channels
    )
    ones = keys.new_ones(1, batch, height, width)
    normaliser = F.conv2d(ones, kernel[:, None], padding=radius, groups=batch)  # [1, B, h, w]: < 1 at the borders
    blurred = blurred.view(batch, channels, height, width) / normaliser.view(batch, 1, height, width)
    blurred = blurred.view(batch, kv_heads, head_dim, height * width).permute(0, 1, 3, 2)
    return torch.cat([keys[:, :, :prefix], blurred], dim=2).contiguous()
