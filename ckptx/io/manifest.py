"""Manifests: a checkpoint's key -> shape/dtype as JSON (or YAML), written by `inspect --manifest`, read as a target."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import yaml

from ckptx.dtypes import TensorMeta
from ckptx.errors import TargetError, UnreadableFile
from ckptx.files import MAX_TEXT, read_bounded
from ckptx.io.write.atomic import atomic_output
from ckptx.text import summary
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
        text = read_bounded(path, str(path), MAX_TEXT, "a manifest").decode("utf-8")
        doc = yaml.load(text, Loader=CoreLoader)  # CoreLoader is a SafeLoader
    except UnreadableFile as exc:
        detail = "no such manifest file" if not path.exists() else f"cannot read manifest: {exc.detail}"
        raise TargetError(f"{path}: {detail}") from None
    except UnicodeDecodeError as exc:
        raise TargetError(f"{path}: cannot read manifest: not UTF-8 (byte {exc.start})") from None
    except RecursionError:
        raise TargetError(f"{path}: cannot read manifest: it nests too deeply") from None
    except yaml.YAMLError as exc:
        raise TargetError(f"{path}: cannot read manifest: {str(exc).splitlines()[0]}") from None
    tensors = doc.get("tensors") if isinstance(doc, dict) else None
    if not isinstance(tensors, dict):
        raise TargetError(f"{path}: not a ckptx manifest: expected a mapping with `tensors: {{key: {{shape, dtype}}}}`")
    out = {}
    for key, info in tensors.items():
        try:
            dtype = info.get("dtype", "float32")
            if not isinstance(key, str) or not isinstance(dtype, str):
                raise TypeError(key)
            out[key] = TensorMeta(tuple(int(d) for d in info["shape"]), dtype)
        except (KeyError, TypeError, ValueError, AttributeError):
            raise TargetError(f"{path}: tensors.{summary(key)}: needs `shape: [..]` and `dtype`") from None
    return out
