"""The planning fast paths (literal prefilter, joined keys handed between steps, collision checks on changed
entries only) give exactly the plans, warnings and errors of the plain key-by-key loops."""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptx import plan as plan_recipe
from ckptx.dtypes import TensorMeta
from ckptx.errors import PlanError
from ckptx.planning import keymatch
from ckptx.planning.context import PlanContext
from ckptx.planning.entry import PlanEntry
from ckptx.planning.expr import SourceRef
from ckptx.planning.keymatch import KeyText, first_matches, required_literals
from ckptx.planning.planner import _collisions, _KeyIndex
from ckptx.rules.loader import load_rules

WORDS = ["blocks", "layers", "attn", "mlp", "q", "k", "norm", "x.y", "a\x00b"]
PATTERNS = [
    r"^blocks\.(\d+)\.",
    r"\.attn\.",
    r"mlp",
    r"^(layers|blocks)\.",
    r"\.q$",
    r"norm\.(\d+)",
    r"(?i)ATTN",
    r"\.(k|q)\.",
    r"^layers\.1\.",
    r"x\.y",
    r"\d",
]
REPLACEMENTS = [r"layers.\1.", ".attention.", "ffn", "", ".query", r"ln.\1", "X", r".\1\1.", "blocks.1.", "z", "9"]


def random_keys(rng: random.Random, n: int) -> list[str]:
    keys = {
        ".".join(rng.choice(WORDS) if rng.random() < 0.7 else str(rng.randint(0, 3)) for _ in range(rng.randint(1, 5)))
        for _ in range(n)
    }
    return sorted(keys)


def random_rules(rng: random.Random, steps: int) -> str:
    lines = ["ckptx: 1", "steps:"]
    for _ in range(steps):
        kind = rng.random()
        if kind < 0.7:
            rows = [
                f"[{PATTERNS[i]!r}, {REPLACEMENTS[i]!r}]" for i in rng.sample(range(len(PATTERNS)), rng.randint(1, 3))
            ]
            lines.append(f"  - rename: [{', '.join(rows)}]")
        elif kind < 0.85:
            lines.append(f"  - drop: [{rng.choice(PATTERNS)!r}]")
        else:
            lines.append(f"  - add_prefix: {{prefix: 'm.', match: {rng.choice(PATTERNS)!r}}}")
    return "\n".join(lines).replace("'", "'").replace("\\\\", "\\") + "\n"


def outcome(recipe: Any, keys: list[str]) -> Any:
    try:
        plan = plan_recipe(recipe, {k: torch.zeros(1) for k in keys})
    except PlanError as exc:
        return ("error", [str(p) for p in exc.problems])
    return (
        [(e.key, e.sources, e.steps) for e in plan.entries],
        [str(w) for w in plan.warnings],
        plan.dropped,
        plan.renames_keys,
    )


@pytest.mark.parametrize("seed", range(40))
def test_fast_paths_plan_exactly_like_the_plain_loops(
    tmp_path: Path, seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(seed)
    keys = random_keys(rng, rng.randint(1, 60))
    path = tmp_path / "rules.yaml"
    path.write_text(random_rules(rng, rng.randint(1, 8)), encoding="utf-8")
    recipe = load_rules(str(path))
    fast = outcome(recipe, keys)
    monkeypatch.setattr(KeyText, "candidates", lambda self, runs: range(len(self.keys)))
    monkeypatch.setattr(_KeyIndex, "collisions", lambda self, before, out, step: _collisions(out.entries, step))
    assert outcome(recipe, keys) == fast


def test_collisions_are_reported_in_every_later_key_step_as_before(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text("ckptx: 1\nsteps:\n  - rename: [['^(a|b)$', 'c']]\n  - rename: [['^z', 'y']]\n", encoding="utf-8")
    with pytest.raises(PlanError) as caught:
        plan_recipe(load_rules(str(path)), {k: torch.zeros(1) for k in ["a", "b", "z"]})
    assert [p.where.rsplit(" ", 1)[-1] for p in caught.value.problems] == ["steps[0].rename", "steps[1].rename"]


@pytest.mark.parametrize(
    "pattern,literals",
    [
        (r"^model\.layers\.(\d+)\.p3\.", ("model.layers.", ".p3.")),
        (r"a|b", ()),
        (r"(?i)abc", ()),
        (r"ab*c", ("a", "c")),
        (r"x\.y(?=z)", ("x.y",)),
        (r"[ab]", ()),
        (r"a{2}b", ("b",)),
        (r"\x41bc", ()),
    ],
)
def test_required_literals(pattern: str, literals: tuple[str, ...]) -> None:
    assert required_literals(re.compile(pattern)) == literals


def test_first_matches_and_containing_agree_with_search() -> None:
    rng = random.Random(7)
    for _ in range(500):
        keys = ["".join(rng.choice("ab.\x00c") for _ in range(rng.randint(0, 8))) for _ in range(rng.randint(0, 30))]
        literal = "".join(rng.choice("ab.c") for _ in range(rng.randint(1, 3)))
        text = KeyText(keys)
        assert text.containing(literal) == [i for i, k in enumerate(keys) if literal in k]
        new = {i: rng.choice(["", "ab", "c.c", "\x00"]) for i in text.containing(literal) if rng.random() < 0.6}
        renamed = text.renamed(new)
        expected = [new.get(i, k) for i, k in enumerate(keys)]
        assert renamed.keys == expected
        assert renamed.containing("c") == [i for i, k in enumerate(expected) if "c" in k]
        patterns = [re.compile(re.escape(literal)), re.compile(r"^a\.(b+)c"), re.compile("b.a|c")]
        reference = {}
        for i, key in enumerate(keys):
            hit = next((n for n, p in enumerate(patterns) if p.search(key)), None)
            if hit is not None:
                reference[i] = hit
        assert first_matches(patterns, keys) == reference


def test_carried_key_text_is_used_only_for_the_list_it_was_made_for() -> None:
    entries = [PlanEntry(k, SourceRef(k, TensorMeta((1,), "float32"))) for k in "abc"]
    ctx = PlanContext(target=None, params={})
    carried = KeyText(["a", "b", "c"])
    ctx.carry(entries, carried)
    assert ctx.key_text(entries) is carried
    other = list(entries[::-1])
    assert ctx.key_text(other).keys == ["c", "b", "a"]


def test_required_literals_are_in_every_match() -> None:
    """Fuzzed patterns: each key a pattern finds contains every literal `required_literals` claims."""
    rng = random.Random(3)
    atoms = [
        "a",
        "b",
        ".",
        r"\.",
        "[ab]",
        "(a|b)",
        "?",
        "*",
        "+",
        "{2}",
        "{0,1}",
        "|",
        "^",
        "$",
        r"\d",
        "1",
        "(?:ab)",
        "(?=a)",
        "-",
        "_",
        r"\x61",
        r"\1",
        "[]a]",
    ]
    keys = ["".join(rng.choice("ab.1-_") for _ in range(rng.randint(0, 8))) for _ in range(2000)]
    checked = 0
    for _ in range(2000):
        try:
            pattern = re.compile("".join(rng.choice(atoms) for _ in range(rng.randint(1, 6))))
        except re.error:
            continue
        literals = required_literals(pattern)
        checked += bool(literals)
        for key in keys:
            if pattern.search(key):
                assert all(literal in key for literal in literals), (pattern.pattern, literals, key)
    assert checked > 300


def test_keys_found_exactly_through_chained_renames() -> None:
    rng = random.Random(11)
    for _ in range(200):
        keys = ["".join(rng.choice("ab.c") for _ in range(rng.randint(0, 8))) for _ in range(rng.randint(1, 30))]
        text = KeyText(list(keys))
        for _ in range(5):
            literal = rng.choice("abc.")
            hits = text.containing(literal)
            assert hits == [i for i, k in enumerate(keys) if literal in k]
            new = {
                i: "".join(rng.choice("ab.c") for _ in range(rng.randint(0, 12))) for i in hits if rng.random() < 0.7
            }
            text = text.renamed(new)
            keys = [new.get(i, k) for i, k in enumerate(keys)]
            assert text.keys == keys
        assert text.containing("b") == [i for i, k in enumerate(keys) if "b" in k]


def test_a_few_renamed_keys_are_searched_one_by_one_until_an_eighth_changed(monkeypatch: pytest.MonkeyPatch) -> None:
    joins = []
    real_join = keymatch._join
    monkeypatch.setattr(keymatch, "_join", lambda keys: joins.append(len(keys)) or real_join(keys))
    keys = [f"layers.{i}.w" for i in range(800)]
    text = KeyText(list(keys))
    for step in range(14):  # 10 new keys per step: the 11th step finds 110 > 800 / 8 changed and joins again
        assert text.containing(f"s.{step}") == [i for i, k in enumerate(keys) if f"s.{step}" in k]
        new = {i: f"blocks.{i}.w" for i in range(step * 10, step * 10 + 10)}
        text = text.renamed(new)
        keys = [new.get(i, k) for i, k in enumerate(keys)]
        assert text.containing("blocks.") == [i for i, k in enumerate(keys) if "blocks." in k]
    assert joins == [800, 800]
