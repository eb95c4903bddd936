"""The portable part of a checkpoint: the engine's state in canonical form, which loads at any
(DP, TP, PP, ZeRO stage) layout.

    portable/rank_00000.pt   {canonical name: {"param", "exp_avg", "exp_avg_sq"}} (fp32, full
                             tensors) of the parameters this rank held, and the Adam step
    portable/index.json      canonical name -> the file that holds it (written by rank 0)

Written beside the engine's own files at every save when ``train.portable_checkpoint`` is on: each
parameter's fp32 master and Adam moments are gathered over data parallelism (the engine's
``iter_full_state``) and over tensor parallelism, mapped to canonical tensors, and written by
one rank only: TP rank 0 of the least loaded data-parallel rank so far (``_holders``). No
tensor is written twice (a tied model's last-stage copy of the embedding is megatron's, not a
parameter of its own). A resume at the same layout never reads these files.

Loading into an engine built at another layout: each parameter's holder (a data-parallel
rank of the new layout, chosen the same way) reads the canonical tensors it needs (memory-mapped: only the bytes
of its slices) and cuts its TP shard of the stage's megatron tensor; the engine broadcasts it
over data parallelism and writes its ZeRO partitions (the path a compaction's rebuild takes).
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch

from megatron_effllm import layout
from megatron_effllm.architecture import Architecture
from megatron_effllm.errors import UserError
from megatron_effllm.parallel import comm
from megatron_effllm.layout.dims import ParallelDims
from megatron_effllm.safe_pickle import load_plain, load_torch

FOLDER = "portable"
INDEX = os.path.join(FOLDER, "index.json")
KEYS = ("param", "exp_avg", "exp_avg_sq")


def _is_tied_copy(arch: Architecture, name: str) -> bool:
    """The last stage's megatron copy of a tied embedding (the first stage holds the parameter)."""
    return name == "output_layer.weight" and arch.tie_word_embeddings


def _numel(p: torch.nn.Parameter) -> int:
    return int(torch.Size(p.ds_shape).numel()) if hasattr(p, "ds_shape") else p.numel()


def _holders(sizes: list[int], dp: int) -> list[int]:
    """The data-parallel rank that holds each parameter: the least loaded so far (the same on
    every rank), so that one large tensor (the embedding) does not make one rank write most."""
    load, out = [0] * dp, []
    for n in sizes:
        r = min(range(dp), key=lambda k: (load[k], k))
        load[r] += n
        out.append(r)
    return out


def save(engine, arch: Architecture, folder: str) -> list[str]:
    """Collective: write this rank's share of the canonical state under ``folder``; returns the
    files this rank wrote (relative to ``folder``)."""
    dims = comm.dims()
    held: dict[str, dict[str, torch.Tensor]] = {}
    params = [(n, p) for n, p in engine.module.named_parameters()
              if not (_is_tied_copy(arch, n) and dims.pp > 1)]
    holders = dict(zip((n for n, _ in params), _holders([_numel(p) for _, p in params], dims.dp)))
    for name, entry in engine.iter_full_state():
        keys = sorted(entry)  # the same on every rank: moments exist on all or none
        if _is_tied_copy(arch, name) and dims.pp > 1:
            for key in keys:  # still read: each read may be collective over DP
                entry[key]
            continue
        writer = holders[name] == dims.dp_rank and dims.tp_rank == 0
        for key in keys:
            local = entry[key]
            shards = comm.all_gather(local, "tp") if dims.tp > 1 else [local]
            del local
            if writer:
                canon = layout.canonical_from_shards(arch, name, shards, dims.pp_rank, dims.pp)
                for c, t in canon.items():
                    held.setdefault(c, {})[key] = t.detach().to("cpu", torch.float32).contiguous()
            del shards
    canonical_names = list(held)
    written, failed = [], None
    rank = comm.global_rank()
    if held:
        rel = os.path.join(FOLDER, f"rank_{rank:05d}.pt")
        try:  # a failed write is raised after the last collective, which every rank must reach
            os.makedirs(os.path.join(folder, FOLDER), exist_ok=True)
            torch.save({"step": engine.optimizer_step_count(), "tensors": held}, os.path.join(folder, rel))
            written.append(rel)
        except OSError as err:
            failed = err
    del held
    names = comm.all_gather_object((written[0] if written else None, sorted(canonical_names)))
    if failed is not None:
        raise failed
    if rank == 0:
        index = {c: f for f, cs in names if f for c in cs}
        os.makedirs(os.path.join(folder, FOLDER), exist_ok=True)
        with open(os.path.join(folder, INDEX), "w") as f:
            json.dump(index, f, sort_keys=True)
        written.append(INDEX)
    return written


def _agreed(error: Optional[str]) -> None:
    """Collective: raise the first error any rank met, on every rank."""
    error = next((e for e in comm.all_gather_object(error) if e), None)
    if error is not None:
        raise UserError(error)


def load_rank_states(pruning, folder: str, saved: dict) -> None:
    """Every old rank's per-rank pruning files (``saved``: the checkpoint's layout record) moved
    to this rank of another layout (collective: each rank reads them all)."""
    old, error = [], None
    dp = saved["world_size"] // (saved["tp"] * saved["pp"])
    try:
        for r, (tp_rank, pp_rank, dp_rank) in enumerate(saved["ranks"]):
            dims = ParallelDims(tp_rank, saved["tp"], pp_rank, saved["pp"], dp_rank, dp)
            own, shared = (os.path.join(folder, "ranks", f"{k}rank_{r:05d}.pt") for k in ("", "shared_"))
            if os.path.isfile(own):
                old.append((dims, load_plain(own), load_plain(shared) if os.path.isfile(shared) else None))
    except (UserError, TypeError, ValueError) as err:
        error = str(err) if isinstance(err, UserError) else f"{folder}/layout.json lists damaged ranks ({err})"
    _agreed(error)
    if old:
        pruning.load_other_layout(old)


def show(d: dict) -> str:
    return f"{d['world_size']} processes, ZeRO-{d['zero_stage']}, TP={d['tp']}, PP={d['pp']}"


def other_layout(path: str, now: dict) -> Optional[dict]:
    """The layout record at ``path`` (a checkpoint's layout.json) when it differs from ``now``;
    None when it is the same or absent (written before layouts were recorded). UserError when
    it differs and the checkpoint has no portable state."""
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        saved = json.load(f)
    if not isinstance(saved, dict) or any(type(saved.get(k)) is not int for k in now):
        raise UserError(f"{path} is not a layout record; the checkpoint is damaged")
    if {k: saved[k] for k in now} == now:
        return None
    if not has_state(os.path.dirname(path)) or not isinstance(saved.get("ranks"), list):
        raise UserError(
            f"checkpoint {os.path.dirname(path)} was written with {show(saved)} but this run has {show(now)}, "
            "and it holds no portable state (train.portable_checkpoint was off when it was written); resume "
            f"with {show(saved)} (set train.portable_checkpoint=true there to write checkpoints that resume "
            "at any layout), or export final weights and start a new run from them")
    return saved


def has_state(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, INDEX))


class _Reader:
    """Canonical tensors of a portable checkpoint, each file memory-mapped on first use."""

    def __init__(self, folder: str):
        with open(os.path.join(folder, INDEX)) as f:
            self.index = json.load(f)
        self.folder, self._open = folder, {}

    def file(self, rel: str) -> dict:
        if rel not in self._open:
            path = os.path.join(self.folder, rel)
            state = load_torch(path, mmap=True)
            if not isinstance(state, dict) or not isinstance(state.get("tensors"), dict):
                raise UserError(f"{path} is not a portable checkpoint file; the checkpoint is damaged")
            self._open[rel] = state
        return self._open[rel]

    def get(self, canon: str) -> dict:
        if canon not in self.index:
            raise UserError(f"the portable state in {self.folder} has no tensor {canon}; the checkpoint "
                            "is damaged or was written for another architecture")
        return self.file(self.index[canon])["tensors"][canon]

    def step(self) -> int:
        first = sorted(set(self.index.values()))[0]
        return int(self.file(first)["step"])


def load(engine, arch: Architecture, folder: str) -> None:
    """Collective: write the checkpoint's canonical state into ``engine``, freshly built at this
    run's layout for ``arch`` (fp32 masters exact, Adam moments and step)."""
    dims = comm.dims()
    reader = _Reader(folder)
    step = reader.step()
    has_moments = step > 0
    keys = KEYS if has_moments else KEYS[:1]
    held: list[tuple[str, int, Optional[dict]]] = []
    error = None
    params = list(engine.module.named_parameters())
    try:  # a refusal on one rank stops every rank before the engine's collectives
        for (name, _), holder in zip(params, _holders([_numel(p) for _, p in params], dims.dp)):
            held.append((name, holder, _slices(reader, arch, name, dims, keys) if holder == dims.dp_rank else None))
    except UserError as err:
        error = str(err)
    _agreed(error)
    engine.load_carried(held, has_moments, step)


def _slices(reader: _Reader, arch: Architecture, name: str, dims, keys) -> dict:
    """This shard's megatron tensor ``name`` of each of ``keys``, cut from the canonical tensors."""
    e = layout.entry(arch, name, dims)
    canon = {c: reader.get(c) for c in e.canonical}
    missing = [c for c in e.canonical for k in keys if k not in canon[c]]
    if missing:
        raise UserError(f"the portable state in {reader.folder} has no Adam moments for {missing[0]}; "
                        "the checkpoint is damaged")
    return {k: layout.megatron_tensor(arch, name, {c: t[k] for c, t in canon.items()}, dims).clone()
            for k in keys}
