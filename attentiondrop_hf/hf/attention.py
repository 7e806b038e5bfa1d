"""The `"attentiondrop"` attention implementation: Transformers' AttentionInterface contract, thin glue over `ops`.

`attentiondrop_attention_forward` has the signature and return contract of `sdpa_attention_forward`
(`[B, H, S, D]` in, `([B, Q, H, D] contiguous, weights or None)` out). Its first decision is the identity exit: in
eval, for a variant whose options change nothing, or for a role/layer not targeted, it calls the base
implementation (`base_attn_implementation`, SDPA by default) with the very same arguments, so eval equals the base
bit for bit. Otherwise the variant's fast path runs where it applies, else its logit-space reference (in
checkpointed blocks of query rows for long sequences).

`attentiondrop_mask` is registered under the same name with the `AttentionMaskInterface`: without it Transformers
builds no mask at all for an unknown implementation. It builds the base implementation's mask.
"""

import contextlib
import functools
import os
import sys

import torch
from transformers import AttentionInterface, PreTrainedConfig
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..config import AttentionDropConfig
from ..ops import (
    attendable_keys,
    attention_entropy,
    attention_logits,
    chunked_logit_space_attention,
    depth_factor,
    logit_space_attention,
    masked_softmax,
    rows_of,
    schedule_factor,
)
from ..variants import PerturbedCall, get_variant
from ..variants.base import MonitoredLogits
from .flags import base_implementation_of, install_config_attribute, settings_of
from .sites import attention_role, config_roles, decoder_only_stack, site_of

__all__ = [
    "ATTN_IMPLEMENTATION",
    "attentiondrop_attention_forward",
    "attentiondrop_mask",
    "force_reference_path",
    "generic_eager_attention",
    "monitor_attention",
    "register",
]

ATTN_IMPLEMENTATION = "attentiondrop"
# From this many keys on, logit-space paths run in checkpointed blocks of query rows, each block's logits half the
# size of the queries: memory O(N·D) like SDPA's instead of O(N²). Shorter sequences keep the one-block path, faster.
BLOCKED_LOGITS_MIN_KEYS = 1024
# Attention sinks enter the softmax as an extra logit per head; models pass them under one of these names.
SINK_ARGUMENTS = ("s_aux", "sinks")

_force_reference = os.environ.get("ATTENTIONDROP_REFERENCE", "0") == "1"
_monitor_records: list | None = None


@contextlib.contextmanager
def force_reference_path(enabled: bool = True):
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
def monitor_attention():
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


@functools.cache
def _model_eager_attention(module_class: type):
    """The eager function of the module's own modeling file, so an "eager" base is that model's eager bit for bit."""
    return (
        getattr(sys.modules.get(module_class.__module__), "eager_attention_forward", None) or generic_eager_attention
    )


def generic_eager_attention(module, query, key, value, attention_mask, **kwargs):
    """Eager attention for a module whose modeling file has none: grouped KV heads, T5 `position_bias`, bool or
    float masks, `module.is_causal` when the mask is None."""
    is_causal = kwargs.get("is_causal")
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    attendable, bias = attendable_keys(attention_mask, query.shape[2], key.shape[2], is_causal, query.device)
    return logit_space_attention(
        query,
        key,
        value,
        attendable,
        bias=bias,
        scaling=kwargs.get("scaling"),
        dropout=kwargs.get("dropout", 0.0),
        position_bias=kwargs.get("position_bias"),
        softcap=kwargs.get("softcap"),
    )


def _base_attention(name: str, module: torch.nn.Module):
    return ALL_ATTENTION_FUNCTIONS["sdpa"] if name == "sdpa" else _model_eager_attention(type(module))


def attentiondrop_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """AttentionInterface entry point: perturb in training, otherwise exactly the base implementation."""
    base = _base_attention(base_implementation_of(module.config), module)
    if not module.training:
        return base(module, query, key, value, attention_mask, **kwargs)
    settings = settings_of(module.config)
    variant = get_variant(settings.variant)
    role = None if variant.is_identity(settings.options) else _targeted_role(module, settings)
    options = settings.options
    if role is not None and settings.varies_strength:
        options = _options_in_force(module, settings, variant)
    if role is None or variant.is_identity(options):
        return base(module, query, key, value, attention_mask, **kwargs)
    if sinks := [name for name in SINK_ARGUMENTS if kwargs.get(name) is not None]:
        raise NotImplementedError(
            f"AttentionDrop cannot perturb attention with sinks (`{sinks[0]}`, {type(module).__name__}); "
            "leave this role out of `targets`"
        )
    return _perturbed_attention(module, query, key, value, attention_mask, options, variant, role, base, kwargs)


def _targeted_role(module: torch.nn.Module, settings: AttentionDropConfig) -> str | None:
    """The role of a training call that is perturbed, `None` for one that is not. Raises where the flags cannot
    be honoured, instead of leaving the call unperturbed."""
    site = site_of(module)
    role = site.role if site is not None else attention_role(module)
    targeted = settings.targets_role(role, decoder_only_stack(module.config))
    if settings.layers is not None:
        if site is None:
            raise ValueError(
                f"AttentionDrop `layers` is set, but the layers of {type(module).__name__} were never resolved: "
                "call attentiondrop_hf.enable_attentiondrop(model) on the loaded model (AttentionDropTrainer does "
                "this for you)"
            )
        targeted = targeted and site.layer in settings.layers
    elif not targeted and site is None:
        flags = module.config.__dict__.get("attentiondrop")
        if flags is None or not flags.in_composite:
            _check_config_has_targets(module, settings, role)
    return role if targeted else None


def _options_in_force(module: torch.nn.Module, settings: AttentionDropConfig, variant):
    """The variant's options scaled by the strength `schedule` at this point of training and the `depth_rule` at
    this layer; built once per strength factor and training step."""
    flags = module.config.__dict__["attentiondrop"]
    if settings.schedule != "constant" and flags.progress is None:
        raise ValueError(
            f"AttentionDrop `schedule={settings.schedule!r}` follows the training step, which nothing reported: train "
            "with AttentionDropTrainer, or add attentiondrop_hf.AttentionDropScheduleCallback to your trainer"
        )
    site = site_of(module)
    if settings.depth_rule != "uniform" and site is None:
        raise ValueError(
            f"AttentionDrop `depth_rule={settings.depth_rule!r}` needs the layers of {type(module).__name__}, which "
            "were never resolved: call attentiondrop_hf.enable_attentiondrop(model) on the loaded model "
            "(AttentionDropTrainer does this for you)"
        )
    factor = schedule_factor(settings.schedule, settings.schedule_warmup, flags.progress or 0.0)
    if site is not None:
        factor *= depth_factor(settings.depth_rule, site.layer, site.depth)
    if factor not in flags.scaled_options:
        flags.scaled_options[factor] = variant.scaled(settings.options, factor)
    return flags.scaled_options[factor]


def _check_config_has_targets(module: torch.nn.Module, settings: AttentionDropConfig, role: str) -> None:
    """A model loaded with the flags and trained without the switch or the trainer: raise at its first training
    forward when no attention of this config can ever be perturbed (a silent no-op otherwise)."""
    roles = config_roles(module.config, role)
    decoder_only = decoder_only_stack(module.config)
    if not any(settings.targets_role(r, decoder_only) for r in roles):
        raise ValueError(
            f"AttentionDrop targets {settings.targets} match no attention of this model "
            f"({module.config.model_type}: {sorted(roles)}); nothing would be regularized"
        )


def _perturbed_attention(module, query, key, value, attention_mask, options, variant, role, base, kwargs):
    """The training-time path: the variant's fast path where it applies, else its logit-space reference."""
    query_len, key_len = query.shape[2], key.shape[2]
    is_causal = kwargs.get("is_causal")
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    attendable, bias = attendable_keys(attention_mask, query_len, key_len, is_causal, query.device)
    position_bias, softcap = kwargs.get("position_bias"), kwargs.get("softcap")
    # A float mask's finite part (BEiT's, Swin's relative position bias) is a logit term: fast paths that move the
    # perturbation off the logits do not apply. Plain padding masks have an all-zero finite part.
    has_mask_bias = bias is not None and bool(bias.any())
    call = PerturbedCall(
        query=query,
        key=key,
        value=value,
        attendable=attendable,
        causal=role == "causal",
        config=module.config,
        has_logit_terms=position_bias is not None or softcap is not None or has_mask_bias,
        run_base=lambda q, k, v: base(module, q, k, v, attention_mask, **kwargs),
    )
    call.draws = variant.sample(options, call)
    output_attentions = bool(kwargs.get("output_attentions", False))
    logit_terms = {"bias": bias if has_mask_bias else None, "position_bias": position_bias, "softcap": softcap}
    if _monitor_records is not None:
        _record(module, role, call, options, variant, kwargs.get("scaling"), logit_terms)

    if variant.attend_fast is not None and not _force_reference and not output_attentions:
        if (result := variant.attend_fast(call, options)) is not None:
            return result

    def perturb(logits, attendable, rows):
        row_draws = {name: rows_of(d, rows) if d.dim() == 4 else d for name, d in call.draws.items()}
        return variant.perturb_logits(logits, attendable, options, row_draws, call)

    attention_kwargs = {
        **logit_terms,
        "scaling": kwargs.get("scaling"),
        "dropout": kwargs.get("dropout", 0.0),
        "perturb": perturb,
    }
    if key_len >= BLOCKED_LOGITS_MIN_KEYS and not _force_reference and not output_attentions:
        rows_per_block = max(1, query_len * query.shape[-1] // (2 * key_len))
        return chunked_logit_space_attention(query, key, value, attendable, rows_per_block, **attention_kwargs), None
    return logit_space_attention(query, key, value, attendable, **attention_kwargs)


def _record(module, role, call, options, variant, scaling, logit_terms) -> None:
    """`monitor_attention`'s record of one call: the logits before and after the perturbation, in logit space."""
    site = site_of(module)
    with torch.no_grad():
        logits = attention_logits(call.query, call.key, scaling, **logit_terms)
        clean = MonitoredLogits(logits, call.attendable, masked_softmax(logits, call.attendable))
        perturbed_logits, perturbed_attendable = variant.perturb_logits(
            logits, call.attendable, options, call.draws, call
        )
        probs = masked_softmax(perturbed_logits, perturbed_attendable)
        perturbed = MonitoredLogits(perturbed_logits, perturbed_attendable, probs)
        record = {
            "role": role,
            "layer": None if site is None else site.layer,
            "entropy_clean": attention_entropy(clean.probs, clean.attendable),
            "entropy_perturbed": attention_entropy(perturbed.probs, call.attendable),
            **variant.monitor(options, call.draws, clean, perturbed),
        }
    _monitor_records.append({k: v.item() if torch.is_tensor(v) else v for k, v in record.items()})


def attentiondrop_mask(*args, **kwargs):
    """AttentionMaskInterface entry point: the mask the base implementation would get (SDPA's bool mask or None,
    eager's additive float mask)."""
    config = kwargs.get("config")
    base = base_implementation_of(config) if isinstance(config, PreTrainedConfig) else "sdpa"
    return ALL_MASK_ATTENTION_FUNCTIONS[base](*args, **kwargs)


def register() -> None:
    """Register `"attentiondrop"` with both interfaces and make `attentiondrop` a config attribute (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, attentiondrop_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, attentiondrop_mask)
    install_config_attribute()
