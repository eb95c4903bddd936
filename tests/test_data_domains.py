"""The train iterator over one domain or many, static blend or dynamic batch loading, held-out
data from its own files or carved from the training files: every combination yields batches
whose domain ids are the domains their tokens come from."""
import warnings

import pytest

warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")

from test_data_blend import DOMAINS, EOD, VOCAB, domain_of, synthetic_prefixes  # noqa: E402

from megatron_effllm.data.loader import DataArgs, make_train_iterator  # noqa: E402


@pytest.fixture(scope="module")
def prefixes(tmp_path_factory):
    root = tmp_path_factory.mktemp("domains")
    return root, synthetic_prefixes(root), synthetic_prefixes(root, seed=1, name="heldout")


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("heldout", [False, True], ids=["split", "heldout-files"])
@pytest.mark.parametrize("n_domains", [1, 2, 4])
def test_batches_name_their_domain(prefixes, n_domains, heldout, dynamic):
    root, train, held = prefixes
    names = DOMAINS[:n_domains]
    args = DataArgs(train={d: train[d] for d in names},
                    heldout={d: held[d] for d in names} if heldout else None,
                    seq_len=16, seed=3, cache_dir=str(root / "cache"), split="80,20,0",
                    train_samples=40, eod_id=EOD, vocab_size=VOCAB, dynamic=dynamic)
    it = make_train_iterator(args, 0, 1, micro_batch=2, global_batch=4)
    seen = set()
    for _ in range(10):
        batch = next(it)
        for tokens, did in zip(batch["tokens"], batch["domain_id"].tolist()):
            # Synthetic domain k has tokens in [1000k+1, 1000k+999]; the id indexes `names`.
            assert domain_of(tokens) == {DOMAINS.index(names[did])}
            seen.add(did)
    assert seen == set(range(n_domains))
