"""Key layouts as levels: the tensors of a level in order, with repeated blocks (`layers.0`, `layers.1`, ...) folded
into runs whose body is described once.

A run is a sequence of consecutive instances of one indexed container whose contents are identical (relative
names, shapes, dtypes). A module numbered in its own name and holding only parameters (`conv1`, `bn2`) is not a
container: in a name-sorted file `bn1`, `bn2`, `conv1`, `conv2` would otherwise fold into two runs where the other
side has one (`layer.0.{convolution,normalization}`). Aligning two layouts then aligns run bodies once, whatever
the number of instances, and the rest of each level as a small sequence: alignment is never quadratic across the
whole model.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import cast

from ckptx.dtypes import TensorMeta

__all__ = ["Leaf", "Level", "Run", "build_level", "hierarchical_order"]

_DIGITS = re.compile(r"\d+")


@dataclass(frozen=True)
class Leaf:
    """One tensor of a level; `key` is relative to the level's context (a run instance or the root)."""

    key: str
    meta: TensorMeta
    order: int


@dataclass(frozen=True)
class Run:
    """Consecutive instances of one indexed container with identical contents."""

    template: str  # e.g. 'stages.0.#': the instance prefix with its index abstracted
    prefixes: tuple[str, ...]  # the instances' prefixes, e.g. ('stages.0.0', 'stages.0.1')
    body: Level  # the contents of one instance (keys relative to its prefix)
    order: int  # position of the run's first tensor in the level

    @property
    def size(self) -> int:
        """Tensors per instance."""
        return self.body.count


@dataclass(frozen=True)
class Level:
    """The tensors of one context: single tensors (`leaves`) and runs, each with its position; `signature`
    is equal for levels with the same names, shapes and dtypes (run bodies aligned once per pair of them)."""

    leaves: tuple[Leaf, ...] = ()
    runs: tuple[Run, ...] = ()
    signature: int = 0

    @property
    def count(self) -> int:
        """Tensors in the level, runs counted in full."""
        return len(self.leaves) + sum(len(r.prefixes) * r.size for r in self.runs)

    def unrolled(self, run: Run, instances: Sequence[int] | None = None) -> tuple[list[Leaf], list[Run]]:
        """The leaves and inner runs of some instances of `run`, as members of this level (keys with prefixes)."""
        leaves: list[Leaf] = []
        runs: list[Run] = []
        for i in instances if instances is not None else range(len(run.prefixes)):
            prefix = run.prefixes[i] + "."
            base = run.order + i * run.size
            leaves.extend(Leaf(prefix + leaf.key, leaf.meta, base + leaf.order) for leaf in run.body.leaves)
            runs.extend(
                Run(prefix + inner.template, tuple(prefix + p for p in inner.prefixes), inner.body, base + inner.order)
                for inner in run.body.runs
            )
        return leaves, runs


def hierarchical_order(keys: Sequence[str]) -> list[str]:
    """`keys` with every module's tensors together, modules in order of first appearance (a depth-first walk of
    the name tree). A state dict is already in this order; a file that groups tensors otherwise (by dtype, say)
    is put back into it, so repeated blocks stay consecutive."""
    if _modules_contiguous(keys):
        return list(keys)
    root: dict = {}
    for key in keys:
        node = root
        for part in key.split("."):
            node = node.setdefault(part, {})
        node[None] = key
    out: list[str] = []
    stack = [iter(root.items())]
    while stack:
        item = next(stack[-1], None)
        if item is None:
            stack.pop()
            continue
        name, child = item
        if name is None:
            out.append(child)
        else:
            stack.append(iter(child.items()))
    return out


def _modules_contiguous(keys: Sequence[str]) -> bool:
    """True when the keys of every module, and of every numbered block, come together (any state dict, any
    name-sorted file): then the depth-first order is the order they have."""
    seen_parents: set[str] = set()
    seen_blocks: set[str] = set()
    last_parent = last_block = None
    for key in keys:
        parent = key.rpartition(".")[0]
        if parent != last_parent:
            if parent in seen_parents:
                return False
            seen_parents.add(parent)
            last_parent = parent
        match = _BLOCK.match(key)
        block = match.group(0) if match else ""
        if block != last_block:
            if block in seen_blocks and block:
                return False
            seen_blocks.add(block)
            last_block = block
    return True


_BLOCK = re.compile(r"^(?:[^.]*\.)*?[^.]*\d[^.]*\.")


def build_level(items: Sequence[tuple[str, TensorMeta]]) -> Level:
    """Fold `(key, meta)` pairs, in state-dict order, into a level with runs."""
    leaves: list[Leaf] = []
    runs: list[Run] = []
    _fill(leaves, runs, list(items), 0, 0)
    leaves.sort(key=lambda leaf: leaf.order)
    runs.sort(key=lambda run: run.order)
    return Level(tuple(leaves), tuple(runs), _signature(leaves, runs))


def _instance(key: str, start: int) -> tuple[int, str] | None:
    """(index of the first module component from `start` holding a number, the prefix up to it) or None."""
    parts = key.split(".")
    for i in range(start, len(parts) - 1):
        if _DIGITS.search(parts[i]):
            return i, ".".join(parts[: i + 1])
    return None


def _groups(items: list[tuple[str, TensorMeta]], start: int) -> Iterator[tuple[tuple[int, str] | None, list[int]]]:
    """Consecutive items with the same instance prefix (None: not inside any indexed container)."""
    current: tuple[int, str] | None = None
    members: list[int] = []
    for index, (key, _meta) in enumerate(items):
        inst = _instance(key, start)
        if members and inst == current and inst is not None:
            members.append(index)
            continue
        if members:
            yield current, members
        current, members = inst, [index]
    if members:
        yield current, members


def _fill(leaves: list[Leaf], runs: list[Run], items: list[tuple[str, TensorMeta]], start: int, offset: int) -> None:
    groups = list(_groups(items, start))
    i = 0
    while i < len(groups):
        inst, members = groups[i]
        if inst is None:
            leaves.extend(Leaf(items[m][0], items[m][1], offset + m) for m in members)
            i += 1
            continue
        position, prefix = inst
        template = _template(prefix, position)
        body = _body(items, members, prefix)
        j = i + 1
        while j < len(groups):
            other, other_members = groups[j]
            if other is None or other[0] != position or _template(other[1], position) != template:
                break
            if _body(items, other_members, other[1]) != body:
                break
            j += 1
        if j - i >= 2 and (prefix.split(".")[position].isdigit() or any("." in key for key, _, _ in body)):
            inner = build_level([(k[len(prefix) + 1 :], meta) for k, meta in (items[m] for m in members)])
            runs.append(
                Run(
                    template,
                    tuple(cast(tuple[int, str], groups[g][0])[1] for g in range(i, j)),
                    inner,
                    offset + members[0],
                )
            )
            i = j
            continue
        sub = [items[m] for m in members]
        _fill(leaves, runs, sub, position + 1, offset + members[0])
        i += 1


def _template(prefix: str, position: int) -> str:
    parts = prefix.split(".")
    parts[position] = _DIGITS.sub("#", parts[position])
    return ".".join(parts)


def _body(items: list[tuple[str, TensorMeta]], members: list[int], prefix: str) -> tuple:
    cut = len(prefix) + 1
    return tuple((items[m][0][cut:], items[m][1].shape, items[m][1].dtype) for m in members)


def _signature(leaves: Sequence[Leaf], runs: Sequence[Run]) -> int:
    return hash(
        (
            tuple((leaf.key, leaf.meta.shape, leaf.meta.dtype) for leaf in leaves),
            tuple((run.template, len(run.prefixes), run.body.signature) for run in runs),
        )
    )
