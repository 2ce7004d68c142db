"""End-to-end demo: plan the pruning of a small CNN, apply it through the CLI, check the result.

Steps: build a seeded CNN -> score filters by L1 weight norm -> `plan_pruning` (explicit
cascades) -> save plan JSON and safetensors weights -> `pruneplan apply plan.json
model.safetensors` in a subprocess (no model code involved) -> `load_pruned` into a fresh model
-> compare with the live-pruned model and with the original whose pruned channels are zeroed.

Usage: python examples/demo.py [--out out/demo]
"""

from __future__ import annotations

import argparse
import copy
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

import pruneplan as pp


def make_cnn() -> nn.Sequential:
    """A VGG-style CNN for 3x32x32 inputs."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Dropout(0.2), nn.Linear(64 * 8 * 8, 128), nn.ReLU(), nn.Linear(128, 10),
    )


CASCADES = {"0": ["1", "4"], "4": ["5", "9", "10"], "10": ["12"]}


def latency_ms(model: nn.Module, x: torch.Tensor, runs: int = 20) -> float:
    with torch.no_grad():
        model(x)
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2] * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("out/demo"))
    ap.add_argument("--ratio", type=float, default=0.5)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = make_cnn().eval()
    x = torch.randn(8, 3, 32, 32)

    removed = {}
    for name in CASCADES:
        w = dict(model.named_modules())[name].weight.detach()
        norms = w.abs().reshape(w.shape[0], -1).sum(1)  # L1 norm of each output unit
        k = int(args.ratio * w.shape[0])
        removed[name] = sorted(torch.argsort(norms, stable=True)[:k].tolist())
    plan = pp.plan_pruning(model, removed, example_inputs=x, cascades=CASCADES,
                           provenance={"metric": "weight_norm", "selection": {"ratio": args.ratio}})
    plan_path = plan.save(args.out / "plan.json")
    weights = args.out / "model.safetensors"
    save_file(model.state_dict(), str(weights))

    pruned_path = args.out / "model.pruned.safetensors"
    cli = shutil.which("pruneplan", path=str(Path(sys.executable).parent)) or "pruneplan"
    subprocess.run([cli, "apply", str(plan_path), str(weights), "-o", str(pruned_path), "--force"], check=True)
    subprocess.run([cli, "show", str(plan_path)], check=True)

    fresh = pp.load_pruned(make_cnn().eval(), plan, pruned_path)
    live = pp.apply_plan(copy.deepcopy(model), plan)
    with torch.no_grad():
        same = torch.equal(fresh(x), live(x))
    n_before = sum(p.numel() for p in model.parameters())
    n_after = sum(p.numel() for p in fresh.parameters())
    big = torch.randn(64, 3, 32, 32)
    t_before, t_after = latency_ms(model, big), latency_ms(fresh, big)
    print(f"\nparameters: {n_before:,} -> {n_after:,} ({n_after / n_before:.1%})")
    print(f"CPU latency (batch 64): {t_before:.1f} ms -> {t_after:.1f} ms ({t_before / t_after:.2f}x faster)")
    print(f"pruned file loaded into a fresh model == live-pruned model: {same}")
    print(f"outputs in {args.out}/: plan.json, model.safetensors, model.pruned.safetensors")
    if not same:
        raise SystemExit("mismatch between the file-pruned and the live-pruned model")


if __name__ == "__main__":
    main()
