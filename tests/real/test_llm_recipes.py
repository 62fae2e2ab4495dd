"""The LLM recipes proven against the real implementations: Meta's reference Llama (`llama-models`) -> transformers'
LlamaForCausalLM by logits, and back bit for bit; torchtitan 0.3.0's DCP training checkpoints (2 gloo ranks, FSDP2)
-> HuggingFace tensor for tensor what torchtitan's own `state_dict_adapter.to_hf` gives."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import subprocess_env
from tests.helpers.dcp_checkpoints import free_port

ROOT = Path(__file__).resolve().parents[2]
META = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 128, "multiple_of": 32,
        "ffn_dim_multiplier": 1.3, "norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": False}  # fmt: skip


@pytest.fixture(scope="module")
def meta_model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[torch.nn.Module, Path]]:
    """A randomly initialised tiny Meta Transformer saved as Meta ships it: consolidated.00.pth + params.json."""
    import torch.distributed as dist
    from fairscale.nn.model_parallel import initialize as fs_init
    from llama_models.llama3.args import ModelArgs
    from llama_models.llama3.model import Transformer

    # fairscale's parallel layers need a process group (one gloo rank) and model parallelism of 1
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    if not fs_init.model_parallel_is_initialized():
        fs_init.initialize_model_parallel(1)
    torch.manual_seed(0)
    model = Transformer(ModelArgs(**META, max_seq_len=32, max_batch_size=2))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.copy_(torch.randn(tensor.shape, generator=g) * 0.2)
    folder = tmp_path_factory.mktemp("meta") / "Llama-tiny"
    folder.mkdir()
    torch.save(model.state_dict(), folder / "consolidated.00.pth")
    (folder / "params.json").write_text(json.dumps(META))
    try:
        yield model.eval(), folder
    finally:  # the forward pass needs the groups too: torn down after the module's tests
        fs_init.destroy_model_parallel()
        if started:
            dist.destroy_process_group()


def test_meta_to_hf_gives_metas_logits_and_reverses_bit_for_bit(run_cli, meta_model, tmp_path: Path) -> None:
    from transformers import LlamaForCausalLM

    model, folder = meta_model
    out = tmp_path / "hf"
    result = run_cli("convert", folder, "-r", "llama/meta-to-hf", "-o", f"{out}/")
    assert result.code == 0, result.out + result.err
    assert "validation against LlamaForCausalLM from" in result.out
    hf, info = LlamaForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    config = json.loads((out / "config.json").read_text())
    assert config["intermediate_size"] == model.layers[0].feed_forward.w1.weight.shape[0]
    tokens = torch.randint(0, META["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(tokens, 0)
        got = hf.eval()(tokens).logits
    assert (got - want).abs().max().item() < 1e-4

    back = tmp_path / "consolidated.00.pth"
    reverse = run_cli("convert", out, "-r", "llama/meta-to-hf", "--reverse", "-o", back)
    assert reverse.code == 0, reverse.out + reverse.err
    original = torch.load(folder / "consolidated.00.pth")
    restored = torch.load(back)
    assert restored.keys() == original.keys()
    for key, tensor in original.items():
        assert torch.equal(restored[key], tensor), key


def test_meta_to_hf_without_the_head_size_says_where_to_give_it(run_cli, meta_model, tmp_path: Path) -> None:
    _, folder = meta_model
    alone = tmp_path / "alone.pth"
    alone.write_bytes((folder / "consolidated.00.pth").read_bytes())
    result = run_cli("convert", alone, "-r", "llama/meta-to-hf", "-o", tmp_path / "x.safetensors")
    assert result.code == 2
    assert "its heads are not known: give heads or head_dim in the step (--set head_dim=N" in result.err
    fixed = run_cli(
        "convert", alone, "-r", "llama/meta-to-hf", "--set", "head_dim=16", "-o", tmp_path / "x.safetensors"
    )
    assert fixed.code == 0, fixed.err


@pytest.fixture(scope="module")
def torchtitan_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DCP training checkpoints of tiny torchtitan models, written by 2 gloo ranks (tests/helpers/torchtitan_models)."""
    import torchtitan  # noqa: F401 - installed by requirements/nodeps.txt; missing is a failure, not a skip

    out = tmp_path_factory.mktemp("torchtitan")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.helpers.torchtitan_models",
            str(out),
            "llama3",
            "qwen3",
            "qwen3_moe",
            "deepseek_v3",
        ],
        cwd=ROOT,
        env=subprocess_env(),
        check=True,
        timeout=600,
    )
    return out


def _hf_config(kind: str, folder: Path) -> Path:
    """The HuggingFace config of the same tiny model (what torchtitan's hf_assets_path holds)."""
    import transformers

    shared = dict(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_attention_heads=4, max_position_embeddings=64
    )
    if kind == "llama3":
        config = transformers.LlamaConfig(
            **shared, num_hidden_layers=2, num_key_value_heads=2, rope_theta=500000.0, tie_word_embeddings=False
        )
        config.architectures = ["LlamaForCausalLM"]
    elif kind == "qwen3":
        config = transformers.Qwen3Config(
            **shared, num_hidden_layers=2, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True
        )
        config.architectures = ["Qwen3ForCausalLM"]
    elif kind == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(
            **shared, num_hidden_layers=2, num_key_value_heads=2, head_dim=16, moe_intermediate_size=32,
            num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False,
        )  # fmt: skip
        config.architectures = ["Qwen3MoeForCausalLM"]
    else:
        config = transformers.DeepseekV3Config(
            **shared, num_hidden_layers=3, first_k_dense_replace=1, moe_intermediate_size=32, n_routed_experts=4,
            n_shared_experts=1, num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16,
            qk_rope_head_dim=16, v_head_dim=16, num_experts_per_tok=2, n_group=1, topk_group=1,
            tie_word_embeddings=False,
        )  # fmt: skip
        config.architectures = ["DeepseekV3ForCausalLM"]
    config.save_pretrained(folder)
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    return folder


@pytest.mark.parametrize(
    ("kind", "recipe"),
    [
        ("llama3", "torchtitan/llama3-to-hf"),
        ("qwen3", "torchtitan/qwen3-to-hf"),
        ("qwen3_moe", "torchtitan/qwen3-to-hf"),
        ("deepseek_v3", "torchtitan/deepseek-v3-to-hf"),
    ],
)
def test_a_torchtitan_dcp_checkpoint_converts_as_torchtitans_to_hf(
    run_cli, torchtitan_checkpoints: Path, tmp_path: Path, kind: str, recipe: str
) -> None:
    from tests.helpers.torchtitan_models import model_config, state_dict_adapter

    assets = _hf_config(kind, tmp_path / "assets")
    out = tmp_path / "hf"
    result = run_cli(
        "convert", torchtitan_checkpoints / kind / "step-2", "-r", recipe, "--target", f"{assets}/", "-o", f"{out}/"
    )
    assert result.code == 0, result.out + result.err
    assert "note: non-tensor entries dropped: lr_scheduler, optimizer, train_state" in result.out
    full = torch.load(torchtitan_checkpoints / kind / "full.pt")
    want = state_dict_adapter(kind, model_config(kind)).to_hf(full)
    got: dict[str, torch.Tensor] = {}
    for file in out.glob("*.safetensors"):
        got.update(load_file(str(file)))
    assert got.keys() == want.keys()
    for key, tensor in want.items():
        assert torch.equal(got[key], tensor.contiguous()), key
    assert (out / "tokenizer.json").exists()
    if kind != "deepseek_v3":  # transformers' DeepSeek-V3 builds from this config too, but is slow to load here
        from transformers import AutoModelForCausalLM

        _, info = AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
