"""Blurred Attention Smoothing: a Gaussian blur of each logit row along the key axis (math in `ops.blur`).

Fast path: blur the keys instead of the logits and run the base kernel (SDPA) on them. It applies whenever the
keys a row may attend to depend on the key alone (padding) plus causality, and no position bias, float-mask bias or
softcap enters the logits; otherwise the logit-space reference runs.
"""

import warnings
from dataclasses import dataclass, field
from typing import Literal

import torch

from ..ops.blur import blur_keys, blur_logits, blur_offsets, blur_taps, key_validity
from ..ops.sampling import draw_blur_sigma
from .base import (
    AttentionDropVariant,
    MonitoredLogits,
    PerturbedCall,
    is_int,
    is_number,
    register_variant,
    smaller,
    with_values,
)

__all__ = ["BlurOptions", "BlurredAttentionSmoothing"]


@dataclass
class BlurOptions:
    """Options of Blurred Attention Smoothing (arXiv 2504.12088, Sec. 3.2)."""

    blur_width: int = field(default=5, metadata={"help": "blur: odd kernel width >= 3, in key positions."})
    blur_sigma_min: float = field(default=0.0, metadata={"help": "blur: lower bound of sigma ~ U(min, max), >= 0."})
    blur_sigma_max: float = field(
        default=1.0, metadata={"help": "blur: upper bound of sigma, >= blur_sigma_min (0 = no perturbation)."}
    )
    blur_sigma_per: Literal["example", "batch"] = field(
        default="example",
        metadata={"help": "blur: draw sigma per 'example' (default; needed by the consistency pass) or per 'batch'."},
    )

    def __post_init__(self) -> None:
        if not is_int(self.blur_width) or self.blur_width < 3 or self.blur_width % 2 == 0:
            raise ValueError(f"`blur_width` must be an odd integer >= 3, got {self.blur_width!r}")
        for name in ("blur_sigma_min", "blur_sigma_max"):
            if not is_number(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be a finite number >= 0, got {getattr(self, name)!r}")
        if self.blur_sigma_min > self.blur_sigma_max:
            raise ValueError(
                f"`blur_sigma_min` ({self.blur_sigma_min}) must not exceed `blur_sigma_max` ({self.blur_sigma_max})"
            )
        if self.blur_sigma_per not in ("example", "batch"):
            raise ValueError(f"`blur_sigma_per` must be 'example' or 'batch', got {self.blur_sigma_per!r}")
        if self.blur_width > 9:
            warnings.warn(
                "the paper reports blur_width <= 9 working and larger values hurting; "
                f"got blur_width={self.blur_width}",
                UserWarning,
                3,
            )


@register_variant("blur")
class BlurredAttentionSmoothing(AttentionDropVariant):
    options_class = BlurOptions

    @staticmethod
    def is_identity(options: BlurOptions) -> bool:
        # sigma -> 0 puts all of the kernel's weight on the key itself.
        return options.blur_sigma_max == 0.0

    @staticmethod
    def sample(options: BlurOptions, call: PerturbedCall) -> dict[str, torch.Tensor]:
        batch = call.query.shape[0]
        sigma = draw_blur_sigma(
            batch, options.blur_sigma_min, options.blur_sigma_max, options.blur_sigma_per, call.query.device
        )
        return {"sigma": sigma}

    @staticmethod
    def perturb_logits(
        logits: torch.Tensor,
        attendable: torch.Tensor | None,
        options: BlurOptions,
        draws: dict[str, torch.Tensor],
        call: PerturbedCall,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        offsets = blur_offsets(options.blur_width, call.causal)
        return blur_logits(logits, attendable, blur_taps(draws["sigma"], offsets), offsets), attendable

    @staticmethod
    def attend_fast(call: PerturbedCall, options: BlurOptions) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        # Compiled, the mask's values are not tested (that would break the graph at every call): a sliding window
        # takes the reference, any other mask is asserted separable.
        compiling = torch.compiler.is_compiling()
        if call.has_logit_terms or (compiling and call.windowed):
            return None
        separable, valid = key_validity(call.attendable, call.causal, assume_separable=compiling)
        if not separable:
            return None
        offsets = blur_offsets(options.blur_width, call.causal)
        blurred = blur_keys(call.key, valid, blur_taps(call.draws["sigma"], offsets), offsets)
        return call.run_base(call.query, blurred, call.value)

    @staticmethod
    def scaled(options: BlurOptions, factor: float) -> BlurOptions:
        sigma_max = options.blur_sigma_max * factor
        sigma_min = smaller(options.blur_sigma_min, sigma_max)
        return with_values(options, blur_sigma_max=sigma_max, blur_sigma_min=sigma_min)

    @staticmethod
    def monitor(
        options: BlurOptions, draws: dict[str, torch.Tensor], clean: MonitoredLogits, perturbed: MonitoredLogits
    ) -> dict[str, torch.Tensor]:
        return {"sigma": draws["sigma"].mean()}

    @staticmethod
    def describe(options: BlurOptions) -> str:
        return (
            "**Blurred Attention Smoothing**: each row of attention logits is convolved along the key axis with a "
            "Gaussian kernel of width `blur_width` and sigma ~ U(`blur_sigma_min`, `blur_sigma_max`), renormalised "
            "over the keys the row may attend to (one-sided in causal attention)."
        )

    @staticmethod
    def consistency_caveat(options: BlurOptions) -> str | None:
        if options.blur_sigma_min == options.blur_sigma_max:
            return (
                "a fixed sigma (blur_sigma_min == blur_sigma_max) blurs both copies of the consistency pass "
                "identically; only dropout makes them differ. Draw sigma from a range."
            )
        if options.blur_sigma_per == "batch":
            return (
                "blur_sigma_per='batch' blurs both copies of the consistency pass identically; only dropout makes "
                "them differ. Use blur_sigma_per='example'."
            )
        return None
