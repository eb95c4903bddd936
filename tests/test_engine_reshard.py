"""The DeepSpeed TrainEngine, ZeRO 1/2/3 at DP=2: after a structured prune the rebuilt engine
carries every surviving parameter's fp32 master and Adam moments exactly (sliced), keeps the
step, and trains on."""
import gc
import weakref

import torch

from dist_utils import run_ranks


class Toy(torch.nn.Module):
    def __init__(self, width):
        super().__init__()
        torch.manual_seed(0)
        self.up = torch.nn.Linear(8, width)
        self.down = torch.nn.Linear(width, 4)

    def forward(self, x, y):
        return torch.nn.functional.mse_loss(self.down(torch.relu(self.up(x))), y)


def _slice(pairs, keep):
    """What a pruning runtime's slicer does, for the toy: (name, state) pairs -> sliced pairs."""
    for name, entry in pairs:
        sl = {}
        for key, t in entry.items():
            if name.startswith("up."):
                sl[key] = t[keep].clone()
            elif name == "down.weight":
                sl[key] = t[:, keep].clone()
            else:
                sl[key] = t.clone()
        yield name, sl


def _body(rank, world_size):
    from megatron_effllm.engine import build_engine
    from megatron_effllm.engine.base import EngineOptions, TrainEngine

    torch.manual_seed(100 + rank)
    data = [(torch.randn(2, 8), torch.randn(2, 4)) for _ in range(4)]
    keep = torch.tensor([0, 2, 3, 5])
    report = {}
    for stage in (1, 2, 3):
        options = EngineOptions(micro_batch=2, grad_accum=1, zero_stage=stage, bf16=False, clip_grad=1.0,
                                lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
        engine = build_engine("deepspeed", Toy(6), options)
        assert isinstance(engine, TrainEngine)
        for x, y in data[:2]:
            loss = engine(x, y)
            engine.backward(loss, last_micro_batch=True)
            engine.step()
        del loss  # its graph's leaves are the old parameters (as a trainer's last loss would be)
        before = engine.gather_full_state()
        expected = dict(_slice(before.items(), keep))
        old_module = weakref.ref(engine.module)
        engine = engine.rebuild(lambda: Toy(4), lambda pairs: _slice(pairs, keep))
        after = engine.gather_full_state()
        for name in expected:
            for key in ("param", "exp_avg", "exp_avg_sq"):
                assert torch.equal(after[name][key], expected[name][key]), (stage, name, key)
        assert engine.optimizer_step_count() == 2
        gc.collect()
        assert old_module() is None, stage  # the old engine let go of its model: its memory is free
        for x, y in data[2:]:
            loss = engine(x, y)
            engine.backward(loss, last_micro_batch=True)
            engine.step()
        assert engine.optimizer_step_count() == 4
        assert torch.isfinite(loss).item()
        # A fresh-optimizer rebuild keeps the weights but restarts Adam.
        full = engine.gather_full_state()
        engine = engine.rebuild(lambda: Toy(4), lambda pairs: pairs, carry_optimizer_state=False)
        assert engine.optimizer_step_count() == 0
        assert torch.equal(engine.gather_full_state()["down.weight"]["param"], full["down.weight"]["param"])
        engine.destroy()
        report[stage] = float(loss)
    return report


def test_zero_stages_carry_adam_state_through_prune():
    results = run_ranks(_body, world_size=2)
    for per_rank in results:  # the three ZeRO stages train identically through the prune
        assert per_rank[1] == per_rank[2] == per_rank[3]
