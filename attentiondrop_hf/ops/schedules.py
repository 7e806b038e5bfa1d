"""How strongly AttentionDrop perturbs, over training and by depth: scalar factors in [0, 1] that scale a variant's
strength (hard masking's `p`, the blurs' largest sigma).

- Over training: constant; or a warm-up from 0 to full strength over the first `warmup` fraction of the steps,
  linear or along half a cosine, then constant. Regularizing from the first step can slow the start of training;
  warm-ups are what timm and DropKey users reach for.
- By depth, in a stack of `depth` layers: uniform; increasing, (l + 1) / depth (the deepest layer at full strength,
  as drop-path schedules do); or decreasing, (depth - l) / depth (the first layer at full strength, as DropKey does).
"""

import math

__all__ = ["DEPTH_RULES", "SCHEDULES", "depth_factor", "schedule_factor"]

SCHEDULES = ("constant", "linear", "cosine")
DEPTH_RULES = ("uniform", "increasing", "decreasing")


def schedule_factor(schedule: str, warmup: float, progress: float) -> float:
    """The strength at `progress` (the fraction of training steps done, in [0, 1])."""
    if schedule == "constant" or progress >= warmup:
        return 1.0
    ramp = max(progress, 0.0) / warmup
    return ramp if schedule == "linear" else 0.5 * (1.0 - math.cos(math.pi * ramp))


def depth_factor(rule: str, layer: int, depth: int) -> float:
    """The strength of layer `layer` (0-based) in a stack of `depth` layers."""
    if rule == "uniform":
        return 1.0
    return (layer + 1) / depth if rule == "increasing" else (depth - layer) / depth
