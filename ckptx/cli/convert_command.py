"""`ckptx convert`: convert a checkpoint with rule files, validated against the target before writing."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any, TextIO

from ckptx.cli.options import EXIT_INVALID, EXIT_OK, Parents, size, worker_count
from ckptx.cli.present import emit, progress_bar
from ckptx.errors import CkptxError, Rejected
from ckptx.text import key_values, quoted, shown

__all__ = ["add_parser", "run"]


def add_parser(sub: Any, parents: Parents) -> None:
    """Register `convert` on the CLI's subparsers."""
    p = sub.add_parser(
        "convert", parents=[parents.common, parents.pickle, parents.trust], help="convert a checkpoint with rule files"
    )
    p.add_argument(
        "src",
        help="source checkpoint: a file (.safetensors, .pth/.pt/.bin/.ckpt), a sharded index, a model folder "
        "(HuggingFace config.json or Meta params.json beside the weights), or a DCP or DeepSpeed ZeRO folder",
    )
    p.add_argument(
        "-r",
        "--rules",
        action="append",
        default=[],
        metavar="RULES",
        help="rule file or shipped recipe name; repeat to compose in order (none: the tensors as they "
        "are, e.g. to change the format)",
    )
    p.add_argument(
        "-o",
        "--output",
        metavar="DST",
        help="output file (.safetensors, .pth, .pt, .bin, .gguf), or DIR/ for a HuggingFace model folder "
        "(config.json + model.safetensors; from a model folder source, its config and other files carried)",
    )
    p.add_argument(
        "--target",
        metavar="SPEC",
        help="module:callable, a model folder (DIR/ or DIR/config.json), reference checkpoint, or manifest",
    )
    p.add_argument(
        "--target-arg",
        action="append",
        default=[],
        metavar="K=V",
        help="keyword argument for the target factory, or a config field of a model-folder target",
    )
    p.add_argument(
        "--dtype",
        choices=("bfloat16", "float16", "float32", "q8_0"),
        help="cast every floating-point tensor to this dtype (after the rules); with a .gguf output, its file type "
        "(q8_0 only there), each tensor's ggml type chosen as llama.cpp's converter chooses",
    )
    p.add_argument("--set", action="append", default=[], metavar="K=V", dest="params", help="set a recipe parameter")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the validation report; write nothing")
    p.add_argument("--explain", action="store_true", help="print the plan table with the rule that made each key")
    p.add_argument("--force", action="store_true", help="overwrite an existing destination")
    p.add_argument("--verify", action="store_true", help="after writing, compare source and target model outputs")
    p.add_argument(
        "--reverse",
        action="store_true",
        help="convert the other way with the reverse of the rules (see `ckptx invert`); --target is "
        "then the rules' source layout",
    )
    p.add_argument(
        "--audit",
        nargs="?",
        const="",
        metavar="CARD",
        help="also write a provenance card (JSON: each output tensor's sha256, statistics, source spans and ops) "
        "to CARD; without CARD, DIR/ckptx-card.json in a model folder, else DST.card.json",
    )
    p.add_argument(
        "--max-shard-size",
        type=size,
        metavar="SIZE",
        help="write safetensors shards of at most SIZE (5GB, 500MiB...) and an index: "
        "DST NAME.safetensors or NAME.safetensors.index.json gives NAME-00001-of-0000N.safetensors",
    )
    p.add_argument(
        "--workers",
        type=worker_count,
        default=1,
        metavar="N",
        help="write the output with N worker processes (auto: one per core; default 1: this process, which still "
        "uses every core for casts); the bytes are the same for any N",
    )
    p.add_argument(
        "--executor",
        choices=["local", "dask"],
        default="local",
        help="where the workers run: local processes, or a Dask cluster whose workers see the same paths",
    )
    p.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="with --executor dask: the scheduler, e.g. tcp://host:8786 (default: a LocalCluster of N workers)",
    )


def run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from ckptx.conversion.pipeline import convert
    from ckptx.rules.recipe import Recipe

    if not args.output and not args.dry_run:
        raise CkptxError("convert: give -o DST (or --dry-run to only plan)")
    show_progress = not args.json and hasattr(err, "isatty") and err.isatty()
    try:
        result = convert(
            args.src,
            args.output,
            args.rules or Recipe(name="(no recipe: tensors as they are)"),
            target=args.target,
            target_args=key_values(args.target_arg, "--target-arg"),
            params=key_values(args.params, "--set"),
            dry_run=args.dry_run,
            force=args.force,
            allow_globals=args.allow_global,
            unsafe_pickle=args.unsafe_pickle,
            verify=args.verify,
            progress=progress_bar(err, show_progress),
            max_shard_size=args.max_shard_size,
            reverse=args.reverse,
            audit=args.audit,
            dtype=args.dtype,
            workers=args.workers,
            executor=args.executor,
            scheduler=args.scheduler,
        )
    except Rejected as exc:
        if exc.conversion is None:
            raise
        # shown as a success is, every line up to what rejected it, then that nothing was written
        document = {**exc.conversion.to_dict(), "ok": False, "written": False, exc.kind: exc.outcome.to_dict()}
        emit(out, args.json, document, "\n".join([*result_lines(exc.conversion, args), "nothing was written"]))
        return EXIT_INVALID
    emit(out, args.json, result.to_dict(), "\n".join(result_lines(result, args)))
    if result.report is not None and not result.report.ok:
        return EXIT_INVALID
    return EXIT_OK


def result_lines(result: Any, args: argparse.Namespace) -> list[str]:
    """The lines a conversion prints: source, recipe, plan, validation, notes, verification, what was written."""
    from ckptx.cli.present import render_plan, render_warnings
    from ckptx.text import human_bytes

    plan, source = result.plan, result.plan.source
    lines = [
        f"source: {source.path} ({source.format}), weights at {quoted(source.extracted_from)}: "
        f"{len(source.tensors)} tensors"
    ]
    ignored = ignored_entries(source.top_level, source.extracted_from, source.non_tensors)
    if ignored:
        lines.append(f"ignored top-level entries: {', '.join(map(shown, ignored))}")
    files = ", ".join(f.path for f in plan.recipe.files)
    lines.append(f"recipe: {plan.recipe.name}" + (f" ({files})" if files else ""))
    if args.dry_run or args.explain:
        lines.append(render_plan(plan, explain=args.explain))
    lines.append(f"plan: {len(plan.entries)} tensors out, {len(plan.dropped)} dropped")
    if plan.warnings:
        lines.append(render_warnings(plan.warnings))
    if result.report is not None:
        lines.append(str(result.report))
    else:
        lines.append(
            "validation: NOT validated: no target was given, so nothing checks that these keys and shapes "
            "fit a model (give --target MODEL|CHECKPOINT|MANIFEST, or `target:` in the recipe)"
        )
    lines += [f"note: {n}" for n in result.notes]
    if result.verification is not None:
        lines.append(str(result.verification))
    if result.written:
        lines.append(f"wrote {result.destination} ({human_bytes(result.bytes_written)}) in {result.seconds:.2f} s")
        hosts = sorted({unit["worker"] for unit in result.units})
        if len(hosts) > 1 or args.executor == "dask":
            lines.append(f"written in {len(result.units)} work units by {len(hosts)} workers ({args.executor})")
    if result.card is not None:
        lines.append(f"card: {result.card} (check the output against it with `ckptx audit OUT --card CARD`)")
    elif args.dry_run:
        lines.append("dry run: nothing was written")
    return lines


def ignored_entries(top_level: Mapping[str, str], extracted_from: str, non_tensors: Mapping[str, str]) -> list[str]:
    """The top-level entries of a checkpoint that the weights were not taken from: when the weights are the whole
    object (a plain state dict, `extract: .`, a DCP checkpoint), its non-tensor entries (a step count, a training
    state), else every top-level entry but the one the weights are under."""
    if extracted_from in (".", ""):
        return [k for k in top_level if k in non_tensors]
    head = extracted_from.split(".")[0]
    return [k for k in top_level if k != head and k != extracted_from]
