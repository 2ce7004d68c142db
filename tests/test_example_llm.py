"""examples/llm.py in quick mode: a Llama-style model trained a few steps on the standard
library's sources, pruned through query groups, MLP and hidden size, its checkpoint folder
pruned by the CLI and loaded back with from_pretrained."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from timeouts import scaled

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]


def test_llm_example_quick(tmp_path: Path) -> None:
    out = tmp_path / "llm"
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "llm.py"), "--quick", "--out", str(out)],
                            capture_output=True, text=True, timeout=scaled(600),
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    # hidden 256 -> 192 (25%, a multiple of the 6 query heads left), 4 -> 3 key/value heads
    # (25% of the query groups, the same in every layer), MLP 768 -> 538 (30%)
    assert summary["config"] == {"hidden_size": 192, "intermediate_size": 538,
                                 "num_attention_heads": 6, "num_key_value_heads": 3, "head_dim": 32}
    assert 0.45 < summary["parameters_pruned"] / summary["parameters"] < 0.6
    assert summary["checkpoint_logits_equal"] is True
    assert "logits equal to the live model: True" in result.stdout
    assert (out / "pruned" / "config.json").exists()
    ppl = summary["perplexity"]
    assert all(1.0 < ppl[k] < 256.0 for k in ("trained", "pruned", "fine_tuned"))  # per byte
