"""Where the shipped schemas and recipes live (inside the wheel, or in a source checkout)."""

from __future__ import annotations

from functools import cache
from pathlib import Path


@cache
def data_dir() -> Path:
    """The folder holding `schemas/` and `rules/`: `ckptx/_data` when installed, else the repo root."""
    packaged = Path(__file__).resolve().parent / "_data"
    if (packaged / "schemas").is_dir():
        return packaged
    return Path(__file__).resolve().parents[1]


def schema_path(name: str) -> Path:
    """Path of a shipped JSON Schema, e.g. `ckptx-rules.schema.json`."""
    return data_dir() / "schemas" / name


def shipped_rules_dir() -> Path:
    """Folder of the recipes shipped with ckptx."""
    return data_dir() / "rules"
