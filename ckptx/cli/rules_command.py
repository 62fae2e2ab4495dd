"""`ckptx rules list|show`: the shipped and installed recipes."""

from __future__ import annotations

import argparse
from typing import Any, TextIO

from ckptx.cli.options import EXIT_OK, Parents, Parser
from ckptx.cli.present import emit
from ckptx.errors import Problem, RuleError
from ckptx.text import key_values

__all__ = ["add_parser", "run"]


def add_parser(sub: Any, parents: Parents) -> None:
    """Register `rules` on the CLI's subparsers."""
    p = sub.add_parser("rules", parents=[parents.common], help="list or show shipped and installed recipes")
    rules_sub = p.add_subparsers(dest="rules_command", required=True, parser_class=Parser)
    rules_sub.add_parser("list", parents=[parents.common], help="list recipes")
    show = rules_sub.add_parser("show", parents=[parents.common], help="print a recipe")
    show.add_argument("name", help="recipe name (e.g. convnextv2/official-to-timm, or pack:name) or rule file")
    show.add_argument("--resolved", action="store_true", help="print the flattened recipe (extends and params applied)")
    show.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="K=V",
        dest="params",
        help="set a recipe parameter (with --resolved)",
    )


def run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from ckptx.rules.packs import clashes, find_recipe, list_recipes, resolve_rule
    from ckptx.rules.yamlfile import load_yaml

    if args.rules_command == "list":
        rows: list[list[str]] = []
        docs: list[dict[str, Any]] = []
        problems: list[Problem] = []
        refs = list_recipes(problems)
        for ref in refs:
            try:
                data = load_yaml(ref.path).data
            except RuleError as exc:
                data, problems = None, problems + exc.problems
            description = data.get("description", "") if isinstance(data, dict) else ""
            name = ref.name if ref.pack.name == "ckptx" else f"{ref.pack.name}:{ref.name}"
            rows.append([name, description, f"{ref.pack.distribution} {ref.pack.version}"])
            docs.append(
                {
                    "name": ref.name,
                    "pack": ref.pack.name,
                    "description": description,
                    "distribution": ref.pack.distribution,
                    "version": ref.pack.version,
                    "path": str(ref.path),
                }
            )
        from ckptx.text import table

        clashing = clashes(refs)
        notes = [
            f"note: '{name}' is provided by several packs; write "
            + " or ".join(f"{r.pack.name}:{name} ({r.pack.distribution} {r.pack.version})" for r in found)
            for name, found in clashing.items()
        ]
        notes += [f"warning: {p}" for p in problems]
        emit(
            out,
            args.json,
            {
                "ok": True,
                "recipes": docs,
                "clashes": {n: [r.pack.name for r in f] for n, f in clashing.items()},
                "problems": [str(p) for p in problems],
            },
            "\n".join([table(rows, ["name", "description", "from"]), *notes]),
        )
        return EXIT_OK
    path = resolve_rule(args.name)
    if args.resolved:
        from ckptx.rules.flatten import dump, flatten
        from ckptx.rules.loader import load_rules

        recipe = load_rules(path, params=key_values(args.params, "--set"))
        flat = flatten(recipe)
        emit(
            out,
            args.json,
            {"ok": True, "path": str(path), "resolved": flat},
            f"# {args.name}: resolved from {', '.join(f.path for f in recipe.files)}\n" + dump(flat),
        )
        return EXIT_OK
    text = path.read_text(encoding="utf-8")
    found = find_recipe(path)
    origin = f"pack {found.pack.name} from {found.pack.distribution} {found.pack.version}, " if found else ""
    emit(
        out,
        args.json,
        {
            "ok": True,
            "path": str(path),
            "text": text,
            "pack": found.pack.name if found else None,
            "distribution": found.pack.distribution if found else None,
            "version": found.pack.version if found else None,
        },
        f"# {args.name}: {origin}{path}\n{text.rstrip()}",
    )
    return EXIT_OK
