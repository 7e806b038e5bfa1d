"""AttentionDrop variants: the contract and the registry (`base`), and the built-ins.

Every other module of this package is a built-in variant and registers itself on import, exactly as a user's
variant does; importing this package imports them all, so adding a built-in variant is adding its file here (and its
math in `ops/`).
"""

import importlib
import pkgutil

from .base import (
    AttentionDropVariant,
    NoOptions,
    PerturbedCall,
    UnknownVariantError,
    get_variant,
    register_variant,
    registered_variants,
)

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _module != "base":
        importlib.import_module(f"{__name__}.{_module}")

from .blur import BlurOptions, BlurredAttentionSmoothing  # noqa: E402
from .hard import HardAttentionMasking, HardOptions  # noqa: E402

__all__ = [
    "AttentionDropVariant",
    "BlurOptions",
    "BlurredAttentionSmoothing",
    "HardAttentionMasking",
    "HardOptions",
    "NoOptions",
    "PerturbedCall",
    "UnknownVariantError",
    "get_variant",
    "register_variant",
    "registered_variants",
]
