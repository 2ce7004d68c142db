"""The worked examples (attributions, plan/show/diff, CLI workflow, pruning while training,
ResNet-18) run end to end in their quick mode and produce what they print."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from timeouts import scaled

import pruneplan as pp

ROOT = Path(__file__).resolve().parents[1]
PRUNEPLAN = shutil.which("pruneplan", path=str(Path(sys.executable).parent)) or "pruneplan"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_example(name: str, out: Path, env: dict | None = None) -> str:
    result = subprocess.run([sys.executable, str(ROOT / "examples" / name), "--quick", "--out", str(out)],
                            capture_output=True, text=True, timeout=scaled(300), env=env or ENV)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


def digits_module():
    """examples/digits.py, imported under a private name."""
    spec = importlib.util.spec_from_file_location("_examples_digits", ROOT / "examples" / "digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def removed_counts(plan: pp.PrunePlan) -> list[tuple[str, int, int]]:
    return [(g.name, g.size, len(g.removed)) for g in plan.groups]


@pytest.mark.slow
def test_attributions(tmp_path: Path) -> None:
    stdout = run_example("attributions.py", tmp_path)
    assert "attribution data: 64 examples in 1 batches" in stdout
    # seeded metrics (random, shapley) use one generator per (seed, layer): all six agree
    assert "run_all(...)['3'] == run('3') for: random, weight_norm, apoz, sensitivity, taylor, shapley\n" in stdout
    assert "but not for" not in stdout
    assert 'taylor reduction="none": shape (64, 32) (examples x units)' in stdout
    assert 'mean of that matrix == reduction="mean": True' in stdout
    assert 'equals mean + 2 * std of the "none" matrix: True' in stdout

    scores = np.load(tmp_path / "scores.npz")
    metrics = ["random", "weight_norm", "apoz", "sensitivity", "taylor", "shapley"]
    for m in metrics:
        assert [scores[f"{m}/{layer}"].shape for layer in ("0", "3", "9")] == [(16,), (32,), (64,)]
        assert np.isfinite(scores[f"{m}/3"]).all()
    none = scores["taylor_none/3"]
    assert none.shape == (64, 32)
    np.testing.assert_allclose(none.mean(0), scores["taylor/3"], rtol=1e-5, atol=1e-12)
    assert scores["shapley_mean2std/3"].shape == (32,)

    # the one-layer table agrees with the saved scores of run("3")
    rows = {line.split()[0]: line for line in (tmp_path / "layer3.txt").read_text().splitlines()[1:]}
    assert sorted(rows) == sorted(metrics)
    for m in metrics:
        top, bottom = ([int(i) for i in re.findall(r"\d+", part)] for part in rows[m].split("]")[:2])
        order = np.argsort(-scores[f"run/{m}"], kind="stable").tolist()
        assert (top, bottom) == (order[:3], order[::-1][:3])
        assert rows[m] in stdout
    for m in ("weight_norm", "apoz", "sensitivity", "taylor"):
        np.testing.assert_array_equal(scores[f"run/{m}"], scores[f"{m}/3"])


@pytest.mark.slow
def test_plan_show_diff(tmp_path: Path) -> None:
    stdout = run_example("plan_show_diff.py", tmp_path)
    p30 = pp.PrunePlan.load(tmp_path / "plan_30.json")
    p50 = pp.PrunePlan.load(tmp_path / "plan_50.json")
    # floor(ratio * size) units of every group
    assert removed_counts(p30) == [("0", 16, 4), ("3", 32, 9), ("9", 64, 19)]
    assert removed_counts(p50) == [("0", 16, 8), ("3", 32, 16), ("9", 64, 32)]
    assert p30.provenance.metric == "taylor"
    assert (tmp_path / "plan_30_again.json").read_bytes() == (tmp_path / "plan_30.json").read_bytes()
    assert "plan_30.json and plan_30_again.json byte-identical: True" in stdout
    assert "exit status 0 (0: nothing differs)" in stdout
    assert "exit status 1 (1: the plans differ" in stdout

    show = (tmp_path / "show.txt").read_text().splitlines()
    assert show[0].split() == ["group", "kept/size", "removed", "parameters", "buffers"]
    assert [line.split()[:3] for line in show[1:4]] == [["0", "12/16", "25.0%"], ["3", "23/32", "28.1%"],
                                                       ["9", "45/64", "29.7%"]]
    assert show[4].startswith(f"3 groups; 32 of 112 units; {p30.parameters_removed():,} of ")

    # diff.txt lists, per group, the indices only the 0.5 plan removes (nothing only in 0.3)
    diff = (tmp_path / "diff.txt").read_text().splitlines()
    expected = [f"{g.name}: +{sorted(set(g.removed) - set(p30.group(g.name).removed))}" for g in p50.groups]
    assert diff == expected
    assert "removed at 0.5 (same scores, lowest first): True" in stdout
    again = subprocess.run([PRUNEPLAN, "diff", str(tmp_path / "plan_30.json"), str(tmp_path / "plan_50.json")],
                           capture_output=True, text=True, env=ENV)
    assert again.returncode == 1 and again.stdout.splitlines() == diff


@pytest.mark.slow
def test_cli_workflow(tmp_path: Path) -> None:
    stdout = run_example("cli_workflow.py", tmp_path)
    assert "$ pruneplan apply " in stdout and "$ pruneplan plan --model " in stdout
    assert "CLI-pruned file == apply_plan on a live copy: tensors True, outputs True" in stdout
    plan = pp.PrunePlan.load(tmp_path / "plan.json")
    assert plan.provenance.metric == "taylor"
    assert removed_counts(plan) == [("0", 16, 8), ("3", 32, 16), ("9", 64, 32)]
    pruned_file = tmp_path / "model.pruned.safetensors"
    with safe_open(str(pruned_file), framework="pt") as f:
        assert f.metadata()["pruneplan.plan_digest"] == plan.digest()
        assert f.get_slice("9.weight").get_shape() == [32, 16 * 4 * 4]
        assert f.get_slice("0.weight").get_shape() == [8, 1, 3, 3]

    # the printed accuracies are those of the saved weights, before and after pruning
    digits = digits_module()
    data = digits.load_data()
    original = digits.make_cnn()
    original.load_state_dict(load_file(str(tmp_path / "model.safetensors")))
    loaded = pp.load_pruned(digits.make_cnn(), plan, pruned_file)
    acc = re.search(r"accuracy: (\d\.\d{3}) before pruning, (\d\.\d{3}) after", stdout)
    assert acc, stdout
    # (within one test image: this process may use another thread count than the example)
    assert float(acc.group(1)) == pytest.approx(digits.accuracy(original, data), abs=3e-3)
    assert float(acc.group(2)) == pytest.approx(digits.accuracy(loaded, data), abs=3e-3)
    assert f"parameters 38,378 -> {digits.count_params(loaded):,}" in stdout
    live = pp.apply_plan(original, plan).eval()
    with torch.no_grad():
        assert torch.equal(live(data.x_test), loaded.eval()(data.x_test))


@pytest.mark.slow
def test_train_and_prune(tmp_path: Path) -> None:
    stdout = run_example("train_and_prune.py", tmp_path)
    assert "same nn.Parameter objects: True; Adam state shaped like the pruned parameters: True" in stdout
    assert "composed plan's pruned shapes == trained model's shapes (15 tensors): True" in stdout
    assert "apply_plan(make_cnn(), composed) has the final architecture: True" in stdout
    assert "composed plan on the pre-pruning snapshot == the 6 steps applied one by one: True" in stdout

    # two steps of 25%: 16 -> 12 -> 9, 32 -> 24 -> 18, 64 -> 48 -> 36
    history = pp.PrunePlan.load(tmp_path / "history.json")
    assert removed_counts(history) == [("0", 16, 7), ("3", 32, 14), ("9", 64, 28)]
    steps = [pp.PrunePlan.load(tmp_path / "steps" / f"step_{k}.json") for k in range(1, 7)]
    assert not (tmp_path / "steps" / "step_7.json").exists()
    assert [len(s.groups) for s in steps] == [1] * 6
    assert pp.compose(steps).digest() == history.digest()

    digits = digits_module()
    model = pp.apply_plan(digits.make_cnn(), history)
    assert (model[0].out_channels, model[3].in_channels, model[3].out_channels) == (9, 9, 18)
    assert (model[4].num_features, model[9].in_features, model[9].out_features, model[11].in_features) == (
        18, 18 * 16, 36, 36)
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def check_resnet18_outputs(stdout: str, out: Path) -> None:
    assert re.search(r"latency 1x3x224x224 \(median of 5, 1 thread\): [\d.]+ ms -> [\d.]+ ms "
                     r"\([\d.]+x faster\)", stdout), stdout
    assert "pruned output shape (1, 1000); conv1 64 -> 32 filters, fc 512 -> 256 inputs" in stdout
    plan = pp.PrunePlan.load(out / "plan.json")
    assert all(len(g.removed) == g.size // 2 for g in plan.groups)
    assert {"conv1", "layer1.0.conv1", "layer4.1.conv1"} <= {g.name for g in plan.groups}
    assert (out / "results.txt").read_text().startswith("parameters: 11,689,512 -> ")


@pytest.mark.slow
def test_resnet18(tmp_path: Path) -> None:
    stdout = run_example("resnet18.py", tmp_path)
    if importlib.util.find_spec("torchvision") is None:
        assert stdout.strip() == "torchvision is not installed; pip install torchvision to run this example"
        assert not tmp_path.exists() or not any(tmp_path.iterdir())
    else:
        check_resnet18_outputs(stdout, tmp_path)


# A stand-in for torchvision.models.resnet18 with the same module names, shapes and forward, so
# that the example's pruning path runs where torchvision is not installed.
STAND_IN = '''
import torch
from torch import nn

__version__ = "stand-in"


class BasicBlock(nn.Module):
    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        out += x if self.downsample is None else self.downsample(x)  # after conv2, as torchvision
        return self.relu(out)


class ResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = 64
        for i, planes in enumerate((64, 128, 256, 512), 1):
            stride = 1 if i == 1 else 2
            down = None
            if stride != 1 or inplanes != planes:
                down = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
            setattr(self, f"layer{i}", nn.Sequential(BasicBlock(inplanes, planes, stride, down),
                                                     BasicBlock(planes, planes)))
            inplanes = planes
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, 1000)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class models:
    @staticmethod
    def resnet18(weights=None):
        return ResNet()
'''


@pytest.mark.slow
def test_resnet18_with_stand_in_torchvision(tmp_path: Path) -> None:
    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed: test_resnet18 runs the real one")
    (tmp_path / "stub").mkdir()
    (tmp_path / "stub" / "torchvision.py").write_text(textwrap.dedent(STAND_IN))
    env = {**ENV, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path / "stub"),
                                                              os.environ.get("PYTHONPATH")]))}
    out = tmp_path / "out"
    stdout = run_example("resnet18.py", out, env=env)
    assert stdout.startswith("torchvision stand-in: ResNet-18, 11,689,512 parameters, 12 prunable groups "
                             "(4 coupled by residual additions: conv1 x3, layer2.0.conv2 x3, "
                             "layer3.0.conv2 x3, layer4.0.conv2 x3)")
    check_resnet18_outputs(stdout, out)


@pytest.mark.slow
def test_distributed_attribution_under_torchrun(tmp_path: Path) -> None:
    # two CPU processes (gloo) launched by torchrun, as the example's docstring says
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "examples" / "distributed_attribution.py"), "--quick", "--out", str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=scaled(300), env=ENV)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    out = result.stdout
    assert "2 ranks (gloo), 1348 training examples" in out
    # DDP left the BatchNorm statistics apart; broadcast_module made the replicas equal
    assert "models identical on all ranks after DDP training: False; after broadcast_module: True" in out
    # each rank scored half of the data; the combined scores equal one process over all of it
    assert "rank 0 scored 674 examples; every rank holds the scores of all 1348" in out
    diff = float(re.search(r"largest difference to one process over all data: (\S+) \(relative\)", out)[1])
    assert diff < 1e-9
    assert "pruned models identical on all 2 ranks: True" in out
    assert "after fine-tuning, parameters identical on all ranks: True" in out
    # rank 0 wrote the plan (half of each group removed) and weights of the pruned shapes
    plan = pp.PrunePlan.load(tmp_path / "plan.json")
    assert removed_counts(plan) == [("0", 16, 8), ("3", 32, 16), ("9", 64, 32)]
    weights = load_file(str(tmp_path / "model.pruned.safetensors"))
    assert {k: list(v.shape) for k, v in weights.items() if k in plan.pruned_shapes()} == plan.pruned_shapes()
    with safe_open(str(tmp_path / "model.pruned.safetensors"), "pt") as f:
        assert f.metadata()["pruneplan.plan_digest"] == plan.digest()
