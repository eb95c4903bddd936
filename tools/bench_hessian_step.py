"""Per-step cost of the OBS Hessian statistics in the pruning window, for one Llama-3.2-1B layer
(o_proj input 2048, down_proj input 8192; 2 micro-batches of 256 subsampled tokens): a snapshot
clone of every Hessian each step (the old way of undoing a skipped step) against adding the kept
inputs, with the decay, at the step's end (``training.runtime.state.Statistics.end_step``).

    python tools/bench_hessian_step.py
"""
import time

import torch


def step_seconds(mode: str, widths=(2048, 8192), rows=256, micro=2, reps=3) -> float:
    hess = {w: torch.rand(w, w) for w in widths}
    count = {w: torch.zeros((), dtype=torch.float64) for w in widths}
    xs = [{w: torch.randn(rows * 4, w) for w in widths} for _ in range(micro)]
    bad = torch.zeros((), dtype=torch.bool)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        if mode == "clone":
            snapshot = {w: hess[w].clone() for w in widths}
            for w in widths:
                hess[w].mul_(0.99)
            for x in xs:
                for w in widths:
                    hess[w].addmm_(x[w][::4].T, x[w][::4])
            del snapshot
        else:
            kept = [(w, x[w][::4].to(torch.float32, copy=True)) for x in xs for w in widths]
            scale = torch.where(bad, 1.0, torch.full((), 0.99, dtype=torch.float64))
            for w in widths:
                hess[w].mul_(scale.float())
            for w, x in kept:
                x = torch.where(bad, 0.0, x)
                hess[w].addmm_(x.T, x)
                count[w] += (~bad).double() * x.shape[0]
        best = min(best, time.perf_counter() - t)
    return best


if __name__ == "__main__":
    torch.set_num_threads(1)
    for mode in ("clone", "deferred"):
        print(mode, f"{step_seconds(mode) * 1e3:.0f} ms")
