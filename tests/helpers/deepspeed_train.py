"""Write real DeepSpeed ZeRO checkpoints on the CPU (gloo), for the tests of `ckptx.io.zero` and the benchmark.

One process per rank: run it as `DS_ACCELERATOR=cpu deepspeed --num_gpus 2 deepspeed_train.py ...`, or use
`launch()` below, which starts the ranks itself with RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT
(what the launcher sets). Each `--stage` given trains its own engine from the same seed for `--steps` AdamW
steps and saves `OUT/zero<stage>-<dtype>/` with `engine.save_checkpoint` (`latest`, `zero_to_fp32.py`, the tag).

The model has what zero_to_fp32.py must handle: a frozen parameter, a tied (shared) weight, BatchNorm
buffers (floats and the int64 step count) and odd-sized parameters, so the partitions need padding.
This file imports deepspeed: only the writer and the reference ever do, never ckptx.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve()


def build_model(width: int, layers: int):
    """The test model: embedding tied to the head, a frozen layer, BatchNorm, `layers` odd-sized blocks."""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            vocab, hidden = 37, width + 3
            self.embed = nn.Embedding(vocab, width)
            self.frozen = nn.Linear(width, width)
            self.frozen.requires_grad_(False)
            self.bn = nn.BatchNorm1d(width)
            self.blocks = nn.ModuleList(
                nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, width)) for _ in range(layers)
            )
            self.scale = nn.Parameter(torch.full((3,), 0.5))
            self.head = nn.Linear(width, vocab, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            h = self.bn(self.frozen(self.embed(ids)))
            for block in self.blocks:
                h = h + block(h)
            return self.head(h * self.scale.sum())

    return Net()


def train_and_save(out: Path, stage: int, dtype: str, steps: int, width: int, layers: int) -> Path:
    """Train one engine for `steps` steps and save its checkpoint under `out/zero<stage>-<dtype>`."""
    import deepspeed
    import torch

    # No op compatibility probe (compiler subprocesses) and no JIT build of the shared-memory allreduce op
    # (~30 s on a fresh machine): gloo does the collectives, which is all a CPU test needs.
    deepspeed.ops.__compatible_ops__ = {}
    torch.manual_seed(0)
    model = build_model(width, layers)
    if dtype == "bf16":  # the engine casts parameters, not buffers: BatchNorm would mix dtypes
        model = model.to(torch.bfloat16)
    config = {
        "train_micro_batch_size_per_gpu": 8,
        "gradient_accumulation_steps": 1,
        # ZeRO-3: small sub-groups, so a rank's partition is several flat groups and params cross their edges
        "zero_optimization": {"stage": stage, "reduce_bucket_size": 4096}
        | (
            {"stage3_param_persistence_threshold": 0, "sub_group_size": 256}
            if stage == 3
            # bf16 ZeRO-2: every parameter starts 16-byte aligned, so param_alignment_paddings are not all 0
            else {"allgather_bucket_size": 4096, "parameter_alignment": dtype == "bf16"}
        ),
        "bf16": {"enabled": dtype == "bf16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    # two param groups (matrices decay, vectors do not): ZeRO-2 then keeps one flat partition per group
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if p.dim() >= 2], "weight_decay": 0.01},
        {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=1e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    generator = torch.Generator().manual_seed(1 + engine.global_rank)
    for _ in range(steps):
        ids = torch.randint(0, 37, (8,), generator=generator)
        logits = engine(ids)
        loss = torch.nn.functional.cross_entropy(logits.float(), ids)
        engine.backward(loss)
        engine.step()
    folder = out / f"zero{stage}-{dtype}"
    engine.save_checkpoint(str(folder))
    engine.destroy()
    return folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(
    out: Path,
    *,
    stages: Sequence[int] = (2, 3),
    dtypes: Sequence[str] = ("fp32",),
    steps: int = 2,
    width: int = 13,
    layers: int = 2,
    world_size: int = 2,
    python: str = sys.executable,
    timeout: float = 300,
) -> None:
    """Run this script as `world_size` real DeepSpeed ranks on the CPU (gloo); raises if any rank fails."""
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
    }
    args = [
        python,
        str(HERE),
        "--out",
        str(out),
        "--dtype",
        *dtypes,
        "--steps",
        str(steps),
        "--width",
        str(width),
        "--layers",
        str(layers),
        "--stage",
        *map(str, stages),
    ]
    logs = [out / f"rank{rank}.log" for rank in range(world_size)]
    out.mkdir(parents=True, exist_ok=True)
    procs = []
    for rank, log in enumerate(logs):
        with open(log, "wb") as handle:
            procs.append(
                subprocess.Popen(
                    args,
                    env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                    stdout=handle,
                    stderr=subprocess.STDOUT,
                )
            )
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if any(codes):
        tail = logs[codes.index(next(c for c in codes if c))].read_text(errors="replace")[-3000:]
        raise RuntimeError(f"deepspeed ranks exited {codes}; log tail:\n{tail}")


def main(argv: Sequence[str] | None = None) -> int:
    """One rank: train and save each requested stage."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--stage", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--dtype", choices=["fp32", "bf16"], nargs="+", default=["fp32"])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--width", type=int, default=13)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    args = parser.parse_args(argv)
    for dtype in args.dtype:
        for stage in args.stage:
            train_and_save(args.out, stage, dtype, args.steps, args.width, args.layers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
