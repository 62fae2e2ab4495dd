"""Machine-readable benchmark results: every benchmark's `--json FILE` writes one document through `write()`.

The document is what `benchmarks/render_docs.py` turns into docs/performance.md:

    {"benchmark": "run", "date": "2026-12-07", "command": "python benchmarks/run.py --size-gib 2 ...",
     "machine": {"cores": 2, "arch": "x86_64", "kernel": "...", "python": "3.11.x", "torch": "2.14.1+cu130"},
     "load_average_1min": {"start": 0.9, "end": 2.1}, "results": {...}}

`results` is each benchmark's own shape (see its `--json` help). Nothing here imports ckptx; torch only to read
its version, when it is installed.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def machine() -> dict[str, Any]:
    """Facts about this machine that a reader needs to weigh the numbers."""
    try:
        import torch

        torch_version = str(torch.__version__)
    except ImportError:  # pragma: no cover - every benchmark here has torch
        torch_version = None
    memory = None
    try:
        memory = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        pass
    return {
        "cores": os.cpu_count(),
        "memory_gib": memory,
        "arch": platform.machine(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": torch_version,
    }


def command_line() -> str:
    """This benchmark's command line as it would be typed from the repository root."""
    script = os.path.relpath(Path(sys.argv[0]).resolve(), REPO)
    return " ".join(["python", script, *sys.argv[1:]])


class Recorder:
    """Notes the load average at the start; `write()` saves the document with the load at the end."""

    def __init__(self, benchmark: str) -> None:
        self.benchmark = benchmark
        self.load_start = os.getloadavg()[0]
        self.date = datetime.date.today().isoformat()

    def write(self, path: str | os.PathLike[str] | None, results: dict[str, Any]) -> None:
        """Write the JSON document to `path` (nothing when `path` is None)."""
        if path is None:
            return
        document = {
            "benchmark": self.benchmark,
            "date": self.date,
            "command": command_line(),
            "machine": machine(),
            "load_average_1min": {"start": round(self.load_start, 2), "end": round(os.getloadavg()[0], 2)},
            "results": results,
        }
        Path(path).write_text(json.dumps(document, indent=1, sort_keys=False) + "\n", encoding="utf-8")
        print(f"wrote {path}", file=sys.stderr)
