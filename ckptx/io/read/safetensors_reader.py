"""Read safetensors files lazily: the header is parsed and checked, tensor bytes are read on demand.

The header is checked as the safetensors library (Rust, `safetensors/src/tensor.rs`) checks it, so that a file
ckptx reads is one that library reads, with the same tensors: at most 100,000,000 header bytes of strict UTF-8
JSON (no BOM, no NaN/Infinity, no lone surrogates, numbers within range, nesting below 128 levels); an object of
tensor entries `{"dtype": code, "shape": [u64...], "data_offsets": [u64, u64]}` plus an optional
`"__metadata__"` of string values; the entries, sorted by offsets, tile the data section from byte 0 to its
end with no gap, overlap or trailing byte, each exactly as long as its dtype and shape need.

Two rules are stricter than the library: a key may appear only once in any object (the library keeps the last
of identical duplicates; another reader may keep the first), and an entry must be an object (serde also reads
`["F32", [1], [0, 4]]`, which the format does not describe).
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptx._lazy import lazy_module
from ckptx.dtypes import DTYPES, TensorMeta, from_safetensors
from ckptx.errors import BadHeader, SourceError, UnsupportedDtype
from ckptx.gcpause import without_gc
from ckptx.io.spans import read_span
from ckptx.planning.source import RawSpan, Source
from ckptx.text import quoted, shown

if TYPE_CHECKING:  # pragma: no cover
    import torch
else:
    torch = lazy_module("torch")

__all__ = ["MAX_DEPTH", "MAX_HEADER", "SafetensorsSource", "read_header"]

MAX_HEADER = 100_000_000  # the library's MAX_HEADER_SIZE
MAX_DEPTH = 127  # serde_json's recursion limit: 128 nested arrays or objects are refused
_U64 = 2**64 - 1
_FIELDS = ("dtype", "shape", "data_offsets")
# Codes the library knows that ckptx has no dtype for, with their bits per element.
_LIBRARY_ONLY_BITS = {"F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "F8_E8M0": 8}
# `-0` in a shape or data_offsets list: serde_json reads it as the float -0.0 (refused there), Python as 0.
_NEGATIVE_ZERO = re.compile(rb'"(?:shape|data_offsets)"\s*:\s*\[[0-9,\s-]*?-0(?![0-9.eE])')
# The only way a lone surrogate gets into the parsed header (raw ones are invalid UTF-8): a \\uD800-\\uDFFF escape.
_SURROGATE_ESCAPE = re.compile(rb"\\[uU][dD][89a-fA-F]")
_INT = frozenset({int})
_CODES = frozenset([*(d.safetensors for d in DTYPES.values() if d.safetensors), *_LIBRARY_ONLY_BITS])
_AGAIN = "the file is damaged or not safetensors: download or export it again"


@dataclass(frozen=True)
class _Entry:
    """One tensor entry as checked: its key, safetensors dtype code, shape and byte range in the data section."""

    key: str
    code: str
    shape: tuple[int, ...]
    begin: int
    end: int


def read_header(path: Path, display: str | None = None) -> tuple[dict[str, Any], int]:
    """Parse and check a safetensors header; returns (header, start of the data section)."""
    header, data_start, _ = _read_checked(path, display)
    return header, data_start


def _read_checked(path: Path, display: str | None) -> tuple[dict[str, Any], int, list[_Entry]]:
    """The header, the start of the data section, and the checked entries in file order."""
    shown_path = display or str(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SourceError(
                f"{shown_path}: not a safetensors file: only {size} bytes, the header length alone takes 8; {_AGAIN}"
            )
        (length,) = struct.unpack("<Q", head)
        if length > MAX_HEADER:
            raise SourceError(
                f"{shown_path}: not a valid safetensors file: the header length (bytes 0-7) says "
                f"{length:,} bytes, more than the {MAX_HEADER:,} the format allows; {_AGAIN}"
            )
        if length > size - 8:
            raise SourceError(
                f"{shown_path}: not a valid safetensors file: header says {length} bytes but the file "
                f"has {size - 8} after the length (truncated or not safetensors); {_AGAIN}"
            )
        data_start = 8 + length
        try:
            header = _parse(f.read(length))
        except BadHeader as exc:
            raise SourceError(f"{shown_path}: not a valid safetensors file: {exc}; {_AGAIN}") from None
    try:
        entries = _entries(header)
        _check_layout(entries, size - data_start, data_start)
    except BadHeader as exc:
        raise SourceError(f"{shown_path}: not a valid safetensors file: {exc}; {_AGAIN}") from None
    _check_supported(entries, shown_path)
    return header, data_start, entries


def check_embedded_header(
    raw: bytes, data_size: int, data_start: int, shown: str
) -> tuple[dict[str, Any], dict[str, TensorMeta]]:
    """A safetensors header found inside another file (a DCP item): checked exactly as a file's header, against
    a data section of `data_size` bytes at `data_start`; the header and key -> TensorMeta in file order."""
    try:
        header = _parse(raw)
        entries = _entries(header)
        _check_layout(entries, data_size, data_start)
    except BadHeader as exc:
        raise SourceError(f"{shown}: not valid safetensors data: {exc}; {_AGAIN}") from None
    _check_supported(entries, shown)
    return header, _metas(entries)


def _parse(raw: bytes) -> dict[str, Any]:
    """The header as strict JSON, the way serde_json reads it; BadHeader (with the file byte) when it is not.

    Numbers are parsed by the json module's C code (a Python hook per number makes a 100 MB header of numbers
    take 40 s); their range is checked afterwards, where they are used (`_unsigned_list`, `_check_ignored`).
    """
    negative = _NEGATIVE_ZERO.search(raw)
    if negative:
        raise BadHeader(
            f"a shape or data_offsets list holds -0 (file byte {8 + negative.end() - 2}); it must hold "
            f"integers from 0 to 2^64-1"
        )
    hook = _object_checked if _SURROGATE_ESCAPE.search(raw) else _object
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadHeader(f"the header is not UTF-8 (file byte {8 + exc.start})") from None
    del raw  # the caller passes the bytes without keeping them: a 100 MB header is not held twice
    try:
        header = json.loads(text, object_pairs_hook=hook, parse_constant=_constant)
    except json.JSONDecodeError as exc:
        where = 8 + len(text[: exc.pos].encode("utf-8"))
        raise BadHeader(f"the header is not JSON: {exc.msg} (file byte {where})") from None
    except ValueError:  # an integer of more than 4,300 digits (sys.get_int_max_str_digits); serde: out of range
        raise BadHeader("the header holds a number out of range") from None
    except RecursionError:
        raise BadHeader(f"the header nests deeper than {MAX_DEPTH} levels") from None
    if not isinstance(header, dict):
        raise BadHeader(f"the header is {_kind(header)}, not a JSON object")
    if hook is _object_checked:
        _check_strings(header)
    return header


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys appear once each."""
    result = dict(pairs)
    if len(result) != len(pairs):
        counts = Counter(k for k, _ in pairs)
        duplicate = next(k for k, _ in pairs if counts[k] > 1)
        raise BadHeader(f"the key {quoted(duplicate)} appears twice in one object of the header")
    return result


def _object_checked(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """`_object`, and no key holds a lone surrogate."""
    for key, _ in pairs:
        _no_surrogates(key)
    return _object(pairs)


def _check_strings(header: dict[str, Any]) -> None:
    """No string value in the header holds a lone surrogate (keys were checked as they were read)."""
    stack: list[Any] = [header]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            _no_surrogates(item)
        elif isinstance(item, (list, dict)):
            stack.extend(item.values() if isinstance(item, dict) else item)


def _constant(text: str) -> Any:
    raise BadHeader(f"{text} is not JSON")


def _in_range(number: int | float) -> bool:
    """A number serde_json can hold: a finite float, or an integer a float can hold (larger ones overflow)."""
    if type(number) is float:
        return not math.isinf(number)
    try:
        return abs(number) <= _U64 or not math.isinf(float(number))
    except OverflowError:
        return False


def _no_surrogates(text: str) -> None:
    if not text.isascii() and any("\ud800" <= c <= "\udfff" for c in text):
        raise BadHeader(f"the string {quoted(text[:60])} holds a lone surrogate (\\ud800-\\udfff), which is not text")


def _kind(value: Any) -> str:
    """What a JSON value is, for messages: `a string`, `a list`, `null`."""
    names = {
        str: "a string",
        list: "a list",
        dict: "an object",
        bool: "a boolean",
        int: "an integer",
        float: "a number with a fraction or exponent",
        type(None): "null",
    }
    return names.get(type(value), type(value).__name__)


def _entries(header: dict[str, Any]) -> list[_Entry]:
    """Every tensor entry checked for its form, in header order; `__metadata__` checked too."""
    metadata = header.get("__metadata__")
    if metadata is not None:
        _check_metadata(metadata)
    return [_entry(key, info) for key, info in header.items() if key != "__metadata__"]


def _check_metadata(metadata: Any) -> None:
    if not isinstance(metadata, dict):
        raise BadHeader(f'"__metadata__" is {_kind(metadata)}; it must be an object of string values')
    if set(map(type, metadata.values())) <= {str}:
        return
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise BadHeader(f'"__metadata__" entry {quoted(key)} is {_kind(value)}; metadata values must be strings')


def _entry(key: str, info: Any) -> _Entry:
    """One entry checked: the common well-formed case at C speed, anything else field by field."""
    if type(info) is dict and len(info) == 3:
        code, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if (
            type(code) is str
            and code in _CODES
            and type(shape) is list
            and type(offsets) is list
            and len(offsets) == 2
            and _plain_unsigned(shape)
            and _plain_unsigned(offsets)
        ):
            return _Entry(key, code, tuple(shape), offsets[0], offsets[1])
    return _entry_in_detail(key, info)


def _plain_unsigned(items: list[Any]) -> bool:
    """Every item an int (not a bool) from 0 to 2^64-1."""
    return not items or set(map(type, items)) <= _INT and min(items) >= 0 and max(items) <= _U64


def _entry_in_detail(key: str, info: Any) -> _Entry:
    """One entry checked field by field; BadHeader names the first problem."""
    if not isinstance(info, dict):
        raise BadHeader(
            f"the entry of tensor {quoted(key)} is {_kind(info)}; it must be an object with {', '.join(_FIELDS)}"
        )
    missing = [f for f in _FIELDS if f not in info]
    if missing:
        raise BadHeader(f'the entry of tensor {quoted(key)} has no "{missing[0]}"')
    code = info["dtype"]
    if not isinstance(code, str) or code not in _CODES:
        raise BadHeader(
            f"tensor {quoted(key)} has dtype {shown(json.dumps(code)[:40])}, which is not a safetensors dtype"
        )
    shape = _unsigned_list(key, "shape", info["shape"])
    offsets = _unsigned_list(key, "data_offsets", info["data_offsets"])
    if len(offsets) != 2:
        raise BadHeader(f'tensor {quoted(key)}: "data_offsets" has {len(offsets)} numbers; it must be [begin, end]')
    for field, value in info.items():
        if field not in _FIELDS:
            _check_ignored(key, value)
    return _Entry(key, code, shape, offsets[0], offsets[1])


def _unsigned_list(key: str, field: str, value: Any) -> tuple[int, ...]:
    """A list of integers from 0 to 2^64-1 (booleans, fractions and strings refused)."""
    if not isinstance(value, list):
        raise BadHeader(f'tensor {quoted(key)}: "{field}" is {_kind(value)}; it must be a list of integers')
    for item in value:
        if type(item) is not int or not 0 <= item <= _U64:
            what = (
                f"the number {item}"
                if type(item) is int and abs(item) < 2**128
                else "a number out of range"
                if type(item) in (int, float) and not _in_range(item)
                else _kind(item)
            )
            raise BadHeader(f'tensor {quoted(key)}: "{field}" holds {what}; it must hold integers from 0 to 2^64-1')
    return tuple(value)


def _check_ignored(key: str, value: Any) -> None:
    """A field the format does not define: ignored as the library ignores it, but still nested at most
    MAX_DEPTH levels deep (the header and the entry are two) and its numbers in range. A list of plain numbers
    is checked at C speed."""
    stack = [(value, 3)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            if depth > MAX_DEPTH:
                raise BadHeader(f"the entry of tensor {quoted(key)} nests deeper than {MAX_DEPTH} levels")
            children = item.values() if isinstance(item, dict) else item
            if isinstance(item, list) and set(map(type, item)) <= {int, float}:
                if item and not (_in_range(max(item)) and _in_range(min(item))):
                    raise BadHeader(f"the entry of tensor {quoted(key)} holds a number out of range")
                continue
            stack.extend((child, depth + 1) for child in children)
        elif type(item) in (int, float) and not _in_range(item):
            raise BadHeader(f"the entry of tensor {quoted(key)} holds a number out of range")


def _check_layout(entries: list[_Entry], data_size: int, data_start: int) -> None:
    """The entries tile the data section exactly, in file order, each as long as its dtype and shape need."""
    entries.sort(key=lambda e: (e.begin, e.end))
    start = 0
    for entry in entries:
        if entry.begin != start or entry.end < entry.begin:
            what = (
                "ends before it begins"
                if entry.end < entry.begin
                else f"overlaps the tensor before it, which ends at byte {start}"
                if entry.begin < start
                else f"leaves a gap: the tensor before it ends at byte {start}"
            )
            raise BadHeader(
                f"tensor {quoted(entry.key)} has data_offsets [{entry.begin}, {entry.end}] (file byte "
                f"{data_start + entry.begin}), which {what}"
            )
        needed = _nbytes(entry)
        if entry.end - entry.begin != needed:
            raise BadHeader(
                f"tensor {quoted(entry.key)} has {entry.end - entry.begin} bytes but dtype {entry.code} shape "
                f"{list(entry.shape)} needs {needed}"
            )
        if entry.end > data_size:
            raise BadHeader(
                f"tensor {quoted(entry.key)} ends at byte {entry.end} of the data section, which has only "
                f"{data_size} bytes: the file is truncated"
            )
        start = entry.end
    if start != data_size:
        raise BadHeader(
            f"the data section has {data_size} bytes but its tensors cover only {start}: "
            f"{data_size - start} byte(s) follow the last tensor, from file byte {data_start + start}"
        )


def _nbytes(entry: _Entry) -> int:
    """Bytes the entry's dtype and shape need, with the library's u64 overflow and whole-byte checks."""
    count = 1
    for dim in entry.shape:
        count *= dim
        if count > _U64:
            raise BadHeader(f"tensor {quoted(entry.key)}: shape {list(entry.shape)} has more elements than 2^64")
    dtype = from_safetensors(entry.code)
    bits = count * (dtype.itemsize * 8 if dtype else _LIBRARY_ONLY_BITS[entry.code])
    if bits > _U64:
        raise BadHeader(f"tensor {quoted(entry.key)}: shape {list(entry.shape)} needs more than 2^64 bits")
    if bits % 8:
        raise BadHeader(f"tensor {quoted(entry.key)}: {count} elements of {entry.code} are not a whole number of bytes")
    return bits // 8


def _check_supported(entries: list[_Entry], shown_path: str) -> None:
    """A valid file may still hold a dtype ckptx has no torch type for (F4, F6_*, F8_E8M0)."""
    for entry in entries:
        if from_safetensors(entry.code) is None:
            raise UnsupportedDtype(
                f"{shown_path}: tensor {quoted(entry.key)} has safetensors dtype {entry.code}, "
                f"which ckptx cannot convert; convert it with the library that wrote it"
            )


def _metas(entries: list[_Entry]) -> dict[str, TensorMeta]:
    """Key -> TensorMeta in file order, one TensorMeta object per distinct dtype and shape (a header of
    100,000 tensors has a few hundred)."""
    known: dict[tuple[str, tuple[int, ...]], TensorMeta] = {}
    metas = {}
    for entry in entries:
        ident = (entry.code, entry.shape)
        meta = known.get(ident)
        if meta is None:
            dtype = from_safetensors(entry.code)
            assert dtype is not None, entry.code  # every code was checked when the header was read
            meta = known[ident] = TensorMeta(entry.shape, dtype.name)
        metas[entry.key] = meta
    return metas


class SafetensorsSource(Source):
    """A safetensors file: metadata from the header; `load` reads one tensor, `raw_span` says where its bytes are."""

    @without_gc  # measured with plan_recipe's: the open of 100,000 keys is part of the 0.35 s gain
    def __init__(self, path: Path, display: str | None = None) -> None:
        header, data_start, entries = _read_checked(path, display)
        metadata = header.get("__metadata__") or {}
        super().__init__(
            path=display or str(path), format="safetensors", tensors=_metas(entries), file_metadata=dict(metadata)
        )
        self._file = str(path)
        self._ranges = {e.key: (e.begin, e.end) for e in entries}
        self._data_start = data_start

    def raw_span(self, key: str) -> RawSpan:
        """Absolute offset and length of a tensor's bytes in the file."""
        begin, end = self._ranges[key]
        return RawSpan(self._file, self._data_start + begin, end - begin)

    def load(self, key: str) -> torch.Tensor:
        """Read one tensor from the file into new memory (with pread: no mapped pages stay resident)."""
        return read_span(self.raw_span(key), self.tensors[key])
