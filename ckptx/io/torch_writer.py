"""Write a plan to a torch (`.pth`/`.pt`/`.bin`) file atomically."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

from ckptx._lazy import lazy_module
from ckptx.io.atomic import atomic_output
from ckptx.io.safetensors_writer import Progress, materialize
from ckptx.io.source import Source
from ckptx.ops.registry import PlanEntry

torch = lazy_module("torch")


def write_torch(dst: Path, entries: Sequence[PlanEntry], source: Source, *, state_metadata: Any = None,
                progress: Progress | None = None) -> int:
    """Save `entries` as an OrderedDict state dict with `torch.save`; returns the file size."""
    state: OrderedDict[str, torch.Tensor] = OrderedDict()
    for entry in entries:
        tensor = materialize(entry, source)
        # A view of a larger storage is saved as itself: torch.save would otherwise keep the whole storage.
        if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size() and tensor.numel():
            tensor = tensor.clone()
        state[entry.key] = tensor
        if progress:
            progress(entry.meta.nbytes)
    if state_metadata is not None:
        state._metadata = state_metadata  # type: ignore[attr-defined]
    with atomic_output(dst) as out:
        torch.save(state, out)
        return out.tell()
