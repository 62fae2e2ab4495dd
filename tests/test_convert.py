"""End-to-end conversions: destination safety, atomic writes, special tensors, metadata, load_into."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import ckptx
from ckptx.errors import DestinationError, ValidationFailed
from tests.conftest import TINY_TARGET, subprocess_env
from tests.helpers.models import TiedNet, randomized, tiny_net

STRIP = "ckptx: 1\nname: strip\nextract: model\nsteps: [{strip_prefix: module.}]\n"


def test_ddp_checkpoint_converts_and_loads_strictly(
    tmp_path: Path, ddp_checkpoint: Path, tiny_state: dict, write_rules: Callable[..., Path]
) -> None:
    dst = tmp_path / "out.safetensors"
    result = ckptx.convert(ddp_checkpoint, dst, write_rules(STRIP), target=TINY_TARGET)
    assert result.report is not None and result.report.ok
    model = tiny_net()
    model.load_state_dict(load_file(str(dst)), strict=True)
    for key, value in tiny_state.items():
        assert torch.equal(model.state_dict()[key], value)


def test_validation_failure_writes_nothing(
    tmp_path: Path, ddp_checkpoint: Path, write_rules: Callable[..., Path]
) -> None:
    dst = tmp_path / "out.safetensors"
    rules = write_rules("ckptx: 1\nextract: model\nsteps: [{strip_prefix: module.}, {drop: ['^fc\\.']}]\n")
    with pytest.raises(ValidationFailed) as caught:
        ckptx.convert(ddp_checkpoint, dst, rules, target=TINY_TARGET)
    assert [p.key for p in caught.value.report.missing] == ["fc.weight", "fc.bias"]
    assert not dst.exists() and list(tmp_path.glob(".out.safetensors*")) == []


def test_missing_key_suggests_same_shape_candidate(
    tmp_path: Path, ddp_checkpoint: Path, write_rules: Callable[..., Path]
) -> None:
    rules = write_rules("ckptx: 1\nextract: model\nsteps: [{strip_prefix: module.}, {rename: [['^fc\\.', 'head.']]}]\n")
    result = ckptx.convert(ddp_checkpoint, None, rules, target=TINY_TARGET, dry_run=True)
    hints = {p.key: p.hint for p in result.report.missing}
    assert hints == {
        "fc.weight": "did you mean 'head.weight' (same shape)?",
        "fc.bias": "did you mean 'head.bias' (same shape)?",
    }


def test_existing_destination_needs_force(
    tmp_path: Path, ddp_checkpoint: Path, write_rules: Callable[..., Path]
) -> None:
    dst = tmp_path / "out.safetensors"
    dst.write_bytes(b"keep me")
    with pytest.raises(DestinationError, match="already exists; pass --force to overwrite it"):
        ckptx.convert(ddp_checkpoint, dst, write_rules(STRIP))
    assert dst.read_bytes() == b"keep me"
    ckptx.convert(ddp_checkpoint, dst, write_rules(STRIP), force=True)
    assert len(load_file(str(dst))) == 9


def test_destination_equal_to_source_is_refused(ddp_checkpoint: Path, write_rules: Callable[..., Path]) -> None:
    before = ddp_checkpoint.read_bytes()
    with pytest.raises(DestinationError, match="the destination is a file of the source checkpoint"):
        ckptx.convert(ddp_checkpoint, ddp_checkpoint, write_rules(STRIP), force=True)
    assert ddp_checkpoint.read_bytes() == before


def test_unknown_output_extension_is_refused(
    tmp_path: Path, ddp_checkpoint: Path, write_rules: Callable[..., Path]
) -> None:
    with pytest.raises(DestinationError, match=r"unknown output extension '\.npz'"):
        ckptx.convert(ddp_checkpoint, tmp_path / "x.npz", write_rules(STRIP))


def test_source_is_never_modified(tmp_path: Path, ddp_checkpoint: Path, write_rules: Callable[..., Path]) -> None:
    before = (ddp_checkpoint.read_bytes(), ddp_checkpoint.stat().st_mtime_ns)
    ckptx.convert(ddp_checkpoint, tmp_path / "o.pth", write_rules(STRIP + "  # cast\n"))
    assert (ddp_checkpoint.read_bytes(), ddp_checkpoint.stat().st_mtime_ns) == before


def test_process_killed_mid_write_leaves_no_destination(tmp_path: Path, write_rules: Callable[..., Path]) -> None:
    src = tmp_path / "big.safetensors"
    save_file({f"t{i}": torch.full((256, 1024), float(i)) for i in range(16)}, str(src))
    dst = tmp_path / "out.safetensors"
    rules = write_rules("ckptx: 1\nsteps: [{cast: {dtype: float16}}]\n")
    script = textwrap.dedent(f"""
        import os, signal, ckptx
        def progress(done, total):
            if done > total // 3:
                os.kill(os.getpid(), signal.SIGKILL)
        ckptx.convert({str(src)!r}, {str(dst)!r}, {str(rules)!r}, progress=progress)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, env=subprocess_env())
    assert proc.returncode == -9
    assert not dst.exists()


def test_tied_weights_to_safetensors(tmp_path: Path, write_rules: Callable[..., Path]) -> None:
    model = randomized(TiedNet())
    src = tmp_path / "tied.pth"
    torch.save(model.state_dict(), src)
    dst = tmp_path / "tied.safetensors"
    ckptx.convert(src, dst, write_rules("ckptx: 1\n"))
    out = load_file(str(dst))
    assert torch.equal(out["embed.weight"], model.embed.weight) and torch.equal(out["out.weight"], model.embed.weight)


SPECIAL = {
    "scalar": torch.tensor(3.5),
    "empty": torch.zeros(0, 4),
    "transposed": torch.arange(12, dtype=torch.float32).reshape(3, 4).t(),
    "steps": torch.tensor(17, dtype=torch.int64),
    "flags": torch.tensor([True, False, True]),
    "half": torch.randn(5, dtype=torch.bfloat16),
}


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_special_tensors_pass_through_intact(tmp_path: Path, suffix: str, write_rules: Callable[..., Path]) -> None:
    base = torch.arange(100, dtype=torch.float32)
    state = dict(SPECIAL, view=base[10:20])
    src = tmp_path / "special.pth"
    torch.save(state, src)
    dst = tmp_path / f"out{suffix}"
    ckptx.convert(src, dst, write_rules("ckptx: 1\n"))
    out = load_file(str(dst)) if suffix == ".safetensors" else torch.load(dst, weights_only=True)
    for key, value in state.items():
        assert out[key].dtype == value.dtype and torch.equal(out[key], value), key
    if suffix == ".pth":
        assert out["view"].untyped_storage().nbytes() == 40  # the view, not the 400-byte storage


def test_safetensors_output_records_provenance(
    tmp_path: Path, ddp_checkpoint: Path, write_rules: Callable[..., Path]
) -> None:
    rules = write_rules(STRIP)
    dst = tmp_path / "out.safetensors"
    ckptx.convert(ddp_checkpoint, dst, rules)
    with safe_open(str(dst), "pt") as f:
        meta = f.metadata()
    recipe = ckptx.load_rules(rules)
    assert meta["ckptx.recipe"] == "strip"
    assert meta["ckptx.rules"] == f"strip={recipe.files[0].sha256}"
    assert meta["ckptx.version"] == ckptx.__version__ and meta["ckptx.source"] == "train.pth"


def test_non_tensor_entries_are_dropped_with_a_note(tmp_path: Path, write_rules: Callable[..., Path]) -> None:
    src = tmp_path / "mixed.pth"
    torch.save({"w": torch.ones(2), "step": 5, "name": "x"}, src)
    result = ckptx.convert(src, tmp_path / "o.safetensors", write_rules("ckptx: 1\nextract: .\n"))
    assert result.notes == ["non-tensor entries dropped (safetensors holds tensors only): name, step"]


def test_pth_output_keeps_metadata_when_modules_are_not_renamed(
    tmp_path: Path, write_rules: Callable[..., Path]
) -> None:
    src = tmp_path / "sd.pth"
    torch.save(tiny_net().state_dict(), src)
    ckptx.convert(src, tmp_path / "kept.pth", write_rules("ckptx: 1\nsteps: [{cast: {dtype: float16}}]\n"))
    kept = torch.load(tmp_path / "kept.pth", weights_only=True)
    assert isinstance(kept, OrderedDict) and kept._metadata["bn"]["version"] == 2


def test_pth_output_drops_metadata_when_modules_are_renamed(tmp_path: Path, write_rules: Callable[..., Path]) -> None:
    src = tmp_path / "sd.pth"
    torch.save(tiny_net().state_dict(), src)
    result = ckptx.convert(src, tmp_path / "renamed.pth", write_rules("ckptx: 1\nsteps: [{add_prefix: net.}]\n"))
    assert not hasattr(torch.load(tmp_path / "renamed.pth", weights_only=True), "_metadata")
    assert any("_metadata" in n for n in result.notes)


def test_dry_run_writes_nothing(tmp_path: Path, ddp_checkpoint: Path, write_rules: Callable[..., Path]) -> None:
    result = ckptx.convert(ddp_checkpoint, tmp_path / "o.safetensors", write_rules(STRIP), dry_run=True)
    assert not result.written and not (tmp_path / "o.safetensors").exists()


def test_apply_in_memory(write_rules: Callable[..., Path], tiny_state: dict) -> None:
    recipe = ckptx.load_rules(write_rules("ckptx: 1\nsteps: [{add_prefix: backbone.}, {cast: {dtype: float16}}]\n"))
    out = ckptx.apply(recipe, tiny_state)
    assert torch.equal(out["backbone.conv.weight"], tiny_state["conv.weight"].half())


def test_load_into_live_model(ddp_checkpoint: Path, tiny_state: dict, write_rules: Callable[..., Path]) -> None:
    model = tiny_net()
    report = ckptx.load_into(model, ddp_checkpoint, write_rules(STRIP))
    assert report.ok and torch.equal(model.conv.weight, tiny_state["conv.weight"])


def test_load_into_strict_refuses_partial(ddp_checkpoint: Path, write_rules: Callable[..., Path]) -> None:
    model = tiny_net()
    before = model.conv.weight.clone()
    with pytest.raises(ValidationFailed):
        ckptx.load_into(model, ddp_checkpoint, write_rules(STRIP.replace("]", ", {drop: ['^fc']}]")))
    assert torch.equal(model.conv.weight, before)


def test_python_m_ckptx_runs(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ckptx", "--version"], capture_output=True, text=True, env=subprocess_env()
    )
    assert proc.returncode == 0 and proc.stdout.startswith("ckptx ")
