"""The lazy source interface every reader implements, and extraction of the state dict from a checkpoint."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Collection, Mapping, Sequence

from ckptx._lazy import lazy_module
from ckptx.errors import SourceError
from ckptx.io.dtypes import dtype_name
from ckptx.ops.registry import TensorMeta

torch = lazy_module("torch")


def is_tensor(value: Any) -> bool:
    """A torch tensor, or a tensor a pickle only describes (`TensorRef`, read without torch).

    Never imports torch: while torch is not imported, no torch tensor can exist.
    """
    torch_module = sys.modules.get("torch")
    if torch_module is not None and isinstance(value, torch_module.Tensor):
        return True
    return getattr(type(value), "is_tensor_ref", False) is True


@dataclass(frozen=True)
class RawSpan:
    """Where a tensor's bytes lie in a file, for copying without decoding."""

    file: str
    offset: int
    nbytes: int


@dataclass
class Source:
    """A checkpoint opened lazily: tensor metadata up front, tensor data on `load(key)`."""

    path: str
    format: str
    tensors: dict[str, TensorMeta]
    non_tensors: dict[str, str] = field(default_factory=dict)
    extracted_from: str = "."
    top_level: dict[str, str] = field(default_factory=dict)
    state_metadata: Any = None
    file_metadata: dict[str, str] = field(default_factory=dict)

    def load(self, key: str) -> torch.Tensor:
        """The tensor stored under `key` (materialized from disk or mmap)."""
        raise NotImplementedError

    def raw_span(self, key: str) -> RawSpan | None:
        """Where the raw bytes of `key` lie, when they can be copied as they are."""
        return None

    def raw_spans(self, key: str) -> Collection[RawSpan] | None:
        """The raw bytes of `key` as pieces of files, in order (a sharded tensor's chunks); by default `raw_span`."""
        span = self.raw_span(key)
        return None if span is None else (span,)

    def close(self) -> None:
        """Release file handles and maps."""

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MappingSource(Source):
    """A source over an in-memory (or memory-mapped) mapping of key -> tensor."""

    def __init__(self, path: str, fmt: str, state: Mapping[str, Any], *, extracted_from: str = ".",
                 top_level: Mapping[str, str] | None = None, keep_alive: Any = None) -> None:
        tensors = {k: v for k, v in state.items() if is_tensor(v)}
        super().__init__(
            path=path, format=fmt,
            tensors={k: TensorMeta(tuple(v.shape), dtype_name(v.dtype)) for k, v in tensors.items()},
            non_tensors={str(k): type(v).__name__ for k, v in state.items() if not is_tensor(v)},
            extracted_from=extracted_from, top_level=dict(top_level or {}),
            state_metadata=getattr(state, "_metadata", None),
        )
        self._state = tensors
        self._keep_alive = keep_alive

    def load(self, key: str) -> torch.Tensor:
        """The stored tensor itself."""
        return self._state[key]

    def close(self) -> None:
        """Drop references so mmaps can be released."""
        self._state = {}
        self._keep_alive = None


def extract(obj: Any, paths: Sequence[str], *, file: str, where: str = "") -> tuple[Mapping[str, Any], str]:
    """Find the state dict in a loaded checkpoint: the first of `paths` that exists wins.

    A path is dotted (`state_dict.backbone`); `.` is the whole object. With no paths, the object
    itself is used when it holds tensors, else the usual wrappers are tried.
    """
    candidates = list(paths) or [".", "state_dict", "model", "module"]
    for path in candidates:
        found = _lookup(obj, path)
        if isinstance(found, Mapping) and (paths or _has_tensors(found)):
            return found, path
    top = ", ".join(map(str, obj.keys())) if isinstance(obj, Mapping) else type(obj).__name__
    tried = ", ".join(candidates)
    place = f" ({where})" if where else ""
    raise SourceError(f"{file}: no state dict at {tried}{place}; the top level holds: {top}; "
                      f"set `extract:` in the recipe or --extract to the right path")


def describe_value(value: Any) -> str:
    """A short description of a checkpoint entry: `dict (140 tensors)`, `int 3`, `Namespace`."""
    if is_tensor(value):
        return f"tensor {dtype_name(value.dtype)}{list(value.shape)}"
    if isinstance(value, Mapping):
        tensors = sum(is_tensor(v) for v in value.values())
        return f"dict ({len(value)} entries, {tensors} tensors)"
    if isinstance(value, (int, float, str, bool)) and len(repr(value)) < 40:
        return f"{type(value).__name__} {value!r}"
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__} of {len(value)}"
    return type(value).__name__


def _lookup(obj: Any, path: str) -> Any:
    if path in (".", ""):
        return obj
    if isinstance(obj, Mapping) and path in obj:
        return obj[path]
    current = obj
    for part in path.split("."):
        if not isinstance(current, Mapping) or part not in current:
            return None
        current = current[part]
    return current


def _has_tensors(mapping: Mapping[str, Any]) -> bool:
    return any(is_tensor(v) for v in mapping.values())
