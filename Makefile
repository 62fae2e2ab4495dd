# ckptx developer entry points.  Everything runs inside .venv (see scripts/setup-venv.sh).
#
#   make venv    create/update .venv (deps only when pyproject/requirements change;
#                the project itself is reinstalled from the tree every time)
#   make test    venv + pytest over tests/ against the INSTALLED wheel, offline; then the floor versions
#   make demo    venv + examples/demo.py
#   make bench   venv + benchmarks/run.py and benchmarks/cow_bench.py
#   make docs    venv + the manual (docs/, mkdocs.yml) built with --strict into site/
#   make lint    venv + ruff (lint and format check) over the tree and mypy over the package

SHELL      := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

VENV       := .venv
PY         := $(VENV)/bin/python
# extra pytest arguments, e.g.  make test PYTEST_ARGS='-k timm -x'
PYTEST_ARGS ?=
PYTEST_TIMEOUT ?= 900

# Offline: nothing under test may reach a model hub. tests/real fails (never skips) when timm,
# transformers or MMPretrain are missing.
TEST_ENV := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
            HF_HUB_DISABLE_TELEMETRY=1 PYTHONDONTWRITEBYTECODE=1

.PHONY: venv floor-venv test test-main test-floor demo bench docs lint

venv:
	scripts/setup-venv.sh

# The lowest versions pyproject.toml promises (torch 2.13.0 CPU, numpy/pyyaml/jsonschema/safetensors floors).
floor-venv:
	scripts/setup-floor-venv.sh

# Tests import the wheel installed in .venv (the venv step rebuilds it from the current
# tree), never the checkout's ckptx/: PYTHONSAFEPATH keeps the working folder off
# sys.path and --import-mode=append puts the repo root (for `tests.*`) after
# site-packages. tests/real/test_reference_models.py::test_ckptx_is_the_installed_wheel
# checks that (and that the installed copy is not stale).
test: lint test-main test-floor

test-main: venv docs
	$(TEST_ENV) PYTHONSAFEPATH=1 $(PY) -m pytest -p no:cacheprovider --import-mode=append \
	    --timeout=$(PYTEST_TIMEOUT) tests $(PYTEST_ARGS)

# Everything that needs only ckptx's own dependencies, on the floor versions (tests/real, tests/integrations,
# tests/suggest, the DeepSpeed, GGUF and MXFP4 tests need the pinned timm/transformers/MMPretrain/DeepSpeed/gguf of .venv;
# the FP8 tests write and read their float8 fixtures with the safetensors library, which 0.4.0 cannot do for float8).
FLOOR_IGNORE := --ignore=tests/real --ignore=tests/integrations --ignore=tests/suggest --ignore=tests/io/test_zero.py \
                --ignore=tests/io/test_gguf_reader.py --ignore=tests/io/test_gguf_writer.py --ignore=tests/ops/test_mxfp4.py \
                --ignore=tests/io/test_hostile_zero.py --ignore=tests/ops/test_fp8.py
test-floor: floor-venv
	$(TEST_ENV) PYTHONSAFEPATH=1 .venv-floor/bin/python -m pytest -p no:cacheprovider --import-mode=append \
	    --timeout=$(PYTEST_TIMEOUT) tests $(FLOOR_IGNORE) $(PYTEST_ARGS)

# Habits: ruff's lint rules and formatting, mypy's types (both configured in pyproject.toml).
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# The manual: --strict fails on a broken link, a missing anchor or a page left out of the nav.
docs: venv
	$(PY) -m mkdocs build --strict --quiet -d site

demo: venv
	HF_HUB_OFFLINE=1 $(PY) examples/demo.py

bench: venv
	HF_HUB_OFFLINE=1 $(PY) benchmarks/run.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/cow_bench.py
