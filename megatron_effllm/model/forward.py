"""Inference through a (tensor/pipeline parallel) GPTModel: full logits and greedy decoding.

Runs megatron-core's own forward/backward schedule with ``forward_only=True``, so the same call
works at any TP/PP size. Every rank of the model-parallel group gets the full-vocabulary logits.
"""
from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from megatron_effllm.parallel import comm


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def forward_logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits [batch, seq, vocab] (float32) for ``input_ids`` [batch, seq], causal, no padding.

    Collective over the model-parallel group: every TP/PP rank must call it with the same ids.
    """
    b, s = input_ids.shape
    device = _device(model)
    input_ids = input_ids.to(device)
    position_ids = torch.arange(s, device=device).unsqueeze(0).expand(b, -1)

    def step(data_iterator, m):
        out = m(input_ids, position_ids, None)

        def collect(output_tensor, non_loss_data=False):
            return output_tensor

        return out, collect

    was_training = model.training
    model.eval()
    try:
        store = get_forward_backward_func()(
            forward_step_func=step,
            data_iterator=iter([None]),
            model=[model],
            num_microbatches=1,
            seq_length=s,
            micro_batch_size=b,
            forward_only=True,
            collect_non_loss_data=True,
        )
    finally:
        model.train(was_training)

    vocab = None
    if parallel_state.is_pipeline_last_stage():
        logits = gather_from_tensor_model_parallel_region(store[0]).float()
        vocab = logits.shape[-1]
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if pp == 1:
        return logits
    # The last stage shares the logits with the other stages of its pipeline.
    last = comm.pipeline_last_rank()
    vocab = comm.broadcast_object(vocab, last, "pp")
    if not parallel_state.is_pipeline_last_stage():
        logits = torch.empty(b, s, vocab, dtype=torch.float32, device=device)
    return comm.broadcast_(logits, last, "pp")


@torch.no_grad()
def greedy_generate(model: torch.nn.Module, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Append ``max_new_tokens`` greedy tokens to ``input_ids`` [batch, seq] (no KV cache:
    each step re-runs the whole sequence)."""
    ids = input_ids.clone()
    for _ in range(max_new_tokens):
        nxt = forward_logits(model, ids)[:, -1].argmax(dim=-1, keepdim=True).to(ids.device)
        ids = torch.cat([ids, nxt], dim=1)
    return ids
