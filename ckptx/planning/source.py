"""The source protocol every reader implements: tensor metadata up front, tensor data on demand, and where a
tensor's raw bytes lie when they can be copied without decoding."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ckptx.dtypes import TensorMeta

if TYPE_CHECKING:  # pragma: no cover
    import torch


@dataclass(frozen=True)
class RawSpan:
    """Where a tensor's bytes lie in a file, for copying without decoding."""

    file: str
    offset: int
    nbytes: int


@dataclass
class Source:
    """A checkpoint opened lazily: tensor metadata up front, tensor data on `load(key)`."""

    path: str
    format: str
    tensors: dict[str, TensorMeta]
    non_tensors: dict[str, str] = field(default_factory=dict)
    extracted_from: str = "."
    top_level: dict[str, str] = field(default_factory=dict)
    state_metadata: Any = None
    file_metadata: dict[str, str] = field(default_factory=dict)
    description: list[str] = field(default_factory=list)  # lines `ckptx inspect` shows (a folder's layout, ...)
    stored_as: dict[str, str] = field(default_factory=dict)  # key -> how the file stores it, when not as its dtype
    configs: dict[str, Any] = field(default_factory=dict)  # config documents in or beside it: config.json, params.json

    def load(self, key: str) -> torch.Tensor:
        """The tensor stored under `key` (materialized from disk or mmap)."""
        raise NotImplementedError

    def raw_span(self, key: str) -> RawSpan | None:
        """Where the raw bytes of `key` lie, when they can be copied as they are."""
        return None

    def raw_spans(self, key: str) -> Collection[RawSpan] | None:
        """The raw bytes of `key` as pieces of files, in order (a sharded tensor's chunks); by default `raw_span`."""
        span = self.raw_span(key)
        return None if span is None else (span,)

    def close(self) -> None:
        """Release file handles and maps."""

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
