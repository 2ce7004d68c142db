"""``torch.einsum``: channels on an index that the output keeps follow into the output.

An einsum is a sum of products taking one element from each operand, the element at the same
index values: output position ``j`` along an index that the output keeps reads position ``j``
of every operand that has the index, and nothing else along it. Units on such an index therefore
follow (zeroing them zeroes their output positions); other labelled operands meeting them on
the same index are tied to them, a parameter there is sliced with them, and a tensor holding the
same values at every position of the index (or of length 1 there) is left alone; any other
tensor there blocks them. Units on a summed index, on a repeated index (a diagonal), or on two
different indices block; so does an equation with an ellipsis.
"""

from __future__ import annotations

from typing import Any

from pruneplan.graph._ir import Ref
from pruneplan.graph._labels import Lab, PView, roots_of
from pruneplan.graph.rules.attention import uniform_along
from pruneplan.graph.rules.base import Call, FunctionRule, builtin

__all__ = ["EinsumRule"]


def _parse(call: Call) -> tuple[list[str], str, list[Any]] | None:
    """The operand subscripts, the output subscripts and the operands (``None``: unreadable)."""
    eq = call.arg(0, "equation")
    ops = list(call.node.args[1:])
    if len(ops) == 1 and isinstance(ops[0], tuple | list):
        ops = list(ops[0])
    if not isinstance(eq, str) or "." in eq:
        return None
    eq = eq.replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    terms = lhs.split(",")
    if not arrow:  # implicit output: the indices met once, in alphabetical order
        rhs = "".join(sorted(c for c in set(lhs) - {","} if lhs.count(c) == 1))
    if len(terms) != len(ops) or not all(isinstance(o, Ref) for o in ops):
        return None
    if any(not isinstance(call.meta(o), tuple) or len(call.meta(o)) != len(t)
           for o, t in zip(ops, terms, strict=True)):
        return None
    return terms, rhs, ops


class EinsumRule(FunctionRule):
    """``torch.einsum(equation, *operands)``: see the module docstring."""

    def labels(self, call: Call) -> Lab | None:
        parsed = _parse(call)
        if parsed is None:
            call.block_all(f"they reach {call.where}, whose equation pruneplan cannot read "
                           "(an ellipsis, or operands it does not see)")
            return None
        terms, rhs, ops = parsed
        infos = [call.read(o) for o in ops]
        labelled = [(t, i) for t, i in zip(terms, infos, strict=True) if isinstance(i, Lab)]
        letters = {t[a] for t, lab in labelled for a in lab.axes}
        if len(letters) != 1 or any(len(lab.axes) != 1 for _, lab in labelled):
            call.block_all(f"{call.where} meets them on several indices")
            return None
        (letter,) = letters
        if any(t.count(letter) > 1 for t in terms):
            call.block_all(f"{call.where} takes a diagonal along them")
            return None
        if letter not in rhs:
            call.block_all(f"{call.where} sums over them")
            return None
        arrs = [lab.arr for _, lab in labelled]
        if len({len(a) for a in arrs}) != 1:
            call.block_all(f"{call.where} broadcasts them against each other")
            return None
        arr = arrs[0] if len(arrs) == 1 else call.tie(arrs)
        if arr is None:
            return None
        for term, info, ref in zip(terms, infos, ops, strict=True):
            if isinstance(info, Lab) or letter not in term:
                continue
            d = term.index(letter)
            if call.meta(ref)[d] == 1:
                continue
            if isinstance(info, PView) and info.dims[d] is not None:
                call.own(info.key, info.dims[d], arr)
            elif not uniform_along(call, ref, d):
                call.block(roots_of(arr), f"{call.where} meets them with a tensor no prunable "
                           "layer owns")
                return None
        return Lab((rhs.index(letter),), arr)


builtin(names=("einsum",), rule=EinsumRule())
