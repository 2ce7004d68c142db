"""Benchmark: `pruneplan apply` on a ~1 GB safetensors checkpoint vs a plain safetensors copy.

The checkpoint is a chain of wide square Linear layers (default 4 x 8192x8192 fp32, 1 GB).
Three plans remove half of the units of every layer but the last, so every weight but the
first and the last loses rows and columns:

  strided  every other unit (0, 2, 4, ...): slices strided on both axes
  random   a random half
  block    one contiguous block (the middle half)

For each plan prints, as ratios measured in the same run (commands run alternately, apply of
each plan then the copy, --repeat rounds, medians):
  * time(pruneplan apply) / time(safetensors load_file + save_file of the same file)   target <= 1.0
    (wall time, and CPU time user+sys, which the other load of a shared machine disturbs less;
    apply's time includes the fsync of its output before the rename, the copy does not fsync;
    every command starts after an untimed ``sync``)
  * peak RSS of the apply process / (output size + largest tensor)          target <= 1.3 + interpreter
    (also with the peak RSS of an interpreter that only imported what `apply` imports subtracted)
Then the wall time of `pruneplan show` on a plan of a ResNet-50 (see plan_commands.py).

Usage: python benchmarks/apply_safetensors.py [--size-mb 1024] [--width 8192] [--repeat 3] [--keep DIR]
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

COPY = """
import sys
from safetensors.torch import load_file, save_file
save_file(load_file(sys.argv[1]), sys.argv[2])
"""
# what the apply command imports before it reads anything: its peak RSS is the interpreter's
IDLE = "import pruneplan.cli, pruneplan; pruneplan.apply_to_safetensors"
PATTERNS = ("strided", "random", "block")


def run_measured(cmd: list[str], ok: tuple[int, ...] = (0,)) -> tuple[float, float, int]:
    """Run ``cmd``; return (wall seconds, CPU seconds user+sys, peak RSS bytes) of that child alone.

    Dirty pages of the previous command are flushed first (``os.sync``, not timed): otherwise
    the kernel throttles the next command's writes while it writes back the last one's output,
    and the command that follows one which did not ``fsync`` (the plain copy) pays for it."""
    os.sync()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) not in ok:
        raise SystemExit(f"command failed: {' '.join(cmd)}\n{proc.stderr.read().decode()}")
    proc.stderr.close()
    return elapsed, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024


def alternate(commands: dict[str, list[str]], repeat: int) -> dict[str, tuple[float, float, float]]:
    """Run ``commands`` in turn, ``repeat`` rounds; per name (median wall s, median CPU s, median peak RSS)."""
    runs: dict[str, list[tuple[float, float, int]]] = {name: [] for name in commands}
    for _ in range(repeat):
        for name, cmd in commands.items():
            runs[name].append(run_measured(cmd))
    return {name: tuple(statistics.median(r[i] for r in rs) for i in range(3)) for name, rs in runs.items()}


def units(name: str, width: int, gen) -> list[int]:
    """Half of ``width`` units, by pattern ``name`` (see the module docstring)."""
    import torch

    if name == "strided":
        return list(range(0, width, 2))
    if name == "random":
        return sorted(torch.randperm(width, generator=gen)[: width // 2].tolist())
    return list(range(width // 4, width // 4 + width // 2))


def linear_chain(size_mb: int, width: int, min_layers: int, gen):
    """A meta-device chain of ``width`` x ``width`` Linear layers of about ``size_mb`` MB (fp32),
    and one plan per pattern removing half of every layer's units but the last layer's."""
    import torch
    from torch import nn

    import pruneplan as pp

    per_layer = width * width * 4 + width * 4
    layers = max(min_layers, round(size_mb * 2**20 / per_layer))
    with torch.device("meta"):
        model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    cascades = {str(i): [str(i + 1)] for i in range(layers - 1)}
    plans = {p: pp.plan_pruning(model, {str(i): units(p, width, gen) for i in range(layers - 1)},
                                cascades=cascades) for p in PATTERNS}
    return model, plans


def build(folder: Path, size_mb: int, width: int) -> None:
    """The checkpoint model.safetensors, one plan per pattern, and the largest tensor's size."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    model, plans = linear_chain(size_mb, width, 2, gen)
    for name, plan in plans.items():
        plan.save(folder / f"{name}.json")
    state = {k: torch.randn(v.shape, generator=gen) for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"source": "benchmark"})
    (folder / "largest").write_text(str(max(v.numel() * v.element_size() for v in state.values())))


def report(results: dict, copy_key: str, sizes_out: dict[str, int], largest: int, idle_rss: float,
           rss_note: str = "") -> None:
    """Print the ratio lines of every pattern against the copy."""
    mb = 2**20
    tc, cc, rc = results[copy_key]
    print(f"plain safetensors copy: {tc:.2f} s wall, {cc:.2f} s CPU, peak RSS {rc / mb:.0f} MB")
    print(f"interpreter with apply's imports: peak RSS {idle_rss / mb:.0f} MB")
    for p in PATTERNS:
        ta, ca, ra = results[p]
        bound = sizes_out[p] + largest
        print(f"{p:8s} apply {ta:5.2f} s wall ({ca:5.2f} s CPU)   apply/copy: wall {ta / tc:.2f}, "
              f"CPU {ca / cc:.2f} (target <= 1.0)")
        print(f"{'':8s} peak RSS {ra / mb:.0f} MB / (output {sizes_out[p] / mb:.0f} MB + largest tensor "
              f"{largest / mb:.0f} MB) = {ra / bound:.2f}; {(ra - idle_rss) / bound:.2f} without the "
              f"interpreter (target <= 1.3 + interpreter){rss_note}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--width", type=int, default=8192)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--keep", type=Path, default=None, help="folder to keep the files in")
    ap.add_argument("--build", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build is not None:
        build(args.build, args.size_mb, args.width)
        return
    folder = args.keep or Path(tempfile.mkdtemp(prefix="pruneplan-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        # Build in a child process: a forked child's peak RSS counts the parent's pages, so the
        # parent stays small (no torch import, no tensors).
        subprocess.run([sys.executable, __file__, "--build", str(folder), "--size-mb", str(args.size_mb),
                        "--width", str(args.width)], check=True)
        weights, largest = folder / "model.safetensors", int((folder / "largest").read_text())
        exe = [sys.executable, "-m", "pruneplan.cli"]
        commands: dict[str, list[str]] = {}
        for p in PATTERNS:
            commands[p] = [*exe, "apply", str(folder / f"{p}.json"), str(weights), "-o",
                           str(folder / f"{p}.safetensors"), "--force"]
            commands[f"copy-after-{p}"] = [sys.executable, "-c", COPY, str(weights), str(folder / "copy.safetensors")]
        raw = alternate(commands, args.repeat)
        copies = [raw[f"copy-after-{p}"] for p in PATTERNS]
        results = {p: raw[p] for p in PATTERNS}
        results["copy"] = tuple(statistics.median(c[i] for c in copies) for i in range(3))
        _, _, idle_rss = run_measured([sys.executable, "-c", IDLE])
        mb = 2**20
        print(f"checkpoint: {weights.stat().st_size / mb:.0f} MB, {args.width}x{args.width} fp32 Linear layers, "
              f"largest tensor {largest / mb:.0f} MB; median of {args.repeat} alternating rounds")
        sizes = {p: (folder / f"{p}.safetensors").stat().st_size for p in PATTERNS}
        report(results, "copy", sizes, largest, idle_rss)
        from plan_commands import show_time

        print(show_time(folder, 5))
    finally:
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
