"""The AttentionDrop section of a model card, rendered from `model_cards/attentiondrop_section.md`.

`AttentionDropTrainer.create_model_card` (also used by `push_to_hub`) puts it in place of the stock card's empty
"Model description" and tags the card `attentiondrop` and `attentiondrop-<variant>`.
"""

from importlib import resources
from string import Template
from typing import Any

from .config import VERSION_KEY, AttentionDropConfig

__all__ = ["attentiondrop_card_section", "attentiondrop_tags", "plot_training_curves"]

VARIANT_DESCRIPTIONS = {
    "hard": "**Hard Attention Masking**: each of a query row's `top_k` largest attention logits (among the keys it "
    "may attend to) is dropped with probability `p`; a dropped logit is {fill}.",
    "blur": "**Blurred Attention Smoothing**: each row of attention logits is convolved along the key axis with a "
    "Gaussian kernel of width `blur_width` and sigma ~ U(`blur_sigma_min`, `blur_sigma_max`), renormalised over the "
    "keys the row may attend to (one-sided in causal attention).",
}
FILLS = {"zero": "replaced by 0 (as in the paper)", "mask": "removed from the softmax"}
ROLE_NAMES = {
    "self": "bidirectional self-attention",
    "causal": "causal self-attention",
    "cross": "encoder-decoder cross-attention",
}
# Log entries of an evaluation that describe the run, not the model.
_RUN_STATISTICS = ("runtime", "samples_per_second", "steps_per_second", "epoch", "step")


# Evaluation metrics worth a curve, in the order they are drawn.
_CURVE_METRICS = ("eval_accuracy", "eval_bleu", "eval_chrf", "eval_ece", "eval_loss")


def plot_training_curves(log_history: list[dict], path: str) -> bool:
    """Draw the logged loss, its task and consistency terms, and the evaluation metrics against the step.

    Returns False (and draws nothing) without matplotlib or without logged training steps.
    """
    try:
        from matplotlib.figure import Figure  # the object API: no global backend switch
    except ImportError:
        return False
    steps = [entry for entry in log_history if "loss" in entry and "step" in entry]
    evaluations = [entry for entry in log_history if "eval_loss" in entry]
    if not steps:
        return False
    figure = Figure(figsize=(10, 3.6))
    training, evaluation = figure.subplots(1, 2)
    for key, label in (
        ("loss", "loss"),
        ("task_loss", "task (cross-entropy)"),
        ("consistency_loss", "consistency KL"),
    ):
        if all(key in entry for entry in steps):
            training.plot([e["step"] for e in steps], [e[key] for e in steps], label=label)
    training.set(xlabel="step", title="training (logged averages)")
    training.legend()
    for key in _CURVE_METRICS:
        if evaluations and all(key in entry for entry in evaluations):
            evaluation.plot([e["step"] for e in evaluations], [e[key] for e in evaluations], "o-", label=key[5:])
    evaluation.set(xlabel="step", title="evaluation")
    if evaluation.lines:
        evaluation.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return True


def attentiondrop_tags(flags: dict[str, Any]) -> list[str]:
    return ["attentiondrop", f"attentiondrop-{flags['variant']}"]


def _template() -> str:
    return (resources.files("attentiondrop_hf.model_cards") / "attentiondrop_section.md").read_text(encoding="utf-8")


def _metrics_table(metrics: dict[str, float] | None) -> str:
    shown = {k: v for k, v in (metrics or {}).items() if not k.endswith(_RUN_STATISTICS) and isinstance(v, float)}
    if not shown:
        return "### Evaluation\n\nNo evaluation was run before this card was written."
    rows = "\n".join(f"| {name} | {value:.4f} |" for name, value in shown.items())
    return f"### Evaluation\n\n| metric | value |\n|---|---|\n{rows}"


def attentiondrop_card_section(
    flags: dict[str, Any],
    consistency_weight: float,
    consistency_kl: str,
    metrics: dict[str, float] | None = None,
    curves_image: str | None = None,
) -> str:
    """Markdown describing how a checkpoint was regularized.

    Args:
        flags (`dict`): `config.attentiondrop` of the trained model.
        consistency_weight (`float`), consistency_kl (`str`): the Trainer's consistency arguments.
        metrics (`dict`, *optional*): the last evaluation's metrics.
        curves_image (`str`, *optional*): file name of the training curves beside the card.
    """
    settings = AttentionDropConfig.from_dict(flags)
    description = VARIANT_DESCRIPTIONS.get(settings.variant, f"the user-registered variant `{settings.variant}`.")
    flag_rows = "\n".join(f"| `{k}` | `{v}` |" for k, v in settings.to_dict().items() if k != VERSION_KEY)
    if consistency_weight > 0:
        direction = {
            "forward": "KL(p1 ‖ p2) (the paper's direction)",
            "symmetric": "0.5 (KL(p1 ‖ p2) + KL(p2 ‖ p1))",
        }[consistency_kl]
        consistency = f"{consistency_weight} × {direction} between two perturbed passes of every batch."
    else:
        consistency = "off (lambda = 0: one perturbed pass per step)."
    layers = "all layers" if settings.layers is None else "layers " + ", ".join(map(str, settings.layers))
    return Template(_template()).substitute(
        variant_description=description.format(fill=FILLS[settings.hard_fill]),
        flag_rows=flag_rows,
        consistency=consistency,
        targets=", ".join(ROLE_NAMES[role] for role in settings.targets),
        layers=f"{layers} of each stack",
        metrics=_metrics_table(metrics),
        curves=f"\n### Training curves\n\n![Training curves]({curves_image})\n" if curves_image else "",
    )
