"""Checkpoints that a crash cannot corrupt.

Layout of ``RUN/checkpoints/``::

    step_000050/            one complete checkpoint
        architecture.json   the shape the model had when saved (the engine is rebuilt from it)
        trainer_state.pt    step, consumed tokens, pruning state, data-sampler state (rank 0)
        rng/rank_00000.pt   every rank's RNG states
        ranks/rank_00000.pt every rank's own pruning state as it is (its partial sums; a saliency
                            vector only over the range where it is not zero: at TP > 1 the rank's
                            slice, under PP its stage's layers)
        ranks/shared_rank_00000.pt  pruning state the data-parallel ranks of one model shard hold
                            identically (the cached H^-1, during a compaction cycle), written
                            once by its DP rank 0
        layout.json         world size, ZeRO stage, TP, PP it was written with, and each rank's
                            (tp, pp, dp) ranks
        ds/...              the engine's own files (DeepSpeed: model + ZeRO optimizer partitions)
        portable/...        the engine's fp32 masters and Adam moments in canonical form, each
                            tensor once (``training.portable``; train.portable_checkpoint)
        MANIFEST.json       size, sha256 and writing rank of every file above; written last
    latest                  the name of the newest complete checkpoint (replaced atomically)

Our own files hold only plain containers, numbers, strings and CPU tensors and are read with
``safe_pickle.load_plain`` (no code a file names is ever run; any file can be loaded on any
device); DeepSpeed's are read through its engine's restricted loader. A file refused on one rank
stops every rank with the same line: each rank's own files are checked before any collective.

A checkpoint is written under ``step_000050.partial`` and renamed only when every rank has
finished and the manifest is written; ``latest`` is then replaced with a rename. Each rank
hashes the files it wrote (in parallel); rank 0 writes the manifest from their digests.
Verifying is collective: each rank checks the files its rank wrote and the ranks agree on the
first problem, so that every rank refuses a damaged checkpoint with the same line. ``resume:
auto`` takes the checkpoint ``latest`` names (the candidates as rank 0 lists them) and walks
back from it to the newest one that verifies.
A write that fails (a full disk) removes the partial folder on every rank and raises one
CheckpointError; the previous checkpoints and ``latest`` are never touched before the new one
is complete.
The run directory is assumed to be on a filesystem all nodes share (as on any cluster).

A checkpoint resumes exactly (the engine's own files, every rank's RNG) at the layout it was
written with. At another (DP, TP, PP, ZeRO stage) it resumes from its portable part: the engine
is built at the new layout and loads its slices of the canonical tensors, and the pruning
runtime's per-rank sums are moved to the new ranks (``load_rank_states``). The schedule, masks,
data position and the rest of the trainer state are layout-independent already. RNG states are
per process and are not carried to another layout (no configuration draws random numbers
after the start: dropout is off and the data order is seeded).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from typing import Optional

import torch

from megatron_effllm.engine.base import TrainEngine
from megatron_effllm.errors import UserError
from megatron_effllm.log import get_logger
from megatron_effllm.manifest import MANIFEST, file_entries, verify_manifest, write_manifest
from megatron_effllm.output_dir import failed_write
from megatron_effllm.parallel import comm
from megatron_effllm.safe_pickle import load_plain, plain_copy
from megatron_effllm.training import portable
from megatron_effllm.training.fault_injection import kill_point
from megatron_effllm.training.rng_state import rng_state, set_rng_state

log = get_logger(__name__)

LAYOUT = "layout.json"
TRAINER_STATE = "trainer_state.pt"
STEP_DIR = re.compile(r"^step_(\d{6,})$")
# What every checkpoint has besides the engine's own files (rank 0's RNG state at least).
REQUIRED = ("architecture.json", LAYOUT, TRAINER_STATE, "rng/rank_00000.pt")


class CheckpointError(UserError):
    pass


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


def verify(folder: str) -> None:
    """Collective: raise CheckpointError, the same line on every rank, naming the first missing,
    truncated or corrupted file, or a file every checkpoint has that the manifest does not list.
    Each rank hashes only the files its rank wrote."""
    error = None
    try:
        _verify_own(folder)
    except CheckpointError as err:
        error = str(err)
    error = _agree(error)
    if error is not None:
        raise CheckpointError(error)


def _verify_own(folder: str) -> None:
    manifest = os.path.join(folder, MANIFEST)
    if not os.path.isdir(folder):
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    if not os.path.isfile(manifest):
        for marker, what, hint in (
            ("effllm_checkpoint.json", "a model checkpoint of effllm-convert-megatron",
             "to start from it, set model.source"),
            ("config.json", "a Hugging Face model folder", "to start from it, set model.source"),
        ):
            if os.path.isfile(os.path.join(folder, marker)):
                raise CheckpointError(f"{folder} is {what}, not a training checkpoint; resume takes a "
                                      f"RUN/checkpoints/step_N folder ({hint})")
        raise CheckpointError(f"checkpoint {folder} has no {MANIFEST}: it was not completely written")
    listed = verify_manifest(folder, REQUIRED, error=CheckpointError, rank=comm.global_rank(),
                             world_size=comm.world_size())
    if not any("/" in rel and not rel.startswith(("rng/", "ranks/")) for rel in listed):  # the engine's folder
        raise CheckpointError(f"checkpoint manifest {manifest} lists no model or optimizer files; the "
                              "manifest is damaged or the checkpoint incomplete")


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


def read_latest(ckpt_root: str, report=None) -> Optional[int]:
    """The step that ``latest`` names, or None when there is no readable ``latest``."""
    path = os.path.join(ckpt_root, "latest")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            m = STEP_DIR.match(f.read().strip())
    except (OSError, UnicodeDecodeError):
        m = None
    if m is None:
        (report or log.warning)(f"[checkpoint] {path} does not name a step_N folder; ignoring it")
        return None
    return int(m.group(1))


def find_resumable(ckpt_root: str, before_step: Optional[int] = None, report=None) -> Optional[str]:
    """Collective: the checkpoint ``latest`` names when it verifies, else the newest one below it
    that does (of those saved before ``before_step``, if given); the same on every rank (rank 0
    lists the candidates, every rank verifies its own files of each).

    A step folder above ``latest`` was left by an interrupted save or by an abandoned branch of
    the run (a resume from an older checkpoint): it is not continued. Damaged ones are reported
    (to ``report``, a function of one line; default: the log) and skipped. None when there is no
    checkpoint at all; when there are some and none verifies, starting over would silently
    discard the run: that is an error.
    """
    say = report or log.warning
    candidates, stale = [], None
    if comm.global_rank() == 0:
        latest = read_latest(ckpt_root, say)
        for s, f in step_dirs(ckpt_root):
            if latest is not None and s > latest:
                stale = stale or f"{f} is newer than latest (step_{latest:06d})"
                say(f"[checkpoint] skipping {f}: newer than {ckpt_root}/latest (step_{latest:06d}); an "
                    "interrupted save or an abandoned branch of the run left it")
            elif before_step is None or s < before_step:
                candidates.append(f)
    candidates, stale = comm.broadcast_object((candidates, stale), 0)
    first_error = None
    for folder in candidates:
        try:
            verify(folder)
            return folder
        except CheckpointError as err:
            first_error = first_error or err
            say(f"[checkpoint] skipping {folder}: {err}")
    first_error = first_error or stale
    if first_error is not None and before_step is None:
        raise CheckpointError(
            f"no checkpoint in {ckpt_root} verifies (newest: {first_error}); restore the files or "
            "set resume: fresh to move them aside and start over"
        )
    return None


def _agree(error: Optional[str]) -> Optional[str]:
    """Collective: the first error any rank met (None when every rank succeeded).

    Also a barrier. A rank that fails alone must not leave the others waiting in a collective.
    """
    return next((e for e in comm.all_gather_object(error) if e), None)


def _write_error(err: BaseException, rank: int, folder: str) -> Optional[str]:
    """One line for a failed write (the reason and where); None when ``err`` is no failed write
    (a lost peer, a bug), which the caller lets surface as it is."""
    failed = failed_write(err, folder)
    if failed is None and not isinstance(err, OSError):
        return None
    reason = failed[0] if failed else (err.strerror or type(err).__name__)
    where = err.filename if isinstance(err, OSError) and isinstance(err.filename, str) else folder
    return f"rank {rank}: {reason} at {where}"


def layout_of(engine: TrainEngine) -> dict:
    """How the engine's state is split over processes; a checkpoint loads only into the same."""
    dims = comm.dims()
    return {"world_size": comm.world_size(), "zero_stage": engine.zero_stage(), "tp": dims.tp, "pp": dims.pp}


def save(engine: TrainEngine, ckpt_root: str, step: int, *, architecture_json: str, trainer_state: dict,
         keep: int = 2, rank_state: Optional[dict] = None, dp_shared_state: Optional[dict] = None,
         portable_arch=None) -> str:
    """Collective: every rank calls it. Returns the final checkpoint folder.

    ``rank_state``: this rank's own state (every rank passes one, or none does), written to
    ``ranks/rank_N.pt``; ``dp_shared_state``: state every data-parallel rank of this rank's model
    shard holds identically, passed by its DP rank 0 only (``ranks/shared_rank_N.pt``); both
    read back by ``read_rank_state``. ``portable_arch``: the model's Architecture, to write the
    portable state too (None: not written).

    On any failed write (a full disk, a quota) every rank raises the same CheckpointError, the
    partial folder is removed, and the previous checkpoints and ``latest`` are untouched.
    """
    if keep < 1:
        raise CheckpointError(f"train.keep_checkpoints must be >= 1, got {keep}")
    name = f"step_{step:06d}"
    final = os.path.join(ckpt_root, name)
    partial = final + ".partial"
    rank = comm.global_rank()
    previous = step_dirs(ckpt_root)
    d = comm.dims()
    ranks = comm.all_gather_object([d.tp_rank, d.pp_rank, d.dp_rank])
    error = None
    if rank == 0:
        try:
            os.makedirs(ckpt_root, exist_ok=True)
            for entry in os.listdir(ckpt_root):  # left by a crash during an earlier save
                if entry.endswith(".partial"):
                    shutil.rmtree(os.path.join(ckpt_root, entry), ignore_errors=True)
            os.makedirs(os.path.join(partial, "rng"))
            if rank_state is not None:  # every rank passes one, or none does
                os.makedirs(os.path.join(partial, "ranks"))
        except OSError as err:
            error = _write_error(err, rank, partial)
    error = _agree(error)
    entries: dict = {}
    if error is None:
        # The engine writes model and optimizer partitions (each rank its own files).
        try:
            t_engine = time.perf_counter()
            own = [os.path.relpath(p, partial) for p in engine.save(partial)]
            t_engine = time.perf_counter() - t_engine
        except (OSError, RuntimeError) as err:
            error = _write_error(err, rank, partial)
            if error is None:
                raise
            engine.after_failed_save()
        if portable_arch is not None:
            error = _agree(error)  # the portable state is gathered collectively
        if error is None and portable_arch is not None:
            try:
                t0 = time.perf_counter()
                mine = portable.save(engine, portable_arch, partial)
                size = sum(os.path.getsize(os.path.join(partial, rel)) for rel in mine)
                engine_size = sum(os.path.getsize(os.path.join(partial, rel)) for rel in own)
                log.info(f"[checkpoint] rank {rank}: portable state {size} bytes in "
                         f"{time.perf_counter() - t0:.2f} s; the engine's files {engine_size} bytes in "
                         f"{t_engine:.2f} s")
                own += mine
            except OSError as err:
                error = _write_error(err, rank, partial)
        if error is None:
            kill_point("ckpt.after_engine_save", step)
            try:
                own.append(_write(partial, f"rng/rank_{rank:05d}.pt", rng_state()))
                if rank_state is not None:
                    own.append(_write(partial, f"ranks/rank_{rank:05d}.pt", rank_state))
                if dp_shared_state is not None:
                    own.append(_write(partial, f"ranks/shared_rank_{rank:05d}.pt", dp_shared_state))
                if rank == 0:
                    with open(os.path.join(partial, "architecture.json"), "w") as f:
                        f.write(architecture_json)
                    with open(os.path.join(partial, LAYOUT), "w") as f:
                        json.dump({**layout_of(engine), "ranks": ranks}, f)
                    own += ["architecture.json", LAYOUT, _write(partial, TRAINER_STATE, trainer_state)]
                entries = file_entries(partial, own, rank)  # every rank its own files, in parallel
            except (OSError, RuntimeError) as err:
                error = _write_error(err, rank, partial)
                if error is None:
                    raise
        gathered = comm.all_gather_object((error, entries))
        error = next((e for e, _ in gathered if e), None)
        entries = {rel: meta for _, part in gathered for rel, meta in part.items()}
    if error is None and rank == 0:
        try:
            write_manifest(partial, entries)  # hashes only what no rank claimed
            kill_point("ckpt.after_manifest", step)
            if os.path.exists(final):  # a re-save after resuming from an older checkpoint
                shutil.rmtree(final)
            os.replace(partial, final)
            _fsync_dir(ckpt_root)
        except OSError as err:
            error = _write_error(err, rank, partial)
    error = _agree(error)
    if error is not None:
        if rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
        comm.barrier()
        kept = os.path.basename(previous[0][1]) if previous else "none"
        raise CheckpointError(
            f"could not write checkpoint {final}: {error}; the previous checkpoint ({kept}) and "
            "`latest` are unchanged; free disk space, then restart with resume: auto"
        )
    if rank == 0:
        kill_point("ckpt.after_rename", step)
        try:
            tmp = os.path.join(ckpt_root, "latest.tmp")
            with open(tmp, "w") as f:
                f.write(name + "\n")
            os.replace(tmp, os.path.join(ckpt_root, "latest"))
        except OSError as err:  # the checkpoint itself is complete; resuming does not need `latest`
            log.warning(f"[checkpoint] could not update {ckpt_root}/latest: {_write_error(err, rank, ckpt_root)}")
        kill_point("ckpt.after_latest", step)
        for _, old in step_dirs(ckpt_root)[keep:]:
            shutil.rmtree(old, ignore_errors=True)
    comm.barrier()
    return final


def _write(folder: str, rel: str, state) -> str:
    torch.save(plain_copy(state, rel), os.path.join(folder, rel))
    return rel


# The trainer state's keys and the types they must have where present (step and pruning always are).
_TRAINER_STATE_TYPES = {"step": int, "pruning": dict, "consumed_tokens": int, "data": (dict, type(None)),
                        "reference_losses": dict, "source_heldout": dict}


def _trainer_state_problem(state) -> Optional[str]:
    if not isinstance(state, dict):
        return f"a {type(state).__name__}"
    missing = [key for key in ("step", "pruning") if key not in state]
    if missing:
        return f"no {missing[0]}"
    for key, kind in _TRAINER_STATE_TYPES.items():
        if key in state and (type(state[key]) is bool or not isinstance(state[key], kind)):
            return f"{key} of type {type(state[key]).__name__}"
    return None


def read_meta(folder: str) -> tuple[str, dict]:
    """(architecture JSON, trainer state) of a verified checkpoint; CheckpointError if the state
    holds anything but plain values and tensors or is not shaped like a trainer state."""
    with open(os.path.join(folder, "architecture.json")) as f:
        arch_json = f.read()
    path = os.path.join(folder, TRAINER_STATE)
    state = _load(path)
    problem = _trainer_state_problem(state)
    if problem is not None:
        raise CheckpointError(f"{path} holds {problem}, not a trainer state (a mapping with step, pruning, "
                              "data, ...); the checkpoint is damaged or was not written by effllm-train")
    return arch_json, state


def _load(path: str):
    try:
        return load_plain(path)
    except UserError as err:
        raise CheckpointError(str(err)) from None


def _load_agreed(path: str, missing: Optional[str] = None):
    """Collective: this rank's own file ``path`` loaded on every rank (None where it is absent,
    or the error ``missing``); the first refusal on any rank is raised on all, so that none
    waits for the others in a collective."""
    state, error = None, None
    if os.path.isfile(path):
        try:
            state = _load(path)
        except CheckpointError as err:
            error = str(err)
    else:
        error = missing
    error = _agree(error)
    if error is not None:
        raise CheckpointError(error)
    return state


def read_rank_state(folder: str) -> tuple[Optional[dict], Optional[dict]]:
    """(this rank's own state, the state shared over its data-parallel ranks) saved with
    ``save(rank_state=..., dp_shared_state=...)``, each None if none was saved (collective:
    every rank calls it)."""
    out = []
    for path in (os.path.join(folder, "ranks", f"rank_{comm.global_rank():05d}.pt"),
                 os.path.join(folder, "ranks", f"shared_rank_{comm.global_rank_in('dp', 0):05d}.pt")):
        state = _load_agreed(path)
        if state is not None and not isinstance(state, dict):
            raise CheckpointError(f"{path} holds a {type(state).__name__}, not a rank state; the checkpoint "
                                  "is damaged or was not written by effllm-train")
        out.append(state)
    return out[0], out[1]


def _other_layout(engine: TrainEngine, folder: str) -> Optional[dict]:
    """The layout ``folder`` was written with when it is not this run's (None when it is, or
    records none); refused in one line when the checkpoint has no portable state."""
    try:
        return portable.other_layout(os.path.join(folder, LAYOUT), layout_of(engine))
    except UserError as err:
        raise CheckpointError(str(err)) from None


def load_engine_state(engine: TrainEngine, folder: str, arch=None) -> None:
    """Restore model, optimizer partitions and this rank's RNG into an engine built for the
    checkpoint's architecture ``arch`` (collective). At another layout, from the portable state."""
    saved = _other_layout(engine, folder)
    if saved is None:
        return _load_same_layout(engine, folder)
    log.info(f"[resume] {folder} was written with {portable.show(saved)}; loading its portable state at "
             f"{portable.show(layout_of(engine))} (RNG states are not carried to another layout)")
    try:
        portable.load(engine, arch, folder)
    except UserError as err:
        raise CheckpointError(str(err)) from None


def load_rank_states(pruning, engine: TrainEngine, folder: str) -> None:
    """The pruning runtime's per-rank state (after its ``load_state_dict``): this rank's own files
    at the same layout, every old rank's files moved to this rank at another (collective)."""
    saved = _other_layout(engine, folder)
    if saved is None:
        return pruning.load_rank_state_dict(*read_rank_state(folder))
    try:
        portable.load_rank_states(pruning, folder, saved)
    except UserError as err:
        raise CheckpointError(str(err)) from None


def _load_same_layout(engine: TrainEngine, folder: str) -> None:
    rank = comm.global_rank()
    rng_file = os.path.join(folder, "rng", f"rank_{rank:05d}.pt")
    # Read before the engine's collectives: a refused file stops every rank.
    rng = _load_agreed(rng_file, missing=(
        f"checkpoint {folder} has no RNG state for rank {rank}: it was written with a "
        "different number of processes; resume with the same world size"))
    try:
        found = engine.load(folder)
    except UserError as err:  # a refused engine file
        raise CheckpointError(str(err)) from None
    if not found:
        raise CheckpointError(f"the {engine.name} engine found no state of its own in {folder}")
    try:
        set_rng_state(rng)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{rng_file} is not an RNG state ({type(err).__name__}); the checkpoint "
                              "is damaged or was not written by effllm-train") from None
