"""Attention in logit space with a perturbation hook: the reference every AttentionDrop variant is defined by.

`logit_space_attention` materialises the `[B, H, Q, K]` logits `L = Q Kᵀ · scale (+ position bias, + the finite
part of a float mask)`, lets a variant perturb them, and then applies a softmax restricted to the attendable keys (in
float32, all-zero weights for rows with nothing to attend to), attention dropout, and the product with the values.
Every term the model adds to its logits enters before the perturbation; only attendability acts after it. With no
perturbation it is a generic eager attention (grouped KV heads, T5 position bias, bool or float masks).

`chunked_logit_space_attention` computes the same thing a block of query rows at a time, each block under
activation checkpointing, so that no `N × N` tensor is ever held for the backward pass: peak memory is one block of
logits instead of all of them. Random draws are made once, before the blocks, and sliced per block, so both
functions give identical results for the same draws.
"""

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .masks import masked_softmax

__all__ = [
    "attention_entropy",
    "attention_logits",
    "chunked_logit_space_attention",
    "logit_space_attention",
    "repeat_kv",
    "rows_of",
]

# perturb(logits [B, H, q, K] float32, attendable, rows) -> (logits, attendable); `rows` are the query rows.
Perturbation = Callable[[torch.Tensor, torch.Tensor | None, slice], tuple[torch.Tensor, torch.Tensor | None]]


def repeat_kv(states: torch.Tensor, repeats: int) -> torch.Tensor:
    """[B, H_kv, K, D] -> [B, H_kv * repeats, K, D], each KV head serving `repeats` consecutive query heads."""
    if repeats == 1:
        return states
    batch, kv_heads, length, head_dim = states.shape
    return (
        states[:, :, None]
        .expand(batch, kv_heads, repeats, length, head_dim)
        .reshape(-1, kv_heads * repeats, length, head_dim)
    )


def rows_of(tensor: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    """Slice the query axis (dim 2) of a tensor broadcastable to `[B, H, Q, ...]`; size-1 axes broadcast."""
    if tensor is None or tensor.shape[2] == 1:
        return tensor
    return tensor[:, :, rows]


def attention_logits(
    query: torch.Tensor,
    key: torch.Tensor,
    scaling: float | None = None,
    bias: torch.Tensor | None = None,
    position_bias: torch.Tensor | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """The float32 logits `[B, H, Q, K]` a variant perturbs: `Q Kᵀ · scale`, softcapped, plus the position bias and
    the finite part of a float mask (arguments as in `logit_space_attention`; keys `[B, H_kv, K, D]`)."""
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    key = repeat_kv(key, query.shape[1] // key.shape[1])
    logits = torch.matmul(query, key.transpose(-1, -2)).float() * scaling  # [B, H, Q, K]
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    if position_bias is not None:
        logits = logits + position_bias
    if bias is not None:
        logits = logits + bias
    return logits


def attention_entropy(probs: torch.Tensor, attendable: torch.Tensor | None) -> torch.Tensor:
    """Mean entropy (nats) of the attention rows `[B, H, Q, K]` that have a key to attend to."""
    entropy = -(probs * probs.clamp_min(torch.finfo(probs.dtype).tiny).log()).sum(-1)
    if attendable is None:
        return entropy.mean()
    rows = attendable.expand_as(probs).any(-1)
    return entropy[rows].mean()


def logit_space_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attendable: torch.Tensor | None,
    bias: torch.Tensor | None = None,
    scaling: float | None = None,
    dropout: float = 0.0,
    position_bias: torch.Tensor | None = None,
    softcap: float | None = None,
    perturb: Perturbation | None = None,
    rows: slice = slice(None),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with explicit logits.

    Args:
        query (`torch.Tensor` of shape `[B, H, Q, D]`).
        key, value (`torch.Tensor` of shape `[B, H_kv, K, D]`): H must be a multiple of H_kv.
        attendable (`torch.Tensor`, *optional*): bool, broadcastable to `[B, H, Q, K]`; `None` = every key.
        bias (`torch.Tensor`, *optional*): the finite part of a float mask (`ops.masks.attendable_keys`), a term of
            the logits such as BEiT's relative position bias; added before the perturbation.
        scaling (`float`, *optional*): logit scale, `D ** -0.5` by default.
        dropout (`float`): attention-probability dropout (pass 0 in eval, as Transformers does).
        position_bias (`torch.Tensor`, *optional*): a model bias (T5) added to the logits before the perturbation.
        softcap (`float`, *optional*): `softcap · tanh(L / softcap)` before the perturbation (Gemma 2).
        perturb (`Perturbation`, *optional*): the variant, applied to float32 logits.
        rows (`slice`): which query rows of the whole call these are (for slicing per-row random draws).

    Returns:
        `output` of shape `[B, Q, H, D]` (contiguous) and the attention probabilities `[B, H, Q, K]`.
    """
    logits = attention_logits(query, key, scaling, bias, position_bias, softcap)
    value = repeat_kv(value, query.shape[1] // value.shape[1])
    if perturb is not None:
        logits, attendable = perturb(logits, attendable, rows)
    probs = masked_softmax(logits, attendable).to(query.dtype)
    if dropout > 0.0:
        probs = F.dropout(probs, p=dropout, training=True)
    output = torch.matmul(probs, value)  # [B, H, Q, D]
    return output.transpose(1, 2).contiguous(), probs


def chunked_logit_space_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attendable: torch.Tensor | None,
    rows_per_chunk: int,
    bias: torch.Tensor | None = None,
    position_bias: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """`logit_space_attention` a block of query rows at a time, each block recomputed in the backward pass.

    Same arguments as `logit_space_attention` (`rows` excepted), plus `rows_per_chunk`. Returns only the output
    `[B, Q, H, D]`: the full probability matrix is what this function exists to avoid.
    """
    batch, heads, query_len, _ = query.shape
    output = query.new_empty(batch, query_len, heads, value.shape[-1])  # blocks are copied in as they are made
    for start in range(0, query_len, rows_per_chunk):
        rows = slice(start, start + rows_per_chunk)

        def attend_rows(
            query_rows: torch.Tensor, key: torch.Tensor, value: torch.Tensor, rows: slice = rows
        ) -> torch.Tensor:
            return logit_space_attention(
                query_rows,
                key,
                value,
                rows_of(attendable, rows),
                bias=rows_of(bias, rows),
                position_bias=rows_of(position_bias, rows),
                rows=rows,
                **kwargs,
            )[0]

        # Non-reentrant checkpointing restores the RNG state for the recomputation: attention dropout replays.
        output[:, rows] = checkpoint(attend_rows, query[:, :, rows], key, value, use_reentrant=False)
    return output
