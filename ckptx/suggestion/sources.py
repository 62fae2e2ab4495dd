"""Where the weights are: every mapping of tensors in a checkpoint, the one that best fits the target, and the
wrapper prefixes (`module.`, `_orig_mod.`, a Lightning attribute) to strip or add."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptx.dtypes import TensorMeta, dtype_name
from ckptx.errors import SourceError
from ckptx.io.manifest import read_manifest
from ckptx.io.read.open import sniff_format
from ckptx.io.read.state_dict import is_tensor
from ckptx.io.read.torch_reader import load_object_tree
from ckptx.suggestion.shapes import loose_shape

__all__ = [
    "Candidate",
    "Prefixes",
    "choose_candidate",
    "find_candidates",
    "infer_prefixes",
    "manifest_source",
    "natural_order",
    "read_manifest_fast",
]

# Preferred when candidates fit equally well (the usual names first, EMA copies last).
_PREFERRED = ("state_dict", "model", "module", ".", "net", "network", "weights", "params")


@dataclass(frozen=True)
class Candidate:
    """One mapping of tensors in the checkpoint: its extract path and its tensors' metadata, in order."""

    path: str
    tensors: Mapping[str, TensorMeta]


def read_manifest_fast(path: Path) -> dict[str, TensorMeta]:
    """A manifest's tensors; JSON ones are read with the json module (100,000 keys in a fraction of a second)."""
    if path.suffix == ".json":
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            tensors = doc["tensors"]
            if all(type(d) is int for v in tensors.values() for d in v["shape"]):
                return {str(k): TensorMeta(tuple(v["shape"]), v.get("dtype", "float32")) for k, v in tensors.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass  # the reader below gives the precise message
    return read_manifest(path)


def find_candidates(
    path: str, *, allow_globals: Sequence[str] = (), unsafe_pickle: bool = False
) -> tuple[str, list[Candidate], Any]:
    """(format, candidates, the opened source when there is only one place to look, else None): every
    string-keyed mapping holding tensors, found from metadata only."""
    p = Path(path)
    if not p.exists():
        raise SourceError(f"{path}: no such file")
    if p.is_dir():  # a model folder, DCP or ZeRO: opened as the one state dict it holds
        from ckptx.io.read.open import open_source

        source = open_source(p, allow_globals=allow_globals, unsafe_pickle=unsafe_pickle)
        return source.format, [Candidate(source.extracted_from, source.tensors)], source
    if p.suffix in (".json", ".yaml", ".yml") and not p.name.endswith(".index.json"):
        tensors = read_manifest_fast(p)
        return "manifest", [Candidate(".", tensors)], manifest_source(path, tensors)
    fmt = sniff_format(p)
    if fmt in ("safetensors", "sharded-index"):
        from ckptx.io.read.open import open_source

        source = open_source(p)
        return fmt, [Candidate(".", source.tensors)], source
    tree = load_object_tree(str(p), allow_globals=tuple(allow_globals), unsafe_pickle=unsafe_pickle)
    found = list(_walk(tree, ".", 0))
    if not found:
        top = ", ".join(map(str, tree.keys())) if isinstance(tree, Mapping) else type(tree).__name__
        raise SourceError(f"{path}: holds no mapping of tensors (top level: {top}); is it a checkpoint?")
    return fmt, found, None


def manifest_source(path: str, tensors: Mapping[str, TensorMeta]) -> Any:
    """A manifest as a source: metadata only, enough to plan (converting needs the real checkpoint)."""
    from ckptx.io.read.state_dict import MappingSource

    return MappingSource(path, "manifest", {k: _Described(m) for k, m in tensors.items()})


class _Described:
    """Stands for a tensor that only a manifest describes."""

    is_tensor_ref = True

    def __init__(self, meta: TensorMeta) -> None:
        self.shape, self.dtype = meta.shape, meta.dtype
        self.size = tuple(meta.shape)
        strides, step = [], 1
        for dim in reversed(self.size):
            strides.append(step)
            step *= max(dim, 1)
        self.stride = tuple(reversed(strides))  # contiguous: a described tensor overlaps nothing


def _walk(obj: Any, path: str, depth: int) -> Iterator[Candidate]:
    if not isinstance(obj, Mapping) or depth > 5:
        return
    tensors = {k: _meta(v) for k, v in obj.items() if isinstance(k, str) and is_tensor(v)}
    if tensors:
        yield Candidate(path, tensors)
    for key, value in obj.items():
        if isinstance(key, str) and isinstance(value, Mapping) and "." not in key:
            yield from _walk(value, key if path == "." else f"{path}.{key}", depth + 1)


def _meta(value: Any) -> TensorMeta:
    dtype = value.dtype if isinstance(value.dtype, str) else dtype_name(value.dtype)
    return TensorMeta(tuple(int(d) for d in value.shape), dtype or "float32")


def choose_candidate(
    candidates: Sequence[Candidate], target: Mapping[str, TensorMeta]
) -> tuple[Candidate, list[tuple[Candidate, float]], float]:
    """The candidate whose tensors best fit the target's (shapes, then count), its close rivals, and its fit."""
    want = Counter(loose_shape(m.shape) for m in target.values())

    def fit_of(c: Candidate) -> float:
        have = Counter(loose_shape(m.shape) for m in c.tensors.values())
        return sum((have & want).values()) / max(len(c.tensors), len(target), 1)

    def preference(c: Candidate) -> tuple[int, int]:
        name = c.path.rsplit(".", 1)[-1]
        ema = 1 if re.search(r"ema", c.path, re.IGNORECASE) else 0
        return ema, _PREFERRED.index(name) if name in _PREFERRED else len(_PREFERRED)

    scored = sorted(((fit_of(c), c) for c in candidates), key=lambda fc: (-round(fc[0], 2), preference(fc[1])))
    best_fit, best = scored[0]
    rivals = [(c, f) for f, c in scored[1:] if f >= best_fit - 0.02 and f > 0]
    return best, rivals, best_fit


@dataclass(frozen=True)
class Prefixes:
    """Leading components every source key has and the target lacks (stripped), and the reverse (added)."""

    strip: tuple[str, ...] = ()
    add: tuple[str, ...] = ()

    @property
    def strip_text(self) -> str:
        """The stripped prefix as text (`module._orig_mod.`)."""
        return "".join(p + "." for p in self.strip)

    @property
    def add_text(self) -> str:
        """The added prefix as text (`backbone.`)."""
        return "".join(p + "." for p in self.add)


def _common(keys: Sequence[str]) -> list[str]:
    """The leading components every key shares, each key keeping at least one more."""
    if not keys:
        return []
    shared = os.path.commonprefix([min(keys), max(keys)])
    parts = shared.split(".")[:-1]  # only whole components (the last piece may be cut)
    shortest = min(k.count(".") for k in keys)
    return parts[:shortest]


def infer_prefixes(source: Sequence[str], target: Sequence[str]) -> Prefixes:
    """Wrapper prefixes: `module.` + plain keys against plain keys strips `module.`; the reverse adds it.

    A shared leading part of both (`module.backbone.` against `backbone.`) stays; a component is stripped
    only if no target key starts with it, and added only if no source key does.
    """
    ps, pt = _common(source), _common(target)
    k = 0
    for n in range(min(len(ps), len(pt)), 0, -1):
        if ps[len(ps) - n :] == pt[:n]:
            k = n
            break
    strip = ps[: len(ps) - k]
    add = pt[k:]
    target_firsts = {t.split(".", 1)[0] for t in target}
    source_firsts = {s.split(".", 1)[0] for s in source}
    while strip and strip[0] in target_firsts:
        strip = []
    while add and add[0] in source_firsts:
        add = []
    return Prefixes(tuple(strip), tuple(add))


_NUMBER = re.compile(r"(\d+)")


def natural_order(keys: Sequence[str], metas: Mapping[str, TensorMeta] | None = None) -> list[str] | None:
    """When `keys` are sorted by name (safetensors writers sort them, tensors of each dtype size apart), the same
    keys in name order with numbers in numeric order (`layers.2` before `layers.10`); None when they keep their
    own (registration) order."""
    if len(keys) < 3:
        return None
    descents = sum(1 for a, b in zip(keys, keys[1:]) if a > b)
    groups = len({metas[k].dtype for k in keys}) if metas is not None else 1
    if descents >= groups:
        return None
    return sorted(keys, key=lambda k: [int(t) if t.isdigit() else t for t in _NUMBER.split(k)])
