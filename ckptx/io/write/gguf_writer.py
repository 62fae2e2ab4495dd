"""GGUF output (llama.cpp): the header (metadata, then each tensor's name, shape, ggml type and offset) from the
plan, then each tensor's bytes streamed in blocks of rows, every tensor aligned to 32 bytes. The whole file is
laid out before a byte is written (io/write/output_layout.py), so work units write its tensors at their offsets, in
this process or on workers, and the bytes never depend on how many.

Each tensor's ggml type follows llama.cpp's `convert_hf_to_gguf.py` for the requested file type (`--dtype
float32|float16|bfloat16|q8_0`, its `--outtype f32|f16|bf16|q8_0`): 1-D tensors, norms, tensors whose names do not
end in `.weight` and the few llama.cpp keeps in float32 (routers, position embeddings) are F32; a Q8_0 tensor whose
rows are not whole blocks of 32 falls back to F16. Without a file type nothing is narrowed: each of those other
tensors keeps its own dtype (F32, F16, BF16, F64), where llama.cpp's converter would guess one type for all of them
(`--outtype auto`: float16 unless the model is bfloat16). Values are taken as float32 (exact for float16 and
bfloat16) and converted as the `gguf` package converts them, so the bytes are the converter's.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ckptx.errors import DestinationError
from ckptx.gcpause import without_gc
from ckptx.io.gguf import ARRAY, DEFAULT_ALIGNMENT, MAGIC, STRING, VALUE_TYPES, type_named
from ckptx.io.write.output_layout import (
    Blocks,
    Copy,
    Fill,
    LayoutBuilder,
    OutputLayout,
    Piece,
    Quantize,
    absolute,
    tensor_fill,
    whole_span,
)
from ckptx.io.write.writer import Writer
from ckptx.planning.entry import PlanEntry
from ckptx.planning.source import Source

__all__ = ["FILE_TYPES", "GgufWriter", "file_type_of", "tensor_types"]

# file type -> (ggml type of the quantizable tensors, llama.cpp's general.file_type)
FILE_TYPES = {"float32": ("F32", 0), "float16": ("F16", 1), "bfloat16": ("BF16", 32), "q8_0": ("Q8_0", 7)}
_ALWAYS_F32 = ("ffn_gate_inp.", "ffn_gate_inp_shexp.", "position_embd.", "token_types.", "ssm_conv1d.")
_PLAIN = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64",
          "int8": "I8", "int16": "I16", "int32": "I32", "int64": "I64"}  # fmt: skip
_FLOATS = ("float32", "float16", "bfloat16", "float64")


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

    def check_card(self) -> None:
        """A provenance card records each tensor's bytes as stored, which must then be its own elements: a tensor
        GGUF stores in another type (quantized, or a float narrowed) is refused before anything is written."""
        changed = [(e, t) for e, t in zip(self.entries, self.types) if _PLAIN.get(e.meta.dtype) != t]
        if changed:
            entry, kind = changed[0]
            raise DestinationError(
                f"{self.destination}: a provenance card records each tensor's bytes as stored, and this GGUF "
                f"output stores '{entry.key}' ({entry.meta.dtype}) as {kind} ({len(changed)} such tensor(s)); "
                f"write the card without --dtype (each tensor kept as it is), or leave out --audit"
            )

    @without_gc  # 100,000 tensors: each full collection would walk the plan again
    def layout(self, source: Source) -> OutputLayout:
        """The header (metadata, then every tensor's name, shape, type and offset), then each tensor at its offset,
        padded to the alignment (the padding is the zeros of the pre-sized file)."""
        metadata = list(self.options.gguf_metadata)
        file_type = FILE_TYPES.get(self.file_type, FILE_TYPES["float32"])[1]
        metadata = [(k, c, file_type if k == "general.file_type" else v) for k, c, v in metadata]
        header, offsets = build_header(metadata, self.entries, self.types)
        builder = LayoutBuilder()
        sizes = [_nbytes(entry, name) for entry, name in zip(self.entries, self.types)]
        end = offsets[-1] + -(-sizes[-1] // DEFAULT_ALIGNMENT) * DEFAULT_ALIGNMENT if offsets else 0
        index = builder.file(self.destination.name, self.destination, len(header) + end)
        builder.literal(index, 0, header)
        for entry, name, offset, size in zip(self.entries, self.types, offsets, sizes):
            builder.add(Piece(index, len(header) + offset, size, _tensor_fill(entry, name, source, size), entry.key))
        return builder.build(planned_bytes=sum(entry.meta.nbytes for entry in self.entries))


def _tensor_fill(entry: PlanEntry, name: str, source: Source, nbytes: int) -> Fill:
    """How a tensor's bytes as ggml type `name` are made: a tensor GGUF stores as its own dtype (an integer tensor,
    a float one not narrowed) is its bytes as they are, copied or made by its op's byte kernel, never through float32
    (float64 stays exact); another float tensor's values are converted a block of rows at a time, read from its raw
    span when the plan copies a source tensor, made by a blockwise kernel (a rotary reordering: no torch), else
    computed with torch once."""
    meta = entry.meta
    if meta.dtype not in _FLOATS or name == _PLAIN[meta.dtype]:
        return tensor_fill(entry, source, nbytes)
    row = meta.shape[-1] if meta.shape else 1
    span = whole_span(source, entry.sources[0]) if entry.is_copy else None
    if span is not None and span.nbytes == meta.nbytes:
        return Quantize(name, meta.dtype, row, span=absolute(span))
    made = tensor_fill(entry, source, meta.nbytes) if not entry.is_copy else None
    if isinstance(made, Blocks):
        return Quantize(name, meta.dtype, row, blocks=made)
    if isinstance(made, Copy) and len(made.spans) == 1:  # a reshape, a split along dimension 0: its bytes are a span
        return Quantize(name, meta.dtype, row, span=made.spans[0])
    return Quantize(name, meta.dtype, row, entry=entry)
