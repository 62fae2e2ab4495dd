"""How a machine's cores are shared: kernel threads per process, and N worker processes taking their share."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ckptx.workers.cores import MAX_THREADS, THREADS_VARIABLE, available_cores, kernel_threads
from tests.conftest import subprocess_env


def test_kernel_threads_are_the_cores_at_most_max_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(THREADS_VARIABLE, raising=False)
    assert kernel_threads() == min(MAX_THREADS, available_cores())


@pytest.mark.parametrize(("value", "expected"), [("3", 3), ("1", 1), ("0", None), ("x", None)])
def test_the_threads_variable_sets_them_when_it_is_a_positive_number(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: int | None
) -> None:
    monkeypatch.setenv(THREADS_VARIABLE, value)
    assert kernel_threads() == (expected or min(MAX_THREADS, available_cores()))


def test_a_worker_of_n_takes_its_share_of_the_cores_for_kernels_and_torch() -> None:
    probe = (
        "import os, sys\n"
        "from ckptx.workers.cores import kernel_threads, share_cores, available_cores\n"
        "share_cores(2)\n"
        "expected = max(1, available_cores() // 2)\n"
        "print('torch' in sys.modules, kernel_threads(), os.environ['OMP_NUM_THREADS'], expected)\n"
    )
    env = {k: v for k, v in subprocess_env().items() if k not in ("OMP_NUM_THREADS", THREADS_VARIABLE)}
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    torch_loaded, threads, omp, expected = done.stdout.split()
    assert torch_loaded == "False" and int(threads) == int(omp) == int(expected)
