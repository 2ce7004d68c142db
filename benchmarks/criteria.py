"""Pruning criteria in the low-data regime (a miniature of Ancona et al. 2020, "Shapley Value as
Principled Metric for Structured Network Pruning").

For each of several seeds: train the digits CNN of ``examples/digits.py``; take only
``--attr-examples`` training images for attribution; for each prunable layer *alone* and each
ratio (20/40/60%), remove the lowest-scored units by each metric, without fine-tuning, and
measure test accuracy. Reports, per metric and ratio, the mean over seeds of the accuracy averaged
over layers, with its spread (sample standard deviation over the seeds), and the metrics ranked
by their mean over ratios (with the spread of that mean over seeds).

Usage: python benchmarks/criteria.py [--seeds 3] [--attr-examples 256] [--out docs/criteria.md]
(``make docs`` regenerates the committed docs/criteria.md with the defaults.)
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
    FPGMAttributionMetric,
    LAMPAttributionMetric,
    LpNormAttributionMetric,
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
        "l2_norm": (LpNormAttributionMetric, {"p": 2}),
        "fpgm": (FPGMAttributionMetric, {}),
        "lamp": (LAMPAttributionMetric, {}),
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
    results: dict[tuple[str, float, int], list[float]] = {}  # (metric, ratio, seed) -> per layer
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
                    results.setdefault((name, ratio, seed), []).append(accuracy(pruned, data))
        print(f"seed {seed}: base accuracy {base[-1]:.3f} ({time.perf_counter() - started:.0f} s)", flush=True)

    names = list(metrics(0))
    seeds = range(args.seeds)
    header = "| metric | " + " | ".join(f"{int(r * 100)}% removed" for r in ratios) + " | mean over ratios |"
    lines = [header, "|" + "---|" * (len(ratios) + 2)]
    means, spreads = {}, {}

    def sd(values: list[float]) -> float:
        return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0

    for name in names:
        # per seed: the accuracy averaged over layers; then mean and spread over seeds
        per_seed = {r: [float(np.mean(results[(name, r, s)])) for s in seeds] for r in ratios}
        overall = [float(np.mean([per_seed[r][i] for r in ratios])) for i in range(len(seeds))]
        means[name], spreads[name] = float(np.mean(overall)), sd(overall)
        cells = [f"{np.mean(per_seed[r]):.3f} ± {sd(per_seed[r]):.3f}" for r in ratios]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {means[name]:.3f} ± {spreads[name]:.3f} |")
    ranking = " > ".join(f"{n} ({means[n]:.3f})" for n in sorted(names, key=lambda n: -means[n]))
    summary = [
        f"Unpruned accuracy {np.mean(base):.3f} ± {sd(base):.3f} (mean ± sample sd over {args.seeds} seeds). "
        f"Each cell: test accuracy with one layer pruned, no fine-tuning, averaged over {len(roots)} layers; "
        f"mean ± sample standard deviation over {args.seeds} seeds; {args.attr_examples} training images "
        "for attribution.",
        "",
        *lines,
        "",
        f"Ranking by mean accuracy over ratios: {ranking}",
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
