"""Shared pieces of the digits examples: data, a small CNN, training, accuracy, MACs, latency.

scikit-learn's bundled ``load_digits`` (1,797 8x8 grey images, no download) stands in for a real
dataset. Everything is seeded, so a run is reproducible on the same machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "DigitsData",
    "accuracy",
    "attribution_batches",
    "count_macs",
    "count_params",
    "example_parser",
    "latency_ms",
    "load_data",
    "make_cnn",
    "run_cli",
    "start_example",
    "train",
]


class DigitsData:
    """Train/test tensors of load_digits, scaled to [0, 1], shape (N, 1, 8, 8)."""

    def __init__(self, seed: int = 0, test_fraction: float = 0.25) -> None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(digits.target, dtype=torch.long)
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
        n_test = int(len(y) * test_fraction)
        self.x_test, self.y_test = x[order[:n_test]], y[order[:n_test]]
        self.x_train, self.y_train = x[order[n_test:]], y[order[n_test:]]

    def batches(self, batch_size: int = 64, seed: int = 0, limit: int | None = None
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Shuffled training batches; ``limit`` caps the number of examples."""
        n = len(self.y_train) if limit is None else min(limit, len(self.y_train))
        order = torch.randperm(len(self.y_train), generator=torch.Generator().manual_seed(seed))[:n]
        for i in range(0, n, batch_size):
            idx = order[i : i + batch_size]
            yield self.x_train[idx], self.y_train[idx]


def load_data(seed: int = 0) -> DigitsData:
    """The digits split used by the examples and benchmarks."""
    return DigitsData(seed)


def attribution_batches(limit: int = 256) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A few hundred training examples in batches of 64: a ``--data`` factory for the CLI."""
    return list(load_data().batches(64, seed=99, limit=limit))


def make_cnn() -> nn.Sequential:
    """Conv(16)-BN-ReLU -> Conv(32)-BN-ReLU-MaxPool -> Flatten -> Dropout -> Linear(64) -> Linear(10)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Dropout(0.25), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10),
    )


def train(model: nn.Module, data: DigitsData, epochs: int, lr: float = 3e-3, seed: int = 0,
          optimizer: torch.optim.Optimizer | None = None) -> torch.optim.Optimizer:
    """Train with Adam and cross-entropy; return the optimizer (to keep its state)."""
    opt = optimizer or torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for epoch in range(epochs):
        for x, y in data.batches(64, seed=seed * 1000 + epoch):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    model.eval()
    return opt


@torch.no_grad()
def accuracy(model: nn.Module, data: DigitsData) -> float:
    """Test accuracy in eval mode (flags restored)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    acc = (model(data.x_test).argmax(1) == data.y_test).float().mean().item()
    for m, f in flags:
        m.training = f
    return acc


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of Conv and Linear layers for one example of ``x``'s shape."""
    total = 0

    def hook(m: nn.Module, _inp: tuple, out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(m, nn.Conv2d):
            per_out = (m.in_channels // m.groups) * int(np.prod(m.kernel_size))
            total += out[0].numel() * per_out
        elif isinstance(m, nn.Linear):
            total += m.in_features * m.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    try:
        model.eval()
        model(x[:1])
    finally:
        for h in handles:
            h.remove()
    return total


@torch.no_grad()
def latency_ms(model: nn.Module, x: torch.Tensor, runs: int = 30) -> float:
    """Median CPU latency of one forward pass on ``x``, in milliseconds."""
    model.eval()
    model(x)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1000)


# the CLI works on tiny models here: one thread (unless asked otherwise) avoids oversubscribing a
# busy machine
_CLI_ENV = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run the installed ``pruneplan`` console script (the one beside this interpreter), echoing
    the command and its output; with ``check``, a non-zero exit stops the example."""
    exe = shutil.which("pruneplan", path=str(Path(sys.executable).parent)) or "pruneplan"
    print("$ pruneplan " + " ".join(args))
    result = subprocess.run([exe, *args], capture_output=True, text=True, env=_CLI_ENV)
    if result.stdout.strip():
        print(result.stdout.rstrip())
    if result.stderr.strip():
        print(result.stderr.rstrip())
    if check and result.returncode != 0:
        raise SystemExit(f"pruneplan {args[0]} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def example_parser(doc: str, name: str) -> argparse.ArgumentParser:
    """The examples' common options: ``--out DIR`` (default ``out/<name>``) and ``--quick``."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("out") / name)
    ap.add_argument("--quick", action="store_true", help="tiny settings, for the tests")
    return ap


def start_example(out: Path) -> Path:
    """Create the output folder, seed torch, use one thread; return ``out``.

    Tiny models: one intra-op thread is faster and steadier on a shared 2-core machine.
    """
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    return out
