"""torch.distributed.checkpoint (DCP) folders (`DIR/.metadata` + `__<rank>_<n>.distcp`) as a lazy source.

What is read, and when:
- opening reads `.metadata` only (a restricted unpickler that imports and runs nothing, `dcp_metadata.py`) and
  the size of every file it names; no byte of a `.distcp` file. The nesting `dcp_to_torch_save` restores from
  `planner_data` is rebuilt, so `extract:` paths (`model`) and the top-level descriptions work as for `.pth`.
- `load(key)` reads that tensor's chunks and nothing else, each from its (file, offset, length) item: with the
  default `torch_save` serialization an item is a complete `torch.save` zip, whose central directory and
  `data.pkl` are read through a window of the file (`_FileRange`) and whose tensor bytes are then read with
  pread; with the `safetensors` serialization an item is a tensor of the safetensors data that follows the
  rank's pickled values. Memory is one tensor plus one chunk.
- `raw_span(key)` is the tensor's bytes in the file when one chunk holds the whole tensor row-major (a
  replicated or unsharded tensor), so writers copy them without decoding.
- `read_object(key)` reads one pickled non-tensor value (`epoch`), only when asked, with the safe rules of the
  torch readers: plain values only; a value needing a global is refused unless allowed (`allow_globals`).
"""

from __future__ import annotations

import heapq
import io
import itertools
import json
import math
import operator
import os
import pickle
import re
import struct
import zipfile
from collections import Counter
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, BinaryIO

from ckptx._lazy import lazy_module
from ckptx.dtypes import DTYPES, TensorMeta, torch_dtype
from ckptx.errors import SourceError, UnsafeGlobalError
from ckptx.files import regular_size
from ckptx.io.read import unpickle
from ckptx.io.read.dcp_metadata import (
    DcpBytes,
    DcpChunk,
    DcpEntry,
    DcpMetadata,
    DcpTensor,
    PathItem,
    StorageItem,
    chunk_text,
    read_metadata,
)
from ckptx.io.read.safetensors_reader import MAX_HEADER, check_embedded_header
from ckptx.io.read.state_dict import describe_value, extract, unsupported_tensor
from ckptx.io.read.torch_reader import allowed_globals, unpickling_error
from ckptx.io.read.torch_zip import Record, StubUnpickler, TensorRef, check_records, read_archive, row_major_span
from ckptx.io.spans import read_span
from ckptx.planning.source import RawSpan, Source
from ckptx.text import human_bytes, quoted, summary
from ckptx.trust.pickle_globals import needed_global

if TYPE_CHECKING:  # pragma: no cover
    import torch
else:
    torch = lazy_module("torch")

__all__ = ["MAX_METADATA", "METADATA_FILE", "DcpSource", "describe_layout", "has_metadata", "open_dcp_folder"]

METADATA_FILE = ".metadata"
MAX_METADATA = 1 << 30
"""Bytes of `.metadata`: a model of 405B parameters saved from 512 ranks, optimizer included, takes ~300 MB."""
_RANK_FILE = re.compile(r"__(\d+)_(\d+)\.distcp")
_ZIP_MAGIC = b"PK\x03\x04"
_LISTED = 20  # sharded tensors listed one by one in the description


def open_dcp_folder(
    folder: Path,
    display: str | None = None,
    extract_paths: Sequence[str] = (),
    *,
    allow_globals: Sequence[str] = (),
    unsafe_pickle: bool = False,
    where: str = "",
) -> DcpSource:
    """The DCP checkpoint in `folder`; a one-line SourceError saying what the folder is when it is not one."""
    shown = display or str(folder)
    if not has_metadata(folder):
        raise SourceError(_not_dcp(folder, shown))
    return DcpSource(
        folder, shown, extract_paths, allow_globals=allow_globals, unsafe_pickle=unsafe_pickle, where=where
    )


def has_metadata(folder: Path) -> bool:
    """The folder holds `.metadata` in any form (what it is, a regular file or not, is checked when it is read)."""
    path = folder / METADATA_FILE
    return path.exists() or path.is_symlink()


def _not_dcp(folder: Path, shown: str) -> str:
    names = sorted(p.name for p in folder.iterdir())
    if any(n.endswith(".distcp") for n in names):
        return (
            f"{shown}: holds .distcp files but no {METADATA_FILE}: the save did not finish (rank 0 writes it "
            f"last) or it was not copied; copy the whole checkpoint folder"
        )
    if any(re.fullmatch(r"__\d+\.metadata", n) for n in names):
        return (
            f"{shown}: holds per-rank __<rank>.metadata files (a save without collectives) but no global "
            f"{METADATA_FILE}; ckptx reads DCP folders that have one"
        )
    index = next((n for n in names if n.endswith(".index.json")), None)
    if index is not None:
        return f"{shown}: is a folder; give its index file {os.path.join(shown, index)}"
    return (
        f"{shown}: is a folder without {METADATA_FILE}, so not a torch.distributed.checkpoint folder; give "
        f"the checkpoint file (or its .index.json)"
    )


@dataclass(frozen=True)
class _StoredChunk:
    """Where a chunk's elements lie in a file: `span` holds them row-major when `stride` is None, else `span` is
    the storage they view with `stride` from element `offset`."""

    span: RawSpan
    stride: tuple[int, ...] | None = None
    offset: int = 0


class DcpSource(Source):
    """A DCP checkpoint folder: planned from `.metadata` alone; tensors reassembled from their chunks on `load`.

    `description` holds lines for `ckptx inspect`: world size, files, and the shard layout of the tensors.
    """

    def __init__(
        self,
        folder: Path,
        display: str | None = None,
        extract_paths: Sequence[str] = (),
        *,
        allow_globals: Sequence[str] = (),
        unsafe_pickle: bool = False,
        where: str = "",
    ) -> None:
        shown = display or str(folder)
        self._folder = folder
        self._shown = shown
        self._meta_shown = os.path.join(shown, METADATA_FILE)
        metadata = _read_metadata_file(folder / METADATA_FILE, self._meta_shown)
        sizes = _checked_files(folder, shown, self._meta_shown, metadata)
        nested = _nest(metadata.entries, self._meta_shown)
        state, found_at = extract(nested, extract_paths, file=shown, where=where)
        chosen = {str(k): v for k, v in state.items() if isinstance(v, DcpTensor)}
        super().__init__(
            path=shown,
            format="dcp",
            tensors={k: v.meta for k, v in chosen.items()},
            non_tensors={str(k): _kind(v) for k, v in state.items() if not isinstance(v, DcpTensor)},
            extracted_from=found_at,
            top_level={str(k): _describe(v) for k, v in nested.items()},
        )
        self.description: list[str] = describe_layout(metadata, sizes, chosen, found_at)
        self._chosen = chosen
        self._bytes = {e.key: e for e in metadata.entries if isinstance(e, DcpBytes)}
        self._allow_globals = tuple(allow_globals)
        self._unsafe_pickle = unsafe_pickle
        # by (key, chunk offsets): in the safetensors serialization the chunks of a file share one item offset
        self._stored: dict[tuple[str, tuple[int, ...]], _StoredChunk] = {}
        # by (file, offset, length): the torch.save archive of an item, read once however many chunks name it
        self._archives: dict[tuple[str, int, int], tuple[TensorRef, Record]] = {}
        self._blobs: dict[tuple[str, int], tuple[dict[str, Any], int]] = {}
        self._blob_metas: dict[tuple[str, int], dict[str, TensorMeta]] = {}

    def load(self, key: str) -> torch.Tensor:
        """The whole tensor, reassembled from its chunks (each read from its byte range of its file)."""
        tensor = self._chosen[key]
        whole = tensor.whole_chunk
        if whole is not None:
            return self._read_chunk(tensor, whole)
        out = torch.empty(tensor.shape, dtype=torch_dtype(tensor.dtype))
        for chunk in tensor.chunks:
            if chunk.numel:
                out[tuple(slice(o, o + s) for o, s in zip(chunk.offsets, chunk.sizes))] = self._read_chunk(
                    tensor, chunk
                )
        return out

    def raw_span(self, key: str) -> RawSpan | None:
        """The tensor's bytes in its file when one chunk holds the whole tensor row-major; else None."""
        tensor = self._chosen[key]
        whole = tensor.whole_chunk
        if whole is None or not whole.numel:
            return None
        stored = self._locate(tensor, whole)
        return stored.span if stored.stride is None and stored.span.nbytes == tensor.meta.nbytes else None

    def raw_spans(self, key: str) -> Collection[RawSpan] | None:
        """The tensor's row-major bytes as pieces of its chunks' spans, in order: a writer copies them one after
        another without decoding. One piece per chunk for Shard(0); for a tensor sharded on a later dim, one per
        chunk row, generated as they are copied (never all held). None when a chunk is stored strided."""
        tensor = self._chosen[key]
        located = [(c, self._locate(tensor, c)) for c in tensor.chunks if c.numel]
        if any(stored.stride is not None for _, stored in located):
            return None
        return _Pieces(tensor, tuple((c, stored.span) for c, stored in located))

    def read_object(self, key: str) -> Any:
        """The pickled non-tensor value stored under the flattened DCP key (`epoch`, `optimizer.param_groups.0.lr`).

        Read only now, with the torch readers' rules: plain values load without torch; a value that needs a
        global is refused (UnsafeGlobalError) unless `allow_globals` names it or `unsafe_pickle` was given.
        """
        entry = self._bytes.get(key)
        if entry is None:
            raise SourceError(
                f"{self._shown}: no pickled value '{key}'; the checkpoint's pickled values are: "
                f"{', '.join(self._bytes) or 'none'}"
            )
        data = _pread_exact(
            self._folder / entry.item.file,
            entry.item.offset,
            entry.item.length,
            self._file_shown(entry.item),
            f"pickled value '{key}'",
        )
        shown = f"{self._file_shown(entry.item)} (pickled value '{key}' at byte {entry.item.offset})"
        return _unpickle_value(data, shown, self._allow_globals, self._unsafe_pickle)

    def close(self) -> None:
        """Forget the chunk locations read so far."""
        self._stored = {}
        self._archives = {}
        self._blobs = {}

    # ---- chunks -------------------------------------------------------------------------------------------

    def _read_chunk(self, tensor: DcpTensor, chunk: DcpChunk) -> torch.Tensor:
        """One chunk as a tensor of its own sizes."""
        if not chunk.numel:
            return torch.empty(chunk.sizes, dtype=torch_dtype(tensor.dtype))
        stored = self._locate(tensor, chunk)
        if stored.stride is None:
            return read_span(stored.span, TensorMeta(chunk.sizes, tensor.dtype))
        storage = read_span(
            stored.span, TensorMeta((stored.span.nbytes // DTYPES[tensor.dtype].itemsize,), tensor.dtype)
        )
        return storage.as_strided(chunk.sizes, stored.stride, stored.offset)

    def _locate(self, tensor: DcpTensor, chunk: DcpChunk) -> _StoredChunk:
        """Where the chunk's elements lie, from the item's own header (read once, remembered)."""
        stored = self._stored.get((tensor.key, chunk.offsets))
        if stored is None:
            path = self._folder / chunk.item.file
            place = (
                f"{self._file_shown(chunk.item)}: the item at bytes {chunk.item.offset}..."
                f"{chunk.item.offset + chunk.item.length} (chunk {chunk_text(chunk)} of '{tensor.key}')"
            )
            with open(path, "rb") as f:
                head = os.pread(f.fileno(), 4, chunk.item.offset)
                if head == _ZIP_MAGIC:
                    found = self._archives.get((str(path), chunk.item.offset, chunk.item.length))
                    if found is None:
                        found = _item_archive(f.fileno(), chunk.item, place)
                        self._archives[str(path), chunk.item.offset, chunk.item.length] = found
                    stored = _zip_chunk(*found, str(path), tensor, chunk, place)
                else:
                    stored = self._safetensors_chunk(f, str(path), tensor, chunk, place)
            self._stored[tensor.key, chunk.offsets] = stored
        return stored

    def _safetensors_chunk(self, f: Any, path: str, tensor: DcpTensor, chunk: DcpChunk, place: str) -> _StoredChunk:
        """A chunk of the `safetensors` serialization: the tensor `tensor.key` of the safetensors data at the item."""
        header, data_start = self._blob(f, path, chunk.item, place)
        info = header.get(tensor.key)
        if not isinstance(info, dict):
            raise SourceError(
                f"{place}: is neither a torch.save zip nor safetensors data holding '{tensor.key}'; "
                f"the file is corrupt or from another save"
            )
        meta = self._blob_metas[path, chunk.item.offset][tensor.key]
        _check_chunk_meta(meta, tensor, chunk, place)
        saved = _saved_offsets(header, tensor.key)
        if saved is not None and saved != chunk.offsets:
            raise SourceError(
                f"{place}: the file says the chunk starts at {list(saved)}, the metadata at "
                f"{list(chunk.offsets)}; the folder mixes files of different saves"
            )
        return _StoredChunk(RawSpan(path, data_start + int(info["data_offsets"][0]), meta.nbytes))

    def _blob(self, f: Any, path: str, item: StorageItem, place: str) -> tuple[dict[str, Any], int]:
        """The safetensors header at `offset` of the file (checked), and where its data starts."""
        offset = item.offset
        found = self._blobs.get((path, offset))
        if found is None:
            header, data_start, metas = _read_blob_header(f.fileno(), item, place)
            found = self._blobs[path, offset] = (header, data_start)
            self._blob_metas[path, offset] = metas
        return found

    def _file_shown(self, item: StorageItem) -> str:
        return os.path.join(self._shown, item.file)


class _Pieces:
    """The row-major pieces of a tensor's chunks, in the order of the whole tensor; each iteration generates
    them anew (a k-way merge of the chunks' pieces), so memory stays one piece per chunk."""

    def __init__(self, tensor: DcpTensor, chunks: tuple[tuple[DcpChunk, RawSpan], ...]) -> None:
        self._tensor, self._chunks = tensor, chunks

    def __len__(self) -> int:
        return sum(math.prod(c.sizes[: _last_partial(c, self._tensor.shape)]) for c, _ in self._chunks)

    def __contains__(self, span: object) -> bool:
        return any(span == piece for piece in self)

    def __iter__(self) -> Iterator[RawSpan]:
        """The pieces in order; they tile the tensor because the metadata's chunks do (checked on opening)."""
        runs = (_pieces(c, span, self._tensor) for c, span in self._chunks)
        return (span for _, span in heapq.merge(*runs, key=operator.itemgetter(0)))


def _last_partial(chunk: DcpChunk, shape: tuple[int, ...]) -> int:
    """The last dimension the chunk does not span fully (0 when it spans all: one piece)."""
    return max((d for d in range(len(shape)) if chunk.sizes[d] != shape[d]), default=0)


def _pieces(chunk: DcpChunk, span: RawSpan, tensor: DcpTensor) -> Iterator[tuple[int, RawSpan]]:
    """The chunk's runs of row-major bytes as (byte offset in the whole tensor, span in the file).

    A run spans the chunk's last partial dimension and every full one after it; there is one per index of
    the dimensions before it.
    """
    shape, item = tensor.shape, DTYPES[tensor.dtype].itemsize
    last = _last_partial(chunk, shape)
    run = math.prod(chunk.sizes[last:]) * item
    full_strides = [math.prod(shape[d + 1 :]) * item for d in range(len(shape))]
    base = sum(o * st for o, st in zip(chunk.offsets, full_strides))
    for number, index in enumerate(itertools.product(*(range(s) for s in chunk.sizes[:last]))):
        start = base + sum(i * st for i, st in zip(index, full_strides))
        yield start, RawSpan(span.file, span.offset + number * run, run)


# ---- opening --------------------------------------------------------------------------------------------------


def _read_metadata_file(path: Path, shown: str) -> DcpMetadata:
    """`.metadata`, a regular file of at most MAX_METADATA bytes, unpickled as it is read (never read whole)."""
    size = regular_size(path, shown)
    if size > MAX_METADATA:
        raise SourceError(
            f"{shown}: has {size:,} bytes, more than the {MAX_METADATA:,} a DCP .metadata may have; it is not one "
            f"dcp.save wrote (check the folder)"
        )
    try:
        bound = size if size <= unpickle.MAX_NESTING else _nesting_bound(path, size)
        with open(path, "rb", buffering=0) as f:
            return read_metadata(
                io.BufferedReader(_Bounded(f, size), 1 << 20), shown, bound=bound, again=lambda: _reopen(path, size)
            )
    except OSError as exc:
        raise SourceError(f"{shown}: cannot be read ({exc.strerror or type(exc).__name__})") from None


def _nesting_bound(path: Path, size: int) -> int:
    """`unpickle.nesting_bound` of the first `size` bytes of the file, counted a block at a time."""
    bound = 0
    with open(path, "rb") as f:
        while size > 0:
            block = f.read(min(size, 1 << 22))
            if not block:
                break
            size -= len(block)
            bound += unpickle.nesting_bound(block)
    return bound


def _reopen(path: Path, size: int) -> BinaryIO:
    """The first `size` bytes of the file again, buffered (closed when collected)."""
    return io.BufferedReader(_Bounded(open(path, "rb", buffering=0), size, owns=True), 1 << 20)


class _Bounded(io.RawIOBase):
    """At most `limit` bytes of a binary file, read on demand (a file that grows while it is read is cut off)."""

    def __init__(self, f: Any, limit: int, *, owns: bool = False) -> None:
        super().__init__()
        self._f, self._left, self._owns = f, limit, owns

    def close(self) -> None:
        if self._owns and not self.closed:
            self._f.close()
        super().close()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer)[: self._left]
        got = self._f.readinto(view) if len(view) else 0
        self._left -= got
        return got


def _items(metadata: DcpMetadata) -> Iterator[tuple[StorageItem, DcpEntry, DcpChunk | None]]:
    """Every storage item with the entry (and chunk) it holds."""
    for entry in metadata.entries:
        if isinstance(entry, DcpTensor):
            for chunk in entry.chunks:
                yield chunk.item, entry, chunk
        else:
            yield entry.item, entry, None


def _what(entry: DcpEntry, chunk: DcpChunk | None) -> str:
    """What an item holds, for messages."""
    if chunk is None:
        return f"pickled value {quoted(entry.key)}"
    return f"chunk {chunk_text(chunk)} of {quoted(entry.key)}"


def _checked_files(folder: Path, shown: str, meta_shown: str, metadata: DcpMetadata) -> dict[str, int]:
    """The size of every file the metadata names; each must exist and hold every item placed in it."""
    sizes: dict[str, int] = {}
    for name in metadata.files:
        path = folder.joinpath(*PurePosixPath(name).parts)
        if not (path.exists() or path.is_symlink()):
            count = sum(1 for item, _, _ in _items(metadata) if item.file == name)
            raise SourceError(
                f"{os.path.join(shown, name)}: missing; {meta_shown} places {count} item(s) in it "
                f"(a rank's file): copy the whole checkpoint folder"
            )
        sizes[name] = regular_size(path, os.path.join(shown, name))  # a FIFO would block the first read
    for item, entry, chunk in _items(metadata):
        end = item.offset + item.length
        if end > sizes[item.file]:
            raise SourceError(
                f"{os.path.join(shown, item.file)}: has {sizes[item.file]} bytes but {meta_shown} "
                f"places {_what(entry, chunk)} at bytes {item.offset}..{end}; the file is truncated or from "
                f"another save: copy it again"
            )
    return sizes


def _nest(entries: Sequence[DcpEntry], shown: str) -> dict[str, Any]:
    """The nested state `dcp_to_torch_save` returns, with entries as leaves (torch's `set_element` rules).

    A list index makes torch grow the list to it, holes as None; here the lists together may hold at most
    `_MAX_HOLES` more slots than there are entries, so an index of 10^12 is one error line, not a MemoryError.
    """
    root: dict[Any, Any] = {}
    budget = [len(entries) + _MAX_HOLES]
    for entry in entries:
        container: Any = root
        path = entry.path
        for here, following in zip(path, path[1:]):
            container = _child(container, here, {} if isinstance(following, str) else [], entry, shown, budget)
        _put(container, path[-1], entry, shown, budget)
    return root


_MAX_HOLES = 1 << 20


def _child(container: Any, key: PathItem, empty: Any, entry: DcpEntry, shown: str, budget: list[int]) -> Any:
    if isinstance(container, dict):
        found = container.setdefault(key, empty)
    else:
        _extend(container, key, entry, shown, budget)
        if container[key] is None:
            container[key] = empty
        found = container[key]
    if not isinstance(found, (dict, list)) or isinstance(found, list) != isinstance(empty, list):
        raise SourceError(
            f"{shown}: planner_data path {_path_text(entry.path)} of {quoted(entry.key)} goes through another "
            f"entry or a container of the other kind; the metadata is corrupt"
        )
    return found


def _put(container: Any, key: PathItem, entry: DcpEntry, shown: str, budget: list[int]) -> None:
    if isinstance(container, list):
        _extend(container, key, entry, shown, budget)
    elif key in container:
        raise SourceError(
            f"{shown}: two entries have the planner_data path {_path_text(entry.path)}; the metadata is corrupt"
        )
    container[key] = entry


def _extend(container: list[Any], key: PathItem, entry: DcpEntry, shown: str, budget: list[int]) -> None:
    if not isinstance(key, int):
        raise SourceError(
            f"{shown}: planner_data path {_path_text(entry.path)} of {quoted(entry.key)} names {summary(key)} in a list"
        )
    grow = key + 1 - len(container)
    if grow > budget[0]:
        raise SourceError(
            f"{shown}: planner_data path {_path_text(entry.path)} of {quoted(entry.key)} has the list index "
            f"{key:,}: the lists would hold far more slots than the checkpoint has entries; "
            f"the metadata is corrupt"
        )
    if grow > 0:
        budget[0] -= grow
        container.extend([None] * grow)


def _path_text(path: Sequence[PathItem]) -> str:
    """A planner_data path for messages: its first items, escaped."""
    items = [summary(p) for p in path[:8]]
    return "[" + ", ".join(items) + (f", ... ({len(path) - 8} more)" if len(path) > 8 else "") + "]"


def _kind(value: Any) -> str:
    return "pickled" if isinstance(value, DcpBytes) else type(value).__name__


def _describe(value: Any) -> str:
    if isinstance(value, DcpBytes):
        return f"pickled value ({value.item.length} bytes, read on demand)"
    return describe_value(value)


def describe_layout(
    metadata: DcpMetadata, sizes: Mapping[str, int], tensors: Mapping[str, DcpTensor], found_at: str
) -> list[str]:
    """Lines for `inspect`: world size and files, then the shard layout of `tensors` (the extracted ones)."""
    ranks = {int(m.group(1)) for f in metadata.files if (m := _RANK_FILE.fullmatch(PurePosixPath(f).name))}
    world = f"world size {max(ranks) + 1}" if ranks else "world size unknown (files not named __<rank>_<n>.distcp)"
    lines = [
        f"torch.distributed.checkpoint: {world}, {len(sizes)} files ({human_bytes(sum(sizes.values()))}), "
        f"version {metadata.version or 'unknown'}"
    ]
    sharded = [t for t in tensors.values() if t.sharded_dims]
    chunks = sum(len(t.chunks) for t in tensors.values())
    parts = [
        f"{count} on dim{'s' if len(dims) > 1 else ''} {','.join(map(str, dims))}"
        for dims, count in sorted(Counter(t.sharded_dims for t in sharded).items())
    ]
    uneven = sum(1 for t in sharded if len({c.sizes for c in t.chunks}) > 1)
    counts = sorted({len(t.chunks) for t in sharded})
    per = (f"{counts[0]} chunks each" if len(counts) == 1 else f"{counts[0]}-{counts[-1]} chunks") if counts else ""
    detail = f" ({'; '.join(parts)}; {uneven} uneven; {per})" if sharded else ""
    lines.append(
        f"shard layout at '{found_at}': {len(tensors)} tensors in {chunks} chunks: {len(sharded)} sharded"
        f"{detail}, {len(tensors) - len(sharded)} in one chunk (replicated or unsharded)"
    )
    for key, tensor in list((k, t) for k, t in tensors.items() if t.sharded_dims)[:_LISTED]:
        more = len(tensor.chunks) - _LISTED
        lines.append(
            f"  {key}: {tensor.meta} on dim {','.join(map(str, tensor.sharded_dims))}: "
            + " ".join(chunk_text(c) for c in tensor.chunks[:_LISTED])
            + (f" ... ({more} more chunks)" if more > 0 else "")
        )
    if len(sharded) > _LISTED:
        lines.append(f"  ... {len(sharded) - _LISTED} more sharded tensors")
    return lines


# ---- reading items --------------------------------------------------------------------------------------------


class _FileRange(io.RawIOBase):
    """Bytes [start, start + length) of an open file as a read-only, seekable file of its own (read with pread)."""

    def __init__(self, fd: int, start: int, length: int) -> None:
        super().__init__()
        self._fd, self._start, self._length, self._pos = fd, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        if base + pos < 0:
            raise OSError(f"seek to {base + pos}, before the start of the item")
        self._pos = base + pos
        return self._pos

    def readinto(self, buffer: Any) -> int:
        want = max(0, min(len(buffer), self._length - self._pos))
        data = os.pread(self._fd, want, self._start + self._pos) if want else b""
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)


def _item_archive(fd: int, item: StorageItem, place: str) -> tuple[TensorRef, Record]:
    """The one tensor of the torch.save zip at `item`, and its storage record (offsets in the file), held to the
    rules of every torch archive (`check_records`: no record inflating a thousandfold) before anything is read."""
    view = _FileRange(fd, item.offset, item.length)
    try:
        with zipfile.ZipFile(view) as archive:
            check_records(archive.infolist(), item.length, place)
            pickled, records, little = read_archive(archive, view)
        unpickler = StubUnpickler(io.BytesIO(pickled))
        ref = unpickle.load(unpickler.load, unpickle.nesting_bound(pickled), place, lambda: io.BytesIO(pickled))
    except SourceError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever is wrong inside the item, it is a corrupt input
        raise SourceError(
            f"{place}: is not a readable torch.save archive ({_first_line(exc)}); the file is "
            f"corrupt or truncated: copy it again"
        ) from None
    if unpickler.unknown or not isinstance(ref, TensorRef) or ref.dtype is None:
        raise SourceError(
            f"{place}: holds {summary(ref)} (using {', '.join(unpickler.unknown) or 'no globals'}), "
            f"not one plain tensor; the file is not from dcp.save"
        )
    if not little:
        raise SourceError(f"{place}: stores big-endian tensors, which ckptx does not read")
    record = records.get(ref.storage.key)
    if record is None or record.offset + record.size > item.length:
        raise SourceError(
            f"{place}: its tensor's storage record {quoted(ref.storage.key)} is missing or runs past the "
            f"item; the file is corrupt"
        )
    return ref, Record(item.offset + record.offset, record.size)


def _zip_chunk(
    ref: TensorRef, absolute: Record, path: str, tensor: DcpTensor, chunk: DcpChunk, place: str
) -> _StoredChunk:
    """A chunk of the `torch_save` serialization: the one tensor of the torch.save zip at the item."""
    if len(ref.size) != len(ref.stride) or not all(0 <= n < 2**63 for n in (ref.offset, *ref.size, *ref.stride)):
        raise SourceError(f"{place}: its tensor has a negative or out-of-range size, stride or offset; corrupt")
    _check_chunk_meta(TensorMeta(ref.size, ref.dtype or ""), tensor, chunk, place)
    span = row_major_span(ref, {ref.storage.key: absolute}, path)
    if span is not None:
        return _StoredChunk(span)
    return _strided_chunk(ref, absolute, path, tensor, place)


def _strided_chunk(ref: TensorRef, record: Record, path: str, tensor: DcpTensor, place: str) -> _StoredChunk:
    """A chunk saved as a strided view of its storage: the whole storage, to be viewed with the strides. A view
    that repeats stored elements (stride 0: `expand()`) is refused, as in every other checkpoint."""
    item = DTYPES[tensor.dtype].itemsize
    last = ref.offset + sum((s - 1) * st for s, st in zip(ref.size, ref.stride))
    if not ref.plain or ref.offset < 0 or any(st < 0 for st in ref.stride) or (last + 1) * item > record.size:
        raise SourceError(
            f"{place}: its tensor (offset {ref.offset}, stride {list(ref.stride)}) lies outside its "
            f"storage of {record.size} bytes; the file is corrupt"
        )
    overlap = unsupported_tensor(ref)
    if overlap is not None:
        raise SourceError(f"{place}: its tensor is {overlap}")
    return _StoredChunk(RawSpan(path, record.offset, record.size - record.size % item), ref.stride, ref.offset)


def _check_chunk_meta(found: TensorMeta, tensor: DcpTensor, chunk: DcpChunk, place: str) -> None:
    if found.shape != chunk.sizes or found.dtype != tensor.dtype:
        raise SourceError(
            f"{place}: holds {found} but the metadata says {tensor.dtype}{list(chunk.sizes)}; the "
            f"folder mixes files of different saves"
        )


def _read_blob_header(fd: int, item: StorageItem, place: str) -> tuple[dict[str, Any], int, dict[str, TensorMeta]]:
    """Parse and check the safetensors data starting at `item` (the `SAFETENSORS` serialization writes one
    safetensors file per rank, and a chunk's item points into it), checked as the safetensors library checks a
    file; the header, the absolute start of its data, and its tensors' metas."""
    size = os.fstat(fd).st_size
    head = os.pread(fd, 8, item.offset)
    length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
    if length < 2 or length > min(size - item.offset - 8, MAX_HEADER):
        raise SourceError(f"{place}: is neither a torch.save zip nor safetensors data; the file is corrupt")
    raw = os.pread(fd, length, item.offset + 8)
    data_start = item.offset + 8 + length
    header, metas = check_embedded_header(raw, size - data_start, data_start, place)
    return header, data_start, metas


def _saved_offsets(header: Mapping[str, Any], key: str) -> tuple[int, ...] | None:
    """The chunk offsets the safetensors serialization records for `key` (`DCP_SHARDING_INFO`), if any."""
    try:
        info = json.loads(header["__metadata__"]["DCP_SHARDING_INFO"])
        return tuple(int(o) for o in info[key]["saved_offsets"])
    except (KeyError, TypeError, ValueError):
        return None


def _pread_exact(path: Path, offset: int, length: int, shown: str, what: str) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.pread(fd, length, offset)
    finally:
        os.close(fd)
    if len(data) != length:
        raise SourceError(
            f"{shown}: ended at byte {offset + len(data)} while reading {what} of {length} bytes at "
            f"{offset}; the file is truncated or changed"
        )
    return data


# ---- pickled values -------------------------------------------------------------------------------------------


def _unpickle_value(data: bytes, shown: str, allow_globals: Sequence[str], unsafe_pickle: bool) -> Any:
    """A pickled value (a torch.save zip, or a plain pickle) read with the torch readers' rules."""
    if not unsafe_pickle:
        try:
            value, unknown = _stub_value(data)
        except Exception as exc:  # noqa: BLE001 - a malformed pickle is a bad input
            raise SourceError(f"{shown}: not a readable pickle ({_first_line(exc)}); the file is corrupt") from None
        refused = [g for g in unknown if g not in allow_globals]
        if any(g.startswith("persistent id") for g in refused):
            raise SourceError(f"{shown}: the pickle refers to data outside itself ({refused[0]}); not a DCP value")
        if refused:
            raise UnsafeGlobalError(shown, [needed_global(g) for g in refused])
        if not unknown and not _holds_refs(value):
            return value
    return _torch_load(data, shown, allow_globals, unsafe_pickle)


def _stub_value(data: bytes) -> tuple[Any, list[str]]:
    """The value as the import-free stub unpickler builds it, and the globals it did not model."""
    if data[:4] == _ZIP_MAGIC:
        stream = io.BytesIO(data)
        with zipfile.ZipFile(stream) as archive:
            check_records(archive.infolist(), len(data), "the pickled value")
            pickled, _, _ = read_archive(archive, stream)
    else:
        pickled = data
    unpickler = StubUnpickler(io.BytesIO(pickled))
    value = unpickle.load(
        unpickler.load, unpickle.nesting_bound(pickled), "the pickled value", lambda: io.BytesIO(pickled)
    )
    return value, unpickler.unknown


def _holds_refs(value: Any) -> bool:
    """A tensor anywhere in the value (walked without recursion, each container once: a value may nest 200,000
    deep, or hold itself)."""
    stack, seen = [value], set()
    while stack:
        item = stack.pop()
        if isinstance(item, TensorRef):
            return True
        if isinstance(item, (dict, list, tuple)):
            if id(item) in seen:
                continue
            seen.add(id(item))
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return False


def _torch_load(data: bytes, shown: str, allow_globals: Sequence[str], unsafe_pickle: bool) -> Any:
    with allowed_globals(allow_globals, unsafe_pickle):
        try:
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=not unsafe_pickle)
        except pickle.UnpicklingError as exc:
            raise unpickling_error(None, shown, exc, False) from None
        except (
            EOFError,
            RuntimeError,
            ValueError,
            zipfile.BadZipFile,
            KeyError,
            TypeError,
            AttributeError,
            ImportError,
            IndexError,
        ) as exc:
            raise SourceError(f"{shown}: not a readable pickled value ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
