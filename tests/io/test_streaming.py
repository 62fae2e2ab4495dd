"""Streaming writes: outputs equal the eager conversion tensor for tensor; unchanged tensors are never loaded;
progress moves during long copies; planning never reads tensor data."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import ckptx
from ckptx import plan as plan_recipe
from ckptx.check.validation import validate
from ckptx.cli import main
from ckptx.conversion.in_memory import apply
from ckptx.dtypes import TensorMeta
from ckptx.errors import SourceError
from ckptx.io import spans
from ckptx.io.read.open import open_source
from ckptx.io.read.safetensors_reader import SafetensorsSource
from ckptx.io.spans import copy_span, read_exact, read_span
from ckptx.io.write.safetensors_writer import write_safetensors
from ckptx.planning.source import RawSpan
from tests.conftest import subprocess_env
from tests.io.test_torch_zip_spans import special_state

RECIPE = r"""ckptx: 1
steps:
  - rename: [['^(.*)$', 'net.\1']]
  - cast: {match: '^net\.(half|weight|view)$', dtype: float16}
"""


def write_source(tmp_path: Path, kind: str, state: dict[str, torch.Tensor]) -> Path:
    """`state` as a torch zip, legacy torch or safetensors file (safetensors gets contiguous, unshared copies)."""
    if kind == "safetensors":
        path = tmp_path / "src.safetensors"
        save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(path))
    else:
        path = tmp_path / "src.pth"
        torch.save(state, path, _use_new_zipfile_serialization=kind == "zip")
    return path


def assert_same_tensors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(actual) == list(expected) or set(actual) == set(expected)
    for key, value in expected.items():
        got = actual[key]
        assert got.dtype == value.dtype and got.shape == value.shape, key
        assert torch.equal(got, value.detach()), key


@pytest.mark.parametrize("kind", ["zip", "legacy", "safetensors"])
def test_streamed_output_equals_the_eager_conversion(
    tmp_path: Path, kind: str, write_rules: Callable[..., Path]
) -> None:
    state = special_state()
    src, dst = write_source(tmp_path, kind, state), tmp_path / "out.safetensors"
    rules = write_rules(RECIPE)
    ckptx.convert(src, dst, rules)
    expected = apply(ckptx.load_rules(str(rules)), state)
    assert expected["net.weight"].dtype == torch.float16 and expected["net.tied"].dtype == torch.float32
    assert_same_tensors(load_file(str(dst)), expected)


def test_sharded_output_equals_the_eager_conversion(tmp_path: Path, write_rules: Callable[..., Path]) -> None:
    state = special_state()
    src = write_source(tmp_path, "zip", state)
    rules = write_rules(RECIPE)
    ckptx.convert(src, tmp_path / "model.safetensors", rules, max_shard_size=64)
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(tmp_path.glob("model-*-of-*.safetensors")):
        out.update(load_file(str(shard)))
    assert_same_tensors(out, apply(ckptx.load_rules(str(rules)), state))


@pytest.mark.parametrize("kind", ["zip", "safetensors"])
def test_only_changed_tensors_are_loaded(tmp_path: Path, kind: str, write_rules: Callable[..., Path]) -> None:
    state = special_state()
    src = write_source(tmp_path, kind, state)
    recipe = ckptx.load_rules(str(write_rules(RECIPE + "  - scale: {match: '^net\\.(half|weight|view)$', by: 2}\n")))
    loaded: list[str] = []
    with open_source(src) as source:
        real_load = source.load
        source.load = lambda key: loaded.append(key) or real_load(key)  # type: ignore[method-assign]
        plan = plan_recipe(recipe, source)
        write_safetensors(tmp_path / "out.safetensors", plan.entries, source, {})
    changed = {"half", "weight", "view"}  # scaled: computed with torch (a cast alone would be streamed)
    # zip: non-contiguous tensors are computed too (their bytes are not one run in the file); an empty tensor has no
    # bytes to write, so it is never loaded
    assert set(loaded) == (changed | {"transposed", "strided"} if kind == "zip" else changed)


def test_adjacent_spans_are_copied_as_one_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rename copies the tensors of a safetensors file one after another: one copy_file_range call, not one per
    tensor."""
    calls: list[int] = []
    real = os.copy_file_range

    def counting(src_fd: int, dst_fd: int, count: int, *rest: object) -> int:
        calls.append(count)
        return real(src_fd, dst_fd, count, *rest)

    state = {f"t{i}": torch.full((64, 64), float(i)) for i in range(16)}
    src = tmp_path / "src.safetensors"
    save_file(state, str(src))
    monkeypatch.setattr(os, "copy_file_range", counting)
    ckptx.convert(src, tmp_path / "out.safetensors", ckptx.Recipe(name="copy"))
    assert len(calls) <= 3 and sum(calls) == 16 * 64 * 64 * 4  # a head to a block, one to a folio, the rest
    assert all(torch.equal(v, state[k]) for k, v in load_file(str(tmp_path / "out.safetensors")).items())


def test_copy_without_copy_file_range(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(os, "copy_file_range", raising=False)
    src = tmp_path / "bytes.bin"
    src.write_bytes(os.urandom(5000))
    out_path = tmp_path / "out.bin"
    out_path.write_bytes(b"-" * 4010)
    src_fd, out_fd = os.open(src, os.O_RDONLY), os.open(out_path, os.O_WRONLY)
    try:
        copy_span(src_fd, out_fd, RawSpan(str(src), 10, 4000), 10)
    finally:
        os.close(src_fd)
        os.close(out_fd)
    assert out_path.read_bytes() == b"-" * 10 + src.read_bytes()[10:4010]


def test_source_shorter_than_a_span_is_a_one_line_error(tmp_path: Path) -> None:
    src = tmp_path / "short.bin"
    src.write_bytes(b"x" * 10)
    src_fd, out_fd = os.open(src, os.O_RDONLY), os.open(tmp_path / "out.bin", os.O_WRONLY | os.O_CREAT)
    try:
        with pytest.raises(SourceError, match=r"short.bin: ended at byte 10 while reading a tensor of 100 bytes"):
            copy_span(src_fd, out_fd, RawSpan(str(src), 0, 100), 0)
        with pytest.raises(SourceError, match=r"short.bin: ended at byte 10 while reading a tensor of 100 bytes"):
            read_exact(src_fd, RawSpan(str(src), 0, 100))
    finally:
        os.close(src_fd)
        os.close(out_fd)
    with pytest.raises(SourceError, match=r"short.bin: ended at byte 10 while reading a tensor of 100 bytes"):
        read_span(RawSpan(str(src), 0, 100), TensorMeta((25,), "float32"))


def test_progress_moves_during_one_long_raw_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, write_rules: Callable[..., Path]
) -> None:
    monkeypatch.setattr(spans, "CHUNK", 4096)
    src = tmp_path / "big.safetensors"
    save_file({"a": torch.randn(64, 1024), "b": torch.randn(16)}, str(src))
    calls: list[tuple[int, int]] = []
    ckptx.convert(
        src, tmp_path / "out.safetensors", write_rules("ckptx: 1\n"), progress=lambda d, t: calls.append((d, t))
    )
    total = (64 * 1024 + 16) * 4
    assert len(calls) >= 64 and calls[-1] == (total, total)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_cli_shows_rate_and_eta_on_a_terminal_only(tmp_path: Path, write_rules: Callable[..., Path]) -> None:
    src = tmp_path / "src.safetensors"
    save_file({"a": torch.randn(256, 256)}, str(src))
    rules = write_rules("ckptx: 1\n")
    err = _Tty()
    assert (
        main(
            ["convert", str(src), "-r", str(rules), "-o", str(tmp_path / "a.safetensors")],
            stdout=io.StringIO(),
            stderr=err,
        )
        == 0
    )
    assert "/s" in err.getvalue() and "ETA" in err.getvalue()
    quiet = _Tty()
    assert (
        main(
            ["convert", str(src), "-r", str(rules), "-o", str(tmp_path / "b.safetensors"), "--json"],
            stdout=io.StringIO(),
            stderr=quiet,
        )
        == 0
    )
    assert quiet.getvalue() == ""


def test_plan_never_reads_tensor_data(tmp_path: Path, write_rules: Callable[..., Path]) -> None:
    """A file whose data section is garbage still plans and validates: only the header was read."""
    path = tmp_path / "garbage.safetensors"
    save_file({"w": torch.randn(8, 8), "b": torch.randn(8)}, str(path))
    header_end = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    with open(path, "r+b") as f:
        f.seek(header_end)
        f.write(os.urandom(path.stat().st_size - header_end))

    class NoData(SafetensorsSource):
        def load(self, key: str) -> torch.Tensor:
            raise AssertionError(f"planning read tensor data of {key}")

        def raw_span(self, key: str) -> RawSpan:
            raise AssertionError(f"planning asked where the bytes of {key} are")

    recipe = ckptx.load_rules(str(write_rules(RECIPE.replace("view", "w"))))
    plan = plan_recipe(recipe, NoData(path))
    assert {e.key: str(e.meta) for e in plan.entries} == {"net.w": "float16[8, 8]", "net.b": "float32[8]"}
    assert validate(plan, {"net.w": torch.empty(8, 8, dtype=torch.float16), "net.b": torch.empty(8)}).ok
    result = ckptx.convert(
        path, None, recipe, dry_run=True, target={"net.w": torch.empty(8, 8), "net.b": torch.empty(8)}
    )
    assert result.report.ok and not result.written


_IMPORTS_AFTER_CONVERT = """
import sys
from ckptx.cli import main
code = main(sys.argv[1:])
print(code, 'torch' in sys.modules)
"""


@pytest.mark.parametrize("cast", [False, True])
@pytest.mark.parametrize(("kind", "imports_torch"), [("safetensors", False), ("zip", False), ("legacy", True)])
def test_copy_and_float_cast_never_import_torch(
    tmp_path: Path, kind: str, imports_torch: bool, cast: bool, write_rules: Callable[..., Path]
) -> None:
    """Copying safetensors and torch zip files, and casting floats, pay no torch start-up; a legacy pickle
    (torch.load) does."""
    state = {"module.w": torch.randn(4, 4), "module.b": torch.randn(4)}
    src = write_source(tmp_path, kind, state)
    dst = tmp_path / "out.safetensors"
    rules = (
        write_rules("""
        ckptx: 1
        extends: common/strip-module-prefix
        steps:
          - cast: {dtype: bfloat16}
    """)
        if cast
        else "common/strip-module-prefix"
    )
    argv = ["convert", str(src), "-o", str(dst), "-r", str(rules)]
    done = subprocess.run(
        [sys.executable, "-c", _IMPORTS_AFTER_CONVERT, *argv],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.split()[-2:] == ["0", str(imports_torch)]
    out = load_file(str(dst))
    for key, value in state.items():
        assert torch.equal(out[key.removeprefix("module.")], value.to(torch.bfloat16) if cast else value)


def test_a_safetensors_conversion_imports_no_reader_or_writer_of_other_formats(tmp_path: Path) -> None:
    """Start-up: the torch file, DCP and ZeRO readers, the .pth writer, reverse and verify are imported only
    by the runs that use them (100 ms of `import ckptx.cli`), jsonschema only when a rule file is read (53 ms)."""
    src = write_source(tmp_path, "safetensors", {"w": torch.randn(2)})
    code = (
        "import sys\nfrom ckptx.cli import main\n"
        f"assert main(['convert', {str(src)!r}, '-o', {str(tmp_path / 'o.safetensors')!r}]) == 0\n"
        "print('loaded:', ' '.join(sorted(m for m in sys.modules if m.startswith(('ckptx', 'jsonschema')))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True, check=True
    )
    loaded = set(done.stdout.split("loaded:")[-1].split())
    unused = {
        "ckptx.io.read.torch_reader",
        "ckptx.io.read.torch_zip",
        "ckptx.io.read.dcp_reader",
        "ckptx.io.read.zero_reader",
        "ckptx.io.write.torch_writer",
        "ckptx.conversion.reverse",
        "ckptx.check.numerical",
        "jsonschema",
    }
    assert "ckptx.io.write.safetensors_writer" in loaded and not loaded & unused, sorted(loaded & unused)


def test_a_regex_rename_of_safetensors_imports_neither_torch_nor_numpy(
    tmp_path: Path, write_rules: Callable[..., Path]
) -> None:
    """The rename-only path is ckptx's own start-up and the copy: no 0.1 s numpy or 0.3-3 s torch import."""
    state = {f"model.layers.{i}.w": torch.randn(2) for i in range(3)}
    src = write_source(tmp_path, "safetensors", state)
    dst = tmp_path / "out.safetensors"
    rules = write_rules(r"""
        ckptx: 1
        steps:
          - rename: [['^model\.layers\.(\d+)\.', 'blocks.{\1 + 1}.']]
          - drop: ['\.2\.w$']
    """)
    code = _IMPORTS_AFTER_CONVERT.replace("'torch' in sys.modules", "'torch' in sys.modules, 'numpy' in sys.modules")
    done = subprocess.run(
        [sys.executable, "-c", code, "convert", str(src), "-o", str(dst), "-r", str(rules)],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.split()[-3:] == ["0", "False", "False"]
    assert sorted(load_file(str(dst))) == ["blocks.1.w", "blocks.3.w"]
