"""Atomic file output: write to a temporary file (or folder, for a set) beside the destination, fsync, then rename."""

from __future__ import annotations

import errno
import fcntl
import glob
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from ckptx.errors import DestinationError

TEMP_SUFFIX = ".ckptx-partial"
_STARTED = time.time()  # files older than this process cannot be its own


def stale_partials(dst: Path) -> list[Path]:
    """Temporary files (or staging folders) a killed ckptx left beside `dst`: named `{temp_prefix(dst)}*.ckptx-partial`,
    older than this process, and not locked by a ckptx that is still writing them (every writer holds an
    exclusive `flock` on its temporary file or folder until it is done; the kernel drops it when a process dies)."""
    found = []
    for path in sorted(dst.parent.glob(f"{glob.escape(temp_prefix(dst))}*{TEMP_SUFFIX}")):
        try:
            if path.lstat().st_mtime < _STARTED and not _locked(path):
                found.append(path)
        except OSError:
            continue
    return found


def _locked(path: Path) -> bool:
    """Another process holds the writer's lock on `path`."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the probe's own lock
    return False


_NAME_MAX = 255  # bytes in one path component on Linux and macOS filesystems


def temp_prefix(dst: Path) -> str:
    """The hidden temporary name's prefix for `dst`, short enough that prefix + random part + suffix still fit
    in one path component (a 242-character destination name would not fit as it is)."""
    room = _NAME_MAX - len(TEMP_SUFFIX.encode()) - 12  # mkstemp adds 8 random characters
    name = dst.name
    while len(f".{name}.".encode()) > room:
        name = name[: len(name) // 2]
    return f".{name}."


@contextmanager
def atomic_output(dst: Path) -> Iterator[BinaryIO]:
    """Yield a file to write; on success it replaces `dst` in one rename, on any failure it vanishes.

    Failures of the file system (disk full, file too large, a read-only folder, no permission) become one
    DestinationError naming `dst` and the reason."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(dst), suffix=TEMP_SUFFIX, dir=dst.parent)
    except OSError as exc:
        raise write_error(dst, exc) from None
    fcntl.flock(fd, fcntl.LOCK_EX)  # held until the file is closed: `stale_partials` leaves it alone meanwhile
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            sync_file(handle)
        publish([(Path(tmp), dst)])
    except OSError as exc:
        _remove(tmp)
        raise write_error(dst, exc) from None
    except BaseException:
        _remove(tmp)
        raise


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def write_error(dst: Path, exc: OSError) -> DestinationError:
    """One line for a failed write: where, the system's reason, and that nothing was left behind."""
    reason = exc.strerror or type(exc).__name__
    hint = {
        errno.ENOSPC: "free some space or write elsewhere",
        errno.EDQUOT: "free some space or write elsewhere",
        errno.EFBIG: "the file system's file size limit was reached; write to another file system",
        errno.EROFS: "the folder is on a read-only file system; write elsewhere",
        errno.EACCES: "no permission to write there; write elsewhere",
        errno.ENAMETOOLONG: "use a shorter file name",
    }.get(exc.errno or 0, "check the destination")
    return DestinationError(f"{dst}: cannot write: {reason}; {hint}; nothing was written")


def sync_file(handle: BinaryIO) -> None:
    """Flush a file's buffers and its data to the disk."""
    handle.flush()
    os.fsync(handle.fileno())


def write_synced(path: Path, data: bytes) -> int:
    """Write `data` to a new file at `path` and fsync it; returns its size."""
    with open(path, "wb") as out:
        out.write(data)
        sync_file(out)
    return len(data)


@contextmanager
def staging_folder(dst: Path) -> Iterator[Path]:
    """A hidden folder beside `dst` to write a set of files in; it goes, with whatever is left in it, on exit."""
    try:
        folder = Path(tempfile.mkdtemp(prefix=temp_prefix(dst), suffix=TEMP_SUFFIX, dir=dst.parent))
    except OSError as exc:
        raise write_error(dst, exc) from None
    lock = os.open(folder, os.O_RDONLY)
    fcntl.flock(lock, fcntl.LOCK_EX)  # as for atomic_output's file: a live writer's folder is never called stale
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        os.close(lock)


def publish(moves: Sequence[tuple[Path, Path]], *, remove_first: Sequence[Path] = ()) -> None:
    """Rename written files to their final names in order (put the one that completes a set last).

    `remove_first` go before any rename (e.g. an old index, so no index ever names a half-replaced set).
    If a rename fails, the files already renamed are removed again: no partial set stays under final names.
    """
    umask = os.umask(0)
    os.umask(umask)
    for path in remove_first:
        path.unlink(missing_ok=True)
    done: list[Path] = []
    try:
        for staged, final in moves:
            os.chmod(staged, 0o666 & ~umask)
            os.replace(staged, final)
            done.append(final)
    except BaseException:
        for final in done:
            final.unlink(missing_ok=True)
        raise
    for folder in {final.parent for _, final in moves}:
        _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
