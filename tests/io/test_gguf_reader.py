"""GGUF files as sources: the converter's files read back to the HF weights (q/k rows as llama.cpp permutes them),
block types dequantized bit for bit as the gguf package does, and damaged headers refused in one line."""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ckptx.errors import SourceError
from ckptx.io.read.open import open_source
from tests.helpers.llama_gguf import SMALL, llama_cpp_gguf, llama_folder

NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "lm_head.weight": "output.weight",
    "model.norm.weight": "output_norm.weight",
}
PER_LAYER = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def gguf_name(key: str) -> str:
    if key in NAMES:
        return NAMES[key]
    _, _, layer, rest = key.split(".", 3)
    module = rest.rsplit(".", 1)[0]
    return f"blk.{layer}.{PER_LAYER[module]}.weight"


def llama_cpp_permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's LlamaModel.permute (HF rotary halves -> interleaved pairs)."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return llama_folder(tmp_path_factory.mktemp("llama") / "tiny")


@pytest.fixture(scope="module")
def converted(folder: Path) -> dict[str, Path]:
    """The converter's output for each out-type, made once per module (a run takes seconds)."""
    return {t: llama_cpp_gguf(folder, folder.parent / f"tiny-{t}.gguf", t) for t in ("f32", "f16", "q8_0")}


def expected_weights(folder: Path) -> dict[str, torch.Tensor]:
    hf = load_file(str(folder / "model.safetensors"))
    out = {}
    for key, tensor in hf.items():
        if key.endswith("q_proj.weight"):
            tensor = llama_cpp_permute(tensor, SMALL["num_attention_heads"])
        elif key.endswith("k_proj.weight"):
            tensor = llama_cpp_permute(tensor, SMALL["num_key_value_heads"])
        out[gguf_name(key)] = tensor
    return out


@pytest.mark.parametrize(("outtype", "dtype"), [("f32", torch.float32), ("f16", torch.float16)])
def test_converter_output_reads_back_to_the_weights(folder: Path, converted, outtype: str, dtype) -> None:
    path = converted[outtype]
    expected = expected_weights(folder)
    with open_source(path) as source:
        assert source.format == "gguf" and set(source.tensors) == set(expected)
        for key, tensor in expected.items():
            loaded = source.load(key)
            want = tensor if tensor.ndim == 1 else tensor.to(dtype)  # norms stay F32
            assert loaded.dtype == want.dtype and torch.equal(loaded, want), key
            assert source.raw_span(key) is not None


def test_q8_0_reads_back_as_the_gguf_packages_dequantization(folder: Path, converted) -> None:
    path = converted["q8_0"]
    reader = gguf.GGUFReader(path)
    expected = expected_weights(folder)
    with open_source(path) as source:
        for info in reader.tensors:
            loaded = source.load(info.name)
            reference = gguf.quants.dequantize(info.data, info.tensor_type).reshape(loaded.shape)
            assert loaded.dtype == torch.float32 and np.array_equal(loaded.numpy(), reference), info.name
            assert source.stored_as[info.name] == info.tensor_type.name
            assert (loaded - expected[info.name]).abs().max() <= expected[info.name].abs().max() / 127


def random_blocks(qtype: gguf.GGMLQuantizationType, rows: int, cols: int, seed: int) -> np.ndarray:
    """Random raw blocks whose float16 scales are finite."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = np.random.default_rng(seed).integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    halves = {gguf.GGMLQuantizationType.Q6_K: [size - 2], gguf.GGMLQuantizationType.Q4_K: [0, 2]}.get(qtype, [0])
    for at in halves:
        raw[..., at : at + 2] = (
            np.float16(np.random.default_rng(seed + at).uniform(-2, 2, (rows, cols // block)))
            .view(np.uint8)
            .reshape(rows, cols // block, 2)
        )
    return raw.reshape(rows, cols // block * size)


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q4_K", "Q6_K", "BF16", "F16", "F32"])
def test_block_types_dequantize_bit_for_bit_as_gguf(tmp_path: Path, name: str) -> None:
    qtype = gguf.GGMLQuantizationType[name]
    rows, cols = 3, 512
    writer = gguf.GGUFWriter(tmp_path / "t.gguf", "llama")
    if name in ("BF16", "F16", "F32"):
        values = np.random.default_rng(1).standard_normal((rows, cols)).astype(np.float32)
        data = gguf.quants.quantize(values, qtype) if name != "F32" else values
        writer.add_tensor("t", data, raw_dtype=qtype)
        reference = gguf.quants.dequantize(data, qtype)
    else:
        raw = random_blocks(qtype, rows, cols, seed=2)
        writer.add_tensor("t", raw, raw_shape=(rows, raw.shape[1]), raw_dtype=qtype)
        reference = gguf.quants.dequantize(raw, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with open_source(tmp_path / "t.gguf") as source:
        loaded = source.load("t")
        assert tuple(loaded.shape) == (rows, cols)
        assert np.array_equal(loaded.float().numpy().view(np.uint32), reference.astype(np.float32).view(np.uint32))


def test_other_block_types_need_the_gguf_package_or_say_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ckptx.errors import UnsupportedDtype

    qtype = gguf.GGMLQuantizationType.Q5_0
    raw = random_blocks(qtype, 2, 64, seed=3)
    writer = gguf.GGUFWriter(tmp_path / "q5.gguf", "llama")
    writer.add_tensor("t", raw, raw_shape=raw.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with open_source(tmp_path / "q5.gguf") as source:
        assert np.array_equal(source.load("t").numpy(), gguf.quants.dequantize(raw, qtype))
        monkeypatch.setitem(__import__("sys").modules, "gguf", None)
        with pytest.raises(UnsupportedDtype, match=r"tensor 't' is Q5_0; .* pip install 'ckptx\[gguf\]'"):
            source.load("t")


def test_inspect_shows_metadata_and_stored_types(converted, run_cli) -> None:
    path = converted["q8_0"]
    result = run_cli("inspect", path)
    assert result.code == 0, result.out
    assert "GGUF version 3: 25 metadata keys, 21 tensors, alignment 32" in result.out
    assert "tensor types: Q8_0 (16), F32 (5)" in result.out
    assert "general.architecture=llama" in result.out and "llama.block_count=2" in result.out
    assert "tokenizer.ggml.tokens=[64 str values]" in result.out
    doc = run_cli("inspect", path, "--json").json
    assert doc["tensors"]["blk.0.attn_q.weight"] == {"shape": [64, 64], "dtype": "float32", "stored_as": "Q8_0"}


def test_a_truncated_file_is_one_line_naming_the_tensor(converted, tmp_path: Path, run_cli) -> None:
    path = converted["f32"]
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:-1000])
    result = run_cli("inspect", cut)
    assert result.code == 2
    assert f"{cut}: tensor 'blk.1.attn_v.weight'" in result.err and "the file is truncated" in result.err
    assert "Traceback" not in result.err


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        (lambda raw: raw[:4] + struct.pack("<I", 7) + raw[8:], "GGUF version 7; ckptx reads versions 2 and 3"),
        (lambda raw: raw[:8] + struct.pack("<Q", 2**40) + raw[16:], "more than"),
        (lambda raw: raw[:24] + struct.pack("<Q", 2**50) + raw[32:], "needs 1125899906842624 bytes but the file ends"),
    ],
)
def test_a_hostile_header_is_refused_before_any_allocation(converted, tmp_path: Path, patch, message) -> None:
    path = converted["f32"]
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(patch(path.read_bytes()))
    with pytest.raises(SourceError, match=message):
        open_source(bad)
