import pytest

from megatron_effllm.training.config import ConfigError, load_config
from megatron_effllm.training.schedules import learning_rate, target_params


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return str(p)


BASE = "model:\n  source: smollm2-135m\n"


def test_overrides_and_types(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["prune.interval=2", "optim.lr=1e-3", "run_dir=/tmp/x",
                                              "data.weights={books: 2, code: 1}"])
    assert cfg.prune.interval == 2 and cfg.optim.lr == 1e-3 and cfg.run_dir == "/tmp/x"
    assert cfg.data.weights == {"books": 2, "code": 1}


@pytest.mark.parametrize("text, overrides, message", [
    (BASE + "prune:\n  intervall: 3\n", [], "unknown config key prune.intervall; did you mean prune.interval"),
    (BASE, ["optim.lr=fast"], "optim.lr: expected a number"),
    (BASE, ["prune.strategy=magic"], "prune.strategy: 'magic' is not one of"),
    (BASE, ["prune.estimator=activation"], "'activation' works in one-shot pruning only"),
    (BASE, ["data.micro_batch=3", "data.global_batch=8"], "multiple of data.micro_batch"),
    (BASE, ["prune.end_step=500", "train.steps=100"], "prune.end_step 500 is after the last step"),
    (BASE, ["parallel.tp=0"], "parallel.tp must be >= 1"),
    (BASE, ["prune.l0_droprate_init=0"], r"prune.l0_droprate_init must be in \(0, 1\)"),
    ("model: [1, 2]\n", [], "config section model. must be a mapping"),
    ("model:\n  source: ''\n", [], "set model.source"),
    ("a: [\n", [], "not valid YAML at line"),
    (BASE, ["prune.interval"], "must look like key=value"),
    (BASE, ["train.progress_bar=maybe"], "expected true or false"),
    (BASE, ["optim=0"], "config section optim. must be a mapping, got 0"),
    (BASE + "seed: 2001-02-30\n", [], r"is not valid YAML \(day is out of range for month\)"),
    (BASE + "1: 2\n", [], "unknown config key 1; known keys: data, distill, export"),
    (BASE, ["optim.lr=1" + "0" * 400], "config key optim.lr: 10000000000000000000... is too large for a number"),
    (BASE, ["optim.min_lr=-.inf"], "config key optim.min_lr must be a finite number >= 0, got -inf"),
    (BASE, ["prune.ema=1"], r"config key prune.ema must be in \[0, 1\), got 1.0"),
    (BASE, ["data.weights={web: 0, code: 0}"], "data.weights: every weight is 0"),
    (BASE + 'resume: "/no/such\\ndir"\n', [], r"resume: '/no/such\\ndir' is not a checkpoint folder"),
])
def test_config_errors_are_one_line(tmp_path, text, overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(write(tmp_path, text), overrides)
    assert "\n" not in str(err.value)


def test_numbers_from_yaml_strings(tmp_path):
    """YAML 1.1 reads 1e3 and 3e-4 (no dot) as strings: they still count as numbers."""
    cfg = load_config(write(tmp_path, BASE), ["train.steps=1e3", "optim.lr=3e-4", "prune.end_step=2e2"])
    assert (cfg.train.steps, cfg.optim.lr, cfg.prune.end_step) == (1000, 3e-4, 200)


def test_sample_index_limit(tmp_path):
    """The static blend indexes steps x global batch samples up front: the largest run that fits
    the limit loads, one step more is refused; the dynamic loader builds no such index."""
    from megatron_effllm.training.config_checks import (
        INDEX_BYTES_PER_SAMPLE,
        SAMPLE_INDEX_LIMIT_BYTES,
    )

    steps = SAMPLE_INDEX_LIMIT_BYTES // INDEX_BYTES_PER_SAMPLE // 8
    assert load_config(write(tmp_path, BASE), [f"train.steps={steps}"]).train.steps == steps
    with pytest.raises(ConfigError, match=f"= {(steps + 1) * 8:,} training samples need a sample index of 8 GB"):
        load_config(write(tmp_path, BASE), [f"train.steps={steps + 1}"])
    assert load_config(write(tmp_path, BASE), [f"train.steps={steps + 1}", "data.dynamic=true"]).data.dynamic


def test_missing_file():
    with pytest.raises(ConfigError, match="config file /nonexistent.yaml not found"):
        load_config("/nonexistent.yaml")


def test_schedules():
    assert learning_rate(0, lr=1.0, min_lr=0.1, warmup=10, total=100) == pytest.approx(0.1)
    assert learning_rate(10, lr=1.0, min_lr=0.1, warmup=10, total=100) == pytest.approx(1.0)
    assert learning_rate(100, lr=1.0, min_lr=0.1, warmup=10, total=100) == pytest.approx(0.1)
    assert learning_rate(50, lr=1.0, min_lr=0.0, warmup=0, total=100, schedule="wsd") == 1.0
    assert learning_rate(90, lr=1.0, min_lr=0.0, warmup=0, total=100, schedule="wsd") == pytest.approx(0.5)
    kw = dict(source=1000, target=500, start=10, end=20)
    assert [target_params(s, **kw) for s in (0, 10, 15, 20, 30)] == [1000, 1000, 750, 500, 500]
    assert target_params(15, curve="cubic", **kw) == 1000 - round(500 * (1 - 0.5 ** 3))


def test_shipped_recipes_load():
    import glob
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    recipes = sorted(glob.glob(os.path.join(root, "configs", "*.yaml")))
    assert len(recipes) >= 3
    for path in recipes:
        cfg = load_config(path)
        assert cfg.prune.end_step <= cfg.train.steps
