"""Truncated or corrupt inputs give one line naming the file and the problem."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ckptx.errors import SourceError
from ckptx.io.read.open import open_source


def _truncate(path: Path, keep: int) -> Path:
    data = path.read_bytes()
    out = path.with_name("cut-" + path.name)
    out.write_bytes(data[:keep] if keep >= 0 else data[: len(data) + keep])
    return out


def test_truncated_safetensors_data(safetensors_file: Path) -> None:
    cut = _truncate(safetensors_file, -10)
    with pytest.raises(
        SourceError,
        match=r"cut-tiny.safetensors: not a valid safetensors file: tensor '.+' ends at "
        r"byte \d+ of the data section, which has only \d+ bytes: the file is "
        r"truncated; the file is damaged or not safetensors: download or export it",
    ):
        open_source(cut)


def test_truncated_safetensors_header(safetensors_file: Path) -> None:
    cut = _truncate(safetensors_file, 40)
    with pytest.raises(SourceError, match=r"cut-tiny.safetensors: not a valid safetensors file: header says \d+ bytes"):
        open_source(cut)


def test_safetensors_header_not_json(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes((8).to_bytes(8, "little") + b"{notjson")
    with pytest.raises(
        SourceError,
        match=r"bad.safetensors: not a valid safetensors file: the header is not JSON: "
        r"Expecting property name enclosed in double quotes \(file byte 9\)",
    ):
        open_source(path)


def test_tiny_file(tmp_path: Path) -> None:
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(b"abc")
    with pytest.raises(SourceError, match="tiny.safetensors: not a safetensors file: only 3 bytes"):
        open_source(path)


def test_truncated_zip(ddp_checkpoint: Path) -> None:
    cut = _truncate(ddp_checkpoint, ddp_checkpoint.stat().st_size // 2)
    with pytest.raises(SourceError) as caught:
        open_source(cut, ["model"])
    message = str(caught.value)
    assert message.startswith(f"{cut}: not a readable torch checkpoint: the zip archive is truncated or corrupt")
    assert "\n" not in message


def test_truncated_legacy_pickle(tmp_path: Path, tiny_state: dict) -> None:
    path = tmp_path / "legacy.pth"
    torch.save(tiny_state, path, _use_new_zipfile_serialization=False)
    cut = _truncate(path, 100)
    with pytest.raises(SourceError, match=r"cut-legacy.pth: not a readable torch checkpoint"):
        open_source(cut)


def test_garbage_file(tmp_path: Path) -> None:
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"hello world, not a checkpoint")
    with pytest.raises(SourceError, match=r"garbage.pth: not a readable torch checkpoint"):
        open_source(path)


def test_missing_extract_path_lists_top_level(ddp_checkpoint: Path) -> None:
    with pytest.raises(SourceError) as caught:
        open_source(ddp_checkpoint, ["state_dict", "weights"])
    assert str(caught.value) == (
        f"{ddp_checkpoint}: no state dict at state_dict, weights; the top level holds: model, optimizer, epoch; "
        "set `extract:` in the recipe or --extract to the right path"
    )


def test_missing_file() -> None:
    with pytest.raises(SourceError, match="nowhere.pth: no such file"):
        open_source("nowhere.pth")


def _raw_safetensors(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return path


def test_safetensors_entry_whose_bytes_do_not_fit_its_shape(tmp_path: Path) -> None:
    path = _raw_safetensors(
        tmp_path / "odd.safetensors", {"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}}, bytes(24)
    )
    with pytest.raises(SourceError) as caught:
        open_source(path)
    assert str(caught.value) == (
        f"{path}: not a valid safetensors file: tensor 'w' has 20 bytes but dtype F32 shape "
        f"[2, 3] needs 24; the file is damaged or not safetensors: download or export it again"
    )


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        (
            {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]},
            "tensor 'w' has dtype \"F33\", which is not a safetensors dtype",
        ),
        (
            {"dtype": "F32", "shape": [[1]], "data_offsets": [0, 4]},
            "tensor 'w': \"shape\" holds a list; it must hold integers from 0 to 2^64-1",
        ),
        (
            {"dtype": "F32", "shape": [1], "data_offsets": [0]},
            "tensor 'w': \"data_offsets\" has 1 numbers; it must be [begin, end]",
        ),
        ({"dtype": "F32", "shape": [1]}, "the entry of tensor 'w' has no \"data_offsets\""),
        (
            {"dtype": "F32", "shape": [-1], "data_offsets": [4, 0]},
            "tensor 'w': \"shape\" holds the number -1; it must hold integers from 0 to 2^64-1",
        ),
        (
            {"dtype": "F32", "shape": "12", "data_offsets": [0, 4]},
            "tensor 'w': \"shape\" is a string; it must be a list of integers",
        ),
    ],
)
def test_safetensors_entry_that_is_not_a_tensor_description(tmp_path: Path, entry: dict, problem: str) -> None:
    path = _raw_safetensors(tmp_path / "odd.safetensors", {"w": entry}, bytes(4))
    with pytest.raises(SourceError) as caught:
        open_source(path)
    assert str(caught.value) == (
        f"{path}: not a valid safetensors file: {problem}; the file is damaged or not "
        f"safetensors: download or export it again"
    )


def test_safetensors_tensors_are_listed_in_file_order_whatever_the_header_order(tmp_path: Path) -> None:
    header = {
        "a": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "c": {"dtype": "F16", "shape": [2], "data_offsets": [12, 16]},
    }
    path = _raw_safetensors(tmp_path / "order.safetensors", header, bytes(16))
    with open_source(path) as source:
        assert [(k, str(m)) for k, m in source.tensors.items()] == [
            ("b", "float32[2]"),
            ("a", "float32[1]"),
            ("c", "float16[2]"),
        ]
