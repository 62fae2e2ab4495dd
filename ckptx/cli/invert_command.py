"""`ckptx invert`: write the reverse of a recipe."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, TextIO

from ckptx.cli.options import EXIT_OK, Parents
from ckptx.cli.present import emit
from ckptx.text import key_values

__all__ = ["add_parser", "run"]


def add_parser(sub: Any, parents: Parents) -> None:
    """Register `invert` on the CLI's subparsers."""
    p = sub.add_parser("invert", parents=[parents.common, parents.trust], help="write the reverse of a recipe")
    p.add_argument("rules", nargs="+", help="rule files or recipe names, composed in order")
    p.add_argument(
        "-o", "--output", metavar="REVERSE.yaml", help="where to write the reverse recipe (default: print it)"
    )
    p.add_argument(
        "--original",
        metavar="SPEC",
        help="checkpoint, manifest or module:callable in the recipe's source "
        "layout; needed when it reshapes, casts or concatenates",
    )
    p.add_argument("--original-arg", action="append", default=[], metavar="K=V", help="keyword argument for --original")
    p.add_argument("--set", action="append", default=[], metavar="K=V", dest="params", help="set a recipe parameter")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")


def run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from ckptx.conversion.reverse import reverse_recipe
    from ckptx.io.write.atomic import atomic_output
    from ckptx.io.write.destination import InputFiles, prepare_folder
    from ckptx.rules.loader import load_rules
    from ckptx.targets.resolve import parse_target_arg

    recipe = load_rules(args.rules, params=key_values(args.params, "--set"))
    original = (
        parse_target_arg(args.original, key_values(args.original_arg, "--original-arg")) if args.original else None
    )
    reversed_ = reverse_recipe(recipe, original=original)
    doc = {"ok": True, "output": args.output, "traced_on": reversed_.traced_on, "reverse": reversed_.document}
    if not args.output:
        emit(out, args.json, doc, reversed_.text.rstrip())
        return EXIT_OK
    destination = Path(args.output)  # never over a rule file it read; written atomically, folders made
    InputFiles.of(Path(f.path) for f in recipe.files).check(destination, force=args.force, what="the reverse recipe")
    prepare_folder(destination)
    with atomic_output(destination) as file:
        file.write(reversed_.text.encode("utf-8"))
    emit(
        out, args.json, doc, f"wrote {destination} ({len(reversed_.document['steps'])} steps, reverse of {recipe.name})"
    )
    return EXIT_OK
