"""`--verify-with`: the `verify:` section for a source model factory, and the input it is run on."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from ckptx.suggest._compat import TargetError, build_model

__all__ = ["guess_input", "verify_section"]


def guess_input(model: Any) -> tuple[tuple[int, ...], str]:
    """(input shape, dtype) a model plausibly takes: token ids for a model that starts with an embedding,
    an image batch (its configured size, else 64x64) for one that starts with a convolution."""
    import torch  # noqa: PLC0415

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
    candidates = [getattr(getattr(model, "config", None), "image_size", None), getattr(model, "image_size", None),
                  getattr(getattr(model, "patch_embed", None), "img_size", None)]
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


def verify_section(source_model: str, source_kwargs: Mapping[str, Any], input_shape: Sequence[int] | None,
                   input_dtype: str | None) -> dict[str, Any]:
    """The recipe's `verify:` mapping; the input is guessed from the model when not given."""
    if input_shape is None:
        try:
            model = build_model(source_model, source_kwargs, "--verify-with", device="meta")
        except TargetError as exc:
            if "cannot import" in str(exc) or "no attribute" in str(exc) or "not callable" in str(exc):
                raise
            model = build_model(source_model, source_kwargs, "--verify-with", device="cpu")  # not meta-safe
        shape, dtype = guess_input(model)
        input_shape, input_dtype = shape, input_dtype or dtype
    section: dict[str, Any] = {"source_model": source_model}
    if source_kwargs:
        section["source_kwargs"] = dict(source_kwargs)
    section["input_shape"] = list(input_shape)
    if input_dtype and input_dtype != "float32":
        section["input_dtype"] = input_dtype
    return section
