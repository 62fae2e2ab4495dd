"""HuggingFace model folders as output: what `AutoModel*.from_pretrained(DIR)` opens, written as one set.

`ckptx convert SRC -r RULES -o DIR/` (a trailing slash, or an existing folder) with a transformers target
writes `config.json` (the target model's config, with `architectures` and `dtype` as `save_pretrained`
sets them), `generation_config.json` for models that generate, and `model.safetensors`, or
`model-0000i-of-0000N.safetensors` + `model.safetensors.index.json` past `--max-shard-size`. Every file
is written and fsynced in a hidden staging folder inside DIR, then renamed into place with
`config.json` last: until the set is complete, the folder holds no config that `from_pretrained`
could open with the new weights (an old config and index are removed first when `--force` replaces a
set). On any failure no file of the new set is left under its final name.
"""

from __future__ import annotations

import copy
import os
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptx.errors import DestinationError
from ckptx.io.spans import Progress
from ckptx.io.write.atomic import publish, staging_folder
from ckptx.io.write.destination import InputFiles
from ckptx.io.write.sharded_writer import (
    INDEX_SUFFIX,
    ShardLayout,
    check_layout,
    shard_layout,
    stage_bytes,
    stage_layout,
)
from ckptx.planning.entry import PlanEntry
from ckptx.planning.source import Source
from ckptx.rules.recipe import TargetSpec

__all__ = [
    "CONFIG",
    "FOLDER_FORMAT",
    "GENERATION_CONFIG",
    "WEIGHTS",
    "ModelFolder",
    "is_folder_destination",
    "model_folder",
    "write_model_folder",
]

FOLDER_FORMAT = "hf-folder"
CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
WEIGHTS = "model.safetensors"


def is_folder_destination(dst: str | Path) -> bool:
    """True when `-o DST` names a folder: it ends with a path separator or is an existing folder."""
    text = os.fspath(dst)
    return text.endswith(("/", os.sep)) or Path(text).is_dir()


@dataclass(frozen=True)
class ModelFolder:
    """The files of one HF model folder: the weights layout and the JSON documents beside it."""

    folder: Path
    layout: ShardLayout
    documents: Mapping[str, bytes]

    @property
    def weights(self) -> Path:
        """The file `from_pretrained` reads the weights from: the index, or the single safetensors file."""
        return self.layout.index or self.layout.files[0][0]


def model_folder(
    folder: Path,
    entries: list[PlanEntry],
    spec: TargetSpec | None,
    *,
    max_shard_size: int | None,
    force: bool,
    inputs: InputFiles,
) -> tuple[ModelFolder, list[str]]:
    """Lay out the folder for these entries and this (transformers) target; refuse what cannot be written.

    Returns the layout and notes. Raises DestinationError when the target is not a transformers model,
    the folder's parent does not exist, or files exist without `force`.
    """
    if folder.exists() and not folder.is_dir():
        raise DestinationError(f"{folder}: exists and is not a folder; give a folder (DIR/) or a file name")
    if not folder.parent.is_dir():
        raise DestinationError(f"{folder}: folder {folder.parent} does not exist; create it first")
    documents = _documents(spec, entries, str(folder))
    layout = shard_layout(folder / WEIGHTS, entries, max_shard_size)
    notes = check_layout(layout, force=force, inputs=inputs) if folder.is_dir() else []
    inputs.check_all(
        [folder / name for name in documents] + _replaced(folder), force=force, what="a file of the model folder"
    )
    return ModelFolder(folder, layout, documents), notes


def write_model_folder(
    target: ModelFolder,
    source: Source,
    metadata: Mapping[str, str],
    progress: Progress | None = None,
    check: Callable[[Path], None] | None = None,
) -> int:
    """Write every file in a staging folder, `check(staged weights)` if given, then publish, config last.

    Returns the bytes written. A failure leaves no file of the new set under its final name (and removes
    the folder again if this call created it).
    """
    folder = target.folder
    created = not folder.exists()
    folder.mkdir(exist_ok=True)
    try:
        return _write(target, source, metadata, progress, check)
    except BaseException:
        if created:
            try:
                folder.rmdir()
            except OSError:
                pass
        raise


def _write(
    target: ModelFolder,
    source: Source,
    metadata: Mapping[str, str],
    progress: Progress | None,
    check: Callable[[Path], None] | None,
) -> int:
    with staging_folder(target.folder / WEIGHTS) as stage:
        moves, total = stage_layout(stage, target.layout, source, metadata, progress)
        if check is not None:
            check(stage / target.weights.name)
        for name in sorted(target.documents, key=lambda n: n == CONFIG):  # config.json last: it completes the set
            total += stage_bytes(stage / name, target.documents[name])
            moves.append((stage / name, target.folder / name))
        publish(moves, remove_first=[p for p in _replaced(target.folder) if p.exists()])
    return total


def _replaced(folder: Path) -> list[Path]:
    """What a new set replaces (removed before any rename, so no old config or index names new weights)."""
    return [folder / CONFIG, folder / WEIGHTS, folder / f"model{INDEX_SUFFIX}"]


def _documents(spec: TargetSpec | None, entries: list[PlanEntry], where: str) -> dict[str, bytes]:
    """`config.json` (and `generation_config.json`) of the target model, as `save_pretrained` writes them."""
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
    from ckptx.targets.build import build_model

    model = build_model(spec.model, spec.kwargs, spec.where or "target")
    config = getattr(model, "config", None)
    if config is None or not callable(getattr(config, "to_json_string", None)):
        raise DestinationError(
            f"{where}: a model folder is what transformers' from_pretrained opens, and "
            f"{spec.describe()} is not a transformers model; write a .safetensors or .pth file"
        )
    return model


def _can_generate(model: Any) -> bool:
    try:
        return bool(model.can_generate())
    except Exception:  # noqa: BLE001 - an older or custom model class: no generation config then
        return False


def _main_dtype(entries: list[PlanEntry]) -> str | None:
    """The floating-point dtype holding most of the bytes (what `save_pretrained` records as `dtype`)."""
    weights: Counter[str] = Counter()
    for entry in entries:
        if entry.meta.dtype.startswith(("float", "bfloat")):
            weights[entry.meta.dtype] += entry.meta.nbytes
    return weights.most_common(1)[0][0] if weights else None
