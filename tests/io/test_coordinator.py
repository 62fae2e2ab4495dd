"""The coordinator: CRC-32s combined from the pieces units report, in any order; gaps refused."""

from __future__ import annotations

import os
import zlib

import pytest

from ckptx.io.write.coordinator import combined_crcs
from ckptx.io.write.units import CheckedRange, UnitResult


def test_combined_crcs_equal_the_crc_of_the_whole_record_whatever_order_pieces_come_in() -> None:
    data = os.urandom(100_000)
    cuts = [0, 10, 4096, 50_000, 99_999, 100_000]
    ranges = [(lo, hi - lo, zlib.crc32(data[lo:hi])) for lo, hi in zip(cuts, cuts[1:])]
    shuffled = [UnitResult(0, "w", 0, tuple(CheckedRange(0, *r) for r in reversed(ranges)))]
    assert combined_crcs([len(data), 0], shuffled) == [zlib.crc32(data), 0]
    with pytest.raises(RuntimeError, match="cover 10 of 100,000 bytes"):
        combined_crcs([len(data)], [UnitResult(0, "w", 0, (CheckedRange(0, *ranges[0]), CheckedRange(0, *ranges[2])))])


def test_units_are_submitted_costliest_first_taking_the_files_in_turn() -> None:
    from ckptx.io.write.coordinator import submission_order
    from ckptx.io.write.output_layout import Copy, Piece
    from ckptx.io.write.units import WorkUnit

    def unit(index: int, path: str, nbytes: int) -> WorkUnit:
        return WorkUnit(index, 6, path, path, (Piece(0, 0, nbytes, Copy(())),))

    units = [unit(0, "a", 50), unit(1, "a", 40), unit(2, "a", 30), unit(3, "b", 45), unit(4, "b", 5), unit(5, "c", 1)]
    assert [u.index for u in submission_order(units)] == [0, 3, 5, 1, 4, 2]
