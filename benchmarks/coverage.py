"""Discovery coverage on real model code: torchvision and timm models with random weights.

Run: ``.venv/bin/python benchmarks/coverage.py [--only NAME ...] [--no-torch-pruning]
[-o docs/coverage.md]``

For every model of tests/real_models.py (every torchvision classification family, one model of
each timm family), it runs the check of the real-model tests (30% of the units of every group,
plan, apply, replay on safetensors) with ``on_unsupported="skip"``, and writes a Markdown table:
groups, roots left out (with the reasons, grouped), parameters before and after, and, when
torch-pruning is installed (the ``bench`` extra), Torch-Pruning's result on the same model
(`MetaPruner`, L1 magnitude, ``pruning_ratio=0.3`` per layer, the classifier ignored) side by
side. Totals at the top: how many models pass (>= 20% fewer parameters, replay equal), and how
many roots were left out. Ratios are measured in the same run; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import re
import signal
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from real_models import ALL, MIN_PARAM_DROP, RATIO, RealModel, params, prune_and_replay  # noqa: E402


@dataclass
class Row:
    spec: RealModel
    status: str  # "pass", "low" (< 20% fewer parameters), "unsupported op" (with "error"), "error"
    groups: int = 0
    roots: int = 0
    left_out: list | None = None
    before: int = 0
    after: int = 0
    seconds: float = 0.0
    error: str = ""
    tp: str = ""


class CoverageTimeout(Exception):
    """A model took longer than ``--timeout`` seconds."""


class _deadline:
    """Context: raise `CoverageTimeout` after ``seconds`` (SIGALRM; Unix)."""

    def __init__(self, seconds: int) -> None:
        self.seconds = seconds

    def __enter__(self) -> None:
        def fire(*_: object) -> None:
            raise CoverageTimeout(f"over {self.seconds} s")

        self.old = signal.signal(signal.SIGALRM, fire)
        signal.alarm(self.seconds)

    def __exit__(self, *exc: object) -> None:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, self.old)


TIMEOUT = 180


def _short(text: str, n: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."


def _kind(reason: str) -> str:
    """A reason with module paths and numbers masked, to count reasons across a model."""
    return re.sub(r"'[^']*'", "'…'", re.sub(r"\d+", "N", reason.split(" (coupled with")[0]))


def ours(spec: RealModel) -> Row:
    """The test's check (``on_unsupported="error"``); when an unsupported operation stops it,
    the numbers come from a second run that leaves those roots out (``"skip"``)."""
    from pruneplan.errors import UnsupportedOperationError

    test_error = ""
    t0 = time.perf_counter()
    for mode in ("error", "skip"):
        with tempfile.TemporaryDirectory() as tmp:
            try:
                with _deadline(TIMEOUT):
                    o = prune_and_replay(spec, Path(tmp), on_unsupported=mode, check_drop=False)
                break
            except UnsupportedOperationError as exc:
                test_error = _short(f"UnsupportedOperationError: {exc}", 300)
            except Exception as exc:  # a failure is a row of the report, not the end of the run
                msg = f"{type(exc).__name__}: {exc}" if str(exc) else traceback.format_exc(limit=-1)
                return Row(spec, "error", error=_short(msg, 300), seconds=time.perf_counter() - t0)
    status = "pass" if o.drop >= MIN_PARAM_DROP and not test_error else "low"
    if test_error:
        status = "unsupported op"
    return Row(spec, status, o.groups, o.roots, o.left_out, o.params_before, o.params_after,
               time.perf_counter() - t0, error=test_error)


def _classifier(model: nn.Module) -> list[nn.Module]:
    """The layers whose outputs are the model's output (Torch-Pruning must be told)."""
    if hasattr(model, "get_classifier"):
        head = model.get_classifier()
        if isinstance(head, nn.Module) and any(True for _ in head.parameters()):
            return [m for m in head.modules() if isinstance(m, nn.Linear | nn.Conv2d)] or [head]
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not last:
        last = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    return last[-1:]


def run_torch_pruning(spec: RealModel) -> str:
    """Torch-Pruning's parameter drop on the same model, or why it failed."""
    try:
        import torch_pruning as tp
    except ImportError:
        return ""
    try:
        with _deadline(TIMEOUT):
            return _tp(tp, spec)
    except Exception as exc:
        return "fails: " + _short(f"{type(exc).__name__}: {exc}", 120)


def _tp(tp: Any, spec: RealModel) -> str:
    model, x = spec.build(seed=0), spec.example()
    before = params(model)
    with torch.no_grad():
        y0 = model(x)
    pruner = tp.pruner.MetaPruner(
        model, x, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=RATIO,
        ignored_layers=_classifier(model))
    pruner.step()
    with torch.no_grad():
        y1 = model(x)
    after = params(model)
    shape = "" if y1.shape == y0.shape else f", output {tuple(y1.shape)}"
    return f"{1 - after / before:.1%} ({after / 1e6:.2f}M{shape})"


def render(rows: list[Row], with_tp: bool, seconds: float) -> str:
    ok = [r for r in rows if r.status == "pass"]
    lines = ["# Discovery coverage on real model code", "",
             "Generated by `benchmarks/coverage.py` (random weights, nothing downloaded; "
             f"torch {torch.__version__}). Each model: {RATIO:.0%} of the units of every "
             "discovered group removed (a seeded random subset), plan applied, output shape "
             "checked, plan replayed on the saved safetensors weights (`load_pruned`) and "
             "compared. *pass*: replay equal and at least "
             f"{MIN_PARAM_DROP:.0%} fewer parameters; *unsupported op*: the default "
             "`on_unsupported=\"error\"` refuses, the numbers are with `\"skip\"`. Roots left out are counted per reason "
             "(module paths and numbers masked).", ""]
    for lib in ("torchvision", "timm"):
        sub = [r for r in rows if r.spec.library == lib]
        if not sub:
            continue
        n_ok = sum(r.status == "pass" for r in sub)
        left = sum(len(r.left_out or []) for r in sub)
        roots = sum(r.roots for r in sub)
        lines.append(f"- **{lib}**: {n_ok} of {len(sub)} models pass; {left} of {roots} roots "
                     "left out, every one with a reason.")
    lines += [f"- **total**: {len(ok)} of {len(rows)} models pass ({seconds:.0f} s for the "
              "whole run).", ""]
    head = "| model | family | groups | left out | parameters before | after | fewer | status |"
    sep = "|---|---|---|---|---|---|---|---|"
    if with_tp:
        head += " Torch-Pruning (30%/layer) |"
        sep += "---|"
    lines += [head, sep]
    for r in rows:
        if r.status == "error":
            cells = [r.spec.id, r.spec.family, "", "", "", "", "", f"error: {r.error}"]
        else:
            cells = [r.spec.id, r.spec.family, str(r.groups), f"{len(r.left_out or [])}/{r.roots}",
                     f"{r.before:,}", f"{r.after:,}", f"{1 - r.after / r.before:.1%}", r.status]
            if r.error:  # "unsupported op": the default refuses; the numbers are with "skip"
                cells[-1] = f"{r.status}: {_short(r.error, 200)}"
        if with_tp:
            cells.append(r.tp)
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    lines += ["", "## Roots left out, by reason", ""]
    for r in rows:
        if not r.left_out:
            continue
        counts = Counter(_kind(lo.reason) for lo in r.left_out)
        example = {}
        for lo in r.left_out:
            example.setdefault(_kind(lo.reason), lo)
        lines.append(f"**{r.spec.id}** ({len(r.left_out)} of {r.roots} roots):")
        lines.append("")
        for kind, n in counts.most_common():
            lo = example[kind]
            lines.append(f"- {n} x, e.g. `{lo.name}`: {_short(lo.reason, 300)}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    global TIMEOUT
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*", default=None, help="model names (or ids) to run")
    ap.add_argument("--no-torch-pruning", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--timeout", type=int, default=TIMEOUT, help="seconds per model and tool")
    ap.add_argument("-o", "--output", type=Path, default=ROOT / "docs" / "coverage.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    TIMEOUT = args.timeout
    warnings.filterwarnings("ignore")
    specs = [s for s in ALL if not args.only or s.name in args.only or s.id in args.only]
    rows, t0 = [], time.perf_counter()
    with_tp = not args.no_torch_pruning
    if with_tp:
        try:
            import torch_pruning  # noqa: F401  (only: is it installed)
        except ImportError:
            with_tp = False
    for spec in specs:
        try:
            __import__(spec.library)
        except ImportError:
            print(f"{spec.id}: {spec.library} not installed, skipped", flush=True)
            continue
        row = ours(spec)
        if with_tp:
            row.tp = run_torch_pruning(spec)
        rows.append(row)
        what = row.error if row.status == "error" else (
            f"{row.groups} groups, {len(row.left_out or [])}/{row.roots} left out, "
            f"{1 - row.after / row.before:.1%} fewer" + (f" [{row.error}]" if row.error else ""))
        print(f"{spec.id}: {row.status}: {what}; TP {row.tp} ({row.seconds:.1f} s)", flush=True)
    text = render(rows, with_tp, time.perf_counter() - t0)
    tmp = args.output.with_suffix(".md.tmp")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(text)
    tmp.replace(args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
