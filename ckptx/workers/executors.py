"""Where tasks run: in this process, in a pool of worker processes, or on a Dask cluster. `ckptx batch` runs its
jobs through a runner; a conversion with `workers` runs its work units through one.

A runner's `run(fn, items)` yields `(index, outcome)` as tasks finish, in any order; the outcome is what
`fn` returned, the exception it raised, or a WorkerLost when its worker went away (a dead worker process, a Dask
KilledWorker). Dask is imported only by `DaskRunner`. `same_machine` tells whether the tasks run on this machine
(sharing its page cache: a file written by a task needs no fsync of its own before this process reads it).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from typing import Any, Protocol

from ckptx.errors import CkptxError, WorkerLost
from ckptx.workers.cores import available_cores, share_cores

EXECUTORS = ("local", "dask")
Outcome = Any


class Runner(Protocol):
    """Runs one function over many items and yields `(index, outcome)` as each finishes."""

    same_machine: bool
    capacity: int
    """How many tasks run at a time (0: not known)."""

    def run(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> Iterator[tuple[int, Outcome]]:
        """Run `fn(item)` for every item."""
        ...  # pragma: no cover

    def close(self, *, cancel: bool = False) -> None:
        """Stop whatever the runner started (at once, dropping queued tasks, with `cancel`)."""
        ...  # pragma: no cover


class InlineRunner:
    """Runs tasks one after another in this process (`-j 1`): no start-up cost, easiest to debug."""

    same_machine = True
    capacity = 1

    def run(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> Iterator[tuple[int, Outcome]]:
        """Run `fn(item)` for every item, in order."""
        for index, item in enumerate(items):
            yield index, _call(fn, item)

    def close(self, *, cancel: bool = False) -> None:
        """Nothing to stop."""


class PoolRunner:
    """A pool of `workers` processes, forked from this process only when that is safe and cheap, else from a
    fork server (torch is not fork-safe).

    This process is forked when it has not imported torch, runs no other thread and is small (FORK_RSS_LIMIT:
    a child that collects garbage writes to every inherited object, copying a large parent's memory page by
    page). Otherwise, where the platform has it, the 'forkserver' start method is used with `preload` imported
    once in the server, so the workers share one torch import instead of each importing it; elsewhere 'spawn'.
    Starting two workers took 0.03-0.05 s forked and 1.0-1.3 s through a fork server that imports ckptx and
    numpy (2-core machine under load; the fork server's start-up is a new interpreter and its imports).
    At most two tasks per worker are queued at a time, so a worker that dies (out of memory, a crash)
    loses only those; the pool is then replaced and the other tasks go on.
    """

    same_machine = True

    def __init__(
        self, workers: int, preload: Sequence[str] = (), initializer: Callable[[int], None] | None = None
    ) -> None:
        self.workers = workers
        self.capacity = workers
        self.preload = list(preload)
        self.initializer = initializer
        self._pool: ProcessPoolExecutor | None = None

    def _context(self) -> multiprocessing.context.BaseContext:
        if can_fork():
            return multiprocessing.get_context("fork")
        if "forkserver" not in multiprocessing.get_all_start_methods():
            return multiprocessing.get_context("spawn")
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(self.preload)  # no effect once this process's forkserver runs
        return context

    def _started(self) -> ProcessPoolExecutor:
        if self._pool is None:
            initializer = self.initializer
            self._pool = (
                ProcessPoolExecutor(
                    self.workers, mp_context=self._context(), initializer=initializer, initargs=(self.workers,)
                )
                if initializer is not None
                else ProcessPoolExecutor(self.workers, mp_context=self._context())
            )
        return self._pool

    def run(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> Iterator[tuple[int, Outcome]]:
        """Run every item on the pool; yield outcomes as they complete."""
        queue = deque(range(len(items)))
        futures: dict[Future[Any], int] = {}
        while queue or futures:
            while queue and len(futures) < 2 * self.workers:
                try:
                    future = self._started().submit(fn, items[queue[0]])
                except BrokenProcessPool:
                    self._discard()
                    break
                futures[future] = queue.popleft()
            done, _ = wait(futures, return_when=FIRST_COMPLETED)
            for future in done:
                yield futures.pop(future), self._outcome(future)

    def _outcome(self, future: Future[Any]) -> Outcome:
        try:
            return future.result()
        except BrokenProcessPool as exc:
            self._discard()
            return WorkerLost(f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # noqa: BLE001 - e.g. an unpicklable result; that task's outcome
            return exc

    def _discard(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def close(self, *, cancel: bool = False) -> None:
        """Stop the workers (at once, dropping queued tasks, with `cancel`)."""
        if self._pool is not None:
            self._pool.shutdown(wait=not cancel, cancel_futures=cancel)
            self._pool = None


FORK_RSS_LIMIT = 256 * 1024 * 1024


def can_fork() -> bool:
    """Whether worker processes may be forked from this one: the platform forks, torch is not imported, no other
    thread runs (a lock it holds would stay locked in the child) and this process is smaller than FORK_RSS_LIMIT."""
    if "fork" not in multiprocessing.get_all_start_methods() or "torch" in sys.modules:
        return False
    if threading.active_count() > 1:
        return False
    return 0 < resident_bytes() < FORK_RSS_LIMIT


def resident_bytes() -> int:
    """This process's resident memory now (0 where /proc does not say)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _call(fn: Callable[[Any], Any], item: Any) -> Outcome:
    """`fn(item)` in this process; an exception is the task's outcome."""
    try:
        return fn(item)
    except Exception as exc:  # noqa: BLE001 - reported as that task's outcome
        return exc


class DaskRunner:
    """Tasks on a Dask distributed cluster: an existing scheduler, or a LocalCluster of `workers` processes."""

    same_machine = False

    def __init__(self, workers: int, scheduler: str | None, *, wait_seconds: float = 60.0) -> None:
        try:
            import distributed
        except ImportError:
            raise CkptxError("--executor dask needs Dask, an optional dependency: pip install 'ckptx[dask]'") from None
        self._distributed = distributed
        self._cluster = None
        self.capacity = 0
        if scheduler:
            try:
                self.client = distributed.Client(scheduler, timeout="10s")
            except (OSError, TimeoutError) as exc:
                raise CkptxError(
                    f"cannot reach the Dask scheduler at {scheduler} ({exc}); is `dask scheduler` "
                    "running there and reachable from this machine?"
                ) from None
        else:
            try:
                self._cluster = distributed.LocalCluster(
                    n_workers=workers,
                    threads_per_worker=1,
                    processes=True,
                    dashboard_address=None,
                    silence_logs=logging.ERROR,
                )
            except Exception as exc:  # noqa: BLE001 - Dask raises RuntimeError and friends
                raise CkptxError(
                    f"could not start a Dask LocalCluster of {workers} worker processes "
                    f"({type(exc).__name__}: {exc}); run from a script file or module, or use "
                    "--scheduler ADDRESS"
                ) from None
            self.client = distributed.Client(self._cluster)
        try:
            self._check_workers(scheduler, wait_seconds)
        except BaseException:
            self.close()
            raise

    def _check_workers(self, scheduler: str | None, wait_seconds: float) -> None:
        from ckptx._version import __version__

        try:
            self.client.wait_for_workers(1, timeout=wait_seconds)
        except TimeoutError:
            raise CkptxError(
                f"no Dask worker joined the scheduler {scheduler} within {wait_seconds:.0f} s; "
                "start workers with `dask worker ADDRESS`"
            ) from None
        try:
            versions = self.client.run(_ckptx_version)
        except Exception as exc:  # noqa: BLE001 - whatever the workers raised
            raise CkptxError(
                f"the Dask workers cannot run ckptx ({type(exc).__name__}: {exc}); install ckptx "
                f"{__version__} in the workers' environment"
            ) from None
        wrong = sorted(f"{worker} has {version}" for worker, version in versions.items() if version != __version__)
        if wrong:
            raise CkptxError(
                f"the Dask workers run another ckptx than this {__version__}: {', '.join(wrong)}; "
                "install the same version everywhere"
            )
        workers = self.client.scheduler_info().get("workers", {})
        try:
            self.client.run(_share_host_cores, slots_by_worker(workers))
        except Exception as exc:  # noqa: BLE001 - whatever the workers raised
            raise CkptxError(
                f"the Dask workers cannot run this ckptx ({type(exc).__name__}: {exc}); install ckptx "
                f"{__version__} from the same source in the workers' environment"
            ) from None
        self.capacity = sum(int(info.get("nthreads") or 1) for info in workers.values())

    def run(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> Iterator[tuple[int, Outcome]]:
        """Submit every item to the cluster, then yield outcomes as they complete."""
        futures = [self.client.submit(fn, item, pure=False) for item in items]
        index = {future.key: i for i, future in enumerate(futures)}
        for future in self._distributed.as_completed(futures):
            try:
                yield index[future.key], future.result()
            except self._distributed.KilledWorker as exc:
                yield index[future.key], WorkerLost(f"{type(exc).__name__}: {exc}")
            except Exception as exc:  # noqa: BLE001 - what the task raised, or lost data...: that task's outcome
                yield index[future.key], exc

    def close(self, *, cancel: bool = False) -> None:
        """Disconnect; stop the LocalCluster if this runner started it."""
        self.client.close()
        if self._cluster is not None:
            self._cluster.close()


def _ckptx_version() -> str:
    from ckptx._version import __version__

    return __version__


def slots_by_worker(workers: dict[str, Any]) -> dict[str, int]:
    """Worker address -> the task slots (threads) of all Dask workers on its host: what shares that host's cores."""
    per_host: dict[str, int] = {}
    for address, info in workers.items():
        host = str(info.get("host") or address.rsplit(":", 1)[0])
        per_host[host] = per_host.get(host, 0) + int(info.get("nthreads") or 1)
    return {address: per_host[str(info.get("host") or address.rsplit(":", 1)[0])] for address, info in workers.items()}


def _share_host_cores(slots: dict[str, int], dask_worker: Any = None) -> None:
    """Run in every Dask worker: take this worker's share of its host's cores (see ckptx.workers.cores)."""
    address = getattr(dask_worker, "address", None)
    share_cores(slots.get(address, 1) if address is not None else 1)


def resolve_workers(workers: int | str) -> int:
    """`--workers N` or `auto` (the cores this process may run on) as a number; CkptxError for anything else."""
    if workers == "auto":
        return available_cores()
    try:
        count = int(workers)
    except (TypeError, ValueError):
        raise CkptxError(f"--workers {workers}: give a number of worker processes or 'auto'") from None
    if count < 1:
        raise CkptxError(f"--workers {workers}: need at least 1 worker")
    return count


def check_runner_options(executor: str, workers: int, scheduler: str | None = None) -> None:
    """Refuse an unknown executor, fewer than one worker, or a scheduler without dask (CkptxError)."""
    if executor not in EXECUTORS:
        raise CkptxError(f"unknown executor '{executor}'; use one of {', '.join(EXECUTORS)}")
    if workers < 1:
        raise CkptxError(f"-j {workers}: need at least 1 worker")
    if scheduler and executor != "dask":
        raise CkptxError("--scheduler needs --executor dask")


@contextmanager
def open_runner(
    executor: str,
    workers: int,
    scheduler: str | None = None,
    preload: Sequence[str] = (),
    initializer: Callable[[int], None] | None = None,
) -> Iterator[Runner]:
    """The runner for `--executor`/`-j`/`--scheduler`; stopped on exit (at once on an interrupt).

    For a local pool: `preload` names the modules the task functions live in (imported once, ahead, in
    the forkserver) and `initializer(workers)` runs first in each worker process.
    """
    check_runner_options(executor, workers, scheduler)
    if executor == "dask":
        runner: Runner = DaskRunner(workers, scheduler)
    else:
        runner = InlineRunner() if workers == 1 else PoolRunner(workers, preload, initializer)
    try:
        yield runner
    except BaseException:
        runner.close(cancel=True)
        raise
    runner.close()
