"""Attention heads of encoder models written by Hugging Face, timm and torchvision.

Each model is built from a small config with random weights. A head group's unit reaches the
rest of the network only through the input columns its heads own in the output projection,
so removing it must equal zeroing those columns in the original model (the reference below
zeroes the positions the group's own slice of the output projection names, the same
positions a hand derivation gives: unit ``u`` owns columns ``u * D .. u * D + D - 1``).
"""

from __future__ import annotations

import copy
import re

import pytest
import torch

import pruneplan
from pruneplan.graph._streams import Stream
from pruneplan.graph.discover import prunable_groups

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

T = transformers


def _ids() -> torch.Tensor:
    return torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(1))


def _image(size: int) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


class T5Encoded(torch.nn.Module):
    """T5 with one call signature (the decoder reads the same ids)."""

    def __init__(self, m: torch.nn.Module) -> None:
        super().__init__()
        self.m = m

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.m(input_ids=ids, decoder_input_ids=ids).last_hidden_state


def _build(name: str):
    torch.manual_seed(0)
    if name == "bert":
        m = T.BertModel(T.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, vocab_size=100))
        return m, (_ids(),), lambda m, x: m(*x).last_hidden_state
    if name == "distilbert":
        m = T.DistilBertModel(T.DistilBertConfig(dim=64, n_layers=2, n_heads=4, hidden_dim=128,
                                                 vocab_size=100))
        return m, (_ids(),), lambda m, x: m(*x).last_hidden_state
    if name == "vit":
        m = T.ViTModel(T.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=128, image_size=32, patch_size=8))
        return m, (_image(32),), lambda m, x: m(*x).last_hidden_state
    if name == "t5":
        m = T5Encoded(T.T5Model(T.T5Config(d_model=64, d_kv=16, d_ff=128, num_layers=2,
                                           num_heads=4, vocab_size=100)))
        return m, (_ids(),), lambda m, x: m(*x)
    if name == "timm_vit":
        m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                              embed_dim=64, depth=2, num_heads=4, num_classes=10)
        return m, (_image(32),), lambda m, x: m(*x)
    if name == "swin":
        m = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=56,
                              embed_dim=32, depths=(2, 2), num_heads=(2, 4), window_size=7,
                              num_classes=10)
        return m, (_image(56),), lambda m, x: m(*x)
    raise KeyError(name)


# model -> (head group, heads, output projection weights (regex), attributes that count heads
# and that the plan edits: timm writes them into its reshapes; Hugging Face modules view with
# -1 and their cached sizes are recomputed by apply_plan, tested with the configs)
CASES = {
    "bert": ("encoder.layer.1.attention.self.query", 4, r"attention\.output\.dense\.weight", []),
    "distilbert": ("transformer.layer.0.attention.q_lin", 4, r"out_lin\.weight", []),
    "vit": ("layers.1.attention.q_proj", 4, r"o_proj\.weight", []),
    # T5 shares the relative position bias of layer 0 with every layer: the heads of all
    # encoder layers (and the bias table's columns) are one group
    "t5": ("m.encoder.block.0.layer.0.SelfAttention.q", 4, r"encoder\..*SelfAttention\.o\.weight",
           []),
    "timm_vit": ("blocks.0.attn.qkv", 4, r"attn\.proj\.weight",
                 [("blocks.0.attn", "num_heads", 3), ("blocks.0.attn", "attn_dim", 48)]),
    # the shifted-window block: per-head relative position bias table and the window mask
    "swin": ("layers.1.blocks.1.attn.qkv", 4, r"attn\.proj\.weight",
             [("layers.1.blocks.1.attn", "num_heads", 3)]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_removing_a_head_equals_zeroing_its_output_columns(name: str) -> None:
    group_name, heads, out_re, attrs = CASES[name]
    model, x, run = _build(name)
    model.eval()
    groups = {g.name: g for g in prunable_groups(model, x)}
    g = groups[group_name]
    assert (g.kind, g.size) == ("heads", heads)
    outs = [s for s in g.slices if re.search(out_re, s.tensor)]
    assert outs and all(s.axis == 1 for s in outs)
    if name == "swin":  # the bias table loses the head's column
        assert ("layers.1.blocks.1.attn.relative_position_bias_table", 1) in {
            (s.tensor, s.axis) for s in g.slices}
    reference = copy.deepcopy(model)
    sd = reference.state_dict()
    with torch.no_grad():
        for s in outs:
            cols = Stream(s.offset, s.repeat, s.tiles, s.tile_stride, s.positions).unit(1)
            width = sd[s.tensor].shape[1] // heads
            assert cols == list(range(width, 2 * width))  # unit 1 = the second head's columns
            sd[s.tensor][:, cols] = 0
        expected = run(reference, x)
    plan = pruneplan.plan_pruning(model, {group_name: [1]}, example_inputs=x)
    pruneplan.apply_plan(model, plan)
    for module, attr, value in attrs:
        assert getattr(model.get_submodule(module), attr) == value
    with torch.no_grad():
        torch.testing.assert_close(run(model, x), expected, rtol=1e-5, atol=1e-5)


# torchvision ViT and nn.TransformerEncoder (nn.MultiheadAttention): tests/test_mha.py
