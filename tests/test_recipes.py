"""The recipes run offline end to end; their metrics, cards, Hub upload and bad-input errors."""

import io
import json
import math
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import sacrebleu
import torch
import yaml
from datasets import ClassLabel, Dataset, Features, Image, Value
from huggingface_hub import HfApi
from PIL import Image as PILImage
from testing_common import SHARED_DATA, write_translation_fixture

RECIPES = os.path.join(os.path.dirname(__file__), "..", "recipes")
sys.path.insert(0, RECIPES)

import _common  # noqa: E402
import marian_translation  # noqa: E402
import metrics  # noqa: E402
import vit_image_classification  # noqa: E402

CIFAR10 = os.path.join(SHARED_DATA, "cifar10")
MULTI30K = os.path.join(SHARED_DATA, "multi30k")
TINY_VIT = (
    "image_size=32,patch_size=8,hidden_size=32,num_hidden_layers=2,num_attention_heads=4,intermediate_size=64,"
    "initializer_range=0.2"
)
TINY_MARIAN = (
    "d_model=32,encoder_layers=2,decoder_layers=2,encoder_attention_heads=4,decoder_attention_heads=4,"
    "encoder_ffn_dim=64,decoder_ffn_dim=64,max_position_embeddings=64"
)
QUICK_TRAINING = ["--max_steps", "3", "--per_device_train_batch_size", "8", "--report_to", "none", "--seed", "0"]


def write_image_fixture(directory, as_parquet):
    """Twelve random 32x32 RGB images of two classes, as a parquet file or an image folder."""
    rng = np.random.default_rng(0)
    images = [PILImage.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(12)]
    labels = [i % 2 for i in range(12)]
    if as_parquet:
        features = Features({"img": Image(), "label": ClassLabel(names=["cat", "dog"])})
        path = os.path.join(directory, "images.parquet")
        Dataset.from_dict({"img": images, "label": labels}, features=features).to_parquet(path)
        return path
    for index, (image, label) in enumerate(zip(images, labels)):
        os.makedirs(os.path.join(directory, ["cat", "dog"][label]), exist_ok=True)
        image.save(os.path.join(directory, ["cat", "dog"][label], f"{index}.png"))
    return directory


def cifar10_files(tmp_path):
    """The shared CIFAR-10 when present, else a parquet fixture with the same columns."""
    if os.path.isfile(os.path.join(CIFAR10, "train.parquet")):
        return os.path.join(CIFAR10, "train.parquet"), os.path.join(CIFAR10, "test.parquet")
    path = write_image_fixture(str(tmp_path), as_parquet=True)
    return path, path


def multi30k_files(tmp_path):
    """The shared Multi30k when present, else a small jsonl fixture."""
    if os.path.isfile(os.path.join(MULTI30K, "train.jsonl")):
        return [os.path.join(MULTI30K, f"{split}.jsonl") for split in ("train", "validation", "test")]
    path = write_translation_fixture(str(tmp_path / "pairs.jsonl"))
    return [path, path, path]


def vit_argv(output_dir, train_file, validation_file=None, *extra):
    argv = ["--train_file", train_file, "--model_type", "vit", "--config_overrides", TINY_VIT]
    argv += ["--validation_file", validation_file] if validation_file else []
    argv += ["--max_train_samples", "12", "--max_eval_samples", "16", "--output_dir", str(output_dir)]
    return (
        argv
        + ["--variant", "blur", "--blur_sigma_max", "2.0", "--consistency_weight", "1.0"]
        + QUICK_TRAINING
        + list(extra)
    )


def read_card(output_dir):
    text = open(os.path.join(output_dir, "README.md"), encoding="utf-8").read()
    metadata = yaml.safe_load(text.split("---")[1])
    return text, metadata


@pytest.mark.slow
def test_demo_config_learns_and_saves_a_card(tmp_path):
    """The README's main job, as configured: the ViT must visibly learn the digits."""
    config = os.path.join(RECIPES, "configs", "demo_digits.json")
    results = vit_image_classification.main([config, "--output_dir", str(tmp_path)])
    assert results["eval_accuracy"] > 0.8  # chance is 0.1
    saved = json.load(open(tmp_path / "config.json"))
    assert saved["attentiondrop"]["variant"] == "hard" and "attn_implementation" not in saved
    text, metadata = read_card(tmp_path)
    assert {"attentiondrop", "attentiondrop-hard"} <= set(metadata["tags"])
    assert "This model was trained from scratch on the sklearn_digits dataset." in text


@pytest.mark.slow
def test_vit_recipe_on_cifar10_parquet(tmp_path):
    train, validation = cifar10_files(tmp_path)
    results = vit_image_classification.main(vit_argv(tmp_path / "run", train, validation))
    assert {"eval_accuracy", "eval_ece", "eval_nll"} <= set(results)
    assert 0 <= results["eval_ece"] <= 1 and results["eval_nll"] > 0


def test_vit_recipe_on_an_image_folder_and_its_card(tmp_path):
    folder = write_image_fixture(str(tmp_path / "images"), as_parquet=False)
    output_dir = tmp_path / "run"
    results = vit_image_classification.main(
        vit_argv(output_dir, folder, None, "--layers", "1", "--logging_steps", "1")
    )
    text, metadata = read_card(output_dir)
    assert metadata["tags"][:2] == ["attentiondrop", "attentiondrop-blur"]
    indexed = {m["type"]: m["value"] for m in metadata["model-index"][0]["results"][0]["metrics"]}
    assert indexed == pytest.approx(
        {k[len("eval_") :]: results[k] for k in ("eval_accuracy", "eval_ece", "eval_nll", "eval_loss")}
    )
    assert "## Model description\n\nThis checkpoint was trained with **AttentionDrop**" in text
    assert "**Blurred Attention Smoothing**" in text and "| `blur_sigma_max` | `2.0` |" in text
    assert "1.0 × KL(p1 ‖ p2) (the paper's direction)" in text
    assert "Perturbed attention: bidirectional self-attention, layers 1 of each stack." in text
    assert f"| eval_accuracy | {results['eval_accuracy']:.4f} |" in text
    assert "Inference needs no plugin" in text and "arXiv:2504.12088" in text
    assert "[](" not in text and "More information needed\n\n## Training procedure" not in text
    assert "![Training curves](training_curves.png)" in text and (output_dir / "training_curves.png").is_file()


def test_vit_recipe_encodes_plain_integer_labels_in_numeric_order(tmp_path):
    """Labels stored as plain integers (no ClassLabel), not starting at 0, with 10 sorting after 2 as text."""
    rng = np.random.default_rng(0)
    images = [PILImage.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(9)]
    path = str(tmp_path / "ints.parquet")
    features = Features({"img": Image(), "label": Value("int64")})
    Dataset.from_dict({"img": images, "label": [2, 10, 7] * 3}, features=features).to_parquet(path)
    vit_image_classification.main(vit_argv(tmp_path / "run", path, path))
    saved = json.load(open(tmp_path / "run" / "config.json"))
    assert saved["id2label"] == {"0": "2", "1": "7", "2": "10"}


@pytest.mark.slow
def test_marian_recipe_on_multi30k_with_a_trained_tokenizer(tmp_path):
    train, validation, test = multi30k_files(tmp_path)
    argv = ["--train_file", train, "--validation_file", validation, "--test_file", test]
    argv += ["--model_type", "marian", "--config_overrides", TINY_MARIAN, "--spm_vocab_size", "300"]
    argv += ["--max_train_samples", "64", "--max_eval_samples", "8", "--max_predict_samples", "8"]
    argv += ["--targets", "self", "causal", "cross", "--variant", "hard", "--top_k", "4", "--consistency_weight", "1"]
    argv += ["--predict_with_generate", "true", "--generation_max_length", "8", "--generation_num_beams", "1"]
    results = marian_translation.main(argv + ["--output_dir", str(tmp_path / "run")] + QUICK_TRAINING)
    assert {"eval_bleu", "eval_chrf", "test_bleu", "test_chrf", "test_bleu_brevity_penalty"} <= set(results)
    assert 0 < results["test_bleu_brevity_penalty"] <= 1 and results["test_length_ratio"] > 0
    assert all(math.isfinite(results[k]) for k in ("eval_bleu", "eval_chrf", "eval_loss"))
    assert (tmp_path / "run" / "source.spm").is_file() and (tmp_path / "run" / "vocab.json").is_file()
    saved = json.load(open(tmp_path / "run" / "config.json"))
    assert saved["attentiondrop"]["targets"] == ["self", "causal", "cross"]
    text, metadata = read_card(tmp_path / "run")
    assert "attentiondrop-hard" in metadata["tags"] and metadata["language"] == ["en", "de"]
    assert "causal self-attention, encoder-decoder cross-attention" in text


@pytest.mark.slow
def test_push_to_hub_uploads_the_checkpoint_card_and_flags(tmp_path, monkeypatch):
    """Intercepted at the huggingface_hub boundary: what would be uploaded, without a network."""
    uploads = []

    def create_repo(self, repo_id, **kwargs):
        from huggingface_hub import RepoUrl

        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, ignore_patterns=None, run_as_future=False, **kwargs):
        snapshot = {}
        for name in os.listdir(folder_path):
            path = os.path.join(folder_path, name)
            if os.path.isfile(path) and not name.startswith("_"):
                snapshot[name] = open(path, "rb").read()
        uploads.append((repo_id, snapshot))
        if run_as_future:
            from concurrent.futures import Future

            future = Future()
            future.set_result(None)
            return future
        return None

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    train, validation = cifar10_files(tmp_path)
    argv = vit_argv(tmp_path / "run", train, validation, "--push_to_hub", "true", "--hub_model_id", "me/vit-ad")
    vit_image_classification.main(argv)

    repo_id, files = uploads[-1]
    assert repo_id == "me/vit-ad"
    assert json.loads(files["config.json"])["attentiondrop"]["variant"] == "blur"
    assert "model.safetensors" in files and "preprocessor_config.json" in files
    card = files["README.md"].decode()
    assert "- attentiondrop-blur" in card and "## Model description\n\nThis checkpoint was trained with" in card


def test_calibration_metric_against_a_hand_computed_case():
    probabilities = [[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.45, 0.55]]
    result = metrics.load("calibration").compute(predictions=probabilities, references=[0, 1, 1, 0], from_logits=False)
    # Confidences 0.9 (right), 0.6 (wrong), 0.7 (right), 0.55 (wrong) fall in bins 13, 8, 10, 8 of 15:
    # bin 8: 2/4 * |0 - 0.575| ; bin 10: 1/4 * |1 - 0.7| ; bin 13: 1/4 * |1 - 0.9|
    assert result["ece"] == pytest.approx(0.5 * 0.575 + 0.25 * 0.3 + 0.25 * 0.1)
    assert result["accuracy"] == 0.5
    assert result["nll"] == pytest.approx(-(math.log(0.9) + math.log(0.4) + math.log(0.7) + math.log(0.45)) / 4)
    logits = metrics.load("calibration").compute(predictions=[[math.log(0.9), math.log(0.1)]], references=[0])
    assert logits["ece"] == pytest.approx(0.1) and logits["nll"] == pytest.approx(-math.log(0.9))


def test_sacrebleu_metric_equals_sacrebleu():
    hypotheses = ["ein Hund rennt im Park .", "zwei Männer spielen Fußball", "eine Frau liest"]
    references = ["ein Hund läuft im Park .", "zwei Männer spielen Fußball .", "eine Frau liest ein Buch"]
    result = metrics.load("sacrebleu_chrf").compute(predictions=hypotheses, references=[[r] for r in references])
    assert result["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hypotheses, [references]).score)
    assert result["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hypotheses, [references]).score)
    bleu = sacrebleu.corpus_bleu(hypotheses, [references])
    assert (result["hypothesis_length"], result["reference_length"]) == (bleu.sys_len, bleu.ref_len) == (13, 16)
    assert result["bleu_brevity_penalty"] == pytest.approx(math.exp(1 - 16 / 13))  # shorter outputs: penalised
    assert 0 < result["bleu"] < 100


def test_vit_recipe_bad_input_errors(tmp_path):
    train, validation = cifar10_files(tmp_path)
    garbage = tmp_path / "broken.parquet"
    garbage.write_bytes(b"not a parquet file")
    no_images = tmp_path / "labels.parquet"
    Dataset.from_dict({"label": [0, 1]}).to_parquet(str(no_images))
    cases = [
        (vit_argv(tmp_path, str(tmp_path / "missing.parquet")), "--train_file '.*missing.parquet' does not exist"),
        (vit_argv(tmp_path, str(garbage)), "could not read --train_file"),
        (vit_argv(tmp_path, str(no_images)), r"no image column \('image' or 'img'\)"),
        (vit_argv(tmp_path, train, validation, "--label_column_name", "class"), "--label_column_name 'class'"),
        (vit_argv(tmp_path, train, validation, "--image_column_name", "pixels"), "--image_column_name 'pixels'"),
        (vit_argv(tmp_path, train, validation, "--top_kk", "3"), r"not used by the HfArgumentParser: \['--top_kk'"),
        (vit_argv(tmp_path, train, validation, "--p", "1.5"), r"`p` must be in \[0, 1\]"),
        (
            vit_argv(tmp_path, train, validation, "--model_type", "convnext", "--config_overrides", ""),
            "does not route its attention through transformers' AttentionInterface",
        ),
        (vit_argv(tmp_path, train, None, "--model_name_or_path", "my/vit"), "cannot be combined with"),
    ]
    for argv, message in cases:
        with pytest.raises(ValueError, match=message):
            vit_image_classification.main(argv)


def test_marian_recipe_bad_input_errors(tmp_path):
    pairs = write_translation_fixture(str(tmp_path / "pairs.jsonl"))
    not_translation = tmp_path / "text.jsonl"
    not_translation.write_text(json.dumps({"text": "hello"}) + "\n")
    base = ["--model_type", "marian", "--config_overrides", TINY_MARIAN, "--output_dir", str(tmp_path / "run")]
    cases = [
        (["--train_file", str(tmp_path / "none.jsonl")], "--train_file '.*none.jsonl' does not exist"),
        (["--train_file", str(not_translation)], r"text.jsonl, line 1: expected \{\"translation\""),
        (["--train_file", pairs, "--target_lang", "fr"], r"line 1: --target_lang 'fr' is not a language of this row"),
        (["--train_file", pairs, "--source_lang", "de"], "--source_lang and --target_lang are both 'de'"),
        (["--train_file", pairs, "--targets", "decoder"], r"`targets` must be roles from"),
    ]
    for argv, message in cases:
        with pytest.raises(ValueError, match=message):
            marian_translation.main(base + argv)


def test_marian_recipe_names_the_file_row_and_language_of_a_bad_row(tmp_path):
    base = ["--model_type", "marian", "--config_overrides", TINY_MARIAN, "--output_dir", str(tmp_path / "run")]
    good = {"translation": {"en": "a dog", "de": "ein hund"}}
    rows = {
        "missing": {"translation": {"en": "a cat"}},
        "null": {"translation": {"en": "a cat", "de": None}},
        "empty": {"translation": {"en": "   ", "de": "eine katze"}},
    }
    messages = {
        "missing": r"missing.jsonl, line 2: --target_lang 'de' is not a language of this row \(languages: \['en'\]\)",
        "null": r"null.jsonl, line 2: --target_lang 'de' is null, not a sentence",
        "empty": r"empty.jsonl, line 2: --source_lang 'en' is \"   \", not a sentence",
    }
    for name, row in rows.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
        with pytest.raises(ValueError, match=messages[name]):
            marian_translation.main(base + ["--train_file", str(path)])
    malformed, empty = tmp_path / "malformed.jsonl", tmp_path / "nothing.jsonl"
    malformed.write_text(json.dumps(good) + "\n" + '{"translation": {"en": "a"\n')
    empty.write_text("\n")
    with pytest.raises(ValueError, match=r"malformed.jsonl, line 2: not valid JSON"):
        marian_translation.main(base + ["--train_file", str(malformed)])
    with pytest.raises(ValueError, match=r"nothing.jsonl holds no examples"):
        marian_translation.main(base + ["--train_file", str(empty)])
    assert not (tmp_path / "run" / "tokenizer").exists()  # refused before a tokenizer was trained


def test_vit_recipe_names_the_file_and_row_of_an_undecodable_image(tmp_path):
    rng = np.random.default_rng(0)
    encoded = []
    for _ in range(3):
        buffer = io.BytesIO()
        PILImage.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buffer, format="PNG")
        encoded.append({"bytes": buffer.getvalue(), "path": None})
    encoded[2] = {"bytes": b"\x89PNG but not really", "path": None}
    path = str(tmp_path / "corrupt.parquet")
    features = Features({"img": Image(), "label": Value("int64")})
    Dataset.from_dict({"img": encoded, "label": [0, 1, 0]}, features=features).to_parquet(path)
    with pytest.raises(ValueError, match=r"corrupt.parquet: row 2 of column 'img': the image cannot be decoded"):
        vit_image_classification.main(vit_argv(tmp_path / "run", path, path))


@pytest.mark.parametrize("stored_as", ["bytes", "records"])
def test_vit_recipe_trains_on_a_parquet_written_with_pandas(tmp_path, stored_as):
    """pandas writes no `datasets.Image` metadata: the column arrives as plain bytes or {bytes, path} records. The
    recipe types it as images before its decode check, so training decodes what the check decoded."""
    import pandas as pd

    rng = np.random.default_rng(0)
    encoded = []
    for _ in range(8):
        buffer = io.BytesIO()
        PILImage.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buffer, format="PNG")
        encoded.append(buffer.getvalue() if stored_as == "bytes" else {"bytes": buffer.getvalue(), "path": None})
    path = str(tmp_path / "pandas.parquet")
    pd.DataFrame({"img": encoded, "label": [0, 1] * 4}).to_parquet(path)
    results = vit_image_classification.main(vit_argv(tmp_path / "run", path, path))
    assert math.isfinite(results["eval_loss"])

    corrupt = str(tmp_path / "pandas_corrupt.parquet")
    encoded[5] = b"not an image" if stored_as == "bytes" else {"bytes": b"not an image", "path": None}
    pd.DataFrame({"img": encoded, "label": [0, 1] * 4}).to_parquet(corrupt)
    with pytest.raises(ValueError, match=r"pandas_corrupt.parquet: row 5 of column 'img': the image cannot be"):
        vit_image_classification.main(vit_argv(tmp_path / "run", corrupt, corrupt))


def test_vit_recipe_refuses_an_image_column_that_holds_no_images(tmp_path):
    import pandas as pd

    path = str(tmp_path / "numbers.parquet")
    pd.DataFrame({"img": [[1.0, 2.0]] * 4, "label": [0, 1] * 2}).to_parquet(path)
    with pytest.raises(ValueError, match=r"numbers.parquet: column 'img' holds .*, not images"):
        vit_image_classification.main(vit_argv(tmp_path / "run", path, path))


WORLD_SIZE_CHECK = """
import logging, sys
sys.path.insert(0, {recipes!r})
logging.basicConfig(level=logging.WARNING)
import _common
from transformers import TrainingArguments
arguments = dict(item.split("=") for item in sys.argv[1:])
_common.warn_if_processes_do_not_sync(TrainingArguments(output_dir={output!r}, report_to="none", **arguments))
"""


@pytest.mark.slow
def test_recipes_warn_when_launched_processes_do_not_synchronise(tmp_path):
    """torchrun on a CPU without --use_cpu true --ddp_backend gloo trains unsynchronised copies: the recipes say so."""
    script = tmp_path / "check.py"
    script.write_text(WORLD_SIZE_CHECK.format(recipes=RECIPES, output=str(tmp_path / "out")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    outputs = {}
    for port, arguments in ((29541, []), (29542, ["use_cpu=True", "ddp_backend=gloo"])):
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}"]
        command += [str(script), *arguments]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        outputs[bool(arguments)] = done.stdout + done.stderr
    assert "2 processes were launched (WORLD_SIZE=2) but they do not synchronise" in outputs[False]
    assert "--use_cpu true --ddp_backend gloo" in outputs[False]
    assert "do not synchronise" not in outputs[True]


@pytest.mark.parametrize("recipe", ["vit_image_classification.py", "marian_translation.py"])
def test_a_user_error_on_the_command_line_is_one_line(tmp_path, recipe):
    command = [sys.executable, os.path.join(RECIPES, recipe), "--train_file", str(tmp_path / "missing.jsonl")]
    done = subprocess.run(command + ["--output_dir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    error = [line for line in done.stderr.splitlines() if "error:" in line]
    assert error == [f"{recipe}: error: --train_file '{tmp_path / 'missing.jsonl'}' does not exist"]
    assert "Traceback" not in done.stderr and "ATTENTIONDROP_TRACEBACK=1 shows the traceback" in done.stderr


def test_config_files_and_flags_are_checked_before_anything_loads(tmp_path):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"output_dir": "x",}')
    not_object = tmp_path / "list.json"
    not_object.write_text("[1, 2]")
    cases = [
        ([str(tmp_path / "missing.json")], r"config file '.*missing.json' does not exist"),
        ([str(bad_json)], r"config file '.*bad.json' is not valid JSON"),
        ([str(not_object)], r"must hold a JSON object of flags, got list"),
    ]
    for argv, message in cases:
        with pytest.raises(ValueError, match=message):
            vit_image_classification.main(argv)
    train, validation = cifar10_files(tmp_path)
    with pytest.raises(ValueError, match=r"not used by the HfArgumentParser: \['--num_train_epoch', '2'\]"):
        vit_image_classification.main(vit_argv(tmp_path / "run", train, validation, "--num_train_epoch", "2"))


CONFIGS = sorted(os.listdir(os.path.join(RECIPES, "configs")))


def recipe_of(name):
    return marian_translation if name.startswith("marian") else vit_image_classification


def recipe_argument_types(recipe):
    if recipe is marian_translation:
        return (
            marian_translation.TranslationModelArguments,
            marian_translation.TranslationDataArguments,
            marian_translation.AttentionDropSeq2SeqTrainingArguments,
        )
    return (
        vit_image_classification.ImageModelArguments,
        vit_image_classification.ImageDataArguments,
        vit_image_classification.AttentionDropTrainingArguments,
    )


@pytest.mark.parametrize("name", CONFIGS)
def test_every_shipped_config_parses(name, tmp_path, monkeypatch):
    monkeypatch.setenv("ATTENTIONDROP_DATA", str(tmp_path))  # data paths need not exist to parse
    for directory in ("cifar10", "multi30k"):
        os.makedirs(tmp_path / directory, exist_ok=True)
        for split in ("train.parquet", "test.parquet", "train.jsonl", "validation.jsonl", "test.jsonl"):
            (tmp_path / directory / split).touch()
    recipe = recipe_of(name)
    argv = [os.path.join(RECIPES, "configs", name), "--use_cpu", "true"]  # bf16 configs are for GPUs
    parsed = _common.parse_arguments(recipe_argument_types(recipe), argv)
    settings = parsed[-1]
    assert settings.variant in ("hard", "blur") and parsed[2].output_dir.startswith("outputs/")


LOCAL_CONFIGS = [name for name in CONFIGS if "hub" not in name]


@pytest.mark.slow
@pytest.mark.parametrize("name", LOCAL_CONFIGS)
def test_every_local_config_runs_a_couple_of_steps(name, tmp_path):
    data = "multi30k" if name.startswith("marian") else "cifar10"
    if name != "demo_digits.json" and not os.path.isdir(os.path.join(SHARED_DATA, data)):
        pytest.skip(f"../shared/data/{data} is not on this machine")
    argv = [os.path.join(RECIPES, "configs", name), "--output_dir", str(tmp_path), "--max_steps", "2"]
    argv += ["--eval_strategy", "no", "--save_strategy", "no", "--load_best_model_at_end", "false"]
    argv += ["--max_train_samples", "64", "--max_eval_samples", "16", "--per_device_train_batch_size", "8"]
    argv += ["--dataloader_num_workers", "0"]
    if name.startswith("marian"):
        argv += ["--max_predict_samples", "8", "--generation_num_beams", "1", "--spm_vocab_size", "300"]
    results = recipe_of(name).main(argv)
    assert math.isfinite(results["eval_loss"])


@pytest.mark.slow
def test_rerunning_into_an_output_dir_resumes_from_its_last_checkpoint(tmp_path, caplog):
    train, validation = cifar10_files(tmp_path)
    output_dir = tmp_path / "run"
    common = ["--save_strategy", "steps", "--save_steps", "2", "--logging_steps", "1"]
    vit_image_classification.main(vit_argv(output_dir, train, validation, *common, "--max_steps", "2"))
    assert (output_dir / "checkpoint-2").is_dir()
    with caplog.at_level("WARNING"):
        vit_image_classification.main(vit_argv(output_dir, train, validation, *common, "--max_steps", "4"))
    assert "Resuming from" in caplog.text and "checkpoint-2" in caplog.text
    state = json.load(open(output_dir / "trainer_state.json"))
    assert [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2, 3, 4]  # steps 1-2 from the first run
    caplog.clear()
    vit_image_classification.main(
        vit_argv(output_dir, train, validation, *common, "--max_steps", "2", "--start_over", "true")
    )
    assert "Resuming from" not in caplog.text
    state = json.load(open(output_dir / "trainer_state.json"))
    assert state["global_step"] == 2


USER_VARIANT = """
from dataclasses import dataclass, field

from attentiondrop_hf import AttentionDropVariant, register_variant


@dataclass
class TemperatureOptions:
    temperature: float = field(default=2.0, metadata={"help": "temperature: divide every logit by this (> 0)."})


@register_variant("temperature")
class Temperature(AttentionDropVariant):
    options_class = TemperatureOptions

    @staticmethod
    def perturb_logits(logits, attendable, options, draws, call):
        return logits / options.temperature, attendable
"""


def test_a_user_variant_brings_its_flag_to_the_recipe_command_line_and_json(tmp_path, monkeypatch):
    (tmp_path / "my_temperature.py").write_text(USER_VARIANT)
    monkeypatch.syspath_prepend(str(tmp_path))
    train, validation = cifar10_files(tmp_path)
    argv = ["--variant_modules", "my_temperature", "--variant", "temperature", "--temperature", "3.5"]
    config = tmp_path / "run.json"
    config.write_text(
        json.dumps({"variant_modules": ["my_temperature"], "variant": "temperature", "temperature": 4.5})
    )
    for arguments, expected in ((argv, 3.5), ([str(config)], 4.5)):
        parsed = _common.parse_arguments(
            recipe_argument_types(vit_image_classification),
            arguments + ["--train_file", train, "--model_type", "vit", "--output_dir", str(tmp_path / "out")],
        )
        assert parsed[-1].variant == "temperature" and parsed[-1].options.temperature == expected
    vit_image_classification.main(
        vit_argv(tmp_path / "run", train, validation, *argv[:2], "--variant", "temperature", "--temperature", "3.5")
    )
    saved = json.load(open(tmp_path / "run" / "config.json"))
    assert saved["attentiondrop"]["variant"] == "temperature" and saved["attentiondrop"]["temperature"] == 3.5
    text, _ = read_card(tmp_path / "run")
    assert "| `temperature` | `3.5` |" in text and "the user-registered variant `temperature`" in text


class _DrawPerItem(torch.utils.data.Dataset):
    def __init__(self, randomness):
        self.randomness = randomness

    def __len__(self):
        return 4

    def __getitem__(self, index):
        return self.randomness.generator().random()


def test_augmentations_differ_across_data_loading_workers_and_epochs():
    """A worker must not replay the main process's generator (nor its sibling's, nor last epoch's)."""
    randomness = vit_image_classification.AugmentationRandomness(seed=0)
    loader = torch.utils.data.DataLoader(_DrawPerItem(randomness), batch_size=1, num_workers=2)
    epochs = [[float(x) for x in loader] for _ in range(2)]
    assert len(set(epochs[0])) == 4 and set(epochs[0]).isdisjoint(epochs[1])
    main = vit_image_classification.AugmentationRandomness(seed=0)
    in_process = [float(x) for x in torch.utils.data.DataLoader(_DrawPerItem(main), batch_size=1)]
    reference = random.Random(0)
    assert in_process == [reference.random() for _ in range(4)]  # no workers: the training seed's generator
    assert set(in_process).isdisjoint(epochs[0])
