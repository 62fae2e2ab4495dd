"""Where ckptx may write: one check for every output path (a converted file, its shards and index, a model
folder's files, `--manifest`, batch reports and sidecars).

An output is never one of the input's files (the file itself, the index and every shard of a sharded
checkpoint, every file of a checkpoint folder), also not through a symlink or another name for the same file;
an existing file is replaced only with `force`; a folder is never replaced by a file. Writing itself is atomic
(`ckptx/io/atomic.py`): a temporary file beside the destination, fsync, rename.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ckptx.errors import DestinationError

__all__ = ["InputFiles", "input_files", "prepare_folder"]


def input_files(src: str | Path) -> list[Path]:
    """Every file a source consists of: the file; a sharded index and the shards it names; every file under a
    checkpoint folder (DCP, DeepSpeed)."""
    path = Path(src)
    if path.is_dir():
        return [p for p in path.rglob("*") if p.is_file()]
    files = [path]
    if path.name.endswith(".index.json"):
        try:
            weight_map = json.loads(path.read_text(encoding="utf-8")).get("weight_map", {})
            files += [path.parent / name for name in sorted(set(weight_map.values())) if isinstance(name, str)]
        except (OSError, ValueError, AttributeError):
            pass  # a broken index is the reader's to report; the index itself is still protected
    return files


def _identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of what `path` names (following symlinks), or None when nothing is there."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


@dataclass(frozen=True)
class InputFiles:
    """The files outputs must never replace, known by path and by (device, inode)."""

    paths: frozenset[Path]
    identities: frozenset[tuple[int, int]]

    @classmethod
    def of(cls, sources: Iterable[str | Path]) -> InputFiles:
        """The input files of all `sources`."""
        files = [f for src in sources for f in input_files(src)]
        return cls(frozenset(f.resolve() for f in files), frozenset(i for i in map(_identity, files) if i is not None))

    def check(self, path: Path, *, force: bool, what: str = "the destination") -> None:
        """Refuse to write `path` when it is an input, a folder, or exists without `force`."""
        if path.resolve() in self.paths or _identity(path) in self.identities:
            raise DestinationError(
                f"{path}: {what} is a file of the source checkpoint; write to another file "
                f"(ckptx never replaces its input)"
            )
        if path.is_dir():
            raise DestinationError(f"{path}: {what} is a folder; give a file name")
        if (path.exists() or path.is_symlink()) and not force:
            raise DestinationError(f"{path}: already exists; pass --force to overwrite it")
        if path.parent.exists() and not path.parent.is_dir():
            raise DestinationError(f"{path}: {path.parent} is not a folder")

    def check_all(self, paths: Iterable[Path], *, force: bool, what: str = "the destination") -> None:
        """`check` each of `paths`."""
        for path in paths:
            self.check(path, force=force, what=what)


def prepare_folder(path: Path) -> None:
    """Create the folder a file is to be written in (as `batch` does), with a clear error when it cannot."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DestinationError(f"{path}: cannot create the folder {path.parent}: {exc.strerror or exc}") from None
