"""Checkpoints that a crash cannot corrupt.

Layout of ``RUN/checkpoints/``::

    step_000050/            one complete checkpoint
        architecture.json   the shape the model had when saved (the engine is rebuilt from it)
        trainer_state.pt    step, consumed tokens, pruning state, data-sampler state (rank 0)
        rng/rank_00000.pt   every rank's RNG states
        ds/...              DeepSpeed's engine checkpoint (model + ZeRO optimizer partitions)
        MANIFEST.json       size and sha256 of every file above; written last
    latest                  the name of the newest complete checkpoint (replaced atomically)

A checkpoint is written under ``step_000050.partial`` and renamed only when every rank has
finished and the manifest is written; ``latest`` is then replaced with a rename. Loading
verifies the manifest; ``resume: auto`` walks back to the newest checkpoint that verifies.
The run directory is assumed to be on a filesystem all nodes share (as on any cluster).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from typing import Optional

import torch
import torch.distributed as dist

from megatron_effllm.errors import UserError

MANIFEST = "MANIFEST.json"
STEP_DIR = re.compile(r"^step_(\d{6,})$")


class CheckpointError(UserError):
    pass


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_manifest(folder: str) -> None:
    files = {}
    for root, _, names in os.walk(folder):
        for name in sorted(names):
            if name == MANIFEST:
                continue
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            files[rel] = {"bytes": os.path.getsize(path), "sha256": _sha256(path)}
    tmp = os.path.join(folder, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"files": files}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(folder, MANIFEST))


def verify(folder: str) -> None:
    """Raise CheckpointError naming the first missing, truncated or corrupted file."""
    manifest = os.path.join(folder, MANIFEST)
    if not os.path.isfile(manifest):
        raise CheckpointError(f"checkpoint {folder} has no {MANIFEST}: it was not completely written")
    try:
        with open(manifest) as f:
            files = json.load(f)["files"]
    except (json.JSONDecodeError, KeyError):
        raise CheckpointError(f"checkpoint manifest {manifest} is damaged") from None
    for rel, meta in files.items():
        path = os.path.join(folder, rel)
        if not os.path.isfile(path):
            raise CheckpointError(f"checkpoint file {path} is missing")
        if os.path.getsize(path) != meta["bytes"]:
            raise CheckpointError(
                f"checkpoint file {path} is truncated ({os.path.getsize(path)} of {meta['bytes']} bytes)"
            )
        if _sha256(path) != meta["sha256"]:
            raise CheckpointError(f"checkpoint file {path} is corrupted (checksum mismatch)")


def step_dirs(ckpt_root: str) -> list[tuple[int, str]]:
    """Complete-looking checkpoint folders, newest first."""
    if not os.path.isdir(ckpt_root):
        return []
    out = []
    for name in os.listdir(ckpt_root):
        m = STEP_DIR.match(name)
        if m and os.path.isdir(os.path.join(ckpt_root, name)):
            out.append((int(m.group(1)), os.path.join(ckpt_root, name)))
    return sorted(out, reverse=True)


def find_resumable(ckpt_root: str, log=print) -> Optional[str]:
    """The newest checkpoint that verifies; damaged ones are reported and skipped."""
    for _, folder in step_dirs(ckpt_root):
        try:
            verify(folder)
            return folder
        except CheckpointError as err:
            log(f"[checkpoint] skipping {folder}: {err}")
    return None


def rng_state() -> dict:
    import numpy as np

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        from megatron.core import tensor_parallel

        state["megatron_tracker"] = tensor_parallel.get_cuda_rng_tracker().get_states()
    except Exception:  # tracker not initialised (plain models in unit tests)
        pass
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "megatron_tracker" in state:
        from megatron.core import tensor_parallel

        tensor_parallel.get_cuda_rng_tracker().set_states(state["megatron_tracker"])


def save(engine, ckpt_root: str, step: int, *, architecture_json: str, trainer_state: dict,
         keep: int = 2) -> str:
    """Collective: every rank calls it. Returns the final checkpoint folder."""
    name = f"step_{step:06d}"
    final = os.path.join(ckpt_root, name)
    partial = final + ".partial"
    rank = _rank()
    if rank == 0:
        os.makedirs(ckpt_root, exist_ok=True)
        if os.path.exists(partial):  # left by a crash during an earlier attempt
            shutil.rmtree(partial)
        os.makedirs(os.path.join(partial, "rng"))
    _barrier()
    # DeepSpeed writes model and ZeRO partitions (each rank its own files).
    engine.save_checkpoint(partial, tag="ds", save_latest=False)
    torch.save(rng_state(), os.path.join(partial, "rng", f"rank_{rank:05d}.pt"))
    if rank == 0:
        with open(os.path.join(partial, "architecture.json"), "w") as f:
            f.write(architecture_json)
        torch.save(trainer_state, os.path.join(partial, "trainer_state.pt"))
    _barrier()
    if rank == 0:
        write_manifest(partial)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(partial, final)
        _fsync_dir(ckpt_root)
        tmp = os.path.join(ckpt_root, "latest.tmp")
        with open(tmp, "w") as f:
            f.write(name + "\n")
        os.replace(tmp, os.path.join(ckpt_root, "latest"))
        for _, old in step_dirs(ckpt_root)[keep:]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def read_meta(folder: str) -> tuple[str, dict]:
    """(architecture JSON, trainer state) of a verified checkpoint."""
    with open(os.path.join(folder, "architecture.json")) as f:
        arch_json = f.read()
    trainer_state = torch.load(os.path.join(folder, "trainer_state.pt"), weights_only=False)
    return arch_json, trainer_state


def load_engine_state(engine, folder: str) -> None:
    """Restore model, optimizer partitions and this rank's RNG into an engine built for the
    checkpoint's architecture (collective)."""
    path, _ = engine.load_checkpoint(folder, tag="ds", load_optimizer_states=True,
                                     load_lr_scheduler_states=False)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load the engine state in {folder}/ds")
    rng_file = os.path.join(folder, "rng", f"rank_{_rank():05d}.pt")
    if not os.path.isfile(rng_file):
        raise CheckpointError(
            f"checkpoint {folder} has no RNG state for rank {_rank()}: it was written with a "
            "different number of processes; resume with the same world size"
        )
    set_rng_state(torch.load(rng_file, weights_only=False))
