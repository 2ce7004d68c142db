"""Atomic file writes: write to a temporary name in the same folder, then rename.

Temporary names are ``.NAME.<random>.tmp`` beside the output ``NAME`` (a file, or a folder for
sharded checkpoints). The writer holds an exclusive `flock` on its temporary file (or folder)
while it writes, so a process killed mid-write leaves an unlocked one behind; the next write to
the same output removes those (`clear_stale`) and leaves alone the ones another live process
is still writing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from pruneplan.errors import OutputFileError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no locks, no clearing
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "atomic_write_bytes",
    "atomic_writer",
    "check_output",
    "check_regular",
    "clear_stale",
    "locked_temp_folder",
    "read_regular_file",
    "same_path",
    "write_output",
]

log = logging.getLogger(__name__)


def _lock(fd: int) -> bool:
    """Take an exclusive lock on ``fd`` without waiting; False if another process holds one."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def clear_stale(path: Path) -> list[Path]:
    """Remove the temporary files and folders (``.NAME.<random>.tmp``) that writes to ``path``
    killed mid-way left beside it; return what was removed.

    A temporary that another process holds locked (a write in progress) is left alone, as is
    every other file. Does nothing where `flock` is not available.
    """
    path = Path(path)
    folder = path.parent
    if fcntl is None or not folder.is_dir():
        return []
    pattern = re.compile(r"\." + re.escape(path.name) + r"\.[A-Za-z0-9_]+\.tmp")
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    for name in names:
        if not pattern.fullmatch(name):
            continue
        stale = folder / name
        try:
            info = os.lstat(stale)
            if not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode)):
                continue  # not something we write (a link, a FIFO): leave it
            fd = os.open(stale, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        except OSError:
            continue
        try:
            if not _lock(fd):
                continue  # a live writer holds it
            if stat.S_ISDIR(info.st_mode):
                shutil.rmtree(stale, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(stale)
            if not os.path.lexists(stale):
                removed.append(stale)
                log.info("removed %s, left by an earlier write to %s that did not finish", stale, path)
        finally:
            os.close(fd)
    return removed


@contextlib.contextmanager
def atomic_writer(path: Path) -> Iterator[BinaryIO]:
    """Yield a binary file that replaces ``path`` only if the block finishes without error.

    Stale temporaries of earlier, killed writes to ``path`` are removed first.
    """
    path = Path(path)
    _check_target(path)
    clear_stale(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    except OSError as exc:
        raise OutputFileError(f"{path}: cannot write in {str(path.parent)!r} ({exc.strerror})") from None
    _lock(fd)  # held until the file is closed: marks the write as alive for clear_stale
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual permissions
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            try:
                fh.flush()
                os.fsync(fh.fileno())
                os.replace(tmp, path)
            except OSError as exc:
                raise OutputFileError(f"{path}: cannot write ({exc.strerror})") from None
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def locked_temp_folder(path: Path) -> Iterator[Path]:
    """Yield a new temporary folder ``.NAME.<random>.tmp`` beside ``path``, locked while the
    block runs; removed if the block fails (on success the block has renamed it away).

    Stale temporaries of earlier, killed writes to ``path`` are removed first.
    """
    path = Path(path)
    clear_stale(path)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as exc:
        raise OutputFileError(f"{path}: cannot write in {str(path.parent)!r} ({exc.strerror})") from None
    fd = os.open(tmp, os.O_RDONLY)
    try:
        _lock(fd)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; give the usual permissions
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(fd)


def read_regular_file(path: Path, limit: int, what: str, error: type[Exception]) -> bytes:
    """The bytes of ``path``, refusing anything but a regular file of at most ``limit`` bytes.

    A FIFO, a device (``/dev/zero``), a socket or a folder is refused without reading it, so the
    call never blocks or reads without end.

    Raises:
        error: the path is missing, unreadable, not a regular file, or too large; the message
            names ``what`` and the path.
    """
    shown = repr(str(path)) if len(str(path)) <= 200 else repr(str(path)[:200]) + "..."
    mib = f"{limit / 2**20:g} MiB"
    try:
        info = os.stat(path)
    except OSError as exc:
        raise error(f"cannot read {what} {shown}: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise error(f"{what} {shown} is {_kind(info.st_mode)}, not a regular file")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise error(f"cannot read {what} {shown}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)  # the file opened may not be the one stat-ed
        if not stat.S_ISREG(info.st_mode):
            raise error(f"{what} {shown} is {_kind(info.st_mode)}, not a regular file")
        if info.st_size > limit:
            raise error(f"{what} {shown} is {info.st_size} bytes, more than the limit of {limit} ({mib})")
        chunks, got = [], 0
        while got <= limit:
            chunk = os.read(fd, min(1 << 24, limit + 1 - got))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
    except OSError as exc:
        raise error(f"cannot read {what} {shown}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if got > limit:
        raise error(f"{what} {shown} is more than the limit of {limit} bytes ({mib})")
    return b"".join(chunks)


def check_regular(path: Path, what: str, error: type[Exception]) -> None:
    """Refuse (with ``error``) a path that exists but is not a regular file (FIFO, device...)."""
    try:
        info = os.stat(path)
    except OSError:
        return  # the reader reports missing files in its own words
    if not stat.S_ISREG(info.st_mode):
        raise error(f"{what} {str(path)!r} is {_kind(info.st_mode)}, not a regular file")


def _kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    for test, name in kinds:
        if test(mode):
            return name
    return "a special file"


def _check_target(path: Path) -> None:
    """Refuse to write a file over a folder or into a folder that does not exist."""
    if path.is_dir():
        raise OutputFileError(f"{path}: is a folder; give a file name")
    parent = path.parent
    if not parent.is_dir():
        raise OutputFileError(f"{path}: folder {str(parent)!r} does not exist")


def same_path(a: Path, b: Path) -> bool:
    """Whether two paths name the same file or folder (resolved; hard links too)."""
    try:
        if a.exists() and b.exists() and os.path.samefile(a, b):
            return True
    except OSError:
        pass
    return a.resolve() == b.resolve()


def check_output(
    dst: str | Path,
    inputs: Iterable[str | Path] = (),
    overwrite: bool = False,
    *,
    folder: bool = False,
) -> None:
    """The one rule every writer follows before writing ``dst``, checked before anything is
    written: ``dst`` is none of ``inputs`` (resolved, so symbolic links and hard links count;
    for a folder output, ``dst`` is not inside an input folder and no input is inside ``dst``),
    does not exist unless ``overwrite`` (a dangling symbolic link counts as existing), is a
    file for a file output (``folder=False``) and a folder for a folder output when it is
    replaced, and its parent folder exists. The write itself then goes to a temporary name
    beside ``dst`` and is renamed (`atomic_writer`, `locked_temp_folder`).

    Raises:
        OutputFileError: naming ``dst``; its ``cli_message`` speaks of ``--force``.
    """
    dst = Path(dst)
    target = dst.resolve()
    for raw in inputs:
        src = Path(raw)
        if same_path(src, dst):
            what = "folder" if folder and src.is_dir() else "file"
            raise OutputFileError(f"{dst}: the output is the input {what} {str(src)!r}; choose another "
                                  f"output")
        source = src.resolve()
        if folder and source.is_dir() and target.is_relative_to(source):
            raise OutputFileError(
                f"{dst}: the output folder is inside the input folder {str(src)!r}; choose an output "
                f"outside it"
            )
        if source.is_relative_to(target) and source != target:
            raise OutputFileError(
                f"{dst}: the output {'folder ' if folder else ''}contains the input {str(src)!r}; "
                f"choose another output"
            )
    if not folder and dst.is_dir():
        raise OutputFileError(f"{dst}: is a folder; give a file name")
    if dst.exists() or dst.is_symlink():
        what = "output exists" if dst.exists() else "output exists (a dangling symbolic link)"
        if not overwrite:
            raise OutputFileError(f"{dst}: {what} (pass overwrite=True to replace it)",
                                  cli_message=f"{dst}: {what} (use --force to replace it)")
        if folder and (dst.is_symlink() or not dst.is_dir()):
            raise OutputFileError(f"{dst}: exists and is not a folder; refusing to replace it")
    if not dst.parent.is_dir():
        raise OutputFileError(f"{dst}: folder {str(dst.parent)!r} does not exist")


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically and return the path."""
    with atomic_writer(path) as fh:
        fh.write(data)
    return Path(path)


def write_output(
    path: str | Path, data: bytes, inputs: Iterable[str | Path] = (), overwrite: bool = False
) -> Path:
    """Write ``data`` to a new file ``path`` as every writer of pruneplan does: refused by
    `check_output` (``path`` is one of ``inputs``, or exists without ``overwrite``...), else
    written to a temporary name beside ``path`` and renamed; return the path.

    Raises:
        OutputFileError: naming ``path``; nothing was written.
    """
    check_output(path, inputs, overwrite)
    return atomic_write_bytes(Path(path), data)
