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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ckptx.errors import NotInvertible, Problem, StepNotInvertible
from ckptx.rules.flatten import flatten
from ckptx.rules.kinds import STEP_KINDS, Doc, StepTrace
from ckptx.rules.recipe import Recipe
from ckptx.rules.steps import Step
from ckptx.rules.templates import Expression, Template

__all__ = [
    "Doc",
    "NotInvertible",
    "StepTrace",
    "all_matched_changed",
    "changed_metas",
    "exact_keys",
    "exact_table",
    "invert_recipe",
    "parse_pattern",
    "spare_placeholder",
    "swap",
    "template_parts",
    "tidy",
    "escape_replacement",
    "shifted",
    "Group",
    "Ref",
]


def invert_recipe(recipe: Recipe, traces: Sequence[StepTrace | None] | None = None) -> Doc:
    """The reverse recipe as a rule document; RuleError naming the first step that is not invertible."""
    inverses: list[tuple[Step, list[Doc]]] = []
    for index, step in enumerate(recipe.steps):
        trace = traces[index] if traces is not None else None
        try:
            if not _runs(step, recipe.params, trace):
                continue
            inverses.append((step, _inverse(step, trace)))
        except NotInvertible as exc:
            hint = (
                ""
                if trace is not None or not exc.needs_layout
                else "; give the source layout (--original CHECKPOINT|MANIFEST|module:callable)"
            )
            raise StepNotInvertible(
                [Problem(step.where, f"{step.op} is not invertible: {exc}{hint}")],
                needs_layout=exc.needs_layout and trace is None,
            ) from None
    steps = [
        {**inverse, "comment": f"inverse of {step.where}"} for step, docs in reversed(inverses) for inverse in docs
    ]
    doc: Doc = {"ckptx": 1, "name": f"{recipe.name}/reverse", "description": f"Reverse of {recipe.name}"}
    doc["steps"] = steps
    doc.update(_swapped_target_and_verify(recipe))
    return doc


def _inverse(step: Step, trace: StepTrace | None) -> list[Doc]:
    """The rule documents of the step's inverse, from its kind."""
    kind = STEP_KINDS[step.op]
    if kind.invert is None:
        raise NotInvertible(kind.not_invertible)
    return kind.invert(step.args, step, trace)


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
        raise NotInvertible(
            "whether it runs depends on the checkpoint (when: has_key/no_key/extracted_from); "
            "the source layout is needed",
            needs_layout=True,
        )
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
        flat.pop("source_rules", None)  # they adapted the forward's source; the reverse's source is its output
        out["verify"] = flat
    return out


# --- patterns and templates as literal text and groups -------------------------------------------------------


@dataclass(frozen=True)
class Group:
    number: int
    name: str | None
    body: str


@dataclass(frozen=True)
class Ref:
    group: int | str  # a group number, or "i" for a split/merge piece number
    offset: int = 0


@dataclass(frozen=True)
class _Swap:
    """A one-to-one pattern/template pair turned around."""

    pattern: str  # regex matching what the template produced
    template: str  # rebuilds what the pattern matched
    renumber: dict[int | str, int] = field(default_factory=dict)  # forward group -> group of `pattern`
    groups: tuple[Group, ...] = ()

    def rewrite(self, template: Template, *, what: str) -> str:
        """Another template over the forward groups, expressed over the groups of `pattern`."""
        out = []
        for part in template_parts(template, self.groups):
            if isinstance(part, str):
                out.append(escape_replacement(part))
            elif part.offset or part.group not in self.renumber:
                raise NotInvertible(f"{what} {template.text!r} uses a group the first key does not keep")
            else:
                out.append(f"\\g<{self.renumber[part.group]}>")
        return tidy("".join(out))


def parse_pattern(text: str) -> tuple[bool, bool, tuple[str | Group, ...]]:
    """(anchored at start, anchored at end, literal text and capture groups), or NotInvertible."""
    start = text.startswith("^")
    end = text.endswith("$") and not text.endswith("\\$")
    i, stop = (1 if start else 0), (len(text) - 1 if end else len(text))
    parts: list[str | Group] = []
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
            inner = text[i + 1 : close]
            if close + 1 < stop and text[close + 1] in "*+?{":
                raise NotInvertible(f"pattern {text!r}: a repeated group")
            name = None
            if inner.startswith("?P<"):
                name, inner = inner[3 : inner.index(">")], inner[inner.index(">") + 1 :]
            elif inner.startswith("?"):
                raise NotInvertible(f"pattern {text!r}: '({inner})' outside a capture group")
            if re.compile(inner).groups:
                raise NotInvertible(f"pattern {text!r}: nested capture groups")
            number += 1
            parts += ([literal] if literal else []) + [Group(number, name, inner)]
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


def template_parts(template: Template, groups: Sequence[Group]) -> list[str | Ref]:
    """A template as literal text and group references (with a +/- offset from index arithmetic)."""
    names = {g.name: g.number for g in groups if g.name}
    out: list[str | Ref] = []
    for part in template.parts:
        if isinstance(part, Expression):
            out.append(_expression_ref(part, names, template.text))
            continue
        for named, number, escaped, text in _LITERAL_TOKENS.findall(part):
            ref = named or number
            if ref:
                out.append(Ref(int(ref) if ref.isdigit() else names.get(ref, ref)))
            elif escaped:
                if escaped.isalnum():
                    raise NotInvertible(f"template {template.text!r}: escape '\\{escaped}'")
                out.append(escaped)
            else:
                out.append(text)
    merged: list[str | Ref] = []
    for item in out:
        if isinstance(item, str) and merged and isinstance(merged[-1], str):
            merged[-1] += item
        else:
            merged.append(item)
    return merged


def _expression_ref(expression: Expression, names: Mapping[str, int], text: str) -> Ref:
    """`{\\N}`, `{\\N + c}`, `{\\N - c}`, `{i + c}` as a reference with an offset; anything else is lossy."""
    tree = expression.tree

    def ref_of(node: ast.expr) -> int | str | None:
        if not isinstance(node, ast.Name):
            return None
        name = node.id[2:] if node.id.startswith("_g") else node.id
        return int(name) if name.isdigit() else names.get(name, name)

    whole = ref_of(tree)
    if whole is not None:
        return Ref(whole)
    if isinstance(tree, ast.BinOp) and isinstance(tree.op, (ast.Add, ast.Sub)):
        left, right = ref_of(tree.left), ref_of(tree.right)
        if left is not None and isinstance(tree.right, ast.Constant) and isinstance(tree.right.value, int):
            return Ref(left, tree.right.value if isinstance(tree.op, ast.Add) else -tree.right.value)
        if (
            isinstance(tree.op, ast.Add)
            and right is not None
            and isinstance(tree.left, ast.Constant)
            and isinstance(tree.left.value, int)
        ):
            return Ref(right, tree.left.value)
    raise NotInvertible(f"template {text!r}: only {{\\N + c}} and {{\\N - c}} can be undone, not {{{expression.text}}}")


def swap(pattern: str, template: Template, *, whole: bool, spare: tuple[int | str, ...] = ()) -> _Swap:
    """Turn a pattern/template pair around; every group except `spare` must be used exactly once."""
    start, end, pattern_parts = parse_pattern(pattern)
    if whole and not (start and end):
        raise NotInvertible(f"pattern {pattern!r} must match whole keys (^...$) to be undone")
    groups = tuple(p for p in pattern_parts if isinstance(p, Group))
    pieces = template_parts(template, groups)
    refs = [p for p in pieces if isinstance(p, Ref)]
    used = [r.group for r in refs]
    for group in groups:
        if group.number not in used and group.number not in spare:
            raise NotInvertible(
                f"{template.text!r} does not use group {group.number} ({group.body}) of "
                f"{pattern!r}: the keys it matches cannot be told apart afterwards"
            )
    for ref in set(used):
        if used.count(ref) > 1:
            raise NotInvertible(f"{template.text!r} uses group {ref} twice")
    for a, b in zip(pieces, pieces[1:]):
        if isinstance(a, Ref) and isinstance(b, Ref):
            raise NotInvertible(f"{template.text!r}: two groups with nothing between them cannot be split again")
    by_number = {g.number: g for g in groups}
    regex = ["^" if start else ""]
    renumber: dict[int | str, int] = {}
    for part in pieces:
        if isinstance(part, str):
            regex.append(re.escape(part))
            continue
        renumber[part.group] = len(renumber) + 1
        numeric = part.offset or part.group == "i"
        regex.append("(" + (r"\d+" if numeric else by_number[int(part.group)].body) + ")")
    regex.append("$" if end else "")
    offsets = {r.group: r.offset for r in refs}
    rebuilt = []
    for piece in pattern_parts:
        if isinstance(piece, str):
            rebuilt.append(escape_replacement(piece))
        elif piece.number in renumber:
            rebuilt.append(shifted(renumber[piece.number], -offsets[piece.number]))
        else:
            rebuilt.append(spare_placeholder(piece.number))  # filled in by the caller
    return _Swap("".join(regex), tidy("".join(rebuilt)), renumber, groups)


def spare_placeholder(number: int | str) -> str:
    """A placeholder for a group the template does not use (merge's index group)."""
    return f"\x00{number}\x00"


def shifted(group: int, offset: int) -> str:
    if not offset:
        return f"\\g<{group}>"
    return f"{{\\g<{group}> {'+' if offset > 0 else '-'} {abs(offset)}}}"


def tidy(template: str) -> str:
    """`\\g<1>` -> `\\1` where no digit follows."""
    return re.sub(r"\\g<(\d+)>(?!\d)", r"\\\1", template)


def escape_replacement(text: str) -> str:
    return text.replace("\\", "\\\\")


# --- step inverses -------------------------------------------------------------------------------------------


def exact_table(trace: StepTrace | None, reason: str) -> list[Doc]:
    """A rename table of exactly the keys the step renamed (needs a trace of a one-to-one renaming)."""
    if trace is None or trace.after is None:
        raise NotInvertible(f"{reason}; the source layout is needed to list the keys it renamed", needs_layout=True)
    if len(trace.before) != len(trace.after):
        raise NotInvertible(reason)
    rows = [
        [f"^{re.escape(new)}$", escape_replacement(old)]
        for (old, _), (new, _) in zip(trace.before, trace.after)
        if old != new
    ]
    return [{"rename": rows}] if rows else []


def changed_metas(trace: StepTrace | None, what: str) -> list[tuple[str, Any, Any]]:
    """(key, meta before, meta after) of each tensor the step changed; needs a trace."""
    if trace is None or trace.after is None:
        raise NotInvertible(
            f"the {what} it started from are not in the rule; the source layout is needed", needs_layout=True
        )
    before = dict(trace.before)
    return [
        (key, before[key], meta)
        for key, meta in trace.after
        if key in before and (before[key].shape != meta.shape or before[key].dtype != meta.dtype)
    ]


def all_matched_changed(pattern: re.Pattern[str], trace: StepTrace | None, changed: list[tuple[str, Any, Any]]) -> bool:
    """True when the step changed every key its pattern matches (so the pattern can select the inverse too)."""
    matched = {k for k, _ in (trace.after or []) if pattern.search(k)} if trace is not None else set()
    return matched == {k for k, _, _ in changed}


def exact_keys(keys: Sequence[str]) -> str:
    return "^(?:" + "|".join(re.escape(k) for k in keys) + ")$"
