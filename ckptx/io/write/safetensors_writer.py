"""Safetensors output: a plan streamed to one file, header from the plan, then each tensor's bytes in order."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, cast

from ckptx._lazy import lazy_module
from ckptx.dtypes import safetensors_code
from ckptx.io.card import EntryObserver, ObservedFile
from ckptx.io.spans import BLOCK, Progress, SpanCopier, write_bytes
from ckptx.io.streamed import write_streamed
from ckptx.io.write.atomic import sync_file
from ckptx.io.write.writer import Move, OutputOptions, Writer
from ckptx.planning.entry import PlanEntry
from ckptx.planning.execute import materialize
from ckptx.planning.source import Source

if TYPE_CHECKING:  # pragma: no cover
    import torch
else:
    torch = lazy_module("torch")


__all__ = ["SafetensorsWriter", "build_header", "write_body", "write_computed", "write_safetensors", "write_tensor"]


def build_header(entries: Sequence[PlanEntry], metadata: Mapping[str, str], data_start: int | None = None) -> bytes:
    """The safetensors header for `entries` in order, padded with spaces to a multiple of 8 bytes, or further so
    that the data section starts at an offset congruent to `data_start` modulo the block size (see
    `aligned_data_start`): then every copied byte lands at a destination offset congruent to its source offset,
    which lets copy-on-write file systems share the blocks and keeps copies page-aligned elsewhere."""
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for entry in entries:
        size = entry.meta.nbytes
        header[entry.key] = {
            "dtype": safetensors_code(entry.meta.dtype, key=entry.key),
            "shape": list(entry.meta.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    if data_start is not None:
        raw += b" " * ((data_start - 8 - len(raw)) % BLOCK)
    return len(raw).to_bytes(8, "little") + raw


def aligned_data_start(entries: Sequence[PlanEntry], source: Source) -> int | None:
    """Where (modulo the block size) the data section should start so that the most bytes copied as raw spans
    sit at offsets congruent to their offsets in the source files; None when no entry is such a copy.

    A safetensors file has no gaps between tensors, so one choice serves every tensor: a run copied in source
    order (a rename of a safetensors file) is congruent throughout; tensors whose source offsets are out of step
    with their neighbours' (records of a `.pth` file, a reordering, a dropped tensor before them) can't all be,
    and the start that places the most copied bytes wins. Only starts the header can reach (multiples of 8)
    count."""
    placed: dict[int, int] = {}
    offset = 0
    for entry in entries:
        spans = source.raw_spans(entry.sources[0]) if entry.is_copy else None
        if spans is not None and sum(span.nbytes for span in spans) == entry.meta.nbytes:
            at = offset
            for span in spans:
                start = (span.offset - at) % BLOCK
                if start % 8 == 0:
                    placed[start] = placed.get(start, 0) + span.nbytes
                at += span.nbytes
        offset += entry.meta.nbytes
    return max(placed, key=lambda start: placed[start]) if placed else None


class SafetensorsWriter(Writer):
    """One `.safetensors` file: the header from the plan, then each tensor's bytes in order."""

    format = "safetensors"

    def files(self) -> list[Path]:
        """The file."""
        return [self.destination]

    def stage(
        self, folder: Path, source: Source, progress: Progress | None, observer: EntryObserver | None = None
    ) -> list[Move]:
        """The whole file, fsynced."""
        staged = folder / self.destination.name
        with open(staged, "wb") as out:
            write_body(out, self.entries, source, self.options.metadata, progress, observer)
            sync_file(out)
        return [(staged, self.destination)]


def write_safetensors(
    dst: Path,
    entries: Sequence[PlanEntry],
    source: Source,
    metadata: Mapping[str, str],
    progress: Progress | None = None,
) -> int:
    """Write `entries` to `dst` atomically (replacing a file there); unchanged tensors are copied as raw bytes.
    Returns bytes written."""
    return SafetensorsWriter(dst, entries, OutputOptions(metadata=metadata)).write(source, progress)


def write_body(
    out: BinaryIO,
    entries: Sequence[PlanEntry],
    source: Source,
    metadata: Mapping[str, str],
    progress: Progress | None = None,
    observer: EntryObserver | None = None,
) -> None:
    """Header, then each entry's bytes: runs of unchanged tensors are copied file-to-file, the rest computed one by
    one. `observer` is told each entry's bytes (the spans copied, or the bytes computed)."""
    out.write(build_header(entries, metadata, aligned_data_start(entries, source)))
    with SpanCopier(out, progress) as copier:
        for entry in entries:
            spans = source.raw_spans(entry.sources[0]) if entry.is_copy else None
            if spans is not None and sum(span.nbytes for span in spans) == entry.meta.nbytes:
                for span in spans:
                    copier.add(span)
                if observer is not None:
                    observer.observe_copy(entry, tuple(spans))
            else:
                copier.flush()
                write_computed(out, entry, source, progress, observer)
            if observer is not None:
                observer.finish(entry)


def write_computed(
    out: BinaryIO,
    entry: PlanEntry,
    source: Source,
    progress: Progress | None = None,
    observer: EntryObserver | None = None,
) -> None:
    """Write a tensor an op changes: streamed through the op's byte kernel when it has one (a float cast, a
    dequantization, of tensors with raw spans), else computed whole with torch. `observer` sees the bytes written."""
    if observer is not None:
        out = cast(BinaryIO, ObservedFile(out, observer, (entry,)))
    if not write_streamed(out, entry, source, progress):
        write_tensor(out, materialize(entry, source), progress)


def write_tensor(out: BinaryIO, tensor: torch.Tensor, progress: Progress | None = None) -> None:
    """Write a tensor's bytes in row-major order (views and non-contiguous tensors are written as themselves)."""
    if tensor.numel() == 0:
        return
    flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    write_bytes(out, flat.numpy().data, progress)
