"""`suggest -o` and `invert -o` write recipes under the destination rule every output follows: never over a file
they read (the source checkpoint, a target checkpoint, a rule file), even with --force; missing folders created;
written atomically."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.conftest import TINY_TARGET
from tests.helpers.models import tiny_net

STRIP = "ckptx: 1\nname: strip\nsteps:\n  - strip_prefix: module.\n"


def test_suggest_never_writes_over_its_source_or_target(run_cli, tmp_path: Path) -> None:
    src, reference = tmp_path / "tiny.pth", tmp_path / "reference.pth"
    torch.save(tiny_net().state_dict(), src)
    torch.save(tiny_net().state_dict(), reference)
    before = src.read_bytes(), reference.read_bytes()
    for output in (src, reference):
        result = run_cli("suggest", src, "--target", reference, "-o", output, "--force")
        assert result.code == 2 and "the recipe is a file of the source checkpoint" in result.err, result.err
    assert (src.read_bytes(), reference.read_bytes()) == before


def test_suggest_creates_the_recipes_folder(run_cli, tmp_path: Path) -> None:
    src = tmp_path / "tiny.pth"
    torch.save(tiny_net().state_dict(), src)
    output = tmp_path / "new" / "folder" / "tiny.yaml"
    result = run_cli("suggest", src, "--target", TINY_TARGET, "-o", output)
    assert result.code == 0, result.err
    assert output.read_text().startswith("ckptx: 1") or "ckptx: 1" in output.read_text()


def test_invert_never_writes_over_the_rule_file_it_reads(run_cli, write_rules, tmp_path: Path) -> None:
    rules = write_rules(STRIP)
    result = run_cli("invert", rules, "-o", rules, "--force")
    assert result.code == 2 and "the reverse recipe is a file of the source checkpoint" in result.err, result.err
    assert rules.read_text() == STRIP
    output = tmp_path / "new" / "reverse.yaml"
    assert run_cli("invert", rules, "-o", output).code == 0 and "steps" in output.read_text()
