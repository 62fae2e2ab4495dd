"""Each step kind is defined in one place, and the schema, the registry and docs/steps.md name the same steps."""

from __future__ import annotations

import json
import re
from pathlib import Path

import ckptx.ops  # noqa: F401 - registers the kinds
from ckptx._data import schema_path
from ckptx.rules.kinds import STEP_KINDS
from ckptx.rules.schema import RULES_SCHEMA, shipped_schema

STEPS_MD = Path(__file__).resolve().parents[2] / "docs" / "steps.md"
COMMON = {"strict", "when", "comment"}


def _documented_step_names() -> set[str]:
    """The step names in the first column of docs/steps.md's step table (`| \\`unsqueeze\\` / \\`squeeze\\` | ...`)."""
    text = STEPS_MD.read_text(encoding="utf-8")
    table = text[text.index("| `drop` |") :]
    table = table[: table.index("\n\n")]
    return {name for row in table.splitlines() for name in re.findall(r"`(\w+)`", row.split("|")[1])}


def test_schema_registry_and_docs_name_the_same_steps():
    shipped = json.loads(schema_path(RULES_SCHEMA).read_text(encoding="utf-8"))
    in_schema = set(shipped["$defs"]["step"]["properties"]) - COMMON
    assert in_schema == set(STEP_KINDS) == _documented_step_names()


def test_shipped_schema_file_holds_each_kinds_fragment():
    """`python -m ckptx.rules.schema schemas/ckptx-rules.schema.json` rewrites the file when a kind changes."""
    shipped = json.loads(schema_path(RULES_SCHEMA).read_text(encoding="utf-8"))
    assert shipped == shipped_schema(RULES_SCHEMA)
    for name, kind in STEP_KINDS.items():
        assert shipped["$defs"]["step"]["properties"][name] == kind.schema, name


def test_every_kind_is_defined_in_one_ops_module():
    """Builder, planner and inverse of a kind come from the same module of ckptx/ops/."""
    for name, kind in STEP_KINDS.items():
        modules = {kind.build.__module__, kind.plan.__module__}
        if kind.invert is not None:
            modules.add(kind.invert.__module__)
        if kind.dump is not None:
            modules.add(kind.dump.__module__)
        assert len(modules) == 1 and modules.pop().startswith("ckptx.ops."), name


def test_kinds_without_an_inverse_say_why():
    for name, kind in STEP_KINDS.items():
        assert kind.invert is not None or kind.not_invertible != "no inverse is known", name
