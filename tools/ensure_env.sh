#!/usr/bin/env bash
# Create .venv/ at the repository root with the pinned stack when it is missing or stale, and
# install this checkout into it (editable: the console scripts effllm-train, effllm-evaluate, ...).
# Sourced by the README's commands; safe to run again (stamps record what is installed).
#
# --check-only (what the launchers use inside a slurm job): install nothing, only check that the
# environment is there and current, else stop with one line. Every node of a job would otherwise
# pip install into the same shared .venv at once, and compute nodes often cannot reach a registry.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"
STAMP="$VENV/.requirements.sha256"
WANT="$(sha256sum "$ROOT/requirements.txt" | cut -d' ' -f1)"
PKG_STAMP="$VENV/.pyproject.sha256"
PKG_WANT="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
if [ "${1:-}" = "--check-only" ]; then
  PROBLEM=""
  if [ ! -x "$VENV/bin/python" ]; then
    PROBLEM="there is no environment in $VENV"
  elif [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
    PROBLEM="the environment in $VENV was not installed from this requirements.txt"
  elif [ ! -f "$PKG_STAMP" ] || [ "$(cat "$PKG_STAMP")" != "$PKG_WANT" ]; then
    PROBLEM="the environment in $VENV was not installed from this pyproject.toml"
  fi
  if [ -n "$PROBLEM" ]; then
    echo "error: $PROBLEM; run \`bash $ROOT/tools/ensure_env.sh\` once where pip can reach the package registry (e.g. the login node), then launch again" >&2
    # Sourced: stop the caller (set -e) with status 2; run as a program: exit 2.
    if [ "${BASH_SOURCE[0]}" != "$0" ]; then return 2; fi
    exit 2
  fi
else
  if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV with $($PY --version)"
    "$PY" -m venv "$VENV"
  fi
  if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
    echo "[setup] installing requirements.txt into $VENV (a few minutes the first time)"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check -r "$ROOT/requirements.txt"
    echo "$WANT" > "$STAMP"
  fi
  # The package itself, editable (the console scripts are declared in pyproject.toml; redone when
  # it changes). --no-deps: requirements.txt is installed above.
  if [ ! -f "$PKG_STAMP" ] || [ "$(cat "$PKG_STAMP")" != "$PKG_WANT" ]; then
    echo "[setup] installing megatron_effllm (editable) into $VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps -e "$ROOT"
    echo "$PKG_WANT" > "$PKG_STAMP"
  fi
fi
export PATH="$VENV/bin:$PATH"
# This checkout first, whichever checkout a shared venv's editable install points at.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
