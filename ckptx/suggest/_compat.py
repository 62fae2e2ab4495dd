"""The ckptx internals `suggest` builds on, imported in one place (the package layout may move under it)."""

from __future__ import annotations

from typing import Sequence

from ckptx.errors import CkptxError, DestinationError, PlanError, SourceError, TargetError
from ckptx.dtypes import TensorMeta, dtype_name
from ckptx.io.manifest import read_manifest
from ckptx.io.open import open_source, sniff_format
from ckptx.io.source import MappingSource, is_tensor
from ckptx.ops.registry import ops_of
from ckptx.rules import Recipe, TargetSpec
from ckptx.rules.loader import load_rules_text
from ckptx.target import Target, build_model, parse_target_arg, resolve_target
from ckptx.usercode import import_callable
from ckptx.validate import ValidationReport, validate

__all__ = ["CkptxError", "DestinationError", "MappingSource", "PlanError", "Recipe", "SourceError", "Target", "TargetError", "TargetSpec", "TensorMeta",
           "ValidationReport", "build_model", "dtype_name", "import_callable", "is_tensor", "load_object_tree", "load_rules_text", "open_source", "ops_of",
           "convert_verified", "parse_target_arg", "plan_recipe", "resolve_with_ties", "read_manifest", "resolve_target", "sniff_format", "validate"]


def plan_recipe(recipe: Recipe, source: object, target: object = None):  # type: ignore[no-untyped-def]
    """`ckptx.plan.plan_recipe` (imported on first use)."""
    from ckptx.plan import plan_recipe as plan  # noqa: PLC0415

    return plan(recipe, source, target=target)


def load_object_tree(path: str, *, allow_globals: tuple[str, ...] = (), unsafe_pickle: bool = False) -> object:
    """The whole object of a torch checkpoint with tensors as metadata where possible.

    A plain torch zip file is read from its pickle references alone (no tensor byte, no torch); anything
    else goes through the safe `torch.load` (memory-mapped), with the same `--allow-global` rules as convert.
    """
    from pathlib import Path  # noqa: PLC0415

    from ckptx.io.torch_reader import load_pickle_object  # noqa: PLC0415

    try:
        from ckptx.io.torch_zip import read_references  # noqa: PLC0415

        obj, unknown, _records, little = read_references(path)
        if not unknown and little:
            return obj
    except Exception:  # noqa: BLE001 - anything unusual goes to torch, which reports precisely
        pass
    return load_pickle_object(Path(path), allow_globals=allow_globals, unsafe_pickle=unsafe_pickle, display=path)


def convert_verified(src: str, dst: str, recipe: Recipe, *, allow_globals: tuple[str, ...] = (),
                     unsafe_pickle: bool = False, allowed: Sequence[str] = ()):  # type: ignore[no-untyped-def]
    """`ckptx.convert(..., verify=True)`: (the verification result, None) or (its failed result, the error).
    `allowed`: the callables the user typed, which the recipe (a file) names."""
    from ckptx.convert import convert  # noqa: PLC0415
    from ckptx.errors import VerificationFailed  # noqa: PLC0415
    from ckptx.trust import allow_factories  # noqa: PLC0415

    try:
        with allow_factories(list(allowed)):
            result = convert(src, dst, recipe, verify=True, force=True, allow_globals=allow_globals,
                             unsafe_pickle=unsafe_pickle)
    except VerificationFailed as exc:
        return exc.result, exc
    except TargetError as exc:  # a model that does not take the weights: its message can list every key
        text = str(exc)
        raise TargetError(text if len(text) < 400 else text[:400] + " ...") from None
    return result.verification, None


def resolve_with_ties(spec: TargetSpec) -> tuple[Target, tuple[tuple[str, ...], ...]]:
    """`resolve_target(spec)`, and for a model target the groups of keys that share one tensor (tied weights:
    an output head and the token embedding), found from the same single build on the meta device."""
    if not spec.model:
        return resolve_target(spec), ()
    where = spec.where or "target"
    import_callable(spec.model, where)  # a factory that cannot be imported is reported as such
    notes: tuple[str, ...] = ()
    try:
        model = build_model(spec.model, spec.kwargs, where, origin=spec.model_origin)
    except TargetError as exc:
        model = build_model(spec.model, spec.kwargs, where, device="cpu", origin=spec.model_origin)
        notes = (f"built on the CPU: the factory does not run on the meta device ({exc})",)
    state = model.state_dict(keep_vars=True)  # the parameters themselves: tied ones are one object
    import torch  # noqa: PLC0415 - a model target has imported it already

    tensors = {k: TensorMeta(tuple(v.shape), dtype_name(v.dtype)) for k, v in state.items() if isinstance(v, torch.Tensor)}
    groups: dict[int, list[str]] = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            groups.setdefault(id(value), []).append(key)
    ties = tuple(tuple(keys) for keys in groups.values() if len(keys) > 1)
    return Target(spec.describe(), tensors, spec.allow_missing, spec.allow_unexpected, notes), ties
