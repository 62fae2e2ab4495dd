"""Every shipped recipe lints clean, is listed, and is usable by name from any folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from ckptx._data import shipped_rules_dir
from ckptx.rules.packs import list_recipes

SHIPPED = sorted(shipped_rules_dir().rglob("*.yaml"))
NAMES = [p.relative_to(shipped_rules_dir()).with_suffix("").as_posix() for p in SHIPPED]


def test_recipes_are_shipped_in_the_package() -> None:
    assert "convnextv2/official-to-mmpretrain" in NAMES and len(NAMES) >= 10


@pytest.mark.parametrize("name", NAMES)
def test_shipped_recipe_lints_without_warnings(run_cli, name: str) -> None:
    result = run_cli("lint", name, "--json")
    assert result.code == 0, result.out
    assert result.json["files"][0]["warnings"] == []


@pytest.mark.parametrize("name", NAMES)
def test_shipped_recipe_has_a_header_saying_how_it_is_verified(name: str) -> None:
    text = (shipped_rules_dir() / f"{name}.yaml").read_text(encoding="utf-8")
    header = text.split("\nckptx: 1", 1)[0]
    assert header.startswith("#") and "Verified" in header


@pytest.mark.parametrize("name", NAMES)
def test_recipe_name_matches_its_path(name: str) -> None:
    from ckptx.rules.loader import load_rules

    assert load_rules(name).name == name


def test_rules_list_shows_name_description_and_origin(run_cli) -> None:
    result = run_cli("rules", "list", "--json")
    row = next(r for r in result.json["recipes"] if r["name"] == "convnextv2/official-to-timm")
    assert row["description"].startswith("Official ConvNeXt-V2 release -> timm")
    assert row["pack"] == "ckptx" and row["distribution"] == "ckptx"
    assert {r.name for r in list_recipes() if r.pack.name == "ckptx"} == set(NAMES)


def test_rules_show_prints_file_with_origin(run_cli) -> None:
    result = run_cli("rules", "show", "common/strip-module-prefix")
    first, rest = result.out.split("\n", 1)
    assert first.startswith("# common/strip-module-prefix: ") and first.endswith("common/strip-module-prefix.yaml")
    assert rest.rstrip() == (shipped_rules_dir() / "common/strip-module-prefix.yaml").read_text().rstrip()


def test_name_works_from_any_folder(
    run_cli, tmp_path: Path, ddp_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = run_cli(
        "convert",
        ddp_checkpoint,
        "-r",
        "common/strip-module-prefix",
        "--dry-run",
        "--target",
        "tests.helpers.models:tiny_net",
    )
    assert result.code == 0, result.err


def test_unknown_name_suggests_rules_list(run_cli) -> None:
    result = run_cli("lint", "convnextv2/official-to-tim")
    assert (
        "no rule file or shipped recipe named 'convnextv2/official-to-tim'; did you mean 'convnextv2/official-to-timm'"
        in result.out
        and "see `ckptx rules list`" in result.out
    )
