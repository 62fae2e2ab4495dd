"""The `ckptx` command line: argument parsing and presentation only; the engine lives elsewhere."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import traceback
from warnings import WarningMessage, catch_warnings
from pathlib import Path
from typing import Any, Callable, ContextManager, Sequence, TextIO


from ckptx._version import __version__
from ckptx.errors import CkptxError, PlanError, Rejected, RuleError
from ckptx.report import json_text
from ckptx.text import key_values as _key_values, printable, quoted, shown

EXIT_OK, EXIT_INVALID, EXIT_USAGE, EXIT_BUG, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    common = _Parser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    common.add_argument("--debug", action="store_true", help="show tracebacks")
    pickle = _Parser(add_help=False)
    pickle.add_argument("--allow-global", action="append", default=[], metavar="G",
                        help="allow one pickle global (e.g. argparse.Namespace) in the safe loader")
    pickle.add_argument("--unsafe-pickle", action="store_true", help="load pickles with full trust (runs their code)")
    trust = _Parser(add_help=False)
    trust.add_argument("--allow-factory", action="append", default=[], metavar="MODULE:CALLABLE",
                       help="let rule and jobs files name this model factory (you trust it; see Safety guarantees)")

    parser = _Parser(prog="ckptx", description="Declarative, rule-based checkpoint transformer for PyTorch.")
    parser.add_argument("--version", action="version", version=f"ckptx {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("convert", parents=[common, pickle, trust], help="convert a checkpoint with rule files")
    p.add_argument("src")
    p.add_argument("-r", "--rules", action="append", default=[], metavar="RULES",
                   help="rule file or shipped recipe name; repeat to compose in order (none: the tensors as they "
                        "are, e.g. to change the format)")
    p.add_argument("-o", "--output", metavar="DST",
                   help="output file (.safetensors, .pth, .pt, .bin), or DIR/ for a HuggingFace model folder "
                        "(config.json + model.safetensors) with a transformers target")
    p.add_argument("--target", metavar="SPEC", help="module:callable, reference checkpoint, or manifest")
    p.add_argument("--target-arg", action="append", default=[], metavar="K=V", help="keyword argument for the target factory")
    p.add_argument("--set", action="append", default=[], metavar="K=V", dest="params", help="set a recipe parameter")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the validation report; write nothing")
    p.add_argument("--explain", action="store_true", help="print the plan table with the rule that made each key")
    p.add_argument("--force", action="store_true", help="overwrite an existing destination")
    p.add_argument("--verify", action="store_true", help="after writing, compare source and target model outputs")
    p.add_argument("--reverse", action="store_true",
                   help="convert the other way with the reverse of the rules (see `ckptx invert`); --target is "
                        "then the rules' source layout")
    p.add_argument("--max-shard-size", type=_size, metavar="SIZE",
                   help="write safetensors shards of at most SIZE (5GB, 500MiB...) and an index: "
                        "DST NAME.safetensors or NAME.safetensors.index.json gives NAME-00001-of-0000N.safetensors")

    p = sub.add_parser("invert", parents=[common, trust], help="write the reverse of a recipe")
    p.add_argument("rules", nargs="+", help="rule files or recipe names, composed in order")
    p.add_argument("-o", "--output", metavar="REVERSE.yaml", help="where to write the reverse recipe (default: print it)")
    p.add_argument("--original", metavar="SPEC", help="checkpoint, manifest or module:callable in the recipe's source "
                                                      "layout; needed when it reshapes, casts or concatenates")
    p.add_argument("--original-arg", action="append", default=[], metavar="K=V", help="keyword argument for --original")
    p.add_argument("--set", action="append", default=[], metavar="K=V", dest="params")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")

    p = sub.add_parser("inspect", parents=[common, pickle], help="show what a checkpoint holds")
    p.add_argument("src")
    p.add_argument("--extract", action="append", default=[], metavar="PATH", help="where the weights live")
    p.add_argument("--manifest", metavar="OUT", help="write a key -> shape/dtype manifest usable as a target")
    p.add_argument("--force", action="store_true", help="overwrite an existing manifest file")

    p = sub.add_parser("diff", parents=[common, pickle], help="key/shape differences between two checkpoints")
    p.add_argument("a")
    p.add_argument("b", help="checkpoint, manifest or module:callable")
    p.add_argument("-r", "--rules", action="append", default=[], metavar="RULES", help="apply rules to A first")
    p.add_argument("--target-arg", action="append", default=[], metavar="K=V")
    p.add_argument("--set", action="append", default=[], metavar="K=V", dest="params")

    p = sub.add_parser("lint", parents=[common, pickle, trust], help="check rule files without converting")
    p.add_argument("rules", nargs="+")
    p.add_argument("--source", metavar="CKPT", help="also plan on this checkpoint (dead and over-broad steps)")
    p.add_argument("--set", action="append", default=[], metavar="K=V", dest="params")

    p = sub.add_parser("rules", parents=[common], help="list or show shipped and installed recipes")
    rules_sub = p.add_subparsers(dest="rules_command", required=True, parser_class=_Parser)
    rules_sub.add_parser("list", parents=[common], help="list recipes")
    show = rules_sub.add_parser("show", parents=[common], help="print a recipe")
    show.add_argument("name")
    show.add_argument("--resolved", action="store_true", help="print the flattened recipe (extends and params applied)")
    show.add_argument("--set", action="append", default=[], metavar="K=V", dest="params")

    p = sub.add_parser("batch", parents=[common, trust], help="run many conversions from a jobs file")
    p.add_argument("jobs_file", metavar="JOBS.yaml")
    p.add_argument("-j", "--jobs", type=int, default=1, dest="workers", metavar="N",
                   help="worker processes (1: in this process); with dask and no --scheduler, LocalCluster workers")
    p.add_argument("--dry-run", action="store_true", help="plan and validate every job; write nothing")
    p.add_argument("--resume", action="store_true", help="skip jobs whose output is complete and current; redo the rest")
    p.add_argument("--executor", choices=["local", "dask"], default="local", help="where jobs run (default: local)")
    p.add_argument("--scheduler", metavar="ADDRESS", help="Dask scheduler, e.g. tcp://host:8786 (default: a LocalCluster)")
    p.add_argument("--report", metavar="FILE", help="JSON report (default: JOBS.report.json beside the jobs file)")

    from ckptx.suggest.cli import add_parser as add_suggest  # noqa: PLC0415

    add_suggest(sub, [common, pickle])
    return parser


def main(argv: Sequence[str] | None = None, *, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 validation failed, 2 bad input, 3 bug, 130 interrupted).

    Warnings raised while a command runs (torch's `UserWarning`s, for one) are captured: they become `note:`
    lines on stderr after the command's output, and are left out when the command fails with bad input, whose
    error stays one line (`--debug` shows them). Filters such as `-W error` still apply.
    """
    out, err = stdout or sys.stdout, stderr or sys.stderr
    args_list = list(sys.argv[1:] if argv is None else argv)
    as_json = "--json" in args_list
    debug = "--debug" in args_list
    try:
        args = build_parser().parse_args(args_list)
    except _UsageError as exc:
        return _fail(out, err, as_json, EXIT_USAGE, "usage", str(exc) + " (see ckptx --help)")
    except SystemExit as exc:  # --help / --version
        return int(exc.code or 0)
    with catch_warnings(record=True) as caught:
        code = _run(args, out, err, as_json, debug)
    if code != EXIT_USAGE or debug:
        _write_warnings(err, caught)
    return code


def _run(args: argparse.Namespace, out: TextIO, err: TextIO, as_json: bool, debug: bool) -> int:
    """One command, every outcome turned into an exit code and its presentation."""
    try:
        with _approved(getattr(args, "allow_factory", [])):
            return _COMMANDS[args.command](args, out, err)
    except Rejected as exc:
        if as_json:
            document = {"ok": False, exc.kind: exc.outcome.to_dict(), "written": False}  # type: ignore[attr-defined]
            out.write(json_text(document) + "\n")
        else:
            out.write(printable(f"{exc.outcome}\nnothing was written") + "\n")
        return EXIT_INVALID
    except CkptxError as exc:
        if debug:
            traceback.print_exc(file=err)
        problems = [str(p) for p in exc.problems] if isinstance(exc, (RuleError, PlanError)) else None
        return _fail(out, err, as_json, exc.exit_code, type(exc).__name__, str(exc), problems)
    except KeyboardInterrupt:
        err.write("ckptx: interrupted; nothing was written\n")
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - a bug: show everything
        traceback.print_exc(file=err)
        return _fail(out, err, as_json, EXIT_BUG, "internal", f"internal error: {type(exc).__name__}: {exc}; "
                                                              "this is a bug in ckptx, please report it with the traceback above")


def _write_warnings(err: TextIO, caught: Sequence[WarningMessage]) -> None:
    """Each distinct captured warning as one `note:` line."""
    seen = set()
    for warning in caught:
        text = str(warning.message).strip()
        line = f"note: {warning.category.__name__}: {text.splitlines()[0] if text else ''}"
        if line not in seen:
            seen.add(line)
            err.write(printable(line, keep_lines=False) + "\n")


def _approved(factories: Sequence[str]) -> ContextManager[None]:
    """`--allow-factory`: the factories the user lets files name (ckptx.trust is imported only when given)."""
    if not factories:
        return contextlib.nullcontext()
    from ckptx.trust import allow_factories  # noqa: PLC0415

    return allow_factories(factories)


def _fail(out: TextIO, err: TextIO, as_json: bool, code: int, kind: str, message: str,
          problems: Sequence[str] | None = None) -> int:
    """Present an error: one line (or one line per problem), every untrusted character escaped."""
    lines = [printable(p, keep_lines=False) for p in (problems if problems is not None else [message])]
    if as_json:
        out.write(json_text({"ok": False, "error": {"type": kind, "message": message, "problems": lines,
                                                     "exit_code": code}}) + "\n")
    elif len(lines) > 1:
        err.write(f"ckptx: error: {len(lines)} problems\n" + "\n".join(lines) + "\n")
    else:
        text = lines[0] if lines else ""
        err.write(("" if text.startswith("ckptx") else "ckptx: error: ") + text + "\n")
    return code


def _size(text: str) -> int:
    from ckptx.io.sharded_writer import parse_size  # noqa: PLC0415

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _emit(out: TextIO, as_json: bool, document: dict[str, Any], text: str) -> None:
    out.write(json_text(document) + "\n" if as_json else printable(text) + ("\n" if text else ""))


def _progress(err: TextIO, enabled: bool) -> Callable[[int, int], None] | None:
    if not enabled:
        return None
    started = time.monotonic()
    last = [0.0]

    def show(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] < 0.2 and done < total:
            return
        last[0] = now
        rate = done / max(now - started, 1e-9)
        eta = (total - done) / rate if rate else 0
        from ckptx.report import human_bytes  # noqa: PLC0415

        err.write(f"\r  {100 * done / max(total, 1):5.1f}%  {human_bytes(done)} / {human_bytes(total)}  "
                  f"{human_bytes(rate)}/s  ETA {eta:4.0f} s ")
        if done >= total:
            err.write("\n")
        err.flush()

    return show


def _cmd_convert(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from ckptx.convert import convert  # noqa: PLC0415
    from ckptx.report import human_bytes, render_plan, render_warnings  # noqa: PLC0415
    from ckptx.rules import Recipe  # noqa: PLC0415

    if not args.output and not args.dry_run:
        raise CkptxError("convert: give -o DST (or --dry-run to only plan)")
    show_progress = not args.json and hasattr(err, "isatty") and err.isatty()
    result = convert(args.src, args.output, args.rules or Recipe(name="(no recipe: tensors as they are)"),
                     target=args.target,
                     target_args=_key_values(args.target_arg, "--target-arg"), params=_key_values(args.params, "--set"),
                     dry_run=args.dry_run, force=args.force, allow_globals=args.allow_global,
                     unsafe_pickle=args.unsafe_pickle, verify=args.verify, progress=_progress(err, show_progress),
                     max_shard_size=args.max_shard_size, reverse=args.reverse)
    plan, source = result.plan, result.plan.source
    lines = [f"source: {source.path} ({source.format}), weights at {quoted(source.extracted_from)}: "
             f"{len(source.tensors)} tensors"]
    ignored = [k for k in source.top_level if k != source.extracted_from.split(".")[0]]
    if ignored:
        lines.append(f"ignored top-level entries: {', '.join(map(shown, ignored))}")
    lines.append(f"recipe: {plan.recipe.name} ({', '.join(f.path for f in plan.recipe.files)})")
    if args.dry_run or args.explain:
        lines.append(render_plan(plan, explain=args.explain))
    lines.append(f"plan: {len(plan.entries)} tensors out, {len(plan.dropped)} dropped")
    if plan.warnings:
        lines.append(render_warnings(plan.warnings))
    if result.report is not None:
        lines.append(str(result.report))
    else:
        lines.append("validation: NOT validated: no target was given, so nothing checks that these keys and shapes "
                     "fit a model (give --target MODEL|CHECKPOINT|MANIFEST, or `target:` in the recipe)")
    lines += [f"note: {n}" for n in result.notes]
    if result.verification is not None:
        lines.append(str(result.verification))
    if result.written:
        lines.append(f"wrote {result.destination} ({human_bytes(result.bytes_written)}) in {result.seconds:.2f} s")
    elif args.dry_run:
        lines.append("dry run: nothing was written")
    _emit(out, args.json, result.to_dict(), "\n".join(lines))
    if result.report is not None and not result.report.ok:
        return EXIT_INVALID
    return EXIT_OK


def _cmd_inspect(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from ckptx.io.open import open_source  # noqa: PLC0415
    from ckptx.report import count_params, human_bytes, table  # noqa: PLC0415
    from ckptx.io.manifest import write_manifest  # noqa: PLC0415
    from ckptx.destination import InputFiles, prepare_folder  # noqa: PLC0415

    if args.manifest:
        InputFiles.of([args.src]).check(Path(args.manifest), force=args.force, what="the manifest")
        prepare_folder(Path(args.manifest))
    with open_source(args.src, args.extract, allow_globals=args.allow_global, unsafe_pickle=args.unsafe_pickle) as src:
        metas = src.tensors
        params = count_params(metas.values())
        nbytes = sum(m.nbytes for m in metas.values())
        if args.manifest:
            write_manifest(Path(args.manifest), metas, source=str(args.src))
        doc = {"ok": True, "source": src.path, "format": src.format, "top_level": src.top_level,
               "extracted_from": src.extracted_from, "tensors": {k: {"shape": list(m.shape), "dtype": m.dtype}
                                                                 for k, m in metas.items()},
               "non_tensors": src.non_tensors, "elements": params, "bytes": nbytes, "metadata": src.file_metadata,
               "manifest": args.manifest, "description": src.description}
        lines = [f"{src.path}: {src.format}", *src.description]
        if src.top_level:
            lines.append("top level:")
            lines += [f"  {shown(k)}: {shown(v)}" for k, v in src.top_level.items()]
        lines.append(f"weights at {quoted(src.extracted_from)}: {len(metas)} tensors, {params:,} elements (parameters "
                     f"and buffers), {human_bytes(nbytes)}")
        if src.non_tensors:
            lines.append("non-tensor entries: " + ", ".join(f"{shown(k)} ({shown(v)})" for k, v in src.non_tensors.items()))
        if src.file_metadata:
            lines.append("metadata: " + ", ".join(f"{shown(k)}={shown(v)}" for k, v in src.file_metadata.items()))
        rows = [[shown(k), "x".join(map(str, m.shape)) or "scalar", m.dtype, f"{m.numel:,}"] for k, m in metas.items()]
        lines.append(table(rows, ["key", "shape", "dtype", "elements"]))
        if args.manifest:
            lines.append(f"wrote manifest {args.manifest}")
    _emit(out, args.json, doc, "\n".join(lines))
    return EXIT_OK


def _cmd_diff(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from ckptx.io.open import open_source  # noqa: PLC0415
    from ckptx.plan import plan_recipe  # noqa: PLC0415
    from ckptx.rules import Recipe, load_rules  # noqa: PLC0415
    from ckptx.target import parse_target_arg, resolve_target  # noqa: PLC0415
    from ckptx.validate import validate  # noqa: PLC0415

    recipe = load_rules(args.rules, params=_key_values(args.params, "--set")) if args.rules else Recipe(name="(none)")
    target = resolve_target(parse_target_arg(args.b, _key_values(args.target_arg, "--target-arg")))
    with open_source(args.a, recipe.extract, allow_globals=args.allow_global, unsafe_pickle=args.unsafe_pickle) as src:
        if recipe.inferred:  # parameters chosen from A: the one choice that fits B
            from ckptx.variants import choose_variant  # noqa: PLC0415

            recipe = choose_variant(recipe, src, lambda candidate: target).recipe
        plan = plan_recipe(recipe, src, target=target.tensors)
        report = validate(plan, target)
    lines = [f"A: {args.a}" + (f" after {recipe.name}" if args.rules else ""), f"B: {target.description}"]
    lines.append(f"in both: {report.matched}; only in A: {len(report.unexpected)}; only in B: {len(report.missing)}; "
                 f"shape differs: {len(report.shape_mismatches)}; dtype differs: {len(report.dtype_differences)}")
    for title, items, fmt in (("only in A", report.unexpected, lambda p: f"{p.have}"),
                              ("only in B", report.missing, lambda p: f"{p.want}" + (f"  {p.hint}" if p.hint else "")),
                              ("shape differs", report.shape_mismatches, lambda p: f"A {list(p.have.shape)} vs B {list(p.want.shape)}"),
                              ("dtype differs", report.dtype_differences, lambda p: f"A {p.have.dtype} vs B {p.want.dtype}")):
        if items:
            lines.append(f"{title}:")
            lines += [f"  {shown(p.key)}: {fmt(p)}" for p in items]
    same = report.ok and not report.dtype_differences
    lines.append("identical keys, shapes and dtypes" if same else "")
    _emit(out, args.json, {"ok": same, **report.to_dict()}, "\n".join(l for l in lines if l))
    return EXIT_OK if same else EXIT_INVALID


def _cmd_lint(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from ckptx.errors import Problem  # noqa: PLC0415
    from ckptx.rules import load_rules  # noqa: PLC0415
    from ckptx.rules.lint import lint_recipe  # noqa: PLC0415

    params = _key_values(args.params, "--set")
    results, problems_total = [], 0
    for ref in args.rules:
        entry: dict[str, Any] = {"file": ref, "ok": True, "errors": [], "warnings": []}
        try:
            recipe = load_rules(ref, params=params)
            warnings: list[Problem] = lint_recipe(recipe)
            entry["callables"], refused = _lint_callables(recipe)
            entry["errors"] = [str(r) for r in refused]
            if args.source:
                from ckptx.plan import plan_recipe  # noqa: PLC0415

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
        lines += [f"  runs: {c['where']}: {c['name']} ({c['reason']})" for c in entry.get("callables", []) if c["allowed"]]
        lines += [f"  error: {e}" for e in entry["errors"]]
        lines += [f"  warning: {w}" for w in entry["warnings"]]
    ok = all(e["ok"] for e in results)
    _emit(out, args.json, {"ok": ok, "files": results}, "\n".join(lines))
    return EXIT_OK if ok else EXIT_USAGE


def _lint_callables(recipe: Any) -> tuple[list[dict[str, Any]], list[CkptxError]]:
    """The callables the recipe would run, each with the trust rule's verdict; the refusals as errors."""
    from ckptx.errors import UntrustedCallable  # noqa: PLC0415
    from ckptx.rules.lint import named_callables  # noqa: PLC0415
    from ckptx.trust import factory_verdict  # noqa: PLC0415

    listed, refused = [], []
    for named in named_callables(recipe):
        where = named.origin.where or named.role
        verdict = factory_verdict(named.name, named.kwargs, where=where)
        listed.append({"where": where, "role": named.role, "name": named.name, "allowed": verdict.allowed,
                       "reason": verdict.reason})
        if not verdict.allowed:
            refused.append(UntrustedCallable(where, named.name, verdict.reason, may_allow=verdict.may_allow))
    return listed, refused


def _open_for_lint(args: argparse.Namespace, recipe: Any) -> Any:
    from ckptx.io.open import open_source  # noqa: PLC0415

    return open_source(args.source, recipe.extract, allow_globals=args.allow_global, unsafe_pickle=args.unsafe_pickle)


def _cmd_rules(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from ckptx.rules.registry import clashes, find_recipe, list_recipes, resolve_rule  # noqa: PLC0415
    from ckptx.rules.yamlfile import load_yaml  # noqa: PLC0415

    if args.rules_command == "list":
        rows, docs, problems = [], [], []
        refs = list_recipes(problems)
        for ref in refs:
            try:
                data = load_yaml(ref.path).data
            except RuleError as exc:
                data, problems = None, problems + exc.problems
            description = data.get("description", "") if isinstance(data, dict) else ""
            name = ref.name if ref.pack.name == "ckptx" else f"{ref.pack.name}:{ref.name}"
            rows.append([name, description, f"{ref.pack.distribution} {ref.pack.version}"])
            docs.append({"name": ref.name, "pack": ref.pack.name, "description": description,
                         "distribution": ref.pack.distribution, "version": ref.pack.version, "path": str(ref.path)})
        from ckptx.report import table  # noqa: PLC0415

        clashing = clashes(refs)
        notes = [f"note: '{name}' is provided by several packs; write "
                 + " or ".join(f"{r.pack.name}:{name} ({r.pack.distribution} {r.pack.version})" for r in found)
                 for name, found in clashing.items()]
        notes += [f"warning: {p}" for p in problems]
        _emit(out, args.json, {"ok": True, "recipes": docs, "clashes": {n: [r.pack.name for r in f] for n, f in clashing.items()},
                               "problems": [str(p) for p in problems]},
              "\n".join([table(rows, ["name", "description", "from"]), *notes]))
        return EXIT_OK
    path = resolve_rule(args.name)
    if args.resolved:
        from ckptx.rules import load_rules  # noqa: PLC0415
        from ckptx.rules.flatten import dump, flatten  # noqa: PLC0415

        recipe = load_rules(path, params=_key_values(args.params, "--set"))
        flat = flatten(recipe)
        _emit(out, args.json, {"ok": True, "path": str(path), "resolved": flat},
              f"# {args.name}: resolved from {', '.join(f.path for f in recipe.files)}\n"
              + dump(flat))
        return EXIT_OK
    text = path.read_text(encoding="utf-8")
    ref = find_recipe(path)
    origin = f"pack {ref.pack.name} from {ref.pack.distribution} {ref.pack.version}, " if ref else ""
    _emit(out, args.json, {"ok": True, "path": str(path), "text": text, "pack": ref.pack.name if ref else None,
                           "distribution": ref.pack.distribution if ref else None,
                           "version": ref.pack.version if ref else None},
          f"# {args.name}: {origin}{path}\n{text.rstrip()}")
    return EXIT_OK


def _cmd_invert(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from ckptx.reverse import reverse_recipe  # noqa: PLC0415
    from ckptx.rules import load_rules  # noqa: PLC0415
    from ckptx.target import parse_target_arg  # noqa: PLC0415

    recipe = load_rules(args.rules, params=_key_values(args.params, "--set"))
    original = parse_target_arg(args.original, _key_values(args.original_arg, "--original-arg")) if args.original else None
    reversed_ = reverse_recipe(recipe, original=original)
    doc = {"ok": True, "output": args.output, "traced_on": reversed_.traced_on, "reverse": reversed_.document}
    if not args.output:
        _emit(out, args.json, doc, reversed_.text.rstrip())
        return EXIT_OK
    destination = Path(args.output)
    if destination.exists() and not args.force:
        raise CkptxError(f"{destination}: already exists; pass --force to overwrite it")
    destination.write_text(reversed_.text, encoding="utf-8")
    _emit(out, args.json, doc, f"wrote {destination} ({len(reversed_.document['steps'])} steps, reverse of {recipe.name})")
    return EXIT_OK


def _cmd_batch(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from ckptx.batch import default_report_path, render_batch, run_batch, write_report  # noqa: PLC0415

    def show(phase: str, done: int, total: int, failed: int) -> None:
        width = 24
        bar = "#" * (width * done // max(total, 1))
        err.write(f"\r  {phase:5} [{bar:<{width}}] {done}/{total} jobs" + (f", {failed} failed" if failed else "") + " ")
        err.write("\n" if done >= total else "")
        err.flush()

    show_progress = not args.json and hasattr(err, "isatty") and err.isatty()
    result = run_batch(args.jobs_file, workers=args.workers, dry_run=args.dry_run, resume=args.resume,
                       executor=args.executor, scheduler=args.scheduler, progress=show if show_progress else None)
    report = args.report or (None if args.dry_run else default_report_path(args.jobs_file))
    if report is not None:
        try:
            write_report(result, report)
        except OSError as exc:
            raise CkptxError(f"{report}: cannot write the report ({exc.strerror or exc}); give --report FILE") from None
    _emit(out, args.json, {**result.to_dict(), "report": str(report) if report else None}, render_batch(result, report))
    if result.interrupted:
        return EXIT_INTERRUPTED
    if any(r.error_type == "internal" for r in result.failed):
        return EXIT_BUG
    return EXIT_OK if result.ok else EXIT_INVALID


def _cmd_suggest(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from ckptx.suggest.cli import run  # noqa: PLC0415

    return run(args, out, err)


_COMMANDS: dict[str, Callable[[argparse.Namespace, TextIO, TextIO], int]] = {
    "convert": _cmd_convert, "inspect": _cmd_inspect, "diff": _cmd_diff, "lint": _cmd_lint, "rules": _cmd_rules,
    "batch": _cmd_batch, "invert": _cmd_invert, "suggest": _cmd_suggest,
}
