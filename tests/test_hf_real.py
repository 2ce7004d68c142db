"""The Hugging Face architecture sweep as a test (tests/hf_models.py; benchmarks/hf_coverage.py
writes the same check's table to docs/hf_coverage.md).

Per architecture, built small from a config (random weights, nothing downloaded): discovery;
heads and MLP widths pruned equal to the original with those units zeroed; every group (hidden
size included) pruned, the config holding it; ``save_pretrained`` + ``from_pretrained`` and
``pruneplan apply`` on the saved folder + ``from_pretrained`` give the live pruned model's
output; at least 20% fewer parameters. Marked ``real`` (``pytest -m real``): the subset
``hf_models.REAL`` of the architectures that pass, about two seconds each; the whole sweep,
with the reasons of those that fail today (``hf_models.XFAIL``), is
``python benchmarks/hf_coverage.py``. The xfail marks are kept for an architecture added to
the subset while it fails (strict: one that starts passing must lose its mark).
"""

from __future__ import annotations

import builtins
from pathlib import Path

import pytest
from hf_models import MIN_PARAM_DROP, MODELS, REAL, HFModel, check

import pruneplan.errors

pytestmark = pytest.mark.real


def _param(spec: HFModel):
    marks = []
    if spec.xfail:
        name, reason = spec.xfail
        exc = getattr(builtins, name, None) or getattr(pruneplan.errors, name)
        marks = [pytest.mark.xfail(strict=True, raises=exc, reason=reason)]
    return pytest.param(spec, id=spec.name, marks=marks)


@pytest.mark.parametrize("spec", [_param(s) for s in MODELS if s.name in REAL])
def test_architecture_prunes_and_round_trips(spec: HFModel, tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    result = check(spec, tmp_path)
    assert result.drop >= MIN_PARAM_DROP, (
        f"parameters fell by {result.drop:.1%} ({result.before:,} -> {result.after:,})")
