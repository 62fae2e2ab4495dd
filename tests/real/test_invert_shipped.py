"""`ckptx invert` on the shipped recipes that have a hand-written reverse: the same conversion, bit for bit."""

from __future__ import annotations

import pytest
import torch

from ckptx.conversion.in_memory import apply
from ckptx.conversion.reverse import reverse_recipe
from ckptx.rules.loader import load_rules
from ckptx.targets.instantiate import build_model

from .conftest import require_library

PAIRS = [
    ("timm/convnextv2-to-hf", "hf/convnextv2-to-timm", {"size": "atto"}, ("timm", "hf")),  # size is inferred otherwise
    ("vit/timm-to-hf", "vit/hf-to-timm", {"layers": 2, "image_size": 32, "num_classes": 10}, ("timm", "hf")),
    (
        "llama/llama-to-fused-qkv",
        "llama/fused-qkv-to-llama",
        {
            "vocab_size": 128,
            "hidden_size": 32,
            "intermediate_size": 48,
            "layers": 2,
            "heads": 4,
            "kv_heads": 2,
            "max_positions": 64,
        },
        ("hf",),
    ),
]


@pytest.mark.parametrize("forward, backward, params, libs", PAIRS, ids=[p[0] for p in PAIRS])
def test_inverted_recipe_undoes_the_forward_one_like_the_shipped_reverse(forward, backward, params, libs) -> None:
    for lib in libs:
        require_library(lib)
    recipe = load_rules(forward, params=params)
    source = build_model(recipe.verify.source_model, recipe.verify.source_kwargs, "test", device="cpu")
    generator = torch.Generator().manual_seed(0)
    original = {
        k: (torch.randn(v.shape, generator=generator) if v.is_floating_point() else v.clone())
        for k, v in source.state_dict().items()
    }
    converted = apply(recipe, original, recipe.target)
    inverted = reverse_recipe(recipe)  # traced on the recipe's verify source model where shapes are needed
    back = apply(inverted.recipe, converted, inverted.recipe.target)
    assert sorted(back) == sorted(original) and all(torch.equal(back[k], original[k]) for k in original)
    shipped_params = {**params, **({"q_size": 32, "kv_size": 16} if "llama" in forward else {})}
    reverse = load_rules(backward, params=shipped_params)
    shipped = apply(reverse, converted, reverse.target)
    assert list(shipped) == list(back) or sorted(shipped) == sorted(back)
    assert all(torch.equal(shipped[k], back[k]) for k in back)
