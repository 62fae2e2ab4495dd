"""Behaviour no test pinned before: the default extract order, allow_unexpected, temporary files after a failed
write, and the key order of streamed outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import ckptx
from ckptx.errors import TensorOpError, ValidationFailed
from ckptx.io.write import units
from ckptx.io.write.atomic import TEMP_SUFFIX

TINY_MODULE = "tests.helpers.models:TinyNet"  # a torch.nn.Module subclass: the trust rule lets a file name it


def test_default_extract_prefers_state_dict_over_model(tmp_path: Path, tiny_state: dict) -> None:
    """Without `extract:`, a checkpoint holding both takes `state_dict` (the order is ., state_dict, model, module)."""
    path = tmp_path / "both.pt"
    torch.save({"model": {"m.w": torch.zeros(1)}, "state_dict": tiny_state}, path)
    plan = ckptx.plan(ckptx.Recipe(name="r"), path)
    assert plan.source.extracted_from == "state_dict" and [e.key for e in plan.entries] == list(tiny_state)


def test_default_extract_takes_the_weights_beside_a_step_counter(tmp_path: Path, tiny_state: dict, run_cli) -> None:
    """A training state with a scalar tensor at its top level (`step`, `global_step`) converts its `model`, the
    candidate whose own tensors hold the most elements, not the lone scalar; the rest is named as ignored."""
    path = tmp_path / "train.pt"
    optimizer = {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 0.1}]}
    torch.save({"model": tiny_state, "optimizer": optimizer, "epoch": 3, "step": torch.tensor(5)}, path)
    plan = ckptx.plan(ckptx.Recipe(name="r"), path)
    assert plan.source.extracted_from == "model" and [e.key for e in plan.entries] == list(tiny_state)
    shown = run_cli("convert", path, "-o", tmp_path / "out.safetensors")
    assert shown.code == 0 and "ignored top-level entries: optimizer, epoch, step" in shown.out


def test_allow_unexpected_lets_listed_extra_keys_through(tmp_path: Path, tiny_state: dict, write_rules) -> None:
    src = tmp_path / "extra.pt"
    torch.save({**tiny_state, "aux.head.weight": torch.zeros(2)}, src)
    strict = write_rules(f"ckptx: 1\nsteps: []\ntarget: {{model: '{TINY_MODULE}'}}\n", "strict.yaml")
    with pytest.raises(ValidationFailed, match="aux.head.weight"):
        ckptx.convert(src, tmp_path / "o.safetensors", strict)
    allowed = write_rules(
        f"ckptx: 1\nsteps: []\ntarget: {{model: '{TINY_MODULE}', allow_unexpected: ['^aux\\.']}}\n", "allowed.yaml"
    )
    result = ckptx.convert(src, tmp_path / "o.safetensors", allowed)
    assert result.report.ok and result.report.allowed_unexpected == ["aux.head.weight"]


def test_a_failed_write_leaves_no_temporary_file(
    tmp_path: Path, safetensors_file: Path, monkeypatch, write_rules
) -> None:
    def broken(*args, **kwargs):
        raise TensorOpError("tensor 'x': broken on purpose")

    monkeypatch.setattr(units, "write_piece", broken)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(TensorOpError):
        ckptx.convert(
            safetensors_file, out / "o.safetensors", write_rules("ckptx: 1\nsteps: [{cast: {dtype: float16}}]\n")
        )
    assert list(out.iterdir()) == []


def test_streamed_output_keeps_the_plans_key_order(tmp_path: Path, write_rules) -> None:
    """Keys are written in plan order (here: the source order, one key renamed), and the data offsets follow it."""
    keys = ["z.last", "a.first", "m.middle", "b.second"]
    src = tmp_path / "src.pt"
    torch.save({k: torch.full((3,), float(i)) for i, k in enumerate(keys)}, src)
    dst = tmp_path / "o.safetensors"
    ckptx.convert(src, dst, write_rules("ckptx: 1\nsteps: [{rename: [['^m\\.', 'q.']]}]\n"))
    raw = dst.read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    written = [k for k in header if k != "__metadata__"]
    assert written == ["z.last", "a.first", "q.middle", "b.second"]
    assert [header[k]["data_offsets"][0] for k in written] == [0, 12, 24, 36]
    assert not any(p.name.endswith(TEMP_SUFFIX) for p in tmp_path.iterdir())
