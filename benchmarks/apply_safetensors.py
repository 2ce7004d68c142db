"""Benchmark: `pruneplan apply` on a ~1 GB safetensors checkpoint vs a plain safetensors copy.

Prints, as ratios measured in the same run (median of --repeat runs, alternating):
  * time(pruneplan apply) / time(safetensors load_file + save_file of the same file)   target <= 1.5
  * peak RSS of the apply process / (output size + largest tensor)                     target <= 1.3
    (also with the RSS of a bare interpreter that imported pruneplan subtracted)

Usage: python benchmarks/apply_safetensors.py [--size-mb 1024] [--repeat 3] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COPY = """
import sys
from safetensors.torch import load_file, save_file
save_file(load_file(sys.argv[1]), sys.argv[2])
"""
IDLE = "import pruneplan.cli, torch, safetensors.torch"


def run_measured(cmd: list[str]) -> tuple[float, int]:
    """Run ``cmd``; return (wall seconds, peak RSS bytes) of that child alone."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"command failed: {' '.join(cmd)}\n{proc.stderr.read().decode()}")
    return elapsed, usage.ru_maxrss * 1024


def alternate(commands: list[list[str]], repeat: int) -> list[tuple[float, float]]:
    """Run ``commands`` in turn, ``repeat`` times; per command (median seconds, median peak RSS)."""
    runs = [[run_measured(cmd) for cmd in commands] for _ in range(repeat)]
    return [(statistics.median(r[i][0] for r in runs), statistics.median(r[i][1] for r in runs))
            for i in range(len(commands))]


def linear_chain(size_mb: int, min_layers: int, gen):
    """A meta-device chain of 2048x2048 Linear layers of about ``size_mb`` MB (fp32), and a plan
    removing a random 50% of every hidden layer's units (drawn from the torch Generator ``gen``)."""
    import torch
    from torch import nn

    import pruneplan as pp

    width = 2048
    per_layer = width * width * 4 + width * 4
    layers = max(min_layers, round(size_mb * 2**20 / per_layer))
    with torch.device("meta"):
        model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    removed = {str(i): sorted(torch.randperm(width, generator=gen)[: width // 2].tolist())
               for i in range(layers - 1)}
    cascades = {str(i): [str(i + 1)] for i in range(layers - 1)}
    return model, pp.plan_pruning(model, removed, cascades=cascades)


def build(folder: Path, size_mb: int) -> tuple[Path, Path, int]:
    """A chain of square Linear layers of about ``size_mb`` MB (fp32), and a plan removing 50%."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    model, plan = linear_chain(size_mb, 2, gen)
    plan_path = plan.save(folder / "plan.json")
    state = {k: torch.randn(v.shape, generator=gen) for k, v in model.state_dict().items()}
    weights = folder / "model.safetensors"
    save_file(state, str(weights), metadata={"source": "benchmark"})
    largest = max(v.numel() * v.element_size() for v in state.values())
    return plan_path, weights, largest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--keep", type=Path, default=None, help="folder to keep the files in")
    ap.add_argument("--build", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build is not None:
        _, _, largest = build(args.build, args.size_mb)
        (args.build / "largest").write_text(str(largest))
        return
    folder = args.keep or Path(tempfile.mkdtemp(prefix="pruneplan-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    # Build in a child process: a forked child's peak RSS counts the parent's pages, so the
    # parent stays small (no torch import, no tensors).
    subprocess.run([sys.executable, __file__, "--build", str(folder), "--size-mb", str(args.size_mb)],
                   check=True)
    plan_path, weights = folder / "plan.json", folder / "model.safetensors"
    largest = int((folder / "largest").read_text())
    out = folder / "model.pruned.safetensors"
    copy_out = folder / "copy.safetensors"
    exe = [sys.executable, "-m", "pruneplan.cli"]
    (ta, ra), (tc, rc) = alternate([[*exe, "apply", str(plan_path), str(weights), "-o", str(out), "--force"],
                                    [sys.executable, "-c", COPY, str(weights), str(copy_out)]], args.repeat)
    _, idle_rss = run_measured([sys.executable, "-c", IDLE])
    size_in, size_out = weights.stat().st_size, out.stat().st_size
    mb = 2**20
    print(f"checkpoint: {size_in / mb:.0f} MB in, {size_out / mb:.0f} MB out, largest tensor {largest / mb:.0f} MB")
    print(f"apply: {ta:.2f} s   plain safetensors copy: {tc:.2f} s   ratio {ta / tc:.2f} (target <= 1.5)")
    print(f"peak RSS: apply {ra / mb:.0f} MB, copy {rc / mb:.0f} MB, "
          f"bare interpreter with imports {idle_rss / mb:.0f} MB")
    print(f"RSS / (output + largest tensor): {ra / (size_out + largest):.2f} with the interpreter, "
          f"{(ra - idle_rss) / (size_out + largest):.2f} without (target <= 1.3 plus interpreter)")
    if args.keep is None:
        for p in folder.iterdir():
            p.unlink()
        folder.rmdir()


if __name__ == "__main__":
    main()
