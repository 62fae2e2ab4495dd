"""Fingerprints of batch outputs: what an output was made from, stored with it, so `--resume` can skip it.

A fingerprint records the source files' size and mtime_ns (every shard of a sharded index), the sha256 of
every rule file of the recipe (extends included), the recipe's effective params, the job's target spec,
the output format and the ckptx version. Safetensors outputs carry it in their header metadata under
`ckptx.fingerprint`; torch outputs get a sidecar `DST.ckptx.json` that also pins the output's size and
mtime_ns, so a replaced or truncated output is not taken as current.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptx._version import __version__
from ckptx.errors import CkptxError, SourceError
from ckptx.files import MAX_TEXT, read_bounded, regular_size
from ckptx.io.read.safetensors_reader import read_header
from ckptx.io.write.atomic import atomic_output
from ckptx.io.write.destination import input_files
from ckptx.rules.recipe import Recipe

FINGERPRINT_KEY = "ckptx.fingerprint"
SIDECAR_SUFFIX = ".ckptx.json"
FINGERPRINT_VERSION = 1
_NAMES = {
    "source": "source",
    "rules": "rule files",
    "params": "params",
    "target": "target",
    "format": "format",
    "ckptx": "ckptx version",
    "fingerprint": "fingerprint version",
}


@dataclass(frozen=True)
class Fingerprint:
    """What one output was made from, as a JSON-ready mapping."""

    fields: Mapping[str, Any]

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no spaces): equal fingerprints give equal text."""
        return json.dumps(self.fields, sort_keys=True, separators=(",", ":"), default=str)

    @classmethod
    def from_json(cls, text: str) -> Fingerprint | None:
        """Parse a recorded fingerprint; None when it is not one."""
        try:
            fields = json.loads(text)
        except (TypeError, ValueError, RecursionError):
            return None
        return cls(fields) if isinstance(fields, dict) and _shallow(fields) else None

    def changes_since(self, recorded: Fingerprint) -> list[str]:
        """Readable names of what differs from a recorded fingerprint (empty when it is current)."""
        mine, theirs = json.loads(self.to_json()), json.loads(recorded.to_json())
        return [_NAMES.get(key, key) for key in sorted(set(mine) | set(theirs)) if mine.get(key) != theirs.get(key)]


def _shallow(value: Any, limit: int = 16) -> bool:
    """`value` nests at most `limit` levels (a fingerprint nests three): checked without recursion."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth >= limit:
                return False
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return True


@dataclass(frozen=True)
class OutputState:
    """What is at a job's destination: `missing`, `current`, `stale` (made by ckptx, outdated) or `foreign`."""

    status: str
    changes: tuple[str, ...] = ()
    detail: str = ""

    @property
    def made_by_ckptx(self) -> bool:
        """True when the output records a fingerprint, so --resume may replace it."""
        return self.status in ("current", "stale")


def fingerprint(
    src: Path, recipe: Recipe, *, src_label: str, target: Mapping[str, Any] | None, fmt: str
) -> Fingerprint:
    """The fingerprint of converting `src` with `recipe` to `fmt` for `target`; stats the source files now."""
    return Fingerprint(
        {
            "fingerprint": FINGERPRINT_VERSION,
            "ckptx": __version__,
            "source": {"path": src_label, "files": source_files(src)},
            "rules": [[f.name, f.sha256] for f in recipe.files],
            "params": dict(recipe.params),
            "target": dict(target or {}),
            "format": fmt,
        }
    )


def source_files(src: Path) -> list[list[Any]]:
    """`[name, size, mtime_ns]` of the source, and of every shard a sharded `.index.json` names."""
    files = input_files(src) if src.name.endswith(".index.json") else [src]  # the index, then its shards
    out: list[list[Any]] = []
    for path in files:
        try:
            stat = path.stat()
            out.append([path.name, stat.st_size, stat.st_mtime_ns])
        except OSError:
            out.append([path.name, None, None])
    return out


def output_state(dst: Path, current: Fingerprint) -> OutputState:
    """Compare what `dst` records (header metadata or sidecar) with the current fingerprint."""
    if not dst.exists():
        return OutputState("missing")
    recorded, problem = _recorded(dst)
    if recorded is None:
        return OutputState("foreign", detail=problem)
    if problem:
        return OutputState("stale", ("output",), problem)
    changes = current.changes_since(recorded)
    return OutputState("stale", tuple(changes)) if changes else OutputState("current")


def _recorded(dst: Path) -> tuple[Fingerprint | None, str]:
    """(recorded fingerprint, problem with the output) for an existing output."""
    try:
        regular_size(dst, str(dst))
    except CkptxError as exc:  # a FIFO or a device in place of an output: never opened
        return None, str(exc)
    if dst.suffix.lower() == ".safetensors":
        try:
            header, _ = read_header(dst)
        except (SourceError, OSError) as exc:
            return None, str(exc)
        metadata = header.get("__metadata__") or {}
        text = metadata.get(FINGERPRINT_KEY)
        recorded = Fingerprint.from_json(text) if isinstance(text, str) else None
        return recorded, "" if recorded else f"{dst}: its metadata has no {FINGERPRINT_KEY}"
    sidecar = sidecar_path(dst)
    try:
        doc = json.loads(read_bounded(sidecar, str(sidecar), MAX_TEXT, "a ckptx sidecar"))
        recorded = Fingerprint(doc["fingerprint"])
        output = doc["output"]
        if not isinstance(output, dict) or not _shallow(doc):
            raise TypeError("not a sidecar")
    except (CkptxError, OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return None, f"{dst}: no readable sidecar {sidecar.name}"
    stat = dst.stat()
    if [output.get("size"), output.get("mtime_ns")] != [stat.st_size, stat.st_mtime_ns]:
        return recorded, f"{dst}: the file changed after ckptx wrote it (size or mtime differs from {sidecar.name})"
    return recorded, ""


def sidecar_path(dst: Path) -> Path:
    """`out/model.pth` -> `out/model.pth.ckptx.json`."""
    return dst.with_name(dst.name + SIDECAR_SUFFIX)


def write_sidecar(dst: Path, current: Fingerprint) -> Path:
    """Record `current` beside a finished torch output, with the output's size and mtime_ns; atomic."""
    stat = dst.stat()
    doc = {
        "ckptx_sidecar": FINGERPRINT_VERSION,
        "output": {"name": dst.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns},
        "fingerprint": json.loads(current.to_json()),
    }
    path = sidecar_path(dst)
    with atomic_output(path) as out:
        out.write((json.dumps(doc, indent=1, sort_keys=True) + "\n").encode("utf-8"))
    return path


def remove_sidecar(dst: Path) -> None:
    """Forget what a torch output was made from (before it is rewritten)."""
    try:
        os.unlink(sidecar_path(dst))
    except FileNotFoundError:
        pass
