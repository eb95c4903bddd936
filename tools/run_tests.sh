#!/usr/bin/env bash
# The test command: creates .venv/ if needed (with this checkout installed), fetches the small
# real assets, runs every test. Extra arguments go to pytest (e.g. -k convert, -x, or
# -m "not slow" for the quick loop; the markers are set in tests/conftest.py).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/tools/ensure_env.sh"
cd "$ROOT"
python -m megatron_effllm.assets --quiet
exec python -m pytest -q "$@" tests
