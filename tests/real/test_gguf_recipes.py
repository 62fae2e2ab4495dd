"""The GGUF recipes proven against llama.cpp's own converter and transformers: tiny HuggingFace Llama folders
(random init with attention that depends on the q/k rows, grouped-query attention, tied and untied embeddings)
converted by convert_hf_to_gguf.py come back through `gguf/llama-to-hf` as folders from_pretrained loads strictly,
with the original logits (f32) or, tensor for tensor, what transformers' own GGUF loader reads (f16, q8_0); and
HF -> GGUF -> HF through both shipped recipes is bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers.llama_gguf import llama_cpp_gguf, llama_folder

TOKENS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
CONFIG_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "vocab_size", "tie_word_embeddings",
                 "head_dim")  # fmt: skip
# How far the logits of the quantized file may be from the float32 model's, relative to the largest logit: f16
# rounds each weight to 11 significant bits, q8_0 to 8 bits per block of 32 (measured on these models: f16 ~0.2%,
# q8_0 ~12%: their 0.3-spread weights make activations and attention sharp). The exact check is the one before it:
# the weights equal the gguf package's dequantization (read by transformers), so the logits are that model's.
TOLERANCE = {"f16": 0.01, "q8_0": 0.25}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llama")
    return {
        "untied": llama_folder(root / "untied", spread=True),
        "tied": llama_folder(root / "tied", spread=True, seed=1, tie_word_embeddings=True),
    }


def logits(folder: Path, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    from transformers import LlamaForCausalLM

    model, info = LlamaForCausalLM.from_pretrained(str(folder), output_loading_info=True, dtype=dtype)
    assert not any(info.values()), info
    with torch.no_grad():
        return model.eval()(TOKENS).logits


def logits_of(folder: Path, state: dict[str, torch.Tensor]) -> torch.Tensor:
    """The logits of the folder's model with these weights (as float32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig.from_pretrained(str(folder)))
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if model.config.tie_word_embeddings else set())
    with torch.no_grad():
        return model.eval()(TOKENS).logits


def transformers_gguf_tensors(gguf_file: Path, folder: Path) -> dict[str, torch.Tensor]:
    """What transformers' own GGUF loader reads from the file: dequantized by the gguf package, q/k reordered."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig.from_pretrained(str(folder)))
    return load_gguf_checkpoint(str(gguf_file), return_tensors=True, model_to_load=model)["tensors"]


@pytest.mark.parametrize("kind", ["untied", "tied"])
@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0"])
def test_llama_cpps_gguf_converts_back_to_a_folder_from_pretrained_loads(
    run_cli, folders, tmp_path: Path, kind: str, outtype: str
) -> None:
    folder = folders[kind]
    gguf_file = llama_cpp_gguf(folder, tmp_path / f"{kind}.{outtype}.gguf", outtype)
    out = tmp_path / "hf"
    result = run_cli("convert", gguf_file, "-r", "gguf/llama-to-hf", "-o", f"{out}/")
    assert result.code == 0, result.out + result.err
    assert "validation against LlamaForCausalLM from" in result.out and "OK (" in result.out
    config, original = (json.loads((f / "config.json").read_text()) for f in (out, folder))
    assert {k: config.get(k) for k in CONFIG_FIELDS} == {k: original.get(k) for k in CONFIG_FIELDS}
    assert config["rope_parameters"]["rope_theta"] == original["rope_parameters"]["rope_theta"]
    written = load_file(str(out / "model.safetensors"))
    assert ("lm_head.weight" in written) == (kind == "untied")
    theirs = transformers_gguf_tensors(gguf_file, folder)
    assert written.keys() == theirs.keys() - ({"lm_head.weight"} if kind == "tied" else set())
    for key, tensor in written.items():
        assert torch.equal(tensor.float(), theirs[key].float()), key
    got, want = logits(out), logits(folder)
    if outtype == "f32":
        assert torch.equal(got, want)
    else:
        assert torch.equal(got, logits_of(folder, theirs))
        assert (got - want).abs().max().item() < TOLERANCE[outtype] * want.abs().max().item()


@pytest.mark.parametrize("kind", ["untied", "tied"])
def test_hf_to_gguf_to_hf_is_bit_for_bit_in_float32(run_cli, folders, tmp_path: Path, kind: str) -> None:
    folder = folders[kind]
    gguf_file = tmp_path / "model.gguf"
    there = run_cli("convert", folder, "-r", "hf/llama-to-gguf", "-o", gguf_file, "--dtype", "float32")
    assert there.code == 0, there.out + there.err
    back = run_cli("convert", gguf_file, "-r", "gguf/llama-to-hf", "-o", f"{tmp_path / 'back'}/")
    assert back.code == 0, back.out + back.err
    original, restored = (
        load_file(str(folder / "model.safetensors")),
        load_file(str(tmp_path / "back/model.safetensors")),
    )
    assert restored.keys() == original.keys()
    assert all(torch.equal(restored[k], original[k]) for k in original)
    assert torch.equal(logits(tmp_path / "back"), logits(folder))


def test_llama_31_rope_scaling_comes_back_from_rope_freqs(run_cli, tmp_path: Path) -> None:
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}  # fmt: skip
    folder = llama_folder(tmp_path / "llama31", spread=True, rope_parameters=rope)
    gguf_file = llama_cpp_gguf(folder, tmp_path / "llama31.gguf", "f32")
    out = tmp_path / "hf"
    result = run_cli("convert", gguf_file, "-r", "gguf/llama-to-hf", "-o", f"{out}/")
    assert result.code == 0, result.out + result.err
    assert json.loads((out / "config.json").read_text())["rope_parameters"] == rope
    assert torch.equal(logits(out), logits(folder))


def test_attention_biases_are_reordered_like_the_weights(run_cli, tmp_path: Path) -> None:
    folder = llama_folder(tmp_path / "biased", spread=True, attention_bias=True)
    gguf_file = llama_cpp_gguf(folder, tmp_path / "biased.gguf", "f32")
    out = tmp_path / "hf"
    result = run_cli("convert", gguf_file, "-r", "gguf/llama-to-hf", "-o", f"{out}/")
    assert result.code == 0, result.out + result.err
    assert torch.equal(logits(out), logits(folder))
    ours = tmp_path / "ours.gguf"
    assert run_cli("convert", folder, "-r", "hf/llama-to-gguf", "-o", ours, "--dtype", "float32").code == 0
    import gguf

    def tensors(path: Path) -> list:
        return [(t.name, t.tensor_type.name, t.data.tobytes()) for t in gguf.GGUFReader(path).tensors]

    assert tensors(ours) == tensors(gguf_file)


def test_a_gguf_of_another_architecture_is_refused_for_a_model_folder(run_cli, tmp_path: Path) -> None:
    import gguf
    import numpy as np

    path = tmp_path / "qwen.gguf"
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    result = run_cli("convert", path, "-r", "gguf/llama-to-hf", "-o", f"{tmp_path / 'out'}/")
    assert result.code == 2
    assert result.err.strip().splitlines() == [
        f"ckptx: error: {path}: its metadata does not describe a LlamaForCausalLM: general.architecture is "
        f"'qwen2', not 'llama'; give the model's own config with --target DIR/ (a folder holding its config.json)"
    ]
    assert not (tmp_path / "out").exists()
