"""Trainer callbacks: the strength schedule's clock, and an opt-in view of what the perturbation does.

Both work with any `Trainer` (TRL's included); `AttentionDropTrainer` installs the schedule callback itself, and
the monitor with `monitor_attention=True`. Install them in front of the reporting callbacks, so that what they add to
a log is printed and reported with it: `add_attentiondrop_callbacks(trainer, monitor=True)`.
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..ops import schedule_factor
from .plan import ModelPlan, model_plan_of
from .switch import base_model_of

if TYPE_CHECKING:
    from transformers import Trainer

__all__ = ["AttentionDropMonitorCallback", "AttentionDropScheduleCallback", "add_attentiondrop_callbacks"]


def _plan_of(model: torch.nn.Module | None) -> ModelPlan | None:
    """The AttentionDrop plan of the model being trained; none for a model it is not switched on for."""
    try:
        return model_plan_of(base_model_of(model))
    except TypeError:  # not a Transformers model
        return None


def _add_to_log(state: TrainerState, logs: dict, values: dict) -> None:
    """Into the log being written and the history the Trainer already appended it to (checkpoints, cards)."""
    logs.update(values)
    if state.log_history and state.log_history[-1].get("step") == state.global_step:
        state.log_history[-1].update(values)


class AttentionDropScheduleCallback(TrainerCallback):
    """Tells the model's flags how far training is (`global_step / max_steps`) at every step, which drives a strength
    `schedule`; a resumed run continues from its checkpoint's step. Logs the strength of the last step taken
    (`attentiondrop/strength`, and the scheduled options' values at full depth factor, e.g. `attentiondrop/p`)."""

    def _set(self, state: TrainerState, model: torch.nn.Module | None) -> None:
        if (plan := _plan_of(model)) is not None:
            plan.set_progress(state.global_step / max(state.max_steps, 1))

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        self._set(state, model)

    def on_step_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        self._set(state, model)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        model: torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        if logs is None or "loss" not in logs or (plan := _plan_of(model)) is None:
            return
        settings = plan.settings
        if settings.schedule == "constant":
            return
        # The strength of the step just taken: it began at global_step - 1.
        progress = max(state.global_step - 1, 0) / max(state.max_steps, 1)
        factor = schedule_factor(settings.schedule, settings.schedule_warmup, progress)
        variant, full = plan.variant, settings.options
        halved = vars(variant.scaled(full, 0.5))
        scaled = variant.scaled(full, factor)
        values = {"attentiondrop/strength": factor}
        values.update({f"attentiondrop/{n}": getattr(scaled, n) for n, v in vars(full).items() if halved[n] != v})
        _add_to_log(state, logs, values)


class AttentionDropMonitorCallback(TrainerCallback):
    """Every time the Trainer logs the training loss, runs the model (training mode, no gradients, the RNG state put
    back afterwards) on a fixed small batch — the first `examples` of the training set — and logs, per perturbed
    layer and averaged over layers: the attention entropy without and with the perturbation
    (`attentiondrop/entropy_clean`, `attentiondrop/entropy_perturbed`) and the variant's own terms (hard: the attention
    mass it dropped, `attentiondrop/dropped_mass`; the blurs: the mean sigma drawn, `attentiondrop/sigma`). Keys per
    layer end in the role and layer, e.g. `attentiondrop/entropy_clean/self.3`.

    The batch goes through the training set's own transforms once, at the start of training (random augmentations
    draw their numbers then). Costs one forward of `examples` examples per log; nothing between logs.
    """

    def __init__(self, examples: int = 8) -> None:
        if not isinstance(examples, int) or examples < 1:
            raise ValueError(f"`examples` must be an integer >= 1, got {examples!r}")
        self.examples = examples
        self.batch = None

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        train_dataloader: torch.utils.data.DataLoader | None = None,
        **kwargs: Any,
    ) -> None:
        dataset = getattr(train_dataloader, "dataset", None)
        if dataset is None or not hasattr(dataset, "__getitem__") or _plan_of(model) is None:
            return
        rows = [dataset[i] for i in range(min(self.examples, len(dataset)))]
        batch = train_dataloader.collate_fn(rows)
        device = next(base_model_of(model).parameters()).device
        self.batch = {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v) and k != "labels"}

    def measure(self, model: torch.nn.Module) -> dict[str, float]:
        """The log entries for one look at the fixed batch."""
        from .attention import monitor_attention

        base_model = base_model_of(model)
        was_training = base_model.training
        devices = [torch.cuda.current_device()] if next(base_model.parameters()).is_cuda else []
        with torch.random.fork_rng(devices=devices), torch.no_grad(), monitor_attention() as records:
            base_model.train()
            try:
                base_model(**self.batch)
            finally:
                base_model.train(was_training)
        values, sums = {}, defaultdict(list)
        for record in records:
            site = f"{record['role']}.{record['layer']}"
            for name, value in record.items():
                if name not in ("role", "layer"):
                    values[f"attentiondrop/{name}/{site}"] = value
                    sums[name].append(value)
        values.update({f"attentiondrop/{name}": sum(v) / len(v) for name, v in sums.items()})
        return values

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        model: torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        if logs is None or "loss" not in logs or self.batch is None or _plan_of(model) is None:
            return
        _add_to_log(state, logs, self.measure(model))


def add_attentiondrop_callbacks(trainer: Trainer, monitor: bool = False, examples: int = 8) -> None:
    """Put the schedule callback (and the monitor, when `monitor`) first among `trainer`'s callbacks, before the
    ones that print and report logs. Idempotent."""
    callbacks = trainer.callback_handler.callbacks
    wanted = [AttentionDropScheduleCallback] + ([AttentionDropMonitorCallback] if monitor else [])
    for kind in reversed(wanted):
        if not any(isinstance(c, kind) for c in callbacks):
            callbacks.insert(0, kind(examples) if kind is AttentionDropMonitorCallback else kind())
