"""HuggingFace model folders as sources and targets, through the CLI: real transformers classes, tiny configs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from .conftest import require_library


@pytest.fixture(autouse=True)
def _hf() -> None:
    require_library("hf")


def _llama(**overrides: object) -> object:
    import transformers

    fields = dict(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=64,
        tie_word_embeddings=False,
    )  # fmt: skip
    fields.update(overrides)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**fields)).eval()


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sharded Llama folder as save_pretrained writes it, with tokenizer files and a README beside it."""
    folder = tmp_path_factory.mktemp("llama") / "tiny-llama"
    model = _llama()
    model.save_pretrained(folder, max_shard_size="100KB")
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"}}')
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    (folder / "special_tokens_map.json").write_text('{"bos_token": "<s>"}')
    (folder / "README.md").write_text("# tiny llama\n")
    return folder


def _keys(folder: Path) -> set[str]:
    keys: set[str] = set()
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            keys |= set(f.keys())
    return keys


def _load(folder: Path, cls: str = "AutoModelForCausalLM") -> torch.nn.Module:
    import transformers

    model, info = getattr(transformers, cls).from_pretrained(str(folder), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def test_a_sharded_folder_cast_to_bfloat16_loads_with_its_config_and_files(run_cli, llama_folder, tmp_path) -> None:
    out = tmp_path / "bf16"
    result = run_cli("convert", llama_folder, "-o", f"{out}/", "--dtype", "bfloat16")
    assert result.code == 0, result.err
    assert "validation against LlamaForCausalLM from" in result.out and "dtype differs" not in result.out
    source_config = json.loads((llama_folder / "config.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert config.pop("dtype") == "bfloat16"
    source_config.pop("dtype")
    assert config == source_config
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "README.md"):
        assert (out / name).read_bytes() == (llama_folder / name).read_bytes()
    assert (out / "generation_config.json").read_bytes() == (llama_folder / "generation_config.json").read_bytes()
    model = _load(out)
    assert model.dtype == torch.bfloat16 and model.config.rope_parameters["rope_theta"] == 500000.0
    source = _load(llama_folder)
    for key, tensor in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], tensor.to(torch.bfloat16)), key


def test_inspect_and_a_dry_run_take_the_folder(run_cli, llama_folder) -> None:
    inspected = run_cli("inspect", llama_folder)
    assert (
        inspected.code == 0
        and "HuggingFace model folder: config.json and model.safetensors.index.json" in inspected.out
    )
    planned = run_cli("convert", llama_folder, "--dry-run", "--target", llama_folder / "config.json")
    assert planned.code == 0 and "OK (21/21 target keys matched)" in planned.out


def test_a_target_arg_overrides_a_config_field_typed_as_the_field(run_cli, llama_folder, tmp_path) -> None:
    out = tmp_path / "eps"
    result = run_cli("convert", llama_folder, "-o", f"{out}/", "--target-arg", "rms_norm_eps=1e-6")
    assert result.code == 0, result.err
    assert json.loads((out / "config.json").read_text())["rms_norm_eps"] == 1e-6


def test_an_unknown_target_arg_is_refused_with_the_closest_field(run_cli, llama_folder, tmp_path) -> None:
    out = tmp_path / "typo"
    result = run_cli("convert", llama_folder, "-o", f"{out}/", "--target-arg", "rms_norm_epsilon=1e-6")
    assert result.code == 2
    assert result.err == (
        "ckptx: error: the source's config: rms_norm_epsilon=1e-06: LlamaConfig has no field 'rms_norm_epsilon'; "
        "did you mean 'rms_norm_eps'?\n"
    )
    assert not out.exists()


def test_a_folder_target_whose_config_disagrees_fails_validation(run_cli, llama_folder, tmp_path) -> None:
    other = tmp_path / "wider"
    _llama(intermediate_size=128).save_pretrained(other)
    result = run_cli("convert", llama_folder, "--target", f"{other}/", "-o", f"{tmp_path / 'x'}/")
    assert result.code == 1 and "shape mismatch" in result.out
    assert not (tmp_path / "x").exists()


def _mixtral() -> object:
    import transformers

    config = transformers.MixtralConfig(
        vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(1)
    return transformers.MixtralForCausalLM(config).eval()


def test_a_mixtral_folder_keeps_the_per_expert_names_save_pretrained_writes(run_cli, tmp_path) -> None:
    source = tmp_path / "mixtral"
    model = _mixtral()
    model.save_pretrained(source)
    assert any(".experts.0.w1.weight" in k for k in _keys(source))  # the legacy names on disk
    out = tmp_path / "mixtral-bf16"
    result = run_cli("convert", source, "-o", f"{out}/", "--dtype", "bfloat16")
    assert result.code == 0, result.err
    assert _keys(out) == _keys(source)
    loaded = _load(out, "MixtralForCausalLM")
    ids = torch.arange(12).reshape(2, 6)
    with torch.no_grad():
        want = model.to(torch.bfloat16)(ids).logits
        assert torch.equal(loaded(ids).logits, want)


def test_a_class_layout_state_dict_fits_a_mixtral_folder_target_with_a_note(run_cli, tmp_path) -> None:
    from safetensors.torch import save_file

    folder = tmp_path / "mixtral"
    model = _mixtral()
    model.save_pretrained(folder)
    flat = tmp_path / "class.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(flat))
    result = run_cli("convert", flat, "--target", f"{folder}/", "-o", f"{tmp_path / 'out'}/")
    assert result.code == 0, result.out + result.err
    assert "the keys are the model class's own" in result.out
    _load(tmp_path / "out", "MixtralForCausalLM")


def test_diff_lint_and_suggest_take_model_folders(run_cli, llama_folder, tmp_path) -> None:
    out = tmp_path / "half"
    assert run_cli("convert", llama_folder, "-o", f"{out}/", "--dtype", "float16").code == 0
    diff = run_cli("diff", llama_folder, out)
    assert diff.code == 1 and "model.norm.weight: A float32 vs B float16" in diff.out  # B's weights, not its class
    assert run_cli("diff", llama_folder, llama_folder).code == 0
    lint = run_cli("lint", "--source", llama_folder, "llama/llama-to-fused-qkv")
    assert lint.code == 0, lint.out + lint.err
    suggested = run_cli("suggest", llama_folder, "--target", f"{llama_folder}/")
    assert suggested.code == 0 and "OK (21/21 target keys matched)" in suggested.out


def test_a_folder_without_weights_is_refused_saying_so(run_cli, tmp_path) -> None:
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    result = run_cli("inspect", folder)
    assert result.code == 2
    assert "has a config.json but no weights" in result.err


def test_the_transformers_factory_types_text_values_and_refuses_unknown_fields(run_cli, llama_folder, tmp_path) -> None:
    args = ["--target", "ckptx.factories:transformers_model", "--target-arg", "architecture=LlamaForCausalLM"]
    config = json.loads((llama_folder / "config.json").read_text())
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_key_value_heads"):
        args += ["--target-arg", f"{key}={config[key]}"]
    args += ["--target-arg", "num_attention_heads=4", "--target-arg", "rms_norm_eps=1e-5"]
    out = tmp_path / "factory"
    result = run_cli("convert", llama_folder, "-o", f"{out}/", *args)
    assert result.code == 0, result.out + result.err
    assert json.loads((out / "config.json").read_text())["rms_norm_eps"] == 1e-5
    typo = run_cli("convert", llama_folder, "--dry-run", *args, "--target-arg", "num_layers=2")
    assert typo.code == 2 and "LlamaConfig has no field 'num_layers'" in typo.err


def test_a_batch_job_takes_a_model_folder_as_its_source(run_cli, llama_folder, tmp_path) -> None:
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text(
        f"ckptx: 1\njobs:\n  - src: {llama_folder}\n    dst: out/tiny.safetensors\n"
        "    rules: [common/strip-module-prefix]\n"
    )
    result = run_cli("batch", jobs)
    assert result.code == 0, result.out + result.err
    assert _keys(tmp_path / "out") == _keys(llama_folder)


def test_a_config_json_that_is_a_fifo_is_refused_not_waited_on(run_cli, llama_folder, tmp_path) -> None:
    folder = tmp_path / "fifo"
    folder.mkdir()
    for weights in llama_folder.glob("*.safetensors*"):
        (folder / weights.name).symlink_to(weights)
    os.mkfifo(folder / "config.json")
    result = run_cli("inspect", folder)
    assert result.code == 2
    assert f"{folder / 'config.json'}: is a named pipe, not a regular file" in result.err


@pytest.mark.parametrize(
    ("field", "value", "said"),
    [
        (
            "num_hidden_layers",
            2**32 - 1,
            "num_hidden_layers is 4294967295 (ckptx builds models of at most 1,000 layers)",
        ),
        ("num_local_experts", 10**9, "num_local_experts is 1000000000 (ckptx builds models of at most 10,000 experts"),
    ],
)
def test_a_config_stating_an_endless_model_is_refused_before_it_is_built(
    run_cli, llama_folder, tmp_path, field: str, value: int, said: str
) -> None:
    """A hostile config.json (4 billion layers) would be built on the meta device module by module, for hours:
    refused in one line naming the field, nothing written."""
    folder = tmp_path / "endless"
    folder.mkdir()
    for weights in llama_folder.glob("*.safetensors*"):
        (folder / weights.name).symlink_to(weights)
    config = json.loads((llama_folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, field: value}))
    result = run_cli("convert", folder, "-o", f"{tmp_path / 'out'}/")
    assert result.code == 2 and result.err.count("\n") == 1
    assert f"{folder / 'config.json'}: {said}" in result.err
    assert not (tmp_path / "out").exists()
