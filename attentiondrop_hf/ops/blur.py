"""Blurred Attention Smoothing (AttentionDrop, arXiv 2504.12088, Sec. 3.2).

Each logit row is convolved along the key axis with a Gaussian kernel g[t] ∝ exp(-t² / 2σ²) of odd width w.

Decisions beyond the paper:
- Neighbours outside the sequence or not attendable by the row (padding) are left out and the kernel is
  renormalised over the rest, so a constant row stays constant and padding never leaks into real keys.
- In causal self-attention the kernel is one-sided (taps t = -(w-1)/2 … 0): no query sees a future key.
- sigma is clamped away from 0 (σ → 0 is the identity) and may be drawn per example.

Two ways to compute it, equal up to rounding:
- `blur_logits`: the reference, on materialised `[B, H, Q, K]` logits (any mask).
- `blur_keys`: the fast path. Since q·(Σ_t g_t k_{j+t}) = Σ_t g_t (q·k_{j+t}), blurring the keys blurs the logits,
  provided the renormalisation is the same for every row (attendability depends on the key alone, plus causality:
  `key_validity`). Logits are then never materialised and the fused base kernel (SDPA) does the rest.

Kernel offsets are Python ints: no device tensor has to be read back to loop over them.
"""

import functools
from typing import Any

import torch
import torch.nn.functional as F

from .masks import causal_pattern

__all__ = ["blur_keys", "blur_logits", "blur_offsets", "blur_taps", "key_validity"]

# Below this width, exp(-1 / 2σ²) underflows even in float32 and the kernel is the identity anyway.
SIGMA_FLOOR = 1e-3
# Up to this many keys a dense banded [K, K] matrix per example is one cheap batched matmul; beyond, a depthwise
# convolution keeps memory at O(K) instead of O(K²).
BANDED_MATMUL_MAX_KEYS = 512


def blur_offsets(width: int, causal: bool) -> tuple[int, ...]:
    """Key offsets t of the kernel taps: -r … r, or -r … 0 when causal (r = (width - 1) // 2)."""
    radius = (width - 1) // 2
    return tuple(range(-radius, 1 if causal else radius + 1))


def blur_taps(sigma: torch.Tensor, offsets: tuple[int, ...]) -> torch.Tensor:
    """Gaussian weights g[t] ∝ exp(-t² / 2σ²) at `offsets`, normalised to sum 1.

    Args:
        sigma (`torch.Tensor` of shape `[B]`): one width per example.
        offsets (`tuple[int, ...]` of length T): from `blur_offsets`.

    Returns:
        `torch.Tensor` of shape `[B, T]`, float32, on the device of `sigma`.
    """
    sigma = sigma.float().clamp_min(SIGMA_FLOOR)[:, None]
    distance = torch.tensor(offsets, dtype=torch.float32, device=sigma.device)
    taps = torch.exp(-(distance[None, :] ** 2) / (2 * sigma**2))
    return taps / taps.sum(dim=-1, keepdim=True)


def _shift_keys(x: torch.Tensor, offset: int, fill: float) -> torch.Tensor:
    """y[..., j] = x[..., j + offset], `fill` where j + offset falls outside the key axis."""
    if offset == 0:
        return x
    length = x.shape[-1]
    shifted = torch.full_like(x, fill)
    if abs(offset) < length:
        if offset > 0:
            shifted[..., : length - offset] = x[..., offset:]
        else:
            shifted[..., -offset:] = x[..., : length + offset]
    return shifted


def blur_logits(
    logits: torch.Tensor, attendable: torch.Tensor | None, taps: torch.Tensor, offsets: tuple[int, ...]
) -> torch.Tensor:
    """Reference: blur every logit row along the key axis, renormalised over the attendable neighbours.

    Args:
        logits (`torch.Tensor` of shape `[B, H, Q, K]`), float32.
        attendable (`torch.Tensor`, *optional*): bool, broadcastable to `[B, H, Q, K]`; `None` = every key.
        taps (`torch.Tensor` of shape `[B, T]`), offsets (`tuple[int, ...]` of length T): the kernel.

    Returns:
        `torch.Tensor` of shape `[B, H, Q, K]`; entries at non-attendable keys are left unchanged.
    """
    weight = logits.new_ones(1, 1, 1, logits.shape[-1]) if attendable is None else attendable.to(logits.dtype)
    numerator, denominator = 0.0, 0.0
    for tap, offset in enumerate(offsets):
        neighbour_weight = taps[:, tap].view(-1, 1, 1, 1) * _shift_keys(weight, offset, 0.0)
        numerator = numerator + neighbour_weight * _shift_keys(logits, offset, 0.0)
        denominator = denominator + neighbour_weight
    # An attendable key is its own neighbour (t = 0), so its denominator is positive.
    blurred = numerator / denominator.clamp_min(torch.finfo(logits.dtype).tiny)
    return blurred if attendable is None else torch.where(attendable, blurred, logits)


@functools.lru_cache(maxsize=32)
def _tap_bands(length: int, first_offset: int, taps: int, device: torch.device) -> torch.Tensor:
    """One-hot band of every tap: bands[t, j, j'] = 1 where j' - j is tap t's offset. Shape [T, K, K], float32."""
    positions = torch.arange(length, device=device)
    distance = positions[None, :] - positions[:, None] - first_offset  # [K, K]: tap index linking j to j'
    return (distance[None] == torch.arange(taps, device=device)[:, None, None]).float()


def _banded_blur_matrix(
    taps: torch.Tensor, offsets: tuple[int, ...], valid: torch.Tensor | None, length: int
) -> torch.Tensor:
    """W[b, j, j'] = g_b[j' - j] · valid[b, j'], rows renormalised to sum 1 (all-zero rows stay zero)."""
    bands = _tap_bands(length, offsets[0], taps.shape[1], taps.device)
    weight = torch.einsum("bt,tkj->bkj", taps, bands)  # [B, K, K]
    if valid is not None:
        weight = weight * valid[:, None, :].to(weight.dtype)
    return weight / weight.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(weight.dtype).tiny)


def _depthwise_blur(x: torch.Tensor, taps: torch.Tensor, offsets: tuple[int, ...]) -> torch.Tensor:
    """Σ_t g_b[t] x[b, c, j + t] with zeros outside, one depthwise convolution. x: [B, C, K] -> [B, C, K]."""
    batch, channels, length = x.shape
    padding = max(-offsets[0], offsets[-1])
    weight = taps.to(x.dtype).repeat_interleave(channels, dim=0)[:, None, :]  # [B * C, 1, T]
    out = F.conv1d(x.reshape(1, batch * channels, length), weight, padding=padding, groups=batch * channels)
    start = padding + offsets[0]  # symmetric padding: skip what an asymmetric kernel does not reach
    return out[..., start : start + length].view(batch, channels, length)


class _DepthwiseKeyBlur(torch.autograd.Function):
    """k̃ = G(valid ⊙ k) / G(valid) along the sequence, G a depthwise convolution per example.

    Linear in k, so the backward pass is the transposed map, valid ⊙ Gᵀ(g / G(valid)) with Gᵀ the same kernel
    reversed: only the [B, K] normaliser is saved, never a tensor of the keys' size.
    """

    @staticmethod
    def forward(
        ctx: Any, keys: torch.Tensor, valid: torch.Tensor | None, taps: torch.Tensor, offsets: tuple[int, ...]
    ) -> torch.Tensor:  # keys [B, H_kv, K, D] -> [B, H_kv, K, D]
        batch, kv_heads, length, head_dim = keys.shape
        mask = keys.new_ones(batch, 1, length) if valid is None else valid[:, None, :].to(keys.dtype)
        normaliser = _depthwise_blur(mask, taps, offsets).clamp_min(torch.finfo(keys.dtype).tiny)
        channels = _channels_first(keys)
        if valid is not None:
            channels.mul_(mask)
        blurred = _depthwise_blur(channels, taps, offsets).div_(normaliser)
        ctx.save_for_backward(mask, normaliser, taps)
        ctx.offsets, ctx.masked = offsets, valid is not None
        # Fused attention kernels want the head dimension contiguous.
        return blurred.view(batch, kv_heads, head_dim, length).permute(0, 1, 3, 2).contiguous()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        mask, normaliser, taps = ctx.saved_tensors
        batch, kv_heads, length, head_dim = grad.shape
        reversed_offsets = tuple(-offset for offset in reversed(ctx.offsets))
        grad_keys = _depthwise_blur(_channels_first(grad).div_(normaliser), taps.flip(-1), reversed_offsets)
        if ctx.masked:
            grad_keys.mul_(mask)
        return grad_keys.view(batch, kv_heads, head_dim, length).permute(0, 1, 3, 2), None, None, None


def _channels_first(x: torch.Tensor) -> torch.Tensor:
    """A fresh [B, H * D, K] copy of x [B, H, K, D] (fresh: safe to modify in place)."""
    batch, heads, length, head_dim = x.shape
    channels = torch.empty(batch, heads * head_dim, length, dtype=x.dtype, device=x.device)
    channels.view(batch, heads, head_dim, length).copy_(x.permute(0, 1, 3, 2))
    return channels


def blur_keys(
    keys: torch.Tensor, valid: torch.Tensor | None, taps: torch.Tensor, offsets: tuple[int, ...]
) -> torch.Tensor:
    """Fast path: blur the keys along the sequence so that `q · k̃` equals `blur_logits` of `q · k`.

    One batched matmul with a banded matrix for short sequences, one depthwise convolution (whose backward pass
    saves nothing of the keys' size) for long ones; both in the keys' dtype, accumulating in float32.

    Args:
        keys (`torch.Tensor` of shape `[B, H_kv, K, D]`).
        valid (`torch.Tensor` of shape `[B | 1, K]`, *optional*): bool, the keys every row may attend to
            (`key_validity`); `None` = all.
        taps (`torch.Tensor` of shape `[B, T]`), offsets (`tuple[int, ...]` of length T): the kernel.

    Returns:
        `torch.Tensor` of shape `[B, H_kv, K, D]`, dtype of `keys`.
    """
    batch, kv_heads, length, head_dim = keys.shape
    if valid is not None:
        valid = valid.expand(batch, length)
    if length > BANDED_MATMUL_MAX_KEYS:
        return _DepthwiseKeyBlur.apply(keys, valid, taps, offsets)
    weight = _banded_blur_matrix(taps, offsets, valid, length)  # [B, K, K]
    # All heads at once: [B, K, K] @ [B, K, H_kv * D]. Free when the keys are a head split of a projection
    # ([B, K, H_kv, D] in memory), as in most models; the result keeps that layout.
    rows = keys.transpose(1, 2).reshape(batch, length, kv_heads * head_dim)
    blurred = torch.bmm(weight.to(keys.dtype), rows)
    return blurred.view(batch, length, kv_heads, head_dim).transpose(1, 2)


def key_validity(
    attendable: torch.Tensor | None, causal: bool, assume_separable: bool = False
) -> tuple[bool, torch.Tensor | None]:
    """Whether attendability depends on the key alone (plus causality), and if so which keys are valid.

    This is the condition under which a blur along the key axis can be moved from the logits onto the keys: every
    row then renormalises over the same neighbours of a key.

    Args:
        assume_separable (`bool`): for a compiled graph, where testing the mask's values would break the graph: the
            mask is taken to be separable, and this is asserted on the device (`torch._assert_async`, no host
            sync): a mask that is not (packed sequences) raises instead of giving a wrong blur.

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
    if assume_separable:
        torch._assert_async(
            (expected.expand_as(attendable) == attendable).all(),
            "AttentionDrop's blur under torch.compile needs a mask of padding plus causality (a sliding window or "
            "packed sequences depend on the query): run this model uncompiled, where the blur falls back to its "
            "logit-space reference",
        )
    elif not torch.equal(expected.expand_as(attendable), attendable):
        return False, None
    return True, valid[:, 0, 0, :]
