"""The consistency trainer against its references: the stock Trainer / Seq2SeqTrainer where the consistency term is
off, the model's own loss where it is on (for every family in the table), and a loss written out from the two
halves of one doubled forward. Plus normalisation, eval, logs, resume, DataParallel, DDP, R-Drop."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from testing_common import CASES_BY_ID, QUIET_TRAINING, ListDataset, build, build_peaked, cases, collate, image_batch
from transformers import (
    BeitConfig,
    BeitForSemanticSegmentation,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    Trainer,
    TrainingArguments,
    ViTForImageClassification,
)

from attentiondrop_hf import (
    AttentionDropSeq2SeqTrainer,
    AttentionDropSeq2SeqTrainingArguments,
    AttentionDropTrainer,
    AttentionDropTrainingArguments,
    AttentionDropVariant,
    ConsistencyMixin,
    enable_attentiondrop,
    register_variant,
)
from attentiondrop_hf.hf.model_card import training_curves_figure

LAMBDA = 0.7


def vit_model(**flags):
    torch.manual_seed(0)
    return enable_attentiondrop(build("vit", initializer_range=0.2), **(flags or {"variant": "hard", "p": 0.5}))


def marian_model(**flags):
    torch.manual_seed(0)
    flags = flags or {"variant": "blur", "blur_sigma_max": 2.0, "targets": ["self", "causal", "cross"]}
    return enable_attentiondrop(build("marian", init_std=0.2), **flags)


def vit_rows(n=8, seed=0):
    return CASES_BY_ID["vit"].rows(n, seed)


def marian_rows(n=8, seed=0):
    return CASES_BY_ID["marian"].rows(n, seed)


def is_seq2seq(case):
    return "seq2seq" in case.tags


def make_args(tmp_path, seq2seq=False, **overrides):
    kwargs = {
        "output_dir": str(tmp_path),
        **QUIET_TRAINING,
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


def stock_trainer(model, tmp_path, seq2seq=False, **overrides):
    kwargs = {"output_dir": str(tmp_path), **QUIET_TRAINING, **overrides}
    if seq2seq:
        return Seq2SeqTrainer(model=model, args=Seq2SeqTrainingArguments(**kwargs), data_collator=collate)
    return Trainer(model=model, args=TrainingArguments(**kwargs), data_collator=collate)


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


def test_a_model_that_cannot_use_attentiondrop_is_refused_at_load(tmp_path):
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    config = DebertaV2Config(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    with pytest.raises(ValueError, match="does not route its attention through transformers' AttentionInterface"):
        DebertaV2ForSequenceClassification._from_config(config, attn_implementation="attentiondrop")


def test_flags_edited_to_target_nothing_are_refused_when_the_trainer_is_built(tmp_path):
    model = enable_attentiondrop(build("vit"), variant="hard")
    model.config.attentiondrop["targets"] = ["causal"]
    with pytest.raises(ValueError, match=r"targets \['causal'\] match no attention of ViTForImageClassification"):
        make_trainer(model, tmp_path)


@pytest.mark.parametrize("case", cases(task=True))
def test_lambda_zero_and_eval_are_the_stock_trainer(case, tmp_path):
    """At lambda = 0 and in evaluation the trainer is the stock one: the model's own loss, aux losses included."""
    torch.manual_seed(0)
    model = enable_attentiondrop(case.build(), targets=list(case.roles), variant="hard", p=0.5)
    inputs = collate(case.rows())
    seq2seq = is_seq2seq(case)
    ours = make_trainer(model, tmp_path, seq2seq=seq2seq, consistency_weight=0.0)
    stock = stock_trainer(model, tmp_path, seq2seq=seq2seq)
    for training in (True, False):
        model.train(training)
        torch.manual_seed(3)
        got = ours.compute_loss(model, dict(inputs))
        torch.manual_seed(3)
        want = stock.compute_loss(model, dict(inputs))
        assert torch.equal(got, want)
    ours = make_trainer(model, tmp_path, seq2seq=seq2seq, consistency_weight=1.0)
    model.eval()
    assert torch.equal(ours.compute_loss(model, dict(inputs)), stock.compute_loss(model, dict(inputs)))
    got = ours.prediction_step(model, dict(inputs), prediction_loss_only=False)
    want = stock.prediction_step(model, dict(inputs), prediction_loss_only=False)
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)


@pytest.mark.parametrize("case", cases(task=True))
def test_lambda_positive_task_loss_is_the_models_own_loss(case, tmp_path):
    """With a perturbation that changes nothing the two halves are equal: the task loss must be the model's own loss
    (causal LMs shifted whatever their class name, seq2seq decoder inputs built as the model builds them, router
    aux losses added), and the KL exactly 0."""
    torch.manual_seed(0)
    model = enable_attentiondrop(case.build(), targets=list(case.roles), variant="hard", p=0.0)
    inputs = collate(case.rows())
    trainer = make_trainer(model, tmp_path, seq2seq=is_seq2seq(case), consistency_weight=1.0)
    model.train()
    _, outputs = trainer.compute_loss(model, dict(inputs), return_outputs=True)
    # The halves are the same examples at different batch rows: equal up to the rounding of batched matmuls.
    assert abs(trainer.consistency_terms.sums["consistency_loss"]) < 1e-6
    with torch.no_grad():
        own = model(**inputs).loss
    torch.testing.assert_close(trainer.consistency_terms.sums["task_loss"], own, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", cases("gpt2", "bert_lm", "llama"))
def test_causal_lm_items_are_counted_on_the_shifted_labels(case, tmp_path):
    model = enable_attentiondrop(case.build(), variant="hard", p=0.5)
    rows = case.rows(6)
    trainer = make_trainer(model, tmp_path, consistency_weight=1.0)
    batches = iter([collate(rows[:3]), collate(rows[3:])])
    _, count = trainer.get_batch_samples(batches, 2, torch.device("cpu"))
    labels = collate(rows)["labels"]
    assert count == labels[:, 1:].ne(-100).sum() < labels.ne(-100).sum()


def test_a_model_whose_loss_the_trainer_does_not_reproduce_is_refused(tmp_path):
    """The first-step check against the model's own loss: a model with an extra term in its loss."""

    class ViTWithDoubledLossForImageClassification(ViTForImageClassification):  # the name sets its loss_type
        def forward(self, pixel_values=None, labels=None, **kwargs):
            outputs = super().forward(pixel_values=pixel_values, labels=labels, **kwargs)
            if labels is not None:
                outputs.loss = outputs.loss * 2
            return outputs

    torch.manual_seed(0)
    model = enable_attentiondrop(ViTWithDoubledLossForImageClassification(build("vit").config), variant="hard", p=0.5)
    trainer = make_trainer(model, tmp_path, vit_rows(), max_steps=1)
    with pytest.raises(ValueError, match=r"differs from the model's own loss .* Train it with consistency_weight=0"):
        trainer.train()


@pytest.mark.parametrize("term", [1e-2, 1e-4])
def test_a_small_auxiliary_term_the_trainer_does_not_add_is_refused(term, tmp_path):
    """The first-step check is exact to float32 rounding: an extra term of 1e-4 of the loss (a
    router loss with a small coefficient) is caught, where a 1e-3 relative tolerance let it through."""

    class ViTWithAuxiliaryTermForImageClassification(ViTForImageClassification):
        def forward(self, pixel_values=None, labels=None, **kwargs):
            outputs = super().forward(pixel_values=pixel_values, labels=labels, **kwargs)
            if labels is not None:
                outputs.loss = outputs.loss * (1 + term)
            return outputs

    torch.manual_seed(0)
    model = ViTWithAuxiliaryTermForImageClassification(build("vit").config)
    model = enable_attentiondrop(model, variant="hard", p=0.5)
    trainer = make_trainer(model, tmp_path, vit_rows(), max_steps=1)
    with pytest.raises(ValueError, match=r"differs from the model's own loss"):
        trainer.train()


def test_shapes_the_kl_does_not_cover_are_refused_at_lambda_positive(tmp_path):
    config = BeitConfig(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=16,
        patch_size=4,
        num_labels=3,
        out_indices=[1, 2, 3, 4],
        drop_path_rate=0.0,
    )
    segmentation = enable_attentiondrop(BeitForSemanticSegmentation(config), variant="hard")
    rows = [
        {"pixel_values": image_batch(1, i)["pixel_values"][0], "labels": torch.randint(0, 3, (16, 16))}
        for i in range(4)
    ]
    regression = enable_attentiondrop(build("vit", num_labels=1), variant="hard")
    integer_targets = [{**row, "labels": torch.tensor(i)} for i, row in enumerate(vit_rows(4))]
    for model, data in ((segmentation, rows), (regression, integer_targets)):
        make_trainer(model, tmp_path, data, consistency_weight=0.0, max_steps=1).train()  # stock: trains
        trainer = make_trainer(model, tmp_path, data, consistency_weight=1.0, max_steps=1)
        with pytest.raises(ValueError, match=r"needs logits of shape labels.shape \+ \(num_classes,\)"):
            trainer.train()
    float_targets = [{**row, "labels": torch.tensor(float(i))} for i, row in enumerate(vit_rows(4))]
    trainer = make_trainer(regression, tmp_path, float_targets, consistency_weight=1.0, max_steps=1)
    with pytest.raises(ValueError, match="needs integer class or token labels"):
        trainer.train()


@pytest.mark.parametrize("kl", ["forward", "symmetric"])
@pytest.mark.parametrize("task", ["vit", "marian", "m2m100", "whisper"])
def test_loss_matches_reference_from_the_two_halves(task, kl, tmp_path):
    case = CASES_BY_ID[task]
    seq2seq = is_seq2seq(case)
    torch.manual_seed(0)
    flags = {"variant": "blur", "blur_sigma_max": 2.0} if seq2seq else {"variant": "hard", "p": 0.5}
    model = enable_attentiondrop(build_peaked(task), targets=list(case.roles), **flags)
    inputs = collate(case.rows())
    smoothing = 0.1 if seq2seq else 0.0
    trainer = make_trainer(model, tmp_path, seq2seq=seq2seq, consistency_kl=kl, label_smoothing_factor=smoothing)
    trainer._checked_against_model_loss = True  # the check runs two extra forwards that consume random numbers
    model.train()
    torch.manual_seed(5)
    loss = trainer.compute_loss(model, dict(inputs))

    torch.manual_seed(5)
    doubled = {k: torch.cat([v, v]) for k, v in inputs.items() if k != "labels"}
    if seq2seq:  # what the model's forward builds from labels: its shift_tokens_right
        module = sys.modules[type(model).__module__]
        decoder_input_ids = module.shift_tokens_right(inputs["labels"], 0, model.config.decoder_start_token_id)
        doubled["decoder_input_ids"] = decoder_input_ids.repeat(2, 1)
    logits = model(**doubled).logits
    task_loss, consistency = reference_terms(logits, inputs["labels"], kl, smoothing)
    assert consistency > 1e-4, "the two halves were perturbed identically"
    torch.testing.assert_close(loss, task_loss + LAMBDA * consistency, rtol=1e-5, atol=1e-6)


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
        def perturb_logits(logits, attendable, options, draws, call):
            factor = torch.ones(logits.shape[0], 1, 1, 1)
            factor[logits.shape[0] // 2 :] = 0.5
            return logits * factor, attendable


@pytest.mark.parametrize("case_id", ["vit", "marian", "gpt2"])
def test_gradient_accumulation_gives_the_same_step(case_id, tmp_path):
    register_copy_dependent_variant()
    case = CASES_BY_ID[case_id]
    logs = {}
    for batch, accumulation in ((8, 1), (4, 2)):
        torch.manual_seed(0)
        model = enable_attentiondrop(build_peaked(case_id), variant="cooler_second_copy", targets=list(case.roles))
        trainer = make_trainer(
            model,
            tmp_path / f"{batch}",
            case.rows(),
            seq2seq=is_seq2seq(case),
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
            max_steps=1,
            logging_steps=1,
        )
        trainer.train()
        logs[batch] = trainer.state.log_history[0]
    assert logs[8]["consistency_loss"] > 1e-6
    for key in ("loss", "grad_norm", "task_loss", "consistency_loss"):
        assert logs[4][key] == pytest.approx(logs[8][key], rel=1e-5), key


def test_data_parallel_gives_the_step_of_one_device(tmp_path):
    """`python train.py` on a multi-GPU box wraps the model in DataParallel (n_gpu > 1). Simulated on the CPU, where
    DataParallel runs the module as it is: the same examples must give the same loss and weights."""
    register_copy_dependent_variant()
    results = {}
    for n_gpu, per_device in ((1, 8), (2, 4)):
        args = make_args(tmp_path / str(n_gpu), per_device_train_batch_size=per_device, max_steps=1, logging_steps=1)
        args._n_gpu = n_gpu
        model = vit_model(variant="cooler_second_copy")
        trainer = AttentionDropTrainer(
            model=model, args=args, train_dataset=ListDataset(vit_rows()), data_collator=collate
        )
        trainer.train()
        results[n_gpu] = trainer.state.log_history[0], {k: v.clone() for k, v in model.state_dict().items()}
    assert results[2][0]["loss"] == pytest.approx(results[1][0]["loss"], rel=1e-6)
    for name, tensor in results[1][1].items():
        torch.testing.assert_close(results[2][1][name], tensor, msg=name)


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
    with torch.no_grad():
        own = model.eval()(**collate(rows)).loss
    assert metrics["eval_loss"] == pytest.approx(own.item(), rel=1e-5)


def test_return_dict_false_keeps_the_predictions(tmp_path):
    rows = CASES_BY_ID["bert"].rows()
    predictions = {}
    for return_dict in (True, False):
        torch.manual_seed(0)
        model = enable_attentiondrop(build("bert"), variant="hard")
        model.config.return_dict = return_dict  # BERT honours it: (loss, logits) tuples
        predictions[return_dict] = make_trainer(model, tmp_path, rows).predict(ListDataset(rows)).predictions
    assert predictions[False].shape == (8, 3)
    assert (predictions[False] == predictions[True]).all()


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


def test_logged_kl_is_never_negative_and_curves_give_it_its_own_axis(tmp_path):
    trainer = make_trainer(vit_model(), tmp_path, vit_rows(8), max_steps=1)
    logged = {}
    trainer.consistency_terms.sums = {"task_loss": torch.tensor(1.0), "consistency_loss": torch.tensor(-3e-9)}
    trainer.consistency_terms.on_log(
        trainer.args, trainer.state, trainer.control, logs=logged.update(loss=1.0) or logged
    )
    assert logged["consistency_loss"] == 0.0 and logged["task_loss"] == 1.0
    history = [{"step": s, "loss": 2.0 / s, "task_loss": 1.9 / s, "consistency_loss": 0.01 / s} for s in (1, 2, 3)]
    history.append({"step": 3, "eval_loss": 0.5, "eval_accuracy": 0.8, "eval_runtime": 1.0})
    figure = training_curves_figure(history)
    training, accuracy, loss = figure.axes[0], *figure.axes[1:3]
    kl_axis = next(axis for axis in figure.axes if any(line.get_label() == "consistency KL" for line in axis.lines))
    assert kl_axis is not training and kl_axis.get_ylabel() == "consistency KL"
    assert [line.get_label() for line in training.lines] == ["loss", "task loss"]
    assert {accuracy.get_title(), loss.get_title()} == {"evaluation: loss", "evaluation: accuracy"}


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
    model = build("vit", initializer_range=0.2, hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2)
    inputs = collate(vit_rows())
    trainer = make_trainer(model, tmp_path, consistency_kl="symmetric")
    trainer._checked_against_model_loss = True  # its two extra forwards would consume random numbers
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


@pytest.mark.slow
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


def test_card_metadata_round_trips_through_huggingface_hub(tmp_path):
    """The card's metadata: AttentionDrop tags, the base model, the dataset and every metric in `model-index` form,
    read back by huggingface_hub's own card classes (offline)."""
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard_data import model_index_to_eval_results

    trainer = make_trainer(vit_model(), tmp_path, vit_rows(8), max_steps=2, logging_steps=1)
    trainer.train()
    metrics = trainer.evaluate()
    trainer.create_model_card(
        finetuned_from="google/vit-base-patch16-224-in21k", tasks="image-classification", dataset="cifar10"
    )
    card = ModelCard.load(tmp_path / "README.md")
    assert ModelCard(card.content).data.to_dict() == card.data.to_dict()  # YAML round trip
    data = card.data
    assert data.base_model == "google/vit-base-patch16-224-in21k" and data.datasets == ["cifar10"]
    assert {"attentiondrop", "attentiondrop-hard"} <= set(data.tags) and data.library_name == "transformers"
    name, results = model_index_to_eval_results(data.to_dict()["model-index"])
    assert name == data.model_name
    got = {result.metric_type: result.metric_value for result in results}
    assert got == pytest.approx({"loss": metrics["eval_loss"]})
    assert {(r.task_type, r.dataset_type) for r in results} == {("image-classification", "cifar10")}
    assert "This checkpoint was trained with **AttentionDrop**" in card.text
    assert "The last evaluation of the run, on the checkpoint at the end of training." in card.text
    assert "More information needed" not in card.text  # the card is ours, not the stock card edited


def test_a_plain_torch_module_trains_as_with_the_stock_trainer_and_is_refused_at_lambda_positive(tmp_path):
    class Linear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 3)

        def forward(self, features, labels=None):
            logits = self.layer(features)
            return {"loss": F.cross_entropy(logits, labels), "logits": logits}

    rows = [{"features": torch.randn(4), "labels": torch.tensor(i % 3)} for i in range(8)]
    trainer = make_trainer(Linear(), tmp_path, rows, consistency_weight=0.0, max_steps=2)
    trainer.train()
    assert trainer.state.global_step == 2
    with pytest.raises(ValueError, match="consistency_weight > 0 needs a transformers PreTrainedModel, got Linear"):
        make_trainer(Linear(), tmp_path, rows, consistency_weight=1.0)


def test_the_private_trainer_methods_we_override():
    """ConsistencyMixin overrides two private Trainer methods, only for huggingface/transformers#43701 (`_compat`);
    everything else goes through public methods and callbacks. This fails loudly when a Transformers release changes
    them: re-check the workaround, then update the signatures recorded here."""
    import inspect

    from attentiondrop_hf.hf import _compat

    overridden = {
        name
        for name in vars(ConsistencyMixin)
        if name.startswith("_") and not name.startswith("__") and hasattr(Trainer, name)
    }
    assert overridden == {"_load_from_checkpoint", "_load_best_model"}
    assert list(inspect.signature(Trainer._load_from_checkpoint).parameters) == [
        "self",
        "resume_from_checkpoint",
        "model",
    ]
    assert list(inspect.signature(Trainer._load_best_model).parameters) == ["self"]
    assert _compat.TRAINER_RELOADS_LEGACY_KEYS_WRONGLY, "the workaround's version range no longer covers this release"
