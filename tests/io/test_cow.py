"""Copy-on-write placement: conversions put copied bytes at offsets congruent to their source offsets (safetensors:
the header's padding; `.pth`: each record's), so on XFS with reflink and on btrfs the output shares the source's
data blocks."""

from __future__ import annotations

import json
import os
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import ckptx
from tests.conftest import shared_bytes

RENAME = "ckptx: 1\nsteps: [{add_prefix: model.}]\n"


def _data_start(path: Path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {f"layer{i}.weight": torch.randn(512, 1024 + 8 * i, generator=generator) for i in range(8)}


def _record_offsets(path: Path) -> dict[str, int]:
    """Data offset of every record of zip file `path` (from its local headers)."""
    offsets = {}
    with zipfile.ZipFile(path) as archive, open(path, "rb") as f:
        for info in archive.infolist():
            f.seek(info.header_offset + 26)
            name, extra = struct.unpack("<2H", f.read(4))
            offsets[info.filename] = info.header_offset + 30 + name + extra
    return offsets


def _source_offsets(path: Path) -> dict[str, int]:
    """File offset of every tensor of safetensors file `path`."""
    header = json.loads(path.read_bytes()[8 : _data_start(path)])
    return {k: _data_start(path) + v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}


def _pth_offsets(path: Path) -> dict[str, int]:
    """File offset of every tensor of `.pth` file `path` (each alone in its storage), by state-dict key."""
    state = torch.load(path, weights_only=True, map_location="meta")
    return {key: tensor.untyped_storage()._checkpoint_offset for key, tensor in state.items()}


def _equal(out: dict[str, torch.Tensor], original: dict[str, torch.Tensor], prefix: str = "model.") -> bool:
    return out.keys() == {prefix + k for k in original} and all(
        torch.equal(out[prefix + k], v) for k, v in original.items()
    )


def test_copied_pth_records_are_placed_congruent_to_their_source(tmp_path: Path, write_rules) -> None:
    src, dst = tmp_path / "src.safetensors", tmp_path / "dst.pth"
    save_file(_state(), str(src))
    ckptx.convert(src, dst, write_rules(RENAME))
    placed = _pth_offsets(dst)
    assert {k: v % 4096 for k, v in placed.items()} == {"model." + k: v % 4096 for k, v in _source_offsets(src).items()}
    assert zipfile.ZipFile(dst).testzip() is None  # every CRC-32 right
    assert _equal(torch.load(dst, weights_only=True, mmap=True), _state())


def test_a_placed_pth_leaves_out_format_version_so_torch_reads_offsets_from_headers(
    tmp_path: Path, write_rules
) -> None:
    from torch.utils.serialization import config

    src, dst = tmp_path / "src.safetensors", tmp_path / "dst.pth"
    save_file(_state(), str(src))
    ckptx.convert(src, dst, write_rules(RENAME))
    assert "archive/.format_version" not in zipfile.ZipFile(dst).namelist()
    records = _record_offsets(dst)
    meta = torch.load(dst, weights_only=True, map_location="meta")  # offsets torch reports for lazy loaders
    assert sorted(t.untyped_storage()._checkpoint_offset for t in meta.values()) == sorted(
        v for k, v in records.items() if "/data/" in k
    )
    saved = config.load.calculate_storage_offsets
    config.load.calculate_storage_offsets = True
    try:
        assert _equal(torch.load(dst, weights_only=True, mmap=True), _state())
    finally:
        config.load.calculate_storage_offsets = saved


def test_records_too_small_to_share_keep_torchs_placement(tmp_path: Path, write_rules) -> None:
    state = {f"b{i}": torch.randn(100 + i) for i in range(4)}
    src, dst = tmp_path / "src.safetensors", tmp_path / "dst.pth"
    save_file(state, str(src))
    ckptx.convert(src, dst, write_rules(RENAME))
    records = _record_offsets(dst)
    assert "archive/.format_version" in records
    assert all(offset % 64 == 0 for offset in records.values())


def test_a_record_off_its_element_boundary_keeps_torchs_placement(tmp_path: Path, write_rules) -> None:
    """A float32 tensor 6 bytes past a 3-element float16 one (ckptx keeps plan order): copying it congruent would
    leave its elements unaligned in the .pth, so it is not placed."""
    mixed = tmp_path / "mixed.safetensors"
    ckptx.convert(
        _save(
            tmp_path / "mixed.pth",
            OrderedDict([("a", torch.arange(3, dtype=torch.float16)), ("b", torch.randn(300, 1000))]),
        ),
        mixed,
        write_rules("ckptx: 1\nsteps: []\n", "none.yaml"),
    )
    assert _source_offsets(mixed)["b"] % 4 != 0
    dst = tmp_path / "dst.pth"
    ckptx.convert(mixed, dst, write_rules(RENAME))
    assert all(offset % 64 == 0 for offset in _record_offsets(dst).values())
    out = torch.load(dst, weights_only=True, mmap=True)
    assert torch.equal(out["model.b"], load_file(str(mixed))["b"])


def _save(path: Path, state: dict[str, torch.Tensor]) -> Path:
    torch.save(state, path)
    return path


def test_pth_to_safetensors_places_the_largest_copied_tensor(tmp_path: Path, write_rules) -> None:
    """.pth records sit apart (headers between them) and safetensors has no gaps: one start serves every tensor,
    and the one that places the most copied bytes is taken."""
    state = OrderedDict([("small", torch.randn(3000)), ("big", torch.randn(1000, 1000)), ("mid", torch.randn(70000))])
    src, dst = _save(tmp_path / "src.pth", state), tmp_path / "dst.safetensors"
    ckptx.convert(src, dst, write_rules(RENAME))
    assert (_source_offsets(dst)["model.big"] - _pth_offsets(src)["big"]) % 4096 == 0
    assert _equal(load_file(str(dst)), state)


def test_the_data_section_is_placed_congruent_to_the_sources(tmp_path: Path, write_rules) -> None:
    src, dst = tmp_path / "src.safetensors", tmp_path / "dst.safetensors"
    save_file(_state(), str(src))
    ckptx.convert(src, dst, write_rules(RENAME))
    assert (_data_start(dst) - _data_start(src)) % 4096 == 0
    out, original = load_file(str(dst)), _state()
    assert all(torch.equal(out[f"model.{k}"], v) for k, v in original.items())


def _write_source(path: Path, state: dict[str, torch.Tensor]) -> Path:
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(OrderedDict(state), path)
    os.sync()
    return path


def _load(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, weights_only=True, mmap=True)


@pytest.mark.parametrize(
    "src_name, dst_name",
    [("src.safetensors", "dst.safetensors"), ("src.safetensors", "dst.pth"), ("src.pth", "dst.pth")],
)
def test_a_rename_on_copy_on_write_shares_the_sources_blocks(
    cow_mount: Path, write_rules, src_name: str, dst_name: str
) -> None:
    src, dst = _write_source(cow_mount / src_name, _state()), cow_mount / dst_name
    ckptx.convert(src, dst, write_rules(RENAME))
    data = sum(t.numel() * t.element_size() for t in _state().values())
    assert shared_bytes(dst) >= 0.95 * data  # all but the unaligned ends of each run or record
    assert _equal(_load(dst), _state())


def test_pth_to_safetensors_on_copy_on_write_shares_the_largest_tensors_blocks(cow_mount: Path, write_rules) -> None:
    state = {"small": torch.randn(3000), "big": torch.randn(2048, 1024), "mid": torch.randn(70000)}
    src, dst = _write_source(cow_mount / "src.pth", state), cow_mount / "dst.safetensors"
    ckptx.convert(src, dst, write_rules(RENAME))
    assert shared_bytes(dst) >= 0.95 * state["big"].numel() * 4
    assert _equal(load_file(str(dst)), state)


def test_a_cast_on_copy_on_write_shares_nothing_and_is_still_right(cow_mount: Path, write_rules) -> None:
    src, dst = _write_source(cow_mount / "src.safetensors", _state()), cow_mount / "dst.safetensors"
    ckptx.convert(
        src, dst, write_rules("ckptx: 1\nsteps: [{add_prefix: model.}, {cast: {match: '.*', dtype: bfloat16}}]\n")
    )
    assert shared_bytes(dst) == 0
    assert _equal(load_file(str(dst)), {k: v.bfloat16() for k, v in _state().items()})


def test_copies_are_issued_from_folio_aligned_destination_offsets(
    tmp_path: Path, write_rules, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After at most a head to the next block and one to the next FOLIO boundary, every copy_file_range call
    starts on a FOLIO boundary of the destination (ext4 with large folios copies 1.4x faster so)."""
    from ckptx.io import spans

    calls: list[tuple[int, int]] = []
    real = os.copy_file_range

    def recording(src_fd: int, dst_fd: int, count: int, offset_src: int, offset_dst: int) -> int:
        calls.append((offset_dst, count))
        return real(src_fd, dst_fd, count, offset_src, offset_dst)

    monkeypatch.setattr(os, "copy_file_range", recording)
    monkeypatch.setattr(spans, "CHUNK", 1 << 20)
    src, dst = tmp_path / "src.safetensors", tmp_path / "dst.safetensors"
    save_file(_state(), str(src))
    ckptx.convert(src, dst, write_rules(RENAME))
    assert calls[0][0] % spans.BLOCK and not (calls[0][0] + calls[0][1]) % spans.BLOCK
    assert all(start % spans.FOLIO == 0 for start, _ in calls[2:])
    assert sum(count for _, count in calls) == sum(t.numel() * 4 for t in _state().values())
    assert _equal(load_file(str(dst)), _state())


@pytest.mark.parametrize("workers", [1, 2])
def test_sharded_output_on_copy_on_write_shares_the_sources_blocks_in_every_shard(
    cow_mount: Path, write_rules, workers: int
) -> None:
    """With worker processes too: each unit clones its copied ranges at their fixed offsets."""
    src = _write_source(cow_mount / "src.safetensors", _state())
    out = cow_mount / "out" / "model.safetensors"
    ckptx.convert(src, out, write_rules(RENAME), max_shard_size=5 << 20, workers=workers)
    shards = sorted((cow_mount / "out").glob("model-*.safetensors"))
    assert len(shards) > 2
    merged: dict[str, torch.Tensor] = {}
    for shard in shards:
        assert shared_bytes(shard) >= 0.95 * (shard.stat().st_size - _data_start(shard)), shard.name
        merged |= load_file(str(shard))
    assert _equal(merged, _state())


def test_ckptx_reads_a_placed_pth_back_by_its_headers(tmp_path: Path, write_rules) -> None:
    """A placed `.pth` (no `.format_version`, records off the 64-byte grid) is a source like any other: its spans
    come from the local headers, its CRCs from its directory (`.pth` -> `.pth` again keeps every CRC right)."""
    src, placed = tmp_path / "src.safetensors", tmp_path / "placed.pth"
    save_file(_state(), str(src))
    ckptx.convert(src, placed, write_rules(RENAME))
    again, back = tmp_path / "again.pth", tmp_path / "back.safetensors"
    ckptx.convert(placed, again, write_rules("ckptx: 1\nsteps: [{strip_prefix: model.}]\n", "strip.yaml"))
    ckptx.convert(again, back, write_rules(RENAME))
    assert zipfile.ZipFile(again).testzip() is None
    assert {k: v % 4096 for k, v in _pth_offsets(again).items()} == {
        k.removeprefix("model."): v % 4096 for k, v in _pth_offsets(placed).items()
    }
    assert _equal(load_file(str(back)), _state())


@pytest.mark.parametrize(
    "steps",
    [
        "- split: {match: '^layer(\\d)\\.weight$', dim: 0, sizes: [256, 128, 128], into: [q\\1, k\\1, v\\1]}",
        "- reshape: {match: '.*', shape: [-1]}",
        "- merge: {match: '^layer[0-3]\\.weight$', to: low, dim: 0, stack: true,"
        " inputs: [layer0.weight, layer1.weight, layer2.weight, layer3.weight]}",
    ],
)
def test_splits_reshapes_and_joins_along_dim_0_are_copies_that_share_blocks(
    cow_mount: Path, write_rules, steps: str
) -> None:
    """Their bytes are byte ranges of the source: copied in the kernel, so on copy-on-write the output shares the
    source's blocks (and needs neither torch nor a pass through memory)."""
    state = {f"layer{i}.weight": torch.randn(512, 1024) for i in range(4)}  # 2 MiB each: block-aligned pieces
    src, dst = _write_source(cow_mount / "src.safetensors", state), cow_mount / "dst.safetensors"
    rules = write_rules(f"ckptx: 1\nsteps:\n  {steps}\n")
    ckptx.convert(src, dst, rules)
    expected = ckptx.apply(rules, state)
    out = load_file(str(dst))
    assert out.keys() == expected.keys() and all(torch.equal(out[k], expected[k]) for k in out)
    assert shared_bytes(dst) >= 0.9 * sum(t.numel() * 4 for t in state.values())
