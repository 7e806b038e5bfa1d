#!/usr/bin/env python
"""What `AttentionDropMonitorCallback` costs: off, and on, against a training step, in one run.

- Off: all the monitor adds to a step is one check of a module-level `None` per perturbed attention call; that check
  is timed alone (a difference of whole steps would be lost in their noise) and multiplied by the calls per step.
- On: one `measure()` (a forward of 8 examples recording every perturbed call) against one training step, and the
  resulting overhead of training at `logging_steps` = 10, 50 and 500.

    python benchmarks/benchmark_monitor.py            # the CPU sizes: the demo's ViT (17 tokens) and CIFAR's (65)
"""

import argparse
import statistics
import time
import timeit

import torch
from transformers import ViTConfig, ViTForImageClassification

from attentiondrop_hf import AttentionDropMonitorCallback, enable_attentiondrop
from attentiondrop_hf.hf import attention as attention_glue

SIZES = {
    "demo ViT (16 px, patch 4, 4 x 64, batch 32)": dict(image=16, patch=4, hidden=64, layers=4, heads=4, batch=32),
    "CIFAR ViT (32 px, patch 4, 4 x 128, batch 64)": dict(image=32, patch=4, hidden=128, layers=4, heads=4, batch=64),
}


def median_seconds(function, repeats: int) -> float:
    function()  # warm-up
    return statistics.median(timeit.repeat(function, number=1, repeat=repeats))


def report(name: str, size: dict, repeats: int, threads: int, check: float) -> None:
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=size["image"],
        patch_size=size["patch"],
        hidden_size=size["hidden"],
        num_hidden_layers=size["layers"],
        num_attention_heads=size["heads"],
        intermediate_size=2 * size["hidden"],
        num_labels=10,
    )
    model = enable_attentiondrop(ViTForImageClassification(config), variant="hard", p=0.1, top_k=8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    pixels = torch.randn(size["batch"], 3, size["image"], size["image"])
    labels = torch.randint(0, 10, (size["batch"],))

    def step():
        model.train()
        model(pixel_values=pixels, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    monitor = AttentionDropMonitorCallback(examples=8)
    monitor.batch = {"pixel_values": pixels[:8]}
    step_s = median_seconds(step, repeats)
    measure_s = median_seconds(lambda: monitor.measure(model), repeats)
    off_s = size["layers"] * check  # one perturbed attention call per layer
    assert attention_glue._monitor_records is None
    print(f"\n{name}, {threads} threads")
    print(f"  training step                 {step_s * 1e3:8.1f} ms")
    print(f"  monitor measure (8 examples)  {measure_s * 1e3:8.1f} ms = {measure_s / step_s:.2f} steps")
    print(f"  off, per step                 {off_s * 1e6:8.3f} us = {off_s / step_s:.1e} of a step")
    for logging_steps in (10, 50, 500):
        overhead = measure_s / (logging_steps * step_s)
        print(f"  on, logging_steps={logging_steps:<4}       +{overhead:.2%} of training time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    check = min(timeit.repeat("records is not None", globals={"records": None}, number=10**6, repeat=5)) / 10**6
    print(f"off: one check of a module-level None per perturbed attention call: {check * 1e9:.0f} ns")
    for name, size in SIZES.items():
        report(name, size, args.repeats, args.threads, check)
    print(f"\n(torch {torch.__version__}, measured {time.strftime('%Y-%m-%d')})")


if __name__ == "__main__":
    main()
