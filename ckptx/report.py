"""Human-readable text: tables, sizes, plans and warnings (strings only, no printing)."""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from ckptx.ops.registry import TensorMeta, ops_of
from ckptx.text import human_bytes, printable, shown

if TYPE_CHECKING:  # pragma: no cover
    from ckptx.plan import Plan

SHOWN = 20


def json_text(document: Any, *, indent: int = 1) -> str:
    """`document` as strict JSON (RFC 8259): NaN and infinities, which JSON cannot hold, become the strings
    "nan", "inf" and "-inf" (a verification of NaN outputs reports them that way); other objects as `str`."""
    return json.dumps(_finite(document), indent=indent, default=str, allow_nan=False)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    """A plain text table with aligned columns; a cell can never break its row (control characters escaped)."""
    header = [printable(str(c), keep_lines=False) for c in header]
    rows = [[printable(str(c), keep_lines=False) for c in r] for r in rows]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def count_params(metas: Iterable[TensorMeta]) -> int:
    """Total number of elements."""
    return sum(m.numel for m in metas)


def render_plan(plan: "Plan", *, explain: bool = False) -> str:
    """The plan as a table: target key, shape, dtype, source key(s), ops; with `explain`, also the rules (file,
    line and step, a rename's row) that made each key."""
    rows = []
    for entry in plan.entries:
        sources = ", ".join(map(shown, entry.sources))
        row = [shown(entry.key), "x".join(map(str, entry.meta.shape)) or "scalar", entry.meta.dtype,
               "=" if tuple(entry.sources) == (entry.key,) else sources, " -> ".join(ops_of(entry.expr))]
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


def short_list(keys: Iterable[str], limit: int = 6) -> str:
    """The first `limit` keys (escaped for printing), comma-separated, and how many more."""
    items = [shown(k) for k in keys]
    text = ", ".join(items[:limit])
    return text + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
