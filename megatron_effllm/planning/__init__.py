"""The dry-run capacity plan: what a run needs on every rank before it is queued.

- ``arch``: the architecture from the config, without loading weights;
- ``ranks``: the DP x TP x PP layout and what each model-parallel shard holds (``layout`` shapes);
- ``memory``: the per-rank memory terms and peaks;
- ``checkpoint_bytes``: what one checkpoint writes per rank and in total;
- ``launch``: the launch command lines;
- ``plan``: ``make_plan`` (all of the above, the DeepSpeed JSON, the refusal rule);
- ``report``: text and JSON.
"""
from megatron_effllm.planning.plan import Plan, make_plan

__all__ = ["Plan", "make_plan"]
