"""Orchestration: load rules, open the source, plan, validate against the target, then write atomically."""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptx._lazy import lazy_module
from ckptx._version import __version__
from ckptx.check.inferred import Chosen, choose_variant
from ckptx.check.validation import ValidationReport, validate
from ckptx.errors import DestinationError, ValidationFailed, VerificationFailed
from ckptx.integrations.hf_folder import FOLDER_FORMAT, is_folder_destination, model_folder, write_model_folder
from ckptx.io.read.open import open_source
from ckptx.io.write.atomic import stale_partials
from ckptx.io.write.destination import InputFiles, prepare_folder
from ckptx.io.write.safetensors_writer import write_safetensors
from ckptx.io.write.sharded_writer import (
    INDEX_SUFFIX,
    ShardLayout,
    check_layout,
    is_index_name,
    shard_layout,
    write_sharded,
)
from ckptx.planning.planner import Plan, plan_recipe
from ckptx.planning.source import Source
from ckptx.rules.loader import RecipeArg, as_recipe
from ckptx.rules.recipe import Recipe, TargetSpec
from ckptx.targets.resolve import Target, parse_target_arg, resolve_target

if TYPE_CHECKING:  # pragma: no cover
    import torch
else:
    torch = lazy_module("torch")


OUTPUT_FORMATS = {".safetensors": "safetensors", ".pth": "torch", ".pt": "torch", ".bin": "torch", ".ckpt": "torch"}
SHARDED = "safetensors-sharded"


@dataclass
class ConvertResult:
    """What a conversion did: the plan, the validation report, and what was written."""

    plan: Plan
    report: ValidationReport | None
    destination: str | None
    format: str | None
    bytes_written: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    verification: Any = None
    inferred: dict[str, Any] = field(default_factory=dict)  # parameters chosen from the source (rules/variants.py)

    @property
    def written(self) -> bool:
        """True when a file was written."""
        return self.bytes_written > 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "ok": self.report is None or self.report.ok,
            "destination": self.destination,
            "format": self.format,
            "written": self.written,
            "bytes_written": self.bytes_written,
            "seconds": round(self.seconds, 4),
            "notes": self.notes,
            "plan": self.plan.to_dict(),
            "validation": self.report.to_dict() if self.report else None,
            "verification": self.verification.to_dict() if self.verification is not None else None,
            "inferred": self.inferred,
        }


def target_spec_for(
    recipe: Recipe, target: TargetSpec | str | None, target_args: Mapping[str, Any] | None
) -> TargetSpec | None:
    """The recipe's target, overridden by an explicit one; `target_args` add to the model's kwargs."""
    explicit = parse_target_arg(target) if isinstance(target, str) else target
    spec = recipe.target.merged(explicit) if recipe.target else explicit
    if spec is not None and target_args:
        spec = spec.merged(TargetSpec(kwargs=dict(target_args), where="--target-arg"))
    return spec


def check_destination(inputs: InputFiles, dst: Path, *, force: bool, sharded: bool = False) -> str:
    """Refuse unsafe destinations (ckptx/destination.py); returns the output format chosen from the extension
    (and `sharded`). A missing folder is fine: it is created when the file is written."""
    fmt = SHARDED if is_index_name(dst) else OUTPUT_FORMATS.get(dst.suffix.lower())
    if fmt is None:
        known = ", ".join([*OUTPUT_FORMATS, INDEX_SUFFIX])
        raise DestinationError(f"{dst}: unknown output extension '{dst.suffix}'; use one of {known}")
    if sharded and fmt not in ("safetensors", SHARDED) or fmt == SHARDED and not dst.name.endswith(INDEX_SUFFIX):
        raise DestinationError(
            f"{dst}: sharded output is safetensors only; name DST NAME.safetensors or NAME{INDEX_SUFFIX}"
        )
    fmt = SHARDED if sharded else fmt
    inputs.check(dst, force=force)
    return fmt


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
    progress: Callable[[int, int], None] | None = None,
    metadata: Mapping[str, str] | None = None,
    max_shard_size: int | None = None,
    reverse: bool = False,
) -> ConvertResult:
    """Convert `src` to `dst` with the recipes; validate against the target before writing a byte.

    Raises ValidationFailed (nothing written) when the plan does not fit the target, and the other
    CkptxError subclasses for bad input. With `dry_run`, plans and validates but writes nothing.
    `metadata` adds string entries to a safetensors output's header (after ckptx's own provenance).
    `max_shard_size` (bytes) writes HuggingFace-style shards and an index (see io/sharded_writer.py for
    the names); a DST ending in `.safetensors.index.json` is sharded even without it.
    With `reverse`, converts the other way with the recipes' reverse (see ckptx.conversion.reverse); `target`
    is then the recipes' source layout, traced when a step's inverse needs shapes.
    """
    started = time.perf_counter()
    recipe = as_recipe(recipes, params)
    if reverse:
        from ckptx.conversion.reverse import reverse_recipe  # here, not at the top: start-up (see io/open.py)

        recipe = reverse_recipe(recipe, original=target_spec_for(Recipe(name=""), target, target_args)).recipe
    src_path = Path(src)
    dst_path = Path(dst) if dst is not None else None
    sharded = max_shard_size is not None
    fmt = None
    inputs = InputFiles.of([src_path])
    if dst is not None:  # checked in a dry run too, exactly as for a real one; DIR/: a HuggingFace model folder
        fmt = (
            FOLDER_FORMAT
            if is_folder_destination(dst)
            else check_destination(inputs, Path(dst), force=force, sharded=sharded)
        )
    spec = target_spec_for(recipe, target, target_args) if not recipe.inferred else None
    resolved = resolve_target(spec) if spec is not None else None
    stale = stale_note(dst_path) if dst_path is not None and not dry_run else None
    with open_source(src_path, recipe.extract, allow_globals=allow_globals, unsafe_pickle=unsafe_pickle) as source:
        chosen = choose_for_target(recipe, source, target, target_args) if recipe.inferred else None
        if chosen is not None:
            recipe, spec, resolved = chosen.recipe, target_spec_for(chosen.recipe, target, target_args), chosen.target
        plan = plan_recipe(recipe, source, target=resolved.tensors if resolved else None)
        report = validate(plan, resolved) if resolved else None
        result = ConvertResult(plan, report, str(dst_path) if dst_path else None, fmt, notes=[stale] if stale else [])
        if chosen is not None:
            result.inferred = dict(chosen.values)
            result.notes.append(chosen.note)
        if report is not None and not report.ok and not dry_run:
            raise ValidationFailed(report)
        if dry_run or dst_path is None:
            result.seconds = time.perf_counter() - started
            return result
        if fmt == FOLDER_FORMAT:
            check = partial(_verify, result, recipe, spec, src_path, allow_globals, unsafe_pickle) if verify else None
            folder, notes = model_folder(
                dst_path, plan.entries, spec, max_shard_size=max_shard_size, force=force, inputs=inputs
            )
            result.notes += notes + (
                [f"non-tensor entries dropped: {', '.join(sorted(source.non_tensors))}"] if source.non_tensors else []
            )
            result.bytes_written = write_model_folder(
                folder, source, {**provenance(plan, source), **(metadata or {})}, progress, check
            )
        elif fmt == SHARDED:
            check = partial(_verify, result, recipe, spec, src_path, allow_globals, unsafe_pickle) if verify else None
            layout = shard_layout(dst_path, plan.entries, max_shard_size)
            result.notes += check_layout(layout, force=force, inputs=inputs)
            prepare_folder(dst_path)
            result.destination = str(layout.index or dst_path)
            result.bytes_written = _write(plan, source, layout, fmt, result.notes, progress, metadata, check)
        else:
            prepare_folder(dst_path)
            write_path = _verify_path(dst_path) if verify else dst_path
            result.bytes_written = _write(
                plan, source, write_path, fmt or "safetensors", result.notes, progress, metadata
            )
    if verify and fmt not in (SHARDED, FOLDER_FORMAT):
        _verify_then_publish(result, recipe, spec, src_path, write_path, dst_path, allow_globals, unsafe_pickle)
    result.seconds = time.perf_counter() - started
    return result


def choose_for_target(
    recipe: Recipe, source: Source, target: TargetSpec | str | None, target_args: Mapping[str, Any] | None
) -> Chosen:
    """Choose `recipe`'s inferred parameters: the one choice whose own target (or `target`) validates."""
    resolved: dict[str, Target] = {}

    def target_of(candidate: Recipe) -> Target | None:
        spec = target_spec_for(candidate, target, target_args)
        if spec is None:
            return None
        key = repr(spec)  # an explicit --target is the same for every choice: resolve it once
        if key not in resolved:
            resolved[key] = resolve_target(spec)
        return resolved[key]

    return choose_variant(recipe, source, target_of)


def stale_note(dst: Path) -> str | None:
    """A note naming the temporary files a killed ckptx left beside `dst` (never one a running ckptx writes), with
    the command that removes them; None when there are none."""
    stale = stale_partials(dst) if dst.parent.is_dir() else []
    if not stale:
        return None
    size = sum(p.stat().st_size for p in stale if p.is_file())
    names = " ".join(shlex.quote(str(p)) for p in stale)
    return (
        f"{len(stale)} temporary file(s) left by an interrupted ckptx run beside {dst} ({size:,} bytes); "
        f"nothing is writing them: remove them with `rm -rf {names}`"
    )


def _verify_path(dst: Path) -> Path:
    """A hidden sibling of `dst` where the output waits until it is verified."""
    return dst.with_name(f".{dst.stem}.ckptx-unverified{dst.suffix}")


def _verify_then_publish(
    result: ConvertResult,
    recipe: Recipe,
    spec: TargetSpec | None,
    src: Path,
    written: Path,
    dst: Path,
    allow_globals: Sequence[str],
    unsafe_pickle: bool,
) -> None:
    """Verify the written file; rename it to `dst` only if it computes what the source computes."""
    try:
        _verify(result, recipe, spec, src, allow_globals, unsafe_pickle, written)
        written.replace(dst)
    finally:
        written.unlink(missing_ok=True)


def _verify(
    result: ConvertResult,
    recipe: Recipe,
    spec: TargetSpec | None,
    src: Path,
    allow_globals: Sequence[str],
    unsafe_pickle: bool,
    written: Path,
) -> None:
    """Record the verification of `written` in `result`; raise VerificationFailed when it does not compute the same."""
    from ckptx.check.numerical import verify_conversion  # here, not at the top: start-up (see io/open.py)

    result.verification = verify_conversion(
        recipe, spec, src, written, allow_globals=allow_globals, unsafe_pickle=unsafe_pickle
    )
    if not result.verification.ok:
        raise VerificationFailed(result.verification)


def _write(
    plan: Plan,
    source: Source,
    dst: Path | ShardLayout,
    fmt: str,
    notes: list[str],
    progress: Callable[[int, int], None] | None,
    metadata: Mapping[str, str] | None = None,
    check: Callable[[Path], None] | None = None,
) -> int:
    total = sum(e.meta.nbytes for e in plan.entries)
    done = [0]

    def advance(nbytes: int) -> None:
        done[0] += nbytes
        if progress:
            progress(done[0], total)

    if source.non_tensors:
        names = ", ".join(sorted(source.non_tensors))
        verb = "dropped (safetensors holds tensors only)" if fmt != "torch" else "not carried over"
        notes.append(f"non-tensor entries {verb}: {names}")
    if isinstance(dst, ShardLayout):
        return write_sharded(dst, source, {**provenance(plan, source), **(metadata or {})}, advance, check)
    if fmt == "safetensors":
        return write_safetensors(dst, plan.entries, source, {**provenance(plan, source), **(metadata or {})}, advance)
    state_metadata = source.state_metadata
    if state_metadata is not None and plan.renames_keys:
        notes.append("the state dict's _metadata (module versions) was dropped because the recipe renames modules")
        state_metadata = None
    from ckptx.io.write.torch_writer import write_torch  # here, not at the top: start-up (see io/open.py)

    return write_torch(dst, plan.entries, source, state_metadata=state_metadata, progress=advance)


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
