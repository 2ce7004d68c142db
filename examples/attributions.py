"""The six attribution metrics, on one layer and on every prunable layer at once.

1. Train the digits CNN (seeded, a few seconds) and take a few hundred training examples for
   attribution.
2. ``metric.run("3")``: score the 32 filters of the second conv with each metric and print the
   three most and least important filters.
3. ``metric.run_all(roots)``: score every prunable layer in one data pass per metric (the roots
   come from `pruneplan.prunable_groups`) and print, per layer, the weakest unit and how much the
   metrics agree with Taylor on the weakest quarter.
4. ``reduction="none"`` returns the per-example ``(examples, units)`` matrix; a callable reduction
   (here mean + 2 * std, the aggregation of Ancona et al. 2020) turns it into one score per unit.

Outputs under --out: ``scores.npz`` (``run/<metric>``: the one-layer scores, ``<metric>/<layer>``:
the ``run_all`` scores, and the reductions of step 4) and ``layer3.txt`` (the one-layer table).

Usage: python examples/attributions.py [--out out/attributions] [--quick]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from digits import accuracy, example_parser, load_data, make_cnn, start_example, train

import pruneplan as pp
from pruneplan.attributions import (
    APoZAttributionMetric,
    RandomAttributionMetric,
    SensitivityAttributionMetric,
    ShapleyAttributionMetric,
    TaylorAttributionMetric,
    WeightNormAttributionMetric,
)

METRICS = {
    "random": (RandomAttributionMetric, {"seed": 0}),
    "weight_norm": (WeightNormAttributionMetric, {}),
    "apoz": (APoZAttributionMetric, {}),
    "sensitivity": (SensitivityAttributionMetric, {}),
    "taylor": (TaylorAttributionMetric, {}),
    "shapley": (ShapleyAttributionMetric, {"sv_samples": 5, "seed": 0}),
}
LAYER = "3"  # Conv2d(16, 32): the second conv of make_cnn()


def mean_plus_2std(matrix: np.ndarray) -> np.ndarray:
    """Aggregate per-example scores as mean + 2 * std over the examples."""
    return matrix.mean(0) + 2 * matrix.std(0)


def weakest(scores: np.ndarray, k: int) -> set[int]:
    return set(np.argsort(scores, kind="stable")[:k].tolist())


def main() -> None:
    ap = example_parser(__doc__, "attributions")
    args = ap.parse_args()
    started = time.perf_counter()
    out = start_example(args.out)

    data = load_data()
    model = make_cnn()
    epochs, n_attr = (1, 64) if args.quick else (8, 256)
    train(model, data, epochs)
    print(f"trained {epochs} epochs: test accuracy {accuracy(model, data):.3f}")
    batches = list(data.batches(64, seed=99, limit=n_attr))
    n_examples = sum(len(y) for _, y in batches)
    print(f"attribution data: {n_examples} examples in {len(batches)} batches")

    def metric(name: str, **extra: object):
        cls, kwargs = METRICS[name]
        return cls(model, batches, F.cross_entropy, "cpu", progress=False, **{**kwargs, **extra})

    # ---- 1. one layer ----------------------------------------------------------------------
    print(f"\n1. metric.run({LAYER!r}): the {model[3].out_channels} filters of the second conv")
    lines = [f"{'metric':<12} {'top 3 (most important)':<24} {'bottom 3 (least important)':<28}"]
    one_layer = {}
    saved: dict[str, np.ndarray] = {}
    for name in METRICS:
        s = metric(name).run(LAYER)
        one_layer[name] = s
        saved[f"run/{name}"] = s
        order = np.argsort(-s, kind="stable")
        lines.append(f"{name:<12} {order[:3].tolist()!s:<24} {order[::-1][:3].tolist()!s:<28}")
    table = "\n".join(lines)
    print(table)
    (out / "layer3.txt").write_text(table + "\n")

    # ---- 2. all prunable layers, one data pass per metric ----------------------------------
    groups = pp.prunable_groups(model, data.x_test[:2])
    roots = [r for g in groups for r in g.roots]
    print(f"\n2. metric.run_all({roots}): every prunable layer, one data pass per metric")
    all_scores = {}
    for name in METRICS:
        t = time.perf_counter()
        all_scores[name] = metric(name).run_all(roots)
        for layer, s in all_scores[name].items():
            saved[f"{name}/{layer}"] = s
        shapes = ", ".join(f"{layer}: {s.shape[0]}" for layer, s in all_scores[name].items())
        print(f"{name:<12} scores per layer ({shapes}) in {time.perf_counter() - t:.2f} s")
    same = [n for n in METRICS if np.array_equal(all_scores[n][LAYER], one_layer[n])]
    other = [n for n in METRICS if n not in same]
    print(f"run_all(...)[{LAYER!r}] == run({LAYER!r}) for: {', '.join(same)}")
    if other:  # seeded metrics draw from a generator per (seed, layer name): this stays empty
        print(f"  but not for {', '.join(other)}")

    print("\nweakest unit per layer, and overlap with Taylor's weakest quarter")
    header = f"{'metric':<12} " + " ".join(f"{'layer ' + r:>18}" for r in roots)
    print(header)
    for name in METRICS:
        cells = []
        for r in roots:
            s, ref = all_scores[name][r], all_scores["taylor"][r]
            k = max(1, len(s) // 4)
            overlap = len(weakest(s, k) & weakest(ref, k))
            cells.append(f"{int(np.argmin(s)):>3} ({overlap:>2}/{k:<2} shared)")
        print(f"{name:<12} " + " ".join(f"{c:>18}" for c in cells))
    zeros = ", ".join(f"{r}: {int((all_scores['taylor'][r] == 0).sum())}" for r in roots)
    print(f"taylor units scoring exactly 0 per layer ({zeros}): units whose ReLU never fires on "
          "these examples (ties go to the lowest index)")

    # ---- 3. reductions --------------------------------------------------------------------
    print("\n3. reductions over the examples")
    matrix = metric("taylor", reduction="none").run(LAYER)
    print(f'taylor reduction="none": shape {tuple(matrix.shape)} (examples x units)')
    print(f'mean of that matrix == reduction="mean": {np.allclose(matrix.mean(0), one_layer["taylor"])}')
    saved[f"taylor_none/{LAYER}"] = matrix

    sv_matrix = metric("shapley", reduction="none").run(LAYER)
    sv_callable = metric("shapley", reduction=mean_plus_2std).run(LAYER)
    print(f"shapley reduction=mean_plus_2std: shape {tuple(sv_callable.shape)}, "
          f"equals mean + 2 * std of the \"none\" matrix: {np.allclose(sv_callable, mean_plus_2std(sv_matrix))}")
    k = len(sv_callable) // 4
    kept = len(weakest(sv_callable, k) & weakest(one_layer["shapley"], k))
    print(f"weakest {k} filters: mean and mean + 2 * std agree on {kept} of {k} "
          f"(mean+2std spares units that matter a lot for a few examples)")
    saved[f"shapley_mean2std/{LAYER}"] = sv_callable

    np.savez(out / "scores.npz", **saved)
    print(f"\noutputs in {out.resolve()}: scores.npz ({len(saved)} arrays), layer3.txt "
          f"({time.perf_counter() - started:.1f} s)")


if __name__ == "__main__":
    main()
