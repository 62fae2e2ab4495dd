"""The documents of a HuggingFace model folder: `config.json` (and `generation_config.json` for models that
generate) and the folder's other files. The folder itself is written by `ckptx/io/write/hf_folder_writer.py`.

A target built by a model factory gets its config as `save_pretrained` writes it. A target that is a model folder's
config (`--target DIR/`, or the source folder's own when no target is given) has that document carried: its
fields as they are, the `--target-arg` overrides applied and `dtype` set for the weights written; its other
files (tokenizer files, `generation_config.json`, chat templates, README) are copied as they are.
"""

from __future__ import annotations

import copy
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ckptx.errors import DestinationError
from ckptx.io.read.model_folder import CONFIG_DOCUMENTS, WEIGHT_SUFFIXES
from ckptx.io.write.hf_folder_writer import CONFIG
from ckptx.planning.entry import PlanEntry
from ckptx.rules.recipe import TargetSpec
from ckptx.targets.hf_model import ModelConfig, build_from_config, load_model_config
from ckptx.targets.instantiate import build_model

__all__ = ["GENERATION_CONFIG", "FolderContents", "folder_contents", "folder_documents", "other_files"]

GENERATION_CONFIG = "generation_config.json"


class FolderContents:
    """What a model folder holds besides its weights: documents written anew, files copied as they are."""

    def __init__(self, documents: Mapping[str, bytes], copies: Mapping[str, Path]) -> None:
        self.documents = dict(documents)
        self.copies = dict(copies)


def folder_contents(spec: TargetSpec | None, entries: Sequence[PlanEntry], where: str) -> FolderContents:
    """`config.json`, `generation_config.json` and the files copied from the config's folder, for these entries."""
    if spec is not None and spec.config:
        config = load_model_config(spec.config, spec.kwargs, where=spec.where or "target")
        copies = other_files(config)
        documents = {CONFIG: _carried_config(config, entries)}
        if GENERATION_CONFIG not in copies:
            generation = _generation_config(build_from_config(config))
            if generation is not None:
                documents[GENERATION_CONFIG] = generation
        return FolderContents(documents, copies)
    return FolderContents(folder_documents(spec, entries, where), {})


def folder_documents(spec: TargetSpec | None, entries: Sequence[PlanEntry], where: str) -> dict[str, bytes]:
    """`config.json` (and `generation_config.json`) of a model-factory target for these entries."""
    model = _transformers_model(spec, where)
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    config.dtype = _main_dtype(entries) or str(model.dtype).split(".")[1]
    documents = {CONFIG: config.to_json_string(use_diff=True).encode("utf-8")}
    generation = _generation_config(model)
    if generation is not None:
        documents[GENERATION_CONFIG] = generation
    return documents


def other_files(config: ModelConfig) -> dict[str, Path]:
    """The files of a HuggingFace model folder that go along with its config: every regular, visible file that is
    neither a config document (written anew) nor weights (of this or another framework) nor a shard index; none
    from Meta's folders, whose tokenizer and files are not a HuggingFace folder's."""
    if config.file.name != CONFIG:
        return {}
    found = {}
    for path in sorted(config.folder.iterdir()):
        name = path.name
        if name.startswith(".") or name in CONFIG_DOCUMENTS or not path.is_file() or path.is_symlink():
            continue
        if name.endswith(".index.json") or name.lower().endswith(WEIGHT_SUFFIXES):
            continue
        found[name] = path
    return found


def _carried_config(config: ModelConfig, entries: Sequence[PlanEntry]) -> bytes:
    """The config document as it was, with `dtype` (and a legacy `torch_dtype`) set for the weights written."""
    document = dict(config.document)
    dtype = _main_dtype(entries)
    if dtype is not None:
        document["dtype"] = dtype
        if "torch_dtype" in document:
            document["torch_dtype"] = dtype
    return (json.dumps(document, indent=2, sort_keys=False, allow_nan=True) + "\n").encode("utf-8")


def _generation_config(model: Any) -> bytes | None:
    generation = getattr(model, "generation_config", None)
    if generation is None or not _can_generate(model):
        return None
    text: str = generation.to_json_string(use_diff=True)
    return text.encode("utf-8")


def _transformers_model(spec: TargetSpec | None, where: str) -> Any:
    if spec is None or not spec.model:
        raise DestinationError(
            f"{where}: a model folder needs a transformers target (its config becomes config.json); "
            f"give --target DIR/ (a model folder or its config.json) or --target module:callable, or write a "
            f".safetensors file instead"
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
