"""`rules show --resolved`: the flattened recipe of every step kind loads back and plans the same."""

from __future__ import annotations

import torch

from ckptx.conversion.in_memory import apply
from ckptx.rules.flatten import dump, flatten
from ckptx.rules.loader import load_rules, load_rules_text

EVERY_STEP = r"""
ckptx: 1
name: every-step
params: {width: 6, head: true}
steps:
  - take_from: {template: 'ema_{flat}'}
  - strip_prefix: {prefixes: [module.], common: true}
  - drop: ['^junk$']
  - keep: ['.']
  - add_prefix: {prefix: net., skip: '^extra'}
  - rename: [['^net\.layer(\d)\.', 'net.stages.{\1 - 1}.']]
  - split: {match: '^(.*)\.qkv$', into: ['\1.q', '\1.k', '\1.v'], sizes: [2, 2, 2]}
  - split: {match: '^(.*)\.experts$', into: '\1.e.{i}', unbind: true}
  - merge: {match: '^(.*)\.e\.(\d)$', index: '\2', to: '\1.experts', stack: true}
  - merge: {match: '^(.*)\.q$', inputs: ['\1.q', '\1.k'], to: '\1.qk'}
  - reshape: {match: 'gamma', shape: target}
  - permute: {match: 'conv', dims: [1, 0]}
  - unsqueeze: {match: 'vec', dim: 0}
  - squeeze: {match: 'vec', dim: 0}
  - slice: {match: 'emb', dim: 0, start: 1}
  - resize: {match: 'emb', size: '${width}', fill: normal, seed: 4}
  - resample_pos_embed: {match: 'pos', prefix_tokens: 1, grid: [3, 3]}
  - adapt_in_channels: {match: 'stem', channels: target}
  - scale: {match: 'vec', by: 0.5}
  - copy: {match: '^(.*)\.emb$', to: '\1.head'}
  - set: {match: '^(.*)\.vec$', key: '\1.count', value: 1, dtype: int64, if_exists: keep}
  - cast: {match: 'vec', dtype: float64}
    when: {param: {head: true}, has_key: vec}
    strict: true
  - drop: ['^never$']
    when: {param: {head: false}}
"""


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "module.layer1.qkv": torch.randn(6, 2, generator=g),
        "module.layer1.experts": torch.randn(3, 2, generator=g),
        "module.gamma": torch.randn(1, 4, generator=g),
        "module.conv": torch.randn(2, 3, generator=g),
        "module.vec": torch.randn(3, generator=g),
        "module.emb": torch.randn(4, 2, generator=g),
        "module.pos": torch.randn(1, 5, 2, generator=g),
        "module.stem": torch.randn(2, 3, 1, 1, generator=g),
        "module.junk": torch.zeros(1),
    }


TARGET = {"net.gamma": torch.zeros(4), "net.stem": torch.zeros(2, 4, 1, 1)}


def test_every_step_kind_flattens_to_an_equivalent_recipe(write_rules) -> None:
    recipe = load_rules(write_rules(EVERY_STEP))
    text = dump(flatten(recipe))
    again = load_rules_text(text, "<resolved>")
    assert [s.op for s in again.steps] == [s.op for s in recipe.steps][:-1]  # the false `when` step is left out
    assert flatten(again)["steps"][-1]["when"] == {"has_key": "vec"}
    first, second = apply(recipe, _state(), TARGET), apply(again, _state(), TARGET)
    assert list(first) == list(second)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert "net.stages.0.experts" in first and first["net.vec"].dtype == torch.float64


def test_cli_prints_the_resolved_recipe(run_cli, write_rules) -> None:
    path = write_rules(EVERY_STEP)
    result = run_cli("rules", "show", path, "--resolved", "--set", "width=7")
    assert result.code == 0, result.err
    assert result.out.startswith(f"# {path}: resolved from {path}\n")
    assert "  - resize:\n" not in result.out and "- resize:\n    match: emb\n    dim: 0\n    size: 7\n" in result.out
    assert "- split:\n    match: ^(.*)\\.experts$\n    into: \\1.e.{i}\n" in result.out
