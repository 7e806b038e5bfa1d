"""Consistency-Regularized AttentionDrop (arXiv 2504.12088, Sec. 3.3) for any `Trainer`.

`ConsistencyMixin` overrides `compute_loss`: with `consistency_weight` (lambda) > 0, each training step runs ONE
forward of the batch concatenated with itself (DDP, FSDP and DeepSpeed see one forward and one backward), so the two
halves are perturbed independently by AttentionDrop and dropout, and minimises the mean of the halves' task losses
plus lambda times the KL between their predictions. With AttentionDrop off and dropout on it is R-Drop (Liang et
al., 2021) with alpha = 2 lambda, up to an overall factor 1/2 (R-Drop sums the two cross-entropies).

- At lambda = 0, and in evaluation and prediction, it *is* the parent trainer: `compute_loss` is the parent's.
- At lambda > 0 the task loss is computed from the logits: the model's own cross-entropy (shifted for causal
  language models, `-100` left out, `label_smoothing_factor` honoured) plus its auxiliary losses (a router's
  `aux_loss` times `router_aux_loss_coef`), normalised by the label items of the whole accumulated and distributed
  batch, so gradient accumulation gives the step of one large batch. On its first step the trainer checks this loss
  against the model's own loss on the same batch and refuses to train on a mismatch: the model's loss is the
  reference that cannot drift.
- Class and token targets only: a regression or multi-label head, or logits that are not `labels.shape + (C,)`
  (semantic segmentation), have no KL between predicted class distributions here and raise at lambda > 0.

Use `AttentionDropTrainer` / `AttentionDropSeq2SeqTrainer`, or mix `ConsistencyMixin` into another trainer
(`class MyTrainer(ConsistencyMixin, SFTTrainer)`) and pass `consistency_weight=` to it.
"""

import inspect
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from transformers import (
    PreTrainedConfig,
    PreTrainedModel,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
)
from transformers.trainer_pt_utils import nested_gather
from transformers.utils import ModelOutput, logging

from ..ops import summed_consistency_terms
from ._compat import reload_weights_through_from_pretrained
from .callbacks import add_attentiondrop_callbacks
from .model_card import write_model_card
from .plan import model_plan_of
from .switch import base_model_of, check_attentiondrop

logger = logging.get_logger(__name__)

__all__ = [
    "AttentionDropArguments",
    "AttentionDropSeq2SeqTrainer",
    "AttentionDropSeq2SeqTrainingArguments",
    "AttentionDropTrainer",
    "AttentionDropTrainingArguments",
    "ConsistencyMixin",
]

IGNORE_INDEX = -100
KL_DIRECTIONS = ("forward", "symmetric")
# Relative tolerance of the first-step check against the model's own loss. Both sides start from the same float32
# logits; this side sums in float64 and Transformers' reductions sum in float32 pairwise, whose rounding stays near
# 1e-7 even over a large batch. Any auxiliary term the trainer failed to add (a router's load-balancing loss is
# >= 1e-4 of the loss) is far above it.
MODEL_LOSS_RTOL = 2e-5


def _check_consistency(weight: float, direction: str) -> None:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        raise ValueError(f"`consistency_weight` must be a finite number >= 0, got {weight!r}")
    if direction not in KL_DIRECTIONS:
        raise ValueError(f"`consistency_kl` must be 'forward' or 'symmetric', got {direction!r}")


@dataclass
class AttentionDropArguments:
    """The consistency term's and the monitor's arguments; mix into any `TrainingArguments` subclass."""

    consistency_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight lambda of the KL between two perturbed passes (>= 0). 0 = a single ordinary pass; > 0 "
            "costs about two forward/backward passes of compute and activation memory per step."
        },
    )
    consistency_kl: Literal["forward", "symmetric"] = field(
        default="forward",
        metadata={"help": "'forward' = KL(p1 || p2), the paper; 'symmetric' = R-Drop's mean of both directions."},
    )
    monitor_attention: bool = field(
        default=False,
        metadata={
            "help": "Log, with the loss, what AttentionDrop does to the attention of a fixed small batch: entropy "
            "without and with the perturbation, dropped mass or sigma, per layer (AttentionDropMonitorCallback)."
        },
    )

    def __post_init__(self) -> None:
        _check_consistency(self.consistency_weight, self.consistency_kl)
        super().__post_init__()


@dataclass
class AttentionDropTrainingArguments(AttentionDropArguments, TrainingArguments):
    """`TrainingArguments` plus `consistency_weight` and `consistency_kl`."""


@dataclass
class AttentionDropSeq2SeqTrainingArguments(AttentionDropArguments, Seq2SeqTrainingArguments):
    """`Seq2SeqTrainingArguments` plus `consistency_weight` and `consistency_kl`."""


def shifts_labels(model: PreTrainedModel) -> bool:
    """Whether the model's own loss predicts label t + 1 at position t (causal and image-text-to-text language
    models), decided from its class, whatever its name (GPT2LMHeadModel, BertLMHeadModel, Gemma 3 VLMs, ...)."""
    if getattr(model.config, "is_encoder_decoder", False):
        return False
    name = type(model).__name__
    return (
        name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
        or name in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.values()
    )


def decoder_input_ids_from_labels(model: PreTrainedModel, labels: torch.Tensor) -> torch.Tensor:
    """The decoder inputs an encoder-decoder model builds from `labels` itself: its
    `prepare_decoder_input_ids_from_labels`, else the `shift_tokens_right` its forward calls (Whisper, M2M100/NLLB,
    Speech2Text, Blenderbot, ...)."""
    if hasattr(model, "prepare_decoder_input_ids_from_labels"):
        return model.prepare_decoder_input_ids_from_labels(labels=labels)
    shift = getattr(sys.modules.get(type(model).__module__), "shift_tokens_right", None)
    config = model.config
    if shift is None or config.decoder_start_token_id is None:
        raise ValueError(
            f"cannot build decoder_input_ids from labels for {type(model).__name__}; put `decoder_input_ids` in the "
            "batch (DataCollatorForSeq2Seq(tokenizer, model=model) does)"
        )
    return shift(labels, config.pad_token_id, config.decoder_start_token_id)


class ConsistencyMixin:
    """`compute_loss` with the doubled pass, the logging of its two terms, and AttentionDrop's callbacks (the
    strength schedule's; the monitor when asked). Put it before the trainer class:
    `class MyTrainer(ConsistencyMixin, Trainer)`.

    Args:
        consistency_weight (`float`, *optional*), consistency_kl (`str`, *optional*), monitor_attention (`bool`,
            *optional*): the `AttentionDropArguments`, for trainers whose arguments class does not have them (e.g.
            TRL's configs).
    """

    def __init__(
        self,
        *args: Any,
        consistency_weight: float | None = None,
        consistency_kl: str | None = None,
        monitor_attention: bool | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if isinstance(self.args, AttentionDropArguments):
            if consistency_weight is not None or consistency_kl is not None or monitor_attention is not None:
                raise ValueError(
                    "consistency_weight / consistency_kl / monitor_attention are set in the training arguments already"
                )
            consistency_weight, consistency_kl = self.args.consistency_weight, self.args.consistency_kl
            monitor_attention = self.args.monitor_attention
        elif consistency_weight is None:
            raise TypeError(
                f"{type(self).__name__} needs AttentionDropTrainingArguments / AttentionDropSeq2SeqTrainingArguments "
                f"(got {type(self.args).__name__}), or consistency_weight=... passed to the trainer"
            )
        consistency_kl = consistency_kl or "forward"
        monitor_attention = bool(monitor_attention)
        _check_consistency(consistency_weight, consistency_kl)
        self.consistency_weight, self.consistency_kl = float(consistency_weight), consistency_kl

        model = self._transformers_model()
        if model is None and self.consistency_weight > 0:
            raise ValueError(
                f"consistency_weight > 0 needs a transformers PreTrainedModel, got {type(self.model).__name__}"
            )
        # Never a silent no-op: raises on flags that perturb nothing.
        self._attentiondrop_on = model is not None and check_attentiondrop(model)
        forward = inspect.signature(model.forward).parameters if model is not None else {}
        self._forward_kwargs = {"use_cache": False} if "use_cache" in forward else {}
        self._shifts_labels = model is not None and shifts_labels(model)
        self._checked_against_model_loss = False
        if self.consistency_weight > 0:
            self._warn_about_the_copies(model)
        add_attentiondrop_callbacks(self, monitor=bool(monitor_attention))
        self.consistency_terms = ConsistencyTermsCallback()
        self.callback_handler.callbacks.insert(0, self.consistency_terms)  # before the callbacks that print logs
        if self._attentiondrop_on and self.args.torch_compile and _varies_strength(model):
            logger.warning(
                "a strength schedule or depth rule changes AttentionDrop's options between steps or layers: "
                "torch.compile traces them as constants and recompiles when they change"
            )

    def _transformers_model(self) -> PreTrainedModel | None:
        """The Transformers model being trained (inside PEFT / DDP / compile wrappers), or `None` for another
        `nn.Module`, which the stock Trainer also trains (AttentionDrop then plays no part)."""
        try:
            return base_model_of(self.accelerator.unwrap_model(self.model))
        except TypeError:
            return None

    def _warn_about_the_copies(self, model: PreTrainedModel) -> None:
        if not self._attentiondrop_on:
            logger.warning(
                "consistency_weight > 0 but AttentionDrop is not enabled on the model: the two passes differ only "
                "through dropout (R-Drop)."
            )
            return
        plan = model_plan_of(model)
        if caveat := plan.variant.consistency_caveat(plan.settings.options):
            logger.warning(caveat)

    # ---- the loss ------------------------------------------------------------------------------------------------

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        if not model.training or self.consistency_weight == 0:
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        labels = inputs.get("labels")
        if labels is None or not torch.is_tensor(labels) or labels.is_floating_point():
            raise ValueError(
                "consistency_weight > 0 needs integer class or token labels under `labels`; regression and "
                "multi-label targets have no KL between predicted class distributions here"
            )
        unwrapped = base_model_of(self.accelerator.unwrap_model(model))
        prepared = self._model_inputs(unwrapped, inputs, labels)
        if not self._checked_against_model_loss:
            self._check_against_model_loss(model, inputs, prepared, labels)
            self._checked_against_model_loss = True

        batch = labels.shape[0]
        if unpaired := [f"{k} {tuple(v.shape)}" for k, v in prepared.items() if _is_unpaired(v, batch)]:
            raise ValueError(
                f"consistency_weight > 0 doubles the batch, but {unpaired} have no row per example (flattened image "
                f"patches?) for a batch of {batch}, so their rows cannot be paired with the doubled examples; train "
                "this model with consistency_weight=0"
            )
        doubled = {k: torch.cat([v, v]) if _is_batched(v, batch) else v for k, v in prepared.items()}
        outputs = model(**doubled, **self._forward_kwargs)
        logits, target = self._aligned(_logits_of(outputs), labels)
        if num_items_in_batch is None:
            items = target.ne(IGNORE_INDEX).sum()
        else:
            items = num_items_in_batch.to(logits.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch
        first, second = logits.split(batch)
        task, kl = summed_consistency_terms(
            first, second, target, self.args.label_smoothing_factor, self.consistency_kl
        )
        terms = {
            "task_loss": task / items + _auxiliary_loss(outputs, unwrapped.config),
            "consistency_loss": kl / items,
        }
        loss = terms["task_loss"] + self.consistency_weight * terms["consistency_loss"]

        # Normalised over the accumulated batch when it was counted; else a per-batch mean the Trainer divides.
        self.loss_is_scaled_for_ga = num_items_in_batch is not None
        scale = self._process_scale() if self.loss_is_scaled_for_ga else 1
        log_scale = (
            scale if self.loss_is_scaled_for_ga else 1 / getattr(self, "current_gradient_accumulation_steps", 1)
        )
        for name, value in terms.items():
            self.consistency_terms.add(name, value.detach() * log_scale)
        loss = loss * scale
        return (loss, outputs) if return_outputs else loss

    def _model_inputs(
        self, model: PreTrainedModel, inputs: dict[str, torch.Tensor | Any], labels: torch.Tensor
    ) -> dict:
        """The batch as the model's forward takes it without labels (seq2seq: with the decoder inputs it builds)."""
        prepared = {k: v for k, v in inputs.items() if k != "labels"}
        # Token labels of a sequence-to-sequence LM: it builds its decoder inputs from them. Class labels of an
        # encoder-decoder classifier (BART's): it builds them from its inputs itself.
        wants_decoder_inputs = getattr(model.config, "is_encoder_decoder", False) and labels.dim() > 1
        if wants_decoder_inputs and "decoder_input_ids" not in prepared and "decoder_inputs_embeds" not in prepared:
            prepared["decoder_input_ids"] = decoder_input_ids_from_labels(model, labels)
        return prepared

    def _aligned(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and targets item by item: shifted for a causal LM; refused where the KL does not apply."""
        if self._shifts_labels:
            logits, labels = logits[..., :-1, :], labels[..., 1:]
        if logits.dim() != labels.dim() + 1 or logits.shape[1:-1] != labels.shape[1:] or logits.shape[-1] < 2:
            raise ValueError(
                f"consistency_weight > 0 needs logits of shape labels.shape + (num_classes,) with num_classes >= 2; "
                f"got logits {tuple(logits.shape)} for labels {tuple(labels.shape)} (regression, multi-label and "
                "dense heads such as semantic segmentation are not supported with consistency_weight > 0)"
            )
        return logits, labels

    def _check_against_model_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        prepared: dict[str, torch.Tensor | Any],
        labels: torch.Tensor,
    ) -> None:
        """First step only: the loss this trainer computes (with lambda's term left out and no label smoothing)
        must equal the model's own loss on the same batch, in eval mode (no perturbation, no dropout), to float32
        rounding, so that a missing auxiliary term cannot pass."""
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                reference = model(**inputs, **self._forward_kwargs)
                outputs = model(**prepared, **self._forward_kwargs)
        finally:
            model.train(was_training)
        own = reference.get("loss") if isinstance(reference, dict) else reference[0]
        if own is None:
            raise ValueError(
                f"consistency_weight > 0 needs a model that computes its own loss from `labels`; "
                f"{type(base_model_of(self.accelerator.unwrap_model(model))).__name__} returned none"
            )
        logits, target = self._aligned(_logits_of(outputs), labels)
        config = base_model_of(self.accelerator.unwrap_model(model)).config
        # float64: this side adds no rounding of its own.
        cross_entropy = F.cross_entropy(
            logits.double().flatten(0, -2), target.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        ours = cross_entropy / target.ne(IGNORE_INDEX).sum() + _auxiliary_loss(outputs, config)
        own = own.double().mean()
        if not torch.isclose(ours, own, rtol=MODEL_LOSS_RTOL, atol=1e-7):
            raise ValueError(
                f"the consistency trainer's loss ({ours.item():.8f}) differs from the model's own loss "
                f"({own.item():.8f}) on the same batch: the model computes its loss in a way this trainer does not "
                "reproduce (label shift, extra terms), so consistency_weight > 0 would train another objective. "
                "Train it with consistency_weight=0."
            )

    def get_batch_samples(
        self, epoch_iterator: Iterator, num_batches: int, device: torch.device
    ) -> tuple[list, torch.Tensor | int | None]:
        """The Trainer's batches; at lambda > 0, counted on the labels this trainer's loss uses (shifted for causal
        language models, whatever their class name)."""
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.consistency_weight == 0 or not batch_samples or "labels" not in batch_samples[0]:
            return batch_samples, num_items_in_batch
        labels = [b["labels"][..., 1:] if self._shifts_labels else b["labels"] for b in batch_samples]
        if not all(torch.is_tensor(t) for t in labels):
            return batch_samples, None
        count = sum(t.ne(IGNORE_INDEX).sum() for t in labels).to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            count = self.accelerator.gather(count).sum()
        return batch_samples, count

    def _process_scale(self) -> int:
        """Each process normalises by the items of all processes and DDP averages their gradients: multiply back
        by their number. DataParallel (`n_gpu > 1`) gathers the outputs and this loss is computed once: no scale."""
        if self.args.n_gpu > 1 or not (self.args.average_tokens_across_devices and self.args.world_size > 1):
            return 1
        return self.accelerator.num_processes

    # ---- logging, cards, checkpoints -------------------------------------------------------------------------------

    def create_model_card(
        self,
        language: str | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
    ) -> None:
        """The Trainer's `create_model_card` (also called by `push_to_hub`), with the card of a regularized
        checkpoint: how it was regularized, its data, hyperparameters, evaluation and training curves."""
        arguments = {
            "language": language,
            "license": license,
            "tags": tags,
            "model_name": model_name,
            "finetuned_from": finetuned_from,
            "tasks": tasks,
            "dataset_tags": dataset_tags,
            "dataset": dataset,
            "dataset_args": dataset_args,
        }
        model = self._transformers_model()
        flags = None if model is None else model.config.attentiondrop
        if flags is None and self.consistency_weight == 0:
            return super().create_model_card(**arguments)
        if not self.is_world_process_zero():
            return
        write_model_card(self, flags, arguments)
        unwrapped = self.accelerator.unwrap_model(self.model)
        if hasattr(unwrapped, "create_or_update_model_card"):  # a PEFT model adds its adapter's part
            unwrapped.create_or_update_model_card(self.args.output_dir)

    # Private Trainer methods, overridden only for huggingface/transformers#43701 (`_compat`); their signatures are
    # checked against the Transformers release by tests/test_trainer.py::test_the_private_trainer_methods_we_override.
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        model = self.model if model is None else model
        sharded = self.is_fsdp_enabled or self.is_deepspeed_enabled
        if not reload_weights_through_from_pretrained(model, resume_from_checkpoint, sharded):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        sharded = self.is_fsdp_enabled or self.is_deepspeed_enabled
        if not reload_weights_through_from_pretrained(self.model, self.state.best_model_checkpoint, sharded):
            super()._load_best_model()


class ConsistencyTermsCallback(TrainerCallback):
    """Logs the task and consistency terms beside `loss` (`task_loss`, `consistency_loss`), averaged like the Trainer
    averages `loss`: over the optimizer steps since the last log, and over processes. Put first among the callbacks
    so that the printing and reporting callbacks see the terms."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self._last_logged_step = 0
        self._said_kl_is_small = False

    def add(self, name: str, value: torch.Tensor) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + value

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._last_logged_step = state.global_step  # a resumed run counts from its checkpoint, as the Trainer does

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if logs is None or "loss" not in logs or not self.sums:
            return
        window = max(state.global_step - self._last_logged_step, 1)
        self._last_logged_step = state.global_step
        values = {}
        for name, total in self.sums.items():
            total = torch.as_tensor(total, device=args.device)
            values[name] = nested_gather(total, args.parallel_mode).mean().item() / window
        self.sums = {}
        # A KL is >= 0; float32 rounding of two equal distributions can leave -1e-9.
        if "consistency_loss" in values:
            values["consistency_loss"] = max(values["consistency_loss"], 0.0)
            self._explain_a_small_kl(values["consistency_loss"])
        logs.update(values)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)  # the history the Trainer already appended this log to

    def _explain_a_small_kl(self, kl: float) -> None:
        if kl < 1e-6 and not self._said_kl_is_small:
            self._said_kl_is_small = True
            logger.warning(
                f"consistency_loss is {kl:.1e}: the two perturbed passes barely differ yet. On a freshly initialised "
                "model attention logits are near zero, so replacing some by 0 (hard masking) or blurring them changes "
                "little; the KL grows as attention sharpens during training."
            )


def _varies_strength(model: PreTrainedModel) -> bool:
    return model_plan_of(model).settings.varies_strength


def _logits_of(outputs: ModelOutput | tuple[Any, ...]) -> torch.Tensor:
    # Without labels, a tuple output (return_dict=False) starts with the logits.
    return outputs["logits"] if isinstance(outputs, dict) else outputs[0]


def _auxiliary_loss(outputs: ModelOutput | tuple[Any, ...], config: PreTrainedConfig) -> torch.Tensor | float:
    """The auxiliary terms a model adds to its own loss: a mixture-of-experts router's load-balancing loss."""
    aux = outputs.get("aux_loss") if isinstance(outputs, dict) else None
    # Mixtral-style routers name the coefficient `router_aux_loss_coef`, JetMoE `aux_loss_coef`.
    coefficient = getattr(config, "router_aux_loss_coef", None) or getattr(config, "aux_loss_coef", None)
    if aux is None or not coefficient:
        return 0.0
    return coefficient * aux.float().mean()  # mean: DataParallel gathers one per device


def _is_batched(value: Any, batch: int) -> bool:
    return torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == batch


def _is_unpaired(value: Any, batch: int) -> bool:
    return torch.is_tensor(value) and value.dim() > 0 and value.shape[0] != batch


class AttentionDropTrainer(ConsistencyMixin, Trainer):
    """`Trainer` with Consistency-Regularized AttentionDrop; pass `AttentionDropTrainingArguments`."""


class AttentionDropSeq2SeqTrainer(ConsistencyMixin, Seq2SeqTrainer):
    """`Seq2SeqTrainer` with Consistency-Regularized AttentionDrop; pass `AttentionDropSeq2SeqTrainingArguments`."""
