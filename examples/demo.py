"""The main demo: six pruning criteria compared on real data (scikit-learn's digits).

1. Train a small CNN on load_digits (seeded, a few seconds on 2 cores).
2. Score every prunable unit with the six metrics (one data pass per metric, progress bars).
3. For each metric and ratio: `select_indices` -> `plan_pruning` (automatic discovery) -> plan
   JSON -> `apply_plan` on a copy -> accuracy without fine-tuning, after one epoch of
   fine-tuning, parameters, MACs and measured CPU latency.
4. Print one table, save a plot (accuracy vs ratio, one line per metric) and every plan.
5. Replay one plan through the CLI on saved weights (`pruneplan apply`) and check that the
   file-pruned model equals the live-pruned one.

Usage: python examples/demo.py [--out out/demo] [--quick]
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from digits import (
    accuracy,
    count_macs,
    count_params,
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
    "shapley": (ShapleyAttributionMetric, {"sv_samples": 20, "seed": 0}),
}


def main() -> None:
    ap = example_parser(__doc__, "demo")
    args = ap.parse_args()
    started = time.perf_counter()
    out = start_example(args.out)
    (out / "plans").mkdir(exist_ok=True)

    data = load_data()
    model = make_cnn()
    epochs, ratios, n_attr = (2, [0.5], 128) if args.quick else (12, [0.25, 0.5, 0.75], 512)
    train(model, data, epochs)
    base_acc = accuracy(model, data)
    print(f"trained {epochs} epochs: test accuracy {base_acc:.3f} ({len(data.y_test)} test images)")

    x = data.x_test[:2]
    groups = pp.prunable_groups(model, x)
    roots = [g.name for g in groups]
    print(f"prunable groups: {', '.join(f'{g.name} ({g.size})' for g in groups)}")
    batches = list(data.batches(64, seed=99, limit=n_attr))

    scores = {}
    for name, (cls, kwargs) in METRICS.items():
        metric = cls(model, batches, F.cross_entropy, "cpu", **kwargs)
        # evaluate after BN+ReLU (find_best) so APoZ counts post-activation zeros
        scores[name] = metric.run_all(roots, find_best_evaluation_module=True)

    bench_x = data.x_test[:256]
    rows = [("none", 0.0, base_acc, base_acc, count_params(model), count_macs(model, x),
             latency_ms(model, bench_x))]
    for name in METRICS:
        for ratio in ratios:
            removed = pp.select_indices(scores[name], ratio)
            plan = pp.plan_pruning(model, removed, example_inputs=x,
                                   provenance={"metric": name, "selection": {"ratio": ratio, "scope": "layer"}})
            plan.save(out / "plans" / f"{name}_{int(ratio * 100)}.json")
            pruned = pp.apply_plan(copy.deepcopy(model), plan)
            acc0 = accuracy(pruned, data)
            train(pruned, data, 1, lr=1e-3, seed=7)
            rows.append((name, ratio, acc0, accuracy(pruned, data), count_params(pruned),
                         count_macs(pruned, x), latency_ms(pruned, bench_x)))

    header = f"{'metric':<12} {'ratio':>5} {'acc':>6} {'acc+ft':>7} {'params':>8} {'MACs':>8} {'latency ms':>10}"
    lines = [header, "-" * len(header)]
    lines += [f"{m:<12} {r:>5.2f} {a:>6.3f} {f:>7.3f} {p:>8,} {c:>8,} {t:>10.2f}" for m, r, a, f, p, c, t in rows]
    table = "\n".join(lines)
    print("\n" + table)
    (out / "results.txt").write_text(table + "\n")
    plot(rows, ratios, base_acc, out / "accuracy_vs_ratio.png")

    # the same plan, applied to saved weights through the CLI, with no model code
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
    print(f"\noutputs in {out.resolve()}: results.txt, accuracy_vs_ratio.png, plans/*.json, "
          f"model.safetensors, model.pruned.safetensors ({time.perf_counter() - started:.0f} s)")
    if not same:
        raise SystemExit("the file-pruned model differs from the live-pruned model")


def plot(rows: list, ratios: list[float], base_acc: float, path: Path) -> None:
    """Accuracy (no fine-tuning) vs pruning ratio, one line per metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name in METRICS:
        acc = [base_acc] + [a for m, r, a, *_ in rows if m == name]
        ax.plot([0.0, *ratios], acc, marker="o", label=name)
    ax.set_xlabel("fraction of units removed per layer")
    ax.set_ylabel("test accuracy, no fine-tuning")
    ax.set_title("digits CNN: pruning criteria")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
