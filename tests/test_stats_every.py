"""prune.stats_every: scores and Hessians from every k-th step of the pruning window only.

k=1 collects on exactly the steps it always did; k>1 leaves the running sums untouched on the
other steps (bit for bit), so they are the sums over the sampled steps alone."""
import os

import pytest
import torch

from dist_utils import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny_cpu.yaml")
BASE = ["train.steps=9", "train.log_interval=9", "train.eval_interval=100", "train.checkpoint_interval=100",
        "prune.start_step=1", "prune.end_step=8", "prune.compact_every=100", "export.hf=false",
        "data.dynamic=false"]


def _runtime(extra):
    from megatron_effllm.architecture import Architecture
    from megatron_effllm.training.config import load_config
    from megatron_effllm.training.runtime.factory import make_runtime

    cfg = load_config(TINY, BASE + ["run_dir=unused"] + extra)
    arch = Architecture.uniform(**cfg.model.init)
    return make_runtime(cfg, arch, arch.num_params())


def test_collecting_steps_are_the_window_thinned_by_k():
    every = _runtime([])
    assert [s for s in range(12) if every.collects(s)] == list(range(1, 8))  # the window, as before
    assert [s for s in range(12) if _runtime(["prune.stats_every=1"]).collects(s)] == list(range(1, 8))
    thinned = _runtime(["prune.stats_every=3"])
    assert [s for s in range(12) if thinned.collects(s)] == [1, 4, 7]
    thinned.waiting = True  # an event waiting for statistics takes them from every step
    assert all(thinned.collects(s) for s in range(12))


def _snapshot(stats) -> dict:
    out = {f"s.{k}": v.detach().cpu().clone() for k, v in stats.saliency.state.items()}
    out.update({f"h.{k}": v.detach().cpu().clone() for k, v in stats.hessians.state.items()})
    return out


def _train(rank, world_size, run_dir, extra):
    from megatron_effllm.training.config import load_config
    from megatron_effllm.training.runtime.saliency_runtime import SaliencyRuntime
    from megatron_effllm.training.trainer import run

    seen = []
    start, end = SaliencyRuntime.start_step, SaliencyRuntime.end_step

    def spy_start(self, collecting, samples_per_rank, grad_scale, step=None):
        seen.append({"step": step, "collecting": collecting, "before": _snapshot(self.stats)})
        return start(self, collecting, samples_per_rank, grad_scale, step=step)

    def spy_end(self, skipped):
        out = end(self, skipped)
        seen[-1]["after"] = _snapshot(self.stats)
        return out

    SaliencyRuntime.start_step, SaliencyRuntime.end_step = spy_start, spy_end
    try:
        run(load_config(TINY, BASE + [f"run_dir={run_dir}"] + list(extra)))
    finally:
        SaliencyRuntime.start_step, SaliencyRuntime.end_step = start, end
    # plain values back to the parent (tensors would be shared through the exiting process)
    return [{"step": r["step"], "collecting": r["collecting"],
             "same": r["after"].keys() == r["before"].keys()
             and all(torch.equal(r["after"][k], r["before"][k]) for k in r["after"]),
             "count": (float(r["before"]["s.count"]), float(r["after"]["s.count"])),
             "hessians": any(k.startswith("h.xtx.") for k in r["after"])} for r in seen]


def test_steps_between_samples_leave_every_running_sum_as_it_was(tmp_path):
    seen = run_ranks(_train, world_size=1, args=(str(tmp_path / "run"), ["prune.stats_every=3"]))[0]
    assert [r["step"] for r in seen if r["collecting"]] == [1, 4, 7]
    for r in seen:
        if not r["collecting"]:  # nothing decays, nothing is added: the same bits
            assert r["same"], r["step"]
        else:  # this step's 8 samples join the decayed sum; its inputs join the Hessians
            before, after = r["count"]
            assert after == pytest.approx(before * 0.9 + 8.0, rel=1e-12)
            assert r["hessians"] and not r["same"]
