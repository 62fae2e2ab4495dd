"""The one writer interface: every format is chosen by the table, stages, verifies and publishes the same way."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import ckptx
from ckptx.errors import DestinationError
from ckptx.io.read.open import open_source
from ckptx.io.write.formats import writer_for
from ckptx.io.write.writer import OutputOptions, Writer

TENSORS = {f"layers.{i}.weight": torch.arange(64, dtype=torch.float32).reshape(8, 8) + i for i in range(4)}
DESTINATIONS = {
    "safetensors": "out/model.safetensors",
    "torch": "out/model.pth",
    "safetensors-sharded": "out/model.safetensors.index.json",
    "hf-folder": "out/model/",
}


def _writer(tmp_path: Path, destination: str, documents: dict[str, bytes] | None = None) -> tuple[Writer, ckptx.Plan]:
    """The writer of `destination` (under tmp_path) for a copy of TENSORS; sharded formats get 2 tensors a shard."""
    src = tmp_path / "src.safetensors"
    save_file(TENSORS, str(src))
    plan = ckptx.plan(ckptx.Recipe(name="copy"), src)
    text = str(tmp_path / destination) + ("/" if destination.endswith("/") else "")
    shards = 512 if destination.endswith(("/", ".index.json")) else None
    return writer_for(text, plan.entries, OutputOptions(max_shard_size=shards, documents=documents or {})), plan


def _published(tmp_path: Path) -> list[Path]:
    return sorted(p for p in (tmp_path / "out").rglob("*") if p.is_file()) if (tmp_path / "out").exists() else []


@pytest.mark.parametrize("fmt", DESTINATIONS)
def test_the_table_chooses_the_writer_from_the_destination(tmp_path: Path, fmt: str) -> None:
    writer, _ = _writer(tmp_path, DESTINATIONS[fmt])
    assert writer.format == fmt


def test_an_unknown_extension_names_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(DestinationError, match=r"unknown output extension '\.npz'; use one of \.safetensors, \.pth"):
        _writer(tmp_path, "out/model.npz")


@pytest.mark.parametrize("fmt", DESTINATIONS)
def test_every_writer_publishes_nothing_when_verification_refuses(tmp_path: Path, fmt: str) -> None:
    writer, plan = _writer(tmp_path, DESTINATIONS[fmt])
    seen: list[Path] = []

    def refuse(staged: Path) -> None:
        seen.append(staged)
        assert staged.exists() and staged.name == writer.weights.name
        raise RuntimeError("the converted model computes something else")

    with pytest.raises(RuntimeError):
        writer.write(plan.source, verify=refuse)
    assert seen and _published(tmp_path) == []
    assert not (tmp_path / "out").exists()  # the folders this write made are gone again


@pytest.mark.parametrize("fmt", DESTINATIONS)
def test_every_writer_hands_verification_the_staged_weights_and_publishes_them(tmp_path: Path, fmt: str) -> None:
    writer, plan = _writer(tmp_path, DESTINATIONS[fmt])
    checked: list[dict[str, torch.Tensor]] = []

    def verify(staged: Path) -> None:
        with open_source(staged) as output:
            checked.append({key: output.load(key) for key in output.tensors})

    written = writer.write(plan.source, verify=verify)
    assert written == sum(p.stat().st_size for p in _published(tmp_path))
    assert set(checked[0]) == set(TENSORS) and all(torch.equal(checked[0][k], TENSORS[k]) for k in TENSORS)
    with open_source(writer.weights) as output:
        assert all(torch.equal(output.load(k), TENSORS[k]) for k in TENSORS)


def test_a_file_output_creates_missing_folders(tmp_path: Path) -> None:
    writer, plan = _writer(tmp_path, "out/deeper/model.safetensors")
    writer.write(plan.source)
    assert load_file(str(tmp_path / "out/deeper/model.safetensors")).keys() == TENSORS.keys()


def test_a_model_folder_output_creates_missing_folders_like_a_file_output(tmp_path: Path) -> None:
    writer, plan = _writer(tmp_path, "out/deeper/model/", documents={"config.json": b"{}"})
    writer.write(plan.source)
    folder = tmp_path / "out/deeper/model"
    assert (folder / "config.json").read_bytes() == b"{}" and (folder / "model.safetensors.index.json").is_file()
