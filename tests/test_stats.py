"""`pruneplan.count`: parameters, buffers and MACs, checked against hand counts."""

from __future__ import annotations

import torch
from torch import nn

import pruneplan as pp


def test_count_small_cnn_by_hand() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 4, 3, groups=2), nn.Flatten(), nn.Linear(4 * 4 * 4, 5))
    model.train()
    stats = pp.count(model, torch.randn(2, 3, 6, 6))
    # params: conv0 8*3*9 + 8 = 224; BN 8 + 8 = 16; grouped conv 4*(8/2)*9 + 4 = 148;
    # linear 64*5 + 5 = 325 -> 713. Buffers: BN running mean 8 + var 8 + num_batches_tracked 1 = 17.
    assert (stats.params, stats.buffers) == (713, 17)
    # MACs for the batch of 2: conv0 2 * 6*6 positions * 8 out * 27 = 15552;
    # conv3 2 * 4*4 * 4 out * (4 in per group * 9) = 4608; linear 2 * 64 * 5 = 640 -> 20800
    assert stats.macs == 20800
    assert stats.modules["0"].macs == 15552 and stats.modules["3"].macs == 4608
    assert stats.modules["5"] == pp.ModuleStats(params=325, buffers=0, macs=640)
    assert stats.modules["1"] == pp.ModuleStats(params=16, buffers=17, macs=0)  # element-wise: not counted
    assert stats.modules[""].macs == 20800
    assert model.training  # restored
    assert str(stats) == "713 parameters, 17 buffer values, 20,800 MACs"


def test_count_transformer_block_by_hand() -> None:
    d, heads, ff, tokens = 16, 4, 32, 5
    block = nn.TransformerEncoderLayer(d, heads, dim_feedforward=ff, batch_first=True, dropout=0.0).eval()
    stats = pp.count(block, torch.randn(1, tokens, d))
    # params: in_proj 3d*d + 3d = 816; out_proj d*d + d = 272; linear1 d*ff + ff = 544;
    # linear2 ff*d + d = 528; two LayerNorms 2 * 2d = 64 -> 2224
    assert stats.params == 2224 and stats.buffers == 0
    # MACs: q, k, v projections 5 * 16 * 48 = 3840; scores q k^T: 4 heads * 5 * 5 * 4 = 400;
    # weights x v: 400; out_proj 5 * 16 * 16 = 1280; linear1 5 * 16 * 32 = 2560; linear2 2560
    # -> 11040 (the fused no-grad fast path and the CPU flash kernel would hide the products)
    assert stats.macs == 11040
    assert stats.modules["self_attn"].macs == 3840 + 400 + 400 + 1280
    assert stats.modules["linear1"].macs == 2560


def test_count_without_macs_skips_the_forward_pass() -> None:
    class Broken(nn.Linear):
        def forward(self, x):
            raise AssertionError("no forward pass expected")

    stats = pp.count(Broken(3, 2), None, macs=False)
    assert (stats.params, stats.buffers, stats.macs) == (8, 0, 0)
