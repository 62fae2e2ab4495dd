"""Numbers are numbers: `K=V` items and every YAML file ckptx reads use YAML 1.2 core-schema scalars, so `1e-5`,
`1E5`, `.5`, `-3` and `1e-06` are numbers everywhere (PyYAML's YAML 1.1 reads `1e-5` as a string)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from ckptx.batch.jobs import load_jobs
from ckptx.errors import CkptxError
from ckptx.io.manifest import read_manifest
from ckptx.rules.loader import load_rules, load_rules_text
from ckptx.text import key_values
from tests.conftest import TINY_TARGET

NUMBERS = {
    "1e-5": 1e-5,
    "1E5": 1e5,
    ".5": 0.5,
    "-3": -3,
    "1e-06": 1e-6,
    "+1.0e-06": 1e-6,
    "1.": 1.0,
    "010": 10,
    "0x1F": 31,
    "0o17": 15,
    "-.inf": -math.inf,
}
TEXT = {"yes": "yes", "off": "off", "1_000": "1_000", "1:30": "1:30", "2024-01-01": "2024-01-01", "abc": "abc"}


@pytest.mark.parametrize("flag", ["--set", "--target-arg", "--verify-arg"])
def test_key_values_read_numbers_by_yaml_1_2(flag: str) -> None:
    got = key_values([f"k{i}={raw}" for i, raw in enumerate([*NUMBERS, *TEXT])], flag)
    want = list(NUMBERS.values()) + list(TEXT.values())
    assert list(got.values()) == want
    assert all(type(v) is type(w) for v, w in zip(got.values(), want))
    assert key_values(["a=true", "b=null", "c=", "d=[1, 2e-3]", "e='1e-5'"], flag) == {
        "a": True,
        "b": None,
        "c": "",
        "d": [1, 0.002],
        "e": "1e-5",
    }


def test_a_value_that_cannot_be_read_names_its_key() -> None:
    with pytest.raises(CkptxError, match=r"--set rms_norm_eps: cannot read the value '\[1e-5' as YAML"):
        key_values(["size=tiny", "rms_norm_eps=[1e-5"], "--set")
    with pytest.raises(CkptxError, match="expected KEY=VALUE"):
        key_values(["=1"], "--set")


RECIPE = """\
ckptx: 1
name: eps
params: {eps: 1e-5, scale: .5, depth: -3, tiny: 1e-06}
steps: []
target:
  model: %s
  kwargs: {channels: 4, eps: '${eps}'}
"""


def test_recipe_params_and_kwargs_read_numbers_by_yaml_1_2(tmp_path: Path) -> None:
    recipe = load_rules_text(RECIPE % TINY_TARGET, "eps.yaml", base_dir=tmp_path)
    assert recipe.target is not None and recipe.target.kwargs["eps"] == 1e-5
    path = tmp_path / "eps.yaml"
    path.write_text(RECIPE % TINY_TARGET)
    loaded = load_rules(path, params={"eps": 1e-3})
    assert loaded.target is not None and loaded.target.kwargs["eps"] == 1e-3


def test_jobs_file_params_read_numbers_like_set(tmp_path: Path) -> None:
    (tmp_path / "eps.yaml").write_text(RECIPE % TINY_TARGET)
    torch.save({"w": torch.zeros(1)}, tmp_path / "a.pth")
    (tmp_path / "jobs.yaml").write_text(
        "ckptx: 1\njobs:\n  - {src: a.pth, dst: out.safetensors, rules: eps.yaml, params: {eps: 1e-5, tiny: 1E5}}\n"
    )
    (job,) = load_jobs(tmp_path / "jobs.yaml").jobs
    assert job.params == key_values(["eps=1e-5", "tiny=1E5"], "--set") == {"eps": 1e-5, "tiny": 1e5}


def test_yaml_manifest_reads_like_json(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text("tensors:\n  w: {shape: [2, 010], dtype: float32}\n")
    assert read_manifest(path)["w"].shape == (2, 10)
