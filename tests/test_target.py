"""The three target kinds and the validation report."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import ckptx
from ckptx.check.validation import validate
from ckptx.dtypes import TensorMeta
from ckptx.errors import TargetError
from ckptx.io.manifest import read_manifest, write_manifest
from ckptx.rules.recipe import Origin, TargetSpec
from ckptx.targets.resolve import parse_target_arg, resolve_target
from ckptx.trust.callables import allow_factories
from tests.conftest import TINY_TARGET
from tests.helpers.models import tiny_net


def test_model_factory_target_is_built_on_meta_device() -> None:
    target = resolve_target(TargetSpec(model=TINY_TARGET, kwargs={"channels": 6}, model_origin=Origin.user("test")))
    assert target.tensors["conv.weight"] == TensorMeta((6, 3, 3, 3), "float32")
    assert target.tensors["bn.num_batches_tracked"].dtype == "int64"
    assert target.notes == ()


def test_huge_model_costs_no_memory_on_meta() -> None:
    spec = TargetSpec(model="torch.nn:Linear", kwargs={"in_features": 100_000, "out_features": 100_000})
    assert resolve_target(spec).tensors["weight"].numel == 10**10  # 40 GB if it were real


def test_reference_checkpoint_target_reads_only_the_header(tmp_path: Path) -> None:
    path = tmp_path / "ref.safetensors"
    save_file({"a": torch.zeros(2, 3), "b": torch.zeros(4, dtype=torch.int64)}, str(path))
    with open(path, "r+b") as f:  # corrupt the data: a header-only read does not notice
        f.seek(-8, 2)
        f.write(b"\xff" * 8)
    target = resolve_target(parse_target_arg(str(path)))
    assert target.tensors == {"a": TensorMeta((2, 3), "float32"), "b": TensorMeta((4,), "int64")}


def test_manifest_round_trip(tmp_path: Path) -> None:
    tensors = {"x.weight": TensorMeta((3, 4), "bfloat16")}
    write_manifest(tmp_path / "m.json", tensors, source="somewhere")
    assert read_manifest(tmp_path / "m.json") == tensors
    assert resolve_target(parse_target_arg(str(tmp_path / "m.json"))).tensors == tensors


def test_manifest_that_is_not_one(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text("hello: 1\n")
    with pytest.raises(TargetError, match=r"m.yaml: not a ckptx manifest"):
        read_manifest(path)


def test_unimportable_factory_is_named() -> None:
    with pytest.raises(TargetError, match=r"--target: cannot import module 'no_such_pkg'"):
        resolve_target(parse_target_arg("no_such_pkg:build"))


def test_factory_failure_is_reported_not_crashed() -> None:
    with pytest.raises(TargetError, match=r"tests.helpers.models:tiny_net\(\*\*\{'bogus': 1\}\) failed: TypeError"):
        resolve_target(
            TargetSpec(model=TINY_TARGET, kwargs={"bogus": 1}, where="target", model_origin=Origin.user("test"))
        )


def test_report_lists_missing_unexpected_shape_and_dtype() -> None:
    model_state = dict(tiny_net().state_dict())
    have = {k: v for k, v in model_state.items() if k != "fc.bias"}
    have["conv.weight"] = torch.zeros(4, 3, 5, 5)
    have["bn.weight"] = torch.zeros(4, dtype=torch.float16)
    have["extra"] = torch.zeros(1)
    report = validate(have, tiny_net())
    assert not report.ok
    assert [p.key for p in report.missing] == ["fc.bias"]
    assert [p.key for p in report.unexpected] == ["extra"]
    assert [p.key for p in report.shape_mismatches] == ["conv.weight"]
    assert [p.key for p in report.dtype_differences] == ["bn.weight"]


def test_allowed_missing_does_not_fail(write_rules: Callable[..., Path], ddp_checkpoint: Path) -> None:
    rules = write_rules(
        "ckptx: 1\nextract: model\nsteps: [{strip_prefix: module.}, {drop: ['^fc\\.']}]\n"
        f"target: {{model: '{TINY_TARGET}', allow_missing: ['^fc\\.']}}\n"
    )
    with allow_factories([TINY_TARGET]):  # the tests' own factory, named in a file: the user allows it
        result = ckptx.convert(ddp_checkpoint, None, rules, dry_run=True)
    assert result.report.ok and result.report.allowed_missing == ["fc.weight", "fc.bias"]


def test_shape_mismatch_with_same_numel_suggests_reshape() -> None:
    report = validate({"w": torch.zeros(1, 1, 1, 8)}, {"w": torch.zeros(8)})
    assert report.shape_mismatches[0].hint.startswith("same number of elements: add `reshape:")


def test_validation_report_text() -> None:
    report = validate({"head.weight": torch.zeros(3, 4)}, {"fc.weight": torch.zeros(3, 4)})
    assert str(report) == (
        "validation against <state_dict>: FAILED: 1 missing key, 1 unexpected key (0/1 target keys fit)\n"
        "  missing in the converted checkpoint: 1\n"
        "    fc.weight: float32[3, 4]  did you mean 'head.weight' (same shape)?\n"
        "  unexpected (not in the target): 1\n"
        "    head.weight: float32[3, 4]"
    )


def test_factory_failing_on_meta_is_rebuilt_on_cpu_whatever_its_message(tmp_path, monkeypatch) -> None:
    """The CPU fallback is chosen by the failure's type (the factory raised), not by words in its message:
    a factory whose meta-device error says "no attribute" is still rebuilt on the CPU."""
    (tmp_path / "metafussy.py").write_text(
        "import torch\n"
        "def build():\n"
        "    if torch.empty(0).device.type == 'meta':\n"
        "        raise AttributeError(\"'Tensor' has no attribute 'item' on meta; cannot import the weights\")\n"
        "    return torch.nn.Linear(2, 3)\n",
        encoding="utf-8",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    target = resolve_target(parse_target_arg("metafussy:build"))
    assert set(target.tensors) == {"weight", "bias"}
    assert any("built on the CPU" in note for note in target.notes)


def test_factory_that_cannot_be_imported_is_not_retried(tmp_path, monkeypatch) -> None:
    (tmp_path / "nofactory.py").write_text("x = 1\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(TargetError, match="has no attribute 'build'"):
        resolve_target(parse_target_arg("nofactory:build"))
