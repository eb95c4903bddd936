"""The communication device, checked on CPUs: the ``checked`` backend (gloo refusing, as NCCL
does, tensors that are not on the communication device; ``EFFLLM_CHECK_COMM=1``).

- a collective from package code on a tensor that did not go through parallel.comm's placement
  fails with NCCL's message; comm's own calls, object collectives included, pass; calls from
  other libraries are theirs;
- the tiny config end to end at 2 ranks under it: held-out losses, prune events, the OBS Hessian
  reduce, the decision-hash check, compactions, checkpoints and a resume at DP=2 under ZeRO-3,
  and Sheared-LLaMA's L0 gates with the pipeline's P2P at PP=2;
- the trainer as it was before the communication module (git ``24796eb``) fails under it at
  its held-out loss all-reduce.
"""
import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

from dist_utils import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny_cpu.yaml")
CHECKER = os.path.join(ROOT, "megatron_effllm", "parallel", "checked_backend.py")
REFUSAL = "No backend type associated with device type cpu"
OLD_TRAINER = "24796eb"  # its held-out loss all-reduced a CPU tensor it made itself
SHORT = ["train.steps=8", "train.checkpoint_interval=4", "train.eval_interval=4", "train.log_interval=4",
         "prune.start_step=1", "prune.end_step=6", "prune.compact_every=2", "data.dynamic_interval=4",
         "train.progress_bar=false", "export.hf=false"]

PACKAGE_LIKE = '''
import torch
import torch.distributed as dist
from megatron_effllm.parallel import comm

def direct(t):
    dist.all_reduce(t)

def through_comm(t):
    return comm.all_reduce_(t)

def objects(rank):
    return comm.all_gather_object({"rank": rank}), comm.broadcast_object(["from", rank], src=1)

def torch_objects():
    dist.all_gather_object([None, None], 1)
'''


def _unit(rank, world_size):
    import types

    import torch
    import torch.distributed as dist

    from megatron_effllm.parallel import checked_backend
    from megatron_effllm.parallel.runtime import process_group_backend

    os.environ["EFFLLM_CHECK_COMM"] = "1"
    dist.init_process_group(process_group_backend())
    pkg = types.ModuleType("megatron_effllm.fake_strategy")  # code of the package, by its name
    exec(PACKAGE_LIKE, pkg.__dict__)  # noqa: S102 (the test's own code)
    out = {"backend": dist.get_backend()}
    try:
        pkg.direct(torch.ones(3))
    except RuntimeError as e:
        out["direct"] = str(e)
    try:
        pkg.torch_objects()
    except RuntimeError as e:
        out["torch_objects"] = str(e)
    t = torch.full((3,), float(rank + 1))
    out["through_comm"] = pkg.through_comm(t).tolist()
    out["objects"] = pkg.objects(rank)
    dist.all_reduce(torch.ones(1))  # not the package's: passes
    out["calls"] = dict(checked_backend.calls)
    return out


@pytest.fixture(scope="module")
def unit():
    return run_ranks(_unit, world_size=2, backend=None)


def test_an_unplaced_package_tensor_is_refused_as_nccl_would(unit):
    for r in unit:
        assert r["backend"] == "checked"
        assert r["direct"].startswith(REFUSAL), r["direct"]
        assert "a (3,) torch.float32 tensor from" in r["direct"] and "in direct" in r["direct"]
        # torch's own object collectives make their tensors where comm cannot place them
        assert r["torch_objects"].startswith(REFUSAL), r["torch_objects"]


def test_comm_places_what_it_sends_objects_included(unit):
    for rank, r in enumerate(unit):
        assert r["through_comm"] == [3.0, 3.0, 3.0]
        assert r["objects"] == ([{"rank": 0}, {"rank": 1}], ["from", 1])
        assert r["calls"][("all_reduce_", "megatron_effllm.fake_strategy.through_comm")] == 1
        assert r["calls"][("all_gather", "megatron_effllm.fake_strategy.objects")] == 2  # sizes, payloads
        assert r["calls"][("broadcast_", "megatron_effllm.fake_strategy.objects")] == 2


def test_the_switch_is_one_variable_and_refuses_nonsense(monkeypatch):
    from megatron_effllm.errors import UserError
    from megatron_effllm.parallel.runtime import process_group_backend

    monkeypatch.delenv("EFFLLM_CHECK_COMM", raising=False)
    assert process_group_backend() == "gloo"
    monkeypatch.setenv("EFFLLM_CHECK_COMM", "yes")
    with pytest.raises(UserError, match="EFFLLM_CHECK_COMM='yes' must be 1"):
        process_group_backend()


def _checked_runs(rank, world_size, base):
    """Three runs in the same two processes under the checking backend: DP=2 ZeRO-3 (OBS,
    held-out losses, compactions, checkpoints), its resume from the mid-prune checkpoint, and
    PP=2 with L0 gates. Returns the summaries and the checked calls by (comm function, caller)."""
    import torch.distributed as dist

    from megatron_effllm.parallel import checked_backend
    from megatron_effllm.training.config import load_config
    from megatron_effllm.training.trainer import run

    os.environ["EFFLLM_CHECK_COMM"] = "1"

    def train(name, extra):
        return run(load_config(TINY, SHORT + [f"run_dir={os.path.join(base, name)}"] + extra))

    zero3 = ["parallel.zero_stage=3", "prune.estimator=fisher"]
    out = {"zero3": train("zero3", zero3)}
    if rank == 0:
        for sub in (os.path.join("checkpoints", "step_000004"), "data"):
            shutil.copytree(os.path.join(base, "zero3", sub), os.path.join(base, "resumed", sub))
    dist.barrier()
    out["resumed"] = train("resumed", zero3)
    out["pp2"] = train("pp2", ["parallel.pp=2", "prune.strategy=sheared", "parallel.zero_stage=1"])
    out["backend"] = dist.get_backend()
    out["calls"] = dict(checked_backend.calls)
    return out


# Where each part of the run reaches a collective (the package function that called comm).
EXERCISED = {
    "held-out losses": "training.trainer.Trainer.heldout_losses",
    "ZeRO-3's equal forward counts": "training.trainer.Trainer._same_count_over_dp",
    "saliency reduce (prune events)": "parallel.distributed_pruning.reduce_saliency",
    "OBS Hessian reduce": "training.runtime.saliency_runtime.SaliencyRuntime._reduced_hessian.<locals>.<dictcomp>",
    "decision-hash check": "parallel.distributed_pruning.check_same_decision",
    "compaction's state broadcast": "engine.deepspeed_engine.DeepSpeedEngine._load_held",
    "checkpoint agreement": "training.checkpoint._agree",
    "L0 gates": "training.runtime.l0_runtime.L0Runtime._update_gates",
    "pipeline loss from the last stage": "training.pipeline.broadcast_from_last_stage",
}


def test_two_ranks_end_to_end_under_the_checking_backend(tmp_path):
    results = run_ranks(_checked_runs, world_size=2, args=(str(tmp_path),), backend=None)
    for r in results:
        assert r["backend"] == "checked"
        callers = {by for _, by in r["calls"]}
        missing = {what: f for what, f in EXERCISED.items() if "megatron_effllm." + f not in callers}
        assert not missing, (missing, sorted(r["calls"].items()))
        assert not [c for c in r["calls"] if c[0] == "(direct)"]  # every package call went through comm
    r = results[0]
    for name in ("zero3", "resumed", "pp2"):
        assert r[name]["final_params"] < 0.8 * r[name]["source_params"], name
    assert r["resumed"]["final_loss"] == r["zero3"]["final_loss"]


def _old_trainer(rank, world_size, old_root, run_dir):
    """The old package, this checker (loaded by its path: the old tree has none)."""
    sys.path.insert(0, old_root)
    import torch.distributed as dist

    spec = importlib.util.spec_from_file_location("checker_under_test", CHECKER)
    checker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(checker)
    dist.init_process_group(checker.register())
    from megatron_effllm.training.config import load_config
    from megatron_effllm.training.trainer import run

    assert os.path.dirname(sys.modules["megatron_effllm"].__path__[0]) == old_root
    try:
        run(load_config(os.path.join(old_root, "configs", "tiny_cpu.yaml"),
                        SHORT + [f"run_dir={run_dir}"]))
    except RuntimeError as e:
        return str(e)
    return None


def test_the_old_trainer_fails_under_the_checking_backend(tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    archive = subprocess.run(["git", "-C", ROOT, "archive", OLD_TRAINER, "megatron_effllm", "configs"],
                             capture_output=True, check=False)
    if archive.returncode != 0:
        pytest.skip(f"git history without {OLD_TRAINER} (a shallow clone)")
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
    errors = run_ranks(_old_trainer, world_size=2, args=(str(old), str(tmp_path / "run")), backend=None)
    for e in errors:
        print(e)
        assert e is not None and e.startswith(REFUSAL), e
        assert "trainer.py" in e and "in Trainer.heldout_losses" in e, e
