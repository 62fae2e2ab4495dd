"""The documents of a HuggingFace model folder: `config.json` (and `generation_config.json` for models that
generate) of a transformers target, as `save_pretrained` writes them, with `architectures` and `dtype` set for the
weights being written. The folder itself is written by `ckptx/io/write/hf_folder_writer.py`."""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Sequence
from typing import Any

from ckptx.errors import DestinationError
from ckptx.io.write.hf_folder_writer import CONFIG
from ckptx.planning.entry import PlanEntry
from ckptx.rules.recipe import TargetSpec
from ckptx.targets.instantiate import build_model

__all__ = ["GENERATION_CONFIG", "folder_documents"]

GENERATION_CONFIG = "generation_config.json"


def folder_documents(spec: TargetSpec | None, entries: Sequence[PlanEntry], where: str) -> dict[str, bytes]:
    """`config.json` (and `generation_config.json`) of the target model for these entries."""
    model = _transformers_model(spec, where)
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    config.dtype = _main_dtype(entries) or str(model.dtype).split(".")[1]
    documents = {CONFIG: config.to_json_string(use_diff=True).encode("utf-8")}
    generation = getattr(model, "generation_config", None)
    if generation is not None and _can_generate(model):
        documents[GENERATION_CONFIG] = generation.to_json_string(use_diff=True).encode("utf-8")
    return documents


def _transformers_model(spec: TargetSpec | None, where: str) -> Any:
    if spec is None or not spec.model:
        raise DestinationError(
            f"{where}: a model folder needs a transformers target (its config becomes config.json); "
            f"give --target module:callable, or write a .safetensors file instead"
        )
    model = build_model(spec.model, spec.kwargs, spec.where or "target", origin=spec.model_origin)
    config = getattr(model, "config", None)
    if config is None or not callable(getattr(config, "to_json_string", None)):
        raise DestinationError(
            f"{where}: a model folder is what transformers' from_pretrained opens, and "
            f"{spec.describe()} is not a transformers model; write a .safetensors or .pth file"
        )
    return model


def _can_generate(model: Any) -> bool:
    """Whether transformers would write a generation config for this model (an older or custom class without
    `can_generate` does not generate)."""
    can_generate = getattr(model, "can_generate", None)
    return bool(can_generate()) if callable(can_generate) else False


def _main_dtype(entries: Sequence[PlanEntry]) -> str | None:
    """The floating-point dtype holding most of the bytes (what `save_pretrained` records as `dtype`)."""
    weights: Counter[str] = Counter()
    for entry in entries:
        if entry.meta.dtype.startswith(("float", "bfloat")):
            weights[entry.meta.dtype] += entry.meta.nbytes
    return weights.most_common(1)[0][0] if weights else None
