"""Unpickling untrusted bytes without crashing the process on deep nesting.

Every unpickler ckptx runs imports and calls nothing, but the objects it builds are still Python objects: a dict
key that is a tuple nested 200,000 deep is hashed while the pickle loads, and CPython hashes a tuple by recursing
in C, without a depth check; past about 100,000 levels the thread's stack overflows and the process dies
(SIGSEGV), whatever the unpickler. `load` runs an unpickler so that cannot happen:

- each level of tuple (or frozenset) nesting costs one opcode byte, so the count of those opcode bytes in the
  pickle bounds its depth (a C-speed count, an upper bound: the bytes also occur in arguments);
- under `_INLINE` levels the pickle is loaded where it is (any thread's stack holds them);
- under `_THREAD` levels it is loaded on a thread with a `_STACK`-byte stack (address space; only what the
  recursion touches becomes memory);
- above that, the opcodes are walked once (`nesting`) and the pickle is refused when it nests deeper than
  `MAX_NESTING`, before anything is built.
"""

from __future__ import annotations

import pickletools
import threading
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

from ckptx.errors import NoBigStack, SourceError

__all__ = ["MAX_NESTING", "load", "nesting", "nesting_bound"]

MAX_NESTING = 100_000
"""Tuple levels a pickle may nest (a checkpoint's pickle nests a handful)."""
_INLINE = 20_000  # levels any thread's stack hashes safely (an 8 MiB stack takes 100,000+)
_THREAD = 1_000_000  # levels a `_STACK` thread hashes safely (~64 bytes a level)
_STACK = 256 << 20
_TUPLE_OPS = (b"\x85", b"\x86", b"\x87", b"t", b"\x91")  # TUPLE1, TUPLE2, TUPLE3, TUPLE, FROZENSET


def nesting_bound(data: bytes) -> int:
    """An upper bound of how deep tuples nest in the pickle `data` (its tuple-building opcode bytes)."""
    return sum(data.count(op) for op in _TUPLE_OPS)


def load(
    unpickler_load: Callable[[], Any],
    bound: int,
    shown: str,
    stream: Callable[[], BinaryIO] | None,
    *,
    pickles: int = 1,
) -> Any:
    """`unpickler_load()`, run safely for a pickle whose tuples nest at most `bound` deep (`nesting_bound`);
    `stream()` gives the bytes of the `pickles` pickles it reads from their start, to measure the real depth
    when `bound` is too high."""
    if bound <= _INLINE:
        return unpickler_load()
    depth = None
    if bound > _THREAD:
        depth = _checked_depth(stream, shown, pickles)
    try:
        return _on_big_stack(unpickler_load)
    except NoBigStack:  # no thread could be started (an address-space limit): inline, when shallow enough
        if depth is None:
            depth = _checked_depth(stream, shown, pickles)
        if depth > _INLINE:
            raise SourceError(
                f"{shown}: its pickle nests tuples {depth:,} deep and no thread with a stack for that could be "
                f"started here; the file is corrupt or hostile"
            ) from None
        return unpickler_load()


def _checked_depth(stream: Callable[[], BinaryIO] | None, shown: str, pickles: int) -> int:
    if stream is None:
        depth = 0
    else:
        with stream() as data:
            depth = nesting(data, pickles, stop_past=MAX_NESTING)
    if depth > MAX_NESTING:
        raise SourceError(
            f"{shown}: its pickle nests tuples more than {MAX_NESTING:,} deep (a checkpoint nests a handful); the "
            f"file is corrupt or hostile"
        )
    return depth


_START = threading.Lock()  # threading.stack_size is process-wide: set only around one thread's start


def _on_big_stack(function: Callable[[], Any]) -> Any:
    """`function()` on a thread with a `_STACK`-byte stack; its result, or its exception raised here."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = function()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread, which raises it
            outcome["error"] = exc

    with _START:
        try:
            previous = threading.stack_size(_STACK)
        except (ValueError, RuntimeError):
            raise NoBigStack from None
        try:
            thread = threading.Thread(target=run, name="ckptx-unpickle", daemon=True)
            thread.start()
        except RuntimeError:
            raise NoBigStack from None
        finally:
            threading.stack_size(previous)
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def nesting(data: BinaryIO, pickles: int = 1, *, stop_past: int | None = None) -> int:
    """How deep tuples and frozensets nest in the `pickles` pickles read one after another from `data` (their
    opcodes walked once, nothing built); as far as they can be walked (the unpickler reports what is wrong).
    With `stop_past`, the walk stops at the first depth past it (that depth is returned)."""
    deepest = 0
    try:
        for _ in range(pickles):
            for depth in _depths(pickletools.genops(data)):
                deepest = max(deepest, depth)
                if stop_past is not None and deepest > stop_past:
                    return deepest
    except Exception:  # noqa: BLE001 - malformed past here: the unpickler says how when it gets there
        return deepest
    return deepest


def _depths(ops: Iterator[tuple[Any, Any, Any]]) -> Iterator[int]:
    """The tuple depth of every object the opcodes build (lists and dicts count 0: they cannot be hashed)."""
    stack: list[int] = []
    marks: list[int] = []
    memo: dict[Any, int] = {}
    for op, arg, _ in ops:
        name = op.name
        if name == "MARK":
            marks.append(len(stack))
            continue
        if name in ("TUPLE", "FROZENSET"):
            start = marks.pop()
            depth = 1 + max(stack[start:], default=0)
            del stack[start:]
            stack.append(depth)
            yield depth
            continue
        if name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            count = {"TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}[name]
            depth = 1 + max(stack[-count:], default=0)
            del stack[-count:]
            stack.append(depth)
            yield depth
            continue
        if name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = stack[-1] if stack else 0
            continue
        if name == "MEMOIZE":
            memo[len(memo)] = stack[-1] if stack else 0
            continue
        if name in ("GET", "BINGET", "LONG_BINGET"):
            stack.append(memo.get(arg, 0))
            continue
        if name == "STOP":
            return
        if pickletools.markobject in op.stack_before:
            start = marks.pop()
            below = op.stack_before.index(pickletools.markobject)
            inner = max(stack[start:], default=0)
            del stack[start - below :]
            stack.extend([inner] * len(op.stack_after))  # a list or dict holding them: kept as their depth
            continue
        taken = len(op.stack_before)
        inner = max(stack[len(stack) - taken :], default=0) if taken else 0
        if taken:
            del stack[len(stack) - taken :]
        stack.extend([inner] * len(op.stack_after))  # REDUCE, NEWOBJ, BUILD: what they build may hold them
