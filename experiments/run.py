#!/usr/bin/env python
"""Run a frozen experiment protocol of issue #9: every (row, seed) trained through a recipe's own `main()`.

    python experiments/run.py cifar10-small                      # all rows, the protocol's seeds
    python experiments/run.py cifar10-small --seeds 0 --rows none hard
    python experiments/run.py cifar10-gpu --device cuda          # all rows and seeds, runs in parallel processes
    python experiments/run.py cifar10-small --train_file my.parquet --validation_file my_test.parquet \
        --image_column_name image --label_column_name label     # the same protocol on other image data

A protocol is a JSON file in `experiments/protocols/`: the data, the recipe flags shared by every row, and the rows
(a list: rows are only ever appended, so finished runs stay comparable). Each run is one subprocess (a fresh
interpreter: no state leaks between runs), which calls the recipe's `main()`, evaluates the saved model at the end
on the test data only, and writes ONE JSON to `RESULTS/runs/ROW-seedS.json`. A run whose JSON exists is skipped, so a
protocol can be finished across sessions. Runs go seed by seed (seed 0 of every row first), so partial progress gives
complete seeds. After the runs, `RESULTS/README.md` and its figures are rendered from whatever JSONs exist.

Results go to `experiments/results/PROTOCOL/`; with other data (`--train_file`) or changed settings (`--set`) they go
to `outputs/experiments/PROTOCOL-custom/` (or `--results_dir`), never over the frozen protocol's results.
`--eval_split validation` evaluates on the split carved from the training data (the pilots; never the test set).
"""

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = os.path.join(ROOT, "experiments")
PROTOCOLS = os.path.join(EXPERIMENTS, "protocols")
WORK = os.path.join(ROOT, "outputs", "experiments")  # checkpoints and derived data subsets: ignored by git
DEFAULT_DATA = os.path.normpath(os.path.join(ROOT, "..", "shared", "data"))
TASKS = {
    "image-classification": "vit_image_classification",
    "translation": "marian_translation",
}
BASELINE_ROW = "none"


# ---------------------------------------------------------------------------------------------------------------
# Protocols
# ---------------------------------------------------------------------------------------------------------------


def load_protocol(name_or_path: str) -> dict:
    """A protocol by name (`experiments/protocols/NAME.json`) or path, checked."""
    path = name_or_path if name_or_path.endswith(".json") else os.path.join(PROTOCOLS, f"{name_or_path}.json")
    if not os.path.isfile(path):
        known = sorted(f[:-5] for f in os.listdir(PROTOCOLS) if f.endswith(".json"))
        raise ValueError(f"unknown protocol {name_or_path!r}; protocols: {known}")
    with open(path, encoding="utf-8") as handle:
        protocol = json.load(handle)
    if "extends" in protocol:
        # A protocol built on another (a strength sweep on the same data, model and budget): the parent's keys,
        # then this file's; `rows` are this file's own.
        parent = load_protocol(os.path.join(os.path.dirname(path), f"{protocol['extends']}.json"))
        protocol = {**{k: v for k, v in parent.items() if k not in ("pilots", "command")}, **protocol}
    if protocol.get("eval_split", "test") not in ("test", "validation"):
        raise ValueError(f"protocol {path}: eval_split must be 'test' or 'validation', got {protocol['eval_split']!r}")
    for key in ("name", "task", "data", "model_config", "recipe_args", "rows"):
        if key not in protocol:
            raise ValueError(f"protocol {path} has no {key!r}")
    if protocol["task"] not in TASKS:
        raise ValueError(f"protocol {path}: task {protocol['task']!r} is not one of {sorted(TASKS)}")
    names = [row["name"] for row in protocol["rows"]]
    if len(set(names)) != len(names) or BASELINE_ROW not in names:
        raise ValueError(f"protocol {path}: row names must be unique and include {BASELINE_ROW!r}, got {names}")
    return protocol


def apply_settings(protocol: dict, settings: list[str]) -> dict:
    """`--set key=value` overrides: `model.KEY` changes the model config, any other key a shared recipe flag."""
    protocol = json.loads(json.dumps(protocol))  # a deep copy: the frozen protocol stays as loaded
    for setting in settings:
        key, sep, value = setting.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {setting!r}")
        parsed = json.loads(value) if value[:1] in ("[", "{") or value in ("true", "false") else value
        if key.startswith("model."):
            protocol["model_config"][key[len("model.") :]] = parsed
        elif key.startswith("data."):
            protocol["data"][key[len("data.") :]] = None if value == "null" else int(value)
        else:
            protocol["recipe_args"][key] = parsed
    return protocol


def select_rows(protocol: dict, names: list[str] | None) -> list[dict]:
    rows = {row["name"]: row for row in protocol["rows"]}
    if names is None:
        return protocol["rows"]
    unknown = [name for name in names if name not in rows]
    if unknown:
        raise ValueError(f"--rows {unknown} not in protocol {protocol['name']!r}; rows: {list(rows)}")
    return [rows[name] for name in names]


def config_overrides(model_config: dict) -> str:
    """The recipe's `--config_overrides` string (`key=value,...`) of a model config dict."""
    return ",".join(f"{key}={value}" for key, value in model_config.items())


def recipe_argv(protocol: dict, row: dict, seed: int, data: dict, output_dir: str, device: str) -> list[str]:
    """The recipe's command line of one run: shared flags, then the row's flags, then seed, data and output.

    The row's `model_config` (e.g. a dropout probability) is merged into the shared model config; every other row
    key is a recipe flag (`use_attentiondrop`, `variant`, `consistency_weight`, ...).
    """
    model_config = {**protocol["model_config"], **row.get("model_config", {})}
    args = {**protocol["recipe_args"], **protocol.get("device_args", {}).get(device, {}), **row.get("args", {})}
    if "pretrained" in protocol and not row.get("from_scratch"):
        # Fine-tuning: the checkpoint brings its architecture; only the row's own config changes apply (dropout).
        args.update(model_name_or_path=pretrained_checkpoint(protocol["pretrained"]))
        overrides = row.get("model_config", {})
    else:
        args.update(
            model_type=protocol.get("model_type", "vit" if protocol["task"] == "image-classification" else "marian")
        )
        overrides = model_config
    args.update(config_overrides=config_overrides(overrides) or None, seed=seed, output_dir=output_dir, **data)
    if device == "cpu":
        args["use_cpu"] = True
    argv = []
    for key, value in args.items():
        if value is None:
            continue
        argv.append(f"--{key}")
        if isinstance(value, list):
            argv.extend(str(v) for v in value)
        else:
            argv.append(str(value).lower() if isinstance(value, bool) else str(value))
    return argv


def pretrained_checkpoint(pretrained: dict) -> str:
    """The folder of the run a fine-tuning protocol starts from (`pretrained`: `protocol`, `row`, `seed`, and the
    `sha256` of its `model.safetensors`, recorded once the pretraining has run), checked against that hash."""
    name = f"{pretrained['row']}-seed{pretrained['seed']}"
    folder = os.path.join(WORK, "checkpoints", pretrained["protocol"], name)
    weights = os.path.join(folder, "model.safetensors")
    if not os.path.isfile(weights):
        raise ValueError(
            f"the pretrained checkpoint {folder} does not exist: run `python experiments/run.py "
            f"{pretrained['protocol']} --rows {pretrained['row']} --seeds {pretrained['seed']}` first"
        )
    with open(weights, "rb") as handle:
        digest = hashlib.sha256(handle.read()).hexdigest()
    if pretrained.get("sha256") and pretrained["sha256"] != digest:
        raise ValueError(
            f"{weights} has sha256 {digest}, not the {pretrained['sha256']} the protocol records: a different "
            "pretraining run"
        )
    return folder


# ---------------------------------------------------------------------------------------------------------------
# Data: fixed class-balanced subsets, written once to an ignored folder
# ---------------------------------------------------------------------------------------------------------------


def balanced_split(labels, per_class_first: int | None, per_class_second: int | None, seed: int):
    """Two disjoint class-balanced index sets of a labelled dataset, fixed by `seed`.

    Within each class the examples are put in one fixed random order; the first set takes the first
    `per_class_first` of each class, the second the next `per_class_second` (`None`: all that remain).

    Args:
        labels (sequence of hashable): the label of every example.
        per_class_first (`int` or `None`): examples per class of the first set (`None` or 0: an empty set).
        per_class_second (`int` or `None`): examples per class of the second set; `None` takes the rest.
        seed (`int`): seed of the order.

    Returns:
        `(first, second)`: sorted `np.ndarray` index arrays.
    """
    labels = np.asarray(labels)
    order = np.random.default_rng(seed).permutation(len(labels))
    first, second = [], []
    n_first = per_class_first or 0
    for value in sorted(set(labels.tolist())):
        members = order[labels[order] == value]
        wanted = n_first + (per_class_second if per_class_second is not None else 0)
        if len(members) < wanted:
            smallest = min(int((labels == v).sum()) for v in set(labels.tolist()))
            raise ValueError(
                f"class {value!r} has {len(members)} examples, fewer than the {wanted} asked for (the smallest class "
                f"has {smallest}): pass smaller subsets, e.g. --set data.validation_per_class=0 "
                f"data.train_per_class={smallest}, or leave data.* unset to train on all of your data"
            )
        first.append(members[:n_first])
        end = None if per_class_second is None else n_first + per_class_second
        second.append(members[n_first:end])
    return np.sort(np.concatenate(first)), np.sort(np.concatenate(second))


def _fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _read_images(path: str):
    from datasets import load_dataset

    if os.path.isdir(path):
        return load_dataset("imagefolder", data_files=os.path.join(path, "**"), split="train")
    return load_dataset("parquet", data_files=path, split="train")


def _only_classes(dataset, label_column: str, classes: list[int]):
    """The examples of `classes`, their labels as plain integers (a ClassLabel would keep every class's name)."""
    from datasets import Value

    kept = set(classes)
    dataset = dataset.cast_column(label_column, Value("int64"))
    missing = kept - set(dataset[label_column])
    if missing:
        raise ValueError(f"data.classes {sorted(missing)} have no examples in column {label_column!r}")
    return dataset.filter(lambda label: label in kept, input_columns=label_column)


def prepare_image_data(spec: dict, train_file: str, test_file: str, label_column: str, eval_split: str) -> dict:
    """The recipe's `--train_file` / `--validation_file` of a protocol: a fixed class-balanced training subset and a
    disjoint validation subset carved from the training data (pilots), written once as parquet; the test file as is.

    `spec` keys: `validation_per_class` (held out from training; may be 0), `train_per_class` (`None`: the rest),
    `subset_seed`, `classes` (optional: only these label values, in every split, stored as plain integers so that
    the recipe's head has one output per kept class). Files are named by a fingerprint of everything that defines
    them, so a change writes new ones.
    """
    for flag, path in (("--train_file", train_file), ("--validation_file", test_file)):
        if not os.path.exists(path):
            raise ValueError(f"{flag} {path!r} does not exist")
    stat = os.stat(train_file)
    key = _fingerprint(os.path.abspath(train_file), stat.st_size, spec, label_column)
    folder = os.path.join(WORK, "data", key)
    classes = spec.get("classes")
    splits = ("train", "validation", "test") if classes else ("train", "validation")
    paths = {split: os.path.join(folder, f"{split}.parquet") for split in splits}
    if not all(os.path.isfile(p) for p in paths.values()):
        full = _read_images(train_file)
        if label_column not in full.column_names:
            raise ValueError(f"--label_column_name {label_column!r} is not a column of {full.column_names}")
        subsets = {}
        if classes:
            full = _only_classes(full, label_column, classes)
            subsets["test"] = _only_classes(_read_images(test_file), label_column, classes)
        validation, train = balanced_split(
            full[label_column], spec.get("validation_per_class", 0), spec.get("train_per_class"), spec["subset_seed"]
        )
        subsets.update(train=full.select(train), validation=full.select(validation))
        os.makedirs(folder, exist_ok=True)
        for split, subset in subsets.items():
            temporary = paths[split] + ".tmp"
            subset.to_parquet(temporary)
            os.replace(temporary, paths[split])  # atomic: an interrupted write never passes for a subset
    if eval_split == "validation" and not spec.get("validation_per_class"):
        raise ValueError("--eval_split validation needs a protocol with data.validation_per_class > 0")
    evaluation = paths["validation"] if eval_split == "validation" else paths.get("test", test_file)
    return {"train_file": paths["train"], "validation_file": evaluation}


def translation_data(spec: dict, data_dir: str, eval_split: str) -> dict:
    files = {
        split: os.path.join(data_dir, spec["folder"], f"{split}.jsonl") for split in ("train", "validation", "test")
    }
    if eval_split == "validation":  # pilots translate the validation split as their "test"
        files["test"] = files["validation"]
    return {"train_file": files["train"], "validation_file": files["validation"], "test_file": files["test"]}


# ---------------------------------------------------------------------------------------------------------------
# One run (in its own subprocess)
# ---------------------------------------------------------------------------------------------------------------


def machine() -> dict:
    import torch
    import transformers

    cpu = platform.processor()
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
        cpu = names[0] if names else cpu
    info = {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        git = ["git", "-C", ROOT]
        info["git_commit"] = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(
            # The code that ran, not the results this runner writes while it runs.
            [
                *git,
                "status",
                "--porcelain",
                "--",
                "attentiondrop_hf",
                "recipes",
                "experiments",
                ":!experiments/results",
            ],
            capture_output=True,
            text=True,
        ).stdout.strip()
        info["git_dirty"] = bool(dirty)
    except OSError:
        info["git_commit"] = None
    return info


def _timed(trainer_class, times: dict):
    """A subclass of the recipe's trainer that records the wall and CPU time of `train()` alone (not the data
    loading, evaluation or saving around it): the recipe builds its trainer inside `main()`."""

    class TimedTrainer(trainer_class):
        def train(self, *args, **kwargs):
            wall, cpu = time.perf_counter(), time.process_time()
            output = super().train(*args, **kwargs)
            times["train_wall_s"] = time.perf_counter() - wall
            times["train_cpu_s"] = time.process_time() - cpu  # every thread of this process: robust to other load
            return output

    return TimedTrainer


def training_curves(output_dir: str) -> tuple[list[dict], float]:
    """The logged training losses per epoch from `trainer_state.json`, and the number of epochs trained."""
    with open(os.path.join(output_dir, "trainer_state.json"), encoding="utf-8") as handle:
        state = json.load(handle)
    keys = ("epoch", "step", "loss", "task_loss", "consistency_loss", "learning_rate")
    curves = [{k: e[k] for k in keys if k in e} for e in state["log_history"] if "loss" in e]
    return curves, float(state.get("epoch") or state.get("num_train_epochs"))


def run_one(spec: dict) -> dict:
    """Train one (row, seed) through the recipe's `main()` and evaluate the saved model; returns the run's record."""
    sys.path.insert(0, os.path.join(ROOT, "recipes"))
    sys.path.insert(0, EXPERIMENTS)
    recipe = __import__(TASKS[spec["task"]])
    times: dict[str, float] = {}
    trainer_name = "AttentionDropTrainer" if spec["task"] == "image-classification" else "AttentionDropSeq2SeqTrainer"
    setattr(recipe, trainer_name, _timed(getattr(recipe, trainer_name), times))
    wall, cpu = time.perf_counter(), time.process_time()
    recipe_results = recipe.main(spec["argv"])
    curves, epochs = training_curves(spec["output_dir"])
    record = {
        "protocol": spec["protocol"],
        "row": spec["row"],
        "seed": spec["seed"],
        "eval_split": spec["eval_split"],
        "recipe_argv": spec["argv"],
        "recipe_results": recipe_results,
        "epochs": epochs,
        **times,
        "train_cpu_s_per_epoch": times["train_cpu_s"] / epochs,
        "train_wall_s_per_epoch": times["train_wall_s"] / epochs,
        "curves": curves,
    }
    if spec["task"] == "image-classification":
        from evaluate_images import evaluate_image_classifier

        record["metrics"] = evaluate_image_classifier(spec["output_dir"], spec["evaluation"], spec["device"])
    else:
        record["metrics"] = {k[len("test_") :]: v for k, v in recipe_results.items() if k.startswith("test_")}
    record["run_wall_s"] = time.perf_counter() - wall
    record["run_cpu_s"] = time.process_time() - cpu
    record["machine"] = machine()
    return record


def write_json(path: str, value: dict) -> None:
    """Atomically: a JSON that exists is always complete, so an interrupted run is simply run again."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(value, handle, indent=1, sort_keys=True)
    os.replace(temporary, path)


def child_main(spec_path: str) -> None:
    with open(spec_path, encoding="utf-8") as handle:
        spec = json.load(handle)
    write_json(spec["result_path"], run_one(spec))


# ---------------------------------------------------------------------------------------------------------------
# The protocol: plan, run, render
# ---------------------------------------------------------------------------------------------------------------


def run_path(results_dir: str, row: str, seed: int) -> str:
    return os.path.join(results_dir, "runs", f"{row}-seed{seed}.json")


def plan_runs(rows: list[dict], seeds: list[int], results_dir: str) -> tuple[list[tuple[dict, int]], list[str]]:
    """The (row, seed) pairs still to run, seed by seed in row order, and the result files already there."""
    todo, done = [], []
    for seed in seeds:
        for row in rows:
            path = run_path(results_dir, row["name"], seed)
            (done.append(path) if os.path.isfile(path) else todo.append((row, seed)))
    return todo, done


def launch(spec: dict, log_path: str) -> int:
    """One run in a fresh interpreter; its output goes to its own log (the runner's log stays readable).

    `spec["threads"]` caps the run's intra-op threads. On a shared CPU this matters more than anything else: two
    OpenMP threads that must meet at every barrier, on cores another job also wants, ran a training step 8x slower
    than one thread did (measured here); one thread per run also keeps the process CPU time free of spin-waiting.
    """
    spec_path = os.path.join(spec["output_dir"] + ".spec.json")
    write_json(spec_path, spec)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if spec.get("threads"):
        env.update(OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]))
    with open(log_path, "w", encoding="utf-8") as log:
        return subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--child", spec_path],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
        ).returncode


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("protocol", nargs="?", help="protocol name (experiments/protocols/NAME.json) or path")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds to run (default: the protocol's)")
    parser.add_argument("--rows", nargs="+", help="rows to run (default: all, in protocol order)")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: the protocol's")
    parser.add_argument("--parallel", type=int, help="runs at once (default: the protocol's, else 1)")
    parser.add_argument("--train_file", help="other image data: training parquet file or image folder")
    parser.add_argument("--validation_file", help="other image data: the test data the runs are evaluated on")
    parser.add_argument("--image_column_name", help="column of the images (default: 'image' or 'img')")
    parser.add_argument("--label_column_name", help="column of the labels (default: 'label')")
    parser.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="change a shared recipe flag, model.KEY or data.KEY (results leave the frozen folder)",
    )
    parser.add_argument(
        "--eval_split",
        choices=["test", "validation"],
        help="'validation': the split carved from the training data (pilots, sweeps); default: the protocol's "
        "`eval_split`, else 'test'",
    )
    parser.add_argument("--results_dir", help="where run JSONs, the table and figures go")
    parser.add_argument("--render_only", action="store_true", help="only render the table and figures")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is None and args.protocol is None:
        parser.error("give a PROTOCOL")
    if (args.train_file is None) != (args.validation_file is None):
        parser.error("--train_file and --validation_file go together (the runs are evaluated on --validation_file)")
    return args


def default_results_dir(protocol: dict, args: argparse.Namespace) -> str:
    columns = args.image_column_name or args.label_column_name
    if not (args.train_file or args.set or args.eval_split != protocol.get("eval_split", "test") or columns):
        return os.path.join(EXPERIMENTS, "results", protocol["name"])
    suffix = "pilot" if args.eval_split == "validation" else "custom"
    # One folder per combination of changes, so a pilot with other settings never skips as "already run".
    changes = _fingerprint(args.train_file, args.validation_file, sorted(args.set), columns, args.image_column_name)
    return os.path.join(WORK, f"{protocol['name']}-{suffix}-{changes}", "results")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child_main(args.child)
        return 0
    protocol = apply_settings(load_protocol(args.protocol), args.set)
    rows = select_rows(protocol, args.rows)
    args.eval_split = args.eval_split or protocol.get("eval_split", "test")
    seeds = args.seeds if args.seeds is not None else protocol.get("seeds", [0, 1, 2])
    device = args.device or protocol.get("device", "cpu")
    results_dir = os.path.abspath(args.results_dir or default_results_dir(protocol, args))
    from render import render

    if args.render_only:
        print(render(results_dir, protocol))
        return 0

    data_dir = os.environ.get("ATTENTIONDROP_DATA", DEFAULT_DATA)
    if protocol["task"] == "image-classification":
        if args.train_file and not any(setting.startswith("data.") for setting in args.set):
            # Your own data: all of it trains (class balance as it is); the protocol's subset sizes were chosen for
            # CIFAR-10 and the evaluation runs on --validation_file, so nothing is held out.
            protocol["data"] = {**protocol["data"], "train_per_class": None, "validation_per_class": 0}
        train_file = args.train_file or os.path.join(data_dir, protocol["data"]["train"])
        test_file = args.validation_file or os.path.join(data_dir, protocol["data"]["test"])
        label_column = args.label_column_name or "label"
        data = prepare_image_data(protocol["data"], train_file, test_file, label_column, args.eval_split)
        data.update(label_column_name=label_column, image_column_name=args.image_column_name)
    else:
        data = translation_data(protocol["data"], data_dir, args.eval_split)

    todo, done = plan_runs(rows, seeds, results_dir)
    print(
        f"[{protocol['name']}] {len(done)} runs done (skipped), {len(todo)} to run on {device}; results: {results_dir}"
    )
    frozen = results_dir == os.path.join(EXPERIMENTS, "results", protocol["name"])
    run_root = os.path.join(
        WORK, "checkpoints", protocol["name"] + ("" if frozen else "-" + _fingerprint(results_dir))
    )
    os.makedirs(run_root, exist_ok=True)

    def one(job: tuple[dict, int]) -> bool:
        row, seed = job
        name = f"{row['name']}-seed{seed}"
        output_dir = os.path.join(run_root, name)
        spec = {
            "protocol": protocol["name"],
            "task": protocol["task"],
            "row": row["name"],
            "seed": seed,
            "device": device,
            "eval_split": args.eval_split,
            "output_dir": output_dir,
            "argv": recipe_argv(protocol, row, seed, data, output_dir, device),
            "evaluation": {**protocol.get("evaluation", {}), **data, "seed": protocol["data"].get("subset_seed", 0)},
            "result_path": run_path(results_dir, row["name"], seed),
            "threads": protocol.get("threads_per_run"),
        }
        started = time.strftime("%H:%M:%S")
        print(f"  {started} start {name} (log: {output_dir}.log)", flush=True)
        code = launch(spec, output_dir + ".log")
        status = "done" if code == 0 and os.path.isfile(spec["result_path"]) else f"FAILED (exit {code})"
        print(f"  {time.strftime('%H:%M:%S')} {status} {name}", flush=True)
        return code == 0

    parallel = args.parallel or protocol.get("parallel", 1)
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        succeeded = list(pool.map(one, todo))
    print(render(results_dir, protocol))
    return 0 if all(succeeded) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ValueError as error:  # a user error (protocol, flag, data), named in one line as argparse does
        sys.exit(f"run.py: error: {error}")
