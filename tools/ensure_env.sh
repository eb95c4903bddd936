#!/usr/bin/env bash
# Create .venv/ at the repository root with the pinned stack when it is missing or stale, and
# install this checkout into it (editable: the console scripts effllm-train, effllm-evaluate, ...).
# Sourced by the README's commands; safe to run again (stamps record what is installed).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $($PY --version)"
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.requirements.sha256"
WANT="$(sha256sum "$ROOT/requirements.txt" | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "[setup] installing requirements.txt into $VENV (a few minutes the first time)"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check -r "$ROOT/requirements.txt"
  echo "$WANT" > "$STAMP"
fi
# The package itself, editable (the console scripts are declared in pyproject.toml; redone when it
# changes). --no-deps: requirements.txt is installed above.
PKG_STAMP="$VENV/.pyproject.sha256"
PKG_WANT="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
if [ ! -f "$PKG_STAMP" ] || [ "$(cat "$PKG_STAMP")" != "$PKG_WANT" ]; then
  echo "[setup] installing megatron_effllm (editable) into $VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps -e "$ROOT"
  echo "$PKG_WANT" > "$PKG_STAMP"
fi
export PATH="$VENV/bin:$PATH"
# This checkout first, whichever checkout a shared venv's editable install points at.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
