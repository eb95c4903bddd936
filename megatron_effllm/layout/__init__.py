"""Where every tensor lives: the canonical (HF Llama) schema, the megatron-core parameter map
derived from one declarative table, pipeline placement, and the parallel dimensions.

Pure tensor math: no process group is needed to use anything here.
"""
