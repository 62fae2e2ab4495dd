"""Tiny Hugging Face Llama folders (random init, save_pretrained, a sentencepiece tokenizer trained on the spot) and
the GGUF files llama.cpp's own converter (tests/vendor/llama_cpp) writes from them."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

CONVERTER = Path(__file__).resolve().parents[1] / "vendor" / "llama_cpp" / "convert_hf_to_gguf.py"
SMALL = {
    "vocab_size": 64,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "tie_word_embeddings": False,
}


def llama_folder(
    folder: Path, *, seed: int = 0, tokenizer: bool = True, dtype=torch.float32, spread: bool = False, **config: Any
) -> Path:
    """A LlamaForCausalLM folder as save_pretrained writes it (config.json, model.safetensors), with a
    tokenizer.model when asked. With `spread`, every weight is drawn again with a spread that makes attention
    depend on the q/k rows (transformers' init, std 0.02, leaves attention nearly uniform, so rows in the wrong
    order would hardly change the logits) and norm weights differ from 1."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**SMALL, **config}))
    if spread:
        with torch.no_grad():
            for name, tensor in model.named_parameters():
                noise = torch.randn(tensor.shape)
                tensor.copy_(1 + 0.1 * noise if name.endswith("norm.weight") else 0.3 * noise)
    model = model.to(dtype)
    model.save_pretrained(folder)
    if tokenizer:
        write_tokenizer(folder)
    return folder


def write_tokenizer(folder: Path) -> None:
    """A small BPE sentencepiece model as `tokenizer.model`."""
    import sentencepiece

    text = ("the quick brown fox jumps over the lazy dog " * 3 + "hello world ckptx converts checkpoints ") * 20
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(text.split(" ")),
        model_writer=model,
        vocab_size=60,
        model_type="bpe",
        bos_id=1,
        eos_id=2,
        unk_id=0,
        pad_id=-1,
        minloglevel=2,
        hard_vocab_limit=False,
    )
    (folder / "tokenizer.model").write_bytes(model.getvalue())


def llama_cpp_gguf(folder: Path, out: Path, outtype: str) -> Path:
    """llama.cpp's convert_hf_to_gguf.py run on `folder` with `--outtype outtype`."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    # The converter imports its own `conversion` package from the script's folder, which
    # PYTHONSAFEPATH (set by `make test` to keep the checkout off sys.path) would hide.
    env.pop("PYTHONSAFEPATH", None)
    done = subprocess.run(
        [sys.executable, str(CONVERTER), str(folder), "--outtype", outtype, "--outfile", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out
