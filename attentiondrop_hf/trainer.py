"""Consistency-Regularized AttentionDrop (arXiv 2504.12088, Sec. 3.3) as `Trainer` / `Seq2SeqTrainer` subclasses.

With `consistency_weight` (lambda) > 0, each training step runs ONE forward of the batch concatenated with itself
(DDP, FSDP and DeepSpeed see one forward and one backward), so the two halves are perturbed independently by
AttentionDrop and dropout, and minimises the mean of the halves' cross-entropies plus lambda times the KL between
their predictions. With lambda = 0 it is a single ordinary pass. With AttentionDrop off and dropout on it is R-Drop
(Liang et al., 2021) with alpha = 2 lambda, up to an overall factor 1/2 (R-Drop sums the two cross-entropies).

The loss is computed from the logits (labels are never handed to the model, doubled or not) and normalised by the
number of label items in the whole accumulated batch (`num_items_in_batch`), so gradient accumulation gives the
same step as one large batch for every model, Marian included (its own loss ignores `num_items_in_batch`).
Evaluation and prediction run a single pass on the original batch.
"""

import inspect
import math
import os
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import PreTrainedModel, Seq2SeqTrainer, Seq2SeqTrainingArguments, Trainer, TrainingArguments
from transformers.trainer_pt_utils import nested_gather
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, logging

from .integration import ATTN_IMPLEMENTATION
from .model import check_supported
from .model_card import attentiondrop_card_section, attentiondrop_tags, plot_training_curves
from .ops import summed_cross_entropy, summed_kl

logger = logging.get_logger(__name__)

__all__ = [
    "AttentionDropSeq2SeqTrainer",
    "AttentionDropSeq2SeqTrainingArguments",
    "AttentionDropTrainer",
    "AttentionDropTrainingArguments",
]

IGNORE_INDEX = -100


@dataclass
class ConsistencyArguments:
    """The consistency term's arguments, shared by both TrainingArguments subclasses."""

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

    def __post_init__(self):
        weight = self.consistency_weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise ValueError(f"`consistency_weight` must be a finite number >= 0, got {weight!r}")
        if self.consistency_kl not in ("forward", "symmetric"):
            raise ValueError(f"`consistency_kl` must be 'forward' or 'symmetric', got {self.consistency_kl!r}")
        super().__post_init__()


@dataclass
class AttentionDropTrainingArguments(ConsistencyArguments, TrainingArguments):
    """`TrainingArguments` plus `consistency_weight` and `consistency_kl`."""


@dataclass
class AttentionDropSeq2SeqTrainingArguments(ConsistencyArguments, Seq2SeqTrainingArguments):
    """`Seq2SeqTrainingArguments` plus `consistency_weight` and `consistency_kl`."""


def _is_class_or_token_target(labels, logits) -> bool:
    return not labels.is_floating_point() and logits.dim() == labels.dim() + 1


class _ConsistencyLossMixin:
    """`compute_loss` with the doubled pass, and the logging of its two terms."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, ConsistencyArguments):
            raise TypeError(
                f"{type(self).__name__} needs AttentionDropTrainingArguments / AttentionDropSeq2SeqTrainingArguments, "
                f"got {type(self.args).__name__}"
            )
        # Make the Trainer count the label items of each accumulated batch: compute_loss normalises by them.
        self.model_accepts_loss_kwargs = True
        forward = inspect.signature(self.accelerator.unwrap_model(self.model).forward).parameters
        self._forward_kwargs = {"use_cache": False} if "use_cache" in forward else {}
        self._term_sums: dict[str, torch.Tensor] = {}
        self._log_window = 1
        unwrapped = self.accelerator.unwrap_model(self.model)
        if getattr(unwrapped.config, "_attn_implementation", None) == ATTN_IMPLEMENTATION:
            check_supported(unwrapped)  # loaded with attn_implementation="attentiondrop": never a silent no-op
        self._warn_if_nothing_perturbs()

    def _warn_if_nothing_perturbs(self):
        if self.args.consistency_weight == 0:
            return
        flags = getattr(self.model.config, "attentiondrop", None)
        if flags and flags.get("variant") == "blur" and flags.get("blur_sigma_per") == "batch":
            logger.warning(
                "blur_sigma_per='batch' blurs both copies of the consistency pass identically; only dropout makes "
                "them differ. Use blur_sigma_per='example'."
            )
        if getattr(self.model.config, "_attn_implementation", None) != "attentiondrop":
            logger.warning(
                "consistency_weight > 0 but AttentionDrop is not enabled on the model: the two passes differ only "
                "through dropout (R-Drop)."
            )

    def _num_processes_scale(self, num_items_in_batch) -> int:
        """The Trainer's multi-device rescale: a loss normalised by the item count of every device is multiplied
        back by the number of devices that average their gradients."""
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            return self.accelerator.num_processes // self.get_tp_size() if self.args.n_gpu <= 1 else self.args.n_gpu
        return 1

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.get("labels")
        weight = self.args.consistency_weight if model.training else 0.0
        if labels is None or labels.is_floating_point():
            if weight > 0:
                raise ValueError(
                    "consistency_weight > 0 needs integer class or token labels under `labels`; "
                    "regression and multi-label targets have no KL between predicted distributions here"
                )
            self.loss_is_scaled_for_ga = None  # the Trainer's own rule
            return super().compute_loss(model, inputs, return_outputs=return_outputs)

        inputs = {k: v for k, v in inputs.items() if k != "labels"}
        unwrapped = self.accelerator.unwrap_model(model)
        if "decoder_input_ids" not in inputs and hasattr(unwrapped, "prepare_decoder_input_ids_from_labels"):
            inputs["decoder_input_ids"] = unwrapped.prepare_decoder_input_ids_from_labels(labels=labels)
        batch = labels.shape[0]
        copies = 2 if weight > 0 else 1
        if copies == 2:  # one forward of [batch; batch]: the halves are perturbed independently
            inputs = {k: torch.cat([v, v]) if _is_batched(v, batch) else v for k, v in inputs.items()}
        outputs = model(**inputs, **self._forward_kwargs)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        if not _is_class_or_token_target(labels, logits):
            raise ValueError(f"labels of shape {tuple(labels.shape)} do not match logits {tuple(logits.shape)}")
        if getattr(self, "_loss_shifts_labels", False):  # causal LM: position t predicts token t + 1
            logits, labels = logits[..., :-1, :], labels[..., 1:]

        items = num_items_in_batch if num_items_in_batch is not None else labels.ne(IGNORE_INDEX).sum()
        items = items.to(logits.device) if torch.is_tensor(items) else items
        halves = logits.split(batch)
        smoothing = self.args.label_smoothing_factor
        terms = {"task_loss": sum(summed_cross_entropy(h, labels, smoothing) for h in halves) / (copies * items)}
        loss = terms["task_loss"]
        if copies == 2:
            terms["consistency_loss"] = summed_kl(halves[0], halves[1], labels, self.args.consistency_kl) / items
            loss = loss + weight * terms["consistency_loss"]

        scale = self._num_processes_scale(num_items_in_batch)
        # Normalised over the accumulated batch when the Trainer counted it; else a per-batch mean it divides.
        self.loss_is_scaled_for_ga = num_items_in_batch is not None
        if model.training:
            accumulation = getattr(self, "current_gradient_accumulation_steps", 1)  # set inside train() only
            log_scale = scale if self.loss_is_scaled_for_ga else 1 / accumulation
            for name, value in terms.items():
                self._term_sums[name] = self._term_sums.get(name, 0.0) + value.detach() * log_scale
        loss = loss * scale
        return (loss, outputs) if return_outputs else loss

    def create_model_card(self, *args, tags=None, **kwargs) -> None:
        """The Trainer's card (also written by `push_to_hub`), with an AttentionDrop section and tags."""
        flags = getattr(self.accelerator.unwrap_model(self.model).config, "attentiondrop", None)
        if flags is None:
            return super().create_model_card(*args, tags=tags, **kwargs)
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        tags += [tag for tag in attentiondrop_tags(flags) if tag not in tags]
        super().create_model_card(*args, tags=tags, **kwargs)
        if not self.is_world_process_zero():
            return
        evaluations = [entry for entry in self.state.log_history if any(k.startswith("eval_") for k in entry)]
        curves = "training_curves.png"
        drawn = plot_training_curves(self.state.log_history, os.path.join(self.args.output_dir, curves))
        section = attentiondrop_card_section(
            flags,
            self.args.consistency_weight,
            self.args.consistency_kl,
            metrics=evaluations[-1] if evaluations else None,
            curves_image=curves if drawn else None,
        )
        path = os.path.join(self.args.output_dir, "README.md")
        with open(path, encoding="utf-8") as handle:
            card = handle.read()
        # A model built from a config has an empty `_name_or_path`, which the stock card renders as an empty link.
        empty_link = "This model is a fine-tuned version of [](https://huggingface.co/) on"
        card = card.replace(empty_link, "This model was trained from scratch on", 1)
        placeholder = "## Model description\n\nMore information needed\n"
        card = card.replace(placeholder, section, 1) if placeholder in card else f"{card}\n{section}"
        if dataset := kwargs.get("dataset"):
            dataset = dataset if isinstance(dataset, str) else ", ".join(dataset)
            data = f"## Training and evaluation data\n\n{dataset}\n"
            card = card.replace("## Training and evaluation data\n\nMore information needed\n", data, 1)
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(card)

    def _reloads_with_from_pretrained(self, model, checkpoint) -> bool:
        return (
            isinstance(model, PreTrainedModel)
            and not self.is_fsdp_enabled
            and not self.is_deepspeed_enabled
            and checkpoint is not None
            and any(os.path.isfile(os.path.join(checkpoint, n)) for n in (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME))
        )

    # Transformers 5.x saves some models (ViT among them) under their legacy Hub key names and renames them back in
    # `from_pretrained`; the Trainer's resume and best-model paths call `load_state_dict` on the raw keys and leave
    # those weights unloaded with a warning (huggingface/transformers#43701). Load through `from_pretrained` instead.
    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        model = self.model if model is None else model
        if not self._reloads_with_from_pretrained(model, resume_from_checkpoint):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        _load_weights_through_from_pretrained(model, resume_from_checkpoint)

    def _load_best_model(self):
        if not self._reloads_with_from_pretrained(self.model, self.state.best_model_checkpoint):
            return super()._load_best_model()
        logger.info(f"Loading best model from {self.state.best_model_checkpoint} (score: {self.state.best_metric}).")
        _load_weights_through_from_pretrained(self.model, self.state.best_model_checkpoint)

    def _maybe_log_save_evaluate(self, *args, **kwargs):
        # The Trainer averages `loss` over the optimizer steps since the last log; remember that window.
        self._log_window = max(self.state.global_step - self._globalstep_last_logged, 1)
        return super()._maybe_log_save_evaluate(*args, **kwargs)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self._term_sums:
            for name, total in self._term_sums.items():
                total = torch.as_tensor(total, device=self.args.device)
                logs[name] = nested_gather(total, self.args.parallel_mode).mean().item() / self._log_window
            self._term_sums = {}
        super().log(logs, *args, **kwargs)


def _load_weights_through_from_pretrained(model: PreTrainedModel, checkpoint: str) -> None:
    reloaded = type(model).from_pretrained(checkpoint, dtype=model.dtype)
    model.load_state_dict(reloaded.state_dict())  # strict: every key must match


def _is_batched(value, batch: int) -> bool:
    return torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == batch


class AttentionDropTrainer(_ConsistencyLossMixin, Trainer):
    """`Trainer` with Consistency-Regularized AttentionDrop; pass `AttentionDropTrainingArguments`."""


class AttentionDropSeq2SeqTrainer(_ConsistencyLossMixin, Seq2SeqTrainer):
    """`Seq2SeqTrainer` with Consistency-Regularized AttentionDrop; pass `AttentionDropSeq2SeqTrainingArguments`."""
