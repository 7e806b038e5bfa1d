#!/usr/bin/env python
"""Step time and peak memory of AttentionDrop's paths against SDPA, side by side in one run.

Three workloads:
- `vit`: one full training step (forward, loss, backward, AdamW step) of a ViT: ViT-B/16 at batch 64 in bf16 on a
  GPU; on the CPU a ViT of 6 layers, width 192, 65 tokens, batch 32, float32.
- `attention`: the attention function alone, forward and backward, at long sequence: N = 8192 (B = 2, H = 16,
  D = 64, bf16) on a GPU, N = 2048 on the CPU.
- `seq2seq`: one training step of the multi30k-small Marian (2 + 2 layers, width 128, vocabulary 8,000, batch 64,
  sentence lengths like Multi30k's, padded to the longest: about half the label positions are padding): the plain step
  (the model's own loss), the consistency step with its loss terms on the counted tokens (the trainer's path) and
  on the whole padded tensors (the reference), and with hard masking on encoder self-attention.

Modes: sdpa and eager (stock Transformers), each variant's logit-space reference path and its fast path, eval (a
no-grad forward, AttentionDrop installed, against SDPA's), and the consistency pass (a doubled batch plus the KL).
Step times are medians over rounds in which the modes take turns. Peak memory is what a step needs above what was
allocated before it: `torch.cuda.max_memory_allocated` on a GPU, the rise of the resident set size in a fresh
process per mode on the CPU. Ratios are to SDPA's figure of the same workload.

    python benchmarks/benchmark_attentiondrop.py                 # every workload, on this machine's device
    python benchmarks/benchmark_attentiondrop.py --json out.json
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

import attentiondrop_hf
from attentiondrop_hf import enable_attentiondrop, force_reference_path, ops
from attentiondrop_hf.hf.attention import attentiondrop_attention_forward
from attentiondrop_hf.hf.trainer import IGNORE_INDEX

HARD = {"variant": "hard", "p": 0.1, "top_k": 8}
BLUR = {"variant": "blur", "blur_width": 5, "blur_sigma_min": 0.0, "blur_sigma_max": 1.0}
# mode -> (attn_implementation, AttentionDrop flags, force the reference path)
MODES = {
    "sdpa": ("sdpa", None, False),
    "eager": ("eager", None, False),
    "hard reference": ("attentiondrop", HARD, True),
    "hard fast": ("attentiondrop", HARD, False),
    "blur reference": ("attentiondrop", BLUR, True),
    "blur fast": ("attentiondrop", BLUR, False),
    "eval sdpa": ("sdpa", None, False),
    "eval attentiondrop": ("attentiondrop", HARD, False),
    "consistency (hard fast)": ("attentiondrop", HARD, False),
    # The consistency pass without its KL: the doubled batch alone, to tell its cost from the loss terms'.
    "doubled batch (hard fast)": ("attentiondrop", HARD, False),
    "consistency, loss on all tokens": ("sdpa", None, False),
    "consistency": ("sdpa", None, False),
}
WORKLOAD_MODES = {
    "vit": [
        "sdpa",
        "eager",
        "hard reference",
        "hard fast",
        "blur reference",
        "blur fast",
        "eval sdpa",
        "eval attentiondrop",
        "doubled batch (hard fast)",
        "consistency (hard fast)",
    ],
    "attention": ["sdpa", "eager", "hard reference", "hard fast", "blur reference", "blur fast"],
    "seq2seq": ["sdpa", "consistency, loss on all tokens", "consistency", "consistency (hard fast)"],
}


# Token counts log-normal around Multi30k's (median 14 a sentence, the longest of 64 about 32): padded to the
# longest, about half the label positions are padding, as in the multi30k-small runs (45 %).
SEQ2SEQ = {"width": 128, "layers": 2, "vocabulary": 8000, "batch": 64, "median_length": 14, "length_spread": 0.35}


# `--sizes tiny`: every mode of every workload at toy sizes, in seconds (the dry run of gpu_check.py, tested in CI).
# The attention length stays above the fused hard op's threshold (FUSED_MIN_KEYS) so that path runs too.
TINY = {
    "vit": {"hidden": 32, "layers": 2, "heads": 2, "image": 16, "patch": 4, "batch": 4, "dtype": "float32"},
    "attention": {"batch": 1, "heads": 2, "length": 1040, "dim": 16, "dtype": "float32"},
    "seq2seq": {**SEQ2SEQ, "width": 32, "vocabulary": 200, "batch": 8},
}


def workload_sizes(device: str, tiny: bool = False) -> dict:
    if tiny:
        return TINY
    if device == "cuda":
        return {
            "vit": {
                "hidden": 768,
                "layers": 12,
                "heads": 12,
                "image": 224,
                "patch": 16,
                "batch": 64,
                "dtype": "bfloat16",
            },
            "attention": {"batch": 2, "heads": 16, "length": 8192, "dim": 64, "dtype": "bfloat16"},
            "seq2seq": SEQ2SEQ,
        }
    return {
        "vit": {"hidden": 192, "layers": 6, "heads": 3, "image": 32, "patch": 4, "batch": 32, "dtype": "float32"},
        "attention": {"batch": 2, "heads": 16, "length": 2048, "dim": 64, "dtype": "float32"},
        "seq2seq": SEQ2SEQ,
    }


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as handle:
        line = next(line for line in handle if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024  # reported in kB


def reset_peak_rss() -> None:
    """Restart the resident-set high-water mark (VmHWM) from the current size (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def time_interleaved(steps: dict, device: str, warmup: int, repeats: int) -> dict:
    """Median seconds per mode, the modes taking turns so that machine drift hits them all alike."""
    for name, step in steps.items():
        with force_reference_path(MODES[name][2]):
            for _ in range(warmup):
                step()
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            with force_reference_path(MODES[name][2]):
                synchronize(device)
                start = time.perf_counter()
                step()
                synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def peak_memory(step, mode: str, device: str) -> int:
    """Bytes one step needs above what is allocated before it (models, inputs and optimizer states)."""
    with force_reference_path(MODES[mode][2]):
        if device == "cuda":
            step()  # the first step creates AdamW's states
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - base
        # Optimizer states were made at setup; the high-water mark of the resident set during one step, over the
        # resident set before it. (Not getrusage's ru_maxrss: a child inherits its parent's across fork and exec.)
        base = _status_bytes("VmRSS")
        reset_peak_rss()
        step()
        return max(_status_bytes("VmHWM") - base, 0)


def adamw_with_states(model) -> torch.optim.AdamW:
    """AdamW with its states already created, so that a timed step's memory is the step's own."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return optimizer


def vit_step(mode: str, device: str, sizes: dict):
    from transformers import ViTConfig, ViTForImageClassification

    implementation, flags, _ = MODES[mode]
    dtype = getattr(torch, sizes["dtype"])
    config = ViTConfig(
        hidden_size=sizes["hidden"],
        num_hidden_layers=sizes["layers"],
        num_attention_heads=sizes["heads"],
        intermediate_size=4 * sizes["hidden"],
        image_size=sizes["image"],
        patch_size=sizes["patch"],
        num_labels=10,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    model = ViTForImageClassification(config).to(device)
    model.set_attn_implementation("eager" if implementation == "eager" else "sdpa")
    if flags is not None:
        enable_attentiondrop(model, **flags)
    pixels = torch.randn(sizes["batch"], 3, sizes["image"], sizes["image"], device=device)
    labels = torch.randint(0, 10, (sizes["batch"],), device=device)
    autocast = torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32)

    if mode.startswith("eval"):
        model.eval()

        def step():
            with torch.no_grad(), autocast:
                model(pixel_values=pixels)

        return step

    model.train()
    optimizer = adamw_with_states(model)
    doubled = mode.startswith(("consistency", "doubled"))
    targets = torch.cat([labels, labels]) if doubled else labels

    def step():
        with autocast:
            inputs = torch.cat([pixels, pixels]) if doubled else pixels
            logits = model(pixel_values=inputs).logits
            if mode.startswith("consistency"):
                task, kl = ops.summed_consistency_terms(*logits.chunk(2), labels)
                loss = (task + kl) / labels.numel()
            else:
                loss = torch.nn.functional.cross_entropy(logits.float(), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def seq2seq_step(mode: str, device: str, sizes: dict):
    from transformers import MarianConfig, MarianMTModel

    width, vocabulary, batch = sizes["width"], sizes["vocabulary"], sizes["batch"]
    config = MarianConfig(
        vocab_size=vocabulary,
        d_model=width,
        encoder_layers=sizes["layers"],
        decoder_layers=sizes["layers"],
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=4 * width,
        decoder_ffn_dim=4 * width,
        max_position_embeddings=128,
        dropout=0.0,
        pad_token_id=vocabulary - 1,
        decoder_start_token_id=vocabulary - 1,
    )
    torch.manual_seed(0)
    model = MarianMTModel(config).to(device).train()
    if MODES[mode][1] is not None:
        enable_attentiondrop(model, **MODES[mode][1], targets=["self"])
    lengths = torch.exp(torch.randn(2, batch) * sizes["length_spread"]).mul(sizes["median_length"]).round().long()
    source_lengths, target_lengths = lengths.clamp(min=2)
    source_mask = (torch.arange(int(source_lengths.max())) < source_lengths[:, None]).long()
    target_positions = torch.arange(int(target_lengths.max()))
    labels = torch.randint(0, vocabulary - 1, (batch, len(target_positions))).masked_fill(
        target_positions >= target_lengths[:, None], IGNORE_INDEX
    )
    inputs = {
        "input_ids": torch.randint(0, vocabulary - 1, source_mask.shape).masked_fill(source_mask == 0, vocabulary - 1),
        "attention_mask": source_mask,
        "decoder_input_ids": model.prepare_decoder_input_ids_from_labels(labels=labels),
    }
    inputs, labels = {k: v.to(device) for k, v in inputs.items()}, labels.to(device)
    optimizer = adamw_with_states(model)

    def step():
        if mode == "sdpa":
            loss = model(**inputs, labels=labels).loss
        else:
            first, second = model(**{k: torch.cat([v, v]) for k, v in inputs.items()}).logits.chunk(2)
            if mode == "consistency, loss on all tokens":  # the reference: the sums over the whole padded tensors
                task = 0.5 * (ops.summed_cross_entropy(first, labels) + ops.summed_cross_entropy(second, labels))
                kl = ops.summed_kl(first, second, labels)
            else:
                task, kl = ops.summed_consistency_terms(first, second, labels)
            loss = (task + kl) / labels.ne(IGNORE_INDEX).sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def attention_module(flags: dict | None) -> torch.nn.Module:
    """The attention module of a one-layer ViT (set up with `flags` when given): what the attention functions read
    off it (plan, config, causality) when called directly on tensors of the workload's size."""
    from transformers import ViTConfig, ViTForImageClassification

    from attentiondrop_hf.hf.plan import attention_modules

    model = ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2))
    (module,) = attention_modules(model).values()
    if flags is not None:
        enable_attentiondrop(model, **flags)
    return module.train()


def attention_step(mode: str, device: str, sizes: dict):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    implementation, flags, _ = MODES[mode]
    dtype = getattr(torch, sizes["dtype"])
    shape = (sizes["batch"], sizes["heads"], sizes["length"], sizes["dim"])
    torch.manual_seed(0)
    query, key, value = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn(sizes["batch"], sizes["length"], sizes["heads"], sizes["dim"], device=device, dtype=dtype)
    module = attention_module(flags)
    if implementation == "sdpa":
        function = ALL_ATTENTION_FUNCTIONS["sdpa"]
    elif implementation == "eager":
        from attentiondrop_hf.hf.plan import generic_eager_attention as function
    else:
        function = attentiondrop_attention_forward

    def step():
        output, _ = function(module, query, key, value, None, scaling=sizes["dim"] ** -0.5, dropout=0.0)
        output.backward(grad)
        query.grad = key.grad = value.grad = None

    return step


def build(workload: str, mode: str, device: str, sizes: dict):
    steps = {"vit": vit_step, "attention": attention_step, "seq2seq": seq2seq_step}
    return steps[workload](mode, device, sizes[workload])


def isolated_peak_memory(workload: str, mode: str, args) -> int:
    """On the CPU each mode's peak is read in a fresh process, whose heap holds nothing of the other modes."""
    command = [sys.executable, __file__, "--_memory", workload, mode, "--threads", str(args.threads)]
    command += ["--sizes", args.sizes] + (
        ["--attention_length", str(args.attention_length)] if args.attention_length else []
    )
    # A fixed mmap threshold makes glibc return every freed large block to the system at once, so the resident set
    # follows the live tensors instead of the heap's high-water mark.
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    result = subprocess.run(command, capture_output=True, text=True, check=True, env=environment)
    return int(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOAD_MODES), choices=list(WORKLOAD_MODES))
    parser.add_argument("--modes", nargs="+", help="only these modes (sdpa is always run: the ratios need it)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, help="untimed steps per mode (default: 3, attention 1)")
    parser.add_argument("--repeats", type=int, help="timed rounds (default: 20, attention 5)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--sizes", choices=["default", "tiny"], default="default", help="tiny: a seconds-long check")
    parser.add_argument(
        "--attention_length", type=int, help="N of the attention workload (default: 8192 GPU, 2048 CPU)"
    )
    parser.add_argument("--_memory", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = workload_sizes(args.device, tiny=args.sizes == "tiny")
    if args.attention_length:
        sizes = {**sizes, "attention": {**sizes["attention"], "length": args.attention_length}}

    if args._memory:
        workload, mode = args._memory
        print(peak_memory(build(workload, mode, args.device, sizes), mode, args.device))
        return

    results = {"device": describe(args.device), "sizes": sizes, "attentiondrop_hf": attentiondrop_hf.__version__}
    for workload in args.workloads:
        modes = WORKLOAD_MODES[workload]
        if args.modes:
            modes = [mode for mode in modes if mode in args.modes or mode in ("sdpa", "eval sdpa")]
        steps, figures = {}, {}
        for mode in modes:
            try:
                steps[mode] = build(workload, mode, args.device, sizes)
                if args.device == "cpu":
                    memory = isolated_peak_memory(workload, mode, args)
                else:
                    memory = peak_memory(steps[mode], mode, args.device)
                figures[mode] = {"peak_bytes": memory}
            except (RuntimeError, subprocess.CalledProcessError) as error:  # out of memory, typically
                steps.pop(mode, None)
                figures[mode] = {"error": (str(error).strip().splitlines() or [repr(error)])[-1][:100]}
                if args.device == "cuda":
                    torch.cuda.empty_cache()
        warmup = args.warmup if args.warmup is not None else (1 if workload == "attention" else 3)
        repeats = args.repeats if args.repeats is not None else (5 if workload == "attention" else 20)
        for mode, seconds in time_interleaved(steps, args.device, warmup, repeats).items():
            figures[mode]["seconds"] = seconds
        results[workload] = figures
        del steps
    print_table(results)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


def describe(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads (torch {torch.__version__})"
    )


def print_table(results: dict) -> None:
    print(f"\n{results['device']}")
    for workload in WORKLOAD_MODES:
        if workload not in results:
            continue
        figures = results[workload]
        print(f"\n{workload}: {results['sizes'][workload]}")
        print(f"| {'mode':<31} | {'step ms':>9} | {'x SDPA':>7} | {'peak MiB':>9} | {'x SDPA':>7} |")
        print(f"|{'-' * 33}|{'-' * 11}|{'-' * 9}|{'-' * 11}|{'-' * 9}|")
        for mode, figure in figures.items():
            baseline = figures["eval sdpa" if mode.startswith("eval") else "sdpa"]
            if "error" in figure or "error" in baseline:
                print(f"| {mode:<31} | {figure.get('error', 'baseline failed')} |")
                continue
            time_ratio = figure["seconds"] / baseline["seconds"]
            memory_ratio = figure["peak_bytes"] / max(baseline["peak_bytes"], 1)
            print(
                f"| {mode:<31} | {figure['seconds'] * 1e3:>9.2f} | {time_ratio:>6.2f}x "
                f"| {figure['peak_bytes'] / 2**20:>9.1f} | {memory_ratio:>6.2f}x |"
            )


if __name__ == "__main__":
    main()
