"""Sheared-LLaMA dynamic batch loading: the weight update, the sampler, resume, data parallelism."""
import json
import math
import warnings

import numpy
import pytest
import torch

warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")

from dist_utils import run_ranks  # noqa: E402
from test_data_blend import DOMAINS, EOD, VOCAB, domain_of, synthetic_prefixes  # noqa: E402

from megatron_effllm.data.dynamic_batch import (DynamicBatchSampler,  # noqa: E402
                                                measure_reference_losses, update_weights)
from megatron_effllm.data.loader import DataArgs, make_train_iterator  # noqa: E402
from megatron_effllm.errors import UserError  # noqa: E402


def test_update_formula_by_hand():
    # delta = [ln 3, 0] (the second domain is ahead of its reference: clipped to 0), so
    # alpha = [0.5*3, 0.5*1] / 2 = [0.75, 0.25]; with c = 0.2: w' = 0.8*alpha + 0.1.
    w = update_weights([0.5, 0.5], [1 + math.log(3), 1.0], [1.0, 2.0], eta=1.0, smoothing=0.2)
    assert numpy.allclose(w, [0.7, 0.3], atol=1e-12, rtol=0)
    # Signed: delta = [ln 3, -1] -> alpha = [1.5, 0.5/e] / (1.5 + 0.5/e).
    w = update_weights([0.5, 0.5], [1 + math.log(3), 1.0], [1.0, 2.0], smoothing=0.2, signed=True)
    a = 1.5 / (1.5 + 0.5 / math.e)
    assert numpy.allclose(w, [0.8 * a + 0.1, 0.8 * (1 - a) + 0.1], atol=1e-12, rtol=0)
    # Four domains, the paper's eta = 1, c = 1e-4, the closed form written out.
    w0, l, r = [0.4, 0.3, 0.2, 0.1], [2.5, 3.0, 1.0, 4.0], [2.0, 3.5, 1.5, 3.0]
    e = [wi * math.exp(max(li - ri, 0.0)) for wi, li, ri in zip(w0, l, r)]
    want = [(1 - 1e-4) * ei / sum(e) + 1e-4 / 4 for ei in e]
    got = update_weights(w0, l, r)
    assert numpy.allclose(got, want, atol=1e-12, rtol=0) and abs(got.sum() - 1) < 1e-12
    # eta scales the push; a domain on its reference keeps its weight ratio to another.
    w2 = update_weights(w0, l, r, eta=2.0, smoothing=0.0)
    assert w2[3] > got[3] and math.isclose(w2[1] / w2[2], w0[1] / w0[2], rel_tol=1e-12)
    with pytest.raises(UserError, match="one per domain"):
        update_weights([0.5, 0.5], [1.0], [1.0, 1.0])
    with pytest.raises(UserError, match="must be finite"):
        update_weights([0.5, 0.5], [float("nan"), 1.0], [1.0, 1.0])


def test_reference_losses_from_a_loss_function():
    ref = measure_reference_losses(lambda d: {"a": 2.5, "b": 3}[d], ["a", "b"])
    assert ref == {"a": 2.5, "b": 3.0}
    with pytest.raises(UserError, match="reference loss of domain b is inf"):
        measure_reference_losses(lambda d: float("inf") if d == "b" else 1.0, ["a", "b"])


def _sampler(**kw):
    base = dict(domains=["a", "b", "c", "d"], sizes=[5, 7, 3, 11],
                weights={"a": 0.4, "b": 0.3, "c": 0.2, "d": 0.1}, global_batch=16, seed=11,
                update_interval=5, reference_losses=[2.0, 2.0, 2.0, 2.0])
    base.update(kw)
    return DynamicBatchSampler(**base)


def _losses(step):
    # A deterministic, step-dependent stand-in for measured held-out losses.
    return [2.0 + 0.5 * math.sin(step + i) for i in range(4)]


def _run(sampler, steps):
    out = []
    for _ in range(steps):
        out.append(sampler.next_global_batch())
        if sampler.update_due:
            sampler.update(_losses(sampler.step))
    return out


def test_sampler_weights_epochs_and_determinism():
    s = _sampler(sizes=[1000, 1000, 1000, 1000], global_batch=64, update_interval=0)
    batches = _run(s, 200)
    counts = numpy.bincount([d for b in batches for d, _ in b], minlength=4) / (200 * 64)
    assert numpy.abs(counts - [0.4, 0.3, 0.2, 0.1]).max() < 0.02, counts
    assert _run(_sampler(sizes=[1000] * 4, global_batch=64, update_interval=0), 3) == batches[:3]
    assert _run(_sampler(sizes=[1000] * 4, global_batch=64, update_interval=0, seed=12), 3) != batches[:3]

    # Each domain walks a permutation per epoch: no sample repeats before its epoch ends.
    s = _sampler()
    seen = {i: [] for i in range(4)}
    for b in _run(s, 40):
        for d, idx in b:
            seen[d].append(idx)
    for d, n in enumerate(s.sizes):
        full = len(seen[d]) // n
        assert full >= 2, "test needs at least two epochs per domain"
        epochs = [seen[d][e * n:(e + 1) * n] for e in range(full)]
        assert all(sorted(ep) == list(range(n)) for ep in epochs)
        assert epochs[0] != epochs[1]  # a fresh order every epoch
        assert s.epochs[d] == full and s.positions[d] == len(seen[d]) - full * n


def test_sampler_resume_equals_uninterrupted():
    full = _run(_sampler(), 30)
    s = _sampler()
    _run(s, 12)  # two weight updates happened (steps 5 and 10)
    assert len(s.history) == 2
    state = json.loads(json.dumps(s.state_dict()))  # plain types: any checkpoint format holds it
    resumed = _sampler(reference_losses=None)  # the reference comes back from the checkpoint
    resumed.load_state_dict(state)
    assert resumed.weights_dict() == s.weights_dict()
    assert _run(resumed, 18) == full[12:]

    with pytest.raises(UserError, match="built for domains"):
        _sampler(sizes=[5, 7, 3, 12]).load_state_dict(state)
    with pytest.raises(UserError, match="same seed and global batch"):
        _sampler(seed=1).load_state_dict(state)
    with pytest.raises(UserError, match="needs reference losses"):
        _sampler(reference_losses=None).update([1, 1, 1, 1])
    with pytest.raises(UserError, match="missing d"):
        _sampler().update({"a": 1, "b": 1, "c": 1})


def _args(train, cache_dir):
    return DataArgs(train=train, seq_len=16, seed=3, cache_dir=cache_dir, eod_id=EOD,
                    vocab_size=VOCAB, split="100,0,0", dynamic=True, dynamic_interval=3,
                    weights={"books": 1, "code": 1, "man": 1, "techdocs": 1},
                    reference_losses={"books": 3.0, "code": 2.0, "man": 2.5, "techdocs": 2.2})


def _step_losses(step):
    return {d: 2.0 + 0.7 * math.cos(step * (i + 1)) for i, d in enumerate(DOMAINS)}


def _train(it, steps):
    """Drive an iterator like the training loop: global batches, weight updates when due."""
    out = []
    for _ in range(steps):
        out.append(it.next_global_batch())
        if it.sampler.update_due:
            it.update_domain_weights(_step_losses(it.sampler.step))
    return out


def test_dynamic_iterator_resume_and_dp_slices(tmp_path):
    args = _args(synthetic_prefixes(tmp_path), str(tmp_path / "cache"))
    ref = _train(make_train_iterator(args, 0, 1, micro_batch=2, global_batch=8), 10)
    for step in ref:
        for mb in step:
            for row, d in zip(mb["tokens"], mb["domain_id"]):
                assert domain_of(row) == {int(d)}

    it = make_train_iterator(args, 0, 1, 2, 8)
    _train(it, 4)  # past the update at step 3
    state = json.loads(json.dumps(it.state_dict()))
    assert state["source"]["weights"] != [0.25] * 4
    resumed = make_train_iterator(args, 0, 1, 2, 8, start_state=state)
    for got, want in zip(_train(resumed, 6), ref[4:]):
        assert all(torch.equal(g["tokens"], w["tokens"]) and torch.equal(g["domain_id"], w["domain_id"])
                   for g, w in zip(got, want))

    # DP=2: rank r's micro-batch k is the one-process micro-batches 2k+r of the same step.
    ranks = [make_train_iterator(args, r, 2, 2, 8) for r in (0, 1)]
    per_rank = [_train(r, 10) for r in ranks]
    for step in range(10):
        for k in range(2):
            got = torch.cat([per_rank[0][step][k]["tokens"], per_rank[1][step][k]["tokens"]])
            want = torch.cat([ref[step][2 * k]["tokens"], ref[step][2 * k + 1]["tokens"]])
            assert torch.equal(got, want)
    assert ranks[0].state_dict() == ranks[1].state_dict()

    with pytest.raises(UserError, match="multiple of micro_batch 3 x data-parallel size 2"):
        make_train_iterator(args, 0, 2, 3, 8)


def _rank_body(rank, world_size, train, cache_dir):
    """On a real gloo rank: build the datasets collectively, read this rank's slices."""
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")
    out = {}
    for dynamic in (True, False):
        args = _args(train, cache_dir)
        args.dynamic, args.train_samples = dynamic, 64
        it = make_train_iterator(args, rank, world_size, micro_batch=2, global_batch=8)
        steps = _train(it, 3) if dynamic else [it.next_global_batch() for _ in range(3)]
        # numpy, not torch tensors: those would travel as shared-memory handles that die with
        # the rank process.
        out[dynamic] = ([[mb["tokens"].numpy() for mb in s] for s in steps], it.state_dict())
    return out


def test_two_gloo_ranks_partition_the_global_batch(tmp_path):
    train = synthetic_prefixes(tmp_path)
    cache = str(tmp_path / "cache")
    results = run_ranks(_rank_body, world_size=2, args=(train, cache))
    for dynamic in (True, False):
        args = _args(train, cache)
        args.dynamic, args.train_samples = dynamic, 64
        one = make_train_iterator(args, 0, 1, 2, 8)
        steps = _train(one, 3) if dynamic else [one.next_global_batch() for _ in range(3)]
        for s in range(3):
            for k in range(2):
                got = torch.cat([torch.from_numpy(results[r][dynamic][0][s][k]) for r in (0, 1)])
                want = torch.cat([steps[s][2 * k]["tokens"], steps[s][2 * k + 1]["tokens"]])
                assert torch.equal(got, want)
        assert results[0][dynamic][1] == results[1][dynamic][1] == one.state_dict()
