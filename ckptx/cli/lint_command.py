"""`ckptx lint`: check rule files without converting (and, with --source, plan them on a checkpoint)."""

from __future__ import annotations

import argparse
from typing import Any, TextIO

from ckptx.cli.options import EXIT_OK, EXIT_USAGE, Parents
from ckptx.cli.present import emit
from ckptx.errors import CkptxError, RuleError
from ckptx.text import key_values

__all__ = ["add_parser", "run"]


def add_parser(sub: Any, parents: Parents) -> None:
    """Register `lint` on the CLI's subparsers."""
    p = sub.add_parser(
        "lint", parents=[parents.common, parents.pickle, parents.trust], help="check rule files without converting"
    )
    p.add_argument("rules", nargs="+", help="rule files or recipe names")
    p.add_argument("--source", metavar="CKPT", help="also plan on this checkpoint (dead and over-broad steps)")
    p.add_argument("--set", action="append", default=[], metavar="K=V", dest="params", help="set a recipe parameter")


def run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from ckptx.errors import Problem
    from ckptx.rules.lint import lint_recipe
    from ckptx.rules.loader import load_rules

    params = key_values(args.params, "--set")
    results, problems_total = [], 0
    for ref in args.rules:
        entry: dict[str, Any] = {"file": ref, "ok": True, "errors": [], "warnings": []}
        try:
            recipe = load_rules(ref, params=params)
            warnings: list[Problem] = lint_recipe(recipe)
            entry["callables"], refused = _lint_callables(recipe)
            entry["errors"] = [str(r) for r in refused]
            if args.source:
                from ckptx.planning.planner import plan_recipe

                with _open_for_lint(args, recipe) as source:
                    warnings += plan_recipe(recipe, source).warnings
            entry["warnings"] = [str(w) for w in warnings]
            entry["steps"] = len(recipe.steps)
            entry["ok"] = not refused
            problems_total += len(refused)
        except RuleError as exc:
            entry.update(ok=False, errors=[str(p) for p in exc.problems])
            problems_total += len(exc.problems)
        except CkptxError as exc:
            entry.update(ok=False, errors=[str(exc)])
            problems_total += 1
        results.append(entry)
    lines = []
    for entry in results:
        status = "ok" if entry["ok"] else "FAILED"
        lines.append(f"{entry['file']}: {status}" + (f" ({entry.get('steps', 0)} steps)" if entry["ok"] else ""))
        lines += [
            f"  runs: {c['where']}: {c['name']} ({c['reason']})" for c in entry.get("callables", []) if c["allowed"]
        ]
        lines += [f"  error: {e}" for e in entry["errors"]]
        lines += [f"  warning: {w}" for w in entry["warnings"]]
    ok = all(e["ok"] for e in results)
    emit(out, args.json, {"ok": ok, "files": results}, "\n".join(lines))
    return EXIT_OK if ok else EXIT_USAGE


def _lint_callables(recipe: Any) -> tuple[list[dict[str, Any]], list[CkptxError]]:
    """The callables the recipe would run, each with the trust rule's verdict; the refusals as errors."""
    from ckptx.errors import UntrustedCallable
    from ckptx.rules.lint import named_callables
    from ckptx.trust.callables import factory_verdict

    listed: list[dict[str, Any]] = []
    refused: list[CkptxError] = []
    for named in named_callables(recipe):
        where = named.origin.where or named.role
        verdict = factory_verdict(named.name, named.kwargs, where=where)
        listed.append(
            {
                "where": where,
                "role": named.role,
                "name": named.name,
                "allowed": verdict.allowed,
                "reason": verdict.reason,
            }
        )
        if not verdict.allowed:
            refused.append(UntrustedCallable(where, named.name, verdict.reason, may_allow=verdict.may_allow))
    return listed, refused


def _open_for_lint(args: argparse.Namespace, recipe: Any) -> Any:
    from ckptx.io.read.open import open_source

    return open_source(args.source, recipe.extract, allow_globals=args.allow_global, unsafe_pickle=args.unsafe_pickle)
