"""Executors: `--workers N|auto`, and how Dask workers on one host share its cores."""

from __future__ import annotations

import pytest

from ckptx.errors import CkptxError
from ckptx.workers.cores import available_cores
from ckptx.workers.executors import resolve_workers, slots_by_worker


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
