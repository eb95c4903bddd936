"""megatron-core GPTDataset / BlendedDataset construction and the static-blend train iterator.

Synthetic indexed datasets make the checks exact: every token of domain d lies in
[1000*d + 1, 1000*d + 999], so a sample's domain can be read off its tokens (0 is EOS).
"""
import json
import os
import warnings

import numpy
import pytest
import torch

warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")

from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder  # noqa: E402

from megatron_effllm.data import blend  # noqa: E402
from megatron_effllm.data.loader import DataArgs, make_heldout_batches, make_train_iterator  # noqa: E402
from megatron_effllm.data.prepare import prepare_data  # noqa: E402
from megatron_effllm.errors import UserError  # noqa: E402

EOD, VOCAB = 0, 5000
DOMAINS = ("books", "code", "man", "techdocs")


def synthetic_prefixes(root, docs_per_domain=(30, 50, 20, 40), seed=0, name="train"):
    """{domain: prefix} of synthetic documents (lengths 20..200, EOS-terminated)."""
    rng = numpy.random.default_rng(seed)
    out = {}
    for d, (domain, n) in enumerate(zip(DOMAINS, docs_per_domain)):
        prefix = os.path.join(str(root), f"{name}_{domain}")
        builder = IndexedDatasetBuilder(prefix + ".bin", dtype=numpy.uint16)
        for _ in range(n):
            length = int(rng.integers(20, 200))
            ids = 1000 * d + 1 + rng.integers(0, 999, size=length)
            builder.add_document(numpy.append(ids, EOD), [length + 1])
        builder.finalize(prefix + ".idx")
        out[domain] = prefix
    return out


def domain_of(tokens: torch.Tensor) -> set:
    return set((tokens[tokens != EOD] - 1).div(1000, rounding_mode="floor").tolist())


TOKENS = blend.TokenInfo(EOD, VOCAB)


def test_blended_dataset_respects_weights(tmp_path):
    train = synthetic_prefixes(tmp_path)
    weights = [0.4, 0.3, 0.2, 0.1]
    tr, va, te = blend.build_blended_datasets(train, weights, seq_len=32, seed=7,
                                              cache_dir=str(tmp_path / "cache"),
                                              num_samples=(4000, 200, None), split="90,10,0",
                                              tokens=TOKENS)
    # megatron-core rounds every dataset's share up, so a blend is a few samples longer.
    assert 4000 <= len(tr) <= 4004 and 200 <= len(va) <= 204 and te is None
    ids = numpy.array([int(tr[i]["dataset_id"]) for i in range(len(tr))])
    share = numpy.bincount(ids, minlength=4) / len(ids)
    assert numpy.abs(share - weights).max() < 0.01, share
    for i in range(0, len(tr), 97):
        s = tr[i]
        assert domain_of(s["tokens"]) == {int(s["dataset_id"])}
        assert torch.equal(s["tokens"][1:], s["labels"][:-1])
        assert torch.equal(s["position_ids"], torch.arange(32))
        assert s["loss_mask"].dtype == torch.float32 and bool((s["loss_mask"] == 1).all())
    # megatron-core cached the per-prefix indices under cache_dir.
    assert any(f.endswith("shuffle_index.npy") for f in os.listdir(tmp_path / "cache"))


def test_domain_datasets_and_split(tmp_path):
    train = synthetic_prefixes(tmp_path)
    built = blend.build_domain_datasets(train, seq_len=16, seed=1, cache_dir=str(tmp_path / "c"),
                                        split="80,20,0", tokens=TOKENS)
    for d, (tr, va, te) in enumerate(built[k] for k in DOMAINS):
        assert te is None and len(tr) > len(va) > 0
        for ds in (tr, va):
            for i in range(len(ds)):
                assert domain_of(ds[i]["tokens"]) == {d}
    with pytest.raises(UserError, match="fewer than one sample"):
        blend.build_domain_datasets(train, seq_len=100_000, seed=1, cache_dir=None, tokens=TOKENS)


def test_blend_errors(tmp_path):
    train = synthetic_prefixes(tmp_path)
    with pytest.raises(UserError, match="not found; run effllm-preprocess"):
        blend.build_blended_datasets({"x": str(tmp_path / "nope")}, None, 16, 1, None)
    with pytest.raises(UserError, match="give eod_id and vocab_size"):
        blend.build_blended_datasets(train, None, 16, 1, None, num_samples=(10, None, None))
    with pytest.raises(UserError, match="one weight per dataset"):
        blend.build_blended_datasets(train, [1, 2], 16, 1, None, num_samples=(10, None, None),
                                     tokens=TOKENS)
    with pytest.raises(UserError, match="needs the number of training samples"):
        blend.build_blended_datasets(train, [1, 1, 1, 1], 16, 1, None, split="100,0,0",
                                     tokens=TOKENS)
    with pytest.raises(UserError, match=r"domain man .* valid split holds 0 documents"):
        blend.build_blended_datasets(train, [1, 1, 1, 1], 16, 1, None, num_samples=(10, 10),
                                     split="98,2,0", tokens=TOKENS)
    # Data made by two tokenizers cannot be blended.
    for d, name in (("books", "a.gguf"), ("code", "b.model")):
        with open(train[d] + ".meta.json", "w") as f:
            json.dump({"format": "megatron_effllm.indexed/1",
                       "tokenizer": {"name": name, "vocab_size": VOCAB, "eos_id": EOD}}, f)
    with pytest.raises(UserError, match="tokenized with a.gguf .* but .* with b.model"):
        blend.token_info_for(train)


def _args(train, tmp_path, **kw):
    base = dict(train=train, seq_len=16, seed=3, cache_dir=str(tmp_path / "cache"),
                eod_id=EOD, vocab_size=VOCAB, split="100,0,0")
    base.update(kw)
    return DataArgs(**base)


def test_static_iterator_weights_resume_and_dp(tmp_path):
    train = synthetic_prefixes(tmp_path)
    weights = {"books": 1.0, "code": 2.0, "man": 3.0, "techdocs": 4.0}
    args = _args(train, tmp_path, weights=weights, train_samples=8 * 40)
    it = make_train_iterator(args, 0, 1, micro_batch=4, global_batch=8)
    batches = [next(it) for _ in range(80)]  # 40 steps of 2 micro-batches
    ids = torch.cat([b["domain_id"] for b in batches])
    share = torch.bincount(ids, minlength=4).double() / len(ids)
    assert torch.allclose(share, torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.double), atol=0.02)
    for b in batches[:10]:
        for row, d in zip(b["tokens"], b["domain_id"]):
            assert domain_of(row) == {int(d)}
        assert b["tokens"].shape == b["labels"].shape == b["position_ids"].shape == (4, 16)
        assert b["tokens"].dtype == torch.long and b["loss_mask"].dtype == torch.float32

    # Resume after 7 steps (and inside step 8) == uninterrupted.
    it = make_train_iterator(args, 0, 1, 4, 8)
    for _ in range(14):
        next(it)
    state = json.loads(json.dumps(it.state_dict()))
    resumed = make_train_iterator(args, 0, 1, 4, 8, start_state=state)
    for k in range(14, 30):
        assert torch.equal(next(resumed)["tokens"], batches[k]["tokens"])
    it = make_train_iterator(args, 0, 1, 4, 8)
    for _ in range(15):
        next(it)
    mid = make_train_iterator(args, 0, 1, 4, 8, start_state=it.state_dict())
    assert torch.equal(next(mid)["tokens"], batches[15]["tokens"])

    # Two data-parallel ranks read disjoint halves whose union is the one-process batch.
    r0 = make_train_iterator(args, 0, 2, 2, 8)
    r1 = make_train_iterator(args, 1, 2, 2, 8)
    one = make_train_iterator(args, 0, 1, 2, 8)
    for _ in range(6):
        a, b = next(r0), next(r1)
        assert not set(r0.last_sample_refs) & set(r1.last_sample_refs)
        want = torch.cat([next(one)["tokens"], next(one)["tokens"]])
        assert torch.equal(torch.cat([a["tokens"], b["tokens"]]), want)


def test_prepare_data_from_run_config(tmp_path):
    """The run configuration's data section, with the shipped corpus and a tiny tokenizer."""
    import sentencepiece as spm

    from megatron_effllm.training.config import DataConfig

    sp_prefix = str(tmp_path / "sp")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["the quick brown fox jumps over the lazy dog " * 20,
                                "def f(x):\n    return x + 1\n" * 20]),
        model_prefix=sp_prefix, vocab_size=60, hard_vocab_limit=False, minloglevel=2)
    cfg = DataConfig(seq_len=64, weights={"books": 1, "techdocs": 1, "man": 1, "code": 2})
    out = str(tmp_path / "run" / "data")
    args = prepare_data(cfg, sp_prefix + ".model", out, seed=5, train_samples=64, progress=False)
    assert set(args.train) == set(DOMAINS) and set(args.heldout) == set(DOMAINS)
    assert args.train["code"] == os.path.join(out, "train", "code")
    assert args.cache_dir == os.path.join(out, "index_cache") and args.reference_losses is None
    stamp = os.path.getmtime(args.train["books"] + ".bin")
    again = prepare_data(cfg, sp_prefix + ".model", out, seed=5, train_samples=64, progress=False)
    assert again == args and os.path.getmtime(args.train["books"] + ".bin") == stamp  # not redone

    it = make_train_iterator(args, 0, 1, micro_batch=2, global_batch=4)
    batch = next(it)
    assert batch["tokens"].shape == (2, 64) and int(batch["tokens"].max()) < 60
    held = make_heldout_batches(args, num_batches=2, micro_batch=2)
    assert set(held) == set(DOMAINS)
    for d, batches in held.items():
        assert len(batches) == 2
        assert (batches[0]["domain_id"] == list(args.train).index(d)).all()
    again = make_heldout_batches(args, num_batches=2, micro_batch=2)
    assert again is held  # kept, not rebuilt
    halves = [make_heldout_batches(args, 2, 2, dp_rank=r, dp_size=2)["man"] for r in (0, 1)]
    assert torch.equal(halves[0][0]["tokens"], held["man"][0]["tokens"])
    assert torch.equal(halves[1][0]["tokens"], held["man"][1]["tokens"])
    rebuilt = make_heldout_batches(args, num_batches=2, micro_batch=2)
    assert rebuilt is not held and all(torch.equal(held[d][1]["tokens"], rebuilt[d][1]["tokens"])
                                       for d in DOMAINS)

    with pytest.raises(UserError, match="held-out domains extra have no training data"):
        prepare_data({"train": {"man": args.train["man"]}, "heldout": {"extra": args.heldout["man"]}},
                     None, out)
    with pytest.raises(UserError, match="data.weights must name exactly the training domains"):
        make_train_iterator(DataArgs(**{**args.__dict__, "weights": {"books": 1}}), 0, 1, 2, 4)


def test_dataset_helpers_are_available_or_explained(monkeypatch):
    import sys

    from megatron.core.datasets import helpers_cpp  # the 0.16.1 wheel ships it prebuilt

    assert hasattr(helpers_cpp, "build_sample_idx_int32")
    blend.ensure_dataset_helpers()  # a no-op then
    # Without the prebuilt module and without pybind11, the fix is named in one line.
    monkeypatch.setitem(sys.modules, "megatron.core.datasets.helpers_cpp", None)
    monkeypatch.setitem(sys.modules, "pybind11", None)
    with pytest.raises(UserError, match="pip install pybind11") as err:
        blend.ensure_dataset_helpers()
    assert "\n" not in str(err.value)
