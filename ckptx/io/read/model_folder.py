"""Model folders as sources: a HuggingFace model folder (`config.json` beside `model.safetensors`, shards and their
index, or `pytorch_model.bin`) and Meta's reference layout (`params.json` beside one `consolidated.00.pth`), and the
config documents found beside any checkpoint (what recipes read head counts and model sizes from).

Only JSON is read here: a config document is data, never code (`auto_map` and custom code are ignored).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptx.errors import SourceError, UnreadableFile
from ckptx.files import read_bounded, regular_size

__all__ = [
    "CONFIG",
    "CONFIG_DOCUMENTS",
    "PARAMS",
    "ModelFolder",
    "config_documents",
    "find_model_folder",
    "read_json_document",
]

CONFIG = "config.json"  # HuggingFace transformers
PARAMS = "params.json"  # Meta's reference format (llama-models)
CONFIG_DOCUMENTS = (CONFIG, PARAMS)
_MAX_DOCUMENT = 16 * 2**20  # a config is a few KiB; a bigger "config" is not one (and is not read into memory)

# The weight files of a HuggingFace folder, in the order transformers' from_pretrained prefers them.
_HF_WEIGHTS = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json", "pytorch_model.bin")
# Files that are weights (of this or another framework) and never copied beside new weights as "other files".
WEIGHT_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pth",
    ".pt",
    ".ckpt",
    ".h5",
    ".msgpack",
    ".gguf",
    ".onnx",
    ".distcp",
    ".npz",
)


@dataclass(frozen=True)
class ModelFolder:
    """A folder that holds one model: its weights (the file to open) and what kind of folder it is."""

    folder: Path
    weights: Path
    kind: str  # "hf" (config.json) or "meta" (params.json)

    @property
    def config_file(self) -> Path:
        """`config.json` (HuggingFace) or `params.json` (Meta)."""
        return self.folder / (CONFIG if self.kind == "hf" else PARAMS)

    def describe(self) -> str:
        """One line for `ckptx inspect`."""
        what = "HuggingFace model folder" if self.kind == "hf" else "Meta reference-format folder"
        return f"{what}: {self.config_file.name} and {self.weights.name}"


def find_model_folder(folder: Path, shown: str) -> ModelFolder | None:
    """The model folder `folder` is, or None when it holds no config document. A folder with a config but no
    weights (or with weights ckptx cannot choose between) is refused with the reason, and so is a config document
    that is not a regular file (a FIFO named config.json is never waited on)."""
    for name in (CONFIG, PARAMS):
        if (folder / name).exists() and not (folder / name).is_file():
            regular_size(folder / name, str(folder / name))  # raises UnreadableFile saying what it is
    if (folder / CONFIG).is_file():
        for name in _HF_WEIGHTS:
            if (folder / name).is_file():
                return ModelFolder(folder, folder / name, "hf")
        indexes = sorted(p.name for p in folder.glob("*.safetensors.index.json"))
        singles = sorted(p.name for p in folder.glob("*.safetensors"))
        for found in (indexes, singles):
            if len(found) == 1:
                return ModelFolder(folder, folder / found[0], "hf")
            if len(found) > 1 and found is indexes:
                raise SourceError(
                    f"{shown}: holds {len(found)} shard indexes ({', '.join(found)}); give the one to read"
                )
        if len(singles) > 1:
            raise SourceError(
                f"{shown}: holds {len(singles)} safetensors files and no index to say which belong together "
                f"({', '.join(singles[:4])}{', ...' if len(singles) > 4 else ''}); give the file to read"
            )
        if not (folder / PARAMS).is_file():
            raise SourceError(
                f"{shown}: has a {CONFIG} but no weights (model.safetensors, shards with "
                f"model.safetensors.index.json, or pytorch_model.bin); download the weights into it"
            )
    if (folder / PARAMS).is_file():
        parts = sorted(folder.glob("consolidated.*.pth"))
        if len(parts) == 1:
            return ModelFolder(folder, parts[0], "meta")
        if not parts:
            raise SourceError(f"{shown}: has a {PARAMS} but no consolidated.00.pth; download the weights into it")
        raise SourceError(
            f"{shown}: holds {len(parts)} model-parallel parts ({parts[0].name} ... {parts[-1].name}); ckptx "
            f"reads a single-part checkpoint: merge the parts first"
        )
    return None


def read_json_document(path: Path, shown: str | None = None) -> dict[str, Any]:
    """A JSON object read from `path` (a config document); SourceError naming the file otherwise."""
    shown = shown or str(path)
    try:  # a regular file, read bounded: a FIFO or device named config.json is refused, never waited on
        doc = json.loads(read_bounded(path, shown, _MAX_DOCUMENT, "a config document").decode("utf-8"))
    except UnreadableFile as exc:
        raise SourceError(f"{shown}: {exc.detail}") from None
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError; so are huge integers
        raise SourceError(f"{shown}: not a valid JSON document ({str(exc)[:120]}); fix or download it again") from None
    except RecursionError:
        raise SourceError(f"{shown}: not a valid JSON document: it nests too deeply") from None
    if not isinstance(doc, dict):
        raise SourceError(f"{shown}: must hold a JSON object, found {type(doc).__name__}")
    return doc


def config_documents(src: str | Path) -> dict[str, Mapping[str, Any]]:
    """The config documents (`config.json`, `params.json`) of a checkpoint: inside a source folder, or beside a
    source file (a shard index, a safetensors file, `consolidated.00.pth`); name -> its JSON object."""
    path = Path(src)
    folder = path if path.is_dir() else path.parent
    found: dict[str, Mapping[str, Any]] = {}
    for name in CONFIG_DOCUMENTS:
        candidate = folder / name
        if candidate.is_file():
            found[name] = read_json_document(candidate)
    return found
