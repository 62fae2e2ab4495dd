"""The README stays an introduction: the manual lives in docs/ (built by `make docs`)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_readme_is_under_16_kib() -> None:
    size = len((ROOT / "README.md").read_bytes())
    assert size < 16384, f"README.md is {size} bytes; move detail into docs/ and link to it"
