"""YAML scalars read by the YAML 1.2 core schema, for every YAML ckptx reads (recipes, jobs files, manifests) and
every `K=V` item of the command line.

PyYAML implements YAML 1.1, where `1e-5` and `1e-06` (no dot in the mantissa) are strings, `yes`/`off` are
booleans, `010` is octal and `1:30` is a sexagesimal number. ckptx reads plain scalars as YAML 1.2's core schema
does: `1e-5`, `1E5`, `.5`, `-3`, `+1.0e-06`, `.inf` are numbers; `true`/`false` (any of True/TRUE) are booleans;
`null`, `~` and nothing are null; every other plain scalar (`yes`, `off`, `010` is the integer 10, `1:30`) is
what YAML 1.2 makes of it. Quoted scalars are strings as always.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

__all__ = ["CoreLoader", "load_scalar_text"]

_NULL = re.compile(r"^(?:~|null|Null|NULL|)$")
_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_INT = re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$")
_FLOAT = re.compile(
    r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
)
_CORE_TAGS = {
    "tag:yaml.org,2002:null",
    "tag:yaml.org,2002:bool",
    "tag:yaml.org,2002:int",
    "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:timestamp",
    "tag:yaml.org,2002:value",
}


class CoreLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 core-schema resolution of plain scalars (see the module docstring)."""

    yaml_implicit_resolvers: dict[Any, list[tuple[str, re.Pattern[str]]]] = {}

    def construct_core_int(self, node: yaml.ScalarNode) -> int:
        """`-3`, `010` (ten: no octal by a leading zero in YAML 1.2), `0o17`, `0x1F`."""
        text = str(self.construct_scalar(node))
        if text.startswith("0o"):
            return int(text[2:], 8)
        if text.startswith("0x"):
            return int(text[2:], 16)
        return int(text, 10)

    def construct_core_float(self, node: yaml.ScalarNode) -> float:
        """`1e-5`, `.5`, `-1.0E+3`, `.inf`, `-.Inf`, `.nan`."""
        text = str(self.construct_scalar(node)).lower()
        if text.endswith(".inf"):
            return float("-inf") if text.startswith("-") else float("inf")
        if text == ".nan":
            return float("nan")
        return float(text)

    def construct_core_bool(self, node: yaml.ScalarNode) -> bool:
        """`true`/`True`/`TRUE` and the same for false."""
        return str(self.construct_scalar(node)).lower() == "true"


def _install() -> None:
    inherited = yaml.SafeLoader.yaml_implicit_resolvers
    for first, resolvers in inherited.items():
        kept = [(tag, regexp) for tag, regexp in resolvers if tag not in _CORE_TAGS]
        if kept:
            CoreLoader.yaml_implicit_resolvers[first] = kept
    CoreLoader.add_implicit_resolver("tag:yaml.org,2002:bool", _BOOL, list("tTfF"))
    CoreLoader.add_implicit_resolver("tag:yaml.org,2002:int", _INT, list("-+0123456789"))
    CoreLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))
    CoreLoader.add_implicit_resolver("tag:yaml.org,2002:null", _NULL, ["~", "n", "N", ""])
    CoreLoader.add_constructor("tag:yaml.org,2002:int", CoreLoader.construct_core_int)
    CoreLoader.add_constructor("tag:yaml.org,2002:float", CoreLoader.construct_core_float)
    CoreLoader.add_constructor("tag:yaml.org,2002:bool", CoreLoader.construct_core_bool)


_install()


def load_scalar_text(text: str) -> Any:
    """One YAML value (`1e-5`, `[1, 2]`, `{a: 1}`, `'quoted'`) read by the core schema; raises yaml.YAMLError."""
    return yaml.load(text, Loader=CoreLoader)  # a SafeLoader: no Python objects
