"""`suggest`: infer a recipe from a source checkpoint's and a target's metadata, prove it by re-planning, validate
it."""

from __future__ import annotations

import os
import re
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ckptx._version import __version__
from ckptx.check.validation import ValidationReport, validate
from ckptx.errors import CkptxError, NotReproduced, PlanError
from ckptx.io.read.open import open_source
from ckptx.planning.expr import ops_of
from ckptx.planning.planner import plan_recipe
from ckptx.rules.flatten import dump
from ckptx.rules.loader import load_rules_text
from ckptx.rules.recipe import Recipe, TargetSpec
from ckptx.suggestion.align import align, expand, unmatched
from ckptx.suggestion.build import Decided, build_steps
from ckptx.suggestion.emit import render_recipe
from ckptx.suggestion.library import LibraryFit, library_fit
from ckptx.suggestion.match import Match
from ckptx.suggestion.module_kinds import infer_kinds, with_kinds
from ckptx.suggestion.numeric import decide_numerically
from ckptx.suggestion.rotary_layouts import rotary_matches
from ckptx.suggestion.shapes import Fit
from ckptx.suggestion.sources import (
    Candidate,
    Prefixes,
    choose_candidate,
    find_candidates,
    infer_prefixes,
    natural_order,
    read_manifest_fast,
)
from ckptx.suggestion.tree import build_level, hierarchical_order
from ckptx.suggestion.verify_with import convert_verified, source_model_facts, verify_section
from ckptx.targets.resolve import Target, parse_target_arg, resolve_target

__all__ = ["SuggestReport", "Suggestion", "suggest"]

_DIGITS = re.compile(r"\d+")

VERIFY_HELPER = "ckptx.suggestion.verify_with:prefixed_model"  # holds a source model under a wrapper prefix


@dataclass(frozen=True)
class SuggestReport:
    """What `suggest` inferred and how sure it is: counts by evidence, close calls, what stayed unmatched."""

    source: str
    source_format: str
    extracted_from: str
    extract_rivals: tuple[str, ...]
    target: str
    source_tensors: int
    target_tensors: int
    mapped: int
    evidence: Mapping[str, int]
    ops: Mapping[str, int]
    prefixes: Prefixes
    dropped: tuple[str, ...]
    kept_unexpected: tuple[str, ...]
    allowed_missing: tuple[str, ...]
    missing: tuple[str, ...]
    close_calls: tuple[str, ...]
    notes: tuple[str, ...]
    validation: ValidationReport
    undecided: tuple[str, ...] = ()  # rows no evidence decided (position alone): not a success
    library: str | None = None  # the library recipe proposed as it is (nothing inferred)
    verification: Any = None
    verification_error: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """True when the recipe validates against the target, every row was decided by evidence that excludes its
        rivals, and (if run) the outputs agree."""
        verified = self.verification is None or bool(getattr(self.verification, "ok", False))
        return self.validation.ok and not self.missing and not self.undecided and verified

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "ok": self.ok,
            "source": self.source,
            "source_format": self.source_format,
            "extracted_from": self.extracted_from,
            "extract_rivals": list(self.extract_rivals),
            "target": self.target,
            "source_tensors": self.source_tensors,
            "target_tensors": self.target_tensors,
            "mapped": self.mapped,
            "evidence": dict(self.evidence),
            "ops": dict(self.ops),
            "strip_prefix": self.prefixes.strip_text,
            "add_prefix": self.prefixes.add_text,
            "dropped": list(self.dropped),
            "kept_unexpected": list(self.kept_unexpected),
            "allowed_missing": list(self.allowed_missing),
            "missing": list(self.missing),
            "close_calls": list(self.close_calls),
            "undecided": list(self.undecided),
            "library": self.library,
            "notes": list(self.notes),
            "validation": self.validation.to_dict(),
            "verification": self.verification.to_dict() if self.verification is not None else None,
            "verification_error": self.verification_error,
            "seconds": round(self.seconds, 3),
        }


@dataclass(frozen=True)
class Suggestion:
    """A suggested recipe: the typed Recipe, its YAML text (what `-o` writes) and the report."""

    recipe: Recipe
    text: str
    report: SuggestReport
    decided: Mapping[str, Decided] = field(default_factory=dict, repr=False)


def suggest(
    src: str | Path,
    target: str | TargetSpec,
    *,
    target_args: Mapping[str, Any] | None = None,
    allow_missing: Sequence[str] = (),
    allow_unexpected: Sequence[str] = (),
    allow_globals: Sequence[str] = (),
    unsafe_pickle: bool = False,
    output: str | Path | None = None,
    verify_with: str | None = None,
    verify_args: Mapping[str, Any] | None = None,
    verify_input: Sequence[int] | None = None,
    verify_input_dtype: str | None = None,
    name: str | None = None,
    library: bool = True,
) -> Suggestion:
    """Infer a recipe converting `src` to `target` from metadata only, re-plan it, and validate it.

    `target` is a CLI target spec (`module:callable`, manifest, reference checkpoint) or a TargetSpec;
    `allow_missing` / `allow_unexpected` are regexes of target keys that may stay missing / source keys
    that may stay extra (they go to the recipe's `target:`). `output` is where the recipe will be written
    (relative target paths are made relative to it). With `verify_with` (`module:callable` building the
    source model), the recipe gets a `verify:` section and the conversion is run and its outputs compared; rows
    metadata left undecided are decided by those outputs. With `library` (the default), a shipped or installed
    recipe that validates as it is is proposed instead of an inferred one.
    Raises CkptxError (exit 2) for bad input; the result's `report.ok` says whether it validates and every row was
    decided.
    """
    started = time.perf_counter()
    options = _Options(
        str(src),
        _target_spec(target, target_args, allow_missing, allow_unexpected),
        tuple(allow_missing),
        tuple(allow_unexpected),
        tuple(allow_globals),
        unsafe_pickle,
        output,
        verify_with,
        dict(verify_args or {}),
        tuple(verify_input) if verify_input else None,
        verify_input_dtype,
        name,
        library,
    )
    resolved, ties = _resolve(options.spec)
    fmt, candidates, opened = find_candidates(options.src, allow_globals=allow_globals, unsafe_pickle=unsafe_pickle)
    chosen, rivals, _ = choose_candidate(candidates, resolved.tensors)
    if opened is None:
        opened = open_source(options.src, [chosen.path], allow_globals=allow_globals, unsafe_pickle=unsafe_pickle)
    with opened:
        return _suggest(options, fmt, opened, chosen, rivals, resolved, ties, started)


@dataclass(frozen=True)
class _Options:
    """The arguments of one `suggest` call, checked."""

    src: str
    spec: TargetSpec
    allow_missing: tuple[str, ...]
    allow_unexpected: tuple[str, ...]
    allow_globals: tuple[str, ...]
    unsafe_pickle: bool
    output: str | Path | None
    verify_with: str | None
    verify_args: Mapping[str, Any]
    verify_input: tuple[int, ...] | None
    verify_input_dtype: str | None
    name: str | None
    library: bool = True


def _suggest(
    options: _Options,
    fmt: str,
    opened: Any,
    chosen: Candidate,
    rivals: list[tuple[Candidate, float]],
    resolved: Target,
    ties: tuple[tuple[str, ...], ...],
    started: float,
) -> Suggestion:
    src, spec, output = options.src, options.spec, options.output
    extract = None if fmt in ("safetensors", "sharded-index", "manifest") else chosen.path
    if options.library and fmt != "manifest":
        found = library_fit(opened, resolved)
        if found is not None:
            return _from_library(options, fmt, opened, chosen, rivals, resolved, found, started)
    notes: list[str] = []
    source_tensors = dict(opened.tensors)
    target_tensors = resolved.tensors
    prefixes = infer_prefixes(list(source_tensors), list(target_tensors))
    cut, added = len(prefixes.strip_text), prefixes.add_text
    cut_text = prefixes.strip_text
    stripped = {k[cut:]: m for k, m in source_tensors.items()}
    kinds = infer_kinds(stripped)
    source_rotary = None
    if options.verify_with:  # the source model's own classes beat what names suggest
        model_kinds, source_rotary = source_model_facts(options.verify_with, options.verify_args)
        for key in stripped:
            known = model_kinds.get(key) or model_kinds.get(cut_text + key)
            if known:
                kinds[key] = known
    stripped = with_kinds(stripped, kinds)
    unprefixed = {k[len(added) :]: m for k, m in target_tensors.items()}
    unprefixed = with_kinds(unprefixed, {k[len(added) :]: v for k, v in resolved.kinds.items() if k.startswith(added)})
    src_order = natural_order(list(stripped), stripped)
    dst_order = natural_order(list(unprefixed), unprefixed)
    if src_order is not None:
        notes.append("source keys are sorted by name (as safetensors stores them): order evidence is weaker")
    if dst_order is not None:
        notes.append("target keys are sorted by name: order evidence is weaker")
    src_level = build_level([(k, stripped[k]) for k in hierarchical_order(src_order or list(stripped))])
    dst_level = build_level([(k, unprefixed[k]) for k in hierarchical_order(dst_order or list(unprefixed))])
    alignment = align(src_level, dst_level, ordered=src_order is None and dst_order is None)
    matches, rotated = rotary_matches(list(expand(alignment)), resolved.rotary_dim or source_rotary)
    if rotated:
        notes.append(rotated[0] + (f" (and {len(rotated) - 1} more)" if len(rotated) > 1 else ""))
    left_src, left_dst = unmatched(alignment)

    copies = _tied_copies(ties, matches, left_dst, added)
    if copies:
        copied = {t for _, t in copies}
        left_dst = [k for k in left_dst if added + k not in copied]
    allowed_unexpected = [re.compile(p) for p in options.allow_unexpected]
    kept = [k for k in left_src if any(p.search(prefixes.add_text + k) or p.search(k) for p in allowed_unexpected)]
    dropped = [k for k in left_src if k not in set(kept)]
    allowed_missing_patterns = [re.compile(p) for p in options.allow_missing]
    allowed_missing = [added + k for k in left_dst if any(p.search(added + k) for p in allowed_missing_patterns)]
    missing = [added + k for k in left_dst if added + k not in set(allowed_missing)]

    verify = None
    if options.verify_with:
        if not spec.model:
            raise CkptxError("--verify-with needs a model target (module:callable), not a checkpoint or manifest")
        verify = verify_section(
            options.verify_with,
            options.verify_args,
            options.verify_input,
            options.verify_input_dtype,
            prefix=prefixes.strip_text,
        )
    tally = _tally(matches, prefixes)
    notes += tally.noted
    recipe_name = options.name or _recipe_name(src, spec)

    def header_for(t: _Tally) -> list[str]:
        return _header(
            src,
            fmt,
            rivals,
            extract,
            resolved,
            spec,
            prefixes,
            t.evidence,
            t.ops,
            dropped,
            kept,
            allowed_missing,
            missing,
            len(source_tensors),
            verify is not None,
            t.undecided,
        )

    trailer = []
    if missing:
        trailer.append(
            f"{len(missing)} target key(s) no source tensor fits (pass --allow-missing REGEX if they "
            f"may stay as initialised):"
        )
        trailer += [f"  {k}: {target_tensors[k]}" for k in missing[:200]]
        if len(missing) > 200:
            trailer.append(f"  ... and {len(missing) - 200} more")
    base_dir = Path(output).resolve().parent if output else Path.cwd()

    def write(
        literal_rows: bool, matches: list[Match] = matches
    ) -> tuple[str, Recipe, ValidationReport, dict[str, Decided]]:
        steps, decided = build_steps(
            matches,
            dropped,
            kept,
            list(stripped),
            prefixes,
            target_tensors,
            by_target_order=src_order is not None and dst_order is None,
            literal_rows=literal_rows,
            copies=copies,
        )
        text = render_recipe(
            header=header_for(_tally(matches, prefixes)),
            name=recipe_name,
            description=f"{Path(src).name} -> {_describe(spec)} (suggested; review before use)",
            extract=extract,
            steps=steps,
            target=_target_section(spec, output),
            verify=verify,
            trailer=trailer,
        )
        recipe = load_rules_text(text, str(output or "<suggested>"), base_dir=base_dir)
        return text, recipe, _check(recipe, opened, resolved, decided, prefixes), decided

    try:
        text, recipe, report, decided = write(literal_rows=False)
    except NotReproduced as exc:  # should not happen; one exact row per key is always right
        notes.append(f"generalized rows did not reproduce the mapping ({exc}); wrote one exact row per key")
        text, recipe, report, decided = write(literal_rows=True)
    verification = error = None
    if verify is not None and report.ok and not missing:
        typed = [n for n in (options.spec.model, options.verify_with, VERIFY_HELPER) if n]  # the user's own

        def run(candidate: Recipe) -> tuple[Any, str | None]:
            with tempfile.TemporaryDirectory(prefix="ckptx-suggest-") as tmp:
                result, failure = convert_verified(
                    src,
                    os.path.join(tmp, "converted.safetensors"),
                    candidate,
                    allow_globals=options.allow_globals,
                    unsafe_pickle=options.unsafe_pickle,
                    allowed=typed,
                )
            return result, (str(failure).splitlines()[0] if failure is not None and result is None else None)

        verification, error = run(recipe)
        if tally.undecided and verification is not None:
            decision = decide_numerically(matches, verification, lambda ms: run(write(False, ms)[1])[0])
            notes.append(decision.note)
            if decision.matches is not matches:
                matches = decision.matches
                text, recipe, report, decided = write(False, matches)
                verification = decision.verification
            tally = _tally(matches, prefixes)
    elif verify is not None:
        error = "not run: the recipe does not validate against the target"
    result = SuggestReport(
        source=src,
        source_format=fmt,
        extracted_from=chosen.path,
        extract_rivals=tuple(c.path for c, _ in rivals),
        target=resolved.description,
        source_tensors=len(source_tensors),
        target_tensors=len(target_tensors),
        mapped=sum(len(m.targets) for m in matches) + len(copies),
        evidence=dict(tally.evidence),
        ops=dict(tally.ops),
        prefixes=prefixes,
        dropped=tuple(prefixes.strip_text + k for k in dropped),
        kept_unexpected=tuple(prefixes.strip_text + k for k in kept),
        allowed_missing=tuple(allowed_missing),
        missing=tuple(missing),
        close_calls=tuple(tally.close),
        notes=tuple(notes),
        validation=report,
        undecided=tuple(tally.undecided),
        verification=verification,
        verification_error=error,
        seconds=time.perf_counter() - started,
    )
    return Suggestion(recipe, text, result, decided)


def _from_library(
    options: _Options,
    fmt: str,
    opened: Any,
    chosen: Candidate,
    rivals: list[tuple[Candidate, float]],
    resolved: Target,
    found: LibraryFit,
    started: float,
) -> Suggestion:
    """A library recipe that validates as it is: flattened, with the user's target (and --verify-with), verified."""
    src, spec, output = options.src, options.spec, options.output
    document = dict(found.document)
    document["name"] = options.name or found.name
    document["target"] = _target_section(spec, output)
    verify = None
    if options.verify_with:
        if not spec.model:
            raise CkptxError("--verify-with needs a model target (module:callable), not a checkpoint or manifest")
        verify = verify_section(
            options.verify_with, options.verify_args, options.verify_input, options.verify_input_dtype
        )
        document["verify"] = verify
    else:
        document.pop("verify", None)
    chosen_values = ", ".join(f"{k}={v}" for k, v in found.values.items())
    note = (
        f"the library recipe '{found.name}' (pack {found.pack}) validates against the target as it is"
        + (f" ({chosen_values} chosen from the source)" if chosen_values else "")
        + "; nothing was inferred (--no-library infers a recipe instead)"
    )
    header = [
        f"Suggested by `ckptx suggest` (ckptx {__version__}): {note}.",
        f"source: {Path(src).name} ({fmt}), {len(opened.tensors)} tensors; target: {_describe(spec)}",
    ]
    text = "\n".join(f"# {line}" for line in header) + "\n" + dump(document)
    base_dir = Path(output).resolve().parent if output else Path.cwd()
    recipe = load_rules_text(text, str(output or "<suggested>"), base_dir=base_dir)
    report = validate(plan_recipe(recipe, opened, target=resolved.tensors), resolved)
    verification = error = None
    if verify is not None and report.ok:
        typed = [n for n in (spec.model, options.verify_with) if n]
        with tempfile.TemporaryDirectory(prefix="ckptx-suggest-") as tmp:
            verification, failure = convert_verified(
                src,
                os.path.join(tmp, "converted.safetensors"),
                recipe,
                allow_globals=options.allow_globals,
                unsafe_pickle=options.unsafe_pickle,
                allowed=typed,
            )
        error = str(failure).splitlines()[0] if failure is not None and verification is None else None
    result = SuggestReport(
        source=src,
        source_format=fmt,
        extracted_from=chosen.path,
        extract_rivals=tuple(c.path for c, _ in rivals),
        target=resolved.description,
        source_tensors=len(opened.tensors),
        target_tensors=len(resolved.tensors),
        mapped=report.matched,
        evidence={f"the library recipe {found.name}": report.matched},
        ops={},
        prefixes=Prefixes(),
        dropped=(),
        kept_unexpected=(),
        allowed_missing=tuple(str(getattr(k, "key", k)) for k in report.allowed_missing),
        missing=tuple(str(getattr(k, "key", k)) for k in report.missing),
        close_calls=(),
        notes=(note,),
        validation=report,
        verification=verification,
        verification_error=error,
        seconds=time.perf_counter() - started,
        library=found.name,
    )
    return Suggestion(recipe, text, result, {})


@dataclass(frozen=True)
class _Tally:
    """What the matches say, counted for the header and the report."""

    evidence: Counter
    ops: Counter
    close: list[str]
    noted: list[str]
    undecided: list[str]


def _tally(matches: Sequence[Match], prefixes: Prefixes) -> _Tally:
    """Evidence and op counts, close calls, notes and undecided rows, each row of blocks once (not once per block)."""
    added = prefixes.add_text
    evidence: Counter = Counter()
    ops: Counter = Counter()
    close: dict[str, str] = {}
    noted: dict[str, str] = {}
    undecided: dict[str, str] = {}
    for match in matches:
        if match.kind != "tensor":
            ops[match.kind] += 1
        elif isinstance(match.fit, Fit) and match.fit.kind != "exact":
            ops[match.fit.kind] += 1
        if match.undecided:
            rival = f" (or {added}{match.alternative})" if match.alternative else ""
            text = f"{prefixes.strip_text}{match.sources[0]} -> {added}{match.targets[0]}{rival}"
            undecided.setdefault(_DIGITS.sub("#", text), text)
            evidence["position only (UNDECIDED)"] += len(match.targets)
            continue
        evidence[match.evidence] += len(match.targets)
        if match.alternative:
            text = (
                f"{prefixes.strip_text}{match.sources[0]} -> {added}{match.targets[0]} "
                f"(runner-up {added}{match.alternative})"
            )
            close.setdefault(_DIGITS.sub("#", text), text)
        if match.note:
            text = f"{', '.join(match.sources)}: {match.note}"
            noted.setdefault(_DIGITS.sub("#", text), text)
    return _Tally(evidence, ops, list(close.values()), list(noted.values()), list(undecided.values()))


def _target_spec(
    target: str | TargetSpec,
    target_args: Mapping[str, Any] | None,
    allow_missing: Sequence[str],
    allow_unexpected: Sequence[str],
) -> TargetSpec:
    spec = parse_target_arg(target, target_args) if isinstance(target, str) else target
    for pattern in (*allow_missing, *allow_unexpected):
        try:
            re.compile(pattern)
        except re.error as exc:
            raise CkptxError(f"--allow-missing/--allow-unexpected: invalid regex '{pattern}': {exc}") from None
    return replace(
        spec,
        allow_missing=tuple(re.compile(p) for p in allow_missing) + tuple(spec.allow_missing),
        allow_unexpected=tuple(re.compile(p) for p in allow_unexpected) + tuple(spec.allow_unexpected),
        where=spec.where or "--target",
    )


def _resolve(spec: TargetSpec) -> tuple[Target, tuple[tuple[str, ...], ...]]:
    """The target's tensors, and (for a model) which of its keys share one tensor."""
    if spec.manifest:
        path = Path(spec.manifest)
        return Target(spec.manifest, read_manifest_fast(path), spec.allow_missing, spec.allow_unexpected), ()
    target = resolve_target(spec)
    return target, target.ties


def _tied_copies(
    ties: tuple[tuple[str, ...], ...], matches: list[Any], missing: list[str], added: str
) -> list[tuple[str, str]]:
    """(mapped key, missing key) for target keys tied to one that is mapped: a file stores a tied weight once
    (transformers' safetensors leave out `lm_head.weight`), the target still wants it under both names."""
    if not ties:
        return []
    mapped = {added + t for m in matches for t in m.targets}
    absent = {added + k for k in missing}
    out = []
    for group in ties:
        have = [k for k in group if k in mapped]
        if have:
            out += [(have[0], k) for k in group if k in absent]
    return out


def _recipe_name(src: str, spec: TargetSpec) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(src).name.split(".")[0]) or "source"
    if spec.model:
        named = next((str(v) for k, v in spec.kwargs.items() if k in ("model_name", "name", "architecture")), None)
        tail = named or spec.model.rsplit(":", 1)[-1].rsplit(".", 1)[-1]
        size = spec.kwargs.get("size")
        if named is None and isinstance(size, str):
            tail += f"-{size}"
    else:
        tail = Path(spec.checkpoint or spec.manifest or "target").name.split(".")[0]
    return f"suggested/{stem}-to-{re.sub(r'[^A-Za-z0-9_.-]+', '-', tail)}"


def _describe(spec: TargetSpec) -> str:
    """`module:callable(k=v, ...)` without Python quoting, or the target file's name."""
    if spec.model:
        return f"{spec.model}({', '.join(f'{k}={v}' for k, v in spec.kwargs.items())})"
    return Path(spec.checkpoint or spec.manifest or "").name


def _target_section(spec: TargetSpec, output: str | Path | None) -> dict[str, Any]:
    section: dict[str, Any] = {}
    if spec.model:
        section["model"] = spec.model
        if spec.kwargs:
            section["kwargs"] = dict(spec.kwargs)
    else:
        key = "checkpoint" if spec.checkpoint else "manifest"
        path = Path(spec.checkpoint or spec.manifest or "")
        if output is not None:
            path = Path(os.path.relpath(path.resolve(), Path(output).resolve().parent))
        section[key] = str(path)
    if spec.allow_missing:
        section["allow_missing"] = [p.pattern for p in spec.allow_missing]
    if spec.allow_unexpected:
        section["allow_unexpected"] = [p.pattern for p in spec.allow_unexpected]
    return section


def _header(
    src: str,
    fmt: str,
    rivals: list[tuple[Candidate, float]],
    extract: str | None,
    target: Target,
    spec: TargetSpec,
    prefixes: Prefixes,
    evidence: Counter,
    ops: Counter,
    dropped: list[str],
    kept: list[str],
    allowed_missing: list[str],
    missing: list[str],
    n_source: int,
    verified: bool,
    undecided: list[str],
) -> list[str]:
    where = f", weights at '{extract}'" if extract else ""
    lines = [
        f"Suggested by `ckptx suggest` (ckptx {__version__}) from metadata only: review before use.",
        f"source: {Path(src).name} ({fmt}{where}), {n_source} tensors",
    ]
    if rivals:
        lines.append(
            f"  (also fits the target as well: {', '.join(repr(c.path) for c, _ in rivals)}; "
            f"set `extract:` to use it instead)"
        )
    lines.append(f"target: {_describe(spec)}, {len(target.tensors)} tensors")
    mapped = sum(evidence.values())
    parts = [f"{n} by {what}" for what, n in sorted(evidence.items(), key=lambda kv: -kv[1])]
    lines.append(f"mapped: {mapped} of {len(target.tensors)} target keys ({'; '.join(parts) or 'none'})")
    if ops:
        lines.append("ops: " + ", ".join(f"{n} {kind}" for kind, n in sorted(ops.items())))
    if prefixes.strip or prefixes.add:
        lines.append(
            "prefixes: "
            + "; ".join(
                x
                for x in (
                    f"'{prefixes.strip_text}' stripped" if prefixes.strip else "",
                    f"'{prefixes.add_text}' added" if prefixes.add else "",
                )
                if x
            )
        )
    if dropped:
        lines.append(f"dropped: {len(dropped)} source tensor(s) with no counterpart in the target")
    if kept:
        lines.append(f"kept as they are (allowed unexpected): {len(kept)}")
    if allowed_missing:
        lines.append(f"allowed missing: {len(allowed_missing)} target key(s) left as initialised")
    if missing:
        lines.append(f"NOT MAPPED: {len(missing)} target key(s), listed at the end")
    if undecided:
        lines.append(
            f"UNDECIDED: {len(undecided)} row(s) between tensors of equal shape that no evidence but position "
            f"decided (marked below); rerun with --verify-with module:callable (the source model) to decide them"
        )
        lines += [f"  {u}" for u in undecided[:20]]
    lines += [
        "",
        "ckptx validated this recipe's keys and shapes against the target; it does not prove the outputs",
        "agree: "
        + (
            "see the `verify:` section (`ckptx convert --verify`)."
            if verified
            else "rerun `ckptx suggest` with --verify-with module:callable (the source model) to check."
        ),
    ]
    return lines


def _check(
    recipe: Recipe, source: Any, target: Target, decided: Mapping[str, Decided], prefixes: Prefixes
) -> ValidationReport:
    """Plan the written recipe and compare every output with the alignment's decision; then validate."""
    if recipe.extract and getattr(source, "extracted_from", ".") not in recipe.extract:
        raise RuntimeError(f"suggest opened '{source.extracted_from}' but wrote extract {list(recipe.extract)}")
    try:
        plan = plan_recipe(recipe, source, target=target.tensors)
    except PlanError as exc:
        raise NotReproduced(f"the recipe does not plan: {exc}") from None
    strip = prefixes.strip_text
    wrong = []
    for entry in plan.entries:
        want = decided.get(entry.key)
        if want is None:
            wrong.append(f"{entry.key} <- {', '.join(entry.sources)} (not decided)")
            continue
        got_ops = tuple(op.split("(", 1)[0] for op in ops_of(entry.expr)) if want.ops or not entry.is_copy else ()
        if tuple(strip + s for s in want.sources) != entry.sources or got_ops != want.ops:
            wrong.append(f"{entry.key} <- {', '.join(entry.sources)} {got_ops}")
    if wrong or len(plan.entries) != len(decided):
        raise NotReproduced(
            f"{len(wrong)} key(s) differ, e.g. {wrong[:3]}; {len(plan.entries)} planned, {len(decided)} decided"
        )
    return validate(plan, target)
