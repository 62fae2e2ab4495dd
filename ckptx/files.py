"""Reading small files ckptx did not write (a DeepSpeed `latest`, a DCP `.metadata`, a shard index, a jobs or rule
file), held to the rules of checkpoint files: regular files only (a FIFO, a device or a socket is refused before it
is opened: reading one may never end), a size bound checked before reading and again while reading (a file that
grows is cut off), and one error line naming the file and saying what to do. The error never holds the file's text.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ckptx.errors import UnreadableFile

__all__ = ["MAX_INDEX", "MAX_TEXT", "check_regular_file", "read_bounded", "regular_size"]

MAX_TEXT = 64 << 20
"""Bytes of a jobs file, a rule file or a manifest: far more than any real one (100,000 jobs take ~10 MB)."""
MAX_INDEX = 100_000_000
"""Bytes of a shard index: the safetensors header bound (an index of 100,000 keys takes ~10 MB)."""

_KINDS = (
    (stat.S_ISFIFO, "a named pipe"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def regular_size(path: Path, shown: str) -> int:
    """The size of the regular file `path` (symlinks followed); UnreadableFile when it is missing, a folder, or
    anything but a regular file. Nothing is opened."""
    try:
        mode = os.stat(path)
    except FileNotFoundError:
        raise UnreadableFile(shown, "no such file") from None
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise UnreadableFile(shown, f"cannot read it ({reason})") from None
    if stat.S_ISDIR(mode.st_mode):
        raise UnreadableFile(shown, "is a folder; give the checkpoint file (or its .index.json)")
    if not stat.S_ISREG(mode.st_mode):
        kind = next((name for test, name in _KINDS if test(mode.st_mode)), "not a regular file")
        raise UnreadableFile(
            shown,
            f"is {kind}, not a regular file; ckptx reads checkpoints from files only: copy the data to a file first",
        )
    return mode.st_size


def check_regular_file(path: Path, shown: str) -> None:
    """Refuse what is not a regular file before opening it: reading a FIFO or /dev/zero never ends."""
    regular_size(path, shown)


def read_bounded(path: Path, shown: str, limit: int, what: str) -> bytes:
    """The bytes of the regular file `path`, at most `limit` of them; `what` names the file's kind in the error
    (`a shard index`). The size is checked before the file is opened and the read stops one byte past the bound,
    so a sparse or growing file costs no more than `limit` bytes of memory."""
    size = regular_size(path, shown)
    if size > limit:
        raise UnreadableFile(shown, _too_big(size, limit, what))
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise UnreadableFile(shown, f"cannot read it ({exc.strerror or type(exc).__name__})") from None
    if len(data) > limit:
        raise UnreadableFile(shown, _too_big(len(data), limit, what))
    return data


def _too_big(size: int, limit: int, what: str) -> str:
    return (
        f"has {size:,} bytes{'+' if size == limit + 1 else ''}, more than the {limit:,} {what} may have; "
        f"it is not {what} ckptx reads (check the path)"
    )
