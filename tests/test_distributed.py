"""Attribution and planning across two processes (gloo on CPU) against one process over all data.

Two ranks are spawned once per module (tests/distributed_worker.py); each scores its own shard
(rank 0: examples 0, 2, ..., 36, i.e. 19 examples in batches of 8, 8, 3; rank 1: 18 examples in
batches of 8, 8, 2) and saves what it computed. The reference for every number is this process
scoring the whole data set with no process group: the combined scores must equal it, and both
ranks must hold the same values.
"""

from __future__ import annotations

import json
import time

import distributed_worker as w
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from timeouts import scaled
from torch.utils.data import DataLoader, Subset
from torch.utils.data.distributed import DistributedSampler

import pruneplan
from pruneplan.attributions import TaylorAttributionMetric
from pruneplan.distributed import broadcast_plan

WORLD = 2

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


# Hang guards only, never a limit on the whole run (which took minutes on a loaded 2-core
# machine: spawned ranks import torch and pruneplan first): a collective fails after COLLECTIVE
# seconds of waiting for the other rank, and the ranks are stopped when neither has finished a
# step for STALL seconds. Both are scaled to the machine's load when used (tests/timeouts.py).
COLLECTIVE = 300.0
STALL = 900.0


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """Run the worker on two spawned processes; return each rank's saved results."""
    folder = tmp_path_factory.mktemp("dist")
    ctx = mp.start_processes(w.worker, args=(WORLD, str(folder / "init"), str(folder), scaled(COLLECTIVE)),
                             nprocs=WORLD, join=False, start_method="spawn")
    start = time.time()
    try:
        while not ctx.join(timeout=5):
            # the last sign of life: the start, or a rank rewriting its progress file
            beats = [w.progress_file(folder, r) for r in range(WORLD)]
            last = max([start, *(p.stat().st_mtime for p in beats if p.exists())])
            if time.time() - last > scaled(STALL):  # pragma: no cover - a hang only
                for p in ctx.processes:
                    p.terminate()
                raise AssertionError(f"no rank finished a step for {scaled(STALL):.0f} s: a hang")
    except mp.ProcessExitedException as exc:  # pragma: no cover - shown on failure only
        crashes = [torch.load(p, weights_only=False).get("crash", "") for p in folder.glob("rank*.pt")]
        raise AssertionError(f"a rank failed: {exc}\n" + "\n".join(crashes)) from None
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def local_scores(loader, cls, kwargs, run) -> dict[str, np.ndarray]:
    return w.score(w.make_model(), loader, cls, kwargs, run)


def whole_data() -> DataLoader:
    return DataLoader(w.make_data(), batch_size=w.BATCH)


def rank_order() -> list[int]:
    """Row order of a gathered per-example matrix: rank 0's examples, then rank 1's."""
    return [i for r in range(WORLD) for i in w.rank_indices(r, WORLD)]


@pytest.mark.parametrize("run", w.metric_runs(), ids=[r[0] for r in w.metric_runs()])
def test_every_metric_matches_one_process_over_all_data(ranks, run):
    key, cls, kwargs, run_kw = run
    expected = local_scores(whole_data(), cls, kwargs, run_kw)
    for name in w.MODULES:
        want = expected[name]
        if key.endswith("_none"):
            # "none" gathers the (examples, units) matrix in rank order
            assert want.shape[0] == w.N_EXAMPLES
            want = want[rank_order()]
        got = [r[f"{key}/{name}"].numpy() for r in ranks]
        assert got[0].shape == want.shape
        np.testing.assert_allclose(got[0], want, rtol=1e-6, atol=1e-9, err_msg=f"{key}/{name}")
        # both ranks return the same numbers, bit for bit (the same collective results)
        np.testing.assert_array_equal(got[0], got[1])


def test_the_shards_are_uneven(ranks):
    # the metric saw 19 and 18 examples: the "none" matrices have those many rows per rank
    assert [len(w.rank_indices(r, WORLD)) for r in range(WORLD)] == [19, 18]
    assert ranks[0]["taylor_none/0"].shape == (w.N_EXAMPLES, 6)


def test_users_distributed_sampler(ranks):
    # DistributedSampler(shuffle, drop_last) gives each rank 18 of the 37 examples: the scores
    # are those of one process over the union of both ranks' indices (recomputed here)
    indices = [list(DistributedSampler(w.make_data(), WORLD, r, shuffle=True, seed=5, drop_last=True))
               for r in range(WORLD)]
    assert [r["sampler/indices"].tolist() for r in ranks] == indices
    union = indices[0] + indices[1]
    assert len(set(union)) == 36
    expected = local_scores(DataLoader(Subset(w.make_data(), union), batch_size=w.BATCH),
                            TaylorAttributionMetric, {}, {})
    for name in w.MODULES:
        for r in ranks:
            np.testing.assert_allclose(r[f"sampler_taylor/{name}"].numpy(), expected[name], rtol=1e-6)


def test_unseeded_metrics_agree_across_ranks(ranks):
    for key in ("random_unseeded/0", "shapley_unseeded/0"):
        a, b = (r[key].numpy() for r in ranks)
        assert a.shape == (6,)
        np.testing.assert_array_equal(a, b)
    # and they are not the seeded values: a fresh seed was drawn
    assert not np.array_equal(ranks[0]["random_unseeded/0"].numpy(), ranks[0]["random/0"].numpy())


def test_local_scoring_and_subgroups(ranks):
    # distributed=False, or a process group holding only this rank: the rank's own shard alone
    for rank, r in enumerate(ranks):
        shard = DataLoader(Subset(w.make_data(), w.rank_indices(rank, WORLD)), batch_size=w.BATCH)
        expected = local_scores(shard, TaylorAttributionMetric, {}, {})["0"]
        np.testing.assert_allclose(r["local/0"].numpy(), expected, rtol=1e-6)
        np.testing.assert_allclose(r["subgroup/0"].numpy(), expected, rtol=1e-6)
    assert not np.allclose(ranks[0]["local/0"].numpy(), ranks[1]["local/0"].numpy())


def test_a_rank_without_batches(ranks):
    # rank 1 had no data: the scores are those of rank 0's shard alone
    shard = DataLoader(Subset(w.make_data(), w.rank_indices(0, WORLD)), batch_size=w.BATCH)
    expected = local_scores(shard, TaylorAttributionMetric, {}, {})["0"]
    for r in ranks:
        np.testing.assert_allclose(r["empty_rank_taylor/0"].numpy(), expected, rtol=1e-6)


def test_an_error_on_one_rank_is_raised_on_every_rank(ranks):
    assert ranks[1]["error"] == "ValueError: data_generator must yield (x, y) pairs"
    assert ranks[0]["error"] == (
        "RuntimeError: attribution failed on another rank "
        "(rank 1: ValueError: data_generator must yield (x, y) pairs)"
    )


def test_an_error_of_a_data_free_metric_on_rank_0_reaches_every_rank(ranks):
    # WeightNorm of module "2" (a ReLU): computed on rank 0 only, which fails
    assert ranks[0]["static_error"] == "ValueError: module '2' (ReLU) has no weight tensor"
    assert ranks[1]["static_error"] == (
        "RuntimeError: attribution failed on another rank (rank 0: ValueError: module '2' (ReLU) has no weight tensor)"
    )


def test_broadcast_plan_gives_identical_models(ranks):
    # the reference: one process, the same scores, plan, momentum step and application
    model = w.make_model()
    scores = local_scores(whole_data(), TaylorAttributionMetric, {}, {})
    plan = w.plan_from_scores(model, scores)
    assert ranks[0]["plan"] == ranks[1]["plan"] == plan.to_json()
    assert json.loads(plan.to_json())["groups"]  # something was pruned
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = w.make_data().tensors
    w.train_step(model, optimizer, x[:16], y[:16])
    pruneplan.apply_plan(model, plan, optimizer=optimizer)
    state = model.state_dict()
    for k, v in state.items():
        assert torch.equal(ranks[0][f"pruned/{k}"], ranks[1][f"pruned/{k}"]), k
        torch.testing.assert_close(ranks[0][f"pruned/{k}"], v, rtol=0, atol=0, msg=k)
    assert state["0.weight"].shape[0] == 6 - len(plan.group("0").removed)

    # DDP re-wrapped after pruning averages the two ranks' gradients: one step equals a
    # single-process step on both halves at once (equal halves of 8: mean of means)
    w.train_step(model, optimizer, x[16:32], y[16:32])
    for k, v in model.state_dict().items():
        assert torch.equal(ranks[0][f"stepped/{k}"], ranks[1][f"stepped/{k}"]), k
        torch.testing.assert_close(ranks[0][f"stepped/{k}"], v, rtol=1e-5, atol=1e-6, msg=k)


def test_replicas_that_differ_are_reported_and_broadcast_module_syncs_them(ranks):
    # rank 1's BN running_mean was shifted by 0.1: both ranks warn, naming the remedy
    for r in ranks:
        assert "the model differs across ranks" in r["warnings_before"]
        assert "broadcast_module" in r["warnings_before"]
        assert r["warnings_after"] == ""
        assert r["broadcast_keeps_parameter"] == "True"
    # after broadcast_module both ranks hold rank 0's (unshifted) model exactly
    for k, v in w.make_model().state_dict().items():
        for r in ranks:
            assert torch.equal(r[f"broadcast/{k}"], v), k


def test_a_ddp_wrapper_is_refused_with_advice(ranks):
    # attribution on the wrapper would sync buffers/gradients on every forward pass
    for r in ranks:
        assert r["ddp_error"].startswith("pass the module inside DistributedDataParallel (ddp.module)")
        # apply_plan on the wrapper: its keys have a "module." prefix; the error says what to do
        assert r["ddp_apply_error"] == (
            "model is a DistributedDataParallel wrapper: apply the plan to ddp.module on every "
            "rank, then wrap the pruned module in a new DistributedDataParallel"
        )


def test_a_failed_plan_fails_on_every_rank(ranks):
    assert ranks[0]["plan_error"] == "PlanningError: no module named 'nope'"
    assert ranks[1]["plan_error"] == (
        "PlanningError: making the plan failed on rank 0: PlanningError: no module named 'nope'"
    )


def test_without_a_process_group_everything_is_local():
    # no process group: broadcast_plan returns its argument, metrics compute locally
    assert not dist.is_initialized()
    model = w.make_model()
    plan = w.plan_from_scores(model, local_scores(whole_data(), TaylorAttributionMetric, {}, {}))
    assert broadcast_plan(plan) is plan
    assert broadcast_plan(lambda: plan) is plan
    with pytest.raises(TypeError, match="needs a PrunePlan"):
        broadcast_plan(None)
    with pytest.raises(ValueError, match=r"torch\.distributed is not initialised"):
        TaylorAttributionMetric(model, whole_data(), F.cross_entropy, "cpu", distributed=True).run("0")
