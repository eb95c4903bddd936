"""The registries are the one vocabulary: config choices, CLI choices, README and dispatch read them."""
import os

import pytest
import torch

from megatron_effllm.errors import UserError
from megatron_effllm.pruning import oneshot
from megatron_effllm.pruning.estimators.base import NEEDS, Estimator, GradientEstimator, Statistics
from megatron_effllm.layout import canonical_shapes
from megatron_effllm.pruning.groups import PruningError
from megatron_effllm.pruning.registry import ESTIMATORS, SELECTORS, STRATEGIES, Registry, markdown_tables
from megatron_effllm.pruning.saliency import GradSaliency
from megatron_effllm.pruning.selectors.base import Selector
from megatron_effllm.pruning.strategies import RUNTIMES
from megatron_effllm.training import config
from megatron_effllm.training.config import ConfigError, load_config
from test_pruning_reference import tiny_arch

TOY = Registry("toy estimator", "my_estimators")  # its one module is written by a test
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = "model:\n  source: smollm2-135m\n"


def test_entries_are_complete():
    assert set(ESTIMATORS.names()) == {"taylor", "taylor_elem", "fisher", "mix", "magnitude", "activation", "obs"}
    assert ESTIMATORS.names(in_training=True) == ESTIMATORS.names(gradient=True)
    for e in ESTIMATORS:
        assert isinstance(e, Estimator) and e.description and "\n" not in e.description
        assert e.needs and set(e.needs) <= set(NEEDS)
        assert isinstance(e, GradientEstimator) == e.gradient
    assert set(SELECTORS.names()) == {"global", "uniform", "adaptive"}
    assert all(isinstance(s, Selector) and s.description for s in SELECTORS)
    assert STRATEGIES.names() == ("efficientllm", "uniform", "adapt", "sheared", "none")
    for s in STRATEGIES:
        assert s.runtime in RUNTIMES and s.description
        if s.runtime == "saliency" or s.oneshot:
            assert s.selector in SELECTORS  # every selector a strategy names exists
    assert STRATEGIES.get("adapt").oneshot and SELECTORS.get(STRATEGIES.get("adapt").selector).needs_layer_importance


def test_unknown_names_are_one_line_errors_listing_the_valid_ones():
    with pytest.raises(PruningError, match="unknown estimator 'fishr'; use one of fisher, mix, taylor") as err:
        ESTIMATORS.get("fishr")
    assert "\n" not in str(err.value)
    with pytest.raises(PruningError, match="does not score from gradients; use one of fisher, mix, taylor, taylor_elem"):
        GradSaliency(tiny_arch("llama"), ["activation"])
    with pytest.raises(UserError, match="runs only in training; one-shot strategies: efficientllm, uniform, adapt"):
        oneshot.OneShotOptions(target_params=1, strategy="sheared").check()


def test_readme_table_is_the_registry_rendering():
    with open(os.path.join(ROOT, "README.md")) as f:
        assert markdown_tables() in f.read()


def test_config_choices_come_from_the_registries(tmp_path):
    assert config.CHOICES["prune.strategy"] == STRATEGIES.names()
    assert config.CHOICES["prune.estimator"] == ESTIMATORS.names()
    path = tmp_path / "c.yaml"
    path.write_text(BASE)
    for est in ("activation", "obs", "magnitude"):
        with pytest.raises(ConfigError) as err:
            load_config(str(path), [f"prune.estimator={est}"])
        msg = str(err.value)
        assert "\n" not in msg and "during training use one of fisher, mix, taylor, taylor_elem" in msg, msg
    # an L0 or no-pruning run does not score: the estimator is not used, so not refused
    assert load_config(str(path), ["prune.estimator=obs", "prune.strategy=none"]).prune.estimator == "obs"
    for est in ESTIMATORS.names(in_training=True):
        assert load_config(str(path), [f"prune.estimator={est}"]).prune.estimator == est


def test_cli_choices_come_from_the_registries(capsys):
    from megatron_effllm.cli import prune_oneshot

    args = prune_oneshot.parse_args(["--model", "m", "--target-params", "0.5", "--out", "o", "--strategy", "adapt",
                                     "--estimator", "obs"])
    assert (args.strategy, args.estimator) == ("adapt", "obs")
    for bad in (["--strategy", "sheared"], ["--strategy", "adaptive"], ["--estimator", "fishr"]):
        with pytest.raises(SystemExit):
            prune_oneshot.parse_args(["--model", "m", "--target-params", "0.5", "--out", "o", *bad])
        assert "invalid choice" in capsys.readouterr().err


def test_an_estimator_is_one_module(tmp_path, monkeypatch):
    """A registry imports every module of its home package: a new file is all it takes."""
    pkg = tmp_path / "my_estimators"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "abs_w.py").write_text(
        "from megatron_effllm.pruning.estimators.base import GradientEstimator\n"
        "from test_pruning_registry import TOY\n\n\n"
        "@TOY.register\n"
        "class AbsWg(GradientEstimator):\n"
        "    name = 'abs_wg_twice'\n"
        "    description = 'twice abs(sum w*g)'\n"
        "    needs = ('wg',)\n\n"
        "    def combine(self, sums, count):\n"
        "        return 2 * sums['wg'].abs() / count\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert TOY.names() == ("abs_wg_twice",)
    est = TOY.get("abs_wg_twice")
    assert est.gradient and est.in_training
    # it combines GradSaliency's sums like the built-in ones
    arch = tiny_arch("llama")
    acc = GradSaliency(arch, ["taylor"])
    w = {n: torch.randn(s) for n, s in canonical_shapes(arch).items()}
    acc.update(w, {n: torch.randn_like(t) for n, t in w.items()}, count=2.0)
    n = float(acc.state["count"])
    assert torch.equal(est.combine({"wg": acc.state["wg.hidden"]}, n), 2 * acc.scores("taylor").hidden)


def test_estimators_say_what_they_miss():
    with pytest.raises(PruningError, match="estimator 'activation' needs activations statistics"):
        ESTIMATORS.get("activation").scores(Statistics(), tiny_arch("llama"), {})
