"""docs/steps.md has one section per step kind of the registry, naming every argument of the kind's schema."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ckptx.ops  # noqa: F401 - registers the kinds
from ckptx.rules.kinds import STEP_KINDS

STEPS_MD = Path(__file__).resolve().parents[2] / "docs" / "steps.md"


def sections() -> dict[str, str]:
    """Step name -> the text of its `### `name`` section."""
    text = STEPS_MD.read_text(encoding="utf-8")
    found: dict[str, str] = {}
    for part in re.split(r"^(?=#{2,3} )", text, flags=re.M):
        heading = re.match(r"### `(\w+)`\n", part)
        if heading:
            found[heading.group(1)] = part
    return found


def properties(schema: Any) -> Iterator[str]:
    """Every argument name of a kind's schema fragment (its object forms, `anyOf` branches included)."""
    if isinstance(schema, dict):
        yield from schema.get("properties", {})
        for branch in schema.get("anyOf", []):
            yield from properties(branch)


def test_one_section_per_step_kind() -> None:
    assert set(sections()) == set(STEP_KINDS)


def test_every_argument_of_a_kind_is_named_in_its_section() -> None:
    found = sections()
    missing = [
        f"{name}.{prop}"
        for name, kind in STEP_KINDS.items()
        for prop in properties(kind.schema)
        if f"`{prop}`" not in found.get(name, "")
    ]
    assert not missing, f"arguments of step kinds that docs/steps.md does not name in the kind's section: {missing}"
