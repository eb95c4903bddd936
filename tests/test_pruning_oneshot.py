"""One-shot pruning end to end on a tiny model: every estimator and one-shot strategy, and the CLI."""
import gzip
import json

import pytest
import torch

from megatron_effllm.eval.perplexity import calibration_windows
from megatron_effllm.pruning import oneshot
from megatron_effllm.pruning.groups import PruningError
from megatron_effllm.pruning.selection import Constraints
from test_pruning_reference import random_state_dict, reference_logits, tiny_arch

TEXT = ("The quick brown fox jumps over the lazy dog. def main(argv): return argv[0] if argv else None\n"
        "NAME ls - list directory contents. SYNOPSIS ls [OPTION]... [FILE]...\n") * 40


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny Llama folder (random weights) with a small trained BPE tokenizer, and text files."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from megatron_effllm.convert import hf_io

    root = tmp_path_factory.mktemp("oneshot")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")
    tok_dir = root / "tok"
    fast.save_pretrained(tok_dir)
    arch = tiny_arch("llama", tie=True, vocab=len(fast), layers=3)
    sd = {k: v.float() for k, v in random_state_dict(arch, seed=4).items()}
    hf_io.save_hf_model(arch, sd, str(root / "model"), tokenizer_dir=str(tok_dir), dtype=torch.float32)
    files = []
    for name in ("a", "b"):
        path = root / f"{name}.jsonl.gz"
        with gzip.open(path, "wt") as f:
            for i in range(6):
                f.write(json.dumps({"text": f"{name} {i} " + TEXT[i * 50:]}) + "\n")
        files.append(str(path))
    return root, arch, sd, fast, files


@pytest.mark.parametrize("estimator,strategy,obs", [
    ("taylor", "efficientllm", True), ("mix", "efficientllm", False), ("fisher", "uniform", True),
    ("taylor_elem", "adapt", False), ("activation", "uniform", False), ("magnitude", "efficientllm", False),
    ("obs", "efficientllm", True),
])
def test_oneshot_pipeline(tiny_folder, estimator, strategy, obs):
    from megatron_effllm.convert import hf_io

    root, arch, sd, tok, files = tiny_folder
    model = hf_io.build_hf_model(arch, sd)
    windows = calibration_windows(tok, files, 256, 32)
    assert windows.shape == (8, 32)
    target = int(arch.num_params() * 0.7)
    opts = oneshot.OneShotOptions(target_params=target, estimator=estimator, strategy=strategy, obs=obs,
                                  constraints=Constraints(prune_hidden=strategy != "uniform"))
    calib = oneshot.collect(model, arch, windows, opts)
    plan = oneshot.choose(calib, arch, sd, opts)
    small = oneshot.apply(sd, plan, calib, opts)
    assert plan.after.num_params() <= target
    ids = windows[:2]
    pruned = hf_io.build_hf_model(plan.after, small)
    with torch.no_grad():
        got = pruned(input_ids=ids).logits.double()
    assert (got - reference_logits(plan.after, {k: v.double() for k, v in small.items()}, ids)).abs().max() < 1e-4
    assert not any(p.grad is not None for p in model.parameters())  # calibration leaves no gradients


def test_cli_prunes_saves_and_reloads(tiny_folder, tmp_path, capsys):
    root, arch, sd, tok, files = tiny_folder
    from megatron_effllm.cli import prune_oneshot

    out = tmp_path / "pruned"
    prune_oneshot.main(["--model", str(root / "model"), "--target-params", "0.6", "--out", str(out),
                        "--calib", *files, "--calib-tokens", "256", "--seq-len", "32", "--obs", "--dtype", "float32"])
    text = capsys.readouterr().out
    assert "[prune] fisher / global + OBS" in text and "reloaded with AutoModelForCausalLM" in text
    diff = float(text.split("max |logit diff| ")[1].split(";")[0])
    assert diff < 1e-4
    from megatron_effllm.convert import hf_io

    again = hf_io.load_hf_model(str(out))
    assert again.arch.num_params() <= int(round(0.6 * arch.num_params()))
    assert again.arch.tie_word_embeddings and "lm_head.weight" not in again.state_dict
    with pytest.raises(SystemExit) as err:
        prune_oneshot.main(["--model", str(root / "model"), "--target-params", "2.0x", "--out", str(tmp_path / "x")])
    assert err.value.code == 2
    assert "is not a number" in capsys.readouterr().err


def test_calibration_keeps_the_sums_of_the_named_estimators_only(tiny_folder):
    """fisher alone keeps one quantity (one pass over the gradients, not three), with the same
    bits as a pass that keeps every gradient estimator's sums; the Hessians are unchanged."""
    from megatron_effllm.convert import hf_io

    root, arch, sd, tok, files = tiny_folder
    windows = calibration_windows(tok, files, 256, 32)
    opts = oneshot.OneShotOptions(target_params=int(arch.num_params() * 0.7), estimator="fisher", obs=True)
    alone = oneshot.collect(hf_io.build_hf_model(arch, sd), arch, windows, opts)
    every = oneshot.collect(hf_io.build_hf_model(arch, sd), arch, windows, opts,
                            estimators=["taylor", "taylor_elem"])
    assert alone.grads.quantities == ("w2g2",) and every.grads.quantities == ("awg", "w2g2", "wg")
    assert set(every.grads.state) > set(alone.grads.state)
    assert all(torch.equal(v, every.grads.state[k]) for k, v in alone.grads.state.items())
    assert alone.hessians.state.keys() == every.hessians.state.keys()
    assert all(torch.equal(v, every.hessians.state[k]) for k, v in alone.hessians.state.items())
    plan, same = oneshot.choose(alone, arch, sd, opts), oneshot.choose(every, arch, sd, opts)
    assert plan.after == same.after and plan.to_dict() == same.to_dict()
    with pytest.raises(PruningError, match="not accumulated"):
        oneshot.choose(alone, arch, sd, oneshot.OneShotOptions(target_params=opts.target_params, estimator="taylor"))
