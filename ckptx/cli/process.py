"""What the command line does to its own process while a command runs: stdout is kept for ckptx's output (what
libraries print goes to stderr), and SIGTERM is handled as Ctrl-C (the same clean-up, the same message)."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import sys
import threading
from collections.abc import Iterator
from types import FrameType
from typing import TextIO

__all__ = ["own_stdout", "terminate_as_interrupt"]


@contextlib.contextmanager
def own_stdout(out: TextIO, err: TextIO) -> Iterator[TextIO]:
    """Yield the stream a command writes its output to; meanwhile everything else that would reach stdout goes to
    `err`: `print` and logging handlers of libraries (mmengine's and DeepSpeed's loggers write to stdout), and, when
    `out` is the process's stdout, writes to file descriptor 1 from anywhere (C code, handlers holding the old
    `sys.stdout`). So `--json` output is JSON alone, whatever a model factory or a reader logs."""
    descriptor = _stdout_descriptor(out, err)
    if descriptor is None:
        with contextlib.redirect_stdout(err):
            yield out
        return
    out.flush()
    saved = os.dup(descriptor)
    own = io.TextIOWrapper(
        io.FileIO(os.dup(saved), "w"),
        encoding=getattr(out, "encoding", None) or "utf-8",
        errors=getattr(out, "errors", None) or "strict",
        line_buffering=True,
    )
    os.dup2(err.fileno(), descriptor)
    try:
        with contextlib.redirect_stdout(err):
            yield own
    finally:
        own.flush()
        own.close()
        _flush(out)  # what a library wrote into the old stdout's buffer goes to stderr, where fd 1 points now
        os.dup2(saved, descriptor)
        os.close(saved)


def _stdout_descriptor(out: TextIO, err: TextIO) -> int | None:
    """1 when `out` is the process's stdout and `err` has a file descriptor of its own; else None."""
    if out is not sys.stdout and out is not sys.__stdout__:
        return None
    try:
        fd, err_fd = out.fileno(), err.fileno()
    except (AttributeError, OSError, ValueError):  # a captured stream without a descriptor
        return None
    return fd if fd == 1 and err_fd != fd else None


def _flush(stream: TextIO) -> None:
    with contextlib.suppress(OSError, ValueError):
        stream.flush()


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """While the block runs, SIGTERM raises KeyboardInterrupt, as Ctrl-C does: partial outputs are removed and
    the command says so. A second SIGTERM during that clean-up is ignored. Only the main thread can install
    signal handlers; elsewhere (a library calling `main` from a thread) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
