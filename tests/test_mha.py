"""``nn.MultiheadAttention``: heads, the widths it reads, and the module apply swaps in.

A head reaches the rest of the network only through its ``head_dim`` columns of
``out_proj.weight`` (the attention output of head ``h`` is ``softmax(q_h k_h^T) v_h``, read by
columns ``h*D .. h*D+D-1``), so removing heads must equal zeroing those columns in the original.
A channel of the width an MHA reads and writes (no norm in between) enters through input
columns of ``in_proj_weight`` and leaves through rows of ``out_proj``: removing it equals
zeroing it where it is made and where it is read next. Across a LayerNorm that equivalence
does not hold; there the reference is a hand-written forward on the kept weights.
"""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pruneplan
from pruneplan.errors import PlanMismatchError
from pruneplan.graph.discover import prunable_groups
from pruneplan.modules import PrunedMultiheadAttention, prune_ready


def _rand(m: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return m


def _cols(heads: list[int], hd: int) -> list[int]:
    return [h * hd + j for h in heads for j in range(hd)]


# ---- the swapped-in module computes what torch's does ----------------------------------------


CASES = list(itertools.product([False, True], [False, True], [False, True], [None, "2d", "3d", "bool"]))


@pytest.mark.parametrize(("batch_first", "separate", "extras", "mask"), CASES)
def test_pruned_multihead_attention_unpruned_equals_torch(batch_first: bool, separate: bool,
                                                          extras: bool, mask: str | None) -> None:
    # the same object made a PrunedMultiheadAttention, nothing removed: torch's forward is the
    # reference, for every option torch's forward takes (weights averaged and per head, key
    # padding masks, unbatched input)
    torch.manual_seed(0)
    kw = {"kdim": 6, "vdim": 5} if separate else {}
    m = _rand(nn.MultiheadAttention(8, 2, batch_first=batch_first, add_bias_kv=extras,
                                    add_zero_attn=extras, **kw)).eval()
    p = copy.deepcopy(m)
    prune_ready(p)
    assert type(p) is PrunedMultiheadAttention and p._qkv_same_embed_dim is False
    (L, S, N), (kd, vd) = (3, 4, 2), (6, 5) if separate else (8, 8)
    for batched in (True, False):
        def shape(n: int, d: int, batched: bool = batched) -> tuple[int, ...]:
            return ((N, n, d) if batch_first else (n, N, d)) if batched else (n, d)

        q, k, v = torch.randn(shape(L, 8)), torch.randn(shape(S, kd)), torch.randn(shape(S, vd))
        am = {None: None, "2d": torch.randn(L, S), "3d": torch.randn((N if batched else 1) * 2, L, S),
              "bool": torch.tensor([[False, True, False, True]] * L)}[mask]
        kpm = torch.tensor([[False, False, False, True]] * N)
        kpm = kpm if batched else kpm[0]
        if mask in ("2d", "3d"):
            kpm = kpm.float() * -1e4
        for need, avg, pad in itertools.product([True, False], [True, False], [None, kpm]):
            with torch.no_grad():
                a = m(q, k, v, key_padding_mask=pad, need_weights=need, attn_mask=am,
                      average_attn_weights=avg)
                b = p(q, k, v, key_padding_mask=pad, need_weights=need, attn_mask=am,
                      average_attn_weights=avg)
            torch.testing.assert_close(b[0], a[0], rtol=1e-5, atol=1e-5)
            if need:
                torch.testing.assert_close(b[1], a[1], rtol=1e-5, atol=1e-5)
            else:
                assert a[1] is None and b[1] is None


@pytest.mark.parametrize("batch_first", [False, True])
def test_pruned_multihead_attention_self_attention_equals_torch(batch_first: bool) -> None:
    # query, key and value one tensor: the packed projection runs as one product
    torch.manual_seed(0)
    m = _rand(nn.MultiheadAttention(8, 2, batch_first=batch_first, dropout=0.0)).eval()
    p = copy.deepcopy(m)
    prune_ready(p)
    t = torch.randn(2, 5, 8) if batch_first else torch.randn(5, 2, 8)  # 2 sequences of 5
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    for kw in ({}, {"attn_mask": causal}, {"attn_mask": causal, "is_causal": True},
               {"key_padding_mask": pad}, {"need_weights": False, "key_padding_mask": pad},
               {"need_weights": False, "attn_mask": causal, "is_causal": True}):
        with torch.no_grad():
            a, b = m(t, t, t, **kw), p(t, t, t, **kw)
        torch.testing.assert_close(b[0], a[0], rtol=1e-5, atol=1e-5)
        if a[1] is not None:
            torch.testing.assert_close(b[1], a[1], rtol=1e-5, atol=1e-5)


# ---- heads --------------------------------------------------------------------------------


class Attn(nn.Module):
    """proj -> MHA (self-attention, or cross-attention on a second input) -> fc -> out."""

    def __init__(self, cross: bool = False, per_head: bool = False, **kw) -> None:
        super().__init__()
        self.cross, self.per_head = cross, per_head
        self.proj = nn.Linear(4, 8)
        self.kv = nn.Linear(4, 6) if cross else None
        self.mha = nn.MultiheadAttention(8, 2, **({"kdim": 6, "vdim": 6} if cross else {}), **kw)
        self.fc = nn.Linear(8, 16)
        self.out = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        kv = self.kv(x) if self.cross else h
        if self.per_head:  # per-head weights returned and not used
            h, _ = self.mha(h, kv, kv, average_attn_weights=False)
        else:
            h = self.mha(h, kv, kv, need_weights=False)[0]
        return self.out(F.relu(self.fc(h)))


@pytest.mark.parametrize("kw", [{"batch_first": True}, {"batch_first": False},
                                {"batch_first": True, "add_bias_kv": True, "add_zero_attn": True},
                                {"batch_first": True, "bias": False},
                                {"batch_first": True, "cross": True},
                                {"batch_first": True, "per_head": True}],
                         ids=["batch_first", "seq_first", "bias_kv", "no_bias", "kdim", "per_head"])
def test_removing_heads_equals_zeroing_their_out_proj_columns(kw: dict, tmp_path) -> None:
    torch.manual_seed(0)
    model = _rand(Attn(**kw)).eval()
    x = torch.randn(3, 5, 4)
    groups = {g.name: g for g in prunable_groups(model, x)}
    heads = groups["mha"]
    assert (heads.kind, heads.size, heads.roots) == ("heads", 2, ("mha",))
    # head 1 of 2 with head_dim 4: rows 4..7 of each 8-row third (hand derivation)
    in_proj = [4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23]
    pos = {s.tensor: [p for u in [1] for p in _unit(s, u)] for s in heads.slices}
    if kw.get("cross"):
        assert pos["mha.q_proj_weight"] == pos["mha.k_proj_weight"] == pos["mha.v_proj_weight"] == [4, 5, 6, 7]
    else:
        assert pos["mha.in_proj_weight"] == in_proj
    if kw.get("bias", True):
        assert pos["mha.in_proj_bias"] == in_proj
    assert pos["mha.out_proj.weight"] == [4, 5, 6, 7]
    if kw.get("add_bias_kv"):
        assert pos["mha.bias_k"] == pos["mha.bias_v"] == [4, 5, 6, 7]
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference.mha.out_proj.weight[:, 4:8] = 0
        expected = reference(x)
    plan = pruneplan.plan_pruning(model, {"mha": [1]}, example_inputs=x)
    pruned = pruneplan.apply_plan(copy.deepcopy(model), plan)
    assert type(pruned.mha) is PrunedMultiheadAttention
    assert (pruned.mha.num_heads, pruned.mha.head_dim, pruned.mha.embed_dim) == (1, 4, 8)
    assert pruned.mha.out_proj.weight.shape == (8, 4) and pruned.mha.out_proj.in_features == 4
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), expected, rtol=1e-5, atol=1e-5)
    # replay on saved safetensors weights, loaded into a fresh copy of the unpruned model
    src, dst = tmp_path / "m.safetensors", tmp_path / "p.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(src))
    pruneplan.apply_to_safetensors(plan, src, dst)
    fresh = pruneplan.load_pruned(copy.deepcopy(model), plan, dst)
    with torch.no_grad():
        assert torch.equal(fresh(x), pruned(x))


def _unit(s, u: int) -> list[int]:
    from pruneplan.graph._streams import Stream

    return Stream(s.offset, s.repeat, s.tiles, s.tile_stride, s.positions).unit(u)


def test_per_head_weights_carry_the_heads_and_averaged_ones_in_use_keep_them() -> None:
    class Weights(nn.Module):
        def __init__(self, average: bool) -> None:
            super().__init__()
            self.average = average
            self.proj = nn.Linear(4, 8)
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            h = self.proj(x)
            out, w = self.mha(h, h, h, average_attn_weights=self.average)
            return out.sum(-1), w

    x = torch.randn(2, 5, 4)
    left = {lo.name: lo.reason for lo in prunable_groups(Weights(True).eval(), x).left_out}
    assert "returns attention weights averaged over its heads, which are used" in left["mha"]
    # per head: the weights (N, heads, L, S) carry the heads on axis 1 to the model output
    left = {lo.name: lo.reason for lo in prunable_groups(Weights(False).eval(), x).left_out}
    assert left["mha"] == "its units reach the model output (include_output=True allows pruning it)"


def test_subclass_and_masks_made_of_channels_are_left_out() -> None:
    class MyMHA(nn.MultiheadAttention):
        pass

    class Net(nn.Module):
        def __init__(self, cls: type = nn.MultiheadAttention, mask: bool = False) -> None:
            super().__init__()
            self.mask = mask
            self.proj = nn.Linear(4, 8)
            self.gate = nn.Linear(4, 5)
            self.mha = cls(8, 2, batch_first=True)
            self.fc = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.proj(x)
            # a float mask (L, S) made by a layer: its units would be sequence positions
            m = self.gate(x[0]) if self.mask else None
            return self.fc(self.mha(h, h, h, need_weights=False, attn_mask=m)[0])

    x = torch.randn(2, 5, 4)
    # a subclass is traced through (not a torch layer): its functional call blocks
    left = {lo.name: lo.reason for lo in prunable_groups(Net(MyMHA).eval(), x).left_out}
    assert left["proj"] == "they reach operation 'multi_head_attention_forward' in module 'mha'"
    groups = prunable_groups(Net(mask=True).eval(), x)
    assert [g.name for g in groups] == ["proj", "mha"]  # fc: the model output
    left = {lo.name: lo.reason for lo in groups.left_out}
    assert left["gate"] == "they reach a mask of module 'mha' (MultiheadAttention)"
    # a plan made on the plain class, applied to the subclass (same tensors): refused before
    # any change
    plan = pruneplan.plan_pruning(Net().eval(), {"mha": [0]}, example_inputs=x)
    model = Net(MyMHA).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PlanMismatchError, match=r"'mha' \(MyMHA\) subclasses nn.MultiheadAttention"):
        pruneplan.apply_plan(model, plan)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert type(model.mha) is MyMHA


# ---- the widths it reads ------------------------------------------------------------------


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross_kdim"])
def test_width_read_and_written_equals_zeroing_it(cross: bool) -> None:
    torch.manual_seed(0)
    model = _rand(Attn(cross=cross, batch_first=True)).eval()
    x = torch.randn(3, 5, 4)
    groups = {g.name: g for g in prunable_groups(model, x)}
    width = groups["proj"]
    tensors = {(s.tensor, s.axis) for s in width.slices}
    want = {("proj.weight", 0), ("proj.bias", 0), ("mha.out_proj.weight", 0),
            ("mha.out_proj.bias", 0), ("fc.weight", 1)}
    want |= {("mha.q_proj_weight", 1)} if cross else {("mha.in_proj_weight", 1)}
    assert tensors == want
    reference = copy.deepcopy(model)
    removed = [0, 5]
    with torch.no_grad():
        reference.proj.weight[removed] = 0
        reference.proj.bias[removed] = 0
        reference.fc.weight[:, removed] = 0
    spec = {"proj": removed}
    if cross:  # the keys and values come from kv: their width is a group of its own
        assert {(s.tensor, s.axis) for s in groups["kv"].slices} == {
            ("kv.weight", 0), ("kv.bias", 0), ("mha.k_proj_weight", 1), ("mha.v_proj_weight", 1)}
        spec["kv"] = [2]
        with torch.no_grad():
            reference.kv.weight[2] = 0
            reference.kv.bias[2] = 0
    with torch.no_grad():
        expected = reference(x)
    pruned = pruneplan.apply_plan(copy.deepcopy(model),
                                  pruneplan.plan_pruning(model, spec, example_inputs=x))
    m = pruned.mha
    assert (m.embed_dim, m.kdim, m.vdim, m.num_heads, m.head_dim) == ((6, 5, 5, 2, 4) if cross else (6, 6, 6, 2, 4))
    assert m.out_proj.weight.shape == (6, 8)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), expected, rtol=1e-5, atol=1e-5)


# ---- nn.TransformerEncoder ------------------------------------------------------------------


def _encoder(norm_first: bool) -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True, norm_first=norm_first)
    return nn.Sequential(nn.Linear(6, 16), nn.TransformerEncoder(layer, 2, enable_nested_tensor=True),
                         nn.Linear(16, 3)).eval()


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_encoder_heads_and_mlp_equal_zeroing(norm_first: bool, tmp_path) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that norm_first disables nested tensors
        model = _rand(_encoder(norm_first))
    x = torch.randn(2, 7, 6)
    groups = {g.name: (g.kind, g.size) for g in prunable_groups(model, x)}
    assert groups == {"0": ("channels", 16),
                      "1.layers.0.self_attn": ("heads", 4), "1.layers.0.linear1": ("channels", 32),
                      "1.layers.1.self_attn": ("heads", 4), "1.layers.1.linear1": ("channels", 32)}
    removed = {"1.layers.0.self_attn": [0, 2], "1.layers.1.self_attn": [3],
               "1.layers.0.linear1": [1, 30], "1.layers.1.linear1": [0, 7, 8]}
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for i in (0, 1):
            layer = reference[1].layers[i]
            layer.self_attn.out_proj.weight[:, _cols(removed[f"1.layers.{i}.self_attn"], 4)] = 0
            layer.linear2.weight[:, removed[f"1.layers.{i}.linear1"]] = 0
    plan = pruneplan.plan_pruning(model, removed, example_inputs=x)
    pruned = pruneplan.apply_plan(copy.deepcopy(model), plan)
    attn = [pruned[1].layers[i].self_attn for i in (0, 1)]
    assert [(a.num_heads, a.embed_dim, tuple(a.in_proj_weight.shape)) for a in attn] == [
        (2, 16, (24, 16)), (3, 16, (36, 16))]
    assert pruned[1].use_nested_tensor is False
    # a padding mask: in eval mode without grad the original takes torch's nested-tensor fast
    # path (padded positions come out 0 there), the pruned model its ordinary path; compare
    # the positions that are not padding
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 5:] = True
    for kwargs in ({}, {"src_key_padding_mask": pad}):
        with torch.no_grad():
            want = reference[2](reference[1](reference[0](x), **kwargs))
            got = pruned[2](pruned[1](pruned[0](x), **kwargs))
        keep = ~pad if kwargs else torch.ones(2, 7, dtype=torch.bool)
        torch.testing.assert_close(got[keep], want[keep], rtol=1e-5, atol=1e-5)
    pruned.train()
    assert pruned(x).shape == (2, 7, 3)  # training mode runs
    pruned.eval()
    # save / replay on safetensors, loaded into a fresh unpruned model: the same output
    from safetensors.torch import save_file

    src, dst = tmp_path / "m.safetensors", tmp_path / "p.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(src))
    pruneplan.apply_to_safetensors(plan, src, dst)
    fresh = pruneplan.load_pruned(copy.deepcopy(model), plan, dst)
    with torch.no_grad():
        assert torch.equal(fresh(x), pruned(x))
    # a pruned model is discovered again: its heads can be pruned in a second step
    again = {g.name: (g.kind, g.size) for g in prunable_groups(pruned, x)}
    assert again["1.layers.0.self_attn"] == ("heads", 2)
    plan2 = pruneplan.plan_pruning(pruned, {"1.layers.0.self_attn": [0]}, example_inputs=x)
    twice = pruneplan.apply_plan(copy.deepcopy(pruned), plan2)
    with torch.no_grad():
        ref2 = copy.deepcopy(pruned)
        ref2[1].layers[0].self_attn.out_proj.weight[:, 0:4] = 0
        torch.testing.assert_close(twice(x), ref2(x), rtol=1e-5, atol=1e-5)


def _ln(norm: nn.LayerNorm, t: torch.Tensor, keep: list[int]) -> torch.Tensor:
    """LayerNorm over the kept channels only, written out."""
    mu = t.mean(-1, keepdim=True)
    var = ((t - mu) ** 2).mean(-1, keepdim=True)
    return (t - mu) / torch.sqrt(var + norm.eps) * norm.weight[keep] + norm.bias[keep]


def _sa(a: nn.MultiheadAttention, t: torch.Tensor, keep: list[int]) -> torch.Tensor:
    """Self-attention (batch first) with only the hidden channels ``keep``, written out: the
    inner width stays ``embed_dim`` of the original."""
    heads, hd, e = a.num_heads, a.head_dim, a.embed_dim
    n, length, _ = t.shape
    qkv = t @ a.in_proj_weight[:, keep].T + a.in_proj_bias
    q, k, v = (qkv[..., i * e:(i + 1) * e].reshape(n, length, heads, hd).transpose(1, 2)
               for i in range(3))
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), -1) @ v
    o = att.transpose(1, 2).reshape(n, length, e)
    return o @ a.out_proj.weight[keep].T + a.out_proj.bias[keep]


def _mlp(fc1: nn.Linear, fc2: nn.Linear, t: torch.Tensor, keep: list[int], act) -> torch.Tensor:
    return act(t @ fc1.weight[:, keep].T + fc1.bias) @ fc2.weight[keep].T + fc2.bias[keep]


def _layer_by_hand(layer: nn.TransformerEncoderLayer, x: torch.Tensor, keep: list[int]) -> torch.Tensor:
    """A TransformerEncoderLayer (batch first, ReLU, no dropout) written out with only the
    hidden channels ``keep`` of its weights: the independent reference for the hidden size."""
    def ff(t: torch.Tensor) -> torch.Tensor:
        return _mlp(layer.linear1, layer.linear2, t, keep, torch.relu)

    if layer.norm_first:
        x = x + _sa(layer.self_attn, _ln(layer.norm1, x, keep), keep)
        return x + ff(_ln(layer.norm2, x, keep))
    x = _ln(layer.norm1, x + _sa(layer.self_attn, x, keep), keep)
    return _ln(layer.norm2, x + ff(x), keep)


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_encoder_hidden_size_matches_a_forward_written_by_hand(norm_first: bool) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _rand(_encoder(norm_first))
    x = torch.randn(2, 7, 6)
    removed = [1, 8, 15]
    keep = [i for i in range(16) if i not in removed]
    with torch.no_grad():
        h = model[0](x)[..., keep]
        for layer in model[1].layers:
            h = _layer_by_hand(layer, h, keep)
        expected = h @ model[2].weight[:, keep].T + model[2].bias
    plan = pruneplan.plan_pruning(model, {"0": removed}, example_inputs=x)
    pruned = pruneplan.apply_plan(copy.deepcopy(model), plan)
    a = pruned[1].layers[1].self_attn
    assert (a.embed_dim, a.num_heads, a.head_dim, tuple(a.in_proj_weight.shape)) == (13, 4, 4, (48, 13))
    assert tuple(a.out_proj.weight.shape) == (13, 16)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), expected, rtol=1e-5, atol=1e-5)


# ---- torchvision ViT ------------------------------------------------------------------------


def test_torchvision_vit_heads_mlp_and_width() -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = _rand(torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128,
        num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32)
    groups = {g.name: (g.kind, g.size) for g in prunable_groups(model, x)}
    enc = "encoder.layers.encoder_layer_"
    assert groups == {"conv_proj": ("channels", 64),
                      f"{enc}0.self_attention": ("heads", 4), f"{enc}0.mlp.0": ("channels", 128),
                      f"{enc}1.self_attention": ("heads", 4), f"{enc}1.mlp.0": ("channels", 128)}
    removed = {f"{enc}0.self_attention": [1], f"{enc}1.self_attention": [0, 3], f"{enc}1.mlp.0": [5, 77]}
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for i in (0, 1):
            blk = reference.encoder.layers[i]
            blk.self_attention.out_proj.weight[:, _cols(removed[f"{enc}{i}.self_attention"], 16)] = 0
        reference.encoder.layers[1].mlp[3].weight[:, [5, 77]] = 0
        expected = reference(x)
    pruned = pruneplan.apply_plan(copy.deepcopy(model),
                                  pruneplan.plan_pruning(model, removed, example_inputs=x))
    assert [blk.self_attention.num_heads for blk in pruned.encoder.layers] == [3, 2]
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), expected, rtol=1e-5, atol=1e-5)
    # the width: conv_proj's channels run through the class token, the position embedding,
    # every LayerNorm, MHA and MLP, and the view written with the model's own ``hidden_dim``
    # (``x.reshape(n, self.hidden_dim, n_h * n_w)``), which the plan edits
    plan = pruneplan.plan_pruning(model, {"conv_proj": [3, 10]}, example_inputs=x)
    assert ("", "hidden_dim") in plan.edits()
    narrow = pruneplan.apply_plan(copy.deepcopy(model), plan)
    assert (narrow.hidden_dim, narrow.class_token.shape, narrow.encoder.pos_embedding.shape) == (
        62, (1, 1, 62), (1, 17, 62))
    assert narrow.encoder.layers[0].self_attention.embed_dim == 62
    with torch.no_grad():
        assert narrow(x).shape == (2, 10)


# ---- scoring heads ----------------------------------------------------------------------------


def test_metrics_score_heads_at_the_input_of_out_proj() -> None:
    from pruneplan.loading import score_groups

    torch.manual_seed(0)
    model = _rand(Attn(batch_first=True)).eval()
    x = torch.randn(3, 5, 4)
    groups = [g for g in prunable_groups(model, x) if g.name == "mha"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # weight norm of a head: the mean over its 4 columns of out_proj of their L1 norms
    w = model.mha.out_proj.weight.detach().double().abs().sum(0)
    scores = score_groups(model, groups, "weight_norm")["mha"]
    np_expected = [w[0:4].mean().item(), w[4:8].mean().item()]
    assert scores.tolist() == pytest.approx(np_expected, rel=1e-12)
    # activation magnitude (Minitron): mean |output| of the head before out_proj, over the
    # examples, tokens and its 4 positions; the head outputs written out by hand
    with torch.no_grad():
        h = model.proj(x).double()
        wq, wk, wv = model.mha.in_proj_weight.double().split(8)
        bq, bk, bv = model.mha.in_proj_bias.double().split(8)
        q, k, v = ((h @ wt.T + bt).reshape(3, 5, 2, 4).transpose(1, 2)
                   for wt, bt in ((wq, bq), (wk, bk), (wv, bv)))
        heads = torch.softmax(q @ k.transpose(-1, -2) / 2.0, -1) @ v  # (N, heads, L, 4)
        expected = heads.abs().mean(dim=(0, 2, 3))
    scores = score_groups(model, groups, "activation", data=[(x, torch.zeros(3, dtype=torch.long))])["mha"]
    assert scores.tolist() == pytest.approx(expected.tolist(), rel=1e-5)
    # the model is as it was: its class, its modules, its weights
    assert type(model.mha) is nn.MultiheadAttention and not hasattr(model.mha, "heads_output")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_every_metric_plans_a_transformer_encoder() -> None:
    from pruneplan.loading import plan_from_metric

    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    model = nn.Sequential(nn.Linear(6, 16), nn.TransformerEncoder(layer, 2, enable_nested_tensor=False),
                          nn.Flatten(), nn.Linear(16 * 7, 3)).eval()
    x, y = torch.randn(4, 7, 6), torch.randint(0, 3, (4,))
    for metric in ("weight_norm", "lp_norm", "fpgm", "lamp", "random", "taylor", "apoz",
                   "activation", "sensitivity"):
        data = {} if metric in ("weight_norm", "lp_norm", "fpgm", "lamp", "random") else {"data": [(x, y)]}
        plan = plan_from_metric(model, x, metric, ratio=0.5, **data)
        removed = {g.name: len(g.removed) for g in plan.groups}
        assert removed["1.layers.0.self_attn"] == removed["1.layers.1.self_attn"] == 2, metric
        assert removed["1.layers.0.linear1"] == 16, metric


def test_transformer_encoder_decoder_heads_cross_attention_and_width() -> None:
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.src, self.tgt = nn.Linear(5, 16), nn.Linear(5, 16)
            self.t = nn.Transformer(16, 4, 1, 1, 32, dropout=0.0, batch_first=True)
            self.head = nn.Linear(16, 3)

        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return self.head(self.t(self.src(a), self.tgt(b)))

    model = _rand(Net()).eval()
    a, b = torch.randn(2, 6, 5), torch.randn(2, 4, 5)
    groups = {g.name: (g.kind, g.size, len(g.roots)) for g in prunable_groups(model, (a, b))}
    enc, dec = "t.encoder.layers.0", "t.decoder.layers.0"
    # the decoder's cross-attention reads the encoder's output (key, value) and the decoder's
    # stream (query) through one packed in_proj: both widths are one group with src and tgt
    assert groups == {"src": ("channels", 16, 4), f"{enc}.self_attn": ("heads", 4, 1),
                      f"{enc}.linear1": ("channels", 32, 1), f"{dec}.self_attn": ("heads", 4, 1),
                      f"{dec}.multihead_attn": ("heads", 4, 1), f"{dec}.linear1": ("channels", 32, 1)}
    removed = {f"{enc}.self_attn": [1], f"{dec}.self_attn": [0, 3], f"{dec}.multihead_attn": [2],
               f"{dec}.linear1": [4, 5]}
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name, heads in removed.items():
            if name.endswith("linear1"):
                reference.get_submodule(name.replace("linear1", "linear2")).weight[:, heads] = 0
            else:
                reference.get_submodule(name).out_proj.weight[:, _cols(heads, 4)] = 0
        expected = reference(a, b)
    pruned = pruneplan.apply_plan(copy.deepcopy(model),
                                  pruneplan.plan_pruning(model, removed, example_inputs=(a, b)))
    assert pruned.get_submodule(f"{dec}.multihead_attn").num_heads == 3
    with torch.no_grad():
        torch.testing.assert_close(pruned(a, b), expected, rtol=1e-5, atol=1e-5)
    # the width: nn.Transformer's d_model follows it (its forward checks the inputs against it)
    narrow = pruneplan.apply_plan(copy.deepcopy(model), pruneplan.plan_pruning(
        model, {"src": [0, 7]}, example_inputs=(a, b)))
    assert narrow.t.d_model == 14 and narrow.get_submodule(f"{dec}.multihead_attn").kdim == 14
    with torch.no_grad():
        assert narrow(a, b).shape == (2, 4, 3)


def test_a_plan_that_leaves_the_heads_inconsistent_is_refused_before_any_change() -> None:
    import json

    torch.manual_seed(0)
    model = _rand(Attn(batch_first=True)).eval()
    x = torch.randn(3, 5, 4)
    data = json.loads(pruneplan.plan_pruning(model, {"mha": [1]}, example_inputs=x).to_json())
    for g in data["groups"]:  # the num_heads edit deleted by hand: the rows still go
        g["edits"] = [e for e in g["edits"] if e["attribute"] != "num_heads"]
    plan = pruneplan.PrunePlan.from_dict(data)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PlanMismatchError, match=r"module 'mha' \(MultiheadAttention\) inconsistent: "
                       r"in_proj_bias would have shape \[12\] but its attributes say \[24\]"):
        pruneplan.apply_plan(model, plan)
    assert type(model.mha) is nn.MultiheadAttention and model.mha.num_heads == 2
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_torchvision_vit_width_matches_a_forward_written_by_hand() -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = _rand(torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128,
        num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32)
    removed = [0, 9, 33, 63]
    keep = [i for i in range(64) if i not in removed]
    gelu = torch.nn.functional.gelu
    with torch.no_grad():  # conv_proj's kept channels, class token, position embedding, blocks
        h = torch.nn.functional.conv2d(x, model.conv_proj.weight[keep], model.conv_proj.bias[keep],
                                       stride=8).flatten(2).transpose(1, 2)
        h = torch.cat([model.class_token[..., keep].expand(2, -1, -1), h], 1)
        h = h + model.encoder.pos_embedding[..., keep]
        for blk in model.encoder.layers:
            h = h + _sa(blk.self_attention, _ln(blk.ln_1, h, keep), keep)
            h = h + _mlp(blk.mlp[0], blk.mlp[3], _ln(blk.ln_2, h, keep), keep, gelu)
        h = _ln(model.encoder.ln, h, keep)[:, 0]
        expected = h @ model.heads.head.weight[:, keep].T + model.heads.head.bias
    plan = pruneplan.plan_pruning(model, {"conv_proj": removed}, example_inputs=x)
    pruned = pruneplan.apply_plan(copy.deepcopy(model), plan)
    assert pruned.hidden_dim == 60 and pruned.encoder.layers[1].self_attention.embed_dim == 60
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), expected, rtol=1e-5, atol=1e-5)


def test_describe_groups_shows_the_heads() -> None:
    from pruneplan.graph.discover import describe_groups

    model = Attn(batch_first=True).eval()
    lines = describe_groups(prunable_groups(model, torch.randn(3, 5, 4))).splitlines()
    # columns: group, kind, size, tensors, roots (mha: in_proj_weight, in_proj_bias, out_proj.weight)
    assert lines[0].split() == ["group", "kind", "size", "tensors", "roots"]
    assert lines[2].split() == ["mha", "heads", "2", "3", "mha"]
    assert lines[1].split()[:3] == ["proj", "channels", "8"]
