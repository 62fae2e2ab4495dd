"""Stream a plan to a safetensors file: header from the plan, then each tensor's bytes in order."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import BinaryIO, Callable, Mapping, Sequence

import torch

from ckptx.errors import TensorOpError
from ckptx.io.atomic import atomic_output
from ckptx.io.dtypes import SAFETENSORS_CODES, dtype_name
from ckptx.io.source import RawSpan, Source
from ckptx.ops.registry import PlanEntry, evaluate

_CHUNK = 16 * 1024 * 1024
Progress = Callable[[int], None]


def build_header(entries: Sequence[PlanEntry], metadata: Mapping[str, str]) -> bytes:
    """The safetensors header for `entries` in order, padded with spaces to a multiple of 8 bytes."""
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for entry in entries:
        size = entry.meta.nbytes
        header[entry.key] = {"dtype": SAFETENSORS_CODES[entry.meta.dtype], "shape": list(entry.meta.shape),
                             "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def write_safetensors(dst: Path, entries: Sequence[PlanEntry], source: Source, metadata: Mapping[str, str],
                      progress: Progress | None = None) -> int:
    """Write `entries` to `dst` atomically; unchanged tensors are copied as raw bytes. Returns bytes written."""
    with atomic_output(dst) as out:
        out.write(build_header(entries, metadata))
        for entry in entries:
            span = source.raw_span(entry.sources[0]) if entry.is_copy else None
            if span is not None:
                copy_span(span, out)
            else:
                write_tensor(out, materialize(entry, source))
            if progress:
                progress(entry.meta.nbytes)
        return out.tell()


def materialize(entry: PlanEntry, source: Source) -> torch.Tensor:
    """Compute one entry's tensor and check it against the plan's shape and dtype."""
    try:
        tensor = evaluate(entry.expr, source.load)
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise TensorOpError(f"tensor '{entry.key}' (from {', '.join(entry.sources)}): {exc}") from None
    if tuple(tensor.shape) != entry.meta.shape or dtype_name(tensor.dtype) != entry.meta.dtype:
        raise TensorOpError(f"tensor '{entry.key}': the data is {dtype_name(tensor.dtype)}{list(tensor.shape)} "
                            f"but the file's header says {entry.meta}; the source file is inconsistent")
    return tensor


def write_tensor(out: BinaryIO, tensor: torch.Tensor) -> None:
    """Write a tensor's bytes in row-major order (views and non-contiguous tensors are written as themselves)."""
    if tensor.numel() == 0:
        return
    flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    out.write(memoryview(flat.numpy()))


def copy_span(span: RawSpan, out: BinaryIO) -> None:
    """Copy bytes from a source file to `out`, in the kernel where possible."""
    out.flush()
    with open(span.file, "rb") as src:
        remaining, offset = span.nbytes, span.offset
        copy_range = getattr(os, "copy_file_range", None)
        while remaining and copy_range is not None:
            try:
                done = copy_range(src.fileno(), out.fileno(), remaining, offset)
            except OSError:
                break
            if done <= 0:
                break
            offset += done
            remaining -= done
        if remaining:
            out.seek(0, os.SEEK_END)
        src.seek(offset)
        while remaining:
            chunk = src.read(min(_CHUNK, remaining))
            if not chunk:
                raise TensorOpError(f"{span.file}: ended early while copying tensor bytes (file changed or truncated)")
            out.write(chunk)
            remaining -= len(chunk)
    out.seek(0, os.SEEK_END)
