#!/usr/bin/env bash
# Create / update .venv-floor: the lowest versions pyproject.toml promises (requirements/floor.txt: torch 2.13.0,
# the CPU wheel on local disk, and the lower bounds of numpy, pyyaml, jsonschema, safetensors), so that
# `make test` proves the floors and not only the pinned versions. Idempotent: dependencies are reinstalled
# only when requirements/floor.txt, pyproject.toml or this script change; the project always.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
VENV="$REPO/.venv-floor"
PY="$VENV/bin/python"
STAMP="$VENV/.ckptx-deps-stamp"
export PIP_DISABLE_PIP_VERSION_CHECK=1
PIP=("$PY" -m pip --no-input --quiet)
log() { printf '[setup-floor-venv] %s\n' "$*" >&2; }

if [[ ! -x "$PY" ]] || ! "$PY" -c 'import pip' >/dev/null 2>&1; then
  log "creating $VENV with $(python3.11 --version 2>&1)"
  rm -rf "$VENV"
  python3.11 -m venv "$VENV"
fi
want="$( { cat requirements/floor.txt pyproject.toml "${BASH_SOURCE[0]}"; } | sha256sum | cut -d' ' -f1)"
if [[ "$(cat "$STAMP" 2>/dev/null || true)" != "$want" ]]; then
  log "installing the floor versions"
  rm -f "$STAMP"
  "${PIP[@]}" install -r requirements/floor.txt
  echo "$want" > "$STAMP"
fi
"${PIP[@]}" install --no-cache-dir --no-deps --force-reinstall --no-build-isolation .
"$PY" - <<'PY'
import importlib.metadata as m
print("[setup-floor-venv] " + ", ".join(f"{p} {m.version(p)}" for p in ("torch", "numpy", "PyYAML", "jsonschema", "safetensors")))
PY
