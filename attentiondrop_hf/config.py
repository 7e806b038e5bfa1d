"""`AttentionDropConfig`: the single source of truth of the flags, validated in one place.

The common flags (which variant, which attention roles and layers, what runs when nothing is perturbed) are fields
of this dataclass; the chosen variant's own options are its `options_class` instance in `options` (each variant
validates its own). A model carries the flags as one flat dict in `config.attentiondrop` (`to_dict()`), so they are
saved in config.json and a checkpoint loads in stock Transformers without this package.
"""

import warnings
from dataclasses import MISSING, Field, asdict, dataclass, field, fields
from typing import Any, Literal

from packaging.version import Version

from .ops.schedules import DEPTH_RULES, SCHEDULES
from .variants import get_variant, registered_variants
from .variants.base import AttentionDropVariant, is_int, is_number, reserve_option_names
from .version import __version__

__all__ = ["BASE_IMPLEMENTATIONS", "ROLES", "VERSION_KEY", "AttentionDropConfig"]

ROLES = ("self", "causal", "cross")
BASE_IMPLEMENTATIONS = ("sdpa", "eager")
# Written beside the flags: lets a checkpoint from a newer release with new flags load here (they are dropped with
# a warning) while a misspelt flag still raises.
VERSION_KEY = "attentiondrop_hf_version"


@dataclass(init=False)
class AttentionDropConfig:
    """AttentionDrop flags (arXiv 2504.12088). Validated on construction; invalid values raise `ValueError`.

    `AttentionDropConfig(variant="blur", blur_width=7)` takes the common flags and the variant's options by name;
    `options=` takes the variant's options as its dataclass or a dict instead.
    """

    variant: str = field(
        default="hard",
        metadata={"help": "Registered variant: 'hard' (top-k logit dropping), 'blur' (Gaussian logit blur), ..."},
    )
    targets: list[str] | None = field(
        default=None,
        metadata={
            "help": "Attention roles to perturb: any of 'self', 'causal', 'cross'. Default: bidirectional "
            "self-attention (the paper) where a model has it; the causal self-attention of decoder-only models."
        },
    )
    layers: list[int] | None = field(
        default=None,
        metadata={"help": "Layer indices to perturb within each stack of attention blocks (default: all layers)."},
    )
    base_attn_implementation: Literal["sdpa", "eager"] | None = field(
        default=None,
        metadata={
            "help": "Implementation run when nothing is perturbed (eval, untargeted roles and layers): 'sdpa' or "
            "'eager'. Default: the model's own (SDPA where the model supports it, else eager)."
        },
    )
    schedule: Literal["constant", "linear", "cosine"] = field(
        default="constant",
        metadata={
            "help": "Strength over training: 'constant', or a 'linear' / 'cosine' warm-up from 0 to full over the "
            "first `schedule_warmup` of the steps (driven by the trainer's AttentionDropScheduleCallback)."
        },
    )
    schedule_warmup: float = field(
        default=0.1, metadata={"help": "Fraction of the training steps the strength warm-up takes, in (0, 1]."}
    )
    depth_rule: Literal["uniform", "increasing", "decreasing"] = field(
        default="uniform",
        metadata={
            "help": "Strength by layer: 'uniform'; 'increasing', (l + 1) / L (deeper layers more, like drop-path); "
            "'decreasing', (L - l) / L (like DropKey)."
        },
    )
    options: Any = field(
        default=None, init=False, metadata={"help": "The chosen variant's own options (its `options_class`)."}
    )

    def __init__(self, options: Any = None, **flags: Any) -> None:
        for common in fields(self):
            if common.init:
                setattr(self, common.name, flags.pop(common.name) if common.name in flags else _default(common))
        variant = get_variant(self.variant)
        self.targets = _normalise_targets(self.targets)
        self.layers = _normalise_layers(self.layers)
        if self.base_attn_implementation not in (None, *BASE_IMPLEMENTATIONS):
            raise ValueError(
                f"`base_attn_implementation` must be None (the model's own) or one of {list(BASE_IMPLEMENTATIONS)}, "
                f"got {self.base_attn_implementation!r}"
            )
        if self.schedule not in SCHEDULES:
            raise ValueError(f"`schedule` must be one of {list(SCHEDULES)}, got {self.schedule!r}")
        if not is_number(self.schedule_warmup) or not 0.0 < self.schedule_warmup <= 1.0:
            raise ValueError(f"`schedule_warmup` must be in (0, 1], got {self.schedule_warmup!r}")
        if self.depth_rule not in DEPTH_RULES:
            raise ValueError(f"`depth_rule` must be one of {list(DEPTH_RULES)}, got {self.depth_rule!r}")
        self.options = _build_options(variant, options, flags)
        if self.varies_strength and variant.scaled(self.options, 1.0) is None:
            raise ValueError(
                f"variant {self.variant!r} has no strength to schedule: use schedule='constant' and "
                "depth_rule='uniform'"
            )
        variant.validate(self)

    @property
    def varies_strength(self) -> bool:
        """Whether the strength changes over training or by depth (the variant's options are then scaled)."""
        return self.schedule != "constant" or self.depth_rule != "uniform"

    def targets_role(self, role: str, decoder_only_stack: bool) -> bool:
        """Whether attention calls of `role` are perturbed. With `targets` unset: bidirectional self-attention,
        and the causal self-attention of a decoder-only stack (a language model, which has no other)."""
        if self.targets is None:
            return role == "self" or (role == "causal" and decoder_only_stack)
        return role in self.targets

    def selects_layer(self, layer: int | None) -> bool:
        return self.layers is None or layer in self.layers

    def to_dict(self) -> dict[str, Any]:
        """The flat, JSON-serialisable dict stored in `config.attentiondrop`: common flags, variant options."""
        common = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        return {**common, **asdict(self.options), VERSION_KEY: __version__}

    @classmethod
    def from_dict(cls, flags: dict[str, Any]) -> "AttentionDropConfig":
        """Build from a flat dict (e.g. `config.attentiondrop`). Unknown keys raise, unless the dict was written by a
        newer attentiondrop_hf: its new flags are then dropped with one warning."""
        if isinstance(flags, cls):
            return flags
        if not isinstance(flags, dict):
            raise ValueError(f"`config.attentiondrop` must be a dict of flags, got {type(flags).__name__}")
        flags = dict(flags)
        written_by = flags.pop(VERSION_KEY, None)
        if written_by is not None and Version(str(written_by)) > Version(__version__):
            known = _all_flag_names()
            if unknown := sorted(set(flags) - known):
                warnings.warn(
                    f"config.attentiondrop was written by attentiondrop_hf {written_by}; dropping flags this version "
                    f"({__version__}) does not know: {unknown}",
                    UserWarning,
                    stacklevel=2,
                )
                flags = {k: v for k, v in flags.items() if k in known}
        return cls(**flags)


def _default(f: Field) -> Any:
    return f.default_factory() if f.default is MISSING else f.default


def _common_flag_names() -> set[str]:
    return {f.name for f in fields(AttentionDropConfig) if f.init}


def _all_flag_names() -> set[str]:
    options = {f.name for v in registered_variants().values() for f in fields(v.options_class)}
    return _common_flag_names() | options


def _build_options(variant: type[AttentionDropVariant], options: Any, option_flags: dict[str, Any]) -> Any:
    """The variant's options from `options=` or from flags given by name; other variants' flags are ignored (with a
    warning when set away from their defaults), unknown flags raise."""
    own = {f.name: f for f in fields(variant.options_class)}
    others = {
        f.name: f
        for other in registered_variants().values()
        if other is not variant
        for f in fields(other.options_class)
    }
    if unknown := sorted(set(option_flags) - set(own) - set(others)):
        raise ValueError(f"unknown AttentionDrop flag(s) {unknown}; known flags: {sorted(_all_flag_names())}")
    if ignored := sorted(k for k in option_flags if k in others and option_flags[k] != _default(others[k])):
        warnings.warn(f"AttentionDrop variant {variant.name!r} ignores {ignored}", UserWarning, stacklevel=4)
    given = {k: v for k, v in option_flags.items() if k in own}
    if options is None:
        return variant.options_class(**given)
    if given:
        raise ValueError(f"pass the options of variant {variant.name!r} either as `options` or by name, not both")
    if isinstance(options, variant.options_class):
        return options
    if isinstance(options, dict):
        return _build_options(variant, None, options)
    raise ValueError(
        f"`options` of variant {variant.name!r} must be a {variant.options_class.__name__} or a dict, "
        f"got {type(options).__name__}"
    )


def _normalise_targets(targets: Any) -> list[str] | None:
    if targets is None:
        return None
    if isinstance(targets, str):
        targets = [targets]
    if not isinstance(targets, (list, tuple)) or not targets:
        raise ValueError(
            f"`targets` must be None (the default roles) or a non-empty list of roles from {list(ROLES)}, "
            f"got {targets!r}"
        )
    if unknown := [t for t in targets if t not in ROLES]:
        raise ValueError(f"`targets` must be roles from {list(ROLES)}, got unknown {unknown}")
    return [role for role in ROLES if role in targets]


def _normalise_layers(layers: Any) -> list[int] | None:
    if layers is None:
        return None
    if is_int(layers):
        layers = [layers]
    if not isinstance(layers, (list, tuple)) or not layers:
        raise ValueError(f"`layers` must be None (all layers) or a non-empty list of indices, got {layers!r}")
    if bad := [i for i in layers if not is_int(i) or i < 0]:
        raise ValueError(f"`layers` must hold layer indices >= 0, got {bad}")
    return sorted(set(layers))


reserve_option_names(_common_flag_names() | {VERSION_KEY})
