"""The `"attentiondrop"` attention implementation: Transformers' AttentionInterface contract, thin glue over `ops`.

`attentiondrop_attention_forward` has the signature and return contract of `sdpa_attention_forward`
(`[B, H, S, D]` in, `([B, Q, H, D] contiguous, weights or None)` out). Its first decision is the identity exit: in
eval, for a variant whose flags change nothing, or for a role/layer not targeted, it calls the base implementation
(`base_attn_implementation`, SDPA by default) with the very same arguments, so eval equals the base bit for bit.
Otherwise the variant's fast path runs where it applies, else the logit-space reference (in checkpointed blocks of
query rows for long sequences).

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

from .config import AttentionDropConfig
from .ops import attendable_keys, chunked_logit_space_attention, logit_space_attention
from .ops.attention import rows_of
from .registry import PerturbedCall, get_variant
from .sites import attention_site

__all__ = [
    "ATTN_IMPLEMENTATION",
    "attentiondrop_attention_forward",
    "attentiondrop_mask",
    "force_reference_path",
    "settings_for",
]

ATTN_IMPLEMENTATION = "attentiondrop"
# From this many keys on, logit-space paths run in checkpointed blocks of query rows, each block's logits half the
# size of the queries: memory O(N·D) like SDPA's instead of O(N²). Shorter sequences keep the one-block path, faster.
BLOCKED_LOGITS_MIN_KEYS = 1024

_force_reference = os.environ.get("ATTENTIONDROP_REFERENCE", "0") == "1"


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


def _num_layers(config: PreTrainedConfig) -> int | None:
    depths = [getattr(config, name, None) for name in ("num_hidden_layers", "encoder_layers", "decoder_layers")]
    depths = [d for d in depths if isinstance(d, int)]
    return max(depths) if depths else None


def _freeze(value):
    return tuple(_freeze(v) for v in value) if isinstance(value, (list, tuple)) else value


@functools.lru_cache(maxsize=128)
def _parse_flags(frozen_flags: tuple, num_layers: int | None) -> AttentionDropConfig:
    settings = AttentionDropConfig.from_dict({k: list(v) if isinstance(v, tuple) else v for k, v in frozen_flags})
    if num_layers is not None:
        settings.check_layers(num_layers)
    return settings


def settings_for(config: PreTrainedConfig) -> AttentionDropConfig:
    """The validated flags of a model config (`config.attentiondrop`; defaults when unset). Cached on content, so
    editing the dict in place takes effect on the next call."""
    flags = getattr(config, "attentiondrop", None) or {}
    return _parse_flags(tuple(sorted((k, _freeze(v)) for k, v in flags.items())), _num_layers(config))


class _AttentionDropFlags:
    """`PreTrainedConfig.attentiondrop`: `None` until set; setting a dict validates it and stores every flag.

    Being a class attribute makes `from_pretrained(..., attentiondrop={...})` route the kwarg to the config (not
    to the model's `__init__`); configs that never set it serialise nothing new.
    """

    def __get__(self, config, owner=None):
        return None if config is None else config.__dict__.get("attentiondrop")

    def __set__(self, config, flags):
        if flags is None:
            config.__dict__.pop("attentiondrop", None)
        else:
            config.__dict__["attentiondrop"] = AttentionDropConfig.from_dict(flags).to_dict()

    def __delete__(self, config):
        config.__dict__.pop("attentiondrop", None)


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
    settings = settings_for(module.config)
    base = _base_attention(settings.base_attn_implementation, module)
    variant = get_variant(settings.variant)
    if not module.training or variant.is_identity(settings):
        return base(module, query, key, value, attention_mask, **kwargs)
    role, layer = attention_site(module, need_layer=settings.layers is not None)
    if not settings.perturbs(role, layer):
        return base(module, query, key, value, attention_mask, **kwargs)
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError(
            f"AttentionDrop cannot perturb attention with sinks (`s_aux`, {type(module).__name__}); "
            "leave this role out of `targets`"
        )
    return _perturbed_attention(module, query, key, value, attention_mask, settings, variant, role, base, kwargs)


def _perturbed_attention(module, query, key, value, attention_mask, settings, variant, role, base, kwargs):
    """The training-time path: the variant's fast path where it applies, else its logit-space reference."""
    batch, heads, query_len, _ = query.shape
    key_len = key.shape[2]
    is_causal = kwargs.get("is_causal")
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    attendable, bias = attendable_keys(attention_mask, query_len, key_len, is_causal, query.device)
    draws = variant.sample(settings, batch, heads, query_len, key_len, query.device)
    causal = role == "causal"
    position_bias, softcap = kwargs.get("position_bias"), kwargs.get("softcap")
    output_attentions = bool(kwargs.get("output_attentions", False))

    if variant.attend_fast is not None and not _force_reference and not output_attentions:
        call = PerturbedCall(
            query=query,
            key=key,
            value=value,
            attendable=attendable,
            causal=causal,
            draws=draws,
            has_logit_terms=position_bias is not None or softcap is not None,
            run_base=lambda q, k, v: base(module, q, k, v, attention_mask, **kwargs),
        )
        if (result := variant.attend_fast(call, settings)) is not None:
            return result

    def perturb(logits, attendable, rows):
        row_draws = {name: rows_of(d, rows) if d.dim() == 4 else d for name, d in draws.items()}
        return variant.perturb_logits(logits, attendable, settings, row_draws, causal)

    attention_kwargs = {
        "bias": bias,
        "scaling": kwargs.get("scaling"),
        "dropout": kwargs.get("dropout", 0.0),
        "position_bias": position_bias,
        "softcap": softcap,
        "perturb": perturb,
    }
    if key_len >= BLOCKED_LOGITS_MIN_KEYS and not _force_reference and not output_attentions:
        rows_per_block = max(1, query_len * query.shape[-1] // (2 * key_len))
        return chunked_logit_space_attention(query, key, value, attendable, rows_per_block, **attention_kwargs), None
    return logit_space_attention(query, key, value, attendable, **attention_kwargs)


def attentiondrop_mask(*args, **kwargs):
    """AttentionMaskInterface entry point: the mask the base implementation would get (SDPA's bool mask or None,
    eager's additive float mask)."""
    config = kwargs.get("config")
    base = settings_for(config).base_attn_implementation if config is not None else "sdpa"
    return ALL_MASK_ATTENTION_FUNCTIONS[base](*args, **kwargs)


def register() -> None:
    """Register `"attentiondrop"` with both interfaces and make `attentiondrop` a config attribute (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, attentiondrop_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, attentiondrop_mask)
    if not isinstance(PreTrainedConfig.__dict__.get("attentiondrop"), _AttentionDropFlags):
        PreTrainedConfig.attentiondrop = _AttentionDropFlags()
