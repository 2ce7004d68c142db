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


_TV: list[tuple[str, tuple[int, ...], dict, XFail | None]] = [
    ("alexnet", (2, 3, 64, 64), {}, None),
    ("vgg11", (2, 3, 32, 32), {}, None),
    ("resnet18", (2, 3, 32, 32), {}, None),
    ("resnext50_32x4d", (2, 3, 32, 32), {}, None),
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
    ("efficientnet_b0", (2, 3, 32, 32), {}, None),
    ("efficientnet_v2_s", (2, 3, 32, 32), {}, None),
    ("regnet_x_400mf", (2, 3, 32, 32), {}, None),
    ("regnet_y_400mf", (2, 3, 32, 32), {}, None),
    ("convnext_tiny", (2, 3, 32, 32), {}, None),
    ("vit_b_16", (2, 3, 32, 32), {"image_size": 32}, None),
    ("swin_t", (2, 3, 64, 64), {}, None),
    ("swin_v2_t", (2, 3, 64, 64), {}, None),
    ("maxvit_t", (1, 3, 224, 224), {}, None),
]

TORCHVISION = [RealModel("torchvision", n, s, k, n, x)
               for n, s, k, x in _TV]

# One model of each timm family (module of timm.models), the smallest that runs in a few
# seconds on two CPU cores; ``family`` is the timm module.
# Families whose registered models are large (nasnet's 4032 features, mobilenetv5's 300M, the
# SAM and VLM encoders) are built small through their own constructor arguments (fewer blocks,
# narrower widths, a small image): their blocks and attention run as in the released sizes.
_TIMM: list[tuple[str, str, tuple[int, ...], dict, XFail | None]] = [
    ("beit", "beit_base_patch16_224", (2, 3, 32, 32), {'img_size': 32}, None),
    ("byoanet", "lambda_resnet26t", (2, 3, 64, 64), {}, None),
    ("byobnet", "repvgg_a0", (2, 3, 32, 32), {}, None),
    ("cait", "cait_xxs24_224", (2, 3, 32, 32), {'img_size': 32}, None),
    ("coat", "coat_lite_tiny", (2, 3, 64, 64), {'img_size': 64}, None),
    ("convit", "convit_tiny", (2, 3, 32, 32), {'img_size': 32}, None),
    ("convmixer", "convmixer_768_32", (2, 3, 32, 32), {}, None),
    ("convnext", "convnext_atto", (2, 3, 32, 32), {}, None),
    ("cpubone", "cpubone_nano", (2, 3, 32, 32), {}, None),
    ("crossvit", "crossvit_tiny_240", (1, 3, 240, 240), {}, XFail(
        "limit: 16.1% fewer parameters (< 20%): nothing is left out, but C // num_heads ties each residual stream to the 3 attention heads of its blocks (a unit is one head with its share of the embedding), and 30% of 3 units rounds down to none")),
    ("csatv2", "csatv2", (2, 3, 64, 64), {}, None),
    ("cspnet", "cspresnet50", (2, 3, 32, 32), {}, None),
    ("cspnext", "cspnext_tiny", (2, 3, 32, 32), {}, None),
    ("davit", "davit_tiny", (2, 3, 64, 64), {}, None),
    ("deit", "deit_tiny_patch16_224", (2, 3, 32, 32), {'img_size': 32}, None),
    ("deepseek_vit", "deepseek_vit_412m", (2, 3, 56, 56),
     {'img_size': 56, 'depth': 2, 'embed_dim': 256, 'num_heads': 4, 'num_classes': 10}, None),
    ("densenet", "densenet121", (2, 3, 32, 32), {}, None),
    ("dla", "dla34", (2, 3, 32, 32), {}, None),
    ("dpn", "dpn48b", (2, 3, 32, 32), {}, None),
    ("edgenext", "edgenext_xx_small", (2, 3, 64, 64), {}, XFail(
        "limit: 19.9% fewer parameters (< 20%): stage 2's chunk(3) cuts 88 channels into 30, 30 "
        "and 28 (left out: units of position j of every part would hold 2 or 3 channels), and "
        "even such units could not be pruned: its cross-covariance attention ties the 88 "
        "channels to 4 heads of C // 4 = 22, and position j of the parts spans all 4 heads "
        "(as stage 3's chunk(4) of 168 into 42s does: all of its units are tied together)")),
    ("efficientformer", "efficientformer_l1", (1, 3, 224, 224), {}, None),
    ("efficientformer_v2", "efficientformerv2_s0", (1, 3, 224, 224), {}, None),
    ("efficientnet", "efficientnet_b0", (2, 3, 32, 32), {}, None),
    ("efficientvim", "efficientvim_m1", (2, 3, 64, 64), {}, None),
    ("efficientvit_mit", "efficientvit_b0", (2, 3, 64, 64), {}, None),
    ("efficientvit_msra", "efficientvit_m0", (1, 3, 224, 224), {}, None),
    ("eva", "eva02_tiny_patch14_224", (2, 3, 28, 28), {'img_size': 28}, XFail(
        "limit: 19.5% fewer parameters (< 20%): the model has no classifier (num_classes=0), so "
        "the hidden width reaches the model output, and the heads are tied to it by "
        "reshape(B, N, C); only the MLPs prune")),
    ("fasternet", "fasternet_t0", (2, 3, 32, 32), {}, None),
    ("fastvit", "fastvit_t8", (2, 3, 64, 64), {}, None),
    ("focalnet", "focalnet_tiny_srf", (2, 3, 64, 64), {}, None),
    ("gcvit", "gcvit_xxtiny", (1, 3, 224, 224), {}, None),
    ("gemma4_vit", "gemma4_vit_167m", (2, 3, 64, 64),
     {'img_size': 64, 'depth': 2, 'embed_dim': 256, 'num_heads': 4, 'head_dim': 64,
      'intermediate_size': 1024, 'position_embedding_size': 64, 'num_classes': 10}, None),
    ("ghostnet", "ghostnet_050", (2, 3, 32, 32), {}, None),
    ("hardcorenas", "hardcorenas_a", (2, 3, 32, 32), {}, None),
    ("hgnet", "hgnetv2_b0", (2, 3, 32, 32), {}, None),
    ("hiera", "hiera_tiny_224", (1, 3, 224, 224), {}, None),
    ("hieradet_sam2", "sam2_hiera_tiny", (2, 3, 64, 64),
     {'stages': (1, 1, 2, 1), 'global_att_blocks': (3,), 'num_heads': 2}, None),
    ("hrnet", "hrnet_w18_small", (2, 3, 64, 64), {}, None),
    ("iformer", "iformer_s", (2, 3, 64, 64), {}, None),
    ("inception_next", "inception_next_atto", (2, 3, 64, 64), {}, None),
    ("inception_resnet_v2", "inception_resnet_v2", (1, 3, 75, 75), {}, None),
    ("inception_v3", "inception_v3", (1, 3, 75, 75), {}, None),
    ("inception_v4", "inception_v4", (1, 3, 75, 75), {}, None),
    ("lcnetv2", "lcnetv2_small", (2, 3, 32, 32), {}, None),
    ("levit", "levit_128s", (1, 3, 224, 224), {}, None),
    ("lowformer", "lowformer_b0", (2, 3, 64, 64), {}, None),
    ("mambaout", "mambaout_femto", (2, 3, 64, 64), {}, None),
    ("maxxvit", "coatnet_nano_rw_224", (1, 3, 224, 224), {}, None),
    ("metaformer", "poolformer_s12", (2, 3, 32, 32), {}, None),
    ("mlp_mixer", "mixer_s32_224", (2, 3, 64, 64), {'img_size': 64}, None),
    ("mobilenetv3", "mobilenetv3_small_050", (2, 3, 32, 32), {}, None),
    ("mobilenetv5", "mobilenetv5_base", (1, 3, 64, 64),
     {'channel_multiplier': 0.25, 'num_features': 256, 'msfa_output_resolution': 2}, None),
    ("mobilevit", "mobilevit_xxs", (2, 3, 64, 64), {}, None),
    ("mvitv2", "mvitv2_tiny", (1, 3, 224, 224), {}, None),
    ("naflexvit", "naflexvit_base_patch16_gap", (2, 3, 64, 64),
     {'depth': 2, 'embed_dim': 256, 'num_heads': 4}, None),
    ("nasnet", "nasnetalarge", (2, 3, 32, 32), {'num_features': 384, 'stem_size': 16}, None),
    ("nest", "nest_tiny", (2, 3, 64, 64), {'img_size': 64}, None),
    ("nextvit", "nextvit_small", (2, 3, 64, 64), {}, None),
    ("nfnet", "nf_regnet_b0", (2, 3, 32, 32), {}, XFail(
        "limit: 12.3% fewer parameters (< 20%); e.g. combined with a tensor no prunable layer owns at operation 'mul' in module 'stages.0.0.attn'")),
    ("pit", "pit_ti_224", (2, 3, 64, 64), {'img_size': 64}, None),
    ("pnasnet", "pnasnet5large", (1, 3, 32, 32), {}, None),
    ("pvt_v2", "pvt_v2_b0", (2, 3, 64, 64), {}, None),
    ("qwen3_vit", "qwen3_vit_88m", (2, 3, 64, 64),
     {'img_size': 64, 'depth': 2, 'embed_dim': 256, 'num_heads': 4, 'num_classes': 10}, None),
    ("rdnet", "rdnet_tiny", (2, 3, 64, 64), {}, None),
    ("regnet", "regnety_002", (2, 3, 32, 32), {}, None),
    ("repghost", "repghostnet_050", (2, 3, 32, 32), {}, None),
    ("repvit", "repvit_m0_9", (2, 3, 64, 64), {}, None),
    ("res2net", "res2net50_14w_8s", (2, 3, 32, 32), {}, None),
    ("resnest", "resnest14d", (2, 3, 32, 32), {}, None),
    ("resnet", "resnet18", (2, 3, 32, 32), {}, None),
    ("resnetv2", "resnetv2_50", (2, 3, 32, 32), {}, None),
    ("rexnet", "rexnet_100", (2, 3, 32, 32), {}, None),
    ("selecsls", "selecsls42b", (2, 3, 32, 32), {}, None),
    ("senet", "legacy_seresnet18", (2, 3, 32, 32), {}, None),
    ("sequencer", "sequencer2d_s", (2, 3, 64, 64), {}, None),
    ("shvit", "shvit_s1", (2, 3, 64, 64), {}, None),
    ("sknet", "skresnet18", (2, 3, 32, 32), {}, None),
    ("starnet", "starnet_s050", (2, 3, 32, 32), {}, None),
    ("swiftformer", "swiftformer_xs", (2, 3, 64, 64), {}, None),
    ("swin_transformer", "swin_tiny_patch4_window7_224", (1, 3, 224, 224), {}, None),
    ("swin_transformer_v2", "swinv2_tiny_window8_256", (2, 3, 64, 64), {'img_size': 64}, None),
    ("swin_transformer_v2_cr", "swinv2_cr_tiny_ns_224", (1, 3, 224, 224), {}, None),
    ("tiny_vit", "tiny_vit_5m_224", (1, 3, 224, 224), {}, None),
    ("tnt", "tnt_s_patch16_224", (2, 3, 32, 32), {'img_size': 32}, None),
    ("tresnet", "tresnet_m", (2, 3, 64, 64), {}, None),
    ("twins", "twins_svt_small", (2, 3, 64, 64), {}, None),
    ("vgg", "vgg11", (2, 3, 32, 32), {}, None),
    ("visformer", "visformer_tiny", (1, 3, 224, 224), {}, None),
    ("vision_transformer", "vit_tiny_patch16_224", (2, 3, 32, 32), {'img_size': 32}, None),
    ("vision_transformer_hybrid", "vit_tiny_r_s16_p8_224", (2, 3, 64, 64), {'img_size': 64}, None),
    ("vision_transformer_relpos", "vit_relpos_small_patch16_224", (2, 3, 32, 32), {'img_size': 32}, None),
    ("vision_transformer_sam", "samvit_base_patch16", (2, 3, 64, 64),
     {'img_size': 64, 'depth': 2, 'global_attn_indexes': (1,), 'window_size': 2,
      'embed_dim': 256, 'num_heads': 8, 'neck_chans': 64}, None),
    ("vitamin", "vitamin_small_224", (1, 3, 224, 224), {}, None),
    ("volo", "volo_d1_224", (2, 3, 64, 64), {'img_size': 64}, None),
    ("vovnet", "ese_vovnet19b_slim_dw", (2, 3, 32, 32), {}, None),
    ("xception", "legacy_xception", (1, 3, 96, 96), {}, None),
    ("xception_aligned", "xception41", (2, 3, 64, 64), {}, None),
    ("xcit", "xcit_nano_12_p16_224", (2, 3, 32, 32), {'img_size': 32}, None),
]

TIMM = [RealModel("timm", n, s, k, fam, x) for fam, n, s, k, x in _TIMM]

ALL = TORCHVISION + TIMM


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def thirty_percent(groups: list, seed: int = 0) -> dict[str, list[int]]:
    """A seeded random ``floor(0.3 * size)`` units of every group (groups that would lose none
    are left alone). Where that would remove every unit of one part of a group (an edit with
    `EditSpec.amounts` taken to 0: a split part, a branch of a concatenation tied to a full
    width), `pruneplan.select.keep_parts` swaps the units that would for other random ones,
    as selection does."""
    from pruneplan.select import keep_parts

    rng = np.random.default_rng(seed)
    spare = np.random.default_rng(seed + 1)  # only for swaps: the other subsets stay as drawn
    out = {}
    for g in groups:
        k = int(RATIO * g.size)
        if k:
            pick = sorted(int(i) for i in rng.choice(g.size, k, replace=False))
            # the drawn units score lowest, the others at random above them
            scores = k + spare.random(g.size)
            scores[pick] = np.arange(k)
            out[g.name] = sorted(keep_parts({g.name: pick}, [g], {g.name: scores})[g.name])
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
