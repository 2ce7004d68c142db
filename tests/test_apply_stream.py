"""The fast safetensors applier (`pruneplan.apply._stream`): golden bytes for every read path.

Golden reference: `safetensors.torch.save_file` of `apply_to_state_dict`'s output (plain
`index_select` on in-memory tensors, an independent path). The source files carry no metadata,
so the output's only metadata key is the plan digest and the whole files compare byte for byte
(save_file writes a metadata map of several keys in a random order).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import pruneplan as pp
from pruneplan.apply import _stream
from pruneplan.apply._slicing import keep_indices
from pruneplan.apply._stream import Buffers, gather_axis, kept_runs, preadv_exactly, selector
from pruneplan.apply.safetensors_io import DIGEST_KEY, prune_file, read_header
from pruneplan.errors import WeightsFileError


def pattern(name: str, size: int, seed: int) -> list[int]:
    """Half of ``size`` units: every other one, a random half, or one contiguous block."""
    if name == "strided":
        return list(range(1, size, 2))
    if name == "random":
        gen = torch.Generator().manual_seed(seed)
        return sorted(torch.randperm(size, generator=gen)[: size // 2].tolist())
    return list(range(size // 4, size // 4 + size // 2))


def mlp(dtype: torch.dtype, pat: str) -> tuple[dict[str, torch.Tensor], pp.PrunePlan]:
    """Linear 160 -> 256 -> 96 -> 8 (weights [256, 160], [96, 256], [8, 96]), hidden units
    removed by ``pat``; a scalar and an empty buffer ride along untouched.

    Rows of '0.weight' are 640 B at fp32 (read row by row); of '2.weight' 1 KiB (rows and an
    inner axis); of '4.weight' 384 B (read whole: narrow rows; only its inner axis is sliced).
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(160, 256), nn.ReLU(), nn.Linear(256, 96), nn.ReLU(), nn.Linear(96, 8))
    model.register_buffer("scalar", torch.tensor(3.5))
    model.register_buffer("empty", torch.zeros(0, 4))
    plan = pp.plan_pruning(model, {"0": pattern(pat, 256, 1), "2": pattern(pat, 96, 2)},
                           cascades={"0": ["2"], "2": ["4"]})
    state = {k: (v * 100 if dtype in (torch.int64, torch.int16) else v).to(dtype).contiguous()
             for k, v in model.state_dict().items()}
    return state, plan


def convnet(pat: str) -> tuple[dict[str, torch.Tensor], pp.PrunePlan]:
    """Conv 3 -> 16 -> 8 with BatchNorm: axis 0 of [16, 3, 3, 3] (108 B rows: read whole and
    gathered), axis 1 of [8, 16, 3, 3] (36 B inner blocks), 1-D BatchNorm tensors."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 3))
    model[1].running_mean.uniform_(-1, 1)
    plan = pp.plan_pruning(model, {"0": pattern(pat, 16, 3)}, cascades={"0": ["1", "3"]})
    return dict(model.state_dict()), plan


def golden(tmp_path: Path, state: dict[str, torch.Tensor], plan: pp.PrunePlan) -> tuple[bytes, bytes]:
    src = tmp_path / "src.safetensors"
    save_file(state, str(src))
    ours = pp.apply_to_safetensors(plan, src, tmp_path / "ours.safetensors").read_bytes()
    save_file(pp.apply_to_state_dict(plan, state), str(tmp_path / "ref.safetensors"),
              metadata={DIGEST_KEY: plan.digest()})
    return ours, (tmp_path / "ref.safetensors").read_bytes()


DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int16,
          torch.float8_e4m3fn, torch.bool]


@pytest.mark.parametrize("pat", ["strided", "random", "block"])
@pytest.mark.parametrize("dtype", DTYPES, ids=[str(d).removeprefix("torch.") for d in DTYPES])
def test_bytes_equal_save_file_of_sliced_state_dict(tmp_path: Path, pat: str, dtype: torch.dtype) -> None:
    state, plan = mlp(dtype, pat)
    ours, ref = golden(tmp_path, state, plan)
    assert len(ours) == len(ref)
    assert ours == ref


@pytest.mark.parametrize("pat", ["strided", "random", "block"])
def test_conv_and_norm_tensors_bytes_equal_save_file(tmp_path: Path, pat: str) -> None:
    state, plan = convnet(pat)
    ours, ref = golden(tmp_path, state, plan)
    assert ours == ref


@pytest.mark.parametrize("pat", ["strided", "random", "block"])
@pytest.mark.parametrize(("chunk", "skip"), [(1, 0), (700, 640), (4096, 1 << 20)],
                         ids=["row-per-chunk-no-skip-reads", "small-chunks", "big-skip-reads"])
def test_chunking_and_gap_reads_do_not_change_the_bytes(tmp_path: Path, monkeypatch, pat: str,
                                                        chunk: int, skip: int) -> None:
    # chunk=1: one row per chunk (rows larger than a chunk); skip=0: every gap of removed rows
    # starts a new read; skip=1 MiB: all gaps are read into the scratch buffer
    monkeypatch.setattr(_stream, "CHUNK_BYTES", chunk)
    monkeypatch.setattr(_stream, "MAX_SKIP_READ", skip)
    for i, (state, plan) in enumerate((mlp(torch.float32, pat), convnet(pat))):
        (tmp_path / str(i)).mkdir()
        ours, ref = golden(tmp_path / str(i), state, plan)
        assert ours == ref


def test_short_reads_are_continued(tmp_path: Path, monkeypatch) -> None:
    # the kernel may return fewer bytes than asked (signals, reads over 2 GiB): emulate reads
    # of at most 5 bytes, ending mid-view
    state, plan = mlp(torch.float32, "random")
    real = os.preadv

    def stingy(fd, views, offset):
        want = 5
        out = bytearray(want)
        n = real(fd, [out], offset)
        done = 0
        for v in views:
            take = min(len(v), n - done)
            v[:take] = out[done : done + take]
            done += take
            if done == n:
                break
        return n

    monkeypatch.setattr(_stream.os, "preadv", stingy)
    ours, ref = golden(tmp_path, state, plan)
    assert ours == ref


def test_buffers_are_bounded_by_the_chunk_not_the_tensor(tmp_path: Path, monkeypatch) -> None:
    # a 1 MiB tensor ([256, 1024] fp32, rows of 4 KiB) pruned with 64 KiB chunks: both buffers
    # hold 16 rows = 64 KiB, not the tensor
    monkeypatch.setattr(_stream, "CHUNK_BYTES", 64 * 1024)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 256), nn.ReLU(), nn.Linear(256, 4))
    plan = pp.plan_pruning(model, {"0": pattern("random", 256, 4)}, cascades={"0": ["2"]})
    src = tmp_path / "m.safetensors"
    save_file(dict(model.state_dict()), str(src))
    header, _, start = read_header(src)
    bufs = Buffers()
    prune_file(src, header, start, tmp_path / "out.safetensors", keep_indices(plan),
               {DIGEST_KEY: plan.digest()}, buffers=bufs)
    assert [b.size for b in bufs._bufs] == [64 * 1024, 64 * 1024]
    expected = pp.apply_to_state_dict(plan, dict(model.state_dict()))
    save_file(expected, str(tmp_path / "ref.safetensors"), metadata={DIGEST_KEY: plan.digest()})
    assert (tmp_path / "out.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


@pytest.mark.parametrize("keep", [[5], [2, 3, 4, 5], [0, 3, 6, 9], [1, 4], [0, 1, 3, 8, 9],
                                  list(range(12)), [11], [0, 11]])
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_gather_axis_equals_fancy_indexing(keep: list[int], axis: int) -> None:
    # reference: numpy's own fancy indexing of the same positions
    src = np.arange(12 * 12 * 12, dtype=np.int32).reshape(12, 12, 12)
    dims = [12, 12, 12]
    dims[axis] = len(keep)
    out = np.full(dims, -1, dtype=np.int32)
    gather_axis(src, axis, selector(keep), out)
    np.testing.assert_array_equal(out, np.take(src, keep, axis=axis))


def test_selector_takes_views_for_runs_and_even_steps() -> None:
    assert selector([4, 5, 6]) == slice(4, 7, 1)
    assert selector([0, 2, 4, 6]) == slice(0, 7, 2)
    assert selector([7]) == slice(7, 8, 1)
    # uneven: an index array
    sel = selector([0, 1, 3])
    assert isinstance(sel, np.ndarray) and sel.tolist() == [0, 1, 3]


def test_kept_runs() -> None:
    assert kept_runs([]) == []
    assert kept_runs([0, 1, 2, 5, 7, 8]) == [(0, 3), (5, 1), (7, 2)]
    assert kept_runs([3]) == [(3, 1)]


def test_read_past_the_end_is_a_weights_file_error(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(bytes(range(10)))
    fd = os.open(path, os.O_RDONLY)
    try:
        got = bytearray(4)
        preadv_exactly(fd, [memoryview(got)], 6, "f.bin")
        assert bytes(got) == bytes([6, 7, 8, 9])
        with pytest.raises(WeightsFileError, match=r"^f\.bin: the file ends before the data"):
            preadv_exactly(fd, [memoryview(bytearray(5))], 6, "f.bin")
    finally:
        os.close(fd)
