"""Longer fuzzing of every reader (see tests/io/fuzzing.py): `python scripts/fuzz_readers.py --cases 20000 --seed 7`.
Prints the count of each outcome and the traceback of each distinct internal error; exits 1 when it found any."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.io.fuzzing import FORMATS, fuzz


def main() -> int:
    """Run the fuzzer and report."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cases", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--minutes", type=float, default=30.0, help="stop after this long")
    parser.add_argument("--format", action="append", choices=FORMATS, help="only these formats (repeatable)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        report = fuzz(
            Path(folder),
            seed=args.seed,
            cases=args.cases,
            budget_s=args.minutes * 60,
            formats=tuple(args.format or FORMATS),
        )
    print(report)
    for last_line, trace in report.internal.items():
        print(f"\n=== {last_line}\n{trace}")
    return 1 if report.internal else 0


if __name__ == "__main__":
    raise SystemExit(main())
