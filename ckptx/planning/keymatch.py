"""Which keys a list of regexes matches, fast, for checkpoints with 100,000 keys and recipes with many steps.

Literals every match must contain are looked for in all keys joined into one string (at memory speed)
before any regex runs, and the key each hit lies in is found by binary search in the list of key start
offsets. A rename step hands the joined keys on to the next step with the keys it
renamed marked, and those few are searched one by one. The answers are those of calling
`pattern.search(key)` on every key.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from functools import lru_cache
from itertools import accumulate, count
from operator import add
from typing import NamedTuple

_PLAIN = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-:/ ,;=@#'\"<>!~`&%")
_OPTIONAL = frozenset("?*{")  # after a character: it may be absent (`{` could be `{0,n}`)
_NUMERIC_ESCAPES = frozenset("xuUN0123456789")
_QUANTIFIER = re.compile(r"\{\d*(?:,\d*)?\}")


_SAMPLE = 512
_SEP = "\x00"


@lru_cache(maxsize=4096)
def required_literals(pattern: re.Pattern[str]) -> tuple[str, ...]:
    """Substrings every match of `pattern` contains: its runs of top-level literal characters (none if unsure).

    Read off the pattern text with the public API only: plain characters and escaped punctuation (`\\.`)
    make runs; anything else (classes, groups, anchors, escapes like `\\d`) ends a run and is skipped; a
    character followed by `?`, `*` or `{` is dropped from its run; a top-level `|` means no literal is required.
    """
    text = pattern.pattern
    if pattern.flags & (re.IGNORECASE | re.VERBOSE) or not isinstance(text, str):
        return ()
    runs: list[str] = []
    current: list[str] = []
    i, depth = 0, 0
    while i < len(text):
        char = text[i]
        literal, width = _literal_at(text, i) if depth == 0 else (None, 1)
        if char == "\\" and literal is None:
            if text[i + 1 : i + 2] in _NUMERIC_ESCAPES:  # `\\x41`, `\\1`, `\\N{..}`: not worth reading
                return ()
            width = 2
        elif char == "{" and (quantifier := _QUANTIFIER.match(text, i)):
            width = quantifier.end() - i
        elif depth == 0 and char == "|":
            return ()
        elif char == "[" and literal is None:
            width = _class_end(text, i) - i
        elif char == "(":
            depth += 1
        elif char == ")":
            depth = max(0, depth - 1)
        following = text[i + width : i + width + 1]
        if literal is not None and following not in _OPTIONAL:
            current.append(literal)
        else:
            if literal is not None or current:
                runs.append("".join(current))
            current = []
        i += width
    runs.append("".join(current))
    return tuple(run for run in runs if run and _SEP not in run)


def _literal_at(text: str, i: int) -> tuple[str | None, int]:
    """The literal character at `text[i]` and how many characters spell it, or (None, 1)."""
    char = text[i]
    if char in _PLAIN:
        return char, 1
    if char == "\\" and i + 1 < len(text) and not text[i + 1].isalnum() and text[i + 1].isascii():
        return text[i + 1], 2
    return None, 1


def _class_end(text: str, i: int) -> int:
    """The index after the `]` that closes the character class opened at `text[i]`."""
    j = i + 1
    if j < len(text) and text[j] == "^":
        j += 1
    if j < len(text) and text[j] == "]":
        j += 1
    while j < len(text) and text[j] != "]":
        j += 2 if text[j] == "\\" else 1
    return j + 1


class _Joined(NamedTuple):
    """Keys joined by NUL into one text, and where in it each key starts (then len(text) + 1)."""

    text: str
    starts: list[int]


def _join(keys: list[str]) -> _Joined | None:
    """The keys joined, or None when a key itself holds a NUL (then keys are searched one by one)."""
    text = _SEP.join(keys)
    if text.count(_SEP) != len(keys) - 1:
        return None
    # key i starts after the lengths of the keys before it and i separators
    return _Joined(text, list(map(add, accumulate(map(len, keys), initial=0), count())))


_UNJOINABLE = _Joined("", [])  # keys that hold a NUL: searched one by one


class KeyText:
    """A list of keys that finds the keys containing a literal at memory speed.

    The keys are joined into one text once. A renamed KeyText shares that text and marks the keys that
    changed since it was joined; those are searched one by one, until they are more than an eighth of all
    keys and the text is joined again. (Splicing the text at every rename step cost more than the renames.)
    """

    def __init__(self, keys: list[str], joined: _Joined | None = None, stale: frozenset[int] = frozenset()) -> None:
        self.keys = keys
        self._joined = joined
        self._stale = stale  # indices of the keys that differ from the joined text

    def first_matches(self, patterns: Sequence[re.Pattern[str]]) -> dict[int, int]:
        """Key index -> index of the first pattern whose `search` finds that key; unmatched keys are left out."""
        found: dict[int, int] = {}
        keys = self.keys
        for number, pattern in enumerate(patterns):
            search = pattern.search
            for i in self.candidates(required_literals(pattern)):
                if i not in found and search(keys[i]):
                    found[i] = number
        return found

    def candidates(self, runs: tuple[str, ...]) -> Sequence[int]:
        """Indices of the keys that contain every run (the rarest run, judged on a sample, searched first)."""
        keys = self.keys
        if not runs:
            return range(len(keys))
        sample = keys[:: max(1, len(keys) // _SAMPLE)]
        ordered = sorted(runs, key=lambda run: sum(run in k for k in sample))
        indices = self.containing(ordered[0])
        for run in ordered[1:]:
            indices = [i for i in indices if run in keys[i]]
        return indices

    def containing(self, literal: str) -> list[int]:
        """Indices of the keys that contain `literal` (which holds no NUL), in order."""
        joined = self._current()
        if joined is _UNJOINABLE:
            return [i for i, k in enumerate(self.keys) if literal in k]
        # One hit per key: each match runs on to the end of its key, so the next search starts in the next key.
        starts = joined.starts
        found = [bisect_right(starts, m.start()) - 1 for m in re.finditer(re.escape(literal) + "[^\x00]*", joined.text)]
        stale = self._stale
        if not stale:
            return found
        keys = self.keys
        return sorted([i for i in found if i not in stale] + [i for i in stale if literal in keys[i]])

    def renamed(self, new: Mapping[int, str]) -> KeyText:
        """The keys with `new` (index -> key) replacing some; the joined text is shared, those keys marked."""
        keys = self.keys.copy()
        for i, key in new.items():
            keys[i] = key
        if self._joined is None or self._joined is _UNJOINABLE or not new:
            return KeyText(keys, self._joined, self._stale)
        return KeyText(keys, self._joined, self._stale.union(new))

    def _current(self) -> _Joined:
        """The joined text, joined (again) when there is none or too many keys changed since."""
        if self._joined is None or len(self._stale) * 8 > len(self.keys):
            self._joined = _join(self.keys) or _UNJOINABLE
            self._stale = frozenset()
        return self._joined


def first_matches(patterns: Sequence[re.Pattern[str]], keys: Sequence[str]) -> dict[int, int]:
    """Key index -> index of the first of `patterns` whose `search` finds that key; unmatched keys are left out."""
    return KeyText(list(keys)).first_matches(patterns)
