"""Switch AttentionDrop on and off on a loaded model: `enable_attentiondrop` / `disable_attentiondrop`, exact inverses.

Enabling writes the flags to `config.attentiondrop` and sets the model's attention implementation to
`"attentiondrop"`; the same model loaded with `from_pretrained(..., attn_implementation="attentiondrop",
attentiondrop={...})` behaves identically.
"""

from typing import Any

from transformers import PreTrainedModel

from .config import BASE_IMPLEMENTATIONS, AttentionDropConfig
from .integration import ATTN_IMPLEMENTATION
from .sites import SITE_ATTRIBUTE, annotate_sites, attention_modules

__all__ = ["check_supported", "disable_attentiondrop", "enable_attentiondrop"]

_RESTORE_ATTRIBUTE = "_attentiondrop_restore"


def check_supported(model: PreTrainedModel) -> dict:
    """The model's attention modules by path; raises `ValueError` for a model AttentionDrop cannot perturb."""
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"AttentionDrop needs a transformers PreTrainedModel, got {type(model).__name__}")
    modules = attention_modules(model)
    if not modules or not model._can_set_attn_implementation():
        raise ValueError(
            f"{type(model).__name__} does not route its attention through transformers' AttentionInterface "
            "(ALL_ATTENTION_FUNCTIONS), so AttentionDrop cannot perturb it. Supported models call "
            "ALL_ATTENTION_FUNCTIONS.get_interface(...) in their attention modules (ViT, DeiT, BERT, BART, Marian, "
            "Llama, ...)."
        )
    return modules


def _attention_configs(model: PreTrainedModel, modules: dict) -> list:
    """The distinct config objects the attention modules read (sub-configs in composite models)."""
    configs = [model.config]
    for module in modules.values():
        config = getattr(module, "config", None)
        if config is not None and not any(config is c for c in configs):
            configs.append(config)
    return configs


def enable_attentiondrop(
    model: PreTrainedModel, config: AttentionDropConfig | dict | None = None, **flags: Any
) -> PreTrainedModel:
    """Turn AttentionDrop on for a loaded model (in place); it acts in training only.

    Args:
        model (`PreTrainedModel`): a model whose attention goes through the AttentionInterface.
        config (`AttentionDropConfig` or `dict`, *optional*): the flags; or pass them as keyword arguments
            (`variant="hard", p=0.1, top_k=8`). With neither, the flags already in `model.config.attentiondrop`
            (or the defaults) are used. `base_attn_implementation`, unless given, is the model's current
            implementation when that is "sdpa" or "eager", so eval outputs do not change.

    Returns:
        The same model.
    """
    modules = check_supported(model)
    if config is not None and flags:
        raise ValueError("pass AttentionDrop flags either as `config` or as keyword arguments, not both")
    current = model.config._attn_implementation
    if isinstance(config, AttentionDropConfig):
        given = config.to_dict()
    else:
        given = dict(config if config is not None else flags or model.config.attentiondrop or {})
    if "base_attn_implementation" not in given and current in BASE_IMPLEMENTATIONS:
        given["base_attn_implementation"] = current
    settings = AttentionDropConfig.from_dict(given)

    sites = annotate_sites(model)
    layers = [layer for _, layer in sites.values() if layer is not None]
    settings.check_layers(max(layers) + 1 if layers else 1)
    if not any(settings.perturbs(role, layer) for role, layer in sites.values()):
        roles = sorted({role for role, _ in sites.values()})
        raise ValueError(
            f"AttentionDrop targets {settings.targets} (layers {settings.layers}) match no attention of "
            f"{type(model).__name__}, which has roles {roles}"
        )

    configs = _attention_configs(model, modules)
    if not hasattr(model, _RESTORE_ATTRIBUTE):
        setattr(model, _RESTORE_ATTRIBUTE, (current, [c.attentiondrop for c in configs]))
    for model_config in configs:
        model_config.attentiondrop = settings.to_dict()
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return model


def disable_attentiondrop(model: PreTrainedModel) -> PreTrainedModel:
    """Undo `enable_attentiondrop` exactly (attention implementation and `config.attentiondrop` as before).

    A model loaded with `attn_implementation="attentiondrop"` returns to its `base_attn_implementation` and loses
    its flags.
    """
    modules = check_supported(model)
    configs = _attention_configs(model, modules)
    if hasattr(model, _RESTORE_ATTRIBUTE):
        implementation, previous_flags = getattr(model, _RESTORE_ATTRIBUTE)
        delattr(model, _RESTORE_ATTRIBUTE)
    else:
        implementation = AttentionDropConfig.from_dict(model.config.attentiondrop or {}).base_attn_implementation
        previous_flags = [None] * len(configs)
    model.set_attn_implementation(implementation)
    for model_config, flags in zip(configs, previous_flags):
        model_config.attentiondrop = flags
    for module in modules.values():
        module.__dict__.pop(SITE_ATTRIBUTE, None)
    return model
