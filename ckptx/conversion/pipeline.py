"""A file conversion: plan → validate → write. The recipe and the target are resolved, the source opened, the plan
made from metadata and validated against the target before a byte is written; then the output's writer (chosen by
`ckptx/io/write/formats.py`) stages, verifies when asked, and publishes."""

from __future__ import annotations

import shlex
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptx._version import __version__
from ckptx.check.inferred import choose_variant
from ckptx.check.validation import ValidationReport, validate
from ckptx.conversion.card import card_document, card_path, write_card
from ckptx.conversion.request import ConvertRequest, ConvertResult, Progress
from ckptx.errors import DestinationError, ValidationFailed, VerificationFailed
from ckptx.io.card import CardObserver
from ckptx.io.read.open import open_source
from ckptx.io.spans import Progress as ByteProgress
from ckptx.io.write.atomic import stale_partials
from ckptx.io.write.destination import InputFiles, prepare_folder
from ckptx.io.write.formats import writer_for
from ckptx.io.write.hf_folder_writer import is_folder_destination
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
    gguf_type: str | None = None,
    audit: str | Path | None = None,
) -> ConvertResult:
    """Convert `src` to `dst` with the recipes; validate against the target before writing a byte.

    Raises ValidationFailed (nothing written) when the plan does not fit the target, and the other
    CkptxError subclasses for bad input. With `dry_run`, plans and validates but writes nothing.
    `metadata` adds string entries to a safetensors output's header (after ckptx's own provenance).
    `max_shard_size` (bytes) writes HuggingFace-style shards and an index (see io/write/sharded_writer.py for
    the names); a DST ending in `.safetensors.index.json` is sharded even without it; `DIR/` writes a model folder.
    With `verify`, the written output is loaded into the target model and compared with the source model before it
    is published. `DST.gguf` writes llama.cpp's GGUF with the tensors as `gguf_type` (float32, float16, bfloat16,
    q8_0; default auto) and the model metadata from the config.json beside `src`. With `reverse`, converts the
    other way with the recipes' reverse (see ckptx.conversion.reverse);
    `target` is then the recipes' source layout, traced when a step's inverse needs shapes.
    With `audit` (a path, or "" for the default place: `DIR/ckptx-card.json` in a model folder, else
    `DST.card.json`), a provenance card is written once the output is published (see ckptx/conversion/card.py).
    """
    request = ConvertRequest(
        Path(src), dst, recipes, target=target, target_args=dict(target_args or {}), params=dict(params or {}),
        dry_run=dry_run, force=force, allow_globals=tuple(allow_globals), unsafe_pickle=unsafe_pickle, verify=verify,
        progress=progress, metadata=dict(metadata or {}), max_shard_size=max_shard_size, reverse=reverse,
        gguf_type=gguf_type, audit=audit,
    )  # fmt: skip
    return run(request)


def run(request: ConvertRequest) -> ConvertResult:
    """Carry out a conversion request: plan → validate → write."""
    started = time.perf_counter()
    recipe = _recipe(request)
    inputs = InputFiles.of([request.src])
    with open_source(
        request.src, recipe.extract, allow_globals=request.allow_globals, unsafe_pickle=request.unsafe_pickle
    ) as source:
        planned = plan_and_validate(recipe, source, request)
        result = ConvertResult(planned.plan, planned.report, None, None, notes=list(planned.notes))
        result.inferred = dict(planned.inferred)
        if request.dst is not None:  # checked in a dry run too, exactly as for a real one
            writer = _writer(request, planned)
            result.destination, result.format = str(writer.primary), writer.format
            result.notes += writer.check(inputs)
            card = _card_destination(request, writer, inputs)
            if request.dry_run:
                result.seconds = time.perf_counter() - started
                return result
            if planned.report is not None and not planned.report.ok:
                raise ValidationFailed(planned.report)
            result.notes += _stale(writer) + _dropped(writer, source, planned.plan)
            verify = _verifier(result, planned.recipe, planned.spec, request) if request.verify else None
            progress = _byte_progress(request.progress, planned.plan)
            if card is None:
                result.bytes_written = writer.write(source, progress, verify)
            else:
                with CardObserver(source) as observer:
                    result.bytes_written = writer.write(source, progress, verify, observer)
                    records = observer.records()
                document = card_document(
                    planned.plan, records, destination=str(request.dst), fmt=writer.format, src=request.src
                )
                prepare_folder(card)
                write_card(card, document)
                result.card = str(card)
        elif planned.report is not None and not planned.report.ok and not request.dry_run:
            raise ValidationFailed(planned.report)
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
    size = sum(f.stat().st_size for p in stale for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file())
    names = " ".join(shlex.quote(str(p)) for p in stale)
    return (
        f"{len(stale)} temporary file(s) left by an interrupted ckptx run beside {dst} ({size:,} bytes); "
        f"nothing is writing them: remove them with `rm -rf {names}`"
    )


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
    documents: Mapping[str, bytes] = {}
    if is_folder_destination(request.dst):
        from ckptx.integrations.hf_config import folder_documents  # transformers, only for model folders

        documents = folder_documents(planned.spec, plan.entries, str(request.dst))
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
        state_metadata=state_metadata,
        gguf_metadata=gguf_metadata,
        tensor_type=request.gguf_type,
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


def _verifier(result: ConvertResult, recipe: Recipe, spec: TargetSpec | None, request: ConvertRequest) -> Verify:
    """Verification of the staged output: the target model loaded with it computes what the source model computes,
    or VerificationFailed and nothing is published."""

    def verify(staged: Path) -> None:
        from ckptx.check.numerical import verify_conversion  # here, not at the top: start-up (see io/read/open.py)

        result.verification = verify_conversion(
            recipe, spec, request.src, staged, allow_globals=request.allow_globals, unsafe_pickle=request.unsafe_pickle
        )
        if not result.verification.ok:
            raise VerificationFailed(result.verification)

    return verify
