"""The variant registry: what an AttentionDrop variant is, and the one place variants are registered.

A variant perturbs a block of attention logits given which keys each row may attend to. It is a class of static
functions (no state), registered under a lower-case name with `@register_variant("name")`; the built-in "hard" and
"blur" register exactly as a user's variant does. `config.attentiondrop["variant"]` selects one by name.

    @register_variant("scale")
    class ScaleLogits(AttentionDropVariant):
        config_fields = ("p",)

        @staticmethod
        def perturb_logits(logits, attendable, config, draws, causal):
            return logits * (1 - config.p), attendable
"""

import re
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .config import AttentionDropConfig

__all__ = ["AttentionDropVariant", "PerturbedCall", "get_variant", "register_variant", "registered_variants"]

_VARIANTS: dict[str, type["AttentionDropVariant"]] = {}
_NAME_PATTERN = re.compile(r"[a-z][a-z0-9_]*")


@dataclass
class PerturbedCall:
    """One attention call AttentionDrop perturbs, as a variant's fast path sees it.

    Attributes:
        query (`torch.Tensor` of shape `[B, H, Q, D]`); key, value (`[B, H_kv, K, D]`).
        attendable (`torch.Tensor`, *optional*): bool, broadcastable to `[B, H, Q, K]`; `None` = every key.
        causal (`bool`): causal self-attention (the blur is then one-sided).
        draws (`dict[str, torch.Tensor]`): this call's random draws (`AttentionDropVariant.sample`).
        has_logit_terms (`bool`): a position bias or softcap enters the logits, so key-space tricks do not apply.
        run_base (`Callable`): `run_base(query, key, value)` runs the base implementation (SDPA) with the call's
            original mask and arguments and returns `(output [B, Q, H, D], weights or None)`.
    """

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    attendable: torch.Tensor | None
    causal: bool
    draws: dict
    has_logit_terms: bool
    run_base: Callable


class AttentionDropVariant:
    """Base class of a variant: a logit-space definition plus optional extras.

    Override:
        perturb_logits (required): the reference that defines the variant.
        sample: the call's random draws, from the global torch RNG. A draw with 4 dims is laid out
            `[B | 1, H | 1, Q | 1, ...]` and is sliced by query rows when the logits are computed in blocks.
        attend_fast: an optional fast path that must equal `perturb_logits` up to rounding; return `None` where it
            does not apply and the reference runs instead.
        validate: extra checks on the config; raise `ValueError` naming the flag.
        is_identity: True for flags under which the variant changes nothing (the call then goes to the base).
        config_fields: the `AttentionDropConfig` flags the variant reads (others set away from their defaults
            draw a warning that they are ignored).
    """

    name: str = ""
    config_fields: tuple[str, ...] = ()

    @staticmethod
    def validate(config: "AttentionDropConfig") -> None:
        return None

    @staticmethod
    def is_identity(config: "AttentionDropConfig") -> bool:
        return False

    @staticmethod
    def sample(
        config: "AttentionDropConfig", batch: int, heads: int, query_len: int, key_len: int, device: torch.device
    ) -> dict[str, torch.Tensor]:
        return {}

    @staticmethod
    def perturb_logits(
        logits: torch.Tensor,
        attendable: torch.Tensor | None,
        config: "AttentionDropConfig",
        draws: dict[str, torch.Tensor],
        causal: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Perturb float32 logits `[B, H, q, K]`; return `(logits, attendable)` (a variant may remove keys)."""
        raise NotImplementedError

    attend_fast: Callable[[PerturbedCall, "AttentionDropConfig"], tuple | None] | None = None


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
        from .config import AttentionDropConfig

        known = {f.name for f in fields(AttentionDropConfig)}
        if unknown := sorted(set(cls.config_fields) - known):
            raise ValueError(
                f"variant {name!r} declares unknown config_fields {unknown}; known flags: {sorted(known)}"
            )
        cls.name = name
        _VARIANTS[name] = cls
        return cls

    return decorator


def get_variant(name: str) -> type[AttentionDropVariant]:
    """The variant registered under `name`; raises `ValueError` listing the registered names otherwise."""
    if not isinstance(name, str) or name not in _VARIANTS:
        raise ValueError(f"`variant` must be one of {sorted(_VARIANTS)}, got {name!r}")
    return _VARIANTS[name]


def registered_variants() -> dict[str, type[AttentionDropVariant]]:
    """The live registry (name -> class). Tests snapshot and restore it; users should not mutate it directly."""
    return _VARIANTS
