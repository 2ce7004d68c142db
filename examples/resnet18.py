"""torchvision's ResNet-18 pruned by 50%, with its CPU latency measured before and after.

1. Build ``torchvision.models.resnet18()`` (random weights: nothing is downloaded) in eval mode.
2. `pruneplan.prunable_groups` finds every prunable group, including the channels that the
   residual additions couple across a whole stage (they are removed together, in every conv,
   BatchNorm and downsample that touches them).
3. Score the units with the weight norm (data-free), keep the strongest half of every group with
   `pruneplan.select_indices` (the scores of coupled convs are averaged), build the plan with
   `pruneplan.plan_pruning` and apply it to a copy.
4. Print parameters, the pruned widths, the output shape (still 1x1000) and the median latency
   of a 1x3x224x224 forward pass (one thread), before and after.

With torchvision missing, the example says so and exits with status 0.
Outputs under --out: plan.json, results.txt.

Usage: python examples/resnet18.py [--out out/resnet18] [--quick]
"""

from __future__ import annotations

import copy
import importlib.util
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from digits import count_params, example_parser, latency_ms, start_example

import pruneplan as pp
from pruneplan.attributions import WeightNormAttributionMetric

SKIP_MESSAGE = "torchvision is not installed; pip install torchvision to run this example"


def main() -> None:
    ap = example_parser(__doc__, "resnet18")
    ap.add_argument("--ratio", type=float, default=0.5, help="fraction of units to remove per group")
    args = ap.parse_args()
    if importlib.util.find_spec("torchvision") is None:
        print(SKIP_MESSAGE)
        return
    import torchvision

    started = time.perf_counter()
    out = start_example(args.out)
    runs = 5 if args.quick else 20

    model = torchvision.models.resnet18().eval()  # weights=None: random weights, no download
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    probe = x[:, :, :64, :64].repeat(2, 1, 1, 1)  # discovery needs shapes, not the full size
    groups = pp.prunable_groups(model, probe)
    coupled = [g for g in groups if len(g.roots) > 1]
    print(f"torchvision {torchvision.__version__}: ResNet-18, {count_params(model):,} parameters, "
          f"{len(groups)} prunable groups ({len(coupled)} coupled by residual additions: "
          + ", ".join(f"{g.name} x{len(g.roots)}" for g in coupled) + ")")

    roots = [r for g in groups for r in g.roots]
    scores = WeightNormAttributionMetric(model, [], F.cross_entropy, "cpu", progress=False).run_all(roots)
    removed = pp.select_indices(scores, args.ratio, groups=groups)
    plan = pp.plan_pruning(model, removed, example_inputs=probe,
                           provenance={"metric": "weight_norm",
                                       "selection": {"ratio": args.ratio, "scope": "layer"}})
    plan.save(out / "plan.json")
    print(f"plan: {len(plan.groups)} groups, {plan.parameters_removed():,} parameters removed, "
          f"digest {plan.digest()[:12]} -> plan.json")

    pruned = pp.apply_plan(copy.deepcopy(model), plan).eval()
    with torch.no_grad():
        y = pruned(x)
    print(f"pruned output shape {tuple(y.shape)}; conv1 {model.conv1.out_channels} -> "
          f"{pruned.conv1.out_channels} filters, fc {model.fc.in_features} -> {pruned.fc.in_features} inputs")

    before = latency_ms(model, x, runs)
    after = latency_ms(pruned, x, runs)
    p0, p1 = count_params(model), count_params(pruned)
    lines = [
        f"parameters: {p0:,} -> {p1:,} ({p1 / p0:.1%})",
        f"latency 1x3x224x224 (median of {runs}, 1 thread): {before:.1f} ms -> {after:.1f} ms "
        f"({before / after:.2f}x faster)",
    ]
    print("\n".join(lines))
    (out / "results.txt").write_text("\n".join(lines) + "\n")
    print(f"\noutputs in {out.resolve()}: plan.json, results.txt ({time.perf_counter() - started:.1f} s)")


if __name__ == "__main__":
    sys.exit(main())
