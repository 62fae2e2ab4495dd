"""Module-kind evidence: what kind of module holds each tensor (linear, conv, norm, batchnorm, embedding, a bare
parameter), known for a model target (its classes, built on the meta device: `Target.kinds`) and for a source built
by `--verify-with`, inferred from names, shapes and siblings for a source file.

Kinds travel with the tensors' metadata (`KindMeta`), so every level and run body of the alignment carries them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass

from ckptx.dtypes import TensorMeta
from ckptx.suggestion.names import key_name

__all__ = ["KindMeta", "agreement", "infer_kinds", "kind_of", "with_kinds"]

_BN_STATS = frozenset({"running_mean", "running_var", "num_batches_tracked"})
_LINEAR_LIKE = frozenset({"linear", "linear_t", "attention"})
_NORMS = frozenset({"norm", "batchnorm"})
_UNKNOWN = frozenset({"", "other"})


@dataclass(frozen=True)
class KindMeta(TensorMeta):
    """A tensor's metadata with the kind of module holding it (`''` when unknown)."""

    kind: str = ""


def kind_of(meta: TensorMeta) -> str:
    """The kind a metadata record carries (`''` for a plain TensorMeta)."""
    return getattr(meta, "kind", "")


def with_kinds(metas: Mapping[str, TensorMeta], kinds: Mapping[str, str]) -> dict[str, TensorMeta]:
    """`metas` with each record's kind (keys without one keep their record)."""
    return {k: KindMeta(m.shape, m.dtype, kinds[k]) if kinds.get(k) else m for k, m in metas.items()}


def infer_kinds(metas: Mapping[str, TensorMeta]) -> dict[str, str]:
    """Kinds of a checkpoint's tensors from their names, shapes and siblings (no model at hand).

    A module with running statistics is a BatchNorm; a weight of 3 to 5 dimensions a convolution; a 2-d weight an
    embedding when its module's name says so, else a linear layer; a module holding only 1-d `weight`/`bias` a norm
    (GroupNorm, LayerNorm, RMSNorm) when its name says so or its sibling before it is a conv or linear layer with no
    norm of its own; a 2-d tensor whose name is not `weight` a bare parameter (`text_projection`, `pos_embed`).
    What cannot be told stays unknown.
    """
    modules: dict[str, dict[str, TensorMeta]] = defaultdict(dict)
    for key, meta in metas.items():
        owner, _, param = key.rpartition(".")
        modules[owner][param] = meta
    out: dict[str, str] = {}
    for owner, params in modules.items():
        names = set(params)
        weight = params.get("weight")
        if names & _BN_STATS:
            kind = "batchnorm"
        elif weight is not None and 3 <= len(weight.shape) <= 5:
            kind = "conv"
        elif weight is not None and len(weight.shape) == 2:
            kind = "embedding" if _leaf_words(owner) & {"embed", "token"} and "bias" not in names else "linear"
        elif weight is not None and len(weight.shape) == 1 and names <= {"weight", "bias"}:
            words = _leaf_words(owner)
            kind = "norm" if "norm" in words or not (words & {"fc", "proj", "conv", "head"}) else ""
        else:
            kind = ""
        for param, meta in params.items():
            if param in ("in_proj_weight", "in_proj_bias"):
                out[f"{owner}.{param}" if owner else param] = "attention"
            elif param in ("weight", "bias") or param in _BN_STATS:
                if kind:
                    out[f"{owner}.{param}" if owner else param] = kind
            elif len(meta.shape) >= 1:
                out[f"{owner}.{param}" if owner else param] = "parameter"
    return out


def _leaf_words(owner: str) -> set[str]:
    """The concepts of a module's own name (its last component), cached per component."""
    last = owner.rpartition(".")[2]
    return set(key_name(last + ".x").leaf) if last else set()


def agreement(a: str, b: str) -> float:
    """+1 when two kinds are the same (or a linear and a 1x1-conv-like layer), -1 when they cannot be the same module
    (a norm and a linear layer), 0 when either is unknown or a bare parameter (it can stand for anything)."""
    if a in _UNKNOWN or b in _UNKNOWN:
        return 0.0
    if a == b:
        return 1.0
    if "parameter" in (a, b):
        return 0.0
    if (a in _NORMS) != (b in _NORMS):
        return -1.0
    if a in _NORMS and b in _NORMS:
        return -1.0  # a BatchNorm and a LayerNorm: different statistics
    if {a, b} <= _LINEAR_LIKE | {"conv", "embedding"}:
        return 0.5 if "embedding" not in (a, b) or {a, b} <= {"embedding", "linear"} else -1.0
    return 0.0
