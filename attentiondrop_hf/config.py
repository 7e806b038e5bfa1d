"""`AttentionDropConfig`: every AttentionDrop flag, its default and its valid range, validated in one place.

A model carries its flags as a plain dict in `config.attentiondrop` (`AttentionDropConfig.to_dict()`), so they are
saved in config.json and a checkpoint loads in stock Transformers without this package. Nothing downstream of
`__post_init__` re-validates a flag.
"""

import math
import warnings
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Literal

from packaging.version import Version

from . import __version__
from .registry import get_variant, registered_variants

__all__ = ["BASE_IMPLEMENTATIONS", "ROLES", "AttentionDropConfig"]

ROLES = ("self", "causal", "cross")
BASE_IMPLEMENTATIONS = ("sdpa", "eager")
# Written beside the flags: lets a checkpoint from a newer release with new flags load here (they are dropped with
# a warning) while a misspelt flag still raises.
VERSION_KEY = "attentiondrop_hf_version"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class AttentionDropConfig:
    """AttentionDrop flags (arXiv 2504.12088). Validated on construction; invalid values raise `ValueError`."""

    variant: str = field(
        default="hard",
        metadata={
            "help": "Registered variant: 'hard' (top-k logit dropping), 'blur' (Gaussian logit blur) or a user's."
        },
    )
    p: float = field(
        default=0.1, metadata={"help": "hard: drop probability of each of a row's top-k logits, in [0, 1]."}
    )
    top_k: int = field(
        default=8, metadata={"help": "hard: candidates per query row (>= 1), clamped to the row's attendable keys."}
    )
    hard_fill: Literal["zero", "mask"] = field(
        default="zero",
        metadata={"help": "hard: replace a dropped logit by 0 ('zero', the paper) or remove its key ('mask')."},
    )
    blur_width: int = field(default=5, metadata={"help": "blur: odd kernel width >= 3, in key positions."})
    blur_sigma_min: float = field(default=0.0, metadata={"help": "blur: lower bound of sigma ~ U(min, max), >= 0."})
    blur_sigma_max: float = field(default=1.0, metadata={"help": "blur: upper bound of sigma, >= blur_sigma_min."})
    blur_sigma_per: Literal["example", "batch"] = field(
        default="example",
        metadata={"help": "blur: draw sigma per 'example' (default; needed by the consistency pass) or per 'batch'."},
    )
    targets: list[str] = field(
        default_factory=lambda: ["self"],
        metadata={"help": "Attention roles to perturb: any of 'self', 'causal', 'cross' (default: self, the paper)."},
    )
    layers: list[int] | None = field(
        default=None, metadata={"help": "Layer indices to perturb within each stack (default: all layers)."}
    )
    base_attn_implementation: Literal["sdpa", "eager"] = field(
        default="sdpa",
        metadata={"help": "Implementation run when nothing is perturbed (eval, untargeted roles and layers)."},
    )

    def __post_init__(self):
        variant = get_variant(self.variant)
        if not _is_number(self.p) or not 0.0 <= self.p <= 1.0:
            raise ValueError(f"`p` must be in [0, 1], got {self.p!r}")
        if not _is_int(self.top_k) or self.top_k < 1:
            raise ValueError(f"`top_k` must be an integer >= 1, got {self.top_k!r}")
        if self.hard_fill not in ("zero", "mask"):
            raise ValueError(f"`hard_fill` must be 'zero' or 'mask', got {self.hard_fill!r}")
        if not _is_int(self.blur_width) or self.blur_width < 3 or self.blur_width % 2 == 0:
            raise ValueError(f"`blur_width` must be an odd integer >= 3, got {self.blur_width!r}")
        for name in ("blur_sigma_min", "blur_sigma_max"):
            if not _is_number(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be a finite number >= 0, got {getattr(self, name)!r}")
        if self.blur_sigma_min > self.blur_sigma_max:
            raise ValueError(
                f"`blur_sigma_min` ({self.blur_sigma_min}) must not exceed `blur_sigma_max` ({self.blur_sigma_max})"
            )
        if self.blur_sigma_per not in ("example", "batch"):
            raise ValueError(f"`blur_sigma_per` must be 'example' or 'batch', got {self.blur_sigma_per!r}")
        self.targets = self._normalise_targets(self.targets)
        self.layers = self._normalise_layers(self.layers)
        if self.base_attn_implementation not in BASE_IMPLEMENTATIONS:
            raise ValueError(
                f"`base_attn_implementation` must be one of {list(BASE_IMPLEMENTATIONS)}, "
                f"got {self.base_attn_implementation!r}"
            )
        variant.validate(self)
        self._warn_ignored_flags(variant)
        if (self.variant == "hard" and self.p > 0.5) or (self.variant == "blur" and self.blur_width > 9):
            warnings.warn(
                "the paper reports p <= 0.5 and blur_width <= 9 working and larger values hurting; "
                f"got p={self.p}, blur_width={self.blur_width}",
                UserWarning,
                stacklevel=3,
            )

    @staticmethod
    def _normalise_targets(targets: Any) -> list[str]:
        if isinstance(targets, str):
            targets = [targets]
        if not isinstance(targets, (list, tuple)) or not targets:
            raise ValueError(f"`targets` must be a non-empty list of roles from {list(ROLES)}, got {targets!r}")
        if unknown := [t for t in targets if t not in ROLES]:
            raise ValueError(f"`targets` must be roles from {list(ROLES)}, got unknown {unknown}")
        return [role for role in ROLES if role in targets]

    @staticmethod
    def _normalise_layers(layers: Any) -> list[int] | None:
        if layers is None:
            return None
        if isinstance(layers, int) and not isinstance(layers, bool):
            layers = [layers]
        if not isinstance(layers, (list, tuple)) or not layers:
            raise ValueError(f"`layers` must be None (all layers) or a non-empty list of indices, got {layers!r}")
        if bad := [i for i in layers if not _is_int(i) or i < 0]:
            raise ValueError(f"`layers` must hold layer indices >= 0, got {bad}")
        return sorted(set(layers))

    def _warn_ignored_flags(self, variant) -> None:
        variant_flags = {name for cls in registered_variants().values() for name in cls.config_fields}
        ignored = [
            f.name
            for f in fields(self)
            if f.name in variant_flags - set(variant.config_fields) and getattr(self, f.name) != _default(f)
        ]
        if ignored:
            warnings.warn(f"AttentionDrop variant {self.variant!r} ignores {ignored}", UserWarning, stacklevel=3)

    def check_layers(self, num_layers: int) -> None:
        """Raise `ValueError` if `layers` names a layer a stack of `num_layers` layers does not have."""
        if self.layers is not None and (out_of_range := [i for i in self.layers if i >= num_layers]):
            raise ValueError(f"`layers` {out_of_range} out of range: the model has {num_layers} layers per stack")

    def perturbs(self, role: str, layer: int | None) -> bool:
        """Whether an attention call of this role and layer is perturbed (in training)."""
        return role in self.targets and (self.layers is None or layer in self.layers)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every flag, as stored in `config.attentiondrop`."""
        return {**asdict(self), VERSION_KEY: __version__}

    @classmethod
    def from_dict(cls, flags: dict[str, Any]) -> "AttentionDropConfig":
        """Build from a dict (e.g. `config.attentiondrop`). Unknown keys raise, unless the dict was written by a
        newer attentiondrop_hf: its new flags are then dropped with a warning."""
        if isinstance(flags, cls):
            return flags
        if not isinstance(flags, dict):
            raise ValueError(f"`config.attentiondrop` must be a dict of flags, got {type(flags).__name__}")
        known = {f.name for f in fields(cls)}
        flags = dict(flags)
        written_by = flags.pop(VERSION_KEY, None)
        if unknown := sorted(set(flags) - known):
            if written_by is not None and Version(str(written_by)) > Version(__version__):
                warnings.warn(
                    f"config.attentiondrop was written by attentiondrop_hf {written_by}; dropping flags this version "
                    f"({__version__}) does not know: {unknown}",
                    UserWarning,
                    stacklevel=2,
                )
            else:
                raise ValueError(f"unknown AttentionDrop flag(s) {unknown}; known flags: {sorted(known)}")
        return cls(**{k: v for k, v in flags.items() if k in known})


def _default(f):
    return f.default_factory() if f.default is MISSING else f.default
