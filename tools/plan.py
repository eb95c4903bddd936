#!/usr/bin/env python
"""The dry-run capacity plan (effllm-plan): tools/plan.py CONFIG nodes=N gpus_per_node=G gpu_mem_gb=M [key=value ...] [--json]"""
from megatron_effllm.cli.plan import main

if __name__ == "__main__":
    main()
