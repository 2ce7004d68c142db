"""The PrunePlan document: strict pydantic models, canonical JSON, digest and diff.

A plan is data, not code: it names every tensor slice, module attribute edit and dropout
change that one pruning step implies. This module knows nothing of torch.

Format (version 3), in prose; ``schemas/pruneplan.v3.schema.json`` is the generated schema
(``schemas/pruneplan.v1.schema.json`` and ``schemas/pruneplan.v2.schema.json`` are the frozen
schemas of versions 1 and 2).

* ``format`` is ``"pruneplan"`` and ``version`` is ``1``, ``2`` or ``3``. Version 2 adds group
  ``kind`` and the ``config`` part; version 3 adds ``config.saved_names`` and units that hold no
  position in a slice's explicit ``positions`` (a tensor only one part of a split reaches;
  earlier readers refuse an empty entry). A plan is written with
  the lowest version that can hold it, so a plan that uses none of these is still a version-1
  document, byte for byte as before.
* ``model`` fingerprints the source weights: ``tensors`` maps every state-dict key the plan
  touches to its original shape, ``digest`` is :func:`state_dict_digest` of the whole state dict,
  ``buffers`` (optional; absent in older plans) lists the touched tensors that are buffers
  (BatchNorm running statistics) rather than parameters.
* ``groups`` is one entry per pruning decision, listed in the order the model executes their
  roots: ``order`` (optional) is that rank, and the canonical form sorts groups by ``order``,
  then name (groups without ``order``, as in older plans, come last, by name). A group
  removes the units ``removed`` (sorted, unique, in ``[0, size)``, never all of them) of its
  root. Each ``TensorSlice`` says which positions of ``tensor`` along ``axis`` belong to
  each unit (:class:`IndexMap`); the applier
  deletes the positions of the removed units. ``edits`` change integer module attributes
  (``out_channels``, ``in_features``, ``num_features``, ``groups`` ...), or one integer of a
  tuple or list attribute, named ``"name[i]"`` (``"bias_shape[2]"``, ``"channel_splits[1]"``),
  and ``dropout`` changes dropout rates. When several groups edit the same attribute, their
  deltas add up.
* Slices of different groups on the same (tensor, axis) cover disjoint positions, so the order
  of groups never changes the result.
* ``kind`` (version 2) says what a group's units are: ``"channels"`` (output channels or
  neurons, the default, omitted from the JSON), ``"heads"`` (attention heads: a unit is every
  position of one head) or ``"query_groups"`` (a key/value head of grouped-query attention with
  its query heads).
* ``config`` (version 2, optional) records the changes to a Hugging Face ``config.json`` that the
  pruned widths imply: per key, the value before and after, or, where the config holds one value
  for all layers but the plan leaves layers of different widths, the width of every layer
  (``per_layer``); ``unsupported`` lists other reasons the config cannot describe the pruned
  model. Applying to a checkpoint folder rewrites ``config.json`` from it and refuses a plan whose
  widths the config cannot express (see `ConfigEdits.problems`). ``saved_names`` (version 3)
  maps the state-dict keys that ``save_pretrained`` stores under another name (transformers
  renames some models' keys on saving, e.g. ViT's ``vit.layers.0.attention.q_proj.weight`` is
  saved as ``vit.encoder.layer.0.attention.attention.query.weight``) to that name; the file
  appliers read and write a checkpoint under those names.
* ``provenance`` is informative only; the applier ignores it.

Loading is bounded and total: :meth:`PrunePlan.load` and :meth:`PrunePlan.from_json` raise
`PlanValidationError` for every malformed input. A plan file must be a regular file of at most
``MAX_PLAN_BYTES``; JSON may nest at most ``MAX_DEPTH`` levels; integers must fit in 64 bits
(``|n| <= MAX_INT``); floats must be finite; object keys must be unique; every string must be
encodable as UTF-8 (no lone surrogates). Validation works on ranges of positions, never on the
positions a declared size implies, so its time follows the plan's bytes; the ranges a plan may
declare are bounded by ``MAX_RANGES``. Messages quote at most a short prefix of a bad value.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from pruneplan.errors import PlanValidationError, quote

__all__ = [
    "FORMAT",
    "KINDS",
    "MAX_DEPTH",
    "MAX_INT",
    "MAX_PLAN_BYTES",
    "MAX_RANGES",
    "SUPPORTED_VERSIONS",
    "VERSION",
    "ConfigChange",
    "ConfigEdits",
    "DropoutChange",
    "Group",
    "GroupDiff",
    "IndexMap",
    "ModelFingerprint",
    "ModuleEdit",
    "PlanDiff",
    "Provenance",
    "PrunePlan",
    "TensorSlice",
    "canonical_json",
    "diff_plans",
    "json_schema",
    "removed_positions",
    "required_version",
    "state_dict_digest",
]

FORMAT = "pruneplan"
#: the newest plan format version this library reads and writes
VERSION = 3
#: every version this library reads
SUPPORTED_VERSIONS = (1, 2, 3)
#: what the units of a group are (`Group.kind`)
KINDS = ("channels", "heads", "query_groups")
Kind = Literal["channels", "heads", "query_groups"]

#: largest plan file (or text) that `PrunePlan.load` / `PrunePlan.from_json` read, in bytes
MAX_PLAN_BYTES = 256 * 1024 * 1024
#: deepest nesting of JSON arrays and objects in a plan (a plan itself needs 8)
MAX_DEPTH = 64
#: largest magnitude of an integer in a plan file (64-bit signed)
MAX_INT = 2**63 - 1
#: most separate position ranges the slices of a plan may span (tiles x runs of units)
MAX_RANGES = 1 << 22


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def _text(v: str) -> str:
    """Refuse strings that cannot be written as UTF-8 (lone surrogates): the plan must serialise."""
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"text {quote(v)} holds a lone surrogate at character {exc.start}; not valid Unicode"
        ) from None
    return v


def _json_value(value: Any) -> Any:
    """Refuse free-form values (provenance) that are not plain, bounded, serialisable JSON."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
        if isinstance(v, dict):
            for k, x in v.items():
                if not isinstance(k, str):
                    raise ValueError(f"key {quote(k)} is not a string")
                _text(k)
                stack.append((x, depth + 1))
        elif isinstance(v, list | tuple):
            stack.extend((x, depth + 1) for x in v)
        elif isinstance(v, str):
            _text(v)
        elif isinstance(v, float):
            if not math.isfinite(v):
                raise ValueError(f"{v!r} is not a finite number")
        elif isinstance(v, int):  # bool included
            if abs(v) > MAX_INT:
                raise ValueError(f"integer of {len(str(abs(v)))} digits is beyond 64 bits")
        elif v is not None:
            raise ValueError(f"a {type(v).__name__} is not JSON data")
    return value


class IndexMap(_Strict):
    """How unit ``u`` of a group maps to positions on a tensor axis.

    Affine form (the default): unit ``u`` covers positions
    ``offset + u * repeat + r + t * tile_stride`` for ``r < repeat`` and ``t < tiles``.
    ``offset`` places a concatenated branch, ``repeat`` is the block of features one channel
    becomes after a channels-first flatten (or the channel multiplier of a depthwise conv),
    ``tiles``/``tile_stride`` describe a channels-last flatten. ``positions`` instead lists the
    positions of every unit explicitly (channel shuffles, composed plans); a unit may hold none
    there (a tensor that only one part of a split reaches). ``modulo`` marks the
    input axis of a grouped convolution, which holds positions local to each group: every group
    must lose the same local positions.
    """

    offset: int = Field(0, ge=0)
    repeat: int = Field(1, ge=1)
    tiles: int = Field(1, ge=1)
    tile_stride: int = Field(0, ge=0)
    positions: list[list[int]] | None = None
    modulo: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _check(self) -> IndexMap:
        if self.positions is not None:
            if (self.offset, self.repeat, self.tiles, self.tile_stride) != (0, 1, 1, 0):
                raise ValueError("explicit positions exclude offset/repeat/tiles/tile_stride")
            if self.positions and not any(self.positions):
                raise ValueError("positions lists no position for any unit")
            for u, pos in enumerate(self.positions):
                if any(p < 0 for p in pos):
                    raise ValueError(f"positions[{u}] holds a negative position")
        if self.tiles > 1 and self.tile_stride == 0:
            raise ValueError("tiles > 1 needs a tile_stride")
        return self

    def unit(self, u: int) -> list[int]:
        """Positions of unit ``u`` before ``modulo`` is applied."""
        if self.positions is not None:
            return list(self.positions[u])
        base = self.offset + u * self.repeat
        return [base + r + t * self.tile_stride for t in range(self.tiles) for r in range(self.repeat)]

    def domain(self, size: int) -> set[int]:
        """Every position (before ``modulo``) that the ``size`` units of the group cover."""
        out: set[int] = set()
        for u in range(size):
            out.update(self.unit(u))
        return out

    def extent(self, size: int) -> int:
        """One past the largest position (before ``modulo``) of any unit."""
        if self.positions is not None:
            return max((max(p) for p in self.positions if p), default=-1) + 1
        return self.offset + size * self.repeat + (self.tiles - 1) * self.tile_stride


class TensorSlice(_Strict):
    """The positions of one state-dict tensor, along one axis, that the group's units own."""

    tensor: str = Field(min_length=1)
    axis: int = Field(ge=0)
    map: IndexMap = Field(default_factory=IndexMap)


class ModuleEdit(_Strict):
    """An integer attribute of a module that changes, e.g. ``out_channels`` 64 -> 48."""

    module: str
    attribute: str = Field(min_length=1)
    before: int = Field(ge=1)
    after: int = Field(ge=1)


class DropoutChange(_Strict):
    """A dropout rate that changes: ``p * (1 - k / N)`` when k of N units go."""

    module: str
    p_before: float
    p_after: float

    @field_validator("p_before", "p_after")
    @classmethod
    def _rate(cls, p: float) -> float:
        if not (math.isfinite(p) and 0.0 <= p < 1.0):
            raise ValueError(f"dropout rate {p!r} is outside [0, 1)")
        return p


class Group(_Strict):
    """One pruning decision: coupled units removed together from every tensor listed."""

    name: str = Field(min_length=1)
    size: int = Field(ge=1)
    removed: list[int]
    slices: list[TensorSlice]
    edits: list[ModuleEdit] = Field(default_factory=list)
    dropout: list[DropoutChange] = Field(default_factory=list)
    #: rank of the group's first root in the model's execution order (lower runs first); groups
    #: are listed by it. ``None`` (plans written before it existed): listed last, by name.
    order: int | None = Field(None, ge=0)
    #: what a unit is (version 2): ``"channels"``, ``"heads"`` or ``"query_groups"``
    kind: Kind = "channels"

    @field_validator("slices")
    @classmethod
    def _sort_slices(cls, v: list[TensorSlice]) -> list[TensorSlice]:
        return sorted(v, key=lambda s: (s.tensor, s.axis, s.map.offset))

    @field_validator("edits")
    @classmethod
    def _sort_edits(cls, v: list[ModuleEdit]) -> list[ModuleEdit]:
        return sorted(v, key=lambda e: (e.module, e.attribute))

    @field_validator("dropout")
    @classmethod
    def _sort_dropout(cls, v: list[DropoutChange]) -> list[DropoutChange]:
        return sorted(v, key=lambda d: d.module)

    @model_validator(mode="after")
    def _check(self) -> Group:
        where = f"group {quote(self.name)}"
        r = self.removed
        fine = not r or (r[0] >= 0 and r[-1] < self.size and r == sorted(set(r)))  # fast path
        for i, u in enumerate(() if fine else r):
            if u < 0:
                raise ValueError(f"{where}: removed[{i}] = {u} is negative")
            if u >= self.size:
                raise ValueError(f"{where}: removed[{i}] = {u} is out of range for size {self.size}")
            if i and u == self.removed[i - 1]:
                raise ValueError(f"{where}: removed[{i}] = {u} is a duplicate")
            if i and u < self.removed[i - 1]:
                raise ValueError(f"{where}: removed[{i}] = {u} is not sorted (after {self.removed[i - 1]})")
        if len(self.removed) >= self.size:
            raise ValueError(f"{where}: removes all {self.size} units; at least one must stay")
        if not (self.slices or self.edits or self.dropout):
            raise ValueError(f"{where}: changes nothing (no tensor slices, edits or dropout changes)")
        for s in self.slices:
            if s.map.positions is not None and len(s.map.positions) != self.size:
                raise ValueError(
                    f"{where}: slice of {quote(s.tensor)} axis {s.axis} lists "
                    f"{len(s.map.positions)} units' positions, group size is {self.size}"
                )
        seen = set()
        for e in self.edits:
            if (e.module, e.attribute) in seen:
                raise ValueError(f"{where}: edits {quote(e.module + '.' + e.attribute)} twice")
            seen.add((e.module, e.attribute))
        mods = [d.module for d in self.dropout]
        if len(set(mods)) != len(mods):
            raise ValueError(f"{where}: changes the same dropout module twice")
        return self

    @property
    def kept(self) -> list[int]:
        """Indices of the units that stay, in order."""
        gone = set(self.removed)
        return [u for u in range(self.size) if u not in gone]


class ModelFingerprint(_Strict):
    """Original shapes of the tensors a plan touches, and a digest of the whole state dict.

    ``buffers`` lists the touched tensors that are module buffers (running statistics), sorted;
    ``None`` when the plan does not say (plans written before it was recorded).
    """

    tensors: dict[str, list[int]]
    digest: str = Field(pattern=r"^[0-9a-f]{64}$")
    buffers: list[str] | None = None

    @field_validator("buffers")
    @classmethod
    def _sort_buffers(cls, v: list[str] | None) -> list[str] | None:
        return None if v is None else sorted(set(v))

    @model_validator(mode="after")
    def _buffers_known(self) -> ModelFingerprint:
        for b in self.buffers or ():
            if b not in self.tensors:
                raise ValueError(f"buffer {quote(b)} is not listed in tensors")
        return self

    @field_validator("tensors")
    @classmethod
    def _shapes(cls, v: dict[str, list[int]]) -> dict[str, list[int]]:
        for k, shape in v.items():
            _text(k)  # pydantic checks string values, not dict keys
            if any(d < 0 for d in shape):
                raise ValueError(f"tensor {quote(k)} has a negative dimension in {quote(shape)}")
        return dict(sorted(v.items()))


class Provenance(_Strict):
    """Where a plan came from. Informative only: the applier ignores the plan's structure of it,
    but uses ``weights_digest`` to warn when a plan is applied to other weights than it scored.

    Attributes:
        metric, metric_params: the attribution metric and every parameter that changes its scores.
        seed: the seed of every random draw made while scoring and selecting (``None``: none).
        selection: the selection policy (ratio or target, scope, rounding, ...) and what it achieved.
        weights_digest: content digest (`pruneplan.weights_digest`: sha256 over the names,
            dtypes, shapes and bytes of every tensor) of the weights the metric scored.
    """

    library: str | None = None
    torch: str | None = None
    metric: str | None = None
    metric_params: dict[str, Any] = Field(default_factory=dict)
    seed: int | None = None
    selection: dict[str, Any] = Field(default_factory=dict)
    weights_digest: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    created: str | None = None
    notes: str | None = None

    @field_validator("metric_params", "selection")
    @classmethod
    def _plain(cls, v: dict[str, Any]) -> dict[str, Any]:
        return _json_value(v)


class ConfigChange(_Strict):
    """One key of a Hugging Face ``config.json`` that the pruned widths change.

    ``before`` is the value in the source config (``None``: absent or null, e.g. GPT-2's
    ``n_inner``). Exactly one of ``after`` (the new value) and ``per_layer`` (layer -> width,
    where the layers end up with different widths that the one key cannot hold) is given.
    """

    key: str = Field(min_length=1)
    before: int | None
    after: int | None = Field(None, ge=1)
    per_layer: dict[str, int] = Field(default_factory=dict)

    @field_validator("per_layer")
    @classmethod
    def _layers(cls, v: dict[str, int]) -> dict[str, int]:
        for layer, width in v.items():
            if width < 1:
                raise ValueError(f"layer {layer!r} has width {width}; every layer keeps a unit")
        return dict(sorted(v.items()))

    @model_validator(mode="after")
    def _check(self) -> ConfigChange:
        if (self.after is None) == (not self.per_layer):
            raise ValueError(f"config key {self.key!r}: give exactly one of after and per_layer")
        if self.per_layer and len(set(self.per_layer.values())) < 2:
            raise ValueError(
                f"config key {self.key!r}: every layer has the same width; record it as after"
            )
        return self

    def describe(self) -> str:
        """``key: before -> after``, or the per-layer widths."""
        if self.after is not None:
            return f"{self.key}: {self.before} -> {self.after}"
        by_width: dict[int, list[str]] = {}
        for layer, width in self.per_layer.items():
            by_width.setdefault(width, []).append(layer)
        parts = [f"{width} in {', '.join(layers)}" for width, layers in sorted(by_width.items())]
        return f"{self.key} (one value for all layers, {self.before} before): " + "; ".join(parts)


class ConfigEdits(_Strict):
    """What a plan changes in a Hugging Face ``config.json`` (plan format version 2; ``saved_names``
    version 3).

    ``changes`` holds one entry per key; ``unsupported`` the reasons, other than differing
    layer widths, why the config cannot describe the pruned model (e.g. a head count the
    config derives the head size from). ``tied`` maps state-dict keys that share their tensor
    with an earlier key (a tied ``lm_head``) to that key: ``save_pretrained`` stores only the
    latter, and applying to a checkpoint folder counts the alias with the stored tensor's
    shape. ``saved_names`` (plan format version 3) maps every state-dict key that
    ``save_pretrained`` stores under another name to that name (transformers' weight
    conversion mapping, reverted on saving); applying to a checkpoint folder reads and writes
    those names. ``model_type`` is the config's, informative.
    """

    model_type: str | None = None
    changes: list[ConfigChange] = Field(default_factory=list)
    unsupported: list[str] = Field(default_factory=list)
    tied: dict[str, str] = Field(default_factory=dict)
    saved_names: dict[str, str] = Field(default_factory=dict)

    @field_validator("saved_names")
    @classmethod
    def _saved(cls, v: dict[str, str]) -> dict[str, str]:
        seen: dict[str, str] = {}
        for key, saved in v.items():
            if not saved:
                raise ValueError(f"saved name of {quote(key)} is empty")
            if key == saved:
                raise ValueError(f"saved name of {quote(key)} is the key itself; list only renamed keys")
            if saved in seen:
                raise ValueError(f"keys {quote(seen[saved])} and {quote(key)} have the same saved name "
                                 f"{quote(saved)}")
            seen[saved] = key
        return dict(sorted(v.items()))

    @field_validator("tied")
    @classmethod
    def _tied(cls, v: dict[str, str]) -> dict[str, str]:
        for alias, source in v.items():
            if alias == source or source in v:
                raise ValueError(f"tied key {alias!r} -> {source!r}: the source must be a stored key")
        return dict(sorted(v.items()))

    @field_validator("changes")
    @classmethod
    def _sort(cls, v: list[ConfigChange]) -> list[ConfigChange]:
        keys = [c.key for c in v]
        dup = sorted({k for k in keys if keys.count(k) > 1})
        if dup:
            raise ValueError(f"config key {dup[0]!r} is changed twice")
        return sorted(v, key=lambda c: c.key)

    @field_validator("unsupported")
    @classmethod
    def _sort_reasons(cls, v: list[str]) -> list[str]:
        return sorted(set(v))

    def problems(self) -> list[str]:
        """Why the config cannot express the pruned model; empty when it can."""
        out = [
            f"{c.describe()}; the config holds one value for all layers"
            for c in self.changes if c.per_layer
        ]
        return out + list(self.unsupported)

    def values(self) -> dict[str, int]:
        """key -> new value, for the keys every layer agrees on."""
        return {c.key: c.after for c in self.changes if c.after is not None}


def _empty_units(groups: Iterable[Group]) -> bool:
    """Whether a slice's explicit ``positions`` gives some unit no position (version 3)."""
    return any(s.map.positions is not None and not all(s.map.positions)
               for g in groups for s in g.slices)


def required_version(groups: Iterable[Group], config: ConfigEdits | None) -> int:
    """The lowest format version that holds these groups and config part."""
    groups = list(groups)
    if (config is not None and config.saved_names) or _empty_units(groups):
        return 3
    if config is not None or any(g.kind != "channels" for g in groups):
        return 2
    return 1


class PrunePlan(_Strict):
    """A versioned, validated pruning plan (see the module docstring for the format)."""

    format: str
    version: int
    model: ModelFingerprint
    groups: list[Group]
    provenance: Provenance = Field(default_factory=Provenance)
    #: Hugging Face config changes (version 2)
    config: ConfigEdits | None = None

    @field_validator("format")
    @classmethod
    def _format(cls, v: str) -> str:
        if v != FORMAT:
            raise ValueError(f"format is {quote(v)}, expected {FORMAT!r}")
        return v

    @field_validator("version")
    @classmethod
    def _version(cls, v: int) -> int:
        if v not in SUPPORTED_VERSIONS:
            raise ValueError(
                f"unsupported plan version {v}: this pruneplan reads versions "
                f"{', '.join(map(str, SUPPORTED_VERSIONS))}"
            )
        return v

    @field_validator("groups")
    @classmethod
    def _sort_groups(cls, v: list[Group]) -> list[Group]:
        return sorted(v, key=_group_key)

    @model_validator(mode="after")
    def _check(self) -> PrunePlan:
        if self.version < 2:
            kinds = sorted({g.kind for g in self.groups if g.kind != "channels"})
            if kinds:
                raise ValueError(f"groups of kind {kinds[0]!r} need plan version 2, this plan says 1")
            if self.config is not None:
                raise ValueError("a config part needs plan version 2, this plan says 1")
        if self.version < 3 and self.config is not None and self.config.saved_names:
            raise ValueError(f"config.saved_names needs plan version 3, this plan says {self.version}")
        if self.version < 3 and _empty_units(self.groups):
            raise ValueError("a unit with no position in a slice's explicit positions needs plan "
                             f"version 3, this plan says {self.version}")
        seen: set[str] = set()
        for g in self.groups:
            if g.name in seen:
                raise ValueError(f"group name {quote(g.name)} appears more than once")
            seen.add(g.name)
        shapes = self.model.tensors
        on_axis: dict[tuple[str, int], list[tuple[Group, TensorSlice]]] = {}
        ranges = 0
        for g in self.groups:
            for s in g.slices:
                where = f"group {quote(g.name)}, tensor {quote(s.tensor)}"
                if s.tensor not in shapes:
                    raise ValueError(f"{where}: not listed in model.tensors")
                shape = shapes[s.tensor]
                if s.axis >= len(shape):
                    raise ValueError(f"{where}: axis {s.axis} out of range for shape {quote(shape)}")
                length = shape[s.axis]
                limit = s.map.extent(g.size)
                if s.map.modulo is not None:
                    if s.map.modulo != length:
                        raise ValueError(
                            f"{where}: modulo {s.map.modulo} differs from axis {s.axis} "
                            f"length {length}"
                        )
                elif limit > length:
                    raise ValueError(
                        f"{where}: units reach position {limit - 1} but axis {s.axis} "
                        f"has length {length}"
                    )
                if s.map.positions is None and s.map.tiles > 1:
                    ranges += s.map.tiles * (len(_runs(g.removed)) + 1)
                    if ranges > MAX_RANGES:
                        raise ValueError(
                            f"{where}: its {s.map.tiles} tiles bring the plan's separate position "
                            f"ranges past the limit of {MAX_RANGES}"
                        )
                on_axis.setdefault((s.tensor, s.axis), []).append((g, s))
        for (tensor, axis), users in on_axis.items():
            if len(users) > 1:
                _disjoint(tensor, axis, users)
            if any(s.map.modulo is not None for _, s in users):
                _grouped_local(tensor, axis, [(s, g.removed, g.size) for g, s in users])
        self.edits()
        self.dropout_changes()
        return self

    def _group(self, name: str) -> Group:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(name)

    # ---- serialisation -------------------------------------------------------------------

    def to_json(self) -> str:
        """The canonical JSON text: sorted keys, defaults omitted, index lists on one line."""
        data = self.model_dump(mode="json", exclude_defaults=True)
        data["format"], data["version"] = self.format, self.version
        return canonical_json(data)

    def digest(self) -> str:
        """sha256 (hex) of the canonical JSON text."""
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()

    def save(self, path: str | Path) -> Path:
        """Write the canonical JSON to ``path`` atomically (temporary name, then rename).

        Raises:
            OSError: the folder does not exist or is not writable (``path`` is then untouched).
        """
        from pruneplan._io import atomic_write_bytes

        return atomic_write_bytes(Path(path), self.to_json().encode("utf-8"))

    @classmethod
    def from_json(cls, text: str | bytes) -> PrunePlan:
        """Parse and validate a plan; raises `PlanValidationError` naming the bad field.

        Bounded and total: text over ``MAX_PLAN_BYTES``, nesting deeper than ``MAX_DEPTH``,
        integers beyond 64 bits, non-finite numbers, duplicate keys and lone surrogates are
        refused with a `PlanValidationError`, like every other malformed input.
        """
        size = len(text)  # characters or bytes: a character takes at least one byte
        if size > MAX_PLAN_BYTES:
            raise PlanValidationError(
                f"plan is {size} bytes, more than the limit of {MAX_PLAN_BYTES} ({_mib(MAX_PLAN_BYTES)})"
            )
        data = parse_json(text, "plan")
        if not isinstance(data, dict):
            raise PlanValidationError(f"plan must be a JSON object, got {_json_type(data)}")
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PrunePlan:
        """Validate a plan given as plain data.

        Raises:
            PlanValidationError: a field breaks the format; the message names it.
        """
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise PlanValidationError(_describe(exc)) from None
        except RecursionError:
            raise PlanValidationError(f"invalid plan: nested deeper than {MAX_DEPTH} levels") from None

    @classmethod
    def load(cls, path: str | Path) -> PrunePlan:
        """Read and validate a plan file.

        Raises:
            PlanValidationError: the file is missing, unreadable, not a regular file (a folder,
                a FIFO, a device), larger than ``MAX_PLAN_BYTES``, or not a valid plan; the
                message starts with the path.
        """
        path = Path(path)
        from pruneplan._io import read_regular_file

        raw = read_regular_file(path, MAX_PLAN_BYTES, "plan file", PlanValidationError)
        try:
            return cls.from_json(raw)
        except PlanValidationError as exc:
            raise PlanValidationError(f"{path}: {exc}") from None

    # ---- queries -------------------------------------------------------------------------

    def group(self, name: str) -> Group:
        """The group called ``name``; KeyError if absent."""
        return self._group(name)

    def removed_by_axis(self) -> dict[tuple[str, int], list[int]]:
        """Every (tensor, axis) the plan slices -> sorted positions it deletes (original coords)."""
        ranges = self._removed_ranges()
        return {k: [p for a, b in ranges[k] for p in range(a, b)] for k in sorted(ranges)}

    def pruned_shapes(self) -> dict[str, list[int]]:
        """The shape every touched tensor has after the plan is applied."""
        shapes = {k: list(v) for k, v in self.model.tensors.items()}
        for (tensor, axis), ranges in self._removed_ranges().items():
            shapes[tensor][axis] -= _count(ranges)
        return shapes

    def _removed_ranges(self) -> dict[tuple[str, int], Ranges]:
        """`removed_by_axis` as merged ranges: cheap whatever sizes the plan declares."""
        out: dict[tuple[str, int], list[Ranges]] = {}
        for g in self.groups:
            for s in g.slices:
                out.setdefault((s.tensor, s.axis), []).append(_removed_ranges(s, g.removed))
        return {k: v[0] if len(v) == 1 else _merge(r for rs in v for r in rs) for k, v in out.items()}

    def edits(self) -> dict[tuple[str, str], tuple[int, int]]:
        """(module, attribute) -> (before, after), summing the deltas of all groups.

        Raises:
            PlanValidationError: groups disagree on the value before pruning, or the summed
                edits would drop an attribute below 1.
        """
        out: dict[tuple[str, str], tuple[int, int]] = {}
        for g in self.groups:
            for e in g.edits:
                key = (e.module, e.attribute)
                what = quote(f"{e.module}.{e.attribute}")
                if key in out and out[key][0] != e.before:
                    raise PlanValidationError(
                        f"groups disagree on {what} before pruning "
                        f"({out[key][0]} vs {e.before}, group {quote(g.name)})"
                    )
                before, after = out.get(key, (e.before, e.before))
                out[key] = (before, after + e.after - e.before)
                if out[key][1] < 1:
                    raise PlanValidationError(
                        f"{what} would drop to {out[key][1]} (group {quote(g.name)})"
                    )
        return dict(sorted(out.items()))

    def dropout_changes(self) -> dict[str, tuple[float, float]]:
        """module -> (p before, p after), summing the deltas of all groups.

        Raises:
            PlanValidationError: groups disagree on a module's rate before pruning, or their
                changes combine to a rate outside [0, 1).
        """
        out: dict[str, tuple[float, float]] = {}
        for g in self.groups:
            for d in g.dropout:
                if d.module in out and not math.isclose(out[d.module][0], d.p_before, abs_tol=1e-12):
                    raise PlanValidationError(
                        f"groups disagree on the rate of dropout {quote(d.module)} before pruning "
                        f"({out[d.module][0]} vs {d.p_before}, group {quote(g.name)})"
                    )
                before, after = out.get(d.module, (d.p_before, d.p_before))
                out[d.module] = (before, after + d.p_after - d.p_before)
        for module, (before, after) in out.items():
            if -1e-12 < after < 0:  # rounding of changes that sum to zero
                out[module] = (before, 0.0)
            elif not 0.0 <= after < 1.0:
                raise PlanValidationError(
                    f"the dropout changes of dropout {quote(module)} combine to rate {after!r} "
                    f"(from {before!r}), outside [0, 1)"
                )
        return dict(sorted(out.items()))

    @property
    def buffers_known(self) -> bool:
        """Whether the plan records which touched tensors are buffers (``model.buffers``)."""
        return self.model.buffers is not None

    def _buffer_names(self) -> frozenset[str]:
        return frozenset(self.model.buffers or ())

    def _is_buffer(self, tensor: str) -> bool:
        return tensor in (self.model.buffers or ())

    def group_parameters_removed(self, name: str, *, buffers: bool = False) -> int:
        """Scalars the named group would delete if it were the only group of the plan.

        Counts parameters (``buffers=False``) or buffers (``buffers=True``). When the plan does
        not record which tensors are buffers (`buffers_known` is false) every tensor counts as
        a parameter.
        """
        return self._group_removed(self._group(name), self._buffer_names())[int(buffers)]

    def _group_removed(self, g: Group, buffer_names: frozenset[str]) -> tuple[int, int]:
        """(parameter scalars, buffer scalars) group ``g`` alone would delete."""
        shapes = {s.tensor: list(self.model.tensors[s.tensor]) for s in g.slices}
        before = [0, 0]
        for k, shape in shapes.items():
            before[k in buffer_names] += math.prod(shape)
        for s in g.slices:
            shapes[s.tensor][s.axis] -= _count(_removed_ranges(s, g.removed))
        after = [0, 0]
        for k, shape in shapes.items():
            after[k in buffer_names] += math.prod(shape)
        return before[0] - after[0], before[1] - after[1]

    def summary(self) -> list[dict[str, Any]]:
        """One row per group, in execution order: name, size, kept, removed, fraction removed,
        parameters removed, buffer scalars removed (``None`` when the plan does not record which
        tensors are buffers). One pass over the slices: linear in the size of the plan."""
        buffer_names = self._buffer_names()
        rows = []
        for g in self.groups:
            params, bufs = self._group_removed(g, buffer_names)
            rows.append({
                "group": g.name,
                "kind": g.kind,
                "size": g.size,
                "kept": g.size - len(g.removed),
                "removed": len(g.removed),
                "fraction": len(g.removed) / g.size,
                "parameters": params,
                "buffers": bufs if self.buffers_known else None,
            })
        return rows

    def totals(self) -> dict[str, int]:
        """Scalar counts over the touched tensors, from one pass over the plan:
        ``parameters_touched``, ``parameters_removed``, ``buffers_touched`` and
        ``buffers_removed`` (buffers count as parameters when `buffers_known` is false)."""
        buffer_names = self._buffer_names()
        before, after = [0, 0], [0, 0]
        for k, shape in self.model.tensors.items():
            before[k in buffer_names] += math.prod(shape)
        for k, shape in self.pruned_shapes().items():
            after[k in buffer_names] += math.prod(shape)
        return {"parameters_touched": before[0], "parameters_removed": before[0] - after[0],
                "buffers_touched": before[1], "buffers_removed": before[1] - after[1]}

    def scalars_removed(self) -> int:
        """Scalars the plan deletes from the touched tensors, parameters and buffers together."""
        t = self.totals()
        return t["parameters_removed"] + t["buffers_removed"]

    def parameters_removed(self) -> int:
        """Parameter scalars the plan deletes (buffers such as running statistics excluded).

        When the plan does not record which tensors are buffers (`buffers_known` is false),
        this is `scalars_removed`.
        """
        return self.totals()["parameters_removed"]

    def buffers_removed(self) -> int:
        """Buffer scalars (running statistics) the plan deletes; 0 when buffers are not known."""
        return self.totals()["buffers_removed"]

    def parameters_touched(self) -> int:
        """Parameter scalars of the touched tensors before pruning (buffers excluded if known)."""
        return self.totals()["parameters_touched"]


# ---- positions ---------------------------------------------------------------------------


def removed_positions(s: TensorSlice, removed: Iterable[int]) -> list[int]:
    """Sorted positions on ``s.axis`` that deleting units ``removed`` deletes.

    With ``modulo`` the result is local to one group of a grouped convolution.
    """
    return [p for a, b in _removed_ranges(s, sorted(set(removed))) for p in range(a, b)]


def _removed_ranges(s: TensorSlice, removed: Sequence[int]) -> Ranges:
    """`removed_positions` (``removed`` sorted and unique) as merged ranges, cheap to count."""
    spans = _spans(s.map, _runs(removed))
    return spans if s.map.modulo is None else _local(spans, s.map.modulo)


# Positions are handled as sorted, disjoint, half-open ranges [a, b): validation and counting
# never enumerate the positions a declared size implies.
Ranges = list[tuple[int, int]]


def _runs(units: Sequence[int]) -> Ranges:
    """Sorted unique units -> ranges of consecutive units."""
    if not units:
        return []
    starts = [units[0]]
    ends = []
    prev = units[0]
    for u in units[1:]:
        if u != prev + 1:
            ends.append(prev + 1)
            starts.append(u)
        prev = u
    ends.append(prev + 1)
    return list(zip(starts, ends, strict=True))


def _merge(ranges: Iterable[tuple[int, int]]) -> Ranges:
    """Union of ranges, as sorted disjoint ranges (touching ones joined)."""
    out: list[list[int]] = []
    for a, b in sorted(r for r in ranges if r[0] < r[1]):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _spans(m: IndexMap, units: Ranges) -> Ranges:
    """Positions (before ``modulo``) of the units in the unit ranges ``units``, merged."""
    if m.positions is not None:
        return _runs(sorted({p for a, b in units for u in range(a, b) for p in m.positions[u]}))
    if m.tiles == 1:  # runs of units are apart, so their ranges are sorted, disjoint, apart
        o, r = m.offset, m.repeat
        return [(o + a * r, o + b * r) for a, b in units]
    out: list[tuple[int, int]] = []
    for a, b in units:
        lo, hi = m.offset + a * m.repeat, m.offset + b * m.repeat
        if m.tiles == 1 or m.tile_stride <= hi - lo:  # tiles touch or overlap: one range
            out.append((lo, hi + (m.tiles - 1) * m.tile_stride))
        else:
            out.extend((lo + t * m.tile_stride, hi + t * m.tile_stride) for t in range(m.tiles))
    return _merge(out)


def _local(spans: Ranges, modulo: int) -> Ranges:
    """Ranges of positions folded into ``[0, modulo)``."""
    out: list[tuple[int, int]] = []
    for a, b in spans:
        if b - a >= modulo:
            return [(0, modulo)]
        x = a % modulo
        y = x + b - a
        out += [(x, y)] if y <= modulo else [(x, modulo), (0, y - modulo)]
    return _merge(out)


def _count(ranges: Ranges) -> int:
    return sum(b - a for a, b in ranges)


def _show(ranges: Ranges, limit: int = 12) -> str:
    """Positions of ``ranges`` as a list, cut after ``limit`` items."""
    shown: list[int] = []
    for a, b in ranges:
        shown.extend(range(a, min(b, a + limit - len(shown) + 1)))
        if len(shown) > limit:
            return "[" + ", ".join(map(str, shown[:limit])) + f", ...] ({_count(ranges)} positions)"
    return "[" + ", ".join(map(str, shown)) + "]"


def _disjoint(tensor: str, axis: int, users: Sequence[tuple[Group, TensorSlice]]) -> None:
    """Check that the groups slicing one (tensor, axis) cover disjoint positions."""
    spans = sorted(
        (a, b, g.name) for g, s in users for a, b in _spans(s.map, [(0, g.size)])
    )
    end, owner = -1, ""
    for a, b, name in spans:
        if a < end:
            first, second = sorted((owner, name))
            raise ValueError(
                f"groups {quote(first)} and {quote(second)} both slice tensor {quote(tensor)} "
                f"axis {axis} at position {a}"
            )
        if b > end:
            end, owner = b, name


def _group_key(g: Group) -> tuple[bool, int, str]:
    """The canonical order of groups: execution order, then name; unordered groups last."""
    return (g.order is None, g.order or 0, g.name)


def _grouped_local(
    tensor: str, axis: int, users: Sequence[tuple[TensorSlice, Sequence[int], int]]
) -> None:
    """Check that every block of a grouped axis loses the same local positions."""
    modulo = next(s.map.modulo for s, _, _ in users if s.map.modulo is not None)
    covered: Ranges = []
    gone: Ranges = []
    for s, removed, size in users:
        if s.map.modulo != modulo:
            raise ValueError(f"tensor {quote(tensor)} axis {axis}: slices disagree on modulo")
        covered += _spans(s.map, [(0, size)])
        gone += _spans(s.map, _runs(removed))
    covered, gone = _merge(covered), _merge(gone)
    if not gone:
        return
    blocks = _merge((a // modulo, (b - 1) // modulo + 1) for a, b in covered)
    partial: dict[int, list[tuple[int, int]]] = {}
    whole: Ranges = []  # ranges of blocks that lose every local position
    for a, b in gone:
        first, last = a // modulo, (b - 1) // modulo
        if first == last:
            partial.setdefault(first, []).append((a - first * modulo, b - first * modulo))
            continue
        partial.setdefault(first, []).append((a - first * modulo, modulo))
        partial.setdefault(last, []).append((0, b - last * modulo))
        if last > first + 1:
            whole.append((first + 1, last))
    lost = {blk: _merge(r) for blk, r in partial.items()}
    everything = [(0, modulo)]

    def loss(blk: int) -> Ranges:
        if blk in lost:
            return lost[blk]
        return everything if any(a <= blk < b for a, b in whole) else []

    ref_block = blocks[0][0]
    ref = loss(ref_block)

    def refuse(blk: int, pos: Ranges) -> None:
        raise ValueError(
            f"tensor {quote(tensor)} axis {axis} belongs to a grouped convolution: group block "
            f"{blk} would lose local positions {_show(pos)} but block {ref_block} loses "
            f"{_show(ref)}; every block must lose the same ones"
        )

    for blk, pos in sorted(lost.items()):
        if pos != ref:
            refuse(blk, pos)
    if whole and ref != everything:
        refuse(whole[0][0], everything)
    losing = _merge([(blk, blk + 1) for blk in lost] + whole)
    if _count(losing) != _count(blocks):  # a block that holds units loses nothing
        refuse(_first_outside(blocks, losing), [])


def _first_outside(ranges: Ranges, holes: Ranges) -> int:
    """The smallest integer in ``ranges`` that no range of ``holes`` holds."""
    for a, b in ranges:
        x = a
        for c, d in holes:
            if d <= x:
                continue
            if c > x:
                break
            x = d
        if x < b:
            return x
    raise AssertionError("no gap")


# ---- bounded reading and parsing -------------------------------------------------------


def _mib(n: int) -> str:
    return f"{n / 2**20:g} MiB"


def _short(text: str, limit: int = 40) -> str:
    """A field name or key cut to ``limit`` characters (they appear in error locations)."""
    return text if len(text) <= limit else text[:limit] + f"...({len(text)} characters)"


class _BadJSON(ValueError):
    """A value the plan's JSON parser refuses (raised from its hooks)."""


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _BadJSON(f"number {quote(text, 24)} is too large for a float")
    return value


def _parse_constant(text: str) -> float:
    raise _BadJSON(f"{text} is not a JSON number")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise _BadJSON(f"key {quote(k, 40)} appears twice in one object")
            seen.add(k)
    return out


def parse_json(text: str | bytes, what: str) -> Any:
    """Strict, bounded JSON parsing: refuse duplicate keys, NaN/Infinity, integers beyond 64
    bits, floats that overflow, nesting deeper than ``MAX_DEPTH`` and lone surrogates.

    Raises:
        PlanValidationError: naming ``what`` and the problem (and the position where known).
    """
    try:
        data = json.loads(
            text,
            object_pairs_hook=_unique_keys,
            parse_float=_parse_float,
            parse_constant=_parse_constant,
        )
    except RecursionError:
        raise PlanValidationError(f"{what} is nested deeper than {MAX_DEPTH} levels") from None
    except json.JSONDecodeError as exc:
        raise PlanValidationError(
            # json's own messages can end in "at" ("Unterminated string starting at"): one "at"
            f"{what} is not valid JSON: {exc.msg.removesuffix(' at')} at line {exc.lineno} column {exc.colno}"
        ) from None
    except UnicodeDecodeError as exc:
        raise PlanValidationError(f"{what} is not valid JSON: not UTF-8 text (byte {exc.start})") from None
    except _BadJSON as exc:
        raise PlanValidationError(f"{what} is not valid JSON: {exc}") from None
    except ValueError as exc:  # int() of more than sys.get_int_max_str_digits() digits
        if "digits" in str(exc):
            raise PlanValidationError(f"{what}: {_BEYOND}") from None
        raise PlanValidationError(f"{what} is not valid JSON: {quote(str(exc))}") from None
    _check_tree(data, what)
    return data


_BEYOND = f"an integer is beyond 64 bits (|n| <= {MAX_INT})"


def _check_tree(data: Any, what: str) -> None:
    """Depth, integer and text checks on parsed JSON, without recursion."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, dict | list):
            if depth > MAX_DEPTH:
                raise PlanValidationError(f"{what} is nested deeper than {MAX_DEPTH} levels")
            if isinstance(v, dict):
                for k in v:
                    _utf8(k, what)
                v = list(v.values())
            kinds = set(map(type, v))
            if int in kinds:
                ints = [x for x in v if type(x) is int] if len(kinds) > 1 else v
                if max(ints) > MAX_INT or min(ints) < -MAX_INT:
                    raise PlanValidationError(f"{what}: {_BEYOND}")
            if kinds - {int, float, bool, type(None)}:
                for x in v:
                    if isinstance(x, dict | list):
                        stack.append((x, depth + 1))
                    elif isinstance(x, str):
                        _utf8(x, what)
        elif isinstance(v, str):
            _utf8(v, what)
        elif type(v) is int and abs(v) > MAX_INT:
            raise PlanValidationError(f"{what}: {_BEYOND}")


def _utf8(text: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PlanValidationError(
            f"{what} is not valid JSON text: {quote(text)} holds a lone surrogate at character "
            f"{exc.start}"
        ) from None


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


# ---- canonical JSON ----------------------------------------------------------------------


def canonical_json(value: Any) -> str:
    """Deterministic JSON: 2-space indent, sorted keys, lists of scalars on one line."""
    lines: list[str] = []
    _emit(value, 0, lines, "")
    return "".join(lines) + "\n"


def _scalar(v: Any) -> str:
    if type(v) is int:  # the common case (indices, shapes): what json.dumps gives, faster
        return str(v)
    return json.dumps(v, ensure_ascii=False, allow_nan=False)


def _flat(v: list) -> bool:
    return all(not isinstance(x, dict | list) for x in v)


def _inline(v: Any) -> str:
    if isinstance(v, list):
        return "[" + ", ".join(_scalar(x) for x in v) + "]"
    return _scalar(v)


def _emit(v: Any, depth: int, out: list[str], prefix: str) -> None:
    pad = "  " * depth
    if isinstance(v, dict):
        flat = all(
            not isinstance(x, dict | list) or (isinstance(x, list) and _flat(x)) for x in v.values()
        )
        if flat:
            inline = "{" + ", ".join(f"{_scalar(k)}: {_inline(x)}" for k, x in sorted(v.items())) + "}"
            if len(pad + prefix + inline) <= 100:
                out.append(pad + prefix + inline)
                return
        out.append(pad + prefix + "{\n")
        items = sorted(v.items())
        for i, (k, item) in enumerate(items):
            _emit(item, depth + 1, out, _scalar(k) + ": ")
            out.append(",\n" if i < len(items) - 1 else "\n")
        out.append(pad + "}")
    elif isinstance(v, list):
        if _flat(v):
            out.append(pad + prefix + _inline(v))
            return
        out.append(pad + prefix + "[\n")
        for i, item in enumerate(v):
            _emit(item, depth + 1, out, "")
            out.append(",\n" if i < len(v) - 1 else "\n")
        out.append(pad + "]")
    else:
        out.append(pad + prefix + _scalar(v))


def json_schema() -> str:
    """The JSON Schema of the plan format, as committed in ``schemas/pruneplan.v3.schema.json``.

    It validates plans of every supported version (``version`` is 1, 2 or 3). Raises nothing.
    """
    schema = PrunePlan.model_json_schema()
    schema["$id"] = f"https://pruneplan.dev/schemas/pruneplan.v{VERSION}.schema.json"
    schema["title"] = f"PrunePlan v{VERSION}"
    return json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def state_dict_digest(shapes: Mapping[str, Sequence[int]]) -> str:
    """sha256 of the sorted names and shapes of a whole state dict (no values; for the content,
    see `pruneplan.weights_digest`). Raises nothing."""
    text = "\n".join(_shape_lines(shapes))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _shape_lines(shapes: Mapping[str, Sequence[int]]) -> list[str]:
    return [f"{k}:{','.join(str(int(d)) for d in shapes[k])}" for k in sorted(shapes)]


#: the most tensors `extra_tensor` searches (it hashes the whole list once per candidate)
EXTRA_SEARCH_LIMIT = 2000


def extra_tensor(shapes: Mapping[str, Sequence[int]], digest: str,
                 candidates: Iterable[str] | None = None) -> str | None:
    """The one name of ``shapes`` (among ``candidates``, default all) without which
    `state_dict_digest` of ``shapes`` is ``digest``: a single extra tensor. ``None`` when there
    is none, or ``shapes`` holds more than `EXTRA_SEARCH_LIMIT` tensors. Raises nothing."""
    if len(shapes) > EXTRA_SEARCH_LIMIT:
        return None
    names = sorted(shapes)
    lines = _shape_lines(shapes)
    wanted = set(names if candidates is None else candidates)
    for i, name in enumerate(names):
        if name in wanted and hashlib.sha256(
                "\n".join(lines[:i] + lines[i + 1:]).encode("utf-8")).hexdigest() == digest:
            return name
    return None


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False, include_input=False)[:5]:
        loc = ""
        for item in err["loc"]:
            item = item if isinstance(item, int) else _short(str(item))
            loc += f"[{item}]" if isinstance(item, int) else (f".{item}" if loc else str(item))
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc or 'plan'}: {msg}" if loc else msg)
    more = exc.error_count() - len(parts)
    tail = f" (and {more} more)" if more > 0 else ""
    return "invalid plan: " + "; ".join(parts) + tail


# ---- diff --------------------------------------------------------------------------------


@dataclass(frozen=True)
class GroupDiff:
    """How one group differs between two plans."""

    name: str
    only_in_a: list[int] = field(default_factory=list)
    only_in_b: list[int] = field(default_factory=list)
    size_a: int | None = None
    size_b: int | None = None
    structure_differs: bool = False


@dataclass(frozen=True)
class PlanDiff:
    """Structured difference between two plans; falsy when they are the same."""

    groups: list[GroupDiff]
    model_differs: bool
    config_differs: bool = False

    def __bool__(self) -> bool:
        return self.model_differs or self.config_differs or bool(self.groups)

    def __iter__(self) -> Iterator[GroupDiff]:
        return iter(self.groups)


def diff_plans(a: PrunePlan, b: PrunePlan) -> PlanDiff:
    """Per group: removed indices only in ``a``, only in ``b``; groups only in one plan.

    Groups are listed in ``a``'s order (execution order), then the groups only in ``b``.
    Raises nothing.
    """
    ga = {g.name: g for g in a.groups}
    gb = {g.name: g for g in b.groups}
    out = []
    for name in dict.fromkeys([*ga, *gb]):  # a's order (execution order), then b's new groups
        x, y = ga.get(name), gb.get(name)
        ra = set(x.removed) if x else set()
        rb = set(y.removed) if y else set()
        structure = bool(
            x and y and (x.size != y.size or x.slices != y.slices or _shape(x) != _shape(y))
        )
        if ra != rb or structure or x is None or y is None:
            out.append(
                GroupDiff(
                    name=name,
                    only_in_a=sorted(ra - rb),
                    only_in_b=sorted(rb - ra),
                    size_a=x.size if x else None,
                    size_b=y.size if y else None,
                    structure_differs=structure,
                )
            )
    return PlanDiff(groups=out, model_differs=a.model != b.model, config_differs=a.config != b.config)


def _shape(g: Group) -> tuple:
    return (g.kind, tuple((e.module, e.attribute) for e in g.edits), tuple(d.module for d in g.dropout))
