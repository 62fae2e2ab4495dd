"""What every subcommand shares: exit codes, the parser class that raises instead of exiting, and the parent
parsers of the common, pickle and trust options."""

from __future__ import annotations

import argparse
from typing import NamedTuple, NoReturn

from ckptx.errors import UsageError
from ckptx.text import parse_size

__all__ = [
    "EXIT_BUG",
    "EXIT_INTERRUPTED",
    "EXIT_INVALID",
    "EXIT_OK",
    "EXIT_USAGE",
    "Parents",
    "Parser",
    "parents",
    "size",
    "worker_count",
]

EXIT_OK, EXIT_INVALID, EXIT_USAGE, EXIT_BUG, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors raise UsageError (the CLI presents it) instead of exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")


class Parents(NamedTuple):
    """The option groups subcommands inherit: `--json/--debug`, the pickle options, and `--allow-factory`."""

    common: Parser
    pickle: Parser
    trust: Parser


def parents() -> Parents:
    """The parent parsers, made once per parser build."""
    common = Parser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    common.add_argument("--debug", action="store_true", help="show tracebacks")
    pickle = Parser(add_help=False)
    pickle.add_argument(
        "--allow-global",
        action="append",
        default=[],
        metavar="G",
        help="allow one pickle global (e.g. argparse.Namespace) in the safe loader",
    )
    pickle.add_argument("--unsafe-pickle", action="store_true", help="load pickles with full trust (runs their code)")
    trust = Parser(add_help=False)
    trust.add_argument(
        "--allow-factory",
        action="append",
        default=[],
        metavar="MODULE:CALLABLE",
        help="let rule and jobs files name this model factory (you trust it; see Safety guarantees)",
    )
    return Parents(common, pickle, trust)


def size(text: str) -> int:
    """An argparse type: `5GB`, `500MiB` or a number of bytes."""
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def worker_count(text: str) -> int | str:
    """An argparse type: a number of worker processes (at least 1) or `auto`."""
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number of workers (1, 2, ... or auto)")
    return int(text)
