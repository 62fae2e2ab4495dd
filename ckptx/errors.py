"""The errors ckptx raises for user input; each carries the exit code the CLI uses."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = [
    "CardError",
    "CkptxError",
    "DestinationError",
    "NeededGlobal",
    "PlanError",
    "Problem",
    "RefusedGlobal",
    "Rejected",
    "RuleError",
    "SourceError",
    "TargetError",
    "TensorOpError",
    "UnreadableFile",
    "UnsafeGlobalError",
    "UntrustedCallable",
    "ValidationFailed",
    "VerificationFailed",
    "WorkerFailed",
    "WorkerLost",
]


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


def unique_problems(problems: list[Problem]) -> list[Problem]:
    """`problems` without repeats, in order (the same problem found by two checks is reported once)."""
    seen: set[tuple[str, str]] = set()
    out = []
    for problem in problems:
        marker = (problem.where, problem.message)
        if marker not in seen:
            seen.add(marker)
            out.append(problem)
    return out


class RuleError(CkptxError):
    """A rule or jobs file is invalid; lists every problem found at once."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class SourceError(CkptxError):
    """A source checkpoint cannot be read (corrupt, truncated, unsafe, wrong layout)."""


class UnreadableFile(SourceError):
    """A file ckptx was given cannot be read safely: missing, not a regular file (a FIFO, a device), or larger
    than its kind may be. `file` names it as the user gave it, `detail` says what is wrong (never its text)."""

    def __init__(self, file: str, detail: str) -> None:
        self.file = file
        self.detail = detail
        super().__init__(f"{file}: {detail}")


@dataclass(frozen=True)
class NeededGlobal:
    """A pickle global the safe loader refused, and what the trust rule makes of it.

    `name` is `module.Name`, the form `--allow-global` takes. `allowable` is True when `--allow-global`
    would accept it (a plain data class), False when it never would (it runs code or touches the
    system), None when ckptx did not import its module to look (not an installed package).
    """

    name: str
    allowable: bool | None
    why: str


_UNSAFE = "--unsafe-pickle, which runs any code the file contains"


class UnsafeGlobalError(SourceError):
    """A pickle needs globals that the safe loader does not allow; says of each whether it may be allowed."""

    def __init__(self, path: str, needed: Sequence[NeededGlobal]) -> None:
        self.needed = tuple(needed)
        self.global_name = self.needed[0].name if self.needed else ""
        super().__init__(f"{path}: {_needs(self.needed)}; {_next_step(self.needed)}")


def _needs(needed: Sequence[NeededGlobal]) -> str:
    def verdict(g: NeededGlobal) -> str:
        if g.allowable:
            return f"it may be allowed ({g.why})"
        if g.allowable is None:
            return f"ckptx has not looked at it ({g.why})"
        return f"--allow-global cannot allow it ({g.why})"

    if len(needed) == 1:
        return (
            f"the checkpoint needs the Python global '{needed[0].name}', which the safe loader refuses: "
            f"{verdict(needed[0])}"
        )
    listed = "; ".join(f"'{g.name}': {verdict(g)}" for g in needed)
    return f"the checkpoint needs {len(needed)} Python globals the safe loader refuses: {listed}"


def _next_step(needed: Sequence[NeededGlobal]) -> str:
    if any(g.allowable is False for g in needed):
        return f"load this file only if you trust it completely (you made it yourself), with {_UNSAFE}"
    flags = " ".join(f"--allow-global {g.name}" for g in needed)
    if all(g.allowable for g in needed):
        return (
            f"if you trust this file, pass {flags} (just {'that one' if len(needed) == 1 else 'those'}), or {_UNSAFE}"
        )
    return (
        f"if you know it is a plain data class (a dataclass, an Enum, a named tuple, a container), pass {flags} "
        f"(ckptx checks it then), or, only if you trust this file completely, {_UNSAFE}"
    )


class RefusedGlobal(SourceError):
    """`--allow-global NAME` (or a jobs file's `allow_globals:`) names something that may never be allowed."""

    def __init__(self, flag: str, name: str, why: str) -> None:
        self.global_name = name
        super().__init__(
            f"{flag} {name}: refused: {why}; --allow-global is only for plain data classes (argparse.Namespace, "
            f"a dataclass, an Enum, a named tuple, collections.OrderedDict, numpy dtypes and scalars); a file that "
            f"needs it runs code when it is loaded: load it only if you trust it completely (you made it "
            f"yourself), with {_UNSAFE}"
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


class FactoryFailed(TargetError):
    """A model factory was found and called, and raised (as opposed to: it could not be imported)."""


class UntrustedCallable(TargetError):
    """A file names a callable that the trust rule refuses; nothing was imported or called for it.

    `may_allow` says whether the user may still allow it (it is not a known danger): then the message
    says how (name it on the command line, or declare it in a rule pack).
    """

    def __init__(self, where: str, name: str, why: str, *, may_allow: bool) -> None:
        self.name = name
        self.why = why
        self.may_allow = may_allow
        if may_allow:
            step = (
                f"if you trust it, name it yourself: --allow-factory {name} (or --target {name} for a target), "
                f"or declare it in a rule pack (entry point group ckptx.factories)"
            )
        else:
            step = "it is not a model factory: remove it from the file, and do not use the file if you did not write it"
        super().__init__(f"{where}: refused to call '{name}' named in a file: {why}; {step}")


class DestinationError(CkptxError):
    """The destination cannot be written (exists, equals source, bad extension)."""


class TensorOpError(CkptxError):
    """An op failed on real tensor data while writing."""


class Outcome(Protocol):
    """What a rejected conversion reports (a validation report, a verification result, a variant search)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        ...


class Rejected(CkptxError):
    """The conversion ran but its result was rejected (exit 1); `outcome` says why, nothing was written."""

    exit_code = 1
    kind = "rejected"

    def __init__(self, outcome: Outcome, *, conversion: Any = None) -> None:
        self.outcome = outcome
        self.conversion = conversion
        """What the conversion found before it was rejected (its plan, report and notes: a `ConvertResult`), so
        that the rejection is shown with the lines a success shows; None when raised outside a conversion."""
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


class NoBigStack(Exception):
    """A thread with the stack a deeply nested pickle needs could not be started (ckptx.io.read.unpickle)."""


class OpShapeError(ValueError):
    """Raised by an op's shape function when the input does not fit the op (the planner turns it into a Problem)."""


class UsageError(CkptxError):
    """The command line itself is wrong (an unknown flag, a missing argument); the message ends with where to look."""


class UnsupportedDtype(CkptxError):
    """A tensor has a dtype ckptx does not know, or that the output format cannot hold."""


class ParamsUnresolved(RuleError):
    """An operation needs a concrete value for a parameter that is still to be chosen from the source."""


class NotInvertible(Exception):
    """A step has no inverse; the message says why. `needs_layout`: a trace (the source layout) would give one."""

    def __init__(self, message: str, *, needs_layout: bool = False) -> None:
        super().__init__(message)
        self.needs_layout = needs_layout


class TemplateError(ValueError):
    """A template that cannot be compiled against its pattern."""


class KeyTemplateError(ValueError):
    """A template that cannot be filled for one key (a group that is not an integer, a negative index)."""


class InitConfigError(CkptxError):
    """An `init_cfg` that would undo what Ckptx loads (another initializer after it), or bad arguments."""


class VariantRejected(Rejected):
    """No single choice of the inferred parameters fits the source; nothing was written (exit 1)."""

    kind = "variants"

    @property
    def search(self) -> object:
        """What was tried (a `ckptx.check.inferred.VariantSearch`)."""
        return self.outcome


class NoVariantFits(VariantRejected):
    """Every choice was tried and none validates against its target."""


class AmbiguousVariant(VariantRejected):
    """More than one choice validates: the source does not tell them apart."""


class BadHeader(Exception):
    """A header problem; the text completes `FILE: not a valid safetensors file: `."""


class NotReproduced(RuntimeError):
    """The written recipe, re-planned, does not do what the alignment decided (a bug in `suggest`)."""


class ForeignGlobal(SourceError):
    """A checkpoint pickle names a global its format never uses (a DeepSpeed file, DCP `.metadata`); refused
    without importing or calling it. `where` says which pickle (a record of the file, or empty)."""

    def __init__(self, file: str, global_name: str, *, fmt: str, where: str = "", advice: str) -> None:
        self.file, self.where, self.global_name = file, where, global_name
        place = f"{file}: {where} " if where else f"{file}: "
        super().__init__(
            f"{place}names the Python global '{global_name}', which {fmt} never use; refused without running it: "
            f"{advice}"
        )


class StepNotInvertible(RuleError):
    """A step of a recipe being reversed has no inverse (the problem names the step and why); `needs_layout`: a
    trace of the recipe on its source layout would give one."""

    def __init__(self, problems: Iterable[Problem], *, needs_layout: bool = False) -> None:
        super().__init__(problems)
        self.needs_layout = needs_layout


class CardError(CkptxError):
    """A provenance card cannot be read: not JSON, or not what `schemas/ckptx-card.schema.json` describes."""


class WorkerFailed(CkptxError):
    """A work unit of a conversion split across workers failed, or was lost with its worker; nothing was published.
    The message names the unit and the worker; `exit_code` and `cause` are those of the error the unit raised (a
    unit lost with its worker: exit 2, `cause` the executor's error)."""

    def __init__(self, message: str, exit_code: int = 2, cause: str = "") -> None:
        super().__init__(message, exit_code, cause)
        self.exit_code = exit_code
        self.cause = cause

    def __str__(self) -> str:
        return str(self.args[0])


class WorkerLost(Exception):
    """The outcome of a task whose worker went away before it finished (a killed or crashed process, a Dask
    KilledWorker): what the executor said, not an error of the task itself."""
