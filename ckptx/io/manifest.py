"""Manifests: a checkpoint's key -> shape/dtype as JSON (or YAML), written by `inspect --manifest`, read as a target."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import yaml

from ckptx.dtypes import TensorMeta
from ckptx.errors import TargetError
from ckptx.io.write.atomic import atomic_output
from ckptx.yaml12 import CoreLoader

__all__ = ["MANIFEST_VERSION", "read_manifest", "write_manifest"]

MANIFEST_VERSION = 1


def write_manifest(path: Path, tensors: Mapping[str, TensorMeta], *, source: str = "") -> None:
    """Write a manifest (JSON) of key -> shape/dtype that can serve as a target."""
    doc = {
        "ckptx_manifest": MANIFEST_VERSION,
        "source": source,
        "tensors": {k: {"shape": list(m.shape), "dtype": m.dtype} for k, m in tensors.items()},
    }
    with atomic_output(path) as out:
        out.write((json.dumps(doc, indent=1) + "\n").encode("utf-8"))


def read_manifest(path: Path) -> dict[str, TensorMeta]:
    """Read a manifest written by `ckptx inspect --manifest` (JSON or YAML)."""
    try:
        doc = yaml.load(path.read_text(encoding="utf-8"), Loader=CoreLoader)  # CoreLoader is a SafeLoader
    except FileNotFoundError:
        raise TargetError(f"{path}: no such manifest file") from None
    except (OSError, yaml.YAMLError) as exc:
        raise TargetError(f"{path}: cannot read manifest: {str(exc).splitlines()[0]}") from None
    tensors = doc.get("tensors") if isinstance(doc, dict) else None
    if not isinstance(tensors, dict):
        raise TargetError(f"{path}: not a ckptx manifest: expected a mapping with `tensors: {{key: {{shape, dtype}}}}`")
    out = {}
    for key, info in tensors.items():
        try:
            out[str(key)] = TensorMeta(tuple(int(d) for d in info["shape"]), str(info.get("dtype", "float32")))
        except (KeyError, TypeError, ValueError):
            raise TargetError(f"{path}: tensors.{key}: needs `shape: [..]` and `dtype`") from None
    return out
