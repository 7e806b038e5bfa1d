"""Switch AttentionDrop on and off on a loaded model (`enable_attentiondrop` / `disable_attentiondrop`, exact
inverses), and check a model loaded with `attn_implementation="attentiondrop"` before it trains.

Enabling writes the flags to `config.attentiondrop` (and every sub-config's), records each attention module's
role and layer, and sets the attention implementation to `"attentiondrop"`; a model loaded with
`from_pretrained(..., attn_implementation="attentiondrop", attentiondrop={...})` and checked by
`check_attentiondrop` (the trainer does it) behaves identically. Both refuse flags that would perturb nothing.
"""

from collections.abc import Callable
from typing import Any

import torch
from transformers import PreTrainedConfig, PreTrainedModel

from ..config import BASE_IMPLEMENTATIONS, AttentionDropConfig
from .attention import ATTN_IMPLEMENTATION
from .flags import base_implementation_of, settings_of, sub_configs
from .sites import Site, attention_modules, clear_sites, decoder_only_stack, find_sites, record_sites

__all__ = ["base_model_of", "check_attentiondrop", "check_supported", "disable_attentiondrop", "enable_attentiondrop"]

_RESTORE_ATTRIBUTE = "_attentiondrop_restore"


def base_model_of(model: torch.nn.Module) -> PreTrainedModel:
    """The Transformers model inside a PEFT model, a DDP / DataParallel / DeepSpeed wrapper or `torch.compile`."""
    seen = model
    while not isinstance(model, PreTrainedModel):
        if hasattr(model, "get_base_model"):  # peft.PeftModel
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), torch.nn.Module):  # DDP, DataParallel, DeepSpeed engine
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):  # torch.compile
            model = model._orig_mod
        else:
            raise TypeError(f"AttentionDrop needs a transformers PreTrainedModel, got {type(seen).__name__}")
    return model


def check_supported(model: PreTrainedModel) -> dict[str, torch.nn.Module]:
    """The model's attention modules by path; raises `ValueError` for a model AttentionDrop cannot perturb."""
    modules = attention_modules(model)
    if not modules or not model._can_set_attn_implementation():
        raise ValueError(
            f"{type(model).__name__} does not route its attention through transformers' AttentionInterface "
            "(ALL_ATTENTION_FUNCTIONS), so AttentionDrop cannot perturb it. Supported models call "
            "ALL_ATTENTION_FUNCTIONS.get_interface(...) in their attention modules (ViT, DeiT, BERT, BART, Marian, "
            "Llama, ...)."
        )
    return modules


def _configs_of(model: PreTrainedModel, modules: dict[str, torch.nn.Module]) -> list[PreTrainedConfig]:
    """Every config AttentionDrop writes to: the model's, its sub-configs (recursively), the attention modules'."""
    configs, pending = [], [model.config, *(module.config for module in modules.values())]
    while pending:
        config = pending.pop(0)
        if not any(config is known for known in configs):
            configs.append(config)
            pending.extend(sub_configs(config))
    return configs


def _check_targets(
    model: PreTrainedModel,
    modules: dict[str, torch.nn.Module],
    sites: dict[str, Site],
    settings_for: Callable[[PreTrainedConfig], AttentionDropConfig],
) -> None:
    """Raise when the flags perturb no attention of the model, or name layers it does not have or cannot select."""
    targeted = {
        path: sites[path]
        for path, module in modules.items()
        if settings_for(module.config).targets_role(sites[path].role, decoder_only_stack(module.config))
    }
    settings = settings_for(model.config)
    roles = sorted({site.role for site in sites.values()})
    if not targeted:
        raise ValueError(
            f"AttentionDrop targets {settings.targets} match no attention of {type(model).__name__}, which has roles "
            f"{roles}; nothing would be regularized"
        )
    if settings.layers is None:
        return
    if shared := sorted({path.rsplit(".", 1)[0] for path, site in targeted.items() if site.shared}):
        raise ValueError(
            f"`layers` cannot select layers of {type(model).__name__}: its attention modules {shared} each run for "
            "several layers per forward (shared layers); leave `layers` unset"
        )
    depth = max(site.depth for site in targeted.values())
    if out_of_range := [i for i in settings.layers if i >= depth]:
        raise ValueError(
            f"`layers` {out_of_range} out of range: the targeted stacks of {type(model).__name__} have at most "
            f"{depth} layers"
        )


def enable_attentiondrop(
    model: torch.nn.Module, config: AttentionDropConfig | dict | None = None, **flags: Any
) -> torch.nn.Module:
    """Turn AttentionDrop on for a loaded model (in place); it acts in training only.

    Args:
        model (`PreTrainedModel`, or a PEFT / DDP / accelerate wrapper of one): a model whose attention goes through
            the AttentionInterface.
        config (`AttentionDropConfig` or `dict`, *optional*): the flags; or pass them as keyword arguments
            (`variant="hard", p=0.1, top_k=8`). With neither, the flags already in `model.config.attentiondrop`
            (or the defaults) are used. `base_attn_implementation`, unless given, is each attention config's
            current implementation when that is "sdpa" or "eager", so eval outputs do not change.

    Returns:
        The same model.
    """
    base_model = base_model_of(model)
    modules = check_supported(base_model)
    if config is not None and flags:
        raise ValueError("pass AttentionDrop flags either as `config` or as keyword arguments, not both")
    if isinstance(config, AttentionDropConfig):
        given = config.to_dict()
    else:
        given = dict(config if config is not None else flags or base_model.config.attentiondrop or {})
    settings = AttentionDropConfig.from_dict(given)
    sites = find_sites(base_model)
    _check_targets(base_model, modules, sites, lambda _: settings)
    record_sites(base_model, sites)

    configs = _configs_of(base_model, modules)
    if not hasattr(base_model, _RESTORE_ATTRIBUTE):
        restore = [(c, c._attn_implementation, c.__dict__.get("attentiondrop")) for c in configs]
        setattr(base_model, _RESTORE_ATTRIBUTE, restore)
    # What each config ran before (for a model loaded with the flags: the base they named), read before writing.
    current = [
        base_implementation_of(c) if c._attn_implementation == ATTN_IMPLEMENTATION else c._attn_implementation
        for c in configs
    ]
    base_model.config.attentiondrop = settings.to_dict()  # and every sub-config's
    for model_config in configs:  # attention configs outside the sub-config tree
        if model_config.attentiondrop != base_model.config.attentiondrop:
            model_config.attentiondrop = settings.to_dict()
    if "base_attn_implementation" not in given:
        for model_config, implementation in zip(configs, current):
            if implementation in BASE_IMPLEMENTATIONS:
                model_config.attentiondrop["base_attn_implementation"] = implementation  # in place: keeps marks
    base_model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return model


def disable_attentiondrop(model: torch.nn.Module) -> torch.nn.Module:
    """Undo `enable_attentiondrop` exactly: each config's attention implementation and `config.attentiondrop` as
    they were. A model loaded with `attn_implementation="attentiondrop"` returns to its `base_attn_implementation`
    and loses its flags."""
    base_model = base_model_of(model)
    modules = check_supported(base_model)
    restore = base_model.__dict__.pop(_RESTORE_ATTRIBUTE, None)
    if restore is None:
        restore = [(c, base_implementation_of(c), None) for c in _configs_of(base_model, modules)]
    for model_config, implementation, flags in restore:
        # The internal attribute, as `set_attn_implementation` does: the public setter would also overwrite the
        # sub-configs, each of which has its own entry here.
        model_config._attn_implementation_internal = implementation
        if flags is None:
            model_config.__dict__.pop("attentiondrop", None)
        else:
            model_config.__dict__["attentiondrop"] = flags
    clear_sites(base_model)
    return model


def check_attentiondrop(model: torch.nn.Module) -> bool:
    """Whether AttentionDrop is on for `model`; when it is, record its sites and refuse flags it cannot honour
    (targets that match nothing, layers out of range or shared, a variant not registered in this process)."""
    base_model = base_model_of(model)
    modules = attention_modules(base_model)
    configs = [base_model.config, *(module.config for module in modules.values())]
    if not any(c._attn_implementation == ATTN_IMPLEMENTATION for c in configs):
        return False
    modules = check_supported(base_model)
    sites = find_sites(base_model)
    _check_targets(base_model, modules, sites, settings_of)
    record_sites(base_model, sites)
    return True
