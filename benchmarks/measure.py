"""Run one command and print, as JSON, its wall time and the peak resident memory of it and its children.

    python benchmarks/measure.py [--stdout=FILE] CMD [ARGS...]

Peak RSS is `getrusage(RUSAGE_CHILDREN).ru_maxrss` of this wrapper, which has no other children. The command's
standard output is discarded, or saved to FILE with `--stdout=FILE`.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time


def main() -> None:
    """Run `sys.argv[1:]`, report {wall, maxrss_kib, user, sys, returncode, stderr}."""
    argv = sys.argv[1:]
    keep = argv.pop(0).split("=", 1)[1] if argv and argv[0].startswith("--stdout=") else None
    started = time.perf_counter()
    with open(keep or os.devnull, "wb") as out:
        proc = subprocess.run(argv, stdout=out, stderr=subprocess.PIPE, check=False)
    wall = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(
        json.dumps(
            {
                "wall": wall,
                "maxrss_kib": usage.ru_maxrss,
                "user": usage.ru_utime,
                "sys": usage.ru_stime,
                "returncode": proc.returncode,
                "stderr": proc.stderr.decode(errors="replace")[-3000:],
            }
        )
    )


if __name__ == "__main__":
    main()
