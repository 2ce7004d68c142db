"""Benchmark: wall time of the plan-review commands on a plan of a ResNet-50.

`pruneplan show`, `diff`, `validate PLAN` (no weights) and `schema` import neither torch nor
numpy (a test checks it); this prints how long each takes from the shell, next to a bare
interpreter and an interpreter importing torch, median of --repeat runs. Target for `show`:
<= 0.3 s.

The plans come from torchvision's `resnet50(weights=None)` when torchvision is importable, else
from the small ResNet-50 written below (same layer shapes), pruned by weight norm (30% and 40%
of every prunable group, for `diff`).

Usage: python benchmarks/plan_commands.py [--repeat 5] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def resnet50():
    """torchvision's ResNet-50 (random weights), or the same architecture written here."""
    try:
        from torchvision.models import resnet50 as tv_resnet50
    except ImportError:
        pass
    else:
        return tv_resnet50(weights=None), "torchvision.models.resnet50"
    from torch import nn

    class Bottleneck(nn.Module):
        def __init__(self, cin: int, width: int, stride: int) -> None:
            super().__init__()
            cout = width * 4
            self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
            self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(width)
            self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
            self.relu = nn.ReLU()
            self.downsample = None
            if stride != 1 or cin != cout:
                self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.relu(self.bn2(self.conv2(out)))
            out = self.bn3(self.conv3(out))
            return self.relu(out + (x if self.downsample is None else self.downsample(x)))

    layers, cin = [], 64
    for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        stage = []
        for i in range(blocks):
            stage.append(Bottleneck(cin, width, stride if i == 0 else 1))
            cin = width * 4
        layers.append(nn.Sequential(*stage))
    model = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                          nn.MaxPool2d(3, 2, 1), *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(2048, 1000))
    return model, "ResNet-50 written in benchmarks/plan_commands.py"


def build_plans(folder: Path) -> str:
    """Write a.json (30% removed) and b.json (40%) for a ResNet-50; return where the model came from."""
    import torch

    import pruneplan as pp

    model, origin = resnet50()
    model.eval()
    x = torch.randn(1, 3, 224, 224)
    for name, ratio in (("a", 0.3), ("b", 0.4)):
        pp.plan_from_metric(model, x, "weight_norm", ratio).save(folder / f"{name}.json")
    return origin


def command() -> list[str]:
    """The `pruneplan` console script beside this interpreter, else ``python -m pruneplan.cli``."""
    script = Path(sys.executable).with_name("pruneplan")
    return [str(script)] if script.exists() else [sys.executable, "-m", "pruneplan.cli"]


def timed(cmd: list[str], repeat: int, ok: tuple[int, ...] = (0,)) -> tuple[float, float]:
    """Median (wall seconds, CPU seconds user+sys) of ``cmd`` over ``repeat`` runs. On a shared
    machine the CPU time is the steadier of the two."""
    walls, cpus = [], []
    for _ in range(repeat):
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(proc.pid, 0)
        walls.append(time.perf_counter() - start)
        cpus.append(usage.ru_utime + usage.ru_stime)
        err = proc.stderr.read().decode()
        proc.stderr.close()
        if os.waitstatus_to_exitcode(status) not in ok:
            raise SystemExit(f"command failed: {' '.join(cmd)}\n{err}")
    return statistics.median(walls), statistics.median(cpus)


def show_time(folder: Path, repeat: int) -> str:
    """`pruneplan show` on the ResNet-50 plan in ``folder`` (built if absent), as a printable
    line: median wall and CPU seconds, and those of a bare interpreter for scale."""
    if not (folder / "a.json").exists():
        subprocess.run([sys.executable, __file__, "--build", str(folder)], check=True)
    w, c = timed([*command(), "show", str(folder / "a.json")], repeat)
    pw, pc = timed([sys.executable, "-c", "pass"], repeat)
    return (f"pruneplan show, ResNet-50 plan: {w:.2f} s wall, {c:.2f} s CPU, median of {repeat} "
            f"(target <= 0.3 s; python -c pass: {pw:.2f} s wall, {pc:.2f} s CPU)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--keep", type=Path, default=None, help="folder to keep the plans in")
    ap.add_argument("--build", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build is not None:
        print(f"plans of: {build_plans(args.build)}")
        return
    folder = args.keep or Path(tempfile.mkdtemp(prefix="pruneplan-plans-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        if not (folder / "a.json").exists():
            subprocess.run([sys.executable, __file__, "--build", str(folder)], check=True)
        a, b, cli = folder / "a.json", folder / "b.json", command()
        size = os.path.getsize(a)
        print(f"plan: {size / 1024:.0f} KiB; command: {' '.join(cli)}; median of {args.repeat} runs")
        rows = [
            ("python -c pass", [sys.executable, "-c", "pass"], (0,)),
            ("python -c 'import torch'", [sys.executable, "-c", "import torch"], (0,)),
            ("pruneplan show A", [*cli, "show", str(a)], (0,)),
            ("pruneplan diff A B", [*cli, "diff", str(a), str(b)], (1,)),
            ("pruneplan validate A", [*cli, "validate", str(a)], (0,)),
            ("pruneplan schema", [*cli, "schema"], (0,)),
        ]
        print(f"{'command':28s} {'wall':>7s} {'CPU':>7s}")
        for label, cmd, ok in rows:
            target = "   (target <= 0.3 s)" if label.startswith("pruneplan show") else ""
            w, c = timed(cmd, args.repeat, ok)
            print(f"{label:28s} {w:6.2f}s {c:6.2f}s{target}")
    finally:
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
