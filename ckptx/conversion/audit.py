"""`ckptx audit`: what a converted checkpoint got wrong, found from the file itself.

Every output tensor is hashed and summarised (SHA-256 and statistics, streamed on every core; torch is imported
only for a tensor that must be recomputed or a file torch alone can read). Then:

- always: value findings (NaN, infinities, all zero) from the statistics;
- with the source and the recipe: the plan is made again and every output tensor proved, a copied one by the hash
  of its bytes in the source, a transformed one by recomputing it through the plan (a byte kernel streams it; else
  torch computes it, one tensor at a time); a tensor that differs is explained (dtype, shape, swapped with another,
  transposed, or how many values differ and by how much); missing and extra tensors are named;
- with a target: keys and shapes against it, constants where the target does not initialize so, and, for a model
  target, tensors that look like the target's fresh initialization (ckptx/check/init_like.py);
- with a card: the output against the card (a tensor changed, added or removed after conversion).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptx._data import schema_path
from ckptx._lazy import lazy_module
from ckptx.check.findings import AuditReport, Finding
from ckptx.check.init_like import INIT_P, MIN_ELEMENTS, InitReference, init_like_p, init_references, probe_rows
from ckptx.check.validation import validate
from ckptx.check.value_checks import value_findings
from ckptx.conversion.card_document import CARD_NAME
from ckptx.conversion.pipeline import plan_and_validate, target_spec_for
from ckptx.conversion.request import ConvertRequest
from ckptx.dtypes import DTYPES, TensorMeta
from ckptx.errors import CardError
from ckptx.io.card import SpanDigests, TensorRecord, read_range
from ckptx.io.digest import TensorDigest, TensorSummary, decode
from ckptx.io.read.open import open_source
from ckptx.io.spans import CONVERT_CHUNK
from ckptx.planning.entry import PlanEntry
from ckptx.planning.execute import materialize
from ckptx.planning.expr import byte_converter
from ckptx.planning.source import RawSpan, Source
from ckptx.rules.loader import RecipeArg, as_recipe
from ckptx.rules.recipe import Recipe, TargetSpec
from ckptx.targets.resolve import Target, parse_target_arg, resolve_target
from ckptx.text import quoted

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
else:
    np = lazy_module("numpy")

__all__ = ["AuditRequest", "audit", "run_audit"]

SAMPLED = 4096  # positions compared when testing whether a tensor is the expected one transposed


@dataclass(frozen=True)
class AuditRequest:
    """Everything `ckptx.audit` is asked (its keyword arguments, documented there)."""

    output: Path
    source: Path | None = None
    recipes: RecipeArg | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    target: TargetSpec | str | None = None
    target_args: Mapping[str, Any] = field(default_factory=dict)
    card: Path | None = None
    allow_globals: Sequence[str] = ()
    unsafe_pickle: bool = False
    threads: int | None = None


def audit(
    output: str | Path,
    *,
    source: str | Path | None = None,
    recipes: RecipeArg | None = None,
    params: Mapping[str, Any] | None = None,
    target: TargetSpec | str | None = None,
    target_args: Mapping[str, Any] | None = None,
    card: str | Path | None = None,
    allow_globals: Sequence[str] = (),
    unsafe_pickle: bool = False,
    threads: int | None = None,
) -> AuditReport:
    """Audit the checkpoint `output` (a file, a shard index or a HuggingFace model folder); returns an AuditReport
    (`.ok`, `.findings`: key, kind, detail). `source` with `recipes` (none: the tensors as they are) proves every
    tensor against the source; `target` (a `module:callable`, a checkpoint or a manifest; `target_args` add keyword
    arguments) checks keys, shapes and, for a model, fresh-initialization look-alikes; `card` checks the output
    against a provenance card (`ckptx convert --audit`). Raises CkptxError subclasses for bad input."""
    request = AuditRequest(
        Path(output), Path(source) if source is not None else None, recipes, dict(params or {}), target,
        dict(target_args or {}), Path(card) if card is not None else None, tuple(allow_globals), unsafe_pickle,
        threads,
    )  # fmt: skip
    return run_audit(request)


def run_audit(request: AuditRequest) -> AuditReport:
    """Carry out an audit request."""
    weights, card = _output_files(request)
    with open_source(weights, allow_globals=request.allow_globals, unsafe_pickle=request.unsafe_pickle) as out:
        report = AuditReport(str(request.output), len(out.tensors))
        metas = dict(out.tensors)
        with SpanDigests(request.threads) as digests:
            summaries = {key: _output_digest(digests, out, key, meta) for key, meta in metas.items()}
            recipe = _recipe(request) if request.source is not None else None
            spec = _target_spec(request, recipe)
            references = _references(spec, report)
            done = {key: future.result() for key, future in summaries.items()}
            for key, meta in metas.items():
                for finding in value_findings(key, meta.dtype, done[key].stats, references.get(key)):
                    report.add(finding)
            if request.source is not None and recipe is not None:
                _prove(request, recipe, out, done, digests, report)
            if spec is not None:
                _check_target(spec, metas, report)
            if references:
                _init_like(out, metas, done, references, report)
            if card is not None:
                _check_card(card, metas, done, report)
        report.checked.setdefault("values", "NaN, infinities and all-zero tensors in every tensor")
    return report


def _output_files(request: AuditRequest) -> tuple[Path, Path | None]:
    """The file to open for the output's weights, and the card to check (a model folder's own card when none is
    given and the folder has one)."""
    output, card = request.output, request.card
    if output.is_dir():
        for name in ("model.safetensors.index.json", "model.safetensors"):
            if (output / name).is_file():
                if card is None and (output / CARD_NAME).is_file():
                    card = output / CARD_NAME
                return output / name, card
    return output, card


def _recipe(request: AuditRequest) -> Recipe:
    if request.recipes is None or request.recipes == []:
        return as_recipe(Recipe(name="(no recipe: tensors as they are)"), request.params)
    return as_recipe(request.recipes, request.params)


def _target_spec(request: AuditRequest, recipe: Recipe | None) -> TargetSpec | None:
    """The explicit target, else the recipe's own (when a recipe is given)."""
    if recipe is not None:
        return target_spec_for(recipe, request.target, request.target_args)
    if request.target is None:
        return None
    spec = parse_target_arg(request.target) if isinstance(request.target, str) else request.target
    return target_spec_for(Recipe(name=""), spec, request.target_args)


def _references(spec: TargetSpec | None, report: AuditReport) -> dict[str, InitReference]:
    """The target model's initialization of each tensor (empty for a checkpoint or manifest target)."""
    if spec is None or not spec.model:
        return {}
    references = init_references(spec)
    report.checked["initialization"] = (
        f"{spec.describe()} built twice on the CPU: {sum(r.kind == 'random' for r in references.values())} randomly "
        f"initialized tensors tested for init-like values (p >= {INIT_P:g})"
    )
    return references


# --- digests --------------------------------------------------------------------------------------------------


def _tensor_spans(source: Source, key: str, meta: TensorMeta) -> tuple[RawSpan, ...] | None:
    spans = source.raw_spans(key)
    if spans is None or sum(s.nbytes for s in spans) != meta.nbytes:
        return None
    return tuple(spans)


def _output_digest(digests: SpanDigests, out: Source, key: str, meta: TensorMeta) -> Future[TensorSummary]:
    spans = _tensor_spans(out, key, meta)
    if spans is not None:
        return digests.submit(meta.dtype, spans)
    return digests.pool.submit(_memory_digest, out, key, meta.dtype)


def _memory_digest(source: Source, key: str, dtype: str) -> TensorSummary:
    digest = TensorDigest(dtype)
    digest.update(_row_major_bytes(source.load(key)))
    return digest.summary()


def _row_major_bytes(tensor: Any) -> Any:
    """A tensor's elements in row-major order, as bytes (a numpy uint8 array)."""
    import torch

    flat = tensor.detach().cpu().resolve_conj().resolve_neg().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy()


class _Elements:
    """The values of one tensor read by element ranges: from spans of a file, or from bytes in memory."""

    def __init__(self, dtype: str, spans: tuple[RawSpan, ...] | None = None, data: Any = None) -> None:
        self.dtype = dtype
        self.item = DTYPES[dtype].itemsize
        self.spans = spans
        self.data = data
        self._all: Any = None

    def read(self, start: int, count: int) -> Any:
        """Elements start:start + count as float64 (NaN where the dtype has no numbers)."""
        lo, n = start * self.item, count * self.item
        raw = read_range(self.spans, lo, n) if self.spans is not None else bytes(self.data[lo : lo + n])
        values = decode(raw, self.dtype)
        if values is None:
            return np.frombuffer(raw, dtype="u1").astype(np.float64)
        return values.astype(np.float64)

    def at(self, indices: Any) -> Any:
        """The elements at flat `indices` (one pread each from a file)."""
        if self.spans is not None:
            return np.array([self.read(int(i), 1)[0] for i in indices], dtype=np.float64)
        if self._all is None:
            self._all = self.read(0, len(self.data) // self.item)
        return self._all[indices]


def _elements_of(source: Source, key: str, meta: TensorMeta) -> _Elements:
    spans = _tensor_spans(source, key, meta)
    if spans is not None:
        return _Elements(meta.dtype, spans=spans)
    return _Elements(meta.dtype, data=memoryview(_row_major_bytes(source.load(key))).cast("B"))


# --- with the source: every tensor proved ----------------------------------------------------------------------


def _prove(
    request: AuditRequest,
    recipe: Recipe,
    out: Source,
    done: Mapping[str, TensorSummary],
    digests: SpanDigests,
    report: AuditReport,
) -> None:
    assert request.source is not None
    convert = ConvertRequest(
        request.source, None, recipe, request.target, dict(request.target_args), dict(request.params),
        allow_globals=tuple(request.allow_globals), unsafe_pickle=request.unsafe_pickle,
    )  # fmt: skip
    with open_source(
        request.source, recipe.extract, allow_globals=request.allow_globals, unsafe_pickle=request.unsafe_pickle
    ) as source:
        plan = plan_and_validate(recipe, source, convert).plan
        expected = {entry.key: entry for entry in plan.entries}
        metas = out.tensors
        for key, entry in expected.items():
            if key not in metas:
                report.add(Finding(key, "missing", f"the recipe makes it ({entry.meta}) from {_from(entry)}; the "
                                   f"output has no such tensor"))  # fmt: skip
        for key in metas:
            if key not in expected:
                report.add(Finding(key, "extra", f"{metas[key]}: the recipe makes no such tensor from the source"))
        comparable: dict[str, PlanEntry] = {}
        for key, entry in expected.items():
            if key not in metas:
                continue
            have, want = metas[key], entry.meta
            if have == want:
                comparable[key] = entry
            elif have.dtype != want.dtype and have.shape == want.shape:
                report.add(Finding(key, "dtype", f"is {have.dtype}, the recipe makes {want.dtype} from {_from(entry)}"))
            elif have.dtype != want.dtype or not _prove_transposed(key, entry, out, source, report):
                report.add(Finding(key, "shape", f"is {have}, the recipe makes {want} from {_from(entry)}"))
        futures = {key: _expected_digest(digests, source, entry) for key, entry in comparable.items()}
        wanted = {key: future.result().sha256 for key, future in futures.items()}
        recomputed = sum(not entry.is_copy or _tensor_spans(source, entry.sources[0], entry.meta) is None
                         for entry in comparable.values())  # fmt: skip
        _explain_differences(comparable, wanted, done, out, source, report)
        report.checked["source"] = (
            f"{request.source} with {recipe.name}: {len(comparable)} of {len(expected)} planned tensors compared, "
            f"{len(comparable) - recomputed} by the hash of their source bytes, {recomputed} recomputed"
        )


def _from(entry: PlanEntry) -> str:
    return ", ".join(map(quoted, entry.sources)) or "no source tensor"


def _expected_digest(digests: SpanDigests, source: Source, entry: PlanEntry) -> Future[TensorSummary]:
    """The hash of what the recipe makes for `entry`: its source bytes when copied, else recomputed."""
    if entry.is_copy:
        spans = _tensor_spans(source, entry.sources[0], entry.meta)
        if spans is not None:
            return digests.submit(entry.meta.dtype, spans, stats=False)
    return digests.pool.submit(_recomputed_digest, source, entry)


def _recomputed_digest(source: Source, entry: PlanEntry) -> TensorSummary:
    digest = TensorDigest(entry.meta.dtype, hash_only=True)
    streamed = byte_converter(entry.expr)
    meta = source.tensors[streamed[0]] if streamed is not None else None
    spans = _tensor_spans(source, streamed[0], meta) if streamed is not None and meta is not None else None
    if streamed is not None and spans is not None:
        item = DTYPES[meta.dtype].itemsize if meta is not None else 1
        chunk = CONVERT_CHUNK - CONVERT_CHUNK % item
        total = sum(s.nbytes for s in spans)
        for start in range(0, total, chunk):
            digest.update(streamed[1](read_range(spans, start, min(chunk, total - start))))
        return digest.summary()
    digest.update(_row_major_bytes(materialize(entry, source)))
    return digest.summary()


def _expected_elements(source: Source, entry: PlanEntry) -> _Elements:
    if entry.is_copy:
        spans = _tensor_spans(source, entry.sources[0], entry.meta)
        if spans is not None:
            return _Elements(entry.meta.dtype, spans=spans)
    return _Elements(entry.meta.dtype, data=memoryview(_row_major_bytes(materialize(entry, source))).cast("B"))


def _explain_differences(
    comparable: Mapping[str, PlanEntry],
    wanted: Mapping[str, str],
    done: Mapping[str, TensorSummary],
    out: Source,
    source: Source,
    report: AuditReport,
) -> None:
    """A finding for every tensor whose hash is not what the recipe makes: swapped, transposed, or values."""
    by_hash: dict[tuple[str, TensorMeta], list[str]] = {}
    for key, sha in wanted.items():
        by_hash.setdefault((sha, comparable[key].meta), []).append(key)
    for key, entry in comparable.items():
        have = done[key].sha256
        if have == wanted[key]:
            continue
        holders = [k for k in by_hash.get((have, entry.meta), []) if k != key]
        if holders:
            other = holders[0]
            if done[other].sha256 == wanted[key]:
                report.add(Finding(key, "swapped", f"holds what the recipe makes for {quoted(other)}, and "
                                   f"{quoted(other)} holds what it makes for this one"))  # fmt: skip
            else:
                detail = f"holds what the recipe makes for {quoted(other)} (from {_from(comparable[other])})"
                report.add(Finding(key, "values", f"{detail}, not its own (from {_from(entry)})"))
            continue
        if _prove_transposed(key, entry, out, source, report):
            continue
        report.add(Finding(key, "values", _value_difference(key, entry, out, source)))


def _swaps(have: tuple[int, ...], want: tuple[int, ...]) -> list[tuple[int, int]]:
    """Pairs of dimensions whose exchange turns shape `want` into `have`."""
    pairs = []
    for i in range(len(want)):
        for j in range(i + 1, len(want)):
            swapped = list(want)
            swapped[i], swapped[j] = swapped[j], swapped[i]
            if tuple(swapped) == have and (have != want or want[i] == want[j]):
                pairs.append((i, j))
    return pairs


def _prove_transposed(key: str, entry: PlanEntry, out: Source, source: Source, report: AuditReport) -> bool:
    """Report `key` as transposed when its values, at sampled positions, are the expected tensor's with two
    dimensions exchanged (and are not simply the expected values)."""
    have_meta = out.tensors[key]
    pairs = _swaps(have_meta.shape, entry.meta.shape)
    if not pairs or have_meta.numel < 2:
        return False
    rng = np.random.default_rng(0)
    count = min(SAMPLED, have_meta.numel)
    positions = rng.choice(have_meta.numel, size=count, replace=False) if count < have_meta.numel else np.arange(count)
    got = _elements_of(out, key, have_meta).at(positions)
    expected = _expected_elements(source, entry)
    index = np.array(np.unravel_index(positions, have_meta.shape))
    same_shape = have_meta.shape == entry.meta.shape
    if same_shape and np.array_equal(got, expected.at(positions), equal_nan=True):
        return False  # equal where sampled: the difference is elsewhere, not an exchange of dimensions
    for i, j in pairs:
        moved = index.copy()
        moved[[i, j]] = moved[[j, i]]
        there = expected.at(np.ravel_multi_index(tuple(moved), entry.meta.shape))
        if np.array_equal(got, there, equal_nan=True):
            report.add(Finding(key, "transposed", f"is what the recipe makes from {_from(entry)} with dimensions "
                               f"{i} and {j} exchanged ({count:,} positions compared)"))  # fmt: skip
            return True
    return False


def _value_difference(key: str, entry: PlanEntry, out: Source, source: Source) -> str:
    """How the output's values differ from what the recipe makes: how many, the largest difference and where."""
    got, want = _elements_of(out, key, entry.meta), _expected_elements(source, entry)
    step = 1 << 20
    differing, nans, largest, where = 0, 0, 0.0, -1
    for start in range(0, entry.meta.numel, step):
        count = min(step, entry.meta.numel - start)
        a, b = got.read(start, count), want.read(start, count)
        same = (a == b) | (np.isnan(a) & np.isnan(b))
        differing += int(count - np.count_nonzero(same))
        nans += int(np.count_nonzero(np.isnan(a) & ~np.isnan(b)))
        with np.errstate(invalid="ignore"):
            gaps = np.where(same | np.isnan(a) | np.isnan(b), 0.0, np.abs(a - b))
        if gaps.size and float(gaps.max()) > largest:
            largest, where = float(gaps.max()), start + int(gaps.argmax())
    if differing == 0:
        return (
            f"its bytes differ from what the recipe makes from {_from(entry)} though its values compare equal "
            f"(e.g. -0.0 for 0.0, or NaN payloads)"
        )
    parts = [f"{differing:,} of {entry.meta.numel:,} elements differ from what the recipe makes from {_from(entry)}"]
    if where >= 0:
        at = [int(i) for i in np.unravel_index(where, entry.meta.shape)] if entry.meta.shape else []
        parts.append(f"largest difference {largest:.3g}" + (f" at {at}" if at else ""))
    if nans:
        parts.append(f"{nans:,} NaN where it makes a number")
    return "; ".join(parts)


# --- with a target ------------------------------------------------------------------------------------------------


def _check_target(spec: TargetSpec, metas: Mapping[str, TensorMeta], report: AuditReport) -> None:
    target = resolve_target(spec)
    result = validate(dict(metas), target)
    tied = _tied_present(target, metas)
    for problem in result.missing:
        if problem.key not in tied:
            report.add(Finding(problem.key, "missing", f"the target {target.description} has it ({problem.want}); "
                               f"the output does not"))  # fmt: skip
    for problem in result.unexpected:
        report.add(Finding(problem.key, "extra", f"{problem.have}: not in the target {target.description}"))
    for problem in result.shape_mismatches:
        report.add(Finding(problem.key, "shape", f"is {problem.have}, the target {target.description} wants "
                           f"{list(problem.want.shape) if problem.want else '?'}"))  # fmt: skip
    report.checked["target"] = f"{target.description}: {result.matched} of {len(target.tensors)} keys present"


def _tied_present(target: Target, metas: Mapping[str, TensorMeta]) -> set[str]:
    """Target keys tied to another key the output has (a file may store a tied tensor once)."""
    found: set[str] = set()
    for group in target.ties:
        if any(k in metas for k in group):
            found.update(group)
    return found


def _init_like(
    out: Source,
    metas: Mapping[str, TensorMeta],
    done: Mapping[str, TensorSummary],
    references: Mapping[str, InitReference],
    report: AuditReport,
) -> None:
    for key, meta in metas.items():
        ref = references.get(key)
        stats = done[key].stats
        if ref is None or ref.kind != "random" or stats is None or stats.finite < MIN_ELEMENTS:
            continue
        if DTYPES[meta.dtype].kind != "float" or stats.mean is None or stats.std is None:
            continue
        elements = _elements_of(out, key, meta)
        probe = np.concatenate([elements.read(start, length) for start, length in probe_rows(meta.shape)])
        p = init_like_p(stats.finite, stats.mean, stats.std, probe, meta.shape, ref)
        if p >= INIT_P:
            report.add(Finding(key, "init-like", f"mean {stats.mean:.3g}, std {stats.std:.3g}: like a fresh "
                               f"initialization of the target (mean {ref.mean:.3g}, std {math.sqrt(ref.var):.3g}); "
                               f"p = {p:.2g} that it is one"))  # fmt: skip


# --- with a card -----------------------------------------------------------------------------------------------------


def read_card(path: Path) -> dict[str, TensorRecord]:
    """The tensors a card records; CardError for a file that is not a card."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CardError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CardError(
            f"{path}: not a ckptx card (not JSON: {exc}); give the file `ckptx convert --audit` wrote"
        ) from None
    import jsonschema

    schema = json.loads(schema_path("ckptx-card.schema.json").read_text(encoding="utf-8"))
    problem = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema).iter_errors(document))
    if problem is not None:
        where = "/".join(str(p) for p in problem.absolute_path) or "(top)"
        raise CardError(f"{path}: not a ckptx card: at {where}: {problem.message}; give the file `ckptx convert "
                        f"--audit` wrote")  # fmt: skip
    return {key: TensorRecord.from_dict(key, entry) for key, entry in document["tensors"].items()}


def _check_card(
    path: Path, metas: Mapping[str, TensorMeta], done: Mapping[str, TensorSummary], report: AuditReport
) -> None:
    records = read_card(path)
    changed = 0
    for key, record in records.items():
        if key not in metas:
            report.add(Finding(key, "card", "the card records it; the output has no such tensor"))
            continue
        have = metas[key]
        if have != record.meta:
            report.add(Finding(key, "card", f"is {have}, the card records {record.meta}"))
        elif done[key].sha256 != record.sha256:
            changed += 1
            report.add(
                Finding(
                    key, "card", f"its bytes changed since the card was written ({_stats_change(record, done[key])})"
                )
            )
    for key in metas:
        if key not in records:
            report.add(Finding(key, "card", f"{metas[key]}: not in the card (added after conversion)"))
    report.checked["card"] = f"{path}: {len(records)} tensors recorded"


def _stats_change(record: TensorRecord, now: TensorSummary) -> str:
    before, after = record.stats, now.stats
    if before is None or after is None:
        return f"sha256 {record.sha256[:12]}... now {now.sha256[:12]}..."
    parts = []
    for name in ("mean", "std", "min", "max", "zeros", "nan", "inf"):
        old, new = getattr(before, name), getattr(after, name)
        if old != new:
            parts.append(f"{name} {_num(old)} -> {_num(new)}")
    return "; ".join(parts) if parts else "the same statistics, other bytes"


def _num(value: Any) -> str:
    return "none" if value is None else (f"{value:.4g}" if isinstance(value, float) else str(value))
