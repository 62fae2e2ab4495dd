"""Pickles nested deep enough to overflow the C stack while they load (a dict key that is a tuple nested
200,000 deep: CPython hashes it recursively) end in one error line or a plain reading, never a crash, in every
reader: a torch zip file, a legacy torch file. The multi-file readers are covered in test_hostile_multi.py."""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path

import pytest

from tests.conftest import subprocess_env
from tests.helpers.hostile import Guard, deep_tuple_key, run_ckptx, write_secret

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _zip(path: Path, body: bytes) -> Path:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", body)
        archive.writestr("archive/byteorder", "little")
    path.write_bytes(buffer.getvalue())
    return path


def _legacy(path: Path, body: bytes) -> Path:
    info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}
    head = b"".join(pickle.dumps(v, protocol=2) for v in (_LEGACY_MAGIC, 1001, info))
    path.write_bytes(head + body + pickle.dumps([], protocol=2))
    return path


@pytest.mark.parametrize("depth", [200_000, 3_000_000], ids=["200k", "3M"])
@pytest.mark.parametrize("write", [_zip, _legacy], ids=["zip", "legacy"])
def test_a_deeply_nested_tuple_key_is_one_error_line(tmp_path: Path, depth: int, write) -> None:
    src = write(tmp_path / "deep.pth", b"\x80\x02" + deep_tuple_key(depth) + b".")
    guard = Guard([src, write_secret(tmp_path)], tmp_path / "marker")
    outcome = run_ckptx(["inspect", src], cwd=tmp_path, env=subprocess_env(), timeout=120)
    guard.check(outcome, codes=(2,))
    if depth > 1_000_000:  # measured: refused when the walk passes 100,000 levels
        assert "its pickle nests tuples more than 100,000 deep" in outcome.err
