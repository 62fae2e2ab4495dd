"""HuggingFace sharded checkpoints (`*.safetensors.index.json`, `pytorch_model.bin.index.json`) as one source."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from ckptx._lazy import lazy_module
from ckptx.dtypes import TensorMeta
from ckptx.errors import SourceError
from ckptx.files import MAX_INDEX, read_bounded
from ckptx.planning.source import RawSpan, Source
from ckptx.text import quoted, summary

if TYPE_CHECKING:  # pragma: no cover
    import torch
else:
    torch = lazy_module("torch")


def read_index(path: Path, shown: str) -> tuple[dict[str, str], dict[str, Any]]:
    """The index's weight map (key -> shard file name) and its metadata, checked for shape."""
    raw = read_bounded(path, shown, MAX_INDEX, "a shard index")
    try:
        doc = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise SourceError(
            f"{shown}: not a valid shard index: not UTF-8 (byte {exc.start}); download it again"
        ) from None
    except json.JSONDecodeError as exc:
        raise SourceError(
            f"{shown}: not a valid shard index: not JSON ({exc.msg} at byte {exc.pos}); download it again"
        ) from None
    except ValueError:  # an integer of more than 4,300 digits
        raise SourceError(
            f"{shown}: not a valid shard index: it holds a number out of range; download it again"
        ) from None
    except RecursionError:
        raise SourceError(f"{shown}: not a valid shard index: it nests too deeply; download it again") from None
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise SourceError(f'{shown}: not a valid shard index: needs a "weight_map" object of key -> shard file name')
    metadata = doc.get("metadata") or {}
    return weight_map, metadata if isinstance(metadata, dict) else {}


class ShardedSource(Source):
    """A sharded checkpoint read through its index: every shard opened lazily, keys in shard order.

    Only keys listed in the index are part of the checkpoint; a shard's other tensors are ignored.
    `open_shard` opens one shard file (`open_source`, passed in so that this module does not import it back).
    `load` and `raw_span` go to the shard that holds the key.
    """

    def __init__(
        self,
        path: Path,
        display: str | None,
        open_shard: Callable[..., Source],
        extract_paths: Sequence[str] = (),
        *,
        allow_globals: Sequence[str] = (),
        unsafe_pickle: bool = False,
    ) -> None:
        shown = display or str(path)
        weight_map, index_metadata = read_index(path, shown)
        by_shard: dict[str, list[str]] = {}
        for key, shard_name in weight_map.items():
            by_shard.setdefault(shard_name, []).append(key)
        self._shards: list[Source] = []
        self._owner: dict[str, Source] = {}
        tensors: dict[str, TensorMeta] = {}
        try:
            for name, keys in by_shard.items():
                shard = open_shard(
                    _shard_path(path, name, shown),
                    extract_paths,
                    allow_globals=allow_globals,
                    unsafe_pickle=unsafe_pickle,
                    where=f"shard of {shown}",
                )
                self._shards.append(shard)
                absent = [k for k in keys if k not in shard.tensors]
                if absent:
                    raise SourceError(
                        f"{shown}: key {quoted(absent[0])} is listed for shard {quoted(name)} but that shard has "
                        f"no such tensor ({len(absent)} such key(s)); the index does not match its shards: "
                        f"re-download them or regenerate the index"
                    )
                listed = set(keys)
                for key, meta in shard.tensors.items():
                    if key in listed:
                        tensors[key] = meta
                        self._owner[key] = shard
        except BaseException:
            self.close()
            raise
        first = self._shards[0] if self._shards else None
        super().__init__(
            path=shown,
            format=f"sharded-{first.format if first else 'empty'}",
            tensors=tensors,
            non_tensors={k: v for s in self._shards for k, v in s.non_tensors.items()},
            extracted_from=first.extracted_from if first else ".",
            file_metadata={
                **(first.file_metadata if first else {}),
                **{k: v if isinstance(v, str) else summary(v) for k, v in index_metadata.items()},
            },
        )

    def load(self, key: str) -> torch.Tensor:
        """The tensor, from the shard that holds it."""
        return self._owner[key].load(key)

    def raw_span(self, key: str) -> RawSpan | None:
        """Where the tensor's bytes lie in its shard file, when they can be copied as they are."""
        return self._owner[key].raw_span(key)

    def close(self) -> None:
        """Close every shard."""
        for shard in getattr(self, "_shards", []):
            shard.close()
        self._shards = []
        self._owner = {}


def _shard_path(index: Path, name: str, shown: str) -> Path:
    """The shard file `name` beside the index; names that leave the index's folder are refused."""
    parts = PurePosixPath(name).parts
    if not parts or PurePosixPath(name).is_absolute() or ".." in parts or "\\" in name:
        raise SourceError(
            f"{shown}: shard name {quoted(name)} is not a file name inside the index's folder; fix the index"
        )
    if name.endswith(".index.json"):
        # An index naming itself or another index would be opened again and again (RecursionError).
        raise SourceError(
            f"{shown}: shard {quoted(name)} is itself an index; an index lists weight files only: fix the index"
        )
    path = index.parent.joinpath(*parts)
    if not path.exists():
        raise SourceError(
            f"{shown}: shard {quoted(name)} is missing (expected at {path}); download it or fix the index"
        )
    return path
