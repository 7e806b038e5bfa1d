"""Hard Attention Masking (arXiv 2504.12088, Sec. 3.1) without the N × N logits: the fast path of `ops.hard`.

`hard_masked_attention` equals `ops.attention.logit_space_attention` with the `ops.hard` perturbation (forward and
gradients, for the same draws) while keeping memory at O(N · D): a blocked top-k pass, torch's fused CPU
flash-attention kernels on the clean logits, and an exact correction of the (at most top_k per row) dropped pairs.
"""

import math
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["hard_masked_attention"]


# ---------------------------------------------------------------------------------------------------------------------
# Hard-masked attention without the N × N logits
# ---------------------------------------------------------------------------------------------------------------------
#
# The top-k candidates need every logit of a row: a first pass computes them a block of (heads, query rows) at a time
# and keeps only the top-k indices. On the CPU both the forward and the backward then run torch's fused
# flash-attention kernels on the *clean* logits and correct, pair by pair, what the drop changes: at most top_k
# (query, key) pairs a row. With Z the clean normaliser of a row, p_j its
# clean probabilities and D its dropped keys, the perturbed row has
#     Z' / Z = 1 - Σ_D p_j + Σ_D e^(fill - lse)            (the last sum only for fill="zero", fill = 0),
#     O'     = (O - Σ_D (p_j - e^(fill - lse)) v_j) / (Z' / Z),       lse' = lse + log(Z' / Z).
# This cancels when the dropped keys held most of the row's mass (a peaked row, an attention sink). A row takes the
# correction only when the mass it drops is at most what remains (Σ_D p_j <= Z' / Z): the subtraction then loses
# about one bit, and in the backward every dropped key's weight under the perturbed normaliser, exp(s_j - lse'),
# the size of the terms that must be taken back out, is at most 1. Every other row is computed exactly from its
# recomputed logits, gathered head by head; off the CPU every row is, in dense blocks (`_exact_forward`,
# `_exact_backward`), which needs no host synchronisation.

# Query rows per block (see `_block_sizes`).
BLOCK_ROWS = 256


def hard_masked_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attendable: torch.Tensor | None,
    bias: torch.Tensor | None,
    scaling: float | None,
    top_k: int,
    p: float,
    fill: str,
    slot_uniforms: torch.Tensor,
) -> torch.Tensor:
    """Hard-masked attention that never holds the `[B, H, Q, K]` logits.

    Equals `logit_space_attention` with the `hard_drop_pattern` / `apply_hard_drop` perturbation, forward and
    gradients (with respect to `query`, `key`, `value` and `bias`), up to float rounding, for the same draws. The
    top-k candidates are found a block of (heads, query rows) at a time, by the same `topk` call on the same numbers
    as the reference (ties included; without a bias, on the products before the scale, which ranks them alike). Only
    O(N · D) tensors are saved for the backward: the inputs, the output, the per-row log-sum-exp of the perturbed
    logits, the candidates and drop flags `[B, H, Q, top_k]`, and which rows took the fused path.

    On the CPU the forward and the backward are torch's fused flash-attention kernels on the clean logits plus an
    exact correction of the dropped pairs (see the comment above `BLOCK_ROWS`); rows where that correction would
    cancel, every row off the CPU, and every row of the backward when `bias` needs a gradient (the fused backward
    gives none) are computed exactly, block by block, from recomputed logits.

    Attention-probability dropout and a softcap are not supported: use `logit_space_attention` for those.

    Args:
        query (`torch.Tensor` of shape `[B, H, Q, D]`).
        key (`torch.Tensor` of shape `[B, H_kv, K, D]`): H must be a multiple of H_kv (grouped KV heads).
        value (`torch.Tensor` of shape `[B, H_kv, K, D_v]`).
        attendable (`torch.Tensor`, *optional*): bool, broadcastable to `[B, H, Q, K]`; `None` = every key.
        bias (`torch.Tensor`, *optional*): float, broadcastable to `[B, H, Q, K]`: a logit term added before the
            perturbation (the finite part of a float mask, a relative position bias).
        scaling (`float`, *optional*): logit scale, `D ** -0.5` by default.
        top_k (`int`): candidates per row, clamped to K and, per row, to the attendable keys.
        p (`float`): drop probability of each candidate.
        fill (`str`): `"zero"` (a dropped logit becomes 0, the paper) or `"mask"` (its key leaves the softmax).
        slot_uniforms (`torch.Tensor` of shape `[B, H, Q, >= min(top_k, K)]`): U(0, 1) draws, one per candidate
            slot; slot s of a row is dropped when its draw is `< p`.

    Returns:
        `torch.Tensor` of shape `[B, Q, H, D_v]` (contiguous), in the dtype of `query`.
    """
    if fill not in ("zero", "mask"):
        raise ValueError(f"`fill` must be 'zero' or 'mask', got {fill!r}")
    if query.shape[1] % key.shape[1] != 0:
        raise ValueError(f"query heads ({query.shape[1]}) must be a multiple of key heads ({key.shape[1]})")
    scaling = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
    attendable, bias, slot_uniforms = (_as_4d(t) for t in (attendable, bias, slot_uniforms))
    return _HardMaskedAttention.apply(query, key, value, bias, attendable, scaling, top_k, p, fill, slot_uniforms)


def _as_4d(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """A tensor broadcastable to `[B, H, Q, K]` with its missing leading axes added (size 1)."""
    if tensor is None or tensor.dim() >= 4:
        return tensor
    return tensor.view((1,) * (4 - tensor.dim()) + tuple(tensor.shape))


def _block_of(tensor: torch.Tensor | None, b: int, heads: slice, rows: slice | torch.Tensor) -> torch.Tensor | None:
    """Example `b`, heads `heads` and query rows `rows` of a `[B | 1, H | 1, Q | 1, ...]` tensor.

    Size-1 axes stay (they broadcast against the block): `[B, H, Q, X] -> [h | 1, r | 1, X]`. A view when `rows` is
    a slice, a copy when it is an index tensor.
    """
    if tensor is None:
        return None
    return tensor[
        b if tensor.shape[0] > 1 else 0,
        heads if tensor.shape[1] > 1 else slice(None),
        rows if tensor.shape[2] > 1 else slice(None),
    ]


def _block_sizes(heads: int, query_len: int, key_len: int, budget: int) -> tuple[int, int]:
    """(heads, query rows) of a block of at most `budget` logits, and at least one head of up to `BLOCK_ROWS` rows.

    Rows: 256, enough for the matmuls whose inner dimension is the rows (dK = dSᵀ Q, dV = Pᵀ dO) to run at full
    speed. Heads: as many as the budget allows. The top-k pass holds one block of logits at a time and takes the size
    of q (B · H · Q · D elements) as its budget: no more than the backward holds anyway. The exact passes hold two
    blocks (the logits and their gradient) next to the gradients, and take a quarter of it. Few large blocks matter
    on a shared CPU: every op opens a parallel region whose threads wait for the slowest one.
    """
    rows = min(query_len, BLOCK_ROWS)
    return max(1, min(heads, budget // (rows * key_len))), rows


def _dense_blocks(query: torch.Tensor, key_len: int, budget: int) -> Iterator[tuple[int, slice, slice]]:
    """Every (example, heads, rows) block of a `[B, H, Q, ...]` query, rows as slices."""
    batch, heads, query_len, _ = query.shape
    block_heads, block_rows = _block_sizes(heads, query_len, key_len, budget)
    for b in range(batch):
        for h in range(0, heads, block_heads):
            for r in range(0, query_len, block_rows):
                yield b, slice(h, h + block_heads), slice(r, r + block_rows)


def _row_blocks(rows: torch.Tensor, key_len: int) -> Iterator[tuple[int, slice, torch.Tensor]]:
    """Blocks covering the rows flagged in `rows` `[B, H, Q]`: one head at a time, the rows as index tensors."""
    block_rows = min(rows.shape[2], BLOCK_ROWS)
    for b, h in rows.any(-1).nonzero().tolist():
        for chunk in rows[b, h].nonzero().squeeze(1).split(block_rows):
            yield b, slice(h, h + 1), chunk


def _repeat_heads(states: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, H_kv, K, D] -> [B, H, K, D], each KV head serving consecutive query heads (as `repeat_kv`)."""
    repeats = heads // states.shape[1]
    if repeats == 1:
        return states
    batch, kv_heads, length, dim = states.shape
    return states[:, :, None].expand(batch, kv_heads, repeats, length, dim).reshape(batch, heads, length, dim)


def _fused_kernels_apply(query: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether torch's CPU flash-attention kernels (forward with log-sum-exp, backward) can be used. Not in a compiled
    graph: the correction's pair list has a data-dependent size, which would break the graph; the dense blocks
    do not."""
    return (
        query.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and query.shape[-1] == value.shape[-1]
        and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward")
    )


class _Call:
    """One call's tensors: the inputs (keys and values repeated to one per query head), the candidates and the drop,
    and what the forward computes and the backward accumulates."""

    def __init__(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        bias: torch.Tensor | None,
        attendable: torch.Tensor | None,
        scaling: float,
        fill: str,
    ) -> None:
        heads = query.shape[1]
        self.query, self.bias, self.attendable, self.scaling, self.fill = query, bias, attendable, scaling, fill
        self.key, self.value = _repeat_heads(key, heads), _repeat_heads(value, heads)  # [B, H, K, D]
        self.fill_value = 0.0 if fill == "zero" else float("-inf")
        # Set by the forward: candidates `[B, H, Q, k]` (long) and the drop (bool); the output `[B, Q, H, D_v]`,
        # the perturbed log-sum-exp `[B, H, Q]` (+inf for rows with nothing to attend to).
        self.candidates = self.dropped = self.output = self.lse = None
        # Set by the backward.
        self.grad = self.delta = self.grad_query = self.grad_key = self.grad_value = self.grad_bias = None

    def additive_mask(self, dtype: torch.dtype) -> torch.Tensor | None:
        """The bias and the attendability as one additive float mask, as SDPA takes it (-inf = not attendable)."""
        if self.attendable is None:
            return None if self.bias is None else self.bias.to(dtype)
        bias = torch.zeros((), dtype=dtype, device=self.query.device) if self.bias is None else self.bias.to(dtype)
        return torch.where(self.attendable, bias, float("-inf"))

    def zero_gradients(self, bias_grad: bool) -> None:
        """Start the gradients at zero, in float32 (keys and values: one per query head, `[B, H, K, D]`)."""
        options = {"dtype": torch.float32, "device": self.query.device}
        self.grad_query = torch.zeros(self.query.shape, **options)
        self.grad_key = torch.zeros(self.key.shape, **options)
        self.grad_value = torch.zeros(self.value.shape, **options)
        if bias_grad:
            self.grad_bias = torch.zeros(self.bias.shape, **options)

    def perturbed_logits(self, b: int, hs: slice, rows: slice | torch.Tensor) -> torch.Tensor:
        """A block `[h, r, K]` of the perturbed logits (float32), keys a row may not attend to at -inf.

        Computed as `attention_logits` does (matmul in the input dtype, then float32, scale, bias), then the drop.
        """
        logits = torch.matmul(self.query[b, hs, rows], self.key[b, hs].transpose(-1, -2))  # [h, r, K]
        logits = (logits.float() if logits.dtype != torch.float32 else logits).mul_(self.scaling)
        if self.bias is not None:
            logits.add_(_block_of(self.bias, b, hs, rows))
        allowed = _block_of(self.attendable, b, hs, rows)
        if allowed is not None:
            logits.masked_fill_(allowed.logical_not(), float("-inf"))
        indices, drop = self.candidates[b, hs, rows], self.dropped[b, hs, rows]
        return logits.scatter_(-1, indices, logits.gather(-1, indices).masked_fill_(drop, self.fill_value))


class _HardMaskedAttention(torch.autograd.Function):
    """`hard_masked_attention`'s forward and backward. Saves the inputs, the output, the perturbed log-sum-exp, the
    candidates and the drop, and (fused path) which rows took the correction; recomputes everything else."""

    @staticmethod
    def forward(
        ctx: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        bias: torch.Tensor | None,
        attendable: torch.Tensor | None,
        scaling: float,
        top_k: int,
        p: float,
        fill: str,
        slot_uniforms: torch.Tensor,
    ) -> torch.Tensor:
        call = _Call(query, key, value, bias, attendable, scaling, fill)
        batch, heads, query_len, _ = query.shape
        if _fused_kernels_apply(query, value):
            exact_rows = _fused_forward(call, top_k, p, slot_uniforms)
        else:
            _top_candidates(call, top_k, p, slot_uniforms)
            call.output = query.new_empty(batch, query_len, heads, value.shape[-1])
            call.lse = query.new_empty(batch, heads, query_len, dtype=torch.float32)
            exact_rows = None
        _exact_forward(call, exact_rows)
        safe = None if exact_rows is None else ~exact_rows
        output = call.output.to(query.dtype)
        ctx.save_for_backward(query, key, value, bias, output, call.lse, call.candidates, call.dropped, safe)
        ctx.attendable, ctx.scaling, ctx.fill = attendable, scaling, fill
        return output

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        query, key, value, bias, output, lse, candidates, dropped, safe = ctx.saved_tensors
        call = _Call(query, key, value, bias, ctx.attendable, ctx.scaling, ctx.fill)
        call.output, call.lse, call.candidates, call.dropped = output, lse, candidates, dropped
        call.grad = grad_output.transpose(1, 2)  # [B, H, Q, D_v], a view of [B, Q, H, D_v]
        bias_grad = bias is not None and ctx.needs_input_grad[3]
        if safe is not None and not bias_grad and _fused_kernels_apply(query, value):
            exact_rows = _fused_backward(call, safe)
        else:
            call.zero_gradients(bias_grad)
            exact_rows = None
        _exact_backward(call, exact_rows)
        grad_key, grad_value = call.grad_key, call.grad_value
        kv_heads, heads = key.shape[1], query.shape[1]
        if kv_heads != heads:  # sum over the query heads that share a KV head: [B, H, K, D] -> [B, H_kv, K, D]
            grad_key = grad_key.unflatten(1, (kv_heads, heads // kv_heads)).sum(2)
            grad_value = grad_value.unflatten(1, (kv_heads, heads // kv_heads)).sum(2)
        grad_bias = call.grad_bias.to(bias.dtype) if bias_grad else None
        grads = (call.grad_query.to(query.dtype), grad_key.to(key.dtype), grad_value.to(value.dtype), grad_bias)
        return grads + (None,) * 6


def _top_candidates(call: _Call, top_k: int, p: float, slot_uniforms: torch.Tensor) -> torch.Tensor:
    """`hard_drop_pattern`, a block of (heads, rows) at a time: the same topk call on the same numbers as the
    reference (ties included). Sets `call.candidates` and `call.dropped` `[B, H, Q, k]`.

    Returns:
        `torch.Tensor` of shape `[B, H, Q, k]`, float32: the candidates' clean logits (-inf for masked keys).
    """
    query, key, bias = call.query, call.key, call.bias
    batch, heads, query_len, _ = query.shape
    key_len = key.shape[2]
    k = min(top_k, key_len)
    call.candidates = torch.empty(batch, heads, query_len, k, dtype=torch.long, device=query.device)
    call.dropped = torch.empty(batch, heads, query_len, k, dtype=torch.bool, device=query.device)
    clean = torch.empty(batch, heads, query_len, k, dtype=torch.float32, device=query.device)
    # One buffer for the blocks' scores: a fresh 2^20-element tensor per block would be fresh pages to fault in.
    block_heads, block_rows = _block_sizes(heads, query_len, key_len, query.numel())
    buffer = query.new_empty(block_heads, block_rows, key_len)
    for b, hs, rows in _dense_blocks(query, key_len, budget=query.numel()):
        block_query = query[b, hs, rows]
        out = buffer if block_query.shape[:2] == buffer.shape[:2] else None  # the last blocks may be smaller
        scores = torch.matmul(block_query, key[b, hs].transpose(-1, -2), out=out)  # [h, r, K], in the input dtype
        if bias is not None:  # the reference's logits: float32, scaled, plus the bias
            scores = scores.float().mul_(call.scaling).add_(_block_of(bias, b, hs, rows))
        # Without a bias the products are ranked as they are: a positive scale orders them alike (topk compares
        # bfloat16 as float32), and only the k winners are scaled.
        allowed = _block_of(call.attendable, b, hs, rows)
        if allowed is not None:
            scores.masked_fill_(allowed.logical_not(), float("-inf"))
        values, indices = scores.topk(k, dim=-1)  # [h, r, k], slot s = the s-th largest
        values = values.float()
        if bias is None:
            values.mul_(call.scaling)
        # Slot s drops when its draw is < p; a masked key (rows with fewer than k attendable keys fill their other
        # slots with them, at -inf) never drops.
        drop = (_block_of(slot_uniforms, b, hs, rows)[..., :k] < p) & (values != float("-inf"))
        call.candidates[b, hs, rows] = indices
        call.dropped[b, hs, rows] = drop
        clean[b, hs, rows] = values
    return clean


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The fused kernels run in float32 for bfloat16 and float16 inputs, so that the corrections subtract at float32
    precision (the reference rounds to the input dtype at every matmul; this path only once, at the output)."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


# Ops on fewer elements than these run inline on the calling thread; larger ones open a parallel region, and on a
# shared CPU every parallel region waits for its slowest thread, far longer than the small correction ops take. Most
# elementwise ops go parallel from 32768 elements (ATen's grain size), exp and log (MKL's vectorised math) from 2048.
INLINE_ELEMENTS = 1 << 15
INLINE_TRANSCENDENTALS = 2047


def _exp(x: torch.Tensor) -> torch.Tensor:
    """exp(x) for the small per-pair tensors. `torch.exp` and `torch.log` go through MKL's vector math, which opens a
    parallel region even for a few hundred elements once `torch.set_num_threads` has turned MKL's dynamic threading
    off (8 ms instead of 4 us a call on a shared CPU); a power of e does not, and is as accurate (about 1 ulp)."""
    return torch.pow(math.e, x)


def _pair_chunks(pairs: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, ...]:
    """Chunks of (query, key) pairs small enough that their gathered `[pairs, head_dim]` rows and per-pair exp run
    inline (see `INLINE_ELEMENTS`)."""
    return pairs.split(max(1, min(INLINE_TRANSCENDENTALS, (INLINE_ELEMENTS - 1) // head_dim)))


class _Rows:
    """Rows `t[b, h, n, :]` of a 4-d tensor, addressed by flat row numbers of a `[rows, D]` view of its memory.

    Gathers use `index_select` and scatters `index_put_(accumulate=True)` on that view: advanced indexing
    (`t[b, h, n]`) into a large tensor opens a parallel region even for a few rows, these do not. The view follows
    the tensor's memory order (the `[B, Q, H, D]` layout of a kernel's output, seen as `[B, H, Q, D]`, needs no copy);
    any other layout is copied once.
    """

    def __init__(self, tensor: torch.Tensor) -> None:
        self.order = sorted(range(3), key=lambda axis: tensor.stride(axis), reverse=True)
        permuted = tensor.permute(*self.order, 3)
        self.is_view = permuted.is_contiguous()  # a permutation of a contiguous tensor
        self.sizes = permuted.shape[:3]
        self.flat = permuted.contiguous().view(-1, tensor.shape[3])

    def rows(self, b: torch.Tensor, h: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """Flat row numbers of (b, h, n)."""
        first, second, third = ((b, h, n)[axis] for axis in self.order)
        return (first * self.sizes[1] + second) * self.sizes[2] + third

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        return self.flat.index_select(0, rows)

    def add(self, rows: torch.Tensor, values: torch.Tensor) -> None:
        """tensor[rows] += values, in place (the tensor must be a permutation of a contiguous one)."""
        if not self.is_view:
            raise RuntimeError("in-place row updates need a tensor whose memory is a permutation of its axes")
        self.flat.index_put_((rows,), values.to(self.flat.dtype), accumulate=True)


def _unravel(rows: torch.Tensor, heads: int, query_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat row numbers of a `[B, H, Q]` grid -> (b, h, i)."""
    return rows // (heads * query_len), rows // query_len % heads, rows % query_len


def _fused_forward(call: _Call, top_k: int, p: float, slot_uniforms: torch.Tensor) -> torch.Tensor:
    """Forward of the rows whose correction is well conditioned: the fused kernel on the clean logits, then
    O' = (O - Σ_D (p_j - e^(fill - lse)) v_j) / (Z' / Z) and lse' = lse + log(Z' / Z).

    Returns:
        `torch.Tensor` of shape `[B, H, Q]`, bool: the rows left to `_exact_forward` (dropped mass above the
        remaining mass, or no key to attend to).
    """
    query = call.query
    dtype = _compute_dtype(query.dtype)
    value = call.value.to(dtype)
    output, clean_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query.to(dtype), call.key.to(dtype), value, 0.0, False, attn_mask=call.additive_mask(dtype), scale=call.scaling
    )  # output [B, H, Q, D] (a view of [B, Q, H, D]), lse [B, H, Q]
    clean_lse = clean_lse.float()
    clean = _top_candidates(call, top_k, p, slot_uniforms)  # [B, H, Q, k]
    batch, heads, query_len, k = clean.shape
    # Every dropped pair is corrected, a chunk at a time after the top-k pass (so that these small ops neither open
    # nor follow parallel regions); rows found unsafe below are recomputed by `_exact_forward` anyway.
    value_rows, output_rows = _Rows(value), _Rows(output)
    lse_flat, clean_flat, candidates_flat = clean_lse.reshape(-1), clean.view(-1), call.candidates.view(-1)
    removed = torch.zeros(batch * heads * query_len, dtype=torch.float32, device=query.device)  # Σ_D p_j
    pairs = call.dropped.view(-1).nonzero().squeeze(1)  # flat (b, h, i, slot)
    for chunk in _pair_chunks(pairs, value.shape[-1]):
        row = chunk // k  # flat (b, h, i)
        b, h, i = _unravel(row, heads, query_len)
        lse = lse_flat.index_select(0, row)
        probs = _exp(clean_flat.index_select(0, chunk) - lse)  # the dropped keys' clean probabilities
        removed.scatter_add_(0, row, probs)
        weight = probs - _exp(-lse) if call.fill == "zero" else probs  # what the drop takes from each key
        keys = value_rows.gather(value_rows.rows(b, h, candidates_flat.index_select(0, chunk)))
        output_rows.add(output_rows.rows(b, h, i), -weight.unsqueeze(-1) * keys)
    removed = removed.view(clean_lse.shape)
    filled = (-clean_lse).exp() * call.dropped.sum(-1) if call.fill == "zero" else 0.0  # Σ_D e^(0 - lse)
    ratio = 1.0 - removed + filled  # Z' / Z
    # A row with no attendable key (lse = -inf, NaN above) compares False: it is exact too.
    safe = (removed <= ratio) & clean_lse.isfinite()
    output.div_(ratio.unsqueeze(-1))  # unsafe rows are overwritten
    call.output = output.transpose(1, 2).contiguous()  # [B, Q, H, D]; no copy for long sequences
    call.lse = clean_lse.add_(ratio.log_())
    return ~safe


def _exact_forward(call: _Call, rows: torch.Tensor | None) -> None:
    """Forward of every row (`rows=None`) or of the rows flagged in `rows` `[B, H, Q]`: a softmax of recomputed
    logits (masked_softmax's convention: rows with no key left get all-zero weights, lse = +inf)."""
    query, key_len = call.query, call.key.shape[2]
    blocks = _dense_blocks(query, key_len, query.numel() // 4) if rows is None else _row_blocks(rows, key_len)
    # Each row's max and sum of exponentials; their log-sum-exp is taken once at the end (see `_exp` on small logs).
    maxima, totals = torch.zeros_like(call.lse), torch.ones_like(call.lse)
    for b, hs, block_rows in blocks:
        logits = call.perturbed_logits(b, hs, block_rows)  # [h, r, K]
        row_max = logits.amax(-1, keepdim=True)
        dead = row_max == float("-inf")
        row_max.masked_fill_(dead, 0.0)
        probs = logits.sub_(row_max).exp_()  # unnormalised
        total = probs.sum(-1, keepdim=True).masked_fill_(dead, 1.0)
        if query.dtype == torch.float32:
            block_output = torch.matmul(probs, call.value[b, hs]).div_(total)  # [h, r, D_v]
        else:  # the reference rounds the normalised probabilities to the input dtype
            block_output = torch.matmul(probs.div_(total).to(query.dtype), call.value[b, hs])
        call.output[b, block_rows, hs] = block_output.transpose(0, 1).to(call.output.dtype)
        maxima[b, hs, block_rows] = row_max.masked_fill_(dead, float("inf")).squeeze(-1)  # lse = +inf
        totals[b, hs, block_rows] = total.squeeze(-1)
    lse = maxima.add_(totals.log_())
    call.lse = lse if rows is None else torch.where(rows, lse, call.lse)


def _fused_backward(call: _Call, safe: torch.Tensor) -> torch.Tensor:
    """Gradients of the `safe` rows: the fused backward given O' and lse', then a correction of the dropped pairs.

    From O' and lse' the kernel recomputes P_ij = exp(s_ij - lse'_i) with the clean logits s, exact for every kept
    key, and dS = P ∘ (dO Vᵀ - rowsum(dO ∘ O')), exact there too. A dropped key instead gets P_ij = exp(s_ij - lse'_i)
    (a zero-filled one should get exp(0 - lse'_i), a removed one 0) and a nonzero dS_ij (it should get none: its
    logit is a constant). Those terms are taken back out pair by pair: dV_j += (P'_ij - P_ij) dO_i,
    dQ_i -= scale dS_ij k_j, dK_j -= scale dS_ij q_i; safe rows keep every such P_ij <= 1. Other rows get
    lse = +inf, which makes all their P_ij 0: they contribute nothing here.

    Returns:
        `torch.Tensor` of shape `[B, H, Q]`, bool: the rows left to `_exact_backward`.
    """
    dtype = _compute_dtype(call.query.dtype)
    query, key, value = call.query.to(dtype), call.key.to(dtype), call.value.to(dtype)
    grad, output = call.grad.to(dtype), call.output.transpose(1, 2).to(dtype)
    lse = call.lse.masked_fill(~safe, float("inf"))
    call.grad_query, call.grad_key, call.grad_value = (
        g.float()
        for g in torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad,
            query,
            key,
            value,
            output,
            lse.to(dtype),
            0.0,
            False,
            attn_mask=call.additive_mask(dtype),
            scale=call.scaling,
        )
    )
    heads, query_len, k = call.dropped.shape[1:]
    tables = [_Rows(t) for t in (query, key, value, grad, output, call.grad_query, call.grad_key, call.grad_value)]
    query_rows, key_rows, value_rows, grad_rows, output_rows, grad_query, grad_key, grad_value = tables
    lse_flat, candidates_flat = lse.view(-1), call.candidates.view(-1)
    if call.bias is not None:  # bias[b, h, i, j] at flat offsets: broadcast axes have stride 0 once expanded
        bias = call.bias.contiguous()
        bias_strides = bias.expand(*lse.shape, -1).stride()
        bias = bias.view(-1)
    pairs = (call.dropped & safe[..., None]).view(-1).nonzero().squeeze(1)  # flat (b, h, i, slot)
    for chunk in _pair_chunks(pairs, query.shape[-1]):
        row = chunk // k  # flat (b, h, i)
        b, h, i = _unravel(row, heads, query_len)
        j = candidates_flat.index_select(0, chunk)
        at_query, at_grad, at_key = query_rows.rows(b, h, i), grad_rows.rows(b, h, i), key_rows.rows(b, h, j)
        query_i, grad_i = query_rows.gather(at_query), grad_rows.gather(at_grad)
        output_i = output_rows.gather(output_rows.rows(b, h, i))
        key_j, value_j = key_rows.gather(at_key), value_rows.gather(value_rows.rows(b, h, j))
        # The clean logit as the kernel computed it (from the inputs in its dtype, not rounded to the input dtype as
        # the forward's were), so that exactly what it added is taken out.
        logit = (query_i * key_j).sum(-1) * call.scaling
        if call.bias is not None:
            logit = logit + bias.index_select(0, sum(ix * st for ix, st in zip((b, h, i, j), bias_strides)))
        row_lse = lse_flat.index_select(0, row)
        weight = _exp(logit - row_lse)  # what the kernel gave the dropped key
        # The kernel's dS_ij (with its own rowsum(dO ∘ O')), times the scale.
        dlogit = (weight * call.scaling * ((grad_i * value_j).sum(-1) - (grad_i * output_i).sum(-1))).unsqueeze(-1)
        grad_query.add(grad_query.rows(b, h, i), -dlogit * key_j)
        grad_key.add(grad_key.rows(b, h, j), -dlogit * query_i)
        true_weight = _exp(-row_lse) if call.fill == "zero" else 0.0
        grad_value.add(grad_value.rows(b, h, j), (true_weight - weight).unsqueeze(-1) * grad_i)
    return ~safe & (call.lse != float("inf"))  # rows with no key to attend to have no gradient


def _exact_backward(call: _Call, rows: torch.Tensor | None) -> None:
    """Flash-attention backward of every row (`rows=None`) or of the rows flagged in `rows` `[B, H, Q]`.

    Each block recomputes its perturbed logits, P = exp(L' - lse'), and the softmax backward
    dS = P ∘ (dP - rowsum(dO ∘ O)) with dS = 0 at zero-filled logits (constants); a removed key has P = 0 already.
    """
    query, key, value, dtype = call.query, call.key, call.value, call.query.dtype
    key_len = key.shape[2]
    if rows is not None and not rows.any():
        return
    # rowsum(dO ∘ O) = Σ_j P_ij dP_ij, the softmax backward's row term.
    call.delta = (call.grad.float() * call.output.transpose(1, 2).float()).sum(-1)  # [B, H, Q]
    blocks = _dense_blocks(query, key_len, query.numel() // 4) if rows is None else _row_blocks(rows, key_len)
    for b, hs, block_rows in blocks:
        probs = call.perturbed_logits(b, hs, block_rows).sub_(call.lse[b, hs, block_rows].unsqueeze(-1)).exp_()
        grad = call.grad[b, hs, block_rows]  # [h, r, D_v]
        _add_product(call.grad_value[b, hs], probs.transpose(-1, -2).to(dtype), grad)
        dlogits = torch.matmul(grad, value[b, hs].transpose(-1, -2)).float()  # dP, [h, r, K]
        dlogits.sub_(call.delta[b, hs, block_rows].unsqueeze(-1)).mul_(probs)
        if call.fill == "zero":  # a zero-filled logit is a constant: no gradient reaches the scores through it
            indices, drop = call.candidates[b, hs, block_rows], call.dropped[b, hs, block_rows]
            dlogits.scatter_(-1, indices, dlogits.gather(-1, indices).masked_fill_(drop, 0.0))
        if call.grad_bias is not None:  # dense blocks only: block_rows is a slice, the block of grad_bias a view
            target = _block_of(call.grad_bias, b, hs, block_rows)  # [h | 1, r | 1, K]
            summed = [axis for axis in (0, 1) if target.shape[axis] == 1 and dlogits.shape[axis] > 1]
            target.add_(dlogits.sum(summed, keepdim=True) if summed else dlogits)
        dlogits = dlogits.to(dtype)
        if isinstance(block_rows, slice):
            _add_product(call.grad_query[b, hs, block_rows], dlogits, key[b, hs], call.scaling)
        else:
            call.grad_query[b, hs, block_rows] += torch.matmul(dlogits, key[b, hs]).float().mul_(call.scaling)
        _add_product(call.grad_key[b, hs], dlogits.transpose(-1, -2), query[b, hs, block_rows], call.scaling)


def _add_product(target: torch.Tensor, left: torch.Tensor, right: torch.Tensor, alpha: float = 1.0) -> None:
    """target += alpha · left @ right (batched), fused when the dtypes allow it."""
    if left.dtype == target.dtype:
        target.baddbmm_(left, right, alpha=alpha)
    else:
        target.add_(torch.matmul(left, right), alpha=alpha)
