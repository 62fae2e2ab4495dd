"""A checkpoint's identity, as a provenance card records it: every file of it (the file; an index and its shards;
every file of a DCP or ZeRO folder) with its size and mtime, and the SHA-256 of the part that describes the
tensors, read without reading the tensor data:

- a safetensors file (or shard): its header (the 8-byte length and the JSON);
- a torch zip file: its `data.pkl` record (the pickled structure, which names every storage and view);
- an index (`*.index.json`), a DCP `.metadata`, a ZeRO `latest` or `*_model_states.pt`, and any other small file of
  a folder: the whole file, up to METADATA bytes (past that, its first METADATA bytes; the card says so);
- a legacy (non-zip) torch file: its first METADATA bytes (its pickle comes first);
- tensor data files (`*.distcp`, ZeRO `*_optim_states.pt`): size and mtime only.
"""

from __future__ import annotations

import hashlib
import struct
import zipfile
from pathlib import Path
from typing import Any

from ckptx.io.write.destination import input_files

__all__ = ["METADATA", "source_identity"]

METADATA = 64 * 1024 * 1024  # bytes of a metadata file hashed at most
_DATA_SUFFIXES = (".distcp", "_optim_states.pt")


def source_identity(path: str | Path) -> dict[str, Any]:
    """`{"path", "files": [{"name", "size", "mtime_ns", "hashed", "sha256"}]}` for the checkpoint at `path`; names
    are relative to the folder of `path` (to `path` itself for a folder). `hashed` says what `sha256` is of."""
    root = Path(path)
    base = root if root.is_dir() else root.parent
    files = sorted(input_files(root), key=lambda f: str(f))
    return {"path": str(path), "files": [_file_identity(f, base) for f in files]}


def _file_identity(file: Path, base: Path) -> dict[str, Any]:
    try:
        stat = file.stat()
    except OSError:
        return {"name": _relative(file, base), "size": None, "mtime_ns": None, "hashed": "missing", "sha256": None}
    hashed, digest = _metadata_hash(file, stat.st_size)
    return {
        "name": _relative(file, base),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "hashed": hashed,
        "sha256": digest,
    }


def _relative(file: Path, base: Path) -> str:
    try:
        return str(file.relative_to(base))
    except ValueError:
        return str(file)


def _metadata_hash(file: Path, size: int) -> tuple[str, str | None]:
    """(what was hashed, its SHA-256)."""
    if file.name.endswith(_DATA_SUFFIXES):
        return "nothing (tensor data)", None
    try:
        with open(file, "rb") as f:
            head = f.read(8)
            if file.suffix == ".safetensors" or _looks_safetensors(head, f, size):
                (length,) = struct.unpack("<Q", head)
                if 8 + length <= size:
                    f.seek(0)
                    return "header", hashlib.sha256(f.read(8 + length)).hexdigest()
            if head[:4] == b"PK\x03\x04":
                pickled = _data_pkl(file)
                if pickled is not None:
                    return "data.pkl", hashlib.sha256(pickled).hexdigest()
            f.seek(0)
            data = f.read(METADATA)
    except OSError:
        return "unreadable", None
    what = "whole file" if size <= METADATA else f"first {METADATA} bytes"
    return what, hashlib.sha256(data).hexdigest()


def _looks_safetensors(head: bytes, f: Any, size: int) -> bool:
    if len(head) < 8:
        return False
    (length,) = struct.unpack("<Q", head)
    if not 2 <= length <= min(size - 8, 100_000_000):
        return False
    return bool(f.read(1) == b"{")


def _data_pkl(file: Path) -> bytes | None:
    """The `*/data.pkl` record of a torch zip file (None when there is not exactly one)."""
    try:
        with zipfile.ZipFile(file) as archive:
            names = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
            return archive.read(names[0]) if len(names) == 1 else None
    except (zipfile.BadZipFile, OSError, ValueError, KeyError):
        return None
