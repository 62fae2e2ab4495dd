"""Building models on the meta device when their constructors read numbers back from tensors.

Many model builders compute a stochastic-depth schedule as `[x.item() for x in torch.linspace(...)]`
(MMPretrain's backbones, the official ConvNeXt-V2). Under `torch.device('meta')` that `.item()` fails,
and the model had to be built on the CPU with real memory: for a ConvNeXt-V2 huge, 2.6 GB and seconds
of random initialisation per build. `schedules_on_cpu()` keeps `torch.linspace` on the CPU (a few
floats) while everything else stays on meta.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["schedules_on_cpu"]

_ON_CPU = (torch.linspace,)


class _SchedulesOnCPU(TorchFunctionMode):
    """A torch function mode that builds `torch.linspace` results on the CPU, whatever the device context."""

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = dict(kwargs or {})
        if func in _ON_CPU:
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


def schedules_on_cpu() -> TorchFunctionMode:
    """A context manager: inside it, `torch.linspace` makes CPU tensors even under `torch.device('meta')`."""
    return _SchedulesOnCPU()
