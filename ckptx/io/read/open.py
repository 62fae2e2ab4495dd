"""Open any supported checkpoint as a lazy Source, choosing the reader from the file's first bytes."""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ckptx.errors import SourceError, UnreadableFile
from ckptx.files import check_regular_file
from ckptx.io.read.model_folder import config_documents, find_model_folder
from ckptx.io.read.safetensors_reader import SafetensorsSource
from ckptx.io.read.sharded_reader import ShardedSource
from ckptx.planning.source import Source

# The readers of torch files, DCP and ZeRO folders are imported by the branch that needs them, not here; so are
# the .pth writer, `reverse` and `verify` in convert.py. A conversion of safetensors does without them: `import
# ckptx.cli` took 250 ms (median of 6) with them at the top and 150 ms without (compiled modules, this machine).


_ZIP = b"PK\x03\x04"


def sniff_format(path: Path) -> str:
    """`safetensors`, `sharded-index`, `gguf`, `torch-zip` or `torch-legacy`, from the content (extension as a hint).

    A zip archive is recognised, as torch.load recognises it, by its first bytes only: a pickle with a zip
    appended is a legacy file (which is what torch reads from it), never a torch zip.
    """
    if path.name.endswith(".index.json"):
        return "sharded-index"
    with open(path, "rb") as f:
        head = f.read(9)
    if path.suffix == ".safetensors":
        return "safetensors"
    if head[:4] == b"GGUF":
        return "gguf"
    if head[:4] == _ZIP:
        return "torch-zip"
    if len(head) == 9 and head[8:9] == b"{":
        (length,) = struct.unpack("<Q", head[:8])
        if length < 10**9:
            return "safetensors"
    return "torch-legacy"


def _open_safetensors(path: Path, shown: str) -> Source:
    """A safetensors source; a `.safetensors` file that is not one but looks like a torch checkpoint (a zip or a
    pickle) is refused with that said: the name promises a file without pickles, so it is never unpickled."""
    try:
        return SafetensorsSource(path, shown)
    except SourceError:
        with open(path, "rb") as f:
            head = f.read(4)
        what = (
            "a zip archive (a torch checkpoint, which holds a pickle)"
            if head == _ZIP
            else "a pickle (a legacy torch checkpoint)"
            if head[:1] == b"\x80" and head[1:2] in b"\x02\x03\x04\x05"
            else ""
        )
        if not what or path.suffix != ".safetensors":
            raise
        raise SourceError(
            f"{shown}: named .safetensors but holds {what}; ckptx reads a .safetensors file only as "
            f"safetensors: if you trust it, rename it to .pth and convert that"
        ) from None


def is_checkpoint_folder(path: Path) -> bool:
    """A folder that is one checkpoint: torch.distributed.checkpoint (`.metadata`), DeepSpeed ZeRO, or a model
    folder (HuggingFace `config.json` or Meta `params.json` beside the weights)."""
    from ckptx.io.read.dcp_reader import has_metadata
    from ckptx.io.read.zero_reader import is_zero_folder

    if has_metadata(path) or is_zero_folder(path):
        return True
    try:
        return find_model_folder(path, str(path)) is not None
    except UnreadableFile:  # a config document that is a FIFO, a device or huge: say so, not "not a checkpoint"
        raise
    except SourceError:
        return False


def open_source(
    path: str | Path,
    extract_paths: Sequence[str] = (),
    *,
    allow_globals: Sequence[str] = (),
    unsafe_pickle: bool = False,
    where: str = "",
) -> Source:
    """`open_checkpoint`, with the config documents in or beside the checkpoint (`Source.configs`): a model
    folder's own config must be valid JSON; one beside a file that is not is left out."""
    source = open_checkpoint(path, extract_paths, allow_globals=allow_globals, unsafe_pickle=unsafe_pickle, where=where)
    if where:  # a shard of a sharded checkpoint: the index's folder is read once, for the whole
        return source
    p = Path(path)
    try:
        source.configs = {**source.configs, **config_documents(p)}  # a reader's own first (GGUF metadata)
    except SourceError:
        if p.is_dir():
            source.close()
            raise
    return source


def open_checkpoint(
    path: str | Path,
    extract_paths: Sequence[str] = (),
    *,
    allow_globals: Sequence[str] = (),
    unsafe_pickle: bool = False,
    where: str = "",
) -> Source:
    """Open a checkpoint file lazily; `extract_paths` say where the state dict lives in pickle files.

    A DeepSpeed ZeRO folder (holding `latest`, or a tag folder) opens as its fp32 state dict (io/zero.py);
    `extract_paths` do not apply to it. A model folder (HuggingFace `config.json`, Meta `params.json`, beside the
    weights) opens as its weights (io/read/model_folder.py).
    """
    p = Path(path)
    if not p.exists():
        raise SourceError(f"{path}: no such file")
    if p.is_dir():  # DeepSpeed ZeRO, torch.distributed.checkpoint, a model folder, or a one-line error saying why not
        from ckptx.io.read.dcp_reader import open_dcp_folder
        from ckptx.io.read.zero_reader import is_zero_folder, open_zero

        if is_zero_folder(p):
            return open_zero(p, str(path))
        model = None if (p / ".metadata").is_file() else find_model_folder(p, str(path))
        if model is not None:
            source = open_checkpoint(
                model.weights, extract_paths, allow_globals=allow_globals, unsafe_pickle=unsafe_pickle, where=where
            )
            source.path = str(path)
            source.description = [model.describe(), *source.description]
            return source
        return open_dcp_folder(
            p, str(path), extract_paths, allow_globals=allow_globals, unsafe_pickle=unsafe_pickle, where=where
        )
    check_regular_file(p, str(path))
    fmt = sniff_format(p)
    if fmt == "safetensors":
        return _open_safetensors(p, str(path))
    if fmt == "gguf":
        from ckptx.io.read.gguf_reader import GgufSource

        return GgufSource(p, str(path))
    if fmt == "sharded-index":
        return ShardedSource(
            p, str(path), open_source, extract_paths, allow_globals=allow_globals, unsafe_pickle=unsafe_pickle
        )
    from ckptx.io.read.torch_reader import read_torch

    return read_torch(
        p, extract_paths, allow_globals=allow_globals, unsafe_pickle=unsafe_pickle, display=str(path), where=where
    )


@dataclass(frozen=True)
class SourceSpec:
    """How a source was opened, so that another process (a worker computing some of the output's tensors) opens the
    same checkpoint the same way: its absolute path and what `open_source` was given."""

    path: str
    extract_paths: tuple[str, ...] = ()
    allow_globals: tuple[str, ...] = ()
    unsafe_pickle: bool = False

    @classmethod
    def of(
        cls,
        path: str | Path,
        extract_paths: Sequence[str] = (),
        allow_globals: Sequence[str] = (),
        unsafe: bool = False,
    ) -> SourceSpec:
        """The spec of `open_source(path, extract_paths, ...)` as this process sees `path` (made absolute)."""
        return cls(os.path.abspath(path), tuple(extract_paths), tuple(allow_globals), unsafe)

    def open(self) -> Source:
        """The source, opened again (lazily, as `open_source` opens it)."""
        return open_source(
            self.path, self.extract_paths, allow_globals=self.allow_globals, unsafe_pickle=self.unsafe_pickle
        )
