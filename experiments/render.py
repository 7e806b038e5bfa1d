"""The results table (`README.md`) and figures of a protocol, rendered from whatever run JSONs exist.

Every number is a mean ± sample standard deviation (ddof = 1) over the seeds a row has; the number of seeds is in the
table. Paired differences subtract, seed by seed, the `none` row's value of the same seed (same data order and
initialisation), then average; they use only the seeds both rows have, and carry a 95 % t-interval (n − 1 degrees
of freedom): a difference is called an effect only when its interval excludes 0. One seed: no interval.
"""

import glob
import json
import os

import numpy as np

__all__ = [
    "aggregate",
    "columns_for",
    "load_runs",
    "markdown_tables",
    "paired_differences",
    "paired_interval",
    "render",
    "sweep_series",
    "sweep_winners",
]

BASELINE = "none"

# (key in a run record, header, format, higher is better?) per task.
IMAGE_COLUMNS = [
    ("test_accuracy", "test acc", "{:.3f}", True),
    ("test_ece", "ECE (15 bins)", "{:.3f}", False),
    ("test_nll", "NLL", "{:.3f}", False),
    ("test_brier", "Brier", "{:.3f}", False),
    ("pgd_1_255_accuracy", "PGD acc ε=1/255", "{:.3f}", True),
    ("pgd_2_255_accuracy", "PGD acc ε=2/255", "{:.3f}", True),
    ("pgd_2_255_rs20_accuracy", "PGD-20, random start, ε=2/255", "{:.3f}", True),
    ("pgd_2_255_worst_accuracy", "PGD worst of both, ε=2/255", "{:.3f}", True),
    ("train_accuracy", "train acc", "{:.3f}", None),
    ("overfit_gap", "train − test", "{:.3f}", False),
    ("attention_entropy_last", "attn entropy (nats)", "{:.3f}", None),
    ("time_ratio", "CPU time/epoch ÷ none", "{:.2f}", False),
    ("train_wall_s_per_epoch", "wall s/epoch", "{:.1f}", False),
]
TRANSLATION_COLUMNS = [
    ("bleu", "test BLEU", "{:.2f}", True),
    ("chrf", "test chrF", "{:.2f}", True),
    ("loss", "test loss (label-smoothed CE)", "{:.3f}", False),
    ("bleu_brevity_penalty", "BLEU brevity penalty", "{:.3f}", None),
    ("length_ratio", "output ÷ reference length", "{:.3f}", None),
    ("time_ratio", "CPU time/epoch ÷ none", "{:.2f}", False),
    ("train_wall_s_per_epoch", "wall s/epoch", "{:.1f}", False),
]


def columns_for(task: str) -> list[tuple]:
    return IMAGE_COLUMNS if task == "image-classification" else TRANSLATION_COLUMNS


def load_runs(results_dir: str) -> list[dict]:
    """Every finished run's record in `results_dir/runs/`, flattened: metrics and timings at the top level."""
    runs = []
    for path in sorted(glob.glob(os.path.join(results_dir, "runs", "*.json"))):
        with open(path, encoding="utf-8") as handle:
            record = json.load(handle)
        flat = {**record, **record.get("metrics", {})}
        runs.append(flat)
    by_seed_baseline = {r["seed"]: r for r in runs if r["row"] == BASELINE}
    for run in runs:  # CPU time per epoch relative to the baseline of the same seed (paired)
        baseline = by_seed_baseline.get(run["seed"])
        if baseline is not None:
            run["time_ratio"] = run["train_cpu_s_per_epoch"] / baseline["train_cpu_s_per_epoch"]
    return runs


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), (float(values.std(ddof=1)) if len(values) > 1 else None)


def aggregate(runs: list[dict], rows: list[str], keys: list[str]) -> dict[str, dict]:
    """Per row: the seeds it has and, per key, (mean, std or None) over them."""
    table = {}
    for row in rows:
        mine = [r for r in runs if r["row"] == row]
        if not mine:
            continue
        stats = {key: _mean_std([r[key] for r in mine]) for key in keys if all(key in r for r in mine)}
        table[row] = {"seeds": sorted(r["seed"] for r in mine), "stats": stats}
    return table


def paired_interval(differences: list[float], level: float = 0.95) -> tuple[float, float | None]:
    """(mean, half-width of the `level` t-interval with n - 1 degrees of freedom, or None for one difference)."""
    from scipy.stats import t

    values = np.asarray(differences, dtype=np.float64)
    if len(values) < 2:
        return float(values.mean()), None
    half = t.ppf(0.5 + level / 2, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
    return float(values.mean()), float(half)


def is_effect(stat: tuple[float, float | None]) -> bool:
    """Whether a paired difference's interval excludes 0."""
    mean, half = stat
    return half is not None and abs(mean) > half


def paired_differences(runs: list[dict], rows: list[str], keys: list[str]) -> dict[str, dict]:
    """Per row other than `none`: per key, `paired_interval` over seeds of (row value - none value, same seed)."""
    baseline = {r["seed"]: r for r in runs if r["row"] == BASELINE}
    table = {}
    for row in rows:
        if row == BASELINE:
            continue
        pairs = [(r, baseline[r["seed"]]) for r in runs if r["row"] == row and r["seed"] in baseline]
        if not pairs:
            continue
        stats = {
            key: paired_interval([mine[key] - base[key] for mine, base in pairs])
            for key in keys
            if all(key in mine and key in base for mine, base in pairs)
        }
        table[row] = {"seeds": sorted(mine["seed"] for mine, _ in pairs), "stats": stats}
    return table


def _cell(stat: tuple[float, float | None] | None, fmt: str, signed: bool = False) -> str:
    if stat is None:
        return "—"
    mean, std = stat
    text = ("+" if signed and mean >= 0 else "") + fmt.format(mean)
    return text if std is None else f"{text} ± {fmt.format(std)}"


def _interval_cell(stat: tuple[float, float | None] | None, fmt: str) -> str:
    """`+mean [low, high]`, the mean in bold when the interval excludes 0 (an effect)."""
    if stat is None:
        return "—"
    mean, half = stat
    signed = ("+" if mean >= 0 else "") + fmt.format(mean)
    if half is None:
        return signed
    bounds = ", ".join(("+" if b >= 0 else "") + fmt.format(b) for b in (mean - half, mean + half))
    return f"{f'**{signed}**' if is_effect(stat) else signed} [{bounds}]"


def markdown_tables(runs: list[dict], protocol: dict) -> str:
    """The table of means and the table of paired differences from `none`, in the protocol's row order."""
    columns = columns_for(protocol["task"])
    rows = [row["name"] for row in protocol["rows"]]
    keys = [c[0] for c in columns]
    means, diffs = aggregate(runs, rows, keys), paired_differences(runs, rows, keys)
    header = "| row | seeds | " + " | ".join(c[1] for c in columns) + " |"
    rule = "|---|---|" + "---|" * len(columns)
    lines = ["**Mean ± std over seeds**", "", header, rule]
    for row in rows:
        if row in means:
            cells = [_cell(means[row]["stats"].get(key), fmt) for key, _, fmt, _ in columns]
            lines.append(f"| {row} | {len(means[row]['seeds'])} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"**Paired difference from `{BASELINE}` (row − none, same seed; mean [95 % t-interval]; bold: the interval "
        "excludes 0)**",
        "",
        header,
        rule,
    ]
    for row in rows:
        if row in diffs:
            cells = [
                _interval_cell(diffs[row]["stats"].get(key), fmt) if key != "time_ratio" else "—"
                for key, _, fmt, _ in columns
            ]
            lines.append(f"| {row} | {len(diffs[row]['seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def gradient_variance_points(run: dict) -> dict[str, float]:
    """A run's gradient variance per checkpoint step (`"80"`, ...) in training order, and at `"end"` when the final
    model is not the last checkpoint (training ending on a save step gives the same weights twice)."""
    measured = run.get("gradient_variance") or {}
    steps = sorted((label for label in measured if label != "final"), key=int)
    points = {step: measured[step]["variance"] for step in steps}
    if "final" in measured and not (steps and measured["final"] == measured[steps[-1]]):
        points["end"] = measured["final"]["variance"]
    return points


def gradient_variance_table(runs: list[dict], protocol: dict) -> list[str]:
    """Per row and checkpoint: the mean gradient variance over seeds, and the paired ratio row ÷ none (same seed) as
    mean [95 % t-interval], bold when the interval excludes 1 (the paper reports about 0.9 with AttentionDrop)."""
    points = {(r["row"], r["seed"]): gradient_variance_points(r) for r in runs}
    labels = list(dict.fromkeys(label for values in points.values() for label in values))
    if not labels:
        return []
    lines = [
        "**Gradient variance** (the variance of minibatch gradients of the task loss over fixed training minibatches, "
        "in training mode; mean over seeds, then row ÷ none, same seed: mean [95 % t-interval], bold when it "
        "excludes 1)",
        "",
        "| row | seeds | " + " | ".join(f"step {label}" for label in labels) + " |",
        "|---|---|" + "---|" * len(labels),
    ]
    for row in [row["name"] for row in protocol["rows"]]:
        seeds = sorted(seed for (name, seed), values in points.items() if name == row and values)
        if not seeds:
            continue
        cells = []
        for label in labels:
            mine = [points[row, seed][label] for seed in seeds if label in points[row, seed]]
            if not mine:
                cells.append("—")
                continue
            cell = f"{np.mean(mine):.3g}"
            ratios = [
                points[row, seed][label] / points[BASELINE, seed][label]
                for seed in seeds
                if row != BASELINE and label in points.get((BASELINE, seed), {}) and label in points[row, seed]
            ]
            if ratios:
                mean, half = paired_interval(ratios)
                ratio = f"×{mean:.2f}" if half is None else f"×{mean:.2f} [{mean - half:.2f}, {mean + half:.2f}]"
                cell += f" ({f'**{ratio}**' if half is not None and abs(mean - 1) > half else ratio})"
            cells.append(cell)
        lines.append(f"| {row} | {len(seeds)} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _plot_bars(runs, protocol, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [c for c in columns_for(protocol["task"]) if c[0] != "train_wall_s_per_epoch"]
    rows = [row["name"] for row in protocol["rows"]]
    means = aggregate(runs, rows, [c[0] for c in columns])
    shown = [row for row in rows if row in means]
    n = len(columns)
    fig, axes = plt.subplots((n + 2) // 3, 3, figsize=(13, 3.2 * ((n + 2) // 3)), squeeze=False)
    for axis, (key, title, _, better) in zip(axes.flat, columns):
        stats = [means[row]["stats"].get(key, (np.nan, None)) for row in shown]
        heights = [s[0] for s in stats]
        errors = [s[1] or 0.0 for s in stats]
        colors = ["0.55" if row == BASELINE else "C0" for row in shown]
        axis.bar(range(len(shown)), heights, yerr=errors, color=colors, capsize=3)
        axis.set_xticks(range(len(shown)), shown, rotation=35, ha="right", fontsize=8)
        note = "" if better is None else (" (higher is better)" if better else " (lower is better)")
        axis.set_title(title + note, fontsize=9)
        finite = [h for h in heights if np.isfinite(h)]
        if finite and key not in ("time_ratio",) and min(finite) > 0:  # zoom in: differences are small
            spread = max(finite) - min(finite) + max(errors)
            axis.set_ylim(max(0, min(finite) - 2 * spread - 1e-3), max(finite) + 1.5 * spread + 1e-3)
    for axis in axes.flat[n:]:
        axis.axis("off")
    seeds = {row: len(means[row]["seeds"]) for row in shown}
    fig.suptitle(f"{protocol['name']}: mean ± std over seeds {seeds}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_differences(runs, protocol, path) -> None:
    """Each row's paired difference from `none` (mean and 95 % t-interval), one panel per metric with a known better
    direction: the picture that answers "does it help?". Green: better, the interval excluding 0; red: worse, the
    same; grey: no difference shown (or a single seed, no interval)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    skip = ("time_ratio", "train_wall_s_per_epoch")
    columns = [c for c in columns_for(protocol["task"]) if c[3] is not None and c[0] not in skip]
    rows = [row["name"] for row in protocol["rows"]]
    diffs = paired_differences(runs, rows, [c[0] for c in columns])
    shown = [row for row in rows if row in diffs]
    ncols = min(4, len(columns))
    nrows = (len(columns) + ncols - 1) // ncols
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(3.4 * ncols, 0.3 * len(shown) * nrows + 1.6 * nrows), squeeze=False
    )
    for index, (axis, (key, title, _, better)) in enumerate(zip(axes.flat, columns)):
        stats = [diffs[row]["stats"].get(key, (np.nan, None)) for row in shown]
        means = np.array([s[0] for s in stats])
        errors = np.array([np.nan if s[1] is None else s[1] for s in stats])
        gain = means if better else -means
        colors = np.where(gain - errors > 0, "C2", np.where(gain + errors < 0, "C3", "0.6"))  # NaN: grey
        axis.barh(range(len(shown)), means, xerr=np.nan_to_num(errors), color=list(colors), capsize=3)
        axis.axvline(0.0, color="0.3", linewidth=0.8)
        axis.set_yticks(range(len(shown)), shown if index % ncols == 0 else [], fontsize=8)
        axis.invert_yaxis()
        axis.set_title(f"{title} ({'higher' if better else 'lower'} is better)", fontsize=9)
        axis.tick_params(axis="x", labelsize=7)
        axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(4))
    for axis in axes.flat[len(columns) :]:
        axis.axis("off")
    seeds = {row: len(diffs[row]["seeds"]) for row in shown}
    fig.suptitle(
        f"{protocol['name']}: row − {BASELINE}, same seed, mean and 95 % t-interval, seeds {seeds}\n"
        "green: better than none, the interval excluding 0; red: worse, the same; grey: no difference shown",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_reliability(runs, protocol, path) -> str | None:
    """`none` vs the row of highest mean test accuracy; bins summed over the seeds of each row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row["name"] for row in protocol["rows"]]
    means = aggregate(runs, rows, ["test_accuracy"])
    others = [row for row in means if row != BASELINE]
    if BASELINE not in means or not others:
        return None
    best = max(others, key=lambda row: means[row]["stats"]["test_accuracy"][0])
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2))
    for axis, row in zip(axes, (BASELINE, best)):
        mine = [r["reliability"] for r in runs if r["row"] == row]
        count = np.sum([m["count"] for m in mine], axis=0).astype(float)
        confidence = np.sum([m["confidence_sum"] for m in mine], axis=0)
        correct = np.sum([m["correct"] for m in mine], axis=0)
        n_bins = len(count)
        edges = np.linspace(0, 1, n_bins + 1)
        with np.errstate(invalid="ignore", divide="ignore"):
            accuracy = np.where(count > 0, correct / count, np.nan)
            mean_conf = np.where(count > 0, confidence / count, np.nan)
        axis.bar(edges[:-1], accuracy, width=1 / n_bins, align="edge", edgecolor="k", label="accuracy")
        # Guo et al.'s style: the red part spans from a bin's accuracy to its mean confidence.
        axis.bar(
            edges[:-1],
            mean_conf - accuracy,
            bottom=accuracy,
            width=1 / n_bins,
            align="edge",
            color="r",
            alpha=0.3,
            edgecolor="r",
            label="gap to mean confidence",
        )
        axis.plot([0, 1], [0, 1], "k--", linewidth=0.8)
        stats = means[row]["stats"]
        seeds = f"{len(mine)} seed{'s' if len(mine) > 1 else ''}"
        axis.set_title(f"{row} ({seeds} pooled, test acc {stats['test_accuracy'][0]:.3f})", fontsize=9)
        axis.set_xlabel("confidence")
        axis.set_ylabel("accuracy")
        axis.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return best


def _plot_curves(runs, protocol, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(7, 4.2))
    for index, row in enumerate(row["name"] for row in protocol["rows"]):
        mine = sorted((r for r in runs if r["row"] == row), key=lambda r: r["seed"])
        for k, run in enumerate(mine):
            points = [(c["epoch"], c.get("task_loss", c["loss"])) for c in run["curves"]]
            if points:
                epochs, losses = zip(*points)
                axis.plot(epochs, losses, color=f"C{index}", alpha=0.8, linewidth=1, label=row if k == 0 else None)
    axis.set_xlabel("epoch")
    axis.set_ylabel("training cross-entropy (task loss)")
    axis.set_yscale("log")
    axis.legend(fontsize=8)
    axis.set_title(f"{protocol['name']}: training curves (one line per seed)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def final_consistency_loss(run: dict) -> float | None:
    """The last logged KL term of a run (None for a run without one): the dose a consistency row received."""
    logged = [c["consistency_loss"] for c in run.get("curves", []) if "consistency_loss" in c]
    return logged[-1] if logged else None


LAMBDA = "consistency_weight"


def sweep_series(runs: list[dict], protocol: dict) -> dict[str, list[tuple[float, dict]]]:
    """A strength sweep's lines: per method and fixed secondary strengths (`hard_kl, top_k=8`), the rows' primary
    strength (the first key of the row's `strength`) and run, in increasing strength; rows without one are left out.
    A lambda row (primary key `consistency_weight`) joins a line `λ: method, ...` with the row of the same method
    and secondary strengths at lambda = 1."""
    series: dict[str, list[tuple[float, dict]]] = {}
    by_setting = {(row.get("method"), tuple(sorted(row.get("strength", {}).items()))): row for row in protocol["rows"]}
    for row in protocol["rows"]:
        strength = row.get("strength")
        mine = [r for r in runs if r["row"] == row["name"]]
        if not strength or not mine:
            continue
        (primary, value), *others = strength.items()
        name = ", ".join([row["method"], *(f"{k}={v}" for k, v in others)])
        if primary == LAMBDA:
            name = f"λ: {name}"
            at_one = by_setting.get((row["method"], tuple(sorted(others))))
            at_one_runs = [r for r in runs if at_one and r["row"] == at_one["name"]]
            if at_one_runs and name not in series:
                series[name] = [(1.0, at_one_runs[0])]
        series.setdefault(name, []).append((float(value), mine[0]))
    return {name: sorted(points, key=lambda point: point[0]) for name, points in series.items()}


def sweep_winners(runs: list[dict], protocol: dict) -> dict[str, dict]:
    """Each method's winner by the rule the protocol wrote before any run (`select`): the row with the best `metric`
    among those whose final KL is within `kl_within_factor` of the `kl_reference` row's (when given), and the rows
    within `tie` of it (ties: the write-up says which setting it takes). Returns {method: {row, value, tied}}."""
    rule = protocol.get("select")
    if not rule:
        return {}
    sign = -1.0 if rule["higher_is_better"] else 1.0
    value_of = {r["row"]: r[rule["metric"]] for r in runs if r.get(rule["metric"]) is not None}
    kl_of = {r["row"]: final_consistency_loss(r) for r in runs}
    reference_kl = kl_of.get(rule.get("kl_reference"))
    candidates: dict[str, list[str]] = {}
    for row in protocol["rows"]:
        name, method = row["name"], row.get("method")
        if method is None or name not in value_of:
            continue
        if "kl_within_factor" in rule:
            kl, factor = kl_of.get(name), rule["kl_within_factor"]
            if reference_kl is None or kl is None or not reference_kl / factor <= kl <= reference_kl * factor:
                continue
        candidates.setdefault(method, []).append(name)
    winners = {}
    for method, names in candidates.items():
        best = min(names, key=lambda n: sign * value_of[n])
        tied = [n for n in names if n != best and abs(value_of[n] - value_of[best]) < rule["tie"]]
        winners[method] = {"row": best, "value": value_of[best], "tied": tied}
    return winners


def _winners_table(runs: list[dict], protocol: dict) -> list[str]:
    winners = sweep_winners(runs, protocol)
    if not winners:
        return []
    rule = protocol["select"]
    direction = "highest" if rule["higher_is_better"] else "lowest"
    where = ""
    if "kl_within_factor" in rule:
        factor, reference = rule["kl_within_factor"], rule["kl_reference"]
        where = f" among the rows whose final KL is within a factor {factor:g} of `{reference}`'s"
    lines = [
        f"**Each method's winner by the protocol's rule** ({direction} `{rule['metric']}` on the "
        f"{protocol.get('eval_split', 'test')} split{where}; rows within {rule['tie']:g} of it are listed as tied; "
        "computed from the runs finished so far)",
        "",
        f"| method | winner | {rule['metric']} | tied |",
        "|---|---|---|---|",
    ]
    for method, winner in winners.items():
        tied = ", ".join(f"`{n}`" for n in winner["tied"]) or "—"
        lines.append(f"| {method} | `{winner['row']}` | {winner['value']:.3f} | {tied} |")
    return [*lines, ""]


# What a sweep figure plots per task, beside the final KL: (key in a run record, panel title).
SWEEP_PANELS = {
    "image-classification": [("test_accuracy", "accuracy"), ("test_nll", "NLL")],
    "translation": [("bleu", "BLEU"), ("loss", "loss (label-smoothed CE)")],
}


def _plot_sweep(runs: list[dict], protocol: dict, path: str) -> None:
    """Validation accuracy, NLL and the final KL against each method's strength: which setting to use, and the dose
    each received. The `none` row is a horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = sweep_series(runs, protocol)
    baseline = next((r for r in runs if r["row"] == BASELINE), None)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    panels = [*SWEEP_PANELS[protocol["task"]], (None, "final KL (nats)")]
    for axis, (key, title) in zip(axes, panels):
        for index, (name, points) in enumerate(series.items()):
            values = [final_consistency_loss(run) if key is None else run.get(key) for _, run in points]
            kept = [(x, v) for (x, _), v in zip(points, values) if v is not None]
            if kept:
                xs, ys = zip(*kept)
                style = "--" if name.startswith("λ") else "-"
                axis.plot(xs, ys, marker="o", linestyle=style, color=f"C{index}", label=name)
        if key is not None and baseline is not None:
            axis.axhline(baseline[key], color="0.3", linestyle="--", linewidth=1, label=BASELINE)
        if key is None:
            axis.set_yscale("log")
        axis.set_xscale("log", base=2)
        axis.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}"))
        axis.set_xlabel("strength (p, largest sigma, dropout, or λ)")
        axis.set_title(title, fontsize=10)
    axes[0].legend(fontsize=7)
    split = protocol.get("eval_split", "test")
    fig.suptitle(f"{protocol['name']}: {split} split; lines: a method at fixed secondary settings")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _machines(runs: list[dict]) -> str:
    seen = sorted(
        {
            (
                r["machine"].get("cpu"),
                r["machine"].get("cpu_cores"),
                r["machine"].get("gpu"),
                r["machine"].get("torch"),
                r["machine"].get("transformers"),
            )
            for r in runs
        },
        key=str,
    )
    return "; ".join(
        f"{cpu} ({cores} cores{', ' + gpu if gpu else ''}), torch {t}, transformers {tf}"
        for cpu, cores, gpu, t, tf in seen
    )


def render(results_dir: str, protocol: dict) -> str:
    """Write `README.md` and the figures to `results_dir` from its run JSONs; returns the README text."""
    runs = load_runs(results_dir)
    os.makedirs(results_dir, exist_ok=True)
    lines = [f"# {protocol['name']}: results", "", protocol.get("description", ""), ""]
    if protocol.get("table_note"):
        lines += [protocol["table_note"], ""]
    if protocol.get("pilots", {}).get("choice"):  # why these hyper-parameters (chosen on a validation split)
        lines += [f"Hyper-parameters: {protocol['pilots']['choice']} Pilots: `experiments/protocols/`.", ""]
    lines += [
        f"Command: `{protocol.get('command', 'python experiments/run.py ' + protocol['name'])}`",
        "",
        "Rows:",
        *(f"- `{row['name']}`: {row.get('description', '')}" for row in protocol["rows"]),
        "",
    ]
    if not runs:
        lines.append("No run has finished yet.")
    else:
        lines += [markdown_tables(runs, protocol), ""]
        lines += gradient_variance_table(runs, protocol)
        lines += [
            "CPU time/epoch ÷ none: the process CPU time of `train()` per epoch divided by the `none` run of the "
            "same seed (CPU time rather than wall time because other jobs share the cores; wall s/epoch is kept "
            "too). A paired difference is called an effect only when its 95 % t-interval excludes 0.",
            "",
            f"Machines: {_machines(runs)}.",
            "",
        ]
        _plot_bars(runs, protocol, os.path.join(results_dir, "metrics.png"))
        lines += ["![Metrics per row](metrics.png)", ""]
        if any(r["row"] != BASELINE for r in runs):
            _plot_differences(runs, protocol, os.path.join(results_dir, "differences.png"))
            lines += ["![Paired differences from none](differences.png)", ""]
        if protocol["task"] == "image-classification":
            best = _plot_reliability(runs, protocol, os.path.join(results_dir, "reliability.png"))
            if best:
                lines += [
                    f"Reliability diagrams: `none` vs `{best}` (highest mean test accuracy).",
                    "",
                    "![Reliability diagrams](reliability.png)",
                    "",
                ]
        _plot_curves(runs, protocol, os.path.join(results_dir, "curves.png"))
        lines += ["![Training curves](curves.png)", ""]
        if sweep_series(runs, protocol):
            _plot_sweep(runs, protocol, os.path.join(results_dir, "sweep.png"))
            lines += ["![Each method against its strength](sweep.png)", ""]
        lines += _winners_table(runs, protocol)
    path = os.path.join(results_dir, "README.md")
    text = "\n".join(lines) + _hand_written_part(path)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    return text


# A results README may end in a section written by hand (what the numbers say); rendering keeps it.
HAND_WRITTEN_HEADING = "## What the numbers say"


def _hand_written_part(path: str) -> str:
    """The hand-written section of an existing README, from its heading to the end; "" when there is none."""
    if not os.path.isfile(path):
        return ""
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    start = text.find(HAND_WRITTEN_HEADING)
    return "" if start < 0 else "\n" + text[start:]
