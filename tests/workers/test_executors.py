"""Executors: `--workers N|auto`, and how Dask workers on one host share its cores."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ckptx.errors import CkptxError
from ckptx.workers.cores import available_cores
from ckptx.workers.executors import resolve_workers, slots_by_worker
from tests.conftest import subprocess_env


@pytest.mark.parametrize(("given", "expected"), [(1, 1), ("3", 3), (8, 8)])
def test_a_number_of_workers_is_taken_as_it_is(given: int | str, expected: int) -> None:
    assert resolve_workers(given) == expected


def test_auto_is_the_cores_this_process_may_use() -> None:
    assert resolve_workers("auto") == available_cores()


@pytest.mark.parametrize(("given", "message"), [(0, "need at least 1 worker"), ("many", "a number of worker")])
def test_fewer_than_one_or_not_a_number_is_refused(given: int | str, message: str) -> None:
    with pytest.raises(CkptxError, match=message):
        resolve_workers(given)


def test_dask_workers_on_one_host_share_its_cores_by_their_task_slots() -> None:
    workers = {
        "tcp://10.0.0.1:4001": {"host": "10.0.0.1", "nthreads": 1},
        "tcp://10.0.0.1:4002": {"host": "10.0.0.1", "nthreads": 2},
        "tcp://10.0.0.2:4001": {"host": "10.0.0.2", "nthreads": 1},
    }
    assert slots_by_worker(workers) == {"tcp://10.0.0.1:4001": 3, "tcp://10.0.0.1:4002": 3, "tcp://10.0.0.2:4001": 1}


def test_a_small_process_without_torch_forks_its_workers_and_one_with_torch_uses_a_fork_server() -> None:
    probe = (
        "import sys\n"
        "from ckptx.workers.executors import PoolRunner\n"
        "first = PoolRunner(2)._context().get_start_method()\n"
        "import torch\n"
        "print(first, PoolRunner(2)._context().get_start_method())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], env=subprocess_env(), capture_output=True, text=True, check=True
    )
    assert done.stdout.split() == ["fork", "forkserver"]


def test_a_forked_pool_runs_the_tasks_and_shares_the_cores() -> None:
    probe = (
        "import os\n"
        "from ckptx.workers.cores import share_cores, kernel_threads\n"
        "from ckptx.workers.executors import PoolRunner\n"
        "runner = PoolRunner(2, initializer=share_cores)\n"
        "found = sorted(runner.run(abs, [-1, -2, -3]))\n"
        "runner.close()\n"
        "print(runner._context().get_start_method(), found)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], env=subprocess_env(), capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "fork [(0, 1), (1, 2), (2, 3)]"
