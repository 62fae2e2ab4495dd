"""A synthetic transformer-like checkpoint of a chosen size, written one tensor at a time.

Shapes follow a 2048-wide decoder: a 32000 x 2048 token embedding and LM head (250 MiB each in float32),
per layer four 16 MiB attention matrices and three 64 MiB MLP matrices, and many small norms, biases and
buffers. Layers are added until the requested size is reached.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

DIM, MLP, VOCAB = 2048, 8192, 32000


def layer_shapes(layer: int) -> dict[str, tuple[int, ...]]:
    """The tensors of one decoder layer: 7 large matrices and 15 small tensors."""
    p = f"model.layers.{layer}."
    shapes: dict[str, tuple[int, ...]] = {}
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        shapes[f"{p}self_attn.{name}.weight"] = (DIM, DIM)
        shapes[f"{p}self_attn.{name}.bias"] = (DIM,)
    shapes[f"{p}mlp.gate_proj.weight"] = (MLP, DIM)
    shapes[f"{p}mlp.up_proj.weight"] = (MLP, DIM)
    shapes[f"{p}mlp.down_proj.weight"] = (DIM, MLP)
    for name in ("gate_proj", "up_proj"):
        shapes[f"{p}mlp.{name}.bias"] = (MLP,)
    shapes[f"{p}mlp.down_proj.bias"] = (DIM,)
    for name in ("input_layernorm", "post_attention_layernorm"):
        shapes[f"{p}{name}.weight"] = (DIM,)
        shapes[f"{p}{name}.bias"] = (DIM,)
    shapes[f"{p}self_attn.rotary_emb.inv_freq"] = (64,)
    shapes[f"{p}layer_scale"] = (DIM,)
    shapes[f"{p}attn_scale"] = ()
    return shapes


def checkpoint_shapes(size_bytes: int) -> dict[str, tuple[int, ...]]:
    """Embedding, as many layers as fit in `size_bytes` (at least one), final norm and LM head."""
    head = {"model.embed_tokens.weight": (VOCAB, DIM)}
    tail = {"model.norm.weight": (DIM,), "lm_head.weight": (VOCAB, DIM)}
    fixed = sum(_numel(s) for s in [*head.values(), *tail.values()]) * 4
    per_layer = sum(_numel(s) for s in layer_shapes(0).values()) * 4
    layers = max(1, round((size_bytes - fixed) / per_layer))
    shapes = dict(head)
    for layer in range(layers):
        shapes.update(layer_shapes(layer))
    shapes.update(tail)
    return shapes


def write_safetensors(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """A float32 safetensors file of `shapes` with pseudo-random content, written tensor by tensor."""
    header, offset = {}, 0
    for key, shape in shapes.items():
        nbytes = _numel(shape) * 4
        header[key] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    generator = torch.Generator().manual_seed(0)
    block = torch.randn(4 * 1024 * 1024, generator=generator)  # 16 MiB of values, reused
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for shape in shapes.values():
            remaining = _numel(shape)
            while remaining:
                piece = block[: min(remaining, block.numel())]
                f.write(memoryview(piece.numpy()).cast("B"))
                remaining -= piece.numel()


def write_torch_zip(src: Path, dst: Path) -> None:
    """The same tensors saved with torch.save (zip format), as training scripts write `.pth` files."""
    from safetensors.torch import load_file

    torch.save(load_file(str(src)), dst)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for dim in shape:
        n *= dim
    return n
