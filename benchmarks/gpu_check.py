#!/usr/bin/env python
"""Every GPU figure the project asks for, in one run of under 8 minutes on one GPU, written to one JSON file.

    python benchmarks/gpu_check.py --out gpu_check            # on a machine with a CUDA device
    python benchmarks/gpu_check.py --out gpu_check --data outputs/data   # CIFAR-10 copied to outputs/data/cifar10
    python benchmarks/gpu_check.py --dry-run --out /tmp/check # on a CPU: every step at toy sizes (CI runs this)

Steps, each a subprocess with its own time limit; a step that fails or runs out of time is recorded as such and the
others still run:
1. `tests`: `pytest -m gpu` (bf16 parity of the fast paths with the logit-space reference, their memory).
2. `benchmark`: a ViT-B/16 training step in bf16 (SDPA, eager, each variant's reference and fast path, eval, the
   consistency pass) and the attention function alone at N = 8192, ratios to SDPA (`benchmark_attentiondrop.py`).
3. `attention_2048`: the attention function alone at N = 2048.
4. `experiment`: `experiments/run.py cifar10-gpu` on seed 0, every row at once, in the time left (its run JSONs land
   in `OUT/cifar10-gpu/runs`; the runner resumes from them).
Then each figure is compared with its GPU target (`TARGETS`). The dry run uses toy sizes, so its ratios say nothing
about speed: it checks that every step runs and that `figures.json` is written.
"""

import argparse
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARK = os.path.join(ROOT, "benchmarks", "benchmark_attentiondrop.py")
RUNNER = os.path.join(ROOT, "experiments", "run.py")
# Seconds each step may take on a GPU; the experiment gets what is left of BUDGET_S.
BUDGET_S = 7.5 * 60
LIMITS_S = {"tests": 90, "benchmark": 150, "attention_2048": 45}
# Issue #20's GPU targets: (workload, mode, figure, at most).
TARGETS = {
    "blur step": ("vit", "blur fast", "seconds", 1.05),
    "hard step": ("vit", "hard fast", "seconds", 1.20),
    "eval step": ("vit", "eval attentiondrop", "seconds", 1.00),
    "consistency step": ("vit", "consistency (hard fast)", "seconds", 1.80),
    "hard memory at N = 8192": ("attention", "hard fast", "peak_bytes", 1.50),
    "blur memory at N = 8192": ("attention", "blur fast", "peak_bytes", 1.50),
}
# The dry run's experiment: one consistency row of a model and data small enough for seconds on a CPU.
DRY_RUN_SETTINGS = (
    "model.hidden_size=16 model.num_hidden_layers=1 model.num_attention_heads=2 model.intermediate_size=32 "
    "num_train_epochs=1 per_device_train_batch_size=8 data.train_per_class=2 data.validation_per_class=1 "
    "dataloader_num_workers=0"
).split()


def run_step(name: str, command: list[str], limit_s: float, out: str, env: dict | None = None) -> dict:
    """Run one step with its output in OUT/NAME.log; its exit status, time and whether it ran out of time."""
    started = time.perf_counter()
    with open(os.path.join(out, f"{name}.log"), "w") as log:
        try:
            done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=limit_s, cwd=ROOT, env=env)
            code = done.returncode
            timed_out = False
        except subprocess.TimeoutExpired:
            code, timed_out = None, True
    seconds = round(time.perf_counter() - started, 1)
    print(f"  {name}: {'timed out' if timed_out else f'exit {code}'} after {seconds} s", flush=True)
    return {"command": command, "exit_code": code, "timed_out": timed_out, "seconds": seconds}


def test_counts(junit_path: str) -> dict:
    if not os.path.isfile(junit_path):
        return {}
    suite = ElementTree.parse(junit_path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    return {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}


def ratios_to_targets(benchmark: dict) -> dict:
    """Each target's measured ratio to SDPA (eval: to SDPA's eval) and whether it is met."""
    checked = {}
    for target, (workload, mode, figure, at_most) in TARGETS.items():
        figures = benchmark.get(workload, {})
        baseline = figures.get("eval sdpa" if mode.startswith("eval") else "sdpa", {})
        if figure not in figures.get(mode, {}) or figure not in baseline:
            checked[target] = {"target": at_most, "ratio": None, "met": None}
            continue
        ratio = figures[mode][figure] / max(baseline[figure], 1e-12)
        checked[target] = {"target": at_most, "ratio": round(ratio, 3), "met": ratio <= at_most}
    return checked


def write_dry_run_images(path: str) -> str:
    """A parquet of 40 random 32 x 32 images, 4 of each of CIFAR-10's 10 classes (the dry run's data)."""
    import io

    import numpy as np
    from datasets import ClassLabel, Dataset, Features, Image
    from PIL import Image as PILImage

    rng = np.random.default_rng(0)
    images = []
    for _ in range(40):
        buffer = io.BytesIO()
        PILImage.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buffer, format="PNG")
        images.append({"bytes": buffer.getvalue(), "path": None})
    features = Features({"img": Image(), "label": ClassLabel(num_classes=10)})
    Dataset.from_dict({"img": images, "label": list(range(10)) * 4}, features=features).to_parquet(path)
    return path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for figures.json and each step's log")
    parser.add_argument("--dry-run", action="store_true", help="on a CPU, every step at toy sizes")
    parser.add_argument(
        "--skip", nargs="*", default=[], choices=["tests", "benchmark", "attention_2048", "experiment"]
    )
    parser.add_argument("--data", help="the folder holding cifar10/ for the experiment (default: $ATTENTIONDROP_DATA)")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_check.py: no CUDA device here; pass --dry-run to check the steps on a CPU")
    device = "cpu" if args.dry_run else "cuda"
    started = time.perf_counter()
    python = sys.executable
    figures = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run: toy sizes)",
        "torch": torch.__version__,
        "dry_run": args.dry_run,
        "steps": {},
    }
    steps = figures["steps"]
    # A dry run's benchmark: toy sizes, one round; one thread, as CI runs.
    quick = ["--sizes", "tiny", "--warmup", "1", "--repeats", "1", "--threads", "1"] if args.dry_run else []

    if "tests" not in args.skip:
        junit = os.path.join(args.out, "tests.xml")
        command = [
            python,
            "-m",
            "pytest",
            "-m",
            "gpu",
            "tests/test_gpu.py",
            "-q",
            "-p",
            "no:cacheprovider",
            f"--junitxml={junit}",
        ]
        steps["tests"] = {**run_step("tests", command, LIMITS_S["tests"], args.out), **test_counts(junit)}
    for name, workloads, extra in (
        ("benchmark", ["vit", "attention"], []),
        ("attention_2048", ["attention"], ["--attention_length", "2048"] if not args.dry_run else []),
    ):
        if name in args.skip:
            continue
        path = os.path.join(args.out, f"{name}.json")
        command = [python, BENCHMARK, "--device", device, "--workloads", *workloads, "--json", path, *quick, *extra]
        steps[name] = run_step(name, command, LIMITS_S[name] * (4 if args.dry_run else 1), args.out)
        if os.path.isfile(path):
            with open(path) as handle:
                steps[name]["figures"] = json.load(handle)
    if "figures" in steps.get("benchmark", {}):
        figures["targets"] = ratios_to_targets(steps["benchmark"]["figures"])

    if "experiment" not in args.skip:
        results = os.path.join(args.out, "cifar10-gpu")
        command = [python, RUNNER, "cifar10-gpu", "--device", device, "--seeds", "0", "--results_dir", results]
        if args.dry_run:
            images = write_dry_run_images(os.path.join(args.out, "images.parquet"))
            command += ["--rows", "hard_consistency", "--parallel", "1", "--train_file", images]
            command += ["--validation_file", images, "--set", *DRY_RUN_SETTINGS]
        left = BUDGET_S - (time.perf_counter() - started)
        env = {**os.environ, **({"ATTENTIONDROP_DATA": os.path.abspath(args.data)} if args.data else {})}
        steps["experiment"] = run_step("experiment", command, 300 if args.dry_run else max(left, 60), args.out, env)
        runs = os.path.join(results, "runs")
        steps["experiment"]["runs"] = {
            name[: -len(".json")]: json.load(open(os.path.join(runs, name)))["metrics"]
            for name in sorted(os.listdir(runs) if os.path.isdir(runs) else [])
            if name.endswith(".json")
        }

    figures["seconds"] = round(time.perf_counter() - started, 1)
    with open(os.path.join(args.out, "figures.json"), "w") as handle:
        json.dump(figures, handle, indent=2)
    for target, checked in figures.get("targets", {}).items():
        print(f"  {target}: {checked['ratio']}x SDPA (target <= {checked['target']}x)")
    print(f"gpu_check: {figures['seconds']} s; figures in {os.path.join(args.out, 'figures.json')}")
    return figures


if __name__ == "__main__":
    main()
