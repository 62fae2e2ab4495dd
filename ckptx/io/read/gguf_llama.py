"""The HuggingFace `LlamaForCausalLM` config a llama.cpp GGUF file of the `llama` architecture describes, read from
its metadata and tensor names (what llama.cpp's `convert_hf_to_gguf.py` wrote from the `config.json` it had):

| config.json | GGUF |
|---|---|
| `hidden_size`, `intermediate_size` | `llama.embedding_length`, `llama.feed_forward_length` |
| `num_hidden_layers` | `llama.block_count` |
| `num_attention_heads`, `num_key_value_heads` | `llama.attention.head_count`, `.head_count_kv` |
| `head_dim` | `llama.attention.key_length` (when written; else hidden / heads) |
| `rms_norm_eps`, `max_position_embeddings` | `llama.attention.layer_norm_rms_epsilon`, `llama.context_length` |
| `rope_parameters` | `llama.rope.freq_base`; `llama.rope.scaling.*` (linear); Llama 3.1's from `rope_freqs.weight` |
| `vocab_size` | the rows of `token_embd.weight` (`llama.vocab_size` must agree) |
| `tie_word_embeddings` | true when the file has no `output.weight` (llama.cpp then uses `token_embd`) |
| `attention_bias`, `mlp_bias` | `blk.0.attn_q.bias`, `blk.0.ffn_gate.bias` present |
| `bos_token_id`, `eos_token_id`, `pad_token_id` | `tokenizer.ggml.bos_token_id`, `eos_token_id`, `padding_token_id` |

GGUF keeps floats as float32: `rms_norm_eps` and `rope_theta` are written as the shortest decimal that is the same
float32 (1e-05, not 9.999999747378752e-06); the model computes with them in float32 either way.

What a `LlamaForCausalLM` cannot compute (experts, a rotary part of the head, YaRN) is listed as a problem rather
than written into a config that would load and compute something else.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ckptx._lazy import lazy_module

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
else:
    np = lazy_module("numpy")

__all__ = ["LLAMA_ARCHITECTURE", "ROPE_FREQS", "LlamaConfigDocument", "hf_llama_config", "llama3_factors"]

LLAMA_ARCHITECTURE = "llama"
ROPE_FREQS = "rope_freqs.weight"
# Llama 3.1's rope scaling (transformers' `_compute_llama3_parameters`, llama.cpp's rope_freqs): the factors
# besides `factor` that every Llama 3.x release uses; rope_freqs.weight is checked against them.
_LLAMA3_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


@dataclass(frozen=True)
class LlamaConfigDocument:
    """The config document (empty when the file is not of the llama architecture) and what keeps it from being
    the model's exact config."""

    document: dict[str, Any]
    problems: list[str] = field(default_factory=list)


def _float32_shortest(value: float) -> float:
    """The shortest decimal that rounds to the same float32 as `value`."""
    return float(np.format_float_positional(np.float32(value), unique=True, trim="-"))


def hf_llama_config(
    metadata: Mapping[str, Any],
    shapes: Mapping[str, tuple[int, ...]],
    rope_freqs: Callable[[], list[float]] | None = None,
) -> LlamaConfigDocument:
    """The LlamaForCausalLM config.json of a GGUF file: `metadata` (key -> value), `shapes` (tensor name -> torch
    shape) and `rope_freqs` (reads `rope_freqs.weight`'s values, when the file has it)."""
    arch = metadata.get("general.architecture")
    if arch != LLAMA_ARCHITECTURE:
        return LlamaConfigDocument({}, [f"general.architecture is {arch!r}, not 'llama'"])
    problems: list[str] = []

    def number(key: str, default: Any = None) -> Any:
        value = metadata.get(f"llama.{key}", default)
        if value is None:
            problems.append(f"llama.{key} is missing")
            return 0
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"llama.{key} is {_shown(value)}, not a number")
            return 0
        return value

    def count(key: str, default: Any = None) -> int:
        """A size or count: a whole number of at least 1."""
        before = len(problems)
        value = number(key, default)
        if len(problems) == before and (not isinstance(value, int) or value < 1):
            problems.append(f"llama.{key} is {_shown(value)}, not a whole number of at least 1")
        return value if len(problems) == before else 0

    def positive(key: str, default: float) -> float:
        """A finite float above 0 (an epsilon, a rope base): NaN or 0 would load and compute NaN or nonsense."""
        before = len(problems)
        value = number(key, default)
        if len(problems) > before:
            return default
        if not math.isfinite(value) or value <= 0:
            problems.append(f"llama.{key} is {_shown(value)}, not a finite number above 0")
            return default
        return float(value)

    hidden = count("embedding_length")
    heads = count("attention.head_count")
    kv_heads = count("attention.head_count_kv", heads)
    if heads and kv_heads and heads % kv_heads:
        problems.append(f"llama.attention.head_count {heads} is not a multiple of head_count_kv {kv_heads}")
    layers = count("block_count")
    held = _blocks_held(shapes)
    if layers and layers != held:
        problems.append(f"llama.block_count is {_shown(layers)}, but the file holds the tensors of {held} blocks")
        layers = held
    head_dim = count("attention.key_length", hidden // heads if heads else 0) if hidden and heads else 0
    if hidden and heads and "llama.attention.key_length" not in metadata and hidden % heads:
        problems.append(f"llama.embedding_length {hidden} is not a multiple of head_count {heads}")
    value_dim = count("attention.value_length", head_dim) if head_dim else 0
    if value_dim != head_dim:
        problems.append(f"llama.attention.value_length {value_dim} differs from key_length {head_dim}")
    rotary = count("rope.dimension_count", head_dim) if head_dim else 0
    if rotary != head_dim:
        problems.append(f"llama.rope.dimension_count {rotary} rotates part of each head of {head_dim}")
    if metadata.get("llama.expert_count") not in (None, 0):
        problems.append(
            f"llama.expert_count is {_shown(metadata['llama.expert_count'])}: a mixture of experts (Mixtral), "
            f"not a LlamaForCausalLM"
        )
    embedding = shapes.get("token_embd.weight")
    vocab = int(embedding[0]) if embedding else int(number("vocab_size"))
    stated = metadata.get("llama.vocab_size")
    if embedding and isinstance(stated, int) and stated != vocab:
        problems.append(f"llama.vocab_size {stated} differs from token_embd.weight's {vocab} rows")
    theta = _float32_shortest(positive("rope.freq_base", 10000.0))
    document: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": count("feed_forward_length"),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": count("context_length"),
        "rms_norm_eps": _float32_shortest(positive("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_parameters": _rope(metadata, theta, head_dim, shapes, rope_freqs, problems),
        "vocab_size": vocab,
        "tie_word_embeddings": "output.weight" not in shapes,
        "attention_bias": "blk.0.attn_q.bias" in shapes,
        "mlp_bias": "blk.0.ffn_gate.bias" in shapes,
    }
    if not head_dim and hidden and heads:
        problems.append(f"a head size cannot be read: llama.embedding_length {hidden} over head_count {heads}")
    if "llama.attention.key_length" in metadata or (heads and head_dim != hidden // heads):
        document["head_dim"] = head_dim
    for hf_name, gguf_name in (("bos", "bos"), ("eos", "eos"), ("pad", "padding")):
        token = metadata.get(f"tokenizer.ggml.{gguf_name}_token_id")
        if isinstance(token, int) and not isinstance(token, bool):
            document[f"{hf_name}_token_id"] = token
    return LlamaConfigDocument(document, problems)


def _blocks_held(shapes: Mapping[str, tuple[int, ...]]) -> int:
    """How many transformer blocks the file has tensors of: one more than the highest `blk.N.`."""
    numbers = {name.split(".")[1] for name in shapes if name.startswith("blk.") and name.count(".") >= 2}
    return 1 + max((int(n) for n in numbers if n.isdigit() and len(n) < 10), default=-1)


def _shown(value: Any) -> str:
    """A metadata value in a message: short, whatever the file holds."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


def _rope(
    metadata: Mapping[str, Any],
    theta: float,
    head_dim: int,
    shapes: Mapping[str, tuple[int, ...]],
    rope_freqs: Callable[[], list[float]] | None,
    problems: list[str],
) -> dict[str, Any]:
    kind = str(metadata.get("llama.rope.scaling.type") or "none")
    if ROPE_FREQS in shapes:
        if rope_freqs is None:
            problems.append(f"{ROPE_FREQS} (Llama 3.1's rope scaling) cannot be read")
            return {"rope_type": "default", "rope_theta": theta}
        return _llama3_rope(rope_freqs(), theta, head_dim, problems)
    if kind == "linear":
        factor = metadata.get("llama.rope.scaling.factor")
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor < math.inf:
            problems.append(f"llama.rope.scaling.factor is {_shown(factor)} for linear rope scaling")
            factor = 1.0
        return {"rope_type": "linear", "rope_theta": theta, "factor": _float32_shortest(factor)}
    if kind != "none":
        problems.append(f"llama.rope.scaling.type is {kind!r}; ckptx writes default, linear and Llama 3.1 rope")
    return {"rope_type": "default", "rope_theta": theta}


def llama3_factors(theta: float, head_dim: int, factor: float, low: float, high: float, original: int) -> list[float]:
    """The per-frequency factors llama.cpp's converter stores as `rope_freqs.weight` for Llama 3.1 rope scaling
    (and transformers' `_compute_llama3_parameters` applies)."""
    out = []
    for i in range(0, head_dim, 2):
        freq = 1.0 / (theta ** (i / head_dim))
        wavelen = 2 * math.pi / freq
        if wavelen < original / high:
            out.append(1.0)
        elif wavelen > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return out


def _llama3_rope(stored: list[float], theta: float, head_dim: int, problems: list[str]) -> dict[str, Any]:
    """Llama 3.1's rope parameters, read back from the stored factors: `factor` is the largest, the others Llama
    3.x's; the factors they give must be the stored ones (to float32 rounding), else it is a problem."""
    if len(stored) != head_dim // 2:
        problems.append(f"{ROPE_FREQS} holds {len(stored)} factors; a head of {head_dim} has {head_dim // 2}")
        return {"rope_type": "default", "rope_theta": theta}
    if all(value == 1.0 for value in stored):  # every frequency unscaled: the plain rotary embedding
        return {"rope_type": "default", "rope_theta": theta}
    factor = _float32_shortest(max(stored))
    expected = llama3_factors(theta, head_dim, factor, **_llama3_args())
    if any(not math.isclose(a, b, rel_tol=1e-5) for a, b in zip(stored, expected)):
        problems.append(
            f"{ROPE_FREQS} is not Llama 3.1's rope scaling with factor {factor} and low_freq_factor 1, "
            f"high_freq_factor 4, original_max_position_embeddings 8192"
        )
    return {"rope_type": "llama3", "rope_theta": theta, "factor": factor, **_LLAMA3_DEFAULTS}


def _llama3_args() -> dict[str, Any]:
    return {
        "low": _LLAMA3_DEFAULTS["low_freq_factor"],
        "high": _LLAMA3_DEFAULTS["high_freq_factor"],
        "original": _LLAMA3_DEFAULTS["original_max_position_embeddings"],
    }
