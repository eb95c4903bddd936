"""The run folder: a resume continues only the run its checkpoint belongs to, a new run never
mixes with an earlier one in the same folder, `resume: auto` follows `latest`, one run writes a
folder at a time, and training starts from a megatron checkpoint folder.

The training scenarios run one after another in one spawned process (imports paid once) on a
tiny Llama: two HF models that differ only in their weights (same tokenizer), 4 steps, a
checkpoint every 2.
"""
import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys

import pytest

from dist_utils import run_ranks
from test_reliability_bad_input import _run_yaml, _text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tree(top) -> dict:
    """sha256 of every file under ``top`` but the lock (whose holder changes)."""
    out = {}
    for root, _, names in os.walk(top):
        for n in names:
            if n != ".lock":
                path = os.path.join(root, n)
                with open(path, "rb") as f:
                    out[os.path.relpath(path, top)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from eval_fixtures import tiny_llama, tiny_tokenizer

    base = tmp_path_factory.mktemp("inputs")
    tok = base / "tokenizer"
    tiny_tokenizer(300).save_pretrained(str(tok))
    for name, seed in (("hf_a", 0), ("hf_b", 1)):
        tiny_llama(vocab_size=300, seed=seed).save_pretrained(str(base / name))
        tiny_tokenizer(300).save_pretrained(str(base / name))
    data = base / "data"
    data.mkdir()
    for name, seed, n in (("web.jsonl", 0, 40), ("web_heldout.jsonl", 1, 8)):
        with open(data / name, "w") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in _text(n, seed))
    return {"tok": str(tok), "data": data, "hf_a": str(base / "hf_a"), "hf_b": str(base / "hf_b")}


# ============================================================================ training scenarios
def _attempt(run_dir, inputs, **changes):
    """One effllm-train run: (summary or the UserError's line, what it logged)."""
    from megatron_effllm.errors import UserError
    from megatron_effllm.training.config import load_config
    from megatron_effllm.training.trainer import run

    changes = {"model__source": inputs["hf_a"], "model__init": None, "resume": "auto", "data__dynamic": True,
               **changes}
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            result = run(load_config(_run_yaml(inputs, run_dir, **changes)))
    except UserError as err:
        result = str(err)
    return result, out.getvalue()


def _steps(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r["step"] for r in map(json.loads, f) if r["kind"] == "train"]


def _scenarios(rank, world_size, base, inputs):
    from megatron_effllm.convert.hf_io import load_hf_model
    from megatron_effllm.convert.megatron_checkpoint import save_canonical_checkpoint
    from megatron_effllm.training import checkpoint as ckpt

    run_dir = os.path.join(base, "run")
    out = {}
    out["first"], _ = _attempt(run_dir, inputs)
    out["first_steps"] = _steps(run_dir)
    out["state"] = ckpt.read_meta(os.path.join(run_dir, "checkpoints", "step_000004"))[1]
    before = _tree(run_dir)
    # The case: another model with the same tokenizer; then another strategy; then
    # resume: none. Each is refused before any work and leaves the folder as it was.
    for name, changes in (("other_source", {"model__source": inputs["hf_b"]}),
                          ("other_strategy", {"prune__strategy": "uniform"}),
                          ("none", {"resume": "none"})):
        out[name], _ = _attempt(run_dir, inputs, train__steps=6, **changes)
        out[name + "_unchanged"] = _tree(run_dir) == before
    # Safe changes: longer, another learning rate; logged, the same run goes on.
    out["longer"], out["longer_log"] = _attempt(run_dir, inputs, train__steps=6, optim={"lr": 1e-3})
    out["longer_steps"] = _steps(run_dir)
    before = _tree(run_dir)
    out["fresh"], _ = _attempt(run_dir, inputs, resume="fresh")
    (moved,) = os.listdir(os.path.join(run_dir, "previous_runs"))
    moved = os.path.join(run_dir, "previous_runs", moved)
    out["moved_intact"] = {k: v for k, v in before.items() if not k.startswith("data/")} == _tree(moved)
    out["fresh_steps"] = _steps(run_dir)
    out["elsewhere"], _ = _attempt(run_dir, inputs, resume=os.path.join(moved, "checkpoints", "step_000006"))
    # A megatron checkpoint folder as the source: the same model as hf_a.
    src = load_hf_model(inputs["hf_a"])
    mega = os.path.join(base, "megatron_a")
    save_canonical_checkpoint(src.arch, src.state_dict, mega, tokenizer_src=inputs["hf_a"])
    out["megatron"], _ = _attempt(os.path.join(base, "from_megatron"), inputs, model__source=mega)
    return out


@pytest.fixture(scope="module")
def scenarios(inputs, tmp_path_factory):
    base = str(tmp_path_factory.mktemp("runs"))
    (out,) = run_ranks(_scenarios, world_size=1, args=(base, inputs), timeout=900)
    return base, out


def test_checkpoint_stores_a_plain_fingerprint(scenarios):
    _, out = scenarios
    assert isinstance(out["first"], dict) and out["first_steps"] == [1, 2, 3, 4]
    fp, settings = out["state"]["fingerprint"], out["state"]["settings"]
    assert all(isinstance(k, str) and isinstance(v, str) for d in (fp, settings) for k, v in d.items())
    for key in ("model.source", "model.architecture", "model.tokenizer", "data.train", "data.heldout",
                "prune.strategy", "prune.target_params", "parallel.tp", "parallel.world_size", "seed"):
        assert key in fp, key
    assert "train.steps" in settings and "train.steps" not in fp and "optim.lr" not in fp


@pytest.mark.parametrize("name, words", [
    ("other_source", "model.source (other contents)"),
    ("other_strategy", 'prune.strategy "efficientllm" -> "uniform"'),
    ("none", "holds an earlier run (checkpoints, metrics.jsonl, config.yaml"),
])
def test_a_changed_run_is_refused_in_one_line(scenarios, name, words):
    _, out = scenarios
    msg = out[name]
    assert isinstance(msg, str) and "\n" not in msg and words in msg, msg
    assert out[name + "_unchanged"]
    if name == "other_source":  # weights only: the tokenizer and the shape are the same
        assert "model.tokenizer" not in msg and "model.architecture" not in msg
        assert msg.endswith("or start a new run (another run_dir, or resume: fresh to move this run aside)")
    if name == "none":
        assert "set resume: auto to continue it, resume: fresh to move it to" in msg


def test_safe_changes_resume_and_are_logged(scenarios):
    _, out = scenarios
    assert isinstance(out["longer"], dict), out["longer"]
    assert "[resume] train.steps: 4 -> 6" in out["longer_log"]
    assert "[resume] optim.lr: 0.0003 -> 0.001" in out["longer_log"]
    assert out["longer_steps"] == [1, 2, 3, 4, 5, 6]  # one run, continued


def test_fresh_moves_the_earlier_run_aside(scenarios):
    _, out = scenarios
    assert isinstance(out["fresh"], dict), out["fresh"]
    assert out["moved_intact"]  # byte for byte, under previous_runs/<time>/
    assert out["fresh_steps"] == [1, 2, 3, 4]  # the new run's metrics alone
    assert "continues a run elsewhere" in out["elsewhere"] and "choose an empty run_dir" in out["elsewhere"]


def test_training_starts_from_a_megatron_checkpoint(scenarios):
    _, out = scenarios
    hf, mega = out["first"], out["megatron"]
    assert isinstance(mega, dict), mega
    assert mega["source_params"] == hf["source_params"]
    for d, ppl in hf["heldout_ppl_source"].items():  # the same weights, the same held-out loss
        assert abs(mega["heldout_ppl_source"][d] - ppl) <= 1e-5 * ppl


# ============================================================================ fingerprint and resume
def _cfg(inputs, path, **changes):
    from megatron_effllm.training.config import load_config

    changes = {"model__source": inputs["hf_a"], "model__init": None, **changes}
    return load_config(_run_yaml(inputs, path, **changes))


def test_fingerprint_follows_content_not_paths(inputs, tmp_path):
    from megatron_effllm.architecture import Architecture
    from megatron_effllm.training import run_dir

    arch = Architecture.uniform(num_layers=2, hidden_size=32, num_heads=4, num_kv_groups=2,
                                ffn_hidden_size=64, vocab_size=300)

    def fp(where="r", **changes):
        cfg = _cfg(inputs, tmp_path / where, **changes)
        return run_dir.fingerprint(cfg, arch, cfg.model.source, 1)

    base = fp()
    moved = str(tmp_path / "moved_a")
    shutil.copytree(inputs["hf_a"], moved)
    assert fp("elsewhere", model__source=moved, train__steps=9, export__hf=True) == base
    changed = {k for k, v in fp(model__source=inputs["hf_b"]).items() if base[k] != v}
    assert changed == {"model.source"}
    with open(os.path.join(moved, "config.json")) as f:
        text = f.read()
    with open(os.path.join(moved, "config.json"), "w") as f:
        f.write(text.replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 1e-05'))
    assert fp(model__source=moved)["model.source"] != base["model.source"]
    data = str(tmp_path / "web.jsonl")
    shutil.copy(inputs["data"] / "web.jsonl", data)
    assert fp(data__train={"web": [data]}) == base  # a copy of the same data
    with open(data, "a") as f:
        f.write(json.dumps({"text": "one more document"}) + "\n")
    assert {k for k, v in fp(data__train={"web": [data]}).items() if base[k] != v} == {"data.train"}


def test_checkpoint_without_fingerprint_is_refused():
    from megatron_effllm.errors import UserError
    from megatron_effllm.training import run_dir

    for state in ({"step": 2}, ["not", "a", "mapping"]):
        with pytest.raises(UserError, match="records no run fingerprint") as err:
            run_dir.check_resume("RUN/checkpoints/step_000002", state, {"seed": "1"}, {})
        assert "\n" not in str(err.value)


# ============================================================================ `latest`
def _fake_checkpoints(root, steps, latest):
    from megatron_effllm.training import checkpoint as ckpt

    for s in steps:
        folder = os.path.join(root, f"step_{s:06d}")
        # every file a checkpoint must have (the contents are not read here)
        for rel in (*ckpt.REQUIRED, "ds/model_states.pt"):
            os.makedirs(os.path.dirname(os.path.join(folder, rel)), exist_ok=True)
            with open(os.path.join(folder, rel), "wb") as f:
                f.write(b"%s %d" % (rel.encode(), s))
        ckpt.write_manifest(folder)
    if latest is not None:
        with open(os.path.join(root, "latest"), "w") as f:
            f.write(latest)
    return lambda s: os.path.join(root, f"step_{s:06d}")


def test_auto_follows_latest_and_never_a_stale_newer_step(tmp_path):
    from megatron_effllm.training import checkpoint as ckpt

    step = _fake_checkpoints(str(tmp_path / "a"), (2, 4, 6), "step_000004\n")
    said = []
    assert ckpt.find_resumable(str(tmp_path / "a"), report=said.append) == step(4)
    assert len(said) == 1 and "skipping " + step(6) in said[0] and "newer than" in said[0]
    # latest damaged: the newest below it that verifies, not the stale one above it
    with open(os.path.join(step(4), "trainer_state.pt"), "ab") as f:
        f.write(b"x")
    assert ckpt.find_resumable(str(tmp_path / "a"), report=said.append) == step(2)
    # no latest (a crash before the first one was written) or an unreadable one: the newest
    for name, latest in (("b", None), ("c", "garbage")):
        step = _fake_checkpoints(str(tmp_path / name), (2, 4), latest)
        assert ckpt.find_resumable(str(tmp_path / name), report=said.append) == step(4)
    # only a stale step above latest: refused, not silently started over
    step = _fake_checkpoints(str(tmp_path / "d"), (6,), "step_000004\n")
    with pytest.raises(ckpt.CheckpointError, match="newer than latest .*resume: fresh"):
        ckpt.find_resumable(str(tmp_path / "d"), report=said.append)


# ============================================================================ the folder and its lock
def test_one_run_per_folder(tmp_path):
    from megatron_effllm.errors import UserError
    from megatron_effllm.training.run_dir import RunLock

    first = RunLock(str(tmp_path / "run"))
    with pytest.raises(UserError, match=rf"run_dir .*run is in use by another run \(pid {os.getpid()} on host "
                                        r".*, since .*\); wait for it to end or choose another run_dir"):
        RunLock(str(tmp_path / "run"))
    first.release()
    RunLock(str(tmp_path / "run")).release()  # free again
    # another process holding it
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from megatron_effllm.training.run_dir import RunLock; "
        f"RunLock({str(tmp_path / 'run')!r}); print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=rf"in use by another run \(pid {holder.pid} on host"):
            RunLock(str(tmp_path / "run"))
    finally:
        holder.kill()
        holder.wait()
    RunLock(str(tmp_path / "run")).release()  # a dead holder's lock is gone with it


@pytest.mark.parametrize("make, words", [
    (lambda t: (t / "afile").write_text("x") and str(t / "afile"), "is a file, not a folder; set run_dir to a folder"),
    (lambda t: "/proc/effllm_run", "run_dir /proc/effllm_run cannot be created (No such file or directory)"),
    (lambda t: "/proc", "run_dir /proc is not writable"),
], ids=["file", "under /proc", "/proc itself"])
def test_unusable_run_dir_is_one_line(tmp_path, make, words):
    from megatron_effllm.errors import UserError
    from megatron_effllm.training.run_dir import RunLock

    with pytest.raises(UserError) as err:
        RunLock(make(tmp_path))
    assert "\n" not in str(err.value) and words in str(err.value), str(err.value)
