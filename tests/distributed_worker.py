"""What each rank runs in tests/test_distributed.py (spawned processes, gloo on CPU).

The parent test computes the same things in one process over the whole data and compares. Every
result a rank produces is saved to ``<out>/rank<r>.pt`` (a dict of tensors and strings).
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import pruneplan
from pruneplan.attributions import (
    APoZAttributionMetric,
    RandomAttributionMetric,
    SensitivityAttributionMetric,
    ShapleyAttributionMetric,
    TaylorAttributionMetric,
    WeightNormAttributionMetric,
)
from pruneplan.distributed import broadcast_module, broadcast_plan

N_EXAMPLES = 37  # odd: the two ranks get 19 and 18 examples, last batches of 3 and 2
BATCH = 8
MODULES = ["0", "3"]


class CapturedLogs(logging.Handler):
    """Collect the messages of one logger while in a ``with`` block."""

    def __init__(self, name: str) -> None:
        super().__init__(logging.WARNING)
        self.logger = logging.getLogger(name)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> CapturedLogs:
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self)


def make_model() -> nn.Sequential:
    """Conv -> BN -> ReLU -> Conv -> ReLU -> Flatten -> Linear, the same on every rank (seeded)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 5, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(5 * 4 * 4, 3),
    )
    with torch.no_grad():  # non-trivial BN statistics
        model[1].running_mean.uniform_(-0.2, 0.2)
        model[1].running_var.uniform_(0.5, 1.5)
    return model.eval()


def make_data(n: int = N_EXAMPLES) -> TensorDataset:
    gen = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, 1, 4, 4, generator=gen), torch.randint(0, 3, (n,), generator=gen))


def rank_indices(rank: int, world: int, n: int = N_EXAMPLES) -> list[int]:
    """The strided shard of a rank, as DistributedSampler(shuffle=False) takes it, without padding."""
    return list(range(rank, n, world))


def mean_plus_2std(m: np.ndarray) -> np.ndarray:
    return m.mean(0) + 2 * m.std(0)


def metric_runs() -> list[tuple[str, type, dict[str, Any], dict[str, Any]]]:
    """(key, metric class, constructor arguments, run_all arguments) of every checked run."""
    return [
        ("random", RandomAttributionMetric, {"seed": 0}, {}),
        ("weight_norm", WeightNormAttributionMetric, {}, {}),
        ("apoz", APoZAttributionMetric, {}, {}),
        ("apoz_best", APoZAttributionMetric, {}, {"find_best_evaluation_module": True}),
        ("sensitivity", SensitivityAttributionMetric, {}, {}),
        ("taylor", TaylorAttributionMetric, {}, {}),
        ("taylor_sum", TaylorAttributionMetric, {"reduction": "sum"}, {}),
        ("taylor_none", TaylorAttributionMetric, {"reduction": "none"}, {}),
        ("shapley", ShapleyAttributionMetric, {"seed": 3, "sv_samples": 4}, {}),
        ("shapley_none", ShapleyAttributionMetric, {"seed": 3, "sv_samples": 4, "reduction": "none"}, {}),
        ("shapley_std", ShapleyAttributionMetric, {"seed": 3, "sv_samples": 4, "reduction": mean_plus_2std}, {}),
        ("shapley_hooks", ShapleyAttributionMetric, {"seed": 3, "sv_samples": 2, "split": "hooks"}, {}),
    ]


def score(model: nn.Module, loader: Any, cls: type, kwargs: dict[str, Any], run: dict[str, Any]):
    metric = cls(model, loader, F.cross_entropy, "cpu", progress=False, **kwargs)
    return metric.run_all(MODULES, **run)


def plan_from_scores(model: nn.Module, scores: dict[str, np.ndarray]) -> pruneplan.PrunePlan:
    removed = pruneplan.select_indices(scores, ratio=0.4)
    return pruneplan.plan_pruning(model, removed, example_inputs=torch.zeros(2, 1, 4, 4))


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()


def progress_file(out: str | Path, rank: int) -> Path:
    """The file a rank rewrites after every step (its count of results): the parent's sign of
    life, so that it tells a hung rank from a slow one without a limit on the whole run."""
    return Path(out) / f"progress{rank}"


def worker(rank: int, world: int, init_file: str, out: str, timeout_s: float) -> None:
    """Run every check on this rank and save what it computed. ``timeout_s``: how long a
    collective may wait for the other rank before it fails (a hang guard, scaled by the parent
    to the machine's load: tests/timeouts.py)."""
    torch.set_num_threads(1)
    beat = progress_file(out, rank)
    beat.write_text("started")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    results: dict[str, Any] = {}
    try:
        data = make_data()
        model = make_model()
        loader = DataLoader(Subset(data, rank_indices(rank, world)), batch_size=BATCH)
        for key, cls, kwargs, run in metric_runs():
            for name, s in score(model, loader, cls, kwargs, run).items():
                results[f"{key}/{name}"] = torch.from_numpy(np.asarray(s))
            beat.write_text(str(len(results)))

        # the user's DistributedSampler (shuffled, drop_last: 18 examples per rank)
        sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=5, drop_last=True)
        results["sampler/indices"] = torch.tensor(list(sampler))
        by_sampler = score(model, DataLoader(data, batch_size=BATCH, sampler=sampler),
                           TaylorAttributionMetric, {}, {})
        for name, s in by_sampler.items():
            results[f"sampler_taylor/{name}"] = torch.from_numpy(s)

        # unseeded metrics still agree across ranks
        for key, cls in (("random_unseeded", RandomAttributionMetric), ("shapley_unseeded", ShapleyAttributionMetric)):
            kwargs = {"sv_samples": 2} if cls is ShapleyAttributionMetric else {}
            results[f"{key}/0"] = torch.from_numpy(score(model, loader, cls, kwargs, {})["0"])

        # distributed=False scores the rank's own shard only; a one-rank subgroup likewise
        solo = [dist.new_group([r]) for r in range(world)]  # every rank creates every group
        results["local/0"] = torch.from_numpy(
            score(model, loader, TaylorAttributionMetric, {"distributed": False}, {})["0"])
        results["subgroup/0"] = torch.from_numpy(score(
            model, loader, TaylorAttributionMetric, {"distributed": True, "process_group": solo[rank]}, {})["0"])

        # a rank without batches contributes nothing, and does not block the others
        empty = loader if rank == 0 else []
        results["empty_rank_taylor/0"] = torch.from_numpy(score(model, empty, TaylorAttributionMetric, {}, {})["0"])

        # an error on one rank is raised on every rank (rank 1's data is malformed)
        bad = loader if rank == 0 else [torch.zeros(2, 1, 4, 4)]
        try:
            score(model, bad, TaylorAttributionMetric, {}, {})
            results["error"] = "no error"
        except Exception as exc:  # the message is what the test checks
            results["error"] = f"{type(exc).__name__}: {exc}"

        # replicas that differ (BN statistics) are reported; broadcast_module makes them equal
        drifted = make_model()
        if rank == 1:
            with torch.no_grad():
                drifted[1].running_mean += 0.1
        weight = drifted[0].weight
        for stage in ("before", "after"):
            if stage == "after":
                broadcast_module(drifted)
            with CapturedLogs("pruneplan.attributions") as logs:
                score(drifted, loader, TaylorAttributionMetric, {}, {})
            results[f"warnings_{stage}"] = "\n".join(logs.messages)
        results["broadcast_keeps_parameter"] = str(drifted[0].weight is weight)
        for k, v in drifted.state_dict().items():
            results[f"broadcast/{k}"] = v.clone()

        # data-free metrics are computed on rank 0: its error reaches rank 1 too
        try:
            WeightNormAttributionMetric(model, loader, F.cross_entropy, "cpu").run("2")
            results["static_error"] = "no error"
        except Exception as exc:
            results["static_error"] = f"{type(exc).__name__}: {exc}"

        # plan once on rank 0, broadcast, apply everywhere
        taylor = {k.split("/")[1]: v.numpy() for k, v in results.items() if k.startswith("taylor/")}
        plan = broadcast_plan((lambda: plan_from_scores(model, taylor)) if rank == 0 else None)
        results["plan"] = plan.to_json()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        x_all, y_all = data.tensors
        train_step(model, optimizer, x_all[:16], y_all[:16])  # momentum buffers to slice
        pruneplan.apply_plan(model, plan, optimizer=optimizer)
        for k, v in model.state_dict().items():
            results[f"pruned/{k}"] = v.clone()

        # re-wrap in DDP after pruning; one step on each rank's half of examples 16..31
        ddp = nn.parallel.DistributedDataParallel(model)
        half = slice(16 + 8 * rank, 24 + 8 * rank)
        train_step(ddp, optimizer, x_all[half], y_all[half])
        for k, v in model.state_dict().items():
            results[f"stepped/{k}"] = v.clone()
        try:
            pruneplan.apply_plan(ddp, plan)
            results["ddp_apply_error"] = "no error"
        except pruneplan.PlanMismatchError as exc:
            results["ddp_apply_error"] = str(exc)
        try:
            TaylorAttributionMetric(ddp, loader, F.cross_entropy, "cpu")
            results["ddp_error"] = "no error"
        except TypeError as exc:
            results["ddp_error"] = str(exc)

        # a plan that fails on the source rank fails on every rank
        def failing() -> pruneplan.PrunePlan:
            raise pruneplan.PlanningError("no module named 'nope'")

        try:
            broadcast_plan(failing if rank == 0 else None)
            results["plan_error"] = "no error"
        except Exception as exc:
            results["plan_error"] = f"{type(exc).__name__}: {exc}"
    except BaseException:
        results["crash"] = traceback.format_exc()
        raise
    finally:
        torch.save(results, Path(out) / f"rank{rank}.pt")
        dist.barrier()
        dist.destroy_process_group()
    # DDP keeps the gloo process group's threads alive past destroy_process_group (torch 2.13);
    # they can abort the interpreter's teardown. The results are saved: skip the teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

