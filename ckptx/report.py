"""Human-readable text: tables, sizes, plans and warnings (strings only, no printing)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Sequence

from ckptx.ops.registry import TensorMeta, ops_of
from ckptx.text import printable, shown

if TYPE_CHECKING:  # pragma: no cover
    from ckptx.plan import Plan

SHOWN = 20


def table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    """A plain text table with aligned columns; a cell can never break its row (control characters escaped)."""
    header = [printable(str(c), keep_lines=False) for c in header]
    rows = [[printable(str(c), keep_lines=False) for c in r] for r in rows]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def count_params(metas: Iterable[TensorMeta]) -> int:
    """Total number of elements."""
    return sum(m.numel for m in metas)


def render_plan(plan: "Plan") -> str:
    """The plan as a table: target key, shape, dtype, source key(s), ops."""
    rows = []
    for entry in plan.entries:
        sources = ", ".join(map(shown, entry.sources))
        rows.append([shown(entry.key), "x".join(map(str, entry.meta.shape)) or "scalar", entry.meta.dtype,
                     "=" if tuple(entry.sources) == (entry.key,) else sources, " -> ".join(ops_of(entry.expr))])
    out = [table(rows, ["target key", "shape", "dtype", "from", "ops"])]
    if plan.dropped:
        out.append(f"dropped {len(plan.dropped)} key(s): " + short_list(k for k, _ in plan.dropped))
    return "\n".join(out)


def render_warnings(warnings: Iterable[object]) -> str:
    """One `warning:` line each."""
    return "\n".join(f"warning: {w}" for w in warnings)


def short_list(keys: Iterable[str], limit: int = 6) -> str:
    """The first `limit` keys (escaped for printing), comma-separated, and how many more."""
    items = [shown(k) for k in keys]
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
