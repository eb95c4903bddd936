"""The teacher top-k cache (distill.topk): the top-k KL equals the full-vocabulary KL at k = V and
the coarsened KL below it; two tensor-parallel ranks give TP=1's KL, gradient and cache entries;
a second run reads every entry (no teacher built) and trains bit-identically; a damaged,
misplaced or foreign entry is refused in one line."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

from dist_utils import run_ranks
from megatron_effllm.errors import UserError
from megatron_effllm.training.distill import topk_vocab_parallel_kl, vocab_parallel_kl, vocab_parallel_topk
from megatron_effllm.training.teacher_cache import CachedTeacher, TopkStore, sample_keys

VOCAB = 50  # even, so two ranks hold 25 entries each
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny_cpu.yaml")


def _logits(seed: int, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 7, VOCAB, generator=g) * scale


def _kl_and_grad(student, ids, values, rest, temperature, group="tp"):
    s = student.clone().requires_grad_(True)
    kl = topk_vocab_parallel_kl(s, ids, values, rest, temperature, group)
    kl.sum().backward()
    return kl.detach(), s.grad


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_kl_with_k_equal_to_the_vocabulary_is_the_full_kl(temperature):
    student, teacher = _logits(0), _logits(1)
    ids, values, rest = vocab_parallel_topk(teacher, VOCAB, temperature)
    assert torch.equal(ids.sort(-1).values, torch.arange(VOCAB).expand(2, 7, -1))
    assert torch.equal(rest, torch.full((2, 7), float("-inf")))  # no mass outside
    kl, grad = _kl_and_grad(student, ids, values, rest, temperature)
    s = student.clone().requires_grad_(True)
    full = vocab_parallel_kl(s, teacher, temperature)
    full.sum().backward()
    torch.testing.assert_close(kl, full.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, s.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("k", [1, 10])
def test_topk_kl_is_the_kl_of_the_top_k_and_a_rest_bucket(k):
    """Against autograd in fp64 through the coarsened distributions (top-k entries + the rest);
    never above the full KL (coarsening loses information)."""
    temperature = 1.5
    student, teacher = _logits(2), _logits(3)
    ids, values, rest = vocab_parallel_topk(teacher, k, temperature)
    kl, grad = _kl_and_grad(student, ids, values, rest, temperature)
    s = student.double().requires_grad_(True)
    q = F.softmax(s / temperature, -1).gather(-1, ids)
    p = F.softmax(teacher.double() / temperature, -1).gather(-1, ids)
    r, r_q = 1 - p.sum(-1), 1 - q.sum(-1)
    ref = (p * (p / q).log()).sum(-1) + r * (r / r_q).log()
    ref.sum().backward()
    torch.testing.assert_close(rest.double(), r.log(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kl.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), s.grad, rtol=1e-5, atol=1e-7)
    assert (kl >= 0).all() and (kl <= vocab_parallel_kl(student, teacher, temperature) + 1e-5).all()


def test_a_teacher_equal_to_the_student_gives_zero_kl_and_zero_gradient():
    student = _logits(4)
    ids, values, rest = vocab_parallel_topk(student, 8, 1.0)
    kl, grad = _kl_and_grad(student, ids, values, rest, 1.0)
    assert kl.abs().max() < 1e-5 and grad.abs().max() < 1e-6  # fp32 rounding: both sides normalise apart


class _SlicedTeacher:
    """A stand-in teacher: this rank's vocabulary slice of fixed logits."""

    def __init__(self, logits, cut):
        self.full, self.cut, self.calls = logits, cut, 0

    def logits(self, tokens, position_ids):
        self.calls += 1
        return self.full[..., self.cut]


def _manifest(k=8):
    return {"format": "test", "weights": "w", "k": k, "seq_len": 7, "temperature": 2.0}


def _tp2_run(rank, world_size, cache):
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(tensor_model_parallel_size=2)
    try:
        half = VOCAB // 2
        cut = slice(rank * half, (rank + 1) * half)
        out = {}
        for k in (VOCAB, 10):
            ids, values, rest = vocab_parallel_topk(_logits(1)[..., cut], k, 2.0)
            out[k] = (ids, values, rest) + _kl_and_grad(_logits(0)[..., cut], ids, values, rest, 2.0)
        teacher = _SlicedTeacher(_logits(1), cut)
        cached = CachedTeacher(TopkStore(cache, _manifest()), lambda: teacher, 0.5, 2.0)
        tokens = torch.arange(14).reshape(2, 7)
        entries = cached.entries(tokens, torch.arange(7).unsqueeze(0))
        return out, entries, cached.writes
    finally:
        ps.destroy_model_parallel()


def test_tensor_parallel_topk_kl_and_cache_equal_tp1(tmp_path):
    """TP=2, each rank half the vocabulary: the top-k, the KL (identical on both ranks) and each
    rank's gradient slice equal TP=1's to fp32 rounding; the cache entries the TP=2 pair writes
    (tensor-parallel rank 0 alone) are the ones a single process writes."""
    (r0, e0, w0), (r1, e1, w1) = run_ranks(_tp2_run, world_size=2, args=(str(tmp_path / "tp2"),))
    assert (w0, w1) == (2, 0)
    for k in (VOCAB, 10):
        ids, values, rest = vocab_parallel_topk(_logits(1), k, 2.0)
        kl, grad = _kl_and_grad(_logits(0), ids, values, rest, 2.0)
        for a, b in zip(r0[k][:3], r1[k][:3]):
            assert torch.equal(a, b)
        assert torch.equal(r0[k][0], ids) and torch.equal(r0[k][1], values)
        torch.testing.assert_close(r0[k][2], rest, rtol=1e-6, atol=1e-6)
        assert torch.equal(r0[k][3], r1[k][3])
        torch.testing.assert_close(r0[k][3], kl, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(torch.cat([r0[k][4], r1[k][4]], -1), grad, rtol=1e-6, atol=1e-7)
    teacher = _SlicedTeacher(_logits(1), slice(None))
    one = CachedTeacher(TopkStore(str(tmp_path / "tp1"), _manifest()), lambda: teacher, 0.5, 2.0)
    e = one.entries(torch.arange(14).reshape(2, 7), torch.arange(7).unsqueeze(0))
    for a, b, c in zip(e, e0, e1):
        assert torch.equal(b, c)
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-6, atol=1e-6)


def test_entries_are_read_back_and_a_damaged_or_foreign_entry_is_refused(tmp_path):
    cache = str(tmp_path / "cache")
    teacher = _SlicedTeacher(_logits(1), slice(None))
    tokens, positions = torch.arange(14).reshape(2, 7), torch.arange(7).unsqueeze(0)
    first = CachedTeacher(TopkStore(cache, _manifest()), lambda: teacher, 0.5, 2.0)
    written = first.entries(tokens, positions)
    assert teacher.calls == 1 and first.writes == 2

    def never():
        raise AssertionError("the teacher was built")
    again = CachedTeacher(TopkStore(cache, _manifest()), never, 0.5, 2.0)
    for a, b in zip(again.entries(tokens, positions), written):
        assert torch.equal(a, b)
    assert again.reads == 2 and again.writes == 0
    store = again.store
    keys = sample_keys(tokens, positions)
    path = store.path(keys[0])
    data = bytearray(open(path, "rb").read())
    data[-3] ^= 0x40  # one bit of the payload
    open(path, "wb").write(bytes(data))
    with pytest.raises(UserError) as err:
        again.entries(tokens, positions)
    msg = str(err.value)
    assert "\n" not in msg and path in msg and "checksum mismatch" in msg and "delete it" in msg
    os.replace(store.path(keys[1]), path)  # another sample's entry under this sample's name
    with pytest.raises(UserError, match=r"written for another teacher, sample or k\); delete it"):
        again.entries(tokens, positions)
    manifest = os.path.join(store.folder, "manifest.json")
    json.dump(dict(_manifest(), weights="other"), open(manifest, "w"))
    with pytest.raises(UserError, match="written for another teacher .differs in weights.; delete that folder"):
        TopkStore(cache, _manifest()).open(write=True)


SHORT = ["train.steps=8", "train.checkpoint_interval=8", "train.log_interval=2", "prune.start_step=2",
         "prune.end_step=6", "prune.compact_every=2", "data.dynamic_interval=4", "export.hf_dtype=fp32",
         "distill.alpha=0.5", "distill.topk=32", "distill.temperature=2.0"]


def _train(rank, world_size, run_dir, cache, forbid_teacher):
    from megatron_effllm.training import teacher as teacher_mod
    from megatron_effllm.training.config import load_config
    from megatron_effllm.training.trainer import run

    if forbid_teacher:
        def refuse(*args, **kwargs):
            raise AssertionError("the teacher was built although every entry is cached")
        teacher_mod.Teacher.build = classmethod(refuse)
        teacher_mod.Teacher.logits = refuse
    return run(load_config(TINY, SHORT + [f"run_dir={run_dir}", f"distill.cache_dir={cache}"]))


def _losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f) if r.get("kind") == "train"]


def test_a_second_run_reads_the_cache_and_trains_bit_identically(tmp_path):
    """DP=2, ZeRO-2, pruning with compactions: the first run builds the teacher and writes one
    entry per sample (tensor-parallel rank 0 of each replica); a second run in another folder
    with the same cache never builds or calls a teacher and logs the same losses, bit for bit,
    and ends with the same weights."""
    cache = str(tmp_path / "cache")
    first, second = str(tmp_path / "first"), str(tmp_path / "second")
    a, _ = run_ranks(_train, world_size=2, args=(first, cache, False))
    entries = [n for _, _, names in os.walk(cache) for n in names if n.endswith(".topk")]
    assert len(entries) == 8 * 8  # steps x global batch, every sample distinct
    b, _ = run_ranks(_train, world_size=2, args=(second, cache, True))
    assert a["final_loss"] == b["final_loss"] and _losses(first) == _losses(second)
    assert len(_losses(first)) >= 4 and a["final_params"] < a["source_params"]
    from megatron_effllm.convert.hf_io import load_hf_model
    x, y = (load_hf_model(os.path.join(d, "final", "hf")) for d in (first, second))
    assert x.arch == y.arch and all(torch.equal(x.state_dict[k], y.state_dict[k]) for k in x.state_dict)
