#!/usr/bin/env python
"""Time and peak memory of hard-masked attention, forward and backward, against SDPA.

Three modes, on the attention alone (no model), at B = 2, H = 16, N = 2048, D = 64, float32 by default:
- `sdpa`: `torch.nn.functional.scaled_dot_product_attention`, no perturbation (the baseline of every ratio);
- `reference`: today's path for long sequences, `chunked_logit_space_attention` with the hard-masking perturbation
  (`hard_drop_pattern` + `apply_hard_drop`), blocks of `Q · D / (2 K)` query rows as the integration picks them;
- `hard_masked_attention`: `ops.hard_attention.hard_masked_attention`, the same result without the logits.

Times are medians over rounds. In each round SDPA and `hard_masked_attention` run back to back, so that drift in
the machine's load hits both alike, and a mode's ratio is the median of its per-round ratios to SDPA (the
reference, several times slower, is timed in the first rounds only, for context); the spread is the fastest and
slowest round. Peak memory is the rise of the resident set (`VmHWM` over the `VmRSS` before the step, from
/proc/self/status) during one step, read in a fresh process per mode, with glibc returning freed blocks at once
(`MALLOC_MMAP_THRESHOLD_`), so that it follows the live tensors. Before timing, the reference and
`hard_masked_attention` are compared (output and gradients, same draws).

    python benchmarks/benchmark_hard_op.py
    python benchmarks/benchmark_hard_op.py --rounds 9 --json hard_op.json
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from attentiondrop_hf.ops.attention import chunked_logit_space_attention, rows_of
from attentiondrop_hf.ops.hard import apply_hard_drop, hard_drop_pattern
from attentiondrop_hf.ops.hard_attention import hard_masked_attention
from attentiondrop_hf.ops.sampling import draw_slot_uniforms

MODES = ["sdpa", "reference", "hard_masked_attention"]


def make_inputs(args):
    """Query, key, value (requiring grad), the output gradient `[B, Q, H, D]` and the slot draws, from a fixed seed."""
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    query = torch.randn(args.batch, args.heads, args.length, args.dim, dtype=dtype, requires_grad=True)
    key = torch.randn(args.batch, args.heads, args.length, args.dim, dtype=dtype, requires_grad=True)
    value = torch.randn(args.batch, args.heads, args.length, args.dim, dtype=dtype, requires_grad=True)
    grad_output = torch.randn(args.batch, args.length, args.heads, args.dim, dtype=dtype)
    slots = min(args.top_k, args.length)
    uniforms = draw_slot_uniforms(args.batch, args.heads, args.length, slots, torch.device("cpu"))
    return query, key, value, grad_output, uniforms


def attention(mode: str, args, query, key, value, uniforms) -> torch.Tensor:
    """One forward of `mode`: the output `[B, Q, H, D]` (contiguous, as Transformers' attention functions return)."""
    scaling = args.dim**-0.5
    if mode == "sdpa":
        return F.scaled_dot_product_attention(query, key, value, scale=scaling).transpose(1, 2).contiguous()
    if mode == "reference":

        def perturb(logits, attendable, rows):
            dropped = hard_drop_pattern(logits, attendable, args.top_k, args.p, rows_of(uniforms, rows))
            return apply_hard_drop(logits, attendable, dropped, args.fill)

        # The integration's block of query rows (hf.attention): logits of a block about half the size of q.
        rows_per_chunk = max(1, args.length * args.dim // (2 * args.length))
        return chunked_logit_space_attention(query, key, value, None, rows_per_chunk, scaling=scaling, perturb=perturb)
    return hard_masked_attention(query, key, value, None, None, scaling, args.top_k, args.p, args.fill, uniforms)


def make_step(mode: str, args):
    query, key, value, grad_output, uniforms = make_inputs(args)

    def step():
        attention(mode, args, query, key, value, uniforms).backward(grad_output)
        query.grad = key.grad = value.grad = None

    return step


def check_parity(args) -> dict:
    """Largest differences between `hard_masked_attention` and the reference: output and each gradient."""
    query, key, value, grad_output, uniforms = make_inputs(args)
    results = {}
    for mode in ("reference", "hard_masked_attention"):
        output = attention(mode, args, query, key, value, uniforms)
        results[mode] = [output.detach(), *torch.autograd.grad(output, (query, key, value), grad_output)]
    return {
        name: (got - want).abs().max().item()
        for name, got, want in zip(("output", "query", "key", "value"), *results.values())
    }


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as handle:
        line = next(line for line in handle if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024  # reported in kB


def peak_memory(step) -> int:
    """Bytes one step needs above the resident set before it (inputs allocated, one step already run)."""
    step()  # first-call allocations (thread pools, kernels' buffers) are not the step's
    base = _status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as handle:  # restart VmHWM from the current size (Linux >= 4.0)
        handle.write("5")
    step()
    return max(_status_bytes("VmHWM") - base, 0)


def isolated_peak_memory(mode: str, args) -> int:
    """The peak of `mode` read in a fresh process, whose heap holds nothing of the other modes."""
    command = [sys.executable, __file__, "--_memory", mode, *forwarded_arguments(args)]
    # A fixed mmap threshold makes glibc return every freed large block to the system at once, so the resident set
    # follows the live tensors instead of the heap's high-water mark.
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    result = subprocess.run(command, capture_output=True, text=True, check=True, env=environment)
    return int(result.stdout.strip().splitlines()[-1])


def forwarded_arguments(args) -> list[str]:
    names = ("batch", "heads", "length", "dim", "dtype", "top_k", "p", "fill", "threads")
    return [item for name in names for item in (f"--{name.replace('_', '-')}", str(getattr(args, name)))]


def time_interleaved(steps: dict, warmup: int, rounds: int, reference_rounds: int) -> dict:
    """Seconds per round of each mode. In every round SDPA and `hard_masked_attention` run back to back (in
    alternating order), so that a change in the machine's load hits both; the reference, several times slower, runs
    in the first `reference_rounds` rounds only."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {mode: [] for mode in steps}
    for round_index in range(rounds):
        order = ["sdpa", "hard_masked_attention"][:: 1 if round_index % 2 == 0 else -1]
        if round_index < reference_rounds:
            order.append("reference")
        for mode in order:
            start = time.perf_counter()
            steps[mode]()
            times[mode].append(time.perf_counter() - start)
    return times


def load_average() -> str:
    with open("/proc/loadavg") as handle:
        return " ".join(handle.read().split()[:3])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--length", type=int, default=2048, help="query and key length N")
    parser.add_argument("--dim", type=int, default=64, help="head dimension D")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--p", type=float, default=0.1)
    parser.add_argument("--fill", default="zero", choices=["zero", "mask"])
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per mode")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds of SDPA and hard_masked_attention")
    parser.add_argument("--reference-rounds", type=int, default=2, help="rounds that also time the reference")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--no-check", action="store_true", help="skip the parity check against the reference")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--_memory", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args._memory:
        print(peak_memory(make_step(args._memory, args)))
        return

    sizes = {name: getattr(args, name) for name in ("batch", "heads", "length", "dim", "dtype", "top_k", "p", "fill")}
    results = {
        "device": f"{platform.processor() or platform.machine()}, {args.threads} threads (torch {torch.__version__})",
        "sizes": sizes,
        "load_average_before": load_average(),
    }
    if not args.no_check:
        results["max_abs_difference_to_reference"] = check_parity(args)
    memory = {mode: isolated_peak_memory(mode, args) for mode in MODES}
    steps = {mode: make_step(mode, args) for mode in MODES}
    times = time_interleaved(steps, args.warmup, args.rounds, min(args.reference_rounds, args.rounds))
    results["load_average_after"] = load_average()
    results["modes"] = {
        mode: {"seconds": statistics.median(times[mode]), "rounds": times[mode], "peak_bytes": memory[mode]}
        for mode in MODES
    }
    for mode in MODES:  # each round's time over SDPA's in the same round
        ratios = [mine / sdpa for mine, sdpa in zip(times[mode], times["sdpa"])]
        results["modes"][mode]["ratio_per_round"] = ratios
        results["modes"][mode]["ratio"] = statistics.median(ratios)
    print_table(results)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


def print_table(results: dict) -> None:
    print(f"\n{results['device']}; {results['sizes']}")
    print(
        f"load average (1, 5, 15 min): {results['load_average_before']} before, {results['load_average_after']} after"
    )
    if "max_abs_difference_to_reference" in results:
        differences = ", ".join(f"{k} {v:.1e}" for k, v in results["max_abs_difference_to_reference"].items())
        print(f"hard_masked_attention vs reference, max |difference|: {differences}")
    baseline = results["modes"]["sdpa"]
    print(
        f"| {'mode':<22} | {'fwd+bwd ms':>10} | {'spread ms':>12} | {'x SDPA':>7} | {'range':>13} "
        f"| {'peak MiB':>9} | {'x SDPA':>7} |"
    )
    print(f"|{'-' * 24}|{'-' * 12}|{'-' * 14}|{'-' * 9}|{'-' * 15}|{'-' * 11}|{'-' * 9}|")
    for mode, figure in results["modes"].items():
        spread = f"{min(figure['rounds']) * 1e3:.0f}-{max(figure['rounds']) * 1e3:.0f}"
        ratios = f"{min(figure['ratio_per_round']):.2f}-{max(figure['ratio_per_round']):.2f}x"
        print(
            f"| {mode:<22} | {figure['seconds'] * 1e3:>10.0f} | {spread:>12} | {figure['ratio']:>6.2f}x "
            f"| {ratios:>13} | {figure['peak_bytes'] / 2**20:>9.1f} "
            f"| {figure['peak_bytes'] / max(baseline['peak_bytes'], 1):>6.2f}x |"
        )
    print("x SDPA: median over rounds of the round's time over SDPA's in the same round; range: over rounds.")


if __name__ == "__main__":
    main()
