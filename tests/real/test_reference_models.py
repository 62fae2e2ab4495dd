"""The test-side reference models are faithful, and the reference doc is right.

* the re-implemented official ConvNeXt-V2 has the documented key set/shapes;
* converting its checkpoint with timm's OWN converter and loading it into timm
  gives the same logits (so the re-implementation computes what the real
  official model computes — timm's port is verified against the released
  weights upstream);
* timm / HF transformers / MMPretrain models have the documented key names and
  shapes, for several sizes;
* the hand-written oracle in models.reference_convert loads strictly into HF
  and MMPretrain and reproduces the official logits.

No ckptx code is used here.
"""

from __future__ import annotations

import argparse
import pickle

import pytest
import torch

from .models import (
    ATTO_PARAMS,
    ATTO_TENSORS,
    SIZES,
    TIMM_CONV_MLP_SIZES,
    build_hf,
    build_mmpretrain,
    build_timm,
    expected_shapes,
    hf_config,
    logits,
    reference_convert,
    seeded_input,
    shapes_of,
)
from .official_convnextv2 import (
    GRN,
    build_official,
    convnext_pico,
    convnextv2_atto,
    convnextv2_femto,
    convnextv2_nano,
    convnextv2_pico,
    convnextv2_tiny,
    load_official_checkpoint,
    make_official_checkpoint,
    optimizer_param_names,
    randomize_,
)

ATOL = 1e-4
FAITHFUL_SIZES = ["atto", "femto"]
TABLE_SIZES = ["atto", "femto", "pico", "nano", "tiny"]


def _n_params(sd) -> int:
    return sum(v.numel() for v in sd.values())


def _assert_close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> None:
    assert a.shape == b.shape
    diff = (a - b).abs().max().item()
    assert diff < atol, f"max abs logit diff {diff:.3g} >= {atol}"


# --------------------------------------------------------------------------
# the official re-implementation
# --------------------------------------------------------------------------
def test_official_atto_matches_reference_doc():
    model = convnextv2_atto()
    sd = model.state_dict()
    assert len(sd) == ATTO_TENSORS == 140
    assert _n_params(sd) == ATTO_PARAMS == 3_708_400
    assert sum(p.numel() for p in model.parameters()) == ATTO_PARAMS  # no buffers
    assert shapes_of(sd) == expected_shapes("official", "atto")
    # spot checks straight from the doc
    assert sd["downsample_layers.0.0.weight"].shape == (40, 3, 4, 4)
    assert sd["downsample_layers.1.1.weight"].shape == (80, 40, 2, 2)
    assert sd["stages.2.5.dwconv.weight"].shape == (160, 1, 7, 7)
    assert sd["stages.2.5.pwconv1.weight"].shape == (640, 160)
    assert sd["stages.2.5.pwconv2.weight"].shape == (160, 640)
    assert sd["stages.2.5.grn.gamma"].shape == (1, 1, 1, 640)
    assert sd["stages.2.5.grn.beta"].shape == (1, 1, 1, 640)
    assert sd["head.weight"].shape == (1000, 320)
    # official init: GRN is zero (identity) -> randomize_ must change that
    assert all(torch.count_nonzero(m.gamma) == 0 for m in model.modules() if isinstance(m, GRN))


@pytest.mark.parametrize(
    "factory, size",
    [
        (convnextv2_atto, "atto"),
        (convnextv2_femto, "femto"),
        (convnextv2_pico, "pico"),
        (convnext_pico, "pico"),
        (convnextv2_nano, "nano"),
        (convnextv2_tiny, "tiny"),
    ],
)
def test_official_factories(factory, size):
    model = factory(num_classes=10, drop_path_rate=0.1)  # kwargs pass through
    assert shapes_of(model.state_dict()) == expected_shapes("official", size, num_classes=10)


def test_randomize_is_seeded_and_non_trivial():
    a = randomize_(convnextv2_atto(), seed=1).state_dict()
    b = randomize_(convnextv2_atto(), seed=1).state_dict()
    c = randomize_(convnextv2_atto(), seed=2).state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
        assert not torch.equal(a[k], c[k]), k
        v = a[k].flatten()
        assert torch.count_nonzero(v) >= 0.999 * v.numel(), f"{k} is (mostly) zero"
        if v.numel() > 1:
            assert v.std() > 0, f"{k} is constant"
    # GRN non-zero and sign-mixed
    g = a["stages.0.0.grn.gamma"]
    assert (g > 0).any() and (g < 0).any()


def test_grn_is_exercised(seeded_x):
    """Randomized GRN parameters change the output: GRN bugs cannot hide."""
    model = randomize_(convnextv2_atto(), seed=0).eval()
    ref = logits(model, seeded_x, "official")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, GRN):
                m.gamma.zero_()
                m.beta.zero_()
    assert (logits(model, seeded_x, "official") - ref).abs().max() > 1e-2


def test_checkpoint_formats(tmp_path):
    model = randomize_(convnextv2_atto(), seed=0).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    train_path = tmp_path / "checkpoint-3.pth"
    make_official_checkpoint(model, train_path, training=True)
    for k, v in model.state_dict().items():  # model untouched by the optimizer step
        assert torch.equal(v, before[k]), k

    ckpt = load_official_checkpoint(train_path)
    assert set(ckpt) == {"model", "optimizer", "epoch", "scaler", "args"}
    assert ckpt["epoch"] == 3
    assert isinstance(ckpt["args"], argparse.Namespace)
    assert ckpt["args"].model == "convnextv2_atto"
    assert set(ckpt["scaler"]) >= {"scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker"}
    assert shapes_of(ckpt["model"]) == expected_shapes("official", "atto")
    for k, v in ckpt["model"].items():
        assert torch.equal(v, before[k]), k

    opt = ckpt["optimizer"]
    named = dict(model.named_parameters())
    order = optimizer_param_names(model)  # optimizer ids follow the param groups
    assert sorted(order) == sorted(named) and len(order) == 140
    indices = [i for g in opt["param_groups"] for i in g["params"]]
    assert indices == list(range(len(order)))
    assert len(opt["param_groups"]) == 2 and all("lr_scale" in g for g in opt["param_groups"])
    assert set(opt["state"]) == set(indices)
    for i, name in enumerate(order):
        p = named[name]
        st = opt["state"][i]
        assert float(st["step"]) == 1.0
        assert st["exp_avg"].shape == p.shape and st["exp_avg_sq"].shape == p.shape
        assert torch.count_nonzero(st["exp_avg_sq"]) > 0

    # training checkpoints hold an argparse.Namespace: weights_only loading refuses them
    with pytest.raises(pickle.UnpicklingError):
        torch.load(train_path, map_location="cpu", weights_only=True)

    release_path = tmp_path / "convnextv2_atto_1k_224_ema.pt"
    make_official_checkpoint(model, release_path, training=False)
    rel = torch.load(release_path, map_location="cpu", weights_only=True)
    assert set(rel) == {"model"}
    assert shapes_of(rel["model"]) == expected_shapes("official", "atto")


# --------------------------------------------------------------------------
# faithfulness against timm's own converter
# --------------------------------------------------------------------------
@pytest.mark.parametrize("size", FAITHFUL_SIZES)
def test_official_matches_timm(size, timm_lib, official_checkpoint, seeded_x):
    from timm.models.convnext import checkpoint_filter_fn

    model, path, _ = official_checkpoint(size, seed=0, training=True)
    ckpt = load_official_checkpoint(path)
    timm_model = build_timm(size)
    converted = checkpoint_filter_fn(ckpt, timm_model)  # unwraps 'model' itself
    timm_model.load_state_dict(converted, strict=True)
    timm_model.eval()
    _assert_close(logits(timm_model, seeded_x, "timm"), logits(model, seeded_x, "official"))


@pytest.mark.parametrize("size", ["pico", "nano", "tiny"])
def test_official_matches_timm_more_sizes(size, timm_lib, seeded_x):
    """Release-format, in memory; covers timm's conv_mlp=False path (tiny)."""
    model = randomize_(build_official(size), seed=3).eval()
    timm_model = build_timm(size)
    timm_model.load_state_dict(reference_convert({"model": model.state_dict()}, "timm", timm_model), strict=True)
    _assert_close(logits(timm_model, seeded_x, "timm"), logits(model, seeded_x, "official"))


def test_timm_comparison_detects_a_grn_bug(timm_lib, seeded_x):
    """Negative control: one reversed GRN vector is far outside the tolerance."""
    model = randomize_(convnextv2_atto(), seed=0).eval()
    timm_model = build_timm("atto")
    converted = reference_convert({"model": model.state_dict()}, "timm", timm_model)
    k = "stages.1.blocks.0.mlp.grn.weight"
    converted[k] = converted[k].flip(0)
    timm_model.load_state_dict(converted, strict=True)
    diff = (logits(timm_model, seeded_x, "timm") - logits(model, seeded_x, "official")).abs().max()
    assert diff > 100 * ATOL


# --------------------------------------------------------------------------
# documented key/shape tables of each library
# --------------------------------------------------------------------------
def test_timm_atto_keys(timm_lib):
    sd = build_timm("atto").state_dict()
    assert len(sd) == ATTO_TENSORS and _n_params(sd) == ATTO_PARAMS
    assert shapes_of(sd) == expected_shapes("timm", "atto")
    assert sd["stem.0.weight"].shape == (40, 3, 4, 4)
    assert sd["stages.1.downsample.1.weight"].shape == (80, 40, 2, 2)
    assert sd["stages.0.blocks.0.mlp.fc1.weight"].shape == (160, 40, 1, 1)  # conv_mlp=True
    assert sd["stages.0.blocks.0.mlp.fc2.weight"].shape == (40, 160, 1, 1)
    assert sd["stages.0.blocks.0.mlp.grn.weight"].shape == (160,)
    assert sd["stages.0.blocks.0.mlp.grn.bias"].shape == (160,)
    assert sd["head.fc.weight"].shape == (1000, 320)
    assert "stages.0.downsample.0.weight" not in sd  # stage 0 has no downsample (the stem is separate)


def test_hf_atto_keys(hf_lib):
    sd = build_hf("atto").state_dict()
    assert len(sd) == ATTO_TENSORS and _n_params(sd) == ATTO_PARAMS
    assert shapes_of(sd) == expected_shapes("hf", "atto")
    assert sd["convnextv2.embeddings.patch_embeddings.weight"].shape == (40, 3, 4, 4)
    assert sd["convnextv2.encoder.stages.1.downsampling_layer.1.weight"].shape == (80, 40, 2, 2)
    assert sd["convnextv2.encoder.stages.0.layers.0.pwconv1.weight"].shape == (160, 40)
    assert sd["convnextv2.encoder.stages.0.layers.0.grn.weight"].shape == (1, 1, 1, 160)
    assert sd["convnextv2.encoder.stages.0.layers.0.grn.bias"].shape == (1, 1, 1, 160)
    assert sd["classifier.weight"].shape == (1000, 320)


def test_hf_config_defaults_differ_from_official(hf_lib):
    from transformers import ConvNextV2Config

    default = ConvNextV2Config()
    assert default.num_labels == 2
    assert default.layer_norm_eps == 1e-12
    cfg = hf_config("atto")
    assert cfg.num_labels == 1000 and cfg.layer_norm_eps == 1e-6
    assert list(cfg.depths) == [2, 2, 6, 2] and list(cfg.hidden_sizes) == [40, 80, 160, 320]


def test_mmpretrain_atto_keys(mmpretrain_lib):
    model = build_mmpretrain("atto")
    assert type(model).__name__ == "ImageClassifier"
    assert type(model.backbone).__name__ == "ConvNeXt"
    sd = model.state_dict()
    assert len(sd) == ATTO_TENSORS and _n_params(sd) == ATTO_PARAMS
    assert shapes_of(sd) == expected_shapes("mmpretrain", "atto")
    assert sd["backbone.downsample_layers.0.0.weight"].shape == (40, 3, 4, 4)
    assert sd["backbone.stages.0.0.depthwise_conv.weight"].shape == (40, 1, 7, 7)
    assert sd["backbone.stages.0.0.pointwise_conv1.weight"].shape == (160, 40)
    assert sd["backbone.stages.0.0.grn.gamma"].shape == (160,)
    assert sd["backbone.stages.0.0.grn.beta"].shape == (160,)
    assert sd["backbone.norm3.weight"].shape == (320,)
    assert sd["head.fc.weight"].shape == (1000, 320)
    # no layer-scale gamma (layer_scale_init_value=0.) in V2 configs
    assert not any(k.endswith(".gamma") and ".grn." not in k for k in sd)


@pytest.mark.parametrize("size", TABLE_SIZES)
@pytest.mark.parametrize("lib", ["timm", "hf", "mmpretrain"])
def test_library_key_tables(lib, size, request):
    request.getfixturevalue(f"{lib}_lib")
    model = {"timm": build_timm, "hf": build_hf, "mmpretrain": build_mmpretrain}[lib](size)
    sd = model.state_dict()
    official = build_official(size).state_dict()
    assert len(sd) == len(official)
    assert _n_params(sd) == _n_params(official)
    assert shapes_of(sd) == expected_shapes(lib, size)
    if lib == "timm":
        fc1 = sd["stages.0.blocks.0.mlp.fc1.weight"]
        assert (fc1.ndim == 4) == (size in TIMM_CONV_MLP_SIZES)


# --------------------------------------------------------------------------
# the hand-written oracle reproduces the official logits in HF and MMPretrain
# --------------------------------------------------------------------------
@pytest.mark.parametrize("size", FAITHFUL_SIZES)
def test_reference_convert_hf(size, hf_lib, official_checkpoint, seeded_x):
    model, path, _ = official_checkpoint(size, seed=1, training=False)
    hf = build_hf(size)
    hf.load_state_dict(reference_convert(load_official_checkpoint(path), "hf"), strict=True)
    _assert_close(logits(hf, seeded_x, "hf"), logits(model, seeded_x, "official"))


@pytest.mark.parametrize("size", FAITHFUL_SIZES)
def test_reference_convert_mmpretrain(size, mmpretrain_lib, official_checkpoint, seeded_x):
    model, path, _ = official_checkpoint(size, seed=2, training=True)
    mm = build_mmpretrain(size)
    mm.load_state_dict(reference_convert(load_official_checkpoint(path), "mmpretrain"), strict=True)
    _assert_close(logits(mm, seeded_x, "mmpretrain"), logits(model, seeded_x, "official"))


def test_mmpretrain_rejects_unreshaped_grn(mmpretrain_lib):
    """A strict load with official-shaped GRN (1,1,1,4C) fails: the shape is checked."""
    mm = build_mmpretrain("atto")
    sd = reference_convert({"model": convnextv2_atto().state_dict()}, "mmpretrain")
    sd["backbone.stages.0.0.grn.gamma"] = sd["backbone.stages.0.0.grn.gamma"].reshape(1, 1, 1, -1)
    with pytest.raises(RuntimeError, match="size mismatch"):
        mm.load_state_dict(sd, strict=True)


def test_seeded_input_is_deterministic():
    a, b = seeded_input(0), seeded_input(0)
    assert a.shape == (2, 3, 64, 64) and torch.equal(a, b)
    assert not torch.equal(a, seeded_input(1))
    assert set(SIZES) >= {"atto", "femto", "pico", "nano", "tiny"}


def test_ckptx_is_the_installed_wheel():
    """`make test` exercises the installed wheel, never the checkout's ckptx/, and the wheel is fresh.

    The wheel must carry the tree's schemas/ and rules/ under ckptx/_data/
    (hatchling force-include) with identical contents, and its Python sources
    must equal the checkout's ckptx/ (catches a stale install).
    """
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("ckptx")
    if spec is None:
        pytest.fail("ckptx is not installed (run `make venv`)")
    pkg = Path(spec.origin).resolve().parent
    assert "site-packages" in pkg.parts, f"ckptx imported from {pkg}, not from an installed wheel"

    root = Path(__file__).resolve().parents[2]
    if not (root / "ckptx").is_dir():
        pytest.skip("not running from a source checkout")
    pairs = [(root / "ckptx", pkg, "*.py")]
    pairs += [(root / d, pkg / "_data" / d, "*") for d in ("schemas", "rules")]
    for tree_dir, inst_dir, pattern in pairs:
        files = [f for f in tree_dir.rglob(pattern) if f.is_file() and "__pycache__" not in f.parts]
        for f in files:
            rel = f.relative_to(tree_dir)
            inst = inst_dir / rel
            assert inst.is_file(), f"installed wheel lacks {inst} (from {f})"
            assert inst.read_bytes() == f.read_bytes(), f"installed {inst} is stale vs {f}: run `make venv`"
