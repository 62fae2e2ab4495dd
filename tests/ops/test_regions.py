"""Byte kernels of narrow, select, slice and join (ckptx/ops/regions.py): the bytes torch gives, in one piece or
many, and conversions with split/merge/slice steps that import no torch."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ckptx.dtypes import TensorMeta
from ckptx.ops import regions
from ckptx.ops.regions import join_pieces, region_pieces
from ckptx.planning.expr import Piece
from tests.conftest import cli_without_torch

DTYPES = [torch.float32, torch.bfloat16, torch.int64, torch.bool]


def raw(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().view(torch.uint8).numpy().tobytes() if tensor.numel() else b""


def meta(tensor: torch.Tensor) -> TensorMeta:
    return TensorMeta(tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."))


def run(pieces: Iterable[Piece] | None, inputs: list[torch.Tensor]) -> bytes:
    assert pieces is not None
    data = [raw(t) for t in inputs]
    return b"".join(p.convert([d[a:b] for d, (a, b) in zip(data, p.ranges)]) for p in pieces)


def sample(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 20).to(dtype)


@pytest.fixture(params=[False, True], ids=["whole", "small-pieces"])
def small(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if request.param:
        monkeypatch.setattr(regions, "PIECE_BYTES", 24)


@pytest.mark.usefixtures("small")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("shape", "dim", "region"),
    [
        ((12, 5), 0, slice(4, 8)),
        ((12, 5), 1, slice(1, 4)),
        ((3, 6, 4), 1, slice(0, 6, 2)),
        ((3, 6, 4), 2, slice(-3, None)),
        ((1, 1, 9, 4), 2, slice(2, 7)),
        ((7, 3), 0, slice(6, None, 3)),
    ],
)
def test_region_pieces_give_torchs_bytes(dtype, shape, dim, region) -> None:
    tensor = sample(shape, dtype)
    expected = tensor[tuple([slice(None)] * dim + [region])]
    assert run(region_pieces(meta(tensor), dim, region), [tensor]) == raw(expected)


@pytest.mark.usefixtures("small")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("shapes", "dim", "stack"),
    [
        ([(4, 3), (2, 3), (5, 3)], 0, False),
        ([(4, 3), (4, 1), (4, 2)], 1, False),
        ([(2, 3, 4), (2, 5, 4)], 1, False),
        ([(3, 4), (3, 4), (3, 4)], 0, True),
        ([(3, 4), (3, 4)], 1, True),
        ([(3, 4), (3, 4)], 2, True),
    ],
)
def test_join_pieces_give_torchs_bytes(dtype, shapes, dim, stack) -> None:
    inputs = [sample(s, dtype, seed=i) for i, s in enumerate(shapes)]
    expected = (torch.stack if stack else torch.cat)(inputs, dim=dim)
    assert run(join_pieces([meta(t) for t in inputs], dim, stack), inputs) == raw(expected)


def test_a_region_of_dimension_0_reads_only_its_bytes() -> None:
    pieces = list(region_pieces(TensorMeta((100, 10), "float32"), 0, slice(30, 40)) or [])
    assert [p.ranges for p in pieces] == [((1200, 1600),)]


@pytest.mark.parametrize(
    "steps",
    [
        "- split: {match: 'qkv\\.weight$', dim: 0, sizes: [8, 4, 4], into: [q.weight, k.weight, v.weight]}",
        "- merge: {match: '^(w|u)\\.weight$', to: wu.weight, dim: 1, inputs: [w.weight, u.weight]}",
        "- merge: {match: '^(w|u)\\.weight$', to: wu.weight, dim: 0, stack: true, inputs: [u.weight, w.weight]}",
        "- slice: {match: 'qkv', dim: 1, start: 1, stop: 9, step: 2}",
    ],
)
def test_split_merge_and_slice_steps_write_torchs_tensors_without_torch(tmp_path: Path, steps: str) -> None:
    state = {"qkv.weight": sample((16, 10), torch.float32), "w.weight": sample((6, 3), torch.bfloat16, 1),
             "u.weight": sample((6, 3), torch.bfloat16, 2)}  # fmt: skip
    src, dst, rules = tmp_path / "src.safetensors", tmp_path / "out.safetensors", tmp_path / "r.yaml"
    save_file(state, str(src))
    rules.write_text(f"ckptx: 1\nsteps:\n  {steps}\n")
    cli_without_torch("convert", src, "-o", dst, "-r", rules)
    import ckptx

    reference = tmp_path / "in-memory.safetensors"
    planned = ckptx.apply(rules, state)  # the same steps computed with torch
    save_file({k: v.contiguous() for k, v in planned.items()}, str(reference))
    out, expected = load_file(str(dst)), load_file(str(reference))
    assert set(out) == set(expected) and all(torch.equal(out[k], expected[k]) for k in out)
