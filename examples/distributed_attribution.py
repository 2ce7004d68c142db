"""Attribution, planning and pruning under torch.distributed (gloo on CPU; NCCL works the same).

Launch with torchrun:

    torchrun --standalone --nproc_per_node=2 examples/distributed_attribution.py [--quick]

(``python -m torch.distributed.run`` is the same launcher; run without it, the script is a
one-process run.) Each rank:

1. trains the digits CNN with DistributedDataParallel for a few epochs (DistributedSampler);
2. scores every prunable group with ``TaylorAttributionMetric.run_all`` on *its own* shard of the
   training data (the user's DistributedSampler). The metric sees that torch.distributed is
   initialised and all-reduces per-unit sums and example counts, so every rank gets the same
   scores: those of one process over the whole data. Rank 0 checks it against exactly that
   (``distributed=False`` over all examples) and prints the largest difference;
3. makes the plan on rank 0 only and receives it with ``broadcast_plan`` (the plan travels as its
   canonical JSON);
4. applies it to the model and the Adam optimizer (moments sliced), re-wraps the model in a new
   DDP (the old one's gradient buckets have the unpruned sizes), and fine-tunes;
5. checks that the pruned models are identical on every rank (sha256 of all tensors, gathered).

DDP keeps the parameters of the replicas equal but not their buffers (each rank's last forward
pass updates its own BatchNorm statistics), so ``broadcast_module`` gives every rank rank 0's model
before scoring and before saving.

Rank 0 writes plan.json and the pruned weights (model.pruned.safetensors) under --out.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset, TensorDataset
from torch.utils.data.distributed import DistributedSampler

sys.path.insert(0, str(Path(__file__).resolve().parent))

from digits import accuracy, count_params, example_parser, load_data, make_cnn, start_example

import pruneplan as pp
from pruneplan.attributions import TaylorAttributionMetric
from pruneplan.distributed import broadcast_module, broadcast_plan

GROUPS = ["0", "3", "9"]  # conv 16, conv 32, linear 64: the digits CNN's prunable groups


def train_epochs(ddp: DistributedDataParallel, loader: DataLoader, sampler: DistributedSampler,
                 optimizer: torch.optim.Optimizer, epochs: int, first_epoch: int = 0) -> None:
    ddp.train()
    for epoch in range(first_epoch, first_epoch + epochs):
        sampler.set_epoch(epoch)  # a new shuffle per epoch, the same on every rank
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(ddp(x), y).backward()  # DDP averages the gradients over the ranks
            optimizer.step()
    ddp.eval()


def model_digest(model: torch.nn.Module, buffers: bool = True) -> str:
    """sha256 of the bytes of every parameter (and buffer)."""
    h = hashlib.sha256()
    tensors = model.state_dict() if buffers else dict(model.named_parameters())
    for k, v in sorted(tensors.items()):
        h.update(k.encode())
        h.update(v.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def same_on_all_ranks(value: str) -> bool:
    values: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return len(set(values)) == 1


def main() -> None:
    ap = example_parser(__doc__, "distributed_attribution")
    ap.add_argument("--ratio", type=float, default=0.5, help="fraction of each group's units to remove")
    args = ap.parse_args()
    started = time.perf_counter()
    out = start_example(args.out)
    timeout = datetime.timedelta(minutes=5)
    if "RANK" in os.environ:  # launched by torchrun: rendezvous from its environment variables
        dist.init_process_group("gloo", timeout=timeout)
    else:  # plain `python`: a one-process group, the same code path
        store = tempfile.NamedTemporaryFile(prefix="pruneplan-dist-", delete=False).name
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1,
                                timeout=timeout)
    rank, world = dist.get_rank(), dist.get_world_size()

    def say(*parts: object) -> None:
        if rank == 0:
            print(*parts, flush=True)

    data = load_data()
    train_set = TensorDataset(data.x_train, data.y_train)
    say(f"{world} ranks (gloo), {len(train_set)} training examples")
    torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    model = make_cnn()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(train_set, batch_size=64 // world, sampler=sampler)
    epochs, tune = (1, 1) if args.quick else (6, 3)
    train_epochs(DistributedDataParallel(model), loader, sampler, optimizer, epochs)
    say(f"trained {epochs} epochs: accuracy {accuracy(model, data):.3f}, {count_params(model):,} parameters")

    # ---- DDP keeps parameters equal, not buffers: each rank's last forward pass updated its own
    # BatchNorm statistics. Give every rank rank 0's model before scoring and pruning.
    same = same_on_all_ranks(model_digest(model))
    broadcast_module(model)
    say(f"models identical on all ranks after DDP training: {same}; after broadcast_module: "
        f"{same_on_all_ranks(model_digest(model))}")

    # ---- attribution: each rank scores its own shard; the metric combines them
    # (when the data does not divide evenly, DistributedSampler pads with repeated examples,
    # which then count twice; drop_last=True drops the remainder instead)
    shard = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=False)
    attribution_data = DataLoader(train_set, batch_size=128, sampler=shard)
    metric = TaylorAttributionMetric(model, attribution_data, F.cross_entropy, "cpu", progress=False)
    scores = metric.run_all(GROUPS)
    covered = [i for r in range(world) for i in DistributedSampler(train_set, world, r, shuffle=False)]
    say(f"rank {rank} scored {len(shard)} examples; every rank holds the scores of all {len(covered)}")
    if rank == 0:  # the reference: one process over the same examples
        everything = DataLoader(Subset(train_set, covered), batch_size=128)
        reference = TaylorAttributionMetric(model, everything, F.cross_entropy, "cpu", progress=False,
                                            distributed=False).run_all(GROUPS)
        diff = max(float(np.max(np.abs(scores[g] - reference[g]) / np.max(np.abs(reference[g]))))
                   for g in GROUPS)
        say(f"largest difference to one process over all data: {diff:.1e} (relative)")

    # ---- plan once on rank 0, broadcast, apply on every rank
    def make_plan() -> pp.PrunePlan:
        removed = pp.select_indices(scores, ratio=args.ratio)
        return pp.plan_pruning(model, removed, example_inputs=data.x_test[:2])

    plan = broadcast_plan(make_plan if rank == 0 else None)
    pp.apply_plan(model, plan, optimizer=optimizer)
    say(f"pruned models identical on all {world} ranks: {same_on_all_ranks(model_digest(model))}")
    say(f"plan {plan.digest()[:12]}: " + ", ".join(
        f"{g.name} {g.size - len(g.removed)}/{g.size}" for g in plan.groups))
    say(f"pruned: accuracy {accuracy(model, data):.3f}, {count_params(model):,} parameters")

    # ---- DDP must be re-created: its buckets were built for the old parameter sizes
    ddp = DistributedDataParallel(model)
    train_epochs(ddp, loader, sampler, optimizer, tune, first_epoch=epochs)
    say(f"fine-tuned {tune} epochs: accuracy {accuracy(model, data):.3f}")

    # DDP averaged the gradients: the parameters are still identical; the buffers drifted again
    say(f"after fine-tuning, parameters identical on all ranks: "
        f"{same_on_all_ranks(model_digest(model, buffers=False))}")
    broadcast_module(model)
    if rank == 0:
        plan.save(out / "plan.json")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                  str(out / "model.pruned.safetensors"), metadata={"pruneplan.plan_digest": plan.digest()})
        say(f"wrote {out / 'plan.json'} and {out / 'model.pruned.safetensors'}")
    dist.barrier()
    dist.destroy_process_group()
    say(f"done in {time.perf_counter() - started:.1f} s")
    # With torch 2.13, a DistributedDataParallel keeps the gloo process group (and its threads)
    # alive past destroy_process_group, and those threads can abort the interpreter's teardown
    # ("terminate called without an active exception", seen in about 1 run in 20 here). All
    # work is done and flushed: leave without that teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
