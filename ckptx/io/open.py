"""Open any supported checkpoint as a lazy Source, choosing the reader from the file's first bytes."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Sequence

from ckptx.errors import SourceError
from ckptx.io.safetensors_reader import SafetensorsSource
from ckptx.io.source import Source
from ckptx.io.torch_reader import read_torch


def sniff_format(path: Path) -> str:
    """`safetensors`, `sharded-index`, `torch-zip` or `torch-legacy`, from the content (extension as a hint)."""
    if path.name.endswith(".index.json"):
        return "sharded-index"
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    if len(head) == 9 and head[8:9] == b"{":
        (length,) = struct.unpack("<Q", head[:8])
        if length < 10**9:
            return "safetensors"
    if path.suffix == ".safetensors":
        return "safetensors"
    return "torch-legacy"


def open_source(path: str | Path, extract_paths: Sequence[str] = (), *, allow_globals: Sequence[str] = (),
                unsafe_pickle: bool = False, where: str = "") -> Source:
    """Open a checkpoint file lazily; `extract_paths` say where the state dict lives in pickle files."""
    p = Path(path)
    if not p.exists():
        raise SourceError(f"{path}: no such file")
    if p.is_dir():  # a torch.distributed.checkpoint folder, or a one-line error saying what the folder is
        from ckptx.io.dcp import open_dcp_folder  # noqa: PLC0415

        return open_dcp_folder(p, str(path), extract_paths, allow_globals=allow_globals,
                               unsafe_pickle=unsafe_pickle, where=where)
    fmt = sniff_format(p)
    if fmt == "safetensors":
        return SafetensorsSource(p, str(path))
    if fmt == "sharded-index":
        from ckptx.io.sharded import ShardedSource  # noqa: PLC0415

        return ShardedSource(p, str(path), extract_paths, allow_globals=allow_globals, unsafe_pickle=unsafe_pickle)
    return read_torch(p, extract_paths, allow_globals=allow_globals, unsafe_pickle=unsafe_pickle,
                      display=str(path), where=where)
