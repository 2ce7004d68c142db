"""The fast path of the safetensors applier: read only what survives, gather into reused buffers.

Measured on the project's machine (2 cores, a VM; see README "Performance"), what made `apply`
slower than a plain safetensors copy was not the slicing arithmetic but memory:

* every fresh torch buffer is faulted in 4 KiB page by page: allocating and reading a 256 MB
  tensor took 0.65 s, reading it into a reused buffer 0.11 s; every intermediate slice paid the
  faults again (``index_select`` of 128 MB into a fresh tensor: 0.15-0.3 s, into a reused one
  with ``out=``: 0.03 s);
* the rows a plan removes along axis 0 were read and then thrown away.

* ``torch.index_select`` on an inner axis moved 0.3-0.4 GB/s on these cores, numpy 3-5 times
  more: a strided view copied with ``np.copyto`` (every other unit), a narrowed one (a block),
  ``np.take(..., mode="clip")`` for any other set of positions (measured on int32 512 x 8192
  chunks: 21-28 ms with torch, 4 / 2 / 6 ms with numpy).

So a tensor is pruned one chunk of about `CHUNK_BYTES` of rows (axis 0) at a time, through two
numpy buffers allocated once (numpy asks the kernel for huge pages) and reused for every chunk
of every tensor: the kept rows are read straight into the first with positioned vectored reads
(removed rows between kept ones are skipped, or read into a small scratch buffer when the gap is
too short to be worth a system call), each sliced inner axis is gathered into the other buffer
(`selector`, `gather_axis`), and the result is written with one ``write``, no copy in between. Peak memory is
the two buffers: 2 x 16 MB, or two rows when a row is larger. The data path needs no torch.

The bytes are moved as signed integers of the element's width, whatever the dtype (bf16, fp8,
bool...): slicing never interprets them, so the output is bit-identical.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import pairwise

import numpy as np

from pruneplan.errors import WeightsFileError

__all__ = ["Buffers", "TensorJob", "gather_axis", "kept_runs", "preadv_exactly", "selector",
           "stream_jobs", "stream_tensor", "write_all"]

# element width in bytes -> the integer dtype its bytes are moved as
_RAW = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}
# bytes of rows one chunk reads: buffers stay small (two of this size), and hot in the cache
# between the read, the gathers and the write
CHUNK_BYTES = 16 << 20
# rows narrower than this are read whole and gathered like an inner axis: one iovec per run of
# tiny rows would cost more than reading the removed ones
MIN_ROW_BYTES = 512
# gaps of removed rows up to this size are read into a scratch buffer instead of starting a new
# read: an estimate, not tuned (a system call costs a few microseconds, about what copying this
# many bytes from the page cache costs)
MAX_SKIP_READ = 32 * 1024
_IOV_MAX = 1024  # iovecs per preadv (Linux's limit)
_MAX_CHUNK = 1 << 30  # bytes per read/write call (Linux caps one call at 0x7ffff000)


def kept_runs(keep: Sequence[int]) -> list[tuple[int, int]]:
    """``(first, count)`` of every run of consecutive positions in the sorted list ``keep``."""
    runs: list[tuple[int, int]] = []
    for i in keep:
        if runs and runs[-1][0] + runs[-1][1] == i:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    return runs


@dataclass(frozen=True)
class TensorJob:
    """One tensor to copy: where its data is, its element width and shape, what to keep.

    ``keeps`` lists (axis, kept positions) for the axes that lose positions, axes increasing.
    """

    name: str
    offset: int  # absolute file offset of the data
    itemsize: int
    shape: tuple[int, ...]
    keeps: tuple[tuple[int, tuple[int, ...]], ...]

    def row_bytes(self) -> int:
        """Bytes of one position of axis 0 (the whole tensor for a scalar)."""
        return self.itemsize * _prod(self.shape[1:])

    def rows_per_chunk(self) -> int:
        """How many rows of axis 0 one chunk reads: about `CHUNK_BYTES`, at least one row."""
        return max(1, CHUNK_BYTES // max(self.row_bytes(), 1))

    def buffer_bytes(self) -> int:
        """The most bytes one chunk of this tensor puts in a buffer (reads only shrink)."""
        rows = self.shape[0] if self.shape else 1
        return min(rows, self.rows_per_chunk()) * self.row_bytes()


class Buffers:
    """Two byte buffers, sized once to the largest chunk and reused for every tensor."""

    def __init__(self) -> None:
        self._bufs: list[np.ndarray] = [np.empty(0, dtype=np.uint8)] * 2
        self.scratch = memoryview(bytearray(MAX_SKIP_READ))

    def reserve(self, jobs: Sequence[TensorJob]) -> None:
        """Grow both buffers once to what the largest chunk of ``jobs`` needs."""
        need = max((job.buffer_bytes() for job in jobs), default=0)
        for i in (0, 1):
            self.get(i, need)

    def get(self, i: int, nbytes: int) -> np.ndarray:
        """The first ``nbytes`` of buffer ``i`` (a uint8 array), grown if needed."""
        if self._bufs[i].size < nbytes:
            self._bufs[i] = np.empty(0, dtype=np.uint8)  # free before allocating the new one
            # numpy allocations of this size are backed by transparent huge pages (madvise), so
            # filling them costs far fewer page faults than 4 KiB pages
            self._bufs[i] = np.empty(nbytes, dtype=np.uint8)
        return self._bufs[i][:nbytes]


def selector(keep: Sequence[int]) -> slice | np.ndarray:
    """How `gather_axis` picks the sorted, unique positions ``keep``: a slice when they are one
    run or evenly spaced (a view, copied at memory speed), else an index array."""
    n = len(keep)
    step = keep[1] - keep[0] if n > 1 else 1
    if n and step > 0 and keep[-1] - keep[0] == step * (n - 1) and (
            n < 3 or all(b - a == step for a, b in pairwise(keep))):
        return slice(keep[0], keep[-1] + 1, step)
    return np.asarray(keep, dtype=np.intp)


def gather_axis(src: np.ndarray, axis: int, sel: slice | np.ndarray, out: np.ndarray) -> None:
    """Copy the positions ``sel`` (from `selector`) of ``src``'s ``axis`` into ``out``: a
    narrowed or strided view through ``np.copyto``, any other set through ``np.take``
    (``mode="clip"``: the positions were checked against the axis, and clipping spares numpy a
    bounds-checked temporary)."""
    if isinstance(sel, slice):
        where: list[slice] = [slice(None)] * src.ndim
        where[axis] = sel
        np.copyto(out, src[tuple(where)])
    else:
        np.take(src, sel, axis=axis, out=out, mode="clip")


def preadv_exactly(fd: int, views: list[memoryview], offset: int, where: str) -> None:
    """Fill every view in ``views`` from consecutive bytes of ``fd`` starting at ``offset``.

    Raises:
        WeightsFileError: the file ends first (``where`` names it).
    """
    i = 0
    while i < len(views):
        batch, total = [], 0
        for v in views[i : i + _IOV_MAX]:
            if total + len(v) > _MAX_CHUNK and batch:
                break
            batch.append(v)
            total += len(v)
        n = os.preadv(fd, batch, offset)
        if n <= 0:
            raise WeightsFileError(f"{where}: the file ends before the data of the tensor")
        offset += n
        for v in batch:  # drop what was filled; a partly filled view keeps its tail
            if n >= len(v):
                n -= len(v)
                i += 1
            else:
                views[i] = v[n:]
                break


def write_all(fd: int, view: memoryview) -> None:
    """Write all of ``view`` to ``fd`` (a short write continues where it stopped)."""
    done, total = 0, len(view)
    while done < total:
        done += os.write(fd, view[done : done + _MAX_CHUNK])


def _read_rows(fd: int, offset: int, row: int, rows: Sequence[int], dst: memoryview,
               scratch: memoryview, where: str) -> None:
    """Read the rows ``rows`` (sorted positions on axis 0, ``row`` bytes each) of the tensor whose
    data starts at ``offset`` into ``dst``, one after another; removed rows between them are
    skipped, or read into ``scratch`` when the gap is no larger than it (fewer system calls)."""
    calls: list[tuple[int, list[memoryview]]] = []  # (file offset, views), one preadv each
    filled, end = 0, -1
    for first, count in kept_runs(rows):
        start, nbytes = offset + first * row, count * row
        gap = start - end
        if calls and gap <= len(scratch):
            calls[-1][1].append(scratch[:gap])
        else:
            calls.append((start, []))
        calls[-1][1].append(dst[filled : filled + nbytes])
        filled, end = filled + nbytes, start + nbytes
    for at, views in calls:
        preadv_exactly(fd, views, at, where)


def stream_tensor(fd: int, job: TensorJob, bufs: Buffers, where: str) -> Iterator[memoryview]:
    """Read ``job``'s tensor from ``fd`` chunk by chunk of axis 0 and slice it; yield the bytes
    of the result in order.

    Each chunk holds about `CHUNK_BYTES` of rows: the kept ones are read (skipping the removed
    ones, `_read_rows`), then every sliced inner axis is gathered into the other buffer. Rows
    narrower than `MIN_ROW_BYTES` are read whole, and axis 0 gathered like an inner axis. A
    yielded view lives in ``bufs`` and is valid until the next one is asked for.
    """
    where = f"{where}: tensor {job.name!r}"
    shape = list(job.shape)
    row = job.row_bytes()
    if not shape:  # a scalar: nothing to slice
        view = memoryview(bufs.get(0, row))
        preadv_exactly(fd, [view], job.offset, where)
        yield view
        return
    keeps = {axis: keep for axis, keep in job.keeps if len(keep) < shape[axis]}
    keep0 = keeps.pop(0, None)
    inner = [(axis, selector(keep), len(keep)) for axis, keep in sorted(keeps.items())]
    if row == 0 or shape[0] == 0:
        return
    per = job.rows_per_chunk()
    raw = _RAW[job.itemsize]

    def gather(n: int, first: Sequence[int] | None) -> memoryview:
        """Gather axis 0 (``first``: positions within the chunk) and the inner axes of the
        ``n`` rows in buffer 0; return the bytes of the result."""
        dims = [n, *shape[1:]]
        cur, which = bufs.get(0, n * row).view(raw).reshape(dims), 0
        steps = ([(0, selector(first), len(first))] if first is not None else []) + inner
        for axis, sel, count in steps:
            dims[axis] = count
            which = 1 - which
            out = bufs.get(which, job.itemsize * _prod(dims)).view(raw).reshape(dims)
            gather_axis(cur, axis, sel, out)
            cur = out
        return memoryview(cur.reshape(-1).view(np.uint8))

    if keep0 is None or row >= MIN_ROW_BYTES:
        rows: Sequence[int] = range(shape[0]) if keep0 is None else keep0
        for i in range(0, len(rows), per):
            part = rows[i : i + per]
            view = memoryview(bufs.get(0, len(part) * row))
            if keep0 is None:
                preadv_exactly(fd, [view], job.offset + part[0] * row, where)
            else:
                _read_rows(fd, job.offset, row, part, view, bufs.scratch, where)
            yield gather(len(part), None)
        return
    j = 0  # narrow rows: read a range of rows whole, keep the kept ones with a gather
    for r0 in range(0, shape[0], per):
        r1 = min(shape[0], r0 + per)
        k = bisect.bisect_left(keep0, r1, lo=j)
        if k > j:
            view = memoryview(bufs.get(0, (r1 - r0) * row))
            preadv_exactly(fd, [view], job.offset + r0 * row, where)
            yield gather(r1 - r0, [p - r0 for p in keep0[j:k]])
        j = k


def stream_jobs(fd: int, jobs: Sequence[TensorJob], bufs: Buffers, where: str
                ) -> Iterator[tuple[TensorJob, Iterator[memoryview]]]:
    """`stream_tensor` for each of ``jobs`` in order, with the buffers sized once up front."""
    bufs.reserve(jobs)
    advise = getattr(os, "posix_fadvise", None)
    if advise is not None:  # tell the kernel we read forward: larger readahead on a cold file
        advise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    for job in jobs:
        yield job, stream_tensor(fd, job, bufs, where)


def _prod(dims: Sequence[int]) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n

