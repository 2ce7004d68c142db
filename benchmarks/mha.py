"""The cost of `pruneplan.modules.PrunedMultiheadAttention`, the module `apply_plan` swaps in for a
pruned ``nn.MultiheadAttention``, measured in one run against torch's own module.

Three ratios, each the median of ``--reps`` timings of ``--iters`` forward passes (eval mode, no
grad, batch first self-attention, ``need_weights=False`` as ``nn.TransformerEncoderLayer`` and
torchvision's ViT call it):

1. the swapped-in module with nothing removed / torch's module on its ordinary path (fast path
   off): the price of the module itself (target <= 1.1);
2. the same / torch's module with its fused inference fast path (what an unpruned model gets in
   eval mode without grad);
3. the module with half of its heads removed / torch's module (fast path on): what pruning the
   heads buys.

Usage: python benchmarks/mha.py [--embed 768] [--heads 12] [--tokens 197] [--batch 8]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

import pruneplan
from pruneplan.modules import prune_ready


def _time(fn, iters: int, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        times.append((time.perf_counter() - t0) / iters)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--embed", type=int, default=768)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=197)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(args.embed, args.heads, batch_first=True).eval()
    swapped = copy.deepcopy(mha)
    prune_ready(swapped)
    x = torch.randn(args.batch, args.tokens, args.embed)

    class Wrap(nn.Module):
        def __init__(self, m: nn.Module) -> None:
            super().__init__()
            self.m = m

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return self.m(t, t, t, need_weights=False)[0]

    wrapped = Wrap(copy.deepcopy(mha)).eval()
    half = {"m": list(range(0, args.heads, 2))}
    pruned = pruneplan.apply_plan(copy.deepcopy(wrapped), pruneplan.plan_pruning(wrapped, half, example_inputs=x))

    def run(m: nn.Module):
        return lambda: m(x, x, x, need_weights=False)

    with torch.no_grad():
        torch.backends.mha.set_fastpath_enabled(False)
        slow = _time(run(mha), args.iters, args.reps)
        torch.backends.mha.set_fastpath_enabled(True)
        fast = _time(run(mha), args.iters, args.reps)
        mine = _time(run(swapped), args.iters, args.reps)
        halved = _time(lambda: pruned(x), args.iters, args.reps)
    print(f"embed {args.embed}, heads {args.heads}, tokens {args.tokens}, batch {args.batch}, "
          f"{torch.get_num_threads()} threads")
    print(f"torch MHA, ordinary path: {slow * 1e3:.2f} ms; fused fast path: {fast * 1e3:.2f} ms")
    print(f"1. PrunedMultiheadAttention (nothing removed) / torch ordinary path: {mine / slow:.2f} "
          "(target <= 1.1)")
    print(f"2. PrunedMultiheadAttention (nothing removed) / torch fast path:     {mine / fast:.2f}")
    print(f"3. half of the heads removed / torch fast path:                     {halved / fast:.2f}")


if __name__ == "__main__":
    main()
