"""Hostile and malformed pickle/torch/shard inputs end in one SourceError line naming the file and the place."""

from __future__ import annotations

import io
import json
import os
import pickle
import resource
import zipfile
from pathlib import Path

import pytest
import torch

from ckptx.errors import CkptxError, SourceError, UnsupportedDtype
from ckptx.io.read.open import open_source


def _one_line(exc: BaseException, path: Path) -> str:
    message = str(exc)
    assert message.startswith(f"{path}") and "\n" not in message, message
    return message


def _save(path: Path, obj: object, *, zip_format: bool = True) -> Path:
    torch.save(obj, path, _use_new_zipfile_serialization=zip_format)
    return path


@pytest.mark.parametrize(
    "key", [1, b"w", ("a", "b"), True, 10**5000], ids=["int", "bytes", "tuple", "bool", "huge-int"]
)
@pytest.mark.parametrize("zip_format", [True, False])
def test_non_string_keys_are_refused_by_name(tmp_path: Path, key: object, zip_format: bool) -> None:
    path = _save(tmp_path / "keys.pth", {"w": torch.ones(1), key: torch.ones(1)}, zip_format=zip_format)
    with pytest.raises(SourceError) as caught:
        open_source(path)
    message = _one_line(caught.value, path)
    if "the safe loader refused the file (Unsupported operand 139)" in message:  # LONG4: torch's own refusal
        return
    assert "the state dict has the key " in message and f"of type {type(key).__name__}" in message
    assert "ckptx needs string keys" in message


def test_deeply_nested_tuple_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "nested.pth"
    body = b"\x80\x02}" + b"X\x01\x00\x00\x00x" + b"\x85" * 5000 + b"K\x01s."  # {(((..'x'..),): 1}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("nested/data.pkl", body)
        archive.writestr("nested/byteorder", "little")
    path.write_bytes(buffer.getvalue())
    with pytest.raises(SourceError) as caught:
        open_source(path)
    _one_line(caught.value, path)


def test_tensor_named_metadata_is_refused(tmp_path: Path) -> None:
    path = _save(tmp_path / "meta.pth", {"__metadata__": torch.ones(1), "w": torch.ones(1)})
    with pytest.raises(SourceError, match="a tensor named '__metadata__', a name safetensors reserves"):
        open_source(path)


def test_expanded_view_is_refused_by_key(tmp_path: Path) -> None:
    """1 KiB on disk, 1 GiB once converted: a stride-0 view must not be written out element by element."""
    path = _save(tmp_path / "bomb.pth", {"w": torch.zeros(1).expand(2**28)})
    assert path.stat().st_size < 2000
    with pytest.raises(SourceError) as caught:
        open_source(path)
    assert _one_line(caught.value, path) == (
        f"{path}: tensor 'w' is a view whose 268,435,456 elements overlap in 1 stored ones (stride 0 or overlapping "
        "strides); converting would write every copy: save t.contiguous() instead if you mean it"
    )


def test_broadcast_free_views_still_load(tmp_path: Path) -> None:
    base = torch.arange(12.0)
    path = _save(
        tmp_path / "views.pth",
        {"row": base.view(3, 4)[1], "t": base.view(3, 4).t(), "pos": torch.arange(5).expand(1, -1)},
    )
    with open_source(path) as source:
        assert torch.equal(source.load("t"), base.view(3, 4).t())


def _zip_with_pickle(
    path: Path, pickled: bytes, storages: dict[str, bytes], compress: int = zipfile.ZIP_STORED
) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickled, compress_type=compress)
        archive.writestr("archive/byteorder", "little")
        for key, data in storages.items():
            archive.writestr(f"archive/data/{key}", data)
    return path


def _int(n: int) -> bytes:
    """One integer as pickle opcodes (BININT, LONG1 or LONG4 for huge ones)."""
    return pickle.dumps(n, protocol=2)[2:-1]


def _tuple(items: tuple) -> bytes:
    return b"(" + b"".join(_int(i) for i in items) + b"t"


def _tensor_pickle(size: tuple, stride: tuple, offset: int = 0, numel: int = 4) -> bytes:
    """data.pkl of {'w': _rebuild_tensor_v2(FloatStorage '0', offset, size, stride)}, written opcode by opcode
    as torch.save writes it (so any size, stride and offset can be put in)."""
    storage = (
        b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpu" + _int(numel) + b"tQ"
    )
    args = b"(" + storage + _int(offset) + _tuple(size) + _tuple(stride) + b"\x89ccollections\nOrderedDict\n)Rt"
    return b"\x80\x02}X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n" + args + b"Rs."


@pytest.mark.parametrize(
    ("size", "stride", "offset", "problem"),
    [
        ((1, -1), (1, 1), 0, "negative, out of range or mismatched"),
        ((2**70,), (1,), 0, "negative, out of range or mismatched"),
        ((10**5000,), (1,), 0, "negative, out of range or mismatched"),  # a 5000-digit LONG4
        ((8,), (1,), 0, "reaches byte 32 of its storage record data/0, which has 16"),
        ((2,), (1,), 3, "reaches byte 20 of its storage record data/0, which has 16"),
    ],
    ids=["negative", "2^70", "long4-5000-digits", "past-the-end", "offset-past-the-end"],
)
def test_tensor_refs_outside_their_storage_are_refused_by_key(
    tmp_path: Path, size: tuple, stride: tuple, offset: int, problem: str
) -> None:
    path = _zip_with_pickle(tmp_path / "refs.pth", _tensor_pickle(size, stride, offset), {"0": bytes(16)})
    with pytest.raises(SourceError) as caught:
        open_source(path)
    message = _one_line(caught.value, path)
    assert message.startswith(f"{path}: tensor 'w' ") and problem in message


def test_pickle_with_a_zip_appended_is_read_as_the_pickle_torch_reads(tmp_path: Path) -> None:
    legacy = _save(tmp_path / "legacy.pth", {"real": torch.ones(2)}, zip_format=False)
    decoy = _save(tmp_path / "decoy.pth", {"decoy": torch.zeros(3)})
    path = tmp_path / "glued.pth"
    path.write_bytes(legacy.read_bytes() + decoy.read_bytes())
    assert zipfile.is_zipfile(path)  # what the old reader went by
    try:
        source = open_source(path)
    except SourceError as exc:
        _one_line(exc, path)
        return
    with source:
        assert list(source.tensors) == ["real"] and source.format == "torch-legacy"


def test_zip_with_data_before_it_is_refused(tmp_path: Path) -> None:
    decoy = _save(tmp_path / "decoy.pth", {"w": torch.zeros(3)})
    path = tmp_path / "prefixed.pth"
    path.write_bytes(b"PK\x03\x04" + bytes(60) + decoy.read_bytes())
    with pytest.raises(SourceError, match="the zip directory does not start at byte 0|not a readable torch"):
        open_source(path)


def test_torch_zip_named_safetensors_is_never_unpickled(tmp_path: Path) -> None:
    path = _save(tmp_path / "model.safetensors", {"w": torch.ones(1)})
    with pytest.raises(SourceError) as caught:
        open_source(path)
    assert _one_line(caught.value, path) == (
        f"{path}: named .safetensors but holds a zip archive (a torch checkpoint, which holds a pickle); ckptx reads "
        "a .safetensors file only as safetensors: if you trust it, rename it to .pth and convert that"
    )


def test_decompression_bomb_is_refused_before_inflating(tmp_path: Path) -> None:
    """A deflated data.pkl of ~1.5 MB that inflates to 1.5 GB: refused from the zip directory, RSS stays flat."""
    path = tmp_path / "bomb.pth"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        with archive.open("bomb/data.pkl", "w", force_zip64=True) as member:
            chunk = bytes(64 << 20)
            for _ in range(24):
                member.write(chunk)
        archive.writestr("bomb/byteorder", "little")
    assert path.stat().st_size < 3 << 20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(SourceError) as caught:
        open_source(path)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert "would inflate" in _one_line(caught.value, path) and "decompression bomb" in str(caught.value)
    assert grown_mib < 100


def test_legacy_storage_list_naming_an_unknown_storage(tmp_path: Path) -> None:
    path = _save(tmp_path / "legacy.pth", {"w": torch.ones(2)}, zip_format=False)
    data = path.read_bytes()
    # The storage-key list after the object pickle (`]q\x00X<len><key>q\x01a.`) names the storage by its key;
    # change the key's last digit so that the list names a storage the pickle never mentioned.
    at = data.rindex(b"q\x01a.") - 1
    path.write_bytes(data[:at] + bytes([ord("0") + (data[at] - ord("0") + 1) % 10]) + data[at + 1 :])
    with pytest.raises(SourceError) as caught:
        open_source(path)
    assert "not a readable torch checkpoint" in _one_line(caught.value, path)


@pytest.mark.parametrize("layout", ["self", "pair"])
def test_shard_index_naming_an_index_is_refused(tmp_path: Path, layout: str) -> None:
    index = tmp_path / "model.safetensors.index.json"
    other = tmp_path / "other.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"w": index.name if layout == "self" else other.name}}))
    other.write_text(json.dumps({"weight_map": {"w": index.name}}))
    with pytest.raises(SourceError) as caught:
        open_source(index)
    assert "is itself an index; an index lists weight files only" in _one_line(caught.value, index)


def test_shard_index_with_huge_numbers_or_deep_nesting(tmp_path: Path) -> None:
    index = tmp_path / "model.safetensors.index.json"
    index.write_text('{"metadata": {"total_size": ' + "9" * 5000 + '}, "weight_map": {}}')
    with pytest.raises(SourceError, match="a number out of range"):
        open_source(index)
    index.write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(SourceError, match="nests too deeply|not a valid shard index"):
        open_source(index)


@pytest.mark.parametrize("make", ["fifo", "chardev"])
def test_non_regular_files_are_refused_up_front(tmp_path: Path, make: str) -> None:
    if make == "fifo":
        path = tmp_path / "pipe.pth"
        os.mkfifo(path)
        kind = "a named pipe"
    else:
        path, kind = Path("/dev/zero"), "a character device"
    with pytest.raises(SourceError) as caught:
        open_source(path)
    assert str(caught.value) == (
        f"{path}: is {kind}, not a regular file; ckptx reads checkpoints from files only: copy the data to a file first"
    )


def test_fifo_shard_is_refused(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "model-1.safetensors")
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"w": "model-1.safetensors"}}))
    with pytest.raises(SourceError, match="is a named pipe, not a regular file"):
        open_source(index)


def _unconvertible() -> dict[str, tuple[object, str]]:
    dense = torch.randn(2, 2)
    cases: dict[str, tuple[object, str]] = {
        "sparse COO": (dense.to_sparse(), "a sparse tensor (sparse_coo); save t.to_dense() instead"),
        "sparse CSR": (dense.to_sparse_csr(), "a sparse tensor (sparse_csr); save t.to_dense() instead"),
        "qint8": (torch.quantize_per_tensor(dense, 0.1, 0, torch.qint8), "a quantized tensor (qint8)"),
        "meta": (torch.empty(2, device="meta"), "a meta tensor (a shape without data)"),
        "conj": (torch.randn(2, dtype=torch.complex64).conj(), "a conjugate view; save t.resolve_conj() instead"),
        "qint32": (torch.quantize_per_tensor(dense, 0.1, 0, torch.qint32), "a quantized tensor (qint32)"),
    }
    return cases


@pytest.mark.parametrize("name", list(_unconvertible()))
def test_tensors_ckptx_cannot_convert_are_refused_by_name(tmp_path: Path, name: str) -> None:
    tensor, problem = _unconvertible()[name]
    path = tmp_path / "odd.pth"
    try:
        torch.save({"odd": tensor}, path)
    except (RuntimeError, NotImplementedError, TypeError) as exc:  # torch cannot save it: nothing to read
        pytest.skip(f"torch cannot save {name}: {exc}")
    try:
        source = open_source(path, unsafe_pickle=name == "meta")
    except SourceError as exc:
        message = _one_line(exc, path)
        assert (
            message.startswith(f"{path}: tensor 'odd' is ")
            and problem in message
            or "the safe loader refused" in message
        ), message
        return
    pytest.fail(f"{name} was accepted: {source.tensors}")


def test_complex32_to_safetensors_is_refused_by_key(tmp_path: Path, run_cli) -> None:
    src = _save(tmp_path / "c32.pth", {"z": torch.zeros(2, dtype=torch.complex32)})
    result = run_cli("convert", src, "-o", tmp_path / "out.safetensors", "-r", "common/strip-module-prefix")
    assert result.code == 2 and not (tmp_path / "out.safetensors").exists()
    assert result.err == (
        "ckptx: error: tensor 'z' has dtype complex32, which safetensors cannot hold; write a "
        ".pth file instead, or add a `cast` step\n"
    )
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".ckptx-partial")]


def test_unsupported_dtype_is_a_ckptx_error() -> None:
    assert issubclass(UnsupportedDtype, CkptxError)


def test_legacy_struct_error_is_a_source_error(tmp_path: Path) -> None:
    path = _save(tmp_path / "legacy.pth", {"w": torch.ones(4)}, zip_format=False)
    data = bytearray(path.read_bytes())
    path.write_bytes(bytes(data[:-3]))  # the storage's raw bytes end early
    with pytest.raises(SourceError) as caught:
        open_source(path)
    _one_line(caught.value, path)
