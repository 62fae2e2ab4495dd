"""Run a few steps on a state dict, in memory and through the streaming safetensors writer."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import ckptx
from ckptx.conversion.pipeline import convert
from ckptx.errors import PlanError
from ckptx.rules.loader import load_rules
from ckptx.rules.recipe import Recipe


def recipe(tmp_path: Path, steps: str, params: Mapping[str, Any] | None = None, head: str = "") -> Recipe:
    """A recipe from the YAML text of its `steps:` list (dedented)."""
    path = tmp_path / "steps.yaml"
    path.write_text(
        "ckptx: 1\n" + textwrap.dedent(head) + "steps:\n" + textwrap.indent(textwrap.dedent(steps), "  "),
        encoding="utf-8",
    )
    return load_rules(path, params=params)


def apply(
    tmp_path: Path,
    steps: str,
    state: Mapping[str, torch.Tensor],
    target: Any = None,
    params: Mapping[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """The steps applied in memory; also checks the streaming writer produces the same tensors."""
    made = recipe(tmp_path, steps, params)
    in_memory = ckptx.apply(made, state, target)
    streamed = stream(tmp_path, made, state, target)
    assert list(streamed) == list(in_memory) or set(streamed) == set(in_memory)
    for key, tensor in in_memory.items():
        assert streamed[key].dtype == tensor.dtype and torch.equal(streamed[key], tensor.contiguous()), key
    return in_memory


def stream(
    tmp_path: Path, made: Recipe, state: Mapping[str, torch.Tensor], target: Any = None
) -> dict[str, torch.Tensor]:
    """Write `state` to a safetensors file, convert it to another with the writer, read the result."""
    src, dst = tmp_path / "src.safetensors", tmp_path / "dst.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(src))
    if target is not None and not isinstance(target, (str, Path)):
        manifest = tmp_path / "target.safetensors"
        save_file({k: v.contiguous() for k, v in dict(target).items()}, str(manifest))
        target = str(manifest)
    convert(src, dst, made, target=target, force=True)
    return load_file(str(dst))


def plan_problems(tmp_path: Path, steps: str, state: Mapping[str, torch.Tensor], target: Any = None) -> str:
    """The text of the PlanError the steps raise on `state`."""
    with pytest.raises(PlanError) as caught:
        ckptx.apply(recipe(tmp_path, steps), state, target)
    return str(caught.value)


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A seeded random tensor."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
