"""A file conversion: plan → validate → write. The recipe and the target are resolved, the source opened, the plan
made from metadata and validated against the target before a byte is written; then the output's writer (chosen by
`ckptx/io/write/formats.py`) stages, verifies when asked, and publishes."""

from __future__ import annotations

import os
import re
import shlex
import stat
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ckptx._version import __version__
from ckptx.check.inferred import choose_variant
from ckptx.check.validation import ValidationReport, validate
from ckptx.conversion.card_document import card_document, card_path, write_card
from ckptx.conversion.request import ConvertRequest, ConvertResult, Progress
from ckptx.errors import DestinationError, ValidationFailed, VerificationFailed
from ckptx.io.read.open import SourceSpec, open_source
from ckptx.io.spans import Progress as ByteProgress
from ckptx.io.write.atomic import stale_partials
from ckptx.io.write.destination import InputFiles, prepare_folder
from ckptx.io.write.formats import writer_for
from ckptx.io.write.hf_folder_writer import is_folder_destination
from ckptx.io.write.writer import OutputOptions, Parallel, Verify, Writer
from ckptx.planning.planner import Plan, plan_recipe
from ckptx.planning.source import Source
from ckptx.rules.loader import RecipeArg, as_recipe
from ckptx.rules.recipe import Recipe, TargetSpec
from ckptx.rules.steps import Step
from ckptx.targets.resolve import Target, parse_target_arg, resolve_target
from ckptx.workers.cores import share_cores
from ckptx.workers.executors import check_runner_options, open_runner, resolve_workers

__all__ = [
    "ConvertRequest",
    "ConvertResult",
    "cast_recipe",
    "convert",
    "provenance",
    "run",
    "stale_note",
    "target_spec_for",
]


def convert(
    src: str | Path,
    dst: str | Path | None,
    recipes: RecipeArg,
    *,
    target: TargetSpec | str | None = None,
    target_args: Mapping[str, Any] | None = None,
    params: Mapping[str, Any] | None = None,
    dry_run: bool = False,
    force: bool = False,
    allow_globals: Sequence[str] = (),
    unsafe_pickle: bool = False,
    verify: bool = False,
    progress: Progress | None = None,
    metadata: Mapping[str, str] | None = None,
    max_shard_size: int | None = None,
    reverse: bool = False,
    audit: str | Path | None = None,
    dtype: str | None = None,
    workers: int | str = 1,
    executor: str = "local",
    scheduler: str | None = None,
) -> ConvertResult:
    """Convert `src` to `dst` with the recipes; validate against the target before writing a byte.

    Raises ValidationFailed (nothing written) when the plan does not fit the target, and the other
    CkptxError subclasses for bad input. With `dry_run`, plans and validates but writes nothing.
    `metadata` adds string entries to a safetensors output's header (after ckptx's own provenance).
    `max_shard_size` (bytes) writes HuggingFace-style shards and an index (see io/write/sharded_writer.py for
    the names); a DST ending in `.safetensors.index.json` is sharded even without it; `DIR/` writes a model folder.
    With `verify`, the written output is loaded into the target model and compared with the source model before it
    is published. `DST.gguf` writes llama.cpp's GGUF with the model metadata from the config.json beside `src`;
    `dtype` (float32, float16, bfloat16, q8_0) is then its file type, each tensor's ggml type chosen from it as
    llama.cpp's converter chooses (without it, each tensor keeps its dtype). With `reverse`, converts the
    other way with the recipes' reverse (see ckptx.conversion.reverse);
    `target` is then the recipes' source layout, traced when a step's inverse needs shapes.
    With `audit` (a path, or "" for the default place: `DIR/ckptx-card.json` in a model folder, else
    `DST.card.json`), a provenance card is written once the output is published (see ckptx/conversion/card_document.py).
    A model folder (`config.json`, Meta's `params.json`) is a source like a file; with `dst` a folder and no target
    given, the target is the model the source's config describes, and that config is carried into the output
    folder with the folder's other files. `dtype` casts every floating-point tensor (after the recipes); `q8_0` is a
    GGUF type only.
    `workers` (a number, or `auto` for the cores) splits the writing into work units run by that many worker
    processes (`executor="local"`) or on a Dask cluster (`executor="dask"`: the scheduler at `scheduler`, whose
    workers see the same paths, or a LocalCluster of `workers` processes); the output, and its card, are byte for
    byte what one process writes. A unit that fails raises WorkerFailed naming the unit and its worker; nothing is
    published.
    """
    request = ConvertRequest(
        Path(src), dst, recipes, target=target, target_args=dict(target_args or {}), params=dict(params or {}),
        dry_run=dry_run, force=force, allow_globals=tuple(allow_globals), unsafe_pickle=unsafe_pickle, verify=verify,
        progress=progress, metadata=dict(metadata or {}), max_shard_size=max_shard_size, reverse=reverse,
        audit=audit, dtype=dtype, workers=workers, executor=executor, scheduler=scheduler,
    )  # fmt: skip
    return run(request)


def run(request: ConvertRequest) -> ConvertResult:
    """Carry out a conversion request: plan → validate → write."""
    started = time.perf_counter()
    check_runner_options(request.executor, resolve_workers(request.workers), request.scheduler)
    recipe = _recipe(request)
    with open_source(
        request.src, recipe.extract, allow_globals=request.allow_globals, unsafe_pickle=request.unsafe_pickle
    ) as source:
        planned = plan_and_validate(recipe, source, request)
        result = ConvertResult(planned.plan, planned.report, None, None, notes=list(planned.notes))
        result.inferred = dict(planned.inferred)
        report = planned.report
        if request.dst is not None:  # checked in a dry run too, exactly as for a real one
            writer = _writer(request, planned)
            result.destination, result.format = str(writer.primary), writer.format
            # what the source IS (every file of a folder, every shard of an index), listed once it opened as one
            inputs = InputFiles.of([request.src])
            result.notes += writer.check(inputs)
            result.notes += _stale(writer)
            card = _card_destination(request, writer, inputs)
            if request.dry_run:
                result.seconds = time.perf_counter() - started
                return result
            if report is not None and not report.ok:
                raise ValidationFailed(report, conversion=_finished(result, started))
            result.notes += _dropped(writer, source, planned.plan)
            verify = _verifier(result, planned.recipe, planned.spec, request, started) if request.verify else None
            with _parallel(request, recipe) as parallel:
                progress = _byte_progress(request.progress, planned.plan)
                result.bytes_written = writer.write(source, progress, verify, parallel=parallel, card=card is not None)
            if card is not None:
                document = card_document(
                    planned.plan, writer.records, destination=str(request.dst), fmt=writer.format, src=request.src
                )
                prepare_folder(card)
                write_card(card, document)
                result.card = str(card)
            result.units = [
                {
                    "unit": r.index + 1,
                    "worker": r.worker,
                    "bytes": r.nbytes,
                    "seconds": round(r.seconds, 4),
                    "worker_peak_rss": r.peak_rss,
                }
                for r in writer.results
            ]
        elif report is not None and not report.ok and not request.dry_run:
            raise ValidationFailed(report, conversion=_finished(result, started))
    return _finished(result, started)


def _finished(result: ConvertResult, started: float) -> ConvertResult:
    """`result` with the time it took so far."""
    result.seconds = time.perf_counter() - started
    return result


@dataclass(frozen=True)
class Planned:
    """A recipe planned on a source and validated against its target (`report` None: no target was given)."""

    recipe: Recipe
    spec: TargetSpec | None
    plan: Plan
    report: ValidationReport | None
    inferred: Mapping[str, Any]
    notes: tuple[str, ...] = ()


def plan_and_validate(recipe: Recipe, source: Source, request: ConvertRequest) -> Planned:
    """The plan of `recipe` on `source` and its validation against the target: the recipe's own (or the request's
    `--target`); inferred parameters are chosen here, the one choice whose target validates."""
    if recipe.inferred:
        chosen = choose_variant(recipe, source, _target_of(request, source))
        spec = _spec_for(chosen.recipe, request, source)
        return Planned(chosen.recipe, spec, chosen.plan, chosen.report, dict(chosen.values), (chosen.note,))
    spec = _spec_for(recipe, request, source)
    resolved = resolve_target(spec) if spec is not None else None
    configs = [(f"the config of {resolved.description}", resolved.config)] if resolved and resolved.config else []
    plan = plan_recipe(recipe, source, target=resolved.tensors if resolved else None, configs=configs)
    if resolved is None and _is_gguf(request.dst):  # what llama.cpp loads for the config the metadata comes from
        from ckptx.integrations.gguf_metadata import llama_cpp_target  # only for GGUF outputs

        resolved = llama_cpp_target(request.src, plan.entries)
    return Planned(recipe, spec, plan, validate(plan, resolved) if resolved else None, {})


def _spec_for(recipe: Recipe, request: ConvertRequest, source: Source) -> TargetSpec | None:
    """The target of a conversion: the recipe's or `--target`; with a model folder as output and none given, the
    model the source's own config describes. A model folder is validated in the layout `save_pretrained` writes."""
    spec = target_spec_for(recipe, request.target, request.target_args)
    folder = request.dst is not None and _is_folder(request.dst)
    if spec is None and folder and source.format == "gguf":  # the config its metadata describes
        spec = TargetSpec(config=str(request.src), kwargs=dict(request.target_args), where="the GGUF metadata")
    elif spec is None and folder and source.configs:
        where = request.src if request.src.is_dir() else request.src.parent
        spec = TargetSpec(config=str(where), kwargs=dict(request.target_args), where="the source's config")
    if spec is not None and folder:
        spec = replace(spec, saved_layout=True)
    return spec


def _is_folder(dst: str | Path) -> bool:
    from ckptx.io.write.hf_folder_writer import is_folder_destination

    return is_folder_destination(dst)


def target_spec_for(
    recipe: Recipe, target: TargetSpec | str | None, target_args: Mapping[str, Any] | None
) -> TargetSpec | None:
    """The recipe's target, overridden by an explicit one; `target_args` add to the model's kwargs."""
    explicit = parse_target_arg(target) if isinstance(target, str) else target
    spec = recipe.target.merged(explicit) if recipe.target else explicit
    if spec is not None and target_args:
        spec = spec.merged(TargetSpec(kwargs=dict(target_args), where="--target-arg"))
    return spec


def provenance(plan: Plan, source: Source) -> dict[str, str]:
    """Safetensors metadata recording how the file was made."""
    recipe = plan.recipe
    return {
        "format": "pt",
        "ckptx.version": __version__,
        "ckptx.recipe": recipe.name,
        "ckptx.rules": ";".join(f"{f.name}={f.sha256}" for f in recipe.files),
        "ckptx.source": Path(source.path).name,
    }


def stale_note(dst: Path) -> str | None:
    """A note naming the temporary files a killed ckptx left beside `dst` (never one a running ckptx writes), with
    the command that removes them; None when there are none."""
    stale = stale_partials(dst) if dst.parent.is_dir() else []
    if not stale:
        return None
    size = sum(_bytes_under(p) for p in stale)
    names = " ".join(shlex.quote(str(p)) for p in stale)
    return (
        f"{len(stale)} temporary file(s) left by an interrupted ckptx run beside {dst} ({size:,} bytes); "
        f"nothing is writing them: remove them with `rm -rf {names}`"
    )


def _bytes_under(path: Path) -> int:
    """Bytes of the file `path`, or of every file under the folder `path` (a staging folder of shards); links
    are not followed, and a file removed meanwhile (another run cleaning up) counts 0."""
    if path.is_dir() and not path.is_symlink():
        files = [os.path.join(root, name) for root, _dirs, names in os.walk(path) for name in names]
    else:
        files = [str(path)]
    total = 0
    for file in files:
        try:
            found = os.lstat(file)
        except OSError:
            continue
        total += found.st_size if stat.S_ISREG(found.st_mode) else 0
    return total


def _recipe(request: ConvertRequest) -> Recipe:
    recipe = as_recipe(request.recipes, request.params)
    if request.reverse:
        from ckptx.conversion.reverse import reverse_recipe  # here, not at the top: start-up (see io/read/open.py)
        from ckptx.io.read.model_folder import config_documents

        original = target_spec_for(Recipe(name=""), request.target, request.target_args)
        configs = [(f"{name} of {request.src}", doc) for name, doc in config_documents(request.src).items()]
        recipe = reverse_recipe(recipe, original=original, configs=configs).recipe
    if request.dtype is not None and not _is_gguf(request.dst):  # a GGUF output's --dtype is its file type
        cast = cast_recipe(request.dtype)
        recipe = recipe.then(cast) if recipe.steps or recipe.files or recipe.target else cast
    return recipe


CAST_DTYPES = ("bfloat16", "float16", "float32", "float64")
GGUF_ONLY_DTYPES = ("q8_0",)  # ggml block types: a GGUF output's file type, never a tensor's dtype elsewhere


def _is_gguf(dst: str | Path | None) -> bool:
    return dst is not None and str(dst).lower().endswith(".gguf")


def cast_recipe(dtype: str) -> Recipe:
    """`--dtype`: one cast step of every floating-point tensor, planned and inverted like any step."""
    from ckptx.errors import UsageError
    from ckptx.ops.cast import Cast

    if dtype in GGUF_ONLY_DTYPES:
        raise UsageError(
            f"--dtype {dtype}: {dtype.upper()} is a block-quantized GGUF type, which only a .gguf output holds; "
            f"write -o MODEL.gguf, or cast with --dtype bfloat16|float16|float32"
        )
    if dtype not in CAST_DTYPES:
        raise UsageError(f"--dtype {dtype}: give one of {', '.join(CAST_DTYPES)}")
    step = Step("cast", Cast(re.compile(".*"), dtype), where=f"--dtype {dtype}")
    return Recipe(name=f"--dtype {dtype}", steps=(step,))


def _target_of(request: ConvertRequest, source: Source) -> Any:
    """For choosing inferred parameters: each candidate's target (the request's `--target` resolved once)."""
    resolved: dict[str, Target] = {}

    def target_of(candidate: Recipe) -> Target | None:
        spec = _spec_for(candidate, request, source)
        if spec is None:
            return None
        key = repr(spec)  # an explicit --target is the same for every choice: resolve it once
        if key not in resolved:
            resolved[key] = resolve_target(spec)
        return resolved[key]

    return target_of


def _writer(request: ConvertRequest, planned: Planned) -> Writer:
    """The output's writer, with what its format needs from the conversion (provenance, a torch state dict's
    `_metadata`, a model folder's config)."""
    assert request.dst is not None
    plan, source = planned.plan, planned.plan.source
    documents: Mapping[str, bytes] = {}
    copies: Mapping[str, Path] = {}
    if is_folder_destination(request.dst):
        from ckptx.integrations.hf_config import folder_contents  # transformers, only for model folders

        contents = folder_contents(planned.spec, plan.entries, str(request.dst))
        documents, copies = contents.documents, contents.copies
    state_metadata = source.state_metadata if not plan.renames_keys else None
    gguf_metadata: list[tuple[str, int, Any]] = []
    if str(request.dst).lower().endswith(".gguf"):
        from ckptx.integrations.gguf_metadata import gguf_metadata_for  # only for GGUF outputs

        gguf_metadata = gguf_metadata_for(request.src, plan.entries)
    options = OutputOptions(
        force=request.force,
        max_shard_size=request.max_shard_size,
        metadata={**provenance(plan, source), **request.metadata},
        documents=documents,
        copies=copies,
        state_metadata=state_metadata,
        gguf_metadata=gguf_metadata,
        tensor_type=request.dtype if _is_gguf(request.dst) else None,
    )
    return writer_for(request.dst, plan.entries, options)


def _card_destination(request: ConvertRequest, writer: Writer, inputs: InputFiles) -> Path | None:
    """Where the card goes (None: no card asked for), checked as every output path is: never an input, never one
    of the output's own files, an existing file only with `force`."""
    if request.audit is None or request.dst is None:
        return None
    path = card_path(request.dst, request.audit)
    if path.resolve() in {p.resolve() for p in writer.files()}:
        raise DestinationError(f"{path}: the card would replace a file of the output; give another --audit path")
    inputs.check(path, force=request.force, what="the card")
    return path


@contextmanager
def _parallel(request: ConvertRequest, recipe: Recipe) -> Iterator[Parallel | None]:
    """The workers the request asks for, for the time of the write: None for one local process (the write runs
    here), else a runner whose worker processes (or Dask workers) open the source again as this process did."""
    workers = resolve_workers(request.workers)
    if request.executor == "local" and workers == 1:
        yield None
        return
    spec = SourceSpec.of(request.src, recipe.extract, request.allow_globals, request.unsafe_pickle)
    preload = ("ckptx.io.write.units", "numpy")  # what every worker needs, imported once in the fork server
    with open_runner(request.executor, workers, request.scheduler, preload, share_cores) as runner:
        yield Parallel(runner, runner.capacity or workers, spec)


def _stale(writer: Writer) -> list[str]:
    note = stale_note(writer.staging_anchor)
    return [note] if note else []


def _dropped(writer: Writer, source: Source, plan: Plan) -> list[str]:
    """Notes on what of the source the output does not carry."""
    notes = []
    note = writer.non_tensor_note(source)
    if note:
        notes.append(note)
    if writer.format == "torch" and source.state_metadata is not None and plan.renames_keys:
        notes.append("the state dict's _metadata (module versions) was dropped because the recipe renames modules")
    return notes


def _byte_progress(progress: Progress | None, plan: Plan) -> ByteProgress | None:
    """The writers' `advance(nbytes)` turned into the caller's `progress(done, total)`."""
    if progress is None:
        return None
    total = sum(e.meta.nbytes for e in plan.entries)
    done = 0

    def advance(nbytes: int) -> None:
        nonlocal done
        done += nbytes
        progress(done, total)

    return advance


def _verifier(
    result: ConvertResult, recipe: Recipe, spec: TargetSpec | None, request: ConvertRequest, started: float
) -> Verify:
    """Verification of the staged output: the target model loaded with it computes what the source model computes,
    or VerificationFailed and nothing is published."""

    def verify(staged: Path) -> None:
        from ckptx.check.numerical import verify_conversion  # here, not at the top: start-up (see io/read/open.py)

        result.verification = verify_conversion(
            recipe, spec, request.src, staged, allow_globals=request.allow_globals, unsafe_pickle=request.unsafe_pickle
        )
        if not result.verification.ok:
            raise VerificationFailed(result.verification, conversion=_finished(result, started))

    return verify
