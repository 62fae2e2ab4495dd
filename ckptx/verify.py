"""Numerical verification: the converted target model must compute what the source model computes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ckptx._lazy import lazy_module
from ckptx.errors import CkptxError, TargetError
from ckptx.dtypes import torch_dtype
from ckptx.io.open import open_source
from ckptx.rules import Recipe, TargetSpec, VerifySpec
from ckptx.target import build_model

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
        return {"ok": self.ok, "max_abs_diff": self.max_abs_diff, "atol": self.atol, "rtol": self.rtol,
                "input_shape": list(self.input_shape), "output_shape": list(self.output_shape),
                "source_model": self.source_model, "target_model": self.target_model}

    def __str__(self) -> str:
        verdict = "OK" if self.ok else "FAILED"
        return (f"verification: {verdict}: {self.target_model} vs {self.source_model} on input "
                f"{list(self.input_shape)}: outputs {list(self.output_shape)}, max abs diff {self.max_abs_diff:.3g} "
                f"(atol {self.atol:g}, rtol {self.rtol:g})")


def verify_conversion(recipe: Recipe, target: TargetSpec | None, src: Path, converted: Path, *,
                      allow_globals: Sequence[str] = (), unsafe_pickle: bool = False) -> VerificationResult:
    """Load the converted file strictly into the real target model and compare outputs with the source model."""
    spec = recipe.verify
    if spec is None:
        raise CkptxError(f"--verify: recipe '{recipe.name}' has no `verify:` section (source_model, input_shape)")
    if target is None or not target.model:
        raise CkptxError("--verify needs a model target (module:callable), not a checkpoint or manifest")
    where = spec.where or "verify"
    source_model = build_model(spec.source_model, spec.source_kwargs, where, device="cpu", origin=spec.source_origin)
    with open_source(src, recipe.extract, allow_globals=allow_globals, unsafe_pickle=unsafe_pickle) as source:
        _load_strict(source_model, {k: source.load(k) for k in source.tensors}, f"{where}.source_model", spec.source_model)
    target_model = build_model(target.model, target.kwargs, target.where or "target", device="cpu",
                               origin=target.model_origin)
    with open_source(converted) as output:
        _load_strict(target_model, {k: output.load(k) for k in output.tensors}, "target", target.model)
    expected, actual = _run(source_model, spec), _run(target_model, spec)
    if expected.shape != actual.shape:
        raise TargetError(f"{where}: the source model returns shape {list(expected.shape)} but the target model "
                          f"{list(actual.shape)}; set `output:` to the comparable output")
    diff = (expected.double() - actual.double()).abs().max().item() if expected.numel() else 0.0
    ok = bool(torch.allclose(actual.double(), expected.double(), atol=spec.atol, rtol=spec.rtol))
    return VerificationResult(ok, diff, spec.atol, spec.rtol, spec.input_shape, tuple(actual.shape),
                              spec.source_model, target.model)


def _load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str, name: str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[:3]
        raise TargetError(f"{where}: {name} does not load the weights strictly: {' '.join(first)}") from None


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
