"""Apply a plan to a sharded safetensors checkpoint (the Hugging Face layout), shard by shard.

A sharded checkpoint is a folder of safetensors files (``model-00001-of-00004.safetensors``, ...)
and an index ``<name>.safetensors.index.json``::

    {"metadata": {"total_size": <bytes of tensor data>, ...}, "weight_map": {tensor: shard file}}

The index and every shard header are read and cross-checked before anything is written; the
plan's fingerprint is checked against the union of all shards. Each shard is then pruned with the
same streaming writer as a single file (one chunk of rows at a time, through buffers shared by
all shards), into a temporary sibling folder of the output that is renamed to the output at the
end: the output folder appears complete or not at all.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pruneplan._io import atomic_write_bytes, check_output, locked_temp_folder, read_regular_file
from pruneplan.apply._slicing import KeepMap, keep_indices, kept_shape, to_file_names
from pruneplan.apply._stream import Buffers
from pruneplan.apply.safetensors_io import (
    DIGEST_KEY,
    check_file,
    check_recorded_digest,
    prune_file,
    read_header,
    tensor_nbytes,
)
from pruneplan.errors import OutputFileError, WeightsFileError, quote
from pruneplan.plan import PrunePlan

if TYPE_CHECKING:  # only `load_sharded_state` gives tensors; the file appliers need no torch
    import torch

__all__ = [
    "INDEX_SUFFIX",
    "Shard",
    "ShardedCheckpoint",
    "apply_to_sharded_safetensors",
    "check_sharded_weights",
    "find_index",
    "is_sharded_checkpoint",
    "load_sharded_state",
    "read_sharded",
]

log = logging.getLogger(__name__)

INDEX_SUFFIX = ".safetensors.index.json"
#: largest index file read, in bytes (a real one is a few hundred KiB)
MAX_INDEX_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class Shard:
    """One shard file of a checked checkpoint: what `read_header` returned for it."""

    file: str
    path: Path
    header: dict[str, dict]
    metadata: dict[str, str]
    start: int


@dataclass(frozen=True)
class ShardedCheckpoint:
    """A sharded checkpoint whose index and shard headers agree with each other."""

    index: Path
    document: dict[str, Any]  # the whole index, for the keys we do not interpret
    metadata: dict[str, Any]
    weight_map: dict[str, str]
    shards: list[Shard]  # sorted by file name

    def shapes(self) -> dict[str, list[int]]:
        """Every tensor of every shard, name -> shape."""
        return {k: e["shape"] for s in self.shards for k, e in s.header.items()}


def is_sharded_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` names a sharded checkpoint: a folder, or a ``*.index.json`` file."""
    path = Path(path)
    return path.is_dir() or path.name.endswith(".index.json")


def find_index(src: str | Path) -> Path:
    """The index file of the checkpoint ``src`` (its folder, or the index itself).

    Raises:
        WeightsFileError: ``src`` does not exist, or the folder holds no index or several.
    """
    src = Path(src)
    if src.is_dir():
        found = sorted(src.glob(f"*{INDEX_SUFFIX}"))
        if not found:
            raise WeightsFileError(f"{src}: no *{INDEX_SUFFIX} file in this folder")
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            raise WeightsFileError(f"{src}: several index files ({names}); pass the one to use")
        return found[0]
    if not src.exists():
        raise WeightsFileError(f"{src}: no such file or folder")
    return src


def read_sharded(src: str | Path) -> ShardedCheckpoint:
    """Read and cross-check the index and every shard header of a sharded checkpoint.

    Args:
        src: the checkpoint folder (holding exactly one ``*.safetensors.index.json``) or the index.

    Raises:
        WeightsFileError: the index is not valid JSON or not an index, a shard file name leaves
            the folder, a shard is missing or not safetensors, a tensor is listed twice or held
            by two shards, the index and the shard headers disagree on a tensor, or
            ``metadata.total_size`` is not the sum of the tensor data bytes.
    """
    index = find_index(src)
    document, metadata, weight_map = _read_index(index)
    shards: list[Shard] = []
    folder = index.parent.resolve()
    for file in sorted(set(weight_map.values())):
        path = index.parent / file
        if path.is_symlink() and not path.resolve().is_relative_to(folder):
            tensor = min(k for k, v in weight_map.items() if v == file)
            raise WeightsFileError(
                f"{index}: shard file {quote(file)} (tensor {quote(tensor)}) is a symbolic link out "
                f"of the checkpoint folder (to {quote(os.readlink(path))}); a shard must be a file "
                f"in the checkpoint folder"
            )
        if not path.is_file():
            tensors = sorted(k for k, v in weight_map.items() if v == file)
            raise WeightsFileError(
                f"{index}: shard {file!r} (listed for {len(tensors)} tensors, e.g. {tensors[0]!r}) "
                f"does not exist"
            )
        try:
            header, meta, start = read_header(path)
        except WeightsFileError as exc:
            raise WeightsFileError(f"{index}: shard {file!r}: {str(exc).removeprefix(f'{path}: ')}") from None
        shards.append(Shard(file, path, header, meta, start))
    _cross_check(index, metadata, weight_map, shards)
    return ShardedCheckpoint(index, document, metadata, weight_map, shards)


def check_sharded_weights(plan: PrunePlan, src: str | Path, *, check_digest: bool = True,
                          check_content: str = "warn") -> None:
    """Check that the sharded checkpoint ``src`` holds the weights ``plan`` was made for.

    Args:
        src: the checkpoint folder or its ``*.safetensors.index.json``.
        check_digest: also compare the digest of all names and shapes (of all shards together).
        check_content: as in `pruneplan.check_weights` (content of all shards together).

    Raises:
        WeightsFileError: the checkpoint is unreadable or inconsistent (see `read_sharded`).
        AlreadyPrunedError: the index records this plan's digest and the shapes are pruned.
        PlanMismatchError: it does not fit the plan, or its content differs and
            ``check_content="error"``.
    """
    ckpt = read_sharded(src)
    check_file(plan, {}, ckpt.metadata, ckpt.index, check_digest, check_content, ckpt.shapes())


def apply_to_sharded_safetensors(
    plan: PrunePlan,
    src: str | Path,
    dst: str | Path,
    *,
    overwrite: bool = False,
    check_digest: bool = True,
    check_content: str = "warn",
    progress: bool = False,
) -> Path:
    """Write the pruned copy of the sharded checkpoint ``src`` into the folder ``dst``.

    Every tensor stays in the shard file of the same name; each shard keeps its metadata and
    gains ``"pruneplan.plan_digest"``. The index keeps its file name, its ``weight_map`` and
    its other keys; ``metadata.total_size`` is recomputed from the pruned shapes and
    ``metadata["pruneplan.plan_digest"]`` is added; it is written with sorted keys and an
    indentation of 2, so the same inputs give byte-identical folders. Only the index and the
    shards are written: other files of the source folder (``config.json``, tokenizer files...)
    are not copied. The output is built in a temporary sibling folder of ``dst`` and renamed to
    ``dst`` at the end; on any failure the temporary folder is removed and ``dst`` is untouched.
    With ``overwrite``, an existing ``dst`` is renamed aside, the new folder renamed in, then the
    old one deleted.

    Args:
        src: the checkpoint folder (holding exactly one ``*.safetensors.index.json``) or the index.
        dst: the output folder; its parent must exist.
        overwrite: replace an existing ``dst`` folder.
        check_digest: also compare the digest of all names and shapes (of all shards together).
        check_content: as in `pruneplan.check_weights` (reads every shard once more first).
        progress: show a tqdm bar per shard.

    Returns:
        ``dst``.

    Raises:
        WeightsFileError: the checkpoint is unreadable or inconsistent (see `read_sharded`).
        OutputFileError: ``dst`` is the source folder, contains it or lies inside it, exists and ``overwrite``
            is false, is not a folder, or its parent does not exist.
        AlreadyPrunedError: the checkpoint was already pruned by this plan.
        PlanMismatchError: the weights do not fit the plan, or their content differs and
            ``check_content="error"``.
    """
    dst = Path(dst)
    index = find_index(src)
    _check_output(index.parent, dst, overwrite)
    ckpt = read_sharded(index)
    saved = check_file(plan, {}, ckpt.metadata, ckpt.index, check_digest, check_content, ckpt.shapes())
    keeps, digest = to_file_names(keep_indices(plan), saved), plan.digest()
    index_bytes = _index_bytes(ckpt, keeps, digest)

    with locked_temp_folder(dst) as tmp:  # .NAME.<random>.tmp; a killed run's are cleared
        buffers = Buffers()  # allocated once, for the largest chunk of any shard
        for shard in ckpt.shards:
            metadata = {**shard.metadata, DIGEST_KEY: digest}
            prune_file(shard.path, shard.header, shard.start, tmp / shard.file, keeps, metadata, progress,
                       buffers)
        atomic_write_bytes(tmp / ckpt.index.name, index_bytes)
        _fsync(tmp)
        _move_into_place(tmp, dst, overwrite)
    log.info("wrote %s (%d shards, %d tensors, plan %s)", dst, len(ckpt.shards), len(ckpt.weight_map),
             digest[:12])
    return dst


def load_sharded_state(plan: PrunePlan, src: str | Path) -> dict[str, torch.Tensor]:
    """Load every shard of a pruned sharded checkpoint into one state dict.

    Raises:
        WeightsFileError: the checkpoint is unreadable or inconsistent (see `read_sharded`).
        PlanMismatchError: the index or a shard records the digest of another plan.
    """
    from safetensors.torch import load_file

    ckpt = read_sharded(src)
    check_recorded_digest(ckpt.index, ckpt.metadata.get(DIGEST_KEY), plan)
    for shard in ckpt.shards:
        check_recorded_digest(shard.path, shard.metadata.get(DIGEST_KEY), plan)
    state: dict[str, torch.Tensor] = {}
    for shard in ckpt.shards:
        state.update(load_file(str(shard.path)))
    return state


class _Object(dict):
    """A JSON object that remembers the keys it saw more than once."""

    duplicates: list[str]


def _object(pairs: list[tuple[str, Any]]) -> _Object:
    obj = _Object()
    obj.duplicates = []
    for key, value in pairs:
        if key in obj:
            obj.duplicates.append(key)
        obj[key] = value
    return obj


def _no_constant(text: str) -> float:
    raise ValueError(f"{text} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {quote(text, 24)} is too large")
    return value


def _read_index(index: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, str]]:
    """Parse and check the structure of an index: (whole document, metadata, weight_map)."""
    raw = read_regular_file(index, MAX_INDEX_BYTES, "sharded checkpoint index", WeightsFileError)
    try:
        document = json.loads(raw, object_pairs_hook=_object, parse_constant=_no_constant,
                              parse_float=_finite)
    except (ValueError, RecursionError) as exc:
        raise WeightsFileError(f"{index}: not a valid JSON index ({quote(str(exc))})") from None
    if not isinstance(document, _Object):
        raise WeightsFileError(
            f"{index}: not a sharded checkpoint index (a JSON {type(document).__name__}, not an object "
            f"with a 'weight_map')"
        )
    if document.duplicates:
        raise WeightsFileError(f"{index}: key {document.duplicates[0]!r} appears twice at the top level")
    weight_map = document.get("weight_map")
    if not isinstance(weight_map, _Object):
        what = "no 'weight_map'" if weight_map is None else "'weight_map' is not a JSON object"
        raise WeightsFileError(f"{index}: {what} (not a sharded safetensors index)")
    if weight_map.duplicates:
        raise WeightsFileError(f"{index}: tensor {weight_map.duplicates[0]!r} is listed twice in weight_map")
    if not weight_map:
        raise WeightsFileError(f"{index}: weight_map lists no tensors")
    for name, file in weight_map.items():
        if not isinstance(file, str):
            raise WeightsFileError(f"{index}: weight_map[{name!r}] is {file!r}, not a shard file name")
        if not file or file in (".", "..") or Path(file).name != file or "\\" in file or "\0" in file:
            raise WeightsFileError(
                f"{index}: shard file name {file!r} (tensor {name!r}) is not a plain file name in the "
                f"checkpoint folder"
            )
    metadata = document.get("metadata", {})
    if not isinstance(metadata, dict):
        raise WeightsFileError(f"{index}: 'metadata' is not a JSON object")
    if isinstance(metadata, _Object) and metadata.duplicates:
        raise WeightsFileError(f"{index}: metadata key {metadata.duplicates[0]!r} appears twice")
    total = metadata.get("total_size")
    if total is not None and (not isinstance(total, int) or isinstance(total, bool) or total < 0):
        raise WeightsFileError(f"{index}: metadata.total_size is {total!r}, not a number of bytes")
    return document, metadata, dict(weight_map)


def _cross_check(
    index: Path, metadata: dict[str, Any], weight_map: dict[str, str], shards: list[Shard]
) -> None:
    """The index and the shard headers name the same tensors in the same places and sizes."""
    holders: dict[str, list[str]] = {}
    for shard in shards:
        for name in shard.header:
            holders.setdefault(name, []).append(shard.file)
    for name in sorted(holders):
        if len(holders[name]) > 1:
            raise WeightsFileError(
                f"{index}: tensor {name!r} is present in several shard files ({', '.join(holders[name])})"
            )
    for name in sorted(weight_map):
        file = weight_map[name]
        if holders.get(name, [file])[0] != file:
            raise WeightsFileError(
                f"{index}: weight_map puts tensor {name!r} in shard {file!r}, but it is in "
                f"{holders[name][0]!r}"
            )
        if name not in holders:
            raise WeightsFileError(
                f"{index}: weight_map puts tensor {name!r} in shard {file!r}, which does not hold it"
            )
    for name in sorted(set(holders) - set(weight_map)):
        raise WeightsFileError(
            f"{index}: shard {holders[name][0]!r} holds tensor {name!r}, which weight_map does not list"
        )
    declared = metadata.get("total_size")
    actual = sum(tensor_nbytes(e["dtype"], e["shape"]) for s in shards for e in s.header.values())
    if declared is not None and declared != actual:
        raise WeightsFileError(
            f"{index}: metadata.total_size is {declared}, but the shards hold {actual} bytes of "
            f"tensor data"
        )


def _check_output(folder: Path, dst: Path, overwrite: bool) -> None:
    """Refuse an output folder that is (or holds, or lies inside) the source, exists, or has no
    parent (`pruneplan._io.check_output`)."""
    source, target = folder.resolve(), dst.resolve()
    if target == source or source.is_relative_to(target):
        raise OutputFileError(f"{dst}: the output folder is the checkpoint folder or contains it; "
                              f"choose another output")
    check_output(dst, [folder], overwrite, folder=True)  # and not inside the source folder


def _move_into_place(tmp: Path, dst: Path, overwrite: bool) -> None:
    """Rename the finished folder ``tmp`` to ``dst``, replacing an existing ``dst`` folder."""
    if not (dst.exists() or dst.is_symlink()):
        try:
            os.rename(tmp, dst)
        except OSError as exc:
            raise OutputFileError(f"{dst}: cannot move the output into place ({exc.strerror})") from None
        return
    if not overwrite:  # appeared while we were writing
        raise OutputFileError(f"{dst}: output exists (pass overwrite=True to replace it)",
                              cli_message=f"{dst}: output exists (use --force to replace it)")
    old = dst.with_name(f".{dst.name}.{secrets.token_hex(6)}.old")
    os.rename(dst, old)
    try:
        os.rename(tmp, dst)
    except BaseException:
        os.rename(old, dst)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if old.exists():
        log.warning("could not delete the replaced output %s", old)


def _index_bytes(ckpt: ShardedCheckpoint, keeps: KeepMap, digest: str) -> bytes:
    """The pruned index: pruned total_size and the plan digest; sorted keys, indent 2."""
    total = sum(
        tensor_nbytes(e["dtype"], kept_shape(e["shape"], keeps.get(name, ())))
        for s in ckpt.shards
        for name, e in s.header.items()
    )
    metadata = {**ckpt.metadata, "total_size": total, DIGEST_KEY: digest}
    document = {**ckpt.document, "metadata": metadata, "weight_map": ckpt.weight_map}
    return (json.dumps(document, indent=2, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")


def _fsync(folder: Path) -> None:
    """Flush a folder's entries to disk (where the platform allows opening folders)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
