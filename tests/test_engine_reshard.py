"""ZeRO 1/2/3 at DP=2: after a structured prune the rebuilt engine carries every surviving
parameter's fp32 master and Adam moments exactly (sliced), keeps the step, and trains on."""
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


def _slice(full, keep):
    out = {}
    for name, entry in full.items():
        sl = {}
        for key, t in entry.items():
            if name.startswith("up."):
                sl[key] = t[keep].clone()
            elif name == "down.weight":
                sl[key] = t[:, keep].clone()
            else:
                sl[key] = t.clone()
        out[name] = sl
    return out


def _body(rank, world_size):
    from megatron_effllm.training import engine as eng

    torch.manual_seed(100 + rank)
    data = [(torch.randn(2, 8), torch.randn(2, 4)) for _ in range(4)]
    keep = torch.tensor([0, 2, 3, 5])
    report = {}
    for stage in (1, 2, 3):
        cfg = eng.deepspeed_config(micro_batch=2, grad_accum=1, zero_stage=stage, bf16=False, clip_grad=1.0)
        mk = lambda m: eng.make_optimizer(m, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
        model = Toy(6)
        engine = eng.initialize_engine(model, cfg, mk(model))
        for x, y in data[:2]:
            loss = engine(x, y)
            engine.backward(loss)
            engine.step()
        before = eng.gather_full_state(engine)
        expected = _slice(before, keep)
        engine = eng.rebuild_engine(engine, Toy(4), lambda f: _slice(f, keep), ds_config=cfg, make_opt=mk)
        after = eng.gather_full_state(engine)
        for name in expected:
            for key in ("param", "exp_avg", "exp_avg_sq"):
                assert torch.equal(after[name][key], expected[name][key]), (stage, name, key)
        assert eng.optimizer_step_count(engine) == 2
        for x, y in data[2:]:
            loss = engine(x, y)
            engine.backward(loss)
            engine.step()
        assert eng.optimizer_step_count(engine) == 4
        assert torch.isfinite(loss).item()
        # A fresh-optimizer rebuild keeps the weights but restarts Adam.
        full = eng.gather_full_state(engine)
        engine = eng.rebuild_engine(engine, Toy(4), lambda f: f, ds_config=cfg, make_opt=mk,
                                    carry_optimizer_state=False)
        assert eng.optimizer_step_count(engine) == 0
        assert torch.equal(eng.gather_full_state(engine)["down.weight"]["param"], full["down.weight"]["param"])
        engine.destroy()
        report[stage] = float(loss)
    return report


def test_zero_stages_carry_adam_state_through_prune():
    results = run_ranks(_body, world_size=2)
    for per_rank in results:  # the three ZeRO stages train identically through the prune
        assert per_rank[1] == per_rank[2] == per_rank[3]
