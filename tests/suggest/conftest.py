"""Fixtures for the `ckptx suggest` tests: offline, no network, and the suggest -> convert -> load pipeline.

The real-library tests build models with random weights (nothing is downloaded); every test runs with
outbound network connections refused, like tests/real.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
    os.environ.setdefault(_var, "1")

import pytest  # noqa: E402

from tests.helpers.offline import missing_library, refuse_network  # noqa: E402


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Refuse non-loopback connections for the duration of each test."""
    refuse_network(monkeypatch, "tests/suggest")


def require(*modules: str) -> None:
    """Fail (skip only under CKPTX_ALLOW_MISSING_REAL=1) when a library is missing."""
    import importlib.util

    for module in modules:
        if importlib.util.find_spec(module) is None:
            missing_library(f"{module} is not installed (run `make venv`)")


def _yaml_value(value: Any) -> str:
    """A --target-arg value as YAML reads it back (floats with a dot: PyYAML reads `1e-06` as a string)."""
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return f"{value:.6e}"
    return json.dumps(value)


@dataclass
class Suggested:
    """What the pipeline produced: the recipe file, its text, the suggest report and the converted tensors."""

    rules: Path
    text: str
    report: dict[str, Any]
    state: dict[str, Any]


@pytest.fixture
def suggest_and_convert(run_cli: Callable[..., Any], tmp_path: Path) -> Callable[..., Suggested]:
    """`ckptx suggest SRC --target SPEC -o rules.yaml`, then `ckptx convert SRC -r rules.yaml` with that file."""

    def pipeline(
        src: Path,
        target: str,
        target_args: Mapping[str, Any] | None = None,
        extra: Sequence[str] = (),
        convert_extra: Sequence[str] = (),
        name: str = "rules.yaml",
    ) -> Suggested:
        from safetensors.torch import load_file

        rules = tmp_path / name
        args = ["suggest", src, "--target", target, "-o", rules, "--json", *extra]
        for key, value in (target_args or {}).items():
            args += ["--target-arg", f"{key}={_yaml_value(value)}"]
        result = run_cli(*args)
        assert result.code == 0, result.out + result.err
        report = json.loads(result.out)
        out = tmp_path / (rules.stem + ".safetensors")
        allowed = ["--allow-factory", target] if ":" in target and not Path(target).exists() else []  # the user's own
        converted = run_cli("convert", src, "-r", rules, "-o", out, *allowed, *convert_extra)
        assert converted.code == 0, converted.out + converted.err
        return Suggested(rules, rules.read_text(encoding="utf-8"), report, load_file(str(out)))

    return pipeline
