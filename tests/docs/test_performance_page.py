"""docs/performance.md is generated: it must equal what benchmarks/render_docs.py makes of benchmarks/results/.

Edit benchmarks/performance.md.in (the text) or measure again (benchmarks/record_all.sh), then run
`python benchmarks/render_docs.py`; never edit the page by hand.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def renderer() -> ModuleType:
    """benchmarks/render_docs.py, loaded from its file (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("render_docs", ROOT / "benchmarks" / "render_docs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_page_equals_the_render_of_the_committed_results() -> None:
    page = (ROOT / "docs" / "performance.md").read_text(encoding="utf-8")
    assert page == renderer().render(), (
        "docs/performance.md differs from what benchmarks/render_docs.py makes of "
        "benchmarks/results/; run `python benchmarks/render_docs.py`"
    )


def test_every_benchmark_has_committed_results_with_the_machine_facts() -> None:
    render_docs = renderer()
    for name in render_docs.NAMES:
        path = ROOT / "benchmarks" / "results" / f"{name}.json"
        document = json.loads(path.read_text(encoding="utf-8"))
        assert document["benchmark"] == name
        assert document["date"] and document["command"].startswith("python benchmarks/")
        assert {"cores", "torch", "python", "memory_gib"} <= set(document["machine"])


def test_a_placeholder_without_results_is_an_error_not_a_blank() -> None:
    with pytest.raises(KeyError, match="no result for"):
        renderer().render("{{ nothing.here }}", results={})
