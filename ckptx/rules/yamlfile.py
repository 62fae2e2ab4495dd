"""Load a YAML document (scalars by the YAML 1.2 core schema, `ckptx.yaml12`) and remember the line and column of
every value and key."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ckptx.errors import Problem, RuleError, UnreadableFile
from ckptx.files import MAX_TEXT, read_bounded
from ckptx.yaml12 import CoreLoader

PathTuple = tuple[Any, ...]


def format_path(path: PathTuple) -> str:
    """`('steps', 2, 'rename', 0)` -> `steps[2].rename[0]`."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


@dataclass(frozen=True)
class YamlDocument:
    """A parsed YAML document with the source position of each node."""

    file: str
    data: Any
    marks: dict[PathTuple, tuple[int, int]]
    key_marks: dict[PathTuple, tuple[int, int]]

    def where(self, path: PathTuple, *, key: bool = False) -> str:
        """`file:line:col path` for a node (or, with key=True, for the key naming it)."""
        line_col = None
        if key:
            line_col = self.key_marks.get(tuple(path))
        probe = tuple(path)
        while line_col is None:
            line_col = self.marks.get(probe)
            if not probe:
                break
            probe = probe[:-1]
        line, col = line_col or (1, 1)
        place = format_path(path)
        return f"{self.file}:{line}:{col}" + (f" {place}" if place else "")


def load_yaml(path: str | Path, *, display: str | None = None) -> YamlDocument:
    """Read a YAML file; syntax errors and duplicate keys become a RuleError naming file:line:col."""
    shown = display or str(path)
    try:
        text = read_bounded(Path(path), shown, MAX_TEXT, "a YAML file").decode("utf-8")
    except UnreadableFile as exc:
        raise RuleError([Problem(shown, exc.detail)]) from None
    except UnicodeDecodeError as exc:
        raise RuleError([Problem(shown, f"cannot read the file: not UTF-8 (byte {exc.start})")]) from None
    return parse_yaml(text, shown)


def parse_yaml(text: str, file: str) -> YamlDocument:
    """Parse YAML text (see `load_yaml`)."""
    try:
        node = yaml.compose(text, Loader=CoreLoader)
    except RecursionError:
        raise RuleError([Problem(file, f"invalid YAML: it nests deeper than {MAX_DEPTH} levels")]) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{file}:{mark.line + 1}:{mark.column + 1}" if mark else file
        problem = exc.problem or "invalid YAML"
        raise RuleError([Problem(where, f"invalid YAML: {problem}")]) from None
    except yaml.YAMLError as exc:
        raise RuleError([Problem(file, f"invalid YAML: {exc}")]) from None
    _check_shape(node, file)
    builder = _Builder(file)
    data = builder.build(node, ()) if node is not None else None
    if builder.problems:
        raise RuleError(builder.problems)
    return YamlDocument(file, data, builder.marks, builder.key_marks)


MAX_DEPTH = 64
"""Levels of lists and mappings in a YAML document (a recipe or a jobs file nests a handful)."""
MAX_VALUES = 1_000_000
"""Values in a YAML document once its aliases are expanded (`*a` repeated: a few lines that mean billions)."""


def _check_shape(node: yaml.Node | None, file: str) -> None:
    """Refuse a document nested deeper than MAX_DEPTH levels or holding more than MAX_VALUES values with its
    aliases expanded, before anything walks it recursively (walked here without recursion)."""
    stack = [(node, 1)] if node is not None else []
    seen = 0
    while stack:
        item, depth = stack.pop()
        seen += 1
        if depth > MAX_DEPTH or seen > MAX_VALUES:
            mark = item.start_mark
            what = (
                f"nests deeper than {MAX_DEPTH} levels"
                if depth > MAX_DEPTH
                else f"holds more than {MAX_VALUES:,} values (aliases expanded)"
            )
            raise RuleError([Problem(f"{file}:{mark.line + 1}:{mark.column + 1}", f"invalid YAML: it {what}")])
        if isinstance(item, yaml.MappingNode):
            stack.extend((child, depth + 1) for pair in item.value for child in pair)
        elif isinstance(item, yaml.SequenceNode):
            stack.extend((child, depth + 1) for child in item.value)


class _Builder:
    def __init__(self, file: str) -> None:
        self.file = file
        self.marks: dict[PathTuple, tuple[int, int]] = {}
        self.key_marks: dict[PathTuple, tuple[int, int]] = {}
        self.problems: list[Problem] = []
        self._constructor = CoreLoader("")

    def build(self, node: yaml.Node, path: PathTuple) -> Any:
        self.marks[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, path)
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, path + (i,)) for i, item in enumerate(node.value)]
        try:
            return self._constructor.construct_object(node, deep=True)
        except yaml.YAMLError as exc:
            line, col = self.marks[path]
            self.problems.append(Problem(f"{self.file}:{line}:{col} {format_path(path)}", f"invalid value: {exc}"))
            return None

    def _mapping(self, node: yaml.MappingNode, path: PathTuple) -> dict[Any, Any]:
        result: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                line = key_node.start_mark.line + 1
                self.problems.append(
                    Problem(f"{self.file}:{line}", "YAML merge keys (<<) are not supported; use extends")
                )
                continue
            key = self._constructor.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                key = str(key)
            child = path + (key,)
            line, col = key_node.start_mark.line + 1, key_node.start_mark.column + 1
            if key in result:
                first_line = self.key_marks[child][0]
                self.problems.append(
                    Problem(
                        f"{self.file}:{line}:{col} {format_path(child)}",
                        f"duplicate key '{key}' (first given on line {first_line}); remove one",
                    )
                )
                continue
            self.key_marks[child] = (line, col)
            result[key] = self.build(value_node, child)
        return result
