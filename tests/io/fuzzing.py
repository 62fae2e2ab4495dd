"""Seeded mutation fuzzing of every reader: real checkpoints of each format, bytes flipped, cut, inserted or
overwritten with extreme integers, then opened and every tensor loaded. A case may succeed or raise a CkptxError
(one line, exit 2 in the CLI); any other exception is an internal error, and a case that runs past its time limit
is a hang. Used by tests/io/test_fuzz_readers.py (bounded) and scripts/fuzz_readers.py (as long as you like)."""

from __future__ import annotations

import json
import random
import signal
import struct
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from ckptx.errors import CkptxError
from ckptx.io.read.open import open_source

FORMATS = ("safetensors", "zip", "legacy", "sharded")
_EXTREMES = (0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**63 - 1, 2**64 - 1, 10**9)


class _Hang(Exception):
    """A case ran past its time limit."""


@dataclass
class FuzzReport:
    """What a run found: cases run per outcome, and the first traceback of each distinct internal error."""

    cases: int = 0
    accepted: int = 0
    refused: int = 0
    internal: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return (
            f"{self.cases} cases: {self.accepted} read, {self.refused} refused (CkptxError), "
            f"{len(self.internal)} distinct internal errors"
        )


def write_seeds(folder: Path) -> dict[str, Path]:
    """One small real checkpoint of each supported format (the sharded one as its index)."""
    state = {
        "conv.weight": torch.randn(4, 3, 3, 3),
        "conv.bias": torch.randn(4),
        "bn.num_batches_tracked": torch.tensor(3),
        "fc.weight": torch.randn(2, 4).t(),
        "half": torch.randn(3).half(),
    }
    seeds = {
        "safetensors": folder / "seed.safetensors",
        "zip": folder / "seed.pth",
        "legacy": folder / "seed-legacy.pth",
    }
    save_file({k: v.contiguous() for k, v in state.items()}, str(seeds["safetensors"]))
    torch.save({"model": state, "epoch": 3}, seeds["zip"])
    torch.save({"model": state, "epoch": 3}, seeds["legacy"], _use_new_zipfile_serialization=False)
    names = {"conv.weight": "m-1.safetensors", "conv.bias": "m-1.safetensors", "half": "m-2.safetensors"}
    save_file({k: state[k].contiguous() for k in ("conv.weight", "conv.bias")}, str(folder / "m-1.safetensors"))
    save_file({"half": state["half"]}, str(folder / "m-2.safetensors"))
    seeds["sharded"] = folder / "m.safetensors.index.json"
    seeds["sharded"].write_text(json.dumps({"metadata": {"total_size": 1}, "weight_map": names}))
    return seeds


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One random mutation: flip bytes, cut, insert, duplicate a slice, or write an extreme integer."""
    buf = bytearray(data)
    kind = rng.randrange(6)
    if not buf or kind == 0:
        for _ in range(rng.randint(1, 8)):
            if buf:
                buf[rng.randrange(len(buf))] = rng.randrange(256)
    elif kind == 1:
        del buf[rng.randrange(len(buf)) :]
    elif kind == 2:
        at = rng.randrange(len(buf) + 1)
        buf[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    elif kind == 3:
        start = rng.randrange(len(buf))
        buf[start:start] = buf[start : start + rng.randint(1, 64)]
    else:
        width, value = rng.choice((4, 8)), rng.choice(_EXTREMES)
        at = rng.randrange(max(len(buf) - width, 1))
        buf[at : at + width] = struct.pack("<Q" if width == 8 else "<I", value % (2 ** (8 * width)))
    return bytes(buf)


def run_case(path: Path, seconds: int = 10) -> tuple[str, str]:
    """Open `path` and load every tensor: ("read", ""), ("refused", message) for a one-line CkptxError, or
    ("internal", traceback) for any other exception, a multi-line message or a hang."""

    def alarm(*_: object) -> None:
        raise _Hang(f"no answer after {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        with open_source(path, ["model"] if path.suffix == ".pth" else []) as source:
            for key in source.tensors:
                source.load(key)
        return "read", ""
    except CkptxError as exc:
        return ("refused", str(exc)) if "\n" not in str(exc) else ("internal", f"multi-line error: {exc!r}")
    except Exception:  # noqa: BLE001 - this is what the fuzzer looks for
        return "internal", traceback.format_exc()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def fuzz(
    folder: Path,
    *,
    seed: int,
    cases: int,
    budget_s: float = float("inf"),
    formats: tuple[str, ...] = FORMATS,
    clock: Callable[[], float] | None = None,
) -> FuzzReport:
    """Run up to `cases` mutations (round-robin over `formats`), stopping early after `budget_s` seconds."""
    import time

    now = clock or time.monotonic
    started = now()
    rng = random.Random(seed)
    seeds = write_seeds(folder)
    report = FuzzReport()
    for n in range(cases):
        if now() - started > budget_s:
            break
        fmt = formats[n % len(formats)]
        original = (
            seeds[fmt] if fmt != "sharded" else folder / rng.choice(["m-1.safetensors", "m.safetensors.index.json"])
        )
        target = folder / f"case-{fmt}{''.join(original.suffixes) if fmt != 'sharded' else ''}"
        if fmt == "sharded":  # mutate a shard or the index in place, open through the index
            backup = original.read_bytes()
            original.write_bytes(mutate(backup, rng))
            target = seeds["sharded"]
        else:
            target.write_bytes(mutate(seeds[fmt].read_bytes(), rng))
        try:
            problem = run_case(target)
        finally:
            if fmt == "sharded":
                original.write_bytes(backup)
        report.cases += 1
        outcome, detail = problem
        if outcome == "read":
            report.accepted += 1
        elif outcome == "refused":
            report.refused += 1
        else:
            report.internal.setdefault(detail.strip().splitlines()[-1][:200], detail)
    return report
