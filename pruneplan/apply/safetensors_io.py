"""Apply a plan to a safetensors file, one tensor at a time, and load pruned weights.

The output is written by a small streaming writer that follows the safetensors format exactly
(8-byte little-endian header length, JSON header padded with spaces to a multiple of 8, then the
raw little-endian data, tensors ordered by dtype then name, as `safetensors.torch.save_file`
orders them). Each tensor's kept rows are read with positioned reads (no memory map, so pages of
the source do not stay in the process), its inner axes gathered into buffers reused from tensor
to tensor, and the result written with one large ``write``: peak memory is about the largest
tensor plus its pruned copy (see `pruneplan.apply._stream` for what was measured).
"""

from __future__ import annotations

import json
import logging
import struct
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from pruneplan._io import atomic_writer, check_output, check_regular, same_path
from pruneplan.apply._slicing import (
    KeepMap,
    check_fingerprint,
    keep_indices,
    kept_shape,
    saved_names_in,
    to_file_names,
    to_plan_names,
)
from pruneplan.apply._stream import Buffers, TensorJob, stream_jobs, write_all
from pruneplan.apply.content import check_content as _check_content
from pruneplan.apply.content import file_digest, needs_content
from pruneplan.errors import AlreadyPrunedError, OutputFileError, PlanMismatchError, WeightsFileError, quote
from pruneplan.plan import PrunePlan

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "DIGEST_KEY",
    "apply_to_safetensors",
    "check_output_file",
    "check_recorded_digest",
    "check_weights",
    "load_pruned",
    "prune_file",
    "read_header",
    "tensor_nbytes",
    "write_safetensors",
]

log = logging.getLogger(__name__)

DIGEST_KEY = "pruneplan.plan_digest"

# safetensors dtype names, in the order of the format's Dtype enum (the writer sorts by it).
# Files are read, sliced and written as bytes: this module imports torch only for the functions
# that take or give torch tensors (`write_safetensors`, `load_pruned`), so `pruneplan apply` on
# files never pays torch's import.
_DTYPE_NAMES = ("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32",
                "U32", "F32", "F64", "I64", "U64")
_RANK = {name: i for i, name in enumerate(_DTYPE_NAMES)}
# bytes per element of each dtype
ITEMSIZE = dict(zip(_DTYPE_NAMES, (1, 1, 1, 1, 1, 2, 2, 2, 2, 4, 4, 4, 8, 8, 8), strict=True))


@cache
def torch_dtypes() -> dict[str, torch.dtype]:
    """safetensors dtype name -> torch dtype (imports torch)."""
    import torch

    return dict(zip(_DTYPE_NAMES, (
        torch.bool, torch.uint8, torch.int8, torch.float8_e5m2, torch.float8_e4m3fn, torch.int16,
        torch.uint16, torch.float16, torch.bfloat16, torch.int32, torch.uint32, torch.float32,
        torch.float64, torch.int64, torch.uint64), strict=True))


@cache
def safetensors_names() -> dict[torch.dtype, str]:
    """torch dtype -> safetensors dtype name (imports torch)."""
    return {dtype: name for name, dtype in torch_dtypes().items()}


def read_header(path: str | Path) -> tuple[dict[str, dict], dict[str, str], int]:
    """Validate a safetensors file and return (tensor entries, metadata, data start offset).

    Raises:
        WeightsFileError: the file is missing, not safetensors, or truncated.
    """
    path = Path(path)
    check_regular(path, "weights file", WeightsFileError)  # a FIFO would block, /dev/zero never end
    try:
        # validates header and file size; the numpy framework spares the torch import (no
        # tensor is read through it)
        with safe_open(str(path), framework="numpy") as f:
            metadata = dict(f.metadata() or {})
    except FileNotFoundError:
        raise WeightsFileError(f"{path}: no such file") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsFileError(f"{path}: not a valid safetensors file ({exc})") from None
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    header.pop("__metadata__", None)
    for key, entry in header.items():
        if entry["dtype"] not in _RANK:
            raise WeightsFileError(f"{path}: tensor {key!r} has unsupported dtype {entry['dtype']}")
    return header, metadata, 8 + n


def tensor_nbytes(dtype: str, shape: Sequence[int]) -> int:
    """Bytes of data of a tensor of safetensors dtype ``dtype`` (e.g. ``"F32"``) and ``shape``."""
    return ITEMSIZE[dtype] * _numel(shape)


def check_weights(plan: PrunePlan, path: str | Path, *, check_digest: bool = True,
                  check_content: str = "warn") -> None:
    """Check that the safetensors file ``path`` holds the weights ``plan`` was made for.

    Args:
        check_digest: also compare the digest of all names and shapes.
        check_content: when the plan records the content digest of the weights it scored
            (``provenance.weights_digest``) and the file's content differs: ``"warn"`` (a
            `WeightsContentWarning`), ``"error"`` (`PlanMismatchError`) or ``"off"``.

    Raises:
        WeightsFileError: the file is unreadable.
        AlreadyPrunedError: the file was already pruned by this plan.
        PlanMismatchError: it does not fit (the message names the plan that pruned it, if any),
            or its content differs and ``check_content="error"``.
        PlanError: ``check_content`` is not ``"warn"``, ``"error"`` or ``"off"``.
    """
    header, metadata, _ = read_header(path)
    check_file(plan, header, metadata, path, check_digest, check_content)


def check_file(plan: PrunePlan, header: Mapping[str, dict], metadata: Mapping[str, str],
               where: str | Path, check_digest: bool = True, check_content: str = "warn",
               shapes: Mapping[str, Sequence[int]] | None = None,
               saved: Mapping[str, str] | None = None) -> dict[str, str]:
    """Checks shared by `check_weights` and the appliers: already pruned by this plan, fingerprint,
    content. ``shapes`` overrides the shapes of ``header`` (all shards of a checkpoint).

    The weights may name their tensors as ``save_pretrained`` stores them (the plan's
    ``config.saved_names``, see `saved_names_in`): they are checked under the state-dict keys.
    ``saved``, when given, says that ``shapes`` is already renamed from those names.

    Returns:
        The saved names the weights use (state-dict key -> name in the file; ``{}``: none).
    """
    needs_content(plan, check_content)  # refuses a bad mode before any reading
    shapes = {k: e["shape"] for k, e in header.items()} if shapes is None else shapes
    if saved is None:
        saved = saved_names_in(plan, shapes, str(where))
        shapes = to_plan_names(shapes, saved)
    recorded = metadata.get(DIGEST_KEY)
    if recorded == plan.digest() and all(
        [int(d) for d in shapes.get(k, ())] == v for k, v in plan.pruned_shapes().items()
    ):
        raise AlreadyPrunedError(
            f"{where}: already pruned by this plan ({recorded[:12]}): its metadata records the "
            f"plan's digest and its shapes are the pruned shapes; apply the plan to the unpruned weights"
        )
    try:
        check_fingerprint(plan, shapes, str(where), check_digest)
    except PlanMismatchError as exc:
        if recorded is not None and recorded != plan.digest():
            raise PlanMismatchError(f"{exc} (the weights were pruned by plan {str(recorded)[:12]})") from None
        raise
    if needs_content(plan, check_content):
        rename = {v: k for k, v in saved.items()}
        _check_content(plan, file_digest(where, rename), str(where), check_content)
    return dict(saved)


def write_safetensors(
    path: str | Path,
    entries: Mapping[str, tuple[str, list[int]]],
    produce: Callable[[str], torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    progress: bool = False,
) -> None:
    """Stream tensors into a safetensors file atomically (temporary name, then rename).

    Args:
        entries: name -> (dtype name, shape) of every output tensor, known up front.
        produce: called once per name, in file order, returning that tensor (CPU).
        metadata: string metadata stored under ``__metadata__``.
        progress: show a tqdm bar over the bytes written.
    """

    import torch

    names = safetensors_names()

    def data(name: str) -> Iterable[memoryview]:
        t = produce(name)
        dtype, shape = entries[name]
        if list(t.shape) != list(shape) or names[t.dtype] != dtype:
            raise WeightsFileError(f"internal: tensor {name!r} does not match its header")
        return [memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())]

    _write(Path(path), entries, data, metadata, progress)


def _layout(entries: Mapping[str, tuple[str, list[int]]], metadata: Mapping[str, str] | None
            ) -> tuple[list[str], bytes, int]:
    """(tensor order, header bytes with their 8-byte length prefix, bytes of data), as
    `safetensors.torch.save_file` lays them out: dtype rank descending, then name."""
    order = sorted(entries, key=lambda k: (-_RANK[entries[k][0]], k))
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(sorted(metadata.items()))
    offset = 0
    for name in order:
        dtype, shape = entries[name]
        nbytes = tensor_nbytes(dtype, shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return order, struct.pack("<Q", len(raw)) + raw, offset


def _write(
    path: Path,
    entries: Mapping[str, tuple[str, list[int]]],
    data: Callable[[str], Iterable[memoryview]],
    metadata: Mapping[str, str] | None,
    progress: bool,
) -> None:
    """Write the header, then the raw bytes of every tensor in file order (``data(name)`` yields
    them in pieces), each piece with one large ``write`` on the file descriptor (no buffering
    layer, no copy); atomically."""
    order, head, total = _layout(entries, metadata)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=path.name, disable=not progress, leave=False)
    with bar, atomic_writer(path) as out:
        fd = out.fileno()
        write_all(fd, memoryview(head))
        for name in order:
            written = 0
            for view in data(name):
                write_all(fd, view)
                written += len(view)
                bar.update(len(view))
            if written != tensor_nbytes(*entries[name]):
                raise WeightsFileError(f"internal: tensor {name!r} does not match its header")


def apply_to_safetensors(
    plan: PrunePlan,
    src: str | Path,
    dst: str | Path,
    *,
    overwrite: bool = False,
    check_digest: bool = True,
    check_content: str = "warn",
    progress: bool = False,
) -> Path:
    """Write the pruned copy of the safetensors file ``src`` to ``dst``.

    Reads one tensor at a time; keeps the source metadata and adds the plan digest under
    ``"pruneplan.plan_digest"``; writes to a temporary name and renames, so ``dst`` is either
    complete or untouched. ``progress`` shows a tqdm bar. ``check_digest`` and ``check_content``
    are as in `check_weights` (the content check reads ``src`` once more before writing).

    Raises:
        WeightsFileError: ``src`` is missing, not safetensors, or truncated.
        OutputFileError: ``dst`` is ``src``, or exists and ``overwrite`` is false.
        AlreadyPrunedError: ``src`` was already pruned by this plan.
        PlanMismatchError: the weights do not fit the plan, or their content differs from the
            scored weights and ``check_content="error"``.
    """
    src, dst = Path(src), Path(dst)
    check_output_file(src, dst, overwrite)
    header, metadata, start = read_header(src)
    saved = check_file(plan, header, metadata, src, check_digest, check_content)
    metadata[DIGEST_KEY] = plan.digest()
    prune_file(src, header, start, dst, to_file_names(keep_indices(plan), saved), metadata, progress)
    log.info("wrote %s (%d tensors, plan %s)", dst, len(header), plan.digest()[:12])
    return dst


def check_output_file(src: Path, dst: Path, overwrite: bool) -> None:
    """Refuse an output file path that is the input, exists (without ``overwrite``), is a
    folder, or lies in a folder that does not exist. A symbolic link counts as existing even
    when it dangles.

    Raises:
        OutputFileError: naming ``dst``; its ``cli_message`` speaks of ``--force``.
    """
    if dst.is_dir() and not same_path(src, dst):
        raise OutputFileError(
            f"{dst}: is a folder; the output of a single weights file is a file",
            cli_message=f"{dst}: is a folder; give a file name, or end the path with '/' to write "
                        f"into the folder",
        )
    check_output(dst, [src], overwrite)


def prune_file(
    src: Path,
    header: Mapping[str, dict],
    start: int,
    dst: Path,
    keeps: KeepMap,
    metadata: Mapping[str, str],
    progress: bool = False,
    buffers: Buffers | None = None,
) -> None:
    """Stream the pruned copy of one checked safetensors file to ``dst``, one tensor at a time.

    Only the kept rows of each tensor are read; inner axes are gathered into two buffers reused
    for every tensor (see `pruneplan.apply._stream`): peak memory is about the largest tensor's
    kept rows plus its pruned copy.

    Args:
        header, start: what `read_header` returned for ``src`` (tensor entries, data offset).
        keeps: the plan's `keep_indices`.
        metadata: the output's complete metadata.
        buffers: reuse these buffers (across the shards of a checkpoint); default: new ones.
    """
    entries = {k: (e["dtype"], kept_shape(e["shape"], keeps.get(k, ()))) for k, e in header.items()}
    order, _, _ = _layout(entries, metadata)
    jobs = [
        TensorJob(name, start + header[name]["data_offsets"][0], ITEMSIZE[header[name]["dtype"]],
                  tuple(int(d) for d in header[name]["shape"]),
                  tuple((axis, tuple(keep)) for axis, keep in keeps.get(name, ())))
        for name in order
    ]
    with open(src, "rb") as fh:
        stream = stream_jobs(fh.fileno(), jobs, buffers or Buffers(), str(src))

        def data(name: str) -> Iterator[memoryview]:
            job, pieces = next(stream)
            if job.name != name:  # the jobs are in file order by construction
                raise WeightsFileError(f"internal: tensor {name!r} out of order")
            return pieces

        _write(dst, entries, data, metadata, progress)


def check_recorded_digest(where: str | Path, recorded: object, plan: PrunePlan) -> None:
    """Refuse weights whose metadata records another plan's digest (``None``: nothing recorded).

    Raises:
        PlanMismatchError: ``recorded`` is not ``plan``'s digest.
    """
    if recorded is not None and recorded != plan.digest():
        raise PlanMismatchError(
            f"{where}: pruned by plan {str(recorded)[:12]}, not by this plan ({plan.digest()[:12]})"
        )


def load_pruned_file(plan: PrunePlan, path: Path) -> dict[str, Any]:
    """The tensors of one pruned safetensors file, after checking the plan digest it records.

    Raises:
        PlanMismatchError: the file records the digest of another plan.
        WeightsFileError: the file is unreadable.
    """
    from safetensors.torch import load_file

    _, metadata, _ = read_header(path)
    check_recorded_digest(path, metadata.get(DIGEST_KEY), plan)
    return load_file(str(path))


def to_state_dict_keys(plan: PrunePlan, state: dict[str, Any], where: str) -> dict[str, Any]:
    """``state`` as read from files, under the model's state-dict keys: tensors that
    ``save_pretrained`` stores under other names (``plan.config.saved_names``) renamed back, and
    the tied keys a Hugging Face folder stores once (``lm_head.weight`` = the embedding,
    ``plan.config.tied``) restored as the stored tensor."""
    state = to_plan_names(state, saved_names_in(plan, state, where))
    for alias, stored in (plan.config.tied if plan.config is not None else {}).items():
        if alias not in state and stored in state:
            state[alias] = state[stored]
    return state


def load_pruned(
    model: nn.Module,
    plan: PrunePlan,
    weights: str | Path | Mapping[str, torch.Tensor],
    *,
    check_digest: bool = True,
) -> nn.Module:
    """Give a freshly built ``model`` the pruned architecture, then load ``weights`` strictly.

    Args:
        weights: a pruned safetensors file, a pruned sharded checkpoint (its folder or its
            ``*.safetensors.index.json``: every shard is loaded), a folder `apply_to_checkpoint`
            wrote (sharded or one ``*.safetensors`` file), or a pruned state dict. Keys the plan
            records as tied (``plan.config.tied``) that the files store once are restored from
            the stored tensor; tensors the files store under the names ``save_pretrained`` gives
            them (``plan.config.saved_names``) are loaded under their state-dict keys.

    Raises:
        PlanMismatchError: the file (or a shard) was pruned by another plan, or the weights do not fit.
        WeightsFileError: the file or the sharded checkpoint is unreadable or inconsistent.
    """
    if isinstance(weights, str | Path):
        from pruneplan.apply import (
            checkpoint,
            sharded,  # imports this module: import it late
        )

        path = Path(weights)
        if path.is_dir():  # a folder apply_to_checkpoint or apply_to_sharded_safetensors wrote
            state = checkpoint.load_checkpoint_state(plan, path)
        else:
            state = sharded.load_sharded_state(plan, path) \
                if sharded.is_sharded_checkpoint(path) else load_pruned_file(plan, path)
            state = to_state_dict_keys(plan, state, str(path))
    else:
        state = to_plan_names(weights, saved_names_in(plan, weights, "weights"))
    from pruneplan.apply.model import apply_plan

    _check_pruned_state(model, plan, state, check_digest)
    apply_plan(model, plan, check_digest=check_digest, check_content="off")  # fresh weights
    # a file holds no module versions: give the tensors the model's own state-dict metadata, so
    # modules that read their version while loading (torchvision's MNASNet) load as saved
    metadata = getattr(model.state_dict(), "_metadata", None)
    if metadata is not None:
        state = OrderedDict(state)
        state._metadata = metadata  # type: ignore[attr-defined]
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # every shape and name was checked: not expected
        raise PlanMismatchError(f"weights do not fit the pruned model: {_one_line(exc)}") from None
    return model


def _check_pruned_state(
    model: nn.Module, plan: PrunePlan, state: Mapping[str, torch.Tensor], check_digest: bool
) -> None:
    """Before `load_pruned` touches ``model``: the model is the one the plan was made for, and
    ``state`` holds exactly its tensors, each with its pruned shape (untouched ones included)."""
    import torch

    current = {k: list(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
    check_fingerprint(plan, current, "model", check_digest)
    expected = {**current, **plan.pruned_shapes()}
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        parts = [f"{len(missing)} missing (e.g. {quote(missing[0])})" if missing else "",
                 f"{len(extra)} not in the model (e.g. {quote(extra[0])})" if extra else ""]
        raise PlanMismatchError("weights do not fit the model: tensors " + ", ".join(p for p in parts if p))
    for key in sorted(expected):
        value = state[key]
        if not isinstance(value, torch.Tensor):
            raise PlanMismatchError(f"weights: {quote(key)} is a {type(value).__name__}, not a tensor")
        if list(value.shape) != expected[key]:
            raise PlanMismatchError(
                f"weights: tensor {quote(key)} has shape {list(value.shape)}, the pruned model "
                f"needs {expected[key]}"
            )


def _one_line(exc: BaseException) -> str:
    return "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n
