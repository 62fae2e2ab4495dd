"""Human-readable rendering of plans, validation reports and checkpoint summaries (strings only, no printing)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Sequence

from ckptx.ops.registry import TensorMeta, ops_of

if TYPE_CHECKING:  # pragma: no cover
    from ckptx.plan import Plan
    from ckptx.target import KeyProblem, ValidationReport

_SHOWN = 20


def table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    """A plain text table with aligned columns."""
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
        sources = ", ".join(entry.sources)
        rows.append([entry.key, "x".join(map(str, entry.meta.shape)) or "scalar", entry.meta.dtype,
                     "=" if sources == entry.key else sources, " -> ".join(ops_of(entry.expr))])
    out = [table(rows, ["target key", "shape", "dtype", "from", "ops"])]
    if plan.dropped:
        out.append(f"dropped {len(plan.dropped)} key(s): " + _list(k for k, _ in plan.dropped))
    return "\n".join(out)


def render_warnings(warnings: Iterable[object]) -> str:
    """One `warning:` line each."""
    return "\n".join(f"warning: {w}" for w in warnings)


def render_validation(report: "ValidationReport") -> str:
    """Validation report: verdict first, then every problem with its hint."""
    total = report.matched + len(report.missing) + len(report.allowed_missing)
    verdict = "OK" if report.ok else "FAILED"
    lines = [f"validation against {report.target}: {verdict} ({report.matched}/{total} target keys matched)"]
    lines += _section("missing in the converted checkpoint", report.missing, lambda p: f"{p.want}" + (f"  {p.hint}" if p.hint else ""))
    lines += _section("unexpected (not in the target)", report.unexpected, lambda p: f"{p.have}" + _from(p))
    lines += _section("shape mismatch", report.shape_mismatches,
                      lambda p: f"have {list(p.have.shape)}, target wants {list(p.want.shape)}" + _from(p) + (f"; {p.hint}" if p.hint else ""))
    lines += _section("dtype differs (warning; load_state_dict casts)", report.dtype_differences,
                      lambda p: f"have {p.have.dtype}, target has {p.want.dtype}")
    if report.allowed_missing:
        lines.append(f"  allowed missing: {len(report.allowed_missing)} ({_list(report.allowed_missing)})")
    if report.allowed_unexpected:
        lines.append(f"  allowed unexpected: {len(report.allowed_unexpected)} ({_list(report.allowed_unexpected)})")
    lines += [f"  note: {n}" for n in report.notes]
    return "\n".join(lines)


def _from(problem: "KeyProblem") -> str:
    sources = ", ".join(problem.sources)
    return f" (from {sources})" if sources and sources != problem.key else ""


def _section(title: str, problems: Sequence["KeyProblem"], detail) -> list[str]:
    if not problems:
        return []
    lines = [f"  {title}: {len(problems)}"]
    for problem in problems[:_SHOWN]:
        lines.append(f"    {problem.key}: {detail(problem)}")
    if len(problems) > _SHOWN:
        lines.append(f"    ... and {len(problems) - _SHOWN} more (use --json for all)")
    return lines


def _list(keys: Iterable[str], limit: int = 6) -> str:
    items = list(keys)
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
