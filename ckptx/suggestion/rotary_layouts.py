"""Rotary q/k row order: Meta's reference Llama, torchtitan and GGUF (`wq`/`wk`, `attn_q`/`attn_k`) rotate interleaved
pairs of each head's rows, transformers (`q_proj`/`k_proj`) rotates its two halves. Between the two layouts the
rows of q and k are permuted within each head (what transformers' convert_llama_weights_to_hf.py does): equal
shapes, so a plain rename loads strictly and computes something else.

Names tell the layout of each side; the number of rows per head comes from the side that is a model with rotary
embeddings (its `inv_freq` buffer). When the layouts differ and the head size is not known, the rows are
undecided.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from ckptx.suggestion.match import Match
from ckptx.suggestion.shapes import Fit

__all__ = ["layout", "rotary_matches"]

_INTERLEAVED = {"wq": "q", "wk": "k", "attn_q": "q", "attn_k": "k"}
_HALF = {"q_proj": "q", "k_proj": "k", "query": "q", "key": "k", "q": "q", "k": "k"}


def layout(key: str) -> tuple[str, str] | None:
    """(`interleaved` or `half`, `q` or `k`) for a q/k projection weight or bias, else None."""
    parts = key.split(".")
    if len(parts) < 2:
        return None
    module = parts[-2]
    if module in _INTERLEAVED:
        return "interleaved", _INTERLEAVED[module]
    if module in _HALF:
        return "half", _HALF[module]
    return None


def rotary_matches(matches: Sequence[Match], head_dim: int | None) -> tuple[list[Match], list[str]]:
    """`matches` with the q/k rows of a layout change permuted (Fit kind `rotary`, `dims` = (heads, head_dim,
    direction)), and notes. Only when one side uses interleaved names; without a head size the pairs are undecided."""
    out: list[Match] = []
    notes: list[str] = []
    for match in matches:
        if match.kind != "tensor" or not isinstance(match.fit, Fit) or match.fit.kind != "exact":
            out.append(match)
            continue
        a, b = layout(match.sources[0]), layout(match.targets[0])
        if a is None or b is None or a[1] != b[1] or a[0] == b[0] or "interleaved" not in (a[0], b[0]):
            out.append(match)
            continue
        rows = match.fit.shape[0]
        if not head_dim or rows % head_dim or head_dim % 2:
            out.append(
                replace(
                    match,
                    undecided=True,
                    note=f"rotary layouts differ ({a[0]} -> {b[0]}): the rows of {a[1]} must be permuted within each "
                    f"head, and the head size is not known (give a model with rotary embeddings, or --verify-with)",
                )
            )
            continue
        direction = 0 if a[0] == "interleaved" else 1
        fit = Fit("rotary", match.fit.shape, dims=(rows // head_dim, head_dim, direction))
        text = (
            f"rotary {a[1]} rows: {a[0]} pairs -> {b[0]} ({rows // head_dim} heads of {head_dim}; the permutation "
            f"of transformers' convert_llama_weights_to_hf.py)"
        )
        notes.append(text)
        out.append(replace(match, fit=fit, note=text, evidence="names and the target's rotary embeddings"))
    return out, notes
