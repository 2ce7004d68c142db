"""Hugging Face configs: which ``config.json`` keys a plan's pruned widths change.

This module knows nothing of torch or transformers: it reads a config as a plain mapping
(``config.to_dict()`` or the parsed ``config.json``) and the tensor shapes before and after a
plan, and measures, per layer, the widths a config describes:

=================  ==========================================================  ==============
width              measured on (state-dict key, axis)                          config keys
=================  ==========================================================  ==============
hidden size        ``*embed_tokens/word_embeddings/wte/shared.weight`` axis 1,  ``hidden_size``
                   ``*patch_embeddings.projection.weight`` axis 0               ``n_embd``
                                                                                ``d_model`` ``dim``
MLP width          ``*.up_proj/gate_proj/fc1/dense_h_to_4h.weight`` axis 0,     ``intermediate_size``
                   ``*.c_fc.weight`` axis 1 (GPT-2 ``Conv1D``),                 ``n_inner`` ``d_ff``
                   ``*.intermediate.dense.weight``, ``*.DenseReluDense.wi*``,   ``hidden_dim``
                   ``*.ffn.lin1.weight`` axis 0                                 ``ffn_dim``
                                                                                ``ffn_hidden_size``
query heads        ``*.q_proj/query/q/q_lin.weight`` axis 0, ``*.c_attn.weight``  ``num_attention_heads``
                   axis 1 / 3, divided by the head size; ``*.query_key_value``  ``n_head`` ``num_heads``
                   ``.weight`` axis 0 in the layout of `_fused_heads`           ``n_heads``
key/value heads    ``*.k_proj.weight`` axis 0 / head size                       ``num_key_value_heads``
                   ``*.query_key_value.weight`` (`_fused_heads`)                ``num_kv_heads``
=================  ==========================================================  ==============

The head size is the config's ``head_dim`` (``d_kv`` for T5), or ``hidden / heads``. A width that
is the same in every layer becomes a `ConfigChange` with ``after``; widths that differ between
layers are recorded per layer (the config cannot hold them). When the hidden size changes and
the config has (or, for Llama-style configs with ``num_key_value_heads``, reads) ``head_dim``,
``head_dim`` is written explicitly, because those models derive it from the hidden size when it
is absent. Configs that derive the head size from ``hidden / heads`` with no ``head_dim`` (BERT,
GPT-2, ViT, DistilBERT) cannot describe pruned heads or a hidden size that no longer equals
``heads * head size``: that is recorded in ``unsupported``.

Grouped-query attention is checked here too: every key/value head must keep the same number of
query heads, and a removed key/value head takes all its query heads with it; otherwise
`ConfigError` names the layer.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

from pruneplan.errors import ConfigError, PlanMismatchError
from pruneplan.plan import ConfigChange, ConfigEdits, PrunePlan

__all__ = [
    "HEADS_KEYS",
    "HIDDEN_KEYS",
    "INTERMEDIATE_KEYS",
    "apply_config_edits",
    "config_edits",
    "config_role",
    "get_value",
    "heads_left",
    "hidden_fits",
    "layer_widths",
    "set_value",
    "split_key",
    "twin_keys",
]

log = logging.getLogger(__name__)

HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model", "dim")
INTERMEDIATE_KEYS = ("intermediate_size", "n_inner", "d_ff", "hidden_dim", "ffn_dim", "ffn_hidden_size")
HEADS_KEYS = ("num_attention_heads", "n_head", "num_heads", "n_heads", "encoder_attention_heads",
              "decoder_attention_heads")
KV_KEYS = ("num_key_value_heads",)
HEAD_DIM_KEYS = ("head_dim", "d_kv")

# (pattern, axis, divisor): the named group "layer" is the module the width belongs to
_Pattern = tuple[re.Pattern[str], int, int]


def _p(text: str, axis: int, div: int = 1) -> _Pattern:
    return re.compile(text), axis, div


_HIDDEN = [
    _p(r"^(?P<layer>(?:.+\.)?(?:embed_tokens|word_embeddings|wte|embed_in|shared))\.weight$", 1),
    _p(r"^(?P<layer>(?:.+\.)?patch_embeddings\.projection)\.weight$", 0),
]
_INTERMEDIATE = [
    _p(r"^(?P<layer>.+)\.(?:up_proj|gate_proj|fc1|dense_h_to_4h)\.weight$", 0),
    _p(r"^(?P<layer>.+)\.c_fc\.weight$", 1),
    _p(r"^(?P<layer>.+)\.intermediate\.dense\.weight$", 0),
    _p(r"^(?P<layer>.+)\.DenseReluDense\.wi(?:_0|_1)?\.weight$", 0),
    _p(r"^(?P<layer>.+)\.ffn\.lin1\.weight$", 0),
]
_QUERY = [
    _p(r"^(?P<layer>.+)\.(?:q_proj|query|q|q_lin)\.weight$", 0),
    _p(r"^(?P<layer>.+)\.c_attn\.weight$", 1, 3),
]
_KEY = [_p(r"^(?P<layer>.+)\.k_proj\.weight$", 0)]
#: q, k and v in one projection (Falcon, GPT-NeoX, BLOOM): the heads follow from its rows and
#: the layout the config's flags give (`_fused_heads`)
_FUSED = [_p(r"^(?P<layer>.+)\.query_key_value\.weight$", 0)]
#: the key/value head count of a fused projection's config (Falcon)
_FUSED_KV_KEY = "num_kv_heads"


def config_role(tensor: str) -> str | None:
    """Which config width a weight's output belongs to: ``"hidden"``, ``"intermediate"``,
    ``"heads"`` or ``"kv_heads"`` (by the patterns of the module docstring), else ``None``."""
    for role, patterns in (("hidden", _HIDDEN), ("intermediate", _INTERMEDIATE), ("heads", _QUERY),
                           ("heads", _FUSED), ("kv_heads", _KEY)):
        if any(p.match(tensor) for p, _, _ in patterns):
            return role
    return None


def _key(config: Mapping[str, Any], names: Sequence[str]) -> str | None:
    """The first of ``names`` present in ``config`` (even with a null value)."""
    return next((n for n in names if n in config), None)


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def hidden_fits(config: Mapping[str, Any], hidden: int, heads: int) -> bool:
    """Whether ``config`` can describe a hidden size ``hidden`` with ``heads`` query heads of
    the model's head size (the checks of `config_edits`):

    * T5-style (``d_kv``): always;
    * no ``head_dim`` and no ``num_key_value_heads`` (BERT, GPT-2, ViT, DistilBERT: the head
      size is derived as hidden / heads): only ``hidden == heads * head size``;
    * otherwise (Llama validates ``hidden_size % num_attention_heads == 0``): a multiple of
      ``heads``.
    """
    hd_key = _key(config, HEAD_DIM_KEYS)
    if hd_key == "d_kv" or heads < 1:
        return True
    if (hd_key is None or _int(config.get(hd_key)) is None) and _key(config, KV_KEYS) is None:
        hidden_key, heads_key = _key(config, HIDDEN_KEYS), _key(config, HEADS_KEYS)
        h0 = _int(config.get(hidden_key)) if hidden_key else None
        n0 = _int(config.get(heads_key)) if heads_key else None
        if not h0 or not n0 or h0 % n0:
            return True  # not a config this check understands
        return hidden == heads * (h0 // n0)
    return hidden % heads == 0


def layer_widths(
    patterns: Sequence[_Pattern], shapes: Mapping[str, Sequence[int]]
) -> dict[str, tuple[int, str]]:
    """Layer -> (width, the tensor it was read from) for every tensor matching ``patterns``.

    Raises:
        ConfigError: two tensors of one layer disagree (e.g. ``gate_proj`` and ``up_proj``).
    """
    out: dict[str, tuple[int, str]] = {}
    for key in sorted(shapes):
        for pattern, axis, div in patterns:
            m = pattern.match(key)
            if m is None or len(shapes[key]) <= axis:
                continue
            width, rest = divmod(int(shapes[key][axis]), div)
            if rest:
                raise ConfigError(f"tensor {key!r} axis {axis} has length {shapes[key][axis]}, "
                                  f"not a multiple of {div}")
            layer = m.group("layer")
            if layer in out and out[layer][0] != width:
                raise ConfigError(
                    f"layer {layer!r}: {out[layer][1]!r} is {out[layer][0]} wide but {key!r} is "
                    f"{width}; the config cannot hold both"
                )
            out.setdefault(layer, (width, key))
            break
    return out


def config_edits(
    config: Mapping[str, Any],
    shapes: Mapping[str, Sequence[int]],
    plan: PrunePlan,
    tied: Mapping[str, str] | None = None,
    saved_names: Mapping[str, str] | None = None,
) -> ConfigEdits | None:
    """The config changes ``plan`` implies for a model with this ``config`` and these weights.

    Args:
        config: the Hugging Face config as a mapping (``config.to_dict()``, or ``config.json``).
        shapes: every tensor of the source weights, state-dict key -> shape.
        plan: the plan; its pruned shapes are measured against ``shapes``.
        tied: state-dict keys sharing their tensor with an earlier key (alias -> source),
            recorded in the result.
        saved_names: state-dict key -> the name ``save_pretrained`` stores it under, for the
            keys it renames (`pruneplan.planner.saved_names`), recorded in the result.

    Returns:
        The changes, or ``None`` when the plan changes no width the config describes (and no
        tied keys or saved names are given).

    Raises:
        ConfigError: grouped-query attention left uneven by the removed heads (the message
            names the layer), or the tensors of one layer disagree on a width.
    """
    pruned = {**{k: list(v) for k, v in shapes.items()}, **plan.pruned_shapes()}
    model_type = config.get("model_type") if isinstance(config.get("model_type"), str) else None
    changes: list[ConfigChange] = []
    unsupported: list[str] = []

    def uniform(key: str, role: str, before_cfg: Any, widths: dict[str, tuple[int, int]]) -> int | None:
        """Record the change of ``key``; return the new common width (None: unchanged/per layer)."""
        if not widths or all(b == a for b, a in widths.values()):
            return None
        expected = _int(before_cfg)
        wrong = {layer: b for layer, (b, _) in widths.items() if expected is not None and b != expected}
        if wrong:
            layer, b = next(iter(sorted(wrong.items())))
            unsupported.append(
                f"{key}: the config says {expected} but layer {layer!r} has {role} {b} before "
                "pruning; the config does not describe this model's layers"
            )
            return None
        after = {layer: a for layer, (_, a) in widths.items()}
        if len(set(after.values())) == 1:
            value = next(iter(after.values()))
            changes.append(ConfigChange(key=key, before=expected, after=value))
            return value
        changes.append(ConfigChange(key=key, before=expected, per_layer=after))
        return None

    def measure(patterns: Sequence[_Pattern], div: int = 1) -> dict[str, tuple[int, int]]:
        before = layer_widths(patterns, shapes)
        after = layer_widths(patterns, pruned)
        out = {}
        for layer, (b, key) in before.items():
            a = after[layer][0]
            if b % div or a % div:
                raise ConfigError(
                    f"layer {layer!r}: {key!r} keeps {a} of {b} positions, not whole heads of {div}; "
                    "the config cannot describe a pruned head dimension"
                )
            out[layer] = (b // div, a // div)
        return out

    hidden_key = _key(config, HIDDEN_KEYS)
    inter_key = _key(config, INTERMEDIATE_KEYS)
    heads_key = _key(config, HEADS_KEYS)
    kv_key = _key(config, KV_KEYS)
    hd_key = _key(config, HEAD_DIM_KEYS)

    hidden_before = _int(config.get(hidden_key)) if hidden_key else None
    hidden_after = hidden_before
    if hidden_key is not None:
        widths = measure(_HIDDEN)
        # one hidden size for the whole model: every embedding is a "layer" of the same key
        new = uniform(hidden_key, "hidden size", hidden_before, widths)
        if new is not None:
            hidden_after = new
        elif any(b != a for b, a in widths.values()):
            hidden_after = None  # per layer or unsupported: recorded above
    if inter_key is not None:
        inter = measure(_INTERMEDIATE)
        uniform(inter_key, "MLP width", config.get(inter_key), inter)
        after_widths = {a for _, a in inter.values()}
        if (config.get(inter_key) is None and hidden_after != hidden_before and len(after_widths) == 1
                and not any(c.key == inter_key for c in changes)):
            # a null MLP width is derived from the hidden size (GPT-2: n_inner = 4 * n_embd):
            # with the hidden size pruned, the width the MLP keeps is written explicitly
            changes.append(ConfigChange(key=inter_key, before=None, after=after_widths.pop()))

    heads_before = _int(config.get(heads_key)) if heads_key else None
    head_dim = _int(config.get(hd_key)) if hd_key else None
    if head_dim is None and hidden_before and heads_before and hidden_before % heads_before == 0:
        head_dim = hidden_before // heads_before
    heads_after = heads_before
    q: dict[str, tuple[int, int]] = {}
    if heads_key is not None and head_dim:
        q = measure(_QUERY, head_dim)
        fused_q, fused_kv = _fused_heads(config, shapes, pruned, head_dim, heads_before)
        q.update(fused_q)
        new = uniform(heads_key, "query heads", heads_before, q)
        if new is not None:
            heads_after = new
        elif not q and heads_before:
            # no query projection under a name the table reads (DeBERTa's query_proj): the
            # plan's head groups say how many query heads remain
            left = heads_left(plan, heads_before)
            if left is not None and left != heads_before:
                changes.append(ConfigChange(key=heads_key, before=heads_before, after=left))
                heads_after = left
        k = measure(_KEY, head_dim) if kv_key else {}
        if kv_key is not None:
            uniform(kv_key, "key/value heads", config.get(kv_key), k)
        if fused_kv and _FUSED_KV_KEY in config:
            uniform(_FUSED_KV_KEY, "key/value heads", config.get(_FUSED_KV_KEY), fused_kv)
        _check_gqa(plan, shapes, q, k, head_dim)

    if heads_key is not None and heads_after != heads_before and heads_after:
        # the other head-count keys holding the same count (BART's encoder_attention_heads and
        # decoder_attention_heads) change with it: a model built with the old count there
        # would split the pruned projections into heads of another size
        for twin in twin_keys(config, heads_key):
            if not any(c.key == twin for c in changes):
                changes.append(ConfigChange(key=twin, before=heads_before, after=heads_after))
    hidden_changed = hidden_after != hidden_before
    heads_changed = heads_after != heads_before
    if (hidden_changed or heads_changed) and hidden_after and heads_after and head_dim:
        derived = hidden_after // heads_after if hidden_after % heads_after == 0 else None
        if hd_key is None or _int(config.get(hd_key)) is None:  # the head size is derived
            if hd_key is not None or kv_key is not None:
                # Llama-style models read head_dim when present (getattr(config, "head_dim", ...))
                if hidden_changed or derived != head_dim:
                    changes.append(ConfigChange(key=hd_key or "head_dim", before=None, after=head_dim))
            elif derived != head_dim:
                pruned = sorted(layer for layer, (b, a) in q.items() if b != a)
                where = (f"; layers {', '.join(pruned[:4])}{' ...' if len(pruned) > 4 else ''} "
                         f"keep {q[pruned[0]][1]} of {q[pruned[0]][0]} heads") if pruned else ""
                keep = hidden_before // heads_before * heads_after if heads_before else None
                unsupported.append(
                    f"{heads_key}/{hidden_key}: the {model_type or 'model'} config has no head_dim "
                    f"and derives the head size as {hidden_key} / {heads_key} = {hidden_after} / "
                    f"{heads_after}, but the pruned attention keeps heads of {head_dim}{where}. "
                    f"What works: prune only MLP and hidden channels for a checkpoint, or prune the "
                    f"hidden size with the heads so that {hidden_key} / {heads_key} stays {head_dim} "
                    f"({hidden_key} {keep} for {heads_after} heads), or use apply_plan on the live "
                    "model (its modules keep their own sizes; save_pretrained cannot reload it)"
                )

    if ((hidden_changed or heads_changed) and hidden_after and heads_after and hd_key != "d_kv"
            and hidden_after % heads_after and not any(r.startswith(f"{heads_key}/") for r in unsupported)):
        unsupported.append(
            f"{hidden_key} {hidden_after} is not a multiple of {heads_key} {heads_after}: "
            "transformers refuses such a config (it validates hidden size % heads == 0)"
        )

    if not changes and not unsupported and not tied and not saved_names:
        return None
    return ConfigEdits(model_type=model_type, changes=changes, unsupported=unsupported,
                       tied=dict(tied or {}), saved_names=dict(saved_names or {}))


def _fused_heads(
    config: Mapping[str, Any],
    shapes: Mapping[str, Sequence[int]],
    pruned: Mapping[str, Sequence[int]],
    head_dim: int,
    heads: int | None,
) -> tuple[dict[str, tuple[int, int]], dict[str, tuple[int, int]]]:
    """(query heads, key/value heads) per layer, before and after, of the fused q/k/v
    projections (``*.query_key_value.weight``, rows on axis 0), laid out as the config says:

    * ``new_decoder_architecture`` (Falcon 40B/180B): ``num_kv_heads`` groups of the group's
      query heads, its key and its value, ``(groups, heads / groups + 2, head_dim)``;
    * ``multi_query`` (Falcon 7B): every query head, then one key and one value head,
      ``(heads + 2, head_dim)`` (the key/value head is not counted: it stays);
    * otherwise (Falcon without either, GPT-NeoX, BLOOM): ``(heads, 3, head_dim)``, as many
      key/value heads as query heads.

    Raises:
        ConfigError: a projection keeps rows that are not whole heads (or query groups) of
            that layout, naming the layer.
    """
    before, after = layer_widths(_FUSED, shapes), layer_widths(_FUSED, pruned)
    new_arch = config.get("new_decoder_architecture") is True
    multi = config.get("multi_query") is True and not new_arch
    groups = _int(config.get(_FUSED_KV_KEY))
    q: dict[str, tuple[int, int]] = {}
    kv: dict[str, tuple[int, int]] = {}
    for layer, (rows, key) in before.items():
        kept = after[layer][0]
        if rows % head_dim or kept % head_dim:
            raise ConfigError(f"layer {layer!r}: {key!r} keeps {kept} of {rows} rows, not whole heads "
                              f"of {head_dim}")
        nb, na = rows // head_dim, kept // head_dim
        if new_arch:
            if not groups or not heads or heads % groups:
                continue  # not a layout this reading understands
            block = heads // groups + 2
            if nb % block or na % block:
                raise ConfigError(f"layer {layer!r}: {key!r} keeps {na} of {nb} heads, not whole query "
                                  f"groups of {block} (query heads, key, value)")
            q[layer] = (nb // block * (block - 2), na // block * (block - 2))
            kv[layer] = (nb // block, na // block)
        elif multi:
            q[layer] = (nb - 2, na - 2)
        else:
            if nb % 3 or na % 3:
                raise ConfigError(f"layer {layer!r}: {key!r} keeps {na} of {nb} heads' rows, not whole "
                                  "heads of query, key and value")
            q[layer] = (nb // 3, na // 3)
            kv[layer] = (nb // 3, na // 3)
    return q, kv


def twin_keys(config: Mapping[str, Any], key: str) -> list[str]:
    """The other keys of `HEADS_KEYS` in ``config`` holding the same count as ``key``."""
    v = _int(config.get(key))
    return [k for k in HEADS_KEYS if k != key and v is not None and _int(config.get(k)) == v]


def heads_left(plan: PrunePlan, heads: int) -> int | None:
    """The query heads the plan's head groups leave of ``heads``, when they all leave the same
    count: a group of kind ``"heads"`` with ``heads`` units (a unit is a query head), or of kind
    ``"query_groups"`` whose size divides ``heads`` (a unit is a key/value head with
    ``heads / size`` query heads). ``None`` when no group says, or the groups disagree."""
    left = set()
    for g in plan.groups:
        if g.kind == "heads" and g.size == heads:
            left.add(heads - len(g.removed))
        elif g.kind == "query_groups" and heads % g.size == 0:
            left.add((g.size - len(g.removed)) * (heads // g.size))
    return left.pop() if len(left) == 1 else None


def _check_gqa(
    plan: PrunePlan,
    shapes: Mapping[str, Sequence[int]],
    q: Mapping[str, tuple[int, int]],
    k: Mapping[str, tuple[int, int]],
    head_dim: int,
) -> None:
    """Every kept key/value head keeps the same number of query heads; removed ones keep none."""
    removed = plan.removed_by_axis()
    for layer in sorted(set(q) & set(k)):
        (hq, hq_after), (hk, hk_after) = q[layer], k[layer]
        if hk == hq or hk == 0 or hq % hk:
            continue  # not grouped-query attention (or not one we understand)
        per = hq // hk
        q_key = layer_widths(_QUERY, {t: v for t, v in shapes.items() if t.startswith(layer + ".")})[
            layer][1]
        k_key = f"{layer}.k_proj.weight"
        q_gone = {p // head_dim for p in removed.get((q_key, 0), [])}
        k_gone = {p // head_dim for p in removed.get((k_key, 0), [])}
        kept_per_group = {
            g: sum(1 for h in range(g * per, (g + 1) * per) if h not in q_gone) for g in range(hk)
        }
        orphans = sorted(g for g in k_gone if kept_per_group[g])
        if orphans:
            g = orphans[0]
            raise ConfigError(
                f"layer {layer!r}: key/value head {g} is removed but its query heads "
                f"{[h for h in range(g * per, (g + 1) * per) if h not in q_gone]} are kept; remove "
                "a key/value head together with all its query heads (a query group)"
            )
        counts = {g: n for g, n in kept_per_group.items() if g not in k_gone}
        if len(set(counts.values())) > 1:
            detail = ", ".join(f"{g}: {n}" for g, n in sorted(counts.items()))
            raise ConfigError(
                f"layer {layer!r}: grouped-query attention needs every key/value head to keep the "
                f"same number of query heads, this plan leaves {detail} (key/value head: query "
                f"heads kept; {hq_after} query heads for {hk_after} key/value heads)"
            )


_ELEMENT = re.compile(r"^(?P<name>[^\[\]]+)\[(?P<index>\d+)\]$")


def split_key(key: str) -> tuple[str, int | None]:
    """``"hidden_sizes[1]"`` -> ``("hidden_sizes", 1)`` (one integer of a list-valued key, as
    per-stage widths are held); ``"hidden_size"`` -> ``("hidden_size", None)``."""
    m = _ELEMENT.match(key)
    return (m.group("name"), int(m.group("index"))) if m else (key, None)


def _get(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)


def _parent(config: Any, key: str) -> tuple[Any, str]:
    """(the mapping or object holding the last part of a dotted ``key``, that part):
    ``"text_config.hidden_size"`` is ``hidden_size`` of the nested ``text_config``."""
    *path, last = key.split(".")
    obj = config
    for part in path:
        obj = _get(obj, part)
    return obj, last


def get_value(config: Any, key: str) -> Any:
    """The value of ``key`` (``name``, ``name[i]``, or a dotted path into a nested config,
    ``text_config.hidden_size``) in a config mapping or object; ``None`` when absent."""
    obj, last = _parent(config, key)
    if obj is None:
        return None
    name, i = split_key(last)
    v = _get(obj, name)
    if i is None:
        return v
    return v[i] if isinstance(v, list | tuple) and i < len(v) else None


def set_value(config: Any, key: str, value: Any) -> None:
    """Set ``key`` (``name``; ``name[i]``: a new list with element ``i`` replaced; a dotted
    path into a nested config) in a config mapping or object."""
    obj, last = _parent(config, key)
    name, i = split_key(last)
    if i is not None:
        old = _get(obj, name)
        value = [value if j == i else e for j, e in enumerate(old)]
    if isinstance(obj, Mapping):
        obj[name] = value  # type: ignore[index]
    else:
        setattr(obj, name, value)


def apply_config_edits(config: Mapping[str, Any], edits: ConfigEdits, where: str = "config") -> dict:
    """A copy of ``config`` with the plan's changes; nothing is changed on error.

    Raises:
        ConfigError: the config cannot express the pruned widths (different widths per layer,
            or ``edits.unsupported``); the message names the layers and their sizes.
        PlanMismatchError: a key does not hold the value the plan was made for.
    """
    problems = edits.problems()
    if problems:
        raise ConfigError(f"{where} cannot express the pruned model: " + "; ".join(problems))
    out = copy.deepcopy(dict(config))
    for c in edits.changes:
        current = get_value(out, c.key)
        if _int(current) != c.before or (c.before is None and current is not None):
            raise PlanMismatchError(
                f"{where}: {c.key} is {current!r}, the plan expects {c.before!r} (was the model "
                "already pruned?)"
            )
        set_value(out, c.key, c.after)
    return out
