"""Strength schedules (over training and by depth) and the monitor callback, with the trainer and without it."""

import copy
import math

import pytest
import torch
from testing_common import CASES_BY_ID, QUIET_TRAINING, ListDataset, build_peaked, collate, image_batch
from transformers import Trainer, TrainingArguments

from attentiondrop_hf import (
    AttentionDropConfig,
    AttentionDropTrainer,
    AttentionDropTrainingArguments,
    add_attentiondrop_callbacks,
    enable_attentiondrop,
    ops,
)
from attentiondrop_hf.hf import attention as attention_glue
from attentiondrop_hf.hf.model_card import training_curves_figure
from attentiondrop_hf.hf.plan import model_plan_of


def test_schedule_and_depth_factors_are_the_formulas():
    for progress in (0.0, 0.05, 0.1, 0.5):
        ramp = min(progress / 0.2, 1.0)
        assert ops.schedule_factor("constant", 0.2, progress) == 1.0
        assert ops.schedule_factor("linear", 0.2, progress) == pytest.approx(ramp)
        assert ops.schedule_factor("cosine", 0.2, progress) == pytest.approx(0.5 * (1 - math.cos(math.pi * ramp)))
    assert [ops.depth_factor("increasing", layer, 4) for layer in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert [ops.depth_factor("decreasing", layer, 4) for layer in range(4)] == [1.0, 0.75, 0.5, 0.25]
    assert ops.depth_factor("uniform", 2, 4) == 1.0


def test_schedule_flags_are_validated_and_saved():
    with pytest.raises(ValueError, match=r"`schedule` must be one of \['constant', 'linear', 'cosine'\]"):
        AttentionDropConfig(schedule="step")
    with pytest.raises(ValueError, match=r"`schedule_warmup` must be in \(0, 1\]"):
        AttentionDropConfig(schedule="linear", schedule_warmup=0.0)
    with pytest.raises(ValueError, match=r"`depth_rule` must be one of"):
        AttentionDropConfig(depth_rule="random")
    settings = AttentionDropConfig(variant="blur", schedule="cosine", schedule_warmup=0.3, depth_rule="decreasing")
    assert AttentionDropConfig.from_dict(settings.to_dict()) == settings


def vit(**flags):
    torch.manual_seed(0)
    return enable_attentiondrop(build_peaked("vit"), **flags)


def test_the_options_in_force_follow_progress_and_depth():
    """At progress t and layer l the variant runs with its options scaled by schedule(t) x depth(l)."""
    model = vit(variant="hard", p=0.4, schedule="linear", schedule_warmup=0.5, depth_rule="increasing")
    seen = []
    original = attention_glue._perturbed_attention

    def spy(call, plan, options, **kwargs):
        seen.append(options.p)
        return original(call, plan, options, **kwargs)

    attention_glue._perturbed_attention = spy
    try:
        for progress in (0.25, 0.75):
            seen.clear()
            model_plan_of(model).set_progress(progress)
            model.train()(**image_batch())
            strength = min(progress / 0.5, 1.0)
            assert seen == pytest.approx([0.4 * strength * 0.5, 0.4 * strength * 1.0])  # layers 0 and 1 of 2
    finally:
        attention_glue._perturbed_attention = original


def test_strength_zero_is_the_base_and_a_schedule_without_its_clock_raises():
    base = build_peaked("vit")
    torch.manual_seed(0)
    base = build_peaked("vit")
    model = enable_attentiondrop(copy.deepcopy(base), variant="hard", p=0.5, schedule="linear")
    with pytest.raises(ValueError, match=r"`schedule='linear'` follows the training step, which nothing reported"):
        model.train()(**image_batch())
    model_plan_of(model).set_progress(0.0)  # the first step of a warm-up: no perturbation at all
    torch.manual_seed(1)
    got = model.train()(**image_batch()).logits
    torch.manual_seed(1)
    assert torch.equal(got, base.train()(**image_batch()).logits)


def train_logs(output_dir, resume=None, **flags):
    torch.manual_seed(0)
    model = vit(**flags)
    args = AttentionDropTrainingArguments(
        output_dir=str(output_dir),
        **{**QUIET_TRAINING, "save_strategy": "steps"},
        per_device_train_batch_size=4,
        max_steps=8,
        logging_steps=1,
        save_steps=4,
        seed=3,
    )
    rows = CASES_BY_ID["vit"].rows(32)
    trainer = AttentionDropTrainer(model=model, args=args, train_dataset=ListDataset(rows), data_collator=collate)
    trainer.train(resume_from_checkpoint=resume)
    return {entry["step"]: entry for entry in trainer.state.log_history if "loss" in entry}


def test_the_trainer_drives_the_schedule_logs_it_and_a_resumed_run_continues_it(tmp_path):
    flags = {"variant": "hard", "p": 0.4, "schedule": "cosine", "schedule_warmup": 0.5}
    logs = train_logs(tmp_path, **flags)
    for step, entry in logs.items():
        strength = ops.schedule_factor("cosine", 0.5, (step - 1) / 8)  # the step began at global_step = step - 1
        assert entry["attentiondrop/strength"] == pytest.approx(strength), step
        assert entry["attentiondrop/p"] == pytest.approx(0.4 * strength), step
    assert logs[1]["attentiondrop/strength"] == 0.0 and logs[8]["attentiondrop/strength"] == 1.0
    resumed = train_logs(tmp_path, resume=str(tmp_path / "checkpoint-4"), **flags)
    for step in (5, 6, 7, 8):
        assert resumed[step]["attentiondrop/p"] == pytest.approx(logs[step]["attentiondrop/p"])
        assert resumed[step]["loss"] == pytest.approx(logs[step]["loss"], rel=1e-6)


def test_any_trainer_drives_the_schedule_with_the_callback(tmp_path):
    model = vit(variant="blur", blur_sigma_max=2.0, schedule="linear", schedule_warmup=1.0)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        **QUIET_TRAINING,
        per_device_train_batch_size=4,
        max_steps=4,
        logging_steps=1,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=ListDataset(CASES_BY_ID["vit"].rows(16)), data_collator=collate
    )
    add_attentiondrop_callbacks(trainer)
    trainer.train()
    sigmas = [entry["attentiondrop/blur_sigma_max"] for entry in trainer.state.log_history if "loss" in entry]
    assert sigmas == pytest.approx([2.0 * (step - 1) / 4 for step in (1, 2, 3, 4)])


@pytest.mark.parametrize(
    "flags, term",
    [
        ({"variant": "hard", "p": 1.0, "top_k": 2, "hard_fill": "mask"}, "dropped_mass"),
        ({"variant": "blur", "blur_sigma_min": 0.5, "blur_sigma_max": 1.5}, "sigma"),
    ],
)
def test_the_monitor_logs_entropies_and_the_variants_terms_per_layer(flags, term, tmp_path):
    model = vit(**flags)
    args = AttentionDropTrainingArguments(
        output_dir=str(tmp_path),
        **QUIET_TRAINING,
        per_device_train_batch_size=4,
        max_steps=2,
        logging_steps=1,
        monitor_attention=True,
    )
    trainer = AttentionDropTrainer(
        model=model, args=args, train_dataset=ListDataset(CASES_BY_ID["vit"].rows(16)), data_collator=collate
    )
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    for entry in logged:
        for layer in (0, 1):
            clean = entry[f"attentiondrop/entropy_clean/self.{layer}"]
            perturbed = entry[f"attentiondrop/entropy_perturbed/self.{layer}"]
            assert 0 < clean <= math.log(17) + 1e-6 and perturbed != clean
        assert entry["attentiondrop/entropy_clean"] == pytest.approx(
            (entry["attentiondrop/entropy_clean/self.0"] + entry["attentiondrop/entropy_clean/self.1"]) / 2
        )
        value = entry[f"attentiondrop/{term}"]
        if term == "sigma":
            assert 0.5 <= value <= 1.5
        else:  # p = 1, top_k = 2, mask: exactly the two largest weights of every row are removed
            assert 0 < value < 1
    figure = training_curves_figure(trainer.state.log_history)
    titles = [axis.get_title() for axis in figure.axes]
    assert "attention entropy (monitor)" in titles and f"attentiondrop/{term}" in titles


def test_the_curves_draw_every_logged_term_and_each_distinct_metric_once():
    """A user variant's monitor term gets its panel like the built-ins'; equal metrics (a classifier's loss and
    NLL) share one labelled panel; one legend for the loss and the KL."""
    history = [
        {
            "step": s,
            "loss": 1.0 / s,
            "task_loss": 0.9 / s,
            "consistency_loss": 0.01 * s,
            "attentiondrop/temperature_gap": 0.1 * s,
        }
        for s in (1, 2, 3)
    ]
    history += [{"step": s, "eval_loss": 0.5 / s, "eval_nll": 0.5 / s, "eval_accuracy": 0.1 * s} for s in (2, 3)]
    figure = training_curves_figure(history)
    titles = [axis.get_title() for axis in figure.axes]
    assert "attentiondrop/temperature_gap" in titles
    assert titles.count("evaluation: loss = nll") == 1 and "evaluation: accuracy" in titles
    assert sum(axis.get_legend() is not None for axis in figure.axes) == 1
    labels = [text.get_text() for text in figure.axes[0].get_legend().get_texts()]
    assert labels == ["loss", "task loss", "consistency KL"]


def test_the_monitor_measures_the_mass_hard_masking_removes():
    """p = 1, top_k = 1, mask fill: the removed mass is each row's largest clean attention weight."""
    model = vit(variant="hard", p=1.0, top_k=1, hard_fill="mask")
    with torch.no_grad():
        clean = model.eval()(**image_batch(), output_attentions=True).attentions
    with attention_glue.monitor_attention() as records, torch.no_grad():
        model.train()(**image_batch())
    assert [r["layer"] for r in records] == [0, 1]
    for record, probs in zip(records, clean):
        assert record["dropped_mass"] == pytest.approx(probs.max(-1).values.mean().item(), rel=1e-5)
    assert attention_glue._monitor_records is None  # off outside the block: nothing recorded, nothing computed
