"""Apply a plan to a Hugging Face checkpoint folder: weights, ``config.json`` and the rest.

A Hugging Face checkpoint folder holds ``config.json``, the weights (one ``model.safetensors``,
or shards and a ``model.safetensors.index.json``) and other files (tokenizer, generation
config...). The pruned folder holds the pruned weights (same file names), ``config.json`` with
the plan's config changes, and a copy of every other file. No model code is needed: the config
changes come from the plan's ``config`` part, or, for a plan without one, are measured from
``config.json`` and the weight shapes (`pruneplan.hf_config.config_edits`).

Every check runs before the first byte is written: a plan whose widths the config cannot
express (one value for all layers, but layers pruned differently; a head size the config
derives) is refused naming the layers and their sizes. The output is built in a temporary
sibling folder and renamed into place.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pruneplan._io import atomic_write_bytes, locked_temp_folder
from pruneplan.apply._slicing import keep_indices, saved_names_in, to_file_names, to_plan_names
from pruneplan.apply.safetensors_io import DIGEST_KEY, check_file, prune_file, read_header
from pruneplan.apply.sharded import (
    INDEX_SUFFIX,
    ShardedCheckpoint,
    _check_output,
    _fsync,
    _index_bytes,
    _move_into_place,
    read_sharded,
)
from pruneplan.errors import PlanMismatchError, WeightsFileError
from pruneplan.hf_config import apply_config_edits, config_edits
from pruneplan.plan import PrunePlan

if TYPE_CHECKING:  # only `load_checkpoint_state` gives tensors; the file appliers need no torch
    import torch

__all__ = [
    "CONFIG_NAME",
    "apply_to_checkpoint",
    "check_checkpoint",
    "is_hf_checkpoint",
    "load_checkpoint_state",
]

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
#: weight files of other formats: copied unpruned they would contradict the pruned config
_OTHER_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")


def is_hf_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a folder holding a ``config.json`` (a Hugging Face checkpoint)."""
    path = Path(path)
    return path.is_dir() and (path / CONFIG_NAME).is_file()


def _read_config(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes())
    except OSError as exc:
        raise WeightsFileError(f"{path}: cannot read the config ({exc.strerror})") from None
    except ValueError as exc:
        raise WeightsFileError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise WeightsFileError(f"{path}: not a JSON object")
    return data


def _check_folder(src: Path) -> None:
    if not src.is_dir():
        raise WeightsFileError(f"{src}: not a checkpoint folder")
    if not (src / CONFIG_NAME).is_file():
        raise WeightsFileError(f"{src}: no {CONFIG_NAME} in this folder (not a Hugging Face checkpoint)")


@dataclass
class _Resolved:
    """A checked Hugging Face checkpoint folder: its weights (sharded ``ckpt`` or one file
    ``single``), every name's shape (tied aliases included), the keep map without the aliases,
    and the config edits."""

    ckpt: ShardedCheckpoint | None
    single: Path | None
    header: dict[str, dict]
    metadata: dict[str, str]
    start: int
    weight_files: set[str]
    shapes: dict[str, list[int]]
    tied: dict[str, str]  # alias the folder does not store -> the stored tensor
    keeps: dict
    edits: Any
    new_config: dict[str, Any]


def _resolve(plan: PrunePlan, src: Path, check_digest: bool, check_content: str) -> _Resolved:
    """Read and check the folder ``src`` against ``plan`` as `apply_to_checkpoint` does, before
    anything is written (the one code path of `apply_to_checkpoint` and `check_checkpoint`)."""
    config_path = src / CONFIG_NAME
    config = _read_config(config_path)
    indexes = sorted(src.glob(f"*{INDEX_SUFFIX}"))
    if len(indexes) > 1:
        raise WeightsFileError(f"{src}: several index files ({', '.join(p.name for p in indexes)})")
    ckpt, single, header, metadata, start = None, None, {}, {}, 0
    if indexes:
        ckpt = read_sharded(indexes[0])
        shapes = ckpt.shapes()
        weight_files = {indexes[0].name, *(s.file for s in ckpt.shards)}
    else:
        single = _single_file(src)
        header, metadata, start = read_header(single)
        shapes = {k: e["shape"] for k, e in header.items()}
        weight_files = {single.name}
    tied = plan.config.tied if plan.config is not None else {}
    # the names save_pretrained gave renamed tensors: everything below uses state-dict keys
    saved = saved_names_in(plan, shapes, str(src))
    full = {k: list(v) for k, v in to_plan_names(shapes, saved).items()}
    aliases = {a: s for a, s in tied.items() if a not in full and s in full}
    for alias, stored in aliases.items():
        full[alias] = list(full[stored])
    if ckpt is not None:
        check_file(plan, {}, ckpt.metadata, ckpt.index, check_digest, check_content, full, saved)
    else:
        check_file(plan, header, metadata, single, check_digest, check_content, full, saved)
    keeps = keep_indices(plan)
    for alias, stored in aliases.items():
        if keeps.get(alias, []) != keeps.get(stored, []):
            raise PlanMismatchError(
                f"{src}: the plan slices {alias!r} and {stored!r} differently, but the "
                f"checkpoint stores them as one tied tensor"
            )
        keeps.pop(alias, None)
    keeps = to_file_names(keeps, saved)
    edits = plan.config if plan.config is not None else config_edits(config, full, plan)
    new_config = apply_config_edits(config, edits, str(config_path)) if edits is not None else config
    return _Resolved(ckpt, single, header, metadata, start, weight_files, full, aliases, keeps, edits,
                     new_config)


def _single_file(src: Path) -> Path:
    """The one ``*.safetensors`` file of a folder without an index."""
    single = sorted(src.glob("*.safetensors"))
    if len(single) != 1:
        what = "no safetensors weights" if not single else "several safetensors files and no index"
        raise WeightsFileError(f"{src}: {what}")
    return single[0]


def check_checkpoint(plan: PrunePlan, src: str | Path, *, check_digest: bool = True,
                     check_content: str = "warn") -> None:
    """Check that the Hugging Face checkpoint folder ``src`` is one `apply_to_checkpoint` accepts
    for ``plan``: the same reading of the folder (sharded or single-file weights; tied keys the
    folder stores once, as ``save_pretrained`` does, counted with the stored tensor's shape) and
    the same checks (fingerprint, digest, content, config edits), without writing anything.

    Raises:
        WeightsFileError: the folder has no config, no safetensors weights, or unreadable ones.
        AlreadyPrunedError: the weights were already pruned by this plan.
        PlanMismatchError: the weights or config do not fit the plan.
        ConfigError: the config cannot express the pruned widths.
    """
    src = Path(src)
    _check_folder(src)
    _resolve(plan, src, check_digest, check_content)


def load_checkpoint_state(plan: PrunePlan, src: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a pruned Hugging Face checkpoint folder (as `apply_to_checkpoint` writes
    it) under their state-dict keys (``plan.config.saved_names`` renamed back), with the tied
    keys of ``plan.config.tied`` that the folder stores once restored as the stored tensor.

    Raises:
        WeightsFileError: the folder's weights are unreadable or inconsistent.
        PlanMismatchError: a weights file records the digest of another plan.
    """
    from pruneplan.apply.safetensors_io import load_pruned_file, to_state_dict_keys
    from pruneplan.apply.sharded import load_sharded_state

    src = Path(src)
    if sorted(src.glob(f"*{INDEX_SUFFIX}")):
        state = load_sharded_state(plan, src)
    else:
        state = load_pruned_file(plan, _single_file(src))
    return to_state_dict_keys(plan, state, str(src))


def apply_to_checkpoint(
    plan: PrunePlan,
    src: str | Path,
    dst: str | Path,
    *,
    overwrite: bool = False,
    check_digest: bool = True,
    check_content: str = "warn",
    progress: bool = False,
) -> Path:
    """Write the pruned copy of the Hugging Face checkpoint folder ``src`` into the folder ``dst``.

    ``AutoModel*.from_pretrained(dst)`` then loads the pruned model with no missing, unexpected
    or mismatched keys. Weights keep their file names; shards and the index are written as by
    `apply_to_sharded_safetensors`, a single ``model.safetensors`` as by `apply_to_safetensors`;
    every file gains the plan digest in its metadata. ``config.json`` is rewritten with the
    config changes (JSON with sorted keys and an indentation of 2, like ``save_pretrained``;
    copied as it is when the plan changes no key);
    every other file and folder is copied, except weight files of other formats (``*.bin``...),
    which would contradict the pruned config: they are left out with a warning.

    Keys that the plan records as tied (``plan.config.tied``, e.g. a ``lm_head.weight`` sharing
    the embedding) and that the folder does not store count with the stored tensor's shape for
    the fingerprint check; the plan must slice them like the stored tensor. Tensors that
    ``save_pretrained`` stores under other names (``plan.config.saved_names``: transformers
    renames some models' keys on saving) are read and written under those names.

    Args:
        src: the checkpoint folder (``config.json`` plus safetensors weights).
        dst: the output folder; its parent must exist.
        overwrite: replace an existing ``dst`` folder.
        check_digest: also compare the digest of all names and shapes.
        check_content: as in `pruneplan.check_weights` (the content of all weight files).
        progress: show a tqdm bar per weights file.

    Returns:
        ``dst``.

    Raises:
        ConfigError: the config cannot express the pruned widths (naming layers and sizes), or
            the plan leaves grouped-query attention uneven.
        WeightsFileError: the folder has no config, no safetensors weights, or unreadable ones.
        OutputFileError: ``dst`` is the source folder, contains it or lies inside it, or exists
            without ``overwrite`` (checked before anything is written).
        PlanMismatchError: the weights or config do not fit the plan.
    """
    src, dst = Path(src), Path(dst)
    _check_folder(src)
    _check_output(src, dst, overwrite)
    r = _resolve(plan, src, check_digest, check_content)
    ckpt, keeps, edits = r.ckpt, r.keeps, r.edits
    config_path, indexes = src / CONFIG_NAME, [ckpt.index] if ckpt is not None else []
    skipped = sorted(p.name for p in src.iterdir() if p.is_file() and p.suffix in _OTHER_WEIGHTS)
    digest = plan.digest()

    with locked_temp_folder(dst) as tmp:  # .NAME.<random>.tmp beside dst; removed on failure
        if ckpt is not None:
            for shard in ckpt.shards:
                prune_file(shard.path, shard.header, shard.start, tmp / shard.file, keeps,
                           {**shard.metadata, DIGEST_KEY: digest}, progress)
            atomic_write_bytes(tmp / indexes[0].name, _index_bytes(ckpt, keeps, digest))
        else:
            prune_file(r.single, r.header, r.start, tmp / r.single.name, keeps,
                       {**r.metadata, DIGEST_KEY: digest}, progress)
        if edits is None or not edits.changes:  # nothing to change: the file as it was
            shutil.copy2(config_path, tmp / CONFIG_NAME)
        else:
            text = json.dumps(r.new_config, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
            atomic_write_bytes(tmp / CONFIG_NAME, text.encode("utf-8"))
        for p in sorted(src.iterdir()):
            if p.name in r.weight_files or p.name == CONFIG_NAME or p.name in skipped:
                continue
            if p.is_dir():
                shutil.copytree(p, tmp / p.name, symlinks=True)
            else:
                shutil.copy2(p, tmp / p.name, follow_symlinks=False)
        _fsync(tmp)
        _move_into_place(tmp, dst, overwrite)
    if skipped:
        log.warning("left out weight files of other formats, which the pruned config would "
                    "contradict: %s", ", ".join(skipped))
    changed = ", ".join(c.describe() for c in edits.changes) if edits is not None else "none"
    log.info("wrote %s (config changes: %s; plan %s)", dst, changed, digest[:12])
    return dst
