"""Atomic file output: write to a temporary file (or folder, for a set) beside the destination, fsync, then rename."""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator, Sequence

TEMP_SUFFIX = ".ckptx-partial"
_STARTED = time.time()  # files older than this process cannot be its own


def stale_partials(dst: Path) -> list[Path]:
    """Temporary files (or staging folders) a killed ckptx left beside `dst`: named `.{dst.name}.*.ckptx-partial`,
    older than this process, and not locked by a ckptx that is still writing them (every writer holds an
    exclusive `flock` on its temporary file or folder until it is done; the kernel drops it when a process dies)."""
    found = []
    for path in sorted(dst.parent.glob(f".{dst.name}.*{TEMP_SUFFIX}")):
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


@contextmanager
def atomic_output(dst: Path) -> Iterator[BinaryIO]:
    """Yield a file to write; on success it replaces `dst` in one rename, on any failure it vanishes."""
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=TEMP_SUFFIX, dir=dst.parent)
    fcntl.flock(fd, fcntl.LOCK_EX)  # held until the file is closed: `stale_partials` leaves it alone meanwhile
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            sync_file(handle)
        publish([(Path(tmp), dst)])
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def sync_file(handle: BinaryIO) -> None:
    """Flush a file's buffers and its data to the disk."""
    handle.flush()
    os.fsync(handle.fileno())


@contextmanager
def staging_folder(dst: Path) -> Iterator[Path]:
    """A hidden folder beside `dst` to write a set of files in; it goes, with whatever is left in it, on exit."""
    folder = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=TEMP_SUFFIX, dir=dst.parent))
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
