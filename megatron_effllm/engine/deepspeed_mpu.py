"""The object DeepSpeed asks for as ``mpu``, backed by megatron-core's ``parallel_state``.

``deepspeed.initialize(mpu=parallel_state)`` fails: DeepSpeed calls names megatron-core does not
have (``get_model_parallel_world_size`` ...). ZeRO partitions over the data-parallel group given
here, and gradient-norm clipping reduces over the model-parallel group, so both come straight
from megatron's groups.
"""
from __future__ import annotations

import torch.distributed as dist  # group rank and size queries only; no collective here
from megatron.core import parallel_state


class MegatronMPU:
    def __init__(self):
        self._ps = parallel_state

    # model parallel = tensor x pipeline
    def get_model_parallel_group(self):
        return self._ps.get_model_parallel_group()

    def get_model_parallel_rank(self):
        return dist.get_rank(group=self.get_model_parallel_group())

    def get_model_parallel_world_size(self):
        return dist.get_world_size(group=self.get_model_parallel_group())

    # data parallel
    def get_data_parallel_group(self):
        return self._ps.get_data_parallel_group()

    def get_data_parallel_rank(self):
        return self._ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self):
        return self._ps.get_data_parallel_world_size()

    def get_data_parallel_group_ranks(self):
        return dist.get_process_group_ranks(self.get_data_parallel_group())

    # tensor parallel
    def get_tensor_model_parallel_group(self):
        return self._ps.get_tensor_model_parallel_group()

    def get_tensor_model_parallel_rank(self):
        return self._ps.get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_world_size(self):
        return self._ps.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_src_rank(self):
        return self._ps.get_tensor_model_parallel_src_rank()

    # pipeline parallel
    def get_pipeline_model_parallel_group(self):
        return self._ps.get_pipeline_model_parallel_group()

    def get_pipeline_model_parallel_rank(self):
        return self._ps.get_pipeline_model_parallel_rank()

    def get_pipeline_model_parallel_world_size(self):
        return self._ps.get_pipeline_model_parallel_world_size()

    get_pipe_parallel_group = get_pipeline_model_parallel_group
    get_pipe_parallel_rank = get_pipeline_model_parallel_rank
    get_pipe_parallel_world_size = get_pipeline_model_parallel_world_size

    # DeepSpeed's "slice" parallel is its name for tensor parallel.
    get_slice_parallel_group = get_tensor_model_parallel_group
    get_slice_parallel_rank = get_tensor_model_parallel_rank
    get_slice_parallel_world_size = get_tensor_model_parallel_world_size

    # No sequence parallelism beyond megatron's own TP-SP.
    def get_sequence_parallel_world_size(self):
        return 1

    def get_sequence_parallel_rank(self):
        return 0

    def get_sequence_data_parallel_world_size(self):
        return self.get_data_parallel_world_size()

    def get_sequence_data_parallel_rank(self):
        return self.get_data_parallel_rank()

    def get_sequence_data_parallel_group(self):
        return self.get_data_parallel_group()
