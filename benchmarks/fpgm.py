"""FPGM scoring: time of the current ``distance_sums`` against the previous implementation (not a test).

Workload: every convolution and the classifier of torchvision's ResNet-18 (random weights), scored
by `FPGMAttributionMetric` one module at a time; the widest is ``layer4.0.conv2`` (512 units of
4608 weights). The previous implementation is copied here: exact differences broadcast to a
``(units, units, fan_in)`` tensor when it held at most 2**26 elements, otherwise a Python loop over
the rows. Both run in this process with the same thread count; the ratio is old / new CPU time
(median of ``--reps``), and the largest relative difference of the scores is printed too.

Run: ``PYTHONPATH=. .venv/bin/python benchmarks/fpgm.py [--reps 3] [--threads 1]``
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision

from pruneplan.attributions import FPGMAttributionMetric
from pruneplan.attributions._weights import unit_rows
from pruneplan.attributions.fpgm import distance_sums


def old_distance_sums(rows: torch.Tensor) -> torch.Tensor:
    """The implementation before this benchmark (pruneplan 8833a27)."""
    if rows.shape[0] * rows.numel() <= 2**26:
        return (rows[:, None, :] - rows[None, :, :]).pow(2).sum(-1).sqrt().sum(1)
    return torch.stack([(rows - r).pow(2).sum(1).sqrt().sum() for r in rows])


def cpu_time(fn, arg: object, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.process_time()
        fn(arg)
        times.append(time.process_time() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
    total_old = total_new = 0.0
    print(f"threads {args.threads}, median of {args.reps} CPU times")
    print(f"{'module':<24} {'units x fan_in':>15} {'old s':>9} {'new s':>9} {'old/new':>8} {'max rel diff':>13}")
    for name in names:
        rows = unit_rows(name, model.get_submodule(name))
        t_old = cpu_time(old_distance_sums, rows, args.reps)
        t_new = cpu_time(distance_sums, rows, args.reps)
        ref = old_distance_sums(rows)
        rel = float(((distance_sums(rows) - ref).abs() / ref.abs().clamp_min(1e-300)).max())
        total_old += t_old
        total_new += t_new
        shape = f"{rows.shape[0]} x {rows.shape[1]}"
        print(f"{name:<24} {shape:>15} {t_old:9.4f} {t_new:9.4f} {t_old / t_new:8.1f} {rel:13.2e}")
    print(f"{'all modules':<24} {'':>15} {total_old:9.4f} {total_new:9.4f} {total_old / total_new:8.1f}")
    # through the metric (unit_rows included), the module of the trial report
    metric = FPGMAttributionMetric(model, [], None, "cpu", progress=False)
    t = cpu_time(metric.run, "layer4.0.conv2", args.reps)
    print(f"FPGMAttributionMetric.run('layer4.0.conv2'): {t:.4f} s CPU")


if __name__ == "__main__":
    main()
