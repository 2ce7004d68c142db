"""Check a plan's config changes by building the model the rewritten config describes.

`pruneplan.hf_config` reads widths off tensor names it knows (``up_proj``, ``q_proj``, ...). A
model whose widths live under other names or other config keys (``encoder_ffn_dim``,
``shared_expert_intermediate_size``, ``embedding_size``, a classifier's hidden layer sized by
``hidden_size``) would get a ``config.json`` that does not describe its pruned tensors, and the
folder would not load. So, for a live Hugging Face model, the rewritten config is built into a
model of the same class on the ``meta`` device (no memory, no weights) and its tensor shapes are
compared with the pruned ones:

* a mismatch that changing one integer key of the config fixes, without breaking any other
  tensor, adds that change (the key whose value is the tensor axis's length before pruning, or
  divides it: a head count);
* what remains is recorded in ``unsupported`` with the tensors and their shapes, so that
  `apply_plan` warns and applying the plan to a checkpoint folder is refused before anything is
  written (instead of a folder that ``from_pretrained`` cannot load).

Duck-typed on ``model.config`` (``to_dict`` and ``from_dict`` of its class); a model that cannot
be rebuilt from its own config is left to the table (logged at INFO).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from pruneplan.plan import ConfigChange, ConfigEdits, PrunePlan

log = logging.getLogger(__name__)

_MISREAD = "the config does not describe this model's layers"
_MAX_TRIES = 24


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _shapes_of(model: nn.Module, config: Any, values: Mapping[str, Any]) -> dict[str, list[int]] | str:
    """State-dict shapes of ``type(model)`` built on ``meta`` from ``config`` with ``values``
    changed; the error text when that fails."""
    data = {**config.to_dict(), **values}
    try:
        cfg = type(config).from_dict(data)
        with torch.device("meta"):
            built = type(model)(cfg)
    except Exception as exc:  # the model's own code refuses the config
        return f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
    return {k: list(v.shape) for k, v in built.state_dict().items()}


def _wrong(expected: Mapping[str, list[int]], got: Mapping[str, list[int]]) -> dict[str, list[int] | None]:
    return {k: got.get(k) for k, v in expected.items() if got.get(k) != v}


_Cand = tuple[str, "int | None", int]  # (key, list index or None, new value)


def _candidates(config: Mapping[str, Any], original: Mapping[str, list[int]],
                expected: Mapping[str, list[int]], wrong: Mapping[str, Any],
                changed: set[tuple[str, int | None]]) -> tuple[list[_Cand], list[_Cand]]:
    """Changes that could give the wrong tensors their pruned widths, as (exact, divided):
    *exact*, an integer key (or one integer of a list, ``hidden_sizes[1]``) equal to the axis's
    length ``n`` before pruning, set to the pruned length ``m``; *divided*, one whose value
    ``v`` divides ``n`` into parts of at least 8 (a head count; ``n / v`` the head size) with
    ``m`` a multiple of ``n / v``, set to ``m / (n / v)``. Keys already changed are skipped."""
    ints: list[tuple[str, int | None, int]] = []
    for key, v in config.items():
        if _int(v) and (key, None) not in changed:
            ints.append((key, None, v))
        elif isinstance(v, list) and v and all(_int(e) for e in v):
            ints += [(key, i, e) for i, e in enumerate(v) if (key, i) not in changed]
    exact: list[_Cand] = []
    divided: list[_Cand] = []
    for tensor in sorted(wrong):
        before, after = original.get(tensor), expected[tensor]
        if before is None or len(before) != len(after):
            continue
        for n, m in zip(before, after, strict=True):
            if n == m:
                continue
            for key, i, v in ints:
                if n % v or m % (n // v) or (v != n and (v < 2 or n // v < 8)):
                    continue
                cand = (key, i, m // (n // v))
                if cand not in exact and cand not in divided:
                    (exact if v == n else divided).append(cand)
    return exact, divided


def _heads_left(plan: PrunePlan, config: Mapping[str, Any]) -> tuple[str, int, int] | None:
    """(config key, heads before, heads after) from the plan's head groups
    (`pruneplan.hf_config.heads_left`) for a config holding one query-head count."""
    from pruneplan.hf_config import HEADS_KEYS, heads_left

    key = next((k for k in HEADS_KEYS if _int(config.get(k))), None)
    left = heads_left(plan, config[key]) if key is not None else None
    return None if left is None else (key, config[key], left)


def _with(values: Mapping[str, Any], config: Mapping[str, Any], cands: Sequence[_Cand]) -> dict[str, Any]:
    """``values`` with the candidate changes made (a list key: a new list, one element set)."""
    out = dict(values)
    for key, i, new in cands:
        if i is None:
            out[key] = new
        else:
            lst = list(out.get(key, config[key]))
            lst[i] = new
            out[key] = lst
    return out


def _verify(model: nn.Module, plan: PrunePlan, edits: ConfigEdits | None
            ) -> tuple[ConfigEdits | None, dict[str, tuple[list[int], list[int] | None]]]:
    """`verify_config`, and the tensors no key holds: key -> (pruned shape, built shape)."""
    config = getattr(model, "config", None)
    if not (callable(getattr(config, "to_dict", None))
            and callable(getattr(type(config), "from_dict", None))):
        return edits, {}
    pruned = plan.pruned_shapes()
    if not any(pruned[k] != list(v) for k, v in plan.model.tensors.items()):
        return edits, {}
    if edits is not None and (any(c.per_layer for c in edits.changes)
                              or any(_MISREAD not in u for u in edits.unsupported)):
        return edits, {}  # already refused, naming the layers and what works instead
    original = {k: list(v.shape) for k, v in model.state_dict().items()}
    expected = {**original, **pruned}
    base = config.to_dict()
    changes = list(edits.changes) if edits is not None else []
    # "the config says X but the layer has Y": the table misread this model; the build decides
    kept = [u for u in (edits.unsupported if edits is not None else []) if _MISREAD not in u]
    misread = [u for u in (edits.unsupported if edits is not None else []) if _MISREAD in u]
    values: dict[str, Any] = {c.key: c.after for c in changes if c.after is not None}
    heads = _heads_left(plan, base)
    if heads is not None:
        from pruneplan.hf_config import twin_keys

        key, before, after = heads
        for k in (key, *twin_keys(base, key)):
            if values.get(k, before) != after:
                # the tensors' shapes cannot tell 2 heads of 16 from 4 of 8: the head groups can
                changes = [c for c in changes if c.key != k]
                changes.append(ConfigChange(key=k, before=before, after=after))
                values[k] = after
    changed: set[tuple[str, int | None]] = {(k, None) for k in values}
    got = _shapes_of(model, config, values)
    if isinstance(got, str):
        if not values:
            log.info("could not rebuild %s from its config (%s); config changes not verified",
                     type(model).__name__, got)
            return edits, {}
        kept.append(f"a model built from the rewritten config fails: {got}")
        return _edits(edits, changes, kept, base), {}
    wrong = _wrong(expected, got)
    tries = 0
    while wrong and tries < _MAX_TRIES:
        exact, divided = _candidates(base, original, expected, wrong, changed)
        # one key, then two exact keys set to the same width (an embedding width and the first
        # stage's, equal before pruning and coupled by a residual sum)
        trials = [[c] for c in exact + divided] + [
            [a, b] for j, a in enumerate(exact) for b in exact[j + 1:] if a[2] == b[2]]
        progress = False
        for cands in trials:
            if tries >= _MAX_TRIES:
                break
            tries += 1
            trial_values = _with(values, base, cands)
            trial = _shapes_of(model, config, trial_values)
            if isinstance(trial, str):
                continue
            now = _wrong(expected, trial)
            if len(now) < len(wrong) and set(now) <= set(wrong):
                values = trial_values
                for key, i, new in cands:
                    changed.add((key, i))
                    before = _int(base.get(key)) if i is None else base[key][i]
                    changes.append(ConfigChange(key=key if i is None else f"{key}[{i}]",
                                                before=before, after=new))
                wrong, progress = now, True
                break
        if not progress:
            break
    same = {(c.key, c.before, c.after) for c in changes} == {
        (c.key, c.before, c.after) for c in (edits.changes if edits is not None else [])}
    if not wrong and edits is not None and not misread and same:
        return edits, {}
    if not wrong and edits is None and not changes:
        return None, {}
    if wrong:
        names = sorted(wrong)
        shown = "; ".join(f"{k} pruned to {expected[k]}, built {wrong[k]}" for k in names[:3])
        kept.append(
            f"no config key holds the pruned width of {len(names)} tensors (a model built from the "
            f"rewritten config differs: {shown}{' ...' if len(names) > 3 else ''}); prune them "
            "only on the live model, or leave their groups out (exclude)")
    elif misread:
        log.info("config widths found by rebuilding the model: %s",
                 ", ".join(f"{c.key}={c.after}" for c in changes))
    return _edits(edits, changes, kept, base), {k: (expected[k], wrong[k]) for k in wrong}


def verify_config(model: nn.Module, plan: PrunePlan, edits: ConfigEdits | None) -> ConfigEdits | None:
    """``edits`` checked against the model its config builds (module docstring): changes found
    for widths the name table missed are added, widths no key describes go to
    ``unsupported``. Returns ``edits`` unchanged when the model cannot be rebuilt or the plan
    changes no tensor shape. Raises nothing."""
    return _verify(model, plan, edits)[0]


def misfits(model: nn.Module, plan: PrunePlan) -> dict[str, tuple[list[int], list[int] | None]]:
    """The tensors whose pruned shape no config key can give (`verify_config`): state-dict key
    -> (pruned shape, the shape a model built from the rewritten config has). Empty for a model
    without a Hugging Face config, or one the table already refuses for another reason."""
    from pruneplan.hf_config import config_edits

    config = getattr(model, "config", None)
    if not callable(getattr(config, "to_dict", None)):
        return {}
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    return _verify(model, plan, config_edits(config.to_dict(), shapes, plan))[1]


def _edits(edits: ConfigEdits | None, changes: Sequence[ConfigChange], unsupported: list[str],
           config: Mapping[str, Any]) -> ConfigEdits:
    if edits is None:
        model_type = config.get("model_type")
        return ConfigEdits(model_type=model_type if isinstance(model_type, str) else None,
                           changes=list(changes), unsupported=unsupported)
    return edits.model_copy(update={"changes": list(changes), "unsupported": unsupported})
