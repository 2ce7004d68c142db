"""Generate here, apply elsewhere: the whole pruning workflow through the ``pruneplan`` CLI.

"Here" (where the model code, the data and the metric run):

1. train the digits CNN and save its weights as ``model.safetensors``;
2. ``pruneplan groups``: what automatic discovery finds in the model;
3. ``pruneplan plan --model examples/digits.py:make_cnn --weights model.safetensors
   --metric taylor --data examples/digits.py:attribution_batches --ratio 0.5 -o plan.json``;
4. ``pruneplan validate plan.json model.safetensors``.

"Elsewhere" (only the plan and the weights travel):

5. ``pruneplan apply plan.json model.safetensors`` -> ``model.pruned.safetensors`` (no model code,
   no torch.nn, streaming tensor slicing);
6. in Python, ``load_pruned(make_cnn(), PrunePlan.load("plan.json"), "model.pruned.safetensors")``
   gives a fresh model the pruned architecture and weights. We check its accuracy and that it
   equals the trained model pruned live with ``apply_plan`` (same tensors, same outputs).

Outputs under --out: model.safetensors, plan.json, model.pruned.safetensors.

Usage: python examples/cli_workflow.py [--out out/cli_workflow] [--quick]
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from digits import accuracy, count_params, example_parser, load_data, make_cnn, run_cli, start_example, train

import pruneplan as pp

DIGITS = Path(__file__).resolve().parent / "digits.py"

def main() -> None:
    ap = example_parser(__doc__, "cli_workflow")
    ap.add_argument("--ratio", type=float, default=0.5, help="fraction of units to remove")
    args = ap.parse_args()
    started = time.perf_counter()
    out = start_example(args.out)

    # ---- here ------------------------------------------------------------------------------
    print("== here: model code, data and metric ==")
    data = load_data()
    model = make_cnn()
    epochs = 1 if args.quick else 12
    train(model, data, epochs)
    base_acc = accuracy(model, data)
    weights = out / "model.safetensors"
    save_file(model.state_dict(), str(weights))
    print(f"trained {epochs} epochs: test accuracy {base_acc:.3f}, {count_params(model):,} parameters "
          f"-> {weights.name}")

    spec = f"{DIGITS}:make_cnn"
    run_cli("groups", "--model", spec, "--input-shape", "1,8,8")
    plan_path = out / "plan.json"
    run_cli("plan", "--model", spec, "--weights", str(weights), "--input-shape", "1,8,8",
        "--metric", "taylor", "--data", f"{DIGITS}:attribution_batches", "--ratio", str(args.ratio),
        "-o", str(plan_path), "--force")  # a rerun replaces its own plan
    run_cli("validate", str(plan_path), str(weights))

    # ---- elsewhere -------------------------------------------------------------------------
    print("\n== elsewhere: only plan.json and model.safetensors ==")
    pruned_file = out / "model.pruned.safetensors"
    pruned_file.unlink(missing_ok=True)  # `apply` never overwrites without --force
    run_cli("apply", str(plan_path), str(weights))
    plan = pp.PrunePlan.load(plan_path)
    with safe_open(str(pruned_file), framework="pt") as f:
        recorded = f.metadata().get("pruneplan.plan_digest")
    print(f"{pruned_file.name}: {pruned_file.stat().st_size:,} bytes (was {weights.stat().st_size:,}); "
          f"records plan digest {recorded[:12]}, matches plan.json: {recorded == plan.digest()}")

    loaded = pp.load_pruned(make_cnn(), plan, pruned_file).eval()
    shapes = ", ".join(f"{g.name}: {g.size} -> {g.size - len(g.removed)}" for g in plan.groups)
    print(f"load_pruned(make_cnn(), plan, {pruned_file.name}): units per group {shapes}")
    acc = accuracy(loaded, data)
    print(f"accuracy: {base_acc:.3f} before pruning, {acc:.3f} after (no fine-tuning); "
          f"parameters {count_params(model):,} -> {count_params(loaded):,}")

    live = pp.apply_plan(copy.deepcopy(model), plan).eval()
    same_tensors = all(torch.equal(a, b) for a, b in
                       zip(live.state_dict().values(), loaded.state_dict().values(), strict=True))
    with torch.no_grad():
        same_outputs = torch.equal(live(data.x_test), loaded(data.x_test))
    print(f"CLI-pruned file == apply_plan on a live copy: tensors {same_tensors}, outputs {same_outputs}")

    train(loaded, data, 1, lr=1e-3, seed=7)
    print(f"after one epoch of fine-tuning the loaded model: accuracy {accuracy(loaded, data):.3f}")
    print(f"\noutputs in {out.resolve()}: model.safetensors, plan.json, model.pruned.safetensors "
          f"({time.perf_counter() - started:.1f} s)")
    if not (same_tensors and same_outputs and recorded == plan.digest()):
        raise SystemExit("the file-pruned model differs from the live-pruned model")


if __name__ == "__main__":
    main()
