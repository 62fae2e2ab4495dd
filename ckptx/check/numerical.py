"""Numerical verification: the converted target model must compute what the source model computes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptx._lazy import lazy_module
from ckptx.dtypes import torch_dtype
from ckptx.errors import CkptxError, TargetError
from ckptx.io.read.open import open_source
from ckptx.planning.execute import materialize
from ckptx.planning.planner import plan_recipe
from ckptx.planning.source import Source
from ckptx.rules.loader import load_rules
from ckptx.rules.recipe import Recipe, TargetSpec, VerifySpec
from ckptx.targets.instantiate import build_model

if TYPE_CHECKING:  # pragma: no cover
    import torch
else:
    torch = lazy_module("torch")

__all__ = ["VerificationResult", "verify_conversion"]


@dataclass(frozen=True)
class VerificationResult:
    """Outcome of running source and target models on one seeded input."""

    ok: bool
    max_abs_diff: float
    atol: float
    rtol: float
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    source_model: str
    target_model: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "ok": self.ok,
            "max_abs_diff": self.max_abs_diff,
            "atol": self.atol,
            "rtol": self.rtol,
            "input_shape": list(self.input_shape),
            "output_shape": list(self.output_shape),
            "source_model": self.source_model,
            "target_model": self.target_model,
        }

    def __str__(self) -> str:
        verdict = "OK" if self.ok else "FAILED"
        return (
            f"verification: {verdict}: {self.target_model} vs {self.source_model} on input "
            f"{list(self.input_shape)}: outputs {list(self.output_shape)}, max abs diff {self.max_abs_diff:.3g} "
            f"(atol {self.atol:g}, rtol {self.rtol:g})"
        )


def verify_conversion(
    recipe: Recipe,
    target: TargetSpec | None,
    src: Path,
    converted: Path,
    *,
    allow_globals: Sequence[str] = (),
    unsafe_pickle: bool = False,
) -> VerificationResult:
    """Load the converted file strictly into the real target model and compare outputs with the source model."""
    spec = recipe.verify
    if spec is None:
        raise CkptxError(f"--verify: recipe '{recipe.name}' has no `verify:` section (source_model, input_shape)")
    if target is None or not target.model:
        raise CkptxError("--verify needs a model target (module:callable), not a checkpoint or manifest")
    where = spec.where or "verify"
    source_model = build_model(spec.source_model, spec.source_kwargs, where, device="cpu", origin=spec.source_origin)
    with open_source(src, recipe.extract, allow_globals=allow_globals, unsafe_pickle=unsafe_pickle) as source:
        _load_strict(
            source_model, _source_state(source, spec), f"{where}.source_model", spec.source_model, _prefix_hint(spec)
        )
    target_model = build_model(
        target.model, target.kwargs, target.where or "target", device="cpu", origin=target.model_origin
    )
    with open_source(converted) as output:
        _load_strict(target_model, {k: output.load(k) for k in output.tensors}, "target", target.model, "")
    expected = _run(source_model, spec)
    _require_finite(expected, f"{where}.source_model", spec.source_model)
    actual = _run(target_model, spec)
    if expected.shape != actual.shape:
        raise TargetError(
            f"{where}: the source model returns shape {list(expected.shape)} but the target model "
            f"{list(actual.shape)}; set `output:` to the comparable output"
        )
    diff = (expected.double() - actual.double()).abs().max().item() if expected.numel() else 0.0
    ok = bool(torch.allclose(actual.double(), expected.double(), atol=spec.atol, rtol=spec.rtol))
    return VerificationResult(
        ok, diff, spec.atol, spec.rtol, spec.input_shape, tuple(actual.shape), spec.source_model, target.model
    )


def _source_state(source: Source, spec: VerifySpec) -> dict[str, torch.Tensor]:
    """The source weights as the source model takes them: `verify.source_rules` applied (a DDP `module.` prefix
    stripped, ...), else as extracted."""
    if not spec.source_rules:
        return {k: source.load(k) for k in source.tensors}
    plan = plan_recipe(load_rules(list(spec.source_rules)), source)
    return {entry.key: materialize(entry, source) for entry in plan.entries}


def _prefix_hint(spec: VerifySpec) -> str:
    return (
        "" if spec.source_rules else "; add `source_rules: [common/strip-module-prefix]` (or another recipe) to verify"
    )


def _load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str, name: str, hint: str) -> None:
    """Load `state` strictly; when it does not fit, one line with the counts and an example of each problem (not
    torch's message, which lists every key)."""
    wanted = model.state_dict()
    missing = [k for k in wanted if k not in state]
    unexpected = [k for k in state if k not in wanted]
    mismatched = [k for k in wanted if k in state and tuple(state[k].shape) != tuple(wanted[k].shape)]
    if missing or unexpected or mismatched:
        parts = [
            f"{len(found)} {what} (e.g. {found[0]!r})"
            for what, found in (("missing", missing), ("unexpected", unexpected), ("with another shape", mismatched))
            if found
        ]
        raise TargetError(
            f"{where}: {name} does not load the weights strictly: {', '.join(parts)}"
            f"{hint if unexpected and missing else ''}"
        )
    model.load_state_dict(state, strict=True)


def _require_finite(output: torch.Tensor, where: str, name: str) -> None:
    """The source model's own output must be finite: NaN or inf there means the source checkpoint (not the
    conversion) is broken, and comparing would prove nothing."""
    bad = int((~torch.isfinite(output)).sum()) if output.is_floating_point() else 0
    if bad:
        raise TargetError(
            f"{where}: {name} itself outputs {bad} non-finite value(s) (NaN or inf) of "
            f"{output.numel()} on the seeded input: the source checkpoint, not the conversion, is at "
            f"fault; nothing was compared"
        )


def _run(model: torch.nn.Module, spec: VerifySpec) -> torch.Tensor:
    generator = torch.Generator().manual_seed(spec.seed)
    dtype = torch_dtype(spec.input_dtype)
    if dtype.is_floating_point:
        x = torch.randn(spec.input_shape, generator=generator).to(dtype)
    else:
        x = torch.randint(0, 100, spec.input_shape, generator=generator, dtype=dtype)
    model.eval()
    with torch.no_grad():
        out = model(x)
    return _select(out, spec.output).float()


def _select(out: Any, name: str | None) -> torch.Tensor:
    """A tensor output as is; from a structured output, `name` (or logits / last_hidden_state / first item)."""
    if isinstance(out, torch.Tensor):
        return out
    if name:
        out = out[name] if isinstance(out, dict) else getattr(out, name)
    elif not isinstance(out, torch.Tensor):
        for attr in ("logits", "last_hidden_state"):
            if hasattr(out, attr):
                return getattr(out, attr)
        if isinstance(out, (tuple, list)) and out:
            out = out[0]
    if not isinstance(out, torch.Tensor):
        raise TargetError(f"verify: model output is {type(out).__name__}, not a tensor; set `output:` in verify")
    return out
