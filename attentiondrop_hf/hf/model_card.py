"""The model card of a regularized checkpoint: the AttentionDrop section, its tags, and the training curves.

The section is rendered from the top-level `model_cards/attentiondrop_card_template.md` (shipped with the package);
the variant's own `describe()` supplies its sentence. `ConsistencyMixin.create_model_card` (also used by
`push_to_hub`) lets the Trainer write its stock card, then puts the section in place of the stock card's empty
"Model description" and adds the tags `attentiondrop` and `attentiondrop-<variant>`.
"""

import os
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

from huggingface_hub import EvalResult, ModelCard

from ..config import VERSION_KEY, AttentionDropConfig
from ..variants import get_variant
from .plan import PLAN_ATTRIBUTE, attention_modules
from .switch import base_model_of

__all__ = [
    "attentiondrop_card_section",
    "attentiondrop_tags",
    "plot_training_curves",
    "training_curves_figure",
    "write_model_card",
]

ROLE_NAMES = {
    "self": "bidirectional self-attention",
    "causal": "causal self-attention",
    "cross": "encoder-decoder cross-attention",
}
CURVES_FILE = "training_curves.png"
TEMPLATE_FILE = "attentiondrop_card_template.md"
MONITOR_ENTROPY = "attentiondrop/entropy_clean"
# Log entries of an evaluation that describe the run, not the model.
_RUN_STATISTICS = ("runtime", "samples_per_second", "steps_per_second", "epoch", "step")
_STOCK_DESCRIPTION = "## Model description\n\nMore information needed\n"
_STOCK_DATA = "## Training and evaluation data\n\nMore information needed\n"
# A model built from a config has an empty `_name_or_path`, which the stock card renders as an empty link.
_STOCK_EMPTY_BASE = "This model is a fine-tuned version of [](https://huggingface.co/) on"


def attentiondrop_tags(flags: dict[str, Any] | None) -> list[str]:
    return ["attentiondrop"] + ([f"attentiondrop-{flags['variant']}"] if flags else [])


def _evaluation_metrics(entry: dict) -> dict[str, float]:
    return {
        k: v
        for k, v in entry.items()
        if k.startswith("eval_") and not k.endswith(_RUN_STATISTICS) and isinstance(v, (int, float))
    }


def training_curves_figure(log_history: list[dict]):
    """The logged loss and its task term against the step, the consistency KL on an axis of its own (it is orders
    of magnitude smaller), and each evaluation metric in a panel of its own. `None` without matplotlib or logged
    training steps."""
    try:
        from matplotlib.figure import Figure  # the object API: no global backend switch
    except ImportError:
        return None
    steps = [entry for entry in log_history if "loss" in entry and "step" in entry]
    if not steps:
        return None
    evaluations = [entry for entry in log_history if _evaluation_metrics(entry) and "step" in entry]
    names = sorted(
        {k for entry in evaluations for k in _evaluation_metrics(entry)}, key=lambda k: (k != "eval_loss", k)
    )
    monitored = int(any(MONITOR_ENTROPY in e for e in steps))
    figure = Figure(figsize=(4.2 * (1 + monitored + len(names)), 3.6))
    axes = figure.subplots(1, 1 + monitored + len(names), squeeze=False)[0]
    training = axes[0]
    x = [e["step"] for e in steps]
    for key, label in (("loss", "loss"), ("task_loss", "task loss")):
        if all(key in entry for entry in steps):
            training.plot(x, [e[key] for e in steps], label=label)
    training.set(xlabel="step", ylabel="loss", title="training (logged averages)")
    training.legend(loc="upper right")
    if all("consistency_loss" in entry for entry in steps):
        kl_axis = training.twinx()
        kl_axis.plot(x, [e["consistency_loss"] for e in steps], color="tab:red", label="consistency KL")
        kl_axis.set_ylabel("consistency KL", color="tab:red")
        kl_axis.legend(loc="upper center")
    for axis, name in zip(axes[1 + monitored :], names):
        points = [(e["step"], e[name]) for e in evaluations if name in e]
        axis.plot([p[0] for p in points], [p[1] for p in points], "o-")
        axis.set(xlabel="step", title=name[len("eval_") :])
    if monitored:
        _plot_monitor(axes[1], [e for e in steps if MONITOR_ENTROPY in e])
    figure.tight_layout()
    return figure


def _plot_monitor(axis, entries: list[dict]) -> None:
    """`AttentionDropMonitorCallback`'s means: the attention entropy without and with the perturbation, and the
    variant's own term (dropped mass, sigma) on an axis of its own."""
    x = [e["step"] for e in entries]
    for key, label in ((MONITOR_ENTROPY, "entropy, unperturbed"), ("attentiondrop/entropy_perturbed", "perturbed")):
        axis.plot(x, [e.get(key, float("nan")) for e in entries], label=label)
    axis.set(xlabel="step", ylabel="entropy (nats)", title="attention (monitor)")
    axis.legend(loc="upper right")
    for key, color in (("attentiondrop/dropped_mass", "tab:purple"), ("attentiondrop/sigma", "tab:green")):
        if any(key in e for e in entries):
            other = axis.twinx()
            other.plot(x, [e.get(key, float("nan")) for e in entries], color=color, label=key.split("/")[1])
            other.set_ylabel(key.split("/")[1], color=color)


def plot_training_curves(log_history: list[dict], path: str) -> bool:
    """Save `training_curves_figure` to `path`; False (nothing written) without matplotlib or logged steps."""
    figure = training_curves_figure(log_history)
    if figure is None:
        return False
    figure.savefig(path, dpi=110)
    return True


def _template() -> str:
    try:  # an installed wheel ships the template inside the package
        folder = resources.files("attentiondrop_hf.model_cards")
    except ModuleNotFoundError:  # an editable install of a checkout: setuptools maps no data-only sub-package
        folder = Path(__file__).resolve().parents[2] / "model_cards"
    return (folder / TEMPLATE_FILE).read_text(encoding="utf-8")


def _metrics_table(metrics: dict[str, float] | None) -> str:
    shown = _evaluation_metrics(metrics or {})
    if not shown:
        return "### Evaluation\n\nNo evaluation was run before this card was written."
    rows = "\n".join(f"| {name} | {value:.4f} |" for name, value in shown.items())
    return f"### Evaluation\n\n| metric | value |\n|---|---|\n{rows}"


def perturbed_roles(model) -> list[str]:
    """The roles AttentionDrop perturbs in `model`, read off its plan."""
    plans = [module.__dict__.get(PLAN_ATTRIBUTE) for module in attention_modules(model).values()]
    roles = {plan.site.role for plan in plans if plan is not None and plan.perturbed}
    return [role for role in ROLE_NAMES if role in roles]


def attentiondrop_card_section(
    flags: dict[str, Any] | None,
    consistency_weight: float,
    consistency_kl: str,
    roles: list[str],
    metrics: dict[str, float] | None = None,
    curves_image: str | None = None,
) -> str:
    """Markdown describing how a checkpoint was regularized.

    Args:
        flags (`dict`, *optional*): `config.attentiondrop` of the trained model (`None`: AttentionDrop was off, the
            consistency term alone regularized it, i.e. R-Drop).
        consistency_weight (`float`), consistency_kl (`str`): the trainer's consistency arguments.
        roles (`list[str]`): the attention roles that were perturbed.
        metrics (`dict`, *optional*): the last evaluation's metrics.
        curves_image (`str`, *optional*): file name of the training curves beside the card.
    """
    if flags:
        settings = AttentionDropConfig.from_dict(flags)
        description = get_variant(settings.variant).describe(settings.options)
        rows = "\n".join(f"| `{k}` | `{v}` |" for k, v in settings.to_dict().items() if k != VERSION_KEY)
        layers = "all layers" if settings.layers is None else "layers " + ", ".join(map(str, settings.layers))
        perturbed = f"{', '.join(ROLE_NAMES[r] for r in roles)}, {layers} of each stack"
    else:
        description = "none: AttentionDrop was off; only the consistency term below regularized this model."
        rows, perturbed = "| (none) | |", "none"
    if consistency_weight > 0:
        direction = {
            "forward": "KL(p1 ‖ p2) (the paper's direction)",
            "symmetric": "0.5 (KL(p1 ‖ p2) + KL(p2 ‖ p1))",
        }[consistency_kl]
        consistency = f"{consistency_weight} × {direction} between two perturbed passes of every batch."
    else:
        consistency = "off (lambda = 0: one perturbed pass per step)."
    return Template(_template()).substitute(
        variant_description=description,
        flag_rows=rows,
        consistency=consistency,
        perturbed=perturbed,
        metrics=_metrics_table(metrics),
        curves=f"\n### Training curves\n\n![Training curves]({curves_image})\n" if curves_image else "",
    )


def _first(value):
    return value[0] if isinstance(value, (list, tuple)) else value


def _complete_metadata(card: ModelCard, kwargs: dict, metrics: dict | None, output_dir: str) -> None:
    """The Hub metadata the stock card leaves out: the base model (a Hub id, not a local folder), the dataset, and
    every metric of the last evaluation in `model-index` form (the stock card keeps only the metrics it knows)."""
    data = card.data
    base_model = kwargs.get("finetuned_from")
    if base_model and not os.path.exists(base_model):
        data.base_model = base_model
    dataset, task = _first(kwargs.get("dataset")), _first(kwargs.get("tasks"))
    if dataset and not data.datasets:
        data.datasets = [dataset]
    shown = _evaluation_metrics(metrics or {})
    if not (task and shown and (dataset or data.datasets)):
        return
    dataset_type = _first(data.datasets) or dataset
    data.model_name = data.model_name or os.path.basename(os.path.normpath(output_dir))
    data.eval_results = [
        EvalResult(
            task_type=task,
            dataset_type=dataset_type,
            dataset_name=dataset or dataset_type,
            metric_type=name[len("eval_") :],
            metric_value=float(value),
            metric_name=name[len("eval_") :].replace("_", " "),
        )
        for name, value in shown.items()
    ]


def write_model_card(trainer, stock_create_model_card, flags, args: tuple, kwargs: dict) -> None:
    """Let the Trainer write its card, then add the AttentionDrop section, tags and training curves to it."""
    tags = kwargs.pop("tags", None)
    tags = [tags] if isinstance(tags, str) else list(tags or [])
    tags += [tag for tag in attentiondrop_tags(flags) if tag not in tags]
    stock_create_model_card(*args, tags=tags, **kwargs)
    if not trainer.is_world_process_zero():
        return
    output_dir = trainer.args.output_dir
    evaluations = [entry for entry in trainer.state.log_history if _evaluation_metrics(entry)]
    drawn = plot_training_curves(trainer.state.log_history, os.path.join(output_dir, CURVES_FILE))
    model = base_model_of(trainer.accelerator.unwrap_model(trainer.model))
    section = attentiondrop_card_section(
        flags,
        trainer.consistency_weight,
        trainer.consistency_kl,
        roles=perturbed_roles(model) if flags else [],
        metrics=evaluations[-1] if evaluations else None,
        curves_image=CURVES_FILE if drawn else None,
    )
    path = os.path.join(output_dir, "README.md")
    card = ModelCard.load(path)
    _complete_metadata(card, kwargs, evaluations[-1] if evaluations else None, output_dir)
    body = card.text.replace(_STOCK_EMPTY_BASE, "This model was trained from scratch on", 1)
    body = body.replace(_STOCK_DESCRIPTION, section, 1) if _STOCK_DESCRIPTION in body else f"{body}\n{section}"
    if dataset := kwargs.get("dataset"):
        dataset = dataset if isinstance(dataset, str) else ", ".join(dataset)
        body = body.replace(_STOCK_DATA, f"## Training and evaluation data\n\n{dataset}\n", 1)
    card.text = body
    card.save(path)
