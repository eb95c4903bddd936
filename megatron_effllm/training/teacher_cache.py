"""The teacher's top-k logits, written once per training sample and read by every later run
(``distill.topk: k``, ``distill.cache_dir``).

An entry holds, for each position of one sample, the teacher's k largest logits (ids int32,
values fp16 relative to the position's largest logit, so the entries that carry the mass keep
fp16's finest steps) and the log of its probability mass outside them at the run's temperature
(fp32): what ``distill.topk_vocab_parallel_kl`` needs. With every entry of a micro-batch on disk
the step runs no teacher at all, and a run whose every sample is cached never builds one.

Keys. A folder per teacher, ``CACHE/<teacher key>/``, named by a hash of what the teacher's
output depends on: its weights (the tensors' bytes, whatever file format they came from), its
architecture, the tokenizer, k, the sequence length, the temperature and the teacher's compute
dtype; its ``manifest.json`` lists them. An entry per sample, ``<teacher key>/<ab>/<sample
key>.topk``, named by a hash of the sample's token and position ids: the sample's identity in the
indexed dataset, so the same window found by another run, seed, blend or method (the quality
benchmark's runs share one ``distill.cache_dir``) reads the same entry.

Safety. Entries and manifests are written to a temporary name, synced and renamed (a reader sees
a whole file or none); each entry carries a header naming its teacher and sample keys and the
sha256 of its payload, checked on every read: a damaged or misplaced entry is refused in one line
that names the file to delete. Tensor-parallel rank 0 of each replica writes its own samples.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
from typing import Callable, Optional

import numpy as np
import torch
from megatron.core import tensor_parallel

from megatron_effllm.architecture import Architecture
from megatron_effllm.errors import UserError
from megatron_effllm.log import get_logger
from megatron_effllm.parallel import comm
from megatron_effllm.training import run_dir
from megatron_effllm.training.distill import distillation_loss, topk_vocab_parallel_kl, vocab_parallel_topk
from megatron_effllm.training.source import load_source
from megatron_effllm.training.teacher import Teacher, _check_same_vocabulary

log = get_logger(__name__)

FORMAT = "topk/1"
_MAGIC = b"EFFLLM-TOPK\x01"
_FP16_MAX = 65504.0


def weights_digest(canonical: dict) -> str:
    """A hash of the weights themselves (names, dtypes, shapes, bytes)."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(canonical):
        t = canonical[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def sample_keys(tokens: torch.Tensor, position_ids: torch.Tensor) -> list[str]:
    """One key per sample of ``[b, s]`` token and position ids: a hash of both."""
    tok = tokens.detach().cpu().to(torch.int64).numpy()
    pos = position_ids.detach().cpu().to(torch.int64).expand(tok.shape).numpy()
    return [hashlib.blake2b(tok[i].tobytes() + pos[i].tobytes(), digest_size=16).hexdigest()
            for i in range(tok.shape[0])]


@dataclasses.dataclass
class Entry:
    ids: torch.Tensor       # [s, k] int32, global vocabulary ids
    values: torch.Tensor    # [s, k] fp16, logits minus the position's largest
    log_rest: torch.Tensor  # [s] fp32, log of the teacher's mass outside the top-k at T


def _damaged(path: str, why: str) -> UserError:
    return UserError(f"teacher cache entry {path} is damaged or misplaced ({why}); delete it (or its folder "
                     f"{os.path.dirname(os.path.dirname(path))}) and the next run writes it again")


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class TopkStore:
    """The entries of one teacher: ``CACHE/<teacher key>/``."""

    def __init__(self, root: str, manifest: dict):
        self.manifest = manifest
        self.key = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:20]
        self.folder = os.path.join(root, self.key)
        self.k, self.seq_len = int(manifest["k"]), int(manifest["seq_len"])

    def open(self, write: bool) -> None:
        """Check the folder's manifest (written here first when ``write``)."""
        path = os.path.join(self.folder, "manifest.json")
        if os.path.isfile(path):
            try:
                with open(path) as f:
                    found = json.load(f)
            except (OSError, ValueError) as err:
                found = {"unreadable": str(err)}
            if found != self.manifest:
                diff = sorted(k for k in set(found) | set(self.manifest) if found.get(k) != self.manifest.get(k))
                raise UserError(f"teacher cache {self.folder} was written for another teacher (differs in "
                                f"{', '.join(diff)}); delete that folder or set distill.cache_dir to another one")
        elif write:
            os.makedirs(self.folder, exist_ok=True)
            _write_atomic(path, json.dumps(self.manifest, indent=1, sort_keys=True).encode())

    def path(self, sample: str) -> str:
        return os.path.join(self.folder, sample[:2], sample + ".topk")

    def write(self, sample: str, entry: Entry) -> None:
        payload = (entry.ids.to(torch.int32).numpy().tobytes() + entry.values.to(torch.float16).numpy().tobytes()
                   + entry.log_rest.to(torch.float32).numpy().tobytes())
        header = json.dumps({"format": FORMAT, "teacher": self.key, "sample": sample, "k": self.k,
                             "seq_len": int(entry.ids.shape[0]),
                             "sha256": hashlib.sha256(payload).hexdigest()}).encode()
        path = self.path(sample)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        _write_atomic(path, _MAGIC + struct.pack("<I", len(header)) + header + payload)

    def read(self, sample: str) -> Optional[Entry]:
        """The entry of ``sample``; None when there is none; a UserError when it does not verify."""
        path = self.path(sample)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        n = len(_MAGIC) + 4
        if len(data) < n or not data.startswith(_MAGIC):
            raise _damaged(path, "not a top-k entry")
        (size,) = struct.unpack("<I", data[len(_MAGIC):n])
        try:
            head = json.loads(data[n:n + size])
            s, k, digest = int(head["seq_len"]), int(head["k"]), str(head["sha256"])
            teacher, key = head["teacher"], head["sample"]
        except (ValueError, KeyError, TypeError):
            raise _damaged(path, "unreadable header") from None
        if (teacher, key, k) != (self.key, sample, self.k):
            raise _damaged(path, "written for another teacher, sample or k")
        payload = data[n + size:]
        if len(payload) != s * k * 6 + s * 4 or hashlib.sha256(payload).hexdigest() != digest:
            raise _damaged(path, "checksum mismatch")
        ids = np.frombuffer(payload, np.int32, s * k).reshape(s, k)
        values = np.frombuffer(payload, np.float16, s * k, offset=s * k * 4).reshape(s, k)
        rest = np.frombuffer(payload, np.float32, s, offset=s * k * 6)
        return Entry(torch.from_numpy(ids.copy()), torch.from_numpy(values.copy()), torch.from_numpy(rest.copy()))


class CachedTeacher:
    """The distillation loss from cached top-k entries; the teacher (built only when a
    micro-batch of some rank misses an entry) writes the missing ones. Same ``loss`` as
    ``Teacher``'s."""

    def __init__(self, store: TopkStore, make_teacher: Callable[[], Teacher], alpha: float, temperature: float):
        self.store = store
        self.make_teacher = make_teacher
        self.teacher: Optional[Teacher] = None
        self.alpha, self.temperature = float(alpha), float(temperature)
        self.writer = comm.rank("tp") == 0
        self.reads = self.writes = 0
        store.open(write=self.writer)

    def entries(self, tokens: torch.Tensor, position_ids: torch.Tensor) -> tuple:
        """(ids int64, values fp16, log_rest fp32) of the micro-batch ``[b, s]``, read or computed."""
        keys = sample_keys(tokens, position_ids)
        found = [self.store.read(k) for k in keys]
        # a sample counts as cached only where every tensor-parallel rank found it (another replica
        # may be writing it), and the teacher runs on every rank when any rank misses one
        hit = torch.tensor([float(e is not None) for e in found])
        comm.all_reduce_(hit, "tp", "min")
        missing = torch.tensor([float((hit == 0).any())])
        comm.all_reduce_(missing, "world", "max")
        if missing.item():
            if self.teacher is None:
                log.info(f"[distill] teacher cache {self.store.folder}: building the teacher for missing entries")
                self.teacher = self.make_teacher()
            ids, values, rest = vocab_parallel_topk(self.teacher.logits(tokens, position_ids), self.store.k,
                                                    self.temperature)
            values = (values - values[..., :1]).clamp_(min=-_FP16_MAX).to(torch.float16).cpu()
            ids, rest = ids.to(torch.int32).cpu(), rest.cpu()
            for i, key in enumerate(keys):
                if hit[i]:  # what was read, so a later run reading the same entries sees the same bits
                    continue
                found[i] = Entry(ids[i], values[i], rest[i])
                if self.writer:
                    self.store.write(key, found[i])
                    self.writes += 1
        self.reads += int(hit.sum())
        return (torch.stack([e.ids for e in found]).long(), torch.stack([e.values for e in found]),
                torch.stack([e.log_rest for e in found]))

    def loss(self, student_logits: torch.Tensor, tokens: torch.Tensor, position_ids: torch.Tensor,
             labels: torch.Tensor) -> torch.Tensor:
        """Per-token distillation loss ``[b, s]`` (fp32) from the student's vocabulary slice."""
        device = student_logits.device
        ids, values, rest = (t.to(device) for t in self.entries(tokens, position_ids))
        kl = topk_vocab_parallel_kl(student_logits, ids, values, rest, self.temperature)
        lm = tensor_parallel.vocab_parallel_cross_entropy(student_logits, labels)
        return distillation_loss(lm, kl, self.alpha, self.temperature)


def _teacher_weights(cfg, source_arch: Architecture, source_canonical: dict, tokenizer: str) -> tuple:
    d = cfg.distill
    if d.teacher == "source":
        return source_arch, source_canonical
    model_cfg = dataclasses.replace(cfg.model, source=d.teacher, init=None)
    arch, canonical, t_tok = load_source(dataclasses.replace(cfg, model=model_cfg))
    _check_same_vocabulary(d.teacher, arch, t_tok, source_arch, tokenizer)
    return arch, canonical


def build_distiller(cfg, source_arch: Architecture, source_canonical: dict, tokenizer: str, run_folder: str):
    """The run's distillation loss: the online ``Teacher`` (``distill.topk: 0``) or a
    ``CachedTeacher`` over ``distill.cache_dir`` (default RUN/data/teacher_cache)."""
    d = cfg.distill
    if not d.topk:
        return Teacher.build(cfg, source_arch, source_canonical, tokenizer)
    arch, canonical = _teacher_weights(cfg, source_arch, source_canonical, tokenizer)
    if d.topk > arch.vocab_size:
        raise UserError(f"distill.topk {d.topk} exceeds the teacher's vocabulary of {arch.vocab_size} tokens; "
                        "choose a smaller k (or 0 for the full vocabulary)")
    manifest = {"format": FORMAT, "weights": weights_digest(canonical), "architecture": arch.to_json(),
                "tokenizer": run_dir.content_id(run_dir._tokenizer_files(tokenizer)), "k": int(d.topk),
                "seq_len": int(cfg.data.seq_len), "temperature": float(d.temperature),
                "dtype": "bf16" if cfg.model.dtype == "bf16" else "fp32"}
    del canonical
    root = d.cache_dir or os.path.join(run_folder, "data", "teacher_cache")

    def make_teacher() -> Teacher:  # the weights again: the trainer keeps no copy of them
        canonical = load_source(cfg)[1] if d.teacher == "source" else None
        return Teacher.build(cfg, source_arch, canonical, tokenizer)

    cached = CachedTeacher(TopkStore(root, manifest), make_teacher, d.alpha, d.temperature)
    log.info(f"[distill] top-{d.topk} teacher cache {cached.store.folder}")
    return cached
