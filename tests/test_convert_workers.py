"""One conversion split across workers (`workers=`, `--workers`, `--executor dask`): the output is byte for byte what
one process writes, for 1, 2 and 3 local workers and a Dask LocalCluster, in every format; a unit that fails, or is
lost with its worker, publishes nothing and names the unit and the worker."""

from __future__ import annotations

import hashlib
import json
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save, save_file

import ckptx
from ckptx.errors import WorkerFailed
from ckptx.io import spans
from ckptx.io.read.open import SourceSpec, open_source
from ckptx.io.write import units
from ckptx.io.write.atomic import TEMP_SUFFIX
from ckptx.io.write.coordinator import CLAIMS
from ckptx.io.write.formats import writer_for
from ckptx.io.write.units import CLAIM_SIZE
from ckptx.io.write.writer import OutputOptions, Parallel
from ckptx.workers.cores import share_cores
from ckptx.workers.executors import open_runner

RECIPE = r"""ckptx: 1
steps:
  - rename: [['^layers\.', 'blocks.']]
  - cast: {match: '^blocks\.[01]\.w$', dtype: bfloat16}
  - cast: {match: '^half$', dtype: float32}
"""
COMPUTED = RECIPE + "  - scale: {match: '^blocks\\.2\\.w$', by: 2}\n"
OUTPUTS = {"safetensors": "o.safetensors", "sharded": "sh/model.safetensors.index.json", "torch": "o.pth"}
RUNS = [(1, "local"), (2, "local"), (3, "local"), (2, "dask")]


def on(workers: int, executor: str, scheduler: str) -> dict[str, object]:
    """The `ckptx.convert` arguments of one of RUNS (the Dask runs reach the test's cluster)."""
    return {"workers": workers, "executor": executor, "scheduler": scheduler if executor == "dask" else None}


def source_state() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    state = {"embed.weight": torch.randn(300, 256, generator=generator)}
    for i in range(4):
        state[f"layers.{i}.w"] = torch.randn(256, 512 + 8 * i, generator=generator)
        state[f"layers.{i}.b"] = torch.randn(512, generator=generator)
    state["norm"] = torch.randn(7, generator=generator)
    state["ints"] = torch.arange(1000)
    state["half"] = torch.randn(1000, generator=generator).half()
    return state


def expected(state: dict[str, torch.Tensor], computed: bool) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        key = key.replace("layers.", "blocks.")
        if key in ("blocks.0.w", "blocks.1.w"):
            value = value.bfloat16()
        elif key == "half":
            value = value.float()
        elif key == "blocks.2.w" and computed:
            value = value * 2
        out[key] = value
    return out


def digests(path: Path) -> dict[str, str]:
    """SHA-256 of every file of an output (a file, or the folder of a sharded output), by name."""
    files = sorted(p for p in path.parent.iterdir() if p.is_file()) if path.name.endswith(".json") else [path]
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def read(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".pth":
        return torch.load(path, weights_only=True)
    if path.name.endswith(".json"):
        return {k: v for shard in sorted(path.parent.glob("*.safetensors")) for k, v in load_file(str(shard)).items()}
    return load_file(str(path))


@pytest.fixture(scope="module")
def scheduler() -> Iterator[str]:
    """One Dask LocalCluster of 2 worker processes for the module (ckptx then connects to it by address)."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        yield cluster.scheduler_address


@pytest.fixture
def small_units(monkeypatch: pytest.MonkeyPatch) -> None:
    """Units of 64 KiB (the coordinator plans them), so a small checkpoint is cut into many, tensors across units."""
    monkeypatch.setattr(units, "MIN_UNIT", 16 * 1024)
    monkeypatch.setattr(spans, "CONVERT_CHUNK", 8 * 1024)


def convert_all(src: Path, tmp_path: Path, fmt: str, rules: Path, scheduler: str) -> list[dict[str, str]]:
    seen = []
    for workers, executor in RUNS:
        dst = tmp_path / f"{workers}-{executor}" / OUTPUTS[fmt]
        result = ckptx.convert(
            src,
            dst,
            str(rules),
            **on(workers, executor, scheduler),
            max_shard_size=700_000 if fmt == "sharded" else None,
        )
        assert result.written
        if workers > 1:
            assert len(result.units) > workers
        seen.append(digests(dst))
    return seen


@pytest.mark.parametrize("fmt", OUTPUTS)
@pytest.mark.usefixtures("small_units")
def test_every_format_is_byte_identical_for_any_number_of_workers_and_dask(
    tmp_path: Path, fmt: str, write_rules: Callable[..., Path], scheduler: str
) -> None:
    state = source_state()
    src = tmp_path / "src.safetensors"
    save_file(state, str(src))
    seen = convert_all(src, tmp_path, fmt, write_rules(RECIPE), scheduler)
    assert all(s == seen[0] for s in seen[1:]), seen
    out = read(tmp_path / "2-local" / OUTPUTS[fmt])
    assert out.keys() == expected(state, False).keys()
    assert all(torch.equal(out[k], v) for k, v in expected(state, False).items())


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
@pytest.mark.usefixtures("small_units")
def test_a_pth_source_with_tied_and_computed_tensors_is_byte_identical_too(
    tmp_path: Path, fmt: str, write_rules: Callable[..., Path], scheduler: str
) -> None:
    """Workers open the `.pth` again to compute a tensor with torch; a tied pair stays one record in a `.pth`."""
    state = source_state()
    state["head.weight"] = state["embed.weight"]  # tied
    src = tmp_path / "src.pth"
    torch.save(state, src)
    seen = convert_all(src, tmp_path, fmt, write_rules(COMPUTED), scheduler)
    assert all(s == seen[0] for s in seen[1:]), seen
    out = read(tmp_path / "3-local" / OUTPUTS[fmt])
    assert all(torch.equal(out[k], v) for k, v in expected(state, True).items())
    if fmt == "torch":
        assert out["head.weight"].untyped_storage().data_ptr() == out["embed.weight"].untyped_storage().data_ptr()


@pytest.mark.usefixtures("small_units")
def test_a_model_folder_with_documents_and_copied_files_is_byte_identical_too(tmp_path: Path, scheduler: str) -> None:
    """The HF folder writer (shards, index, a copied tokenizer file, config.json last) on every runner."""
    state = source_state()
    src = tmp_path / "src.safetensors"
    save_file(state, str(src))
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_bytes(os.urandom(200_000))
    options = OutputOptions(
        max_shard_size=700_000, documents={"config.json": b'{"model_type": "x"}'}, copies={"tokenizer.json": tokenizer}
    )
    seen = []
    with open_source(src) as source:
        entries = ckptx.plan(ckptx.Recipe(name="copy"), source).entries
        for workers, executor in RUNS:
            folder = tmp_path / f"{workers}-{executor}"
            writer = writer_for(f"{folder}/", entries, options)
            address = scheduler if executor == "dask" else None
            if workers == 1 and executor == "local":
                writer.write(source)
            else:
                with open_runner(executor, workers, address, initializer=share_cores) as runner:
                    writer.write(source, parallel=Parallel(runner, workers, SourceSpec.of(src)))
            seen.append({p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())})
    assert all(s == seen[0] for s in seen[1:]), seen
    assert {"config.json", "tokenizer.json", "model.safetensors.index.json"} <= set(seen[0])
    assert (tmp_path / "2-dask" / "tokenizer.json").read_bytes() == tokenizer.read_bytes()


def test_workers_report_their_units_and_stay_within_their_memory(tmp_path: Path, run_cli, small_units: None) -> None:
    state = source_state()
    src = tmp_path / "src.safetensors"
    save_file(state, str(src))
    rules = tmp_path / "rules.yaml"
    rules.write_text(RECIPE, encoding="utf-8")
    result = run_cli("convert", src, "-r", rules, "-o", tmp_path / "o.safetensors", "--workers", "2", "--json")
    assert result.code == 0, result.err
    reported = result.json["units"]
    assert sum(unit["bytes"] for unit in reported) == sum(v.nbytes for v in expected(state, False).values())
    assert 1 <= len({unit["worker"] for unit in reported}) <= 2  # a worker slow to start may take none
    assert max(unit["worker_peak_rss"] for unit in reported) <= 400 * 2**20


def test_a_unit_that_fails_in_a_worker_names_the_unit_and_the_worker_and_publishes_nothing(
    tmp_path: Path, write_rules: Callable[..., Path], small_units: None
) -> None:
    """The source is cut short once the first unit is done: a later unit reads past its end in its worker."""
    src = tmp_path / "src.safetensors"
    save_file(source_state(), str(src))
    out = tmp_path / "out"
    out.mkdir()
    size = src.stat().st_size

    def truncate(done: int, total: int) -> None:
        if src.stat().st_size == size:
            os.truncate(src, size // 3)

    with pytest.raises(WorkerFailed) as failed:
        ckptx.convert(src, out / "o.safetensors", str(write_rules(RECIPE)), workers=2, progress=truncate)
    message = str(failed.value)
    assert message.startswith("unit ") and " of " in message and "(o.safetensors, bytes " in message
    assert " on worker " in message and "the file is truncated or changed" in message
    assert failed.value.exit_code == 2 and failed.value.cause in ("SourceError", "TensorOpError")
    assert list(out.iterdir()) == []


def test_a_killed_worker_publishes_nothing_and_the_error_names_the_lost_unit(
    tmp_path: Path, write_rules: Callable[..., Path], small_units: None
) -> None:
    """Once the first unit is done, every worker that has claimed a unit is killed (SIGKILL): the units left are
    lost with them."""
    src = tmp_path / "src.safetensors"
    save_file(source_state(), str(src))
    out = tmp_path / "out"
    out.mkdir()
    killed: list[int] = []

    def kill_workers(done: int, total: int) -> None:
        if killed:
            return
        (claims,) = out.glob(f".o.safetensors.*{TEMP_SUFFIX}/{CLAIMS}")
        data = claims.read_bytes()
        slots = {data[i : i + CLAIM_SIZE].rstrip(b"\0") for i in range(0, len(data), CLAIM_SIZE)}
        for pid in {int(slot.rsplit(b":", 1)[1]) for slot in slots if slot}:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    with pytest.raises(WorkerFailed, match=r"^unit \d+ of \d+ \(o\.safetensors, bytes [\d,]+-[\d,]+: .*\) ") as lost:
        ckptx.convert(src, out / "o.safetensors", str(write_rules(RECIPE)), workers=2, progress=kill_workers)
    assert killed
    assert "the worker was lost" in str(lost.value) and lost.value.cause == "WorkerLost"
    assert list(out.iterdir()) == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--workers", "0"], "'0' is not a number of workers"),
        (["--workers", "many"], "'many' is not a number of workers"),
        (["--scheduler", "tcp://127.0.0.1:9"], "--scheduler needs --executor dask"),
    ],
)
def test_bad_worker_options_are_one_line_errors(
    tmp_path: Path, run_cli, safetensors_file: Path, argv: list[str], message: str
) -> None:
    result = run_cli("convert", safetensors_file, "-o", tmp_path / "o.safetensors", *argv)
    assert result.code == 2 and message in result.err and len(result.err.strip().splitlines()) == 1
    assert not (tmp_path / "o.safetensors").exists()


def test_an_unreachable_scheduler_is_a_one_line_error_and_writes_nothing(
    tmp_path: Path, run_cli, safetensors_file: Path
) -> None:
    dst = tmp_path / "o.safetensors"
    result = run_cli(
        "convert",
        safetensors_file,
        "-o",
        dst,
        "--executor",
        "dask",
        "--scheduler",
        "tcp://127.0.0.1:9",
        "--workers",
        "2",
    )
    assert result.code == 2 and "cannot reach the Dask scheduler at tcp://127.0.0.1:9" in result.err
    assert not dst.exists() and [p for p in tmp_path.iterdir() if p.name.endswith(TEMP_SUFFIX)] == []


def test_workers_auto_is_one_per_core(tmp_path: Path, run_cli, safetensors_file: Path) -> None:
    result = run_cli("convert", safetensors_file, "-o", tmp_path / "o.safetensors", "--workers", "auto", "--json")
    assert result.code == 0, result.err
    assert load_file(str(tmp_path / "o.safetensors")).keys() == load_file(str(safetensors_file)).keys()


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_the_command_line_forks_its_workers_and_writes_the_same_bytes(tmp_path: Path, fmt: str) -> None:
    """`ckptx convert` has not imported torch when it writes a copy-and-cast conversion: its workers are forked from
    it (the tests above run in a process with torch, whose workers come from a fork server)."""
    import subprocess
    import sys

    from tests.conftest import subprocess_env

    state = source_state()
    src = tmp_path / "src.safetensors"
    save_file(state, str(src))
    rules = tmp_path / "rules.yaml"
    rules.write_text(RECIPE, encoding="utf-8")
    seen = []
    for workers in ("1", "2"):
        dst = tmp_path / workers / OUTPUTS[fmt]
        argv = ["convert", str(src), "-r", str(rules), "-o", str(dst), "--workers", workers]
        done = subprocess.run(
            [sys.executable, "-m", "ckptx", *argv], env=subprocess_env(), capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        seen.append(digests(dst))
    assert seen[0] == seen[1]
    assert all(torch.equal(read(tmp_path / "2" / OUTPUTS[fmt])[k], v) for k, v in expected(state, False).items())


def own_bytes(tensor: torch.Tensor) -> bytes:
    """A tensor's elements, row-major, as the card hashes them."""
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize(
    ("fmt", "kind"),
    [("safetensors", "safetensors"), ("sharded", "safetensors"), ("torch", "zip"), ("torch", "legacy")],
)
@pytest.mark.usefixtures("small_units")
def test_a_card_is_the_same_for_any_number_of_workers_and_dask(
    tmp_path: Path, fmt: str, kind: str, write_rules: Callable[..., Path], scheduler: str
) -> None:
    """--audit with workers: each unit digests the tensors it writes (copied ones from their source spans, computed
    ones as written, a view of a stored record by its own elements); the card's tensors are those of one process,
    and every digest is the SHA-256 of the tensor's own bytes in the output."""
    state = source_state()
    if kind == "safetensors":
        src = tmp_path / "src.safetensors"
        save_file(state, str(src))
    else:
        state["head.weight"] = state["embed.weight"]  # tied: one record holds both
        state["view"] = state["embed.weight"][10:20]  # a view inside the same storage
        src = tmp_path / "src.pth"
        torch.save(state, src, _use_new_zipfile_serialization=kind == "zip")
    rules = write_rules(COMPUTED)
    cards = []
    for workers, executor in RUNS:
        dst = tmp_path / f"{workers}-{executor}" / OUTPUTS[fmt]
        card = tmp_path / f"{workers}-{executor}.card.json"
        result = ckptx.convert(
            src,
            dst,
            str(rules),
            **on(workers, executor, scheduler),
            max_shard_size=700_000 if fmt == "sharded" else None,
            audit=card,
        )
        assert result.card == str(card)
        cards.append(json.loads(card.read_text())["tensors"])
        out = read(dst)
        assert set(cards[-1]) == set(out)
        for key, tensor in out.items():
            assert cards[-1][key]["sha256"] == hashlib.sha256(own_bytes(tensor)).hexdigest(), key
        assert ckptx.audit(dst, card=card).ok
    for card, (workers, executor) in zip(cards[1:], RUNS[1:]):
        differ = {k: (cards[0][k], card.get(k)) for k in cards[0] if card.get(k) != cards[0][k]}
        assert not differ, (workers, executor, json.dumps(differ)[:3000])


@pytest.mark.usefixtures("small_units")
@pytest.mark.parametrize("dtype", ["q8_0", "float16", None])
def test_a_gguf_output_is_byte_identical_for_any_number_of_workers_and_dask(
    tmp_path: Path, scheduler: str, dtype: str | None
) -> None:
    """GGUF is laid out header-first too: its tensors (Q8_0 blocks, F16 and F32; q/k rows reordered by the rotary
    byte kernel, then converted) are written by units at their offsets, on any runner, with the same bytes."""
    pytest.importorskip("transformers", reason="the tiny Llama folder is made by transformers (not in the floor venv)")
    from tests.helpers.llama_gguf import llama_folder

    folder = llama_folder(tmp_path / "tiny", tokenizer=False)
    seen = []
    for workers, executor in RUNS:
        dst = tmp_path / f"{workers}-{executor}.gguf"
        result = ckptx.convert(
            folder / "model.safetensors",
            dst,
            "hf/llama-to-gguf",
            dtype=dtype,
            **on(workers, executor, scheduler),
        )
        assert result.written and (workers == 1 or len(result.units) > 1)
        seen.append(hashlib.sha256(dst.read_bytes()).hexdigest())
    assert all(s == seen[0] for s in seen[1:]), seen


def safetensors_stores_float8() -> bool:
    try:
        save({"x": torch.zeros(1, dtype=torch.float8_e4m3fn)})
    except (KeyError, ValueError, TypeError):
        return False
    return True


@pytest.mark.usefixtures("small_units")
def test_a_dequantization_on_workers_is_byte_identical(tmp_path: Path, scheduler: str) -> None:
    """Blockwise byte kernels (FP8 block dequantization, reading a weight and its scales) run in the units too."""
    if not safetensors_stores_float8():
        pytest.skip("this safetensors cannot store float8 (the floor version, 0.4)")
    generator = torch.Generator().manual_seed(0)
    state = {}
    for i in range(3):
        weight = (torch.randn(300, 260, generator=generator) * 100).clamp(-448, 448)
        state[f"l{i}.weight"] = weight.to(torch.float8_e4m3fn)
        state[f"l{i}.weight_scale_inv"] = torch.rand(3, 3, generator=generator) * 1e-2 + 1e-4
    src = tmp_path / "fp8.safetensors"
    save_file(state, str(src))
    seen = []
    for workers, executor in RUNS:
        dst = tmp_path / f"{workers}-{executor}.safetensors"
        ckptx.convert(
            src,
            dst,
            "quant/fp8-block-to-bf16",
            **on(workers, executor, scheduler),
        )
        seen.append(hashlib.sha256(dst.read_bytes()).hexdigest())
    assert all(s == seen[0] for s in seen[1:]), seen
    assert load_file(str(tmp_path / "1-local.safetensors"))["l2.weight"].dtype == torch.bfloat16
