"""Reverse a recipe: the inverse of every step, in reverse order, or the first step that has none.

Key steps invert from the rule text alone when their patterns map one-to-one: a pattern made of
literal text and capture groups, and a replacement that uses each group exactly once (index
arithmetic `{\\1 - 1}` inverts to `{\\1 + 1}`). Steps whose inverse depends on data the rule does not
state (the shape a reshape started from, the dtype a cast started from, the sizes a `cat` merged)
need a trace: the forward recipe planned on a checkpoint, manifest or model in its source layout
(`StepTrace` per step). With a trace, key steps that have no general inverse fall back to an exact
table of the keys they renamed. No torch here: metadata is duck-typed (`.shape`, `.dtype`).
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from ckptx.dtypes import lossless_casts
from ckptx.errors import Problem, RuleError
from ckptx.rules.flatten import flatten
from ckptx.rules.recipe import Recipe
from ckptx.rules.steps import (AddPrefix, Cast, Copy, Merge, Permute, Rename, Reshape, SetTensor, Split, Squeeze, Step,
                               StripPrefix, Unsqueeze)
from ckptx.rules.templates import Expression, Template

Doc = dict[str, Any]



@dataclass(frozen=True)
class StepTrace:
    """One step planned on a known layout: (key, meta) before it and after it (after=None: it did not run)."""

    before: list[tuple[str, Any]]
    after: list[tuple[str, Any]] | None


class NotInvertible(Exception):
    """A step has no inverse; the message says why."""


def invert_recipe(recipe: Recipe, traces: Sequence[StepTrace | None] | None = None) -> Doc:
    """The reverse recipe as a rule document; RuleError naming the first step that is not invertible."""
    inverses: list[tuple[Step, list[Doc]]] = []
    for index, step in enumerate(recipe.steps):
        trace = traces[index] if traces is not None else None
        try:
            if not _runs(step, recipe.params, trace):
                continue
            inverses.append((step, _INVERTERS.get(step.op, _never)(step, trace)))
        except NotInvertible as exc:
            hint = "" if trace is not None or not _needs_trace(exc) else \
                "; give the source layout (--original CHECKPOINT|MANIFEST|module:callable)"
            raise RuleError([Problem(step.where, f"{step.op} is not invertible: {exc}{hint}")]) from None
    steps = [{**inverse, "comment": f"inverse of {step.where}"} for step, docs in reversed(inverses) for inverse in docs]
    doc: Doc = {"ckptx": 1, "name": f"{recipe.name}/reverse", "description": f"Reverse of {recipe.name}"}
    doc["steps"] = steps
    doc.update(_swapped_target_and_verify(recipe))
    return doc


def _needs_trace(exc: NotInvertible) -> bool:
    return "source layout" in str(exc)


def _runs(step: Step, params: Mapping[str, Any], trace: StepTrace | None) -> bool:
    """Whether the forward step ran (known from the trace or from `when: param`)."""
    if trace is not None:
        return trace.after is not None
    when = step.when
    if when is None:
        return True
    if any(params.get(name) != value for name, value in when.params):
        return False
    if when.has_key is not None or when.no_key is not None or when.extracted_from is not None:
        raise NotInvertible("whether it runs depends on the checkpoint (when: has_key/no_key/extracted_from); "
                            "the source layout is needed")
    return True


def _swapped_target_and_verify(recipe: Recipe) -> Doc:
    """The reverse's target is the forward's verify source model; its verify runs the forward target."""
    out: Doc = {}
    verify, target = recipe.verify, recipe.target
    if verify is not None:
        out["target"] = {"model": verify.source_model, "kwargs": dict(verify.source_kwargs)}
    if verify is not None and target is not None and target.model:
        flat = flatten(recipe)["verify"]
        flat.update(source_model=target.model, source_kwargs=dict(target.kwargs))
        out["verify"] = flat
    return out


# --- patterns and templates as literal text and groups -------------------------------------------------------


@dataclass(frozen=True)
class _Group:
    number: int
    name: str | None
    body: str


@dataclass(frozen=True)
class _Ref:
    group: int | str  # a group number, or "i" for a split/merge piece number
    offset: int = 0


@dataclass(frozen=True)
class _Swap:
    """A one-to-one pattern/template pair turned around."""

    pattern: str  # regex matching what the template produced
    template: str  # rebuilds what the pattern matched
    renumber: dict[int | str, int] = field(default_factory=dict)  # forward group -> group of `pattern`
    groups: tuple[_Group, ...] = ()

    def rewrite(self, template: Template, *, what: str) -> str:
        """Another template over the forward groups, expressed over the groups of `pattern`."""
        out = []
        for part in _template_parts(template, self.groups):
            if isinstance(part, str):
                out.append(_escape_replacement(part))
            elif part.offset or part.group not in self.renumber:
                raise NotInvertible(f"{what} {template.text!r} uses a group the first key does not keep")
            else:
                out.append(f"\\g<{self.renumber[part.group]}>")
        return _tidy("".join(out))


def _parse_pattern(text: str) -> tuple[bool, bool, tuple[str | _Group, ...]]:
    """(anchored at start, anchored at end, literal text and capture groups), or NotInvertible."""
    start = text.startswith("^")
    end = text.endswith("$") and not text.endswith("\\$")
    i, stop = (1 if start else 0), (len(text) - 1 if end else len(text))
    parts: list[str | _Group] = []
    literal, number = "", 0
    while i < stop:
        char = text[i]
        if char == "\\":
            following = text[i + 1] if i + 1 < stop else ""
            if not following or following.isalnum():
                raise NotInvertible(f"pattern {text!r}: '\\{following}' outside a group matches more than one text")
            literal, i = literal + following, i + 2
            continue
        if char == "(":
            close = _closing(text, i)
            inner = text[i + 1:close]
            if close + 1 < stop and text[close + 1] in "*+?{":
                raise NotInvertible(f"pattern {text!r}: a repeated group")
            name = None
            if inner.startswith("?P<"):
                name, inner = inner[3:inner.index(">")], inner[inner.index(">") + 1:]
            elif inner.startswith("?"):
                raise NotInvertible(f"pattern {text!r}: '({inner})' outside a capture group")
            if re.compile(inner).groups:
                raise NotInvertible(f"pattern {text!r}: nested capture groups")
            number += 1
            parts += ([literal] if literal else []) + [_Group(number, name, inner)]
            literal, i = "", close + 1
            continue
        if char in ".^$*+?{}[]|)":
            raise NotInvertible(f"pattern {text!r}: '{char}' outside a group matches more than one text")
        literal, i = literal + char, i + 1
    return start, end, tuple(parts + ([literal] if literal else []))


def _closing(text: str, open_at: int) -> int:
    depth, i, in_class = 0, open_at, False
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if in_class:
            in_class = char != "]"
        elif char == "[":
            in_class = True
        elif char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    raise NotInvertible(f"pattern {text!r}: unbalanced parentheses")


_LITERAL_TOKENS = re.compile(r"\\g<(\w+)>|\\(\d+)|\\(.)|([^\\]+)", re.S)


def _template_parts(template: Template, groups: Sequence[_Group]) -> list[str | _Ref]:
    """A template as literal text and group references (with a +/- offset from index arithmetic)."""
    names = {g.name: g.number for g in groups if g.name}
    out: list[str | _Ref] = []
    for part in template.parts:
        if isinstance(part, Expression):
            out.append(_expression_ref(part, names, template.text))
            continue
        for named, number, escaped, text in _LITERAL_TOKENS.findall(part):
            ref = named or number
            if ref:
                out.append(_Ref(int(ref) if ref.isdigit() else names.get(ref, ref)))
            elif escaped:
                if escaped.isalnum():
                    raise NotInvertible(f"template {template.text!r}: escape '\\{escaped}'")
                out.append(escaped)
            else:
                out.append(text)
    merged: list[str | _Ref] = []
    for item in out:
        if isinstance(item, str) and merged and isinstance(merged[-1], str):
            merged[-1] += item
        else:
            merged.append(item)
    return merged


def _expression_ref(expression: Expression, names: Mapping[str, int], text: str) -> _Ref:
    """`{\\N}`, `{\\N + c}`, `{\\N - c}`, `{i + c}` as a reference with an offset; anything else is lossy."""
    tree = expression.tree

    def ref_of(node: ast.expr) -> int | str | None:
        if not isinstance(node, ast.Name):
            return None
        name = node.id[2:] if node.id.startswith("_g") else node.id
        return int(name) if name.isdigit() else names.get(name, name)

    if ref_of(tree) is not None:
        return _Ref(ref_of(tree))  # type: ignore[arg-type]
    if isinstance(tree, ast.BinOp) and isinstance(tree.op, (ast.Add, ast.Sub)):
        left, right = tree.left, tree.right
        if ref_of(left) is not None and isinstance(right, ast.Constant):
            return _Ref(ref_of(left), right.value if isinstance(tree.op, ast.Add) else -right.value)  # type: ignore[arg-type]
        if isinstance(tree.op, ast.Add) and ref_of(right) is not None and isinstance(left, ast.Constant):
            return _Ref(ref_of(right), left.value)  # type: ignore[arg-type]
    raise NotInvertible(f"template {text!r}: only {{\\N + c}} and {{\\N - c}} can be undone, "
                        f"not {{{expression.text}}}")


def _swap(pattern: str, template: Template, *, whole: bool, spare: tuple[int | str, ...] = ()) -> _Swap:
    """Turn a pattern/template pair around; every group except `spare` must be used exactly once."""
    start, end, pattern_parts = _parse_pattern(pattern)
    if whole and not (start and end):
        raise NotInvertible(f"pattern {pattern!r} must match whole keys (^...$) to be undone")
    groups = tuple(p for p in pattern_parts if isinstance(p, _Group))
    template_parts = _template_parts(template, groups)
    refs = [p for p in template_parts if isinstance(p, _Ref)]
    used = [r.group for r in refs]
    for group in groups:
        if group.number not in used and group.number not in spare:
            raise NotInvertible(f"{template.text!r} does not use group {group.number} ({group.body}) of "
                                f"{pattern!r}: the keys it matches cannot be told apart afterwards")
    for ref in set(used):
        if used.count(ref) > 1:
            raise NotInvertible(f"{template.text!r} uses group {ref} twice")
    for a, b in zip(template_parts, template_parts[1:]):
        if isinstance(a, _Ref) and isinstance(b, _Ref):
            raise NotInvertible(f"{template.text!r}: two groups with nothing between them cannot be split again")
    by_number = {g.number: g for g in groups}
    regex, renumber = ["^" if start else ""], {}
    for part in template_parts:
        if isinstance(part, str):
            regex.append(re.escape(part))
            continue
        renumber[part.group] = len(renumber) + 1
        numeric = part.offset or part.group == "i"
        regex.append("(" + (r"\d+" if numeric else by_number[part.group].body) + ")")  # type: ignore[index]
    regex.append("$" if end else "")
    offsets = {r.group: r.offset for r in refs}
    rebuilt = []
    for part in pattern_parts:
        if isinstance(part, str):
            rebuilt.append(_escape_replacement(part))
        elif part.number in renumber:
            rebuilt.append(_shifted(renumber[part.number], -offsets[part.number]))
        else:
            rebuilt.append(_spare(part.number))  # filled in by the caller
    return _Swap("".join(regex), _tidy("".join(rebuilt)), renumber, groups)


def _spare(number: int | str) -> str:
    """A placeholder for a group the template does not use (merge's index group)."""
    return f"\x00{number}\x00"


def _shifted(group: int, offset: int) -> str:
    if not offset:
        return f"\\g<{group}>"
    return f"{{\\g<{group}> {'+' if offset > 0 else '-'} {abs(offset)}}}"


def _tidy(template: str) -> str:
    """`\\g<1>` -> `\\1` where no digit follows."""
    return re.sub(r"\\g<(\d+)>(?!\d)", r"\\\1", template)


def _escape_replacement(text: str) -> str:
    return text.replace("\\", "\\\\")


def _literal_prefix(regex: str) -> int:
    match = re.match(r"\^?((?:\\.|[^\\()\[.*+?{|$])*)", regex)
    return len(match.group(1)) if match else 0


# --- step inverses -------------------------------------------------------------------------------------------


def _never(step: Step, trace: StepTrace | None) -> list[Doc]:
    reasons = {"drop": "the dropped tensors are gone", "keep": "the tensors it leaves out are gone",
               "take_from": "the replaced tensors are gone", "slice": "the sliced-off part is gone",
               "resize": "the rows it cuts or adds are not recorded",
               "resample_pos_embed": "interpolation loses information",
               "adapt_in_channels": "the original channels are mixed", "scale": "rounding makes it lossy"}
    raise NotInvertible(reasons.get(step.op, "no inverse is known"))


def _exact_table(trace: StepTrace | None, reason: str) -> list[Doc]:
    """A rename table of exactly the keys the step renamed (needs a trace of a one-to-one renaming)."""
    if trace is None or trace.after is None:
        raise NotInvertible(f"{reason}; the source layout is needed to list the keys it renamed")
    if len(trace.before) != len(trace.after):
        raise NotInvertible(reason)
    rows = [[f"^{re.escape(new)}$", _escape_replacement(old)]
            for (old, _), (new, _) in zip(trace.before, trace.after) if old != new]
    return [{"rename": rows}] if rows else []


def _invert_rename(step: Step, trace: StepTrace | None) -> list[Doc]:
    args: Rename = step.args  # type: ignore[assignment]
    try:
        rows = []
        for rule in args.rules:
            assert rule.template is not None
            swapped = _swap(rule.pattern.pattern, rule.template, whole=False)
            rows.append([swapped.pattern, swapped.template])
    except NotInvertible as exc:
        return _exact_table(trace, str(exc))
    rows.sort(key=lambda row: -_literal_prefix(row[0]))
    return [{"rename": rows}]


def _invert_add_prefix(step: Step, trace: StepTrace | None) -> list[Doc]:
    args: AddPrefix = step.args  # type: ignore[assignment]
    if args.match is None and args.skip is None:
        return [{"rename": [[f"^{re.escape(args.prefix)}", ""]]}]
    return _exact_table(trace, "with match/skip, which keys got the prefix depends on the checkpoint")


def _invert_strip_prefix(step: Step, trace: StepTrace | None) -> list[Doc]:
    args: StripPrefix = step.args  # type: ignore[assignment]
    if trace is not None and trace.after is not None:
        stripped = {old[:len(old) - len(new)] for (old, _), (new, _) in zip(trace.before, trace.after)}
        if len(stripped) == 1 and "" not in stripped:
            return [{"add_prefix": stripped.pop()}]
        return _exact_table(trace, "not every key lost the same prefix")
    if len(args.prefixes) == 1 and not args.common:
        return [{"add_prefix": args.prefixes[0]}]
    raise NotInvertible("which prefix each key lost depends on the checkpoint; the source layout is needed")


def _invert_permute(step: Step, trace: StepTrace | None) -> list[Doc]:
    args: Permute = step.args  # type: ignore[assignment]
    inverse = [args.dims.index(d) for d in range(len(args.dims))]
    return [{"permute": {"match": args.match.pattern, "dims": inverse}}]


def _invert_unsqueeze(step: Step, trace: StepTrace | None) -> list[Doc]:
    args: Unsqueeze = step.args  # type: ignore[assignment]
    inverse = "unsqueeze" if isinstance(args, Squeeze) else "squeeze"
    return [{inverse: {"match": args.match.pattern, "dim": args.dim}}]


def _changed(trace: StepTrace | None, what: str) -> list[tuple[str, Any, Any]]:
    """(key, meta before, meta after) of each tensor the step changed; needs a trace."""
    if trace is None or trace.after is None:
        raise NotInvertible(f"the {what} it started from are not in the rule; the source layout is needed")
    before = dict(trace.before)
    return [(key, before[key], meta) for key, meta in trace.after
            if key in before and (before[key].shape != meta.shape or before[key].dtype != meta.dtype)]


def _all_matched_changed(pattern: re.Pattern[str], trace: StepTrace | None, changed: list[tuple[str, Any, Any]]) -> bool:
    """True when the step changed every key its pattern matches (so the pattern can select the inverse too)."""
    matched = {k for k, _ in (trace.after or []) if pattern.search(k)} if trace is not None else set()
    return matched == {k for k, _, _ in changed}


def _exact_keys(keys: Sequence[str]) -> str:
    return "^(?:" + "|".join(re.escape(k) for k in keys) + ")$"


def _invert_reshape(step: Step, trace: StepTrace | None) -> list[Doc]:
    args: Reshape = step.args  # type: ignore[assignment]
    changed = _changed(trace, "shapes")
    originals = {tuple(old.shape) for _, old, _ in changed}
    general = list(next(iter(originals))) if len(originals) == 1 else _one_free_dim(originals)
    if _all_matched_changed(args.match, trace, changed):
        if general is not None:
            return [{"reshape": {"match": args.match.pattern, "shape": general}}]
        padding = _trailing_ones(changed)
        if padding:
            op = "unsqueeze" if padding > 0 else "squeeze"
            return [{op: {"match": args.match.pattern, "dim": -1}} for _ in range(abs(padding))]
    groups: dict[tuple[int, ...], list[str]] = {}
    for key, old, _ in changed:
        groups.setdefault(tuple(old.shape), []).append(key)
    return [{"reshape": {"match": _exact_keys(keys), "shape": list(shape)}} for shape, keys in groups.items()]


def _trailing_ones(changed: list[tuple[str, Any, Any]]) -> int:
    """k when every original shape is its new shape with k trailing 1s (-k: with k trailing 1s removed), else 0."""
    counts = set()
    for _, old, new in changed:
        short, long_ = sorted((tuple(old.shape), tuple(new.shape)), key=len)
        pad = long_[len(short):]
        if long_[:len(short)] != short or not pad or set(pad) != {1}:
            return 0
        counts.add(len(pad) if len(old.shape) > len(new.shape) else -len(pad))
    return counts.pop() if len(counts) == 1 else 0


def _one_free_dim(shapes: set[tuple[int, ...]]) -> list[int] | None:
    """Shapes of one rank that differ in exactly one dimension -> that shape with -1 there."""
    if len({len(s) for s in shapes}) != 1:
        return None
    columns = list(zip(*shapes))
    free = [i for i, column in enumerate(columns) if len(set(column)) > 1]
    if len(free) != 1:
        return None
    return [-1 if i == free[0] else column[0] for i, column in enumerate(columns)]


def _invert_cast(step: Step, trace: StepTrace | None) -> list[Doc]:
    args: Cast = step.args  # type: ignore[assignment]
    changed = _changed(trace, "dtypes")
    groups: dict[str, list[str]] = {}
    for key, old, new in changed:
        if new.dtype not in lossless_casts(old.dtype):
            raise NotInvertible(f"casting '{key}' from {old.dtype} to {new.dtype} loses information")
        groups.setdefault(old.dtype, []).append(key)
    if len(groups) == 1 and _all_matched_changed(args.match, trace, changed):
        return [{"cast": {"match": args.match.pattern, "dtype": next(iter(groups)), "include_integer": True}}]
    return [{"cast": {"match": _exact_keys(keys), "dtype": dtype, "include_integer": True}}
            for dtype, keys in groups.items()]


def _invert_split(step: Step, trace: StepTrace | None) -> list[Doc]:
    args: Split = step.args  # type: ignore[assignment]
    swapped = _swap(args.match.pattern, args.into[0], whole=True)
    merge: Doc = {"match": swapped.pattern, "to": swapped.template, "dim": args.dim, "stack": args.unbind}
    if args.indexed:
        offset = next(p.offset for p in _template_parts(args.into[0], swapped.groups) if isinstance(p, _Ref)
                      and p.group == "i")
        merge["index"] = _tidy(_shifted(swapped.renumber["i"], -offset))
    else:
        merge["inputs"] = [swapped.rewrite(t, what="split key") for t in args.into]
    return [{"merge": merge}]


def _invert_merge(step: Step, trace: StepTrace | None) -> list[Doc]:
    args: Merge = step.args  # type: ignore[assignment]
    groups = tuple(p for p in _parse_pattern(args.match.pattern)[2] if isinstance(p, _Group))
    index_ref = None
    if args.index is not None:
        parts = _template_parts(args.index, groups)
        if len(parts) != 1 or not isinstance(parts[0], _Ref):
            raise NotInvertible(f"index {args.index.text!r} must be one group reference")
        index_ref = parts[0]
    swapped = _swap(args.match.pattern, args.to, whole=True, spare=(index_ref.group,) if index_ref else ())
    split: Doc = {"match": swapped.pattern, "dim": args.dim}
    if index_ref is not None:
        piece = "{i}" if not index_ref.offset else f"{{i {'-' if index_ref.offset > 0 else '+'} {abs(index_ref.offset)}}}"
        split["into"] = swapped.template.replace(_spare(index_ref.group), piece)
    else:
        split["into"] = [swapped.rewrite(t, what="merge input") for t in args.inputs]
    if args.stack:
        return [{"split": {**split, "unbind": True}}]
    sizes = _merged_sizes(args, trace)
    if len(set(sizes)) > 1:
        split["sizes"] = sizes
    elif index_ref is not None:
        split["parts"] = len(sizes)
    return [{"split": split}]


def _merged_sizes(args: Merge, trace: StepTrace | None) -> list[int]:
    """The sizes along dim of the pieces each merge concatenated (the same for every merged key)."""
    if trace is None or trace.after is None:
        raise NotInvertible("the sizes of the concatenated pieces are not in the rule; the source layout is needed")
    before = dict(trace.before)
    pieces: dict[str, dict[int, int]] = {}
    for key, meta in trace.before:
        match = args.match.search(key)
        if match is None:
            continue
        to = args.to.expand(match)
        if args.index is not None:
            pieces.setdefault(to, {})[int(args.index.expand(match))] = _dim_size(meta.shape, args.dim)
        else:
            names = [t.expand(match) for t in args.inputs]
            pieces[to] = {i: _dim_size(before[n].shape, args.dim) for i, n in enumerate(names) if n in before}
    found = {tuple(sizes[i] for i in sorted(sizes)) for sizes in pieces.values()}
    if len(found) != 1:
        raise NotInvertible("the merged keys concatenate pieces of different sizes; no single split undoes them")
    return list(found.pop())


def _dim_size(shape: Sequence[int], dim: int) -> int:
    return shape[dim if dim >= 0 else len(shape) + dim]


def _invert_copy(step: Step, trace: StepTrace | None) -> list[Doc]:
    args: Copy = step.args  # type: ignore[assignment]
    return [{"drop": [_swap(args.match.pattern, args.to, whole=True).pattern]}]


def _invert_set(step: Step, trace: StepTrace | None) -> list[Doc]:
    args: SetTensor = step.args  # type: ignore[assignment]
    if args.if_exists == "replace":
        raise NotInvertible("if_exists: replace overwrites tensors")
    if trace is not None and trace.after is not None:
        made = [k for k, _ in trace.after if k not in dict(trace.before)]
        return [{"drop": [_exact_keys(made)]}] if made else []
    if args.match is None:
        return [{"drop": [f"^{re.escape(args.key.expand(None))}$"]}]
    if args.if_exists == "keep":
        raise NotInvertible("with if_exists: keep, which keys it made depends on the checkpoint; "
                            "the source layout is needed")
    groups = _parse_pattern(args.match.pattern)[2]
    return [{"drop": [_swap(args.match.pattern, args.key, whole=True,
                            spare=tuple(g.number for g in groups if isinstance(g, _Group))).pattern]}]


_INVERTERS: dict[str, Callable[[Step, StepTrace | None], list[Doc]]] = {
    "rename": _invert_rename, "add_prefix": _invert_add_prefix, "strip_prefix": _invert_strip_prefix,
    "permute": _invert_permute, "unsqueeze": _invert_unsqueeze, "squeeze": _invert_unsqueeze,
    "reshape": _invert_reshape, "cast": _invert_cast, "split": _invert_split, "merge": _invert_merge,
    "copy": _invert_copy, "set": _invert_set,
}
