"""The rotary_permute step: HuggingFace's and torchtitan's permutation formula, its inverse, its head counts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ckptx.errors import OpShapeError
from ckptx.ops.rotary import HALF_SPLIT, INTERLEAVED, head_dim_from_configs, permute_rotary
from ckptx.rules.inverse import invert_recipe

from .helpers import apply, plan_problems, randn, recipe


def hf_permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """transformers' convert_llama_weights_to_hf.py (and torchtitan's adapters): interleaved -> half-split."""
    rows, cols = w.shape
    return w.view(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def test_half_split_is_the_hf_conversion_formula_and_interleaved_undoes_it() -> None:
    w = randn(48, 8)
    assert torch.equal(permute_rotary(w, 3, HALF_SPLIT), hf_permute(w, 3))
    assert torch.equal(permute_rotary(permute_rotary(w, 3, HALF_SPLIT), 3, INTERLEAVED), w)


def test_a_bias_is_reordered_like_the_rows_of_its_weight() -> None:
    w, b = randn(16, 4), torch.arange(16.0)
    assert torch.equal(permute_rotary(b, 2, HALF_SPLIT), hf_permute(b[:, None], 2)[:, 0])
    assert torch.equal(permute_rotary(w, 2, HALF_SPLIT), hf_permute(w, 2))


def test_one_step_with_head_dim_serves_q_and_k_of_grouped_query_attention(tmp_path: Path) -> None:
    state = {"q.weight": randn(64, 32, seed=1), "k.weight": randn(32, 32, seed=2), "v.weight": randn(32, 32)}
    out = apply(tmp_path, "- rotary_permute: {match: '^[qk]\\.weight$', to: half_split, head_dim: 16}\n", state)
    assert torch.equal(out["q.weight"], hf_permute(state["q.weight"], 4))
    assert torch.equal(out["k.weight"], hf_permute(state["k.weight"], 2))
    assert torch.equal(out["v.weight"], state["v.weight"])


def test_rows_that_are_not_whole_heads_are_a_plan_error(tmp_path: Path) -> None:
    text = plan_problems(tmp_path, "- rotary_permute: {match: 'q', to: half_split, heads: 3}\n", {"q": randn(8, 2)})
    assert "tensor 'q': 8 rows are not 3 heads of an even size" in text


def test_without_a_head_size_the_plan_says_where_to_give_one(tmp_path: Path) -> None:
    text = plan_problems(tmp_path, "- rotary_permute: {match: 'q', to: half_split}\n", {"q": randn(8, 2)})
    assert "its heads are not known: give heads or head_dim in the step" in text


def test_the_head_size_is_read_from_hf_and_meta_configs_and_disagreement_is_refused() -> None:
    assert head_dim_from_configs([("config.json", {"hidden_size": 64, "num_attention_heads": 4})])[0] == 16
    assert head_dim_from_configs([("config.json", {"head_dim": 128, "hidden_size": 64})])[0] == 128
    assert head_dim_from_configs([("params.json", {"dim": 64, "n_heads": 8})])[0] == 8
    assert head_dim_from_configs([("x", {})]) is None
    with pytest.raises(OpShapeError, match="the configs disagree on the head size"):
        head_dim_from_configs([("a", {"head_dim": 16}), ("b", {"dim": 64, "n_heads": 8})])


def test_the_inverse_is_the_other_pairing_with_the_same_head_size(tmp_path: Path) -> None:
    made = recipe(tmp_path, "- rotary_permute: {match: 'w[qk]', to: half_split, head_dim: 8}\n")
    (step,) = invert_recipe(made)["steps"]
    assert step["rotary_permute"] == {"match": "w[qk]", "to": "interleaved", "head_dim": 8}


@pytest.mark.parametrize("to", [HALF_SPLIT, INTERLEAVED])
def test_the_byte_kernel_moves_the_rows_torch_moves(tmp_path: Path, to: str) -> None:
    from ckptx.dtypes import TensorMeta
    from ckptx.ops.rotary import rotary_pieces

    state = {"q.weight": randn(48, 8, dtype=torch.bfloat16), "q.bias": randn(48, seed=3)}
    for tensor in state.values():
        raw = tensor.contiguous().view(torch.uint8).numpy().tobytes()
        meta = TensorMeta(tuple(tensor.shape), str(tensor.dtype).split(".")[1])
        pieces = list(rotary_pieces({"heads": 3, "to": to}, [meta]))
        assert len(pieces) == 3
        out = b"".join(p.convert([raw[p.ranges[0][0] : p.ranges[0][1]]]) for p in pieces)
        assert out == permute_rotary(tensor, 3, to).contiguous().view(torch.uint8).numpy().tobytes()
    steps = f"- rotary_permute: {{match: '^q\\.', to: {to}, heads: 3}}\n"
    apply(tmp_path, steps, state)  # the streaming writer (through the kernel) gives what torch gives
