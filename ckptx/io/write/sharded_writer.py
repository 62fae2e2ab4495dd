"""Write a plan as HuggingFace-style safetensors shards plus an index, published together or not at all.

Naming: DST `NAME.safetensors.index.json` or `NAME.safetensors` gives shards `NAME-00001-of-0000N.safetensors`
and the index `NAME.safetensors.index.json` beside them. When everything fits in one shard and DST names a
`.safetensors` file, that one file is written at DST with no index (as `save_pretrained` does).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ckptx.errors import DestinationError
from ckptx.io.spans import Progress
from ckptx.io.write.atomic import publish, staging_folder, sync_file
from ckptx.io.write.destination import InputFiles
from ckptx.io.write.safetensors_writer import write_body
from ckptx.planning.entry import PlanEntry
from ckptx.planning.source import Source

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


def check_layout(layout: ShardLayout, *, force: bool, inputs: InputFiles) -> list[str]:
    """Refuse to write over an input file, a folder, or without `force` an existing file (ckptx/destination.py);
    returns notes about older shards of the same name left in place."""
    inputs.check_all(layout.paths + layout.replaces, force=force, what="an output shard or index")
    if layout.index is None or not layout.index.parent.is_dir():  # a new folder has no older shards
        return []
    stem = layout.index.name[: -len(INDEX_SUFFIX)]
    pattern = re.compile(re.escape(stem) + r"-\d{5}-of-\d{5}\.safetensors")
    ours = set(layout.paths)
    stale = sorted(p.name for p in layout.index.parent.iterdir() if pattern.fullmatch(p.name) and p not in ours)
    return [f"older shards left in place (not in the new index): {', '.join(stale)}"] if stale else []


def write_sharded(
    layout: ShardLayout,
    source: Source,
    metadata: Mapping[str, str],
    progress: Progress | None = None,
    check: Callable[[Path], None] | None = None,
) -> int:
    """Write every file of `layout` in a hidden staging folder, then publish them all, the index last.

    `check(staged_path)` may inspect the finished set first (the index, or the single file) and raise
    to publish nothing. A failure at any point leaves no file of the set under its final name.
    Returns the bytes written (shards and index).
    """
    first = layout.index or layout.files[0][0]
    with staging_folder(first) as stage:
        moves, total = stage_layout(stage, layout, source, metadata, progress)
        if check is not None:
            check(moves[-1][0])
        publish(moves, remove_first=[p for p in [layout.index, *layout.replaces] if p is not None])
    return total


def stage_layout(
    stage: Path, layout: ShardLayout, source: Source, metadata: Mapping[str, str], progress: Progress | None = None
) -> tuple[list[tuple[Path, Path]], int]:
    """Write every shard of `layout` (and its index, last) into the staging folder, each fsynced; returns the
    (staged, final) moves in publishing order and the bytes written."""
    moves, total = [], 0
    for final, group in layout.files:
        with open(stage / final.name, "wb") as out:
            write_body(out, group, source, metadata, progress)
            total += out.tell()
            sync_file(out)
        moves.append((stage / final.name, final))
    if layout.index is not None:
        total += stage_bytes(stage / layout.index.name, index_text(layout))
        moves.append((stage / layout.index.name, layout.index))
    return moves, total


def stage_bytes(path: Path, data: bytes) -> int:
    """Write `data` to a staged file and fsync it; returns its size."""
    with open(path, "wb") as out:
        out.write(data)
        sync_file(out)
    return len(data)


def index_text(layout: ShardLayout) -> bytes:
    """The index JSON as transformers writes it: `metadata.total_size` and a sorted key -> shard map."""
    weight_map = {entry.key: path.name for path, group in layout.files for entry in group}
    total = sum(entry.meta.nbytes for _, group in layout.files for entry in group)
    doc = {"metadata": {"total_size": total}, "weight_map": weight_map}
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode("utf-8")
