"""Crafted safetensors headers: ckptx accepts exactly what the safetensors library accepts (two stated exceptions).

Each case is run through the real `safetensors.safe_open` and through ckptx; the verdicts must agree. ckptx is
stricter in one way on purpose: a key appearing twice in one JSON object is refused even when the library keeps
the last one. Dtypes the library knows and ckptx cannot convert (F4, F6_*, F8_E8M0) are refused as
UnsupportedDtype, not as corrupt files.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import safetensors

from ckptx.errors import SourceError, UnsupportedDtype
from ckptx.io.read.safetensors_reader import MAX_HEADER, SafetensorsSource

T = '{"dtype":"F32","shape":[1],"data_offsets":[%d,%d]}'
U8 = '{"dtype":"U8","shape":[1],"data_offsets":[0,1],"x":%s}'
OK, BAD, STRICTER, UNSUPPORTED = "accepted", "refused", "ckptx-stricter", "unsupported"

CASES: dict[str, tuple[bytes, bytes, str]] = {
    "valid": (('{"a":%s}' % (T % (0, 4))).encode(), bytes(4), OK),
    "trailing bytes": (('{"a":%s}' % (T % (0, 4))).encode(), bytes(8), BAD),
    "gap at the start": (('{"a":%s}' % (T % (4, 8))).encode(), bytes(8), BAD),
    "overlap": (('{"a":%s,"b":%s}' % (T % (0, 4), T % (0, 4))).encode(), bytes(4), BAD),
    "aliased, overlapping": (('{"a":%s,"b":%s}' % (T % (0, 4), T % (2, 6))).encode(), bytes(6), BAD),
    "out of order is fine": (('{"b":%s,"a":%s}' % (T % (4, 8), T % (0, 4))).encode(), bytes(8), OK),
    "zero-size aliases": (
        b'{"a":{"dtype":"U8","shape":[0],"data_offsets":[0,0]},"b":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}}',
        b"",
        OK,
    ),
    "end before begin": (b'{"a":{"dtype":"U8","shape":[0],"data_offsets":[1,0]}}', bytes(1), BAD),
    "duplicate key, same entry": (('{"a":%s,"a":%s}' % (T % (0, 4), T % (0, 4))).encode(), bytes(4), STRICTER),
    "duplicate key, other entry": (('{"a":%s,"a":%s}' % (T % (0, 4), T % (4, 8))).encode(), bytes(8), BAD),
    "duplicate __metadata__": (b'{"__metadata__":{},"__metadata__":{}}', b"", BAD),
    "duplicate metadata key": (b'{"__metadata__":{"k":"1","k":"2"}}', b"", STRICTER),
    "duplicate field": (b'{"a":{"dtype":"U8","dtype":"U8","shape":[1],"data_offsets":[0,1]}}', bytes(1), BAD),
    "shape is a string": (b'{"a":{"dtype":"U8","shape":"12","data_offsets":[0,2]}}', bytes(2), BAD),
    "float shape": (b'{"a":{"dtype":"U8","shape":[2.0],"data_offsets":[0,2]}}', bytes(2), BAD),
    "exponent shape": (b'{"a":{"dtype":"U8","shape":[1e0],"data_offsets":[0,1]}}', bytes(1), BAD),
    "float offset": (b'{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2.0]}}', bytes(2), BAD),
    "boolean shape": (b'{"a":{"dtype":"U8","shape":[true],"data_offsets":[0,1]}}', bytes(1), BAD),
    "negative dimension": (b'{"a":{"dtype":"U8","shape":[-1],"data_offsets":[0,1]}}', bytes(1), BAD),
    "minus zero dimension": (b'{"a":{"dtype":"U8","shape":[-0],"data_offsets":[0,0]}}', b"", BAD),
    "Infinity": (b'{"a":{"dtype":"U8","shape":[Infinity],"data_offsets":[0,1]}}', bytes(1), BAD),
    "1e400": (b'{"a":{"dtype":"U8","shape":[1e400],"data_offsets":[0,1]}}', bytes(1), BAD),
    "5000-digit shape": (b'{"a":{"dtype":"U8","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,1]}}', bytes(1), BAD),
    "400-digit offset": (b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,' + b"9" * 400 + b"]}}", bytes(1), BAD),
    "2^64-1 dimension": (b'{"a":{"dtype":"U8","shape":[18446744073709551615,0],"data_offsets":[0,0]}}', b"", OK),
    "2^64 dimension": (b'{"a":{"dtype":"U8","shape":[18446744073709551616,0],"data_offsets":[0,0]}}', b"", BAD),
    "element count overflows": (b'{"a":{"dtype":"U8","shape":[4294967296,4294967296],"data_offsets":[0,0]}}', b"", BAD),
    "BOM": (b"\xef\xbb\xbf{}", b"", BAD),
    "UTF-16": ("{}".encode("utf-16"), b"", BAD),
    "lone surrogate escape in a key": (b'{"a\\ud800":%s}' % (T % (0, 4)).encode(), bytes(4), BAD),
    "lone surrogate escape in metadata": (b'{"__metadata__":{"k":"\\udc00"}}', b"", BAD),
    "paired surrogate escapes": (b'{"\\ud83d\\ude00":%s}' % (T % (0, 4)).encode(), bytes(4), OK),
    "surrogate bytes": (b'{"a\xed\xa0\x80":%s}' % (T % (0, 4)).encode(), bytes(4), BAD),
    "control character": (b'{"a\x01":%s}' % (T % (0, 4)).encode(), bytes(4), BAD),
    "ESC escape in a key": (b'{"a\\u001b[31m":%s}' % (T % (0, 4)).encode(), bytes(4), OK),
    "__metadata__ list": (b'{"__metadata__":[]}', b"", BAD),
    "__metadata__ string": (b'{"__metadata__":"x"}', b"", BAD),
    "__metadata__ int": (b'{"__metadata__":1}', b"", BAD),
    "__metadata__ null": (b'{"__metadata__":null}', b"", OK),
    "__metadata__ int value": (b'{"__metadata__":{"a":1}}', b"", BAD),
    "__metadata__ as a tensor": (b'{"__metadata__":%s}' % (T % (0, 4)).encode(), bytes(4), BAD),
    "unknown field": (b'{"a":' + (U8 % "[[1.5e3]]").encode() + b"}", bytes(1), OK),
    "unknown field, 25 digits": (b'{"a":' + (U8 % ("9" * 25)).encode() + b"}", bytes(1), OK),
    "unknown field, 5000 digits": (b'{"a":' + (U8 % ("9" * 5000)).encode() + b"}", bytes(1), BAD),
    "unknown field, 1e400": (b'{"a":' + (U8 % "[1,1e400]").encode() + b"}", bytes(1), BAD),
    "unknown field, NaN": (b'{"a":' + (U8 % "NaN").encode() + b"}", bytes(1), BAD),
    "nesting 127": (b'{"a":' + (U8 % ("[" * 125 + "]" * 125)).encode() + b"}", bytes(1), OK),
    "nesting 128": (b'{"a":' + (U8 % ("[" * 126 + "]" * 126)).encode() + b"}", bytes(1), BAD),
    "nesting 128 in objects": (b'{"a":' + (U8 % ('{"k":' * 126 + "1" + "}" * 126)).encode() + b"}", bytes(1), BAD),
    "nesting 10000": (b"[" * 10000 + b"]" * 10000, b"", BAD),
    "three offsets": (b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1,2]}}', bytes(1), BAD),
    "no shape": (b'{"a":{"dtype":"U8","data_offsets":[0,1]}}', bytes(1), BAD),
    "entry is a list": (b'{"a":[]}', b"", BAD),
    "entry is null": (b'{"a":null}', b"", BAD),
    "header is a list": (b"[]", b"", BAD),
    "empty header": (b"{}", b"", OK),
    "empty header, trailing byte": (b"{}", b"x", BAD),
    "padded with spaces": (b"{}      ", b"", OK),
    "padded with NULs": (b"{}\x00\x00", b"", BAD),
    "lowercase dtype": (b'{"a":{"dtype":"f32","shape":[1],"data_offsets":[0,4]}}', bytes(4), BAD),
    "dtype is a number": (b'{"a":{"dtype":1,"shape":[1],"data_offsets":[0,4]}}', bytes(4), BAD),
    "half a byte of F4": (b'{"a":{"dtype":"F4","shape":[1],"data_offsets":[0,1]}}', bytes(1), BAD),
    "F4": (b'{"a":{"dtype":"F4","shape":[2],"data_offsets":[0,1]}}', bytes(1), UNSUPPORTED),
}


def _write(path: Path, raw: bytes, data: bytes) -> Path:
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return path


def _library_accepts(path: Path) -> bool:
    try:
        with safetensors.safe_open(str(path), "pt") as f:
            list(f.keys())
    except Exception:  # noqa: BLE001 - the library's verdict is all that matters here
        return False
    return True


@pytest.mark.parametrize("name", list(CASES))
def test_ckptx_accepts_what_the_safetensors_library_accepts(tmp_path: Path, name: str) -> None:
    raw, data, expected = CASES[name]
    path = _write(tmp_path / "case.safetensors", raw, data)
    if expected != UNSUPPORTED:  # older libraries lack F4; the verdict on a valid F4 file depends on the version
        assert _library_accepts(path) == (expected in (OK, STRICTER)), "the library's behaviour changed"
    if expected == OK:
        SafetensorsSource(path).close()
        return
    kind = UnsupportedDtype if expected == UNSUPPORTED else SourceError
    with pytest.raises(kind) as caught:
        SafetensorsSource(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and "\n" not in message and len(message) < 400
    if kind is SourceError:
        assert message.endswith("the file is damaged or not safetensors: download or export it again")


def test_header_over_the_library_limit_is_refused_without_reading_it(tmp_path: Path) -> None:
    path = tmp_path / "huge.safetensors"
    length = 100 * 2**20
    with open(path, "wb") as f:
        f.write(length.to_bytes(8, "little") + b"{")
        f.truncate(8 + length)  # sparse: nothing to read would be fast anyway
    started = time.perf_counter()
    with pytest.raises(SourceError) as caught:
        SafetensorsSource(path)
    assert time.perf_counter() - started < 1
    assert str(caught.value).startswith(
        f"{path}: not a valid safetensors file: the header length (bytes 0-7) says "
        f"104,857,600 bytes, more than the {MAX_HEADER:,} the format allows"
    )


def test_header_length_past_the_file(tmp_path: Path) -> None:
    path = tmp_path / "short.safetensors"
    path.write_bytes((1000).to_bytes(8, "little") + b"{}")
    with pytest.raises(
        SourceError,
        match=r"short.safetensors: not a valid safetensors file: header says 1000 bytes "
        r"but the file has 2 after the length",
    ):
        SafetensorsSource(path)


def test_escape_sequences_in_keys_are_kept_as_data_but_escaped_in_messages(tmp_path: Path) -> None:
    raw = b'{"a\\u001b[2J\\nb":{"dtype":"F32","shape":[1],"data_offsets":[0,2]}}'
    path = _write(tmp_path / "esc.safetensors", raw, bytes(2))
    with pytest.raises(SourceError) as caught:
        SafetensorsSource(path)
    assert "tensor 'a\\x1b[2J\\nb' has 2 bytes" in str(caught.value)
