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

import copy
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from pruneplan.hf_config import get_value
from pruneplan.plan import ConfigChange, ConfigEdits, PrunePlan

log = logging.getLogger(__name__)

_MISREAD = "the config does not describe this model's layers"
_MAX_TRIES = 24


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _built(model: nn.Module, config: Any, values: Mapping[str, Any]) -> nn.Module | str:
    """``type(model)`` built on ``meta`` from ``config`` with ``values`` changed (keys as
    `pruneplan.hf_config.set_value` takes them); the error text when that fails."""
    from pruneplan.hf_config import set_value

    data = copy.deepcopy(config.to_dict())
    try:
        for key, value in values.items():
            set_value(data, key, value)
        cfg = type(config).from_dict(data)
        with torch.device("meta"):
            return type(model)(cfg)
    except Exception as exc:  # the model's own code refuses the config
        return f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"


def _shapes_of(model: nn.Module, config: Any, values: Mapping[str, Any]) -> dict[str, list[int]] | str:
    """State-dict shapes of the model `_built` from the config; the error text when that fails."""
    built = _built(model, config, values)
    if isinstance(built, str):
        return built
    return {k: list(v.shape) for k, v in built.state_dict().items()}


#: attributes attention modules keep their head count in
_HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_heads", "n_head")


def _head_counts(model: nn.Module, plan: PrunePlan) -> dict[str, tuple[str, int, int]]:
    """Attention module -> (attribute, heads before, heads the plan leaves) for every head
    group of the plan whose attention module keeps its head count in an attribute."""
    out = {}
    for g in plan.groups:
        if g.kind not in ("heads", "query_groups"):
            continue
        attn = g.name.rpartition(".")[0]
        try:
            m = model.get_submodule(attn)
        except AttributeError:
            continue
        attr = next((a for a in _HEAD_ATTRS if _int(getattr(m, a, None))), None)
        if attr is None:
            continue
        n = getattr(m, attr)
        if g.kind == "heads" and g.size == n:
            out[attn] = (attr, n, n - len(g.removed))
        elif g.kind == "query_groups" and n % g.size == 0:
            out[attn] = (attr, n, (g.size - len(g.removed)) * (n // g.size))
    return out


def _heads_wrong(built: nn.Module, counts: Mapping[str, tuple[str, int, int]]) -> dict[str, int | None]:
    """Attention module -> the head count the built model gives it, where that is not the
    count the plan leaves (same shapes can hold 2 heads of 16 or 4 of 8)."""
    out = {}
    for attn, (attr, _, after) in counts.items():
        try:
            got = getattr(built.get_submodule(attn), attr, None)
        except AttributeError:
            got = None
        if got != after:
            out[attn] = got
    return out


def _fix_heads(model: nn.Module, config: Any, base: Mapping[str, Any], plan: PrunePlan,
               values: dict[str, Any], changes: list[ConfigChange], expected: Mapping[str, list[int]]
               ) -> str | None:
    """Make the head counts of the model built from the config those the plan leaves, by
    setting the head-count keys (`pruneplan.hf_config.HEADS_KEYS`, at the top or in a nested
    config such as CLIP's ``text_config``) that hold the count before pruning; ``values`` and
    ``changes`` are updated. Returns why it cannot (None: the counts agree)."""
    from pruneplan.hf_config import HEADS_KEYS

    counts = _head_counts(model, plan)
    if not counts:
        return None
    built = _built(model, config, values)
    if isinstance(built, str):
        return None
    wrong = _heads_wrong(built, counts)
    if not wrong:
        return None
    keys = [k for k in HEADS_KEYS if k in base] + [
        f"{top}.{k}" for top, v in base.items() if isinstance(v, Mapping) for k in HEADS_KEYS if k in v]
    for key in keys:
        if key in values or not wrong:
            continue
        before = _int(get_value(base, key))
        afters = {counts[a][2] for a in wrong if counts[a][1] == before}
        if before is None or len(afters) != 1:
            continue
        trial = {**values, key: afters.pop()}
        built = _built(model, config, trial)
        if isinstance(built, str):
            continue
        now = _heads_wrong(built, counts)
        shapes = {k: list(v.shape) for k, v in built.state_dict().items()}
        if len(now) < len(wrong) and not _wrong(expected, shapes):
            values[key] = trial[key]
            changes.append(ConfigChange(key=key, before=before, after=trial[key]))
            wrong = now
    if wrong:
        attn = sorted(wrong)[0]
        return (f"no config key holds the head count of {len(wrong)} attention modules (e.g. "
                f"{attn!r} keeps {counts[attn][2]} of {counts[attn][1]} heads, a model built from "
                f"the rewritten config has {wrong[attn]})")
    return None


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
        elif isinstance(v, Mapping):  # a nested config (CLIP's text_config, vision_config)
            ints += [(f"{key}.{k}", None, e) for k, e in v.items()
                     if _int(e) and (f"{key}.{k}", None) not in changed]
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
            lst = list(out.get(key, get_value(config, key)))
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
                    before = _int(get_value(base, key)) if i is None else base[key][i]
                    changes.append(ConfigChange(key=key if i is None else f"{key}[{i}]",
                                                before=before, after=new))
                wrong, progress = now, True
                break
        if not progress:
            break
    why = _fix_heads(model, config, base, plan, values, changes, expected) if not wrong else None
    if why is not None:
        kept.append(why)
    same = {(c.key, c.before, c.after) for c in changes} == {
        (c.key, c.before, c.after) for c in (edits.changes if edits is not None else [])}
    if not wrong and why is None and edits is not None and not misread and same:
        return edits, {}
    if not wrong and why is None and edits is None and not changes:
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
