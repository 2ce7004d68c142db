"""Real model code: torchvision and timm constructors (random weights, nothing downloaded), and
the check every one of them must pass. Shared by tests/test_real_models.py and
benchmarks/coverage.py.

The check, per model: discovery runs; 30% of the units of every discovered group (a seeded
random subset) plan and apply; the output shape is unchanged; the parameter count falls by at
least 20%; replaying the plan on the model's saved safetensors weights and loading them into a
copy of the unpruned model whose saved tensors are all zeroed (`load_pruned`) gives the pruned model's output exactly.
"""

from __future__ import annotations

import copy
import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

RATIO = 0.3
MIN_PARAM_DROP = 0.2


@dataclass(frozen=True)
class RealModel:
    """One constructor call: ``library`` (``torchvision``/``timm``), the model name, its
    keyword arguments, the example input shape (batch first), and, for models that do not pass
    today, the precise reason (the test is ``xfail(strict=True)`` with it)."""

    library: str
    name: str
    shape: tuple[int, ...]
    kwargs: dict = field(default_factory=dict)
    family: str = ""
    xfail: XFail | None = None

    @property
    def id(self) -> str:
        return f"{self.library}/{self.name}"

    def build(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        if self.library == "torchvision":
            models = importlib.import_module("torchvision.models")
            model = getattr(models, self.name)(weights=None, **self.kwargs)
        else:
            timm = importlib.import_module("timm")
            model = timm.create_model(self.name, pretrained=False, **self.kwargs)
        return model.eval()

    def example(self) -> torch.Tensor:
        return torch.randn(self.shape, generator=torch.Generator().manual_seed(0))


@dataclass(frozen=True)
class XFail:
    """Why a model fails today (an item of issue 11 being fixed elsewhere, or a limit of the
    library), and the exception that shows it (``AssertionError``: a check of the test)."""

    reason: str
    raises: str = "AssertionError"

    def exception(self) -> type[BaseException]:
        import builtins

        from pruneplan import errors

        return getattr(builtins, self.raises, None) or getattr(errors, self.raises)


STOCHASTIC_DEPTH = XFail("item 3: torchvision.ops.stochastic_depth is an operation discovery "
                         "does not know", "UnsupportedOperationError")
GROUPED = XFail("item 4: grouped convolutions: prunable_groups offers units whose subsets are "
                "not valid on a grouped conv (the plan's validator refuses the 30% subset)",
                "PlanValidationError")
HEADS = XFail("nn.MultiheadAttention blocks the roots that reach it (the heads of the built-in "
              "module are no unit yet): 19.7% fewer parameters, < 20%")
SWIN_OP = XFail("item 3: torchvision's fx-wrapped 'shifted_window_attention' is an operation "
                "discovery does not know", "UnsupportedOperationError")
SWIN2_OP = XFail("item 3: torchvision's fx-wrapped '_get_relative_position_bias' (Swin V2) is an "
                 "operation discovery does not know", "UnsupportedOperationError")

# timm: what discovery cannot do yet on timm's building blocks (items of issue 11, or limits)
NORM_FN = XFail("item 2: timm's norm layers (BatchNormAct2d, LayerNorm, LayerNorm2d, GroupNorm "
                "subclasses) call F.batch_norm / F.layer_norm / F.group_norm in their own "
                "forward; discovery reads the functional norm as mixing the channels and leaves "
                "the roots before it out: < 20% fewer parameters")
NORM_HEADS = XFail("item 2 (timm's LayerNorm calls F.layer_norm: the patch embedding and the "
                   "residual stream are left out) and attention heads, no unit yet (DESIGN "
                   "'Group kinds'): < 20% fewer parameters")
PAD_HEADS = XFail("attention heads, no unit yet (DESIGN 'Group kinds'), and F.pad of a "
                  "channels-last window partition read as acting on the channels: < 20% fewer "
                  "parameters")
STD_CONV = XFail("item 2: timm's ScaledStdConv2d (a Conv2d subclass with its own forward: "
                 "F.conv2d of a standardised weight) is traced through and its conv2d blocks the "
                 "roots: < 20% fewer parameters")
EMPTY_SHORTCUT = XFail("item 3: an empty nn.Sequential() used as a shortcut is a module "
                       "discovery does not know", "UnsupportedOperationError")
SPLIT = XFail("item 5: a split of a root's output into fixed-size parts (partial conv, "
              "selective-kernel paths) leaves its roots out: < 20% fewer parameters")
RNN = XFail("item 5: nn.LSTM blocks the roots that reach it: < 20% fewer parameters")
TABLE = XFail("item 5: a table indexed with tensors (relative position bias) on a root's "
              "channels", "UnsupportedOperationError")
UNEQUAL = XFail("discovery couples roots of unequal sizes through a cat/add of differently "
                "sized channel blocks", "UnsupportedOperationError")
MATMUL = XFail("item 3: a lambda layer's matmul receives a root's channels in an argument "
               "discovery does not follow", "UnsupportedOperationError")
CAT_SPLIT_BUG = XFail("bug: IndexError in the cat/split rule (pruneplan/graph/rules/cat_split.py) "
                      "on this model", "IndexError")
MISSED_WIDTH = XFail("bug: the plan applies but the pruned model fails in forward (a reshape "
                     "with a width discovery did not see)", "RuntimeError")

_TV: list[tuple[str, tuple[int, ...], dict, XFail | None]] = [
    ("alexnet", (2, 3, 64, 64), {}, None),
    ("vgg11", (2, 3, 32, 32), {}, None),
    ("resnet18", (2, 3, 32, 32), {}, None),
    ("resnext50_32x4d", (2, 3, 32, 32), {}, GROUPED),
    ("wide_resnet50_2", (2, 3, 32, 32), {}, None),
    ("squeezenet1_1", (2, 3, 64, 64), {}, None),
    ("densenet121", (2, 3, 32, 32), {}, None),
    # 299x299: the auxiliary head (training mode only) needs 17x17 maps at Mixed_6e
    ("inception_v3", (2, 3, 299, 299), {"aux_logits": True, "init_weights": True}, None),
    ("googlenet", (2, 3, 64, 64), {"aux_logits": True, "init_weights": True}, None),
    ("mobilenet_v2", (2, 3, 32, 32), {}, None),
    ("mobilenet_v3_small", (2, 3, 32, 32), {}, None),
    ("mnasnet0_5", (2, 3, 32, 32), {}, None),
    ("shufflenet_v2_x0_5", (2, 3, 32, 32), {}, None),
    ("efficientnet_b0", (2, 3, 32, 32), {}, STOCHASTIC_DEPTH),
    ("efficientnet_v2_s", (2, 3, 32, 32), {}, STOCHASTIC_DEPTH),
    ("regnet_x_400mf", (2, 3, 32, 32), {}, GROUPED),
    ("regnet_y_400mf", (2, 3, 32, 32), {}, GROUPED),
    ("convnext_tiny", (2, 3, 32, 32), {}, STOCHASTIC_DEPTH),
    ("vit_b_16", (2, 3, 32, 32), {"image_size": 32}, HEADS),
    ("swin_t", (2, 3, 64, 64), {}, SWIN_OP),
    ("swin_v2_t", (2, 3, 64, 64), {}, SWIN2_OP),
    ("maxvit_t", (1, 3, 224, 224), {}, STOCHASTIC_DEPTH),
]

TORCHVISION = [RealModel("torchvision", n, s, k, n, x)
               for n, s, k, x in _TV]

# One model of each timm family (module of timm.models), the smallest that runs in a few
# seconds on two CPU cores; ``family`` is the timm module.
# Not tried: nasnet/pnasnet (331x331 NAS cells, minutes per model), mobilenetv5 (300M),
# vision_transformer_sam (1024x1024 SAM encoders), the VLM encoders (deepseek_vit, gemma4_vit,
# qwen3_vit, naflexvit) and hieradet_sam2.
_TIMM: list[tuple[str, str, tuple[int, ...], dict, XFail | None]] = []  # see below

TIMM = [RealModel("timm", n, s, k, fam, x) for fam, n, s, k, x in _TIMM]

ALL = TORCHVISION + TIMM


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def thirty_percent(groups: list, seed: int = 0) -> dict[str, list[int]]:
    """A seeded random ``floor(0.3 * size)`` units of every group (groups that would lose none
    are left alone)."""
    rng = np.random.default_rng(seed)
    out = {}
    for g in groups:
        k = int(RATIO * g.size)
        if k:
            out[g.name] = sorted(int(i) for i in rng.choice(g.size, k, replace=False))
    return out


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors, a copy for each further key of a tensor shared by several (a module
    used in several places), which safetensors refuses to write as one."""
    seen: set[int] = set()
    out = {}
    for k, v in state.items():
        v = v.detach().contiguous()
        key = v.untyped_storage().data_ptr()
        out[k] = v.clone() if key in seen else v
        seen.add(key)
    return out


@dataclass
class Outcome:
    """What pruning 30% of every group of one model gave (all sizes in parameters)."""

    groups: int
    roots: int
    left_out: list[Any]
    unexecuted: list[str]
    params_before: int
    params_after: int
    seconds: float

    @property
    def drop(self) -> float:
        return 1 - self.params_after / self.params_before


def prune_and_replay(spec: RealModel, workdir: Path, on_unsupported: str = "error",
                     log: Callable[[str], None] | None = None, check_drop: bool = True) -> Outcome:
    """Run the whole check on ``spec`` (see the module docstring); raise AssertionError (or the
    library's error) on the first thing that is wrong; ``check_drop=False`` skips only the
    20% check. Returns the numbers."""
    from safetensors.torch import save_file

    import pruneplan as pp
    from pruneplan.planner import build_plan

    t0 = time.perf_counter()
    model, x = spec.build(seed=0), spec.example()
    before = params(model)
    with torch.no_grad():
        y0 = model(x)
    groups = pp.prunable_groups(model, x, on_unsupported=on_unsupported)
    assert all(lo.reason.strip() for lo in groups.left_out), groups.left_out
    removed = thirty_percent(groups)
    by_name = {g.name: g for g in groups}
    plan = build_plan(model, [(by_name[k], v) for k, v in removed.items()])
    weights, pruned_file = workdir / "model.safetensors", workdir / "model.pruned.safetensors"
    save_file(_unshared(model.state_dict()), str(weights))
    pp.apply_to_safetensors(plan, weights, pruned_file)
    # the replay target: the unpruned model with every saved tensor zeroed (cheaper than
    # building it again; only what load_pruned loads can make its output match)
    fresh = copy.deepcopy(model)
    with torch.no_grad():
        for t in fresh.state_dict().values():
            t.zero_()
    pp.apply_plan(model, plan)
    after = params(model)
    with torch.no_grad():
        y1 = model(x)
    assert y1.shape == y0.shape, f"output shape {tuple(y1.shape)} != {tuple(y0.shape)}"
    fresh = pp.load_pruned(fresh, plan, pruned_file)
    with torch.no_grad():
        y2 = fresh(x)
    assert torch.equal(y1, y2), f"replayed output differs by {(y1 - y2).abs().max().item():.3g}"
    model.train()  # branches that run only in training (auxiliary heads) fit too; norm
    for m in model.modules():  # layers stay in eval mode so that a batch of one runs
        if isinstance(m, nn.modules.batchnorm._NormBase):
            m.eval()
    with torch.no_grad():
        model(x)
    outcome = Outcome(len(groups), sum(len(g.roots) for g in groups) + len(groups.left_out),
                      list(groups.left_out), list(groups.unexecuted), before, after,
                      time.perf_counter() - t0)
    if log:
        log(f"{spec.id}: {outcome.groups} groups, {len(outcome.left_out)} roots left out, "
            f"{before:,} -> {after:,} parameters ({outcome.drop:.1%}), {outcome.seconds:.1f} s")
    assert not check_drop or outcome.drop >= MIN_PARAM_DROP, (
        f"parameters fell by {outcome.drop:.1%} ({before:,} -> {after:,}), less than "
        f"{MIN_PARAM_DROP:.0%}; {len(groups.left_out)} roots left out, e.g. "
        + "; ".join(f"{lo.name}: {lo.reason}" for lo in groups.left_out[:2]))
    return outcome
