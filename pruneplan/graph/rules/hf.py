"""Hugging Face ``transformers.pytorch_utils.Conv1D`` (GPT-2 & co.): a Linear whose weight is
stored ``(in, out)`` and whose forward is ``addmm(bias, x, weight)``.

As a root (units on its output's last axis) it owns columns of ``weight`` (axis 1) and
``bias``, and ``nf`` shrinks; as a consumer (labels on its input's last axis) it owns rows of
``weight`` (axis 0), and ``nx`` shrinks. The rule is registered by the class's name, so
transformers is never imported by pruneplan; modules of that type are recorded as single nodes.
"""

from __future__ import annotations

from torch import nn

from pruneplan.graph._labels import Lab
from pruneplan.graph._streams import Stream
from pruneplan.graph.rules.base import Call, Rule, builtin_by_name
from pruneplan.graph.spec import EditSpec, SliceSpec

__all__ = ["HFConv1DRule"]

CONV1D = "transformers.pytorch_utils.Conv1D"


def _root(name: str, m: nn.Module) -> tuple[int, list[SliceSpec], list[EditSpec]]:
    p = f"{name}." if name else ""
    slices = [SliceSpec(p + "weight", 1)]
    if getattr(m, "bias", None) is not None:
        slices.append(SliceSpec(p + "bias", 0))
    return m.nf, slices, [EditSpec(name, "nf", m.nf)]


def _consumer(name: str, m: nn.Module, st: Stream) -> tuple[list[SliceSpec], list[EditSpec]]:
    p = f"{name}." if name else ""
    edits = [EditSpec(name, "nx", m.nx, st.per_unit)] if isinstance(getattr(m, "nx", None), int) else []
    return [st.slice(p + "weight", 0)], edits


class HFConv1DRule(Rule):
    """``transformers.pytorch_utils.Conv1D`` (see the module doc)."""

    def propagate(self, call: Call) -> Lab | None:
        m, name = call.module, call.name
        out = call.root(-1, lambda: _root(name, m))
        x = call.x
        if isinstance(x, Lab):
            if not call.x_only:
                call.block_all(f"they reach {call.where} in an argument pruneplan does not follow")
            elif x.axes != (len(call.xmeta) - 1,):
                call.block(x, f"{call.where} reads them on an axis other than its features")
            else:
                call.per_root(x, lambda st: _consumer(name, m, st))
        return out


builtin_by_name(CONV1D, HFConv1DRule())
