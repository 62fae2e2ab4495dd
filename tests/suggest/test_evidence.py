"""The evidence `ckptx suggest` decides by, on real pairs of real classes (tests/suggest/pairs.py), and what it does
when no evidence decides.

Every pair: the source model (random weights) saved as its file, the suggested recipe (metadata only) applied, the
target loaded with strict=True and compared with the source model on the pair's input. Each failure class seen on
unseen pairs has its pairs: q_bias/v_bias (BEiT), a patch-embedding norm against a stage-end norm in a name-sorted
file (PVT-v2), a LayerNorm with an odd name (ConvNeXt's stem, CLIP's `pre_layrnorm`), a shortcut projection against a
block's first convolution (RegNet, ResNet), a multi-layer head in reverse (SAM's `proj_in`/`layers`/`proj_out`), a
square bare (in, out) projection against a Linear (OpenCLIP -> CLIP), rotary q/k rows (Meta's reference Llama), and
torchvision resnet18 -> transformers ResNet with basic blocks.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from . import pairs
from .conftest import require

CLASSES = {c for p in pairs.PAIRS for c in p.classes}


@pytest.mark.parametrize("pair", pairs.PAIRS, ids=[p.name for p in pairs.PAIRS])
def test_real_pair_converts_strict_and_equal_metadata_only(pair: pairs.Pair) -> None:
    require(*pair.library)
    result = pairs.evaluate(pair)
    assert result["outcome"] == "right", result


def test_every_failure_class_has_pairs() -> None:
    assert {
        "q_bias/v_bias",
        "patch-embed norm vs stage-end norm",
        "shortcut vs first conv",
        "multi-layer heads order",
        "bare [in, out] projection",
        "rotary q/k permutation",
    } <= CLASSES


# ------------------------------------------------------------------------------------------- undecided, then decided
class Pipeline(nn.Module):
    """Two equal Linear layers in an nn.Sequential: `0` runs first, `2` second."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Reordered(nn.Module):
    """The same computation with names that say nothing and the layers registered in the other order: `alpha` runs
    second, `beta` first. Position alone maps `0` to `alpha`: wrong, and it loads strictly."""

    def __init__(self) -> None:
        super().__init__()
        self.alpha = nn.Linear(8, 8)
        self.beta = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.alpha(torch.tanh(self.beta(x)))


def pipeline() -> nn.Module:
    """`tests.suggest.test_evidence:pipeline` (the source model for --verify-with)."""
    return Pipeline()


def reordered() -> nn.Module:
    """`tests.suggest.test_evidence:reordered` (the target)."""
    return Reordered()


HERE = "tests.suggest.test_evidence"


def test_metadata_cannot_decide_exit_1_naming_the_rows_then_verify_with_decides(run_cli, tmp_path: Path) -> None:
    source = Pipeline()
    src = tmp_path / "pipeline.pth"
    torch.save(source.state_dict(), src)
    rules = tmp_path / "rules.yaml"
    result = run_cli("suggest", src, "--target", f"{HERE}:reordered", "-o", rules)
    assert result.code == 1, result.out + result.err
    assert "UNDECIDED: 4 row(s)" in result.out and "--verify-with" in result.out
    assert "net.0.weight -> alpha.weight (or beta.weight)" in result.out
    text = rules.read_text()
    assert "# UNDECIDED: 'alpha.weight' or 'beta.weight'" in text

    rules2 = tmp_path / "decided.yaml"
    result = run_cli(
        "suggest", src, "--target", f"{HERE}:reordered", "--verify-with", f"{HERE}:pipeline", "-o", rules2, "--json"
    )
    assert result.code == 0, result.out + result.err
    doc = json.loads(result.out)
    assert doc["ok"] and not doc["undecided"] and doc["verification"]["ok"]
    assert any("decided by --verify-with" in n for n in doc["notes"])
    out = tmp_path / "converted.safetensors"
    converted = run_cli("convert", src, "-r", rules2, "-o", out, "--allow-factory", f"{HERE}:reordered")
    assert converted.code == 0, converted.out + converted.err
    target = Reordered()
    target.load_state_dict(load_file(str(out)), strict=True)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(target(x), source(x), atol=1e-6)
        assert torch.equal(target.beta.weight, source.net[0].weight)


def test_verify_with_proves_undecided_rows_that_were_right(run_cli, tmp_path: Path) -> None:
    """Registered in forward order on both sides: position chose right, the outputs prove it (exit 0)."""
    src = tmp_path / "pipeline.pth"
    torch.save(Pipeline().state_dict(), src)
    result = run_cli(
        "suggest", src, "--target", f"{HERE}:pipeline", "--verify-with", f"{HERE}:pipeline", "-o", tmp_path / "r.yaml"
    )
    assert result.code == 0, result.out + result.err


def test_rotary_layouts_without_a_head_size_are_undecided(run_cli, tmp_path: Path) -> None:
    """transformers Llama -> Meta's layout (a model without rotary buffers): q/k rows must be permuted, by how many rows
    per head nothing says: flagged, never written as a plain rename that loads and computes something else."""
    require("transformers")
    from . import models

    source = models.randomize(pairs.hf_llama(), 3)
    src = tmp_path / "hf_llama.pth"
    torch.save(source.state_dict(), src)
    result = run_cli("suggest", src, "--target", f"{pairs.HERE}:meta_llama", "-o", tmp_path / "r.yaml")
    assert result.code == 1, result.out + result.err
    assert "model.layers.0.self_attn.q_proj.weight -> layers.0.attention.wq.weight" in result.out


def test_verify_with_source_model_gives_the_rotary_head_size(run_cli, tmp_path: Path) -> None:
    """The same pair with --verify-with the transformers Llama: its `inv_freq` gives the head size, the q/k rows are
    permuted half-split -> interleaved, and Meta's reference model computes the source's logits (exit 0)."""
    require("transformers")
    from . import models

    source = models.randomize(pairs.hf_llama(), 3)
    src = tmp_path / "hf_llama.pth"
    torch.save(source.state_dict(), src)
    result = run_cli(
        "suggest",
        src,
        "--target",
        f"{pairs.HERE}:meta_llama",
        "--verify-with",
        f"{pairs.HERE}:hf_llama",
        "-o",
        tmp_path / "r.yaml",
        "--json",
    )
    assert result.code == 0, result.out + result.err
    doc = json.loads(result.out)
    assert doc["verification"]["ok"] and doc["ops"].get("rotary") == 2 * pairs.LLAMA["num_hidden_layers"]
