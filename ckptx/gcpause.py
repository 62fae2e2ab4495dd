"""Pause Python's cyclic garbage collector around metadata work that allocates many objects and makes no cycles.

With 100,000 tensors, each full collection walks every plan entry again; planning a large checkpoint spent
a third of its time there. Reference counting still frees everything as usual.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from typing import TypeVar, cast

F = TypeVar("F", bound=Callable[..., object])


@contextmanager
def gc_paused() -> Iterator[None]:
    """Disable the cyclic collector inside the block; restore its previous state after."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def without_gc(function: F) -> F:
    """Decorator: run `function` with the cyclic collector paused."""

    @wraps(function)
    def wrapper(*args: object, **kwargs: object) -> object:
        with gc_paused():
            return function(*args, **kwargs)

    return cast(F, wrapper)
