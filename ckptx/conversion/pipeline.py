"""A file conversion: plan → validate → write. The recipe and the target are resolved, the source opened, the plan
made from metadata and validated against the target before a byte is written; then the output's writer (chosen by
`ckptx/io/write/formats.py`) stages, verifies when asked, and publishes."""

from __future__ import annotations

import os
import shlex
import stat
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptx._version import __version__
from ckptx.check.inferred import choose_variant
from ckptx.check.validation import ValidationReport, validate
from ckptx.conversion.request import ConvertRequest, ConvertResult, Progress
from ckptx.errors import ValidationFailed, VerificationFailed
from ckptx.io.read.open import open_source
from ckptx.io.spans import Progress as ByteProgress
from ckptx.io.write.atomic import stale_partials
from ckptx.io.write.destination import InputFiles
from ckptx.io.write.formats import writer_for
from ckptx.io.write.writer import OutputOptions, Verify, Writer
from ckptx.planning.planner import Plan, plan_recipe
from ckptx.planning.source import Source
from ckptx.rules.loader import RecipeArg, as_recipe
from ckptx.rules.recipe import Recipe, TargetSpec
from ckptx.targets.resolve import Target, parse_target_arg, resolve_target

__all__ = ["ConvertRequest", "ConvertResult", "convert", "provenance", "run", "stale_note", "target_spec_for"]


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
) -> ConvertResult:
    """Convert `src` to `dst` with the recipes; validate against the target before writing a byte.

    Raises ValidationFailed (nothing written) when the plan does not fit the target, and the other
    CkptxError subclasses for bad input. With `dry_run`, plans and validates but writes nothing.
    `metadata` adds string entries to a safetensors output's header (after ckptx's own provenance).
    `max_shard_size` (bytes) writes HuggingFace-style shards and an index (see io/write/sharded_writer.py for
    the names); a DST ending in `.safetensors.index.json` is sharded even without it; `DIR/` writes a model folder.
    With `verify`, the written output is loaded into the target model and compared with the source model before it
    is published. With `reverse`, converts the other way with the recipes' reverse (see ckptx.conversion.reverse);
    `target` is then the recipes' source layout, traced when a step's inverse needs shapes.
    """
    request = ConvertRequest(
        Path(src), dst, recipes, target, dict(target_args or {}), dict(params or {}), dry_run, force,
        tuple(allow_globals), unsafe_pickle, verify, progress, dict(metadata or {}), max_shard_size, reverse,
    )  # fmt: skip
    return run(request)


def run(request: ConvertRequest) -> ConvertResult:
    """Carry out a conversion request: plan → validate → write."""
    started = time.perf_counter()
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
            result.notes += writer.check(InputFiles.of([request.src]))
            result.notes += _stale(writer)
            if request.dry_run:
                result.seconds = time.perf_counter() - started
                return result
            if report is not None and not report.ok:
                raise ValidationFailed(report, conversion=_finished(result, started))
            result.notes += _dropped(writer, source, planned.plan)
            verify = _verifier(result, planned.recipe, planned.spec, request, started) if request.verify else None
            result.bytes_written = writer.write(source, _byte_progress(request.progress, planned.plan), verify)
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
        chosen = choose_variant(recipe, source, _target_of(request))
        spec = target_spec_for(chosen.recipe, request.target, request.target_args)
        return Planned(chosen.recipe, spec, chosen.plan, chosen.report, dict(chosen.values), (chosen.note,))
    spec = target_spec_for(recipe, request.target, request.target_args)
    resolved = resolve_target(spec) if spec is not None else None
    plan = plan_recipe(recipe, source, target=resolved.tensors if resolved else None)
    return Planned(recipe, spec, plan, validate(plan, resolved) if resolved else None, {})


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
    if not request.reverse:
        return recipe
    from ckptx.conversion.reverse import reverse_recipe  # here, not at the top: start-up (see io/read/open.py)

    original = target_spec_for(Recipe(name=""), request.target, request.target_args)
    return reverse_recipe(recipe, original=original).recipe


def _target_of(request: ConvertRequest) -> Any:
    """For choosing inferred parameters: each candidate's target (the request's `--target` resolved once)."""
    resolved: dict[str, Target] = {}

    def target_of(candidate: Recipe) -> Target | None:
        spec = target_spec_for(candidate, request.target, request.target_args)
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
    from ckptx.io.write.hf_folder_writer import is_folder_destination

    documents: Mapping[str, bytes] = {}
    if is_folder_destination(request.dst):
        from ckptx.integrations.hf_config import folder_documents  # transformers, only for model folders

        documents = folder_documents(planned.spec, plan.entries, str(request.dst))
    state_metadata = source.state_metadata if not plan.renames_keys else None
    options = OutputOptions(
        force=request.force,
        max_shard_size=request.max_shard_size,
        metadata={**provenance(plan, source), **request.metadata},
        documents=documents,
        state_metadata=state_metadata,
    )
    return writer_for(request.dst, plan.entries, options)


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
