"""The metadata of a GGUF output, as llama.cpp's `convert_hf_to_gguf.py` writes it for a Llama-family Hugging Face
folder: the architecture and hyperparameters from the `config.json` beside the source, and the tokenizer from its
`tokenizer.model` (sentencepiece, read here without the sentencepiece library) when the folder has one.

Without a config.json (or for another architecture) the file gets `general.*` keys only: it is a valid GGUF file,
but llama.cpp cannot run it; tensors in llama.cpp's names (`token_embd.weight`, `blk.N.*`) without a Llama config
are refused. With a Llama config, the conversion is validated against the tensors llama.cpp's llama architecture
loads for that config (`llama_cpp_target`): names and shapes, the output head required unless the embeddings are
tied, biases when the config has them.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ckptx.dtypes import TensorMeta
from ckptx.errors import DestinationError, SourceError
from ckptx.files import read_bounded
from ckptx.io.read.model_folder import read_json_document
from ckptx.planning.entry import PlanEntry
from ckptx.targets.resolve import Target

__all__ = ["gguf_metadata_for", "llama_cpp_target", "sentencepiece_vocab"]

U32, I32, F32, BOOL, STRING, ARRAY = 4, 5, 6, 7, 8, 9
LLAMA_FAMILY = {"llama", "mistral"}
MAX_TOKENIZER = 64 << 20  # sentencepiece models are a few MiB (Llama 2: 0.5 MiB, Gemma: 4 MiB)
# sentencepiece piece types -> llama.cpp token types (its converter maps USER_DEFINED pieces to NORMAL)
_TOKEN_TYPES = {1: 1, 2: 2, 3: 3, 4: 1, 5: 5, 6: 6}


def _folder_of(src: Path) -> Path:
    return src if src.is_dir() else src.parent


def gguf_metadata_for(src: Path, entries: Sequence[PlanEntry]) -> list[tuple[str, int, Any]]:
    """(key, GGUF value type, value) for a GGUF file made from `src`, in the order llama.cpp writes them;
    `general.file_type` is filled in by the writer."""
    folder = _folder_of(Path(src))
    config_path = folder / "config.json"
    config = read_json_document(config_path) if config_path.exists() else {}
    arch = str(config.get("model_type", ""))
    name = folder.name
    if arch not in LLAMA_FAMILY:
        named = next((e.key for e in entries if e.key == "token_embd.weight" or e.key.startswith("blk.")), None)
        if named is not None:
            said = f"says model_type {arch!r}" if config else "is missing"
            raise DestinationError(
                f"{config_path}: {said}, and the tensors have llama.cpp's names ('{named}'): ckptx writes "
                f"llama.cpp's metadata for llama and mistral models only, and a GGUF file without it is one llama.cpp "
                f"cannot run; convert this model with llama.cpp's convert_hf_to_gguf.py"
            )
        return [("general.type", STRING, "model"), ("general.name", STRING, name), ("general.file_type", U32, 0)]
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = str(rope.get("rope_type", rope.get("type", "default")) or "default")
    if rope_type not in ("default", "linear"):
        raise DestinationError(
            f"{config_path}: rope_type {rope_type!r} needs llama.cpp's rope scaling tensors or keys, which ckptx "
            f"does not write yet; convert this model with llama.cpp's convert_hf_to_gguf.py"
        )
    heads = int(config["num_attention_heads"])
    head_dim = config.get("head_dim") or int(config["hidden_size"]) // heads
    out: list[tuple[str, int, Any]] = [
        ("general.architecture", STRING, "llama"),
        ("general.type", STRING, "model"),
        ("general.name", STRING, name),
        ("llama.block_count", U32, int(config["num_hidden_layers"])),
        ("llama.context_length", U32, int(config["max_position_embeddings"])),
        ("llama.embedding_length", U32, int(config["hidden_size"])),
        ("llama.feed_forward_length", U32, int(config["intermediate_size"])),
        ("llama.attention.head_count", U32, heads),
        ("llama.attention.head_count_kv", U32, int(config.get("num_key_value_heads", heads))),
        ("llama.rope.freq_base", F32, float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))),
        ("llama.attention.layer_norm_rms_epsilon", F32, float(config.get("rms_norm_eps", 1e-6))),
    ]
    if "head_dim" in config and config["head_dim"]:
        out += [
            ("llama.attention.key_length", U32, int(head_dim)),
            ("llama.attention.value_length", U32, int(head_dim)),
        ]
    if rope_type == "linear":
        out += [
            ("llama.rope.scaling.type", STRING, "linear"),
            ("llama.rope.scaling.factor", F32, float(rope["factor"])),
        ]
    out += [
        ("general.file_type", U32, 0),
        ("llama.vocab_size", U32, int(config["vocab_size"])),
        ("llama.rope.dimension_count", U32, int(head_dim)),
        ("general.quantization_version", U32, 2),
    ]
    tokenizer = folder / "tokenizer.model"
    if tokenizer.is_file():
        out += _tokenizer(tokenizer, folder, config)
    return out


def llama_cpp_target(src: Path, entries: Sequence[PlanEntry]) -> Target | None:
    """The tensors llama.cpp's `llama` architecture loads for the config.json beside `src` (None without a Llama
    config): each name with its shape; dtypes are the plan's, since the GGUF writer chooses the stored types."""
    folder = _folder_of(Path(src))
    config_path = folder / "config.json"
    config = read_json_document(config_path) if config_path.exists() else {}
    if str(config.get("model_type", "")) not in LLAMA_FAMILY:
        return None
    try:
        hidden, ff = int(config["hidden_size"]), int(config["intermediate_size"])
        heads, layers = int(config["num_attention_heads"]), int(config["num_hidden_layers"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or hidden // heads)
        vocab = int(config["vocab_size"])
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        raise SourceError(f"{config_path}: not a Llama config.json: {type(exc).__name__} {exc}") from None
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,)}
    tied = bool(config.get("tie_word_embeddings", False))
    if not tied:
        shapes["output.weight"] = (vocab, hidden)
    attention_bias, mlp_bias = bool(config.get("attention_bias")), bool(config.get("mlp_bias"))
    for i in range(layers):
        block = {
            "attn_norm": (hidden,), "ffn_norm": (hidden,),
            "attn_q": (heads * head_dim, hidden), "attn_k": (kv_heads * head_dim, hidden),
            "attn_v": (kv_heads * head_dim, hidden), "attn_output": (hidden, heads * head_dim),
            "ffn_gate": (ff, hidden), "ffn_up": (ff, hidden), "ffn_down": (hidden, ff),
        }  # fmt: skip
        for part, shape in block.items():
            shapes[f"blk.{i}.{part}.weight"] = shape
            if (attention_bias and part.startswith("attn_") and part != "attn_norm") or (
                mlp_bias and part.startswith("ffn_") and part != "ffn_norm"
            ):
                shapes[f"blk.{i}.{part}.bias"] = (shape[0],)
    dtypes = {e.key: e.meta.dtype for e in entries}
    tensors = {key: TensorMeta(shape, dtypes.get(key, "float32")) for key, shape in shapes.items()}
    notes = ["the output head is the token embedding (tie_word_embeddings)"] if tied else []
    if not any(key in dtypes for key in tensors):
        notes.append("no tensor has llama.cpp's names: a transformers Llama converts with -r hf/llama-to-gguf")
    description = (
        f"llama.cpp's llama architecture for {config_path} ({layers} blocks, {heads} heads, {kv_heads} key/value heads)"
    )
    return Target(description, tensors, notes=tuple(notes))


def _tokenizer(path: Path, folder: Path, config: dict[str, Any]) -> list[tuple[str, int, Any]]:
    tokens, scores, types = sentencepiece_vocab(path, int(config.get("vocab_size") or 0))
    added = folder / "added_tokens.json"
    if added.is_file():
        for text, token_id in read_json_document(added).items():
            if isinstance(token_id, int) and 0 <= token_id < len(tokens):
                tokens[token_id], scores[token_id], types[token_id] = text, -1000.0, 4
    out: list[tuple[str, int, Any]] = [
        ("tokenizer.ggml.model", STRING, "llama"),
        ("tokenizer.ggml.pre", STRING, "default"),
        ("tokenizer.ggml.tokens", ARRAY, (STRING, tokens)),
        ("tokenizer.ggml.scores", ARRAY, (F32, scores)),
        ("tokenizer.ggml.token_type", ARRAY, (I32, types)),
    ]
    for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("sep", "seperator"), ("pad", "padding")):
        token_id = config.get(f"{name}_token_id")  # gguf's key names, its spelling included
        if isinstance(token_id, int) and 0 <= token_id < len(tokens):
            out.append((f"tokenizer.ggml.{key}_token_id", U32, token_id))
    settings = folder / "tokenizer_config.json"
    if settings.is_file():
        doc = read_json_document(settings)
        for name in ("add_bos_token", "add_eos_token"):
            if isinstance(doc.get(name), bool):
                out.append((f"tokenizer.ggml.{name}", BOOL, doc[name]))
    return out


def _varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if at >= len(data) or shift > 63:
            raise ValueError("a varint runs past the end")
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, at


def _fields(data: bytes) -> list[tuple[int, int, Any]]:
    """The (field number, wire type, value) of one protobuf message."""
    out: list[tuple[int, int, Any]] = []
    at = 0
    while at < len(data):
        key, at = _varint(data, at)
        number, wire = key >> 3, key & 7
        value: Any
        if wire == 0:
            value, at = _varint(data, at)
        elif wire == 1:
            value, at = data[at : at + 8], at + 8
        elif wire == 2:
            length, at = _varint(data, at)
            value, at = data[at : at + length], at + length
        elif wire == 5:
            value, at = data[at : at + 4], at + 4
        else:
            raise ValueError(f"wire type {wire} is not used by sentencepiece models")
        if at > len(data):
            raise ValueError("a field runs past the end")
        out.append((number, wire, value))
    return out


def sentencepiece_vocab(path: Path, vocab_size: int = 0) -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and llama.cpp token types of a sentencepiece `tokenizer.model`, padded to `vocab_size` with
    `[PADi]` tokens as llama.cpp's converter pads them."""
    try:
        pieces = [
            value
            for number, wire, value in _fields(read_bounded(path, str(path), MAX_TOKENIZER, "a sentencepiece model"))
            if number == 1 and wire == 2
        ]
        tokens, scores, types = [], [], []
        for raw in pieces:
            text, score, kind = "", 0.0, 1
            for number, wire, value in _fields(raw):
                if number == 1 and wire == 2:
                    text = value.decode("utf-8")
                elif number == 2 and wire == 5:
                    score = struct.unpack("<f", value)[0]
                elif number == 3 and wire == 0:
                    kind = value
            tokens.append(text)
            scores.append(score)
            types.append(_TOKEN_TYPES.get(kind, 1))
    except (ValueError, UnicodeDecodeError, struct.error) as exc:
        raise SourceError(
            f"{path}: not a sentencepiece model ({exc}); remove it or export the tokenizer again"
        ) from None
    size = vocab_size or len(tokens)
    tokens, scores, types = tokens[:size], scores[:size], types[:size]
    for index in range(len(tokens), size):
        tokens.append(f"[PAD{index}]")
        scores.append(-10000.0)
        types.append(5)
    return tokens, scores, types
