"""The saliency runtime's running sums live next to the model (a checkpoint loads them on the
CPU; ``Statistics.to_device`` puts every one of them back), so that the gradient hooks, the
Hessian inputs and the block cosines add into them without a copy to the host. A saliency vector
is saved over the range where it is not zero and comes back bit for bit."""
import pytest
import torch

from megatron_effllm.architecture import Architecture
from megatron_effllm.pruning import obs
from megatron_effllm.pruning.saliency import GradSaliency
from megatron_effllm.training.runtime.state import Statistics


def test_every_running_sum_moves_to_the_model_device():
    arch = Architecture.uniform(num_layers=2, hidden_size=16, num_heads=4, num_kv_groups=2,
                                ffn_hidden_size=32, vocab_size=64)
    hessians = obs.HessianAccumulator()
    hessians.add("model.layers.0.mlp.down_proj.weight", torch.randn(5, 32))
    stats = Statistics(GradSaliency(arch, estimators=("fisher",)), hessians, torch.zeros(2, 2, dtype=torch.float64))
    stats.obs_cache = {"model.layers.0.mlp.down_proj.weight": ([0, 1], torch.eye(2))}
    # "meta" stands in for an accelerator: every tensor must follow, none may stay on the CPU.
    stats.to_device(torch.device("meta"))
    tensors = (list(stats.saliency.state.values()) + list(stats.hessians.state.values())
               + [stats.layer_cos] + [h for _, h in stats.obs_cache.values()])
    assert len(tensors) > 10 and {t.device.type for t in tensors} == {"meta"}


def test_saliency_vectors_are_saved_over_their_nonzero_range_and_restored_bit_for_bit():
    from megatron_effllm.errors import UserError
    from megatron_effllm.training.runtime.state import from_range, nonzero_range

    v = torch.zeros(12, dtype=torch.float64)
    v[3], v[5], v[8] = -0.0, float("nan"), 1e-300  # -0.0 and NaN count as values
    saved = nonzero_range(v)
    assert (saved["start"], saved["size"], saved["values"].numel()) == (3, 12, 6)
    back = from_range(saved)
    assert torch.equal(back.view(torch.int64), v.view(torch.int64))
    empty = nonzero_range(torch.zeros(5, dtype=torch.float64))
    assert empty["values"].numel() == 0 and torch.equal(from_range(empty), torch.zeros(5, dtype=torch.float64))
    count = torch.tensor(7.0, dtype=torch.float64)
    assert torch.equal(from_range(nonzero_range(count)), count)
    with pytest.raises(UserError, match="saliency vector .* is damaged"):
        from_range({"start": 10, "size": 12, "values": torch.ones(6, dtype=torch.float64)})
