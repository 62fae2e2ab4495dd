#!/usr/bin/env bash
# Create / update the project virtualenv at .venv (repo root).
#
#   scripts/setup-venv.sh            # idempotent: deps only when inputs changed,
#                                    # project always reinstalled (cheap, --no-deps)
#   scripts/setup-venv.sh --force    # reinstall the dependency set regardless
#   scripts/setup-venv.sh --deps-only  # skip reinstalling the project
#
# Steps:
#   1. python -m venv .venv                      (only if missing/broken)
#   2. (every install below with -c requirements/constraints.txt: full freeze)
#      pip install -r requirements/torch.txt     (torch/torchvision pinned, first)
#      pip install -r requirements/test.txt      (pytest, timm, transformers, mm* ...)
#      pip install --no-deps -r requirements/nodeps.txt   (mmpretrain)
#      pip install .                             (project + its runtime deps)
#      -> skipped when .venv/.ckptx-deps-stamp holds the hash of
#         pyproject.toml + requirements/*.txt + this script + python version.
#   3. pip install --no-deps --force-reinstall --no-build-isolation .
#      ALWAYS: the tests import the installed wheel (which carries schemas/ and
#      rules/ under ckptx/_data/), never src/, so it must be rebuilt every run.
#
# A fresh setup installs ~6 GB into .venv (the torch 2.14.1 wheel is a CUDA
# build and pulls nvidia-* wheels; all of those come from local disk) and took
# ~175 s on the 2-core CI machine; an up-to-date re-run takes ~5 s (project
# reinstall only).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

VENV="$REPO/.venv"
PY="$VENV/bin/python"
STAMP="$VENV/.ckptx-deps-stamp"
BASE_PYTHON="${PYTHON:-python3}"

force=0
install_project=1
for arg in "$@"; do
  case "$arg" in
    --force) force=1 ;;
    --deps-only) install_project=0 ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "setup-venv.sh: unknown argument: $arg" >&2; exit 2 ;;
  esac
done

log() { printf '[setup-venv] %s\n' "$*" >&2; }

# pip settings for every call: quiet-ish, no version self-check.
export PIP_DISABLE_PIP_VERSION_CHECK=1
PIP=("$PY" -m pip --no-input --quiet)

t0=$SECONDS

# The wheel build (hatchling) fails on a missing readme or force-include source;
# say so plainly instead of in a 40-line backtrace. (Git does not keep empty
# folders: a fresh clone has no rules/ until a file is committed in it.)
missing="$("$BASE_PYTHON" - <<'PY'
import os, tomllib
with open("pyproject.toml", "rb") as f:
    cfg = tomllib.load(f)
need = []
readme = cfg.get("project", {}).get("readme")
if isinstance(readme, str):
    need.append(readme)
elif isinstance(readme, dict) and "file" in readme:
    need.append(readme["file"])
fi = cfg.get("tool", {}).get("hatch", {}).get("build", {}).get("targets", {}).get("wheel", {}).get("force-include", {})
need += list(fi)
print(" ".join(p for p in need if not os.path.exists(p)))
PY
)"
if [[ -n "$missing" ]]; then
  log "ERROR: pyproject.toml needs these paths to build the wheel, but they do not exist: $missing"
  exit 1
fi

# --- 0. xfsprogs and btrfs-progs, for the copy-on-write tests (loop-mounted XFS and btrfs images; they skip,
#        saying so, without them) ---
for tool in mkfs.xfs:xfsprogs mkfs.btrfs:btrfs-progs; do
  if ! command -v "${tool%%:*}" >/dev/null 2>&1 && [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
    log "installing ${tool#*:} (copy-on-write tests)"
    apt-get install -y -q "${tool#*:}" >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && \
      apt-get install -y -q "${tool#*:}" >/dev/null 2>&1; } || log "WARNING: ${tool#*:} not installed; its tests will skip"
  fi
done

# --- 1. the venv itself ------------------------------------------------------
if [[ ! -x "$PY" ]] || ! "$PY" -c 'import sys, pip' >/dev/null 2>&1; then
  log "creating $VENV with $("$BASE_PYTHON" --version 2>&1)"
  rm -rf "$VENV"
  "$BASE_PYTHON" -m venv "$VENV"
  rm -f "$STAMP"
fi

# --- 2. dependencies (only when the inputs changed) --------------------------
deps_hash() {
  {
    "$PY" -c 'import sys; print(sys.version)'
    cat pyproject.toml
    for f in requirements/*.txt; do echo "== $f"; cat "$f"; done
    cat "${BASH_SOURCE[0]}"
  } | sha256sum | cut -d' ' -f1
}
want="$(deps_hash)"
have="$(cat "$STAMP" 2>/dev/null || true)"

if [[ $force -eq 1 || "$want" != "$have" ]]; then
  log "installing dependencies (stamp ${have:-<none>} -> $want)"
  rm -f "$STAMP"
  # constraints.txt pins every transitive version of a known-good venv;
  # torch.txt is a constraint too, so that nothing after step one can move torch.
  C=(-c requirements/constraints.txt -c requirements/torch.txt)
  "${PIP[@]}" install "${C[@]}" -r requirements/torch.txt
  "${PIP[@]}" install "${C[@]}" -r requirements/test.txt
  "${PIP[@]}" install --no-deps -r requirements/nodeps.txt
  # The project with its own runtime deps (pyyaml, jsonschema, safetensors, ...).
  "${PIP[@]}" install "${C[@]}" --no-cache-dir --no-build-isolation .
  "$PY" -m pip check || log "WARNING: pip check reports problems (mmpretrain is installed --no-deps; see above)"
  "$PY" -m pip freeze --exclude-editable > "$VENV/.ckptx-freeze.txt"
  echo "$want" > "$STAMP"
  log "dependencies installed in $((SECONDS - t0))s"
else
  log "dependencies up to date (stamp $want)"
fi

# model-index (an MMPretrain dependency) installs a top-level `tests` package into site-packages; it would
# shadow this repo's tests/ (make test puts the repo root after site-packages, see Makefile).
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
if [[ -f "$SITE/tests/__init__.py" && ! -f "$SITE/tests/conftest.py" ]]; then
  rm -rf "$SITE/tests"
fi

# --- 3. the project, always, from the current tree -----------------------------
if [[ $install_project -eq 1 ]]; then
  t1=$SECONDS
  "${PIP[@]}" install --no-cache-dir --no-deps --force-reinstall --no-build-isolation .
  log "reinstalled ckptx from $REPO in $((SECONDS - t1))s"
fi

log "done in $((SECONDS - t0))s"
