"""Switch AttentionDrop on and off (`enable_attentiondrop` / `disable_attentiondrop`, exact inverses).

Switching on is the one way in: loading with `attn_implementation="attentiondrop"` loads the stock model and calls
`enable_attentiondrop` on it (`hf.loading`). It validates the flags, refuses a model it cannot perturb, builds the
plan (`hf.plan`: every attention module's role, layer and base), and only then writes: the plan on the modules,
the flags (a plain dict) in `config.attentiondrop`, and the attention implementation of every config the model's
attention reads.
"""

import copy
from typing import Any

import torch
from transformers import PreTrainedConfig, PreTrainedModel

from ..config import BASE_IMPLEMENTATIONS, AttentionDropConfig
from ._compat import BRANCHES_ON_THE_IMPLEMENTATION_NAME
from .attention import BASE_OF_IMPLEMENTATION, IMPLEMENTATION_OF_BASE
from .plan import attention_modules, build_plan, clear_plan, model_plan_of, record_plan

__all__ = [
    "base_model_of",
    "check_attentiondrop",
    "check_supported",
    "disable_attentiondrop",
    "enable_attentiondrop",
    "is_switched_on",
]


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
    parts = [part for part in model.modules() if isinstance(part, PreTrainedModel)]
    unsupported = sorted({type(part).__name__ for part in parts if not part._can_set_attn_implementation()})
    modules = attention_modules(model)
    model_types = {getattr(part.config, "model_type", None) for part in model.modules() if hasattr(part, "config")}
    if branching := sorted(model_types & set(BRANCHES_ON_THE_IMPLEMENTATION_NAME)):
        reason = BRANCHES_ON_THE_IMPLEMENTATION_NAME[branching[0]]
        raise ValueError(
            f"AttentionDrop cannot run on {type(model).__name__} ({branching[0]}): {reason}, so its eval output "
            "would not be the stock model's"
        )
    if unsupported or not modules:
        raise ValueError(
            f"{type(model).__name__} does not route its attention through transformers' AttentionInterface "
            f"({', '.join(unsupported) or 'no attention module found'}), so AttentionDrop cannot perturb it. "
            "Supported models call ALL_ATTENTION_FUNCTIONS.get_interface(...) in their attention modules (ViT, DeiT, "
            "BERT, BART, Marian, Llama, ...)."
        )
    return modules


def _sub_configs(config: PreTrainedConfig) -> list[PreTrainedConfig]:
    found = []
    for key in getattr(config, "sub_configs", {}) or {}:
        sub_config = getattr(config, key, None)
        if isinstance(sub_config, PreTrainedConfig):
            found.append(sub_config)
    return found


def _configs_of(model: PreTrainedModel, modules: dict[str, torch.nn.Module]) -> list[PreTrainedConfig]:
    """Every config the switch writes to: the model's, its sub-configs (recursively), the attention modules' (a
    decoder may hold a copy of the config of its own, outside the sub-config tree: ViTMAE)."""
    configs, pending = [], [model.config, *(module.config for module in modules.values())]
    while pending:
        config = pending.pop(0)
        if not any(config is known for known in configs):
            configs.append(config)
            pending.extend(_sub_configs(config))
    return configs


def _implementation_before(config: PreTrainedConfig, restore: list) -> str | None:
    """The attention implementation a config ran before AttentionDrop was first switched on."""
    return next((implementation for c, implementation, _ in restore if c is config), config._attn_implementation)


def enable_attentiondrop(
    model: torch.nn.Module, config: AttentionDropConfig | dict | None = None, **flags: Any
) -> torch.nn.Module:
    """Turn AttentionDrop on for a loaded model (in place); it acts in training only.

    Args:
        model (`PreTrainedModel`, or a PEFT / DDP / accelerate wrapper of one): a model whose attention goes through
            the AttentionInterface.
        config (`AttentionDropConfig` or `dict`, *optional*): the flags; or pass them as keyword arguments
            (`variant="hard", p=0.1, top_k=8`). With neither, the flags already in `model.config.attentiondrop`
            (or the defaults) are used. Calling it again with other flags replaces them.

    Returns:
        The same model.

    Raises:
        `ValueError`: invalid flags; a model that does not route its attention through the AttentionInterface; flags
            that perturb nothing, or `layers` it does not have; attention with sinks among the targets.
    """
    base_model = base_model_of(model)
    if config is not None and flags:
        raise ValueError("pass AttentionDrop flags either as `config` or as keyword arguments, not both")
    if isinstance(config, AttentionDropConfig):
        given = config.to_dict()
    else:
        given = dict(config if config is not None else flags or base_model.config.attentiondrop or {})
    switch_on(base_model, AttentionDropConfig.from_dict(given))
    return model


def switch_on(model: PreTrainedModel, settings: AttentionDropConfig) -> None:
    """Build the plan of `model` for `settings` (raising before anything is written), then write it."""
    modules = check_supported(model)
    configs = _configs_of(model, modules)
    previous = model_plan_of(model)
    restore = list(previous.restore) if previous is not None else []
    restore += [(c, c._attn_implementation, c.attentiondrop) for c in configs if not _known(c, restore)]
    bases = {}
    for config in configs:
        before = _implementation_before(config, restore)
        base = settings.base_attn_implementation or BASE_OF_IMPLEMENTATION.get(before, before)
        bases[id(config)] = base if base in BASE_IMPLEMENTATIONS else None
    for path, module in modules.items():
        if bases[id(module.config)] is None:
            raise ValueError(
                f"AttentionDrop runs over SDPA or eager attention; {path} ({type(module).__name__}) runs "
                f"{_implementation_before(module.config, restore)!r}. Load the model with attn_implementation="
                "'attentiondrop' (it keeps the model's own SDPA or eager), or pass base_attn_implementation."
            )
    flags = settings.to_dict()
    plans = build_plan(model, settings, flags, {path: bases[id(m.config)] for path, m in modules.items()})

    clear_plan(model)
    record_plan(model, plans)
    model_plan_of(model).restore = restore
    model.config.attentiondrop = copy.deepcopy(flags)  # the user's to edit; the plan keeps what it was built from
    for config in configs:
        if bases[id(config)] is not None:
            # The internal attribute, as `set_attn_implementation` does: the public setter would also overwrite the
            # sub-configs, each of which has its own base.
            config._attn_implementation_internal = IMPLEMENTATION_OF_BASE[bases[id(config)]]


def _known(config: PreTrainedConfig, restore: list) -> bool:
    return any(c is config for c, _, _ in restore)


def disable_attentiondrop(model: torch.nn.Module) -> torch.nn.Module:
    """Undo `enable_attentiondrop` exactly: each config's attention implementation and `config.attentiondrop` as
    they were before it was first switched on (for a model loaded with `attn_implementation="attentiondrop"`: the
    stock model with the flags it was loaded with). A model that was never switched on is returned unchanged."""
    base_model = base_model_of(model)
    plan = model_plan_of(base_model)
    if plan is None:
        return model
    for config, implementation, flags in plan.restore:
        config._attn_implementation_internal = implementation
        if flags is None:
            config.__dict__.pop("attentiondrop", None)
        else:
            config.__dict__["attentiondrop"] = flags
    clear_plan(base_model)
    return model


def is_switched_on(model: PreTrainedModel) -> bool:
    """Whether any config of the model's attention runs AttentionDrop."""
    configs = [model.config, *(module.config for module in attention_modules(model).values())]
    return any(c._attn_implementation in BASE_OF_IMPLEMENTATION for c in configs)


def check_attentiondrop(model: torch.nn.Module) -> bool:
    """Whether AttentionDrop is on for `model`. When it is and `config.attentiondrop` was edited since it was switched
    on, switch it on again with the edited flags (the attention reads the plan, not the config)."""
    base_model = base_model_of(model)
    if not is_switched_on(base_model):
        return False
    plan = model_plan_of(base_model)
    if plan is None:
        raise ValueError(
            f"{type(base_model).__name__} runs the 'attentiondrop' attention implementation, but was never set up "
            "for it: load it with attn_implementation='attentiondrop', or call attentiondrop_hf.enable_attentiondrop"
        )
    if base_model.config.attentiondrop != plan.flags:
        switch_on(base_model, AttentionDropConfig.from_dict(base_model.config.attentiondrop or {}))
    return True
