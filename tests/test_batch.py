"""`ckptx batch`: jobs files, plan-all-then-write, failures isolated, resume fingerprints, worker pools, Dask."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ckptx.batch.fingerprint import FINGERPRINT_KEY, sidecar_path
from ckptx.batch.jobs import load_jobs, merge_targets
from ckptx.batch.runner import run_batch
from ckptx.errors import RuleError
from ckptx.trust.callables import allow_factories
from tests.conftest import TINY_TARGET, subprocess_env
from tests.helpers.models import randomized, tiny_net

CASES = Path(__file__).resolve().parent / "cases" / "jobs"
INVALID = sorted(p for p in (CASES / "invalid").iterdir() if p.is_dir())
STRIP = "ckptx: 1\nname: strip\nextract: model\nsteps: [{strip_prefix: module.}]\n"
BROKEN = {"out/zoo/corrupt.safetensors", "out/zoo/wide.safetensors"}


@pytest.fixture(autouse=True)
def _workers_import_tests(monkeypatch: pytest.MonkeyPatch) -> None:
    """Worker processes (spawned or Dask) must import `tests.helpers.models` for the target."""
    monkeypatch.setenv("PYTHONPATH", subprocess_env()["PYTHONPATH"])


@pytest.fixture(autouse=True)
def _tests_factories_allowed() -> Iterator[None]:
    """These jobs files name the tests' own factories (not an installed package): the user allows them, as
    `--allow-factory` does; the approval travels with each task to the worker processes."""
    with allow_factories([TINY_TARGET, "crashing_target:boom"]):
        yield


def weights(seed: int) -> dict[str, torch.Tensor]:
    """The TinyNet state dict a source of this seed holds (what its output must contain)."""
    return dict(randomized(tiny_net(), seed=seed).state_dict())


def save_ddp(path: Path, seed: int) -> None:
    """A DDP-style training checkpoint: `module.` keys under `model`, next to an epoch counter."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {f"module.{k}": v for k, v in weights(seed).items()}, "epoch": seed}, path)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return path


def make_tree(root: Path) -> tuple[Path, dict[str, int]]:
    """20 jobs (12 from one glob, 8 explicit), 2 of them broken; returns the jobs file and output -> seed."""
    write(root / "strip.yaml", STRIP)
    expected = {}
    for i in range(12):
        save_ddp(root / f"sweep/run{i:02d}/checkpoint-best.pth", i)
        expected[f"out/run{i:02d}/checkpoint-best.safetensors"] = i
    for i in range(6):
        save_ddp(root / f"zoo/m{i}.pt", 100 + i)
    expected.update({f"out/zoo/m{i}.safetensors": 100 + i for i in range(4)})
    expected.update({"out/zoo/m4.pth": 104, "out/zoo/m5.pth": 105})
    save_ddp(root / "zoo/corrupt.pt", 7)
    data = (root / "zoo/corrupt.pt").read_bytes()
    (root / "zoo/corrupt.pt").write_bytes(data[: len(data) * 6 // 10])
    save_ddp(root / "zoo/wide.pt", 8)
    jobs = write(
        root / "jobs.yaml",
        f"""
        ckptx: 1
        defaults: {{rules: strip.yaml, target: {{model: '{TINY_TARGET}'}}, format: safetensors}}
        jobs:
          - {{glob: 'sweep/*/checkpoint-best.pth', dst: 'out/{{parent}}/{{stem}}'}}
          - {{src: zoo/m0.pt, dst: out/zoo/m0.safetensors}}
          - {{src: zoo/m1.pt, dst: out/zoo/m1.safetensors}}
          - {{src: zoo/m2.pt, dst: out/zoo/m2.safetensors}}
          - {{src: zoo/m3.pt, dst: out/zoo/m3.safetensors}}
          - {{src: zoo/m4.pt, dst: 'out/zoo/{{stem}}', format: torch}}
          - {{src: zoo/m5.pt, dst: out/zoo/m5.pth}}
          - {{src: zoo/corrupt.pt, dst: out/zoo/corrupt.safetensors}}
          - {{src: zoo/wide.pt, dst: out/zoo/wide.safetensors, target: {{kwargs: {{channels: 5}}}}}}
        """,
    )
    return jobs, expected


def read_output(path: Path) -> dict[str, torch.Tensor]:
    """The output's tensors in the order they lie in the file (older safetensors releases sort by name)."""
    if path.suffix == ".safetensors":
        loaded = load_file(str(path))
        header = json.loads(path.read_bytes()[8 : 8 + int.from_bytes(path.read_bytes()[:8], "little")])
        order = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
        return {k: loaded[k] for k in order}
    return torch.load(path, weights_only=True)


def assert_outputs(root: Path, expected: dict[str, int]) -> None:
    for label, seed in expected.items():
        got, want = read_output(root / label), weights(seed)
        assert list(got) == list(want), label
        for key in want:
            assert torch.equal(got[key], want[key]), f"{label}: {key}"
    for label in BROKEN:
        assert not (root / label).exists()


def by_status(doc: dict[str, Any], status: str) -> list[str]:
    return [job["job"] for job in doc["jobs"] if job["status"] == status]


def test_twenty_jobs_two_broken_then_resume_then_one_source_changed(tmp_path: Path, run_cli) -> None:
    jobs, expected = make_tree(tmp_path)
    first = run_cli("batch", jobs, "-j", "2")
    assert first.code == 1, first.err
    report = json.loads((tmp_path / "jobs.report.json").read_text())
    assert report["counts"] == {"converted": 18, "skipped": 0, "planned": 0, "failed": 2, "interrupted": 0}
    assert len(report["jobs"]) == 20 and report["workers"] == 2
    workers = {job["worker"] for job in report["jobs"]}
    # worker processes, not this one (how many of the two get work depends on timing: jobs take ~50 ms)
    assert 1 <= len(workers) <= 2 and f"{socket.gethostname()}:{os.getpid()}" not in workers
    failed = {job["job"]: job for job in report["jobs"] if job["status"] == "failed"}
    assert set(failed) == BROKEN
    corrupt, wide = failed["out/zoo/corrupt.safetensors"], failed["out/zoo/wide.safetensors"]
    assert corrupt["error_type"] == "SourceError" and corrupt["phase"] == "plan"
    assert "the zip archive is truncated or corrupt" in corrupt["error"]
    assert wide["error_type"] == "ValidationFailed" and wide["phase"] == "plan"
    assert "conv.weight: have [4, 3, 3, 3], target wants [5, 3, 3, 3]" in wide["error"]
    assert wide["validation"]["shape_mismatches"][0]["key"] == "conv.weight"
    table = first.out.splitlines()
    assert table[0].split() == ["job", "status", "time", "bytes", "error"]
    rows = {line.split()[0]: line for line in table[2:22]}
    assert set(rows) == set(expected) | BROKEN
    assert (
        "does not fit tests.helpers.models:tiny_net(channels=5): 7 shape mismatches" in rows["out/zoo/wide.safetensors"]
    )
    assert "jobs.yaml:12:5 jobs[8] -> out/zoo/wide.safetensors (plan):" in first.out
    assert "20 jobs: 18 converted, 2 failed in" in first.out
    assert_outputs(tmp_path, expected)
    stamps = {label: (tmp_path / label).stat().st_mtime_ns for label in expected}

    again = run_cli("batch", jobs, "--resume", "--json")
    assert again.code == 1
    assert again.json["counts"]["skipped"] == 18 and again.json["counts"]["converted"] == 0
    assert set(by_status(again.json, "failed")) == BROKEN
    assert stamps == {label: (tmp_path / label).stat().st_mtime_ns for label in expected}

    save_ddp(tmp_path / "sweep/run03/checkpoint-best.pth", 99)
    third = run_cli("batch", jobs, "--resume", "--json")
    assert third.code == 1
    assert by_status(third.json, "converted") == ["out/run03/checkpoint-best.safetensors"]
    assert third.json["jobs"][3]["reason"] == "changed: source"
    assert len(by_status(third.json, "skipped")) == 17
    assert_outputs(tmp_path, {**expected, "out/run03/checkpoint-best.safetensors": 99})


def test_dask_local_cluster_gives_the_same_outputs(tmp_path: Path, run_cli) -> None:
    local_jobs, expected = make_tree(tmp_path / "local")
    dask_jobs, _ = make_tree(tmp_path / "dask")
    assert run_cli("batch", local_jobs).code == 1
    # Without --scheduler, ckptx starts (and stops) a LocalCluster of -j worker processes, one thread each.
    result = run_cli("batch", dask_jobs, "--executor", "dask", "-j", "2", "--json")
    assert result.code == 1, result.err
    assert result.json["executor"] == "dask"
    assert len({job["worker"] for job in result.json["jobs"]} - {f"{socket.gethostname()}:{os.getpid()}"}) == 2
    assert set(by_status(result.json, "converted")) == set(expected)
    assert set(by_status(result.json, "failed")) == BROKEN
    assert_outputs(tmp_path / "dask", expected)
    for label in expected:
        a, b = read_output(tmp_path / "local" / label), read_output(tmp_path / "dask" / label)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_dask_scheduler_address_runs_on_that_cluster(tmp_path: Path, run_cli) -> None:
    from distributed import LocalCluster

    jobs = small_tree(tmp_path)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        result = run_cli("batch", jobs, "--executor", "dask", "--scheduler", cluster.scheduler_address, "--json")
        resumed = run_cli(
            "batch", jobs, "--executor", "dask", "--scheduler", cluster.scheduler_address, "--resume", "--json"
        )
    assert result.code == 0, result.err
    assert result.json["counts"]["converted"] == 2 and resumed.json["counts"]["skipped"] == 2
    assert read_output(tmp_path / "out/b.pth").keys() == weights(2).keys()


def test_dry_run_plans_everything_and_writes_nothing(tmp_path: Path, run_cli) -> None:
    jobs, expected = make_tree(tmp_path)
    result = run_cli("batch", jobs, "--dry-run", "--json")
    assert result.code == 1
    assert result.json["counts"]["planned"] == 18 and set(by_status(result.json, "failed")) == BROKEN
    assert result.json["report"] is None
    assert not (tmp_path / "out").exists() and not (tmp_path / "jobs.report.json").exists()


def small_tree(root: Path, extra: str = "") -> Path:
    """Two jobs (a safetensors and a torch output) from two sources; `extra` adds keys to both jobs."""
    write(root / "strip.yaml", STRIP)
    save_ddp(root / "a.pt", 1)
    save_ddp(root / "b.pt", 2)
    return small_jobs(root, extra)


def small_jobs(root: Path, extra: str = "") -> Path:
    return write(
        root / "jobs.yaml",
        f"""
        ckptx: 1
        defaults: {{rules: strip.yaml, target: {{model: '{TINY_TARGET}'}}}}
        jobs:
          - {{src: a.pt, dst: out/a.safetensors{extra}}}
          - {{src: b.pt, dst: out/b.pth{extra}}}
        """,
    )


def test_outputs_record_their_fingerprint(tmp_path: Path) -> None:
    result = run_batch(small_tree(tmp_path))
    assert [r.status for r in result.results] == ["converted", "converted"]
    with safe_open(str(tmp_path / "out/a.safetensors"), "pt") as f:
        recorded = json.loads(f.metadata()[FINGERPRINT_KEY])
    stat = (tmp_path / "a.pt").stat()
    assert recorded["source"] == {"path": "a.pt", "files": [["a.pt", stat.st_size, stat.st_mtime_ns]]}
    assert recorded["rules"][0][0] == "strip" and len(recorded["rules"][0][1]) == 64
    assert recorded["target"] == {"model": TINY_TARGET} and recorded["format"] == "safetensors"
    sidecar = json.loads(sidecar_path(tmp_path / "out/b.pth").read_text())
    assert sidecar["output"]["size"] == (tmp_path / "out/b.pth").stat().st_size
    assert sidecar["fingerprint"]["format"] == "torch"


def test_existing_outputs_need_resume_or_force(tmp_path: Path) -> None:
    jobs = small_tree(tmp_path)
    run_batch(jobs)
    again = run_batch(jobs)
    assert [r.status for r in again.results] == ["failed", "failed"]
    assert "already exists (written by ckptx); pass --resume" in again.results[0].error
    (tmp_path / "out/a.safetensors").write_bytes(b"someone else's file")
    resumed = run_batch(jobs, resume=True)
    assert [r.status for r in resumed.results] == ["failed", "skipped"]
    assert "not written by ckptx batch" in resumed.results[0].error
    forced = run_batch(small_jobs(tmp_path, ", force: true"), resume=True)
    assert [(r.status, r.reason) for r in forced.results] == [
        ("converted", "overwritten (force: true)"),
        ("skipped", "up to date"),
    ]


def test_resume_redoes_jobs_whose_recipe_or_output_changed(tmp_path: Path) -> None:
    jobs = small_tree(tmp_path)
    run_batch(jobs)
    with open(tmp_path / "strip.yaml", "a", encoding="utf-8") as f:
        f.write("description: now with a description\n")
    redone = run_batch(jobs, resume=True)
    assert [(r.status, r.reason) for r in redone.results] == [("converted", "changed: rule files")] * 2
    torch.save({"not": torch.zeros(1)}, tmp_path / "out/b.pth")  # replaced behind ckptx's back
    again = run_batch(jobs, resume=True)
    assert [(r.status, r.reason) for r in again.results] == [
        ("skipped", "up to date"),
        ("converted", "changed: output"),
    ]
    assert read_output(tmp_path / "out/b.pth").keys() == weights(2).keys()


def test_library_reports_progress_and_json_ready_results(tmp_path: Path) -> None:
    events: list[tuple[str, int, int, int]] = []
    result = run_batch(small_tree(tmp_path), progress=lambda *event: events.append(event))
    assert events == [("plan", 1, 2, 0), ("plan", 2, 2, 0), ("write", 1, 2, 0), ("write", 2, 2, 0)]
    doc = json.loads(json.dumps(result.to_dict()))
    assert doc["ok"] and doc["counts"]["converted"] == 2 and doc["bytes_written"] > 0


def test_format_picks_the_extension_of_a_dst_without_one(tmp_path: Path) -> None:
    write(tmp_path / "strip.yaml", STRIP)
    for name in ("convnext.tiny.pt", "b.pt"):
        (tmp_path / "src" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / name).write_bytes(b"")
    jobs = write(
        tmp_path / "jobs.yaml",
        """
        ckptx: 1
        defaults: {rules: strip.yaml, dst: 'out/{stem}', format: torch}
        jobs:
          - {src: src/convnext.tiny.pt}
          - {src: src/b.pt, format: safetensors}
          - {glob: 'src/b.*', dst: 'other/{name}.bin'}
        """,
    )
    loaded = load_jobs(jobs)
    assert [(j.label, j.format) for j in loaded.jobs] == [
        ("out/convnext.tiny.pth", "torch"),
        ("out/b.safetensors", "safetensors"),
        ("other/b.pt.bin", "torch"),
    ]


def test_targets_merge_key_by_key() -> None:
    defaults = {"model": "timm:create_model", "kwargs": {"pretrained": False}, "allow_missing": "head"}
    assert merge_targets(defaults, {"kwargs": {"model_name": "atto"}}) == {
        "model": "timm:create_model",
        "kwargs": {"pretrained": False, "model_name": "atto"},
        "allow_missing": "head",
    }
    assert merge_targets(defaults, {"manifest": "m.json"}) == {"manifest": "m.json", "allow_missing": "head"}
    assert merge_targets(None, None) is None


def test_bad_worker_count_is_a_usage_error(tmp_path: Path, run_cli) -> None:
    result = run_cli("batch", small_tree(tmp_path), "-j", "0")
    assert result.code == 2 and result.err == "ckptx: error: -j 0: need at least 1 worker\n"


@pytest.mark.parametrize("case", INVALID, ids=[p.name for p in INVALID])
def test_invalid_jobs_file_reports_every_problem(case: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(case)
    with pytest.raises(RuleError) as caught:
        load_jobs("jobs.yaml")
    assert str(caught.value) + "\n" == (case / "expected.txt").read_text(encoding="utf-8")


def test_invalid_jobs_file_exits_2_before_any_job_runs(run_cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(CASES / "invalid" / "same-dst")
    result = run_cli("batch", "jobs.yaml")
    assert result.code == 2 and result.out == ""
    assert result.err.startswith("ckptx: error: ")
    assert not os.path.exists("jobs.report.json")


def test_a_job_that_kills_its_worker_fails_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "mods" / "crashing_target.py", "import os\n\n\ndef boom():\n    os._exit(3)\n")
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))  # worker processes take this process's sys.path
    write(tmp_path / "strip.yaml", STRIP)
    for i in range(4):
        save_ddp(tmp_path / f"zoo/m{i}.pt", i)
    jobs = write(
        tmp_path / "jobs.yaml",
        f"""
        ckptx: 1
        defaults: {{rules: strip.yaml, target: {{model: '{TINY_TARGET}'}}}}
        jobs:
          - {{src: zoo/m0.pt, dst: out/crash, target: {{model: 'crashing_target:boom'}}}}
          - {{glob: 'zoo/m*.pt', dst: 'out/{{stem}}'}}
        """,
    )
    result = run_batch(jobs, workers=2)
    assert [(r.job.label, r.status) for r in result.results] == [("out/crash.safetensors", "failed")] + [
        (f"out/m{i}.safetensors", "converted") for i in range(4)
    ]
    assert result.results[0].error_type == "worker-lost" and "died twice" in result.results[0].error


def test_a_sharded_source_is_fingerprinted_with_every_shard(tmp_path: Path) -> None:
    from ckptx.batch.fingerprint import source_files

    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        (tmp_path / name).write_bytes(b"x" * len(name))
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(
        json.dumps(
            {
                "weight_map": {
                    "a": "model-00001-of-00002.safetensors",
                    "b": "model-00002-of-00002.safetensors",
                    "c": "model-00001-of-00002.safetensors",
                }
            }
        )
    )
    names = [entry[0] for entry in source_files(index)]
    assert names == [index.name, "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]


def test_a_worker_shares_the_cores_without_importing_torch() -> None:
    probe = (
        "import os, sys\n"
        "from ckptx.batch.runner import _share_cores\n"
        "_share_cores(2)\n"
        "before = 'torch' in sys.modules\n"
        "import torch\n"
        "print(before, torch.get_num_threads(), max(1, (os.cpu_count() or 1) // 2))\n"
    )
    env = {k: v for k, v in subprocess_env().items() if k != "OMP_NUM_THREADS"}
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    before, threads, expected = done.stdout.split()
    assert before == "False" and threads == expected
