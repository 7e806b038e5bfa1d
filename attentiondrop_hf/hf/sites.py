"""Where an attention module sits in a model: its role and its layer index.

Transformers hands an attention function only the module. The role ("self", "causal", "cross") is read off the
module's own attributes, at call time if need be. The layer index needs the model for modules without `layer_idx`
(ViT, Marian's encoder, CLIP, Swin), so `annotate_sites(model)` records a `Site` on every attention module; the
switch (`enable_attentiondrop`) and the trainer call it.

Layers are counted per stack: the attention modules of one role under the same module list (`vit.encoder.layer`,
`model.decoder.layers`), by `layer_idx` where the module has one, else by position. Hierarchical models count blocks
through their stages (Swin's stack is `swin.encoder.layers`: blocks 0 … sum(depths) - 1). A stack with fewer modules
than its config declares layers runs one module several times per forward (ALBERT shares one across all layers):
it is marked `shared`, and `layers` cannot select among its layers.
"""

from dataclasses import dataclass

import torch
from transformers import PreTrainedConfig

__all__ = [
    "Site",
    "annotate_sites",
    "attention_modules",
    "attention_role",
    "clear_sites",
    "config_roles",
    "decoder_only_stack",
    "find_sites",
    "record_sites",
    "site_of",
]

SITE_ATTRIBUTE = "_attentiondrop_site"


@dataclass(frozen=True)
class Site:
    """An attention module's place: its role, its layer within its stack, the stack's depth, whether it is shared."""

    role: str
    layer: int
    depth: int
    shared: bool = False


def is_attention_module(module: torch.nn.Module) -> bool:
    """Transformers 5 attention modules carry `is_causal` and their `config`: the AttentionInterface reads both."""
    return hasattr(module, "is_causal") and isinstance(getattr(module, "config", None), PreTrainedConfig)


def attention_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every attention module of `model`, by path."""
    return {path: module for path, module in model.named_modules() if is_attention_module(module)}


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


def decoder_only_stack(config: PreTrainedConfig) -> bool:
    """Whether the causal attention reading `config` belongs to a decoder-only model (a language model): no encoder
    in the same config, no cross-attention beside it."""
    return not getattr(config, "is_encoder_decoder", False) and not getattr(config, "add_cross_attention", False)


def config_roles(config: PreTrainedConfig, role: str) -> set[str]:
    """The roles of all attention modules reading `config`, known from one module's role: an encoder-decoder config
    serves all three; otherwise its stack has this role, plus cross-attention where the config adds it."""
    if getattr(config, "is_encoder_decoder", False):
        return {"self", "causal", "cross"}
    return {role, "cross"} if getattr(config, "add_cross_attention", False) else {role}


def _stack_of(path: str) -> str:
    """The path up to the first integer component: the module list the attention module's layer belongs to."""
    parts = path.split(".")
    index = next((i for i, part in enumerate(parts) if part.isdigit()), len(parts))
    return ".".join(parts[:index])


def find_sites(model: torch.nn.Module) -> dict[str, Site]:
    """The `Site` of every attention module of `model`, by path."""
    stacks: dict[tuple[str, str], list[tuple[str, torch.nn.Module]]] = {}
    for path, module in attention_modules(model).items():
        stacks.setdefault((_stack_of(path), attention_role(module)), []).append((path, module))
    sites = {}
    for (_, role), members in stacks.items():
        indexed = all(isinstance(getattr(module, "layer_idx", None), int) for _, module in members)
        layers = [module.layer_idx if indexed else position for position, (_, module) in enumerate(members)]
        depth = max(layers) + 1
        declared = getattr(members[0][1].config, "num_hidden_layers", None)
        shared = not indexed and isinstance(declared, int) and len(members) < declared
        for (path, _), layer in zip(members, layers):
            sites[path] = Site(role=role, layer=layer, depth=declared if shared else depth, shared=shared)
    return sites


def record_sites(model: torch.nn.Module, sites: dict[str, Site]) -> None:
    """Store each module's `Site` on it, where the attention function reads it."""
    for path, module in attention_modules(model).items():
        module.__dict__[SITE_ATTRIBUTE] = sites[path]


def annotate_sites(model: torch.nn.Module) -> dict[str, Site]:
    """`find_sites` and `record_sites` (idempotent); returns the sites by path."""
    sites = find_sites(model)
    record_sites(model, sites)
    return sites


def clear_sites(model: torch.nn.Module) -> None:
    for module in attention_modules(model).values():
        module.__dict__.pop(SITE_ATTRIBUTE, None)


def site_of(module: torch.nn.Module) -> Site | None:
    """The `Site` recorded by `annotate_sites`, or `None` for a module of a model that was never annotated."""
    return module.__dict__.get(SITE_ATTRIBUTE)
