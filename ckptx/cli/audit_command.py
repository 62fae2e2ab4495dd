"""`ckptx audit`: what a converted checkpoint got wrong, from the file itself (and its source, target or card)."""

from __future__ import annotations

import argparse
from typing import Any, TextIO

from ckptx.cli.options import EXIT_INVALID, EXIT_OK, Parents
from ckptx.cli.present import emit
from ckptx.errors import UsageError
from ckptx.text import key_values

__all__ = ["add_parser", "run"]


def add_parser(sub: Any, parents: Parents) -> None:
    """Register `audit` on the CLI's subparsers."""
    p = sub.add_parser(
        "audit",
        parents=[parents.common, parents.pickle, parents.trust],
        help="find what a converted checkpoint got wrong (against its source, target or provenance card)",
    )
    p.add_argument("out", help="the checkpoint to audit: a file, a shard index, or a HuggingFace model folder")
    p.add_argument("--source", metavar="SRC", help="the checkpoint it was converted from: prove every tensor")
    p.add_argument(
        "-r",
        "--rules",
        action="append",
        default=[],
        metavar="RULES",
        help="the rule files or recipe names of the conversion, in order (with --source; none: tensors as they are)",
    )
    p.add_argument("--set", action="append", default=[], metavar="K=V", dest="params", help="a recipe parameter")
    p.add_argument("--target", metavar="SPEC", help="module:callable, reference checkpoint, or manifest")
    p.add_argument(
        "--target-arg", action="append", default=[], metavar="K=V", help="keyword argument for the target factory"
    )
    p.add_argument("--card", metavar="CARD", help="the provenance card `ckptx convert --audit` wrote")
    p.add_argument("--threads", type=int, metavar="N", help="threads hashing and summarising (default: every core)")


def run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from ckptx.conversion.audit import audit

    if (args.rules or args.params) and not args.source:
        raise UsageError("audit: -r/--set describe the conversion of --source SRC; give --source too")
    if args.threads is not None and args.threads < 1:
        raise UsageError("audit: --threads takes a positive number")
    report = audit(
        args.out,
        source=args.source,
        recipes=args.rules or None,
        params=key_values(args.params, "--set"),
        target=args.target,
        target_args=key_values(args.target_arg, "--target-arg"),
        card=args.card,
        allow_globals=args.allow_global,
        unsafe_pickle=args.unsafe_pickle,
        threads=args.threads,
    )
    emit(out, args.json, report.to_dict(), str(report))
    return EXIT_OK if report.ok else EXIT_INVALID
