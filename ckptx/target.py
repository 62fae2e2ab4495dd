"""Targets (model factory on the meta device, reference checkpoint, manifest) and validation against them."""

from __future__ import annotations

import difflib
import importlib
import json
import re
from dataclasses import dataclass, field
from operator import attrgetter
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from ckptx._lazy import lazy_module
from ckptx.errors import CkptxError, TargetError
from ckptx.dtypes import dtype_name
from ckptx.ops.registry import TensorMeta
from ckptx.rules.recipe import TargetSpec

torch = lazy_module("torch")


MANIFEST_VERSION = 1
_MODEL_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


@dataclass(frozen=True)
class Target:
    """What a target expects: key -> shape/dtype, and which differences are allowed."""

    description: str
    tensors: dict[str, TensorMeta]
    allow_missing: tuple[re.Pattern[str], ...] = ()
    allow_unexpected: tuple[re.Pattern[str], ...] = ()
    notes: tuple[str, ...] = ()


def parse_target_arg(spec: str, kwargs: Mapping[str, Any] | None = None) -> TargetSpec:
    """A CLI `--target SPEC`: `module:callable`, a manifest (.json/.yaml) or a reference checkpoint."""
    if _MODEL_SPEC.match(spec) and not Path(spec).exists():
        return TargetSpec(model=spec, kwargs=dict(kwargs or {}), where="--target")
    if Path(spec).suffix in (".json", ".yaml", ".yml") and not spec.endswith(".index.json"):
        return TargetSpec(manifest=spec, where="--target")
    return TargetSpec(checkpoint=spec, kwargs=dict(kwargs or {}), where="--target")


def resolve_target(spec: TargetSpec | str | Mapping[str, Any] | torch.nn.Module) -> Target:
    """Turn a target spec, a live module or a state dict into the keys and shapes it expects."""
    if isinstance(spec, torch.nn.Module):
        return Target(type(spec).__name__, _metas(spec.state_dict()))
    if isinstance(spec, str):
        spec = parse_target_arg(spec)
    if isinstance(spec, Mapping):
        return Target("<state_dict>", _metas(spec))
    common = {"allow_missing": spec.allow_missing, "allow_unexpected": spec.allow_unexpected}
    if spec.model:
        tensors, notes = _model_tensors(spec)
        return Target(spec.describe(), tensors, notes=notes, **common)
    if spec.manifest:
        return Target(spec.manifest, read_manifest(Path(spec.manifest)), **common)
    if spec.checkpoint:
        from ckptx.io.open import open_source  # noqa: PLC0415

        with open_source(spec.checkpoint) as source:
            return Target(spec.checkpoint, dict(source.tensors), **common)
    raise TargetError(f"{spec.where or 'target'}: give one of model, checkpoint or manifest")


def import_callable(spec: str, where: str) -> Any:
    """`package.module:attr.attr` -> the object."""
    module_name, _, attr = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise TargetError(f"{where}: cannot import module '{module_name}' ({exc}); is it installed?") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise TargetError(f"{where}: module '{module_name}' has no attribute '{attr}'") from None
    if not callable(obj):
        raise TargetError(f"{where}: '{spec}' is not callable")
    return obj


def build_model(spec: str, kwargs: Mapping[str, Any], where: str, *, device: str = "meta") -> torch.nn.Module:
    """Call a `module:callable` model factory under `torch.device(device)`."""
    factory = import_callable(spec, where)
    try:
        with torch.device(device):
            model = factory(**kwargs)
    except CkptxError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of user code is reported, not crashed on
        raise TargetError(f"{where}: {spec}(**{dict(kwargs)!r}) failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(model, torch.nn.Module):
        raise TargetError(f"{where}: {spec} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _model_tensors(spec: TargetSpec) -> tuple[dict[str, TensorMeta], tuple[str, ...]]:
    try:
        model = build_model(spec.model or "", spec.kwargs, spec.where or "target")
        return _metas(model.state_dict()), ()
    except TargetError as exc:
        if "cannot import" in str(exc) or "no attribute" in str(exc) or "not callable" in str(exc):
            raise
        model = build_model(spec.model or "", spec.kwargs, spec.where or "target", device="cpu")
        return _metas(model.state_dict()), (f"built on the CPU: the factory does not run on the meta device ({exc})",)


def _metas(state: Mapping[str, Any]) -> dict[str, TensorMeta]:
    return {k: TensorMeta(tuple(v.shape), dtype_name(v.dtype)) for k, v in state.items() if isinstance(v, torch.Tensor)}


def write_manifest(path: Path, tensors: Mapping[str, TensorMeta], *, source: str = "") -> None:
    """Write a manifest (JSON) of key -> shape/dtype that can serve as a target."""
    doc = {"ckptx_manifest": MANIFEST_VERSION, "source": source,
           "tensors": {k: {"shape": list(m.shape), "dtype": m.dtype} for k, m in tensors.items()}}
    path.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")


def read_manifest(path: Path) -> dict[str, TensorMeta]:
    """Read a manifest written by `ckptx inspect --manifest` (JSON or YAML)."""
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TargetError(f"{path}: no such manifest file") from None
    except (OSError, yaml.YAMLError) as exc:
        raise TargetError(f"{path}: cannot read manifest: {str(exc).splitlines()[0]}") from None
    tensors = doc.get("tensors") if isinstance(doc, dict) else None
    if not isinstance(tensors, dict):
        raise TargetError(f"{path}: not a ckptx manifest: expected a mapping with `tensors: {{key: {{shape, dtype}}}}`")
    out = {}
    for key, info in tensors.items():
        try:
            out[str(key)] = TensorMeta(tuple(int(d) for d in info["shape"]), str(info.get("dtype", "float32")))
        except (KeyError, TypeError, ValueError):
            raise TargetError(f"{path}: tensors.{key}: needs `shape: [..]` and `dtype`") from None
    return out


@dataclass(frozen=True)
class KeyProblem:
    """One key that does not fit, with what the plan has, what the target wants, and a hint."""

    key: str
    have: TensorMeta | None = None
    want: TensorMeta | None = None
    sources: tuple[str, ...] = ()
    hint: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {"key": self.key, "have": _meta_dict(self.have), "want": _meta_dict(self.want),
                "sources": list(self.sources), "hint": self.hint}


@dataclass
class ValidationReport:
    """How a plan (or state dict) fits a target."""

    target: str
    matched: int = 0
    missing: list[KeyProblem] = field(default_factory=list)
    unexpected: list[KeyProblem] = field(default_factory=list)
    shape_mismatches: list[KeyProblem] = field(default_factory=list)
    dtype_differences: list[KeyProblem] = field(default_factory=list)
    allowed_missing: list[str] = field(default_factory=list)
    allowed_unexpected: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every key lands and every shape fits."""
        return not (self.missing or self.unexpected or self.shape_mismatches)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "target": self.target, "ok": self.ok, "matched": self.matched,
            "missing": [p.to_dict() for p in self.missing],
            "unexpected": [p.to_dict() for p in self.unexpected],
            "shape_mismatches": [p.to_dict() for p in self.shape_mismatches],
            "dtype_differences": [p.to_dict() for p in self.dtype_differences],
            "allowed_missing": self.allowed_missing, "allowed_unexpected": self.allowed_unexpected,
            "notes": self.notes,
        }

    def __str__(self) -> str:
        from ckptx.report import render_validation  # noqa: PLC0415

        return render_validation(self)


def validate(plan_or_state: Any, target: Any) -> ValidationReport:
    """Compare a Plan (or a state dict, or key -> TensorMeta) with a target spec, module or Target."""
    resolved = target if isinstance(target, Target) else resolve_target(target)
    have, sources = _planned(plan_or_state)
    want = resolved.tensors
    report = ValidationReport(resolved.description, notes=list(resolved.notes))
    missing_keys = [k for k in want if k not in have]
    unexpected_keys = [k for k in have if k not in want]
    report.matched = len(want) - len(missing_keys)
    for key, wanted in want.items():
        got = have.get(key)
        if got is None or got is wanted:
            continue
        if got.shape != wanted.shape:
            report.shape_mismatches.append(KeyProblem(key, got, wanted, sources.get(key, ()), _shape_hint(got, wanted)))
        elif got.dtype != wanted.dtype:
            report.dtype_differences.append(KeyProblem(key, got, wanted, sources.get(key, ())))
    suggest = _Suggester({k: have[k] for k in unexpected_keys}, sources)
    for key in missing_keys:
        if any(p.search(key) for p in resolved.allow_missing):
            report.allowed_missing.append(key)
        else:
            report.missing.append(KeyProblem(key, None, want[key], (), suggest.hint(key, want[key])))
    for key in unexpected_keys:
        if any(p.search(key) for p in resolved.allow_unexpected):
            report.allowed_unexpected.append(key)
        else:
            report.unexpected.append(KeyProblem(key, have[key], None, sources.get(key, ())))
    return report


_META = attrgetter("expr.meta")  # PlanEntry.meta, read in C


class _SourceKeys:
    """The source keys of each planned key, worked out only for the keys a report names."""

    def __init__(self, by_key: Mapping[str, Any] | None = None) -> None:
        self._by_key = by_key or {}

    def get(self, key: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        """Source keys of `key`, or `default` when it is not a planned key."""
        entry = self._by_key.get(key)
        return default if entry is None else entry.sources


def _planned(plan_or_state: Any) -> tuple[dict[str, TensorMeta], _SourceKeys]:
    entries = getattr(plan_or_state, "entries", None)
    if entries is not None:
        keys = [e.key for e in entries]
        return dict(zip(keys, map(_META, entries))), _SourceKeys(dict(zip(keys, entries)))
    if isinstance(plan_or_state, Mapping):
        metas = {k: v if isinstance(v, TensorMeta) else TensorMeta(tuple(v.shape), dtype_name(v.dtype))
                 for k, v in plan_or_state.items() if isinstance(v, (TensorMeta, torch.Tensor))}
        return metas, _SourceKeys()
    raise TypeError(f"validate() takes a Plan or a state dict, not {type(plan_or_state).__name__}")


def _shape_hint(have: TensorMeta, want: TensorMeta) -> str:
    if have.numel == want.numel:
        return f"same number of elements: add `reshape: {{match: ..., shape: {list(want.shape)}}}` (or `shape: target`)"
    if sorted(have.shape) == sorted(want.shape):
        return "same dims in another order: a `permute` step may be missing"
    return ""


class _Suggester:
    """Finds, for a missing target key, the closest unexpected key: same shape first, then the most similar
    name — comparing with the candidate's key and with the source key it came from."""

    _LIMIT = 500
    _POOL = 400

    def __init__(self, candidates: dict[str, TensorMeta], sources: _SourceKeys) -> None:
        self.candidates = candidates
        self.sources = sources
        self.by_shape: dict[tuple[int, ...], list[str]] = {}
        for key, meta in candidates.items():
            self.by_shape.setdefault(meta.shape, []).append(key)
        self.calls = 0

    def hint(self, key: str, want: TensorMeta) -> str:
        self.calls += 1
        if not self.candidates or self.calls > self._LIMIT:
            return ""
        best = self._closest(key, self.by_shape.get(want.shape, []), cutoff=0.3)
        if best:
            return f"did you mean '{best}' (same shape)?"
        best = self._closest(key, list(self.candidates), cutoff=0.6)
        if best:
            return f"did you mean '{best}' (shape {list(self.candidates[best].shape)})?"
        return ""

    def _closest(self, key: str, pool: list[str], cutoff: float) -> str | None:
        if len(pool) > self._POOL:
            pool = difflib.get_close_matches(key, pool, n=self._POOL // 10, cutoff=0.0)
        matcher = difflib.SequenceMatcher(b=key)
        best, best_score = None, cutoff
        for candidate in pool:
            score = 0.0
            for name in (candidate, *self.sources.get(candidate, ())):
                matcher.set_seq1(name)
                score = max(score, matcher.ratio())
            if score > best_score:
                best, best_score = candidate, score
        return best


def _meta_dict(meta: TensorMeta | None) -> dict[str, Any] | None:
    return None if meta is None else {"shape": list(meta.shape), "dtype": meta.dtype}
