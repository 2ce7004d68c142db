"""Attention written the ways timm writes it, as minimal torch modules (not real models).

Each construct is a small block stack; the expected groups are derived by hand and the pruned
model is compared with an independent reference: the same class built by hand at the pruned
sizes, its weights copied from the kept rows and columns of the original (a LayerNorm spans the
hidden channels, so zeroing is no reference there).

Hidden width sizing the attention output. timm's attention modules often read the block's
width off their input (``B, N, C = x.shape``) and use it to size the attention output
(``reshape(B, N, C)``) or the head width (``C // self.num_heads``). Neither heads nor the hidden
width can then change alone; the hidden channels are tied position by position to the
attention channels (dim = heads * head_dim here): one unit is head ``u`` of every block with
hidden channels ``u * D .. u * D + D - 1``, so ``C`` and ``num_heads`` shrink together.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pruneplan
from pruneplan.graph.discover import prunable_groups

DIM, HEADS = 32, 4
D = DIM // HEADS  # head_dim: 8


class HiddenSizedAttention(nn.Module):
    """Fused qkv; ``C`` read off the input sizes the heads (``C // num_heads``, ``cait``) or
    the output (``reshape(B, N, C)``: ``vision_transformer_relpos``, ``beit``, ``davit``)."""

    def __init__(self, dim: int, heads: int, style: str) -> None:
        super().__init__()
        self.num_heads = heads
        self.style = style
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        hd = C // self.num_heads if self.style == "divided" else -1
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Stack(nn.Module):
    """An input projection, ``depth`` pre-norm attention blocks, an output head."""

    def __init__(self, block: type[nn.Module], dim: int = DIM, heads: int = HEADS, depth: int = 2,
                 layer_scale: bool = False, **kw) -> None:
        super().__init__()
        self.embed = nn.Linear(6, dim)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(depth))
        self.attns = nn.ModuleList(block(dim, heads, **kw) for _ in range(depth))
        # per-channel layer scale on the residual branch (timm's gamma_1 / ls1)
        self.gammas = nn.ParameterList(nn.Parameter(torch.rand(dim) + 0.5) for _ in range(depth)) \
            if layer_scale else None
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for i, (norm, attn) in enumerate(zip(self.norms, self.attns, strict=True)):
            y = attn(norm(x))
            x = x + (self.gammas[i] * y if self.gammas is not None else y)
        return self.head(x)


def _tokens() -> torch.Tensor:
    return torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(1))


def _keep(n: int, gone: list[int], per: int) -> torch.Tensor:
    """Indices kept out of ``n`` positions when units ``gone`` of ``per`` positions each go."""
    out = set(range(n)) - {u * per + i for u in gone for i in range(per)}
    return torch.tensor(sorted(out))


def _reference_hidden_sized(model: Stack, gone: list[int], block: type[nn.Module],
                            **kw) -> Stack:
    """The stack built by hand with ``HEADS - len(gone)`` heads and ``D`` fewer hidden
    channels per head gone, weights copied from the original's kept rows and columns (and the
    kept heads' entries of a per-head ``temperature``)."""
    h = HEADS - len(gone)
    ref = Stack(block, dim=h * D, heads=h, **kw).eval()
    c = _keep(DIM, gone, D)  # hidden channel u*D+i goes with head u (attention channel u*D+i)
    heads = _keep(HEADS, gone, 1)
    qkv_rows = torch.cat([c + part * DIM for part in range(3)])
    with torch.no_grad():
        ref.embed.weight.copy_(model.embed.weight[c])
        ref.embed.bias.copy_(model.embed.bias[c])
        ref.head.weight.copy_(model.head.weight[:, c])
        ref.head.bias.copy_(model.head.bias)
        for i in range(2):
            ref.norms[i].weight.copy_(model.norms[i].weight[c])
            ref.norms[i].bias.copy_(model.norms[i].bias[c])
            a, b = ref.attns[i], model.attns[i]
            a.qkv.weight.copy_(b.qkv.weight[qkv_rows][:, c])
            a.qkv.bias.copy_(b.qkv.bias[qkv_rows])
            a.proj.weight.copy_(b.proj.weight[c][:, c])
            a.proj.bias.copy_(b.proj.bias[c])
            if hasattr(b, "temperature"):
                a.temperature.copy_(b.temperature[heads])
    return ref


@pytest.mark.parametrize("style", ["divided", "inferred"])
def test_hidden_width_sizing_the_attention_ties_heads_to_hidden_channels(style: str) -> None:
    torch.manual_seed(0)
    model = Stack(HiddenSizedAttention, style=style).eval()
    x = _tokens()
    groups = prunable_groups(model, x)
    # one group: the residual stream and every block's heads, one unit per head
    assert [(g.kind, g.size) for g in groups] == [("heads", HEADS)]
    g = groups[0]
    assert g.roots == ("embed", "attns.0.qkv", "attns.0.proj", "attns.1.qkv", "attns.1.proj")
    edits = {(e.module, e.attribute): (e.before, e.per_unit) for e in g.edits}
    assert edits[("attns.0", "num_heads")] == (HEADS, 1)
    assert edits[("attns.1", "num_heads")] == (HEADS, 1)
    assert edits[("embed", "out_features")] == (DIM, D)
    assert edits[("attns.1.qkv", "out_features")] == (3 * DIM, 3 * D)
    assert [lo.name for lo in groups.left_out] == ["head"]

    gone = [1]
    reference = _reference_hidden_sized(model, gone, HiddenSizedAttention, style=style)
    plan = pruneplan.plan_pruning(model, {"embed": gone}, example_inputs=x)
    pruneplan.apply_plan(model, plan)
    assert model.attns[0].num_heads == 3
    assert model.attns[1].qkv.weight.shape == (3 * 24, 24)
    assert model.embed.weight.shape == (24, 6)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)


class CrossCovariance(nn.Module):
    """XCiT's cross-covariance attention: inside each head the attention runs over the head's
    channels (q and k L2-normalised over the tokens, scaled by a per-head ``temperature``),
    so q, k, v are ``(B, heads, head_dim, N)``; ``C // num_heads`` sizes the heads."""

    def __init__(self, dim: int, heads: int, fused: bool = True) -> None:
        super().__init__()
        self.num_heads = heads
        self.fused = fused
        self.temperature = nn.Parameter(torch.rand(heads, 1, 1) + 0.5)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 4, 1)
        q, k, v = qkv.unbind(0)
        if self.fused:
            q = F.normalize(q, dim=-1) * self.temperature
            k = F.normalize(k, dim=-1)
            x = F.scaled_dot_product_attention(q, k, v, scale=1.0)
        else:
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
            x = ((q @ k.transpose(-2, -1)) * self.temperature).softmax(dim=-1) @ v
        return self.proj(x.permute(0, 3, 1, 2).reshape(B, N, C))


@pytest.mark.parametrize("fused", [True, False])
def test_cross_covariance_attention_prunes_heads_with_their_temperature(fused: bool) -> None:
    torch.manual_seed(0)
    model = Stack(CrossCovariance, fused=fused).eval()
    x = _tokens()
    groups = prunable_groups(model, x)
    assert [(g.kind, g.size) for g in groups] == [("heads", HEADS)]
    slices = {(s.tensor, s.axis): (s.offset, s.repeat) for s in groups[0].slices}
    assert slices[("attns.0.temperature", 0)] == (0, 1)  # one entry per head
    assert slices[("attns.1.temperature", 0)] == (0, 1)
    gone = [0, 3]
    reference = _reference_hidden_sized(model, gone, CrossCovariance, fused=fused)
    plan = pruneplan.plan_pruning(model, {"embed": gone}, example_inputs=x)
    pruneplan.apply_plan(model, plan)
    assert model.attns[1].temperature.shape == (2, 1, 1)
    assert model.attns[1].num_heads == 2
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)


class DividedOnly(nn.Module):
    """``C // num_heads`` sizes the heads; the output is flattened with ``-1`` (no ``C``)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.num_heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(x.transpose(1, 2).reshape(B, N, -1))


def test_width_divided_by_the_head_count_ties_the_heads_of_that_view() -> None:
    # C // num_heads sizes head_dim next to the heads (no reshape(B, N, C) ties them): the
    # hidden channels are tied to the heads' channels there, so C and num_heads shrink together
    torch.manual_seed(0)
    model = Stack(DividedOnly).eval()
    x = _tokens()
    groups = prunable_groups(model, x)
    assert [(g.kind, g.size, g.roots) for g in groups] == [
        ("heads", HEADS, ("embed", "attns.0.qkv", "attns.0.proj", "attns.1.qkv", "attns.1.proj"))]
    gone = [2]
    reference = _reference_hidden_sized(model, gone, DividedOnly)
    plan = pruneplan.plan_pruning(model, {"embed": gone}, example_inputs=x)
    pruneplan.apply_plan(model, plan)
    assert model.attns[1].num_heads == 3
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)


class HalfWidthScratch(nn.Module):
    """Plain attention (sized by attributes) that also builds a tensor of ``C // 2`` columns
    from the width of its input: nothing says how that number follows pruned channels."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.attn_dim = heads, dim // heads, dim
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        scratch = x.new_ones(B, N, C // 2).sum(-1, keepdim=True)
        return self.proj(x.transpose(1, 2).reshape(B, N, self.attn_dim)) * scratch


def test_width_divided_by_a_number_nothing_follows_blocks_its_channels() -> None:
    torch.manual_seed(0)
    model = Stack(HalfWidthScratch).eval()
    groups = prunable_groups(model, _tokens())
    assert {g.name: g.kind for g in groups} == {"attns.0.qkv": "heads", "attns.1.qkv": "heads"}
    why = {lo.name: lo.reason for lo in groups.left_out}
    # (each block's new_ones gives the reason; the last one checked is named)
    assert why["embed"] == (
        "their width divided by 2 is used as a fixed size at operation 'new_ones' in module "
        "'attns.1', which would not follow pruned units (coupled with 'attns.0.proj', "
        "'attns.1.proj')")


class RelBias(nn.Module):
    """A per-head relative position bias made by a small MLP (one output per head) and gathered
    per pair of tokens with an index tensor (timm's ``RelPosMlp``, Swin V2's ``cpb_mlp``); the
    attention calls its method ``get_bias`` (not ``forward``), as timm does."""

    def __init__(self, heads: int, tokens: int, shape_attr: bool) -> None:
        super().__init__()
        self.num_heads = heads
        self.shape_attr = shape_attr
        self.bias_shape = (tokens, tokens, heads)
        self.mlp = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, heads))
        pos = torch.arange(tokens)
        rel = pos[:, None] - pos[None, :] + tokens - 1  # (tokens, tokens) in 0 .. 2T-2
        self.register_buffer("coords", torch.stack([torch.arange(2 * tokens - 1.0),
                                                    torch.ones(2 * tokens - 1)], 1))
        self.register_buffer("index", rel.reshape(-1))
        self.tokens = tokens

    def get_bias(self) -> torch.Tensor:
        table = self.mlp(self.coords).view(-1, self.num_heads)  # (2T-1, heads)
        bias = table[self.index]  # (T*T, heads)
        t = self.tokens
        bias = bias.view(self.bias_shape) if self.shape_attr else bias.view(t, t, -1)
        return bias.permute(2, 0, 1).unsqueeze(0)


class GatheredBias(nn.Module):
    """Fused qkv sized by attributes, with a `RelBias` as the attention mask."""

    def __init__(self, dim: int, heads: int, shape_attr: bool = False, tokens: int = 5) -> None:
        super().__init__()
        self.num_heads = heads
        self.head_dim = dim // heads
        self.attn_dim = dim
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.rel = RelBias(heads, tokens, shape_attr)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=self.rel.get_bias())
        return self.proj(x.transpose(1, 2).reshape(B, N, self.attn_dim))


def test_per_head_bias_gathered_with_an_index_tensor_goes_with_its_head() -> None:
    torch.manual_seed(0)
    model = Stack(GatheredBias).eval()
    x = _tokens()
    groups = {g.name: g for g in prunable_groups(model, x)}
    g = groups["attns.0.qkv"]
    assert (g.kind, g.size) == ("heads", HEADS)
    assert g.roots == ("attns.0.qkv", "attns.0.rel.mlp.2")
    slices = {(s.tensor, s.axis): (s.offset, s.repeat) for s in g.slices}
    # unit h: row h of the bias MLP's last layer, D rows of each of q, k, v, D proj columns
    assert slices[("attns.0.rel.mlp.2.weight", 0)] == (0, 1)
    assert slices[("attns.0.rel.mlp.2.bias", 0)] == (0, 1)
    assert slices[("attns.0.proj.weight", 1)] == (0, D)
    edits = {(e.module, e.attribute): (e.before, e.per_unit) for e in g.edits}
    assert edits[("attns.0", "num_heads")] == (HEADS, 1)
    assert edits[("attns.0", "attn_dim")] == (DIM, D)
    assert edits[("attns.0.rel", "num_heads")] == (HEADS, 1)  # read in get_bias
    assert edits[("attns.0.rel.mlp.2", "out_features")] == (HEADS, 1)

    # removing head 2 of block 0 equals zeroing its proj columns (the head reaches the rest of
    # the network only there; its bias row acts on that head alone)
    reference = Stack(GatheredBias).eval()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        reference.attns[0].proj.weight[:, 2 * D:3 * D] = 0
        expected = reference(x)
    plan = pruneplan.plan_pruning(model, {"attns.0.qkv": [2]}, example_inputs=x)
    pruneplan.apply_plan(model, plan)
    assert model.attns[0].rel.mlp[2].weight.shape == (3, 16)
    assert (model.attns[0].num_heads, model.attns[0].attn_dim) == (3, 24)
    assert model.attns[0].rel.num_heads == 3
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_per_head_bias_shaped_by_a_tuple_attribute_edits_its_head_element() -> None:
    # view(self.bias_shape): the head count is element 2 of a tuple; the plan edits that element
    torch.manual_seed(0)
    model = Stack(GatheredBias, shape_attr=True).eval()
    x = _tokens()
    g = {g.name: g for g in prunable_groups(model, x)}["attns.1.qkv"]
    edits = {(e.module, e.attribute): (e.before, e.per_unit) for e in g.edits}
    assert edits[("attns.1.rel", "bias_shape[2]")] == (HEADS, 1)
    assert edits[("attns.1.rel", "num_heads")] == (HEADS, 1)
    reference = Stack(GatheredBias, shape_attr=True).eval()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        reference.attns[1].proj.weight[:, 0:D] = 0
        reference.attns[1].proj.weight[:, 2 * D:3 * D] = 0
        expected = reference(x)
    plan = pruneplan.plan_pruning(model, {"attns.1.qkv": [0, 2]}, example_inputs=x)
    pruneplan.apply_plan(model, plan)
    assert model.attns[1].rel.bias_shape == (5, 5, 2)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


class ConcatenatedBias(nn.Module):
    """BEiT / EVA / Swin V2: the fused qkv Linear has no bias of its own; the forward passes
    ``cat(q_bias, k_bias, v_bias)`` to ``F.linear`` with its weight, ``k_bias`` a constant
    non-persistent buffer (zeros: keys need no bias)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.attn_dim = heads, dim // heads, dim
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.randn(dim))
        self.register_buffer("k_bias", torch.zeros(dim), persistent=False)
        self.v_bias = nn.Parameter(torch.randn(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
        qkv = F.linear(x, weight=self.qkv.weight, bias=bias)
        qkv = qkv.reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(x.transpose(1, 2).reshape(B, N, self.attn_dim))


def test_bias_concatenated_from_parts_is_sliced_part_by_part() -> None:
    torch.manual_seed(0)
    model = Stack(ConcatenatedBias).eval()
    x = _tokens()
    groups = {g.name: g for g in prunable_groups(model, x)}
    g = groups["attns.0.qkv"]
    assert (g.kind, g.size) == ("heads", HEADS)
    slices = {(s.tensor, s.axis): (s.offset, s.repeat, s.modulo) for s in g.slices}
    # head h: rows h*D.. of each third of qkv.weight; positions h*D.. of q_bias and v_bias
    # (rows folded modulo their length DIM); k_bias is no state-dict entry
    assert slices[("attns.0.q_bias", 0)][2] == DIM
    assert slices[("attns.0.v_bias", 0)][2] == DIM
    assert ("attns.0.k_bias", 0) not in slices
    assert "embed" in groups  # the hidden width reaches F.linear as its input: columns

    reference = Stack(ConcatenatedBias).eval()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        reference.attns[0].proj.weight[:, 1 * D:2 * D] = 0
        reference.attns[0].proj.weight[:, 3 * D:4 * D] = 0
        expected = reference(x)
    plan = pruneplan.plan_pruning(model, {"attns.0.qkv": [1, 3]}, example_inputs=x)
    gone = {s.tensor: s for s in plan.groups[0].slices}
    assert set(gone) >= {"attns.0.q_bias", "attns.0.v_bias", "attns.0.qkv.weight"}
    pruneplan.apply_plan(model, plan)
    a = model.attns[0]
    assert (a.q_bias.shape, a.k_bias.shape, a.v_bias.shape) == ((16,), (16,), (16,))
    assert torch.equal(a.k_bias, torch.zeros(16))
    assert torch.equal(a.q_bias, reference.attns[0].q_bias[torch.tensor([*range(8), *range(16, 24)])])
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


class Rotary(nn.Module):
    """Rotary position embeddings on q and k (EVA-02): each head's positions are rotated by a
    table over (tokens, head_dim) shared by every head, so removing heads leaves the others'
    rotation alone."""

    def __init__(self, dim: int, heads: int, tokens: int = 5) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.attn_dim = heads, dim // heads, dim
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        half = self.head_dim // 2
        freq = 1.0 / 100 ** (torch.arange(half) / half)
        angle = torch.arange(tokens)[:, None] * freq[None, :]  # (tokens, head_dim / 2)
        self.register_buffer("sin", torch.cat([angle.sin(), angle.sin()], -1), persistent=False)
        self.register_buffer("cos", torch.cat([angle.cos(), angle.cos()], -1), persistent=False)

    def rotate(self, t: torch.Tensor) -> torch.Tensor:
        a, b = t.chunk(2, dim=-1)
        return t * self.cos + torch.cat([-b, a], dim=-1) * self.sin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(self.rotate(q), self.rotate(k), v)
        return self.proj(x.transpose(1, 2).reshape(B, N, self.attn_dim))


def test_rotary_embeddings_keep_heads_prunable() -> None:
    torch.manual_seed(0)
    model = Stack(Rotary).eval()
    x = _tokens()
    groups = {g.name: g for g in prunable_groups(model, x)}
    assert (groups["attns.1.qkv"].kind, groups["attns.1.qkv"].size) == ("heads", HEADS)
    reference = Stack(Rotary).eval()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        reference.attns[1].proj.weight[:, 0:D] = 0  # head 0 of block 1 reaches out only here
        expected = reference(x)
    plan = pruneplan.plan_pruning(model, {"attns.1.qkv": [0]}, example_inputs=x)
    pruneplan.apply_plan(model, plan)
    assert model.attns[1].num_heads == 3
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


class TalkingHeads(nn.Module):
    """CaiT's talking-heads attention: the attention logits are mixed across heads before the
    softmax (``proj_l``) and the maps after it (``proj_w``), Linear layers over the head axis."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.attn_dim = heads, dim // heads, dim
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_l = nn.Linear(heads, heads)
        self.proj_w = nn.Linear(heads, heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = q @ k.transpose(-2, -1)  # (B, heads, N, N)
        attn = self.proj_l(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).softmax(dim=-1)
        attn = self.proj_w(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = (attn @ v).transpose(1, 2).reshape(B, N, self.attn_dim)
        return self.proj(x)


def test_talking_heads_projections_are_per_head_tensors() -> None:
    torch.manual_seed(0)
    model = Stack(TalkingHeads, layer_scale=True).eval()
    x = _tokens()
    groups = {g.name: g for g in prunable_groups(model, x)}
    g = groups["attns.0.qkv"]
    assert (g.kind, g.size, g.roots) == ("heads", HEADS, ("attns.0.qkv", "attns.0.proj_w"))
    slices = {(s.tensor, s.axis): (s.offset, s.repeat) for s in g.slices}
    # unit h: column h of proj_l (its logits), row h of proj_w (the map that weighs v_h)
    assert slices[("attns.0.proj_l.weight", 1)] == (0, 1)
    assert slices[("attns.0.proj_w.weight", 0)] == (0, 1)
    assert slices[("attns.0.proj_w.bias", 0)] == (0, 1)
    # the mixed logits (rows of proj_l, columns of proj_w) are units of their own
    mixed = groups["attns.0.proj_l"]
    assert (mixed.kind, mixed.size) == ("channels", HEADS)
    hidden = {(s.tensor, s.axis) for s in groups["embed"].slices}
    assert ("gammas.0", 0) in hidden and ("gammas.1", 0) in hidden  # layer scale

    # removing head 2 of block 0 equals zeroing its query rows (its logits are 0 wherever
    # proj_l reads them) and its output columns in proj (v_2 weighed by map 2 reaches no
    # further)
    reference = Stack(TalkingHeads, layer_scale=True).eval()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        reference.attns[0].qkv.weight[2 * D:3 * D] = 0
        reference.attns[0].qkv.bias[2 * D:3 * D] = 0
        reference.attns[0].proj.weight[:, 2 * D:3 * D] = 0
        expected = reference(x)
    plan = pruneplan.plan_pruning(model, {"attns.0.qkv": [2]}, example_inputs=x)
    pruneplan.apply_plan(model, plan)
    a = model.attns[0]
    assert (a.num_heads, a.proj_l.weight.shape, a.proj_w.weight.shape) == (3, (4, 3), (3, 4))
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


class QKNorm(nn.Module):
    """q and k LayerNorm-ed over head_dim (timm's ``qk_norm=True``): one norm shared by every
    head, over an axis that is no unit's, so it does not stand in the way of the heads."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.attn_dim = heads, dim // heads, dim
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.LayerNorm(self.head_dim)
        self.k_norm = nn.LayerNorm(self.head_dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
        return self.proj(x.transpose(1, 2).reshape(B, N, self.attn_dim))


def test_query_key_norms_over_head_dim_keep_heads_prunable() -> None:
    torch.manual_seed(0)
    model = Stack(QKNorm).eval()
    x = _tokens()
    g = {g.name: g for g in prunable_groups(model, x)}["attns.0.qkv"]
    assert (g.kind, g.size) == ("heads", HEADS)
    assert not any("norm" in s.tensor for s in g.slices)  # the norms keep their head_dim size
    reference = Stack(QKNorm).eval()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        reference.attns[0].proj.weight[:, 3 * D:4 * D] = 0
        expected = reference(x)
    plan = pruneplan.plan_pruning(model, {"attns.0.qkv": [3]}, example_inputs=x)
    pruneplan.apply_plan(model, plan)
    assert model.attns[0].q_norm.weight.shape == (D,)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


class SpatialReduction(nn.Module):
    """PVT v2's spatial-reduction attention: keys and values come from a coarser stream (the
    tokens as a ``C x 4 x 4`` map, a strided conv, a LayerNorm), ``C`` read off the input."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.sr = nn.Conv2d(dim, dim, 2, stride=2)
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q = self.q(x).reshape(B, N, self.num_heads, -1).permute(0, 2, 1, 3)
        r = self.sr(x.permute(0, 2, 1).reshape(B, C, 4, 4)).reshape(B, C, -1).permute(0, 2, 1)
        kv = self.kv(self.norm(r)).reshape(B, -1, 2, self.num_heads, self.head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


def test_spatial_reduction_attention_prunes_heads_with_the_reduced_stream() -> None:
    torch.manual_seed(0)
    model = Stack(SpatialReduction).eval()
    x = torch.randn(2, 16, 6, generator=torch.Generator().manual_seed(1))
    groups = prunable_groups(model, x)
    # the strided conv's output is read with the width C of the tokens: tied to them
    assert [(g.kind, g.size) for g in groups] == [("heads", HEADS)]
    assert "attns.0.sr" in groups[0].roots and "attns.1.kv" in groups[0].roots
    gone = [1]
    ref = Stack(SpatialReduction, dim=24, heads=3).eval()
    c = _keep(DIM, gone, D)
    with torch.no_grad():
        ref.embed.weight.copy_(model.embed.weight[c])
        ref.embed.bias.copy_(model.embed.bias[c])
        ref.head.weight.copy_(model.head.weight[:, c])
        ref.head.bias.copy_(model.head.bias)
        for i in range(2):
            a, b = ref.attns[i], model.attns[i]
            ref.norms[i].weight.copy_(model.norms[i].weight[c])
            ref.norms[i].bias.copy_(model.norms[i].bias[c])
            a.q.weight.copy_(b.q.weight[c][:, c])
            a.q.bias.copy_(b.q.bias[c])
            a.kv.weight.copy_(b.kv.weight[torch.cat([c, c + DIM])][:, c])
            a.kv.bias.copy_(b.kv.bias[torch.cat([c, c + DIM])])
            a.sr.weight.copy_(b.sr.weight[c][:, c])
            a.sr.bias.copy_(b.sr.bias[c])
            a.norm.weight.copy_(b.norm.weight[c])
            a.norm.bias.copy_(b.norm.bias[c])
            a.proj.weight.copy_(b.proj.weight[c][:, c])
            a.proj.bias.copy_(b.proj.bias[c])
    plan = pruneplan.plan_pruning(model, {"embed": gone}, example_inputs=x)
    pruneplan.apply_plan(model, plan)
    assert model.attns[0].sr.weight.shape == (24, 24, 2, 2)
    assert model.attns[0].num_heads == 3
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)


class ClassToken(nn.Module):
    """Class attention (VOLO, CaiT): the class token attends to all tokens; the output width is
    computed in the forward as ``self.head_dim * self.num_heads``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        k, v = self.kv(x).reshape(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q = self.q(x[:, :1, :]).reshape(B, self.num_heads, 1, self.head_dim)
        attn = ((q * self.head_dim ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, 1, self.head_dim * self.num_heads))


def test_output_width_computed_as_heads_times_head_dim_follows_the_heads() -> None:
    torch.manual_seed(0)
    model = Stack(ClassToken).eval()
    x = _tokens()
    g = {g.name: g for g in prunable_groups(model, x)}["attns.0.kv"]
    assert (g.kind, g.size, g.roots) == ("heads", HEADS, ("attns.0.kv", "attns.0.q"))
    edits = {(e.module, e.attribute): (e.before, e.per_unit) for e in g.edits}
    assert edits[("attns.0", "num_heads")] == (HEADS, 1)
    assert ("attns.0", "head_dim") not in edits
    reference = Stack(ClassToken).eval()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        reference.attns[0].proj.weight[:, 1 * D:2 * D] = 0
        expected = reference(x)
    plan = pruneplan.plan_pruning(model, {"attns.0.kv": [1]}, example_inputs=x)
    pruneplan.apply_plan(model, plan)
    assert (model.attns[0].num_heads, model.attns[0].head_dim) == (3, D)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


class CutStream(nn.Module):
    """The stream is cut in two parts and joined again before the attention (a fixed split:
    the embedding's channels are left out there and carry no units further on), then the
    attention reads ``C`` off that tensor and sizes its output with it."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, DIM)
        self.attn = HiddenSizedAttention(DIM, HEADS, "inferred")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        x = torch.cat([x[..., :DIM // 2] * 2, x[..., DIM // 2:]], dim=-1)
        return self.attn(x).sum(-1)


def test_width_of_a_stream_whose_units_were_dropped_still_fixes_the_heads() -> None:
    # C is the fixed width of a tensor with no units: reshape(B, N, C) can hold no fewer heads
    model = CutStream().eval()
    groups = prunable_groups(model, _tokens())
    assert [g.name for g in groups] == ["attn.proj"]  # its outputs are summed: free
    why = {lo.name: lo.reason for lo in groups.left_out}
    assert why["attn.qkv"] == "their width is used as a fixed size at operation 'reshape' in " \
        "module 'attn'"


def test_tuple_element_edit_that_does_not_match_the_model_is_refused() -> None:
    torch.manual_seed(0)
    model = Stack(GatheredBias, shape_attr=True).eval()
    x = _tokens()
    plan = pruneplan.plan_pruning(model, {"attns.1.qkv": [0]}, example_inputs=x)
    model.attns[1].rel.bias_shape = (5, 5, 3)  # not what the plan was made for
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(pruneplan.errors.PlanMismatchError,
                       match=r"'attns\.1\.rel\.bias_shape\[2\]' is 3, the plan expects 4"):
        pruneplan.apply_plan(model, plan)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched
    model.attns[1].rel.bias_shape = "5x5x4"
    with pytest.raises(pruneplan.errors.PlanMismatchError, match="not a tuple of integers"):
        pruneplan.apply_plan(model, plan)


class NestedBlocks(nn.Module):
    """NesT's attention: tokens in ``T`` image blocks, attended inside each block, so q, k, v
    are 5-D ``(B, heads, T, N, head_dim)`` and the heads are axis 1 (-4), not -3; the output
    puts the heads last (``permute(0, 2, 3, 4, 1)``): channel ``d * heads + h`` is head ``h``."""

    def __init__(self, dim: int = DIM, heads: int = HEADS, fused: bool = True) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.fused = heads, dim // heads, fused
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, T, N, 3, self.num_heads, self.head_dim).permute(3, 0, 4, 1, 2, 5)
        q, k, v = qkv.unbind(0)
        if self.fused:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            x = (q * self.head_dim ** -0.5 @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        return self.proj(x.permute(0, 2, 3, 4, 1).reshape(B, T, N, -1))


@pytest.mark.parametrize("fused", [True, False])
def test_attention_over_nested_blocks_prunes_heads_on_their_leading_axis(fused: bool) -> None:
    torch.manual_seed(0)
    model = NestedBlocks(fused=fused).eval()
    x = torch.randn(2, 3, 5, DIM, generator=torch.Generator().manual_seed(1))  # (B, T, N, C)
    groups = prunable_groups(model, x)
    assert [(g.name, g.kind, g.size) for g in groups] == [("qkv", "heads", HEADS)]
    gone = [1, 3]
    # reference: heads 1 and 3 contribute nothing when their value rows are zero (each head's
    # output is its attention weights times its values), so the output equals the pruned model's
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for h in gone:
            rows = slice(2 * DIM + h * D, 2 * DIM + (h + 1) * D)  # v is the third DIM rows
            reference.qkv.weight[rows] = 0
            reference.qkv.bias[rows] = 0
        expected = reference(x)
    plan = pruneplan.plan_pruning(model, {"qkv": gone}, example_inputs=x)
    pruneplan.apply_plan(model, plan)
    assert model.num_heads == 2
    assert model.qkv.weight.shape == (3 * 2 * D, DIM)
    assert model.proj.weight.shape == (DIM, 2 * D)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
