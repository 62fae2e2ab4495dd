"""Work units: how a layout is cut into units, and one unit written into its staged file (any number of threads
gives the same bytes; an observer sees every byte; a removed staged file stops the unit)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

import ckptx
from ckptx.errors import DestinationError
from ckptx.io import spans
from ckptx.io.read.open import open_source
from ckptx.io.spans import FOLIO
from ckptx.io.write.formats import writer_for
from ckptx.io.write.output_layout import Convert, Copy, LayoutBuilder, Literal, OutputLayout, Piece
from ckptx.io.write.units import WorkUnit, plan_units, run_unit
from ckptx.io.write.writer import OutputOptions
from ckptx.planning.source import RawSpan, Source

RECIPE = "ckptx: 1\nsteps:\n  - cast: {match: '^c', dtype: bfloat16}\n"


def _layout(tmp_path: Path, destination: str, recipe: str = RECIPE) -> tuple[OutputLayout, Source]:
    generator = torch.Generator().manual_seed(1)
    state = {"a": torch.randn(300_000, generator=generator), "b": torch.randn(17, generator=generator)}
    state |= {"c": torch.randn(700_001, generator=generator), "d": torch.arange(5)}
    src = tmp_path / "src.safetensors"
    save_file(state, str(src))
    rules = tmp_path / "rules.yaml"
    rules.write_text(recipe, encoding="utf-8")
    source = open_source(src)
    plan = ckptx.plan(ckptx.load_rules(str(rules)), source)
    shards = 2_000_000 if destination.endswith(".json") else None
    writer = writer_for(tmp_path / destination, plan.entries, OutputOptions(max_shard_size=shards))
    return writer.layout(source), source


def _covered(units: list[WorkUnit], layout: OutputLayout) -> dict[int, list[tuple[int, int]]]:
    ranges: dict[int, list[tuple[int, int]]] = {}
    for unit in units:
        for piece in unit.pieces:
            ranges.setdefault(piece.file, []).append((piece.offset, piece.offset + piece.nbytes))
    return {file: sorted(found) for file, found in ranges.items()}


@pytest.mark.parametrize("destination", ["o.safetensors", "o.pth", "sh/m.safetensors.index.json"])
@pytest.mark.parametrize("parts", [1, 3, 16])
def test_units_cover_every_data_byte_once(
    tmp_path: Path, destination: str, parts: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("ckptx.io.write.units.MIN_UNIT", 64 * 1024)
    layout, _ = _layout(tmp_path, destination)
    units = plan_units(layout, str(tmp_path), parts)
    data = {}
    for piece in layout.pieces:
        if not isinstance(piece.fill, Literal):
            data.setdefault(piece.file, []).append((piece.offset, piece.offset + piece.nbytes))
    covered = _covered(units, layout)
    for file, pieces in data.items():
        merged = covered[file]
        assert sum(hi - lo for lo, hi in merged) == sum(hi - lo for lo, hi in pieces)
        assert merged[0][0] == pieces[0][0] and merged[-1][1] == pieces[-1][1]
        assert all(a[1] <= b[0] for a, b in zip(merged, merged[1:]))
    assert all(len({piece.file for piece in unit.pieces}) == 1 for unit in units)
    if parts == 1:
        assert len(units) == len({piece.file for piece in layout.pieces if not isinstance(piece.fill, Literal)})


def test_a_big_copy_is_cut_at_folio_boundaries_and_a_cast_at_whole_elements(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("ckptx.io.write.units.MIN_UNIT", 64 * 1024)
    monkeypatch.setattr(spans, "CONVERT_CHUNK", 8 * 1024)
    layout, _ = _layout(tmp_path, "o.safetensors")
    units = plan_units(layout, str(tmp_path), 16)
    pieces = [piece for unit in units for piece in unit.pieces]
    copies = [p for p in pieces if isinstance(p.fill, Copy) and p.key == "a"]
    casts = [p for p in pieces if isinstance(p.fill, Convert)]
    assert len(copies) > 1 and all((p.offset + p.nbytes) % FOLIO == 0 for p in copies[:-1])
    assert len(casts) > 1 and all(p.nbytes % 2 == 0 and p.fill.span.nbytes == 2 * p.nbytes for p in casts)
    assert [p.at for p in casts] == sorted(p.at for p in casts) and casts[0].at == 0


def _written(tmp_path: Path, layout: OutputLayout, source: Source, threads: int, name: str) -> bytes:
    folder = tmp_path / name
    folder.mkdir()
    for laid in layout.files:
        (folder / laid.name).write_bytes(bytes(laid.size))
    for unit in plan_units(layout, str(folder), 4, threads=threads):
        run_unit(unit, source)
    return b"".join((folder / laid.name).read_bytes() for laid in layout.files)


def test_any_number_of_threads_writes_the_same_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spans, "CONVERT_CHUNK", 4096)
    monkeypatch.setattr(spans, "CHUNK", 65536)
    layout, source = _layout(tmp_path, "o.safetensors")
    assert _written(tmp_path, layout, source, 1, "one") == _written(tmp_path, layout, source, 4, "four")


class Recorder:
    """An observer that keeps what it saw, by tensor: copied spans' bytes and computed bytes, at their offsets."""

    def __init__(self) -> None:
        self.seen: dict[str, dict[int, bytes]] = {}

    def copied(self, key: str, at: int, span: RawSpan) -> None:
        with open(span.file, "rb") as f:
            f.seek(span.offset)
            self.seen.setdefault(key, {})[at] = f.read(span.nbytes)

    def computed(self, key: str, at: int, data: memoryview) -> None:
        self.seen.setdefault(key, {})[at] = bytes(data)

    def result(self) -> Any:
        return self.seen

    def abandon(self) -> None:
        self.seen.clear()


class Recording:
    """The factory of Recorders (any unit's: it sees every key)."""

    def narrowed(self, keys: Any) -> Recording:
        return self

    def __call__(self, source: Any) -> Recorder:
        return Recorder()


def test_an_observer_sees_every_tensor_byte_where_it_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(spans, "CONVERT_CHUNK", 4096)
    layout, source = _layout(tmp_path, "o.safetensors")
    folder = tmp_path / "staged"
    folder.mkdir()
    (folder / "o.safetensors").write_bytes(bytes(layout.files[0].size))
    results = [run_unit(unit, source) for unit in plan_units(layout, str(folder), 1, threads=2, observer=Recording())]
    seen = results[0].observed
    written = (folder / "o.safetensors").read_bytes()
    for piece in layout.pieces:
        if piece.key:
            parts = seen[piece.key]
            joined = b"".join(parts[at] for at in sorted(parts))
            assert joined == written[piece.offset : piece.offset + piece.nbytes], piece.key


def test_a_literal_only_layout_has_no_units(tmp_path: Path) -> None:
    builder = LayoutBuilder()
    builder.literal(builder.file("x", tmp_path / "x", 3), 0, b"abc")
    builder.add(Piece(0, 3, 0, Copy(())))  # empty: left out
    assert plan_units(builder.build(), str(tmp_path), 4) == []


def test_a_staged_file_removed_mid_unit_stops_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check runs between pieces: the unit raises DestinationError once it sees its file gone."""
    monkeypatch.setattr(spans, "CONVERT_CHUNK", 4096)
    layout, source = _layout(tmp_path, "o.safetensors")
    folder = tmp_path / "staged"
    folder.mkdir()
    staged = folder / "o.safetensors"
    staged.write_bytes(bytes(layout.files[0].size))
    (unit,) = plan_units(layout, str(folder), 1, threads=1)
    from ckptx.io.write import units

    real = units.write_piece
    calls: list[int] = []

    def removing(writer: Any, piece: Piece) -> None:
        calls.append(1)
        if len(calls) == 2:
            staged.unlink()
        real(writer, piece)

    monkeypatch.setattr(units, "write_piece", removing)
    with pytest.raises(DestinationError, match="staged file was removed"):
        run_unit(unit, source)
