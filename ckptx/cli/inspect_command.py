"""`ckptx inspect`: show what a checkpoint holds (and write its manifest)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, TextIO

from ckptx.cli.options import EXIT_OK, Parents
from ckptx.cli.present import emit
from ckptx.text import quoted, shown

__all__ = ["add_parser", "run"]


def add_parser(sub: Any, parents: Parents) -> None:
    """Register `inspect` on the CLI's subparsers."""
    p = sub.add_parser("inspect", parents=[parents.common, parents.pickle], help="show what a checkpoint holds")
    p.add_argument("src", help="checkpoint file, sharded index, or DCP / DeepSpeed ZeRO folder")
    p.add_argument("--extract", action="append", default=[], metavar="PATH", help="where the weights live")
    p.add_argument("--manifest", metavar="OUT", help="write a key -> shape/dtype manifest usable as a target")
    p.add_argument("--force", action="store_true", help="overwrite an existing manifest file")


def run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from ckptx.io.manifest import write_manifest
    from ckptx.io.read.open import open_source
    from ckptx.io.write.destination import InputFiles, prepare_folder
    from ckptx.text import count_params, human_bytes, table

    with open_source(args.src, args.extract, allow_globals=args.allow_global, unsafe_pickle=args.unsafe_pickle) as src:
        if args.manifest:  # once the source opened as a checkpoint: what it is is then known
            InputFiles.of([args.src]).check(Path(args.manifest), force=args.force, what="the manifest")
            prepare_folder(Path(args.manifest))
        metas = src.tensors
        params = count_params(metas.values())
        nbytes = sum(m.nbytes for m in metas.values())
        if args.manifest:
            write_manifest(Path(args.manifest), metas, source=str(args.src))
        doc = {
            "ok": True,
            "source": src.path,
            "format": src.format,
            "top_level": src.top_level,
            "extracted_from": src.extracted_from,
            "tensors": {
                k: {
                    "shape": list(m.shape),
                    "dtype": m.dtype,
                    **({"stored_as": src.stored_as[k]} if k in src.stored_as else {}),
                }
                for k, m in metas.items()
            },
            "non_tensors": src.non_tensors,
            "elements": params,
            "bytes": nbytes,
            "metadata": src.file_metadata,
            "manifest": args.manifest,
            "description": src.description,
        }
        lines = [f"{src.path}: {src.format}", *src.description]
        if src.top_level:
            lines.append("top level:")
            lines += [f"  {shown(k)}: {shown(v)}" for k, v in src.top_level.items()]
        lines.append(
            f"weights at {quoted(src.extracted_from)}: {len(metas)} tensors, {params:,} elements (parameters "
            f"and buffers), {human_bytes(nbytes)}"
        )
        if src.non_tensors:
            lines.append(
                "non-tensor entries: " + ", ".join(f"{shown(k)} ({shown(v)})" for k, v in src.non_tensors.items())
            )
        if src.file_metadata:
            lines.append("metadata: " + ", ".join(f"{shown(k)}={shown(v)}" for k, v in src.file_metadata.items()))
        rows = [[shown(k), "x".join(map(str, m.shape)) or "scalar", m.dtype, f"{m.numel:,}"] for k, m in metas.items()]
        headings = ["key", "shape", "dtype", "elements"]
        if src.stored_as:  # a GGUF file: the ggml type each tensor is stored as
            rows = [row + [src.stored_as.get(k, "")] for row, k in zip(rows, metas)]
            headings.append("stored as")
        lines.append(table(rows, headings))
        if args.manifest:
            lines.append(f"wrote manifest {args.manifest}")
    emit(out, args.json, doc, "\n".join(lines))
    return EXIT_OK
