"""Local `evaluate` modules for the recipes: "calibration" (accuracy, ECE, NLL) and "sacrebleu_chrf" (BLEU, chrF).

The Hub's metric scripts cannot be fetched without a network; these load from this folder.
"""

import os

__all__ = ["load"]

METRICS = ("calibration", "sacrebleu_chrf")


def load(name: str, **kwargs):
    """`evaluate.load` of a module shipped here, by name."""
    import evaluate

    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; shipped metrics: {list(METRICS)}")
    return evaluate.load(os.path.join(os.path.dirname(__file__), name), **kwargs)
