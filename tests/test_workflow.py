"""The pruning workflow: reproducible and traceable plans, honest summaries, targets, options.

Models here are small enough that every expected number is derived by hand in a comment.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from torch import nn

import pruneplan as pp
from pruneplan.cli import cli

ROOT = Path(__file__).resolve().parents[1]
MODEL = f"{ROOT / 'examples' / 'digits.py'}:make_cnn"
DATA = f"{ROOT / 'examples' / 'digits.py'}:attribution_batches"


def run(*args: str):
    return CliRunner().invoke(cli, list(args))


def cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))


# ---- 1. reproducible, traceable plans ------------------------------------------------------


def test_two_cli_shapley_runs_are_byte_identical_and_the_seed_matters(tmp_path: Path) -> None:
    args = ["plan", "--model", MODEL, "--input-shape", "1,8,8", "--metric", "shapley", "--ratio", "0.5",
            "--data", DATA, "--max-batches", "1", "--sv-samples", "2"]
    a, b, c = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    for out, seed in ((a, "3"), (b, "3"), (c, "4")):
        result = run(*args, "--seed", seed, "-o", str(out))
        assert result.exit_code == 0, result.output
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()  # another seed draws other permutations
    prov = json.loads(a.read_text())["provenance"]
    assert prov["metric"] == "shapley" and prov["seed"] == 3
    assert prov["metric_params"] == {"criterion": "cross_entropy", "max_batches": 1, "sv_samples": 2}
    assert prov["selection"]["ratio"] == 0.5 and prov["selection"]["scope"] == "layer"
    # the content digest of the scored weights: the CLI builds make_cnn() under manual_seed(0)
    torch.manual_seed(0)
    assert prov["weights_digest"] == pp.weights_digest(pp.loading.load_model(MODEL))


def test_weights_digest_definition_and_equal_for_model_dict_and_files(tmp_path: Path) -> None:
    model = nn.Linear(2, 3)
    with torch.no_grad():
        model.weight.copy_(torch.arange(6.0).reshape(3, 2))
        model.bias.copy_(torch.tensor([1.0, 2.0, 3.0]))
    # the definition, computed independently: one line per tensor, sorted by name
    def line(name: str, t: torch.Tensor) -> bytes:
        digest = hashlib.sha256(t.numpy().astype("<f4").tobytes()).hexdigest()
        return f"{name}\tF32\t{','.join(map(str, t.shape))}\t{digest}\n".encode()
    expected = hashlib.sha256(line("bias", model.bias.detach()) + line("weight", model.weight.detach())).hexdigest()
    assert pp.weights_digest(model) == expected
    assert pp.weights_digest(model.state_dict()) == expected
    path = tmp_path / "w.safetensors"
    save_file(model.state_dict(), str(path))
    assert pp.weights_digest(path) == expected
    with torch.no_grad():
        model.bias[0] = 1.5
    assert pp.weights_digest(model) != expected


def test_validate_and_apply_warn_when_the_weights_content_differs(tmp_path: Path) -> None:
    model = cnn()
    x = torch.randn(2, 3, 8, 8)
    plan = pp.plan_from_metric(model, x, "weight_norm", 0.5)
    assert plan.provenance.weights_digest == pp.weights_digest(model)
    plan_path = plan.save(tmp_path / "plan.json")
    same, other = tmp_path / "same.safetensors", tmp_path / "other.safetensors"
    save_file(model.state_dict(), str(same))
    changed = {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    save_file(changed, str(other))

    ok = run("validate", str(plan_path), str(same))
    assert ok.exit_code == 0 and ok.stderr == ""
    warned = run("validate", str(plan_path), str(other))
    assert warned.exit_code == 0
    assert warned.stderr.startswith(f"warning: {other}: the weights' content differs from the weights the "
                                    "plan was scored on")
    strict = run("validate", str(plan_path), str(other), "--content-check", "error")
    assert strict.exit_code == 1 and strict.stderr.startswith("error: ") and "content differs" in strict.stderr
    assert run("validate", str(plan_path), str(other), "--content-check", "off").stderr == ""

    out = tmp_path / "out.safetensors"
    refused = run("apply", str(plan_path), str(other), "-o", str(out), "--content-check", "error")
    assert refused.exit_code == 1 and not out.exists()
    applied = run("apply", str(plan_path), str(other), "-o", str(out))
    assert applied.exit_code == 0 and "warning: " in applied.stderr and out.exists()

    # the library: a warning category, or an error on request; the live model too
    with pytest.warns(pp.WeightsContentWarning, match="content differs"):
        pp.check_weights(plan, other)
    with pytest.raises(pp.PlanMismatchError, match="content differs"):
        pp.check_weights(plan, other, check_content="error")
    moved = copy.deepcopy(model)
    with torch.no_grad():
        moved[0].weight.mul_(2)
    with pytest.warns(pp.WeightsContentWarning):
        pp.apply_plan(moved, plan)


def test_a_file_already_pruned_by_the_plan_is_recognised(tmp_path: Path) -> None:
    model = cnn()
    plan = pp.plan_pruning(model, {"0": [1, 2]}, example_inputs=torch.randn(1, 3, 8, 8))
    plan_path = plan.save(tmp_path / "plan.json")
    weights = tmp_path / "w.safetensors"
    save_file(model.state_dict(), str(weights))
    assert run("apply", str(plan_path), str(weights)).exit_code == 0
    pruned = tmp_path / "w.pruned.safetensors"
    result = run("validate", str(plan_path), str(pruned))
    assert result.exit_code == 1
    assert result.stderr == (f"error: {pruned}: already pruned by this plan ({plan.digest()[:12]}): its metadata "
                             "records the plan's digest and its shapes are the pruned shapes; apply the plan to "
                             "the unpruned weights\n")
    with pytest.raises(pp.AlreadyPrunedError):
        pp.apply_to_safetensors(plan, pruned, tmp_path / "twice.safetensors")
    # pruned by another plan: the shape mismatch names that plan
    other = pp.plan_pruning(model, {"0": [3]}, example_inputs=torch.randn(1, 3, 8, 8))
    with pytest.raises(pp.PlanMismatchError, match=rf"pruned by plan {plan.digest()[:12]}"):
        pp.check_weights(other, pruned)


def test_older_plans_without_the_new_fields_still_load() -> None:
    model = cnn()
    plan = pp.plan_pruning(model, {"0": [1]}, example_inputs=torch.randn(1, 3, 8, 8))
    data = json.loads(plan.to_json())
    del data["model"]["buffers"]
    for g in data["groups"]:
        del g["order"]
    old = pp.PrunePlan.from_dict(data)
    assert old.buffers_known is False and old.groups[0].order is None
    assert old.provenance.seed is None and old.provenance.weights_digest is None
    assert old.scalars_removed() == plan.scalars_removed()


# ---- 2. honest summaries ------------------------------------------------------------------


def test_groups_are_listed_in_execution_order_not_string_order(tmp_path: Path) -> None:
    # 14 modules: roots "0", "3", "7", "12" sort as strings as 0, 12, 3, 7
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Identity(), nn.Identity(),
                          nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Identity(), nn.Identity(), nn.Identity(),
                          nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 2, 1))
    x = torch.randn(1, 3, 6, 6)
    removed = {"12": [0], "3": [1], "7": [2], "0": [3]}
    plan = pp.plan_pruning(model, removed, example_inputs=x)
    assert [g.name for g in plan.groups] == ["0", "3", "7", "12"]
    assert [g.order for g in plan.groups] == [0, 1, 2, 3]
    # the canonical form does not depend on the order the groups are given in
    data = json.loads(plan.to_json())
    data["groups"].reverse()
    assert pp.PrunePlan.from_dict(data).to_json() == plan.to_json()
    # explicit cascades: the order the model defines its modules (named_modules: 0, 3, 7, 12)
    explicit = pp.plan_pruning(model, removed, cascades={"12": ["13"], "3": ["7"], "7": ["12"], "0": ["1", "3"]})
    assert [g.name for g in explicit.groups] == ["0", "3", "7", "12"]
    # an old plan without `order` lists its groups by name, as before
    for g in data["groups"]:
        del g["order"]
    assert [g.name for g in pp.PrunePlan.from_dict(data).groups] == ["0", "12", "3", "7"]
    # `show` prints them in execution order
    path = plan.save(tmp_path / "p.json")
    rows = [line.split()[0] for line in run("show", str(path)).output.splitlines()[1:5]]
    assert rows == ["0", "3", "7", "12"]


def test_requested_vs_achieved_and_warnings(tmp_path: Path) -> None:
    torch.manual_seed(0)
    weights = tmp_path / "w.safetensors"
    save_file(pp.loading.load_model(MODEL).state_dict(), str(weights))
    base = ["plan", "--model", MODEL, "--weights", str(weights), "--input-shape", "1,8,8", "--metric",
            "weight_norm"]
    out = tmp_path / "p.json"
    result = run(*base, "--ratio", "0.3", "--scope", "global", "--round-to", "8", "-o", str(out))
    assert result.exit_code == 0, result.output
    # 16 + 32 + 64 = 112 units; 30% asked = floor(33.6) = 33 units = 29.5%. Kept counts are
    # rounded up to multiples of 8, so fewer go (how many depends on the global ranking).
    plan = pp.PrunePlan.load(out)
    gone = sum(len(g.removed) for g in plan.groups)
    assert all((g.size - len(g.removed)) % 8 == 0 for g in plan.groups) and 0 < gone < 33
    # the ratio is reported as given (it used to say "requested 29.5%"), the counts with what
    # they are a fraction of
    assert (f"requested ratio 0.3 (scope global): 33 units after flooring per kind (29.5% of the 112 "
            f"units of the groups considered); removed {gone} ({gone / 112:.1%}; round_to=8, min_keep=1)"
            ) in result.stdout
    assert (f"warning: the plan removes {gone} units ({gone / 112:.1%} of the 112 units of the groups "
            f"considered), 33 (29.5%) were asked: round_to=8 and min_keep=1 keep {33 - gone} of them"
            ) in result.stderr
    assert plan.provenance.selection["achieved_fraction"] == round(gone / 112, 6)
    assert plan.provenance.selection["units"] == 112 and plan.provenance.selection["requested_units"] == 33
    nothing = run(*base, "--ratio", "0.3", "--min-keep", "100", "-o", str(tmp_path / "n.json"))
    assert nothing.exit_code == 0
    assert ("warning: the plan removes nothing: 32 units were asked, but round_to=1 and min_keep=100 keep 32 "
            "of them") in nothing.stderr  # floor(0.3 * 16) + floor(0.3 * 32) + floor(0.3 * 64) = 4 + 9 + 19 = 32
    assert "requested ratio 0.3 (scope layer): 32 units after flooring per group" in nothing.stdout
    assert pp.PrunePlan.load(tmp_path / "n.json").groups == []


@pytest.mark.parametrize(("args", "message"), [
    (["--metric", "weight_norm", "--data", DATA], "metric 'weight_norm' ignores --data"),
    (["--metric", "weight_norm", "--criterion", "mse"], "metric 'weight_norm' ignores --criterion"),
    (["--metric", "taylor", "--data", DATA, "--seed", "1"], "metric 'taylor' ignores --seed"),
    (["--metric", "taylor", "--data", DATA, "--sv-samples", "3"], "metric 'taylor' ignores --sv-samples"),
    (["--metric", "fpgm", "--p", "1"], "metric 'fpgm' ignores --p"),
    (["--metric", "lamp", "--max-batches", "2"], "metric 'lamp' ignores --max-batches"),
])
def test_options_a_metric_ignores_are_refused(tmp_path: Path, args: list[str], message: str) -> None:
    out = tmp_path / "p.json"
    result = run("plan", "--model", MODEL, "--input-shape", "1,8,8", "--ratio", "0.5", *args, "-o", str(out))
    assert result.exit_code == 2 and message in result.output and not out.exists()


def test_the_library_refuses_ignored_options_too() -> None:
    model, x = cnn(), torch.randn(2, 3, 8, 8)
    with pytest.raises(pp.PlanningError, match="metric 'weight_norm' reads no data: it ignores data"):
        pp.plan_from_metric(model, x, "weight_norm", 0.5, data=[(x, torch.zeros(2, dtype=torch.long))])
    with pytest.raises(pp.PlanningError, match="metric 'fpgm' is deterministic: it ignores seed"):
        pp.plan_from_metric(model, x, "fpgm", 0.5, seed=1)
    with pytest.raises(pp.PlanningError, match=r"metric 'lp_norm' has no parameter 'sv_samples' \(its parameters: p\)"):
        pp.plan_from_metric(model, x, "lp_norm", 0.5, metric_params={"sv_samples": 3})


def test_select_indices_rounds_as_its_docstring_says() -> None:
    import numpy as np

    # per layer: 30% of 32 asks floor(9.6) = 9; 23 kept rounds up to 24 with round_to=8: 8 go
    assert len(pp.select_indices({"a": np.arange(32.0)}, 0.3, round_to=8)["a"]) == 8
    # a group too small for the next multiple keeps everything: 12 units, 11 kept -> 16 > 12
    assert pp.select_indices({"a": np.arange(12.0)}, 0.1, round_to=8) == {}
    # the lowest scores go, ties to the lower index
    assert pp.select_indices({"a": [3.0, 1.0, 1.0, 2.0]}, 0.5) == {"a": [1, 2]}


def test_kind_ratios_read_the_groups_kind_attribute() -> None:
    from dataclasses import dataclass

    import numpy as np

    from pruneplan.loading import _select_ratio

    @dataclass
    class G:  # what discovery gives, with the `kind` of DESIGN "Group kinds"
        name: str
        size: int
        kind: str = "channels"

    groups = [G("a", 8), G("h", 4, "heads"), G("b", 10)]
    table = {g.name: np.arange(float(g.size)) for g in groups}
    removed, asked = _select_ratio(groups, table, 0.5, "layer", None, {"heads": 0.25}, 1, 1, "mean",
                                   lambda r, members: r)
    # channels at 0.5: 4 of 8 and 5 of 10; heads at 0.25: floor(1.0) = 1 of 4 (the lowest)
    assert removed == {"a": [0, 1, 2, 3], "b": [0, 1, 2, 3, 4], "h": [0]} and asked == 10
    # global scope ranks each kind separately with its own ratio
    removed, _ = _select_ratio(groups, table, 0.5, "global", None, {"heads": 0.5}, 1, 1, "mean",
                                 lambda r, members: r)
    assert len(removed["h"]) == 2 and len(removed.get("a", [])) + len(removed.get("b", [])) == 9
