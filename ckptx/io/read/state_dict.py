"""In-memory state dicts as sources, and finding the state dict inside a loaded checkpoint (`extract`), with the
checks that refuse tensors ckptx cannot convert faithfully."""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ckptx._lazy import lazy_module
from ckptx.dtypes import DTYPES, TensorMeta, dtype_name
from ckptx.errors import SourceError
from ckptx.planning.source import Source
from ckptx.text import describe_key, quoted

if TYPE_CHECKING:  # pragma: no cover
    import torch
else:
    torch = lazy_module("torch")


def is_tensor(value: Any) -> bool:
    """A torch tensor, or a tensor a pickle only describes (`TensorRef`, read without torch).

    Never imports torch: while torch is not imported, no torch tensor can exist.
    """
    torch_module = sys.modules.get("torch")
    if torch_module is not None and isinstance(value, torch_module.Tensor):
        return True
    return getattr(type(value), "is_tensor_ref", False) is True


class MappingSource(Source):
    """A source over an in-memory (or memory-mapped) mapping of key -> tensor."""

    def __init__(
        self,
        path: str,
        fmt: str,
        state: Mapping[str, Any],
        *,
        extracted_from: str = ".",
        top_level: Mapping[str, str] | None = None,
        keep_alive: Any = None,
    ) -> None:
        check_state(state, path)
        tensors = {k: v for k, v in state.items() if is_tensor(v)}
        super().__init__(
            path=path,
            format=fmt,
            tensors={k: TensorMeta(tuple(v.shape), dtype_name(v.dtype)) for k, v in tensors.items()},
            non_tensors={str(k): type(v).__name__ for k, v in state.items() if not is_tensor(v)},
            extracted_from=extracted_from,
            top_level=dict(top_level or {}),
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


def memory_source(
    obj: Mapping[str, Any], extract_paths: Sequence[str] = (), *, name: str = "<state_dict>"
) -> MappingSource:
    """An in-memory checkpoint (a state dict, or a whole `torch.load` result) as a source: the state dict is found
    with the same `extract` rules as for files, so `{'model': ..., 'epoch': 3}` works like the file it came from.
    A mapping that holds tensors itself is used as it is when none of `extract_paths` is in it (it is the state
    dict a caller already took out)."""
    if extract_paths and _has_tensors(obj) and all(_lookup(obj, p) is None for p in extract_paths):
        extract_paths = (".",)
    state, found_at = extract(obj, extract_paths, file=name)
    top = top_level_of(obj) if state is not obj else {}
    return MappingSource(name, "memory", state, extracted_from=found_at, top_level=top)


def top_level_of(obj: Any) -> dict[str, str]:
    """The top level of a loaded checkpoint as `name -> description`, for display (a non-string key by its
    description: `1`, `an integer of 16610 bits`)."""
    if not isinstance(obj, Mapping):
        return {}
    return {k if isinstance(k, str) else describe_key(k): describe_value(v) for k, v in obj.items()}


_FIXES = {
    "nested": "a nested tensor; store its components as separate tensors",
    "sparse": "a sparse tensor ({layout}); save t.to_dense() instead",
    "quantized": "a quantized tensor ({dtype}); save t.dequantize() (or t.int_repr() and its scales) instead",
    "meta": "a meta tensor (a shape without data); save the materialized tensor instead",
    "conj": "a conjugate view; save t.resolve_conj() instead",
    "neg": "a negative view; save t.resolve_neg() instead",
    "dtype": "of dtype {dtype}, which ckptx cannot convert (supported: {supported}); cast it before saving",
    "overlap": (
        "a view whose {numel:,} elements overlap in {extent:,} stored ones (stride 0 or overlapping strides); "
        "converting would write every copy: save t.contiguous() instead if you mean it"
    ),
}


def check_state(state: Mapping[Any, Any], file: str) -> None:
    """Refuse a state dict ckptx cannot convert faithfully, naming the key: a key that is not a string (keys 1
    and '1', or True and 'True', would become one output key), a tensor named `__metadata__` (safetensors
    reserves it), and tensors that have no plain dense bytes (`_FIXES` says what to save instead)."""
    for key, value in state.items():
        if not isinstance(key, str):
            raise SourceError(
                f"{file}: the state dict has the key {describe_key(key)} of type {type(key).__name__}; "
                f"ckptx needs string keys (1 and '1' would become one output key): save the state "
                f"dict with string keys"
            )
        if key == "__metadata__" and is_tensor(value):
            raise SourceError(
                f"{file}: the state dict has a tensor named '__metadata__', a name safetensors "
                f"reserves for its metadata: rename it before saving"
            )
        if is_tensor(value):
            problem = unsupported_tensor(value)
            if problem:
                raise SourceError(f"{file}: tensor {quoted(key)} is {problem}")


def unsupported_tensor(tensor: Any) -> str | None:
    """Why ckptx cannot convert `tensor` (a torch tensor or a TensorRef), with what to do; None when it can."""
    if getattr(type(tensor), "is_tensor_ref", False):
        return _overlap(tuple(tensor.size), tuple(tensor.stride))
    dtype = dtype_name(tensor.dtype)
    kind = (
        "nested"
        if tensor.is_nested
        else "sparse"
        if tensor.layout is not torch.strided
        else "quantized"
        if tensor.is_quantized
        else "meta"
        if tensor.device.type == "meta"
        else "conj"
        if tensor.is_conj()
        else "neg"
        if tensor.is_neg()
        else "dtype"
        if dtype not in DTYPES
        else None
    )
    if kind is not None:
        return _FIXES[kind].format(
            layout=str(tensor.layout).removeprefix("torch."), dtype=dtype, supported=", ".join(DTYPES)
        )
    return _overlap(tuple(tensor.shape), tuple(tensor.stride()))


def _overlap(size: tuple[int, ...], stride: tuple[int, ...]) -> str | None:
    """A view that repeats stored elements (its element count exceeds the span it covers) amplifies a small file
    into a huge output; such views are refused."""
    numel = math.prod(size)
    if numel <= 1 or len(size) != len(stride):
        return None
    extent = 1 + sum((n - 1) * abs(s) for n, s in zip(size, stride))
    return _FIXES["overlap"].format(numel=numel, extent=extent) if numel > extent else None


def extract(obj: Any, paths: Sequence[str], *, file: str, where: str = "") -> tuple[Mapping[str, Any], str]:
    """Find the state dict in a loaded checkpoint: the first of `paths` that exists wins.

    A path is dotted (`state_dict.backbone`); `.` is the whole object. With no paths, the object itself and the
    usual wrappers (`state_dict`, `model`, `module`) that hold tensors are the candidates, and the one whose own
    tensors hold the most elements wins (the first on a tie): a training state `{model: {...}, optimizer: {...},
    step: tensor(5)}` gives its `model`, not the lone `step` beside it.
    """
    if not paths:
        found_at = [(path, _lookup(obj, path)) for path in _WRAPPERS]
        usable = [(path, found) for path, found in found_at if isinstance(found, Mapping) and _has_tensors(found)]
        if usable:
            path, found = max(usable, key=lambda item: _elements(item[1]))
            return found, path
    candidates = list(paths) or list(_WRAPPERS)
    for path in candidates:
        found = _lookup(obj, path)
        if isinstance(found, Mapping) and paths:
            return found, path
    top = ", ".join(top_level_of(obj)) if isinstance(obj, Mapping) else type(obj).__name__
    tried = ", ".join(candidates)
    place = f" ({where})" if where else ""
    raise SourceError(
        f"{file}: no state dict at {tried}{place}; the top level holds: {top}; "
        f"set `extract:` in the recipe or --extract to the right path"
    )


def describe_value(value: Any) -> str:
    """A short description of a checkpoint entry: `dict (140 tensors)`, `int 3`, `Namespace`."""
    if is_tensor(value):
        return f"tensor {dtype_name(value.dtype)}{list(value.shape)}"
    if isinstance(value, Mapping):
        return f"dict ({len(value)} entries, {count_tensors(value)} tensors)"
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"int of {value.bit_length()} bits"
    if isinstance(value, (int, float, str, bool)) and len(repr(value)) < 40:
        return f"{type(value).__name__} {value!r}"
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__} of {len(value)}"
    return type(value).__name__


def count_tensors(value: Any, *, limit: int = 1_000_000) -> int:
    """Tensors anywhere inside nested dicts, lists and tuples (an optimizer state's per-parameter moments too);
    at most `limit` containers are visited, so a hostile structure cannot make this slow."""
    count, stack, seen = 0, [value], 0
    while stack and seen < limit:
        item = stack.pop()
        seen += 1
        if is_tensor(item):
            count += 1
        elif isinstance(item, Mapping):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return count


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


_WRAPPERS = (".", "state_dict", "model", "module")  # where a checkpoint's weights usually are, in that order


def _has_tensors(mapping: Mapping[str, Any]) -> bool:
    return any(is_tensor(v) for v in mapping.values())


def _elements(mapping: Mapping[str, Any]) -> int:
    """Elements of the tensors directly in `mapping` (a nested dict's are not counted)."""
    return sum(math.prod(v.shape) for v in mapping.values() if is_tensor(v))
