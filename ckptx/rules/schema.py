"""Validate a YAML document against a shipped JSON Schema, with one readable sentence per problem."""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Iterator
from functools import cache
from typing import TYPE_CHECKING, Any

from ckptx._data import schema_path
from ckptx._lazy import lazy_module
from ckptx.errors import Problem, unique_problems
from ckptx.rules.kinds import STEP_KINDS
from ckptx.rules.yamlfile import YamlDocument

if TYPE_CHECKING:
    from jsonschema.exceptions import ValidationError

# jsonschema is imported when a document is first validated: 53 of the 150 ms `import ckptx.cli` takes, which
# `ckptx inspect`, `--version` and conversions without a rule file never need.
if TYPE_CHECKING:  # pragma: no cover
    import jsonschema
else:
    jsonschema = lazy_module("jsonschema")

RULES_SCHEMA = "ckptx-rules.schema.json"


_STEP_COMMON = ("strict", "when", "comment")  # the properties every step has, beside its one op


def with_step_kinds(schema: dict[str, Any]) -> dict[str, Any]:
    """The rules schema with each step's properties taken from the registered step kinds (their fragments live
    beside their planners); the shipped file holds the same (`python -m ckptx.rules.schema` rewrites it, a test
    compares them). Kinds keep the file's order; new ones follow."""
    step = schema["$defs"]["step"]
    old = step["properties"]
    names = [n for n in old if n in STEP_KINDS] + [n for n in STEP_KINDS if n not in old]
    common = {n: old[n] for n in _STEP_COMMON if n in old}
    step["properties"] = {**common, **{n: dict(STEP_KINDS[n].schema) for n in names}}
    return schema


def shipped_schema(name: str) -> dict[str, Any]:
    """A shipped JSON Schema as data (the rules schema with the step kinds' fragments)."""
    schema = json.loads(schema_path(name).read_text(encoding="utf-8"))
    return with_step_kinds(schema) if name == RULES_SCHEMA else schema


@cache
def _validator(name: str) -> Any:
    # The shipped schemas are checked against the metaschema by the tests, not here: that check takes
    # longer (0.08-0.2 s) than everything else ckptx does before copying bytes.
    return jsonschema.Draft202012Validator(
        shipped_schema(name), format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )


def schema_problems(doc: YamlDocument, name: str = RULES_SCHEMA) -> list[Problem]:
    """Every schema violation of `doc`, each located at file:line:col and document path."""
    validator = _validator(name)
    problems: list[Problem] = []
    for error in validator.iter_errors(doc.data):
        alternatives = _type_alternatives(error)
        if alternatives:
            path = tuple(error.absolute_path)
            choices = (
                ", ".join(alternatives[:-1]) + " or " + alternatives[-1] if len(alternatives) > 1 else alternatives[0]
            )
            message = f"must be {choices}, got {_kind_of(error.instance)} {_short(error.instance)}"
            problems.append(Problem(doc.where(path), message.rstrip()))
            continue
        for leaf in _leaves(error):
            problems.append(_describe(doc, leaf))
    problems.sort(key=_position)
    return unique_problems(problems)


def _position(problem: Problem) -> tuple[int, ...]:
    """(line, column) parsed from `file:line:col path`."""
    place = problem.where.split(" ", 1)[0]
    numbers = [int(n) for n in place.split(":")[1:] if n.isdigit()]
    return tuple(numbers) or (0,)


def _type_alternatives(error: ValidationError) -> list[str]:
    """For an anyOf where every branch wants another type: the readable names of those types."""
    if error.validator not in ("anyOf", "oneOf"):
        return []
    return _wanted_types(error) or []


def _wanted_types(error: ValidationError) -> list[str] | None:
    """The types an error says the value should have, or None when it is not purely a type mismatch."""
    if error.validator == "type":
        value = error.validator_value
        names = []
        for name in value if isinstance(value, list) else [value]:
            items = error.schema.get("items", {}) if isinstance(error.schema, dict) else {}
            names.append(
                "a list of strings"
                if name == "array" and (items.get("type") == "string" or "$ref" in items)
                else _article(name)
            )
        return names
    if error.validator not in ("anyOf", "oneOf") or not error.context:
        return None
    depth = len(error.absolute_path)
    wanted: list[str] = []
    for branch in sorted({e.schema_path[0] for e in error.context}):
        top = [e for e in error.context if e.schema_path[0] == branch and len(e.absolute_path) == depth]
        found = next((w for w in map(_wanted_types, top) if w is not None), None)
        if found is None:
            return None
        wanted += [w for w in found if w not in wanted]
    return wanted


def _leaves(error: ValidationError) -> Iterator[ValidationError]:
    """For anyOf/oneOf failures, descend into the branch the user evidently meant."""
    if not error.context:
        yield error
        return
    branches: dict[int, list[ValidationError]] = {}
    for sub in error.context:
        branches.setdefault(sub.schema_path[0], []).append(sub)
    depth = len(error.absolute_path)

    def mismatched(errors: list[ValidationError]) -> bool:
        return any(e.validator in ("type", "const") and len(e.absolute_path) == depth for e in errors)

    meant = [errs for errs in branches.values() if not mismatched(errs)]
    if not meant:
        chosen = jsonschema.exceptions.best_match(error.context)
        yield chosen if chosen is not None else error
        return
    errors = max(meant, key=lambda errs: max(len(e.absolute_path) for e in errs))
    for sub in errors:
        yield from _leaves(sub)


def _describe(doc: YamlDocument, error: ValidationError) -> Problem:
    path = tuple(error.absolute_path)
    kind = error.validator
    if kind == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extras = [k for k in error.instance if k not in error.schema.get("properties", {})]
        key = extras[0] if extras else "?"
        hint = difflib.get_close_matches(str(key), allowed, n=1)
        suggestion = f"did you mean '{hint[0]}'?" if hint else f"allowed keys: {', '.join(allowed)}"
        return Problem(doc.where(path + (key,), key=True), f"unknown key '{key}'; {suggestion}")
    if kind == "required":
        missing = error.message.split("'")[1] if "'" in error.message else error.message
        return Problem(doc.where(path), f"missing required key '{missing}'")
    if kind == "type":
        expected = error.validator_value
        expected_text = " or ".join(expected) if isinstance(expected, list) else expected
        got = f"{_kind_of(error.instance)} {_short(error.instance)}".rstrip()
        return Problem(doc.where(path), f"must be {_article(expected_text)}, got {got}")
    if kind == "const":
        return Problem(doc.where(path), f"must be {json.dumps(error.validator_value)}, got {_short(error.instance)}")
    if kind == "enum":
        options = ", ".join(str(v) for v in error.validator_value)
        return Problem(doc.where(path), f"{_short(error.instance)} is not one of: {options}")
    if kind == "minProperties" and error.validator_value == 1:
        return Problem(doc.where(path), "must not be empty")
    if kind == "minItems":
        return Problem(doc.where(path), f"needs at least {error.validator_value} item(s)")
    if kind == "maxItems":
        return Problem(doc.where(path), f"takes at most {error.validator_value} item(s)")
    if kind == "minLength":
        return Problem(doc.where(path), "must not be an empty string")
    if kind == "pattern" and isinstance(error.schema, dict) and "errorMessage" in error.schema:
        return Problem(doc.where(path), f"{_short(error.instance)} {error.schema['errorMessage']}")
    if kind == "pattern":
        return Problem(
            doc.where(path),
            f"{_short(error.instance)} is not of the form 'module:callable'"
            if ":" in str(error.validator_value)
            else f"{_short(error.instance)} does not match {error.validator_value}",
        )
    if kind == "format" and error.validator_value == "regex":
        try:
            re.compile(error.instance)
        except re.error as exc:
            return Problem(doc.where(path), f"invalid regex {error.instance!r}: {exc}")
    if kind == "minimum":
        return Problem(doc.where(path), f"must be at least {error.validator_value}, got {error.instance}")
    return Problem(doc.where(path), error.message)


def _article(word: str) -> str:
    names = {
        "object": "a mapping",
        "array": "a list",
        "string": "a string",
        "integer": "an integer",
        "number": "a number",
        "boolean": "true or false",
    }
    return names.get(word, f"a {word}")


def _kind_of(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "nothing"
    return {str: "a string", int: "an integer", float: "a number"}.get(type(value), type(value).__name__)


def _short(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return ""
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def write_rules_schema(path: str) -> None:
    """Rewrite the shipped rules schema from the step kinds (run `python -m ckptx.rules.schema FILE`)."""
    text = json.dumps(shipped_schema(RULES_SCHEMA), indent=2, ensure_ascii=False) + "\n"
    with open(path, "w", encoding="utf-8") as out:
        out.write(text)


if __name__ == "__main__":
    import sys

    write_rules_schema(sys.argv[1])
