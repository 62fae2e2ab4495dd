"""The errors ckptx raises for user input; each carries the exit code the CLI uses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable


class CkptxError(Exception):
    """Base class of every error caused by user input (exit code 2 unless stated)."""

    exit_code = 2


@dataclass(frozen=True)
class Problem:
    """One problem found in a file: where it is and what is wrong."""

    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message


class RuleError(CkptxError):
    """A rule or jobs file is invalid; lists every problem found at once."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class SourceError(CkptxError):
    """A source checkpoint cannot be read (corrupt, truncated, unsafe, wrong layout)."""


class UnsafeGlobalError(SourceError):
    """A pickle needs a global that the safe loader does not allow."""

    def __init__(self, path: str, global_name: str) -> None:
        self.global_name = global_name
        super().__init__(
            f"{path}: the checkpoint needs the Python global '{global_name}', which the safe loader "
            f"refuses; if you trust this file, pass --allow-global {global_name} (just that one) "
            f"or --unsafe-pickle (runs any code the file contains)"
        )


class PlanError(CkptxError):
    """The recipe cannot be applied to this source (collision, bad shape, missing target...)."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class PlannerBug(CkptxError):
    """The plan broke the accounting invariant (a source tensor lost, or read twice where no step allows it):
    a bug in ckptx, never the user's input (exit 3). Nothing was written."""

    exit_code = 3


class TargetError(CkptxError):
    """A target specification cannot be resolved."""


class DestinationError(CkptxError):
    """The destination cannot be written (exists, equals source, bad extension)."""


class TensorOpError(CkptxError):
    """An op failed on real tensor data while writing."""


class Rejected(CkptxError):
    """The conversion ran but its result was rejected (exit 1); `outcome` says why, nothing was written."""

    exit_code = 1
    kind = "rejected"

    def __init__(self, outcome: object) -> None:
        self.outcome = outcome
        super().__init__(str(outcome))


class ValidationFailed(Rejected):
    """The plan does not fit the target; nothing was written. `report` is the ValidationReport."""

    kind = "validation"

    @property
    def report(self) -> object:
        """The validation report."""
        return self.outcome


class VerificationFailed(Rejected):
    """The converted model does not compute what the source model computes; nothing was written."""

    kind = "verification"

    @property
    def result(self) -> object:
        """The verification result."""
        return self.outcome
