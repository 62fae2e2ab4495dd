"""Key templates: `re` replacements with index arithmetic in braces, e.g. `stages.{\\1 - 1}.`.

A brace group is an expression when it refers to a regex group (`\\1`, `\\g<name>`) or, in templates
that make several keys (split `into`, merge `index`), to the piece number `i`. Anything else in braces
is literal text, so existing replacements keep their meaning. An expression is integers, group
references, `i`, `+ - * // %` and parentheses; a group it uses must hold an integer when a key matches.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property

from ckptx.errors import KeyTemplateError, TemplateError

Pattern = re.Pattern[str]

_BRACES = re.compile(r"\{([^{}]*)\}")
_REF = re.compile(r"\\(\d+)|\\g<(\w+)>")
_OPS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.FloorDiv: lambda a, b: a // b,
    ast.Mod: lambda a, b: a % b,
}

# The schema's check of a template string: a brace group that holds a backslash must be an expression.
SCHEMA_PATTERN = r"^(?:[^{]|\{(?![^{}]*\\)|\{[\s0-9()+*/%i-]*(?:\\(?:[0-9]+|g<\w+>)[\s0-9()+*/%i-]*)+\})*$"


@dataclass(frozen=True)
class Expression:
    """One `{...}` expression: its source text and the parsed tree (group refs renamed `_g<ref>`)."""

    text: str
    tree: ast.expr

    @property
    def groups(self) -> tuple[str, ...]:
        """The group references (`'1'`, `'name'`) the expression uses, in order."""
        return tuple(n.id[2:] for n in ast.walk(self.tree) if isinstance(n, ast.Name) and n.id.startswith("_g"))

    def evaluate(self, match: re.Match[str] | None, extra: Mapping[str, int]) -> int:
        """The expression's value for one match."""
        return _eval(self.tree, match, extra, self.text)


@dataclass(frozen=True)
class Template:
    """A compiled template: literal `re` replacement parts and expressions, alternating."""

    text: str
    parts: tuple[str | Expression, ...]
    plain: str | Callable[[re.Match[str]], str] | None = field(default=None, compare=False, repr=False)

    @cached_property
    def has_expressions(self) -> bool:
        """True when some part is an arithmetic expression."""
        return any(isinstance(p, Expression) for p in self.parts)

    def uses(self, name: str) -> bool:
        """True when an expression of the template uses the identifier `name` (e.g. `i`)."""
        return any(
            isinstance(p, Expression) and any(isinstance(n, ast.Name) and n.id == name for n in ast.walk(p.tree))
            for p in self.parts
        )

    def expand(self, match: re.Match[str] | None, **extra: int) -> str:
        """The template filled for `match` (like `match.expand`), expressions evaluated."""
        out = []
        for part in self.parts:
            if isinstance(part, Expression):
                value = part.evaluate(match, extra)
                if value < 0:
                    raise KeyTemplateError(f"'{{{part.text}}}' gives {value}; a key index cannot be negative")
                out.append(str(value))
            elif match is not None:
                out.append(match.expand(part))
            else:
                out.append(part)
        return "".join(out)

    @property
    def repl(self) -> str | Callable[[re.Match[str]], str]:
        """What `pattern.sub` takes to fill this template (a function when there are expressions)."""
        if self.has_expressions:
            return self.expand
        return self.plain or self.text


_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\"}
_GROUP_REF = re.compile(r"\\(?:g<([^>]*)>|(0[0-7]{0,2}|[1-7][0-7]{2})|([1-9][0-9]?)|(.)|$)", re.DOTALL)


def parse_replacement(text: str, pattern: Pattern) -> tuple[str | int, ...]:
    """A `re` replacement string as literal strings and group numbers, checked against `pattern` as `re.sub`
    checks it (unknown group, bad escape), using only the public `re` API; TemplateError names the problem."""
    parts: list[str | int] = []
    literal: list[str] = []
    last = 0
    for found in _GROUP_REF.finditer(text):
        literal.append(text[last : found.start()])
        last = found.end()
        name, octal, number, char = found.groups()
        if name is not None or number is not None:
            try:
                parts += ["".join(literal), _group_number(name, number, pattern)]
            except TemplateError as exc:
                raise TemplateError(f"{exc} at position {found.start() + 1}") from None
            literal = []
        elif octal is not None:
            if int(octal, 8) > 0o377:
                raise TemplateError(f"octal escape value \\{octal} outside of range 0-0o377")
            literal.append(chr(int(octal, 8)))
        elif char is None:
            raise TemplateError("bad escape (end of pattern)")
        elif char in _ESCAPES:
            literal.append(_ESCAPES[char])
        elif char.isascii() and char.isalpha():
            raise TemplateError(f"bad escape \\{char} at position {found.start()}")
        else:
            literal.append("\\" + char)
    literal.append(text[last:])
    parts.append("".join(literal))
    return tuple(p for p in parts if p != "")


def _group_number(name: str | None, number: str | None, pattern: Pattern) -> int:
    if number is not None or (name or "").isdigit():
        index = int(number if number is not None else name or "0")
        if index > pattern.groups:
            raise TemplateError(f"invalid group reference {index}")
        return index
    if not name or not name.isidentifier():
        raise TemplateError(f"bad character in group name {name!r}")
    if name not in pattern.groupindex:
        raise TemplateError(f"unknown group name {name!r}")
    return pattern.groupindex[name]


@dataclass(frozen=True)
class Replacement:
    """A parsed replacement without expressions, filled per match from its parts (picklable)."""

    parts: tuple[str | int, ...]

    def __call__(self, match: re.Match[str]) -> str:
        return "".join(p if isinstance(p, str) else match.group(p) or "" for p in self.parts)


def plain_replacement(text: str, pattern: Pattern) -> str | Callable[[re.Match[str]], str]:
    """What to hand `pattern.sub` for a replacement without expressions: the text itself when it holds no
    backslash (re's literal fast path), else the parsed replacement (checked once, here)."""
    parts = parse_replacement(text, pattern)
    if "\\" not in text:
        return text
    return Replacement(parts)


def compile_template(text: str, pattern: Pattern | None, *, names: tuple[str, ...] = ()) -> Template:
    """Split `text` into literal parts and expressions and check every group reference against `pattern`.

    `names` are the extra identifiers an expression may use (`('i',)` for split/merge).
    Raises TemplateError with a readable reason.
    """
    parts: list[str | Expression] = []
    last = 0
    for found in _BRACES.finditer(text):
        inner = found.group(1)
        uses_name = any(re.search(rf"(?<![\w\\<]){n}(?!\w)", inner) for n in names)
        if not _REF.search(inner) and not (uses_name and re.fullmatch(r"[\s\w+\-*/%()]*", inner)):
            continue
        parts.append(text[last : found.start()])
        parts.append(_parse(inner, pattern, names))
        last = found.end()
    parts.append(text[last:])
    for literal in parts:
        if isinstance(literal, str) and literal and pattern is not None:
            _check_literal(literal, pattern)
    template = Template(text, tuple(p for p in parts if p != ""))
    if pattern is None or template.has_expressions:
        return template
    return Template(text, template.parts, plain_replacement(text, pattern))


def _check_literal(literal: str, pattern: Pattern) -> None:
    parse_replacement(literal, pattern)


def _parse(inner: str, pattern: Pattern | None, names: tuple[str, ...]) -> Expression:
    source = _REF.sub(lambda m: f"_g{m.group(1) or m.group(2)}", inner)
    try:
        tree = ast.parse(source.strip(), mode="eval").body
    except SyntaxError:
        raise TemplateError(
            f"'{{{inner}}}' is not an index expression; write e.g. {{\\1 - 1}} (integers, group references, + - * // %)"
        ) from None
    for sub in ast.walk(tree):
        if isinstance(sub, ast.Name):
            if not sub.id.startswith("_g") and sub.id not in names:
                allowed = ", ".join(["\\N", "\\g<name>", *names])
                raise TemplateError(f"'{{{inner}}}' uses '{sub.id}'; an expression may use {allowed} and integers")
        elif isinstance(sub, ast.Constant):
            if not isinstance(sub.value, int) or isinstance(sub.value, bool):
                raise TemplateError(f"'{{{inner}}}': only integer constants are allowed, got {sub.value!r}")
        elif isinstance(sub, ast.BinOp):
            if type(sub.op) not in _OPS:
                raise TemplateError(f"'{{{inner}}}': only + - * // % are allowed")
        elif isinstance(sub, ast.UnaryOp):
            if not isinstance(sub.op, ast.USub):
                raise TemplateError(f"'{{{inner}}}': only unary minus is allowed")
        elif not isinstance(sub, (ast.operator, ast.unaryop, ast.expr_context)):
            raise TemplateError(f"'{{{inner}}}' is not an index expression; write e.g. {{\\1 - 1}}")
    expression = Expression(inner, tree)
    if pattern is not None:
        for ref in expression.groups:
            if ref.isdigit() and not 1 <= int(ref) <= pattern.groups:
                raise TemplateError(
                    f"'{{{inner}}}' refers to group {ref} but the pattern has {pattern.groups} group(s)"
                )
            if not ref.isdigit() and ref not in pattern.groupindex:
                raise TemplateError(f"'{{{inner}}}' refers to group '{ref}', which the pattern does not define")
    return expression


def _eval(tree: ast.expr, match: re.Match[str] | None, extra: Mapping[str, int], text: str) -> int:
    if isinstance(tree, ast.Constant) and isinstance(tree.value, int):
        return tree.value
    if isinstance(tree, ast.Name):
        if not tree.id.startswith("_g"):
            return int(extra[tree.id])
        ref = tree.id[2:]
        value = match.group(int(ref) if ref.isdigit() else ref) if match is not None else None
        if value is None or not re.fullmatch(r"-?\d+", value):
            raise KeyTemplateError(f"'{{{text}}}': group {ref} is {value!r}, not an integer")
        return int(value)
    if isinstance(tree, ast.UnaryOp):
        return -_eval(tree.operand, match, extra, text)
    assert isinstance(tree, ast.BinOp)
    left, right = _eval(tree.left, match, extra, text), _eval(tree.right, match, extra, text)
    if isinstance(tree.op, (ast.FloorDiv, ast.Mod)) and right == 0:
        raise KeyTemplateError(f"'{{{text}}}': division by zero")
    return _OPS[type(tree.op)](left, right)
