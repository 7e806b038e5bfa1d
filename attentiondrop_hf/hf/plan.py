"""The AttentionDrop plan of a model: for each attention module, where it sits, whether training perturbs it, and
what runs when it does not. One function builds it (`build_plan`, called by `enable_attentiondrop` and by the
load-time path); the attention function reads it and nothing else.

- **Where a module sits** is decided from the module's place in the model, not from attributes it may or may not
  carry: the encoder of an encoder-decoder model holds bidirectional self-attention ("self"); its decoder holds
  causal self-attention ("causal") and cross-attention ("cross"; the attention below a decoder layer whose name
  says cross / encoder: `encoder_attn`, `crossattention`, `EncDecAttention`, ...); the language model of a
  generative model (`get_decoder()`) holds causal self-attention; elsewhere (encoders, vision towers) a module is
  causal only if it says so (`is_causal=True`).
- **Layers** are counted per stack: the modules of one role under the same module list, by `layer_idx` where every
  module has one, else by position. Hierarchical models count blocks through their stages (Swin: 0 …
  sum(depths) - 1). A stack with fewer modules than its config declares layers runs one module for several layers
  (ALBERT): it is `shared`, and `layers` cannot select among its layers.
- **The base** of each module is the implementation its model ran before AttentionDrop ("sdpa" or "eager", the
  model's own choice unless `base_attn_implementation` says otherwise): eval and unperturbed calls run it with the
  very same arguments, so they equal the stock model bit for bit.
- **Run-time state** (how far training is, for a strength `schedule`; the options scaled for it) lives on the
  `ModelPlan` shared by the model's modules, never on the config: `config.attentiondrop` stays the plain dict that
  config.json saves.
"""

import functools
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..config import AttentionDropConfig
from ..ops import depth_factor, logit_space_attention, schedule_factor
from ..ops.masks import attendable_keys
from ..variants import AttentionDropVariant, get_variant

__all__ = [
    "ModelPlan",
    "Site",
    "SitePlan",
    "attention_modules",
    "build_plan",
    "find_sites",
    "generic_eager_attention",
    "model_plan_of",
    "plan_of",
]

PLAN_ATTRIBUTE = "_attentiondrop_plan"
# Below a decoder layer, the attention whose name says one of these reads the encoder's states.
CROSS_NAMES = ("cross", "encoder", "encdec")


@dataclass(frozen=True)
class Site:
    """An attention module's place: its role, its layer within its stack, the stack's depth, whether it is shared,
    and whether its stack is a decoder-only language model (whose causal attention the default targets perturb)."""

    role: str
    layer: int
    depth: int
    shared: bool = False
    decoder_only: bool = False


def generic_eager_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
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


@functools.cache
def _model_eager_attention(module_class: type) -> Callable:
    """The eager function of the module's own modeling file, so an "eager" base is that model's eager bit for bit."""
    return (
        getattr(sys.modules.get(module_class.__module__), "eager_attention_forward", None) or generic_eager_attention
    )


def base_attention(base: str, module: torch.nn.Module) -> Callable:
    return ALL_ATTENTION_FUNCTIONS["sdpa"] if base == "sdpa" else _model_eager_attention(type(module))


@dataclass(eq=False)
class ModelPlan:
    """What AttentionDrop does to one model, shared by its attention modules.

    Attributes:
        settings (`AttentionDropConfig`): the parsed flags.
        flags (`dict`): `config.attentiondrop` as the plan was built from it (the trainer re-plans on a change).
        restore (`list`): `(config, attention implementation, config.attentiondrop)` of every config the switch
            changed, as they were before: `disable_attentiondrop` puts them back.
        progress (`float` or `None`): the fraction of training steps done, for a strength `schedule` (set by
            `AttentionDropScheduleCallback`).
    """

    settings: AttentionDropConfig
    flags: dict
    restore: list = field(default_factory=list)
    progress: float | None = None
    _scaled: dict = field(default_factory=dict, repr=False)
    # The schedule's factor at `progress`, updated in place: a compiled graph reads it as an input, so a new step
    # does not recompile (a Python number would be a constant of the graph). On the CPU, so reading it is no sync.
    _schedule_factor: torch.Tensor = field(default_factory=lambda: torch.ones(()), repr=False)
    _progress_reported: bool = field(default=False, repr=False)  # read when tracing instead of `progress` itself

    @property
    def variant(self) -> type[AttentionDropVariant]:
        return get_variant(self.settings.variant)

    def set_progress(self, progress: float) -> None:
        if progress != self.progress:
            self.progress, self._scaled, self._progress_reported = progress, {}, True
            settings = self.settings
            self._schedule_factor.fill_(schedule_factor(settings.schedule, settings.schedule_warmup, progress))

    def strength(self, site: Site) -> float | torch.Tensor:
        """The factor the variant's strength is scaled by at `site` and this point of training: a number, or under
        `torch.compile` with a `schedule` a 0-dim tensor (so that the graph does not depend on the step)."""
        settings = self.settings
        depth = depth_factor(settings.depth_rule, site.layer, site.depth)
        if settings.schedule == "constant":
            return depth
        if not self._progress_reported:
            raise ValueError(
                f"AttentionDrop `schedule={settings.schedule!r}` follows the training step, which nothing reported: "
                "train with AttentionDropTrainer, or add attentiondrop_hf.AttentionDropScheduleCallback to the trainer"
            )
        if torch.compiler.is_compiling():
            return self._schedule_factor * depth
        return float(self._schedule_factor) * depth

    def options_at(self, site: Site) -> Any | None:
        """The variant's options in force at `site` now; `None` where they change nothing (identity)."""
        options = self.settings.options
        if self.settings.varies_strength:
            factor = self.strength(site)
            if torch.is_tensor(factor):  # compiled: whether the step's strength is 0 is not known when tracing
                return self.variant.scaled(options, factor)
            if factor not in self._scaled:
                self._scaled[factor] = self.variant.scaled(options, factor)
            options = self._scaled[factor]
        return None if self.variant.is_identity(options) else options


@dataclass(eq=False)
class SitePlan:
    """One attention module's part of the plan: its site, whether training perturbs it, and its base."""

    site: Site
    perturbed: bool
    base: str
    base_attention: Callable = field(repr=False)
    model: ModelPlan = field(repr=False)

    def options(self) -> Any | None:
        """The variant's options for a training call here, or `None` for a call that runs the base."""
        return self.model.options_at(self.site) if self.perturbed else None


@functools.cache
def _calls_the_interface(module_class: type) -> bool:
    """Whether the class's `forward` looks its attention function up in Transformers' `ALL_ATTENTION_FUNCTIONS`:
    the global names its code object references (not its source text), decorators unwrapped."""
    forward = inspect.unwrap(module_class.forward)
    code = getattr(forward, "__code__", None)
    return code is not None and "ALL_ATTENTION_FUNCTIONS" in code.co_names


def is_attention_module(module: torch.nn.Module) -> bool:
    """A module that calls the AttentionInterface (with its `config`'s implementation): the modules the attention
    function is handed. Attention written out by hand in a model's own code is not one (BigBird's block-sparse
    attention, DeBERTa's disentangled attention)."""
    return (
        isinstance(getattr(module, "config", None), PreTrainedConfig)
        and not isinstance(module, PreTrainedModel)
        and _calls_the_interface(type(module))
    )


def attention_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every attention module of `model`, by path."""
    return {path: module for path, module in model.named_modules() if is_attention_module(module)}


def has_sinks(module: torch.nn.Module) -> bool:
    """Whether the module holds attention sinks (GPT-OSS's `sinks` parameter, a `sink_proj` computing them per
    token): an extra logit per row that no variant perturbs."""
    names = [name for name, _ in module.named_parameters(recurse=False)]
    names += [name for name, _ in module.named_children()] + [name for name, _ in module.named_buffers(recurse=False)]
    return any("sink" in name.lower() or name == "s_aux" for name in names)


def _prefix(model: torch.nn.Module, part: torch.nn.Module | None) -> str | None:
    """The path of `part` inside `model` ("" for the model itself), `None` if it is not a submodule."""
    if part is None:
        return None
    return next((path for path, module in model.named_modules() if module is part), None)


def _under(path: str, prefix: str | None) -> bool:
    return prefix is not None and (prefix == "" or path == prefix or path.startswith(prefix + "."))


def _safe(getter: Callable) -> torch.nn.Module | None:
    try:
        part = getter()
    except (AttributeError, NotImplementedError, ValueError, TypeError):
        return None
    return part if isinstance(part, torch.nn.Module) else None


def _encoders_and_decoders(model: PreTrainedModel) -> tuple[list[str], list[str], list[str]]:
    """Paths of the encoders and decoders of every encoder-decoder (sub-)model, and of the language models of
    generative decoder-only (sub-)models."""
    encoders, decoders, language_models = [], [], []
    for path, part in model.named_modules():
        if not isinstance(part, PreTrainedModel):
            continue
        config = part.config
        if getattr(config, "is_encoder_decoder", False):
            for getter, found in ((part.get_encoder, encoders), (part.get_decoder, decoders)):
                inner = _safe(getter)
                if inner is not None and inner is not part and (prefix := _prefix(part, inner)) is not None:
                    found.append(f"{path}.{prefix}" if path else prefix)
        elif part.can_generate():
            inner = _safe(part.get_decoder)
            if inner is not None and inner is not part and (prefix := _prefix(part, inner)) is not None:
                language_models.append(f"{path}.{prefix}" if path else prefix)
    return encoders, decoders, language_models


def _below_layer(path: str) -> list[str]:
    """The path components below the first layer index (`crossattention.self` of `encoder.layer.0.crossattention
    .self`), or the last component for a module outside any layer list."""
    parts = path.split(".")
    index = next((i for i, part in enumerate(parts) if part.isdigit()), None)
    return parts[index + 1 :] if index is not None else parts[-1:]


def _reads_the_encoder(path: str, module: torch.nn.Module) -> bool:
    named = any(word in part.lower() for part in _below_layer(path) for word in CROSS_NAMES)
    return named or bool(getattr(module, "is_cross_attention", False)) or "Cross" in type(module).__name__


def _role(
    path: str, module: torch.nn.Module, encoders: list[str], decoders: list[str], language_models: list[str]
) -> str:
    if any(_under(path, prefix) for prefix in encoders):
        return "self"
    if _reads_the_encoder(path, module):
        return "cross"
    if any(_under(path, prefix) for prefix in (*decoders, *language_models)):
        return "causal"
    return "causal" if getattr(module, "is_causal", False) is True else "self"


def _stack_of(path: str) -> str:
    """The path up to the first integer component: the module list the attention module's layer belongs to."""
    parts = path.split(".")
    index = next((i for i, part in enumerate(parts) if part.isdigit()), len(parts))
    return ".".join(parts[:index])


def find_sites(model: PreTrainedModel) -> dict[str, Site]:
    """The `Site` of every attention module of `model`, by path."""
    modules = attention_modules(model)
    encoders, decoders, language_models = _encoders_and_decoders(model)
    roles = {path: _role(path, module, encoders, decoders, language_models) for path, module in modules.items()}
    stacks: dict[tuple[str, str], list[tuple[str, torch.nn.Module]]] = {}
    for path, module in modules.items():
        stacks.setdefault((_stack_of(path), roles[path]), []).append((path, module))
    stacks_with_cross = {stack for stack, role in stacks if role == "cross"}
    encoder_decoder = bool(encoders or decoders)
    sites = {}
    for (stack, role), members in stacks.items():
        indexed = all(isinstance(getattr(module, "layer_idx", None), int) for _, module in members)
        layers = [module.layer_idx if indexed else position for position, (_, module) in enumerate(members)]
        declared = getattr(members[0][1].config, "num_hidden_layers", None)
        shared = not indexed and isinstance(declared, int) and len(members) < declared
        depth = declared if shared else max(layers) + 1
        decoder_only = role == "causal" and not encoder_decoder and stack not in stacks_with_cross
        for (path, _), layer in zip(members, layers):
            sites[path] = Site(role=role, layer=layer, depth=depth, shared=shared, decoder_only=decoder_only)
    return sites


def plan_of(module: torch.nn.Module) -> SitePlan:
    """The plan of an attention module running "attentiondrop"; raises for a model that was never set up."""
    plan = module.__dict__.get(PLAN_ATTRIBUTE)
    if plan is None:
        raise ValueError(
            f"{type(module).__name__} runs the 'attentiondrop' attention implementation, but its model was never set "
            "up for it: load the model with from_pretrained / from_config(..., attn_implementation='attentiondrop'), "
            "or call attentiondrop_hf.enable_attentiondrop(model) (building a model class directly, or "
            "set_attn_implementation('attentiondrop'), does not)"
        )
    return plan


def model_plan_of(model: torch.nn.Module) -> ModelPlan | None:
    """The `ModelPlan` of a model set up by `build_plan`, or `None`."""
    return model.__dict__.get(PLAN_ATTRIBUTE)


def build_plan(
    model: PreTrainedModel, settings: AttentionDropConfig, flags: dict[str, Any], bases: dict[str, str]
) -> dict[str, SitePlan]:
    """Check that `settings` can be honoured on `model` and resolve every attention module's `SitePlan`.

    Nothing is written to the model; `record_plan` does that. Raises `ValueError` where the flags would perturb
    nothing, name layers the model does not have or cannot select, or target attention with sinks.

    Args:
        bases (`dict[str, str]`): the base implementation ("sdpa" or "eager") of each attention module, by path.
    """
    sites = find_sites(model)
    model_plan = ModelPlan(settings=settings, flags=flags)
    plans = {}
    for path, module in attention_modules(model).items():
        site = sites[path]
        targeted = settings.targets_role(site.role, site.decoder_only) and settings.selects_layer(site.layer)
        plans[path] = SitePlan(site, targeted, bases[path], base_attention(bases[path], module), model_plan)
    _check_targets(model, plans, settings)
    return plans


def _check_targets(model: PreTrainedModel, plans: dict[str, SitePlan], settings: AttentionDropConfig) -> None:
    name = type(model).__name__
    by_role = [plan for plan in plans.values() if settings.targets_role(plan.site.role, plan.site.decoder_only)]
    if not by_role:
        roles = sorted({plan.site.role for plan in plans.values()})
        raise ValueError(
            f"AttentionDrop targets {settings.targets} match no attention of {name}, which has roles {roles}; "
            "nothing would be regularized"
        )
    if settings.layers is not None:
        if shared := sorted({path.rsplit(".", 1)[0] for path, plan in plans.items() if plan.site.shared}):
            raise ValueError(
                f"`layers` cannot select layers of {name}: its attention modules {shared} each run for several "
                "layers per forward (shared layers); leave `layers` unset"
            )
        depth = max(plan.site.depth for plan in by_role)
        if out_of_range := [i for i in settings.layers if i >= depth]:
            raise ValueError(
                f"`layers` {out_of_range} out of range: the targeted stacks of {name} have at most {depth} layers"
            )
    modules = dict(model.named_modules())
    if sinks := sorted(path for path, plan in plans.items() if plan.perturbed and has_sinks(modules[path])):
        raise ValueError(
            f"AttentionDrop cannot perturb attention with sinks ({name}: {sinks[0]}, ...): leave the role "
            f"{plans[sinks[0]].site.role!r} out of `targets`"
        )


def record_plan(model: PreTrainedModel, plans: dict[str, SitePlan]) -> None:
    """Put each module's `SitePlan` where the attention function reads it, and the `ModelPlan` on the model."""
    modules = dict(model.named_modules())
    for path, plan in plans.items():
        modules[path].__dict__[PLAN_ATTRIBUTE] = plan
    model.__dict__[PLAN_ATTRIBUTE] = next(iter(plans.values())).model


def clear_plan(model: PreTrainedModel) -> None:
    for module in model.modules():
        module.__dict__.pop(PLAN_ATTRIBUTE, None)
