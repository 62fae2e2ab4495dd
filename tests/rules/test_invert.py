"""Reverse recipes: round trips are bit-exact, and the first step that cannot be undone is named."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ckptx.conversion.in_memory import apply
from ckptx.conversion.reverse import reverse_recipe
from ckptx.errors import RuleError
from ckptx.rules.loader import load_rules


def _rand(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _state() -> dict[str, torch.Tensor]:
    state = {}
    for layer in (1, 2):
        for block in (0, 1):
            prefix = f"module.layer{layer}.{block}"
            state[f"{prefix}.attn.qkv.weight"] = _rand(12, 4, seed=layer * 10 + block)
            state[f"{prefix}.attn.qkv.bias"] = _rand(12, seed=layer * 10 + block + 1)
            state[f"{prefix}.conv.weight"] = _rand(4, 3, 2, 2, seed=layer * 10 + block + 2)
    for expert in range(3):
        state[f"module.moe.{expert}.w1"] = _rand(5, 4, seed=100 + expert)
    state["module.embed.weight"] = _rand(7, 4, seed=200)
    state["module.scale"] = _rand(4, seed=201)
    return state


STATIC = r"""
ckptx: 1
name: static
steps:
  - strip_prefix: module.
  - rename:
      - ['^layer(\d+)\.(\d+)\.', 'stages.{\1 - 1}.blocks.\2.']
      - ['^embed\.', 'tok_embeddings.']
  - split: {match: '^(.*)\.qkv\.(weight|bias)$', into: ['\1.q.\2', '\1.k.\2', '\1.v.\2']}
  - merge: {match: '^moe\.(\d+)\.(w\d)$', index: '\1', to: 'experts.\2', stack: true}
  - permute: {match: '\.conv\.weight$', dims: [0, 2, 3, 1]}
  - unsqueeze: {match: '^scale$', dim: 0}
  - copy: {match: '^tok_embeddings\.(weight)$', to: 'lm_head.\1'}
  - set: {key: extra_token, value: 3, dtype: int64}
"""


def _round_trip(recipe_path: Path, state: dict[str, torch.Tensor], original=None) -> dict[str, torch.Tensor]:
    forward = load_rules(recipe_path)
    converted = apply(forward, state)
    back = apply(reverse_recipe(forward, original=original).recipe, converted)
    return back


def _assert_bit_exact(back: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
    assert sorted(back) == sorted(state)
    for key, tensor in state.items():
        assert back[key].dtype == tensor.dtype and back[key].shape == tensor.shape, key
        assert torch.equal(back[key].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), key


def test_static_recipe_round_trips_bit_exactly(write_rules: Callable[..., Path]) -> None:
    state = _state()
    _assert_bit_exact(_round_trip(write_rules(STATIC), state), state)


def test_reverse_of_the_static_recipe_reads_naturally(write_rules: Callable[..., Path]) -> None:
    steps = reverse_recipe(load_rules(write_rules(STATIC))).document["steps"]
    assert [next(iter(s)) for s in steps] == [
        "drop",
        "drop",
        "squeeze",
        "permute",
        "split",
        "merge",
        "rename",
        "add_prefix",
    ]
    assert steps[4]["split"] == {"match": r"^experts\.(w\d)$", "dim": 0, "into": r"moe.{i}.\1", "unbind": True}
    # rows with a longer literal start come first, so a general row cannot shadow a specific one
    assert steps[6]["rename"] == [
        [r"^tok_embeddings\.", "embed."],
        [r"^stages\.(\d+)\.blocks\.(\d+)\.", r"layer{\1 + 1}.\2."],
    ]
    assert steps[0]["comment"].endswith("steps[7].set")


SHAPES = r"""
ckptx: 1
name: shapes
steps:
  - cast: {dtype: float32}
  - reshape: {match: '\.gamma$', shape: [-1]}
  - merge: {match: '^(.*)\.q\.weight$', inputs: ['\1.q.weight', '\1.k.weight', '\1.v.weight'], to: '\1.qkv.weight'}
"""


def _gqa_state() -> dict[str, torch.Tensor]:
    state = {}
    for block, width in ((0, 8), (1, 16)):
        state[f"b{block}.q.weight"] = _rand(8, 4, seed=block, dtype=torch.bfloat16)
        state[f"b{block}.k.weight"] = _rand(2, 4, seed=block + 1, dtype=torch.bfloat16)
        state[f"b{block}.v.weight"] = _rand(2, 4, seed=block + 2, dtype=torch.bfloat16)
        state[f"b{block}.gamma"] = _rand(1, 1, width, seed=block + 3, dtype=torch.float16)
    state["b0.count"] = torch.tensor(5)
    return state


def test_shape_dependent_steps_need_the_source_layout(write_rules: Callable[..., Path]) -> None:
    path = write_rules(SHAPES)
    with pytest.raises(RuleError) as caught:
        reverse_recipe(load_rules(path))
    assert str(caught.value) == (
        f"{path}:4:5 steps[0].cast: cast is not invertible: the dtypes it started from are "
        "not in the rule; the source layout is needed; give the source layout "
        "(--original CHECKPOINT|MANIFEST|module:callable)"
    )


def test_traced_on_the_source_layout_casts_reshapes_and_unequal_merges_round_trip(
    write_rules: Callable[..., Path],
) -> None:
    state = _gqa_state()
    path = write_rules(SHAPES)
    _assert_bit_exact(_round_trip(path, state, original=state), state)
    steps = reverse_recipe(load_rules(path), original=state).document["steps"]
    assert steps[0]["split"]["sizes"] == [8, 2, 2]
    assert steps[1]["reshape"] == {"match": r"\.gamma$", "shape": [1, 1, -1]}


def test_the_first_step_that_cannot_be_undone_is_named(write_rules: Callable[..., Path]) -> None:
    path = write_rules(r"""
        ckptx: 1
        steps:
          - rename: [['^a\.', 'b.']]
          - drop: ['^optimizer\.']
          - resize: {match: embed, size: 10}
    """)
    with pytest.raises(RuleError) as caught:
        reverse_recipe(load_rules(path))
    assert str(caught.value) == f"{path}:4:5 steps[1].drop: drop is not invertible: the dropped tensors are gone"


@pytest.mark.parametrize(
    "step, reason",
    [
        ("resize: {match: embed, size: 10}", "resize is not invertible: the rows it cuts or adds are not recorded"),
        ("rename: [['^(\\w+)\\.(\\w+)$', '\\1']]", "does not use group 2 (\\w+) of '^(\\\\w+)\\\\.(\\\\w+)$'"),
        ("rename: [['^layer(\\d+)', 'stage{\\1 * 2}']]", "only {\\N + c} and {\\N - c} can be undone, not {\\1 * 2}"),
        ("rename: [['^a.b', 'c']]", "'.' outside a group matches more than one text"),
        ("strip_prefix: {prefixes: [module.], common: true}", "which prefix each key lost depends on the checkpoint"),
    ],
)
def test_non_invertible_steps_say_why(write_rules: Callable[..., Path], step: str, reason: str) -> None:
    path = write_rules(f"ckptx: 1\nsteps:\n  - {step}\n")
    with pytest.raises(RuleError) as caught:
        reverse_recipe(load_rules(path))
    assert str(caught.value).startswith(f"{path}:3:5 steps[0].") and reason in str(caught.value)


def test_a_lossy_cast_is_named_with_the_key(write_rules: Callable[..., Path]) -> None:
    path = write_rules("ckptx: 1\nsteps:\n  - cast: {dtype: float16}\n")
    with pytest.raises(
        RuleError,
        match=r"steps\[0\]\.cast: cast is not invertible: casting 'w' from float32 to "
        r"float16 loses information",
    ):
        reverse_recipe(load_rules(path), original={"w": _rand(2)})


def test_a_recipe_that_is_not_one_to_one_on_the_layout_is_caught(write_rules: Callable[..., Path]) -> None:
    path = write_rules(r"""
        ckptx: 1
        name: substring
        steps:
          - rename: [['\.attn\.', '.a.']]
    """)
    with pytest.raises(
        RuleError,
        match=r"the reverse recipe does not give back <state_dict>: missing m\.a\.attn\.w; "
        r"extra m\.attn\.a\.w",
    ):
        reverse_recipe(load_rules(path), original={"m.a.attn.w": _rand(1)})


def test_when_param_is_resolved_and_has_key_needs_the_layout(write_rules: Callable[..., Path]) -> None:
    path = write_rules(r"""
        ckptx: 1
        params: {head: false}
        steps:
          - add_prefix: backbone.
          - rename: [['^backbone\.fc\.', 'head.']]
            when: {param: {head: true}}
    """)
    assert [next(iter(s)) for s in reverse_recipe(load_rules(path)).document["steps"]] == ["rename"]
    assert len(reverse_recipe(load_rules(path, params={"head": True})).document["steps"]) == 2
    has_key = write_rules("ckptx: 1\nsteps:\n  - add_prefix: x.\n    when: {has_key: '^a'}\n", "has_key.yaml")
    with pytest.raises(RuleError, match="depends on the checkpoint"):
        reverse_recipe(load_rules(has_key))
    state = {"a.w": _rand(2)}
    _assert_bit_exact(_round_trip(has_key, state, original=state), state)


def test_cli_invert_writes_a_recipe_that_converts_back(run_cli, write_rules, tmp_path: Path) -> None:
    state = _state()
    forward = write_rules(STATIC)
    src, mid, back = tmp_path / "src.safetensors", tmp_path / "mid.safetensors", tmp_path / "back.safetensors"
    save_file(state, str(src))
    assert run_cli("convert", src, "-r", forward, "-o", mid).code == 0
    result = run_cli("invert", forward, "-o", tmp_path / "reverse.yaml")
    assert result.code == 0, result.err
    assert result.out.startswith(f"wrote {tmp_path / 'reverse.yaml'} (8 steps, reverse of static)")
    assert (tmp_path / "reverse.yaml").read_text().startswith("# Reverse of static")
    assert run_cli("convert", mid, "-r", tmp_path / "reverse.yaml", "-o", back).code == 0
    _assert_bit_exact(load_file(str(back)), state)
    again = tmp_path / "again.safetensors"
    result = run_cli("convert", mid, "-r", forward, "--reverse", "-o", again)
    assert result.code == 0, result.out + result.err
    _assert_bit_exact(load_file(str(again)), state)


def test_cli_invert_with_an_original_checkpoint_and_refusing_to_overwrite(run_cli, write_rules, tmp_path: Path) -> None:
    state = _gqa_state()
    original = tmp_path / "original.safetensors"
    save_file(state, str(original))
    path = write_rules(SHAPES)
    result = run_cli("invert", path, "--json")
    assert result.code == 2 and "--original CHECKPOINT" in result.out
    result = run_cli("invert", path, "--original", original, "--json")
    assert result.code == 0 and result.json["traced_on"] == str(original)
    (tmp_path / "r.yaml").write_text("x")
    assert (
        "already exists; pass --force" in run_cli("invert", path, "--original", original, "-o", tmp_path / "r.yaml").err
    )


def test_reshape_to_the_target_inverts_to_unsqueezes_that_fit_every_size(write_rules, tmp_path: Path) -> None:
    state = {"a.fc.weight": _rand(4, 3, 1, 1), "b.fc.weight": _rand(6, 2, 1, 1, seed=1), "a.bias": _rand(4)}
    save_file(
        {"a.fc.weight": torch.zeros(4, 3), "b.fc.weight": torch.zeros(6, 2), "a.bias": torch.zeros(4)},
        str(tmp_path / "target.safetensors"),
    )
    path = write_rules(r"""
        ckptx: 1
        steps:
          - reshape: {match: '\.fc\.weight$', shape: target}
        target: {checkpoint: target.safetensors}
    """)
    forward = load_rules(path)
    reverse = reverse_recipe(forward, original=state)
    steps = [{k: v for k, v in step.items() if k != "comment"} for step in reverse.document["steps"]]
    assert steps == [{"unsqueeze": {"match": r"\.fc\.weight$", "dim": -1}}] * 2
    converted = apply(forward, state, forward.target)
    _assert_bit_exact(apply(reverse.recipe, converted), state)
