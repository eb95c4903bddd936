"""With TransformerEngine's layer spec the norms are fused into ``linear_qkv``/``linear_fc1``
(``layer_norm_weight``) and ``input_layernorm``/``pre_mlp_layernorm`` are IdentityOps. Proven on a
stand-in with TE's module tree (tests/te_stub.py): the same logits as the local spec, the same
saliency from the fused norm weights, and live masks (hidden channels included) that make the
masked model equal the physically pruned one."""
from __future__ import annotations

import pytest
import torch

from megatron_effllm.parallel import comm
from megatron_effllm.parallel import distributed_pruning as dp
from megatron_effllm.pruning.saliency import GradSaliency
from te_stub import use_te_stub
from test_pruning_distributed import BATCH, ESTIMATOR, _backward, _batch, _target, rel_diff, tiny, weights


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_fused_norm_spec_scores_and_masks(monkeypatch, family):
    from megatron_effllm.model import build_gpt_model, forward_logits, load_canonical
    from megatron_effllm.model.weights import model_style
    from megatron_effllm.parallel.runtime import init_model_parallel
    from megatron_effllm.pruning.selectors.global_ranking import select_global
    from megatron_effllm.pruning.selection import Constraints
    from megatron_effllm.pruning.surgery import masks_from_plan, slice_state_dict
    from megatron_effllm.training.runtime.live_model import LiveMasks

    use_te_stub(monkeypatch)
    init_model_parallel(1, 1)
    arch, sd = tiny(family), weights(tiny(family))
    ids, labels = _batch()
    models, scores = {}, {}
    for te in (False, True):
        model = build_gpt_model(arch, use_te=te)
        load_canonical(model, arch, sd)
        _backward(model, ids, labels)
        stats = GradSaliency(arch)
        dp.feed_saliency(stats, model, BATCH, compute_dtype=torch.float64)
        models[te], scores[te] = model, stats
    names = dict(models[True].named_modules())
    assert model_style(models[True]) == "te"
    assert type(names["decoder.layers.0.input_layernorm"]).__name__ == "IdentityOp"
    assert names["decoder.layers.0.self_attention.linear_qkv"].layer_norm_weight.shape == (arch.hidden_size,)
    assert (forward_logits(models[True], ids) - forward_logits(models[False], ids)).abs().max() < 1e-5
    # The norms' saliency is read from the fused layer_norm_weight (their gradients differ from
    # zero: the weak hidden channels make the ranking remove hidden channels).
    assert rel_diff(scores[True].state, scores[False].state) < 1e-6

    plan = select_global(scores[True].scores(ESTIMATOR), _target(arch), Constraints())
    assert plan.after.hidden_size < arch.hidden_size
    pruned = build_gpt_model(plan.after, use_te=True)
    load_canonical(pruned, plan.after, slice_state_dict(sd, plan))
    want = forward_logits(pruned, ids)
    masks = LiveMasks(models[True], comm.dims())
    masks.set(arch, masks_from_plan(plan))
    masked = float((forward_logits(models[True], ids) - want).abs().max())
    masks.remove()
    # Without the fused-norm correction (only the hooks on the IdentityOps' names) they differ.
    monkeypatch.setattr(LiveMasks, "_fused_norm_hook", lambda self, module, args, output: output)
    unfixed = LiveMasks(models[True], comm.dims())
    unfixed.set(arch, masks_from_plan(plan))
    without_fix = float((forward_logits(models[True], ids) - want).abs().max())
    unfixed.remove()
    assert masked <= 1e-5 and without_fix > 1e-3, (masked, without_fix)
