"""Discovery + planning cost relative to one forward pass, and the speed-up of a pruned ResNet-50.

Run: ``.venv/bin/python benchmarks/graph.py [--threads N] [--repeats R] [--skip-zoo] [--cpu]``

For every zoo model (tests/zoo.py) and a ResNet-50 written out here (torchvision layout, so
torchvision is not needed) it prints the median time of one forward pass, of
`prunable_groups` (with the fx tracer and with the recording tracer), and of `build_plan` for
removing 50% of every group, each divided by the forward time. It then prunes 50% of the
channels of every ResNet-50 group (lowest L1 filter norm) and prints the median CPU latency of
the original and pruned model. When torch-pruning is installed, its dependency-graph build and
group listing on the same ResNet-50 are timed side by side.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from zoo import Bottleneck  # noqa: E402  (torchvision's ResNet-50 bottleneck: stride on the 3x3)

from pruneplan.apply import apply_plan  # noqa: E402
from pruneplan.graph.discover import prunable_groups  # noqa: E402
from pruneplan.planner import build_plan  # noqa: E402
from pruneplan.select import select_indices  # noqa: E402


class ResNet50(nn.Module):
    """ResNet-50 (25.6M parameters), same module names as torchvision's."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin, layers = 64, []
        for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            seq = []
            for i in range(blocks):
                seq.append(Bottleneck(cin, width, stride if i == 0 else 1))
                cin = width * 4
            layers.append(nn.Sequential(*seq))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2048, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# wall time by default; ``--cpu`` measures the process's CPU time instead (with one thread, the
# steadier measure on a machine other work is loading)
CLOCK: Callable[[], float] = time.perf_counter


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median time (`CLOCK`) of ``fn`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = CLOCK()
        fn()
        times.append(CLOCK() - t)
    return statistics.median(times)


def _filter_norms(m: nn.Module) -> object:
    """L1 norm of each output unit's weights (output axis 1 for ConvTranspose and Embedding)."""
    w = m.weight.detach()
    if isinstance(m, nn.ConvTranspose1d | nn.ConvTranspose2d | nn.ConvTranspose3d | nn.Embedding):
        w = w.transpose(0, 1)
    return w.abs().flatten(1).sum(1).numpy()


def filter_scores(model: nn.Module, groups: list) -> dict:
    """L1 filter norms of every root (the metric; not part of the planning time)."""
    modules = dict(model.named_modules())
    return {r: _filter_norms(modules[r]) for g in groups for r in g.roots}


def half_plan(model: nn.Module, groups: list, scores: dict) -> object:
    """Remove 50% of every group: the filters with the lowest score (mean over members)."""
    removed = select_indices(scores, 0.5, groups=groups)
    by_name = {g.name: g for g in groups}
    return build_plan(model, [(by_name[k], v) for k, v in removed.items()])


def row(name: str, model: nn.Module, x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Forward, discovery (fx, record) and planning times for one model."""
    model.eval()

    def forward() -> None:
        with torch.no_grad():
            model(x)

    fwd = median_time(forward, repeats)
    fx = median_time(lambda: prunable_groups(model, x, tracer="fx"), repeats)
    rec = median_time(lambda: prunable_groups(model, x, tracer="record"), repeats)
    groups = prunable_groups(model, x)
    scores = filter_scores(model, groups)
    plan_t = median_time(lambda: half_plan(model, groups, scores), repeats)
    print(f"{name:<14} {len(groups):>6} {1e3 * fwd:>9.1f} {1e3 * fx:>9.1f} {fx / fwd:>6.2f}x "
          f"{1e3 * rec:>9.1f} {rec / fwd:>6.2f}x {1e3 * plan_t:>9.1f} {(fx + plan_t) / fwd:>6.2f}x")
    return {"forward": fwd, "fx": fx, "record": rec, "plan": plan_t}


def torch_pruning_side_by_side(model: nn.Module, x: torch.Tensor, repeats: int, fwd: float) -> None:
    """Time torch-pruning's DependencyGraph build and group listing, if it is installed."""
    try:
        import torch_pruning as tp
    except ImportError:
        print("torch-pruning is not installed: no side-by-side comparison")
        return
    ignored = [model.fc]

    def build() -> object:
        return tp.DependencyGraph().build_dependency(model, example_inputs=x)

    t_build = median_time(build, repeats)
    dg = build()
    t_groups = median_time(lambda: list(dg.get_all_groups(ignored_layers=ignored)), repeats)
    print(f"torch-pruning {tp.__version__}: build {1e3 * t_build:.1f} ms, groups "
          f"{1e3 * t_groups:.1f} ms, total {(t_build + t_groups) / fwd:.2f}x forward")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-zoo", action="store_true")
    parser.add_argument("--cpu", action="store_true",
                        help="time CPU (time.process_time) instead of wall; use with --threads 1")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu:
        global CLOCK
        CLOCK = time.process_time
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{'CPU' if args.cpu else 'wall'} time")
    print(f"{'model':<14} {'groups':>6} {'fwd ms':>9} {'fx ms':>9} {'/fwd':>7} {'rec ms':>9} "
          f"{'/fwd':>7} {'plan ms':>9} {'fx+plan':>7}")
    if not args.skip_zoo:
        from zoo import ZOO

        for name, entry in ZOO.items():
            row(name, entry.build(), entry.example(), args.repeats)
    torch.manual_seed(0)
    model = ResNet50().eval()
    x = torch.randn(1, 3, 224, 224)
    r = row("resnet50", model, x, args.repeats)
    torch_pruning_side_by_side(model, x, args.repeats, r["forward"])

    groups = prunable_groups(model, x)
    plan = half_plan(model, groups, filter_scores(model, groups))
    pruned = apply_plan(copy.deepcopy(model), plan)
    n0 = sum(p.numel() for p in model.parameters())
    n1 = sum(p.numel() for p in pruned.parameters())

    def run(m: nn.Module) -> Callable[[], None]:
        def f() -> None:
            with torch.no_grad():
                m(x)
        return f

    reps = max(args.repeats, 7)
    t0 = median_time(run(model), reps, warmup=2)
    t1 = median_time(run(pruned), reps, warmup=2)
    print(f"resnet50 at 50% channels of {len(plan.groups)} groups: params {n0 / 1e6:.1f}M -> "
          f"{n1 / 1e6:.1f}M; latency {1e3 * t0:.1f} ms -> {1e3 * t1:.1f} ms, speed-up {t0 / t1:.2f}x "
          f"(median of {reps})")


if __name__ == "__main__":
    main()
