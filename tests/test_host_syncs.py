"""Device->host reads during training: none from this package in a step that logs, prunes,
evaluates and saves nothing.

A real 2-rank run of the tiny config (ZeRO-2, the pruning window open with OBS Hessians) with
counters on every way a tensor reaches the host: ``Tensor.item``, ``.cpu``, ``.tolist``,
``.numpy``, ``.to("cpu")``, ``float()``, ``int()``, ``bool()``. Each call is attributed to the
first frame outside torch that made it: this package, DeepSpeed, megatron or other. On this CPU
machine every tensor is on the host, so the data loader's batches are tagged (a GPU reads
nothing from them) and a ``.to`` counts when it names the host (``_names_the_host``). Run with ``-s`` to see the counts per step.
"""
from __future__ import annotations

import collections
import os
import sys
import traceback

import torch

from dist_utils import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny_cpu.yaml")
# 12 steps; the window collects in steps 2-11 (1-based); prune events (with a compaction) after
# steps 6 and 11; log lines after 6 and 12; the only checkpoint after 12; the ranks compare
# preemption flags after step 1 only (they calibrate the spacing there; then every 10^6 s).
OVERRIDES = ["train.steps=12", "train.preempt_check_s=1000000", "train.log_interval=6", "train.eval_interval=100", "train.checkpoint_interval=100",
             "train.keep_checkpoints=1", "prune.start_step=1", "prune.end_step=11", "prune.interval=5",
             "prune.compact_every=1", "data.dynamic=false", "export.hf=false"]
QUIET = [2, 3, 4, 5, 7, 8, 9, 10]
EVENTS = [6, 11]
HOST_BATCH = "_host_batch"  # the attribute that tags a data-loader tensor
TORCH_DIR = os.path.dirname(torch.__file__) + os.sep


def _owner(frame) -> tuple[str, str]:
    """(owner, file:line) of the first caller outside torch and this file."""
    here = os.path.abspath(__file__)
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if not path.startswith(TORCH_DIR) and path != here:
            where = f"{os.path.basename(path)}:{frame.f_lineno}"
            for owner in ("megatron_effllm", "deepspeed", "megatron"):
                if f"{os.sep}{owner}{os.sep}" in path:
                    return owner, where
            return "other", where
        frame = frame.f_back
    return "other", "?"


def _names_the_host(args, kwargs) -> bool:
    """``.to("cpu")`` / ``.to(device="cpu")``: a copy to the host by intent. A ``torch.device``
    argument is the model's or another tensor's device here, which on this CPU machine cannot be
    told from the host (a copy to the host is spelled ``.cpu()`` or ``"cpu"`` in this package)."""
    return any(isinstance(a, str) and a.startswith("cpu") for a in (*args, kwargs.get("device")))


class Counter:
    """Per training step (1-based, the step whose loop iteration is running): host reads by owner,
    and whether the step logged, pruned, evaluated or saved."""

    def __init__(self):
        self.step = None
        self.reads = collections.defaultdict(collections.Counter)
        self.sites = collections.defaultdict(collections.Counter)
        self.loud = collections.defaultdict(set)

    def count(self, what: str) -> None:
        if self.step is None:
            return
        owner, where = _owner(sys._getframe(2))
        self.reads[self.step][owner] += 1
        self.sites[self.step][f"{owner} {what} {where}"] += 1

    def mark(self, kind: str) -> None:
        if self.step is not None:
            self.loud[self.step].add(kind)


def _install(counter: Counter) -> None:
    T = torch.Tensor
    for name in ("item", "cpu", "tolist", "numpy", "__float__", "__int__", "__bool__"):
        orig = getattr(T, name)

        def wrapped(self, *a, _orig=orig, _name=name, **k):
            counter.count(_name)
            return _orig(self, *a, **k)

        setattr(T, name, wrapped)
    orig_to = T.to

    def to(self, *a, **k):
        if _names_the_host(a, k) and not getattr(self, HOST_BATCH, False):
            counter.count("to(cpu)")
        return orig_to(self, *a, **k)

    T.to = to


def _hooks(counter: Counter) -> None:
    """Step boundaries and the steps' visible work, through the names the trainer calls."""
    from megatron_effllm.data.loader import TrainDataIterator
    from megatron_effllm.training import preemption
    from megatron_effllm.training import trainer as tr
    from megatron_effllm.training.metrics import MetricsLogger
    from megatron_effllm.training.runtime.saliency_runtime import SaliencyRuntime

    lr = tr.learning_rate

    def learning_rate(step, **kw):  # the first call of every step
        counter.step = step + 1
        return lr(step, **kw)

    tr.learning_rate = learning_rate
    nxt = TrainDataIterator.__next__

    def next_batch(self):
        batch = nxt(self)
        for v in batch.values():
            if torch.is_tensor(v):
                setattr(v, HOST_BATCH, True)
        return batch

    TrainDataIterator.__next__ = next_batch
    for cls, name, kind in ((MetricsLogger, "log", "log"), (SaliencyRuntime, "prune_event", "event"),
                            (tr.Trainer, "_save", "checkpoint"), (tr.Trainer, "heldout_losses", "eval")):
        orig = getattr(cls, name)

        def wrapped(self, *a, _orig=orig, _kind=kind, **k):
            counter.mark(_kind)
            return _orig(self, *a, **k)

        setattr(cls, name, wrapped)
    requested = preemption.Watch.requested

    def preemption_check(self, step):
        if step >= self.next_check:  # the ranks compare flags: one tiny all-reduce, read back
            counter.mark("preemption check")
        return requested(self, step)

    preemption.Watch.requested = preemption_check
    finish = tr.Trainer._finish

    def _finish(self, *a, **k):
        counter.step = None  # the export and final evaluation are no training step
        return finish(self, *a, **k)

    tr.Trainer._finish = _finish


def _train(rank, world_size, run_dir):
    from megatron_effllm.training.config import load_config
    from megatron_effllm.training.trainer import run

    counter = Counter()
    _hooks(counter)
    _install(counter)
    try:
        run(load_config(TINY, OVERRIDES + [f"run_dir={run_dir}"]))
    except Exception:
        return {"error": traceback.format_exc()}
    return {"reads": {s: dict(c) for s, c in counter.reads.items()},
            "sites": {s: dict(c) for s, c in counter.sites.items()},
            "loud": {s: sorted(k) for s, k in counter.loud.items()}}


def test_no_host_reads_from_the_package_between_prune_events(tmp_path):
    results = run_ranks(_train, world_size=2, args=(str(tmp_path / "run"),), timeout=900)
    for rank, res in enumerate(results):
        assert "error" not in res, res.get("error")
        quiet = [s for s in range(1, 13) if not res["loud"].get(s)]
        assert quiet == QUIET, res["loud"]  # the run is the one this test means
        assert all("event" in res["loud"][s] for s in EVENTS), res["loud"]
        print(f"\nrank {rank}: host reads per step (owner: count)")
        for s in range(1, 13):
            kind = ",".join(res["loud"].get(s, [])) or "quiet"
            print(f"  step {s:2d} [{kind}]: {res['reads'].get(s, {})}")
        print(f"  where, in quiet step {QUIET[-1]}: {res['sites'].get(QUIET[-1], {})}")
        ours = {s: {k: n for k, n in res["sites"].get(s, {}).items() if k.startswith("megatron_effllm ")}
                for s in QUIET if res["reads"].get(s, {}).get("megatron_effllm")}
        assert not ours, f"rank {rank}: this package read from the device in quiet steps: {ours}"
