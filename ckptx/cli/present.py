"""Presentation of plans and warnings for the command line (strings only, no printing)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TextIO

from ckptx.planning.expr import ops_of
from ckptx.text import human_bytes, json_text, printable, short_list, shown, table

if TYPE_CHECKING:  # pragma: no cover
    from ckptx.planning.planner import Plan

__all__ = ["emit", "progress_bar", "render_plan", "render_warnings"]


def render_plan(plan: Plan, *, explain: bool = False) -> str:
    """The plan as a table: target key, shape, dtype, source key(s), ops; with `explain`, also the rules (file,
    line and step, a rename's row) that made each key."""
    rows = []
    for entry in plan.entries:
        sources = ", ".join(map(shown, entry.sources))
        row = [
            shown(entry.key),
            "x".join(map(str, entry.meta.shape)) or "scalar",
            entry.meta.dtype,
            "=" if tuple(entry.sources) == (entry.key,) else sources,
            " -> ".join(ops_of(entry.expr)),
        ]
        rows.append(row + ["; ".join(entry.steps) or "(unchanged)"] if explain else row)
    header = ["target key", "shape", "dtype", "from", "ops"] + (["by"] if explain else [])
    out = [table(rows, header)]
    by_step: dict[str, list[str]] = {}
    for key, where in plan.dropped:
        by_step.setdefault(where, []).append(key)
    for where, keys in by_step.items():
        out.append(f"dropped {len(keys)} key(s) by {where}: " + short_list(keys))
    return "\n".join(out)


def render_warnings(warnings: Iterable[object]) -> str:
    """One `warning:` line each."""
    return "\n".join(f"warning: {w}" for w in warnings)


def emit(out: TextIO, as_json: bool, document: dict[str, Any], text: str) -> None:
    """Print `document` as JSON, or `text` made printable."""
    out.write(json_text(document) + "\n" if as_json else printable(text) + ("\n" if text else ""))


def progress_bar(err: TextIO, enabled: bool) -> Callable[[int, int], None] | None:
    """A `progress(done, total)` callback drawing a byte counter with rate and ETA on `err` (None when disabled)."""
    if not enabled:
        return None
    started = time.monotonic()
    last = [0.0]

    def show(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] < 0.2 and done < total:
            return
        last[0] = now
        rate = done / max(now - started, 1e-9)
        eta = (total - done) / rate if rate else 0
        err.write(
            f"\r  {100 * done / max(total, 1):5.1f}%  {human_bytes(done)} / {human_bytes(total)}  "
            f"{human_bytes(rate)}/s  ETA {eta:4.0f} s "
        )
        if done >= total:
            err.write("\n")
        err.flush()

    return show
