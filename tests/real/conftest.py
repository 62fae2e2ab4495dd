"""Fixtures for tests that use the real model libraries (timm, transformers, MMPretrain).

Importing this conftest (pytest does so before any test module below
tests/real/) puts the HuggingFace stack in offline mode, and every test here
runs with outbound network connections refused: tests never download weights.

Helpers to build models, inputs and reference conversions live in
``tests/real/models.py`` (import as ``from .models import ...`` from a test
module in this package); the official model in ``official_convnextv2.py``.

A library that is not installed FAILS these tests (a plain ``pytest`` never
skips them silently); set ``CKPTX_ALLOW_MISSING_REAL=1`` to turn that into a
reported skip on a machine that deliberately lacks them.
"""

from __future__ import annotations

import os

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
    os.environ.setdefault(_var, "1")

import pytest  # noqa: E402

from tests.helpers.offline import missing_library, refuse_network  # noqa: E402

from .models import library_available, seeded_input  # noqa: E402
from .official_convnextv2 import build_official, make_official_checkpoint, randomize_  # noqa: E402


def require_library(lib: str) -> None:
    """Fail when ``lib`` is not installed (skip, reported, only under CKPTX_ALLOW_MISSING_REAL=1)."""
    if library_available(lib):
        return
    missing_library(f"{lib} is not installed (run `make venv`)")


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Refuse non-loopback TCP/UDP connections for the duration of each test."""
    refuse_network(monkeypatch, "tests/real")


@pytest.fixture
def timm_lib():
    require_library("timm")


@pytest.fixture
def hf_lib():
    require_library("hf")


@pytest.fixture
def mmpretrain_lib():
    require_library("mmpretrain")


@pytest.fixture
def seeded_x():
    """Seeded (2, 3, 64, 64) input batch."""
    return seeded_input(0)


@pytest.fixture
def official_checkpoint(tmp_path):
    """Factory: ``(model, path, ckpt) = official_checkpoint(size, seed=0, training=True)``.

    Builds the official model of ``size``, fills it with non-trivial random
    values (GRN included) and saves it in the official checkpoint format under
    tmp_path.  ``model`` is in eval mode and holds exactly the saved weights.
    """

    def make(size: str = "atto", seed: int = 0, training: bool = True, name: str | None = None):
        model = randomize_(build_official(size), seed).eval()
        path = tmp_path / (name or f"convnextv2_{size}_{'train' if training else 'release'}_{seed}.pth")
        ckpt = make_official_checkpoint(model, path, training=training, seed=seed, model_name=f"convnextv2_{size}")
        return model, path, ckpt

    return make
