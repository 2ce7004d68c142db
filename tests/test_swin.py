"""torchvision's Swin (V1 and V2): the fx-wrapped ``shifted_window_attention``,
``_get_relative_position_bias`` and ``_patch_merging_pad`` read by their rules.

A head reaches the rest of the network only through its ``head_dim`` columns of ``proj.weight``
(its window attention output is read there and nowhere else), so removing heads must equal
zeroing those columns in the original model.
"""

from __future__ import annotations

import copy

import pytest
import torch

import pruneplan
from pruneplan.graph._streams import Stream
from pruneplan.graph.discover import prunable_groups
from pruneplan.modules import prune_ready, pruned_class

torchvision = pytest.importorskip("torchvision")
sw = torchvision.models.swin_transformer


def _model(v2: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    kw = {"block": sw.SwinTransformerBlockV2, "downsample_layer": sw.PatchMergingV2} if v2 else {}
    m = sw.SwinTransformer(patch_size=[4, 4], embed_dim=32, depths=[2, 2], num_heads=[2, 4],
                           window_size=[4, 4], stochastic_depth_prob=0.0, num_classes=5, **kw)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return m.eval()


def _x() -> torch.Tensor:
    return torch.randn(2, 3, 40, 40, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_pruned_window_attention_unpruned_equals_torchvision(v2: bool) -> None:
    # the same module made a PrunedShiftedWindowAttention(V2), nothing removed: torchvision's
    # forward is the reference, shifted and not, with padding (7x9 is no multiple of 4)
    cls = sw.ShiftedWindowAttentionV2 if v2 else sw.ShiftedWindowAttention
    torch.manual_seed(0)
    for shift in ([0, 0], [2, 2], [2, 0]):
        m = cls(32, [4, 4], shift, 4).eval()
        with torch.no_grad():
            for p in m.parameters():
                p.normal_()
        p = copy.deepcopy(m)
        prune_ready(p)
        assert type(p).__name__ == ("PrunedShiftedWindowAttentionV2" if v2 else "PrunedShiftedWindowAttention")
        assert pruned_class(p) is type(p)
        for hw in ((8, 8), (7, 9)):
            x = torch.randn(2, *hw, 32)
            with torch.no_grad():
                torch.testing.assert_close(p(x), m(x), rtol=1e-5, atol=1e-5)


def _positions(group, tensor: str, units: list[int]) -> list[int]:
    s = next(s for s in group.slices if s.tensor == tensor)
    st = Stream(s.offset, s.repeat, s.tiles, s.tile_stride, s.positions)
    return sorted(p for u in units for p in st.unit(u))


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_swin_heads_equal_zeroing_their_proj_columns(v2: bool, tmp_path) -> None:
    model, x = _model(v2), _x()
    groups = prunable_groups(model, x)
    heads = {g.roots[-1] if v2 else g.name: g for g in groups if g.kind == "heads"}
    attn = [f"features.{s}.{b}.attn" for s in (1, 3) for b in (0, 1)]
    assert sorted(heads) == attn
    g = heads["features.1.0.attn"]
    assert g.size == 2
    # head 1 of 2, head_dim 16: rows 16..31 of each 32-row third of qkv, proj columns 16..31
    rows = [*range(16, 32), *range(48, 64), *range(80, 96)]
    assert _positions(g, "features.1.0.attn.qkv.weight", [1]) == rows
    assert _positions(g, "features.1.0.attn.qkv.bias", [1]) == rows
    assert _positions(g, "features.1.0.attn.proj.weight", [1]) == list(range(16, 32))
    if v2:  # the bias comes from cpb_mlp's last layer (its row 1), and a logit scale per head
        assert g.roots == ("features.1.0.attn.cpb_mlp.2", "features.1.0.attn")
        assert _positions(g, "features.1.0.attn.cpb_mlp.2.weight", [1]) == [1]
        assert _positions(g, "features.1.0.attn.logit_scale", [1]) == [1]
    else:  # the bias table (T, heads): column 1
        assert _positions(g, "features.1.0.attn.relative_position_bias_table", [1]) == [1]
    removed = {heads[a].name: r for a, r in zip(attn, ([1], [0], [0, 3], [2]), strict=True)}
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for a, r in zip(attn, ([1], [0], [0, 3], [2]), strict=True):
            hd = 16
            cols = [h * hd + j for h in r for j in range(hd)]
            reference.get_submodule(a).proj.weight[:, cols] = 0
        expected = reference(x)
    plan = pruneplan.plan_pruning(model, removed, example_inputs=x)
    pruned = pruneplan.apply_plan(copy.deepcopy(model), plan)
    m = pruned.get_submodule("features.3.0.attn")
    assert type(m).__name__.startswith("PrunedShiftedWindowAttention")
    assert (m.num_heads, tuple(m.qkv.weight.shape), tuple(m.proj.weight.shape)) == (2, (96, 64), (64, 32))
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), expected, rtol=1e-4, atol=1e-4)
    # replay on saved safetensors weights, loaded into a fresh unpruned model
    from safetensors.torch import save_file

    src, dst = tmp_path / "m.safetensors", tmp_path / "p.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(src))
    pruneplan.apply_to_safetensors(plan, src, dst)
    fresh = pruneplan.load_pruned(_model(v2), plan, dst)
    with torch.no_grad():
        assert torch.equal(fresh(x), pruned(x))


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_swin_stage_widths_prune_through_patch_merging(v2: bool) -> None:
    model, x = _model(v2), _x()
    groups = {g.name: g for g in prunable_groups(model, x)}
    stage1 = groups["features.0.0"]  # the patch embedding starts the first stage's width
    assert (stage1.kind, stage1.size) == ("channels", 32)
    # _patch_merging_pad repeats channel c at c, 32 + c, 64 + c, 96 + c: the merging layer's
    # columns (and, in V1, its LayerNorm over 128 channels) lose all four
    merge = "features.2.norm.weight" if not v2 else "features.2.reduction.weight"
    axis = 0 if not v2 else 1
    s = next(s for s in stage1.slices if s.tensor == merge and s.axis == axis)
    assert Stream(s.offset, s.repeat, s.tiles, s.tile_stride, s.positions).unit(5) == [5, 37, 69, 101]
    plan = pruneplan.plan_pruning(model, {"features.0.0": [5, 9], "features.2.reduction": [0]},
                                  example_inputs=x)
    pruned = pruneplan.apply_plan(copy.deepcopy(model), plan)
    a = pruned.get_submodule("features.1.1.attn")
    assert (a.qkv.in_features, a.qkv.out_features, a.proj.out_features) == (30, 96, 30)
    assert pruned.get_submodule("features.2.reduction").weight.shape == (63, 120)
    with torch.no_grad():
        assert pruned(x).shape == (2, 5)


def test_swin_heads_are_scored_at_the_input_of_proj() -> None:
    from pruneplan.loading import score_groups

    model, x = _model(False), _x()
    groups = [g for g in prunable_groups(model, x) if g.name == "features.1.0.attn"]
    attn = model.get_submodule("features.1.0.attn")
    assert attn.shift_size == [0, 0]
    # weight norm of a head: the mean over its 16 columns of proj of their L1 norms
    w = attn.proj.weight.detach().double().abs().sum(0)
    assert score_groups(model, groups, "weight_norm")["features.1.0.attn"].tolist() == pytest.approx(
        [w[:16].mean().item(), w[16:].mean().item()], rel=1e-12)
    # activation magnitude: mean |head output| before proj over examples, windows, tokens and
    # the head's 16 positions, the window attention written out by hand (10x10 map padded to
    # 12x12, 9 windows of 4x4, no shift in this block)
    seen = []
    handle = attn.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    with torch.no_grad():
        model(x)
        handle.remove()
        t = torch.nn.functional.pad(seen[0].double(), (0, 0, 0, 2, 0, 2))  # (2, 12, 12, 32)
        t = t.view(2, 3, 4, 3, 4, 32).permute(0, 1, 3, 2, 4, 5).reshape(18, 16, 32)
        qkv = (t @ attn.qkv.weight.double().T + attn.qkv.bias.double()).reshape(18, 16, 3, 2, 16)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        a = (q * 16 ** -0.5) @ k.transpose(-1, -2) + attn.get_relative_position_bias().double()
        heads = torch.softmax(a, -1) @ v  # (18 windows, 2 heads, 16 tokens, 16)
        expected = heads.abs().mean(dim=(0, 2, 3))
    y = torch.zeros(2, dtype=torch.long)
    scores = score_groups(model, groups, "activation", data=[(x, y)])["features.1.0.attn"]
    assert scores.tolist() == pytest.approx(expected.tolist(), rel=1e-5)
    assert type(attn) is sw.ShiftedWindowAttention and "heads_output" not in attn._modules


def _ln(norm: torch.nn.LayerNorm, t: torch.Tensor, idx: list[int]) -> torch.Tensor:
    """LayerNorm over the channels ``idx`` of the original only, written out."""
    mu = t.mean(-1, keepdim=True)
    var = ((t - mu) ** 2).mean(-1, keepdim=True)
    return (t - mu) / torch.sqrt(var + norm.eps) * norm.weight[idx] + norm.bias[idx]


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_swin_stage_width_matches_a_forward_written_by_hand(v2: bool) -> None:
    # the first stage's 32 channels lose 5 and 9; the reference runs the first stage and the
    # merging layer with the kept weights only (LayerNorms over the kept channels, written out;
    # the window attention is torchvision's own, given the kept channels padded back with zeros,
    # which add nothing to q, k, v, its output cut to the kept rows), then the unchanged rest
    model, x = _model(v2), _x()
    removed = [5, 9]
    keep = [c for c in range(32) if c not in removed]
    f = model.features
    gelu = torch.nn.functional.gelu
    with torch.no_grad():
        conv = f[0][0]
        h = torch.nn.functional.conv2d(x, conv.weight[keep], conv.bias[keep], stride=4).permute(0, 2, 3, 1)
        h = _ln(f[0][2], h, keep)
        for blk in f[1]:
            a = blk.attn

            def attn(t: torch.Tensor, a=a) -> torch.Tensor:
                full = t.new_zeros(*t.shape[:-1], 32)
                full[..., keep] = t
                out = sw.shifted_window_attention(
                    full, a.qkv.weight, a.proj.weight, a.get_relative_position_bias(), a.window_size,
                    a.num_heads, shift_size=a.shift_size, qkv_bias=a.qkv.bias, proj_bias=a.proj.bias,
                    logit_scale=getattr(a, "logit_scale", None), training=False)
                return out[..., keep]

            def mlp(t: torch.Tensor, blk=blk) -> torch.Tensor:
                fc1, fc2 = blk.mlp[0], blk.mlp[3]
                return gelu(t @ fc1.weight[:, keep].T + fc1.bias) @ fc2.weight[keep].T + fc2.bias[keep]

            if v2:
                h = h + _ln(blk.norm1, attn(h), keep)
                h = h + _ln(blk.norm2, mlp(h), keep)
            else:
                h = h + attn(_ln(blk.norm1, h, keep))
                h = h + mlp(_ln(blk.norm2, h, keep))
        merge = f[2]
        idx = [c + 32 * i for i in range(4) for c in keep]  # channel c sits at c + 32 i
        t = sw._patch_merging_pad(h)
        if v2:
            t = merge.norm(t @ merge.reduction.weight[:, idx].T)
        else:
            t = _ln(merge.norm, t, idx) @ merge.reduction.weight[:, idx].T
        expected = model.head(model.flatten(model.avgpool(model.permute(model.norm(f[3](t))))))
    plan = pruneplan.plan_pruning(model, {"features.0.0": removed}, example_inputs=x)
    pruned = pruneplan.apply_plan(copy.deepcopy(model), plan)
    assert pruned.get_submodule("features.2.reduction").in_features == 120
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), expected, rtol=1e-4, atol=1e-4)
