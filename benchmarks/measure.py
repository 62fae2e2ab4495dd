"""Run one command and print, as JSON, its wall time and the peak resident memory of it and its children.

    python benchmarks/measure.py CMD [ARGS...]

Peak RSS is `getrusage(RUSAGE_CHILDREN).ru_maxrss` of this wrapper, which has no other children.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time


def main() -> None:
    """Run `sys.argv[1:]`, report {wall, maxrss_kib, user, sys, returncode, stderr}."""
    started = time.perf_counter()
    proc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
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
