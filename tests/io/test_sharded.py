"""Sharded checkpoints: HF index files read as one source; --max-shard-size writes shards + index atomically."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import ckptx
from ckptx import plan as plan_recipe
from ckptx.cli import main
from ckptx.errors import DestinationError, SourceError, TensorOpError, VerificationFailed
from ckptx.io.read.open import open_source
from ckptx.io.write.sharded_writer import shard_layout
from ckptx.planning.source import Source
from ckptx.text import parse_size
from ckptx.trust.callables import allow_factories
from tests.conftest import TINY_TARGET

INDEX = "model.safetensors.index.json"


def state(n: int = 6) -> dict[str, torch.Tensor]:
    """`n` layers of 1 KiB weights and 16-byte biases, plus an int64 counter."""
    out = {}
    for i in range(n):
        out[f"layers.{i}.weight"] = torch.randn(16, 16)
        out[f"layers.{i}.bias"] = torch.randn(4)
    out["steps"] = torch.tensor(5, dtype=torch.int64)
    return out


def write_hf_shards(
    folder: Path, tensors: dict[str, torch.Tensor], per_shard: int, *, torch_format: bool = False
) -> Path:
    """Shards and an index as `save_pretrained` writes them."""
    keys = list(tensors)
    groups = [keys[i : i + per_shard] for i in range(0, len(keys), per_shard)]
    weight_map = {}
    for number, group in enumerate(groups, 1):
        suffix = "bin" if torch_format else "safetensors"
        stem = "pytorch_model" if torch_format else "model"
        name = f"{stem}-{number:05d}-of-{len(groups):05d}.{suffix}"
        part = {k: tensors[k].contiguous() for k in group}
        if torch_format:
            torch.save(part, folder / name)
        else:
            save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in group})
    index = folder / ("pytorch_model.bin.index.json" if torch_format else INDEX)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return index


@pytest.mark.parametrize("torch_format", [False, True])
def test_sharded_source_reads_as_one_checkpoint(tmp_path: Path, torch_format: bool) -> None:
    tensors = state()
    index = write_hf_shards(tmp_path, tensors, per_shard=4, torch_format=torch_format)
    with open_source(index) as source:
        assert source.format == ("sharded-torch-zip" if torch_format else "sharded-safetensors")
        assert set(source.tensors) == set(tensors)
        weight_map = json.loads(index.read_text())["weight_map"]
        shard_order = [weight_map[k] for k in source.tensors]
        assert shard_order == sorted(shard_order)  # one shard after the other
        for key, value in tensors.items():
            assert torch.equal(source.load(key), value)
            span = source.raw_span(key)
            assert span is not None and Path(span.file).parent == tmp_path
        assert source.file_metadata["total_size"] == str(sum(t.numel() * t.element_size() for t in tensors.values()))


def test_missing_shard_is_a_one_line_error(tmp_path: Path) -> None:
    index = write_hf_shards(tmp_path, state(), per_shard=4)
    (tmp_path / "model-00002-of-00004.safetensors").unlink()
    with pytest.raises(SourceError) as caught:
        open_source(index)
    message = str(caught.value)
    assert message == (
        f"{index}: shard 'model-00002-of-00004.safetensors' is missing (expected at "
        f"{tmp_path / 'model-00002-of-00004.safetensors'}); download it or fix the index"
    )


def test_key_listed_but_absent_from_its_shard(tmp_path: Path) -> None:
    index = write_hf_shards(tmp_path, state(), per_shard=4)
    doc = json.loads(index.read_text())
    doc["weight_map"]["layers.9.weight"] = "model-00001-of-00004.safetensors"
    index.write_text(json.dumps(doc))
    with pytest.raises(
        SourceError,
        match=r"key 'layers.9.weight' is listed for shard 'model-00001-of-00004.safetensors' "
        r"but that shard has no such tensor .*re-download them or regenerate the index",
    ):
        open_source(index)


@pytest.mark.parametrize("name", ["../outside.safetensors", "/abs/model.safetensors"])
def test_shard_names_outside_the_folder_are_refused(tmp_path: Path, name: str) -> None:
    index = tmp_path / INDEX
    index.write_text(json.dumps({"weight_map": {"w": name}}))
    with pytest.raises(SourceError, match="is not a file name inside the index's folder"):
        open_source(index)


def test_index_without_weight_map(tmp_path: Path) -> None:
    index = tmp_path / INDEX
    index.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(SourceError, match='needs a "weight_map" object'):
        open_source(index)


def shards_of(folder: Path, stem: str = "model") -> list[Path]:
    return sorted(folder.glob(f"{stem}-*-of-*.safetensors"))


def test_max_shard_size_writes_shards_and_an_index(tmp_path: Path, write_rules: Callable[..., Path]) -> None:
    tensors = state()
    src = tmp_path / "src.safetensors"
    save_file(tensors, str(src))
    out = tmp_path / "out"
    out.mkdir()
    result = ckptx.convert(src, out / "model.safetensors", write_rules("ckptx: 1\n"), max_shard_size=2100)
    shards = shards_of(out)
    assert [p.name for p in shards] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert result.destination == str(out / INDEX) and not (out / "model.safetensors").exists()
    index = json.loads((out / INDEX).read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert set(index["weight_map"]) == set(tensors)
    merged = {}
    for shard in shards:
        part = load_file(str(shard))
        assert sum(t.numel() * t.element_size() for t in part.values()) <= 2100
        assert all(index["weight_map"][k] == shard.name for k in part)
        merged.update(part)
    assert all(torch.equal(merged[k], v) for k, v in tensors.items())
    assert result.bytes_written == sum(p.stat().st_size for p in shards) + (out / INDEX).stat().st_size
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


def test_sharded_output_into_a_new_folder_creates_it(tmp_path: Path, write_rules: Callable[..., Path]) -> None:
    src = tmp_path / "src.safetensors"
    save_file(state(), str(src))
    out = tmp_path / "new" / "deeper"
    ckptx.convert(src, out / "model.safetensors", write_rules("ckptx: 1\n"), max_shard_size=2100)
    assert len(shards_of(out)) == 3 and (out / INDEX).is_file()


def test_sharded_output_reads_back_through_ckptx(tmp_path: Path, write_rules: Callable[..., Path]) -> None:
    tensors = state()
    src = tmp_path / "src.safetensors"
    save_file(tensors, str(src))
    ckptx.convert(
        src, tmp_path / INDEX, write_rules("ckptx: 1\nsteps: [{add_prefix: 'model.'}]\n"), max_shard_size=3000
    )
    again = tmp_path / "again.safetensors"
    ckptx.convert(tmp_path / INDEX, again, write_rules("ckptx: 1\nsteps: [{strip_prefix: 'model.'}]\n", "back.yaml"))
    back = load_file(str(again))
    assert list(back) == list(tensors) or set(back) == set(tensors)
    assert all(torch.equal(back[k], v) for k, v in tensors.items())


def test_index_destination_without_size_gives_one_shard(tmp_path: Path, write_rules: Callable[..., Path]) -> None:
    src = tmp_path / "src.safetensors"
    save_file(state(), str(src))
    ckptx.convert(src, tmp_path / INDEX, write_rules("ckptx: 1\n"))
    assert [p.name for p in shards_of(tmp_path)] == ["model-00001-of-00001.safetensors"]


def test_everything_fitting_in_one_shard_is_one_plain_file(tmp_path: Path, write_rules: Callable[..., Path]) -> None:
    src = tmp_path / "src.safetensors"
    save_file(state(), str(src))
    result = ckptx.convert(src, tmp_path / "model.safetensors", write_rules("ckptx: 1\n"), max_shard_size=10**9)
    assert result.destination == str(tmp_path / "model.safetensors")
    assert (tmp_path / "model.safetensors").is_file() and not (tmp_path / INDEX).exists() and not shards_of(tmp_path)


def test_tensor_larger_than_the_shard_size_gets_its_own_shard(tmp_path: Path, write_rules: Callable[..., Path]) -> None:
    tensors = {"small": torch.zeros(2), "big": torch.zeros(1000), "tail": torch.zeros(3)}
    plan = plan_recipe(ckptx.load_rules(str(write_rules("ckptx: 1\n"))), tensors)
    layout = shard_layout(tmp_path / INDEX, plan.entries, 100)
    assert [[e.key for e in group] for _, group in layout.files] == [["small"], ["big"], ["tail"]]


@pytest.mark.parametrize("dst", ["out.pth", "pytorch_model.bin.index.json"])
def test_sharded_output_is_safetensors_only(tmp_path: Path, dst: str, write_rules: Callable[..., Path]) -> None:
    src = tmp_path / "src.safetensors"
    save_file(state(), str(src))
    with pytest.raises(DestinationError, match="sharded output is safetensors only"):
        ckptx.convert(src, tmp_path / dst, write_rules("ckptx: 1\n"), max_shard_size=1000)


def test_existing_shards_need_force(tmp_path: Path, write_rules: Callable[..., Path]) -> None:
    src = tmp_path / "src.safetensors"
    save_file(state(), str(src))
    rules = write_rules("ckptx: 1\n")
    ckptx.convert(src, tmp_path / INDEX, rules, max_shard_size=2100)
    with pytest.raises(DestinationError, match="already exists; pass --force"):
        ckptx.convert(src, tmp_path / INDEX, rules, max_shard_size=2100)
    ckptx.convert(src, tmp_path / INDEX, rules, max_shard_size=2100, force=True)
    result = ckptx.convert(src, tmp_path / INDEX, rules, max_shard_size=5000, force=True)
    assert len(json.loads((tmp_path / INDEX).read_text())["weight_map"]) == 13
    assert any(
        "older shards left in place" in note and "model-00003-of-00003.safetensors" in note for note in result.notes
    )


def test_failure_mid_write_leaves_no_shard_under_a_final_name(
    tmp_path: Path, write_rules: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "src.safetensors"
    save_file(state(), str(src))
    (tmp_path / INDEX).write_text('{"weight_map": {}}')  # an older index must survive a failed run
    calls = []

    def failing_load(self: Source, key: str) -> torch.Tensor:
        calls.append(key)
        if len(calls) == 9:
            raise TensorOpError(f"tensor '{key}': disk on fire")
        return load_file(str(src))[key]

    from ckptx.io.read.safetensors_reader import SafetensorsSource

    monkeypatch.setattr(SafetensorsSource, "load", failing_load)
    with pytest.raises(TensorOpError, match="disk on fire"):
        ckptx.convert(
            src,
            tmp_path / INDEX,
            write_rules("ckptx: 1\nsteps: [{scale: {match: layers, by: 2}}]\n"),
            max_shard_size=1000,
            force=True,
        )
    assert shards_of(tmp_path) == []
    assert (tmp_path / INDEX).read_text() == '{"weight_map": {}}'
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_cli_flag_and_sizes(tmp_path: Path, write_rules: Callable[..., Path]) -> None:
    src = tmp_path / "src.safetensors"
    save_file(state(), str(src))
    out, err = io.StringIO(), io.StringIO()
    code = main(
        [
            "convert",
            str(src),
            "-r",
            str(write_rules("ckptx: 1\n")),
            "-o",
            str(tmp_path / "m.safetensors"),
            "--max-shard-size",
            "2.1KB",
            "--json",
        ],
        stdout=out,
        stderr=err,
    )
    assert code == 0 and json.loads(out.getvalue())["destination"] == str(tmp_path / "m.safetensors.index.json")
    assert len(shards_of(tmp_path, "m")) == 3
    bad = io.StringIO()
    assert (
        main(
            ["convert", str(src), "-r", "x.yaml", "-o", "y.safetensors", "--max-shard-size", "5XB"],
            stdout=io.StringIO(),
            stderr=bad,
        )
        == 2
    )
    assert "'5XB' is not a size" in bad.getvalue()


@pytest.mark.parametrize(
    "text,size",
    [
        ("5GB", 5 * 10**9),
        ("500MB", 5 * 10**8),
        ("2GiB", 2 * 2**30),
        ("10kib", 10240),
        ("1.5 MiB", 3 * 2**19),
        ("123", 123),
        ("7 KB", 7000),
    ],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "GB", "-1GB", "0", "5 XB", "1e9"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


VERIFIED = """ckptx: 1
target: {model: 'tests.helpers.models:tiny_net'}
verify: {source_model: 'tests.helpers.models:tiny_net', input_shape: [2, 3, 8, 8]}
steps: [%s]
"""


def test_verify_checks_the_staged_shards_before_publishing(
    tmp_path: Path, safetensors_file: Path, write_rules: Callable[..., Path]
) -> None:
    with allow_factories([TINY_TARGET]):  # the tests' own factory, named in a file: the user allows it
        result = ckptx.convert(
            safetensors_file, tmp_path / INDEX, write_rules(VERIFIED % ""), max_shard_size=200, verify=True
        )
        assert result.verification.ok and len(shards_of(tmp_path)) > 1 and (tmp_path / INDEX).exists()
        out = tmp_path / "bad"
        out.mkdir()
        with pytest.raises(VerificationFailed):
            ckptx.convert(
                safetensors_file,
                out / INDEX,
                write_rules(VERIFIED % "{scale: {match: '^fc\\.bias$', by: 3}}", "bad.yaml"),
                max_shard_size=200,
                verify=True,
            )
    assert list(out.iterdir()) == []
