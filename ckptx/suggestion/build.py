"""From an alignment to recipe steps: drop, strip/add prefix, rename rows, split/merge, permute/reshape.

Each step is a plain mapping (the YAML document's form) plus the comments a reader needs; `emit` writes
them out. Split and merge steps work on intermediate names (`attn.qkv_proj.weight`) that the rename step
produces, so every rename row is an ordinary row.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ckptx.dtypes import TensorMeta
from ckptx.suggestion.generalize import cover, rename_rows
from ckptx.suggestion.match import Match
from ckptx.suggestion.shapes import Fit, JoinFit
from ckptx.suggestion.sources import Prefixes

__all__ = ["Decided", "StepText", "build_steps"]


@dataclass(frozen=True)
class Decided:
    """What the recipe must produce for one target key: from which source keys, with which op names."""

    sources: tuple[str, ...]
    ops: tuple[str, ...]


@dataclass(frozen=True)
class StepText:
    """One step as data for the YAML writer: the op, its value, a `comment:` and comments per rename row."""

    op: str
    value: Any
    comment: str | None = None
    row_comments: dict[int, list[str]] = field(default_factory=dict)


def _fused_name(components: Sequence[str]) -> str:
    """`q_proj, k_proj, v_proj` -> `qkv_proj`; `gate_proj, up_proj` -> `gate_up_proj`; `query, key` -> `query_key`."""
    words = [c.split("_") for c in components]
    head = 0
    while all(len(w) > head + 1 for w in words) and len({w[head] for w in words}) == 1:
        head += 1
    tail = 0
    while all(len(w) > head + tail + 1 for w in words) and len({w[-1 - tail] for w in words}) == 1:
        tail += 1
    middles = ["_".join(w[head : len(w) - tail]) for w in words]
    joiner = "" if all(len(m) == 1 for m in middles) else "_"
    parts = words[0][:head] + [joiner.join(middles)] + (words[0][len(words[0]) - tail :] if tail else [])
    return "_".join(p for p in parts if p)


def _varying_position(keys: Sequence[str]) -> int:
    split = [k.split(".") for k in keys]
    return next(i for i in range(len(split[0])) if len({s[i] for s in split}) > 1)


def build_steps(
    matches: Sequence[Match],
    dropped: Sequence[str],
    kept_unmatched: Sequence[str],
    source_keys: Sequence[str],
    prefixes: Prefixes,
    target: Mapping[str, TensorMeta],
    *,
    by_target_order: bool = False,
    literal_rows: bool = False,
    copies: Sequence[tuple[str, str]] = (),
) -> tuple[list[StepText], dict[str, Decided]]:
    """The recipe's steps and, per target key, what the steps must make of it (for the re-planning check).

    `matches` use source keys after prefix stripping and target keys without the added prefix;
    `dropped` source keys go to a `drop` step, `kept_unmatched` pass through unchanged. With
    `by_target_order`, rename rows follow the target's order (the source's own is alphabetical); with
    `literal_rows`, one exact row per renamed key. `copies` (final key, tied final key) become `copy` steps.
    """
    builder = _StepBuilder(prefixes.add_text, set(target) | {prefixes.add_text + k for k in kept_unmatched})
    for match in matches:
        {"tensor": builder.tensor, "split": builder.split, "merge": builder.merge}[match.kind](match)
    for key in kept_unmatched:
        builder.decided.setdefault(prefixes.add_text + key, Decided((key,), ()))
    steps: list[StepText] = []
    if prefixes.strip:
        value: Any = prefixes.strip_text if len(prefixes.strip) == 1 else [p + "." for p in prefixes.strip]
        steps.append(StepText("strip_prefix", value, "wrapper prefix shared by every source key"))
    if dropped:
        steps.append(
            StepText(
                "drop",
                cover(dropped, source_keys),
                f"{len(dropped)} source tensor(s) with no counterpart in the target",
            )
        )
    order = (
        _row_order(matches, source_keys, target, prefixes.add_text)
        if by_target_order
        else {k: i for i, k in enumerate(source_keys)}
    )
    steps += builder.rename_step(list(kept_unmatched), order, literal_rows)
    if prefixes.add:
        steps.append(StepText("add_prefix", prefixes.add_text, "prefix shared by every target key"))
    steps += builder.op_steps()
    for have, want in copies:
        builder.decided[want] = builder.decided[have]
        steps.append(
            StepText(
                "copy",
                {"match": f"^{re.escape(have)}$", "to": want},
                f"'{want}' is tied to '{have}' in the target model; the source stores it once",
            )
        )
    return steps, builder.decided


def _row_order(
    matches: Sequence[Match], source_keys: Sequence[str], target: Mapping[str, TensorMeta], add: str
) -> dict[str, int]:
    """Each source key's place by the target key it becomes (rows then read in the target model's order)."""
    position = {k: i for i, k in enumerate(target)}
    order: dict[str, int] = {}
    for match in matches:
        first = min(position.get(add + t, len(position)) for t in match.targets)
        for s in match.sources:
            order[s] = first
    return order


class _StepBuilder:
    """Collects, match by match, the renames (to final or intermediate names), the ops and the decisions."""

    def __init__(self, add: str, taken: set[str]) -> None:
        self.add = add
        self.taken = taken
        self.decided: dict[str, Decided] = {}
        self.renames: list[tuple[str, str]] = []
        self.comments: dict[str, list[str]] = defaultdict(list)
        self.splits: list[tuple[Match, str]] = []
        self.merges: list[tuple[Match, list[str]]] = []
        self.permutes: dict[tuple[int, ...], list[str]] = defaultdict(list)
        self.permute_notes: dict[tuple[int, ...], list[str]] = defaultdict(list)
        self.reshapes: dict[str, list[str]] = defaultdict(list)
        self.rotary: dict[tuple[int, int, int, tuple[int, ...]], list[str]] = defaultdict(list)

    def tensor(self, match: Match) -> None:
        """One source tensor to one target key, as is or through one op."""
        s, t = match.sources[0], match.targets[0]
        self.renames.append((s, t))
        f = match.fit
        assert isinstance(f, Fit)
        ops: tuple[str, ...] = ()
        if f.kind == "rotary":
            heads, head_dim, direction = f.dims
            self.rotary[(heads, head_dim, direction, f.shape)].append(self.add + t)
            ops = ("reshape", "permute", "reshape")
        elif f.kind == "permute":
            self.permutes[f.dims].append(self.add + t)
            ops = ("permute",)
            if match.note:
                self.permute_notes[f.dims].append(match.note)
        elif f.kind == "reshape":
            self.reshapes["[-1]" if len(f.shape) == 1 else "target"].append(self.add + t)
            ops = ("reshape",)
        self.decided[self.add + t] = Decided((s,), ops)
        if match.undecided:
            rival = f" or '{self.add + match.alternative}'" if match.alternative else ""
            self.comments[s].append(
                f"UNDECIDED: '{self.add + t}'{rival}: equal shapes, and neither names, module kinds nor structure "
                f"tell them apart (only position chose); rerun with --verify-with to decide"
            )
        elif match.alternative:
            self.comments[s].append(
                f"close call: '{self.add + t}' chosen over '{self.add + match.alternative}' "
                f"(same shape, similar evidence)"
            )

    def split(self, match: Match) -> None:
        """A fused source tensor renamed to an intermediate name (`...qkv_proj.weight`), then split."""
        (s,) = match.sources
        position = _varying_position(match.targets)
        parts = match.targets[0].split(".")
        fused = _fused_name([t.split(".")[position] for t in match.targets])
        middle = ".".join(parts[:position] + [fused] + parts[position + 1 :])
        while self.add + middle in self.taken:
            fused += "_fused"
            middle = ".".join(parts[:position] + [fused] + parts[position + 1 :])
        self.taken.add(self.add + middle)
        self.renames.append((s, middle))
        self.splits.append((match, self.add + middle))
        jf = match.fit
        assert isinstance(jf, JoinFit)
        for t in match.targets:
            self.decided[self.add + t] = Decided((s,), ("narrow",) + (("permute",) if jf.transpose else ()))
            if jf.transpose:
                self.permutes[(1, 0)].append(self.add + t)
        if match.note:
            self.comments[s].append(match.note)

    def merge(self, match: Match) -> None:
        """Sibling source tensors renamed to names beside the target (`...attn.q_proj.weight`), then merged."""
        (t,) = match.targets
        position = _varying_position(match.sources)
        members = [s.split(".")[position] for s in match.sources]
        depth = len(match.sources[0].split(".")) - position  # components from the varying one to the end
        tparts = t.split(".")
        at = min(max(len(tparts) - depth, 0), len(tparts) - 1)
        middles = []
        for member in members:
            name = ".".join(tparts[:at] + [member] + tparts[at + 1 :])
            while self.add + name in self.taken:
                name += "_part"
            self.taken.add(self.add + name)
            middles.append(name)
        self.renames.extend(zip(match.sources, middles))
        self.merges.append((match, [self.add + m for m in middles]))
        jf = match.fit
        assert isinstance(jf, JoinFit)
        self.decided[self.add + t] = Decided(tuple(match.sources), ("join",) + (("permute",) if jf.transpose else ()))
        if jf.transpose:
            self.permutes[(1, 0)].append(self.add + t)
        if match.note:
            self.comments[match.sources[0]].append(match.note)

    def rename_step(self, unchanged: list[str], order: Mapping[str, int], literal: bool = False) -> list[StepText]:
        """The rename step (none when every key keeps its name), close calls commented once per row."""
        rows = rename_rows(self.renames, unchanged, order=order, literal=literal)
        if not rows:
            return []
        row_comments: dict[int, list[str]] = {}
        for index, row in enumerate(rows):
            said, seen = [], set()
            for key in row.keys:
                for text in self.comments.get(key, ()):
                    shape = re.sub(r"\d+", "#", text)
                    if shape not in seen:  # once per row, not once per block
                        seen.add(shape)
                        said.append(text)
            if said:
                row_comments[index] = said[:2] + ([f"(and {len(said) - 2} more)"] if len(said) > 2 else [])
        return [StepText("rename", [[r.pattern, r.replacement] for r in rows], None, row_comments)]

    def op_steps(self) -> list[StepText]:
        """Split, merge, permute and reshape steps on the final names."""
        final_keys = list(self.decided)
        steps = _split_steps(self.splits, self.add) + _merge_steps(self.merges, self.add)
        for dims, keys in self.permutes.items():
            comment = "transpose (Conv1D <-> Linear layout)" if dims == (1, 0) else "permute dimensions"
            if self.permute_notes.get(dims):
                comment += "; " + self.permute_notes[dims][0]
            steps.append(StepText("permute", {"match": _one(cover(keys, final_keys)), "dims": list(dims)}, comment))
        for (heads, head_dim, direction, rotary_shape), keys in self.rotary.items():
            match = _one(cover(keys, final_keys))
            rest = list(rotary_shape[1:])
            split = [heads, head_dim // 2, 2, *rest] if direction == 0 else [heads, 2, head_dim // 2, *rest]
            pairs = "interleaved pairs -> two halves" if direction == 0 else "two halves -> interleaved pairs"
            steps += [
                StepText(
                    "reshape",
                    {"match": match, "shape": split},
                    f"rotary q/k rows, {pairs} within each of {heads} heads of {head_dim}: view per head ...",
                ),
                StepText("permute", {"match": match, "dims": [0, 2, 1, *range(3, 3 + len(rest))]}, "... swap ..."),
                StepText("reshape", {"match": match, "shape": list(rotary_shape)}, "... and back"),
            ]
        for spec, keys in self.reshapes.items():
            shape: Any = [-1] if spec == "[-1]" else "target"
            what = "to 1-d" if spec == "[-1]" else "to the target's shape (same elements: 1x1 conv <-> linear, ...)"
            steps.append(
                StepText(
                    "reshape",
                    {"match": _one(cover(keys, final_keys)), "shape": shape},
                    f"{len(keys)} tensor(s) reshaped {what}",
                )
            )
        return steps


def _one(patterns: list[str]) -> str:
    """Several alternative regexes as one (`a|b`), each kept intact by a group."""
    if len(patterns) == 1:
        return patterns[0]
    return "|".join(f"(?:{p})" for p in patterns)


def _head_regex(heads: Sequence[str]) -> str:
    """One regex for the leading parts `heads` (numbers as `\\d+`), alternatives when their templates differ."""
    templates = sorted({re.sub(r"\d+", "#", h) for h in heads})
    alternatives = [re.escape(t).replace("\\#", "#").replace("#", r"\d+") for t in templates]
    return alternatives[0] if len(alternatives) == 1 else "(?:" + "|".join(alternatives) + ")"


def _fused_step(
    op: str, items: list[tuple[list[str], list[list[str]], str]], position: int, extra: dict[str, Any], comment: str
) -> StepText:
    """A split or merge step for keys that differ only in the component at `position`.

    Each item is (fused key's parts, the parts' keys' parts, name of the fused component); split takes the
    fused key and names `into`, merge takes the first part and names `inputs` and `to`.
    """
    fused_parts, piece_parts, _ = items[0]
    heads = [".".join(f[:position]) for f, _, _ in items]
    rest = fused_parts[position + 1 :]
    head_re = _head_regex(heads) if position else ""
    lasts = sorted({f[-1] for f, _, _ in items}) if rest else []
    group = 1 if position else 0
    head_ref = f"\\{group}." if position else ""
    if len(lasts) == 1:  # one last name (`weight`): written out, no group needed
        mid, mid_plain = "".join("\\." + re.escape(r) for r in rest), "".join("." + r for r in rest)
        last_re, last_ref, rest = "", "", []
    else:
        mid = "".join("\\." + re.escape(r) for r in rest[:-1])
        mid_plain = "".join("." + r for r in rest[:-1])
        last_re = "|".join(lasts) if rest else ""
        last_ref = f".\\{group + 1}" if rest else ""

    def pattern(component: str) -> str:
        start = f"^({head_re})\\." if position else "^"
        end = f"{mid}\\.({last_re})$" if rest else f"{mid}$"
        return f"{start}{re.escape(component)}{end}"

    def template(component: str) -> str:
        return f"{head_ref}{component}{mid_plain}{last_ref}"

    fused_name = fused_parts[position]
    members = [p[position] for p in piece_parts]
    if op == "split":
        value: dict[str, Any] = {"match": pattern(fused_name), "into": [template(m) for m in members], **extra}
    else:
        value = {
            "match": pattern(members[0]),
            "inputs": [template(m) for m in members],
            "to": template(fused_name),
            **extra,
        }
    return StepText(op, value, comment)


def _split_steps(splits: list[tuple[Match, str]], add: str) -> list[StepText]:
    groups: dict[tuple, list[tuple[list[str], list[list[str]], str]]] = defaultdict(list)
    positions: dict[tuple, int] = {}
    for match, middle in splits:
        jf = match.fit
        assert isinstance(jf, JoinFit)
        targets = [add + t for t in match.targets]
        position = _varying_position(targets)
        fparts = middle.split(".")
        pieces = [t.split(".") for t in targets]
        key = (
            tuple(p[position] for p in pieces),
            fparts[position],
            tuple(fparts[position + 1 : -1]),
            len(fparts) - position,
            jf.dim,
            jf.sizes,
            jf.transpose,
            match.evidence,
        )
        groups[key].append((fparts, pieces, fparts[position]))
        positions[key] = position
    out = []
    for key, items in groups.items():
        members, fused, _, _, dim, sizes, _transpose, evidence = key
        extra: dict[str, Any] = {}
        if dim:
            extra["dim"] = dim
        if len(set(sizes)) > 1:
            extra["sizes"] = list(sizes)
        out.append(
            _fused_step(
                "split", items, positions[key], extra, f"'{fused}' split into {', '.join(members)} ({evidence})"
            )
        )
    return out


def _merge_steps(merges: list[tuple[Match, list[str]]], add: str) -> list[StepText]:
    groups: dict[tuple, list[tuple[list[str], list[list[str]], str]]] = defaultdict(list)
    positions: dict[tuple, int] = {}
    for match, middles in merges:
        jf = match.fit
        assert isinstance(jf, JoinFit)
        position = _varying_position(middles)
        target = (add + match.targets[0]).split(".")
        pieces = [m.split(".") for m in middles]
        key = (
            tuple(p[position] for p in pieces),
            target[position],
            tuple(target[position + 1 : -1]),
            len(target) - position,
            jf.dim,
            jf.transpose,
            match.evidence,
        )
        groups[key].append((target, pieces, target[position]))
        positions[key] = position
    out = []
    for key, items in groups.items():
        members, fused, _, _, dim, _transpose, evidence = key
        extra: dict[str, Any] = {"dim": dim} if dim else {}
        out.append(
            _fused_step(
                "merge", items, positions[key], extra, f"{', '.join(members)} concatenated into '{fused}' ({evidence})"
            )
        )
    return out
