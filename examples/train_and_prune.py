"""Prune while training with `Pruner`, then replay the recorded history as one plan.

1. Train the digits CNN with Adam. After some epochs, score every prunable layer with
   ``TaylorAttributionMetric.run_all`` (one data pass), pick the weakest 25% of each group with
   `pruneplan.select_indices`, and remove them with ``Pruner.prune_model`` (the BatchNorm, the next
   conv/linear and the Flatten->Linear block are found automatically). Training goes on with the
   *same* optimizer: the ``nn.Parameter`` objects stay the same and Adam's ``exp_avg`` /
   ``exp_avg_sq`` are sliced with them.
2. ``pruner.save_history("history.json")``: every step, composed into one plan relative to the
   model as it was before the first prune.
3. Replay. A plan says *which units go*; it carries no weights. The composed plan therefore:
   * gives exactly the final architecture (its pruned shapes == the trained model's shapes), and
     ``apply_plan`` gives that architecture to a freshly built model;
   * applied with ``apply_to_state_dict`` to a snapshot of the weights taken just before the first
     prune, gives exactly what applying the recorded steps one after the other to that snapshot
     gives. The weights learned between steps are not in any plan: the replayed model has the
     final shape with the snapshot's weights (the "rewind" of lottery-ticket style experiments),
     not the final trained weights.

Outputs under --out: history.json (the composed plan), steps/step_<k>.json (the recorded plans).

Usage: python examples/train_and_prune.py [--out out/train_and_prune] [--quick]
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from digits import accuracy, count_params, example_parser, load_data, make_cnn, start_example, train

import pruneplan as pp
from pruneplan.attributions import TaylorAttributionMetric
from pruneplan.pruner import Pruner


def main() -> None:
    ap = example_parser(__doc__, "train_and_prune")
    args = ap.parse_args()
    started = time.perf_counter()
    out = start_example(args.out)
    (out / "steps").mkdir(exist_ok=True)
    for old in (out / "steps").glob("step_*.json"):
        old.unlink()

    data = load_data()
    model = make_cnn()
    # epochs after which we prune 25% of every group
    epochs, prune_after, n_attr = (2, {1, 2}, 64) if args.quick else (10, {2, 4, 6}, 256)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    pruner = Pruner(model, input_size=(1, 8, 8), device="cpu", optimizer=optimizer)
    batches = list(data.batches(64, seed=99, limit=n_attr))
    first_weight = model[0].weight
    print(f"start: {count_params(model):,} parameters; prune 25% of every group after epochs "
          f"{sorted(prune_after)} of {epochs}")

    snapshot = None
    for epoch in range(1, epochs + 1):
        train(model, data, 1, seed=epoch, optimizer=optimizer)
        line = f"epoch {epoch:>2}: accuracy {accuracy(model, data):.3f}"
        if epoch in prune_after:
            if snapshot is None:
                snapshot = copy.deepcopy(model.state_dict())  # the weights the replay starts from
            groups = pp.prunable_groups(model, data.x_test[:2])
            scores = TaylorAttributionMetric(model, batches, F.cross_entropy, "cpu", progress=False
                                             ).run_all([r for g in groups for r in g.roots])
            removed = pp.select_indices(scores, 0.25, groups=groups)
            for name, indices in removed.items():
                pruner.prune_model(name, indices)  # cascading modules discovered automatically
            units = ", ".join(f"{g.name}: {g.size}->{g.size - len(removed.get(g.name, []))}" for g in groups)
            line += f"; pruned ({units}), now {count_params(model):,} parameters, " \
                    f"accuracy {accuracy(model, data):.3f}"
        print(line)

    assert snapshot is not None
    state_ok = all(s["exp_avg"].shape == p.shape and s["exp_avg_sq"].shape == p.shape
                   for p, s in optimizer.state.items())
    print(f"same nn.Parameter objects: {model[0].weight is first_weight}; "
          f"Adam state shaped like the pruned parameters: {state_ok}")

    # ---- history -> one plan ---------------------------------------------------------------
    for k, step in enumerate(pruner.history, 1):
        step.save(out / "steps" / f"step_{k}.json")
    path = pruner.save_history(out / "history.json")
    composed = pp.PrunePlan.load(path)
    print(f"\nhistory: {len(pruner.history)} recorded plans composed into {path.name}: "
          f"{len(composed.groups)} groups, "
          + ", ".join(f"{g.name} {g.size}->{g.size - len(g.removed)}" for g in composed.groups))

    # ---- replay ----------------------------------------------------------------------------
    print("replay: a plan says which units go, not their weights; the weights learned between the "
          "steps stay in the trained model")
    final_shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    planned = composed.pruned_shapes()
    same_arch = all(final_shapes[k] == s for k, s in planned.items())
    print(f"composed plan's pruned shapes == trained model's shapes ({len(planned)} tensors): {same_arch}")
    fresh = pp.apply_plan(make_cnn(), composed)
    fresh_shapes = {k: list(v.shape) for k, v in fresh.state_dict().items()}
    print(f"apply_plan(make_cnn(), composed) has the final architecture: {fresh_shapes == final_shapes}")

    sequential = snapshot
    for step in pruner.history:
        sequential = pp.apply_to_state_dict(step, sequential)
    replayed = pp.apply_to_state_dict(composed, snapshot)
    same_weights = replayed.keys() == sequential.keys() and all(
        torch.equal(replayed[k], sequential[k]) for k in replayed)
    print(f"composed plan on the pre-pruning snapshot == the {len(pruner.history)} steps applied one by "
          f"one: {same_weights}")
    rewound = pp.load_pruned(make_cnn(), composed, replayed).eval()
    print(f"accuracy: trained+pruned model {accuracy(model, data):.3f}; snapshot weights replayed "
          f"onto the final architecture (no training since the snapshot) {accuracy(rewound, data):.3f}")

    print(f"\noutputs in {out.resolve()}: history.json, steps/step_1..{len(pruner.history)}.json "
          f"({time.perf_counter() - started:.1f} s)")
    if not (same_arch and same_weights and state_ok and fresh_shapes == final_shapes):
        raise SystemExit("replay does not match, see above")


if __name__ == "__main__":
    main()
