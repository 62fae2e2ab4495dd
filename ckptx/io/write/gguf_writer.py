"""GGUF output (llama.cpp): the header (metadata, then each tensor's name, shape, ggml type and offset) from the
plan, then each tensor's bytes streamed in blocks of rows, every tensor aligned to 32 bytes.

Each tensor's ggml type follows llama.cpp's `convert_hf_to_gguf.py` for the requested file type (`--dtype
float32|float16|bfloat16|q8_0`, its `--outtype f32|f16|bf16|q8_0`): 1-D tensors, norms, tensors whose names do not
end in `.weight` and the few llama.cpp keeps in float32 (routers, position embeddings) are F32; a Q8_0 tensor whose
rows are not whole blocks of 32 falls back to F16. Without a file type nothing is narrowed: each of those other
tensors keeps its own dtype (F32, F16, BF16, F64), where llama.cpp's converter would guess one type for all of them
(`--outtype auto`: float16 unless the model is bfloat16). Values are taken as float32 (exact for float16 and
bfloat16) and converted as the `gguf` package converts them, so the bytes are the converter's.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, cast

from ckptx._lazy import lazy_module
from ckptx.dtypes import TensorMeta
from ckptx.errors import DestinationError, SourceError
from ckptx.io.card import EntryObserver
from ckptx.io.gguf import ARRAY, DEFAULT_ALIGNMENT, MAGIC, STRING, VALUE_TYPES, quantize, type_named
from ckptx.io.spans import Progress
from ckptx.io.streamed import write_streamed
from ckptx.io.write.atomic import sync_file
from ckptx.io.write.writer import Move, Writer
from ckptx.planning.entry import PlanEntry
from ckptx.planning.execute import materialize
from ckptx.planning.source import RawSpan, Source

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch
else:
    np = lazy_module("numpy")
    torch = lazy_module("torch")

__all__ = ["FILE_TYPES", "GgufWriter", "file_type_of", "tensor_types"]

# file type -> (ggml type of the quantizable tensors, llama.cpp's general.file_type)
FILE_TYPES = {"float32": ("F32", 0), "float16": ("F16", 1), "bfloat16": ("BF16", 32), "q8_0": ("Q8_0", 7)}
_ALWAYS_F32 = ("ffn_gate_inp.", "ffn_gate_inp_shexp.", "position_embd.", "token_types.", "ssm_conv1d.")
_PLAIN = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64",
          "int8": "I8", "int16": "I16", "int32": "I32", "int64": "I64"}  # fmt: skip
_FLOATS = ("float32", "float16", "bfloat16", "float64")
ROWS_BYTES = 8 * 1024 * 1024  # float32 bytes converted at a time


def file_type_of(file_type: str | None, entries: Sequence[PlanEntry]) -> str:
    """The file type (`general.file_type`) of the output: the one asked for, else the dtype of the first tensor of 2
    or more dimensions (what llama.cpp records for a file of that type)."""
    if file_type is not None:
        return file_type
    first = next((e.meta.dtype for e in entries if len(e.meta.shape) >= 2), None)
    return first if first in ("float16", "bfloat16") else "float32"


def tensor_types(entries: Sequence[PlanEntry], file_type: str | None) -> list[str]:
    """The ggml type of each entry for `file_type` (None: each tensor's own), as llama.cpp's converter chooses it."""
    wanted = FILE_TYPES[file_type][0] if file_type is not None else None
    types = []
    for entry in entries:
        name, meta = entry.key, entry.meta
        if meta.dtype not in _FLOATS:
            types.append(_PLAIN.get(meta.dtype, ""))
        elif len(meta.shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
            types.append("F64" if meta.dtype == "float64" and wanted is None else "F32")
        elif any(part in name for part in _ALWAYS_F32):
            types.append("F64" if meta.dtype == "float64" and wanted is None else "F32")
        elif wanted is None:
            types.append(_PLAIN[meta.dtype])
        elif wanted == "Q8_0" and meta.shape[-1] % 32:
            types.append("F16")
        else:
            types.append(wanted)
    return types


def _string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _value(code: int, value: Any) -> bytes:
    if code == STRING:
        return _string(value)
    if code == ARRAY:
        item, items = value
        return struct.pack("<IQ", item, len(items)) + b"".join(_value(item, v) for v in items)
    fmt = VALUE_TYPES[code][1]
    assert fmt is not None
    return struct.pack(fmt, value)


def build_header(
    metadata: Sequence[tuple[str, int, Any]], entries: Sequence[PlanEntry], types: Sequence[str]
) -> tuple[bytes, list[int]]:
    """The header bytes, padded to the alignment, and each tensor's offset in the data section."""
    out = [MAGIC, struct.pack("<IQQ", 3, len(entries), len(metadata))]
    for key, code, value in metadata:
        out += [_string(key), struct.pack("<I", code), _value(code, value)]
    offsets, at = [], 0
    for entry, name in zip(entries, types):
        ggml = type_named(name)
        dims = tuple(reversed(entry.meta.shape)) or (1,)
        out += [_string(entry.key), struct.pack(f"<I{len(dims)}Q", len(dims), *dims)]
        out.append(struct.pack("<IQ", ggml.code, at))
        offsets.append(at)
        at += -(-_nbytes(entry, name) // DEFAULT_ALIGNMENT) * DEFAULT_ALIGNMENT
    header = b"".join(out)
    return header + b"\0" * (-len(header) % DEFAULT_ALIGNMENT), offsets


def _nbytes(entry: PlanEntry, name: str) -> int:
    ggml = type_named(name)
    return entry.meta.numel // ggml.block_size * ggml.type_size


class GgufWriter(Writer):
    """One `.gguf` file: metadata (OutputOptions.gguf_metadata) and tensors of the chosen ggml types."""

    format = "gguf"
    what = "the GGUF file"

    def __init__(self, destination: Path, entries: Sequence[PlanEntry], options: Any) -> None:
        super().__init__(destination, entries, options)
        if options.tensor_type is not None and options.tensor_type not in FILE_TYPES:
            raise DestinationError(
                f"{destination}: a GGUF output takes --dtype {'|'.join(FILE_TYPES)}, not {options.tensor_type}"
            )
        self.file_type = file_type_of(options.tensor_type, self.entries)
        self.types = tensor_types(self.entries, options.tensor_type)
        bad = [e for e, t in zip(self.entries, self.types) if not t]
        if bad:
            raise DestinationError(
                f"{destination}: tensor '{bad[0].key}' is {bad[0].meta.dtype}, which GGUF cannot hold; cast or drop it"
            )

    def files(self) -> list[Path]:
        """The file."""
        return [self.destination]

    def stage(
        self, folder: Path, source: Source, progress: Progress | None, observer: EntryObserver | None = None
    ) -> list[Move]:
        """Header first, then each tensor streamed, every one padded to the alignment. `observer` (a provenance
        card) sees each tensor's stored bytes, which must then be its own elements: a tensor GGUF stores in another
        type (quantized, or a float narrowed) is refused before anything is written."""
        if observer is not None:
            changed = [(e, t) for e, t in zip(self.entries, self.types) if _PLAIN.get(e.meta.dtype) != t]
            if changed:
                entry, kind = changed[0]
                raise DestinationError(
                    f"{self.destination}: a provenance card records each tensor's bytes as stored, and this GGUF "
                    f"output stores '{entry.key}' ({entry.meta.dtype}) as {kind} ({len(changed)} such tensor(s)); "
                    f"write the card without --dtype (each tensor kept as it is), or leave out --audit"
                )
        metadata = list(self.options.gguf_metadata)
        file_type = FILE_TYPES.get(self.file_type, FILE_TYPES["float32"])[1]
        metadata = [(k, c, file_type if k == "general.file_type" else v) for k, c, v in metadata]
        header, _ = build_header(metadata, self.entries, self.types)
        staged = folder / self.destination.name
        with open(staged, "wb") as out:
            out.write(header)
            for entry, name in zip(self.entries, self.types):
                written = 0

                def emit(chunk: bytes, entry: PlanEntry = entry) -> None:
                    nonlocal written
                    out.write(chunk)
                    written += len(chunk)
                    if observer is not None:
                        observer.observe_bytes(entry, chunk)
                    if progress:
                        progress(len(chunk))

                _write_tensor(entry, name, source, emit)
                if observer is not None:
                    observer.finish(entry)
                if written != _nbytes(entry, name):
                    raise DestinationError(f"tensor '{entry.key}': wrote {written} bytes, its {name} needs more")
                out.write(b"\0" * (-written % DEFAULT_ALIGNMENT))
            sync_file(out)
        return [(staged, self.destination)]


class _RowSink:
    """What `write_streamed` writes a computed tensor to: its bytes (as the plan's dtype) gathered into whole rows
    and passed on as ggml type `name`, about ROWS_BYTES of float32 at a time."""

    def __init__(self, meta: TensorMeta, name: str, emit: Callable[[bytes], None]) -> None:
        self.dtype, self.name, self.emit = meta.dtype, name, emit
        row = meta.shape[-1] if meta.shape else 1
        itemsize = meta.nbytes // meta.numel if meta.numel else 1
        self.chunk = max(1, ROWS_BYTES // max(1, row * 4)) * row * itemsize
        self.buffer = bytearray()

    def write(self, data: bytes) -> int:
        """Take the next bytes; pass on every whole chunk of rows."""
        self.buffer += data
        while len(self.buffer) >= self.chunk:
            self._pass(bytes(self.buffer[: self.chunk]))
            del self.buffer[: self.chunk]
        return len(data)

    def close(self) -> None:
        """Pass on the last rows."""
        if self.buffer:
            self._pass(bytes(self.buffer))
            self.buffer.clear()

    def _pass(self, data: bytes) -> None:
        self.emit(data if self.name == _PLAIN[self.dtype] else quantize(_as_float32(data, self.dtype), self.name))


def _write_tensor(entry: PlanEntry, name: str, source: Source, emit: Callable[[bytes], None]) -> None:
    """Emit the tensor's bytes as ggml type `name`, a block of rows at a time: read from its raw span when the plan
    copies a source tensor, through its op's byte kernel when it has one (a rotary reordering, a dequantization:
    io/streamed.py, no torch), else computed with torch once. A tensor GGUF stores as its own dtype is its bytes,
    never through float32 (float64 stays exact)."""
    meta = entry.meta
    if meta.dtype not in _FLOATS:  # an integer tensor: its bytes as they are
        emit(materialize(entry, source).contiguous().view(-1).numpy().tobytes())
        return
    span = source.raw_span(entry.sources[0]) if entry.is_copy else None
    if span is not None and span.nbytes == meta.nbytes:
        _write_span(span, meta, name, emit)
        return
    sink = _RowSink(meta, name, emit)
    if write_streamed(cast(BinaryIO, sink), entry, source):
        sink.close()
        return
    raw = materialize(entry, source).detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    for at in range(0, raw.size, sink.chunk):
        sink.write(raw[at : at + sink.chunk].tobytes())
    sink.close()


def _write_span(span: RawSpan, meta: TensorMeta, name: str, emit: Callable[[bytes], None]) -> None:
    """A source tensor's bytes, read with pread in chunks of whole rows and passed on as ggml type `name`."""
    sink = _RowSink(meta, name, emit)
    fd = os.open(span.file, os.O_RDONLY)
    try:
        for at in range(0, span.nbytes, sink.chunk):
            want = min(sink.chunk, span.nbytes - at)
            data = os.pread(fd, want, span.offset + at)
            if len(data) != want:
                raise SourceError(
                    f"{span.file}: ended while reading a tensor of {span.nbytes} bytes at {span.offset}; the file "
                    f"is truncated or changed"
                )
            sink.write(data)
    finally:
        os.close(fd)
    sink.close()


def _as_float32(data: bytes, dtype: str) -> Any:
    if dtype == "bfloat16":
        return (np.frombuffer(data, dtype="<u2").astype("<u4") << 16).view("<f4")
    code = {"float32": "<f4", "float16": "<f2", "float64": "<f8"}[dtype]
    return np.frombuffer(data, dtype=code).astype("<f4")
