"""The streaming torch writer: `.pth` output as torch.save lays it out, read back with real torch."""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
import textwrap
import warnings
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

import ckptx
from ckptx import plan as plan_recipe
from ckptx.errors import CkptxError
from ckptx.io.crc import WINDOW, span_crc
from ckptx.io.read.open import open_source
from ckptx.io.read.state_dict import MappingSource
from ckptx.io.read.torch_zip import ZipSpanSource
from ckptx.io.write.torch_pickle import PickledStorage, PickledTensor, state_dict_pickle
from ckptx.io.write.torch_writer import TorchWriter, write_torch
from ckptx.io.write.writer import OutputOptions
from ckptx.planning.source import RawSpan
from ckptx.rules.recipe import Recipe
from tests.conftest import subprocess_env
from tests.helpers.models import TiedNet, randomized

# Every dtype torch.save can write (torch/storage.py: the legacy storage types and `_new_dtypes`).
DTYPES = [
    "float64",
    "float32",
    "float16",
    "bfloat16",
    "float8_e4m3fn",
    "float8_e5m2",
    "float8_e4m3fnuz",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
    "float4_e2m1fn_x2",
    "int64",
    "int32",
    "int16",
    "int8",
    "uint64",
    "uint32",
    "uint16",
    "uint8",
    "bool",
    "complex128",
    "complex64",
    "complex32",
    "bcomplex32",
    "bits8",
    "bits16",
    "bits1x8",
    "bits2x4",
    "bits4x2",
]
NO_CHANGE = "ckptx: 1\n"
RENAME = "ckptx: 1\nsteps: [{add_prefix: net.}]\n"


def raw(tensor: torch.Tensor) -> bytes:
    """A tensor's elements as bytes, row-major (compares dtypes that have no `==`)."""
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def sample(dtype: torch.dtype) -> torch.Tensor:
    """A 3x4 tensor of `dtype` with distinct bytes (bool: 0/1)."""
    count = 12 * dtype.itemsize
    data = torch.arange(count, dtype=torch.uint8) % (2 if dtype == torch.bool else 251)
    return data.view(dtype).reshape(3, 4)


def convert(src: Path, dst: Path, write_rules: Callable[..., Path], rules: str = NO_CHANGE) -> ckptx.ConvertResult:
    return ckptx.convert(src, dst, write_rules(rules))


def load(path: Path, **kwargs: Any) -> Any:
    return torch.load(path, weights_only=True, **kwargs)


def same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


@pytest.mark.parametrize("name", [n for n in DTYPES if hasattr(torch, n)])  # bcomplex32 is newer than torch 2.13
def test_every_dtype_round_trips_copied_from_memory_and_computed(
    tmp_path: Path, name: str, write_rules: Callable[..., Path]
) -> None:
    tensor = sample(getattr(torch, name))
    src, dst = tmp_path / "src.pth", tmp_path / "out.pth"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # complex32: "ComplexHalf support is experimental"
        torch.save({"copied": tensor, "from_memory": tensor.t(), "computed": tensor}, src)
        convert(src, dst, write_rules, "ckptx: 1\nsteps: [{reshape: {match: '^computed$', shape: [-1]}}]\n")
        out = load(dst)
    assert {k: v.dtype for k, v in out.items()} == dict.fromkeys(["copied", "from_memory", "computed"], tensor.dtype)
    assert raw(out["copied"]) == raw(tensor) and raw(out["computed"]) == raw(tensor.reshape(-1))
    assert raw(out["from_memory"]) == raw(tensor.t()) and out["from_memory"].shape == (4, 3)


def test_a_quantized_tensor_is_refused_by_key_before_anything_is_written(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized dtypes are deprecated
        quantized = torch.quantize_per_tensor(torch.randn(4), 0.1, 0, torch.qint8)
    with pytest.raises(CkptxError, match=r"tensor 'q' is a quantized tensor \(qint8\)"):
        source = MappingSource("<mem>", "memory", {"w": torch.ones(2), "q": quantized})
        write_torch(tmp_path / "out.pth", plan_recipe(Recipe(name="x"), source).entries, source)
    assert list(tmp_path.iterdir()) == []


def test_a_sparse_tensor_is_refused_by_key(tmp_path: Path) -> None:
    with pytest.raises(CkptxError, match=r"tensor 's' is a sparse tensor \(sparse_coo\)"):
        source = MappingSource("<mem>", "memory", {"s": torch.eye(3).to_sparse()})
        write_torch(tmp_path / "out.pth", plan_recipe(Recipe(name="x"), source).entries, source)
    assert list(tmp_path.iterdir()) == []


def test_tied_weights_stay_tied_in_one_record(tmp_path: Path, write_rules: Callable[..., Path]) -> None:
    model = randomized(TiedNet(vocab=1000, dim=64))
    src, dst = tmp_path / "tied.pth", tmp_path / "out.pth"
    torch.save(model.state_dict(), src)
    convert(src, dst, write_rules)
    out = load(dst)
    assert same_storage(out["embed.weight"], out["out.weight"])
    assert torch.equal(out["out.weight"], model.embed.weight)
    assert dst.stat().st_size < 1.1 * model.embed.weight.nbytes  # one copy, not two
    assert len([n for n in zipfile.ZipFile(dst).namelist() if "/data/" in n]) == 1


def test_tied_weights_from_a_legacy_file_stay_tied(tmp_path: Path, write_rules: Callable[..., Path]) -> None:
    model = randomized(TiedNet())
    src, dst = tmp_path / "legacy.pth", tmp_path / "out.pth"
    torch.save(model.state_dict(), src, _use_new_zipfile_serialization=False)
    convert(src, dst, write_rules)
    out = load(dst)
    assert same_storage(out["embed.weight"], out["out.weight"]) and torch.equal(out["out.weight"], model.embed.weight)


def test_tied_weights_cast_together_stay_tied(tmp_path: Path, write_rules: Callable[..., Path]) -> None:
    model = randomized(TiedNet())
    src, dst = tmp_path / "tied.pth", tmp_path / "out.pth"
    torch.save(model.state_dict(), src)
    convert(src, dst, write_rules, "ckptx: 1\nsteps: [{cast: {dtype: float16}}]\n")
    out = load(dst)
    assert same_storage(out["embed.weight"], out["out.weight"])
    assert torch.equal(out["out.weight"], model.embed.weight.detach().half())


def test_a_view_written_with_its_base_shares_the_base_storage(tmp_path: Path, write_rules: Callable[..., Path]) -> None:
    base = torch.arange(100, dtype=torch.float32)
    src, dst = tmp_path / "views.pth", tmp_path / "out.pth"
    torch.save({"base": base, "view": base[10:20]}, src)
    convert(src, dst, write_rules)
    out = load(dst)
    assert same_storage(out["base"], out["view"]) and out["view"].storage_offset() == 10
    assert torch.equal(out["view"], base[10:20]) and torch.equal(out["base"], base)


def test_a_view_written_alone_gets_a_compact_storage(tmp_path: Path, write_rules: Callable[..., Path]) -> None:
    base = torch.arange(100, dtype=torch.float32)
    src, dst = tmp_path / "views.pth", tmp_path / "out.pth"
    torch.save({"base": base, "view": base[10:20]}, src)
    convert(src, dst, write_rules, "ckptx: 1\nsteps: [{drop: ['^base$']}]\n")
    out = load(dst)
    assert torch.equal(out["view"], base[10:20]) and out["view"].untyped_storage().nbytes() == 40


def test_a_tensor_and_its_transpose_share_one_storage(tmp_path: Path, write_rules: Callable[..., Path]) -> None:
    matrix = torch.randn(3, 5)
    src, dst = tmp_path / "src.pth", tmp_path / "out.pth"
    torch.save({"m": matrix, "t": matrix.t()}, src, _use_new_zipfile_serialization=False)
    convert(src, dst, write_rules)
    out = load(dst)
    assert same_storage(out["m"], out["t"]) and out["t"].stride() == (1, 5) and torch.equal(out["t"], matrix.t())


@pytest.mark.parametrize("zip_format", [True, False])
def test_non_contiguous_tensors_keep_their_values(
    tmp_path: Path, zip_format: bool, write_rules: Callable[..., Path]
) -> None:
    base = torch.randn(6, 8)
    state = {"transposed": base.t(), "strided": base[:, ::3]}  # expand()ed (overlapping) views are refused on read
    src, dst = tmp_path / "src.pth", tmp_path / "out.pth"
    torch.save(state, src, _use_new_zipfile_serialization=zip_format)
    convert(src, dst, write_rules)
    out = load(dst)
    for key, value in state.items():
        assert out[key].shape == value.shape and torch.equal(out[key], value), key


def test_zero_dim_and_empty_tensors_round_trip(tmp_path: Path, write_rules: Callable[..., Path]) -> None:
    state = {
        "scalar": torch.tensor(3.5),
        "steps": torch.tensor(7),
        "empty": torch.zeros(0, 4),
        "empty_bf16": torch.zeros(2, 0, dtype=torch.bfloat16),
        "flag": torch.tensor(True),
    }
    src, dst = tmp_path / "src.safetensors", tmp_path / "out.pth"
    save_file(state, str(src))
    convert(src, dst, write_rules)
    out = load(dst)
    for key, value in state.items():
        assert out[key].dtype == value.dtype and out[key].shape == value.shape and torch.equal(out[key], value), key


def test_metadata_is_kept_when_modules_are_not_renamed(tmp_path: Path, write_rules: Callable[..., Path]) -> None:
    state = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3)).state_dict()
    src, dst = tmp_path / "src.pth", tmp_path / "out.pth"
    torch.save(state, src)
    convert(src, dst, write_rules)
    out = load(dst)
    assert type(out) is OrderedDict and out._metadata == state._metadata
    assert type(out._metadata) is OrderedDict and out._metadata["1"]["version"] == 2


def test_metadata_is_dropped_with_a_note_when_modules_are_renamed(
    tmp_path: Path, write_rules: Callable[..., Path]
) -> None:
    state = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3)).state_dict()
    src, dst = tmp_path / "src.pth", tmp_path / "out.pth"
    torch.save(state, src)
    result = convert(src, dst, write_rules, RENAME)
    out = load(dst)
    assert not hasattr(out, "_metadata") and list(out) == [f"net.{k}" for k in state]
    assert any("_metadata" in note for note in result.notes)


def test_output_loads_with_weights_only_and_mmap(tmp_path: Path, write_rules: Callable[..., Path]) -> None:
    state = {"a": torch.randn(5, 7), "b": torch.arange(9, dtype=torch.int64), "c": torch.randn(3, dtype=torch.bfloat16)}
    src, dst = tmp_path / "src.safetensors", tmp_path / "out.pth"
    save_file(state, str(src))
    convert(src, dst, write_rules)
    out = load(dst, mmap=True)
    for key, value in state.items():
        assert torch.equal(out[key], value), key


def test_output_loads_when_torch_computes_storage_offsets_itself(
    tmp_path: Path, write_rules: Callable[..., Path]
) -> None:
    from torch.utils.serialization import config

    state = {f"t{i}": torch.randn(i + 1, 3) for i in range(5)} | {"empty": torch.zeros(0), "odd": torch.ones(3, 3, 3)}
    src, dst = tmp_path / "src.safetensors", tmp_path / "out.pth"
    save_file(state, str(src))
    convert(src, dst, write_rules)
    saved = config.load.calculate_storage_offsets
    config.load.calculate_storage_offsets = True
    try:
        out = load(dst, mmap=True)
    finally:
        config.load.calculate_storage_offsets = saved
    for key, value in state.items():
        assert torch.equal(out[key], value), key


def test_output_is_what_torch_save_writes_but_the_serialization_id(tmp_path: Path) -> None:
    state = randomized(torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))).state_dict()
    state["half"] = torch.randn(4, dtype=torch.float16)
    state["fp8"] = torch.zeros(3, dtype=torch.float8_e4m3fn)
    state["wide"] = torch.randn(300, 250)  # sizes and numel past one and two bytes
    source = MappingSource("<mem>", "memory", state)
    dst = tmp_path / "out.pth"
    write_torch(dst, plan_recipe(Recipe(name="x"), source).entries, source, state_metadata=state._metadata)
    expected = io.BytesIO()
    torch.save(state, expected)
    ours, theirs = dst.read_bytes(), expected.getvalue()
    ident = zipfile.ZipFile(dst).getinfo("archive/.data/serialization_id").header_offset
    assert len(ours) == len(theirs) and ours[:ident] == theirs[:ident]
    ours_infos, theirs_infos = zipfile.ZipFile(dst).infolist(), zipfile.ZipFile(expected).infolist()
    assert [(i.filename, i.header_offset, i.file_size) for i in ours_infos] == [
        (i.filename, i.header_offset, i.file_size) for i in theirs_infos
    ]


def test_sizes_and_offsets_past_32_bits_pickle_as_numbers() -> None:
    storage = PickledStorage("0", "float32", 3 * 2**31)
    tensor = PickledTensor(storage, 2**31 + 5, (3, 2**31 - 5), (2**31 - 5, 1))

    class Reader(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            if name == "OrderedDict":
                return OrderedDict
            return (lambda *args: args) if name.startswith("_rebuild_tensor") else f"{module}.{name}"

        def persistent_load(self, pid: Any) -> Any:
            return pid

    loaded = Reader(io.BytesIO(state_dict_pickle([("w", tensor)]))).load()
    assert loaded["w"][:4] == (
        ("storage", "torch.FloatStorage", "0", "cpu", 3 * 2**31),
        2**31 + 5,
        (3, 2**31 - 5),
        (2**31 - 5, 1),
    )


@pytest.mark.parametrize("recipe", [NO_CHANGE, "ckptx: 1\nsteps: [{cast: {dtype: bfloat16}}]\n"])
@pytest.mark.parametrize("kind", ["safetensors", "zip", "zip without crc32"])
def test_every_record_has_the_right_crc32(
    tmp_path: Path, kind: str, recipe: str, write_rules: Callable[..., Path]
) -> None:
    state = {"a": torch.randn(64, 33), "b": torch.arange(10, dtype=torch.int32), "c": torch.randn(300_000)}
    if kind == "safetensors":
        src = tmp_path / "src.safetensors"
        save_file(state, str(src))
    else:
        src = tmp_path / "src.pth"
        torch.serialization.set_crc32_options(kind == "zip")
        try:
            torch.save(state, src)
        finally:
            torch.serialization.set_crc32_options(True)
    dst = tmp_path / "out.pth"
    convert(src, dst, write_rules, recipe)
    with zipfile.ZipFile(dst) as archive:
        assert archive.testzip() is None
        assert len([n for n in archive.namelist() if "/data/" in n]) == 3


@pytest.mark.parametrize("offset, nbytes", [(3, 0), (3, 1000), (4099, 2 * 1024 * 1024 + 7), (5, WINDOW + 4096)])
def test_span_crc_is_zlibs_crc_of_the_bytes(tmp_path: Path, offset: int, nbytes: int) -> None:
    data = os.urandom(offset + nbytes + 11)
    path = tmp_path / "data.bin"
    path.write_bytes(data)
    assert span_crc(RawSpan(str(path), offset, nbytes)) == zlib.crc32(data[offset : offset + nbytes])


def test_zip64_form_loads_with_torch_and_zipfile(tmp_path: Path) -> None:
    state = {"a": torch.randn(4, 4), "b": torch.arange(5), "empty": torch.zeros(0)}
    source = MappingSource("<mem>", "memory", state)
    entries = plan_recipe(Recipe(name="x"), source).entries
    dst = tmp_path / "big.pth"
    writer = TorchWriter(dst, entries, OutputOptions())
    writer.force_zip64 = True
    writer.write(source)
    with zipfile.ZipFile(dst) as archive:
        assert archive.testzip() is None
        assert all(info.extra.startswith(b"\x01\x00") for info in archive.infolist())  # zip64 extra field
    for mmap in (False, True):
        out = load(dst, mmap=mmap)
        assert all(torch.equal(out[k], v) for k, v in state.items())


def test_ckptx_reads_its_output_without_torch(tmp_path: Path, write_rules: Callable[..., Path]) -> None:
    state = {"w": torch.randn(3, 4), "steps": torch.tensor(5), "flags": torch.tensor([True, False])}
    src, dst = tmp_path / "src.safetensors", tmp_path / "out.pth"
    save_file(state, str(src))
    convert(src, dst, write_rules)
    with open_source(dst) as source:
        assert isinstance(source, ZipSpanSource)
        for key, value in state.items():
            assert torch.equal(source.load(key), value), key


def test_safetensors_to_pth_through_the_cli(
    tmp_path: Path, run_cli: Callable[..., Any], write_rules: Callable[..., Path]
) -> None:
    state = {"layer.weight": torch.randn(8, 4), "layer.bias": torch.randn(8)}
    src, dst = tmp_path / "src.safetensors", tmp_path / "out.pth"
    save_file(state, str(src))
    result = run_cli("convert", src, "-r", write_rules(RENAME), "-o", dst)
    assert result.code == 0, result.err
    out = load(dst)
    assert set(out) == {"net.layer.weight", "net.layer.bias"}
    assert all(torch.equal(out[f"net.{k}"], v) for k, v in state.items())


def test_pth_to_pth_through_the_cli(
    tmp_path: Path,
    run_cli: Callable[..., Any],
    ddp_checkpoint: Path,
    tiny_state: dict[str, torch.Tensor],
    write_rules: Callable[..., Path],
) -> None:
    dst = tmp_path / "out.pth"
    rules = write_rules("ckptx: 1\nextract: model\nsteps: [{strip_prefix: module.}]\n")
    result = run_cli("convert", ddp_checkpoint, "-r", rules, "-o", dst)
    assert result.code == 0, result.err
    out = load(dst)
    assert list(out) == list(tiny_state) and all(torch.equal(out[k], v) for k, v in tiny_state.items())


def test_copying_tensors_to_pth_does_not_import_torch(tmp_path: Path, write_rules: Callable[..., Path]) -> None:
    src, dst = tmp_path / "src.safetensors", tmp_path / "out.pth"
    save_file({"a": torch.randn(4, 4), "b": torch.zeros(3, dtype=torch.int64)}, str(src))
    script = textwrap.dedent(f"""
        import sys, ckptx
        ckptx.convert({str(src)!r}, {str(dst)!r}, {str(write_rules(RENAME))!r})
        print("torch" in sys.modules)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"
    assert set(load(dst)) == {"net.a", "net.b"}


def test_process_killed_mid_write_leaves_no_destination(tmp_path: Path, write_rules: Callable[..., Path]) -> None:
    src, dst = tmp_path / "big.safetensors", tmp_path / "out.pth"
    save_file({f"t{i}": torch.full((256, 1024), float(i)) for i in range(16)}, str(src))
    script = textwrap.dedent(f"""
        import os, signal, ckptx
        def progress(done, total):
            if done > total // 3:
                os.kill(os.getpid(), signal.SIGKILL)
        ckptx.convert({str(src)!r}, {str(dst)!r}, {str(write_rules(NO_CHANGE))!r}, progress=progress)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, env=subprocess_env())
    assert proc.returncode == -9
    assert not dst.exists()
    assert [p.name for p in tmp_path.glob(".out.pth.*.ckptx-partial")]  # it was killed while writing
