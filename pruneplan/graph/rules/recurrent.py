"""Recurrent layers (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``): input width and hidden units.

With ``G`` gates (4 for LSTM, 3 for GRU, 1 for RNN), hidden size ``H``, ``D`` directions and
``L`` layers, PyTorch stores per layer ``l`` and direction (suffix ``""`` / ``"_reverse"``):
``weight_ih_l{l}`` ``(G*H, in_l)``, ``weight_hh_l{l}`` ``(G*H, H)`` (``(G*H, P)`` with a
projection), ``bias_ih_l{l}`` / ``bias_hh_l{l}`` ``(G*H,)`` and, with ``proj_size = P``,
``weight_hr_l{l}`` ``(P, H)``; ``in_0`` is the input width, ``in_l = D*H`` (``D*P``) after.

- **input width** (the layer consumes labels on its input's last axis): the columns of
  ``weight_ih_l0`` in both directions; ``input_size`` shrinks.
- **hidden units** (the layer is a root): hidden unit ``h`` is rows ``g*H + h`` (every gate
  ``g``) of ``weight_ih``/``weight_hh``/both biases, column ``h`` of ``weight_hh`` (of
  ``weight_hr`` with a projection), in every layer and direction (``hidden_size`` is shared),
  and columns ``h`` and ``H + h`` of ``weight_ih_l{l}`` for ``l >= 1`` (its input is the
  previous layer's output, both directions concatenated). ``hidden_size`` shrinks. The output
  carries unit ``h`` at ``h`` (and ``H + h`` for the reverse direction) of its last axis; the
  final states carry it on their last axis. With a projection only the cell state does: the
  output and ``h_n`` are ``P`` wide, and ``P`` itself is not offered.

Removing hidden unit ``h`` equals zeroing its gate rows (weights and biases) in the original
with zero initial states: its pre-activations are then 0, so its state stays 0 (LSTM:
``c = 0.5*c + 0.5*tanh(0)``, ``h = 0.5*tanh(c)``; GRU: ``h = 0.5*h + 0.5*tanh(0)``; RNN:
``tanh(0)`` / ``relu(0)``) and its columns add nothing to the other units.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import nn

from pruneplan.errors import PlanningError
from pruneplan.graph._labels import Lab
from pruneplan.graph._streams import Stream
from pruneplan.graph.rules.base import Call, Rule, builtin
from pruneplan.graph.spec import EditSpec, SliceSpec

__all__ = ["RecurrentRule", "hidden_slices", "input_slices"]

_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


def _suffixes(m: nn.RNNBase) -> list[str]:
    return ["", "_reverse"][: 2 if m.bidirectional else 1]


def input_slices(name: str, m: nn.RNNBase, st: Stream) -> tuple[list[SliceSpec], list[EditSpec]]:
    """The input-width slices of recurrent layer ``m`` for the stream ``st`` of its input."""
    p = f"{name}." if name else ""
    slices = [st.slice(f"{p}weight_ih_l0{sfx}", 1) for sfx in _suffixes(m)]
    return slices, [EditSpec(name, "input_size", m.input_size, st.per_unit)]


def hidden_slices(name: str, m: nn.RNNBase) -> tuple[int, list[SliceSpec], list[EditSpec]]:
    """The hidden units of recurrent layer ``m``: ``(hidden_size, slices, edits)``."""
    gates = _GATES.get(m.mode)
    if gates is None:
        raise PlanningError(f"module {name!r}: recurrent mode {m.mode!r} is not known")
    p = f"{name}." if name else ""
    h, proj = m.hidden_size, getattr(m, "proj_size", 0)
    rows = {"tiles": gates, "tile_stride": h} if gates > 1 else {}
    dirs = len(_suffixes(m))
    slices: list[SliceSpec] = []
    for layer in range(m.num_layers):
        for sfx in _suffixes(m):
            tail = f"l{layer}{sfx}"
            slices.append(SliceSpec(f"{p}weight_ih_{tail}", 0, **rows))
            slices.append(SliceSpec(f"{p}weight_hh_{tail}", 0, **rows))
            if m.bias:
                slices.append(SliceSpec(f"{p}bias_ih_{tail}", 0, **rows))
                slices.append(SliceSpec(f"{p}bias_hh_{tail}", 0, **rows))
            if proj:
                slices.append(SliceSpec(f"{p}weight_hr_{tail}", 1))
            else:
                slices.append(SliceSpec(f"{p}weight_hh_{tail}", 1))
                if layer:
                    cols = {"tiles": dirs, "tile_stride": h} if dirs > 1 else {}
                    slices.append(SliceSpec(f"{p}weight_ih_{tail}", 1, **cols))
    return h, slices, [EditSpec(name, "hidden_size", h)]


class RecurrentRule(Rule):
    """``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` (see the module doc)."""

    def propagate(self, call: Call) -> Any:
        m, name = call.module, call.name
        if call.labelled:
            x = call.x
            if not call.x_only:
                call.block_all(f"they reach {call.where} as an initial state")
            elif call.xmeta is None or not hasattr(call.xmeta, "__len__") or \
                    x.axes != (len(call.xmeta) - 1,):
                call.block(x, f"{call.where} reads them on an axis other than its features")
            else:
                call.per_root(x, lambda st: input_slices(name, m, st))
        arr = call.units(lambda: hidden_slices(name, m))
        out = call.out
        if arr is None or not isinstance(out, list) or len(out) != 2:
            return None
        proj = getattr(m, "proj_size", 0)
        dirs = len(_suffixes(m))
        seq = None if proj else Lab((len(out[0]) - 1,), np.tile(arr, dirs))
        if m.mode == "LSTM":
            h_n, c_n = out[1]
            return [seq, [None if proj else Lab((len(h_n) - 1,), arr), Lab((len(c_n) - 1,), arr)]]
        return [seq, Lab((len(out[1]) - 1,), arr)]


builtin([nn.RNNBase], rule=RecurrentRule())
