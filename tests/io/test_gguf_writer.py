"""GGUF output: the tensors (names, types, shapes, bytes) llama.cpp's converter writes for the same HF folder and
out-type, the metadata keys llama.cpp needs, header first and nothing half-written."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest
import torch

from tests.helpers.llama_gguf import llama_cpp_gguf, llama_folder

RECIPE = Path(__file__).resolve().parents[1] / "cases" / "gguf" / "tiny-llama-to-gguf.yaml"
TYPES = [("float32", "f32"), ("float16", "f16"), ("bfloat16", "bf16"), ("q8_0", "q8_0")]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return llama_folder(tmp_path_factory.mktemp("llama") / "tiny", dtype=torch.bfloat16)


def tensors(path: Path) -> list[tuple[str, str, tuple[int, ...], bytes]]:
    return [
        (t.name, t.tensor_type.name, tuple(int(n) for n in t.shape), t.data.tobytes())
        for t in gguf.GGUFReader(path).tensors
    ]


def fields(path: Path) -> dict:
    return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items() if not k.startswith("GGUF.")}


@pytest.mark.parametrize(("ours", "theirs"), TYPES)
def test_tensors_equal_llama_cpps_converter(folder: Path, tmp_path: Path, run_cli, ours: str, theirs: str) -> None:
    reference = llama_cpp_gguf(folder, tmp_path / "reference.gguf", theirs)
    out = tmp_path / "ckptx.gguf"
    result = run_cli("convert", folder / "model.safetensors", "-r", RECIPE, "-o", out, "--gguf-type", ours)
    assert result.code == 0, result.err
    assert tensors(out) == tensors(reference)
    mine, expected = fields(out), fields(reference)
    needed = [
        k
        for k in expected
        if k.startswith(("llama.", "tokenizer.")) or k in ("general.architecture", "general.file_type")
    ]
    assert {k: mine.get(k) for k in needed} == {k: expected[k] for k in needed}


def test_auto_takes_bfloat16_from_a_bfloat16_model(folder: Path, tmp_path: Path, run_cli) -> None:
    out = tmp_path / "auto.gguf"
    assert run_cli("convert", folder / "model.safetensors", "-r", RECIPE, "-o", out).code == 0
    kinds = {name: kind for name, kind, _, _ in tensors(out)}
    assert kinds["blk.0.attn_q.weight"] == "BF16" and kinds["blk.0.attn_norm.weight"] == "F32"


def test_without_a_tokenizer_the_file_has_no_tokenizer_keys(tmp_path: Path, run_cli) -> None:
    bare = llama_folder(tmp_path / "bare", tokenizer=False)
    out = tmp_path / "bare.gguf"
    assert run_cli("convert", bare / "model.safetensors", "-r", RECIPE, "-o", out, "--gguf-type", "float16").code == 0
    keys = fields(out)
    assert keys["general.architecture"] == "llama" and keys["llama.block_count"] == 2
    assert not any(k.startswith("tokenizer.") for k in keys)


def test_a_ckptx_gguf_reads_back_through_ckptx(folder: Path, tmp_path: Path, run_cli) -> None:
    out = tmp_path / "f32.gguf"
    assert run_cli("convert", folder / "model.safetensors", "-r", RECIPE, "-o", out, "--gguf-type", "float32").code == 0
    back = tmp_path / "back.safetensors"
    assert run_cli("convert", out, "-o", back).code == 0
    from safetensors.torch import load_file

    hf = load_file(str(folder / "model.safetensors"))
    assert torch.equal(load_file(str(back))["token_embd.weight"], hf["model.embed_tokens.weight"].float())
