"""Checkpoints that survive damage and full disks, and steps that survive non-finite numbers.

Real DeepSpeed engines on 2 gloo ranks (ZeRO-2): a save that fails because the disk is full
(a real full tmpfs where mounting is allowed, else a file-size limit: the same failing write)
leaves the previous checkpoint and `latest` untouched on both ranks; damaged checkpoints are
named in one line and `resume: auto` falls back; a non-finite loss or gradient on one rank skips
the update on every rank, exactly (the weights equal those of a run without that step).
"""
import contextlib
import errno
import glob
import hashlib
import json
import os
import shutil
import subprocess

import pytest
import torch

from dist_utils import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny_cpu.yaml")


# ------------------------------------------------------------------ small real engines
def _engine(stage: int, bf16: bool = False, width: int = 64):
    from megatron_effllm.engine import build_engine
    from megatron_effllm.engine.base import EngineOptions

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, width), torch.nn.Linear(width, 1))
    options = EngineOptions(micro_batch=2, grad_accum=2, zero_stage=stage, bf16=bf16, clip_grad=1.0,
                            lr=0.05, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    return build_engine("deepspeed", model, options)


def _batches(seed: int, rank: int):
    g = torch.Generator().manual_seed(seed * 10 + rank)
    return [torch.randn(2, 16, generator=g) for _ in range(2)]


def _backward(engine, xs, rank, poison=None):
    """One global batch of backward passes; ``poison`` = "loss" (NaN loss) or "grad" (inf grads)."""
    from megatron_effllm.training.fault_injection import InfiniteGrad

    for k, x in enumerate(xs):
        out = engine(x.to(next(engine.module.parameters()).dtype)).float()
        loss = out.pow(2).mean()
        if poison == "loss" and k == 0:
            loss = loss * float("nan")
        if poison == "grad" and k == 0:
            loss = InfiniteGrad.apply(loss)
        engine.backward(loss, last_micro_batch=k == len(xs) - 1)
    return float(loss)


def _masters(engine):
    return [engine.full_fp32_param(p).clone() for p in engine.module.parameters()]


def _skip_rank(rank, world_size):
    """For each ZeRO stage: clean steps 1, 2 versus 1, (NaN loss on rank 1), (inf grad on rank 0),
    (finite, but flagged bad on rank 1), 2."""
    out = {}
    for stage, bf16 in ((0, False), (1, False), (2, False), (2, True), (3, False)):
        clean = _engine(stage, bf16)
        for s in (1, 2):
            _backward(clean, _batches(s, rank), rank)
            assert float(clean.step_unless(torch.zeros(()))) == 0.0
        ref = _masters(clean)
        clean.destroy()
        e = _engine(stage, bf16)
        _backward(e, _batches(1, rank), rank)
        e.step()
        before = _masters(e)
        detected = []
        # a NaN loss (NaN gradients), infinite gradients, and the caller's flag with finite gradients
        for seed, kind, who in ((98, "loss", 1), (99, "grad", 0), (97, "flag", 1)):
            _backward(e, _batches(seed, rank), rank, poison=kind if rank == who else None)
            flag = torch.ones(()) if kind == "flag" and rank == who else torch.zeros(())
            detected.append(float(e.step_unless(flag)) == 1.0)
        unchanged = all(torch.equal(a, b) for a, b in zip(before, _masters(e)))
        _backward(e, _batches(2, rank), rank)
        assert float(e.step_unless(torch.zeros(()))) == 0.0
        same = all(torch.equal(a, b) for a, b in zip(ref, _masters(e)))
        out[(stage, bf16)] = (detected, unchanged, same, e.optimizer_step_count())
        e.destroy()
    return out


def test_nonfinite_step_is_skipped_exactly_on_every_rank(saved):
    """Poison on one rank only: both ranks see it and skip; nothing of that step remains."""
    for rank, res in enumerate(saved[5]):
        for (stage, bf16), (detected, unchanged, same, adam_steps) in res.items():
            where = f"rank {rank} ZeRO-{stage} bf16={bf16}"
            assert detected == [True, True, True], where
            assert unchanged, where   # the skipped updates left masters untouched
            assert same, where        # and no gradient of them leaked into the next step
            assert adam_steps == 2, where


# ------------------------------------------------------------------ checkpoints, full disk
def _tree_hashes(folder):
    out = {}
    for path in sorted(glob.glob(os.path.join(folder, "**"), recursive=True)):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _save_rank(rank, world_size, good_root, full_root, fsize_limit):
    """(In the same two processes, to pay the imports once: the exact-skip checks first.)"""
    from megatron_effllm.training import checkpoint as ckpt

    skips = _skip_rank(rank, world_size)
    engine = _engine(2, width=2048)
    state = {"step": 0}

    def train_and_save(root, step):
        _backward(engine, _batches(step, rank), rank)
        engine.step()
        return ckpt.save(engine, root, step, architecture_json="{}", trainer_state=dict(state, step=step),
                         keep=2)

    for step in (1, 2, 3):
        if step == 3:
            with _hashed(os.path.join(good_root, "step_000003.partial")) as hashed_on_save:
                train_and_save(good_root, step)
        else:
            train_and_save(good_root, step)
    hashing = {"save": sorted(hashed_on_save)}
    hashing.update(_verify_with_rank1_damaged(rank, good_root))
    train_and_save(full_root, 1)
    hashes = _tree_hashes(os.path.join(full_root, "step_000001")) if rank == 0 else None
    if fsize_limit:
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a too-large write fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize_limit, resource.RLIM_INFINITY))
    try:
        train_and_save(full_root, 2)
        message = None
    except ckpt.CheckpointError as err:
        message = str(err)
    finally:
        if fsize_limit:
            import resource

            resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    engine.destroy()
    return message, hashes, skips, hashing


@contextlib.contextmanager
def _hashed(folder):
    """The files this process hashes inside, relative to ``folder``."""
    from megatron_effllm import manifest

    seen, real = [], manifest.sha256

    def spy(path):
        seen.append(os.path.relpath(path, folder))
        return real(path)

    manifest.sha256 = spy
    try:
        yield seen
    finally:
        manifest.sha256 = real


def _verify_with_rank1_damaged(rank, good_root):
    """A copy of the checkpoints with a byte of rank 1's optimizer partition flipped in the newest:
    what each rank hashes to verify it, what it says, and which one ``resume: auto`` takes."""
    from megatron_effllm.parallel import comm
    from megatron_effllm.training import checkpoint as ckpt

    root = good_root + "_rank1_damaged"
    newest = os.path.join(root, "step_000003")
    if rank == 0:
        shutil.copytree(good_root, root)
    comm.barrier()
    with _hashed(newest) as hashed:
        ckpt.verify(newest)
    comm.barrier()
    if rank == 0:
        victim = glob.glob(os.path.join(newest, "ds", "**", "zero_pp_rank_1_*optim_states.pt"), recursive=True)[0]
        with open(victim, "r+b") as f:
            f.seek(os.path.getsize(victim) // 2)
            byte = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([byte[0] ^ 0xFF]))
    comm.barrier()
    try:
        ckpt.verify(newest)
        said = None
    except ckpt.CheckpointError as err:
        said = str(err)
    chosen = ckpt.find_resumable(root, report=lambda m: None)
    return {"verify": sorted(hashed), "said": said, "chosen": chosen}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(root with complete checkpoints 2 and 3, full-disk root, per-rank messages, hashes, how,
    per-rank results of the exact-skip checks)."""
    base = tmp_path_factory.mktemp("ckpt")
    good, full = str(base / "good"), str(base / "full")
    os.makedirs(full)
    # One checkpoint of this engine takes about 0.6 MB (model states and two ZeRO-2 optimizer
    # partitions): the 1.2 MB disk holds the first and fills up during the second.
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1200k", "tmpfs", full],
                                 capture_output=True).returncode == 0
    except OSError:  # no mount command: not root, or a minimal image
        mounted = False
    try:
        results = run_ranks(_save_rank, world_size=2,
                            args=(good, full, None if mounted else 100_000), timeout=300)
        kept = str(base / "full_kept")
        shutil.copytree(full, kept)
    finally:
        if mounted:
            subprocess.run(["umount", full], check=False)
    how = "tmpfs (ENOSPC)" if mounted else "RLIMIT_FSIZE (EFBIG)"
    return good, kept, [r[0] for r in results], results[0][1], how, [r[2] for r in results], [r[3] for r in results]


def test_full_disk_leaves_previous_checkpoint_intact(saved):
    from megatron_effllm.training import checkpoint as ckpt

    _, full, messages, hashes_before, how, _, _ = saved
    assert messages[0] is not None, f"the save did not fail ({how})"
    assert messages[0] == messages[1]  # every rank stops with the same line, none hangs
    msg = messages[0]
    assert "\n" not in msg
    assert "could not write checkpoint" in msg and "step_000002" in msg, msg
    if how.startswith("tmpfs"):
        assert os.strerror(errno.ENOSPC) in msg and "MiB free" in msg, msg
    else:
        assert os.strerror(errno.EFBIG) in msg or "write failed" in msg, msg
    assert "previous checkpoint (step_000001)" in msg and "resume: auto" in msg
    assert sorted(os.listdir(full)) == ["latest", "step_000001"]  # no partial folder left behind
    with open(os.path.join(full, "latest")) as f:
        assert f.read().strip() == "step_000001"
    assert _tree_hashes(os.path.join(full, "step_000001")) == hashes_before
    ckpt.verify(os.path.join(full, "step_000001"))
    assert ckpt.find_resumable(full, report=lambda m: None) == os.path.join(full, "step_000001")


def test_checkpoint_contents_and_latest(saved):
    from megatron_effllm.training import checkpoint as ckpt

    good = saved[0]
    assert sorted(os.listdir(good)) == ["latest", "step_000002", "step_000003"]  # keep=2
    with open(os.path.join(good, "latest")) as f:
        assert f.read().strip() == "step_000003"
    folder = os.path.join(good, "step_000003")
    with open(os.path.join(folder, ckpt.MANIFEST)) as f:
        listed = set(json.load(f)["files"])
    assert {"layout.json", "trainer_state.pt", "architecture.json", "rng/rank_00000.pt",
            "rng/rank_00001.pt"} <= listed
    assert any(name.startswith("ds/") and "optim_states" in name for name in listed)
    with open(os.path.join(folder, "layout.json")) as f:
        assert json.load(f) == {"world_size": 2, "zero_stage": 2, "tp": 1, "pp": 1, "ranks": [[0, 0, 0], [0, 0, 1]]}


def test_each_rank_hashes_its_own_files_and_verification_is_agreed(saved):
    """Saving: each rank hashed exactly the files it wrote (rank 1: its RNG state and optimizer
    partition), the two together every file the manifest lists, each once; the manifest names
    the writer. Verifying: each rank reads only its own files, and a flipped byte in rank 1's
    partition is refused on both ranks with the same line; both fall back to the same checkpoint."""
    good, hashing = saved[0], saved[6]
    folder = os.path.join(good, "step_000003")
    with open(os.path.join(folder, "MANIFEST.json")) as f:
        listed = json.load(f)["files"]
    mine = [sorted(rel for rel, meta in listed.items() if meta.get("rank", 0) == r) for r in (0, 1)]
    assert mine[1] and all(rel == "rng/rank_00001.pt" or "zero_pp_rank_1_" in rel for rel in mine[1]), mine[1]
    assert "rng/rank_00001.pt" in mine[1] and "trainer_state.pt" in mine[0]
    for rank in (0, 1):
        assert hashing[rank]["save"] == mine[rank]
        assert hashing[rank]["verify"] == mine[rank]
    assert sorted(mine[0] + mine[1]) == sorted(listed)
    said = hashing[0]["said"]
    assert said is not None and "\n" not in said and "zero_pp_rank_1_" in said and "is corrupted (checksum mismatch)" in said
    assert hashing[1]["said"] == said
    assert hashing[0]["chosen"] == hashing[1]["chosen"] == os.path.join(good + "_rank1_damaged", "step_000002")


def test_manifest_entries_name_their_writer_and_each_rank_checks_its_own(tmp_path):
    from megatron_effllm.errors import UserError
    from megatron_effllm.manifest import file_entries, verify_manifest, write_manifest

    folder = str(tmp_path / "f")
    os.makedirs(os.path.join(folder, "sub"))
    for rel in ("a", "sub/b", "c"):
        with open(os.path.join(folder, rel), "w") as f:
            f.write(rel * 100)
    write_manifest(folder, {**file_entries(folder, ["sub/b"], rank=1), **file_entries(folder, ["a"], rank=0)})
    with open(os.path.join(folder, "MANIFEST.json")) as f:
        listed = json.load(f)["files"]
    assert {rel: meta.get("rank") for rel, meta in listed.items()} == {"a": 0, "sub/b": 1, "c": None}
    with open(os.path.join(folder, "sub/b"), "r+b") as f:
        f.write(b"X")
    assert verify_manifest(folder, rank=0, world_size=2) == ["a", "c", "sub/b"]  # b is rank 1's
    for rank, world in ((1, 2), (0, 1), (1, 3)):
        with pytest.raises(UserError, match="sub/b is corrupted"):
            verify_manifest(folder, rank=rank, world_size=world)


def _damaged(good, tmp_path, how):
    root = str(tmp_path / "ckpts")
    shutil.copytree(good, root)
    newest = os.path.join(root, "step_000003")
    victim = sorted(glob.glob(os.path.join(newest, "ds", "**", "*optim_states.pt"), recursive=True))[0]
    if how == "truncated":
        with open(victim, "r+b") as f:
            f.truncate(os.path.getsize(victim) // 2)
    elif how == "corrupted":
        with open(victim, "r+b") as f:
            f.seek(os.path.getsize(victim) // 2)
            byte = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([byte[0] ^ 0xFF]))
    elif how == "missing":
        os.remove(victim)
    elif how == "no manifest":
        os.remove(os.path.join(newest, "MANIFEST.json"))
        victim = newest
    return root, newest, victim


@pytest.mark.parametrize("how, words", [
    ("truncated", "is truncated"),
    ("corrupted", "is corrupted (checksum mismatch)"),
    ("missing", "is missing"),
    ("no manifest", "was not completely written"),
])
def test_damaged_checkpoint_named_and_auto_falls_back(saved, tmp_path, how, words):
    from megatron_effllm.training import checkpoint as ckpt

    root, newest, victim = _damaged(saved[0], tmp_path, how)
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.verify(newest)
    msg = str(err.value)
    assert "\n" not in msg and words in msg and victim in msg, msg
    logged = []
    assert ckpt.find_resumable(root, report=logged.append) == os.path.join(root, "step_000002")
    assert len(logged) == 1 and victim in logged[0]


def test_auto_resume_refuses_when_no_checkpoint_verifies(saved, tmp_path):
    from megatron_effllm.training import checkpoint as ckpt

    root = str(tmp_path / "ckpts")
    shutil.copytree(saved[0], root)
    for step in ("step_000002", "step_000003"):
        os.remove(os.path.join(root, step, "trainer_state.pt"))
    before = _tree_hashes(root)
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint in .* verifies .*trainer_state.pt is missing"
                       ".*set resume: fresh") as err:
        ckpt.find_resumable(root, report=lambda m: None)
    assert "\n" not in str(err.value)
    assert _tree_hashes(root) == before
    # A crash during the very first save leaves only a partial folder: that is a fresh start.
    fresh = str(tmp_path / "fresh")
    os.makedirs(os.path.join(fresh, "step_000004.partial", "ds"))
    assert ckpt.find_resumable(fresh, report=lambda m: None) is None


# ------------------------------------------------------------------ the trainer's policy
SHORT = ["train.steps=6", "train.log_interval=1", "train.checkpoint_interval=1", "train.keep_checkpoints=10",
         "prune.start_step=0", "prune.end_step=6", "prune.interval=4", "prune.compact_every=1",
         "data.dynamic=false", "export.hf=false"]


def _train(rank, world_size, run_dir, extra, inject):
    os.environ["EFFLLM_INJECT_NONFINITE"] = inject
    from megatron_effllm.training.config import load_config
    from megatron_effllm.training.trainer import run

    try:
        return run(load_config(TINY, SHORT + [f"run_dir={run_dir}"] + list(extra)))
    except Exception as err:  # the message is what the user sees
        from megatron_effllm.errors import UserError

        if isinstance(err, UserError):
            return {"error": str(err), "type": type(err).__name__}
        raise


def _module_weights(folder):
    path = glob.glob(os.path.join(folder, "ds", "**", "mp_rank_00_model_states.pt"), recursive=True)[0]
    module = torch.load(path, weights_only=True, map_location="cpu")["module"]
    return {k: v for k, v in module.items() if torch.is_tensor(v)}  # not megatron's _extra_state


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(l) for l in f if l.strip()]


def test_trainer_skips_nonfinite_steps_on_two_ranks(tmp_path):
    """NaN loss on rank 1 at step 2, infinite gradients on rank 0 at step 3 (inside the pruning
    window, collecting saliency from step 1): both steps leave weights and saliency exactly as
    after step 1; training goes on."""
    from megatron_effllm.training.runtime.state import from_range

    run_dir = str(tmp_path / "skip")
    results = run_ranks(_train, world_size=2, args=(run_dir, [], "loss@2:1,grad@3:0"), timeout=600)
    assert all("error" not in r for r in results), results
    ck = os.path.join(run_dir, "checkpoints")
    w = {s: _module_weights(os.path.join(ck, f"step_{s:06d}")) for s in (1, 2, 3, 4)}
    for s in (2, 3):
        assert all(torch.equal(w[1][k], w[s][k]) for k in w[1]), s
    assert any(not torch.equal(w[3][k], w[4][k]) for k in w[3])
    states = {s: torch.load(os.path.join(ck, f"step_{s:06d}", "ranks", "rank_00000.pt"), weights_only=True)
              for s in (1, 3, 4)}  # rank 0's own running sums
    sal1, sal3 = states[1]["saliency"], states[3]["saliency"]
    assert all(torch.equal(from_range(sal1[k]), from_range(sal3[k])) for k in sal1)
    assert float(states[4]["saliency"]["count"]) != float(sal1["count"])
    faults = [r for r in _metrics(run_dir) if r["kind"] == "fault"]
    assert [(r["step"], r["what"]) for r in faults] == [(2, "loss"), (3, "gradient")]
    losses = [r["loss"] for r in _metrics(run_dir) if r["kind"] == "train"]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses[2:])))


def _policies(rank, world_size, base):
    """Four short runs in one process (imports once); they share the tokenized data."""
    out = {}
    out["stop"] = _train(rank, world_size, os.path.join(base, "stop"),
                         ["train.nonfinite_policy=stop"], "loss@2")
    for name in ("skip", "rollback", "nockpt"):
        shutil.copytree(os.path.join(base, "stop", "data"), os.path.join(base, name, "data"))
    out["skip"] = _train(rank, world_size, os.path.join(base, "skip"),
                         ["train.max_nonfinite=2"], "loss@3,loss@4")
    out["rollback"] = _train(rank, world_size, os.path.join(base, "rollback"),
                             ["train.nonfinite_policy=rollback", "train.max_nonfinite=2",
                              "train.checkpoint_interval=2"], "loss@3,grad@4")
    out["no_checkpoint"] = _train(rank, world_size, os.path.join(base, "nockpt"),
                                  ["train.nonfinite_policy=rollback", "train.max_nonfinite=1",
                                   "train.checkpoint_interval=6"], "grad@2")
    return out


def test_nonfinite_policies(tmp_path):
    (out,) = run_ranks(_policies, world_size=1, args=(str(tmp_path),), timeout=600)
    stop, skip, rollback, nockpt = out["stop"], out["skip"], out["rollback"], out["no_checkpoint"]
    assert stop["type"] == "NonFiniteError" and "\n" not in stop["error"]
    assert stop["error"].startswith("non-finite loss (nan) at step 2 (train.nonfinite_policy=stop)")
    assert skip["type"] == "NonFiniteError" and "\n" not in skip["error"]
    assert "in 2 steps in a row (3-4) (train.max_nonfinite=2)" in skip["error"]
    assert "error" not in rollback, rollback
    records = _metrics(os.path.join(str(tmp_path), "rollback"))
    assert [r["to"] for r in records if r["kind"] == "rollback"] == ["step_000002"]
    steps = [r["step"] for r in records if r["kind"] == "train"]
    assert steps == [1, 2, 3, 3, 4, 5, 6]  # rolled back at step 4; 3-4 again, on the next batches
    assert all(torch.isfinite(torch.tensor([r["loss"] for r in records if r["kind"] == "train"][3:])))
    assert nockpt["type"] == "NonFiniteError"
    assert nockpt["error"].startswith("non-finite gradient at step 2 and no checkpoint from before "
                                      "step 2 to roll back to")


def _load_rank(rank, world_size, folder):
    from megatron_effllm.training import checkpoint as ckpt

    engine = _engine(2, width=2048)
    try:
        ckpt.load_engine_state(engine, folder)
        return None
    except ckpt.CheckpointError as err:
        return str(err)
    finally:
        engine.destroy()


def test_resume_with_another_number_of_processes_is_refused(saved):
    """ZeRO partitions and RNG files are per process: a 2-process checkpoint without the portable
    state does not load into one process; one line says so before DeepSpeed reads anything."""
    folder = os.path.join(saved[0], "step_000003")
    before = _tree_hashes(folder)
    (msg,) = run_ranks(_load_rank, world_size=1, args=(folder,))
    assert msg is not None and "\n" not in msg
    assert msg.startswith(f"checkpoint {folder} was written with 2 processes, ZeRO-2, TP=1, PP=1 but this run "
                          "has 1 processes, ZeRO-2, TP=1, PP=1, and it holds no portable state "
                          "(train.portable_checkpoint was off when it was written); resume with 2 processes")
    assert _tree_hashes(folder) == before
