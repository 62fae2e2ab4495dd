"""Tiny torchtitan 0.3.0 models (its own model classes, random init) and their DCP training checkpoints, written as
torchtitan writes them: `dcp.save` from 2 gloo ranks of a model sharded with FSDP2 (`fully_shard`), the model's
state flattened to the top level by torchtitan's `ModelWrapper`, beside the optimizer (flattened per parameter as
torchtitan's `OptimizersContainer` saves it), the learning-rate scheduler and the train state.

Run as `python -m tests.helpers.torchtitan_models OUT KIND...`: each KIND (`llama3`, `qwen3`, `qwen3_moe`,
`deepseek_v3`) gets `OUT/KIND/step-2/` (the DCP folder) and `OUT/KIND/full.pt` (the full model state dict rank 0
had before sharding, for the reference conversion with torchtitan's own `state_dict_adapter.to_hf`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch

WORLD = 2
KINDS = ("llama3", "qwen3", "qwen3_moe", "deepseek_v3")
LLAMA3 = {"dim": 64, "n_heads": 4, "n_kv_heads": 2, "vocab": 128, "layers": 2, "hidden": 96, "theta": 500000.0}


def model_config(kind: str) -> Any:
    """torchtitan's model config of a tiny `kind` model (its own builders, small sizes)."""
    from torchtitan.models.common import ComplexRoPE, CosSinRoPE, Embedding, Linear, RMSNorm

    if kind == "llama3":
        from torchtitan.models.llama3 import Llama3Model, _build_llama3_layers

        c = LLAMA3
        layers = _build_llama3_layers(
            n_layers=c["layers"], dim=c["dim"], n_heads=c["n_heads"], n_kv_heads=c["n_kv_heads"],
            hidden_dim=c["hidden"], attn_backend="flex",
            rope=ComplexRoPE.Config(dim=c["dim"] // c["n_heads"], max_seq_len=64, theta=c["theta"], scaling="none"),
        )  # fmt: skip
        return Llama3Model.Config(
            dim=c["dim"], vocab_size=c["vocab"],
            tok_embeddings=Embedding.Config(num_embeddings=c["vocab"], embedding_dim=c["dim"]),
            norm=RMSNorm.Config(normalized_shape=c["dim"]),
            lm_head=Linear.Config(in_features=c["dim"], out_features=c["vocab"]),
            layers=layers,
        )  # fmt: skip
    if kind in ("qwen3", "qwen3_moe"):
        from torchtitan.models.qwen3 import Qwen3Model, _build_qwen3_layers, _build_qwen3_moe_layers, _qwen3_norm

        dim, head_dim, vocab = 64, 16, 128
        rope = CosSinRoPE.Config(dim=head_dim, max_seq_len=64, theta=1000000.0)
        common = {
            "n_layers": 2,
            "dim": dim,
            "n_heads": 4,
            "n_kv_heads": 2,
            "head_dim": head_dim,
            "attn_backend": "flex",
        }
        if kind == "qwen3":
            layers = _build_qwen3_layers(**common, hidden_dim=96, rope=rope)
        else:
            layers = _build_qwen3_moe_layers(
                **common, moe_hidden_dim=32, num_experts=4, top_k=2, moe_comm_backend="standard", rope=rope
            )
        return Qwen3Model.Config(
            vocab_size=vocab, dim=dim, norm=_qwen3_norm(dim), enable_weight_tying=kind == "qwen3",
            tok_embeddings=Embedding.Config(num_embeddings=vocab, embedding_dim=dim),
            lm_head=Linear.Config(in_features=dim, out_features=vocab),
            layers=layers,
        )  # fmt: skip
    if kind == "deepseek_v3":
        from torchtitan.models.deepseek_v3 import DeepSeekV3Model, _build_dsv3_layers

        dim, vocab, rope_dim = 64, 128, 16
        layers = _build_dsv3_layers(
            n_layers=3, n_dense_layers=1, dim=dim, n_heads=4, q_lora_rank=0, kv_lora_rank=32,
            qk_nope_head_dim=16, qk_rope_head_dim=rope_dim, v_head_dim=16, mscale=0.70, dense_hidden_dim=96,
            moe_hidden_dim=32, num_experts=4, num_shared_experts=1, router_top_k=2, router_score_func="softmax",
            attn_backend="flex", moe_comm_backend="standard", non_blocking_capacity_factor=None,
            rope=ComplexRoPE.Config(dim=rope_dim, max_seq_len=64, theta=10000.0, scaling="none"),
        )  # fmt: skip
        return DeepSeekV3Model.Config(
            vocab_size=vocab, dim=dim,
            tok_embeddings=Embedding.Config(num_embeddings=vocab, embedding_dim=dim),
            norm=RMSNorm.Config(normalized_shape=dim),
            lm_head=Linear.Config(in_features=dim, out_features=vocab),
            layers=layers,
        )  # fmt: skip
    raise ValueError(kind)


def state_dict_adapter(kind: str, config: Any) -> Any:
    """torchtitan's own HuggingFace adapter for `kind` (its `to_hf` is the reference conversion)."""
    if kind == "llama3":
        from torchtitan.models.llama3.state_dict_adapter import Llama3StateDictAdapter

        return Llama3StateDictAdapter(config, None)
    if kind in ("qwen3", "qwen3_moe"):
        from torchtitan.models.qwen3.state_dict_adapter import Qwen3StateDictAdapter

        return Qwen3StateDictAdapter(config, None)
    from torchtitan.models.deepseek_v3.state_dict_adapter import DeepSeekV3StateDictAdapter

    return DeepSeekV3StateDictAdapter(config, None)


def build(kind: str, seed: int = 0) -> torch.nn.Module:
    """The tiny model with random weights (every parameter and buffer drawn from a seeded generator)."""
    torch.manual_seed(seed)
    model = model_config(kind).build()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=g) * 0.1)
    return model


def _worker(rank: int, out: str, kinds: list[str], port: int) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torchtitan.components.checkpointer import ModelWrapper

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        for kind in kinds:
            model = build(kind)
            folder = Path(out) / kind
            if rank == 0:
                folder.mkdir(parents=True, exist_ok=True)
                torch.save({k: v.clone() for k, v in model.state_dict().items()}, folder / "full.pt")
            for block in model.layers.values() if isinstance(model.layers, torch.nn.ModuleDict) else model.layers:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
            optimizer = torch.optim.AdamW(
                model.parameters(), lr=1e-3, weight_decay=0.0
            )  # zero grads: weights unchanged
            for p in model.parameters():  # one step, so the optimizer has state to save beside the model
                p.grad = torch.zeros_like(p)
            optimizer.step()
            optimizer.zero_grad()
            states = dict(ModelWrapper(model).state_dict())  # torchtitan flattens the model to the top level
            states["optimizer"] = get_optimizer_state_dict(
                model, optimizer, options=StateDictOptions(flatten_optimizer_state_dict=True)
            )
            states["lr_scheduler"] = {"lr_scheduler_0": {"last_epoch": 2, "base_lrs": [1e-3]}}
            states["train_state"] = {"step": 2, "ntokens_seen": 4096}
            dcp.save(states, checkpoint_id=str(folder / "step-2"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def write(out: Path, kinds: list[str]) -> None:
    """Write each kind's checkpoint under `out` with 2 spawned gloo processes."""
    import torch.multiprocessing as mp

    from tests.helpers.dcp_checkpoints import free_port

    torch.set_num_threads(1)
    mp.spawn(_worker, args=(str(out), kinds, free_port()), nprocs=WORLD, join=True)


def main(argv: list[str] | None = None) -> int:
    """Command line: `python -m tests.helpers.torchtitan_models OUT KIND...`."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("kinds", nargs="+", choices=KINDS)
    args = parser.parse_args(argv)
    write(args.out, args.kinds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
