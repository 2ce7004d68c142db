"""Content digests of weights: which exact numbers a plan was scored on.

`weights_digest` is the sha256 of one line per tensor, sorted by name::

    <name> TAB <safetensors dtype, e.g. F32> TAB <shape, comma-separated> TAB <sha256 of the bytes> LF

where the bytes are the tensor's data, little-endian, row-major (what a safetensors file stores).
Each tensor is hashed in chunks of at most 16 MiB, so a model or a file of any size is digested
in bounded extra memory, and a model, its state dict, its safetensors file and its sharded
checkpoint give the same digest.

A tensor held under several keys of a model or state dict (tied weights: an ``lm_head`` that is
the embedding, T5's ``shared`` / ``encoder.embed_tokens`` / ``decoder.embed_tokens``: the same
memory, dtype, shape and strides) has one line, under its first key in state-dict order. That is
what ``save_pretrained`` stores (the first key; the others are re-tied on loading), so a
checkpoint folder and the model it was saved from give the same digest. Equal content under
different keys that are not the same memory (two LayerNorm weights of ones) keeps every line.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from pruneplan.errors import PlanError, PlanMismatchError, WeightsContentWarning, WeightsFileError, quote
from pruneplan.plan import PrunePlan

if TYPE_CHECKING:  # torch is imported only to digest tensors, never for files
    import torch
    from torch import nn

__all__ = ["CHECK_CONTENT", "check_content", "file_digest", "no_data_message", "tensors_without_data",
           "weights_digest"]

CHUNK = 1 << 24  # bytes hashed at a time
#: what to do when the weights' content differs from the scored weights
CHECK_CONTENT = ("warn", "error", "off")


def _line(name: str, dtype: str, shape: Iterable[int], chunks: Iterator[bytes | memoryview]) -> bytes:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return f"{name}\t{dtype}\t{','.join(str(int(d)) for d in shape)}\t{h.hexdigest()}\n".encode()


def _combine(lines: Iterable[tuple[str, bytes]]) -> str:
    total = hashlib.sha256()
    for _, line in sorted(lines):
        total.update(line)
    return total.hexdigest()


def _tensor_chunks(t: torch.Tensor) -> Iterator[memoryview]:
    import torch

    flat = t.detach().reshape(-1)
    step = max(1, CHUNK // max(flat.element_size(), 1))
    for i in range(0, flat.numel(), step):
        part = flat[i:i + step].to("cpu").contiguous()
        yield memoryview(part.view(torch.uint8).numpy())


def weights_digest(weights: nn.Module | Mapping[str, torch.Tensor] | str | Path) -> str:
    """Content digest (sha256 hex) of a model's state dict, a state dict, or weights on disk.

    Args:
        weights: an ``nn.Module`` (its ``state_dict()``), a state dict, a safetensors file, or a
            sharded checkpoint (its folder or its ``*.safetensors.index.json``).

    Returns:
        64 hex characters; equal for a model, its state dict and its saved files (see the
        module docstring for the exact definition).

    Raises:
        WeightsFileError: a file is missing, not safetensors, or truncated.
        ValueError: a tensor has a dtype safetensors cannot store, or holds no data (on the
            ``meta`` device).
    """
    if isinstance(weights, str | Path):
        return file_digest(weights)
    from torch import nn

    from pruneplan.apply.safetensors_io import safetensors_names

    names = safetensors_names()
    state = weights.state_dict() if isinstance(weights, nn.Module) else weights
    lines = []
    seen: set[tuple] = set()
    for name, t in state.items():
        alias = _memory(t)
        if alias is not None:
            if alias in seen:  # tied: the same tensor under an earlier key
                continue
            seen.add(alias)
        if t.dtype not in names:
            raise ValueError(f"tensor {name!r} has dtype {t.dtype}, which has no safetensors name")
        if t.device.type == "meta":
            raise ValueError(f"tensor {name!r} is on the meta device: it holds no data to digest")
        lines.append((name, _line(name, names[t.dtype], t.shape, _tensor_chunks(t))))
    return _combine(lines)


def tensors_without_data(state: Mapping[str, torch.Tensor]) -> list[str]:
    """The keys of ``state`` whose tensors hold no data (on the ``meta`` device), in its order."""
    return [name for name, t in state.items() if t.device.type == "meta"]


def no_data_message(where: str, empty: list[str], total: int) -> str:
    """``"<where>: N of its M tensors are on the meta device ('a.weight', ...) and hold no data"``."""
    names = ", ".join(quote(n) for n in empty[:3]) + (", ..." if len(empty) > 3 else "")
    return f"{where}: {len(empty)} of its {total} tensors are on the meta device ({names}) and hold no data"


def _memory(t: torch.Tensor) -> tuple | None:
    """What makes two state-dict entries the same tensor (``None``: empty, or no storage)."""
    if t.numel() == 0:
        return None
    try:
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # meta or other storage-less tensors
        return None
    return (t.device.type, t.device.index, ptr, t.storage_offset(), tuple(t.shape), tuple(t.stride()),
            t.dtype)


def file_digest(path: str | Path, rename: Mapping[str, str] | None = None) -> str:
    """`weights_digest` of a safetensors file or a sharded checkpoint, reading it in chunks.

    Args:
        rename: name in the file -> the name its line carries (the state-dict key of a tensor
            that ``save_pretrained`` stores under another name), so that a renamed checkpoint
            gives the digest of the model it was saved from.

    Raises:
        WeightsFileError: the file or a shard is missing, not safetensors, or truncated.
    """
    from pruneplan.apply import sharded
    from pruneplan.apply.safetensors_io import read_header

    path = Path(path)
    if sharded.is_sharded_checkpoint(path):
        files = [(s.path, s.header, s.start) for s in sharded.read_sharded(path).shards]
    else:
        header, _, start = read_header(path)
        files = [(path, header, start)]
    lines = []
    for file, header, start in files:
        with open(file, "rb") as fh:
            fd = fh.fileno()
            for stored, e in header.items():
                begin, end = e["data_offsets"]
                name = rename.get(stored, stored) if rename else stored
                lines.append((name, _line(name, e["dtype"], e["shape"],
                                          _file_chunks(fd, file, stored, start + begin, start + end))))
    return _combine(lines)


def _file_chunks(fd: int, file: Path, name: str, begin: int, end: int) -> Iterator[bytes]:
    pos = begin
    while pos < end:
        data = os.pread(fd, min(CHUNK, end - pos), pos)
        if not data:
            raise WeightsFileError(f"{file}: truncated while reading tensor {name!r}")
        pos += len(data)
        yield data


def check_content(plan: PrunePlan, digest: str | None, where: str, mode: str = "warn") -> None:
    """Compare a weights content digest with the one the plan's metric scored.

    Nothing happens when ``mode`` is ``"off"``, the plan records no ``weights_digest`` or
    ``digest`` is ``None``.

    Args:
        digest: `weights_digest` of the weights about to be checked or pruned.
        where: how to name the weights in the message (a path, "model").
        mode: ``"warn"`` (a `WeightsContentWarning`), ``"error"`` or ``"off"``.

    Raises:
        PlanMismatchError: the content differs and ``mode`` is ``"error"``.
        PlanError: ``mode`` is not one of `CHECK_CONTENT`.
    """
    if mode not in CHECK_CONTENT:
        raise PlanError(f"check_content must be one of {CHECK_CONTENT}, got {mode!r}")
    scored = plan.provenance.weights_digest
    if mode == "off" or scored is None or digest is None or digest == scored:
        return
    msg = (f"{where}: the weights' content differs from the weights the plan was scored on "
           f"(content digest {digest[:12]} vs {scored[:12]}); the plan's choice of units may not "
           f"suit these weights")
    if mode == "error":
        raise PlanMismatchError(msg)
    warnings.warn(msg, WeightsContentWarning, stacklevel=3)


def needs_content(plan: PrunePlan, mode: str) -> bool:
    """Whether `check_content` would compare anything (so the digest is worth computing).

    Raises:
        PlanError: ``mode`` is not one of `CHECK_CONTENT`.
    """
    if mode not in CHECK_CONTENT:
        raise PlanError(f"check_content must be one of {CHECK_CONTENT}, got {mode!r}")
    return mode != "off" and plan.provenance.weights_digest is not None
