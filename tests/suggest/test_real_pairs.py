"""`ckptx suggest` on real model pairs: the suggested recipe, written to a file and used as written by
`ckptx convert`, loads strictly into the real target, which then computes the source model's outputs.

Families: ResNet (torchvision, timm, transformers, MMPretrain), ConvNeXt-V2 (official, timm, transformers,
MMPretrain), ViT (timm, transformers, torchvision), GPT-2 (transformers Conv1D -> nn.Linear), EfficientNet and
MobileNet (torchvision -> timm). Random weights, small configs, nothing downloaded.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from . import models
from .conftest import require

ATOL = 1e-4


def _close(target: torch.nn.Module, state: dict, source: torch.nn.Module, x: torch.Tensor) -> float:
    target.load_state_dict(state, strict=True)
    target.eval()
    expected, actual = models.run(source, x), models.run(target, x)
    assert expected.shape == actual.shape
    diff = (expected.double() - actual.double()).abs().max().item()
    assert diff < ATOL, f"outputs differ by {diff}"
    return diff


def _image(size: int = 64) -> torch.Tensor:
    return torch.randn((2, 3, size, size), generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------------------------ ResNet
@pytest.fixture(scope="module")
def tv_resnet50() -> torch.nn.Module:
    require("torchvision")
    import torchvision

    return models.randomize(torchvision.models.resnet50(), seed=1)


def _ddp_checkpoint(model: torch.nn.Module, path: Path) -> Path:
    """A DDP training checkpoint: `module.` keys under `model`, beside optimizer state and the epoch."""
    torch.save(
        {
            "model": {f"module.{k}": v for k, v in model.state_dict().items()},
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]},
            "epoch": 3,
        },
        path,
    )
    return path


def test_torchvision_resnet50_ddp_to_timm(tv_resnet50, suggest_and_convert, tmp_path: Path) -> None:
    require("timm")
    src = _ddp_checkpoint(tv_resnet50, tmp_path / "resnet50_ddp.pth")
    got = suggest_and_convert(src, "ckptx.factories:timm_model", {"name": "resnet50"})
    assert got.report["extracted_from"] == "model" and got.report["strip_prefix"] == "module."
    assert "extract: model" in got.text and "strip_prefix: 'module.'" in got.text and "rename" not in got.text
    from ckptx.factories import timm_model

    _close(timm_model("resnet50"), got.state, tv_resnet50, _image())


def test_torchvision_resnet50_to_transformers(tv_resnet50, suggest_and_convert, tmp_path: Path) -> None:
    require("transformers")
    src = _ddp_checkpoint(tv_resnet50, tmp_path / "resnet50_ddp.pth")
    got = suggest_and_convert(src, "tests.suggest.models:hf_resnet50")
    # one generalizing row per kind of layer, with index arithmetic
    assert (
        r"['^layer(\d+)\.(\d+)\.conv(\d+)\.', 'resnet.encoder.stages.{\1 - 1}.layers.\2.layer.{\3 - 1}.convolution.']"
        in got.text
    )
    _close(models.hf_resnet50(), got.state, tv_resnet50, _image())


def test_mmpretrain_resnet50_to_torchvision(suggest_and_convert, tmp_path: Path) -> None:
    require("mmpretrain", "torchvision")
    import torchvision

    source = models.randomize(models.mm_resnet50(), seed=2)
    src = tmp_path / "mm_resnet50.pth"
    torch.save({"meta": {"epoch": 100}, "state_dict": source.state_dict(), "optimizer": {"state": {}}}, src)
    got = suggest_and_convert(src, "torchvision.models:resnet50")
    assert got.report["extracted_from"] == "state_dict"
    _close(torchvision.models.resnet50(), got.state, source, _image())


# ------------------------------------------------------------------------------------------------ ConvNeXt-V2
@pytest.fixture(scope="module")
def official_atto(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    """An official ConvNeXt-V2 atto training checkpoint (optimizer, scaler, an argparse.Namespace)."""
    from tests.real.official_convnextv2 import build_official, make_official_checkpoint, randomize_

    model = randomize_(build_official("atto"), 3).eval()
    path = tmp_path_factory.mktemp("official") / "convnextv2_atto_train.pth"
    make_official_checkpoint(model, path, training=True, seed=3, model_name="convnextv2_atto")
    return model, path


ALLOW_ARGS = ["--allow-global", "argparse.Namespace"]


@pytest.mark.parametrize(
    "target,factory",
    [
        ("ckptx.factories:convnextv2_timm", "timm"),
        ("ckptx.factories:convnextv2_hf", "transformers"),
        ("ckptx.factories:convnextv2_mmpretrain", "mmpretrain"),
    ],
)
def test_official_convnextv2_to_libraries(official_atto, suggest_and_convert, target: str, factory: str) -> None:
    require(factory)
    model, src = official_atto
    got = suggest_and_convert(
        src, target, {"size": "atto"}, extra=ALLOW_ARGS, convert_extra=ALLOW_ARGS, name=f"official-to-{factory}.yaml"
    )
    assert got.report["extracted_from"] == "model"
    from ckptx import factories

    if factory != "transformers":  # GRN is (1, 1, 1, 4C) in the official model and HF, (4C,) in timm and MMPretrain
        assert "reshape" in got.report["ops"]
    _close(getattr(factories, target.split(":")[1])("atto"), got.state, model, _image())


# ------------------------------------------------------------------------------------------------ ViT
def test_timm_vit_to_transformers_splits_qkv(suggest_and_convert, tmp_path: Path) -> None:
    require("timm", "transformers")
    source = models.randomize(models.timm_vit(), seed=4)
    src = tmp_path / "timm_vit.safetensors"  # a safetensors file: keys sorted by name, order evidence weaker
    save_file(source.state_dict(), str(src))
    got = suggest_and_convert(
        src, "tests.suggest.models:hf_vit", extra=["--no-library"]
    )  # inferred, not vit/timm-to-hf
    assert got.report["ops"].get("split") == 2 * models.VIT["layers"]  # qkv weight and bias of each block
    assert "split" in got.text
    _close(models.hf_vit(), got.state, source, _image(models.VIT["image"]))


def test_transformers_vit_to_timm_merges_qkv(suggest_and_convert, tmp_path: Path) -> None:
    require("timm", "transformers")
    source = models.randomize(models.hf_vit(), seed=5)
    src = tmp_path / "hf_vit.pth"
    torch.save(source.state_dict(), src)
    got = suggest_and_convert(src, "tests.suggest.models:timm_vit", extra=["--no-library"])
    assert got.report["ops"].get("merge") == 2 * models.VIT["layers"]
    _close(models.timm_vit(), got.state, source, _image(models.VIT["image"]))


def test_torchvision_vit_to_timm(suggest_and_convert, tmp_path: Path) -> None:
    require("timm", "torchvision")
    source = models.randomize(models.tv_vit(), seed=6)
    src = tmp_path / "tv_vit.pth"
    torch.save(source.state_dict(), src)
    got = suggest_and_convert(src, "tests.suggest.models:timm_vit")
    assert r"encoder_layer_(\d+)" in got.text  # the index inside a name generalizes too
    _close(models.timm_vit(), got.state, source, _image(models.VIT["image"]))


# ------------------------------------------------------------------------------------------------ GPT-2
def test_transformers_gpt2_to_linear_layout_transposes(suggest_and_convert, tmp_path: Path) -> None:
    require("transformers")
    source = models.randomize(models.hf_gpt2(), seed=7)
    src = tmp_path / "gpt2.bin"
    torch.save(source.state_dict(), src)
    got = suggest_and_convert(src, "tests.suggest.models:nano_gpt")
    assert "permute" in got.text and "dims: [1, 0]" in got.text
    tokens = torch.randint(0, models.GPT_CONFIG["vocab_size"], (2, 8), generator=torch.Generator().manual_seed(2))
    _close(models.nano_gpt(), got.state, source, tokens)


# --------------------------------------------------------------------------------------- EfficientNet, MobileNet
@pytest.mark.parametrize(
    "tv_name,timm_name,kwargs",
    [
        ("efficientnet_b0", "efficientnet_b0", {}),
        ("mobilenet_v3_large", "mobilenetv3_large_100", {"bn_eps": 0.001}),
    ],
)
def test_torchvision_mobile_nets_to_timm(
    suggest_and_convert, tmp_path: Path, tv_name: str, timm_name: str, kwargs: dict[str, Any]
) -> None:
    require("timm", "torchvision")
    import torchvision

    from ckptx.factories import timm_model

    source = models.randomize(getattr(torchvision.models, tv_name)(), seed=8)
    src = tmp_path / f"{tv_name}.pth"
    torch.save(source.state_dict(), src)
    got = suggest_and_convert(src, "ckptx.factories:timm_model", {"name": timm_name, **kwargs})
    _close(timm_model(timm_name, **kwargs), got.state, source, _image())


# ------------------------------------------------------------------------------------------------ Llama <-> fused
def _llm(architecture: str, seed: int) -> torch.nn.Module:
    from ckptx.factories import transformers_model

    model = transformers_model(architecture, **LLM)
    return models.randomize(model, seed)


#: a tiny Llama with grouped-query attention: q 32 rows, k and v 16 rows each
LLM = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
    max_position_embeddings=64,
    tie_word_embeddings=False,
    pad_token_id=None,
)


@pytest.mark.parametrize(
    "source_arch,target_arch,op",
    [
        ("LlamaForCausalLM", "Phi3ForCausalLM", "merge"),  # q/k/v (unequal sizes) and gate/up fused
        ("Phi3ForCausalLM", "LlamaForCausalLM", "split"),
    ],
)
def test_llama_and_fused_layout(
    suggest_and_convert, tmp_path: Path, source_arch: str, target_arch: str, op: str
) -> None:
    require("transformers")
    source = _llm(source_arch, seed=9)
    src = tmp_path / f"{source_arch}.safetensors"  # keys sorted by name: q/k/v are found by name, not order
    save_file(source.state_dict(), str(src))
    args = {"architecture": target_arch, **LLM}
    got = suggest_and_convert(src, "ckptx.factories:transformers_model", args, extra=["--no-library"])
    assert got.report["ops"].get(op) == 2 * LLM["num_hidden_layers"]  # qkv and gate_up of each layer
    if op == "split":
        assert "sizes: [32, 16, 16]" in got.text
    tokens = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    from ckptx.factories import transformers_model

    _close(transformers_model(target_arch, **LLM), got.state, source, tokens)


# ------------------------------------------------------------------------------------------------ CLIP, DINOv2
@pytest.mark.parametrize(
    "source,target,allow,size",
    [
        ("timm_clip_vit", "hf_clip_vision", [], models.VIT["image"]),  # k, v, q registered in that order by HF
        ("timm_dinov2", "hf_dinov2", [r"\.mask_token$"], 28),  # LayerScale; a mask token only HF has
    ],
)
def test_timm_vision_towers_to_transformers(
    suggest_and_convert, tmp_path: Path, source: str, target: str, allow: list[str], size: int
) -> None:
    require("timm", "transformers")
    model = models.randomize(getattr(models, source)(), seed=10)
    src = tmp_path / f"{source}.pth"
    torch.save(model.state_dict(), src)
    extra = [a for pattern in allow for a in ("--allow-missing", pattern)]
    got = suggest_and_convert(src, f"tests.suggest.models:{target}", extra=extra)
    assert "into: ['\\1.q_proj.\\2', '\\1.k_proj.\\2', '\\1.v_proj.\\2']" in got.text  # concatenation order
    hf = getattr(models, target)()
    missing, unexpected = hf.load_state_dict(got.state, strict=False)
    assert not unexpected and all(any(re.search(p, k) for p in allow) for k in missing)
    x = _image(size)
    with torch.no_grad():
        diff = (model(x) - hf.eval()(pixel_values=x).pooler_output).abs().max().item()
    assert diff < ATOL, diff


def test_a_tied_weight_the_file_stores_once_is_copied(suggest_and_convert, tmp_path: Path) -> None:
    """transformers' safetensors leave out the tied `lm_head.weight`; the target wants it under both names."""
    require("transformers")
    source = models.randomize(models.hf_gpt2(), seed=11)
    state = {k: v.clone() for k, v in source.state_dict().items() if k != "lm_head.weight"}
    src = tmp_path / "gpt2.safetensors"
    save_file(state, str(src))
    got = suggest_and_convert(src, "tests.suggest.models:nano_gpt")
    assert r"copy: {match: '^transformer\.wte\.weight$', to: 'lm_head.weight'}" in got.text
    tokens = torch.randint(0, models.GPT_CONFIG["vocab_size"], (2, 8), generator=torch.Generator().manual_seed(2))
    _close(models.nano_gpt(), got.state, source, tokens)


def test_the_library_first_a_shipped_recipe_that_fits_is_proposed_as_it_is(suggest_and_convert, tmp_path: Path) -> None:
    """timm ViT -> transformers ViT: the shipped vit/timm-to-hf validates against the target as it is, so it is
    proposed (flattened, with the user's target), with a note saying which; nothing is inferred."""
    require("timm", "transformers")
    source = models.randomize(models.timm_vit(), seed=4)
    src = tmp_path / "timm_vit.safetensors"
    save_file(source.state_dict(), str(src))
    got = suggest_and_convert(src, "tests.suggest.models:hf_vit")
    assert got.report["library"] == "vit/timm-to-hf"
    assert any("the library recipe 'vit/timm-to-hf' (pack ckptx) validates" in n for n in got.report["notes"])
    assert "model: tests.suggest.models:hf_vit" in got.text and "split:" in got.text
    _close(models.hf_vit(), got.state, source, _image(models.VIT["image"]))
