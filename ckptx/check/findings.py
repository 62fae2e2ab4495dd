"""What `ckptx audit` reports: findings (a key, a kind, a detail) and the report that groups them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ckptx.text import SHOWN, shown

__all__ = ["KINDS", "AuditReport", "Finding"]

KINDS: dict[str, str] = {
    "missing": "missing: the recipe (or the target) has the tensor, the output does not",
    "extra": "extra: the output has a tensor the recipe (or the target) does not",
    "dtype": "dtype differs from what the recipe makes",
    "shape": "shape differs from what the recipe makes (or the target wants)",
    "values": "values differ from what the recipe makes from the source",
    "swapped": "swapped: holds the values another tensor of the same shape should hold",
    "transposed": "transposed: the expected values with two dimensions exchanged",
    "nan": "NaN values",
    "inf": "infinite values",
    "zeros": "all zero where the target does not initialize it so",
    "constant": "constant where the target does not initialize it so",
    "init-like": "statistically indistinguishable from the target's fresh initialization (left untrained?)",
    "card": "differs from the provenance card (changed after conversion)",
}
"""Every finding kind, in the order reports list them, with the heading text shows for it."""


@dataclass(frozen=True)
class Finding:
    """One thing wrong with one output tensor (or one expected tensor that is absent)."""

    key: str
    kind: str
    detail: str

    def to_dict(self) -> dict[str, str]:
        """JSON-ready."""
        return {"key": self.key, "kind": self.kind, "detail": self.detail}


@dataclass
class AuditReport:
    """What an audit checked and found. `checked` names what the output was checked against."""

    output: str
    tensors: int
    findings: list[Finding] = field(default_factory=list)
    checked: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing was found."""
        return not self.findings

    def add(self, finding: Finding) -> None:
        """Record a finding once (the same key and kind found twice, e.g. against the recipe and the target, once)."""
        if not any(f.key == finding.key and f.kind == finding.kind for f in self.findings):
            self.findings.append(finding)

    def by_kind(self) -> dict[str, list[Finding]]:
        """Findings grouped by kind, in KINDS order."""
        groups: dict[str, list[Finding]] = {}
        for kind in KINDS:
            found = [f for f in self.findings if f.kind == kind]
            if found:
                groups[kind] = found
        return groups

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: `{"ok", "output", "tensors", "checked", "findings": [{"key", "kind", "detail"}], ...}`."""
        return {
            "ok": self.ok,
            "output": self.output,
            "tensors": self.tensors,
            "checked": self.checked,
            "findings": [f.to_dict() for f in self.findings],
            "counts": {kind: len(found) for kind, found in self.by_kind().items()},
            "notes": self.notes,
        }

    def __str__(self) -> str:
        lines = [f"audit of {self.output}: {self.tensors} tensors"]
        lines += [f"  {what}: {how}" for what, how in self.checked.items() if isinstance(how, str)]
        for kind, found in self.by_kind().items():
            keys = len({f.key for f in found})
            lines.append(f"{kind} ({keys} tensor{'s' if keys != 1 else ''}): {KINDS[kind]}")
            for finding in found[:SHOWN]:
                lines.append(f"  {shown(finding.key)}: {finding.detail}")
            if len(found) > SHOWN:
                lines.append(f"  ... and {len(found) - SHOWN} more (use --json for all)")
        lines += [f"note: {n}" for n in self.notes]
        if self.ok:
            lines.append("no findings")
        else:
            keys = len({f.key for f in self.findings})
            lines.append(f"{len(self.findings)} finding(s) in {keys} tensor(s)")
        return "\n".join(lines)
