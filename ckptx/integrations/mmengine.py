"""The `Ckptx` weight initializer for mmengine models (MMPretrain, MMDetection, MMSegmentation, ...).

In a config::

    custom_imports = dict(imports=['ckptx.integrations.mmengine'], allow_failed_imports=False)
    model = dict(backbone=dict(..., init_cfg=dict(
        type='Ckptx', checkpoint='convnextv2_atto_1k_224_ema.pt', recipe='convnextv2/official-to-mmpretrain',
        prefix='backbone.', params=dict(size='atto'), allow_globals=['argparse.Namespace'])))

At `init_weights()` the checkpoint is read with ckptx's safe readers, converted by the recipe in memory
(no converted copy on disk), the sub-tree under `prefix` is kept (prefix stripped), and the result is
validated against the module being initialized: anything missing, unexpected or mis-shaped raises
`ckptx.ValidationFailed` with the usual report before a single weight changes (`strict=False` loads
what fits instead). Recipe parameters declared `{infer: [...]}` and not given in `params` are chosen
by validating against that module.

mmengine gives `type='Pretrained'` two privileges that any other initializer lacks: it runs after the
sub-modules' own `init_weights`, and backbones test `init_cfg['type'] == 'Pretrained'` to skip their
re-initialisation of loaded weights (MMPretrain's ResNet `zero_init_residual`, ViT's `pos_embed`, ...).
`Ckptx` earns both: it first runs the sub-modules' pending `init_weights`, and after loading it marks
the module's `init_cfg` as `type='Pretrained'` (the Ckptx settings kept, `loaded_by='Ckptx'`). An
initializer that would still run after it in the same `init_cfg` list is refused (`InitConfigError`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from mmengine.logging import print_log
from mmengine.model.weight_init import update_init_info
from mmengine.model.wrappers.utils import is_model_wrapper
from mmengine.registry import WEIGHT_INITIALIZERS

from ckptx.check.inferred import choose_variant
from ckptx.check.validation import ValidationReport, validate
from ckptx.errors import InitConfigError, ValidationFailed
from ckptx.io.read.open import open_source
from ckptx.planning.execute import materialize
from ckptx.planning.planner import plan_recipe
from ckptx.rules.loader import load_rules
from ckptx.rules.recipe import Recipe
from ckptx.targets.resolve import Target, resolve_target

__all__ = ["CkptxInit", "InitConfigError", "LoadResult", "load_converted"]

NAME = "Ckptx"
PRETRAINED = "Pretrained"


@dataclass(frozen=True)
class LoadResult:
    """What `load_converted` did: the validation report, the recipe as resolved, and the keys it loaded."""

    report: ValidationReport
    recipe: Recipe
    loaded: tuple[str, ...]
    skipped: tuple[str, ...] = ()
    inferred: Mapping[str, Any] | None = None


def load_converted(
    module: torch.nn.Module,
    checkpoint: str | Path,
    recipe: str | Sequence[str] | Recipe,
    *,
    prefix: str | None = None,
    params: Mapping[str, Any] | None = None,
    allow_globals: Sequence[str] = (),
    unsafe_pickle: bool = False,
    strict: bool = True,
) -> LoadResult:
    """Convert `checkpoint` with `recipe` in memory and load the sub-tree under `prefix` into `module`.

    Validates first against `module` (its keys as `prefix + key`; keys outside `prefix` are left out):
    with `strict`, any missing, unexpected or mis-shaped key raises ValidationFailed and nothing is
    loaded; without, the keys that fit are loaded and the rest listed in `LoadResult.skipped`.
    """
    prefix = prefix or ""
    loaded_recipe = recipe if isinstance(recipe, Recipe) else load_rules(recipe, params=params)
    target = _prefixed(resolve_target(module), prefix)
    with open_source(
        checkpoint, loaded_recipe.extract, allow_globals=allow_globals, unsafe_pickle=unsafe_pickle
    ) as source:
        inferred = None
        if loaded_recipe.inferred:
            chosen = choose_variant(loaded_recipe, source, lambda candidate: target)
            loaded_recipe, inferred = chosen.recipe, None if chosen.alike else dict(chosen.values)
        plan = plan_recipe(loaded_recipe, source, target=target.tensors)
        report = validate(plan, target)
        if strict and not report.ok:
            raise ValidationFailed(report)
        unfit = {p.key for p in report.shape_mismatches}
        state, skipped = {}, sorted(unfit | {p.key for p in report.unexpected})
        for entry in plan.entries:
            if entry.key.startswith(prefix) and entry.key not in unfit:
                state[entry.key[len(prefix) :]] = materialize(entry, source)
    module.load_state_dict(state, strict=strict)
    return LoadResult(report, loaded_recipe, tuple(state), tuple(skipped), inferred)


def _prefixed(target: Target, prefix: str) -> Target:
    """The module's keys as they appear in the converted checkpoint; keys outside `prefix` are allowed there."""
    if not prefix:
        return target
    return Target(
        f"{target.description} (as '{prefix}*' of the converted checkpoint)",
        {prefix + key: meta for key, meta in target.tensors.items()},
        allow_unexpected=(re.compile("^(?!" + re.escape(prefix) + ")"),),
        notes=target.notes,
    )


@WEIGHT_INITIALIZERS.register_module(name=NAME)
class CkptxInit:
    """mmengine weight initializer: a checkpoint converted by a ckptx recipe, validated, then loaded.

    Args:
        checkpoint: the source checkpoint (any format ckptx reads; a local path, or anything mmengine's
            `get_local_path` fetches with `backend_args`).
        recipe: a recipe name or path, or a list of them composed in order.
        prefix: keep only the converted keys under this prefix (e.g. `backbone.`), stripped.
        params: recipe parameters (`--set`); inferred ones left out are chosen against the module.
        allow_globals: pickle globals the safe reader may allow (e.g. `argparse.Namespace`).
        unsafe_pickle: read pickles with full trust (runs their code).
        strict: raise when anything does not fit (default); False loads what fits.
        backend_args: mmengine file backend arguments for a remote `checkpoint`.
        map_location: accepted for drop-in compatibility with `Pretrained` and ignored: tensors are read
            on the CPU and copied into the module wherever it lives.
    """

    def __init__(
        self,
        checkpoint: str,
        recipe: str | Sequence[str],
        prefix: str | None = None,
        params: Mapping[str, Any] | None = None,
        allow_globals: Sequence[str] = (),
        unsafe_pickle: bool = False,
        strict: bool = True,
        backend_args: Mapping[str, Any] | None = None,
        map_location: str | None = None,
    ) -> None:
        if not checkpoint or not recipe:
            raise InitConfigError(f"init_cfg type='{NAME}': give checkpoint=... and recipe=... (a recipe name or path)")
        self.checkpoint = str(checkpoint)
        self.recipe = recipe if isinstance(recipe, str) else list(recipe)
        self.prefix = prefix
        self.params = dict(params or {})
        self.allow_globals = [str(g) for g in ([allow_globals] if isinstance(allow_globals, str) else allow_globals)]
        self.unsafe_pickle = bool(unsafe_pickle)
        self.strict = bool(strict)
        self.backend_args = dict(backend_args) if backend_args else None
        self.wholemodule = False  # set by mmengine's initialize() for `override=` entries
        self.result: LoadResult | None = None

    def __call__(self, module: torch.nn.Module) -> None:
        """Initialize `module`: what mmengine would still run on its sub-modules first, then the checkpoint."""
        _check_last(module, self.wholemodule)
        _init_submodules_first(module, self.wholemodule)
        from mmengine.fileio import get_local_path

        with get_local_path(self.checkpoint, backend_args=self.backend_args) as local:
            self.result = load_converted(
                module,
                local,
                self.recipe,
                prefix=self.prefix,
                params=self.params,
                allow_globals=self.allow_globals,
                unsafe_pickle=self.unsafe_pickle,
                strict=self.strict,
            )
        if not self.wholemodule:
            _mark_pretrained(module)
        print_log(self._summary(), logger="current")
        if self.result.skipped or not self.result.report.ok:
            print_log(f"{NAME} (strict=False) left out:\n{self.result.report}", logger="current", level=logging.WARNING)
        if hasattr(module, "_params_init_info"):
            update_init_info(module, init_info=self._summary())

    def _summary(self) -> str:
        result = self.result
        chosen = (
            f", {', '.join(f'{k}={v}' for k, v in result.inferred.items())} chosen from the checkpoint"
            if result and result.inferred
            else ""
        )
        under = f" ({self.prefix}*)" if self.prefix else ""
        count = f": {len(result.loaded)} tensors" if result else ""
        return f"{NAME}: {self.checkpoint}{under} converted by {self.recipe}{chosen}{count}"


def _is_ckptx(cfg: Any) -> bool:
    return isinstance(cfg, Mapping) and cfg.get("type") in (NAME, CkptxInit)


def _check_last(module: torch.nn.Module, wholemodule: bool) -> None:
    """Refuse an init_cfg in which something would overwrite the loaded weights after Ckptx."""
    cfgs = getattr(module, "init_cfg", None)
    if wholemodule or not cfgs:
        return
    cfgs = [cfgs] if isinstance(cfgs, Mapping) else list(cfgs)
    last = max((i for i, c in enumerate(cfgs) if _is_ckptx(c)), default=None)
    if last is None:
        return
    later = [
        c
        for i, c in enumerate(cfgs)
        if isinstance(c, Mapping) and not _is_ckptx(c) and (i > last or c.get("type") == PRETRAINED)
    ]
    if later:
        names = ", ".join(str(c.get("type")) for c in later)
        raise InitConfigError(
            f"{type(module).__name__}.init_cfg: {names} would run after {NAME} and overwrite the "
            f"weights it loads; put type='{NAME}' last and drop any 'Pretrained' entry"
        )


def _init_submodules_first(module: torch.nn.Module, wholemodule: bool) -> None:
    """Run now the sub-modules' `init_weights` that mmengine would run after this initializer.

    mmengine applies a module's init_cfg before its children's `init_weights`, except `Pretrained`,
    which it applies last; this gives Ckptx the same place.
    """
    if wholemodule and hasattr(module, "init_weights") and not getattr(module, "is_init", False):
        cast(Any, module).init_weights()  # an `override=` naming this module: its own init_weights would come later
        return
    for child in module.children():
        if is_model_wrapper(child) and not hasattr(child, "init_weights"):
            child = cast(Any, child).module
        if hasattr(child, "init_weights") and not getattr(child, "is_init", False):
            cast(Any, child).init_weights()
            if hasattr(child, "_params_init_info"):
                update_init_info(
                    child, init_info=f"Initialized by user-defined `init_weights` in {type(child).__name__} "
                )


def _mark_pretrained(module: torch.nn.Module) -> None:
    """Let the module's own init_weights see pretrained weights (`init_cfg['type'] == 'Pretrained'`)."""
    cfg = getattr(module, "init_cfg", None)
    if isinstance(cfg, dict) and _is_ckptx(cfg):
        cast(Any, module).init_cfg = {**cfg, "type": PRETRAINED, "loaded_by": NAME}
