"""Fixtures for the framework integrations: real mmengine/MMPretrain/transformers, random weights, no network.

The autouse `_no_network` fixture of tests/real applies here too (imported below), and the HF stack is
put offline before anything imports it.
"""

from __future__ import annotations

import os

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
    os.environ.setdefault(_var, "1")

from tests.real.conftest import _no_network, require_library  # noqa: E402,F401  (autouse fixture)
