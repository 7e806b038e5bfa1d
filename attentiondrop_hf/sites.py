"""Where an attention module sits in a model: its role ("self", "causal", "cross") and its layer index.

The AttentionInterface hands an attention function only the module, so the role is read off the module's own
attributes, and the layer index off its `layer_idx` or, for models without one (ViT, Marian's encoder), off its path
in the model (`vit.layers.3.attention` -> 3). Paths need the model: `enable_attentiondrop` annotates every module;
a model loaded with `attn_implementation="attentiondrop"` is found once on the call stack of its first forward.
"""

import functools
import inspect
import sys

import torch
from transformers import PreTrainedModel

__all__ = ["annotate_sites", "attention_modules", "attention_role", "attention_site"]

SITE_ATTRIBUTE = "_attentiondrop_site"


@functools.cache
def calls_attention_interface(cls: type) -> bool:
    """Whether a module class dispatches its attention through Transformers' `ALL_ATTENTION_FUNCTIONS`."""
    forward = getattr(cls, "forward", None)
    if forward is None or forward is torch.nn.Module.forward:
        return False
    try:
        return "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(forward)
    except (OSError, TypeError):
        return False


def attention_role(module: torch.nn.Module) -> str:
    """ "cross" (encoder-decoder), "causal" (causal self) or "self" (bidirectional self-attention)."""
    is_causal = getattr(module, "is_causal", True)  # SDPA's own default for a module without the attribute
    cross = (
        getattr(module, "is_cross_attention", False)
        or "Cross" in type(module).__name__
        or (getattr(module, "is_decoder", False) and not is_causal)
    )
    if cross:
        return "cross"
    return "causal" if is_causal else "self"


def _layer_index(path: str, module: torch.nn.Module) -> int | None:
    layer_idx = getattr(module, "layer_idx", None)
    if isinstance(layer_idx, int):
        return layer_idx
    # The first integer in the path indexes the stack's ModuleList (T5 nests a second one inside each block).
    return next((int(part) for part in path.split(".") if part.isdigit()), None)


def attention_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every submodule (by path) that calls the AttentionInterface."""
    return {name: m for name, m in model.named_modules() if calls_attention_interface(type(m))}


def annotate_sites(model: torch.nn.Module) -> dict[str, tuple[str, int | None]]:
    """Record `(role, layer)` on every attention module of `model`; returns them by path."""
    sites = {}
    for path, module in attention_modules(model).items():
        sites[path] = (attention_role(module), _layer_index(path, module))
        setattr(module, SITE_ATTRIBUTE, sites[path])
    return sites


def _model_on_call_stack(module: torch.nn.Module) -> torch.nn.Module | None:
    """The outermost `PreTrainedModel` whose forward is running and which contains `module`."""
    candidates = []
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, PreTrainedModel) and not any(owner is c for c in candidates):
            candidates.append(owner)
        frame = frame.f_back
    for model in reversed(candidates):
        if any(m is module for m in model.modules()):
            return model
    return None


def attention_site(module: torch.nn.Module, need_layer: bool) -> tuple[str, int | None]:
    """`(role, layer)` of an attention module; the layer is resolved only when `need_layer`."""
    site = module.__dict__.get(SITE_ATTRIBUTE)
    if site is None:
        site = (attention_role(module), None)
        setattr(module, SITE_ATTRIBUTE, site)
    if need_layer and site[1] is None:
        layer_idx = getattr(module, "layer_idx", None)
        if isinstance(layer_idx, int):
            site = (site[0], layer_idx)
            setattr(module, SITE_ATTRIBUTE, site)
        elif (model := _model_on_call_stack(module)) is not None:
            annotate_sites(model)
            site = module.__dict__[SITE_ATTRIBUTE]
        if site[1] is None:
            raise ValueError(
                f"AttentionDrop `layers` is set but the layer of {type(module).__name__} cannot be determined; "
                "call attentiondrop_hf.enable_attentiondrop(model, ...) on the model that contains it"
            )
    return site
