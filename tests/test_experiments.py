"""The experiments of issue #9: metric helpers against hand-computed cases, the runner's planning (skipping finished
runs), the table rendered from synthetic run JSONs, and the GPU protocol run end to end at a tiny size on the CPU."""

import copy
import dataclasses
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, Features, Image
from PIL import Image as PILImage

EXPERIMENTS = os.path.join(os.path.dirname(__file__), "..", "experiments")
sys.path.insert(0, os.path.join(EXPERIMENTS, "..", "recipes"))
sys.path.insert(0, EXPERIMENTS)

import measures  # noqa: E402
import metrics as recipe_metrics  # noqa: E402  (recipes/metrics: the recipe's local evaluate modules)
import render  # noqa: E402
import run  # noqa: E402
from testing_common import build_peaked, write_translation_fixture  # noqa: E402

# Four predictions whose confidences are exact binary fractions (no bin-edge rounding), 4 bins of width 1/4.
PROBS = np.array([[0.875, 0.125], [0.625, 0.375], [0.25, 0.75], [0.0625, 0.9375]])
LABELS = np.array([0, 1, 1, 0])  # right, wrong, right, wrong


# ----------------------------------------------------------------------------------------------------- metrics


def test_ece_matches_the_hand_computed_value_and_the_recipe_metric():
    # Bin 3 of 4 ((0.5, 0.75]): confidences 0.625 (wrong) and 0.75 (right, exactly on the edge: upper-inclusive):
    # |0.5 - 0.6875| * 2/4 = 0.09375. Bin 4 ((0.75, 1]): 0.875 (right), 0.9375 (wrong): |0.5 - 0.90625| * 2/4.
    expected = 0.09375 + 0.203125
    assert measures.expected_calibration_error(PROBS, LABELS, n_bins=4) == pytest.approx(expected, abs=1e-12)
    recipe = recipe_metrics.load("calibration").compute(
        predictions=PROBS.tolist(), references=LABELS.tolist(), n_bins=4, from_logits=False
    )
    assert recipe["ece"] == pytest.approx(expected, abs=1e-12)


def test_reliability_bins_hold_counts_confidences_and_hits():
    bins = measures.reliability_bins(PROBS, LABELS, n_bins=4)
    assert bins["count"] == [0, 0, 2, 2]
    assert bins["confidence_sum"] == pytest.approx([0, 0, 1.375, 1.8125])
    assert bins["correct"] == [0, 0, 1, 1]


def test_brier_score_hand_computed():
    # Per example sum over classes of (p - onehot)^2: 0.03125, 0.78125, 0.125, 1.7578125.
    assert measures.brier_score(PROBS, LABELS) == pytest.approx((0.03125 + 0.78125 + 0.125 + 1.7578125) / 4)
    uniform = np.full((3, 10), 0.1)
    assert measures.brier_score(uniform, np.array([0, 4, 9])) == pytest.approx(0.9)  # 1 - 1/C
    with pytest.raises(ValueError, match="class indices"):
        measures.brier_score(PROBS, np.array([0, 1, 2, 0]))


def test_classification_metrics_from_logits():
    logits = np.log(PROBS)  # softmax(log p) = p
    result = measures.classification_metrics(logits, LABELS, n_bins=4)
    assert result["accuracy"] == 0.5
    assert result["nll"] == pytest.approx(-np.mean(np.log([0.875, 0.375, 0.75, 0.0625])))
    assert result["brier"] == pytest.approx(measures.brier_score(PROBS, LABELS))


def test_pixel_box_converts_pixel_epsilons_and_bounds_through_the_normalisation():
    scale, lower, upper = measures.pixel_box([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
    assert scale.shape == (1, 3, 1, 1) and torch.all(scale == 2.0)  # 1/255 in pixels is 2/255 normalised
    assert torch.all(lower == -1.0) and torch.all(upper == 1.0)
    scale, lower, upper = measures.pixel_box([0.25], [0.5])
    assert lower.item() == -0.5 and upper.item() == 1.5
    with pytest.raises(ValueError, match="std > 0"):
        measures.pixel_box([0.5], [0.0])


def _linear(inputs):
    """Logits [w . x, 0] with w = (1, -1): for class 0 the loss rises fastest along (-1, +1)."""
    return torch.stack([inputs[:, 0] - inputs[:, 1], torch.zeros(len(inputs))], dim=1)


def test_pgd_steps_by_the_gradient_sign_and_projects_on_ball_and_box():
    clean, label = torch.tensor([[0.5, 0.5]]), torch.tensor([0])
    # Three steps of 0.04 along (-1, +1) = (0.38, 0.62); the ball of radius 0.1 clips to (0.4, 0.6).
    adversarial = measures.pgd_linf(_linear, clean, label, 0.1, 3, 0.04, 0.0, 1.0)
    assert torch.allclose(adversarial, torch.tensor([[0.4, 0.6]]))
    # The valid box [0, 0.55] clips the second coordinate further.
    adversarial = measures.pgd_linf(_linear, clean, label, 0.1, 3, 0.04, 0.0, 0.55)
    assert torch.allclose(adversarial, torch.tensor([[0.4, 0.55]]))
    assert torch.equal(measures.pgd_linf(_linear, clean, label, 0.1, 0, 0.04, 0.0, 1.0), clean)


def test_pgd_random_start_is_a_seeded_point_of_the_ball_inside_the_box():
    clean, label = torch.tensor([[0.5, 0.5]]), torch.tensor([0])
    start = measures.pgd_linf(
        _linear, clean, label, 0.1, 0, 0.04, 0.0, 0.55, random_start=torch.Generator().manual_seed(3)
    )
    expected = (clean + (2 * torch.rand(1, 2, generator=torch.Generator().manual_seed(3)) - 1) * 0.1).clamp(0.0, 0.55)
    assert torch.equal(start, expected) and not torch.equal(start, clean)
    again = measures.pgd_linf(
        _linear, clean, label, 0.1, 0, 0.04, 0.0, 0.55, random_start=torch.Generator().manual_seed(3)
    )
    assert torch.equal(start, again)  # the same start for every run: paired runs are attacked alike
    # From a random start, enough steps still reach the corner a clean-start attack reaches.
    strong = measures.pgd_linf(_linear, clean, label, 0.1, 20, 0.0125, 0.0, 1.0, random_start=torch.Generator())
    assert torch.allclose(strong, measures.pgd_linf(_linear, clean, label, 0.1, 20, 0.0125, 0.0, 1.0))
    right = torch.tensor([[0.6, 0.5]])  # margin 0.1: eps 0.02 cannot flip it, eps 0.1 can
    assert measures.pgd_correct(_linear, right, label, 0.02, 20, 0.0, 1.0, random_start_seed=0).tolist() == [True]
    assert measures.pgd_correct(_linear, right, label, 0.1, 20, 0.0, 1.0, random_start_seed=0).tolist() == [False]


def test_pgd_correct_flips_a_prediction_only_when_epsilon_allows():
    clean, label = torch.tensor([[0.6, 0.5]]), torch.tensor([0])  # margin w . x = 0.1: right
    # eps 0.02 moves the margin by at most 0.04: still right. eps 0.1 reaches (0.5, 0.6), margin -0.1: wrong.
    assert measures.pgd_correct(_linear, clean, label, 0.02, 10, 0.0, 1.0).tolist() == [True]
    assert measures.pgd_correct(_linear, clean, label, 0.1, 10, 0.0, 1.0).tolist() == [False]


def test_robust_accuracy_under_several_attacks_is_per_image():
    """An image counts as robust only if every attack failed on it: two attacks that each break a different image
    give 0.75 each and 0.5 together (not min(0.75, 0.75))."""
    clean_start = torch.tensor([True, False, True, True])
    random_start = torch.tensor([True, True, False, True])
    assert measures.robust_accuracy(clean_start) == 0.75
    assert measures.robust_accuracy(clean_start, random_start) == 0.5
    with pytest.raises(ValueError, match="same images"):
        measures.robust_accuracy(clean_start, random_start[:3])


def test_gradient_variance_hand_computed():
    """loss_k = c_k · w + d_k · v: gradients (c_k, d_k); c = (1, 2, 3), d = (0, 0, 3) -> mean (2, 1), variance
    ((1 + 0 + 1) + (1 + 1 + 4)) / 2 = 4, ||mean||^2 = 5."""
    w, v = torch.tensor(0.5, requires_grad=True), torch.tensor([-1.0], requires_grad=True)
    c, d = [1.0, 2.0, 3.0], [0.0, 0.0, 3.0]
    got = measures.gradient_variance(lambda k: c[k] * w + d[k] * v.sum(), [w, v], 3)
    assert got == pytest.approx({"variance": 4.0, "mean_norm_sq": 5.0, "noise_to_signal": 0.8})
    unused = torch.zeros(2, requires_grad=True)  # a parameter the loss does not touch counts as zero gradient
    assert measures.gradient_variance(lambda k: c[k] * w, [w, unused], 3)["variance"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least 2 minibatches"):
        measures.gradient_variance(lambda k: w, [w], 1)


def test_attention_entropy_hand_computed():
    uniform = torch.full((1, 1, 1, 4), 0.25)
    one_hot = torch.tensor([1.0, 0.0, 0.0, 0.0]).view(1, 1, 1, 4)
    half = torch.tensor([0.5, 0.5, 0.0, 0.0]).view(1, 1, 1, 4)
    assert measures.attention_entropy(uniform) == pytest.approx(math.log(4))
    assert measures.attention_entropy(one_hot) == 0.0
    rows = torch.cat([uniform, one_hot, half], dim=2)  # [1, 1, 3, 4]: the mean of the three rows
    assert measures.attention_entropy(rows) == pytest.approx((math.log(4) + math.log(2)) / 3)
    # A padded query (key_mask 0 at its position) leaves the mean: only the uniform and the one-hot row count.
    three = torch.tensor([[1 / 3, 1 / 3, 1 / 3], [0.0, 1.0, 0.0], [0.5, 0.5, 0.0]]).view(1, 1, 3, 3)
    assert measures.attention_entropy(three, key_mask=torch.tensor([[1, 1, 0]])) == pytest.approx(math.log(3) / 2)
    with pytest.raises(ValueError, match="batch, heads, queries, keys"):
        measures.attention_entropy(torch.ones(4, 4))


# ----------------------------------------------------------------------------------------------------- runner


def test_balanced_split_is_disjoint_balanced_and_fixed():
    labels = [0, 1, 2] * 5
    first, second = run.balanced_split(labels, 2, 1, seed=3)
    assert np.bincount(np.asarray(labels)[first]).tolist() == [2, 2, 2]
    assert np.bincount(np.asarray(labels)[second]).tolist() == [1, 1, 1]
    assert not set(first) & set(second)
    again = run.balanced_split(labels, 2, 1, seed=3)
    assert np.array_equal(first, again[0]) and np.array_equal(second, again[1])
    _, rest = run.balanced_split(labels, 2, None, seed=3)
    assert len(rest) == 9  # None: everything not in the first set
    with pytest.raises(ValueError, match="class 0 has 5 examples"):
        run.balanced_split(labels, 4, 2, seed=3)


def test_frozen_protocols_load_and_build_the_recipe_flags():
    small = run.load_protocol("cifar10-small")
    names = [row["name"] for row in small["rows"]]
    assert names[:7] == ["none", "attn_dropout", "rdrop", "hard", "blur", "hard_consistency", "blur_consistency"]
    data = {"train_file": "t.parquet", "validation_file": "v.parquet"}
    rdrop = run.recipe_argv(small, small["rows"][2], 1, data, "out", "cpu")
    overrides = rdrop[rdrop.index("--config_overrides") + 1]
    assert "hidden_dropout_prob=0.1" in overrides and "attention_probs_dropout_prob=0.0" in overrides
    flags = dict(zip(rdrop[::2], rdrop[1::2]))
    assert flags["--use_attentiondrop"] == "false" and flags["--consistency_kl"] == "symmetric"
    assert flags["--seed"] == "1" and flags["--use_cpu"] == "true" and flags["--eval_strategy"] == "no"
    gpu = run.load_protocol("cifar10-gpu")
    assert [row["name"] for row in gpu["rows"]][:7] == names[:7]
    flags = run.recipe_argv(gpu, gpu["rows"][0], 0, data, "out", "cuda")
    assert "--bf16" in flags and "--use_cpu" not in flags
    with pytest.raises(ValueError, match="unknown protocol 'nope'"):
        run.load_protocol("nope")
    with pytest.raises(ValueError, match=r"--rows \['typo'\]"):
        run.select_rows(small, ["typo"])


def _record(row, seed, accuracy, cpu_per_epoch):
    bins = {"count": [1, 1], "confidence_sum": [0.4, 0.9], "correct": [0, 1]}
    metrics_ = {
        "test_accuracy": accuracy,
        "test_ece": 0.1,
        "test_nll": 1.0,
        "test_brier": 0.5,
        "pgd_1_255_accuracy": 0.2,
        "pgd_2_255_accuracy": 0.1,
        "train_accuracy": 0.95,
        "overfit_gap": 0.95 - accuracy,
        "attention_entropy_last": 2.0,
        "reliability": bins,
    }
    return {
        "row": row,
        "seed": seed,
        "metrics": metrics_,
        "train_cpu_s_per_epoch": cpu_per_epoch,
        "train_wall_s_per_epoch": cpu_per_epoch / 2,
        "curves": [{"epoch": 1.0, "loss": 1.5, "task_loss": 1.5}],
        "machine": {"cpu": "test cpu", "cpu_cores": 2, "gpu": None, "torch": "x", "transformers": "y"},
    }


def _tiny_protocol(path):
    protocol = run.load_protocol("cifar10-small")
    protocol["rows"] = protocol["rows"][:4]
    with open(path, "w") as handle:
        json.dump(protocol, handle)
    return protocol


def test_render_writes_means_seeds_paired_differences_and_figures(tmp_path):
    protocol = _tiny_protocol(tmp_path / "protocol.json")
    for record in (
        _record("none", 0, 0.5, 10.0),
        _record("none", 1, 0.7, 10.0),
        _record("hard", 0, 0.6, 11.0),
        _record("hard", 1, 0.9, 12.0),
    ):
        run.write_json(run.run_path(str(tmp_path), record["row"], record["seed"]), record)
    text = render.render(str(tmp_path), protocol)
    means, diffs = text.split("**Paired difference")
    none_line = next(line for line in means.splitlines() if line.startswith("| none |"))
    hard_line = next(line for line in means.splitlines() if line.startswith("| hard |"))
    assert none_line.startswith("| none | 2 | 0.600 ± 0.141 |")  # 2 seeds; std with ddof = 1
    assert hard_line.startswith("| hard | 2 | 0.750 ± 0.212 |")
    assert "| 1.15 ± 0.07 |" in hard_line  # CPU time ratio to none per seed: 1.1 and 1.2
    hard_diff = next(line for line in diffs.splitlines() if line.startswith("| hard |"))
    # Paired: +0.1 and +0.2; 95 % t-interval, 1 degree of freedom: 0.15 ± 12.706 · 0.0707 / √2 = 0.15 ± 0.635.
    assert hard_diff.startswith("| hard | 2 | +0.150 [-0.485, +0.785] |")
    assert "| attn_dropout |" not in text  # rows without runs are left out, not zeros
    for figure in ("metrics.png", "differences.png", "reliability.png", "curves.png", "README.md"):
        assert (tmp_path / figure).is_file()


def test_paired_interval_is_the_t_interval_with_n_minus_one_degrees_of_freedom():
    mean, half = render.paired_interval([1.0, 2.0, 3.0])  # s = 1, t(0.975, 2) = 4.302653
    assert mean == 2.0 and half == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    assert not render.is_effect((mean, half))
    assert render.is_effect(render.paired_interval([1.0, 1.1, 0.9]))  # 1.0 ± 0.248
    assert render.paired_interval([0.3]) == (0.3, None) and not render.is_effect((0.3, None))
    assert render._interval_cell(render.paired_interval([1.0, 1.1, 0.9]), "{:.2f}") == "**+1.00** [+0.75, +1.25]"


def _write_images(path, n_per_class=6, classes=("cat", "dog")):
    rng = np.random.default_rng(0)
    images = [
        PILImage.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
        for _ in range(n_per_class * len(classes))
    ]
    labels = [i % len(classes) for i in range(len(images))]
    features = Features({"img": Image(), "label": ClassLabel(names=list(classes))})
    Dataset.from_dict({"img": images, "label": labels}, features=features).to_parquet(str(path))
    return str(path)


def test_rendering_again_keeps_the_hand_written_section(tmp_path):
    protocol = _tiny_protocol(tmp_path / "protocol.json")
    run.write_json(run.run_path(str(tmp_path), "none", 0), _record("none", 0, 0.5, 10.0))
    first = render.render(str(tmp_path), protocol)
    note = f"{render.HAND_WRITTEN_HEADING}\n\nThe baseline overfits.\n"
    (tmp_path / "README.md").write_text(first + "\n" + note)
    run.write_json(run.run_path(str(tmp_path), "hard", 0), _record("hard", 0, 0.6, 11.0))
    again = render.render(str(tmp_path), protocol)
    assert "| hard | 1 |" in again and again.endswith(note) and again.count(render.HAND_WRITTEN_HEADING) == 1


def test_runner_skips_runs_whose_json_exists_and_renders(tmp_path, monkeypatch):
    protocol_path = tmp_path / "protocol.json"
    _tiny_protocol(protocol_path)
    images = _write_images(tmp_path / "images.parquet")
    results = tmp_path / "results"
    run.write_json(run.run_path(str(results), "none", 0), _record("none", 0, 0.5, 10.0))
    launched = []

    def fake_launch(spec, log_path):
        launched.append((spec["row"], spec["seed"]))
        assert spec["argv"][spec["argv"].index("--validation_file") + 1] == images  # evaluated on the given data
        run.write_json(spec["result_path"], _record(spec["row"], spec["seed"], 0.6, 11.0))
        return 0

    monkeypatch.setattr(run, "launch", fake_launch)
    monkeypatch.setattr(run, "WORK", str(tmp_path / "work"))
    argv = [str(protocol_path), "--seeds", "0", "1", "--rows", "none", "hard", "--results_dir", str(results)]
    argv += ["--train_file", images, "--validation_file", images]
    argv += ["--set", "data.train_per_class=4", "data.validation_per_class=1"]
    assert run.main([*argv, "--parallel", "1"]) == 0
    assert launched == [("hard", 0), ("none", 1), ("hard", 1)]  # seed by seed; none-seed0 existed
    text = (results / "README.md").read_text()
    assert "| none | 2 |" in text and "| hard | 2 |" in text
    launched.clear()
    assert run.main(argv) == 0 and launched == []  # everything exists: nothing runs again
    for row in ("none", "hard"):
        os.remove(run.run_path(str(results), row, 1))
    assert run.main([*argv, "--parallel", "2"]) == 0  # two at a time: both missing runs, nothing else
    assert sorted(launched) == [("hard", 1), ("none", 1)]


def test_the_documented_own_data_command_trains_on_all_of_an_unbalanced_dataset(tmp_path, monkeypatch):
    """`run.py cifar10-small --train_file ... --validation_file ...` on a dataset whose classes are unbalanced (and
    smaller than the protocol's CIFAR subsets): every training image is used; asked-for subsets that a class cannot
    fill raise naming the `--set` to pass."""
    images = str(tmp_path / "images.parquet")
    rng = np.random.default_rng(0)
    labels = [0] * 9 + [1] * 3
    pixels = [PILImage.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)) for _ in labels]
    features = Features({"img": Image(), "label": ClassLabel(names=["cat", "dog"])})
    Dataset.from_dict({"img": pixels, "label": labels}, features=features).to_parquet(images)
    seen = []

    def fake_launch(spec, log_path):
        train = spec["argv"][spec["argv"].index("--train_file") + 1]
        seen.append(Dataset.from_parquet(train)["label"])
        run.write_json(spec["result_path"], _record(spec["row"], spec["seed"], 0.6, 11.0))
        return 0

    monkeypatch.setattr(run, "launch", fake_launch)
    monkeypatch.setattr(run, "WORK", str(tmp_path / "work"))
    argv = ["cifar10-small", "--rows", "none", "--seeds", "0", "--results_dir", str(tmp_path / "results")]
    assert run.main([*argv, "--train_file", images, "--validation_file", images]) == 0
    assert sorted(seen[0]) == sorted(labels)
    sizes = ["--set", "data.train_per_class=5", "data.validation_per_class=0"]
    with pytest.raises(ValueError, match=r"class 1 has 3 examples, .* data.train_per_class=3"):
        run.main([*argv, "--train_file", images, "--validation_file", images, *sizes])


@pytest.mark.slow
def test_gpu_protocol_runs_end_to_end_at_a_tiny_size_on_cpu(tmp_path, monkeypatch):
    """The GPU protocol's most involved row (AttentionDrop + consistency) through the recipe in a subprocess, every
    metric measured; one row keeps the file fast (the parallel pool is tested with a stand-in launcher above)."""
    images = _write_images(tmp_path / "images.parquet", n_per_class=8)
    monkeypatch.setattr(run, "WORK", str(tmp_path / "work"))
    results = tmp_path / "results"
    # Tiny model and data; logging every step so the curves hold the consistency term.
    tiny = (
        "model.hidden_size=16 model.num_hidden_layers=2 model.num_attention_heads=2 model.intermediate_size=32 "
        "num_train_epochs=1 per_device_train_batch_size=4 data.train_per_class=6 data.validation_per_class=2 "
        "dataloader_num_workers=0 logging_steps=1"
    ).split()
    argv = ["cifar10-gpu", "--device", "cpu", "--rows", "hard_consistency", "--seeds", "0", "--parallel", "1"]
    argv += ["--train_file", images, "--validation_file", images, "--results_dir", str(results), "--set", *tiny]
    assert run.main(argv) == 0
    record = json.loads((results / "runs" / "hard_consistency-seed0.json").read_text())
    assert record["epochs"] == 1.0 and record["train_cpu_s"] > 0 and record["machine"]["torch"] == torch.__version__
    got = record["metrics"]
    assert got["train_examples"] == 12 and got["test_examples"] == 16 and got["pgd_examples"] == 16
    assert got["test_accuracy"] == pytest.approx(record["recipe_results"]["eval_accuracy"])  # same eval path
    assert got["pgd_2_255_accuracy"] <= got["pgd_clean_accuracy"]
    assert got["pgd_2_255_rs20_accuracy"] <= got["pgd_clean_accuracy"]  # the stronger attack, measured too
    assert got["pgd_2_255_worst_accuracy"] <= min(got["pgd_2_255_accuracy"], got["pgd_2_255_rs20_accuracy"])
    assert 0 < got["attention_entropy_last"] <= got["attention_entropy_uniform"] + 1e-9
    assert any("consistency_loss" in point for point in record["curves"])
    assert "| hard_consistency | 1 |" in (results / "README.md").read_text()


PROTOCOL_NAMES = sorted(name[: -len(".json")] for name in os.listdir(run.PROTOCOLS) if name.endswith(".json"))


@pytest.mark.filterwarnings("ignore:the paper reports p <= 0.5")  # a sweep row goes past it on purpose
@pytest.mark.parametrize("name", PROTOCOL_NAMES)
def test_every_row_of_every_protocol_parses_in_its_recipe(name, tmp_path, monkeypatch):
    """A misspelt flag or a value of the wrong type in a protocol fails here, not hours into a run."""
    sys.path.insert(0, os.path.join(EXPERIMENTS, "..", "recipes"))
    from _common import parse_arguments

    monkeypatch.setattr(run, "pretrained_checkpoint", lambda pretrained: str(tmp_path / "pretrained"))
    protocol = run.load_protocol(name)
    recipe = __import__(run.TASKS[protocol["task"]])
    if protocol["task"] == "image-classification":
        data = {
            "train_file": _write_images(tmp_path / "images.parquet"),
            "validation_file": str(tmp_path / "images.parquet"),
        }
        classes = (recipe.ImageModelArguments, recipe.ImageDataArguments)
        training = recipe.AttentionDropTrainingArguments
    else:
        pairs = tmp_path / "pairs.jsonl"
        pairs.write_text(json.dumps({"translation": {"en": "a dog", "de": "ein Hund"}}) + "\n")
        data = {"train_file": str(pairs), "validation_file": str(pairs), "test_file": str(pairs)}
        classes = (recipe.TranslationModelArguments, recipe.TranslationDataArguments)
        training = recipe.AttentionDropSeq2SeqTrainingArguments
    for row in protocol["rows"]:
        argv = run.recipe_argv(protocol, row, 0, data, str(tmp_path / "out"), "cpu")
        model_args, _, training_args, attentiondrop = parse_arguments((*classes, training), argv)
        assert model_args.use_attentiondrop == row.get("args", {}).get("use_attentiondrop", True)
        assert training_args.consistency_weight == row.get("args", {}).get("consistency_weight", 0.0)
        assert training_args.eval_strategy == "no" and not training_args.load_best_model_at_end
        if model_args.use_attentiondrop:
            assert attentiondrop.variant == row["args"]["variant"]
            options = type(attentiondrop.options)()  # the package defaults, but for what the row sets
            expected = {k: v for k, v in row["args"].items() if hasattr(options, k)}
            assert attentiondrop.options == dataclasses.replace(options, **expected)
        if "pretrained" in protocol and not row.get("from_scratch"):
            assert model_args.model_name_or_path == str(tmp_path / "pretrained") and model_args.model_type is None
    if "select" in protocol:  # the winner rule names a measured column and, when it has one, a row of the sweep
        rule = protocol["select"]
        assert rule["metric"] in [key for key, *_ in render.columns_for(protocol["task"])]
        assert rule.get("kl_reference", "none") in [row["name"] for row in protocol["rows"]]
        assert all(row.get("method") for row in protocol["rows"] if row["name"] != render.BASELINE)


@pytest.mark.slow
def test_translation_protocol_runs_end_to_end_at_a_tiny_size(tmp_path, monkeypatch):
    """multi30k-small's most involved row (blur + consistency on encoder self-attention) through the Marian recipe
    in a subprocess, on a jsonl fixture laid out like ../shared/data/multi30k; BLEU and chrF in the record."""
    folder = tmp_path / "data" / "multi30k"
    folder.mkdir(parents=True)
    for split in ("train", "validation", "test"):
        write_translation_fixture(str(folder / f"{split}.jsonl"))
    monkeypatch.setenv("ATTENTIONDROP_DATA", str(tmp_path / "data"))
    monkeypatch.setattr(run, "WORK", str(tmp_path / "work"))
    results = tmp_path / "results"
    tiny = (
        "model.d_model=16 model.encoder_layers=1 model.decoder_layers=1 model.encoder_attention_heads=2 "
        "model.decoder_attention_heads=2 model.encoder_ffn_dim=32 model.decoder_ffn_dim=32 spm_vocab_size=300 "
        "num_train_epochs=1 per_device_train_batch_size=8 max_eval_samples=4 generation_max_length=8 "
        "generation_num_beams=1 logging_steps=1"
    ).split()
    argv = ["multi30k-small", "--rows", "blur_consistency", "--seeds", "0", "--results_dir", str(results)]
    assert run.main([*argv, "--set", *tiny]) == 0
    record = json.loads((results / "runs" / "blur_consistency-seed0.json").read_text())
    assert record["epochs"] == 1.0 and record["train_cpu_s"] > 0
    assert all(math.isfinite(record["metrics"][key]) for key in ("bleu", "chrf", "loss"))
    assert any("consistency_loss" in point for point in record["curves"])
    assert "| blur_consistency | 1 |" in (results / "README.md").read_text()


def test_a_user_error_on_the_command_line_is_one_line():
    command = [sys.executable, os.path.join(EXPERIMENTS, "run.py"), "no-such-protocol"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith("run.py: error: unknown protocol 'no-such-protocol'; protocols: [")


def test_gradient_variance_is_measured_at_every_checkpoint_in_training_mode(tmp_path):
    """Checkpoints and the final model, each in training mode with its own AttentionDrop flags: a perturbed model's
    gradients vary more over the same minibatches than with p = 0, whose figure equals the stock model's exactly."""
    from evaluate_images import gradient_variance_at_checkpoints

    from attentiondrop_hf import enable_attentiondrop

    torch.manual_seed(0)
    stock = build_peaked("vit")  # 16 px, 3 classes, no dropout
    pixels, labels = torch.randn(32, 3, 16, 16), torch.arange(32) % 3
    figures = {}
    for name, flags in (("stock", None), ("p0", {"p": 0.0}), ("hard", {"p": 0.5, "top_k": 4})):
        model = copy.deepcopy(stock)
        if flags is not None:
            enable_attentiondrop(model, variant="hard", **flags)
        model.save_pretrained(tmp_path / name)
        model.save_pretrained(tmp_path / name / "checkpoint-4")
        figures[name] = gradient_variance_at_checkpoints(
            str(tmp_path / name), pixels, labels, {"batches": 4, "batch_size": 8}, seed=0
        )
    assert list(figures["hard"]) == ["4", "final"]
    assert figures["p0"]["final"] == figures["stock"]["final"] == figures["stock"]["4"]
    assert figures["hard"]["final"]["variance"] != figures["stock"]["final"]["variance"]
    assert all(v["variance"] > 0 and v["mean_norm_sq"] > 0 for f in figures.values() for v in f.values())


def test_sweep_series_and_figure_follow_each_methods_strength(tmp_path):
    rows = [
        {"name": "none"},
        {"name": "h_p3_k8", "method": "hard_kl", "strength": {"p": 0.3, "top_k": 8}},
        {"name": "h_p1_k8", "method": "hard_kl", "strength": {"p": 0.1, "top_k": 8}},
        {"name": "h_p1_k32", "method": "hard_kl", "strength": {"p": 0.1, "top_k": 32}},
        {"name": "r_d1", "method": "rdrop", "strength": {"hidden_dropout_prob": 0.1}},
    ]
    protocol = {"name": "sweep", "task": "image-classification", "rows": rows}
    runs = [
        {
            "row": row["name"],
            "seed": 0,
            "test_accuracy": 0.4 + 0.01 * i,
            "test_nll": 1.8 - 0.01 * i,
            "curves": [{"epoch": 1, "loss": 1.0}]
            + ([{"epoch": 2, "loss": 0.9, "consistency_loss": 0.01 * i}] if i else []),
        }
        for i, row in enumerate(rows)
    ]
    series = render.sweep_series(runs, protocol)
    assert {name: [x for x, _ in points] for name, points in series.items()} == {
        "hard_kl, top_k=8": [0.1, 0.3],  # in increasing strength, whatever the protocol order
        "hard_kl, top_k=32": [0.1],
        "rdrop": [0.1],
    }
    assert render.final_consistency_loss(runs[3]) == 0.03 and render.final_consistency_loss(runs[0]) is None
    render._plot_sweep(runs, protocol, str(tmp_path / "sweep.png"))
    assert (tmp_path / "sweep.png").stat().st_size > 0
    translation = [{**r, "bleu": 10.0 + i, "loss": 4.0 - 0.1 * i} for i, r in enumerate(runs)]
    render._plot_sweep(translation, {**protocol, "task": "translation"}, str(tmp_path / "sweep_mt.png"))
    assert (tmp_path / "sweep_mt.png").stat().st_size > 0


def test_lambda_rows_form_a_line_through_the_row_at_lambda_one():
    rows = [
        {"name": "h", "method": "hard_kl", "strength": {"p": 0.5, "top_k": 32}},
        {"name": "h_l2", "method": "hard_kl", "strength": {"consistency_weight": 2.0, "p": 0.5, "top_k": 32}},
        {"name": "h_l05", "method": "hard_kl", "strength": {"consistency_weight": 0.5, "p": 0.5, "top_k": 32}},
    ]
    runs = [{"row": row["name"], "seed": 0} for row in rows]
    series = render.sweep_series(runs, {"rows": rows})
    assert [(x, run["row"]) for x, run in series["λ: hard_kl, p=0.5, top_k=32"]] == [
        (0.5, "h_l05"),
        (1.0, "h"),
        (2.0, "h_l2"),
    ]
    assert [x for x, _ in series["hard_kl, top_k=32"]] == [0.5]


def _sweep_runs(values: dict[str, tuple[float, float | None]]) -> list[dict]:
    """Runs with a metric and a final KL (None: no KL term)."""
    return [
        {"row": name, "seed": 0, "metric": metric, "curves": [] if kl is None else [{"consistency_loss": kl}]}
        for name, (metric, kl) in values.items()
    ]


def test_sweep_winners_follow_the_protocols_rule():
    rows = [{"name": "none"}] + [
        {"name": name, "method": name.split("_")[0], "strength": {"p": 0.1}} for name in ("a_1", "a_2", "a_3", "b_1")
    ]
    runs = _sweep_runs(
        {"none": (1.8, None), "a_1": (1.70, 0.1), "a_2": (1.60, 0.2), "a_3": (1.61, 0.4), "b_1": (1.5, 0.3)}
    )
    rule = {"metric": "metric", "higher_is_better": False, "tie": 0.02}
    winners = render.sweep_winners(runs, {"rows": rows, "select": rule})
    # Lowest metric per method; a_3 is 0.01 away (tied), a_1 0.1 away (not); rows without a method are not candidates.
    assert winners == {
        "a": {"row": "a_2", "value": 1.60, "tied": ["a_3"]},
        "b": {"row": "b_1", "value": 1.5, "tied": []},
    }
    # Higher is better, and only rows whose final KL is within a factor 2 of the reference row's (b_1: 0.3) count:
    # a_1 (KL 0.1) is out, a_2 (0.2) and a_3 (0.4) are in.
    rule = {"metric": "metric", "higher_is_better": True, "tie": 0.005, "kl_within_factor": 2, "kl_reference": "b_1"}
    winners = render.sweep_winners(runs, {"rows": rows, "select": rule})
    assert winners["a"] == {"row": "a_3", "value": 1.61, "tied": []}
    assert render.sweep_winners(runs, {"rows": rows}) == {}  # no rule, no winner
    text = "\n".join(render._winners_table(runs, {"rows": rows, "select": rule, "eval_split": "validation"}))
    assert "| a | `a_3` | 1.610 | — |" in text and "within a factor 2 of `b_1`" in text


def _measured(**variances: float) -> dict:
    return {label: {"variance": v, "mean_norm_sq": 1.0, "noise_to_signal": v} for label, v in variances.items()}


def test_gradient_variance_table_gives_paired_ratios_to_none():
    """none: 4 and 8 at step 10 for seeds 0, 1; hard: 2 and 6 -> ratios 0.5 and 0.75, mean 0.625, half-width
    t(0.975, 1) * std / sqrt(2) = 12.706 * 0.17678 / 1.4142 = 1.588 (the interval contains 1: not bold)."""
    runs = [
        {"row": "none", "seed": 0, "gradient_variance": _measured(**{"10": 4.0, "20": 2.0, "final": 2.0})},
        {"row": "none", "seed": 1, "gradient_variance": _measured(**{"10": 8.0, "20": 4.0, "final": 3.0})},
        {"row": "hard", "seed": 0, "gradient_variance": _measured(**{"10": 2.0, "20": 1.0, "final": 1.0})},
        {"row": "hard", "seed": 1, "gradient_variance": _measured(**{"10": 6.0, "20": 1.0, "final": 1.5})},
        {"row": "other", "seed": 0},  # a row without the measure is left out
    ]
    assert render.gradient_variance_points(runs[0]) == {"10": 4.0, "20": 2.0}  # final = step 20: not repeated
    assert render.gradient_variance_points(runs[1]) == {"10": 8.0, "20": 4.0, "end": 3.0}
    protocol = {"rows": [{"name": "none"}, {"name": "hard"}, {"name": "other"}]}
    lines = render.gradient_variance_table(runs, protocol)
    assert lines[2] == "| row | seeds | step 10 | step 20 | step end |"
    assert lines[4] == "| none | 2 | 6 | 3 | 3 |"
    # Step 20: ratios 0.5 and 0.25, mean 0.375, half-width 12.706 * 0.17678 / 1.4142 = 1.588.
    assert lines[5] == "| hard | 2 | 4 (×0.62 [-0.96, 2.21]) | 1 (×0.38 [-1.21, 1.96]) | 1.5 (×0.50) |"
    assert not any(line.startswith("| other") for line in lines)
    assert render.gradient_variance_table([{"row": "none", "seed": 0}], protocol) == []
    same = (
        [{**r, "gradient_variance": _measured(**{"10": 4.0})} for r in runs[:1]]
        + [{"row": "hard", "seed": s, "gradient_variance": _measured(**{"10": 3.6 + 0.01 * s})} for s in (0, 1)]
        + [{"row": "none", "seed": 1, "gradient_variance": _measured(**{"10": 4.0})}]
    )
    assert "**×0.90 [" in render.gradient_variance_table(same, protocol)[5]  # a tight 10 % drop is an effect


def test_data_classes_keep_only_those_classes_in_every_split_as_plain_integers(tmp_path, monkeypatch):
    monkeypatch.setattr(run, "WORK", str(tmp_path / "work"))
    classes = ("a", "b", "c", "d")
    images = _write_images(tmp_path / "images.parquet", n_per_class=6, classes=classes)
    spec = {"train_per_class": 3, "validation_per_class": 2, "subset_seed": 0, "classes": [2, 3]}
    paths = run.prepare_image_data(spec, images, images, "label", "test")
    from datasets import load_dataset

    splits = {name: load_dataset("parquet", data_files=path, split="train") for name, path in paths.items()}
    assert set(splits) == {"train_file", "validation_file"} and "test.parquet" in paths["validation_file"]
    for dataset in splits.values():
        assert set(dataset["label"]) == {2, 3} and dataset.features["label"].dtype == "int64"
    assert len(splits["train_file"]) == 6 and len(splits["validation_file"]) == 12  # 3 a class; all of the test file
    with pytest.raises(ValueError, match=r"data.classes \[7\] have no examples"):
        run.prepare_image_data({**spec, "classes": [2, 7]}, images, images, "label", "test")


def test_a_fine_tuning_protocol_starts_from_its_recorded_pretrained_checkpoint(tmp_path, monkeypatch):
    import hashlib

    monkeypatch.setattr(run, "WORK", str(tmp_path / "work"))
    protocol = run.load_protocol("cifar10-small")
    protocol["pretrained"] = {"protocol": "pre", "row": "none", "seed": 0, "sha256": None}
    row = {"name": "none", "args": {"use_attentiondrop": False}, "model_config": {"hidden_dropout_prob": 0.1}}
    with pytest.raises(ValueError, match=r"run `python experiments/run.py pre --rows none --seeds 0` first"):
        run.recipe_argv(protocol, row, 0, {}, str(tmp_path / "out"), "cpu")
    folder = tmp_path / "work" / "checkpoints" / "pre" / "none-seed0"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights")
    argv = run.recipe_argv(protocol, row, 0, {}, str(tmp_path / "out"), "cpu")
    assert argv[argv.index("--model_name_or_path") + 1] == str(folder) and "--model_type" not in argv
    assert argv[argv.index("--config_overrides") + 1] == "hidden_dropout_prob=0.1"  # only the row's own change
    scratch = run.recipe_argv(protocol, {**row, "from_scratch": True}, 0, {}, str(tmp_path / "out"), "cpu")
    assert "--model_name_or_path" not in scratch and scratch[scratch.index("--model_type") + 1] == "vit"
    protocol["pretrained"]["sha256"] = hashlib.sha256(b"weights").hexdigest()
    assert run.recipe_argv(protocol, row, 0, {}, str(tmp_path / "out"), "cpu")
    protocol["pretrained"]["sha256"] = "0" * 64
    with pytest.raises(ValueError, match="a different pretraining run"):
        run.recipe_argv(protocol, row, 0, {}, str(tmp_path / "out"), "cpu")
