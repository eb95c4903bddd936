#!/usr/bin/env bash
# The test command: creates .venv/ if needed, fetches the small real assets, runs pytest.
# Extra arguments go to pytest (e.g. -k convert, -x).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/tools/ensure_env.sh"
cd "$ROOT"
python -m megatron_effllm.assets --quiet
exec python -m pytest -q "$@" tests
