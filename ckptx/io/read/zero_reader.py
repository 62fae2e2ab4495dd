"""DeepSpeed ZeRO-2 / ZeRO-3 checkpoint folders as a lazy source of the fp32 state dict, without deepspeed.

A folder written by `engine.save_checkpoint(DIR)` holds `DIR/latest` (the tag), `DIR/zero_to_fp32.py` and
`DIR/<tag>/`: for ZeRO-2 `mp_rank_00_model_states.pt` and one `zero_pp_rank_<r>_mp_rank_00_optim_states.pt` per
rank, for ZeRO-3 a `zero_pp_rank_<r>_mp_rank_00_model_states.pt` and an optim-states file per rank. The
source's tensors are what `zero_to_fp32.py` (DeepSpeed 0.19.8, read beside this module's tests) writes, key for
key and in its order: the buffers (floats as float32), the frozen parameters, the trainable parameters rebuilt
from the fp32 partitions, then the names of shared (tied) parameters; the optimizer moments are skipped.

Every `.pt` file is a torch zip whose `data.pkl` is read as data (zero_pickle.py): tensors become byte ranges
of the file, never loaded; DeepSpeed's classes become inert stand-ins; any global outside the allow-list is
refused before anything is called. Neither deepspeed nor (until a tensor is loaded) torch is imported, and
`--allow-global` / `--unsafe-pickle` do not apply. ZeRO-1 folders take the ZeRO-2 path, as in zero_to_fp32.py.

Planning needs only the pickles. `load(key)` reads the byte ranges of one parameter from the partitions with
pread, so memory is bounded by one parameter:
- ZeRO-2: rank r's partition of param group g is one flat tensor; the group's full vector is the ranks'
  partitions end to end, and its parameters lie in `param_shapes[g]` order, each followed by its
  `param_alignment_paddings` entry when the checkpoint has them. The consumed count, rounded up to
  `2 * world_size`, must equal the vector's length rounded the same way (zero_to_fp32's check).
- ZeRO-3: every rank holds `ceil(numel / world_size)` elements of each parameter, at the same offset in the
  concatenation of its flat groups; the ranks' pieces end to end, cut to `numel`, are the parameter. The
  offsets summed over all parameters times the world size must equal the elements the flat groups hold.
A parameter that is one contiguous run of one file (ZeRO-2 inside one rank's partition, stored tensors) in
its output dtype has a `raw_span`, so writers copy it without decoding.
"""

from __future__ import annotations

import math
import os
import re
from bisect import bisect_right
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ckptx._lazy import lazy_module
from ckptx.dtypes import DTYPES, TensorMeta, torch_dtype
from ckptx.errors import SourceError, UnreadableFile
from ckptx.files import read_bounded
from ckptx.io.read.zero_pickle import Partition, PickledFile, Stored, describe, read_pickled
from ckptx.planning.source import RawSpan, Source
from ckptx.text import describe_key, quoted, shown, summary

if TYPE_CHECKING:  # pragma: no cover
    import torch
else:
    torch = lazy_module("torch")


__all__ = [
    "FlatRun",
    "Gathered",
    "Piece",
    "Sharded",
    "ZeroLayout",
    "ZeroSource",
    "is_zero_folder",
    "open_zero",
    "read_layout",
    "resolve_tag",
]


OUTPUT_FLOAT = "float32"  # zero_to_fp32.py writes every floating tensor as float32, other dtypes as they are
_OPTIM = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
_MODEL3 = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt$")
_MODEL2 = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
_AUTOEP_KEYS = ("ds_autoep_layers", "autoep_layers")


# ---------------------------------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class Piece:
    """`count` elements of `part` from element `first` on."""

    part: Partition
    first: int
    count: int

    def span(self) -> RawSpan:
        """Its bytes."""
        return self.part.span(self.first, self.count)


@dataclass(frozen=True, eq=False)
class FlatRun:
    """Partitions end to end: one ZeRO-2 group over the ranks, or one ZeRO-3 rank's flat groups."""

    parts: tuple[Partition, ...]
    starts: tuple[int, ...]  # the element each part starts at, then the total

    @classmethod
    def of(cls, parts: Sequence[Partition]) -> FlatRun:
        """The run of `parts` in order."""
        starts = [0]
        for part in parts:
            starts.append(starts[-1] + part.numel)
        return cls(tuple(parts), tuple(starts))

    @property
    def numel(self) -> int:
        """Elements in the run."""
        return self.starts[-1]

    def cut(self, offset: int, count: int) -> list[Piece]:
        """Elements [offset, offset + count) of the run, as pieces of its partitions."""
        pieces, end = [], offset + count
        i = max(bisect_right(self.starts, offset) - 1, 0)
        while i < len(self.parts) and self.starts[i] < end:
            lo, hi = max(offset, self.starts[i]), min(end, self.starts[i + 1])
            if lo < hi:
                pieces.append(Piece(self.parts[i], lo - self.starts[i], hi - lo))
            i += 1
        return pieces


def _first(pieces: Sequence[Piece], numel: int) -> tuple[Piece, ...]:
    """The first `numel` elements of `pieces` (drops the padding that ends the last rank's share)."""
    kept, left = [], numel
    for piece in pieces:
        if left <= 0:
            break
        kept.append(Piece(piece.part, piece.first, min(piece.count, left)))
        left -= piece.count
    return tuple(kept)


@dataclass(frozen=True)
class Gathered:
    """A tensor that is `pieces` of flat partitions end to end (ZeRO-2 trainable, ZeRO-3 frozen)."""

    pieces: tuple[Piece, ...]
    dtype: str
    shape: tuple[int, ...]
    stride: ClassVar[None] = None

    def spans(self) -> tuple[RawSpan, ...]:
        """The byte ranges, in order, whose concatenation is the tensor."""
        return tuple(p.span() for p in self.pieces if p.count)


@dataclass(frozen=True, eq=False)
class Sharded:
    """A ZeRO-3 trainable parameter: `share` elements at `offset` of each rank's run, ranks in order, cut to the shape.

    The pieces are worked out on use, so planning holds one small record per parameter whatever the world size.
    """

    ranks: tuple[FlatRun, ...]
    offset: int
    share: int
    dtype: str
    shape: tuple[int, ...]
    stride: ClassVar[None] = None

    def spans(self) -> tuple[RawSpan, ...]:
        """The byte ranges, in order, whose concatenation is the tensor."""
        pieces = [piece for run in self.ranks for piece in run.cut(self.offset, self.share)]
        return tuple(p.span() for p in _first(pieces, math.prod(self.shape)) if p.count)


Entry = Stored | Gathered | Sharded


@dataclass(frozen=True)
class ZeroLayout:
    """What the pickles of a ZeRO folder say: where it is, how it was sharded, and where each tensor lies."""

    tag_dir: str
    tag: str
    stage: int
    world_size: int
    ds_version: str | None
    partition_dtype: str
    flat_groups: int
    partition_numel: int
    entries: Mapping[str, Entry]
    counts: Mapping[str, int]

    def description(self) -> list[str]:
        """Lines for `ckptx inspect`."""
        c = self.counts
        return [
            f"DeepSpeed ZeRO-{self.stage} checkpoint, tag {self.tag}, world size {self.world_size}, "
            f"written by deepspeed {self.ds_version or '(unknown version)'}",
            f"fp32 partitions: {self.partition_dtype}, {self.world_size} ranks x {self.flat_groups} flat group(s), "
            f"{self.partition_numel:,} elements on disk",
            f"state dict: {c['trainable']} trainable + {c['frozen']} frozen parameters, {c['buffers']} buffers, "
            f"{c['shared']} shared name(s); optimizer moments skipped",
        ]


# ---------------------------------------------------------------------------------------------------- folder


MAX_LATEST = 4096  # bytes of `latest`: DeepSpeed writes the tag and nothing else
_TAG = re.compile(r"[A-Za-z0-9_.+=@,:-]{1,200}")


def is_zero_folder(path: Path) -> bool:
    """A DeepSpeed checkpoint folder: it holds `latest` (in any form: what it is is checked when it is read), or
    `*_model_states.pt` and `*_optim_states.pt` files."""
    if not path.is_dir():
        return False
    latest = path / "latest"
    if latest.exists() or latest.is_symlink():
        return True
    names = [p.name for p in path.iterdir()]
    return any(n.endswith("_model_states.pt") for n in names) and any(n.endswith("_optim_states.pt") for n in names)


def resolve_tag(path: Path) -> tuple[Path, str]:
    """The tag folder and tag: `path/<latest>` when `path` holds `latest`, else `path` itself.

    `latest` is read as the checkpoint's own file: a regular file of at most MAX_LATEST bytes, inside the folder
    (a symlink to a file elsewhere is refused unread). What it holds is shown only when it is a tag name (letters,
    digits and `_.+=@,:-`); anything else is described by its size, so a message never shows another file's text.
    """
    latest = path / "latest"
    if not (latest.exists() or latest.is_symlink()):
        return path, path.name
    shown_latest = str(latest)
    _check_inside(latest, path, shown_latest)
    try:
        raw = read_bounded(latest, shown_latest, MAX_LATEST, "a DeepSpeed `latest` file")
    except UnreadableFile as exc:
        raise SourceError(f"{exc}; it should hold the tag, e.g. global_step10") from None
    try:
        tag = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        tag = None
    if tag is None or not _TAG.fullmatch(tag) or tag in (".", ".."):
        raise SourceError(
            f"{shown_latest}: holds {len(raw)} bytes that are not a tag folder name (letters, digits and "
            f"_.+=@,:- on one line); write the tag (e.g. global_step10) or give the tag folder itself"
        )
    tag_dir = path / tag
    if not tag_dir.is_dir():
        raise SourceError(
            f"{shown_latest}: names tag '{tag}' but {tag_dir} is not a folder; the checkpoint was not "
            f"saved completely: give an existing tag folder or fix `latest`"
        )
    return tag_dir, tag


def _check_inside(latest: Path, folder: Path, shown: str) -> None:
    """`latest` (a symlink followed) lies in the checkpoint folder; it is not read when it does not."""
    try:
        inside = latest.resolve().parent == folder.resolve()
    except (OSError, RuntimeError):  # a symlink loop: Python 3.11 raises RuntimeError
        inside = False
    if not inside:
        raise SourceError(
            f"{shown}: is a symlink to a file outside the checkpoint folder; ckptx reads the `latest` DeepSpeed "
            f"wrote beside the tag folders only (not read): give the tag folder itself"
        )


def _rank_files(tag_dir: Path, pattern: re.Pattern[str], kind: str, world_size: int) -> list[Path]:
    """The files `pattern` matches, one per rank 0..world_size-1 (model parallel rank 00 only)."""
    found: dict[int, Path] = {}
    for child in sorted(tag_dir.iterdir()):
        match = pattern.match(child.name)
        if not match:
            continue
        if int(match.group(match.lastindex or 1)) != 0:
            raise SourceError(
                f"{child}: a model-parallel rank other than 00; tensor/pipeline parallel ZeRO "
                f"checkpoints are not supported: convert them with DeepSpeed's ds_to_universal.py"
            )
        rank = int(match.group(1)) if (match.lastindex or 0) > 1 else 0
        if rank in found:
            raise SourceError(
                f"{tag_dir}: two {kind} files for rank {rank} ({found[rank].name}, {child.name}); remove the stale one"
            )
        found[rank] = child
    if len(found) != world_size or any(r not in found for r in range(world_size)):
        missing = [r for r in range(world_size) if r not in found]
        if missing:
            raise SourceError(
                f"{tag_dir}: no {kind} file for rank {missing[0]} ({len(missing)} of {world_size} "
                f"ranks missing); copy every rank's files of this tag"
            )
        raise SourceError(
            f"{tag_dir}: {len(found)} {kind} files for world size {world_size} (ranks "
            f"{sorted(found)}); files of another run are mixed in: remove the extra ranks"
        )
    return [found[r] for r in range(world_size)]


def _optim_files(tag_dir: Path) -> list[Path]:
    names = sorted(p for p in tag_dir.iterdir() if p.name.endswith("_optim_states.pt"))
    if not names:
        raise SourceError(
            f"{tag_dir}: no *_optim_states.pt files; not a ZeRO checkpoint folder (give the folder "
            f"holding `latest`, or a tag folder)"
        )
    odd = [p for p in names if not _OPTIM.match(p.name)]
    if odd:
        raise SourceError(
            f"{odd[0]}: not a ZeRO optimizer file name (zero_pp_rank_<r>_mp_rank_00_optim_states.pt); "
            f"MoE and pipeline checkpoints are not supported"
        )
    return names


# ---------------------------------------------------------------------------------------------------- parsing


def _key(pickled: PickledFile, mapping: Any, key: str, where: str) -> Any:
    if not isinstance(mapping, Mapping) or key not in mapping:
        raise SourceError(
            f"{pickled.file}: no {quoted(key)} in {where}; not a DeepSpeed ZeRO checkpoint file "
            f"(or written by a DeepSpeed this reader does not know)"
        )
    return mapping[key]


_MAX_NUMEL = 2**63 - 1  # torch sizes are int64


def _shape(pickled: PickledFile, value: Any, where: str) -> tuple[int, ...]:
    if (
        not isinstance(value, tuple)
        or not all(type(d) is int and 0 <= d <= _MAX_NUMEL for d in value)
        or math.prod(value) > _MAX_NUMEL
    ):
        raise SourceError(f"{pickled.file}: {where} is {describe(value)}, not a shape")
    return tuple(value)


def _named(pickled: PickledFile, mapping: Mapping[Any, Any], where: str) -> list[tuple[str, Any]]:
    """The items of a name -> value dict of the pickle; a name that is not a string is refused by its description."""
    for name in mapping:
        if not isinstance(name, str):
            raise SourceError(
                f"{pickled.file}: {where} has the key {describe_key(name)}, not a parameter name; the file is not "
                f"a ZeRO checkpoint DeepSpeed wrote"
            )
    return list(mapping.items())


def _zero_stage(pickled: PickledFile, files: int) -> tuple[int, int]:
    """(stage, world size) from one optim-states file; the world size is at most `files`, the optim-states files
    of the tag folder (one per rank), so a corrupt count is refused before anything is sized by it."""
    osd = _key(pickled, pickled.obj, "optimizer_state_dict", "the top level")
    stage = _key(pickled, osd, "zero_stage", "optimizer_state_dict")
    count = _key(pickled, osd, "partition_count", "optimizer_state_dict")
    counts = count if isinstance(count, list) else [count]
    if not isinstance(stage, int) or isinstance(stage, bool) or stage not in (1, 2, 3):
        raise SourceError(
            f"{pickled.file}: optimizer_state_dict.zero_stage is {summary(stage)}; only ZeRO stages 1-3 exist"
        )
    if not counts or not all(type(c) is int and c > 0 for c in counts):
        raise SourceError(f"{pickled.file}: optimizer_state_dict.partition_count is {summary(count)}, not a world size")
    world_size = max(counts)
    if world_size > files:
        raise SourceError(
            f"{pickled.file}: optimizer_state_dict.partition_count says {summary(world_size)} ranks but the tag "
            f"folder holds {files} optimizer file(s); copy every rank's files of this tag (or the file is corrupt)"
        )
    return int(stage), world_size


def _partitions(optims: Sequence[PickledFile], key: str) -> list[list[Partition]]:
    """Per rank, its flat fp32 partitions (`key` in its optimizer_state_dict), checked for one dtype."""
    table = []
    for pickled in optims:
        osd = pickled.obj["optimizer_state_dict"]
        groups = _key(pickled, osd, key, "optimizer_state_dict")
        if not isinstance(groups, list) or not groups:
            raise SourceError(
                f"{pickled.file}: optimizer_state_dict.{key} is {describe(groups)}, not a list of tensors"
            )
        table.append([pickled.partition(ref, f"optimizer_state_dict.{key}[{i}]") for i, ref in enumerate(groups)])
    dtypes = {p.dtype for parts in table for p in parts}
    if len(dtypes) != 1 or not all(d in DTYPES and DTYPES[d].is_floating for d in dtypes):
        raise SourceError(
            f"{optims[0].file}: the fp32 partitions have dtypes {sorted(dtypes)}; expected one float dtype"
        )
    counts = {len(parts) for parts in table}
    if len(counts) != 1:
        raise SourceError(
            f"{optims[-1].file}: holds {len(table[-1])} flat groups, rank 0 holds {len(table[0])}; the "
            f"rank files come from different runs"
        )
    return table


def _param_shapes(pickled: PickledFile) -> list[list[tuple[str, tuple[int, ...]]]]:
    groups = _key(pickled, pickled.obj, "param_shapes", "the top level")
    if not isinstance(groups, list) or not all(isinstance(g, Mapping) for g in groups):
        raise SourceError(f"{pickled.file}: param_shapes is {describe(groups)}, not a list of name -> shape dicts")
    return [
        [
            (name, _shape(pickled, shape, f"param_shapes[{i}][{quoted(name)}]"))
            for name, shape in _named(pickled, group, f"param_shapes[{i}]")
        ]
        for i, group in enumerate(groups)
    ]


@dataclass(frozen=True)
class _ModelStates:
    """What zero_to_fp32.py's parse_model_states keeps of the rank-0 model-states file."""

    buffers: tuple[tuple[str, Stored], ...]
    frozen_shapes: tuple[tuple[str, tuple[int, ...]], ...]
    shared: tuple[tuple[str, str], ...]
    ds_version: str | None


def _model_states(pickled: PickledFile) -> _ModelStates:
    """The buffers, frozen shapes, shared names and version of one model-states file (AutoEP refused as zero_to_fp32
    does)."""
    obj = pickled.obj
    for key in _AUTOEP_KEYS:
        layers = obj.get(key)
        if isinstance(layers, list) and any(
            isinstance(e, Mapping) and e.get("checkpoint_format") == "zero3_partitioned" for e in layers
        ):
            raise SourceError(
                f"{pickled.file}: an AutoEP ZeRO-3 partition-native checkpoint ({key}); its experts are "
                f"partitioned over expert groups: convert it with DeepSpeed's ds_to_universal.py"
            )
    names = _key(pickled, obj, "buffer_names", "the top level")
    module = _key(pickled, obj, "module", "the top level")
    if not isinstance(names, list) or not isinstance(module, Mapping):
        raise SourceError(f"{pickled.file}: buffer_names or module has the wrong type; not a model-states file")
    wanted = {name for name in names if isinstance(name, str)}
    buffers = tuple(
        (k, pickled.stored(v, f"module[{quoted(k)}]")) for k, v in _named(pickled, module, "module") if k in wanted
    )
    frozen = obj.get("frozen_param_shapes")
    if frozen is not None and not isinstance(frozen, Mapping):
        raise SourceError(f"{pickled.file}: frozen_param_shapes is {describe(frozen)}, not a name -> shape dict")
    frozen_shapes = tuple(
        (k, _shape(pickled, v, f"frozen_param_shapes[{quoted(k)}]"))
        for k, v in _named(pickled, frozen or {}, "frozen_param_shapes")
    )
    shared = _key(pickled, obj, "shared_params", "the top level")
    if not isinstance(shared, Mapping):
        raise SourceError(f"{pickled.file}: shared_params is {describe(shared)}, not a name -> name dict")
    aliases = _named(pickled, shared, "shared_params")
    if not all(isinstance(v, str) for _, v in aliases):
        raise SourceError(f"{pickled.file}: shared_params maps a name to something else than a parameter name")
    version = obj.get("ds_version")
    return _ModelStates(
        buffers,
        frozen_shapes,
        tuple(aliases),
        shown(version[:40]) if isinstance(version, str) else None,  # informational: anything else is unknown
    )


def _fragments(pickled: PickledFile) -> Mapping[str, Any]:
    fragments = pickled.obj.get("frozen_param_fragments")
    if not isinstance(fragments, Mapping):
        raise SourceError(
            f"{pickled.file}: frozen_param_shapes lists frozen parameters but frozen_param_fragments is "
            f"{describe(fragments)}; the file is incomplete"
        )
    return fragments


def _fragment(pickled: PickledFile, name: str) -> Any:
    fragments = _fragments(pickled)
    if name not in fragments:
        raise SourceError(
            f"{pickled.file}: frozen_param_fragments has no {quoted(name)}, which frozen_param_shapes lists"
        )
    return fragments[name]


def _output_dtype(dtype: str) -> str:
    return OUTPUT_FLOAT if dtype in DTYPES and DTYPES[dtype].is_floating else dtype


def _zero2_entries(
    shapes: list[list[tuple[str, tuple[int, ...]]]],
    table: list[list[Partition]],
    paddings: Any,
    file: str,
    model_file: str,
) -> Iterator[tuple[str, Entry]]:
    """ZeRO-1/2 trainable parameters: `_zero2_merge_trainable_params`'s walk over each group's full vector."""
    world_size, groups = len(table), len(table[0])
    if len(shapes) != groups:
        raise SourceError(
            f"{model_file}: param_shapes has {len(shapes)} groups but the optimizer files hold "
            f"{groups} flat partitions per rank; the sizes do not add up"
        )
    if paddings is not None and (not isinstance(paddings, list) or len(paddings) != groups):
        raise SourceError(
            f"{file}: optimizer_state_dict.param_alignment_paddings is {describe(paddings)}, not one "
            f"list per param group ({groups})"
        )
    for g, group in enumerate(shapes):
        run = FlatRun.of([table[r][g] for r in range(world_size)])
        pads = _group_paddings(paddings[g] if paddings is not None else None, len(group), g, file)
        offset = 0
        for i, (name, shape) in enumerate(group):
            numel = math.prod(shape)
            if offset + numel > run.numel:
                raise SourceError(
                    f"{model_file}: param_shapes[{g}][{quoted(name)}] ends at element {offset + numel} of "
                    f"group {g}, whose partitions hold {run.numel}; the sizes do not add up"
                )
            yield name, Gathered(tuple(run.cut(offset, numel)), run.parts[0].dtype, shape)
            offset += numel + pads[i]
        _check_zero2_total(offset, run.numel, world_size, g, model_file)


def _group_paddings(pads: Any, params: int, group: int, file: str) -> list[int]:
    """One group's `param_alignment_paddings` (all 0 when the checkpoint has none, as older DeepSpeed wrote)."""
    if pads is None:
        return [0] * params
    if (
        not isinstance(pads, list)
        or len(pads) != params
        or not all(type(x) is int and 0 <= x <= _MAX_NUMEL for x in pads)
    ):
        raise SourceError(
            f"{file}: optimizer_state_dict.param_alignment_paddings[{group}] is {describe(pads)} for "
            f"the {params} parameters of group {group}; the sizes do not add up"
        )
    return pads


def _check_zero2_total(offset: int, avail: int, world_size: int, group: int, model_file: str) -> None:
    """zero_to_fp32's sanity check: both counts rounded up to `2 * world_size` (DeepSpeed's padding) agree."""
    align = 2 * world_size
    consumed, held = align * math.ceil(offset / align), align * math.ceil(avail / align)
    if consumed != held:
        raise SourceError(
            f"{model_file}: group {group}'s parameters consume {offset} elements but its partitions "
            f"hold {avail} (aligned to {align}: {consumed} vs {held}); the sizes do not add up"
        )


def _zero3_entries(
    shapes: list[list[tuple[str, tuple[int, ...]]]], table: list[list[Partition]], model_file: str
) -> Iterator[tuple[str, Entry]]:
    """ZeRO-3 trainable parameters: `_zero3_merge_trainable_params` / GatheredTensor, one parameter at a time."""
    sizes = [p.numel for p in table[0]]
    for parts in table:
        if [p.numel for p in parts] != sizes:
            raise SourceError(
                f"{parts[0].file}: flat groups of {[p.numel for p in parts]} elements, rank 0 has "
                f"{sizes}; the rank files come from different runs"
            )
    ranks = tuple(FlatRun.of(parts) for parts in table)
    held, offset = ranks[0].numel, 0
    for name, shape in (item for group in shapes for item in group):
        share = math.ceil(math.prod(shape) / len(ranks))
        yield name, Sharded(ranks, offset, share, ranks[0].parts[0].dtype, shape)
        offset += share
    if offset != held:  # exact: zero_to_fp32's check (no entry past the end survives it)
        raise SourceError(
            f"{model_file}: the parameters of param_shapes take {offset} elements of every rank but "
            f"its flat groups hold {held}; the sizes do not add up"
        )


def _zero3_frozen(name: str, shape: tuple[int, ...], models: Sequence[PickledFile]) -> Gathered:
    """A ZeRO-3 frozen parameter: every rank's fragment end to end, cut to its numel (`_zero3_merge_frozen_params`)."""
    run = FlatRun.of([m.partition(_fragment(m, name), f"frozen_param_fragments[{quoted(name)}]") for m in models])
    numel = math.prod(shape)
    if run.numel < numel or len({p.dtype for p in run.parts}) != 1:
        raise SourceError(
            f"{models[0].file}: frozen_param_fragments[{quoted(name)}] hold {run.numel} elements over the "
            f"ranks, the shape {list(shape)} needs {numel}; the sizes do not add up"
        )
    return Gathered(tuple(run.cut(0, numel)), run.parts[0].dtype, shape)


def _zero2_frozen(name: str, shape: tuple[int, ...], model: PickledFile) -> Stored:
    """A ZeRO-1/2 frozen parameter: stored whole in the model-states file (`_zero2_merge_frozen_params`)."""
    stored = model.stored(_fragment(model, name), f"frozen_param_fragments[{quoted(name)}]")
    if stored.shape != shape:
        raise SourceError(
            f"{model.file}: frozen_param_fragments[{quoted(name)}] has shape {list(stored.shape)} but "
            f"frozen_param_shapes says {list(shape)}; the sizes do not add up"
        )
    return stored


def read_layout(path: Path) -> ZeroLayout:
    """Parse a ZeRO folder (the one holding `latest`, or a tag folder) from its pickles alone."""
    tag_dir, tag = resolve_tag(path)
    optim_paths = _optim_files(tag_dir)
    first = read_pickled(optim_paths[0])
    stage, world_size = _zero_stage(first, len(optim_paths))
    optim_paths = _rank_files(tag_dir, _OPTIM, "*_optim_states.pt", world_size)
    optims = [first if p == optim_paths[0] else read_pickled(p) for p in optim_paths]
    for pickled in optims[1:]:
        if _zero_stage(pickled, len(optim_paths)) != (stage, world_size):
            raise SourceError(
                f"{pickled.file}: ZeRO stage/world size {_zero_stage(pickled, len(optim_paths))}, rank 0 says "
                f"{(stage, world_size)}; the rank files come from different runs"
            )
    if stage <= 2:
        model_paths = _rank_files(tag_dir, _MODEL2, "mp_rank_*_model_states.pt", 1)
        if any(_MODEL3.match(p.name) for p in tag_dir.iterdir()):
            raise SourceError(
                f"{tag_dir}: holds ZeRO-3 model-states files next to a ZeRO-{stage} checkpoint; "
                f"files of another run are mixed in"
            )
    else:
        model_paths = _rank_files(tag_dir, _MODEL3, "zero_pp_rank_*_model_states.pt", world_size)
        if any(_MODEL2.match(p.name) for p in tag_dir.iterdir()):
            raise SourceError(
                f"{tag_dir}: holds a ZeRO-2 mp_rank_00_model_states.pt next to a ZeRO-3 checkpoint; "
                f"files of another run are mixed in"
            )
    models = [read_pickled(p) for p in model_paths]
    return _layout(tag_dir, tag, stage, world_size, optims, models)


def _layout(
    tag_dir: Path, tag: str, stage: int, world_size: int, optims: list[PickledFile], models: list[PickledFile]
) -> ZeroLayout:
    """The entries in zero_to_fp32.py's order: buffers, frozen, trainable, then shared names."""
    rank0 = _model_states(models[0])
    for other in models[1:]:  # zero_to_fp32 parses (and so checks) every rank's model states
        _model_states(other)
    shapes = _param_shapes(models[0])
    key = "single_partition_of_fp32_groups" if stage <= 2 else "fp32_flat_groups"
    table = _partitions(optims, key)
    entries: dict[str, Entry] = dict(rank0.buffers)
    for name, shape in rank0.frozen_shapes:
        entries[name] = _zero2_frozen(name, shape, models[0]) if stage <= 2 else _zero3_frozen(name, shape, models)
    if stage <= 2:
        paddings = optims[0].obj["optimizer_state_dict"].get("param_alignment_paddings")
        trainable = dict(_zero2_entries(shapes, table, paddings, optims[0].file, models[0].file))
    else:
        trainable = dict(_zero3_entries(shapes, table, models[0].file))
    entries.update(trainable)
    shared = [(alias, name) for alias, name in rank0.shared if name in entries]
    for alias, name in shared:
        entries[alias] = entries[name]
    counts = {
        "trainable": len(trainable),
        "frozen": len(rank0.frozen_shapes),
        "buffers": len(rank0.buffers),
        "shared": len(shared),
    }
    return ZeroLayout(
        str(tag_dir),
        tag,
        stage,
        world_size,
        rank0.ds_version,
        table[0][0].dtype,
        len(table[0]),
        sum(p.numel for parts in table for p in parts),
        entries,
        counts,
    )


# ---------------------------------------------------------------------------------------------------- source


class ZeroSource(Source):
    """A DeepSpeed ZeRO-1/2/3 folder as the fp32 state dict zero_to_fp32.py writes; see the module docstring."""

    def __init__(self, layout: ZeroLayout, display: str) -> None:
        super().__init__(
            path=display,
            format=f"deepspeed-zero{layout.stage}",
            tensors={k: TensorMeta(e.shape, _output_dtype(e.dtype)) for k, e in layout.entries.items()},
            extracted_from=".",
            description=layout.description(),
        )
        self.layout = layout
        self._fds: dict[str, int] = {}

    def raw_span(self, key: str) -> RawSpan | None:
        """The parameter's bytes when they are one run of one file, in the output dtype; else None."""
        spans = self.raw_spans(key)
        return spans[0] if spans is not None and len(spans) == 1 else None

    def raw_spans(self, key: str) -> tuple[RawSpan, ...] | None:
        """The parameter's bytes in the output dtype as runs of the rank files, in order (a parameter split
        across ranks has one run in each), so writers copy them without decoding; None when they are strided
        or need a cast (bf16/fp16 buffers come out as float32)."""
        entry = self.layout.entries[key]
        if entry.stride is not None or _output_dtype(entry.dtype) != entry.dtype:
            return None
        return entry.spans()

    def load(self, key: str) -> torch.Tensor:
        """The tensor as zero_to_fp32.py writes it, read from only its byte ranges (floats as float32)."""
        entry = self.layout.entries[key]
        spans = entry.spans()
        data = torch.empty(sum(s.nbytes for s in spans), dtype=torch.uint8)
        view, done = data.numpy().data, 0
        for span in spans:
            self._pread(span, view[done : done + span.nbytes])
            done += span.nbytes
        tensor = data.view(torch_dtype(entry.dtype))
        if entry.stride is not None:
            tensor = tensor.as_strided(entry.shape, entry.stride).contiguous()
        tensor = tensor.reshape(entry.shape)
        wanted = _output_dtype(entry.dtype)
        return tensor if wanted == entry.dtype else tensor.to(torch_dtype(wanted))

    def _pread(self, span: RawSpan, into: memoryview) -> None:
        fd = self._fds.get(span.file)
        if fd is None:
            fd = self._fds[span.file] = os.open(span.file, os.O_RDONLY)
        done = 0
        while done < span.nbytes:
            got = os.preadv(fd, [into[done:]], span.offset + done)
            if got <= 0:
                raise SourceError(
                    f"{span.file}: ended at byte {span.offset + done} while reading {span.nbytes} "
                    f"bytes at {span.offset}; the partition is truncated or the file changed"
                )
            done += got

    def close(self) -> None:
        """Close the rank files."""
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)


def open_zero(path: str | Path, display: str | None = None) -> ZeroSource:
    """Open a DeepSpeed ZeRO checkpoint folder (holding `latest`, or a tag folder) as a lazy source."""
    return ZeroSource(read_layout(Path(path)), display or str(path))
