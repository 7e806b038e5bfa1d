"""The model card of a regularized checkpoint: rendered from one template, from read-only data.

`ConsistencyMixin.create_model_card` (also called by `push_to_hub`) gathers what the Trainer knows about the run
(`transformers.modelcard.TrainingSummary`: metadata, hyperparameters, the evaluations during training), the flags in
`config.attentiondrop` and the model's AttentionDrop plan (which roles were perturbed), and fills the template
`model_card_template.md` shipped beside this module. Nothing of the stock card's text is edited, and nothing is
written to the model. The variant's own `describe()` supplies its sentence; the tags are `attentiondrop` and
`attentiondrop-<variant>`.
"""

from __future__ import annotations

import os
from importlib import resources
from string import Template
from typing import TYPE_CHECKING, Any

import yaml
from huggingface_hub import EvalResult, ModelCard
from transformers.modelcard import TrainingSummary, make_markdown_table

from ..config import VERSION_KEY, AttentionDropConfig
from ..variants import get_variant
from ..version import __version__
from .plan import PLAN_ATTRIBUTE, attention_modules
from .switch import base_model_of

if TYPE_CHECKING:
    import torch
    from matplotlib.figure import Figure
    from transformers import Trainer

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
TEMPLATE_FILE = "model_card_template.md"
MONITOR_PREFIX = "attentiondrop/"
ENTROPIES = ("attentiondrop/entropy_clean", "attentiondrop/entropy_perturbed")
# Log entries of an evaluation that describe the run, not the model.
_RUN_STATISTICS = ("runtime", "samples_per_second", "steps_per_second", "epoch", "step")


def attentiondrop_tags(flags: dict[str, Any] | None) -> list[str]:
    return ["attentiondrop"] + ([f"attentiondrop-{flags['variant']}"] if flags else [])


def _evaluation_metrics(entry: dict) -> dict[str, float]:
    return {
        k: v
        for k, v in entry.items()
        if k.startswith("eval_") and not k.endswith(_RUN_STATISTICS) and isinstance(v, (int, float))
    }


def _monitored_terms(steps: list[dict]) -> list[str]:
    """Every logged `attentiondrop/<term>` average (per-layer keys, `attentiondrop/<term>/<role>.<layer>`, left
    out), the entropies first: the monitor's and the schedule's terms, a user variant's included."""
    terms = {k for entry in steps for k in entry if k.startswith(MONITOR_PREFIX) and k.count("/") == 1}
    return [t for t in ENTROPIES if t in terms] + sorted(terms - set(ENTROPIES))


def _distinct_metrics(evaluations: list[dict]) -> list[list[str]]:
    """The evaluation metrics grouped by their curve: metrics whose values are equal at every evaluation (the loss
    and the NLL of a classifier trained without label smoothing) share one panel."""
    names = sorted(
        {k for entry in evaluations for k in _evaluation_metrics(entry)}, key=lambda k: (k != "eval_loss", k)
    )
    groups: list[list[str]] = []
    for name in names:
        values = [entry.get(name) for entry in evaluations]
        same = next((g for g in groups if [entry.get(g[0]) for entry in evaluations] == values), None)
        (same.append(name) if same is not None else groups.append([name]))
    return groups


def training_curves_figure(log_history: list[dict]) -> Figure | None:
    """The logged loss and its task term against the step, the consistency KL on an axis of its own (it is orders
    of magnitude smaller), the monitor's attention entropies, every other logged `attentiondrop/*` term, and each
    evaluation metric, each in a panel of its own. `None` without matplotlib or logged training steps."""
    try:
        from matplotlib.figure import Figure  # the object API: no global backend switch
    except ImportError:
        return None
    steps = [entry for entry in log_history if "loss" in entry and "step" in entry]
    if not steps:
        return None
    evaluations = [entry for entry in log_history if _evaluation_metrics(entry) and "step" in entry]
    metric_groups = _distinct_metrics(evaluations)
    terms = _monitored_terms(steps)
    entropies = [t for t in terms if t in ENTROPIES]
    others = [t for t in terms if t not in ENTROPIES]
    panels = 1 + bool(entropies) + len(others) + len(metric_groups)
    figure = Figure(figsize=(4.2 * panels, 3.8))
    axes = iter(figure.subplots(1, panels, squeeze=False)[0])

    training, x = next(axes), [e["step"] for e in steps]
    lines = []
    for key, label in (("loss", "loss"), ("task_loss", "task loss")):
        if all(key in entry for entry in steps):
            lines += training.plot(x, [e[key] for e in steps], label=label)
    training.set(xlabel="step", ylabel="loss", title="training (logged averages)")
    if all("consistency_loss" in entry for entry in steps):
        kl_axis = training.twinx()
        lines += kl_axis.plot(x, [e["consistency_loss"] for e in steps], color="tab:red", label="consistency KL")
        kl_axis.set_ylabel("consistency KL", color="tab:red")
    # One legend for both axes, below the curves: two legends of twin axes overlap.
    training.legend(
        lines, [line.get_label() for line in lines], loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=3
    )

    if entropies:
        axis = next(axes)
        for key, label in zip(ENTROPIES, ("unperturbed", "perturbed")):
            if key in entropies:
                axis.plot(*_series(steps, key), label=label)
        axis.set(xlabel="step", ylabel="entropy (nats)", title="attention entropy (monitor)")
        axis.legend(loc="best")
    for key in others:
        axis = next(axes)
        axis.plot(*_series(steps, key), color="tab:green")
        axis.set(xlabel="step", ylabel=key[len(MONITOR_PREFIX) :], title=key)
    for group in metric_groups:
        axis = next(axes)
        axis.plot(*_series(evaluations, group[0]), "o-")
        label = " = ".join(name[len("eval_") :] for name in group)
        axis.set(xlabel="step", ylabel=label, title=f"evaluation: {label}")
    figure.tight_layout()
    return figure


def _series(entries: list[dict], key: str) -> tuple[list, list]:
    points = [(e["step"], e[key]) for e in entries if key in e]
    return [p[0] for p in points], [p[1] for p in points]


def plot_training_curves(log_history: list[dict], path: str) -> bool:
    """Save `training_curves_figure` to `path`; False (nothing written) without matplotlib or logged steps."""
    figure = training_curves_figure(log_history)
    if figure is None:
        return False
    figure.savefig(path, dpi=110, bbox_inches="tight")
    return True


def _template() -> Template:
    return Template((resources.files(__package__) / TEMPLATE_FILE).read_text(encoding="utf-8"))


def perturbed_roles(model: torch.nn.Module) -> list[str]:
    """The roles AttentionDrop perturbs in `model`, read off its plan."""
    plans = [module.__dict__.get(PLAN_ATTRIBUTE) for module in attention_modules(model).values()]
    roles = {plan.site.role for plan in plans if plan is not None and plan.perturbed}
    return [role for role in ROLE_NAMES if role in roles]


def attentiondrop_card_section(
    flags: dict[str, Any] | None, consistency_weight: float, consistency_kl: str, roles: list[str]
) -> dict[str, str]:
    """The template's AttentionDrop fields: the variant's sentence, the flag rows, the consistency term and the
    perturbed attention.

    Args:
        flags (`dict`, *optional*): `config.attentiondrop` of the trained model (`None`: AttentionDrop was off, the
            consistency term alone regularized it, i.e. R-Drop).
        consistency_weight (`float`), consistency_kl (`str`): the trainer's consistency arguments.
        roles (`list[str]`): the attention roles that were perturbed.
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
    return {"variant_description": description, "flag_rows": rows, "consistency": consistency, "perturbed": perturbed}


def _origin(summary: TrainingSummary) -> str:
    datasets = [summary.dataset] if isinstance(summary.dataset, str) else list(summary.dataset or [])
    on = " and ".join(f"the {d} dataset" for d in datasets) or "an unspecified dataset"
    base = summary.finetuned_from
    if not base:
        return f"This model was trained from scratch on {on}."
    if os.path.exists(base):  # a local folder is no Hub link
        return f"This model was fine-tuned from the local checkpoint `{base}` on {on}."
    return f"This model is a fine-tuned version of [{base}](https://huggingface.co/{base}) on {on}."


def _metrics_section(trainer: Trainer, metrics: dict[str, float] | None) -> str:
    shown = _evaluation_metrics(metrics or {})
    if not shown:
        return "No evaluation was run before this card was written."
    rows = "\n".join(f"| {name} | {value:.4f} |" for name, value in shown.items())
    args = trainer.args
    if args.load_best_model_at_end and trainer.state.best_model_checkpoint:
        source = (
            f"The last evaluation of the run; the checkpoint is the best one by `{args.metric_for_best_model}` "
            f"({os.path.basename(trainer.state.best_model_checkpoint)}), loaded at the end of training."
        )
    else:
        source = "The last evaluation of the run, on the checkpoint at the end of training."
    return f"{source}\n\n| metric | value |\n|---|---|\n{rows}\n"


def _versions() -> str:
    import torch
    import transformers

    lines = [f"- attentiondrop_hf {__version__}", f"- Transformers {transformers.__version__}"]
    lines.append(f"- PyTorch {torch.__version__}")
    try:
        import datasets

        lines.append(f"- Datasets {datasets.__version__}")
    except ImportError:
        pass
    return "\n".join(lines)


def _metadata(summary: TrainingSummary, kwargs: dict, metrics: dict | None, output_dir: str) -> dict:
    """The Hub metadata: the Trainer's (license, tags, datasets), the base model (a Hub id, not a local folder), and
    every metric of the last evaluation in `model-index` form (the Trainer's keeps only the metrics it knows)."""
    card = ModelCard(f"---\n{yaml.dump(summary.create_metadata(), sort_keys=False)}---\n")
    data = card.data
    base_model = kwargs.get("finetuned_from")
    if base_model and not os.path.exists(base_model):
        data.base_model = base_model
    dataset, task = _first(kwargs.get("dataset")), _first(kwargs.get("tasks"))
    if dataset and not data.datasets:
        data.datasets = [dataset]
    data.library_name = data.library_name or "transformers"
    shown = _evaluation_metrics(metrics or {})
    if task and shown and (dataset or data.datasets):
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
    return data


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, (list, tuple)) else value


def write_model_card(trainer: Trainer, flags: dict | None, kwargs: dict) -> None:
    """Write `README.md` (and `training_curves.png`) into the trainer's output folder.

    Args:
        trainer (`Trainer` with `ConsistencyMixin`): the run.
        flags (`dict`, *optional*): `config.attentiondrop` of the trained model.
        kwargs (`dict`): the arguments of `Trainer.create_model_card` (language, license, tags, model_name,
            finetuned_from, tasks, dataset_tags, dataset, dataset_args).
    """
    tags = kwargs.get("tags")
    tags = [tags] if isinstance(tags, str) else list(tags or [])
    kwargs = {**kwargs, "tags": tags + [tag for tag in attentiondrop_tags(flags) if tag not in tags]}
    summary = TrainingSummary.from_trainer(trainer, **kwargs)
    output_dir = trainer.args.output_dir
    history = trainer.state.log_history
    evaluations = [entry for entry in history if _evaluation_metrics(entry)]
    last = evaluations[-1] if evaluations else None
    drawn = plot_training_curves(history, os.path.join(output_dir, CURVES_FILE))
    model = base_model_of(trainer.accelerator.unwrap_model(trainer.model))
    roles = perturbed_roles(model) if flags else []
    section = attentiondrop_card_section(flags, trainer.consistency_weight, trainer.consistency_kl, roles)
    hyperparameters = summary.hyperparameters or {}
    body = _template().substitute(
        model_name=summary.model_name,
        origin=_origin(summary),
        data=", ".join([kwargs["dataset"]] if isinstance(kwargs.get("dataset"), str) else kwargs.get("dataset") or [])
        or "Not given to the trainer (`create_model_card(dataset=...)`).",
        hyperparameters="\n".join(f"- {name}: {value}" for name, value in hyperparameters.items()) or "Not recorded.",
        metrics=_metrics_section(trainer, last),
        curves=f"\n![Training curves]({CURVES_FILE})\n" if drawn else "",
        results=f"\n#### During training\n\n{make_markdown_table(summary.eval_lines)}\n" if summary.eval_lines else "",
        versions=_versions(),
        **section,
    )
    data = _metadata(summary, kwargs, last, output_dir)
    ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}").save(os.path.join(output_dir, "README.md"))
