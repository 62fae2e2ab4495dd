"""Byte kernels of the shape ops (ckptx/ops/layout.py, dims.py): reshape, squeeze and unsqueeze keep the bytes,
permute reorders whole elements with numpy; each gives the bytes torch gives, so the writer needs no torch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ckptx.dtypes import TensorMeta
from ckptx.ops import layout
from ckptx.ops.layout import permute_pieces
from tests.conftest import cli_without_torch


def raw(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().view(torch.uint8).numpy().tobytes()


def run_pieces(tensor: torch.Tensor, dims: tuple[int, ...]) -> bytes:
    meta = TensorMeta(tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."))
    data = raw(tensor)
    pieces = permute_pieces({"dims": dims}, [meta])
    assert pieces is not None
    return b"".join(p.convert([data[p.ranges[0][0] : p.ranges[0][1]]]) for p in pieces)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.bool, torch.complex128])
@pytest.mark.parametrize(
    ("shape", "dims"),
    [
        ((5, 7), (1, 0)),
        ((4, 3, 2, 5), (0, 2, 3, 1)),
        ((4, 3, 2, 5), (0, 1, 3, 2)),
        ((3, 4, 5), (2, 0, 1)),
        ((6,), (0,)),
    ],
)
def test_permute_pieces_give_torchs_bytes(dtype: torch.dtype, shape: tuple[int, ...], dims: tuple[int, ...]) -> None:
    tensor = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 10).to(dtype)
    assert run_pieces(tensor, dims) == raw(tensor.permute(dims))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8, torch.float64])
@pytest.mark.parametrize(
    ("shape", "dims"), [((300, 260), (1, 0)), ((2, 260, 300), (0, 2, 1)), ((260, 2, 300), (2, 0, 1))]
)
def test_large_transposes_copied_in_tiles_give_torchs_bytes(
    dtype: torch.dtype, shape: tuple[int, ...], dims: tuple[int, ...]
) -> None:
    tensor = (torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 50).to(dtype)
    assert run_pieces(tensor, dims) == raw(tensor.permute(dims))


def test_a_permutation_keeping_dim_0_reads_slabs_of_whole_leading_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(layout, "PERMUTE_PIECE_BYTES", 3 * 4 * 6 * 4)  # three leading slabs a piece
    tensor = torch.randn(10, 4, 6)
    meta = TensorMeta((10, 4, 6), "float32")
    pieces = list(permute_pieces({"dims": (0, 2, 1)}, [meta]) or [])
    assert [p.ranges[0] for p in pieces] == [(0, 288), (288, 576), (576, 864), (864, 960)]
    assert run_pieces(tensor, (0, 2, 1)) == raw(tensor.permute(0, 2, 1))


@pytest.mark.parametrize(
    "steps",
    [
        "- permute: {match: '.*', dims: [1, 0]}",
        "- reshape: {match: '.*', shape: [-1]}",
        "- unsqueeze: {match: '.*', dim: 0}",
    ],
)
def test_shape_steps_write_torchs_tensors_without_importing_torch(tmp_path: Path, steps: str) -> None:
    """The conversion runs in a child process that must not import torch (650 MiB with the pinned wheel); the
    output equals the same steps computed with torch."""
    state = {"a.weight": torch.randn(64, 48), "b.weight": torch.arange(12, dtype=torch.int64).reshape(3, 4)}
    src, dst, rules = tmp_path / "src.safetensors", tmp_path / "out.safetensors", tmp_path / "r.yaml"
    save_file(state, str(src))
    rules.write_text(f"ckptx: 1\nsteps:\n  {steps}\n")
    cli_without_torch("convert", src, "-o", dst, "-r", rules, "--workers", "2")
    out = load_file(str(dst))
    for key, value in state.items():
        expected = value.t() if "permute" in steps else value.reshape(-1) if "reshape" in steps else value.unsqueeze(0)
        assert torch.equal(out[key], expected.contiguous())


@pytest.mark.parametrize(
    "steps",
    [
        "- permute: {match: '.*', dims: [1, 0]}\n  - cast: {match: '.*', dtype: bfloat16}",
        "- reshape: {match: '.*', shape: [-1]}\n  - cast: {match: '.*', dtype: float16}",
        "- split: {match: 'a', dim: 1, sizes: [16, 32], into: [a1, a2]}\n  - cast: {match: '.*', dtype: bfloat16}",
        "- rotary_permute: {match: 'a', heads: 4, to: half_split}\n  - reshape: {match: '.*', shape: [-1]}",
    ],
)
@pytest.mark.parametrize("workers", ["1", "2"])
def test_elementwise_steps_after_a_byte_kernel_still_need_no_torch(tmp_path: Path, steps: str, workers: str) -> None:
    """A cast after a permute, split or rotary reordering (what `--dtype` adds after a recipe) is applied to each
    piece's bytes: no torch, and the tensors torch computes for the same steps."""
    state = {"a.weight": torch.randn(64, 48), "b.weight": torch.randn(8, 4)}
    src, dst, rules = tmp_path / "src.safetensors", tmp_path / "out.safetensors", tmp_path / "r.yaml"
    save_file(state, str(src))
    rules.write_text(f"ckptx: 1\nsteps:\n  {steps}\n")
    cli_without_torch("convert", src, "-o", dst, "-r", rules, "--workers", workers)
    import ckptx

    expected = ckptx.apply(rules, state)
    out = load_file(str(dst))
    assert out.keys() == expected.keys()
    assert all(torch.equal(out[k], expected[k].contiguous()) for k in out)
