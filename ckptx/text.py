"""Untrusted strings made safe to print: keys, metadata and names read from checkpoint files.

A key may hold ESC sequences, carriage returns, newlines, bidi overrides or lone surrogates; printed raw they
recolour or clear the terminal, forge table rows or make the output unencodable. Every place that shows such a
string goes through `shown` (one string, every character that is not printable escaped) or, for whole output
text, `printable` (the same but line breaks kept).
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import yaml

from ckptx.errors import CkptxError

__all__ = ["describe_key", "human_bytes", "key_values", "printable", "quoted", "shown"]

# Not printable as Python's str.isprintable decides (controls, format characters such as bidi overrides, line and
# paragraph separators, surrogates, unassigned), plus the backslash so that an escape cannot be forged.
_FAST = re.compile(r"[^\\\x20-\x7e]")
_BIG_INT_BITS = 64


def _escape_char(char: str) -> str:
    """One character as a repr-style escape: `\\n`, `\\x1b`, `\\u202e`, `\\\\`."""
    if char == "\\":
        return "\\\\"
    return repr(char)[1:-1] if char in "\n\r\t" else f"\\x{ord(char):02x}" if ord(char) < 0x100 else (
        f"\\u{ord(char):04x}" if ord(char) < 0x10000 else f"\\U{ord(char):08x}")


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
    return "\n".join(line if line.isprintable() else "".join(c if c.isprintable() else _escape_char(c) for c in line)
                     for line in lines)


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
        return f"a tuple of {len(key)} items"
    return f"a {shown(type(key).__name__)}"


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def key_values(items: Sequence[str], flag: str) -> dict[str, Any]:
    """`K=V` command-line items (`--set`, `--target-arg`) as a dict, each value read as a YAML scalar."""
    values: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise CkptxError(f"{flag} {item}: expected KEY=VALUE")
        try:
            values[key] = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            values[key] = raw
    return values
