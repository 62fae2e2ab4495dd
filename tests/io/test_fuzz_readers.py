"""Bounded, seeded fuzzing of every reader: no mutated checkpoint may cause an internal error or a hang.

About 3,000 cases (750 per format) within 45 s; `scripts/fuzz_readers.py` runs as many as you like.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.io.fuzzing import fuzz


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_mutated_checkpoints_end_in_a_ckptx_error_or_a_read(tmp_path: Path) -> None:
    report = fuzz(tmp_path, seed=20240611, cases=3000, budget_s=45)
    assert report.cases >= 200, report  # the budget only cuts a very slow machine short
    assert not report.internal, "\n\n".join(report.internal.values())
    assert report.refused > 0 and report.accepted > 0, report
