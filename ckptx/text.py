"""Text at the bottom of every layer: untrusted strings made safe to print (keys, metadata and names read from
checkpoint files), sizes, `K=V` items, plain tables and strict JSON.

A key may hold ESC sequences, carriage returns, newlines, bidi overrides or lone surrogates; printed raw they
recolour or clear the terminal, forge table rows or make the output unencodable. Every place that shows such a
string goes through `shown` (one string, every character that is not printable escaped) or, for whole output
text, `printable` (the same but line breaks kept).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from ckptx.errors import CkptxError
from ckptx.yaml12 import load_scalar_text

if TYPE_CHECKING:  # pragma: no cover
    from ckptx.dtypes import TensorMeta

__all__ = [
    "SHOWN",
    "count_params",
    "describe_key",
    "human_bytes",
    "json_text",
    "key_values",
    "parse_size",
    "printable",
    "python_name",
    "quoted",
    "short_list",
    "shown",
    "summary",
    "table",
]

SHOWN = 20

# Not printable as Python's str.isprintable decides (controls, format characters such as bidi overrides, line and
# paragraph separators, surrogates, unassigned), plus the backslash so that an escape cannot be forged.
_FAST = re.compile(r"[^\\\x20-\x7e]")
_BIG_INT_BITS = 64
_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


def _escape_char(char: str) -> str:
    """One character as a repr-style escape: `\\n`, `\\x1b`, `\\u202e`, `\\\\`."""
    if char == "\\":
        return "\\\\"
    return (
        repr(char)[1:-1]
        if char in "\n\r\t"
        else f"\\x{ord(char):02x}"
        if ord(char) < 0x100
        else (f"\\u{ord(char):04x}" if ord(char) < 0x10000 else f"\\U{ord(char):08x}")
    )


def shown(text: str) -> str:
    """`text` with every non-printable character (and the backslash) escaped, repr-style; plain text unchanged."""
    if not _FAST.search(text):
        return text
    return "".join(c if c != "\\" and c.isprintable() else _escape_char(c) for c in text)


def quoted(text: str) -> str:
    """`shown(text)` in single quotes, as messages name a key: `'conv.weight'`."""
    return f"'{shown(text)}'"


def printable(text: str, *, keep_lines: bool = True) -> str:
    """Output text made safe for a terminal: every non-printable character escaped except, with `keep_lines`,
    the line breaks (backslashes are left as they are: this is a second line of defence behind `shown`).
    Without `keep_lines` the result is exactly one line."""
    if text.isprintable():
        return text
    lines = text.split("\n") if keep_lines else [text]
    return "\n".join(
        line if line.isprintable() else "".join(c if c.isprintable() else _escape_char(c) for c in line)
        for line in lines
    )


def describe_key(key: object) -> str:
    """A short, printable description of a (possibly hostile) dict key of any type, for messages.

    Never fails and never builds a huge string: a 5000-digit integer is described by its size, a deeply nested
    tuple by its length.
    """
    if isinstance(key, str):
        return quoted(key)
    if isinstance(key, bool):
        return repr(key)
    if isinstance(key, int):
        return repr(key) if key.bit_length() <= _BIG_INT_BITS else f"an integer of {key.bit_length()} bits"
    if isinstance(key, (bytes, bytearray)):
        return shown(repr(bytes(key[:40]))) + ("..." if len(key) > 40 else "")
    if isinstance(key, tuple):
        return f"a tuple of {len(key)} item{'' if len(key) == 1 else 's'}"
    return f"a {shown(type(key).__name__)}"


def summary(value: object, limit: int = 60) -> str:
    """A short, printable description of a value read from an untrusted file, for messages: small numbers and
    short strings as they are (a string escaped and cut to `limit` characters), anything else by its type and
    size (`a list of 3 items`).

    Never recursive and never large: a list nested 200,000 deep, a 5000-digit integer or a 1 GB string is
    described without `repr`, which would fail (RecursionError, ValueError) or build a huge message.
    """
    if value is None or isinstance(value, (bool, float)):
        return repr(value)
    if isinstance(value, str):
        cut = value[:limit]
        return quoted(cut) + ("..." if len(value) > limit else "")
    if isinstance(value, (list, tuple, dict, set, frozenset)):
        return f"a {shown(type(value).__name__)} of {len(value)} item{'' if len(value) == 1 else 's'}"
    return describe_key(value)


_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")


def python_name(module: str, name: str) -> str:
    """`module.name` of a global a pickle names, for messages; any other text (a pickle's GLOBAL opcode reads two
    lines of whatever file it is given: a text file linked in place of a checkpoint would be echoed) is described
    by its length only."""
    text = f"{module}.{name}"
    if len(text) <= 200 and _DOTTED.fullmatch(text):
        return text
    return f"<a global whose name is not a Python name ({len(text)} characters)>"


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def key_values(items: Sequence[str], flag: str) -> dict[str, Any]:
    """`K=V` command-line items (`--set`, `--target-arg`) as a dict, each value read as a YAML 1.2 core-schema
    scalar (`1e-5`, `1E5`, `.5` and `-3` are numbers; see `ckptx.yaml12`). A value YAML cannot read raises a
    CkptxError naming its key."""
    values: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise CkptxError(f"{flag} {shown(item)}: expected KEY=VALUE")
        try:
            values[key] = load_scalar_text(raw) if raw else ""
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise CkptxError(
                f"{flag} {shown(key)}: cannot read the value {quoted(raw)} as YAML ({problem}); "
                f"to pass it as text, quote it for YAML inside the shell's quotes: {flag} {shown(key)}='\"...\"'"
            ) from None
    return values


def json_text(document: Any, *, indent: int = 1) -> str:
    """`document` as strict JSON (RFC 8259): NaN and infinities, which JSON cannot hold, become the strings
    "nan", "inf" and "-inf" (a verification of NaN outputs reports them that way); other objects as `str`."""
    return json.dumps(_finite(document), indent=indent, default=str, allow_nan=False)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    """A plain text table with aligned columns; a cell can never break its row (control characters escaped)."""
    header = [printable(str(c), keep_lines=False) for c in header]
    rows = [[printable(str(c), keep_lines=False) for c in r] for r in rows]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def count_params(metas: Iterable[TensorMeta]) -> int:
    """Total number of elements."""
    return sum(m.numel for m in metas)


def short_list(keys: Iterable[str], limit: int = 6) -> str:
    """The first `limit` keys (escaped for printing), comma-separated, and how many more."""
    items = [shown(k) for k in keys]
    text = ", ".join(items[:limit])
    return text + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def parse_size(text: str) -> int:
    """`5GB` -> 5_000_000_000, `500MiB` -> 524_288_000; a bare number is bytes. Raises ValueError."""
    match = _SIZE.match(text)
    unit = match.group(2).upper() if match else ""
    if match is None or unit not in _UNITS:
        raise ValueError(f"'{text}' is not a size; write e.g. 5GB, 500MB, 2GiB or a number of bytes")
    size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"'{text}' is not a positive size")
    return size


def display_path(path: Path) -> str:
    """`path` relative to the working folder when it is inside it (how messages name a file), else as it is."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)
