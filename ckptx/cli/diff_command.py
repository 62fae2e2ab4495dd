"""`ckptx diff`: key, shape and dtype differences between a checkpoint (after rules) and another."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, TextIO

from ckptx.cli.options import EXIT_INVALID, EXIT_OK, Parents
from ckptx.cli.present import emit
from ckptx.text import key_values, shown

__all__ = ["add_parser", "run"]


def add_parser(sub: Any, parents: Parents) -> None:
    """Register `diff` on the CLI's subparsers."""
    p = sub.add_parser(
        "diff", parents=[parents.common, parents.pickle], help="key/shape differences between two checkpoints"
    )
    p.add_argument("a", help="checkpoint A (the rules apply to it)")
    p.add_argument("b", help="checkpoint, manifest or module:callable")
    p.add_argument("-r", "--rules", action="append", default=[], metavar="RULES", help="apply rules to A first")
    p.add_argument(
        "--target-arg",
        action="append",
        default=[],
        metavar="K=V",
        help="keyword argument for B when it is a module:callable",
    )
    p.add_argument("--set", action="append", default=[], metavar="K=V", dest="params", help="set a recipe parameter")


def run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from ckptx.check.validation import validate
    from ckptx.io.read.open import is_checkpoint_folder, open_source
    from ckptx.planning.planner import plan_recipe
    from ckptx.rules.loader import load_rules
    from ckptx.rules.recipe import Recipe, TargetSpec
    from ckptx.targets.resolve import parse_target_arg, resolve_target

    recipe = load_rules(args.rules, params=key_values(args.params, "--set")) if args.rules else Recipe(name="(none)")
    spec = parse_target_arg(args.b, key_values(args.target_arg, "--target-arg"))
    if spec.config and is_checkpoint_folder(Path(args.b)):  # a model folder with weights: compare the weights
        spec = TargetSpec(checkpoint=args.b, where="B")
    target = resolve_target(spec)
    with open_source(args.a, recipe.extract, allow_globals=args.allow_global, unsafe_pickle=args.unsafe_pickle) as src:
        if recipe.inferred:  # parameters chosen from A: the one choice that fits B
            from ckptx.check.inferred import choose_variant

            recipe = choose_variant(recipe, src, lambda candidate: target).recipe
        plan = plan_recipe(recipe, src, target=target.tensors)
        report = validate(plan, target)
    lines = [f"A: {args.a}" + (f" after {recipe.name}" if args.rules else ""), f"B: {target.description}"]
    lines.append(
        f"in both: {report.matched}; only in A: {len(report.unexpected)}; only in B: {len(report.missing)}; "
        f"shape differs: {len(report.shape_mismatches)}; dtype differs: {len(report.dtype_differences)}"
    )
    for title, items, fmt in (
        ("only in A", report.unexpected, lambda p: f"{p.have}"),
        ("only in B", report.missing, lambda p: f"{p.want}" + (f"  {p.hint}" if p.hint else "")),
        ("shape differs", report.shape_mismatches, lambda p: f"A {list(p.have.shape)} vs B {list(p.want.shape)}"),
        ("dtype differs", report.dtype_differences, lambda p: f"A {p.have.dtype} vs B {p.want.dtype}"),
    ):
        if items:
            lines.append(f"{title}:")
            lines += [f"  {shown(p.key)}: {fmt(p)}" for p in items]
    same = report.ok and not report.dtype_differences
    lines.append("identical keys, shapes and dtypes" if same else "")
    emit(out, args.json, {"ok": same, **report.to_dict()}, "\n".join(line for line in lines if line))
    return EXIT_OK if same else EXIT_INVALID
