"""2-D Blurred Attention Smoothing (`variant="blur2d"`): the blur of the logits over an image's patch grid, for
vision Transformers (math in `ops.blur2d`). Not in the paper, whose blur runs along the flattened sequence.

Each example draws sigma ~ U(`blur2d_sigma_min`, `blur2d_sigma_max`); prefix tokens (CLS, distillation, registers)
are not blurred. Their number is inferred from the model type (ViT, DeiT, BEiT, Data2VecVision, DINOv2, ViT-MSN);
for other models set `blur2d_prefix_tokens`, and `blur2d_grid` for a grid that is not square. Fast path: blurred
keys + the base kernel (SDPA), where every key is attendable and nothing else enters the logits; otherwise the
logit-space reference (BEiT's relative position bias, for one, enters its logits).
"""

from dataclasses import dataclass, field
from typing import Any

import torch

from ..ops.blur2d import blur2d_keys, blur2d_logits, blur2d_taps, patch_grid
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

__all__ = ["Blur2dOptions", "BlurredAttentionSmoothing2d"]

# Tokens before the patch grid, by model type: CLS, plus DeiT's distillation token, plus DINOv2's registers.
PREFIX_TOKENS = {
    "vit": lambda config: 1,
    "vit_msn": lambda config: 1,
    "deit": lambda config: 2,
    "beit": lambda config: 1,
    "data2vec-vision": lambda config: 1,
    "dinov2": lambda config: 1,
    "dinov2_with_registers": lambda config: 1 + config.num_register_tokens,
}


@dataclass
class Blur2dOptions:
    """Options of the 2-D blur over the patch grid."""

    blur2d_width: int = field(default=3, metadata={"help": "blur2d: odd kernel width >= 3, in patches per side."})
    blur2d_sigma_min: float = field(
        default=0.0, metadata={"help": "blur2d: lower bound of sigma ~ U(min, max), >= 0."}
    )
    blur2d_sigma_max: float = field(
        default=1.0, metadata={"help": "blur2d: upper bound of sigma, >= blur2d_sigma_min (0 = no perturbation)."}
    )
    blur2d_prefix_tokens: int | None = field(
        default=None,
        metadata={"help": "blur2d: tokens before the patch grid (default: from the model type, e.g. ViT 1, DeiT 2)."},
    )
    blur2d_grid: list[int] | None = field(
        default=None, metadata={"help": "blur2d: (height, width) of the patch grid (default: square)."}
    )

    def __post_init__(self) -> None:
        if not is_int(self.blur2d_width) or self.blur2d_width < 3 or self.blur2d_width % 2 == 0:
            raise ValueError(f"`blur2d_width` must be an odd integer >= 3, got {self.blur2d_width!r}")
        for name in ("blur2d_sigma_min", "blur2d_sigma_max"):
            if not is_number(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be a finite number >= 0, got {getattr(self, name)!r}")
        if self.blur2d_sigma_min > self.blur2d_sigma_max:
            raise ValueError(
                f"`blur2d_sigma_min` ({self.blur2d_sigma_min}) must not exceed `blur2d_sigma_max` "
                f"({self.blur2d_sigma_max})"
            )
        if self.blur2d_prefix_tokens is not None and (
            not is_int(self.blur2d_prefix_tokens) or self.blur2d_prefix_tokens < 0
        ):
            raise ValueError(f"`blur2d_prefix_tokens` must be an integer >= 0, got {self.blur2d_prefix_tokens!r}")
        if self.blur2d_grid is not None:
            grid = self.blur2d_grid
            if not isinstance(grid, (list, tuple)) or len(grid) != 2 or not all(is_int(n) and n > 0 for n in grid):
                raise ValueError(f"`blur2d_grid` must be two positive integers (height, width), got {grid!r}")
            self.blur2d_grid = list(grid)


def _prefix_tokens(options: Blur2dOptions, config: Any) -> int:
    if options.blur2d_prefix_tokens is not None:
        return options.blur2d_prefix_tokens
    model_type = getattr(config, "model_type", None)
    if model_type not in PREFIX_TOKENS:
        raise ValueError(
            f"blur2d cannot tell how many tokens a {model_type!r} model puts before its patch grid; set "
            "`blur2d_prefix_tokens` (known model types: " + ", ".join(sorted(PREFIX_TOKENS)) + ")"
        )
    return PREFIX_TOKENS[model_type](config)


def _grid_of(options: Blur2dOptions, call: PerturbedCall) -> tuple[int, tuple[int, int]]:
    if call.causal:
        raise ValueError("blur2d blurs an image's patch grid: it perturbs bidirectional self-attention only")
    prefix = _prefix_tokens(options, call.config)
    grid = tuple(options.blur2d_grid) if options.blur2d_grid is not None else None
    return prefix, patch_grid(call.key.shape[2], prefix, grid)


@register_variant("blur2d")
class BlurredAttentionSmoothing2d(AttentionDropVariant):
    options_class = Blur2dOptions

    @staticmethod
    def validate(config: Any) -> None:
        if config.targets is not None and config.targets != ["self"]:
            raise ValueError(
                "blur2d blurs an image's patch grid: it perturbs bidirectional self-attention only, "
                f"got targets {config.targets}"
            )

    @staticmethod
    def is_identity(options: Blur2dOptions) -> bool:
        return options.blur2d_sigma_max == 0.0

    @staticmethod
    def sample(options: Blur2dOptions, call: PerturbedCall) -> dict[str, torch.Tensor]:
        batch = call.query.shape[0]
        sigma = draw_blur_sigma(
            batch, options.blur2d_sigma_min, options.blur2d_sigma_max, "example", call.query.device
        )
        return {"sigma": sigma}

    @staticmethod
    def perturb_logits(
        logits: torch.Tensor,
        attendable: torch.Tensor | None,
        options: Blur2dOptions,
        draws: dict[str, torch.Tensor],
        call: PerturbedCall,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        prefix, grid = _grid_of(options, call)
        taps = blur2d_taps(draws["sigma"], options.blur2d_width)
        return blur2d_logits(logits, attendable, taps, prefix, grid), attendable

    @staticmethod
    def attend_fast(call: PerturbedCall, options: Blur2dOptions) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        if call.has_logit_terms or call.attendable is not None:
            return None
        prefix, grid = _grid_of(options, call)
        taps = blur2d_taps(call.draws["sigma"], options.blur2d_width)
        return call.run_base(call.query, blur2d_keys(call.key, taps, prefix, grid), call.value)

    @staticmethod
    def scaled(options: Blur2dOptions, factor: float) -> Blur2dOptions:
        sigma_max = options.blur2d_sigma_max * factor
        return with_values(
            options, blur2d_sigma_max=sigma_max, blur2d_sigma_min=smaller(options.blur2d_sigma_min, sigma_max)
        )

    @staticmethod
    def monitor(
        options: Blur2dOptions, draws: dict[str, torch.Tensor], clean: MonitoredLogits, perturbed: MonitoredLogits
    ) -> dict[str, torch.Tensor]:
        return {"sigma": draws["sigma"].mean()}

    @staticmethod
    def describe(options: Blur2dOptions) -> str:
        return (
            "**2-D Blurred Attention Smoothing** (`blur2d`, this package's extension of the paper's blur to vision "
            "models): each row of attention logits is blurred over the image's patch grid by a Gaussian of width "
            "`blur2d_width` and sigma ~ U(`blur2d_sigma_min`, `blur2d_sigma_max`), renormalised at the grid's "
            "borders; the prefix tokens (CLS, distillation, registers) are not blurred."
        )

    @staticmethod
    def consistency_caveat(options: Blur2dOptions) -> str | None:
        if options.blur2d_sigma_min == options.blur2d_sigma_max:
            return (
                "a fixed sigma (blur2d_sigma_min == blur2d_sigma_max) blurs both copies of the consistency pass "
                "identically; only dropout makes them differ. Draw sigma from a range."
            )
        return None
