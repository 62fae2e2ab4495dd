"""docs/cli.md documents exactly the parser: every subcommand, every option string and every positional.

The convention the page follows (and this test reads):

- each subcommand has a heading `## ckptx CMD` (nested ones `## ckptx rules show`; the program itself `## ckptx`);
  other `##` headings are prose, and any `## ckptx ...` heading must name a real subcommand;
- inside a subcommand's section (up to the next `## ` heading), each argument is one table row whose first cell
  holds it in backticks: `` `-r RULES`, `--rules RULES` `` for an option that takes a value (the metavar as
  `--help` shows it), `` `--force` `` for a flag, `` `src` `` for a positional (its name as `--help` shows it).

`-h`/`--help` is documented once, under `## ckptx`; every subcommand has it.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from ckptx.cli import build_parser

CLI_MD = Path(__file__).resolve().parents[2] / "docs" / "cli.md"
HEADING = re.compile(r"^## (ckptx(?: [\w-]+)*)\s*$")


def parser_arguments() -> dict[str, dict[str, str | None]]:
    """'ckptx CMD ...' -> {option string or positional name: metavar as --help shows it (None for a flag)}."""
    found: dict[str, dict[str, str | None]] = {}

    def walk(parser: argparse.ArgumentParser, name: str) -> None:
        arguments: dict[str, str | None] = {}
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub, subparser in action.choices.items():
                    walk(subparser, f"{name} {sub}")
            elif isinstance(action, argparse._HelpAction) and name != "ckptx":
                continue  # documented once, under `## ckptx`
            elif not action.option_strings:
                arguments[action.metavar or action.dest] = None
            else:
                for option in action.option_strings:
                    arguments[option] = _metavar(action)
        found[name] = arguments

    walk(build_parser(), "ckptx")
    return found


def _metavar(action: argparse.Action) -> str | None:
    if action.nargs == 0:
        return None
    if action.metavar is not None:
        return str(action.metavar)
    if action.choices is not None:
        return "{" + ",".join(map(str, action.choices)) + "}"
    return action.dest.upper()


def documented_arguments(text: str) -> dict[str, list[tuple[str, str | None, int]]]:
    """'ckptx CMD ...' -> [(option or positional, the word after it or None, line number)] from docs/cli.md."""
    sections: dict[str, list[tuple[str, str | None, int]]] = {}
    current: list[tuple[str, str | None, int]] | None = None
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("## "):
            heading = HEADING.match(line)
            current = None
            if heading is not None:
                assert heading.group(1) not in sections, f"docs/cli.md:{number}: '{heading.group(1)}' documented twice"
                current = sections.setdefault(heading.group(1), [])
            continue
        if current is None or not line.startswith("|") or set(line) <= set("|-: "):
            continue
        first_cell = line.split("|")[1]
        if first_cell.strip() in ("option", "argument"):
            continue
        for code in re.findall(r"`([^`]+)`", first_cell):
            words = code.split()
            current.append((words[0], " ".join(words[1:]) or None, number))
    return sections


@pytest.fixture(scope="module")
def documented() -> dict[str, list[tuple[str, str | None, int]]]:
    return documented_arguments(CLI_MD.read_text(encoding="utf-8"))


def test_every_subcommand_has_a_section_and_every_section_a_subcommand(documented) -> None:
    commands = set(parser_arguments())
    assert not commands - set(documented), (
        f"no `## ckptx CMD` section in docs/cli.md: {sorted(commands - set(documented))}"
    )
    assert not set(documented) - commands, (
        f"docs/cli.md documents subcommands the parser lacks: {sorted(set(documented) - commands)}"
    )


def test_every_argument_is_documented_under_its_subcommand(documented) -> None:
    missing = [
        f"{command} {argument}"
        for command, arguments in parser_arguments().items()
        for argument in arguments
        if argument not in {name for name, _, _ in documented.get(command, [])}
    ]
    assert not missing, (
        "arguments the parser has but docs/cli.md does not document in that command's table:\n  " + "\n  ".join(missing)
    )


def test_docs_name_no_argument_the_parser_lacks_and_show_the_right_metavar(documented) -> None:
    parser = parser_arguments()
    wrong = []
    for command, rows in documented.items():
        arguments = parser.get(command, {})
        for name, word, line in rows:
            if name not in arguments:
                wrong.append(f"docs/cli.md:{line}: {command} has no argument {name}")
            elif word != arguments[name]:
                wanted = f"`{name} {arguments[name]}`" if arguments[name] else f"`{name}` alone"
                wrong.append(f"docs/cli.md:{line}: {command} {name}: write {wanted}")
    assert not wrong, "\n".join(wrong)


def test_the_convention_sees_a_missing_and_a_stale_flag() -> None:
    """The parsing above finds what it must: an undocumented flag, a stale one and a stale subcommand."""
    text = CLI_MD.read_text(encoding="utf-8")
    broken = text.replace("| `--explain` |", "| `--explained` |").replace("## ckptx batch\n", "## ckptx batches\n")
    documented = documented_arguments(broken)
    convert = {name for name, _, _ in documented["ckptx convert"]}
    assert "--explain" not in convert and "--explained" in convert
    assert "ckptx batches" in documented and "ckptx batch" not in documented
