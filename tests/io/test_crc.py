"""CRC-32 of spans: pieces checksummed on several threads combine to zlib's CRC of the whole."""

from __future__ import annotations

import os
import random
import zlib
from pathlib import Path

import pytest

from ckptx.errors import SourceError
from ckptx.io.crc import PIECE, CrcThread, crc32_combine
from ckptx.planning.source import RawSpan


def test_crc32_combine_is_the_crc_of_the_concatenation() -> None:
    rng = random.Random(0)
    for _ in range(200):
        a, b = rng.randbytes(rng.randint(0, 3000)), rng.randbytes(rng.randint(0, 3000))
        assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_a_big_span_split_across_threads_has_zlibs_crc(tmp_path: Path, threads: int) -> None:
    data = random.Random(1).randbytes(2 * PIECE + 12345)
    path = tmp_path / "blob"
    path.write_bytes(data)
    span = RawSpan(str(path), 777, len(data) - 777 - 5)
    with CrcThread(threads) as crcs:
        assert crcs.submit(span).result() == zlib.crc32(data[777 : len(data) - 5])


def test_a_piece_that_fails_fails_the_whole(tmp_path: Path) -> None:
    path = tmp_path / "short"
    path.write_bytes(os.urandom(1024))
    with CrcThread(2) as crcs:
        future = crcs.submit(RawSpan(str(path), 0, 3 * PIECE))
        with pytest.raises(SourceError, match="truncated or changed"):
            future.result()


def test_many_small_spans_and_big_ones_together_have_zlibs_crc(tmp_path: Path) -> None:
    """Spans out of file order, from two files, small ones (run together on one task) and big ones (split)."""
    rng = random.Random(2)
    blobs = [tmp_path / "a", tmp_path / "b"]
    data = {str(p): rng.randbytes(3 * PIECE) for p in blobs}
    for path in blobs:
        path.write_bytes(data[str(path)])
    spans = [RawSpan(str(blobs[i % 2]), rng.randrange(0, PIECE), rng.randrange(1, 9000)) for i in range(3000)]
    spans.insert(1000, RawSpan(str(blobs[0]), 5, 2 * PIECE + 3))
    spans.append(RawSpan(str(blobs[1]), 17, 2 * PIECE))
    expected = zlib.crc32(b"".join(data[s.file][s.offset : s.offset + s.nbytes] for s in spans))
    with CrcThread(2) as crcs:
        assert crcs.submit_all(spans).result() == expected
