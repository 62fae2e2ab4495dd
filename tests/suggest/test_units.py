"""The parts of `ckptx suggest` on their own: evidence, levels, assignment, alignment, rows, covers, prefixes."""

from __future__ import annotations

import itertools
import random
import re

import pytest

from ckptx.dtypes import TensorMeta
from ckptx.rules.templates import compile_template
from ckptx.suggestion.align import align, expand, unmatched
from ckptx.suggestion.assign import assign
from ckptx.suggestion.generalize import cover, rename_rows
from ckptx.suggestion.names import key_name, ordinal_of, similarity
from ckptx.suggestion.shapes import fit, join_fit
from ckptx.suggestion.sources import Candidate, choose_candidate, infer_prefixes, natural_order
from ckptx.suggestion.tree import build_level


def _apply(rows, key: str) -> str:
    """What the rename step does: the first matching row rewrites like re.sub (index arithmetic included)."""
    for row in rows:
        pattern = re.compile(row.pattern)
        if pattern.search(key):
            return pattern.sub(compile_template(row.replacement, pattern).repl, key)
    return key


def _meta(*shape: int, dtype: str = "float32") -> TensorMeta:
    return TensorMeta(tuple(shape), dtype)


# ------------------------------------------------------------------------------------------------ evidence
def test_names_fold_synonyms_and_read_ordinals() -> None:
    assert key_name("layer1.0.bn1.weight").path == {"block", "norm"}
    assert key_name("encoder.layers.0.self_attn.q_proj.weight").leaf == ("q", "proj")
    assert key_name("model.layers.0.post_attention_layernorm.weight").leaf == ("norm",)  # 'post attention' qualifies
    assert (ordinal_of("norm1"), ordinal_of("ln_2"), ordinal_of("layernorm_before"), ordinal_of("conv")) == (
        1,
        2,
        1,
        None,
    )
    assert similarity("bn1.running_mean", "normalization.running_mean") > similarity("bn1.running_mean", "fc.bias")


def test_shape_fits() -> None:
    assert fit(_meta(1, 1, 1, 8), _meta(8)).kind == "reshape"
    assert fit(_meta(8, 4), _meta(8, 4, 1, 1)).kind == "reshape"
    assert fit(_meta(4, 8), _meta(8, 4)).dims == (1, 0)
    assert fit(_meta(3, 3, 4, 8), _meta(8, 4, 3, 3)).dims == (3, 2, 0, 1)  # HWIO -> OIHW
    assert fit(_meta(6, 6), _meta(6, 6)).square
    assert fit(_meta(8), _meta(8, dtype="int64")) is None and fit(_meta(8), _meta(9)) is None
    split = join_fit(_meta(64, 32), [_meta(32, 32), _meta(16, 32), _meta(16, 32)])
    assert (split.dim, split.sizes, split.transpose) == (0, (32, 16, 16), False)
    conv1d = join_fit(_meta(32, 96), [_meta(32, 32)] * 3)  # GPT-2 c_attn (in, 3*out) -> three Linear (out, in)
    assert (conv1d.dim, conv1d.transpose) == (1, False)
    assert join_fit(_meta(10, 4), [_meta(4, 4), _meta(4, 4)]) is None


def test_assign_matches_brute_force() -> None:
    rng = random.Random(0)
    for _ in range(200):
        n, m = rng.randint(1, 4), rng.randint(1, 4)
        scores = [[rng.random() if rng.random() < 0.7 else None for _ in range(m)] for _ in range(n)]
        total = sum(scores[i][j] for i, j in assign(scores))
        best = 0.0
        for choice in itertools.product(range(-1, m), repeat=n):
            cols = [c for c in choice if c >= 0]
            if len(cols) == len(set(cols)) and all(c < 0 or scores[i][c] is not None for i, c in enumerate(choice)):
                best = max(best, sum(scores[i][c] for i, c in enumerate(choice) if c >= 0))
        assert total == pytest.approx(best)


# ------------------------------------------------------------------------------------------------ levels
def test_repeated_blocks_fold_into_runs() -> None:
    items = [("embed.weight", _meta(10, 4))]
    for i in range(5):
        items += [(f"layers.{i}.attn.weight", _meta(4, 4)), (f"layers.{i}.norm.weight", _meta(4))]
    items += [("head.weight", _meta(3, 4))]
    level = build_level(items)
    assert [leaf.key for leaf in level.leaves] == ["embed.weight", "head.weight"]
    (run,) = level.runs
    assert (
        run.template == "layers.#"
        and len(run.prefixes) == 5
        and [x.key for x in run.body.leaves] == ["attn.weight", "norm.weight"]
    )


def test_block_alignment_is_per_body_not_per_instance() -> None:
    """10,000 layers align as one body: the work does not grow with the number of blocks."""
    src = [(f"h.{i}.{n}.weight", _meta(8, 8)) for i in range(10_000) for n in ("c_q", "c_o")]
    dst = [(f"blocks.{i}.{n}.weight", _meta(8, 8)) for i in range(10_000) for n in ("q", "o")]
    alignment = align(build_level(src), build_level(dst))
    assert len(alignment.runs) == 1 and len(alignment.runs[0].inner.matches) == 2
    matches = {m.sources[0]: m.targets[0] for m in expand(alignment)}
    assert matches["h.9999.c_o.weight"] == "blocks.9999.o.weight" and len(matches) == 20_000


def test_alignment_uses_names_over_position_and_shapes_for_ops() -> None:
    src = [
        ("norm1.weight", _meta(4)),
        ("qkv.weight", _meta(12, 4)),
        ("qkv.bias", _meta(12)),
        ("proj.weight", _meta(4, 4)),
        ("norm2.weight", _meta(4)),
        ("grn.gamma", _meta(1, 1, 1, 4)),
    ]
    dst = [
        ("q_proj.weight", _meta(4, 4)),
        ("q_proj.bias", _meta(4)),
        ("k_proj.weight", _meta(4, 4)),
        ("k_proj.bias", _meta(4)),
        ("v_proj.weight", _meta(4, 4)),
        ("v_proj.bias", _meta(4)),
        ("o_proj.weight", _meta(4, 4)),
        ("layernorm_before.weight", _meta(4)),
        ("layernorm_after.weight", _meta(4)),
        ("grn.weight", _meta(4)),
    ]
    alignment = align(build_level(src), build_level(dst))
    got = {m.sources: (m.targets, m.kind) for m in expand(alignment)}
    assert got[("qkv.weight",)] == (("q_proj.weight", "k_proj.weight", "v_proj.weight"), "split")
    assert got[("qkv.bias",)] == (("q_proj.bias", "k_proj.bias", "v_proj.bias"), "split")
    assert got[("proj.weight",)][0] == ("o_proj.weight",)
    assert got[("norm1.weight",)][0] == ("layernorm_before.weight",)  # ordinals, though 'before' comes late
    assert got[("norm2.weight",)][0] == ("layernorm_after.weight",)
    assert got[("grn.gamma",)][0] == ("grn.weight",)
    assert unmatched(alignment) == ([], [])


# ------------------------------------------------------------------------------------------------ rows
def test_rows_generalize_with_index_arithmetic_and_reproduce_every_key() -> None:
    pairs = [("conv1.weight", "embedder.convolution.weight")]
    for stage, depth in zip(range(1, 5), (3, 4, 6, 3)):
        for block in range(depth):
            for c in (1, 2, 3):
                pairs.append(
                    (
                        f"layer{stage}.{block}.conv{c}.weight",
                        f"stages.{stage - 1}.layers.{block}.layer.{c - 1}.convolution.weight",
                    )
                )
            if block == 0:
                pairs.append((f"layer{stage}.0.downsample.0.weight", f"stages.{stage - 1}.layers.0.shortcut.weight"))
    rows = rename_rows(pairs)
    assert [(r.pattern, r.replacement) for r in rows if "conv(" in r.pattern] == [
        (r"^layer(\d+)\.(\d+)\.conv(\d+)\.", r"stages.{\1 - 1}.layers.\2.layer.{\3 - 1}.convolution.")
    ]
    assert len(rows) == 3
    assert all(_apply(rows, s) == t for s, t in pairs)


def test_rows_split_where_one_number_does_not_explain_another() -> None:
    """A flat numbering (features.N) over stages (blocks.S.I): one row per run of N, then literal rows."""
    pairs, n = [], 1
    for stage, depth in enumerate((1, 2, 3, 4)):
        for i in range(depth):
            pairs.append((f"features.{n}.conv.weight", f"blocks.{stage}.{i}.conv.weight"))
            n += 1
    pairs += [("mlp.0.weight", "mlp.fc1.weight"), ("mlp.3.weight", "mlp.fc2.weight")]
    rows = rename_rows(pairs)
    assert (r"^features\.(4|5|6)\.", r"blocks.2.{\1 - 4}.") in [(r.pattern, r.replacement) for r in rows]
    assert all(_apply(rows, s) == t for s, t in pairs)


def test_rows_never_touch_keys_that_stay() -> None:
    pairs = [(f"blocks.{i}.attn.w", f"layers.{i}.attention.w") for i in range(3)]
    unchanged = [f"blocks.{i}.extra" for i in range(3)]  # matched by a naive `^blocks\.(\d+)\.` row
    pairs += [(f"blocks.{i}.mlp.w", f"layers.{i}.mlp.w") for i in range(3)]
    rows = rename_rows(pairs, unchanged)
    assert all(_apply(rows, s) == t for s, t in pairs)
    assert all(_apply(rows, k) == k for k in unchanged)


def test_random_mappings_are_always_reproduced() -> None:
    rng = random.Random(1)
    for trial in range(30):
        names = ["a", "b", "conv", "norm", "fc"]
        sources = sorted(
            {f"{rng.choice(names)}{rng.randint(0, 3)}.{rng.randint(0, 5)}.{rng.choice(names)}.w" for _ in range(40)}
        )
        targets = [f"x{rng.randint(0, 2)}.{i}.{rng.choice(names)}.w" for i in range(len(sources))]
        rng.shuffle(targets)
        pairs = list(zip(sources, targets))
        rows = rename_rows(pairs)
        assert all(_apply(rows, s) == t for s, t in pairs), trial


def test_cover_matches_exactly_the_keys() -> None:
    universe = [
        f"stages.{i}.blocks.{j}.{name}"
        for i in range(3)
        for j in range(2)
        for name in ("mlp.grn.weight", "mlp.grn.bias", "mlp.fc1.weight", "norm.weight")
    ]
    wanted = [k for k in universe if ".grn." in k]
    assert cover(wanted, universe) == [r"\.grn\.(weight|bias)$"]
    some = ["stages.0.blocks.1.norm.weight", "stages.2.blocks.0.mlp.fc1.weight"]
    patterns = [re.compile(p) for p in cover(some, universe)]
    assert [k for k in universe if any(p.search(k) for p in patterns)] == some


# ------------------------------------------------------------------------------------------------ where and prefixes
def test_prefixes() -> None:
    assert infer_prefixes(["module.conv.w", "module.fc.w"], ["conv.w", "fc.w"]).strip == ("module",)
    assert infer_prefixes(["module._orig_mod.a.w", "module._orig_mod.b.w"], ["a.w", "b.w"]).strip == (
        "module",
        "_orig_mod",
    )
    assert infer_prefixes(["conv.w", "fc.w"], ["backbone.conv.w", "backbone.fc.w"]).add == ("backbone",)
    both = infer_prefixes(["module.backbone.a.w", "module.backbone.b.w"], ["backbone.a.w", "backbone.b.w"])
    assert (both.strip, both.add) == (("module",), ())
    # a shared first component the target also uses stays (GPT-2's `transformer.`)
    assert infer_prefixes(["transformer.h.w", "transformer.ln.w"], ["transformer.h.w", "lm_head.w"]).strip == ()


def test_candidate_choice_prefers_fit_then_usual_names() -> None:
    target = {f"k{i}": _meta(i + 2) for i in range(6)}
    fits = Candidate("model", {f"a{i}": _meta(i + 2) for i in range(6)})
    ema = Candidate("model_ema", dict(fits.tensors))
    optimizer = Candidate("optimizer.state", {"x": _meta(99)})
    chosen, rivals, _ = choose_candidate([ema, optimizer, fits], target)
    assert chosen.path == "model" and [c.path for c, _ in rivals] == ["model_ema"]


def test_natural_order_only_for_name_sorted_keys() -> None:
    assert natural_order(["c.w", "b.10.w", "b.2.w"]) is None  # not sorted by name: registration order kept
    assert natural_order(["b.10.w", "b.2.w", "b.3.w"]) == ["b.2.w", "b.3.w", "b.10.w"]


def test_run_instances_pair_by_number_when_one_side_splits_its_first_block() -> None:
    """Target block 0 has an extra tensor, so it is not in the target's run: source block i still goes to target
    block i (not to the run's i-th instance)."""
    src = [(f"layers.{i}.{n}.weight", _meta(4, 4)) for i in range(4) for n in ("a", "b")]
    dst = [(f"blocks.{i}.{n}.weight", _meta(4, 4)) for i in range(4) for n in ("a", "b")]
    dst.insert(2, ("blocks.0.extra", _meta(7)))
    got = {m.sources[0]: m.targets[0] for m in expand(align(build_level(src), build_level(dst)))}
    assert all(got[f"layers.{i}.{n}.weight"] == f"blocks.{i}.{n}.weight" for i in range(4) for n in ("a", "b"))


def test_run_instances_numbered_from_one_pair_with_zero_based() -> None:
    src = [(f"encoder.layer_{i}.w", _meta(4, 4)) for i in range(1, 4)] + [("encoder.layer_0_extra", _meta(9))]
    dst = [(f"blocks.{i}.w", _meta(4, 4)) for i in range(3)]
    got = {m.sources[0]: m.targets[0] for m in expand(align(build_level(src), build_level(dst)))}
    assert got == {
        "encoder.layer_1.w": "blocks.0.w",
        "encoder.layer_2.w": "blocks.1.w",
        "encoder.layer_3.w": "blocks.2.w",
    }


def test_a_lone_leftover_of_the_same_shape_is_not_taken_for_a_new_layer() -> None:
    src = [(f"blocks.{i}.w", _meta(4, 4)) for i in range(12)] + [("aux_loss_head.weight", _meta(8))]
    src = [(k, m) for k, m in src]
    dst = [("new_norm.weight", _meta(8))] + [(f"layers.{i}.w", _meta(4, 4)) for i in range(12)]
    alignment = align(build_level(src), build_level(dst))
    assert unmatched(alignment) == (["aux_loss_head.weight"], ["new_norm.weight"])


def test_literal_rows_are_the_safe_fallback() -> None:
    pairs = [("a.0.w", "x.w"), ("b.1.w", "y.0.w")]
    rows = rename_rows(pairs, literal=True)
    assert [(r.pattern, r.replacement) for r in rows] == [(r"^a\.0\.w$", "x.w"), (r"^b\.1\.w$", "y.0.w")]
    assert all(_apply(rows, s) == t for s, t in pairs)
