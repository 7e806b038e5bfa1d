"""The `"attentiondrop"` attention implementation: Transformers' AttentionInterface contract, thin glue over `ops`.

`attentiondrop_attention_forward` has the signature and return contract of `sdpa_attention_forward`
(`[B, H, S, D]` in, `([B, Q, H, D] contiguous, weights or None)` out) and reads one thing: the module's `SitePlan`
(`hf.plan`), built when the model was loaded or switched on. Its first decision is the identity exit: in eval, for an
untargeted role or layer, or for options that change nothing, it calls the module's base implementation with the
very same arguments, so eval equals the base bit for bit. Otherwise the variant's fast path runs where it applies,
else its logit-space reference (in checkpointed blocks of query rows for long sequences).

Two names are registered, one per base, so that the mask a model builds is the one its base expects:
`"attentiondrop"` (base SDPA: SDPA's boolean mask, or none) and `"attentiondrop_eager"` (base eager: the additive
float mask). Requesting `attn_implementation="attentiondrop"` at load time keeps the model's own base (`hf.loading`),
which is then one of the two.
"""

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from ..ops import (
    attendable_keys,
    attention_entropy,
    attention_logits,
    chunked_logit_space_attention,
    logit_space_attention,
    masked_softmax,
    rows_of,
)
from ..variants import AttentionDropVariant, PerturbedCall
from ..variants.base import MonitoredLogits
from .plan import SitePlan, plan_of

__all__ = [
    "ATTN_IMPLEMENTATION",
    "IMPLEMENTATION_OF_BASE",
    "attentiondrop_attention_forward",
    "force_reference_path",
    "monitor_attention",
    "register",
]

ATTN_IMPLEMENTATION = "attentiondrop"
# The registered name that runs each base; `BASE_OF_IMPLEMENTATION` reads it back.
IMPLEMENTATION_OF_BASE = {"sdpa": ATTN_IMPLEMENTATION, "eager": f"{ATTN_IMPLEMENTATION}_eager"}
BASE_OF_IMPLEMENTATION = {name: base for base, name in IMPLEMENTATION_OF_BASE.items()}
# From this many keys on, logit-space paths run in checkpointed blocks of query rows, each block's logits half the
# size of the queries: memory O(N·D) like SDPA's instead of O(N²). Shorter sequences keep the one-block path, faster.
BLOCKED_LOGITS_MIN_KEYS = 1024
# Attention sinks enter the softmax as an extra logit per head; models pass them under one of these names.
SINK_ARGUMENTS = ("s_aux", "sinks")

_force_reference = os.environ.get("ATTENTIONDROP_REFERENCE", "0") == "1"
_monitor_records: list | None = None


@contextlib.contextmanager
def force_reference_path(enabled: bool = True) -> Iterator[None]:
    """Run every perturbed call through the plain logit-space reference (no key blur, no blocks).

    For debugging and tests; `ATTENTIONDROP_REFERENCE=1` sets it for a whole process.
    """
    global _force_reference
    previous, _force_reference = _force_reference, enabled
    try:
        yield
    finally:
        _force_reference = previous


@contextlib.contextmanager
def monitor_attention() -> Iterator[list[dict[str, Any]]]:
    """Record, for every perturbed call inside the block, its role and layer, the attention entropy before and after
    the perturbation, and the variant's own `monitor` terms (one dict per call, in the list it yields).

    For `AttentionDropMonitorCallback`, on a small batch without gradients: each call also computes its logits in
    logit space. Outside the block a perturbed call pays one check of a module-level `None`.
    """
    global _monitor_records
    previous, _monitor_records = _monitor_records, []
    try:
        yield _monitor_records
    finally:
        _monitor_records = previous


def attentiondrop_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """AttentionInterface entry point: perturb in training, otherwise exactly the base implementation."""
    plan = plan_of(module)
    if is_causal is not None:  # handed on to the base only when given, as the model's own call does
        kwargs["is_causal"] = is_causal
    options = plan.options() if module.training else None
    if options is None:
        return plan.base_attention(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if sinks := [name for name in SINK_ARGUMENTS if kwargs.get(name) is not None]:
        raise NotImplementedError(
            f"AttentionDrop cannot perturb attention with sinks (`{sinks[0]}`, {type(module).__name__}); "
            "leave this role out of `targets`"
        )
    # SDPA's rule for a call without a mask: the call's `is_causal`, else the module's, else causal.
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    query_len, key_len = query.shape[2], key.shape[2]
    attendable, bias = attendable_keys(attention_mask, query_len, key_len, is_causal, query.device)
    call = PerturbedCall(
        query=query,
        key=key,
        value=value,
        attendable=attendable,
        # A causal pattern makes the blur one-sided: neighbours then never include a future key.
        causal=plan.site.role == "causal" or (attention_mask is None and is_causal and query_len > 1),
        config=module.config,
        # A float mask's finite part (BEiT's, Swin's relative position bias; zeros for padding) is a logit term,
        # whatever its values: deciding by them would drop a zero-initialised bias from the graph, and sync.
        bias=bias,
        position_bias=kwargs.get("position_bias"),
        softcap=kwargs.get("softcap"),
        scaling=scaling,
        dropout=dropout,
        windowed=kwargs.get("sliding_window") is not None,
        run_base=lambda q, k, v: plan.base_attention(
            module, q, k, v, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        ),
    )
    return _perturbed_attention(call, plan, options, output_attentions=bool(kwargs.get("output_attentions")))


def _perturbed_attention(
    call: PerturbedCall, plan: SitePlan, options: Any, output_attentions: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The training-time path: the variant's fast path where it applies, else its logit-space reference."""
    variant = plan.model.variant
    call.draws = variant.sample(options, call)
    if _monitor_records is not None:
        _record(plan, call, options, variant)

    if variant.attend_fast is not None and not _force_reference and not output_attentions:
        if (result := variant.attend_fast(call, options)) is not None:
            return result

    def perturb(
        logits: torch.Tensor, attendable: torch.Tensor | None, rows: slice
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        row_draws = {name: rows_of(d, rows) if d.dim() == 4 else d for name, d in call.draws.items()}
        return variant.perturb_logits(logits, attendable, options, row_draws, call)

    attention_kwargs = {**call.logit_terms, "scaling": call.scaling, "dropout": call.dropout, "perturb": perturb}
    query, key, value = call.query, call.key, call.value
    query_len, key_len = query.shape[2], key.shape[2]
    if key_len >= BLOCKED_LOGITS_MIN_KEYS and not _force_reference and not output_attentions:
        rows_per_block = max(1, query_len * query.shape[-1] // (2 * key_len))
        return chunked_logit_space_attention(
            query, key, value, call.attendable, rows_per_block, **attention_kwargs
        ), None
    return logit_space_attention(query, key, value, call.attendable, **attention_kwargs)


def _record(plan: SitePlan, call: PerturbedCall, options: Any, variant: type[AttentionDropVariant]) -> None:
    """`monitor_attention`'s record of one call: the logits before and after the perturbation, in logit space."""
    with torch.no_grad():
        logits = attention_logits(call.query, call.key, call.scaling, **call.logit_terms)
        clean = MonitoredLogits(logits, call.attendable, masked_softmax(logits, call.attendable))
        perturbed_logits, perturbed_attendable = variant.perturb_logits(
            logits, call.attendable, options, call.draws, call
        )
        probs = masked_softmax(perturbed_logits, perturbed_attendable)
        perturbed = MonitoredLogits(perturbed_logits, perturbed_attendable, probs)
        record = {
            "role": plan.site.role,
            "layer": plan.site.layer,
            "entropy_clean": attention_entropy(clean.probs, clean.attendable),
            "entropy_perturbed": attention_entropy(perturbed.probs, call.attendable),
            **variant.monitor(options, call.draws, clean, perturbed),
        }
    _monitor_records.append({k: v.item() if torch.is_tensor(v) else v for k, v in record.items()})


def _mask_of_base(base: str) -> Callable[..., Any]:
    def attentiondrop_mask(*args: Any, **kwargs: Any) -> Any:
        """AttentionMaskInterface entry point: the mask the base implementation would get."""
        return ALL_MASK_ATTENTION_FUNCTIONS[base](*args, **kwargs)

    return attentiondrop_mask


def register() -> None:
    """Register `"attentiondrop"` and `"attentiondrop_eager"` with both interfaces (idempotent)."""
    for base, name in IMPLEMENTATION_OF_BASE.items():
        AttentionInterface.register(name, attentiondrop_attention_forward)
        AttentionMaskInterface.register(name, _mask_of_base(base))
