"""The `data.pkl` of a torch zip checkpoint, written without torch and without tensor data.

`torch.save(state_dict)` pickles (protocol 2) an `OrderedDict` whose values reduce to
`torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())`, where `storage` is
the persistent id `('storage', torch.FloatStorage, '<key>', 'cpu', numel)`. Dtypes without a legacy storage
type use `torch.storage.UntypedStorage` (numel = bytes) and `_rebuild_tensor_v3` with the dtype as a
seventh argument. `StatePickler` emits exactly those opcodes, memoized the way `pickle.Pickler` memoizes
them, so the bytes equal torch's for the same state dict; globals are written by name and nothing is imported.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ckptx.dtypes import DTYPES
from ckptx.errors import DestinationError

# Which storage global torch.save names comes from the dtype table: `DType.storage` (the legacy typed storage of
# torch/storage.py `_dtype_to_storage_type_map`), or None: UntypedStorage plus the dtype (`_rebuild_tensor_v3`).
ITEM_SIZES: dict[str, int] = {name: d.itemsize for name, d in DTYPES.items()}
_BATCH = 1000  # pickle's batch size for SETITEMS / APPENDS


def item_size(dtype: str) -> int | None:
    """Bytes per element of a dtype a torch zip file can hold (`float32` -> 4); None for any other dtype."""
    return ITEM_SIZES.get(dtype)


@dataclass(frozen=True)
class PickledStorage:
    """One storage record: its key (`data/<key>` in the zip), dtype and number of elements."""

    key: str
    dtype: str
    numel: int


@dataclass(frozen=True)
class PickledTensor:
    """A tensor as `data.pkl` describes it: a storage and the element offset, size and stride into it."""

    storage: PickledStorage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def state_dict_pickle(tensors: Sequence[tuple[str, PickledTensor]], metadata: Any = None) -> bytes:
    """`data.pkl` of an OrderedDict of `tensors` in order, with `metadata` as its `_metadata` attribute
    when it is not None (as `Module.state_dict()` sets it). Raises DestinationError for a value of
    `metadata` other than dicts, lists, tuples, strings, numbers, booleans and None."""
    pickler = StatePickler()
    pickler.state_dict(tensors, metadata)
    return pickler.getvalue()


class StatePickler:
    """A protocol-2 pickle writer for torch state dicts (see the module docstring)."""

    def __init__(self) -> None:
        self._out = bytearray(b"\x80\x02")
        self._memo: dict[object, int] = {}
        self._alive: list[object] = []  # objects memoized by id stay alive, so their ids are not reused

    def getvalue(self) -> bytes:
        """The pickle so far, with its STOP opcode."""
        return bytes(self._out) + b"."

    def state_dict(self, tensors: Sequence[tuple[str, PickledTensor]], metadata: Any) -> None:
        """An OrderedDict of tensors, then BUILD with `{'_metadata': metadata}` when it is given."""
        self._global("collections", "OrderedDict")
        self._out += b")R"
        self._put(object())
        self._setitems([(_Key(key), tensor) for key, tensor in tensors])
        if metadata is not None:
            self._out += b"}"
            self._put(object())
            self._value(_Key("_metadata"))
            self._value(metadata)
            self._out += b"sb"

    def _value(self, value: Any) -> None:
        """Any value of a state dict or of its `_metadata`."""
        if isinstance(value, PickledTensor):
            self._tensor(value)
        elif isinstance(value, _Key):
            self._str(value.text, None)
        elif value is None:
            self._out += b"N"
        elif value is True or value is False:
            self._out += b"\x88" if value else b"\x89"
        elif type(value) is int:
            self._int(value)
        elif type(value) is float:
            self._out += b"G" + struct.pack(">d", value)
        elif type(value) is str:
            self._str(value, id(value), value)
        elif not self._memoized(value):
            self._container(value)

    def _container(self, value: Any) -> None:
        if type(value) is tuple:
            self._tuple(value)
        elif type(value) is list:
            self._out += b"]"
            self._put(value, id(value))
            self._appends(value)
        elif type(value) is dict:
            self._out += b"}"
            self._put(value, id(value))
            self._setitems(list(value.items()))
        elif type(value) is OrderedDict:
            self._global("collections", "OrderedDict")
            self._out += b")R"
            self._put(value, id(value))
            self._setitems(list(value.items()))
            if vars(value):
                self._value(dict(vars(value)))
                self._out += b"b"
        else:
            raise DestinationError(
                f"the state dict's _metadata holds a {type(value).__name__} ({value!r:.60}); "
                f"a .pth written by ckptx carries only dicts, lists, tuples, strings and numbers "
                f"there; write .safetensors (no _metadata) or re-save the source with plain "
                f"values in its _metadata"
            )

    def _memoized(self, value: Any) -> bool:
        """Write a BINGET when `value` (a container) was pickled before."""
        index = self._memo.get(id(value))
        if index is None:
            return False
        self._get(index)
        return True

    def _tuple(self, items: tuple[Any, ...]) -> None:
        if not items:
            self._out += b")"
            return
        if len(items) > 3:
            self._out += b"("
        for item in items:
            self._value(item)
        self._out += b"t" if len(items) > 3 else b"\x85\x86\x87"[len(items) - 1 : len(items)]
        self._put(items, id(items))

    def _appends(self, items: list[Any]) -> None:
        for start in range(0, len(items), _BATCH):
            batch = items[start : start + _BATCH]
            if len(batch) > 1:
                self._out += b"("
            for item in batch:
                self._value(item)
            self._out += b"e" if len(batch) > 1 else b"a"

    def _setitems(self, items: list[tuple[Any, Any]]) -> None:
        for start in range(0, len(items), _BATCH):
            batch = items[start : start + _BATCH]
            if len(batch) > 1:
                self._out += b"("
            for key, value in batch:
                self._value(key)
                self._value(value)
            self._out += b"u" if len(batch) > 1 else b"s"

    def _tensor(self, tensor: PickledTensor) -> None:
        """`_rebuild_tensor_v2/v3(storage, offset, size, stride, False, OrderedDict()[, dtype])`, REDUCE."""
        storage = tensor.storage
        legacy = DTYPES[storage.dtype].storage
        self._global("torch._utils", "_rebuild_tensor_v2" if legacy else "_rebuild_tensor_v3")
        self._out += b"(("
        self._str("storage", "storage")
        if legacy:
            self._global("torch", legacy)
        else:
            self._global("torch.storage", "UntypedStorage")
        self._str(storage.key, ("storage key", storage.key))
        self._str("cpu", "cpu")
        self._int(storage.numel if legacy else storage.numel * ITEM_SIZES[storage.dtype])
        self._out += b"t"
        self._put(object())
        self._out += b"Q"
        self._int(tensor.offset)
        self._tuple(tuple(tensor.shape))
        self._tuple(tuple(tensor.stride))
        self._out += b"\x89"
        self._global("collections", "OrderedDict")
        self._out += b")R"
        self._put(object())
        if not legacy:
            self._global("torch", storage.dtype)
        self._out += b"t"
        self._put(object())
        self._out += b"R"
        self._put(object())

    def _global(self, module: str, name: str) -> None:
        index = self._memo.get(("global", module, name))
        if index is not None:
            self._get(index)
            return
        self._out += b"c" + f"{module}\n{name}\n".encode("ascii")
        self._put(None, ("global", module, name))

    def _str(self, text: str, memo_key: object, keep: object = None) -> None:
        """BINUNICODE; `memo_key` (when not None) lets a later equal reference be a BINGET."""
        if memo_key is not None and memo_key in self._memo:
            self._get(self._memo[memo_key])
            return
        raw = text.encode("utf-8", "surrogatepass")
        self._out += b"X" + struct.pack("<I", len(raw)) + raw
        self._put(keep, memo_key)

    def _int(self, value: int) -> None:
        if 0 <= value < 0x100:
            self._out += b"K" + bytes((value,))
        elif 0 <= value < 0x10000:
            self._out += b"M" + struct.pack("<H", value)
        elif -0x80000000 <= value < 0x80000000:
            self._out += b"J" + struct.pack("<i", value)
        else:
            raw = value.to_bytes((value.bit_length() >> 3) + 1, "little", signed=True)
            if value < 0 and len(raw) > 1 and raw[-1] == 0xFF and raw[-2] & 0x80:
                raw = raw[:-1]
            self._out += b"\x8a" + bytes((len(raw),)) + raw

    def _put(self, keep: object, memo_key: object = None) -> None:
        """Memoize the object just written (BINPUT), as pickle does for every non-atomic object."""
        index = len(self._alive)
        self._alive.append(keep)
        if memo_key is not None:
            self._memo[memo_key] = index
        self._out += b"q" + bytes((index,)) if index < 0x100 else b"r" + struct.pack("<I", index)

    def _get(self, index: int) -> None:
        self._out += b"h" + bytes((index,)) if index < 0x100 else b"j" + struct.pack("<I", index)


@dataclass(frozen=True)
class _Key:
    """A state dict key: written fresh each time, like the distinct key strings of a state dict."""

    text: str
