"""The `ckptx suggest` subcommand: arguments, and the text or JSON it prints (the library never prints)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any, TextIO

from ckptx.cli.options import Parents
from ckptx.errors import CkptxError
from ckptx.text import key_values

__all__ = ["add_parser", "run"]

EXIT_OK, EXIT_UNMATCHED = 0, 1


def add_parser(sub: Any, parents: Parents) -> None:
    """Register `suggest` on the CLI's subparsers."""
    p = sub.add_parser(
        "suggest",
        parents=[parents.common, parents.pickle],
        help="infer a recipe from a checkpoint and a target (metadata only), validated against it",
    )
    p.add_argument("src", help="source checkpoint (.pth/.pt/.bin/.ckpt, .safetensors, sharded index, or a manifest)")
    p.add_argument("--target", required=True, metavar="SPEC", help="module:callable, reference checkpoint, or manifest")
    p.add_argument(
        "--target-arg", action="append", default=[], metavar="K=V", help="keyword argument for the target factory"
    )
    p.add_argument(
        "--allow-missing",
        action="append",
        default=[],
        metavar="RE",
        help="target keys that may stay missing (a new head); written to target.allow_missing",
    )
    p.add_argument(
        "--allow-unexpected",
        action="append",
        default=[],
        metavar="RE",
        help="source keys that may stay extra (kept, not dropped); written to target.allow_unexpected",
    )
    p.add_argument("-o", "--output", metavar="RULES.yaml", help="write the recipe here (default: print it)")
    p.add_argument("--force", action="store_true", help="overwrite an existing RULES.yaml")
    p.add_argument("--name", help="recipe name (default: suggested/<source>-to-<target>)")
    p.add_argument(
        "--verify-with",
        metavar="module:callable",
        help="source model factory: convert, then compare the source and target models' outputs",
    )
    p.add_argument(
        "--verify-arg", action="append", default=[], metavar="K=V", help="keyword argument for --verify-with"
    )
    p.add_argument(
        "--verify-input",
        metavar="SHAPE",
        help="input shape for --verify-with, e.g. 2,3,224,224 (default: guessed from the source model)",
    )
    p.add_argument("--verify-input-dtype", metavar="DTYPE", help="input dtype, e.g. int64 for token ids")
    p.add_argument(
        "--no-library",
        action="store_true",
        help="infer a recipe even when a shipped or installed recipe validates against the target as it is",
    )


def _shape(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(",") if part.strip())
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise CkptxError(f"--verify-input {text}: expected positive sizes like 2,3,224,224")
    return shape


def run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Run `ckptx suggest`; exit 0 when the recipe validates and every row was decided by evidence, 1 when target
    keys stay unmatched, a row is undecided or the outputs differ."""
    from ckptx.io.write.atomic import atomic_output
    from ckptx.io.write.destination import InputFiles, prepare_folder
    from ckptx.suggestion.engine import suggest

    if (args.verify_input or args.verify_arg or args.verify_input_dtype) and not args.verify_with:
        raise CkptxError("--verify-input/--verify-arg/--verify-input-dtype need --verify-with module:callable")
    destination = Path(args.output) if args.output else None
    if destination is not None:  # never over the source or a target checkpoint; written atomically, folders made
        given = [Path(p) for p in (args.src, args.target) if os.path.lexists(p)]
        InputFiles.of(given).check(destination, force=args.force, what="the recipe")
        prepare_folder(destination)
    result = suggest(
        args.src,
        args.target,
        target_args=key_values(args.target_arg, "--target-arg"),
        allow_missing=args.allow_missing,
        allow_unexpected=args.allow_unexpected,
        allow_globals=args.allow_global,
        unsafe_pickle=args.unsafe_pickle,
        output=destination,
        verify_with=args.verify_with,
        verify_args=key_values(args.verify_arg, "--verify-arg"),
        verify_input=_shape(args.verify_input),
        verify_input_dtype=args.verify_input_dtype,
        name=args.name,
        library=not args.no_library,
    )
    if destination is not None:
        with atomic_output(destination) as file:
            file.write(result.text.encode("utf-8"))
    report = result.report
    if args.json:
        doc = {**report.to_dict(), "output": str(destination) if destination else None, "recipe": result.text}
        out.write(json.dumps(doc, indent=1, default=str) + "\n")
    elif destination is not None:
        out.write("\n".join(_summary(report, destination)) + "\n")
    else:  # the recipe on stdout, the summary as comments: `ckptx suggest ... > rules.yaml` is a valid recipe
        summary = "\n".join(f"# {line}" for text in _summary(report, None) for line in text.splitlines())
        out.write(result.text.rstrip() + "\n" + summary + "\n")
    return EXIT_OK if report.ok else EXIT_UNMATCHED


def _summary(report: Any, destination: Path | None) -> list[str]:
    lines = [
        f"source: {report.source} ({report.source_format}), weights at '{report.extracted_from}': "
        f"{report.source_tensors} tensors"
    ]
    if report.extract_rivals:
        lines.append(f"  equally good fits: {', '.join(report.extract_rivals)}")
    lines.append(f"target: {report.target}: {report.target_tensors} tensors")
    parts = ", ".join(f"{n} by {what}" for what, n in sorted(report.evidence.items(), key=lambda kv: -kv[1]))
    lines.append(f"mapped {report.mapped} target keys ({parts or 'none'})")
    if report.ops:
        lines.append("ops: " + ", ".join(f"{n} {kind}" for kind, n in sorted(report.ops.items())))
    if report.dropped:
        lines.append(
            f"dropped {len(report.dropped)} source tensor(s) without a counterpart: "
            + ", ".join(report.dropped[:5])
            + (" ..." if len(report.dropped) > 5 else "")
        )
    lines += [f"close call: {c}" for c in report.close_calls[:10]]
    if report.undecided:
        lines.append(
            f"UNDECIDED: {len(report.undecided)} row(s) no evidence but position decided (equal shapes; names, "
            f"module kinds and structure do not tell the rivals apart); they are marked `# UNDECIDED` in the recipe. "
            f"Rerun with --verify-with module:callable (the source model) to decide them on a probe input:"
        )
        lines += [f"  {u}" for u in report.undecided[:20]]
        if len(report.undecided) > 20:
            lines.append(f"  ... and {len(report.undecided) - 20} more")
    lines += [f"note: {n}" for n in report.notes[:10]]
    lines.append(str(report.validation))
    if report.missing:
        lines.append(
            f"{len(report.missing)} target key(s) unmatched (listed at the end of the recipe); "
            f"--allow-missing REGEX accepts keys that may stay as initialised"
        )
    if report.verification is not None:
        lines.append(str(report.verification))
    elif report.verification_error:
        lines.append(f"verification: {report.verification_error}")
    else:
        lines.append("outputs not compared: pass --verify-with module:callable (the source model) to check them")
    if destination is not None:
        lines.append(f"wrote {destination}")
    lines.append(f"took {report.seconds:.2f} s")
    return lines
