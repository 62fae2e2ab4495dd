"""Findings from a tensor's own values (its statistics), needing neither the source nor a recipe: NaN and infinite
values, and a floating-point tensor of two or more elements that is all zero or constant where the target does
not initialize it so (without a target: all zero is a finding, another constant is not, since a norm weight of
ones is normal)."""

from __future__ import annotations

from ckptx.check.findings import Finding
from ckptx.check.init_like import InitReference
from ckptx.dtypes import DTYPES
from ckptx.io.digest import TensorStats

__all__ = ["value_findings"]


def value_findings(key: str, dtype: str, stats: TensorStats | None, init: InitReference | None) -> list[Finding]:
    """The value findings of one tensor (`init`: the target's initialization of it, when known)."""
    if stats is None or stats.count == 0:
        return []
    info = DTYPES.get(dtype)
    if info is None or info.kind not in ("float", "complex"):
        return []
    found = []
    if stats.nan:
        found.append(Finding(key, "nan", f"{stats.nan:,} NaN of {stats.count:,} elements"))
    if stats.inf:
        found.append(Finding(key, "inf", f"{stats.inf:,} infinite of {stats.count:,} elements"))
    if stats.count < 2:
        return found
    target_constant = init is not None and init.kind == "constant"
    if stats.all_zero and not (target_constant and init is not None and init.value == 0):
        why = f"the target initializes it to {_init_text(init)}" if init is not None else "no target given"
        found.append(Finding(key, "zeros", f"all {stats.count:,} elements are 0 ({why})"))
    elif stats.constant and not stats.all_zero and init is not None and init.kind != "constant":
        found.append(
            Finding(key, "constant", f"all {stats.count:,} elements are {stats.min:g} (the target initializes it "
                    f"to {_init_text(init)})")
        )  # fmt: skip
    return found


def _init_text(init: InitReference | None) -> str:
    if init is None:
        return "something else"
    if init.kind == "constant":
        return f"the constant {init.value:g}"
    if init.kind == "fixed":
        return "fixed non-constant values"
    return f"random values (mean {init.mean:.3g}, std {init.var**0.5:.3g})"
