"""What the alignment decides for each tensor: source key(s), target key(s), the op, and the evidence."""

from __future__ import annotations

from dataclasses import dataclass

from ckptx.suggestion.shapes import Fit, JoinFit

__all__ = ["Match"]


@dataclass(frozen=True)
class Match:
    """Source tensor(s) -> target tensor(s), keys relative to the level they were aligned in.

    `kind` is `tensor` (1:1, `fit` a Fit), `split` (one source, several targets) or `merge` (several
    sources, one target), `fit` then a JoinFit. `evidence` says what decided it; `alternative` names a
    close runner-up target; `note` explains a decision shapes alone could not make.
    """

    sources: tuple[str, ...]
    targets: tuple[str, ...]
    kind: str
    fit: Fit | JoinFit
    evidence: str
    alternative: str | None = None
    note: str | None = None
    undecided: bool = False  # no evidence but position separates it from `alternative`: not a success

    def prefixed(self, source_prefix: str, target_prefix: str) -> Match:
        """The same match with both sides' keys under prefixes."""
        alt = target_prefix + self.alternative if self.alternative else None
        return Match(
            tuple([source_prefix + k for k in self.sources]),
            tuple([target_prefix + k for k in self.targets]),
            self.kind,
            self.fit,
            self.evidence,
            alt,
            self.note,
            self.undecided,
        )
