"""Where ckptx may write: one check for every output path (a converted file, its shards and index, a model
folder's files, `--manifest`, batch reports and sidecars).

An output is never one of the input's files: what a source IS, not the path it was given by. That is the file
itself; the index and every shard of a sharded checkpoint; every file of a checkpoint folder (DCP, DeepSpeed,
a model folder), its subfolders and the folders it links to included. Files are known by path and by (device,
inode), so no symlink, hard link or aliased folder leads around the rule. An existing file is replaced only with
`force`; a folder is never replaced by a file. Writing itself is atomic (`ckptx/io/write/atomic.py`): a temporary
file beside the destination, fsync, rename.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ckptx.errors import CkptxError, DestinationError
from ckptx.files import MAX_INDEX, read_bounded

__all__ = [
    "MAX_FOLDER_FILES",
    "Identity",
    "InputFiles",
    "file_identity",
    "input_files",
    "prepare_folder",
    "resolved",
    "walk_source",
]

MAX_FOLDER_FILES = 1_000_000
"""Files listed under one folder source (a checkpoint of a thousand ranks holds a few thousand)."""

Identity = tuple[int, int]


def input_files(src: str | Path) -> list[Path]:
    """Every file a source consists of: the file; a sharded index and the shards it names; every file under a
    checkpoint folder (DCP, DeepSpeed, a model folder), following the folders it links to. Nothing is opened
    but an index (a bounded read of a regular file); what cannot be listed is left to the reader to report."""
    return walk_source(Path(src))[0]


def walk_source(path: Path) -> tuple[list[Path], list[Identity]]:
    """The files of one source (`input_files`), and the identities of the folders walked (none for a file)."""
    if not _is_dir(path):
        return [path, *_shards(path)], []
    files: list[Path] = []
    folders: list[Identity] = []
    for root, dirs, names in os.walk(path, followlinks=True):
        here = file_identity(Path(root))
        if here is None or here in folders:  # a link back to a folder already walked
            dirs[:] = []
            continue
        folders.append(here)
        files += (Path(root, name) for name in names)
        if len(files) > MAX_FOLDER_FILES:
            break
    return files, folders


def _shards(path: Path) -> list[Path]:
    """The shards an `.index.json` names (none when it cannot be read: the reader says why)."""
    if not path.name.endswith(".index.json"):
        return []
    try:
        weight_map = json.loads(read_bounded(path, str(path), MAX_INDEX, "a shard index")).get("weight_map", {})
        names = sorted({name for name in weight_map.values() if isinstance(name, str)})
    except (CkptxError, ValueError, AttributeError, RecursionError, TypeError):
        return []  # a broken index is the reader's to report; the index itself is still protected
    return [path.parent / name for name in names]


def file_identity(path: Path) -> Identity | None:
    """(device, inode) of what `path` names (following symlinks), or None when nothing is there."""
    try:
        found = os.stat(path)
    except (OSError, ValueError):
        return None
    return found.st_dev, found.st_ino


def _is_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def _special_kind(path: Path) -> str | None:
    """What `path` is when it exists as something else than a regular file, a folder or a dangling link."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    kinds = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a named pipe"))
    return next((name for test, name in kinds if test(mode)), "a socket")


def resolved(path: Path) -> Path:
    """`path` with its symlinks resolved as far as they go (a loop or an unreadable folder stops them)."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # Python 3.11 raises RuntimeError for a symlink loop
        return Path(os.path.abspath(path))


@dataclass(frozen=True)
class InputFiles:
    """The files outputs must never replace, known by path and by (device, inode), and the folders of folder
    sources (by identity: `inside` finds a path in one whatever name it is given by)."""

    paths: frozenset[Path]
    identities: frozenset[Identity]
    folders: frozenset[Identity] = frozenset()

    @classmethod
    def of(cls, sources: Iterable[str | Path]) -> InputFiles:
        """The input files of all `sources`."""
        files: list[Path] = []
        folders: list[Identity] = []
        for src in sources:
            found, walked = walk_source(Path(src))
            files += found
            folders += walked
        return cls(
            frozenset(map(resolved, files)),
            frozenset(i for i in map(file_identity, files) if i is not None),
            frozenset(folders),
        )

    def __or__(self, other: InputFiles) -> InputFiles:
        return InputFiles(self.paths | other.paths, self.identities | other.identities, self.folders | other.folders)

    def holds(self, path: Path) -> bool:
        """`path` is one of the input files (by its resolved path, or as another name for the same file)."""
        return resolved(path) in self.paths or file_identity(path) in self.identities

    def inside(self, path: Path) -> Path | None:
        """The folder of a folder source that `path` would be written in (itself or a parent of its folder, by
        identity), or None."""
        if not self.folders:
            return None
        for folder in resolved(path).parents:
            if file_identity(folder) in self.folders:
                return folder
        return None

    def check(self, path: Path, *, force: bool, what: str = "the destination") -> None:
        """Refuse to write `path` when it is an input, a folder, or exists without `force`."""
        try:
            self._check(path, force=force, what=what)
        except OSError as exc:  # a folder that cannot be looked into, a name too long for the file system
            raise DestinationError(
                f"{path}: cannot check {what} ({exc.strerror or type(exc).__name__}); write elsewhere"
            ) from None

    def _check(self, path: Path, *, force: bool, what: str) -> None:
        if self.holds(path):
            raise DestinationError(
                f"{path}: {what} is a file of the source checkpoint; write to another file "
                f"(ckptx never replaces its input)"
            )
        if _is_dir(path):
            raise DestinationError(f"{path}: {what} is a folder; give a file name")
        kind = _special_kind(path)
        if kind is not None:  # /dev/null, a FIFO: a rename would put a regular file in its place
            raise DestinationError(
                f"{path}: {what} is {kind}, not a regular file; ckptx writes and replaces regular files only: "
                f"give a file name"
            )
        if (os.path.lexists(path)) and not force:
            raise DestinationError(f"{path}: already exists; pass --force to overwrite it")
        parent = path.parent
        if os.path.lexists(parent) and not _is_dir(parent):
            raise DestinationError(f"{path}: {parent} is not a folder")

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
