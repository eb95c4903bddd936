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
])
def test_config_errors_are_one_line(tmp_path, text, overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(write(tmp_path, text), overrides)
    assert "\n" not in str(err.value)


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
