"""The `ckptx` command line: the parser of every subcommand, and `main`, which runs one and turns every outcome
into an exit code and its presentation. Each subcommand lives in its own module (`*_command.py`: its arguments and
how its result is shown); the engine lives in the layers below."""

from __future__ import annotations

import argparse
import contextlib
import sys
import traceback
from collections.abc import Sequence
from contextlib import AbstractContextManager
from types import ModuleType
from typing import TextIO
from warnings import WarningMessage, catch_warnings

from ckptx._version import __version__
from ckptx.cli import (
    audit_command,
    batch_command,
    convert_command,
    diff_command,
    inspect_command,
    invert_command,
    lint_command,
    rules_command,
    suggest_command,
)
from ckptx.cli.options import EXIT_BUG, EXIT_INTERRUPTED, EXIT_INVALID, EXIT_USAGE, Parser, parents
from ckptx.cli.process import own_stdout, terminate_as_interrupt
from ckptx.errors import CkptxError, PlanError, Rejected, RuleError, UsageError
from ckptx.text import json_text, printable

__all__ = ["COMMANDS", "build_parser", "main"]

COMMANDS: dict[str, ModuleType] = {
    "convert": convert_command,
    "invert": invert_command,
    "inspect": inspect_command,
    "diff": diff_command,
    "lint": lint_command,
    "rules": rules_command,
    "batch": batch_command,
    "suggest": suggest_command,
    "audit": audit_command,
}
"""Subcommand -> its module (`add_parser(sub, parents)` and `run(args, out, err) -> exit code`), in help order."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = Parser(prog="ckptx", description="Declarative, rule-based checkpoint transformer for PyTorch.")
    parser.add_argument("--version", action="version", version=f"ckptx {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    shared = parents()
    for command in COMMANDS.values():
        command.add_parser(sub, shared)
    return parser


def main(argv: Sequence[str] | None = None, *, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 validation failed, 2 bad input, 3 bug, 130 interrupted by
    Ctrl-C or SIGTERM).

    Stdout carries the command's own output only: what libraries print meanwhile goes to stderr (cli/process.py).

    Warnings raised while a command runs (torch's `UserWarning`s, for one) are captured: they become `note:`
    lines on stderr after the command's output, and are left out when the command fails with bad input, whose
    error stays one line (`--debug` shows them). Filters such as `-W error` still apply.
    """
    out, err = stdout or sys.stdout, stderr or sys.stderr
    args_list = list(sys.argv[1:] if argv is None else argv)
    as_json = "--json" in args_list
    debug = "--debug" in args_list
    try:
        args = build_parser().parse_args(args_list)
    except UsageError as exc:
        return _fail(out, err, as_json, EXIT_USAGE, "usage", str(exc) + " (see ckptx --help)")
    except SystemExit as exc:  # --help / --version
        return int(exc.code or 0)
    with catch_warnings(record=True) as caught, terminate_as_interrupt(), own_stdout(out, err) as command_out:
        code = _run(args, command_out, err, as_json, debug)
    if code != EXIT_USAGE or debug:
        _write_warnings(err, caught)
    return code


def _run(args: argparse.Namespace, out: TextIO, err: TextIO, as_json: bool, debug: bool) -> int:
    """One command, every outcome turned into an exit code and its presentation."""
    try:
        with _approved(getattr(args, "allow_factory", [])):
            return COMMANDS[args.command].run(args, out, err)
    except Rejected as exc:
        if as_json:
            document = {"ok": False, exc.kind: exc.outcome.to_dict(), "written": False}
            out.write(json_text(document) + "\n")
        else:
            out.write(printable(f"{exc.outcome}\nnothing was written") + "\n")
        return EXIT_INVALID
    except CkptxError as exc:
        if debug:
            traceback.print_exc(file=err)
        problems = [str(p) for p in exc.problems] if isinstance(exc, (RuleError, PlanError)) else None
        return _fail(out, err, as_json, exc.exit_code, type(exc).__name__, str(exc), problems)
    except KeyboardInterrupt:
        err.write("ckptx: interrupted; nothing was written\n")
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - a bug: show everything
        traceback.print_exc(file=err)
        return _fail(
            out,
            err,
            as_json,
            EXIT_BUG,
            "internal",
            f"internal error: {type(exc).__name__}: {exc}; "
            "this is a bug in ckptx, please report it with the traceback above",
        )


def _write_warnings(err: TextIO, caught: Sequence[WarningMessage]) -> None:
    """Each distinct captured warning as one `note:` line."""
    seen = set()
    for warning in caught:
        text = str(warning.message).strip()
        line = f"note: {warning.category.__name__}: {text.splitlines()[0] if text else ''}"
        if line not in seen:
            seen.add(line)
            err.write(printable(line, keep_lines=False) + "\n")


def _approved(factories: Sequence[str]) -> AbstractContextManager[None]:
    """`--allow-factory`: the factories the user lets files name (ckptx.trust is imported only when given)."""
    if not factories:
        return contextlib.nullcontext()
    from ckptx.trust.callables import allow_factories

    return allow_factories(factories)


def _fail(
    out: TextIO, err: TextIO, as_json: bool, code: int, kind: str, message: str, problems: Sequence[str] | None = None
) -> int:
    """Present an error: one line (or one line per problem), every untrusted character escaped."""
    lines = [printable(p, keep_lines=False) for p in (problems if problems is not None else [message])]
    if as_json:
        out.write(
            json_text({"ok": False, "error": {"type": kind, "message": message, "problems": lines, "exit_code": code}})
            + "\n"
        )
    elif len(lines) > 1:
        err.write(f"ckptx: error: {len(lines)} problems\n" + "\n".join(lines) + "\n")
    else:
        text = lines[0] if lines else ""
        err.write(("" if text.startswith("ckptx") else "ckptx: error: ") + text + "\n")
    return code
