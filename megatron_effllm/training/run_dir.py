"""The run folder: one run writes it at a time, a resume continues only the run it belongs to,
and a new run never mixes with an old one.

    RUN/.lock           held (flock) by global rank 0 while a run writes the folder
    RUN/previous_runs/  earlier runs moved aside by ``resume: fresh`` (never deleted)
    RUN/data/           tokenized data: a cache keyed by its inputs, shared by every run here

A checkpoint's trainer state carries the run's fingerprint (what a resume must not change: the
source model, the starting Architecture, the tokenizer, the data, the strategy and target, the
parallel layout, ... as content digests and config values) and its settings (the keys in
SAFE_ON_RESUME). A resume compares both: a changed fingerprint is refused in one line naming the
keys, a changed setting is logged.
"""
from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import socket
import tempfile
import time
from typing import Any, Optional

from megatron_effllm.architecture import Architecture
from megatron_effllm.convert.hf_io import TOKENIZER_FILES
from megatron_effllm.data.tokenizer import resolve_tokenizer_path
from megatron_effllm.errors import UserError
from megatron_effllm.log import get_logger
from megatron_effllm.parallel import comm
from megatron_effllm.training import checkpoint as ckpt

log = get_logger(__name__)

LOCK = ".lock"
PREVIOUS = "previous_runs"
# What a run writes into its folder; `data/` is a cache the runs share and stays.
PRODUCTS = ("checkpoints", "metrics.jsonl", "config.yaml", "final", "plots", "tensorboard")

# The only config keys a resume may change (each change is logged): where the run lives, the
# learning-rate schedule (applied at every step), clipping, intervals, the length of the run, the
# fault policy and the export. Every other key is part of the fingerprint; weight decay, the Adam
# betas and eps are too, because the optimizer state restored from the checkpoint carries them.
SAFE_ON_RESUME = (
    "run_dir", "parallel.comm_timeout_s", "parallel.overlap_comm",
    "model.recompute", "model.recompute_method", "model.recompute_num_layers",  # the same numbers
    "optim.lr", "optim.min_lr", "optim.schedule", "optim.warmup_steps", "optim.decay_fraction",
    "optim.clip_grad",
    "train.steps", "train.log_interval", "train.eval_interval", "train.checkpoint_interval",
    "train.keep_checkpoints", "train.progress_bar", "train.nonfinite_policy", "train.max_nonfinite",
    "train.max_rollbacks", "train.preempt_check_s", "train.portable_checkpoint",
    "export.hf", "export.hf_dtype", "export.gguf", "export.snapshots",  # exports read, never change, the model
)
NOT_COMPARED = ("resume",)  # how this start was asked for, not what the run is
# The parallel layout: in the fingerprint, but compared with the checkpoint's own layout record
# (checkpoint.same_layout), which loads another layout from the portable state or refuses it.
LAYOUT_KEYS = ("parallel.tp", "parallel.pp", "parallel.zero_stage", "parallel.world_size")
# Values that name files are compared by content, so a moved or copied model or data resumes.
BY_CONTENT = ("model.source", "model.tokenizer", "model.init", "data.train", "data.heldout", "distill.teacher")
_SAMPLE = 1 << 20  # bytes read from each end of a large file


# ============================================================================ fingerprint
def _file_digest(path: str) -> str:
    """Size and sha256 of the file, or of its first and last MiB when larger: reading every
    byte of many-GB weights at each start is too slow, and two models (or datasets) of the same
    size differ in those bytes (every tensor, the first and the last, changes in training)."""
    size = os.path.getsize(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= 2 * _SAMPLE:
            h.update(f.read())
        else:
            h.update(f.read(_SAMPLE))
            f.seek(size - _SAMPLE)
            h.update(f.read(_SAMPLE))
    return f"{size}:{h.hexdigest()}"


def _tree_files(folder: str) -> list[str]:
    """The files of a model or data folder that define it (not hidden ones, not notes)."""
    out = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out += [os.path.join(root, n) for n in sorted(names)
                if (not n.startswith(".") or n == ".metadata") and not n.endswith(".md")]
    return out


def _content(value: Any) -> Any:
    """``value`` with every string naming an existing file, folder or indexed prefix replaced
    by the digests of its contents."""
    if isinstance(value, dict):
        return {str(k): _content(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_content(v) for v in value]
    if not isinstance(value, str) or not value:
        return value
    if os.path.isdir(value):
        return {os.path.relpath(p, value): _file_digest(p) for p in _tree_files(value)}
    if os.path.isfile(value):
        return _file_digest(value)
    if os.path.isfile(value + ".bin") and os.path.isfile(value + ".idx"):
        return [_file_digest(value + ".bin"), _file_digest(value + ".idx")]
    return value


def content_id(value: Any) -> str:
    return hashlib.sha256(json.dumps(_content(value), sort_keys=True).encode()).hexdigest()[:16]


def _leaves(cfg) -> dict[str, Any]:
    """Dotted config key -> value; the BY_CONTENT keys stay whole."""
    out = {}

    def walk(node: dict, prefix: str):
        for key, value in node.items():
            full = prefix + key
            if isinstance(value, dict) and full not in BY_CONTENT:
                walk(value, full + ".")
            else:
                out[full] = value
    walk(dataclasses.asdict(cfg), "")
    return out


def _plain(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def fingerprint(cfg, arch: Architecture, tokenizer: str, world_size: int) -> dict[str, str]:
    """What a resume must not change, as plain strings (stored in the trainer state)."""
    leaves = _leaves(cfg)
    out = {k: _plain(v) for k, v in leaves.items() if k not in SAFE_ON_RESUME + NOT_COMPARED + BY_CONTENT}
    for key in BY_CONTENT:
        out[key] = "content:" + content_id(leaves[key])
    out["model.tokenizer"] = "content:" + content_id(_tokenizer_files(tokenizer))
    out["model.architecture"] = "content:" + hashlib.sha256(arch.to_json().encode()).hexdigest()[:16]
    out["parallel.world_size"] = _plain(world_size)
    return out


def _tokenizer_files(tokenizer) -> Any:
    """The tokenizer really used (a source model's own one, whatever model.tokenizer says): its
    files in a model folder, else the file or name."""
    try:
        path = resolve_tokenizer_path(str(tokenizer)) if tokenizer else ""
    except UserError:
        return str(tokenizer)
    if os.path.isdir(path):
        return {n: os.path.join(path, n) for n in TOKENIZER_FILES if os.path.isfile(os.path.join(path, n))}
    return path


def settings(cfg) -> dict[str, str]:
    """The SAFE_ON_RESUME keys' values (stored to log what a resume changes)."""
    leaves = _leaves(cfg)
    return {k: _plain(leaves[k]) for k in SAFE_ON_RESUME}


def check_resume(folder: str, trainer_state: Any, fp: dict, now: dict) -> None:
    """Refuse (one line) a checkpoint whose run had another fingerprint; log changed settings."""
    saved = trainer_state.get("fingerprint") if isinstance(trainer_state, dict) else None
    fresh = "another run_dir, or resume: fresh to move this run aside"
    if not isinstance(saved, dict):
        raise UserError(f"checkpoint {folder} records no run fingerprint, so what it would continue "
                        f"cannot be checked; start a new run ({fresh})")
    changed = []
    for key in sorted(set(saved) | set(fp)):
        old, new = saved.get(key), fp.get(key)
        if old == new:
            continue
        if key in LAYOUT_KEYS:
            log.info(f"[resume] {key}: {old} -> {new}")
            continue
        if str(old).startswith("content:") or str(new).startswith("content:"):
            changed.append(f"{key} (other contents)")
        else:
            changed.append(f"{key} {old} -> {new}")
    if changed:
        raise UserError(
            f"checkpoint {folder} belongs to a run with other settings that a resume must keep: "
            f"{', '.join(changed)}; set them back (the run's config.yaml has them) or start a new run "
            f"({fresh})")
    before = trainer_state.get("settings") or {}
    for key, value in now.items():
        if key in before and before[key] != value:
            log.info(f"[resume] {key}: {before[key]} -> {value}")


# ============================================================================ starting
@dataclasses.dataclass
class Start:
    folder: Optional[str] = None      # the checkpoint to continue from; None: a new run
    arch_json: str = ""
    trainer_state: dict = dataclasses.field(default_factory=dict)
    move_aside: bool = False          # a new run in a folder that holds an earlier run


def earlier_run(run_dir: str) -> list[str]:
    """The products of an earlier run in ``run_dir`` (non-empty files and folders)."""
    out = []
    for name in PRODUCTS:
        path = os.path.join(run_dir, name)
        if (os.path.isdir(path) and os.listdir(path)) or (os.path.isfile(path) and os.path.getsize(path)):
            out.append(name)
    return out


def choose_start(cfg, ckpt_root: str, fp: dict, now: dict, rollback_folder: Optional[str] = None) -> Start:
    """Where this run starts, checked before any work: a verified checkpoint of this same run,
    or a new run (refused in a folder that holds an earlier one unless ``resume: fresh``)."""
    run_dir, mode = cfg.run_dir, cfg.resume
    if rollback_folder is not None:
        folder = rollback_folder
    elif mode in ("none", "fresh"):
        used = earlier_run(run_dir)
        if used and mode == "none":
            raise UserError(
                f"run_dir {run_dir} holds an earlier run ({', '.join(used)}); resume: none would mix "
                f"the two: set resume: auto to continue it, resume: fresh to move it to "
                f"{os.path.join(run_dir, PREVIOUS)}/ and start over, or choose another run_dir")
        return Start(move_aside=bool(used))
    elif mode == "auto":
        folder = ckpt.find_resumable(ckpt_root)
        if folder is None:  # nothing to continue: what an interrupted start left moves aside
            return Start(move_aside=bool(earlier_run(run_dir)))
    else:
        folder = mode
        ckpt.verify(folder)
        used = earlier_run(run_dir)
        if used and os.path.realpath(os.path.dirname(folder)) != os.path.realpath(ckpt_root):
            raise UserError(
                f"resume: {folder} continues a run elsewhere, but run_dir {run_dir} holds another "
                f"run ({', '.join(used)}); choose an empty run_dir to continue that checkpoint in")
    arch_json, state = ckpt.read_meta(folder)
    check_resume(folder, state, fp, now)
    return Start(folder=folder, arch_json=arch_json, trainer_state=state)


def move_aside(run_dir: str) -> None:
    """Collective. Rank 0 moves an earlier run's products into RUN/previous_runs/<time>/."""
    err = None
    if comm.global_rank() == 0:
        used = earlier_run(run_dir)
        base = dest = os.path.join(run_dir, PREVIOUS, time.strftime("%Y%m%d-%H%M%S"))
        n = 1
        while os.path.exists(dest):
            dest, n = f"{base}.{n}", n + 1
        try:
            os.makedirs(dest)
            for name in used:
                os.rename(os.path.join(run_dir, name), os.path.join(dest, name))
            log.info(f"[run] moved the earlier run in {run_dir} ({', '.join(used)}) to {dest}")
        except OSError as e:
            err = (f"could not move the earlier run in {run_dir} aside to {dest} ({e.strerror}); "
                   "move its files yourself or choose another run_dir")
    _raise_if(err)


# ============================================================================ the folder itself
def _raise_if(err: Optional[str]) -> None:
    """The same UserError on every rank when rank 0 found a problem."""
    err = comm.broadcast_object(err, 0)
    if err:
        raise UserError(err)


class RunLock:
    """An exclusive flock on RUN/.lock, which names its holder (pid, host, start time)."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, LOCK)
        self.fd = None
        if os.path.exists(run_dir) and not os.path.isdir(run_dir):
            raise UserError(f"run_dir {run_dir} is a file, not a folder; set run_dir to a folder path")
        try:
            os.makedirs(run_dir, exist_ok=True)
        except OSError as e:
            raise UserError(f"run_dir {run_dir} cannot be created ({e.strerror}); set run_dir to a "
                            "folder you can write") from None
        try:
            probe_fd, probe = tempfile.mkstemp(dir=run_dir, prefix=".write_test")  # an old .lock would
            os.close(probe_fd)                                                      # open read-write in a
            os.remove(probe)                                                        # read-only folder
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"run_dir {run_dir} is not writable ({e.strerror}); set run_dir to a folder "
                            "you can write") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise UserError(f"run_dir {run_dir}: cannot lock {self.path} ({e.strerror}); use a "
                                "filesystem with file locks for run_dir") from None
            raise UserError(f"run_dir {run_dir} is in use by another run ({self._holder()}); wait for "
                            "it to end or choose another run_dir") from None
        self.fd = fd
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)

    def _holder(self) -> str:
        try:
            with open(self.path) as f:
                h = json.load(f)
            return f"pid {h['pid']} on host {h['host']}, since {h['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            return f"its holder is not recorded in {self.path}"

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None


def claim(run_dir: str) -> Optional[RunLock]:
    """Collective, before any work: rank 0 checks that run_dir is a writable folder and locks it
    for this run; every rank raises the same one line when it cannot."""
    lock, err = None, None
    if comm.global_rank() == 0:
        try:
            lock = RunLock(run_dir)
        except UserError as e:
            err = str(e)
    _raise_if(err)
    return lock
