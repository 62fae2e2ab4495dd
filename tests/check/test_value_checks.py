"""check/value_checks.py: NaN, infinities, and zeros or constants judged against how the target initializes a tensor."""

from __future__ import annotations

from ckptx.check.init_like import InitReference
from ckptx.check.value_checks import value_findings
from ckptx.io.digest import TensorStats

ONES = TensorStats(8, 1.0, 0.0, 1.0, 1.0, 0, 0, 0)
ZEROS = TensorStats(8, 0.0, 0.0, 0.0, 0.0, 8, 0, 0)
RANDOM = InitReference("random", mean=0.0, var=0.01)


def _kinds(*args) -> list[str]:
    return [f.kind for f in value_findings(*args)]


def test_a_norm_weight_of_ones_is_normal_and_a_linear_weight_of_ones_is_not() -> None:
    assert _kinds("norm.weight", "float32", ONES, InitReference("constant", 1.0)) == []
    assert _kinds("norm.weight", "float32", ONES, None) == []
    assert _kinds("fc.weight", "float32", ONES, RANDOM) == ["constant"]


def test_zeros_are_a_finding_unless_the_target_initializes_zeros() -> None:
    assert _kinds("fc.bias", "float32", ZEROS, InitReference("constant", 0.0)) == []
    assert _kinds("fc.bias", "float32", ZEROS, None) == ["zeros"]
    assert _kinds("norm.weight", "float32", ZEROS, InitReference("constant", 1.0)) == ["zeros"]


def test_nan_and_inf_are_counted_and_integer_tensors_have_no_value_findings() -> None:
    broken = TensorStats(10, 0.5, 0.1, 0.0, 1.0, 0, 2, 1)
    found = value_findings("w", "bfloat16", broken, None)
    expected = [("nan", "2 NaN of 10 elements"), ("inf", "1 infinite of 10 elements")]
    assert [(f.kind, f.detail) for f in found] == expected
    assert _kinds("steps", "int64", ZEROS, None) == []
    assert _kinds("scale", "float32", TensorStats(1, 0.0, 0.0, 0.0, 0.0, 1, 0, 0), None) == []
