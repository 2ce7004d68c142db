"""Splits to different branches, concatenate-then-slice, pixel shuffles, recurrent layers,
positional tables sliced at run time and Hugging Face's Conv1D (issue 11, item 5).

Each kind: the pruned model equals the original with the removed units zeroed where they leave
the layer (an independent reference: hooks on the original model, or zeroed gate rows for
recurrent hidden units), and a replay on saved weights (state dict, safetensors) gives the same
output as the pruned model.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from test_zoo import _zeroing_hooks
from torch import nn

from pruneplan import apply_plan, apply_to_safetensors, apply_to_state_dict, load_pruned
from pruneplan.graph.discover import prunable_groups
from pruneplan.graph.spec import EditSpec
from pruneplan.planner import plan_pruning


def _zero_last(model: nn.Module, where: dict[str, list[int]]) -> list:
    """Zero positions of the last axis at the input of the named modules."""
    modules = dict(model.named_modules())

    def hook(mod, args, idx):
        x = args[0].clone()
        x[..., idx] = 0
        return (x, *args[1:])

    handles = []
    for n, p in where.items():
        idx = torch.tensor(p)
        handles.append(modules[n].register_forward_pre_hook(lambda m, a, i=idx: hook(m, a, i)))
    return handles


def _check(build: Callable[[], nn.Module], x: torch.Tensor, removed: dict[str, list[int]],
           tmp_path, zero: Callable[[nn.Module, object], list] | None = None,
           reference: Callable[[nn.Module], torch.Tensor] | None = None) -> tuple[nn.Module, object]:
    """Plan ``removed``, apply, compare with zeroing (``zero`` hooks, default: at the input of
    every Linear/Conv consumer) or with ``reference``, and replay through a state dict and a
    safetensors file."""
    torch.manual_seed(0)
    model = build().eval()
    plan = plan_pruning(model, removed, example_inputs=x)
    pruned = apply_plan(copy.deepcopy(model), plan)
    with torch.no_grad():
        out = pruned(x)
        if reference is not None:
            want = reference(model)
        else:
            handles = (zero or _zeroing_hooks)(model, plan)
            try:
                want = model(x)
            finally:
                for h in handles:
                    h.remove()
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    # replay: pure tensor slicing of the saved weights, then a fresh model loads them
    sd = apply_to_state_dict(plan, model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(load_pruned(build().eval(), plan, sd)(x), out, rtol=0, atol=0)
    from safetensors.torch import save_file
    src, dst = tmp_path / "w.safetensors", tmp_path / "w.pruned.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(src))
    apply_to_safetensors(plan, str(src), str(dst), overwrite=True)
    with torch.no_grad():
        torch.testing.assert_close(load_pruned(build().eval(), plan, str(dst))(x), out, rtol=0, atol=0)
    return pruned, plan


# ---- chunk / split to different branches (CSP, C2f) -----------------------------------------


class CSP(nn.Module):
    """conv_exp -> chunk(2): one half through a block, the other straight to the transition."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_exp = nn.Conv2d(3, 8, 1)
        self.block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
        self.transition = nn.Conv2d(8, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs, xb = torch.relu(self.conv_exp(x)).chunk(2, dim=1)
        return self.transition(torch.cat([xs, self.block(xb)], dim=1))


def test_chunk_to_different_branches_pairs_units_across_the_parts(tmp_path) -> None:
    x = torch.randn(2, 3, 6, 6)
    groups = {g.name: g for g in prunable_groups(CSP().eval(), x)}
    # conv_exp's 8 channels are cut in halves of 4: unit j is channels j and j + 4
    g = groups["conv_exp"]
    assert g.size == 4
    w = next(s for s in g.slices if s.tensor == "conv_exp.weight")
    assert (w.tiles, w.tile_stride) == (2, 4)
    # the block's input conv reads the second half: unit j is its input channel j
    b = next(s for s in g.slices if s.tensor == "block.0.weight")
    assert (b.axis, b.offset, b.tiles) == (1, 0, 1)
    pruned, _ = _check(CSP, x, {"conv_exp": [1, 2], "block.0": [3]}, tmp_path)
    assert pruned.conv_exp.out_channels == 4 and pruned.block[0].in_channels == 2
    assert pruned.transition.in_channels == 2 + 3


def test_glu_halves_meeting_again_are_one_unit(tmp_path) -> None:
    class GLU(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 6)
            self.b = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            u, v = self.a(x).chunk(2, dim=-1)
            return self.b(u * torch.sigmoid(v))

    x = torch.randn(5, 4)
    (g,) = prunable_groups(GLU().eval(), x)
    assert (g.name, g.size) == ("a", 3)
    pruned, _ = _check(GLU, x, {"a": [0]}, tmp_path)
    assert pruned.a.out_features == 4 and pruned.b.in_features == 2


# ---- concatenate then slice (GhostNet's ghost module) ---------------------------------------


class Ghost(nn.Module):
    """GhostNet's module: ``cat([x1, cheap(x1)])[:, :oup]``."""

    def __init__(self, oup: int = 8) -> None:
        super().__init__()
        self.oup = oup
        self.primary = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
        self.cheap = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Conv2d(oup, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.primary(x)
        out = torch.cat([x1, self.cheap(x1)], dim=1)
        return self.head(out[:, :self.oup])


def test_ghost_module_concatenate_then_slice(tmp_path) -> None:
    x = torch.randn(2, 3, 5, 5)
    (g,) = prunable_groups(Ghost().eval(), x)
    # unit j: primary channel j, and head input channels j and j + 4
    head = next(s for s in g.slices if s.tensor == "head.weight")
    assert (g.name, g.size, head.tiles, head.tile_stride) == ("primary.0", 4, 2, 4)
    pruned, _ = _check(Ghost, x, {"primary.0": [0, 3]}, tmp_path)
    assert pruned.head.in_channels == 4 and pruned.cheap[0].groups == 2
    # an odd width drops the last cheap channel by a literal slice: left out, with the reason
    groups = prunable_groups(Ghost(7).eval(), x)
    assert list(groups) == []
    assert groups.left_out[0].name == "primary.0"
    assert "slices their axis" in groups.left_out[0].reason


# ---- pixel shuffle ---------------------------------------------------------------------------


class Upsampler(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3 * 4, 3, padding=1)
        self.shuffle = nn.PixelShuffle(2)
        self.down = nn.PixelUnshuffle(2)
        self.mid = nn.Conv2d(3, 5, 1)
        self.out = nn.Conv2d(5 * 4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.mid(torch.relu(self.shuffle(self.conv(x))))
        return self.out(self.down(y))


def test_pixel_shuffle_unit_is_r_squared_channels(tmp_path) -> None:
    x = torch.randn(2, 3, 4, 4)
    groups = {g.name: g for g in prunable_groups(Upsampler().eval(), x)}
    # conv: 12 channels, 3 units of r*r = 4 consecutive channels; mid's input channel j is unit j
    conv = groups["conv"]
    w = next(s for s in conv.slices if s.tensor == "conv.weight")
    assert (conv.size, w.repeat) == (3, 4)
    mid = next(s for s in conv.slices if s.tensor == "mid.weight")
    assert (mid.axis, mid.repeat) == (1, 1)
    # mid: 5 units; after the unshuffle unit j is out's input channels 4j .. 4j + 3
    o = next(s for s in groups["mid"].slices if s.tensor == "out.weight")
    assert (groups["mid"].size, o.repeat) == (5, 4)
    pruned, _ = _check(Upsampler, x, {"conv": [1], "mid": [0, 4]}, tmp_path)
    assert pruned.conv.out_channels == 8 and pruned.mid.in_channels == 2
    assert pruned.out.in_channels == 12


# ---- recurrent layers ------------------------------------------------------------------------


class Recurrent(nn.Module):
    def __init__(self, kind: str, **kw) -> None:
        super().__init__()
        self.embed = nn.Linear(5, 6)
        self.rnn = getattr(nn, kind)(6, 7, batch_first=True, **kw)
        dirs = 2 if self.rnn.bidirectional else 1
        self.head = nn.Linear((kw.get("proj_size") or 7) * dirs, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(torch.relu(self.embed(x)))
        return self.head(h)


_KINDS = [("LSTM", {}), ("GRU", {"num_layers": 2, "bidirectional": True}),
          ("RNN", {"num_layers": 2, "nonlinearity": "relu"}),
          ("LSTM", {"num_layers": 2, "bidirectional": True, "proj_size": 3})]


@pytest.mark.parametrize(("kind", "kw"), _KINDS, ids=[f"{k}-{sorted(kw)}" for k, kw in _KINDS])
def test_recurrent_hidden_units_equal_zeroed_gate_rows(kind: str, kw: dict, tmp_path) -> None:
    x = torch.randn(2, 4, 5)
    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[kind]
    build = lambda: Recurrent(kind, **kw)  # noqa: E731
    groups = {g.name: g for g in prunable_groups(build().eval(), x)}
    assert {n: g.size for n, g in groups.items()} == {"embed": 6, "rnn": 7}
    removed = [0, 4]

    def reference(model: nn.Module) -> torch.Tensor:
        # the original with hidden units 0 and 4 silenced: every gate row zeroed (weights and
        # biases, every layer and direction); their states stay 0 from the zero initial state
        ref = copy.deepcopy(model)
        with torch.no_grad():
            for n, p in ref.rnn.named_parameters():
                if n.startswith(("weight_ih", "weight_hh", "bias_")):
                    for g in range(gates):
                        p[[g * 7 + u for u in removed]] = 0
            return ref(x)

    pruned, _ = _check(build, x, {"rnn": removed}, tmp_path, reference=reference)
    assert pruned.rnn.hidden_size == 5
    assert pruned.rnn.weight_ih_l0.shape == (gates * 5, 6)
    if kw.get("num_layers") == 2 and not kw.get("proj_size"):
        dirs = 2 if kw.get("bidirectional") else 1
        assert pruned.rnn.weight_ih_l1.shape == (gates * 5, 5 * dirs)
    if kw.get("proj_size"):
        assert pruned.rnn.weight_hr_l1_reverse.shape == (3, 5)
        assert pruned.head.in_features == 6
    # the input width: columns of weight_ih_l0 (both directions); zeroing at the input is the reference
    pruned, _ = _check(build, x, {"embed": [2]}, tmp_path, zero=lambda m, p: _zero_last(m, {"rnn": [2]}))
    assert pruned.rnn.input_size == 5


# ---- positional tables sliced at run time ----------------------------------------------------


class Positional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(5, 8)
        self.pos = nn.Parameter(torch.randn(1, 10, 8))
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.embed(x) + self.pos[:, :x.shape[1]]))


@pytest.mark.parametrize("tracer", ["fx", "record"])
def test_positional_table_sliced_at_run_time(tracer: str, tmp_path) -> None:
    x = torch.randn(2, 6, 5)
    (g,) = prunable_groups(Positional().eval(), x, tracer=tracer)
    # the table's last axis follows the embedding's units; its position axis is not touched
    assert [(s.tensor, s.axis) for s in g.slices if s.tensor == "pos"] == [("pos", 2)]
    pruned, _ = _check(Positional, x, {"embed": [0, 5, 7]}, tmp_path)
    assert tuple(pruned.pos.shape) == (1, 10, 5)


# ---- Hugging Face Conv1D ----------------------------------------------------------------------


def test_hf_conv1d_root_and_consumer(tmp_path) -> None:
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    class MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = Conv1D(6, 4)     # nf=6 outputs, nx=4 inputs: weight (4, 6)
            self.proj = Conv1D(3, 6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(torch.relu(self.fc(x)))

    x = torch.randn(2, 5, 4)
    (g,) = prunable_groups(MLP().eval(), x)
    assert {(s.tensor, s.axis) for s in g.slices} == {("fc.weight", 1), ("fc.bias", 0), ("proj.weight", 0)}
    pruned, _ = _check(MLP, x, {"fc": [1, 4]}, tmp_path,
                       zero=lambda m, p: _zero_last(m, {"proj": [1, 4]}))
    assert (pruned.fc.nf, pruned.proj.nx, tuple(pruned.proj.weight.shape)) == (4, 4, (4, 3))


def test_gpt2_mlp_hidden_units(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=40, n_positions=12,
                                  bos_token_id=0, eos_token_id=0)

    def build() -> nn.Module:
        torch.manual_seed(0)
        return transformers.GPT2Model(cfg).eval()

    class Wrapped(nn.Module):  # the last hidden state only, as a plain tensor
        def __init__(self) -> None:
            super().__init__()
            self.gpt = build()

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.gpt(input_ids=ids).last_hidden_state

    ids = torch.randint(0, 40, (2, 7))
    groups = prunable_groups(Wrapped().eval(), ids, on_unsupported="skip")
    # each block's MLP hidden units (c_fc -> gelu -> c_proj, Conv1D layers) are offered, and
    # its attention heads (c_attn, a Conv1D split into query/key/value) as heads
    kinds = {g.name: (g.size, g.kind) for g in groups}
    assert kinds["gpt.h.0.mlp.c_fc"] == kinds["gpt.h.1.mlp.c_fc"] == (64, "channels")
    assert kinds["gpt.h.0.attn.c_attn"] == kinds["gpt.h.1.attn.c_attn"] == (2, "heads")
    removed = {"gpt.h.0.mlp.c_fc": [0, 9, 63], "gpt.h.1.mlp.c_fc": list(range(0, 64, 2))}
    zero = {"gpt.h.0.mlp.c_proj": removed["gpt.h.0.mlp.c_fc"],
            "gpt.h.1.mlp.c_proj": removed["gpt.h.1.mlp.c_fc"]}
    pruned, _ = _check(Wrapped, ids, removed, tmp_path, zero=lambda m, p: _zero_last(m, zero))
    assert pruned.gpt.h[1].mlp.c_fc.nf == 32 and pruned.gpt.h[1].mlp.c_proj.nx == 32


class CrossStage(nn.Module):
    """timm's CrossStage: ``split`` at a size written as a number (``self.expand_chs // 2``)."""

    def __init__(self) -> None:
        super().__init__()
        self.expand_chs = 8
        self.conv_exp = nn.Conv2d(3, self.expand_chs, 1)
        self.block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
        self.transition = nn.Conv2d(8, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs, xb = torch.relu(self.conv_exp(x)).split(self.expand_chs // 2, dim=1)
        return self.transition(torch.cat([xs, self.block(xb)], dim=1))


def test_split_at_a_written_size_moves_the_split_point(tmp_path) -> None:
    x = torch.randn(2, 3, 6, 6)
    groups = {g.name: g for g in prunable_groups(CrossStage().eval(), x)}
    # the pairs (j, j + 4) of conv_exp go together, and expand_chs (8) drops by 2 per pair
    assert groups["conv_exp"].size == 4
    assert EditSpec("", "expand_chs", 8, 2) in groups["conv_exp"].edits
    pruned, _ = _check(CrossStage, x, {"conv_exp": [0, 3]}, tmp_path)
    # transition reads the 2 kept channels of xs and the block's 4 outputs
    assert pruned.expand_chs == 4 and pruned.transition.in_channels == 2 + 4

    class Ambiguous(CrossStage):
        def __init__(self) -> None:
            super().__init__()
            self.out_chs = 4  # a second attribute holding the split size: no guess

    groups = prunable_groups(Ambiguous().eval(), x)
    assert "conv_exp" not in {g.name for g in groups}
    reason = next(lo.reason for lo in groups.left_out if lo.name == "conv_exp")
    assert reason.startswith("operation 'split' in module '<top level>' splits them at the size 4 "
                             "written as a number and several attributes of its module could "
                             "hold it (expand_chs, out_chs)")


def test_timm_cspnet_prunes_through_its_split() -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("cspresnet50", pretrained=False).eval()
    x = torch.randn(1, 3, 64, 64)
    groups = prunable_groups(model, x)
    names = {g.name for g in groups}
    assert {f"stages.{i}.conv_exp.conv" for i in range(4)} <= names
    assert [lo.name for lo in groups.left_out] == ["head.fc"]
