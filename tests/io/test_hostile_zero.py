"""ZeRO folders held to the single-file standard: DeepSpeed ZeRO-2/3 folders from a 2-rank CPU run, each changed in
one hostile way, run through the command line in their own process with the six properties of
`tests/helpers/hostile.Guard` checked (see tests/io/test_hostile_multi.py for DCP folders and shard indexes). These
tests need DeepSpeed, so the floor versions' run leaves this module out (Makefile FLOOR_IGNORE).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.helpers.deepspeed_train import launch
from tests.helpers.hostile import (
    GIB,
    Case,
    add_record,
    copy_seed,
    deep_list,
    deep_tuple_key,
    int_opcodes,
    jobs_file,
    new_case,
    payload_pickle,
    read_pickle_record,
    rewrite_zip,
    splice_after,
    tensor_equal,
    tensor_opcodes,
)

HELPERS = Path(__file__).resolve().parents[1] / "helpers"
TAG = "global_step2"
DEEP = 200_000


@pytest.fixture(scope="session")
def zero_seed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ZeRO-2 and ZeRO-3 folders (`zero2-fp32`, `zero3-fp32`) from one 2-rank DeepSpeed run on the CPU."""
    root = tmp_path_factory.mktemp("hostile-zero")
    launch(root, stages=(2, 3), dtypes=("fp32",), width=13)
    return root


@pytest.fixture
def case(tmp_path: Path) -> Case:
    return new_case(tmp_path)


# ---- DeepSpeed ZeRO ---------------------------------------------------------------------------------------------


def _rank_file(folder: Path, name: str) -> Path:
    return folder / TAG / name


OPTIM0 = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
OPTIM1 = "zero_pp_rank_1_mp_rank_00_optim_states.pt"
MODEL2 = "mp_rank_00_model_states.pt"


def _splice_data_pkl(path: Path, name: str, opcodes: bytes) -> None:
    data = read_pickle_record(path)
    rewrite_zip(path, lambda record, raw: splice_after(data, name, opcodes) if record.endswith("/data.pkl") else raw)


def zero_latest_links_to_secret(folder: Path, case: Case) -> list[object]:
    (folder / "latest").unlink()
    (folder / "latest").symlink_to(case.secret)
    return ["inspect", folder]


def zero_latest_holds_secret(folder: Path, case: Case) -> list[object]:
    (folder / "latest").write_text(case.secret.read_text())
    return ["inspect", folder]


def zero_latest_holds_a_secret_word(folder: Path, case: Case) -> list[object]:
    (folder / "latest").unlink()
    (folder / "latest").symlink_to(case.secret)
    case.secret.write_text("ckptx-hostile-secret-7c1e\n")  # one word: a tag as far as its form goes
    return ["inspect", folder]


def zero_latest_fifo(folder: Path, case: Case) -> list[object]:
    (folder / "latest").unlink()
    os.mkfifo(folder / "latest")
    return ["inspect", folder]


def zero_latest_urandom(folder: Path, case: Case) -> list[object]:
    (folder / "latest").unlink()
    (folder / "latest").symlink_to("/dev/urandom")
    return ["inspect", folder]


def zero_latest_sparse_7gib(folder: Path, case: Case) -> list[object]:
    os.truncate(folder / "latest", 7 * GIB)
    return ["inspect", folder]


def zero_rank_file_fifo(folder: Path, case: Case) -> list[object]:
    _rank_file(folder, OPTIM1).unlink()
    os.mkfifo(_rank_file(folder, OPTIM1))
    return ["inspect", folder]


def zero_rank_file_urandom(folder: Path, case: Case) -> list[object]:
    _rank_file(folder, OPTIM1).unlink()
    _rank_file(folder, OPTIM1).symlink_to("/dev/urandom")
    return ["inspect", folder]


def zero_payload_in_rank_file(folder: Path, case: Case) -> list[object]:
    rewrite_zip(
        _rank_file(folder, OPTIM1), lambda name, raw: payload_pickle(case.marker) if name.endswith("/data.pkl") else raw
    )
    return ["inspect", folder]


def zero_payload_inside_model_states(folder: Path, case: Case) -> list[object]:
    _splice_data_pkl(_rank_file(folder, MODEL2), "ds_version", payload_pickle(case.marker)[2:-1])
    return ["inspect", folder]


def _zero_value(name: str, file: str, opcodes: bytes) -> Callable[[Path, Case], list[object]]:
    def mutate(folder: Path, case: Case) -> list[object]:
        _splice_data_pkl(_rank_file(folder, file), name, opcodes)
        return ["inspect", folder]

    return mutate


def zero_rank_file_inflates(folder: Path, case: Case) -> list[object]:
    rewrite_zip(_rank_file(folder, OPTIM1), bomb=200 << 20)
    return ["convert", folder, "-o", case.root / "out.safetensors"]


def zero_buffer_is_an_expanded_view(folder: Path, case: Case) -> list[object]:
    path = _rank_file(folder, MODEL2)
    add_record(path, "hostile", bytes(4))
    expanded = tensor_opcodes("hostile", 1, (13,), (0,))  # bn.running_mean: 13 elements from 1 stored
    data = read_pickle_record(path)
    rewrite_zip(
        path, lambda name, raw: splice_after(data, "bn.running_mean", expanded) if name.endswith("/data.pkl") else raw
    )
    return ["convert", folder, "-o", case.root / "out.safetensors"]


def zero_frozen_fragment_is_an_expanded_view(folder: Path, case: Case) -> list[object]:
    path = _rank_file(folder, MODEL2)
    add_record(path, "hostile", bytes(4))
    expanded = tensor_opcodes("hostile", 1, (13, 13), (0, 0))
    data = read_pickle_record(path)
    spliced = splice_after(data, "frozen.weight", expanded, section="frozen_param_fragments")
    rewrite_zip(path, lambda name, raw: spliced if name.endswith("/data.pkl") else raw)
    return ["convert", folder, "-o", case.root / "out.safetensors"]


ZERO_CASES = {
    "latest-links-to-secret": zero_latest_links_to_secret,
    "latest-holds-secret": zero_latest_holds_secret,
    "latest-links-to-a-secret-word": zero_latest_holds_a_secret_word,
    "latest-fifo": zero_latest_fifo,
    "latest-urandom": zero_latest_urandom,
    "latest-sparse-7gib": zero_latest_sparse_7gib,
    "rank-file-fifo": zero_rank_file_fifo,
    "rank-file-urandom": zero_rank_file_urandom,
    "payload-rank-file": zero_payload_in_rank_file,
    "payload-inside-model-states": zero_payload_inside_model_states,
    "partition-count-1e9": _zero_value("partition_count", OPTIM0, int_opcodes(10**9)),
    "partition-count-1e12": _zero_value("partition_count", OPTIM0, int_opcodes(10**12)),
    "deep-zero-stage": _zero_value("zero_stage", OPTIM0, deep_list(DEEP)),
    "deep-partition-count": _zero_value("partition_count", OPTIM0, deep_list(DEEP)),
    "rank-file-inflates": zero_rank_file_inflates,
    "buffer-expanded-view": zero_buffer_is_an_expanded_view,
    "frozen-fragment-expanded-view": zero_frozen_fragment_is_an_expanded_view,
}


@pytest.mark.parametrize("mutation", ZERO_CASES.values(), ids=ZERO_CASES.keys())
def test_hostile_zero_folder_is_one_error_line(zero_seed: Path, case: Case, mutation) -> None:
    folder = copy_seed(zero_seed / "zero2-fp32", case)
    args = mutation(folder, case)
    guard = case.guard(folder)
    guard.check(case.run(*args), codes=(2,))


def test_a_dict_keyed_by_a_200k_deep_tuple_loads_without_a_crash(zero_seed: Path, case: Case) -> None:
    """Unpickling hashes the key (CPython recurses once per level): on a thread with a stack for it, not the
    process's own, which it would overflow. The dict is where ds_version goes, so the version is unknown."""
    folder = copy_seed(zero_seed / "zero2-fp32", case)
    args = _zero_value("ds_version", MODEL2, deep_tuple_key(DEEP))(folder, case)
    guard = case.guard(folder)
    outcome = case.run(*args)
    guard.check(outcome, codes=(0,))
    assert "written by deepspeed (unknown version)" in outcome.out, outcome


def test_a_deeply_nested_deepspeed_version_is_an_unknown_version(zero_seed: Path, case: Case) -> None:
    folder = copy_seed(zero_seed / "zero2-fp32", case)
    args = _zero_value("ds_version", MODEL2, deep_list(DEEP))(folder, case)
    guard = case.guard(folder)
    outcome = case.run(*args)
    guard.check(outcome, codes=(0,))
    assert "written by deepspeed (unknown version)" in outcome.out, outcome


def test_a_hostile_zero3_folder_is_one_error_line_too(zero_seed: Path, case: Case) -> None:
    folder = copy_seed(zero_seed / "zero3-fp32", case)
    _splice_data_pkl(_rank_file(folder, OPTIM0), "partition_count", int_opcodes(10**9))
    guard = case.guard(folder)
    guard.check(case.run("inspect", folder), codes=(2,))


def test_an_untouched_zero_folder_converts_to_deepspeeds_own_reading(zero_seed: Path, case: Case) -> None:
    folder = copy_seed(zero_seed / "zero3-fp32", case)
    guard = case.guard(folder)
    out = case.root / "out.safetensors"
    guard.check(case.run("convert", folder, "-o", out), codes=(0,))
    env = {**case.env, "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [sys.executable, str(HELPERS / "zero_reference.py"), str(case.root / "ref"), str(folder)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    want = torch.load(case.root / "ref" / folder.name / "pytorch_model.bin", weights_only=True)
    got = load_file(str(out))
    assert list(got) == list(want) and all(tensor_equal(got[k], want[k]) for k in want)


# ---- jobs files: a job writing over a ZeRO rank file of another job's source ---------------------------------


def test_a_job_writing_a_zero_rank_file_of_another_jobs_source_is_refused(zero_seed: Path, case: Case) -> None:
    folder = copy_seed(zero_seed / "zero2-fp32", case, "ckpt")
    other = case.root / "other.safetensors"
    save_file({"w": torch.ones(3)}, str(other))
    jobs = jobs_file(
        case,
        "  - {src: ckpt, dst: out/a.safetensors}\n"
        f"  - {{src: other.safetensors, dst: ckpt/{TAG}/{OPTIM1}, force: true}}\n",
    )
    guard = case.guard(folder, other, jobs)
    outcome = case.run("batch", jobs)
    guard.check(outcome, codes=(2,))
    assert f"output ckpt/{TAG}/{OPTIM1} is a file of the source of" in outcome.err, outcome
