"""The provenance card of a conversion: what the output holds, tensor by tensor (the SHA-256 of its bytes as stored,
its statistics, the source keys and byte spans it was read from and the ops that made it), and what it was made
from (the source's identity, the recipe's rule files and parameters, ckptx's version). Its JSON Schema is
`schemas/ckptx-card.schema.json`; `ckptx audit --card` checks an output against it."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ckptx._version import __version__
from ckptx.io.card import TensorRecord
from ckptx.io.identity import source_identity
from ckptx.io.write.atomic import atomic_output
from ckptx.io.write.hf_folder_writer import is_folder_destination
from ckptx.planning.planner import Plan
from ckptx.rules.recipe import Recipe

__all__ = ["CARD_NAME", "CARD_VERSION", "card_document", "card_path", "recipe_identity", "write_card"]

CARD_VERSION = 1
CARD_NAME = "ckptx-card.json"
"""The card's name inside a HuggingFace model folder when `--audit` is given without a path."""
TENSOR_HASH = "sha256 of the tensor's bytes as stored in the output: little-endian, row-major, its own elements only"


def card_path(dst: str | Path, given: str | Path) -> Path:
    """Where the card goes: `given`, or when it is empty, `DIR/ckptx-card.json` for a model folder and
    `DST.card.json` beside a file."""
    if str(given):
        return Path(given)
    if is_folder_destination(dst):
        return Path(dst) / CARD_NAME
    return Path(str(dst) + ".card.json")


def recipe_identity(recipe: Recipe) -> dict[str, Any]:
    """The recipe's name, rule files (each with its SHA-256), parameters, and one SHA-256 over all of them."""
    files = [{"path": f.path, "name": f.name, "sha256": f.sha256} for f in recipe.files]
    params = json.loads(json.dumps(dict(recipe.params), sort_keys=True, default=str))
    canonical = json.dumps({"files": [[f["name"], f["sha256"]] for f in files], "params": params}, sort_keys=True)
    return {
        "name": recipe.name,
        "sha256": hashlib.sha256(canonical.encode("utf-8")).hexdigest(),
        "files": files,
        "params": params,
    }


def card_document(
    plan: Plan, records: Mapping[str, TensorRecord], *, destination: str, fmt: str, src: str | Path
) -> dict[str, Any]:
    """The card of a written conversion (`records` from the writer's CardObserver), in plan order."""
    source = plan.source
    identity = source_identity(src)
    identity.update(
        {"format": getattr(source, "format", None), "extracted_from": getattr(source, "extracted_from", ".")}
    )
    return {
        "ckptx_card": CARD_VERSION,
        "ckptx_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "tensor_hash": TENSOR_HASH,
        "output": {"path": destination, "format": fmt},
        "source": identity,
        "recipe": recipe_identity(plan.recipe),
        "dropped": [{"key": key, "by": where} for key, where in plan.dropped],
        "tensors": {e.key: records[e.key].to_dict() for e in plan.entries if e.key in records},
    }


def write_card(path: Path, document: Mapping[str, Any]) -> None:
    """Write the card atomically (a temporary file beside it, fsynced, renamed)."""
    text = json.dumps(document, indent=1, allow_nan=False) + "\n"
    with atomic_output(path) as out:
        out.write(text.encode("utf-8"))
