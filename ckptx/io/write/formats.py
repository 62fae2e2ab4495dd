"""The table of output formats: which writer a destination gets.

`DIR/` (or an existing folder) is a HuggingFace model folder; `NAME.safetensors.index.json`, or any
`.safetensors` destination with a shard size, is sharded safetensors; otherwise the extension decides. A writer's
module is imported when a destination needs it (the torch writer costs start-up a safetensors conversion need not
pay).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ckptx.errors import DestinationError
from ckptx.io.write.hf_folder_writer import HfFolderWriter, is_folder_destination
from ckptx.io.write.writer import OutputOptions, Writer
from ckptx.planning.entry import PlanEntry

__all__ = ["FORMATS", "OutputFormat", "writer_for"]


@dataclass(frozen=True)
class OutputFormat:
    """A file format ckptx writes: the extensions that select it and the `module:class` of its writer."""

    name: str
    suffixes: tuple[str, ...]
    writer: str

    def writer_class(self) -> type[Writer]:
        """The writer class, its module imported now."""
        module, _, name = self.writer.partition(":")
        found = getattr(importlib.import_module(module), name)
        assert isinstance(found, type) and issubclass(found, Writer), self.writer
        return found


INDEX_SUFFIX = ".safetensors.index.json"
SHARDED = OutputFormat("safetensors-sharded", (INDEX_SUFFIX,), "ckptx.io.write.sharded_writer:ShardedWriter")
FORMATS = (
    OutputFormat("safetensors", (".safetensors",), "ckptx.io.write.safetensors_writer:SafetensorsWriter"),
    OutputFormat("torch", (".pth", ".pt", ".bin", ".ckpt"), "ckptx.io.write.torch_writer:TorchWriter"),
    OutputFormat("gguf", (".gguf",), "ckptx.io.write.gguf_writer:GgufWriter"),
)


def writer_for(destination: str | Path, entries: Sequence[PlanEntry], options: OutputOptions) -> Writer:
    """The writer of `destination` for these entries; DestinationError for a destination no format takes."""
    path = Path(destination)
    if is_folder_destination(destination):
        return HfFolderWriter(path, entries, options)
    if path.name.endswith(".index.json") or options.max_shard_size is not None:
        if not (path.name.endswith(INDEX_SUFFIX) or path.suffix == ".safetensors"):
            raise DestinationError(
                f"{path}: sharded output is safetensors only; name DST NAME.safetensors or NAME{INDEX_SUFFIX}"
            )
        return SHARDED.writer_class()(path, entries, options)
    for output in FORMATS:
        if path.suffix.lower() in output.suffixes:
            return output.writer_class()(path, entries, options)
    known = ", ".join(s for output in (*FORMATS, SHARDED) for s in output.suffixes)
    raise DestinationError(
        f"{path}: unknown output extension '{path.suffix}'; use one of {known}, or DIR/ for a HuggingFace model folder"
    )
