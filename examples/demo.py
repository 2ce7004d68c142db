"""The main demo: nine pruning criteria compared on real data (scikit-learn's digits), over seeds.

For each of ``--seeds`` seeds (3 by default):

1. Train a small CNN on load_digits (seeded, a few seconds on 2 cores).
2. Score every prunable unit with each metric (one data pass per metric).
3. For each metric and ratio: `select_indices` -> `plan_pruning` (automatic discovery) -> plan
   JSON -> `apply_plan` on a copy -> accuracy without fine-tuning and after one epoch of
   fine-tuning; parameters and MACs (`pruneplan.count`), CPU latency. (``--quick``: 2 epochs,
   one ratio, 5 Shapley samples, 3 latency runs.)

Then print one table of the mean and the spread (sample standard deviation over seeds) of every
accuracy, the ranking of the criteria, save a plot (accuracy vs ratio with error bars, without
and with fine-tuning) and every plan of the first seed, and replay one plan through the CLI on
saved weights (`pruneplan apply`), checking that the file-pruned model equals the live-pruned one.

Usage: python examples/demo.py [--out out/demo] [--quick] [--seeds 3] [--docs docs]

``--docs DIR`` also writes the committed copies: ``DIR/demo_results.txt`` and
``DIR/accuracy_vs_ratio.png`` (full run), or ``DIR/demo_quick.json`` (with ``--quick``: the
numbers tests/test_examples.py checks a fresh quick run against). ``make docs`` runs both.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from digits import (
    accuracy,
    example_parser,
    latency_ms,
    load_data,
    make_cnn,
    run_cli,
    start_example,
    train,
)

import pruneplan as pp
from pruneplan.attributions import (
    APoZAttributionMetric,
    FPGMAttributionMetric,
    LAMPAttributionMetric,
    LpNormAttributionMetric,
    RandomAttributionMetric,
    SensitivityAttributionMetric,
    ShapleyAttributionMetric,
    TaylorAttributionMetric,
    WeightNormAttributionMetric,
)

CHANCE = 0.1  # ten balanced classes


def metrics(seed: int, sv_samples: int = 20) -> dict:
    """metric name -> (class, extra arguments); the random ones draw from ``seed``.

    BatchNorm scale (network slimming) is not compared: the CNN's hidden Linear has no BatchNorm,
    so it would prune fewer units than the others at the same ratio.
    """
    return {
        "random": (RandomAttributionMetric, {"seed": seed}),
        "weight_norm": (WeightNormAttributionMetric, {}),
        "l2_norm": (LpNormAttributionMetric, {"p": 2}),
        "fpgm": (FPGMAttributionMetric, {}),
        "lamp": (LAMPAttributionMetric, {}),
        "apoz": (APoZAttributionMetric, {}),
        "sensitivity": (SensitivityAttributionMetric, {}),
        "taylor": (TaylorAttributionMetric, {}),
        "shapley": (ShapleyAttributionMetric, {"sv_samples": sv_samples, "seed": seed}),
    }


def one_seed(seed: int, data, epochs: int, ratios: list[float], n_attr: int, out: Path | None,
             quick: bool = False) -> dict:
    """Train, score and prune with one seed: {(metric, ratio): (acc, acc+ft, params, MACs, ms)}."""
    torch.manual_seed(seed)
    model = make_cnn()
    train(model, data, epochs, seed=seed)
    x = data.x_test[:2]
    runs = 3 if quick else 30
    results = {("none", 0.0): _measure(model, data, x, finetune=False, runs=runs, seed=seed)}
    groups = pp.prunable_groups(model, x)
    batches = list(data.batches(64, seed=99 + seed, limit=n_attr))
    roots = [g.name for g in groups]
    for name, (cls, kwargs) in metrics(seed, 5 if quick else 20).items():
        metric = cls(model, batches, F.cross_entropy, "cpu", progress=False, **kwargs)
        # evaluate after BN+ReLU (find_best) so APoZ counts post-activation zeros
        scores = metric.run_all(roots, find_best_evaluation_module=True)
        for ratio in ratios:
            removed = pp.select_indices(scores, ratio)
            plan = pp.plan_pruning(model, removed, example_inputs=x,
                                   provenance={"metric": name, "seed": seed,
                                               "selection": {"ratio": ratio, "scope": "layer"}})
            if out is not None:
                plan.save(out / f"{name}_{int(ratio * 100)}.json")
            pruned = pp.apply_plan(copy.deepcopy(model), plan)
            results[(name, ratio)] = _measure(pruned, data, x, finetune=True, runs=runs, seed=seed)
    return {"model": model, "results": results}


def _measure(pruned, data, x, finetune: bool, runs: int, seed: int) -> tuple:
    acc0 = accuracy(pruned, data)
    if finetune:
        torch.manual_seed(1000 + seed)  # the same dropout masks for every metric: only the plan differs
        train(pruned, data, 1, lr=1e-3, seed=7)
    stats = pp.count(pruned, x[:1])
    return acc0, accuracy(pruned, data), stats.params, stats.macs, latency_ms(pruned, data.x_test[:256], runs)


def summarize(per_seed: list[dict], ratios: list[float]) -> dict:
    """(metric, ratio) -> mean and sample std over seeds of both accuracies, plus the sizes."""
    keys = list(per_seed[0]["results"])
    out = {}
    for key in keys:
        rows = np.array([s["results"][key] for s in per_seed], dtype=float)
        spread = rows.std(0, ddof=1) if len(rows) > 1 else np.zeros(rows.shape[1])
        out[key] = {"acc": rows[:, 0].mean(), "acc_sd": spread[0], "ft": rows[:, 1].mean(),
                    "ft_sd": spread[1], "params": int(rows[0, 2]), "macs": int(rows[0, 3]),
                    "ms": float(np.median(rows[:, 4]))}
    return out


def ranking(summary: dict, names: list[str], ratio: float, field: str) -> str:
    """Metrics ordered by mean accuracy at ``ratio`` (``field`` "acc" or "ft")."""
    order = sorted(names, key=lambda n: -summary[(n, ratio)][field])
    return " > ".join(f"{n} {summary[(n, ratio)][field]:.3f}" for n in order)


def table(summary: dict, n_seeds: int, names: list[str], ratios: list[float]) -> str:
    header = (f"{'metric':<12} {'ratio':>5} {'acc (mean ± sd)':>16} {'acc+ft (mean ± sd)':>19} "
              f"{'params':>8} {'MACs':>8} {'latency ms':>10}")
    lines = [f"digits CNN, {n_seeds} seeds: mean ± sample standard deviation over seeds", header,
             "-" * len(header)]
    for key, r in summary.items():
        lines.append(f"{key[0]:<12} {key[1]:>5.2f} {r['acc']:>9.3f} ± {r['acc_sd']:.3f} "
                     f"{r['ft']:>12.3f} ± {r['ft_sd']:.3f} {r['params']:>8,} {r['macs']:>8,} {r['ms']:>10.2f}")
    mid = ratios[len(ratios) // 2]
    lines += ["", f"ranking at {mid:.0%} removed, no fine-tuning: {ranking(summary, names, mid, 'acc')}",
              f"ranking at {mid:.0%} removed, after fine-tuning: {ranking(summary, names, mid, 'ft')}"]
    return "\n".join(lines)


def main() -> None:
    ap = example_parser(__doc__, "demo")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--docs", type=Path, default=None, help="also write the committed copies here")
    args = ap.parse_args()
    started = time.perf_counter()
    out = start_example(args.out)
    (out / "plans").mkdir(exist_ok=True)

    data = load_data()
    epochs, ratios, n_attr = (2, [0.5], 128) if args.quick else (12, [0.25, 0.5, 0.75], 512)
    per_seed = []
    for seed in range(args.seeds):
        per_seed.append(one_seed(seed, data, epochs, ratios, n_attr, out / "plans" if seed == 0 else None,
                                 args.quick))
        base = per_seed[-1]["results"][("none", 0.0)][0]
        print(f"seed {seed}: trained {epochs} epochs, test accuracy {base:.3f} "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
    names = list(metrics(0))
    summary = summarize(per_seed, ratios)
    text = table(summary, args.seeds, names, ratios)
    print("\n" + text)
    (out / "results.txt").write_text(text + "\n")
    plot(summary, names, ratios, args.seeds, out / "accuracy_vs_ratio.png")
    numbers = {f"{m}@{r}": {k: round(float(v), 6) for k, v in s.items() if k in ("acc", "acc_sd", "ft", "ft_sd")}
               for (m, r), s in summary.items()}
    (out / "results.json").write_text(json.dumps(numbers, indent=1, sort_keys=True) + "\n")
    if args.docs is not None:
        args.docs.mkdir(parents=True, exist_ok=True)
        if args.quick:
            (args.docs / "demo_quick.json").write_text((out / "results.json").read_text())
        else:
            (args.docs / "demo_results.txt").write_text(text + "\n")
            (args.docs / "accuracy_vs_ratio.png").write_bytes((out / "accuracy_vs_ratio.png").read_bytes())

    # the same plan, applied to saved weights through the CLI, with no model code
    model = per_seed[0]["model"]
    plan_path = out / "plans" / f"taylor_{int(ratios[-1] * 100)}.json"
    weights = out / "model.safetensors"
    save_file(model.state_dict(), str(weights))
    pruned_file = out / "model.pruned.safetensors"
    run_cli("apply", str(plan_path), str(weights), "-o", str(pruned_file), "--force")
    plan = pp.PrunePlan.load(plan_path)
    from_file = pp.load_pruned(make_cnn(), plan, pruned_file).eval()
    live = pp.apply_plan(copy.deepcopy(model), plan).eval()
    with torch.no_grad():
        same = torch.equal(from_file(data.x_test), live(data.x_test))
    print(f"CLI-pruned file loaded into a fresh model == live-pruned model: {same}")
    print(f"\noutputs in {out.resolve()}: results.txt, results.json, accuracy_vs_ratio.png, plans/*.json "
          f"(seed 0), model.safetensors, model.pruned.safetensors ({time.perf_counter() - started:.0f} s)")
    if not same:
        raise SystemExit("the file-pruned model differs from the live-pruned model")


MARKERS = ["o", "s", "^", "v", "D", "P", "X", "*", "<", ">"]


def plot(summary: dict, names: list[str], ratios: list[float], n_seeds: int, path: Path) -> None:
    """Two panels (no fine-tuning, one epoch of fine-tuning): mean accuracy vs ratio with
    error bars (sample sd over seeds), a distinct marker per metric, the chance line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), dpi=120, sharey=True)
    base = summary[("none", 0.0)]
    xs = [0.0, *ratios]
    for ax, field, title in ((axes[0], "acc", "no fine-tuning"), (axes[1], "ft", "after 1 epoch of fine-tuning")):
        for i, name in enumerate(names):
            mean = [base[field]] + [summary[(name, r)][field] for r in ratios]
            sd = [base[field + "_sd"]] + [summary[(name, r)][field + "_sd"] for r in ratios]
            offset = (i - len(names) / 2) * 0.004  # keep overlapping error bars apart
            ax.errorbar([x + offset for x in xs], mean, yerr=sd, marker=MARKERS[i % len(MARKERS)],
                        capsize=2, linewidth=1, markersize=5, label=name)
        ax.axhline(CHANCE, color="grey", linestyle="--", linewidth=1, label="chance (10 classes)")
        ax.set_xticks(xs)
        ax.set_xticklabels([f"{x:.0%}" for x in xs])
        ax.set_xlabel("fraction of units removed per layer")
        ax.set_title(title)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"test accuracy (mean ± sd, {n_seeds} seeds)")
    axes[1].legend(loc="lower left", fontsize=7, ncol=2)
    fig.suptitle("digits CNN: pruning criteria")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
