"""Read GGUF files (llama.cpp) lazily: the header (metadata and tensor infos) is parsed and checked against the
file, tensor bytes are read on demand. Plain tensors (F32, F16, BF16, F64, I8-I64) are their bytes, copied as
they are; block-quantized ones are read as float32, dequantized one tensor at a time (see ckptx/io/gguf.py).

Every count, length and offset of the header is checked against the file's size before anything is allocated,
so a damaged or hostile header is one error naming the file and the byte, never a hang or a huge allocation.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptx._lazy import lazy_module
from ckptx.dtypes import TensorMeta
from ckptx.errors import SourceError, UnsupportedDtype
from ckptx.io.gguf import (
    ALIGNMENT_KEY,
    ARRAY,
    DEFAULT_ALIGNMENT,
    GGML_TYPES,
    MAGIC,
    NATIVE,
    STRING,
    VALUE_TYPES,
    GgmlType,
    dequantize,
)
from ckptx.io.read.gguf_llama import ROPE_FREQS, LlamaConfigDocument, hf_llama_config
from ckptx.io.spans import read_span
from ckptx.planning.source import RawSpan, Source
from ckptx.text import quoted, shown

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch
else:
    np = lazy_module("numpy")
    torch = lazy_module("torch")

__all__ = ["GGUF_CONFIG", "GgufHeader", "GgufSource", "GgufTensor", "is_gguf", "read_gguf_header"]

GGUF_CONFIG = "the LlamaForCausalLM config its GGUF metadata describes"  # the name of Source.configs' document
_MAX_DIMS = 8
_AGAIN = "the file is damaged or not GGUF: download or convert it again"


@dataclass(frozen=True)
class GgufTensor:
    """One tensor info: its name, torch shape (the reverse of GGUF's dims), ggml type and absolute byte range."""

    name: str
    shape: tuple[int, ...]
    ggml: GgmlType
    offset: int
    nbytes: int


@dataclass(frozen=True)
class GgufHeader:
    """A checked GGUF header: version, metadata (key -> Python value), tensors in file order, and where the data
    section starts."""

    version: int
    metadata: dict[str, Any]
    value_types: dict[str, str]
    tensors: list[GgufTensor]
    data_start: int
    alignment: int


def is_gguf(head: bytes) -> bool:
    """The first bytes of a GGUF file."""
    return head[:4] == MAGIC


class _Reader:
    """Reads the header's fields in order, each checked against the file's size."""

    def __init__(self, file: Any, size: int, shown_path: str) -> None:
        self.file, self.size, self.shown = file, size, shown_path
        self.at = 0

    def fail(self, what: str) -> SourceError:
        return SourceError(f"{self.shown}: not a valid GGUF file: {what} (file byte {self.at}); {_AGAIN}")

    def take(self, count: int, what: str) -> bytes:
        if count < 0 or self.at + count > self.size:
            raise self.fail(f"{what} needs {count} bytes but the file ends at byte {self.size}")
        data = self.file.read(count)
        if len(data) != count:
            raise self.fail(f"{what}: the file ended early")
        self.at += count
        return data

    def scalar(self, fmt: str, what: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        length = self.scalar("<Q", f"the length of {what}")
        raw = self.take(length, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8") from None

    def value(self, code: int, what: str, depth: int = 0) -> Any:
        kind = VALUE_TYPES.get(code)
        if kind is None:
            raise self.fail(f"{what} has value type {code}, which GGUF does not define")
        if code == STRING:
            return self.string(what)
        if code == ARRAY:
            if depth > 4:
                raise self.fail(f"{what} nests arrays more than 4 deep")
            item = self.scalar("<I", f"the item type of {what}")
            count = self.scalar("<Q", f"the length of {what}")
            if count > self.size - self.at:  # every item takes at least one byte
                raise self.fail(
                    f"{what} says it holds {count:,} items; the file has {self.size - self.at:,} bytes left"
                )
            fmt = VALUE_TYPES.get(item, ("", None))[1]
            if fmt is not None and item != ARRAY:
                data = self.take(count * struct.calcsize(fmt), what)
                return list(struct.unpack(f"<{count}{fmt[1:]}", data))
            return [self.value(item, f"{what}[{i}]", depth + 1) for i in range(count)]
        fmt = kind[1]
        assert fmt is not None
        return self.scalar(fmt, what)


def read_gguf_header(path: Path, display: str | None = None) -> GgufHeader:
    """Parse and check a GGUF file's header; SourceError naming the file and the byte when it is not valid."""
    shown_path = display or str(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        r = _Reader(f, size, shown_path)
        if r.take(4, "the magic number") != MAGIC:
            raise SourceError(f"{shown_path}: not a GGUF file (it does not start with 'GGUF'); {_AGAIN}")
        version = r.scalar("<I", "the version")
        if version not in (2, 3):
            raise SourceError(
                f"{shown_path}: GGUF version {version}; ckptx reads versions 2 and 3 (convert it with a recent "
                f"llama.cpp)"
            )
        count = r.scalar("<Q", "the tensor count")
        kv_count = r.scalar("<Q", "the metadata count")
        if count > size // 24 or kv_count > size // 12:
            raise r.fail(f"it says {count:,} tensors and {kv_count:,} metadata entries, more than {size:,} bytes hold")
        metadata: dict[str, Any] = {}
        value_types: dict[str, str] = {}
        for index in range(kv_count):
            key = r.string(f"metadata key {index}")
            if key in metadata:
                raise r.fail(f"metadata key {quoted(key)} appears twice")
            code = r.scalar("<I", f"the value type of {quoted(key)}")
            metadata[key] = r.value(code, f"metadata {quoted(key)}")
            value_types[key] = VALUE_TYPES[code][0]
        infos = [_tensor_info(r, index) for index in range(count)]
    alignment = metadata.get(ALIGNMENT_KEY, DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise SourceError(f"{shown_path}: {ALIGNMENT_KEY} is {alignment!r}, not a power of two; {_AGAIN}")
    data_start = -(-r.at // alignment) * alignment
    return GgufHeader(version, metadata, value_types, _placed(infos, data_start, alignment, size, shown_path),
                      data_start, alignment)  # fmt: skip


def _tensor_info(r: _Reader, index: int) -> tuple[str, tuple[int, ...], int, int, int]:
    name = r.string(f"the name of tensor {index}")
    n_dims = r.scalar("<I", f"the number of dimensions of tensor {quoted(name)}")
    if n_dims > _MAX_DIMS:
        raise r.fail(f"tensor {quoted(name)} has {n_dims} dimensions; GGUF tensors have at most {_MAX_DIMS}")
    dims = struct.unpack(f"<{n_dims}Q", r.take(8 * n_dims, f"the dimensions of tensor {quoted(name)}"))
    code = r.scalar("<I", f"the type of tensor {quoted(name)}")
    offset = r.scalar("<Q", f"the offset of tensor {quoted(name)}")
    return name, tuple(reversed(dims)), code, offset, r.at


def _placed(
    infos: list[tuple[str, tuple[int, ...], int, int, int]], data_start: int, alignment: int, size: int, shown_path: str
) -> list[GgufTensor]:
    """Tensor infos with their types known, byte ranges inside the file, aligned, and not overlapping."""
    tensors: list[GgufTensor] = []
    names: set[str] = set()
    for name, shape, code, offset, at in infos:
        place = f"{shown_path}: tensor {quoted(name)} (header byte {at})"
        if name in names:
            raise SourceError(f"{place}: the name appears twice; {_AGAIN}")
        names.add(name)
        ggml = GGML_TYPES.get(code)
        if ggml is None:
            raise UnsupportedDtype(
                f"{place} has ggml type {code}, which ckptx does not know; a newer llama.cpp wrote it"
            )
        numel = 1
        for dim in shape:
            numel *= dim
        if shape and shape[-1] % ggml.block_size:
            raise SourceError(
                f"{place}: rows of {shape[-1]} values are not whole {ggml.name} blocks of {ggml.block_size}; {_AGAIN}"
            )
        nbytes = numel // ggml.block_size * ggml.type_size
        if offset % alignment:
            raise SourceError(f"{place}: offset {offset} is not a multiple of the alignment {alignment}; {_AGAIN}")
        if data_start + offset + nbytes > size:
            raise SourceError(
                f"{place}: its {nbytes:,} bytes at data offset {offset:,} end past the end of the file "
                f"({size:,} bytes): the file is truncated; {_AGAIN}"
            )
        tensors.append(GgufTensor(name, shape, ggml, data_start + offset, nbytes))
    ordered = sorted(tensors, key=lambda t: t.offset)
    for before, after in zip(ordered, ordered[1:]):
        if after.offset < before.offset + before.nbytes:
            raise SourceError(
                f"{shown_path}: tensors {quoted(before.name)} and {quoted(after.name)} overlap in the data section; "
                f"{_AGAIN}"
            )
    return tensors


def _summary(value: Any) -> str:
    """A metadata value as one short line (arrays of more than 8 items by their length and item kind)."""
    if isinstance(value, list):
        if len(value) > 8:
            kind = type(value[0]).__name__ if value else "item"
            return f"[{len(value):,} {kind} values]"
        return "[" + ", ".join(_summary(v) for v in value) + "]"
    text = str(value)
    return shown(text if len(text) <= 80 else text[:77] + "...")


class GgufSource(Source):
    """A GGUF file: metadata and tensor infos from the header; plain tensors are raw spans, quantized ones are
    dequantized to float32 when loaded."""

    def __init__(self, path: Path, display: str | None = None) -> None:
        shown_path = display or str(path)
        header = read_gguf_header(path, shown_path)
        self.header = header
        self._file = str(path)
        self._tensors = {t.name: t for t in header.tensors}
        types: dict[str, int] = {}
        for tensor in header.tensors:
            types[tensor.ggml.name] = types.get(tensor.ggml.name, 0) + 1
        description = [
            f"GGUF version {header.version}: {len(header.metadata)} metadata keys, {len(header.tensors)} tensors, "
            f"alignment {header.alignment}",
            "tensor types: " + ", ".join(f"{name} ({n})" for name, n in types.items()),
        ]
        quantized = [t.ggml.name for t in header.tensors if not t.ggml.plain]
        if quantized:
            description.append("block-quantized tensors are read dequantized, as float32")
        super().__init__(
            path=shown_path,
            format="gguf",
            tensors={t.name: TensorMeta(t.shape, t.ggml.dtype) for t in header.tensors},
            file_metadata={key: _summary(value) for key, value in header.metadata.items()},
            description=description,
            stored_as={t.name: t.ggml.name for t in header.tensors},
        )
        llama = self.hf_config()
        if llama.document:
            self.configs = {GGUF_CONFIG: llama.document}

    def hf_config(self) -> LlamaConfigDocument:
        """The LlamaForCausalLM config.json the metadata describes (empty for another architecture), with what
        keeps it from being exact (see io/read/gguf_llama.py)."""

        def rope_freqs() -> list[float]:
            return [float(v) for v in self._float32(ROPE_FREQS).tolist()]

        shapes = {t.name: t.shape for t in self.header.tensors}
        return hf_llama_config(self.header.metadata, shapes, rope_freqs)

    def ggml_type(self, key: str) -> str:
        """The ggml type a tensor is stored as (`Q8_0`, `F16`, ...)."""
        return self._tensors[key].ggml.name

    def raw_span(self, key: str) -> RawSpan | None:
        """Where a plain tensor's bytes lie (None for a block-quantized one)."""
        tensor = self._tensors[key]
        return RawSpan(self._file, tensor.offset, tensor.nbytes) if tensor.ggml.plain else None

    def load(self, key: str) -> torch.Tensor:
        """The tensor: read as it is, or dequantized to float32."""
        tensor = self._tensors[key]
        meta = self.tensors[key]
        if tensor.ggml.plain:
            return read_span(RawSpan(self._file, tensor.offset, tensor.nbytes), meta)
        return torch.from_numpy(self._float32(key).copy()).reshape(meta.shape)

    def _float32(self, key: str) -> Any:
        """A floating-point tensor's values as a flat float32 numpy array (without torch)."""
        tensor = self._tensors[key]
        meta = self.tensors[key]
        fd = os.open(self._file, os.O_RDONLY)
        try:
            data = os.pread(fd, tensor.nbytes, tensor.offset)
        finally:
            os.close(fd)
        if len(data) != tensor.nbytes:
            raise SourceError(
                f"{self.path}: ended while reading tensor {quoted(key)}; the file is truncated or changed"
            )
        plain = {"F32": "<f4", "F16": "<f2", "F64": "<f8"}.get(tensor.ggml.name)
        if plain is not None:
            return np.frombuffer(data, dtype=plain).astype("<f4")
        if tensor.ggml.name == "BF16":
            return (np.frombuffer(data, dtype="<u2").astype("<u4") << 16).view("<f4")
        try:
            values = dequantize(data, tensor.ggml, meta.numel)
        except ImportError:
            raise UnsupportedDtype(
                f"{self.path}: tensor {quoted(key)} is {tensor.ggml.name}; ckptx dequantizes "
                f"{', '.join(NATIVE)} itself and the other ggml types with the gguf package: "
                f"pip install 'ckptx[gguf]'"
            ) from None
        return values
