"""Real torch.distributed.checkpoint (DCP) folders, written by `dcp.save` from 2 gloo processes on the CPU.

Run as `python -m tests.helpers.dcp_checkpoints OUT_DIR`: one `mp.spawn` writes every layout the tests need
(`write_all`), so the process group starts once. Each rank builds the same full tensors from fixed seeds and
`distribute_tensor` shards them; `full_state()` gives those full tensors for comparisons.

Layouts written under OUT_DIR:
- `default/`: the nested training state (`model`, `optimizer`, `epoch`, `step`), one file per rank.
- `per_item/`: the same state with `single_file_per_rank=False` (one file per item).
- `threads/`: the same state with `thread_count=2` (two files per rank).
- `safetensors/`: the same state with `serialization_format=SAFETENSORS`.
- `big/`: a few tens of MB (`--big-mib`) of Shard(0) float32 matrices, for the memory tests.
- `extras/`: a small model next to pickled values that need globals: `args` (an argparse.Namespace) and
  `evil`, whose unpickling would run `touch MARKER` (`--marker`; writing it runs nothing).
"""

from __future__ import annotations

import argparse
import os
import shlex
import socket
import sys
from pathlib import Path
from typing import Any

import torch

WORLD = 2


def full_state(*, transposed: bool = True) -> dict[str, Any]:
    """The training state each rank saves, as full (unsharded) tensors with their placements.

    Values are `(tensor, placement)` with placement `shard0`, `shard1`, `replicate` or None (a plain tensor),
    or plain Python values. `transposed` adds a non-contiguous plain tensor (the safetensors serialization
    refuses those).
    """
    g = torch.Generator().manual_seed(1234)

    def randn(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype)

    model = {
        "embed.weight": (randn(10, 8), "shard0"),  # even rows
        "layers.0.w": (randn(7, 6), "shard0"),  # odd rows: uneven shards 4 + 3
        "layers.1.w": (randn(7, 6), "shard0"),  # the same shape: chunks of equal byte length in each rank file
        "layers.0.b": (randn(6), "replicate"),
        "proj.weight": (randn(5, 9, dtype=torch.bfloat16), "shard1"),  # uneven columns 5 + 4
        "counts": (torch.arange(9, dtype=torch.int64) * 3 - 4, "shard0"),
        "flags": (torch.arange(6, dtype=torch.int32) % 2 == 0, "replicate"),
        "tiny": (randn(1, 4), "shard0"),  # one row: rank 1 holds an empty shard
        "norm.running_mean": (randn(3, 3), None),  # a plain (non-DTensor) tensor
    }
    weight_t = randn(4, 3).t()  # a transposed view: torch.save keeps its strides, so it is not row-major
    if transposed:
        model["head.weight_t"] = (weight_t, None)
    optimizer = {
        "state": {0: {"exp_avg": (randn(10, 8), "shard0"), "step": (torch.tensor(7.0), None)}},
        "param_groups": [{"lr": 0.1, "betas": (0.9, 0.999), "params": [0]}],
    }
    return {"model": model, "optimizer": optimizer, "epoch": 3, "step": (torch.tensor(7), None)}


def big_state(mib: int) -> dict[str, Any]:
    """`mib` MiB of float32 matrices (4 MiB each, Shard(0)) under `model`."""
    g = torch.Generator().manual_seed(99)
    count = max(1, mib // 4)
    return {
        "model": {f"blocks.{i}.weight": (torch.randn(1024, 1024, generator=g), "shard0") for i in range(count)},
        "step": 11,
    }


class Payload:
    """Unpickling this runs `touch marker` (pickling it, as dcp.save does, runs nothing)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


def extras_state(marker: str) -> dict[str, Any]:
    """A small sharded model, an argparse.Namespace and a payload, each a value of its own."""
    g = torch.Generator().manual_seed(5)
    return {
        "model": {"w": (torch.randn(6, 4, generator=g), "shard0")},
        "args": argparse.Namespace(lr=0.1, name="tiny"),
        "evil": Payload(marker),
    }


def _distribute(value: Any, mesh: Any) -> Any:
    """Replace each `(tensor, placement)` leaf by the DTensor (or plain tensor) a rank saves."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    if isinstance(value, dict):
        return {k: _distribute(v, mesh) for k, v in value.items()}
    if isinstance(value, list):
        return [_distribute(v, mesh) for v in value]
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], torch.Tensor):
        tensor, placement = value
        placements = {"shard0": [Shard(0)], "shard1": [Shard(1)], "replicate": [Replicate()]}
        return tensor if placement is None else distribute_tensor(tensor, mesh, placements[placement])
    return value


def plain(value: Any) -> Any:
    """`full_state()` with every `(tensor, placement)` leaf replaced by the tensor."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], torch.Tensor):
        return value[0]
    return value


def _worker(rank: int, out: str, port: int, big_mib: int, marker: str) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.filesystem import SerializationFormat
    from torch.distributed.device_mesh import init_device_mesh

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        state = _distribute(full_state(), mesh)
        root = Path(out)
        for writer in (
            FileSystemWriter(root / "default"),
            FileSystemWriter(root / "per_item", single_file_per_rank=False),
            FileSystemWriter(root / "threads", thread_count=2),
        ):
            dcp.save(state, storage_writer=writer)
        contiguous = _distribute(full_state(transposed=False), mesh)
        dcp.save(
            contiguous,
            storage_writer=FileSystemWriter(root / "safetensors", serialization_format=SerializationFormat.SAFETENSORS),
        )
        if marker:
            dcp.save(_distribute(extras_state(marker), mesh), storage_writer=FileSystemWriter(root / "extras"))
        if big_mib:
            dcp.save(_distribute(big_state(big_mib), mesh), storage_writer=FileSystemWriter(root / "big"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    """A TCP port free on this machine now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_all(out: Path, big_mib: int = 0, marker: str = "") -> None:
    """Write every layout under `out` with 2 spawned gloo processes (`extras/` only with a `marker`)."""
    import torch.multiprocessing as mp

    torch.set_num_threads(1)
    mp.spawn(_worker, args=(str(out), free_port(), big_mib, marker), nprocs=WORLD, join=True)


def main(argv: list[str] | None = None) -> int:
    """Command line: `python -m tests.helpers.dcp_checkpoints OUT [--big-mib N] [--marker PATH]`."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--big-mib", type=int, default=0)
    parser.add_argument("--marker", default="")
    args = parser.parse_args(argv)
    write_all(args.out, args.big_mib, args.marker)
    return 0


if __name__ == "__main__":
    sys.exit(main())
