"""The destination rule against what a source IS, and against destinations that are not regular files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ckptx.errors import DestinationError
from ckptx.io.write.destination import InputFiles, input_files


@pytest.fixture
def folder_source(tmp_path: Path) -> Path:
    """A checkpoint folder whose tag folder is a link to a folder elsewhere (as a copied ZeRO run may have)."""
    elsewhere = tmp_path / "elsewhere" / "global_step2"
    elsewhere.mkdir(parents=True)
    (elsewhere / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"rank 0")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "latest").write_text("global_step2")
    (ckpt / "global_step2").symlink_to(elsewhere, target_is_directory=True)
    return ckpt


def test_a_folder_source_is_every_file_under_it_through_linked_folders(folder_source: Path) -> None:
    names = sorted(p.name for p in input_files(folder_source))
    assert names == ["latest", "zero_pp_rank_0_mp_rank_00_optim_states.pt"]


def test_a_file_of_a_linked_tag_folder_is_refused_by_any_name(folder_source: Path, tmp_path: Path) -> None:
    inputs = InputFiles.of([folder_source])
    rank = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    (tmp_path / "alias").symlink_to(folder_source, target_is_directory=True)
    for name in (folder_source / "global_step2" / rank, tmp_path / "elsewhere" / "global_step2" / rank):
        with pytest.raises(DestinationError, match="is a file of the source checkpoint"):
            inputs.check(name, force=True)
    os.link(tmp_path / "elsewhere" / "global_step2" / rank, tmp_path / "hard.pt")
    with pytest.raises(DestinationError, match="is a file of the source checkpoint"):
        inputs.check(tmp_path / "hard.pt", force=True)
    assert inputs.inside(tmp_path / "alias" / "new.safetensors") is not None
    assert inputs.inside(tmp_path / "new.safetensors") is None


def test_every_shard_of_an_index_is_an_input(tmp_path: Path) -> None:
    save_file({"a": torch.ones(1)}, str(tmp_path / "m-1.safetensors"))
    index = tmp_path / "m.safetensors.index.json"
    index.write_text('{"weight_map": {"a": "m-1.safetensors", "b": "m-2.safetensors"}}')
    assert sorted(p.name for p in input_files(index)) == ["m-1.safetensors", "m-2.safetensors", index.name]


@pytest.mark.parametrize(
    "index_text",
    ["[" * 200_000 + "]" * 200_000, '{"weight_map": [1, 2]}', '{"weight_map": {"a": 1, "b": ["x"]}}', "\xff"],
    ids=["200k-deep", "not-a-map", "not-names", "not-utf8"],
)
def test_a_broken_index_is_still_protected_and_left_to_its_reader(tmp_path: Path, index_text: str) -> None:
    index = tmp_path / "m.safetensors.index.json"
    index.write_bytes(index_text.encode("utf-8", "surrogateescape") if index_text != "\xff" else b"\xff")
    assert input_files(index) == [index]


def test_a_fifo_index_is_not_read(tmp_path: Path) -> None:
    index = tmp_path / "m.safetensors.index.json"
    os.mkfifo(index)
    assert input_files(index) == [index]  # returns at once: a FIFO is never opened


@pytest.mark.parametrize("kind", ["fifo", "device", "link-to-device"])
def test_a_destination_that_is_not_a_regular_file_is_refused_even_with_force(tmp_path: Path, kind: str) -> None:
    dst = tmp_path / "out.safetensors"
    if kind == "fifo":
        os.mkfifo(dst)
    else:
        dst = Path("/dev/null") if kind == "device" else dst
        if kind == "link-to-device":
            dst.symlink_to("/dev/null")
    with pytest.raises(DestinationError, match="not a regular file; ckptx writes and replaces regular files only"):
        InputFiles.of([]).check(dst, force=True)


def test_a_destination_behind_a_symlink_loop_is_one_error(tmp_path: Path) -> None:
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(DestinationError, match="is not a folder"):
        InputFiles.of([]).check(tmp_path / "loop" / "out.safetensors", force=False)
