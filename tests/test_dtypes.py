"""The one dtype table agrees with torch, safetensors, torch.save and the rule schema."""

from __future__ import annotations

import json

import pytest
import safetensors
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ckptx._data import schema_path
from ckptx.dtypes import DTYPES, lookup, lossless_casts, safetensors_code
from ckptx.errors import UnsupportedDtype
from ckptx.io.read.open import open_source

IN_THIS_TORCH = [n for n in DTYPES if hasattr(torch, n)]
NEWER_THAN_THE_FLOOR = {"bcomplex32"}  # in the table, not yet in torch 2.13 (the floor make test runs)


def test_only_dtypes_newer_than_the_floor_are_missing_from_this_torch():
    assert set(DTYPES) - set(IN_THIS_TORCH) <= NEWER_THAN_THE_FLOOR


def _sample(name: str) -> torch.Tensor:
    """A small tensor of dtype `name` with varied bits (every bit pattern for 1-byte dtypes)."""
    dtype = DTYPES[name].torch
    if DTYPES[name].kind == "bits" or name == "bcomplex32":
        return torch.randint(0, 256, (16 * DTYPES[name].itemsize,), dtype=torch.uint8).view(dtype)
    if DTYPES[name].itemsize == 1 and name != "bool":
        return torch.arange(256, dtype=torch.uint8).view(dtype)
    if name == "bool":
        return torch.tensor([True, False, True])
    if DTYPES[name].is_complex:
        return torch.randn(8, dtype=torch.complex128).to(dtype)
    if DTYPES[name].is_floating:
        return (torch.randn(64, dtype=torch.float64) * 1000).to(dtype)
    info = torch.iinfo(dtype)
    return torch.tensor([info.min, -1 if info.min < 0 else 0, 0, 1, info.max], dtype=dtype)


def test_schema_dtype_enum_is_the_table():
    schema = json.loads(schema_path("ckptx-rules.schema.json").read_text())
    assert schema["$defs"]["dtype"]["enum"] == [n for n, d in DTYPES.items() if d.castable]


@pytest.mark.parametrize("name", IN_THIS_TORCH)
def test_table_itemsize_is_torchs(name):
    assert torch.empty(0, dtype=DTYPES[name].torch).element_size() == DTYPES[name].itemsize


ALL_CODES_SINCE = (0, 8)  # the first safetensors release whose torch binding knows every code of the table


@pytest.mark.parametrize("name", [n for n, d in DTYPES.items() if d.safetensors])
def test_safetensors_code_is_the_librarys(tmp_path, name):
    """Where the installed library holds the dtype, it writes the table's code and ckptx reads it back; older
    releases (the floor, 0.4) lack some codes, and only those releases may."""
    path = tmp_path / "t.safetensors"
    try:
        save_file({"t": _sample(name)}, path)
    except (KeyError, ValueError, TypeError):
        assert tuple(int(x) for x in safetensors.__version__.split(".")[:2]) < ALL_CODES_SINCE, name
        return
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8 : 8 + header_len])
    assert header["t"]["dtype"] == DTYPES[name].safetensors
    with safe_open(path, "pt") as f:
        assert f.get_tensor("t").dtype == DTYPES[name].torch
    with open_source(path) as source:
        assert source.tensors["t"].dtype == name


@pytest.mark.parametrize("name", IN_THIS_TORCH)
def test_torch_save_round_trip_reads_the_tables_dtype(tmp_path, name):
    """torch.save names a storage class or an UntypedStorage plus dtype; ckptx's zip reader maps both back."""
    path = tmp_path / "t.pth"
    tensor = _sample(name)
    torch.save({"t": tensor}, path)
    with open_source(path) as source:
        assert source.tensors["t"].dtype == name
        assert torch.equal(source.load("t").view(torch.uint8), tensor.view(torch.uint8))


def test_unknown_dtype_is_refused_by_name():
    with pytest.raises(UnsupportedDtype, match=r"tensor 'w' has dtype qint8, which ckptx cannot convert"):
        lookup("qint8", key="w")


def test_dtype_safetensors_cannot_hold_names_key_and_format():
    with pytest.raises(UnsupportedDtype, match=r"tensor 'z' has dtype complex128, which safetensors cannot hold"):
        safetensors_code("complex128", key="z")


@pytest.mark.parametrize("name", IN_THIS_TORCH)
def test_lossless_casts_round_trip_every_value(name):
    """Each cast the table calls lossless (the invert rules rely on it) gives back every value exactly."""
    tensor = _sample(name)
    for wide in sorted(lossless_casts(name)):
        back = tensor.to(DTYPES[wide].torch).to(tensor.dtype)
        same = back == tensor
        if DTYPES[name].is_floating or DTYPES[name].is_complex:
            same |= torch.isnan(tensor) & torch.isnan(back)
        assert bool(same.all()), f"{name} -> {wide} -> {name} changed values"


def test_lossy_casts_are_not_called_lossless():
    assert "float16" not in lossless_casts("bfloat16") and "bfloat16" not in lossless_casts("float16")
    assert "int8" not in lossless_casts("uint8") and "float16" not in lossless_casts("int16")
