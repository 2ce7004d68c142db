"""Attribution metrics: time ratios on the workload of issue 3 (not a test).

Workload: a 3-conv CNN (3->32->64->128 channels, each conv followed by BN and ReLU, 32x32 input,
global average pool, Linear 10), 256 random images, batch 64; the 64-unit second conv is scored.
Every ratio is measured in the same run (median of several repetitions):

* each gradient metric / one plain forward+backward pass over the data (target <= 1.3);
* ``run_all`` over the three convs / one plain forward+backward pass (target <= 1.5);
* fast Shapley (sv_samples=5) vs the plain full-model Monte-Carlo estimator with the same
  permutations (target >= 15x); the plain estimator is timed on a subset of batches and permutations and
  scaled linearly, as the output says;
* fast Shapley / (sv_samples x units x one pass of the part after the module over the data):
  the distance to the "evaluate every coalition once" limit.

Run: ``.venv/bin/python benchmarks/attributions.py [--reps 3] [--naive-batches 1]``
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pruneplan.attributions import (
    APoZAttributionMetric,
    SensitivityAttributionMetric,
    ShapleyAttributionMetric,
    TaylorAttributionMetric,
    permutation_samples,
)


def make_model() -> nn.Sequential:
    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]

    model = nn.Sequential(
        *block(3, 32),
        *block(32, 64),
        *block(64, 128),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, 10),
    )
    with torch.no_grad():  # non-trivial BN statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


def median_time(fn: Callable[[], object], reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--naive-batches", type=int, default=1, help="batches timed for naive")
    parser.add_argument("--naive-perms", type=int, default=1, help="permutations timed for naive")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = make_model()
    x_all = torch.randn(256, 3, 32, 32)
    y_all = torch.randint(0, 10, (256,))
    data = [(x_all[i : i + 64], y_all[i : i + 64]) for i in range(0, 256, 64)]
    device = torch.device("cpu")
    crit = F.cross_entropy
    convs = [model[0], model[3], model[6]]
    target = model[3]
    n_units = 64
    samples = 5
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}")

    def plain_fwd_bwd() -> None:
        for x, y in data:
            model.zero_grad(set_to_none=True)
            crit(model(x), y).backward()
        model.zero_grad(set_to_none=True)

    plain_fwd_bwd()  # warm-up
    t_plain = median_time(plain_fwd_bwd, args.reps)
    print(f"plain forward+backward over 256 images: {t_plain * 1e3:.1f} ms")

    for cls in (SensitivityAttributionMetric, TaylorAttributionMetric, APoZAttributionMetric):
        metric = cls(model, data, crit, device, progress=False)
        metric.run(target)
        t = median_time(lambda m=metric: m.run(target), args.reps)
        print(f"{cls.__name__:32s} {t * 1e3:8.1f} ms  ratio {t / t_plain:.2f}  (target <= 1.3)")
    taylor = TaylorAttributionMetric(model, data, crit, device, progress=False)
    t_all = median_time(lambda: taylor.run_all(convs), args.reps)
    print(
        f"{'Taylor run_all (3 convs)':32s} {t_all * 1e3:8.1f} ms  ratio {t_all / t_plain:.2f}"
        "  (target <= 1.5)"
    )

    # ---------------------------------------------------------------- Shapley
    perms = permutation_samples(n_units, samples, np.random.default_rng(0))
    fast = ShapleyAttributionMetric(model, data, crit, device, sv_samples=samples, progress=False)
    t_fast = median_time(lambda: fast.run(target, permutations=perms), args.reps)
    print(f"fast Shapley ({fast.last_path}), sv_samples={samples}: {t_fast:.2f} s")
    generic = ShapleyAttributionMetric(
        model, data[:1], crit, device, sv_samples=samples, progress=False, linear_shortcut=False
    )
    t_generic = median_time(lambda: generic.run(target, permutations=perms), 1) * len(data)
    print(
        f"fast Shapley without linear shortcut ({generic.last_path}): {t_generic:.1f} s "
        f"(timed on 1 batch, scaled x{len(data)})"
    )

    # plain full-model estimator: for each permutation and unit, zero the removed units with a
    # forward hook and run the whole model; timed on a subset, scaled linearly
    nb, npm = args.naive_batches, args.naive_perms
    mask = torch.ones(n_units)
    handle = target.register_forward_hook(lambda m, i, o: o * mask.view(1, -1, 1, 1))

    def naive_subset() -> None:
        with torch.no_grad():
            for x, y in data[:nb]:
                for p in perms[:npm]:
                    mask.fill_(1.0)
                    for u in p:
                        mask[u] = 0.0
                        F.cross_entropy(model(x), y, reduction="none")

    try:
        t_sub = median_time(naive_subset, 1)
    finally:
        handle.remove()
    scale = (len(data) / nb) * (samples / npm)
    t_naive = t_sub * scale
    print(
        f"naive full-model Monte-Carlo: {t_sub:.2f} s for {nb} batch(es) x {npm} permutation(s), "
        f"scaled x{scale:g} to {t_naive:.1f} s (estimated, linear scaling)"
    )
    print(f"speed-up fast / naive: {t_naive / t_fast:.1f}x  (target >= 15x)")

    # the limit: one evaluation of the part after the module per coalition
    after = nn.Sequential(*list(model)[4:])
    zs = []
    hook = target.register_forward_hook(lambda m, i, o: zs.append(o.detach()))
    with torch.no_grad():
        for x, _ in data:
            model(x)
    hook.remove()

    def after_pass() -> None:
        with torch.no_grad():
            for z, (_, y) in zip(zs, data):
                F.cross_entropy(after(z), y, reduction="none")

    t_after = median_time(after_pass, args.reps)
    limit = samples * n_units * t_after
    print(
        f"one pass of the after-part: {t_after * 1e3:.1f} ms; limit = {samples} x {n_units} x that"
        f" = {limit:.1f} s; fast Shapley / limit = {t_fast / limit:.3f}"
        f" (without shortcut: {t_generic / limit:.3f})"
    )


if __name__ == "__main__":
    main()
