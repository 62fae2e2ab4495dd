"""io/digest.py: the SHA-256 and statistics of a tensor's bytes, fed in pieces, equal torch's own numbers."""

from __future__ import annotations

import hashlib
import pickle

import numpy as np
import pytest
import torch

from ckptx.io.digest import Moments, TensorDigest, decode, summarize


def _bytes(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_stats_of_a_float_tensor_fed_in_odd_pieces_equal_torchs_over_its_finite_values(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    tensor = (torch.randn(300, 71) * 3 + 1000).to(dtype)
    tensor[2, 3], tensor[4, 5], tensor[0, :7] = float("nan"), float("-inf"), 0
    data = _bytes(tensor)
    digest = TensorDigest(str(dtype).removeprefix("torch."))
    for start in range(0, len(data), 777):  # pieces that cut elements in two
        digest.update(data[start : start + 777])
    summary = digest.summary()
    values = tensor.double()
    finite = values[torch.isfinite(values)]
    assert summary.sha256 == hashlib.sha256(data).hexdigest() and summary.nbytes == len(data)
    stats = summary.stats
    assert stats is not None
    assert (stats.count, stats.nan, stats.inf, stats.zeros) == (tensor.numel(), 1, 1, 7)
    assert stats.mean == pytest.approx(finite.mean().item(), rel=1e-12)
    assert stats.std == pytest.approx(finite.std(unbiased=False).item(), rel=1e-9)
    assert (stats.min, stats.max) == (finite.min().item(), finite.max().item())


@pytest.mark.parametrize(
    "dtype", ["float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu"]
)
def test_every_float8_code_decodes_to_torchs_value(dtype: str) -> None:
    codes = torch.arange(256, dtype=torch.uint8)
    want = codes.view(getattr(torch, dtype)).float().numpy()
    got = decode(codes.numpy().tobytes(), dtype)
    assert np.array_equal(got, want, equal_nan=True)


def test_integer_bool_and_complex_tensors_are_summarised_exactly() -> None:
    ints = torch.tensor([-3, 0, 7, 2**40], dtype=torch.int64)
    stats = TensorDigest("int64")
    stats.update(_bytes(ints))
    summary = stats.summary().stats
    assert summary is not None and (summary.min, summary.max, summary.zeros) == (-3.0, float(2**40), 1)
    flags = TensorDigest("bool")
    flags.update(_bytes(torch.tensor([True, False, False])))
    assert flags.summary().stats.zeros == 2  # type: ignore[union-attr]  # bool has stats
    pairs = TensorDigest("complex64")
    pairs.update(_bytes(torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64)))
    complex_stats = pairs.summary().stats
    assert complex_stats is not None and complex_stats.count == 4 and complex_stats.mean == pytest.approx(0.5)


def test_raw_bit_tensors_get_a_hash_and_no_statistics() -> None:
    digest = TensorDigest("bits8")
    digest.update(b"\x01\x02")
    assert digest.summary().stats is None and digest.summary().sha256 == hashlib.sha256(b"\x01\x02").hexdigest()


def test_moments_of_pieces_merge_to_the_moments_of_the_whole_and_pickle() -> None:
    values = np.random.default_rng(1).standard_normal(10_001).astype(np.float32) * 0.02 + 5
    whole = summarize(values)
    parts = summarize(values[:3000]).merge(summarize(values[3000:7777])).merge(summarize(values[7777:]))
    assert pickle.loads(pickle.dumps(parts)) == parts
    assert parts.count == whole.count and parts.mean == pytest.approx(whole.mean, rel=1e-12)
    assert parts.m2 == pytest.approx(whole.m2, rel=1e-9)
    assert Moments().merge(whole) == whole


def test_the_statistics_do_not_depend_on_how_the_bytes_are_cut(monkeypatch: pytest.MonkeyPatch) -> None:
    """A card made by one process and one made by workers feed a tensor in different pieces: the float64 sums, and
    so every digit of the statistics, are the same (blocks counted from the tensor's first byte)."""
    from ckptx.io import digest as module

    monkeypatch.setattr(module, "STATS_CHUNK", 4096)
    torch.manual_seed(0)
    data = _bytes(torch.randn(10_000) * 1e3 + 1e6)
    seen = set()
    for step in (len(data), 4096, 3 * 4096, 999, 8192 + 4):
        digest = TensorDigest("float32")
        for start in range(0, len(data), step):
            digest.update(data[start : start + step])
        seen.add(digest.summary())
    assert len(seen) == 1
