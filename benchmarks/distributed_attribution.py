"""Benchmark: attribution on 2 gloo ranks (one CPU thread each) vs 1 process over the same data.

Each configuration scores the convolutions of a small VGG-style CNN (32x32 inputs) with Taylor
(three convolutions) and with seeded Shapley (the middle one), on N random examples; with 2 ranks each rank scores its half (strided
shard) and the metric all-reduces. Prints, measured in the same run (median of --repeat):

  * time(2 ranks) / time(1 process) per metric (ideal 0.5: the collectives cost little)
  * the largest relative difference between the two runs' scores (float rounding only)

Times are of ``run_all`` alone, measured inside the ranks after a barrier (process start-up and
imports excluded).

Usage: python benchmarks/distributed_attribution.py [--examples 512] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from pruneplan.attributions import ShapleyAttributionMetric, TaylorAttributionMetric

# metric -> (class, constructor arguments, modules scored)
METRICS = {
    "taylor": (TaylorAttributionMetric, {}, ["0", "3", "7"]),
    "shapley": (ShapleyAttributionMetric, {"seed": 0, "sv_samples": 2}, ["3"]),
}


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(64, 10),
    ).eval()


def make_data(n: int) -> TensorDataset:
    gen = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, 3, 32, 32, generator=gen), torch.randint(0, 10, (n,), generator=gen))


def worker(rank: int, world: int, folder: str, n: int, repeat: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/init{world}", rank=rank, world_size=world)
    data = make_data(n)
    loader = DataLoader(Subset(data, range(rank, n, world)), batch_size=64)
    model = make_model()
    out: dict[str, object] = {}
    for name, (cls, kwargs, modules) in METRICS.items():
        times = []
        for _ in range(repeat):
            metric = cls(model, loader, F.cross_entropy, "cpu", progress=False, **kwargs)
            dist.barrier()
            start = time.perf_counter()
            scores = metric.run_all(modules)
            times.append(time.perf_counter() - start)
        out[name] = (statistics.median(times), scores)
    if rank == 0:
        torch.save(out, Path(folder) / f"world{world}.pt")
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="pruneplan-dist-bench-") as folder:
        for world in (1, 2):
            mp.start_processes(worker, args=(world, folder, args.examples, args.repeat), nprocs=world,
                               start_method="spawn")
        one, two = (torch.load(Path(folder) / f"world{w}.pt", weights_only=False) for w in (1, 2))
    print(f"{args.examples} examples, one CPU thread per process")
    print(f"{'metric':<10} {'1 process':>10} {'2 ranks':>10} {'ratio':>7} {'max rel diff':>13}")
    for name in METRICS:
        (t1, s1), (t2, s2) = one[name], two[name]
        diff = max(float(np.max(np.abs(s2[m] - s1[m])) / np.max(np.abs(s1[m]))) for m in s1)
        print(f"{name:<10} {t1:>9.2f}s {t2:>9.2f}s {t2 / t1:>7.2f} {diff:>13.1e}")


if __name__ == "__main__":
    main()
