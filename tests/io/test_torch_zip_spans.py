"""Raw spans of torch zip checkpoints: exactly the tensor's bytes in the file, or no span at all."""

from __future__ import annotations

import argparse
import zipfile
from pathlib import Path

import pytest
import torch

from ckptx.io.read.open import open_source
from ckptx.io.read.torch_zip import TorchZipSource, ZipSpanSource


def special_state() -> dict[str, torch.Tensor]:
    """Every kind of tensor a state dict holds: views, non-contiguous, tied, 0-dim, empty, bf16, int64, bool."""
    base = torch.arange(100, dtype=torch.float32)
    weight = torch.nn.Parameter(torch.randn(6, 4))
    matrix = torch.randn(3, 5)
    return {
        "weight": weight,
        "tied": weight,
        "half": torch.randn(7, dtype=torch.bfloat16),
        "fp16": torch.randn(2, 3, dtype=torch.float16),
        "scalar": torch.tensor(3.5),
        "steps": torch.tensor(17, dtype=torch.int64),
        "flags": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
        "view": base[10:20],
        "row": matrix[1],
        "transposed": matrix.t(),
        "strided": base[::2],
        "ints": torch.arange(12, dtype=torch.int64).reshape(3, 4),
    }


def file_bytes(path: Path, offset: int, nbytes: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(nbytes)


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def test_spans_are_exactly_the_tensor_bytes(tmp_path: Path) -> None:
    state = special_state()
    path = tmp_path / "special.pth"
    torch.save(state, path)
    with open_source(path) as source:
        assert isinstance(source, TorchZipSource)
        spanned = {k for k in state if source.raw_span(k) is not None}
        for key in spanned:
            span = source.raw_span(key)
            assert span.file == str(path)
            assert span.nbytes == state[key].numel() * state[key].element_size()
            assert file_bytes(path, span.offset, span.nbytes) == tensor_bytes(state[key]), key
    # Non-contiguous tensors have no span; empty ones need none; everything else is copied raw.
    assert spanned == set(state) - {"transposed", "strided", "empty"}


def test_views_span_only_their_part_of_the_storage(tmp_path: Path) -> None:
    state = special_state()
    path = tmp_path / "views.pth"
    torch.save(state, path)
    with open_source(path) as source:
        view, row = source.raw_span("view"), source.raw_span("row")
    assert view.nbytes == 10 * 4 and row.nbytes == 5 * 4
    assert file_bytes(path, view.offset, view.nbytes) == tensor_bytes(torch.arange(10, 20, dtype=torch.float32))


def test_tied_weights_share_one_span(tmp_path: Path) -> None:
    path = tmp_path / "tied.pth"
    torch.save(special_state(), path)
    with open_source(path) as source:
        assert source.raw_span("weight") == source.raw_span("tied")


def test_load_of_a_spanned_tensor_equals_torch_load(tmp_path: Path) -> None:
    state = special_state()
    path = tmp_path / "load.pth"
    torch.save(state, path)
    with open_source(path) as source:
        for key, value in state.items():
            loaded = source.load(key)
            assert loaded.dtype == value.dtype and torch.equal(loaded, value.detach()), key


def test_spans_inside_a_training_checkpoint_with_other_objects(tmp_path: Path) -> None:
    state = special_state()
    path = tmp_path / "train.pth"
    torch.save(
        {
            "epoch": 3,
            "args": argparse.Namespace(lr=0.1),
            "optimizer": {"state": {0: {"m": torch.ones(3)}}},
            "model": {f"module.{k}": v for k, v in state.items()},
        },
        path,
    )
    with open_source(path, ["model"], allow_globals=["argparse.Namespace"]) as source:
        span = source.raw_span("module.ints")
        assert span is not None
        assert file_bytes(path, span.offset, span.nbytes) == tensor_bytes(state["ints"])


def test_big_endian_archive_gets_no_spans(tmp_path: Path) -> None:
    path, swapped = tmp_path / "little.pth", tmp_path / "big.pth"
    torch.save({"w": torch.arange(8, dtype=torch.float32)}, path)
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(swapped, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = b"big" if info.filename.endswith("/byteorder") else src.read(info)
            dst.writestr(info.filename, data)
    with open_source(swapped) as source:
        assert source.raw_span("w") is None
        # torch byte-swaps the storage itself; the values read are torch's
        assert source.load("w").shape == (8,)


def test_legacy_pickle_files_have_no_spans(tmp_path: Path) -> None:
    path = tmp_path / "legacy.pth"
    torch.save({"w": torch.ones(4)}, path, _use_new_zipfile_serialization=False)
    with open_source(path) as source:
        assert source.format == "torch-legacy" and source.raw_span("w") is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.uint8, torch.float64])
def test_spans_for_every_dtype(tmp_path: Path, dtype: torch.dtype) -> None:
    value = (torch.arange(24) % 7).to(dtype).reshape(2, 3, 4)
    path = tmp_path / "dtype.pth"
    torch.save({"t": value}, path)
    with open_source(path) as source:
        span = source.raw_span("t")
        assert file_bytes(path, span.offset, span.nbytes) == tensor_bytes(value)


def plain_state() -> dict[str, torch.Tensor]:
    """The tensors of `special_state` that are plain row-major slices of their storage (what state dicts hold)."""
    return {k: v for k, v in special_state().items() if k not in ("transposed", "strided")}


def test_a_plain_checkpoint_is_read_without_torch_and_equals_torch_load(tmp_path: Path) -> None:
    state = plain_state()
    path = tmp_path / "plain.pth"
    torch.save({"epoch": 3, "state_dict": state}, path)
    with open_source(path) as source:
        assert isinstance(source, ZipSpanSource)
        assert source.extracted_from == "state_dict"
        assert source.top_level == {
            "epoch": "int 3",
            "state_dict": f"dict ({len(state)} entries, {len(state)} tensors)",
        }
        for key, value in state.items():
            assert str(source.tensors[key]) == f"{str(value.dtype)[6:]}{list(value.shape)}", key
            span = source.raw_span(key)
            assert file_bytes(path, span.offset, span.nbytes) == tensor_bytes(value), key
            loaded = source.load(key)
            assert loaded.dtype == value.dtype and torch.equal(loaded, value.detach()), key
        assert source.raw_span("weight") == source.raw_span("tied")


def test_dtypes_without_a_storage_class_are_read_without_torch(tmp_path: Path) -> None:
    value = torch.linspace(-2, 2, 12).reshape(3, 4).to(torch.float8_e4m3fn)
    path = tmp_path / "fp8.pth"
    torch.save({"w": value, "b": torch.tensor([1, 2, 60000], dtype=torch.uint16)}, path)
    with open_source(path) as source:
        assert isinstance(source, ZipSpanSource)
        assert str(source.tensors["w"]) == "float8_e4m3fn[3, 4]" and str(source.tensors["b"]) == "uint16[3]"
        assert torch.equal(source.load("w").view(torch.uint8), value.view(torch.uint8))
        assert torch.equal(source.load("b"), torch.tensor([1, 2, 60000], dtype=torch.uint16))


def test_a_module_state_dict_keeps_its_metadata_without_torch(tmp_path: Path) -> None:
    state = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3)).state_dict()
    path = tmp_path / "module.pth"
    torch.save(state, path)
    with open_source(path) as source:
        assert isinstance(source, ZipSpanSource)
        assert source.state_metadata == state._metadata


@pytest.mark.parametrize(
    ("extra", "why"),
    [
        ({"args": argparse.Namespace(lr=0.1)}, "a global the stub does not model: torch's safe loader decides"),
        ({"model.t": torch.randn(3, 4).t()}, "a non-contiguous tensor: torch computes it"),
    ],
)
def test_anything_unusual_is_read_by_torch(tmp_path: Path, extra: dict, why: str) -> None:
    path = tmp_path / "unusual.pth"
    torch.save({"model.w": torch.ones(2), **extra}, path)
    with open_source(path, ["."], allow_globals=["argparse.Namespace"]) as source:
        assert isinstance(source, TorchZipSource), why
        assert torch.equal(source.load("model.w"), torch.ones(2))
