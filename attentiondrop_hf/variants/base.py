"""What an AttentionDrop variant is, and the one validated registry of variants.

A variant perturbs a block of attention logits given which keys each row may attend to. It is a class of static
functions (no state) plus the dataclass of its own options, registered under a lower-case name with
`@register_variant("name")`; the built-in "hard" and "blur" register exactly as a user's variant does, and
`config.attentiondrop["variant"]` selects one by name. A variant owns everything about itself: its options (their
help text, validation and paper-regime warnings live in the options dataclass), its random draws, the logit-space
reference that defines it, an optional fast path that must equal it, the sentence a model card prints about it, and
any caveat for the consistency trainer.

    @dataclass
    class TemperatureOptions:
        temperature: float = field(default=2.0, metadata={"help": "Divide every logit by this (> 0)."})

        def __post_init__(self):
            if not is_number(self.temperature) or self.temperature <= 0:
                raise ValueError(f"`temperature` must be a number > 0, got {self.temperature!r}")

    @register_variant("temperature")
    class Temperature(AttentionDropVariant):
        options_class = TemperatureOptions

        @staticmethod
        def perturb_logits(logits, attendable, options, draws, call):
            return logits / options.temperature, attendable

Option names share one namespace with the common flags (`config.attentiondrop` is a flat dict), so the registry
refuses an option name that another variant or the common flags already use.
"""

import copy
import dataclasses
import math
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch

__all__ = [
    "AttentionDropVariant",
    "MonitoredLogits",
    "NoOptions",
    "PerturbedCall",
    "UnknownVariantError",
    "get_variant",
    "is_int",
    "is_number",
    "register_variant",
    "registered_variants",
    "reserve_option_names",
    "with_values",
]

_VARIANTS: dict[str, type["AttentionDropVariant"]] = {}
_RESERVED_NAMES: set[str] = set()
_NAME_PATTERN = re.compile(r"[a-z][a-z0-9_]*")
_Options = TypeVar("_Options")


class UnknownVariantError(ValueError):
    """`variant` names nothing registered in this process (a checkpoint trained with a user's variant, loaded
    without importing the module that registers it)."""


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool): the check every numeric option starts with."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_int(value: Any) -> bool:
    """An int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class NoOptions:
    """The options of a variant that has none."""


@dataclass
class PerturbedCall:
    """One attention call AttentionDrop perturbs, as a variant sees it.

    Attributes:
        query (`torch.Tensor` of shape `[B, H, Q, D]`); key, value (`[B, H_kv, K, D]`).
        attendable (`torch.Tensor`, *optional*): bool, broadcastable to `[B, H, Q, K]`; `None` = every key.
        causal (`bool`): the keys a row may attend to stop at the row (causal self-attention): the 1-D blur is
            then one-sided.
        config (`PretrainedConfig`): the config of the attention module (its model type, sizes).
        run_base (`Callable`): `run_base(query, key, value)` runs the base implementation (SDPA or the model's eager)
            with the call's original mask and arguments and returns `(output [B, Q, H, D], weights or None)`.
        bias (`torch.Tensor`, *optional*): the finite part of a float mask (`ops.masks.attendable_keys`), a logit term.
        position_bias (`torch.Tensor`, *optional*): a position bias added to the logits (T5).
        softcap (`float`, *optional*): `softcap · tanh(L / softcap)` of the logits (Gemma 2).
        scaling (`float`, *optional*): the logit scale (`D ** -0.5` when `None`).
        dropout (`float`): attention-probability dropout of the call.
        windowed (`bool`): the model limits each query to a sliding window of keys (its `sliding_window`).
        draws (`dict[str, torch.Tensor]`): this call's random draws, filled in by `AttentionDropVariant.sample`.
    """

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    attendable: torch.Tensor | None
    causal: bool
    config: Any
    run_base: Callable
    bias: torch.Tensor | None = None
    position_bias: torch.Tensor | None = None
    softcap: float | None = None
    scaling: float | None = None
    dropout: float = 0.0
    windowed: bool = False
    draws: dict = dataclasses.field(default_factory=dict)

    @property
    def logit_terms(self) -> dict[str, Any]:
        """What the model adds to `Q Kᵀ · scale`, as keyword arguments of `ops.logit_space_attention`."""
        return {"bias": self.bias, "position_bias": self.position_bias, "softcap": self.softcap}

    @property
    def has_logit_terms(self) -> bool:
        """A position bias, a float-mask bias or a softcap enters the logits: key-space tricks do not apply."""
        return any(term is not None for term in self.logit_terms.values())


class AttentionDropVariant:
    """Base class of a variant: a logit-space definition plus optional extras.

    Set:
        options_class: a dataclass of the variant's own flags (every field with `metadata={"help": ...}`); its
            `__post_init__` validates them (raise `ValueError` naming the flag) and warns outside the paper's regime.

    Override:
        perturb_logits (required): the reference that defines the variant.
        sample: the call's random draws, from the global torch RNG (activation checkpointing then replays them).
            A draw with 4 dims is laid out `[B | 1, H | 1, Q | 1, ...]` and is sliced by query rows when the logits
            are computed in blocks.
        attend_fast: an optional fast path that must equal `perturb_logits` up to rounding; return `None` where it
            does not apply and the reference runs instead.
        is_identity: True for options under which the variant changes nothing (the call then goes to the base).
        validate: checks that involve the common flags (e.g. which attention roles the variant can act on).
        scaled: the options at a fraction of the variant's strength, for schedules and depth rules (`with_values`
            builds them); `None`, the default, for a variant with no strength to scale. The factor is a number, or
            under `torch.compile` with a schedule a 0-dim tensor: scale with arithmetic (`smaller` for a minimum),
            never an `if` on its value.
        monitor: what `AttentionDropMonitorCallback` logs about a perturbed call besides the attention entropies
            (e.g. the attention mass hard masking removed, the sigma a blur drew).
        describe: the Markdown sentence a model card prints about the variant and its options.
        consistency_caveat: a warning for the consistency trainer, or `None`.
    """

    name: ClassVar[str] = ""
    options_class: ClassVar[type] = NoOptions
    attend_fast: ClassVar[Callable[[PerturbedCall, Any], tuple | None] | None] = None

    @staticmethod
    def is_identity(options: Any) -> bool:
        return False

    @staticmethod
    def validate(config: Any) -> None:
        return None

    @staticmethod
    def sample(options: Any, call: PerturbedCall) -> dict[str, torch.Tensor]:
        return {}

    @staticmethod
    def perturb_logits(
        logits: torch.Tensor,
        attendable: torch.Tensor | None,
        options: Any,
        draws: dict[str, torch.Tensor],
        call: PerturbedCall,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Perturb float32 logits `[B, H, q, K]`; return `(logits, attendable)` (a variant may remove keys)."""
        raise NotImplementedError

    @staticmethod
    def scaled(options: Any, factor: float) -> Any | None:
        return None

    @staticmethod
    def monitor(
        options: Any, draws: dict[str, torch.Tensor], clean: "MonitoredLogits", perturbed: "MonitoredLogits"
    ) -> dict[str, torch.Tensor]:
        """Scalars about one perturbed call, from its draws and its `MonitoredLogits` before and after."""
        return {}

    @classmethod
    def describe(cls, options: Any) -> str:
        return f"the user-registered variant `{cls.name}`."

    @staticmethod
    def consistency_caveat(options: Any) -> str | None:
        return None


@dataclass
class MonitoredLogits:
    """Logits `[B, H, Q, K]` (float32), the keys each row may attend to, and the attention they give."""

    logits: torch.Tensor
    attendable: torch.Tensor | None
    probs: torch.Tensor


def with_values(options: _Options, **values: Any) -> _Options:
    """A copy of validated options with some values changed, without validating again (for `scaled`: values derived
    from validated ones, built once per schedule step)."""
    changed = copy.copy(options)
    for name, value in values.items():
        setattr(changed, name, value)
    return changed


def smaller(bound: float, value: float | torch.Tensor) -> float | torch.Tensor:
    """min(bound, value) for a value that may be a 0-dim tensor (a scaled strength under `torch.compile`)."""
    return value.clamp(max=bound) if torch.is_tensor(value) else min(bound, value)


def _option_fields(cls: type) -> list[dataclasses.Field]:
    if not dataclasses.is_dataclass(cls) or not isinstance(cls, type):
        raise TypeError(f"options_class must be a dataclass, got {cls!r}")
    return list(dataclasses.fields(cls))


def _options_owned_by_others(name: str) -> dict[str, str]:
    return {
        f.name: other
        for other, variant in _VARIANTS.items()
        if other != name
        for f in _option_fields(variant.options_class)
    }


def register_variant(name: str, *, override: bool = False) -> Callable[[type], type]:
    """Class decorator registering an `AttentionDropVariant` subclass under `name`.

    Args:
        name (`str`): lower-case identifier (`[a-z][a-z0-9_]*`), the value of the `variant` flag.
        override (`bool`): replace a variant already registered under this name.
    """
    if not isinstance(name, str) or not _NAME_PATTERN.fullmatch(name):
        raise ValueError(f"variant name must match [a-z][a-z0-9_]*, got {name!r}")
    if name in _VARIANTS and not override:
        raise ValueError(f"variant {name!r} is already registered; pass override=True to replace it")

    def decorator(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, AttentionDropVariant)):
            raise TypeError(f"register_variant({name!r}) expects a subclass of AttentionDropVariant, got {cls!r}")
        if cls.perturb_logits is AttentionDropVariant.perturb_logits:
            raise TypeError(f"variant {name!r} ({cls.__name__}) must implement perturb_logits")
        option_fields = _option_fields(cls.options_class)
        if undocumented := [f.name for f in option_fields if not f.metadata.get("help")]:
            raise ValueError(f"variant {name!r}: options {undocumented} need metadata={{'help': ...}}")
        if reserved := sorted({f.name for f in option_fields} & _RESERVED_NAMES):
            raise ValueError(f"variant {name!r}: options {reserved} are common AttentionDrop flags; rename them")
        owners = _options_owned_by_others(name)
        if taken := {f.name: owners[f.name] for f in option_fields if f.name in owners}:
            raise ValueError(f"variant {name!r}: options already belong to other variants: {taken}")
        cls.name = name
        _VARIANTS[name] = cls
        return cls

    return decorator


def reserve_option_names(names: Collection[str]) -> None:
    """Names no variant option may take (the common flags; called by `attentiondrop_hf.config`)."""
    for variant_name, variant in _VARIANTS.items():
        if clash := sorted({f.name for f in _option_fields(variant.options_class)} & set(names)):
            raise ValueError(f"variant {variant_name!r}: options {clash} are common AttentionDrop flags")
    _RESERVED_NAMES.update(names)


def get_variant(name: str) -> type[AttentionDropVariant]:
    """The variant registered under `name`; raises `UnknownVariantError` listing the registered names otherwise."""
    if not isinstance(name, str) or name not in _VARIANTS:
        raise UnknownVariantError(
            f"`variant` must be one of {sorted(_VARIANTS)}, got {name!r} (a variant of your own must be registered "
            "with @register_variant before it is used)"
        )
    return _VARIANTS[name]


def registered_variants() -> dict[str, type[AttentionDropVariant]]:
    """The live registry (name -> class). Tests snapshot and restore it; users should not mutate it directly."""
    return _VARIANTS
