"""The consistency Trainer: loss parity with a reference, normalisation, eval, logs, resume, distributed, R-Drop."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import image_batch, seq2seq_batch, tiny_marian, tiny_vit
from transformers import Trainer, TrainingArguments

from attentiondrop_hf import (
    AttentionDropSeq2SeqTrainer,
    AttentionDropSeq2SeqTrainingArguments,
    AttentionDropTrainer,
    AttentionDropTrainingArguments,
    AttentionDropVariant,
    enable_attentiondrop,
    register_variant,
)

LAMBDA = 0.7


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return self.rows[index]


def vit_rows(n=8, seed=0):
    pixels = image_batch(batch=n, seed=seed)["pixel_values"]
    return [{"pixel_values": pixels[i], "labels": torch.tensor(i % 3)} for i in range(n)]


def marian_rows(n=8, seed=0):
    """Padded sources, and labels padded with -100 to a fixed length (different lengths per example)."""
    inputs = seq2seq_batch(batch=n, source_len=9, target_len=6, seed=seed)
    labels = inputs["decoder_input_ids"].clone()
    for i in range(n):
        labels[i, 6 - (i % 4) :] = -100
    return [
        {"input_ids": inputs["input_ids"][i], "attention_mask": inputs["attention_mask"][i], "labels": labels[i]}
        for i in range(n)
    ]


def collate(rows):
    return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}


def vit_model(**flags):
    torch.manual_seed(0)
    return enable_attentiondrop(tiny_vit(initializer_range=0.2), **(flags or {"variant": "hard", "p": 0.5}))


def marian_model(**flags):
    torch.manual_seed(0)
    flags = flags or {"variant": "blur", "blur_sigma_max": 2.0, "targets": ["self", "causal", "cross"]}
    return enable_attentiondrop(tiny_marian(init_std=0.2), **flags)


def make_args(tmp_path, seq2seq=False, **overrides):
    kwargs = {
        "output_dir": str(tmp_path),
        "report_to": [],
        "use_cpu": True,
        "disable_tqdm": True,
        "save_strategy": "no",
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-3,
        "consistency_weight": LAMBDA,
        **overrides,
    }
    cls = AttentionDropSeq2SeqTrainingArguments if seq2seq else AttentionDropTrainingArguments
    return cls(**kwargs)


def make_trainer(model, tmp_path, rows=None, seq2seq=False, **overrides):
    cls = AttentionDropSeq2SeqTrainer if seq2seq else AttentionDropTrainer
    dataset = ListDataset(rows) if rows is not None else None
    return cls(
        model=model,
        args=make_args(tmp_path, seq2seq, **overrides),
        train_dataset=dataset,
        eval_dataset=dataset,
        data_collator=collate,
    )


def reference_terms(logits, labels, kl, smoothing=0.0):
    """The paper's loss from the two halves of one doubled forward, written out with explicit sums."""
    first, second = logits.float().chunk(2)
    counted = labels != -100
    safe = labels.clamp_min(0)

    def cross_entropy(part):
        log_probs = part.log_softmax(-1)
        nll = -log_probs.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
        smooth = -log_probs.mean(-1)
        return (((1 - smoothing) * nll + smoothing * smooth) * counted).sum() / counted.sum()

    def kl_div(p, q):  # KL(p || q) per item
        return (p.softmax(-1) * (p.log_softmax(-1) - q.log_softmax(-1))).sum(-1)

    divergence = kl_div(first, second) if kl == "forward" else 0.5 * (kl_div(first, second) + kl_div(second, first))
    return 0.5 * (cross_entropy(first) + cross_entropy(second)), (divergence * counted).sum() / counted.sum()


def test_invalid_arguments_raise(tmp_path):
    for bad in (-0.1, float("nan"), True):
        with pytest.raises(ValueError, match="`consistency_weight` must be a finite number >= 0"):
            make_args(tmp_path, consistency_weight=bad)
    with pytest.raises(ValueError, match="`consistency_kl` must be 'forward' or 'symmetric'"):
        make_args(tmp_path, consistency_kl="reverse")
    with pytest.raises(TypeError, match="needs AttentionDropTrainingArguments"):
        AttentionDropTrainer(model=vit_model(), args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True))


def test_a_model_loaded_with_attentiondrop_that_cannot_use_it_is_refused(tmp_path):
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    config = DebertaV2Config(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    model = DebertaV2ForSequenceClassification._from_config(config, attn_implementation="attentiondrop")
    with pytest.raises(ValueError, match="does not route its attention through transformers' AttentionInterface"):
        make_trainer(model, tmp_path)


@pytest.mark.parametrize("kl", ["forward", "symmetric"])
@pytest.mark.parametrize("task", ["vit", "marian"])
def test_loss_matches_reference_from_the_two_halves(task, kl, tmp_path):
    seq2seq = task == "marian"
    model = marian_model() if seq2seq else vit_model()
    inputs = collate(marian_rows() if seq2seq else vit_rows())
    smoothing = 0.1 if seq2seq else 0.0
    trainer = make_trainer(model, tmp_path, seq2seq=seq2seq, consistency_kl=kl, label_smoothing_factor=smoothing)
    model.train()
    torch.manual_seed(5)
    loss = trainer.compute_loss(model, dict(inputs))

    torch.manual_seed(5)
    doubled = {k: torch.cat([v, v]) for k, v in inputs.items() if k != "labels"}
    if seq2seq:
        decoder_input_ids = model.prepare_decoder_input_ids_from_labels(labels=inputs["labels"])
        doubled["decoder_input_ids"] = decoder_input_ids.repeat(2, 1)
    logits = model(**doubled).logits
    task_loss, consistency = reference_terms(logits, inputs["labels"], kl, smoothing)
    assert consistency > 1e-4, "the two halves were perturbed identically"
    torch.testing.assert_close(loss, task_loss + LAMBDA * consistency, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("task", ["vit", "marian"])
def test_lambda_zero_equals_the_stock_trainer(task, smoothing, tmp_path):
    seq2seq = task == "marian"
    model = marian_model() if seq2seq else vit_model()
    inputs = collate(marian_rows() if seq2seq else vit_rows())
    if seq2seq:  # as DataCollatorForSeq2Seq does: the stock Trainer pops the labels when it smooths them
        inputs["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels=inputs["labels"])
    ours = make_trainer(model, tmp_path, seq2seq=seq2seq, consistency_weight=0.0, label_smoothing_factor=smoothing)
    stock = Trainer(
        model=model,
        args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], label_smoothing_factor=smoothing),
    )
    model.train()
    torch.manual_seed(3)
    got = ours.compute_loss(model, dict(inputs))
    torch.manual_seed(3)
    want = stock.compute_loss(model, dict(inputs))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_the_two_halves_differ(tmp_path):
    model = vit_model()
    trainer = make_trainer(model, tmp_path)
    model.train()
    _, outputs = trainer.compute_loss(model, collate(vit_rows()), return_outputs=True)
    first, second = outputs.logits.chunk(2)
    assert first.shape[0] == 8 and not torch.allclose(first, second)


def register_copy_dependent_variant():
    """Deterministic and layout-independent, yet different for the two copies: the second half of every doubled
    batch gets cooler logits. Lets accumulation and multi-process runs be compared exactly with a non-zero KL."""

    @register_variant("cooler_second_copy", override=True)
    class CoolerSecondCopy(AttentionDropVariant):
        @staticmethod
        def perturb_logits(logits, attendable, config, draws, causal):
            factor = torch.ones(logits.shape[0], 1, 1, 1)
            factor[logits.shape[0] // 2 :] = 0.5
            return logits * factor, attendable


ACCUMULATION = [
    ("vit", vit_model, vit_rows, False),
    ("marian", marian_model, marian_rows, True),
]


@pytest.mark.parametrize("name, factory, rows, seq2seq", ACCUMULATION, ids=[a[0] for a in ACCUMULATION])
def test_gradient_accumulation_gives_the_same_step(name, factory, rows, seq2seq, tmp_path):
    register_copy_dependent_variant()
    targets = ["self", "causal", "cross"] if seq2seq else ["self"]
    logs = {}
    for batch, accumulation in ((8, 1), (4, 2)):
        trainer = make_trainer(
            factory(variant="cooler_second_copy", targets=targets),
            tmp_path / f"{batch}",
            rows(),
            seq2seq=seq2seq,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
            max_steps=1,
            logging_steps=1,
        )
        trainer.train()
        logs[batch] = trainer.state.log_history[0]
    assert logs[8]["consistency_loss"] > 1e-4
    for key in ("loss", "grad_norm", "task_loss", "consistency_loss"):
        assert logs[4][key] == pytest.approx(logs[8][key], rel=1e-5), key


@pytest.mark.parametrize("seq2seq", [False, True], ids=["vit", "marian"])
def test_eval_runs_a_single_pass_on_the_original_batch(seq2seq, tmp_path):
    model = marian_model() if seq2seq else vit_model()
    rows = marian_rows() if seq2seq else vit_rows()
    trainer = make_trainer(model, tmp_path, rows, seq2seq=seq2seq, per_device_eval_batch_size=8)
    seen = []
    model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs), with_kwargs=True)
    metrics = trainer.evaluate()
    batch_sizes = [next(v for v in kw.values() if torch.is_tensor(v)).shape[0] for kw in seen]
    assert batch_sizes == [8]
    inputs = collate(rows)
    with torch.no_grad():
        task_loss, _ = reference_terms(*_single_pass_logits(model.eval(), inputs), "forward")
    assert metrics["eval_loss"] == pytest.approx(task_loss.item(), rel=1e-5)


def _single_pass_logits(model, inputs):
    kwargs = {k: v for k, v in inputs.items() if k != "labels"}
    if "input_ids" in kwargs:
        kwargs["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels=inputs["labels"])
    logits = model(**kwargs).logits
    return torch.cat([logits, logits]), inputs["labels"]


def test_predict_with_generate(tmp_path):
    trainer = make_trainer(
        marian_model(), tmp_path, marian_rows(), seq2seq=True, predict_with_generate=True, generation_max_length=5
    )
    result = trainer.predict(ListDataset(marian_rows()))
    # Generation stops at 5 tokens; the Seq2SeqTrainer pads the rest to the generation config's max_length.
    assert result.predictions.shape[0] == 8 and (result.predictions[:, 5:] == 0).all()
    assert (result.predictions[:, 1:5] != 0).any()
    assert "test_loss" in result.metrics


def test_logs_carry_both_terms_averaged_like_the_loss(tmp_path):
    trainer = make_trainer(vit_model(), tmp_path, vit_rows(16), max_steps=4, logging_steps=2)
    trainer.train()
    steps = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(steps) == 2
    for entry in steps:
        assert entry["consistency_loss"] > 0
        assert entry["loss"] == pytest.approx(entry["task_loss"] + LAMBDA * entry["consistency_loss"], rel=1e-5)


def test_resume_gives_the_losses_of_an_uninterrupted_run(tmp_path):
    def train(output_dir, resume=None):
        trainer = make_trainer(
            vit_model(),
            output_dir,
            vit_rows(32),
            max_steps=4,
            logging_steps=1,
            seed=7,
            save_strategy="steps",
            save_steps=2,
        )
        trainer.train(resume_from_checkpoint=resume)
        return {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}

    uninterrupted = train(tmp_path)
    # A fresh process would start from checkpoint-2 with nothing but what the checkpoint holds (RNG states included).
    resumed = train(tmp_path, resume=str(tmp_path / "checkpoint-2"))
    for step in (3, 4):
        assert resumed[step] == pytest.approx(uninterrupted[step], rel=1e-6)


def test_activation_checkpointing_and_bf16_autocast(tmp_path):
    def one_step(**overrides):
        trainer = make_trainer(vit_model(), tmp_path, vit_rows(), max_steps=1, logging_steps=1, seed=1, **overrides)
        trainer.train()
        return trainer.state.log_history[0]

    plain = one_step()
    checkpointed = one_step(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
    for key in ("loss", "grad_norm", "consistency_loss"):
        assert checkpointed[key] == pytest.approx(plain[key], rel=1e-5), key
    bf16 = one_step(bf16=True)
    assert all(torch.isfinite(torch.tensor(bf16[k])) for k in ("loss", "grad_norm", "consistency_loss"))
    assert bf16["loss"] == pytest.approx(plain["loss"], rel=0.05)  # bf16 autocast: ~3 significant digits


def test_torch_compile(tmp_path):
    def one_step(**overrides):
        trainer = make_trainer(vit_model(), tmp_path, vit_rows(), max_steps=1, logging_steps=1, seed=1, **overrides)
        trainer.train()
        return trainer.state.log_history[0]

    # aot_eager traces and runs the graphs without compiling C++ kernels: what is checked is that AttentionDrop
    # and the doubled pass go through dynamo, not inductor's code generation.
    compiled = one_step(torch_compile=True, torch_compile_backend="aot_eager")
    plain = one_step()
    assert compiled["loss"] == pytest.approx(plain["loss"], rel=1e-5)


def test_rdrop_with_attentiondrop_off(tmp_path):
    """Dropout alone makes the halves differ: R-Drop, L = NLL1 + NLL2 + alpha/2 (KL12 + KL21), alpha = 2 lambda."""
    torch.manual_seed(0)
    model = tiny_vit(initializer_range=0.2, hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2)
    inputs = collate(vit_rows())
    trainer = make_trainer(model, tmp_path, consistency_kl="symmetric")
    model.train()
    torch.manual_seed(9)
    loss = trainer.compute_loss(model, dict(inputs))

    torch.manual_seed(9)
    first, second = model(pixel_values=torch.cat([inputs["pixel_values"]] * 2)).logits.chunk(2)
    nll = F.cross_entropy(first, inputs["labels"]) + F.cross_entropy(second, inputs["labels"])
    kl12 = F.kl_div(second.log_softmax(-1), first.log_softmax(-1), log_target=True, reduction="batchmean")
    kl21 = F.kl_div(first.log_softmax(-1), second.log_softmax(-1), log_target=True, reduction="batchmean")
    rdrop = nll + 2 * LAMBDA / 2 * (kl12 + kl21)
    assert kl12 > 1e-4
    torch.testing.assert_close(loss, rdrop / 2, rtol=1e-5, atol=1e-6)


DISTRIBUTED_SCRIPT = os.path.join(os.path.dirname(__file__), "distributed_step.py")


def test_two_processes_equal_one_process(tmp_path):
    """gloo, 2 CPU processes x 4 examples == 1 process x 8 examples: same logged loss and the same weights."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.dirname(__file__)}
    single = [sys.executable, DISTRIBUTED_SCRIPT, str(tmp_path / "single"), "8"]
    multi = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port=29517",
        DISTRIBUTED_SCRIPT,
        str(tmp_path / "multi"),
        "4",
    ]
    for command in (single, multi):
        subprocess.run(command, env=env, check=True, capture_output=True, timeout=300)
    results = {name: json.loads((tmp_path / name / "log.json").read_text()) for name in ("single", "multi")}
    assert results["single"]["consistency_loss"] > 1e-4
    for key in ("loss", "grad_norm", "task_loss", "consistency_loss"):
        assert results["multi"][key] == pytest.approx(results["single"][key], rel=1e-5), key
    single_weights = torch.load(tmp_path / "single" / "weights.pt")
    multi_weights = torch.load(tmp_path / "multi" / "weights.pt")
    for name, tensor in single_weights.items():
        torch.testing.assert_close(multi_weights[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
