"""torch.distributed.checkpoint folders as a source, checked against torch's own `dcp_to_torch_save`.

The folders are real: 2 gloo processes save DTensors (Shard(0), Shard(1), Replicate(), uneven and empty
shards), plain and strided tensors, bf16/int/bool tensors and pickled values (`tests/helpers/dcp_checkpoints.py`),
once per session.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import ckptx
from ckptx.errors import ForeignGlobal, SourceError, UnsafeGlobalError
from ckptx.io.read.open import open_source
from tests.conftest import shared_bytes, subprocess_env
from tests.helpers.dcp_checkpoints import full_state, plain

BIG_MIB = 48  # the `big` folder: 12 Shard(0) float32 matrices of 4 MiB, 24 MiB per rank file


@pytest.fixture(scope="session")
def dcp_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every layout of tests/helpers/dcp_checkpoints.py, written once by 2 gloo processes."""
    root = tmp_path_factory.mktemp("dcp")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.helpers.dcp_checkpoints",
            str(root / "ckpt"),
            "--big-mib",
            str(BIG_MIB),
            "--marker",
            str(root / "MARKER"),
        ],
        check=True,
        env=subprocess_env(),
        timeout=600,
    )
    return root / "ckpt"


@pytest.fixture(scope="session")
def reference(dcp_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], dict[str, Any]]:
    """What `dcp_to_torch_save` makes of a layout (cached)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out, cache = tmp_path_factory.mktemp("dcp-ref"), {}

    def get(layout: str) -> dict[str, Any]:
        if layout not in cache:
            dcp_to_torch_save(dcp_root / layout, out / f"{layout}.pt")
            cache[layout] = torch.load(out / f"{layout}.pt", weights_only=False)
        return cache[layout]

    return get


@pytest.fixture
def copy_of(dcp_root: Path, tmp_path: Path) -> Callable[[str], Path]:
    """A private copy of a layout, to damage."""

    def copy(layout: str) -> Path:
        return Path(shutil.copytree(dcp_root / layout, tmp_path / layout))

    return copy


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def _bytes(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _span_bytes(spans: Any) -> bytes:
    return b"".join(Path(s.file).read_bytes()[s.offset : s.offset + s.nbytes] for s in spans)


def _edit_metadata(folder: Path, change: Callable[[Any], None]) -> None:
    """Unpickle the folder's (trusted) .metadata with torch's classes, change it, pickle it back."""
    path = folder / ".metadata"
    metadata = pickle.loads(path.read_bytes())
    change(metadata)
    path.write_bytes(pickle.dumps(metadata))


def _storage(metadata: Any, fqn: str, offset: tuple[int, ...] | None) -> Any:
    return next(
        info
        for index, info in metadata.storage_data.items()
        if index.fqn == fqn and (index.offset is None and offset is None or tuple(index.offset or ()) == offset)
    )


# ---- structure and values ----------------------------------------------------------------------------------


def test_top_level_is_the_nesting_dcp_to_torch_save_restores(dcp_root: Path, reference) -> None:
    with open_source(dcp_root / "default", ["model"]) as source:
        assert list(source.top_level) == list(reference("default"))
        assert source.top_level["model"] == "dict (10 entries, 10 tensors)"
        assert source.top_level["step"] == "tensor int64[]"
        assert source.top_level["epoch"].startswith("pickled value (")


@pytest.mark.parametrize("layout", ["default", "per_item", "threads"])
def test_model_tensors_equal_dcp_to_torch_save(dcp_root: Path, reference, layout: str) -> None:
    expected = reference(layout)["model"]
    with open_source(dcp_root / layout, ["model"]) as source:
        assert list(source.tensors) == list(expected)
        for key, tensor in expected.items():
            assert _equal(source.load(key), tensor), key


def test_nested_optimizer_state_equals_dcp_to_torch_save(dcp_root: Path, reference) -> None:
    expected = reference("default")["optimizer"]["state"]["0"]
    with open_source(dcp_root / "default", ["optimizer.state.0"]) as source:
        assert source.extracted_from == "optimizer.state.0"
        assert set(source.tensors) == {"exp_avg", "step"}
        assert all(_equal(source.load(k), expected[k]) for k in expected)


def test_safetensors_serialization_tensors_equal_the_saved_ones(dcp_root: Path) -> None:
    # torch's own FileSystemReader cannot read this serialization back; compare with what the ranks saved.
    expected = plain(full_state(transposed=False))["model"]
    with open_source(dcp_root / "safetensors", ["model"]) as source:
        assert sorted(source.tensors) == sorted(expected)
        assert all(_equal(source.load(k), expected[k]) for k in expected)


@pytest.mark.parametrize("paths", [[], ["model"], ["optimizer.state.0"], ["optimizer", "model"]])
def test_extraction_works_as_for_the_torch_save_file(
    dcp_root: Path, reference, tmp_path: Path, paths: list[str]
) -> None:
    pth = tmp_path / "ref.pth"
    torch.save(reference("default"), pth)
    with open_source(dcp_root / "default", paths) as dcp, open_source(pth, paths) as saved:
        assert dcp.extracted_from == saved.extracted_from
        assert dcp.tensors == saved.tensors
        assert list(dcp.top_level) == list(saved.top_level)
        assert set(dcp.non_tensors) == set(saved.non_tensors)


def test_a_training_state_gives_its_model_without_extract(dcp_root: Path) -> None:
    """`step` (a scalar tensor) sits at the top level beside `model` and `optimizer`: the weights are `model`'s."""
    with open_source(dcp_root / "default", []) as source:
        assert source.extracted_from == "model" and set(source.top_level) == {"model", "optimizer", "epoch", "step"}


def test_missing_extract_path_lists_the_top_level(dcp_root: Path) -> None:
    with pytest.raises(
        SourceError,
        match=r"default: no state dict at state_dict; the top level holds: model, "
        r"optimizer, epoch, step; set `extract:`",
    ):
        open_source(dcp_root / "default", ["state_dict"])


def test_pickled_values_are_read_on_demand_and_equal_dcp_to_torch_save(dcp_root: Path, reference) -> None:
    expected = reference("default")
    with open_source(dcp_root / "default", ["model"]) as source:
        assert source.read_object("epoch") == expected["epoch"] == 3
        group = expected["optimizer"]["param_groups"][0]
        for name in ("lr", "betas", "params"):
            assert source.read_object(f"optimizer.param_groups.0.{name}") == group[name]


def test_step_counter_tensor_equals_dcp_to_torch_save(dcp_root: Path, reference) -> None:
    with open_source(dcp_root / "default", ["."]) as source:
        assert source.tensors["step"].shape == ()
        assert _equal(source.load("step"), reference("default")["step"])


# ---- what is read -------------------------------------------------------------------------------------------


def test_opening_reads_no_distcp_bytes(copy_of: Callable[[str], Path], run_cli) -> None:
    folder = copy_of("default")
    for path in folder.glob("*.distcp"):
        path.write_bytes(bytes(path.stat().st_size))
    result = run_cli("convert", folder, "-r", _rules(folder.parent), "--dry-run")
    assert result.code == 0, result.err
    assert "plan: 10 tensors out" in result.out
    with open_source(folder, ["model"]) as source, pytest.raises(SourceError):
        source.load("embed.weight")


def test_load_reads_only_that_tensors_chunks(copy_of: Callable[[str], Path], reference) -> None:
    folder = copy_of("default")
    keep = {
        (info.relative_path, info.offset, info.length)
        for index, info in pickle.loads((folder / ".metadata").read_bytes()).storage_data.items()
        if index.fqn == "model.proj.weight"
    }
    for path in folder.glob("*.distcp"):
        data = path.read_bytes()
        blank = bytearray(len(data))
        for name, offset, length in keep:
            if name == path.name:
                blank[offset : offset + length] = data[offset : offset + length]
        path.write_bytes(bytes(blank))
    with open_source(folder, ["model"]) as source:
        assert _equal(source.load("proj.weight"), reference("default")["model"]["proj.weight"])


@pytest.mark.parametrize("layout", ["default", "safetensors"])
def test_raw_span_is_exactly_a_whole_chunk_tensors_bytes(dcp_root: Path, layout: str) -> None:
    with open_source(dcp_root / layout, ["model"]) as source:
        spanned = {k for k in source.tensors if source.raw_span(k) is not None}
        assert spanned == {"layers.0.b", "flags", "norm.running_mean", "tiny"}
        for key in spanned:
            assert _span_bytes([source.raw_span(key)]) == _bytes(source.load(key)), key


@pytest.mark.parametrize("key", ["embed.weight", "layers.0.w", "proj.weight", "counts"])
def test_raw_spans_of_a_sharded_tensor_are_its_bytes_in_order(dcp_root: Path, key: str) -> None:
    with open_source(dcp_root / "default", ["model"]) as source:
        assert source.raw_span(key) is None
        assert _span_bytes(source.raw_spans(key)) == _bytes(source.load(key))


def test_strided_chunk_has_no_span_but_loads(dcp_root: Path, reference) -> None:
    with open_source(dcp_root / "default", ["model"]) as source:
        assert source.raw_spans("head.weight_t") is None
        assert _equal(source.load("head.weight_t"), reference("default")["model"]["head.weight_t"])


def test_inspect_reads_metadata_without_importing_torch(dcp_root: Path) -> None:
    code = textwrap.dedent(f"""
        import sys
        from ckptx.cli import main
        assert main(["inspect", {str(dcp_root / "default")!r}, "--extract", "model"]) == 0
        print("torch imported:", "torch" in sys.modules)
    """)
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(), timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("torch imported: False")


def test_convert_copies_chunks_in_bounded_memory_without_torch(dcp_root: Path, tmp_path: Path) -> None:
    code = textwrap.dedent(f"""
        import resource, sys
        from ckptx.cli import main
        import ckptx.conversion.pipeline, ckptx.io.read.dcp_reader, ckptx.io.write.safetensors_writer  # noqa: F401
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert main(["convert", {str(dcp_root / "big")!r}, "-o", {str(tmp_path / "big.safetensors")!r},
                     "-r", {str(_rules(tmp_path))!r}]) == 0
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        print(grown // 1024, "torch" in sys.modules)
    """)
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(), timeout=120
    )
    assert result.returncode == 0, result.stderr
    grown_mib, torch_imported = result.stdout.split()[-2:]
    assert torch_imported == "False"
    assert int(grown_mib) < 16  # the folder holds 48 MiB, 24 MiB per rank file
    assert (tmp_path / "big.safetensors").stat().st_size > BIG_MIB * 2**20


def test_convert_to_pth_copies_chunks_in_bounded_memory_without_torch(
    dcp_root: Path, reference, tmp_path: Path
) -> None:
    """A sharded tensor's record is its chunks copied one after another (CRC-32s combined), not a tensor
    assembled in memory: torch is not imported and memory stays below one rank file."""
    out = tmp_path / "big.pth"
    code = textwrap.dedent(f"""
        import resource, sys
        from ckptx.cli import main
        import ckptx.conversion.pipeline, ckptx.io.read.dcp_reader, ckptx.io.write.torch_writer  # noqa: F401
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert main(["convert", {str(dcp_root / "big")!r}, "-o", {str(out)!r}, "-r", {str(_rules(tmp_path))!r}]) == 0
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024, "torch" in sys.modules)
    """)
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(), timeout=120
    )
    assert result.returncode == 0, result.stderr
    grown_mib, torch_imported = result.stdout.split()[-2:]
    assert torch_imported == "False" and int(grown_mib) < 16
    assert zipfile.ZipFile(out).testzip() is None  # every record's CRC-32 is right
    written, expected = torch.load(out, weights_only=True, mmap=True), reference("big")["model"]
    assert list(written) == list(expected) and all(_equal(written[k], expected[k]) for k in expected)


def test_a_pth_from_dcp_on_copy_on_write_shares_the_chunks_it_can_place(
    dcp_root: Path, reference, cow_mount: Path, tmp_path: Path
) -> None:
    """Each record is placed congruent to its largest chunk whose offset keeps elements aligned (a chunk inside a
    DCP item may start at any byte); those chunks' blocks are shared, the rest is copied."""
    folder = cow_mount / "big"
    subprocess.run(["cp", "-r", "--reflink=never", str(dcp_root / "big"), str(folder)], check=True)
    os.sync()
    out = cow_mount / "big.pth"
    ckptx.convert(folder, out, _rules(tmp_path))
    with open_source(folder, ["model"]) as source:
        placeable = sum(
            max((s.nbytes for s in source.raw_spans(key) if s.offset % 4 == 0), default=0) for key in source.tensors
        )
    assert placeable > 0 and shared_bytes(out) >= 0.95 * placeable
    written, expected = torch.load(out, weights_only=True, mmap=True), reference("big")["model"]
    assert all(_equal(written[k], expected[k]) for k in expected)


def test_loading_every_tensor_holds_about_one_tensor_in_memory(dcp_root: Path) -> None:
    code = textwrap.dedent(f"""
        import resource
        import torch
        from ckptx.io.read.open import open_source
        torch.ones(4).sum()
        source = open_source({str(dcp_root / "big")!r}, ["model"])
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for key in source.tensors:
            tensor = source.load(key)
            del tensor
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
    """)
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(), timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.split()[-1]) < 16  # tensors of 4 MiB, rank files of 24 MiB


# ---- the command line ---------------------------------------------------------------------------------------


def _rules(folder: Path) -> Path:
    path = folder / "model.yaml"
    path.write_text("ckptx: 1\nname: dcp-model\nextract: [model]\nsteps: []\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("layout", ["default", "threads", "safetensors"])
def test_cli_convert_to_safetensors_equals_dcp_to_torch_save(
    dcp_root: Path, reference, tmp_path: Path, run_cli, layout: str
) -> None:
    out = tmp_path / "out.safetensors"
    result = run_cli("convert", dcp_root / layout, "-o", out, "-r", _rules(tmp_path))
    assert result.code == 0, result.err
    assert f"source: {dcp_root / layout} (dcp), weights at 'model'" in result.out
    expected = plain(full_state(transposed=False))["model"] if layout == "safetensors" else reference(layout)["model"]
    written = load_file(str(out))
    assert sorted(written) == sorted(expected)
    assert all(_equal(written[k], expected[k]) for k in expected)


def test_cli_convert_to_pth_equals_dcp_to_torch_save(dcp_root: Path, reference, tmp_path: Path, run_cli) -> None:
    out = tmp_path / "out.pth"
    result = run_cli("convert", dcp_root / "default", "-o", out, "-r", _rules(tmp_path))
    assert result.code == 0, result.err
    written, expected = torch.load(out, weights_only=True), reference("default")["model"]
    assert list(written) == list(expected)
    assert all(_equal(written[k], expected[k]) for k in expected)


def test_cli_inspect_shows_world_size_and_shard_layout(dcp_root: Path, run_cli) -> None:
    result = run_cli("inspect", dcp_root / "default", "--extract", "model")
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert lines[0] == f"{dcp_root / 'default'}: dcp"
    assert lines[1].startswith("torch.distributed.checkpoint: world size 2, 2 files (")
    assert lines[2] == (
        "shard layout at 'model': 10 tensors in 16 chunks: 6 sharded (5 on dim 0; 1 on dim 1; "
        "5 uneven; 2 chunks each), 4 in one chunk (replicated or unsharded)"
    )
    assert "  proj.weight: bfloat16[5, 9] on dim 1: [0:5, 0:5] [0:5, 5:9]" in lines
    assert "  tiny: float32[1, 4] on dim 0: [0:1, 0:4] [1:1, 0:4]" in lines


def test_cli_inspect_json_carries_the_layout_lines(dcp_root: Path, run_cli) -> None:
    result = run_cli("inspect", dcp_root / "per_item", "--extract", "model", "--json")
    assert result.code == 0, result.err
    assert result.json["format"] == "dcp"
    assert result.json["description"][0].startswith("torch.distributed.checkpoint: world size 2, 24 files")


# ---- safety -------------------------------------------------------------------------------------------------


class _Exec:
    """Unpickling this runs `builtins.exec` on code that creates a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


class _System:
    """Unpickling this runs `touch marker` through os.system."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("payload, global_name", [(_System, "posix.system"), (_Exec, "builtins.exec")])
def test_metadata_payload_is_refused_and_never_runs(
    copy_of: Callable[[str], Path], run_cli, payload: type, global_name: str
) -> None:
    folder = copy_of("default")
    marker = folder.parent / "MARKER"
    _edit_metadata(folder, lambda m: m.planner_data.__setitem__("epoch", payload(marker)))
    result = run_cli("inspect", folder)
    assert result.code == 2
    assert result.err.count("\n") == 1
    assert (
        f"{folder / '.metadata'}: names the Python global '{global_name}', which torch.distributed.checkpoint "
        f"metadata files never use; refused without running it" in result.err
    )
    assert not marker.exists()


def test_metadata_payload_is_refused_with_its_own_error_type(copy_of: Callable[[str], Path]) -> None:
    folder = copy_of("default")
    (folder / ".metadata").write_bytes(pickle.dumps(_Exec(folder / "MARKER")))
    with pytest.raises(ForeignGlobal) as caught:
        open_source(folder)
    assert caught.value.global_name == "builtins.exec"
    assert not (folder / "MARKER").exists()


# BUILD (a pickle giving an object its state) aimed at the allowed globals themselves, which would change
# ckptx's stand-ins for every later file of the process if it were accepted.
HOSTILE_BUILDS = {
    "on-a-called-global": b"\x80\x02ctorch\nSize\nq\x00N}q\x01X\x08\x00\x00\x00functionK\x01s\x86b.",
    "on-a-dtype": b"\x80\x02ctorch\nfloat32\nq\x00N}q\x01X\x04\x00\x00\x00nameX\x04\x00\x00\x00evils\x86b.",
    "on-a-stub-class": (
        b"\x80\x02ctorch.distributed.checkpoint.metadata\nMetadata\nq\x00N}q\x01X\x03\x00\x00\x00getK\x01s\x86b."
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE_BUILDS))
def test_metadata_cannot_change_the_stand_ins(copy_of: Callable[[str], Path], reference, case: str) -> None:
    folder = copy_of("default")
    good = (folder / ".metadata").read_bytes()
    (folder / ".metadata").write_bytes(HOSTILE_BUILDS[case])
    with pytest.raises(SourceError, match="not a readable DCP .metadata pickle"):
        open_source(folder)
    (folder / ".metadata").write_bytes(good)
    with open_source(folder, ["model"]) as source:
        assert _equal(source.load("proj.weight"), reference("default")["model"]["proj.weight"])


def test_pickled_value_payload_is_refused_and_never_runs(dcp_root: Path, tmp_path: Path, run_cli) -> None:
    marker = dcp_root.parent / "MARKER"
    result = run_cli("convert", dcp_root / "extras", "-o", tmp_path / "w.safetensors", "-r", _rules(tmp_path))
    assert result.code == 0, result.err
    with open_source(dcp_root / "extras", ["model"]) as source, pytest.raises(UnsafeGlobalError) as caught:
        source.read_object("evil")
    assert caught.value.global_name == "posix.system"
    assert not marker.exists()


def test_pickled_value_needing_a_global_loads_only_when_allowed(dcp_root: Path) -> None:
    with open_source(dcp_root / "extras", ["model"]) as source, pytest.raises(UnsafeGlobalError) as caught:
        source.read_object("args")
    assert caught.value.global_name == "argparse.Namespace"
    with open_source(dcp_root / "extras", ["model"], allow_globals=["argparse.Namespace"]) as source:
        assert vars(source.read_object("args")) == {"lr": 0.1, "name": "tiny"}
        with pytest.raises(UnsafeGlobalError):
            source.read_object("evil")


# ---- malformed folders --------------------------------------------------------------------------------------


def _delete(name: str) -> Callable[[Path], None]:
    return lambda folder: (folder / name).unlink()


def _truncate(name: str, cut: int) -> Callable[[Path], None]:
    def change(folder: Path) -> None:
        path = folder / name
        path.write_bytes(path.read_bytes()[:-cut])

    return change


def _metadata(change: Callable[[Any], None]) -> Callable[[Path], None]:
    return lambda folder: _edit_metadata(folder, change)


def _past_end(m: Any) -> None:
    _storage(m, "model.embed.weight", (5, 0)).offset = 10**6


def _drop_chunk(m: Any) -> None:
    m.state_dict_metadata["model.embed.weight"].chunks.pop()


def _overlap(m: Any) -> None:
    chunks = m.state_dict_metadata["model.counts"].chunks
    chunks[0].sizes = torch.Size([6])


def _unknown_dtype(m: Any) -> None:
    m.state_dict_metadata["model.counts"].properties.dtype = torch.qint8


def _transform(m: Any) -> None:
    _storage(m, "model.embed.weight", (0, 0)).transform_descriptors = ["zstd"]


_E = re.escape
MALFORMED = {  # case: (damage, pattern of the message after the folder's parent)
    "missing-metadata": (
        _delete(".metadata"),
        _E("default: holds .distcp files but no .metadata: the save did not finish"),
    ),
    "truncated-metadata": (_truncate(".metadata", 200), _E("default/.metadata: not a readable DCP .metadata pickle")),
    "missing-rank-file": (_delete("__1_0.distcp"), _E("default/__1_0.distcp: missing; ")),
    "truncated-distcp": (
        _truncate("__1_0.distcp", 100),
        r"default/__1_0\.distcp: has \d+ bytes but \S+/default/\.metadata places chunk \[\] of "
        r"'step' at bytes \d+\.\.\d+; the file is truncated",
    ),
    "chunk-past-end": (
        _metadata(_past_end),
        r"default/__1_0\.distcp: has \d+ bytes but \S+/default/\.metadata places chunk "
        r"\[5:10, 0:8\] of 'model\.embed\.weight' at bytes 1000000\.\.1001705",
    ),
    "chunks-not-covering": (
        _metadata(_drop_chunk),
        _E("default/.metadata: tensor 'model.embed.weight' [10, 8]: its chunks hold 40 of 80 elements"),
    ),
    "chunks-overlapping": (
        _metadata(_overlap),
        _E("default/.metadata: tensor 'model.counts' [9]: chunks [0:6] and [5:9] overlap"),
    ),
    "dtype-unknown": (
        _metadata(_unknown_dtype),
        _E("default/.metadata: tensor 'model.counts' has dtype torch.qint8, which ckptx cannot read"),
    ),
    "stream-transform": (
        _metadata(_transform),
        _E("default/.metadata: entry 'model.embed.weight' is stored through the DCP stream transform(s) ['zstd']"),
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_folder_is_a_one_line_error_naming_file_and_place(
    copy_of: Callable[[str], Path], run_cli, case: str
) -> None:
    damage, expected = MALFORMED[case]
    folder = copy_of("default")
    damage(folder)
    result = run_cli("inspect", folder, "--extract", "model")
    assert result.code == 2
    assert result.err.count("\n") == 1, result.err
    assert re.match(f"ckptx: error: {re.escape(str(folder.parent))}/{expected}", result.err), result.err


def test_corrupt_chunk_item_fails_the_conversion_naming_file_bytes_and_tensor(
    copy_of: Callable[[str], Path], tmp_path: Path, run_cli
) -> None:
    folder = copy_of("default")
    info = _storage(pickle.loads((folder / ".metadata").read_bytes()), "model.proj.weight", (0, 5))
    path = folder / info.relative_path
    data = bytearray(path.read_bytes())
    data[info.offset + 4 : info.offset + info.length] = b"\xff" * (info.length - 4)  # a zip's magic, then garbage
    path.write_bytes(bytes(data))
    out = tmp_path / "out.safetensors"
    result = run_cli("convert", folder, "-o", out, "-r", _rules(tmp_path))
    assert result.code == 2
    assert result.err.count("\n") == 1, result.err
    assert (
        f"{path}: the item at bytes {info.offset}...{info.offset + info.length} (chunk [0:5, 5:9] of "
        f"'model.proj.weight')"
    ) in result.err
    assert not out.exists()


def test_plain_folder_is_refused_in_one_line(tmp_path: Path, run_cli) -> None:
    (tmp_path / "weights").mkdir()
    result = run_cli("inspect", tmp_path / "weights")
    assert result.code == 2
    assert result.err == (
        f"ckptx: error: {tmp_path / 'weights'}: is a folder without .metadata, so not a "
        f"torch.distributed.checkpoint folder; give the checkpoint file (or its .index.json)\n"
    )


@pytest.mark.parametrize("layout", ["big", "threads"])
def test_a_dcp_source_on_two_workers_writes_one_processs_bytes(dcp_root: Path, tmp_path: Path, layout: str) -> None:
    """Worker processes reopen the DCP folder themselves and copy each tensor's chunks at their offsets."""
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}.pth"
        ckptx.convert(dcp_root / layout, out, ckptx.Recipe(name="as is", extract=("model",)), workers=workers)
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
