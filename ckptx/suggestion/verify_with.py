"""`--verify-with`: the `verify:` section for a source model factory, and the input it is run on."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

from ckptx.conversion.pipeline import convert
from ckptx.errors import TargetError, VerificationFailed
from ckptx.rules.recipe import Origin, Recipe
from ckptx.targets.instantiate import build_model
from ckptx.trust.callables import allow_factories
from ckptx.trust.usercode import import_callable

__all__ = ["convert_verified", "guess_input", "prefixed_model", "source_model_facts", "verify_section"]


def convert_verified(
    src: str,
    dst: str,
    recipe: Recipe,
    *,
    allow_globals: tuple[str, ...] = (),
    unsafe_pickle: bool = False,
    allowed: Sequence[str] = (),
) -> tuple[Any, VerificationFailed | None]:
    """`ckptx.convert(..., verify=True)`: (the verification result, None) or (its failed result, the error).
    `allowed`: the callables the user typed, which the recipe (a file) names."""
    try:
        with allow_factories(list(allowed)):
            result = convert(
                src, dst, recipe, verify=True, force=True, allow_globals=allow_globals, unsafe_pickle=unsafe_pickle
            )
    except VerificationFailed as exc:
        return exc.result, exc
    except TargetError as exc:  # a model that does not take the weights: its message can list every key
        text = str(exc)
        raise TargetError(text if len(text) < 400 else text[:400] + " ...") from None
    return result.verification, None


def source_model_facts(source_model: str, source_kwargs: Mapping[str, Any]) -> tuple[dict[str, str], int | None]:
    """What the source model (`--verify-with`, built on the meta device) says about its checkpoint's tensors: the kind
    of module holding each key (as for a model target) and its rotary dimensions per head (an `inv_freq` buffer)."""
    from ckptx.targets.resolve import module_kinds

    try:
        model = build_model(
            source_model, source_kwargs, "--verify-with", device="meta", origin=Origin.user("--verify-with")
        )
    except TargetError:
        return {}, None
    rotary = [2 * b.numel() for name, b in model.named_buffers() if name.rpartition(".")[2] == "inv_freq"]
    return module_kinds(model, model.state_dict()), (max(rotary) if rotary else None)


def guess_input(model: Any) -> tuple[tuple[int, ...], str]:
    """(input shape, dtype) a model plausibly takes: token ids for a model that starts with an embedding,
    an image batch (its configured size, else 64x64) for one that starts with a convolution."""
    import torch

    size = _image_size(model)
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            return (2, 8), "int64"
        if isinstance(module, (torch.nn.Conv2d,)):
            return (2, module.in_channels, size, size), "float32"
        if isinstance(module, torch.nn.Conv1d):
            return (2, module.in_channels, 64), "float32"
        if isinstance(module, torch.nn.Linear):
            return (2, module.in_features), "float32"
    raise TargetError("--verify-with: cannot tell what input the source model takes; give --verify-input 2,3,224,224")


def _image_size(model: Any) -> int:
    candidates = [
        getattr(getattr(model, "config", None), "image_size", None),
        getattr(model, "image_size", None),
        getattr(getattr(model, "patch_embed", None), "img_size", None),
    ]
    for cfg_name in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, cfg_name, None)
        if isinstance(cfg, Mapping) and "input_size" in cfg:
            candidates.append(cfg["input_size"][-1])
    for value in candidates:
        if isinstance(value, (list, tuple)) and value:
            value = value[-1]
        if isinstance(value, int) and value > 0:
            return value
    return 64


def prefixed_model(factory: str, prefix: str, kwargs: Mapping[str, Any] | None = None) -> Any:
    """The model `factory(**kwargs)` builds, held under `prefix` (`module.`, `module._orig_mod.`, `model.`) so that
    its state dict has the checkpoint's keys: the source model of a verification whose checkpoint carries a
    wrapper prefix. Calling it calls the model."""
    model = import_callable(factory, "verify.source_kwargs.factory")(**dict(kwargs or {}))
    holder = _holder_class()
    for name in reversed([p for p in prefix.split(".") if p]):
        model = holder(name, model)
    return model


@lru_cache(maxsize=1)
def _holder_class() -> type:
    """The wrapper module class (made on first use: importing this module does not import torch)."""
    import torch

    class Holder(torch.nn.Module):
        """One wrapper level (`module` of DataParallel, `_orig_mod` of torch.compile, a Lightning attribute)."""

        def __init__(self, name: str, inner: Any) -> None:
            super().__init__()
            self.add_module(name, inner)
            self.inner_name = name

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            return getattr(self, self.inner_name)(*args, **kwargs)

    return Holder


def verify_section(
    source_model: str,
    source_kwargs: Mapping[str, Any],
    input_shape: Sequence[int] | None,
    input_dtype: str | None,
    prefix: str = "",
) -> dict[str, Any]:
    """The recipe's `verify:` mapping; the input is guessed from the model when not given. With a wrapper
    `prefix` on the checkpoint's keys, the source model is held under it (`prefixed_model`), unless the model's own
    keys already start with it (an `nn.Sequential` named `net` is the model's, not a wrapper)."""
    import_callable(source_model, "--verify-with")  # a factory that cannot be imported is reported as such
    try:
        model = build_model(
            source_model, source_kwargs, "--verify-with", device="meta", origin=Origin.user("--verify-with")
        )
    except TargetError:
        model = build_model(
            source_model,
            source_kwargs,
            "--verify-with",
            device="cpu",  # not meta-safe
            origin=Origin.user("--verify-with"),
        )
    if prefix and all(k.startswith(prefix) for k in model.state_dict()):
        prefix = ""
    if input_shape is None:
        shape, dtype = guess_input(model)
        input_shape, input_dtype = shape, input_dtype or dtype
    if prefix:
        section: dict[str, Any] = {
            "source_model": "ckptx.suggestion.verify_with:prefixed_model",
            "source_kwargs": {
                "factory": source_model,
                "prefix": prefix,
                **({"kwargs": dict(source_kwargs)} if source_kwargs else {}),
            },
        }
    else:
        section = {"source_model": source_model}
        if source_kwargs:
            section["source_kwargs"] = dict(source_kwargs)
    section["input_shape"] = list(input_shape)
    if input_dtype and input_dtype != "float32":
        section["input_dtype"] = input_dtype
    return section
