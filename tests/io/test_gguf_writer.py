"""GGUF output through the shipped recipe hf/llama-to-gguf: the tensors (names, types, shapes, bytes) llama.cpp's
converter writes for the same HF folder and out-type (`--dtype`), the metadata keys llama.cpp needs, the tensors
checked against what llama.cpp loads before a byte is written."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
import torch

from tests.conftest import cli_without_torch
from tests.helpers.llama_gguf import llama_cpp_gguf, llama_folder

RECIPE = "hf/llama-to-gguf"
TYPES = [("float32", "f32"), ("float16", "f16"), ("bfloat16", "bf16"), ("q8_0", "q8_0")]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return llama_folder(tmp_path_factory.mktemp("llama") / "tiny", dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def f32_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return llama_folder(tmp_path_factory.mktemp("llama") / "tiny32", spread=True)


def tensors(path: Path) -> list[tuple[str, str, tuple[int, ...], bytes]]:
    return [
        (t.name, t.tensor_type.name, tuple(int(n) for n in t.shape), t.data.tobytes())
        for t in gguf.GGUFReader(path).tensors
    ]


def fields(path: Path) -> dict:
    return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items() if not k.startswith("GGUF.")}


def assert_same_as_converter(out: Path, reference: Path) -> None:
    assert tensors(out) == tensors(reference)
    mine, expected = fields(out), fields(reference)
    needed = [
        k
        for k in expected
        if k.startswith(("llama.", "tokenizer.")) or k in ("general.architecture", "general.file_type")
    ]
    assert {k: mine.get(k) for k in needed} == {k: expected[k] for k in needed}


@pytest.mark.parametrize(("ours", "theirs"), TYPES)
def test_a_float32_folder_gives_llama_cpps_tensors(f32_folder: Path, tmp_path: Path, run_cli, ours, theirs) -> None:
    reference = llama_cpp_gguf(f32_folder, tmp_path / "reference.gguf", theirs)
    out = tmp_path / "ckptx.gguf"
    result = run_cli("convert", f32_folder, "-r", RECIPE, "-o", out, "--dtype", ours)
    assert result.code == 0, result.err
    assert "validation against llama.cpp's llama architecture" in result.out and "OK (21/21" in result.out
    assert_same_as_converter(out, reference)


@pytest.mark.parametrize(("ours", "theirs"), [("bfloat16", "bf16"), ("q8_0", "q8_0")])
def test_a_bfloat16_safetensors_file_gives_llama_cpps_tensors(folder: Path, tmp_path: Path, run_cli, ours, theirs):
    reference = llama_cpp_gguf(folder, tmp_path / "reference.gguf", theirs)
    out = tmp_path / "ckptx.gguf"
    result = run_cli("convert", folder / "model.safetensors", "-r", RECIPE, "-o", out, "--dtype", ours)
    assert result.code == 0, result.err
    assert_same_as_converter(out, reference)


def test_without_dtype_nothing_is_narrowed(f32_folder: Path, tmp_path: Path, run_cli) -> None:
    out = tmp_path / "kept.gguf"
    assert run_cli("convert", f32_folder, "-r", RECIPE, "-o", out).code == 0
    kinds = {name: kind for name, kind, _, _ in tensors(out)}
    assert set(kinds.values()) == {"F32"}
    assert fields(out)["general.file_type"] == 0


def test_q8_0_for_another_output_is_refused_in_one_line(f32_folder: Path, tmp_path: Path, run_cli) -> None:
    result = run_cli("convert", f32_folder, "-o", tmp_path / "out.safetensors", "--dtype", "q8_0")
    assert result.code == 2
    assert result.err == (
        "ckptx: error: --dtype q8_0: Q8_0 is a block-quantized GGUF type, which only a .gguf output holds; write "
        "-o MODEL.gguf, or cast with --dtype bfloat16|float16|float32\n"
    )
    assert not (tmp_path / "out.safetensors").exists()


def test_transformers_names_are_not_what_llama_cpp_loads(f32_folder: Path, tmp_path: Path, run_cli) -> None:
    result = run_cli("convert", f32_folder, "-o", tmp_path / "raw.gguf")
    assert result.code == 1
    assert "FAILED: 21 missing keys, 21 unexpected keys (0/21 target keys fit)" in result.out
    assert "no tensor has llama.cpp's names: a transformers Llama converts with -r hf/llama-to-gguf" in result.out
    assert not (tmp_path / "raw.gguf").exists()


def test_llama_cpp_names_without_a_llama_config_are_refused(f32_folder: Path, tmp_path: Path, run_cli) -> None:
    other = tmp_path / "other"
    other.mkdir()
    config = json.loads((f32_folder / "config.json").read_text())
    (other / "config.json").write_text(
        json.dumps({**config, "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]})
    )
    (other / "model.safetensors").symlink_to(f32_folder / "model.safetensors")
    result = run_cli("convert", other / "model.safetensors", "-r", RECIPE, "-o", tmp_path / "q.gguf")
    assert result.code == 2
    assert result.err == (
        f"ckptx: error: {other / 'config.json'}: says model_type 'qwen2', and the tensors have llama.cpp's names "
        f"('token_embd.weight'): ckptx writes llama.cpp's metadata for llama and mistral models only, and a GGUF file "
        f"without it is one llama.cpp cannot run; convert this model with llama.cpp's convert_hf_to_gguf.py\n"
    )


def test_without_dtype_a_bfloat16_model_stays_bfloat16(folder: Path, tmp_path: Path, run_cli) -> None:
    out = tmp_path / "auto.gguf"
    assert run_cli("convert", folder / "model.safetensors", "-r", RECIPE, "-o", out).code == 0
    kinds = {name: kind for name, kind, _, _ in tensors(out)}
    assert kinds["blk.0.attn_q.weight"] == "BF16" and kinds["blk.0.attn_norm.weight"] == "F32"


def test_without_a_tokenizer_the_file_has_no_tokenizer_keys(tmp_path: Path, run_cli) -> None:
    bare = llama_folder(tmp_path / "bare", tokenizer=False)
    out = tmp_path / "bare.gguf"
    assert run_cli("convert", bare / "model.safetensors", "-r", RECIPE, "-o", out, "--dtype", "float16").code == 0
    keys = fields(out)
    assert keys["general.architecture"] == "llama" and keys["llama.block_count"] == 2
    assert not any(k.startswith("tokenizer.") for k in keys)


def test_a_ckptx_gguf_reads_back_through_ckptx(folder: Path, tmp_path: Path, run_cli) -> None:
    out = tmp_path / "f32.gguf"
    assert run_cli("convert", folder / "model.safetensors", "-r", RECIPE, "-o", out, "--dtype", "float32").code == 0
    back = tmp_path / "back.safetensors"
    assert run_cli("convert", out, "-o", back).code == 0
    from safetensors.torch import load_file

    hf = load_file(str(folder / "model.safetensors"))
    assert torch.equal(load_file(str(back))["token_embd.weight"], hf["model.embed_tokens.weight"].float())


@pytest.mark.parametrize("dtype", [None, "float16", "q8_0"])
def test_hf_to_gguf_runs_without_torch(f32_folder: Path, tmp_path: Path, dtype: str | None) -> None:
    """The q/k rows are reordered by the rotary byte kernel and converted a block of rows at a time: torch (0.3-3 s
    to import, hundreds of MiB) is never loaded, and the bytes are those of the in-process conversion, which the
    tests above compare with llama.cpp's."""
    out = tmp_path / "no-torch.gguf"
    argv = ["convert", str(f32_folder), "-r", RECIPE, "-o", str(out), *(["--dtype", dtype] if dtype else [])]
    cli_without_torch(*argv)
    reference = tmp_path / "in-process.gguf"
    from ckptx.cli import main

    assert main(["convert", str(f32_folder), "-r", RECIPE, "-o", str(reference), *argv[6:]]) == 0
    assert tensors(out) == tensors(reference)
