"""Pruning criteria in the low-data regime (a miniature of Ancona et al. 2020, "Shapley Value as
Principled Metric for Structured Network Pruning").

For each of several seeds: train the digits CNN of ``examples/digits.py``; take only
``--attr-examples`` training images for attribution; for each prunable layer *alone* and each
ratio (20/40/60%), remove the lowest-scored units by each metric, without fine-tuning, and
measure test accuracy. Reports the mean accuracy over layers and seeds, per metric and ratio, and
the metrics ranked by their mean over ratios.

Usage: python benchmarks/criteria.py [--seeds 3] [--attr-examples 256] [--out docs/criteria.md]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from digits import accuracy, load_data, make_cnn, train

import pruneplan as pp
from pruneplan.attributions import (
    APoZAttributionMetric,
    RandomAttributionMetric,
    SensitivityAttributionMetric,
    ShapleyAttributionMetric,
    TaylorAttributionMetric,
    WeightNormAttributionMetric,
)


def mean_plus_2std(matrix: np.ndarray) -> np.ndarray:
    """Aggregate per-example scores as mean + 2 * std over examples."""
    return matrix.mean(axis=0) + 2 * matrix.std(axis=0)


def metrics(seed: int) -> dict:
    return {
        "shapley (mean)": (ShapleyAttributionMetric, {"sv_samples": 10, "seed": seed}),
        "shapley (mean+2std)": (ShapleyAttributionMetric, {"sv_samples": 10, "seed": seed,
                                                           "reduction": mean_plus_2std}),
        "taylor": (TaylorAttributionMetric, {}),
        "sensitivity": (SensitivityAttributionMetric, {}),
        "apoz": (APoZAttributionMetric, {}),
        "weight_norm": (WeightNormAttributionMetric, {}),
        "random": (RandomAttributionMetric, {"seed": seed}),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--attr-examples", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--ratios", default="0.2,0.4,0.6")
    ap.add_argument("--out", type=Path, default=None, help="also write the table (markdown) here")
    args = ap.parse_args()
    ratios = [float(r) for r in args.ratios.split(",")]
    torch.set_num_threads(1)
    started = time.perf_counter()
    data = load_data()
    results: dict[tuple[str, float], list[float]] = {}
    base = []
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        model = make_cnn()
        train(model, data, args.epochs, seed=seed)
        base.append(accuracy(model, data))
        x = data.x_test[:2]
        roots = [g.name for g in pp.prunable_groups(model, x)]
        batches = list(data.batches(64, seed=1000 + seed, limit=args.attr_examples))
        for name, (cls, kwargs) in metrics(seed).items():
            kwargs = dict(kwargs)
            reduction = kwargs.pop("reduction", "mean")
            metric = cls(model, batches, F.cross_entropy, "cpu", reduction=reduction, progress=False, **kwargs)
            scores = metric.run_all(roots, find_best_evaluation_module=True)
            for layer in roots:
                for ratio in ratios:
                    removed = pp.select_indices({layer: scores[layer]}, ratio)
                    plan = pp.plan_pruning(model, removed, example_inputs=x)
                    pruned = pp.apply_plan(copy.deepcopy(model), plan)
                    results.setdefault((name, ratio), []).append(accuracy(pruned, data))
        print(f"seed {seed}: base accuracy {base[-1]:.3f} ({time.perf_counter() - started:.0f} s)", flush=True)

    names = list(metrics(0))
    header = "| metric | " + " | ".join(f"{int(r * 100)}% removed" for r in ratios) + " | mean |"
    lines = [header, "|" + "---|" * (len(ratios) + 2)]
    means = {}
    for name in names:
        accs = [float(np.mean(results[(name, r)])) for r in ratios]
        means[name] = float(np.mean(accs))
        lines.append(f"| {name} | " + " | ".join(f"{a:.3f}" for a in accs) + f" | {means[name]:.3f} |")
    ranking = " > ".join(sorted(names, key=lambda n: -means[n]))
    summary = [
        f"Unpruned accuracy {np.mean(base):.3f} (mean of {args.seeds} seeds). Each cell: test accuracy "
        f"with one layer pruned, no fine-tuning, mean over {len(roots)} layers x {args.seeds} seeds; "
        f"{args.attr_examples} training images for attribution.",
        "",
        *lines,
        "",
        f"Ranking by mean accuracy: {ranking}",
    ]
    text = "\n".join(summary)
    print("\n" + text)
    print(f"\n({time.perf_counter() - started:.0f} s)")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        cmd = "python benchmarks/criteria.py " + " ".join(sys.argv[1:])
        args.out.write_text(f"# Pruning criteria, low-data regime\n\nCommand: `{cmd}`\n\n{text}\n")


if __name__ == "__main__":
    main()
