"""The PrunePlan document: strict pydantic models, canonical JSON, digest and diff.

A plan is data, not code: it names every tensor slice, module attribute edit and dropout
change that one pruning step implies. This module knows nothing of torch.

Format (version 1), in prose; ``schemas/pruneplan.v1.schema.json`` is the generated schema.

* ``format`` is ``"pruneplan"`` and ``version`` is ``1``.
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
  (``out_channels``, ``in_features``, ``num_features``, ``groups`` ...) and ``dropout`` changes
  dropout rates. When several groups edit the same attribute, their deltas add up.
* Slices of different groups on the same (tensor, axis) cover disjoint positions, so the order
  of groups never changes the result.
* ``provenance`` is informative only; the applier ignores it.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from pruneplan.errors import PlanValidationError

__all__ = [
    "FORMAT",
    "VERSION",
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
    "state_dict_digest",
]

FORMAT = "pruneplan"
VERSION = 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class IndexMap(_Strict):
    """How unit ``u`` of a group maps to positions on a tensor axis.

    Affine form (the default): unit ``u`` covers positions
    ``offset + u * repeat + r + t * tile_stride`` for ``r < repeat`` and ``t < tiles``.
    ``offset`` places a concatenated branch, ``repeat`` is the block of features one channel
    becomes after a channels-first flatten (or the channel multiplier of a depthwise conv),
    ``tiles``/``tile_stride`` describe a channels-last flatten. ``positions`` instead lists the
    positions of every unit explicitly (channel shuffles, composed plans). ``modulo`` marks the
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
            for u, pos in enumerate(self.positions):
                if not pos:
                    raise ValueError(f"positions[{u}] is empty")
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
            return max(max(p) for p in self.positions) + 1
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
        where = f"group {self.name!r}"
        for i, u in enumerate(self.removed):
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
                    f"{where}: slice of {s.tensor!r} axis {s.axis} lists "
                    f"{len(s.map.positions)} units' positions, group size is {self.size}"
                )
        seen = set()
        for e in self.edits:
            if (e.module, e.attribute) in seen:
                raise ValueError(f"{where}: edits {e.module}.{e.attribute} twice")
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
                raise ValueError(f"buffer {b!r} is not listed in tensors")
        return self

    @field_validator("tensors")
    @classmethod
    def _shapes(cls, v: dict[str, list[int]]) -> dict[str, list[int]]:
        for k, shape in v.items():
            if any(d < 0 for d in shape):
                raise ValueError(f"tensor {k!r} has a negative dimension in {shape}")
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


class PrunePlan(_Strict):
    """A versioned, validated pruning plan (see the module docstring for the format)."""

    format: str
    version: int
    model: ModelFingerprint
    groups: list[Group]
    provenance: Provenance = Field(default_factory=Provenance)

    @field_validator("format")
    @classmethod
    def _format(cls, v: str) -> str:
        if v != FORMAT:
            raise ValueError(f"format is {v!r}, expected {FORMAT!r}")
        return v

    @field_validator("version")
    @classmethod
    def _version(cls, v: int) -> int:
        if v != VERSION:
            raise ValueError(f"unsupported plan version {v}: this pruneplan reads version {VERSION}")
        return v

    @field_validator("groups")
    @classmethod
    def _sort_groups(cls, v: list[Group]) -> list[Group]:
        return sorted(v, key=_group_key)

    @model_validator(mode="after")
    def _check(self) -> PrunePlan:
        names = [g.name for g in self.groups]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"group name {dup[0]!r} appears more than once")
        shapes = self.model.tensors
        on_axis: dict[tuple[str, int], list[tuple[str, TensorSlice, int]]] = {}
        for g in self.groups:
            for s in g.slices:
                where = f"group {g.name!r}, tensor {s.tensor!r}"
                if s.tensor not in shapes:
                    raise ValueError(f"{where}: not listed in model.tensors")
                shape = shapes[s.tensor]
                if s.axis >= len(shape):
                    raise ValueError(f"{where}: axis {s.axis} out of range for shape {shape}")
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
                on_axis.setdefault((s.tensor, s.axis), []).append((g.name, s, g.size))
        for (tensor, axis), users in on_axis.items():
            if len(users) < 2:
                continue
            covered: dict[int, str] = {}
            for name, s, size in users:
                for p in s.map.domain(size):
                    if p in covered:
                        raise ValueError(
                            f"groups {covered[p]!r} and {name!r} both slice tensor {tensor!r} "
                            f"axis {axis} at position {p}"
                        )
                    covered[p] = name
        for (tensor, axis), users in on_axis.items():
            if any(s.map.modulo is not None for _, s, _ in users):
                _grouped_local(
                    tensor, axis, [(s, self._group(n).removed, size) for n, s, size in users]
                )
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
        """Write the canonical JSON to ``path`` atomically (temporary name, then rename)."""
        from pruneplan._io import atomic_write_bytes

        return atomic_write_bytes(Path(path), self.to_json().encode("utf-8"))

    @classmethod
    def from_json(cls, text: str | bytes) -> PrunePlan:
        """Parse and validate a plan; raises `PlanValidationError` naming the bad field."""
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PlanValidationError(f"plan is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise PlanValidationError(f"plan must be a JSON object, got {type(data).__name__}")
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PrunePlan:
        """Validate a plan given as plain data; raises `PlanValidationError`."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise PlanValidationError(_describe(exc)) from None

    @classmethod
    def load(cls, path: str | Path) -> PrunePlan:
        """Read and validate a plan file."""
        path = Path(path)
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise PlanValidationError(f"cannot read plan file {str(path)!r}: {exc.strerror}") from None
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
        out: dict[tuple[str, int], set[int]] = {}
        for g in self.groups:
            for s in g.slices:
                out.setdefault((s.tensor, s.axis), set()).update(removed_positions(s, g.removed))
        return {k: sorted(v) for k, v in sorted(out.items())}

    def pruned_shapes(self) -> dict[str, list[int]]:
        """The shape every touched tensor has after the plan is applied."""
        shapes = {k: list(v) for k, v in self.model.tensors.items()}
        for (tensor, axis), pos in self.removed_by_axis().items():
            shapes[tensor][axis] -= len(pos)
        return shapes

    def edits(self) -> dict[tuple[str, str], tuple[int, int]]:
        """(module, attribute) -> (before, after), summing the deltas of all groups."""
        out: dict[tuple[str, str], tuple[int, int]] = {}
        for g in self.groups:
            for e in g.edits:
                key = (e.module, e.attribute)
                if key in out and out[key][0] != e.before:
                    raise PlanValidationError(
                        f"groups disagree on {e.module}.{e.attribute} before pruning "
                        f"({out[key][0]} vs {e.before}, group {g.name!r})"
                    )
                before, after = out.get(key, (e.before, e.before))
                out[key] = (before, after + e.after - e.before)
                if out[key][1] < 1:
                    raise PlanValidationError(
                        f"{e.module}.{e.attribute} would drop to {out[key][1]} (group {g.name!r})"
                    )
        return dict(sorted(out.items()))

    def dropout_changes(self) -> dict[str, tuple[float, float]]:
        """module -> (p before, p after), summing the deltas of all groups."""
        out: dict[str, tuple[float, float]] = {}
        for g in self.groups:
            for d in g.dropout:
                before, after = out.get(d.module, (d.p_before, d.p_before))
                out[d.module] = (before, after + d.p_after - d.p_before)
        return dict(sorted(out.items()))

    @property
    def buffers_known(self) -> bool:
        """Whether the plan records which touched tensors are buffers (``model.buffers``)."""
        return self.model.buffers is not None

    def _is_buffer(self, tensor: str) -> bool:
        return tensor in (self.model.buffers or ())

    def group_parameters_removed(self, name: str, *, buffers: bool = False) -> int:
        """Scalars the named group would delete if it were the only group of the plan.

        Counts parameters (``buffers=False``) or buffers (``buffers=True``). When the plan does
        not record which tensors are buffers (`buffers_known` is false) every tensor counts as
        a parameter.
        """
        g = self._group(name)
        shapes = {s.tensor: list(self.model.tensors[s.tensor]) for s in g.slices
                  if self._is_buffer(s.tensor) == buffers}
        before = sum(math.prod(s) for s in shapes.values())
        for s in g.slices:
            if s.tensor in shapes:
                shapes[s.tensor][s.axis] -= len(removed_positions(s, g.removed))
        return before - sum(math.prod(s) for s in shapes.values())

    def summary(self) -> list[dict[str, Any]]:
        """One row per group, in execution order: name, size, kept, removed, fraction removed,
        parameters removed, buffer scalars removed (``None`` when the plan does not record which
        tensors are buffers)."""
        return [
            {
                "group": g.name,
                "size": g.size,
                "kept": g.size - len(g.removed),
                "removed": len(g.removed),
                "fraction": len(g.removed) / g.size,
                "parameters": self.group_parameters_removed(g.name),
                "buffers": self.group_parameters_removed(g.name, buffers=True)
                if self.buffers_known else None,
            }
            for g in self.groups
        ]

    def _scalars(self, shapes: Mapping[str, Sequence[int]], buffers: bool | None) -> int:
        return sum(math.prod(s) for k, s in shapes.items()
                   if buffers is None or self._is_buffer(k) == buffers)

    def scalars_removed(self) -> int:
        """Scalars the plan deletes from the touched tensors, parameters and buffers together."""
        return self._scalars(self.model.tensors, None) - self._scalars(self.pruned_shapes(), None)

    def parameters_removed(self) -> int:
        """Parameter scalars the plan deletes (buffers such as running statistics excluded).

        When the plan does not record which tensors are buffers (`buffers_known` is false),
        this is `scalars_removed`.
        """
        return self._scalars(self.model.tensors, False) - self._scalars(self.pruned_shapes(), False)

    def buffers_removed(self) -> int:
        """Buffer scalars (running statistics) the plan deletes; 0 when buffers are not known."""
        return self._scalars(self.model.tensors, True) - self._scalars(self.pruned_shapes(), True)

    def parameters_touched(self) -> int:
        """Parameter scalars of the touched tensors before pruning (buffers excluded if known)."""
        return self._scalars(self.model.tensors, False)


# ---- positions ---------------------------------------------------------------------------


def removed_positions(s: TensorSlice, removed: Iterable[int]) -> list[int]:
    """Sorted positions on ``s.axis`` that deleting units ``removed`` deletes.

    With ``modulo`` the result is local to one group of a grouped convolution.
    """
    m = s.map
    out: set[int] = set()
    if m.positions is None and m.tiles == 1 and m.repeat == 1:  # the common case, directly
        out = {m.offset + u for u in removed}
    else:
        for u in removed:
            out.update(m.unit(u))
    if s.map.modulo is not None:
        out = {p % s.map.modulo for p in out}
    return sorted(out)


def _group_key(g: Group) -> tuple[bool, int, str]:
    """The canonical order of groups: execution order, then name; unordered groups last."""
    return (g.order is None, g.order or 0, g.name)


def _grouped_local(
    tensor: str, axis: int, users: Sequence[tuple[TensorSlice, Sequence[int], int]]
) -> None:
    """Check that every block of a grouped axis loses the same local positions."""
    modulo = next(s.map.modulo for s, _, _ in users if s.map.modulo is not None)
    covered: set[int] = set()
    gone: set[int] = set()
    for s, removed, size in users:
        if s.map.modulo != modulo:
            raise ValueError(f"tensor {tensor!r} axis {axis}: slices disagree on modulo")
        for u in range(size):
            covered.update(s.map.unit(u))
        for u in removed:
            gone.update(s.map.unit(u))
    blocks: dict[int, set[int]] = {}
    for p in covered:
        blocks.setdefault(p // modulo, set())
    for p in gone:
        blocks[p // modulo].add(p % modulo)
    local = list(blocks.items())
    for b, pos in local[1:]:
        if pos != local[0][1]:
            raise ValueError(
                f"tensor {tensor!r} axis {axis} belongs to a grouped convolution: group block "
                f"{b} would lose local positions {sorted(pos)} but block {local[0][0]} loses "
                f"{sorted(local[0][1])}; every block must lose the same ones"
            )


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
    """The JSON Schema of the plan format, as committed in ``schemas/pruneplan.v1.schema.json``."""
    schema = PrunePlan.model_json_schema()
    schema["$id"] = f"https://pruneplan.dev/schemas/pruneplan.v{VERSION}.schema.json"
    schema["title"] = f"PrunePlan v{VERSION}"
    return json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def state_dict_digest(shapes: Mapping[str, Sequence[int]]) -> str:
    """sha256 of the sorted names and shapes of a whole state dict (no values)."""
    text = "\n".join(f"{k}:{','.join(str(int(d)) for d in shapes[k])}" for k in sorted(shapes))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ""
        for item in err["loc"]:
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

    def __bool__(self) -> bool:
        return self.model_differs or bool(self.groups)

    def __iter__(self) -> Iterator[GroupDiff]:
        return iter(self.groups)


def diff_plans(a: PrunePlan, b: PrunePlan) -> PlanDiff:
    """Per group: removed indices only in ``a``, only in ``b``; groups only in one plan."""
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
    return PlanDiff(groups=out, model_differs=a.model != b.model)


def _shape(g: Group) -> tuple:
    return (tuple((e.module, e.attribute) for e in g.edits), tuple(d.module for d in g.dropout))
