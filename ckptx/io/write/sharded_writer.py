"""Sharded safetensors output: HuggingFace-style shards plus an index, published together or not at all.

Naming: DST `NAME.safetensors.index.json` or `NAME.safetensors` gives shards `NAME-00001-of-0000N.safetensors`
and the index `NAME.safetensors.index.json` beside them. When everything fits in one shard and DST names a
`.safetensors` file, that one file is written at DST with no index (as `save_pretrained` does).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ckptx.errors import DestinationError
from ckptx.gcpause import without_gc
from ckptx.io.write.destination import InputFiles
from ckptx.io.write.output_layout import LayoutBuilder, OutputLayout
from ckptx.io.write.safetensors_writer import lay_out_safetensors
from ckptx.io.write.writer import OutputOptions, Writer
from ckptx.planning.entry import PlanEntry
from ckptx.planning.source import Source

__all__ = [
    "INDEX_SUFFIX",
    "ShardLayout",
    "ShardedWriter",
    "index_text",
    "is_index_name",
    "lay_out_shards",
    "shard_layout",
]

INDEX_SUFFIX = ".safetensors.index.json"


def is_index_name(path: Path) -> bool:
    """True when `path` names a shard index (`*.index.json`)."""
    return path.name.endswith(".index.json")


@dataclass
class ShardLayout:
    """Which entries go to which file; `index` is None when the output is one plain file."""

    files: list[tuple[Path, list[PlanEntry]]]
    index: Path | None
    replaces: list[Path] = field(default_factory=list)

    @property
    def paths(self) -> list[Path]:
        """Every final path, the index last."""
        return [p for p, _ in self.files] + ([self.index] if self.index else [])

    @property
    def weights(self) -> Path:
        """The file a loader opens: the index, or the single file."""
        return self.index or self.files[0][0]


def shard_layout(dst: Path, entries: Sequence[PlanEntry], max_size: int | None) -> ShardLayout:
    """Split `entries` in order into shards of at most `max_size` tensor bytes (a bigger tensor gets its own)."""
    if dst.name.endswith(INDEX_SUFFIX):
        stem, index = dst.name[: -len(INDEX_SUFFIX)], dst
    elif dst.suffix == ".safetensors" and not is_index_name(dst):
        stem, index = dst.stem, dst.with_name(dst.name + ".index.json")
    else:
        raise DestinationError(
            f"{dst}: sharded output is safetensors only; name DST NAME.safetensors or NAME{INDEX_SUFFIX}"
        )
    groups: list[list[PlanEntry]] = [[]]
    filled = 0
    for entry in entries:
        size = entry.meta.nbytes
        if groups[-1] and max_size is not None and filled + size > max_size:
            groups.append([])
            filled = 0
        groups[-1].append(entry)
        filled += size
    if len(groups) == 1 and dst != index:
        return ShardLayout([(dst, groups[0])], None)
    count = len(groups)
    files = [(dst.with_name(f"{stem}-{i:05d}-of-{count:05d}.safetensors"), group) for i, group in enumerate(groups, 1)]
    return ShardLayout(files, index, [dst] if dst != index else [])


class ShardedWriter(Writer):
    """Safetensors shards and their index."""

    format = "safetensors-sharded"
    what = "an output shard or index"

    def __init__(self, destination: Path, entries: Sequence[PlanEntry], options: OutputOptions) -> None:
        super().__init__(destination, entries, options)
        self.shards = shard_layout(destination, entries, options.max_shard_size)

    @property
    def primary(self) -> Path:
        """The index, or the single file."""
        return self.shards.weights

    def files(self) -> list[Path]:
        """Every shard, then the index."""
        return self.shards.paths

    def replaces(self) -> list[Path]:
        """The old index (and a plain file of the same name) go first: no index names a half-replaced set."""
        return [p for p in [self.shards.index, *self.shards.replaces] if p is not None]

    def check(self, inputs: InputFiles) -> list[str]:
        """The destination rule for every shard and the index; a note naming older shards of the same name."""
        super().check(inputs)
        return older_shards(self.shards)

    @without_gc  # 100,000 tensors: 0.9 s instead of 2.2 s (each full collection walks the plan again)
    def layout(self, source: Source) -> OutputLayout:
        """Every shard, then the index."""
        builder = LayoutBuilder()
        lay_out_shards(builder, self.shards, source, self.options)
        return builder.build(planned_bytes=sum(entry.meta.nbytes for entry in self.entries))


def older_shards(layout: ShardLayout) -> list[str]:
    """A note naming shards of the same name that the new index does not list (they are left in place)."""
    if layout.index is None or not layout.index.parent.is_dir():  # a new folder has no older shards
        return []
    stem = layout.index.name[: -len(INDEX_SUFFIX)]
    pattern = re.compile(re.escape(stem) + r"-\d{5}-of-\d{5}\.safetensors")
    ours = set(layout.paths)
    stale = sorted(p.name for p in layout.index.parent.iterdir() if pattern.fullmatch(p.name) and p not in ours)
    return [f"older shards left in place (not in the new index): {', '.join(stale)}"] if stale else []


def lay_out_shards(builder: LayoutBuilder, layout: ShardLayout, source: Source, options: OutputOptions) -> None:
    """Every shard of `layout` (and its index, last) added to `builder`."""
    for final, group in layout.files:
        lay_out_safetensors(builder, final, group, source, options.metadata)
    if layout.index is not None:
        text = index_text(layout)
        builder.literal(builder.file(layout.index.name, layout.index, len(text)), 0, text)


def index_text(layout: ShardLayout) -> bytes:
    """The index JSON as transformers writes it: `metadata.total_size` and a sorted key -> shard map."""
    weight_map = {entry.key: path.name for path, group in layout.files for entry in group}
    total = sum(entry.meta.nbytes for _, group in layout.files for entry in group)
    doc = {"metadata": {"total_size": total}, "weight_map": weight_map}
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode("utf-8")
