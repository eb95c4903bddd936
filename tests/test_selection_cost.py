"""Kernel-friendly widths and the latency cost of the global selector; the latency table; config keys."""
import json

import pytest
import torch

from megatron_effllm.architecture import Architecture
from megatron_effllm.cli import prune_oneshot
from megatron_effllm.errors import UserError
from megatron_effllm.pruning.groups import PruningError
from megatron_effllm.pruning.latency import LatencyTable, from_timings, variants
from megatron_effllm.pruning.saliency import GroupScores
from megatron_effllm.pruning.selection import Constraints
from megatron_effllm.pruning.selectors.global_ranking import select_global
from megatron_effllm.training.config import load_config
from megatron_effllm.training.config_checks import ConfigError
from megatron_effllm.training.runtime.schedule import Schedule
from test_pruning_oneshot import tiny_folder  # noqa: F401  (a fixture)

T = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
TABLE = LatencyTable(runtime="transformers", head=2e-5, kv=1e-5, ffn=1e-7, hidden=3e-6, layer=4e-4, total=0.02)


def arch_(layers=4, hidden=64, heads=8, kv=4, ffn=48, vocab=96, tie=True):
    return Architecture.uniform(num_layers=layers, hidden_size=hidden, num_heads=heads, num_kv_groups=kv,
                                ffn_hidden_size=ffn, vocab_size=vocab, head_dim=8, tie_word_embeddings=tie,
                                qkv_bias=False, family="llama")


def random_scores(arch, seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda n: torch.rand(n, generator=g, dtype=torch.float64)  # noqa: E731
    L = arch.layers
    return GroupScores(arch, heads=[r(s.num_heads) for s in L], kv=[r(s.num_kv_groups) for s in L],
                       ffn=[r(s.ffn_hidden_size) for s in L], hidden=r(arch.hidden_size), layers=r(arch.num_layers))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("cost", ["params", "latency"])
@pytest.mark.parametrize("fm,hm,tp", [(16, 8, 1), (32, 16, 2), (12, 1, 2)])
def test_widths_are_multiples_and_the_target_is_met_within_one_block(seed, cost, fm, hm, tp):
    arch = arch_(ffn=96, tie=bool(seed % 2))
    c = Constraints(tensor_parallel=tp, ffn_multiple=fm, hidden_multiple=hm, min_ffn=8, allow_depth=seed == 2,
                    cost=cost, latency=TABLE)
    scores = random_scores(arch, seed)
    step = c.ffn_step
    for frac in (0.85, 0.6, 0.4):
        target = int(arch.num_params() * frac)
        plan = select_global(scores, target, c)
        a = plan.after
        got = a.num_params()
        # the last take is one unit; the largest are a layer and a block of hm hidden channels
        per_channel = arch.vocab_size * (1 if arch.tie_word_embeddings else 2) + 1 + sum(
            (2 * s.num_heads + 2 * s.num_kv_groups) * arch.head_dim + 3 * s.ffn_hidden_size + 2 for s in arch.layers)
        largest = max(max(arch.layer_params(s) for s in arch.layers), hm * per_channel)
        assert got <= target and target - got < largest, (got, target)
        assert a.hidden_size % hm == 0 and a.hidden_size >= hm
        for s in a.layers:
            assert s.ffn_hidden_size % step == 0 and s.ffn_hidden_size >= step, (s.ffn_hidden_size, step)
            assert s.num_heads % s.num_kv_groups == 0 and s.num_kv_groups % tp == 0


def test_marginal_blocks_decide_the_rounding():
    """FFN only, 2 layers of 12 channels, multiple 4, target 7 channels below the source.

    The fine ranking takes the seven 1s of layer 0 (12 -> 5); rounding up gives it back its
    best removed channels (5 -> 8; the count is 4 channels below the source, above the target);
    then the marginal blocks compete: layer 0's next four (1+1+1+50 = 53) against layer 1's
    lowest four (4 x 10 = 40): layer 1's go. Result (8, 8), 8 channels = 192 parameters removed.
    """
    arch = arch_(layers=2, hidden=8, heads=2, kv=1, ffn=12, vocab=16)
    s = GroupScores(arch, ffn=[T([1, 1, 1, 1, 1, 1, 1, 50, 60, 61, 62, 63]),
                               T([10, 10, 10, 10, 70, 71, 72, 73, 74, 75, 76, 77])])
    n = arch.num_params()
    only_ffn = dict(prune_hidden=False, prune_heads=False, prune_kv=False)
    fine = select_global(s, n - 7 * 24, Constraints(**only_ffn))
    assert [l.ffn_hidden_size for l in fine.after.layers] == [5, 12]
    plan = select_global(s, n - 7 * 24, Constraints(ffn_multiple=4, **only_ffn))
    assert [l.ffn_hidden_size for l in plan.after.layers] == [8, 8]
    assert n - plan.after.num_params() == 8 * 24
    assert plan.ffn[0].tolist() == list(range(4, 12)) and plan.ffn[1].tolist() == list(range(4, 12))


def test_latency_cost_changes_the_ranking_as_computed_by_hand():
    """One layer, 2 heads (1 KV group), FFN 4, hidden 8: a head unit is 2*8*8 = 128 parameters,
    an FFN channel 3*8 = 24. Per parameter the weakest head (1/128 = 0.0078) goes before the
    weakest FFN channel (0.3/24 = 0.0125); per second with head 1e-5 s and FFN channel 1e-3 s the
    channel (0.3/1e-3 = 300) goes before the head (1/1e-5 = 1e5)."""
    arch = arch_(layers=1, hidden=8, heads=2, kv=1, ffn=4, vocab=16)
    s = GroupScores(arch, heads=[T([5.0, 1.0])], ffn=[T([2.0, 0.3, 2.0, 2.0])])
    lat = LatencyTable(runtime="transformers", head=1e-5, kv=0.0, ffn=1e-3, hidden=0.0, layer=0.0, total=1.0)
    base = dict(prune_hidden=False, prune_kv=False)
    target = arch.num_params() - 24
    by_params = select_global(s, target, Constraints(**base))
    assert by_params.heads[0].tolist() == [0] and by_params.ffn[0].tolist() == [0, 1, 2, 3]
    by_latency = select_global(s, target, Constraints(cost="latency", latency=lat, **base))
    assert by_latency.heads[0].tolist() == [0, 1] and by_latency.ffn[0].tolist() == [0, 2, 3]
    assert by_latency.after.num_params() == target  # the target stays parameters


def test_latency_table_from_timings_is_differences_over_units():
    arch = arch_(layers=4, hidden=64, heads=6, kv=2, ffn=48, vocab=96)  # 3 heads per group
    v = variants(arch)
    assert v["ffn"]["ffn"] == 24 and v["head"]["heads"] == 4 and v["kv"] == {**v["base"], "kv": 1, "heads": 3}
    assert v["hidden"]["hidden"] == 32 and v["layer"]["layers"] == 2
    t = {"base": 1.0, "ffn": 1.0 - 4 * 24 * 1e-4, "head": 1.0 - 4 * 2 * 1e-3, "kv": 1.0 - 4 * 1 * (2e-3 + 3 * 1e-3),
         "hidden": 1.0 - 32 * 5e-4, "layer": 1.0 - 2 * (0.01 + 6 * 1e-3 + 2 * 2e-3 + 48 * 1e-4)}
    table = from_timings(arch, t)
    for kind, want in (("ffn", 1e-4), ("head", 1e-3), ("kv", 2e-3), ("hidden", 5e-4), ("layer", 0.01)):
        assert getattr(table, kind) == pytest.approx(want, rel=1e-9), kind
    with pytest.raises(UserError, match="the model with smaller ffn widths was not faster .* too busy to measure"):
        from_timings(arch, {**t, "ffn": 1.1})


def test_latency_table_round_trip_and_bad_files(tmp_path):
    path = str(tmp_path / "t.json")
    TABLE.save(path)
    assert LatencyTable.load(path) == TABLE
    with pytest.raises(UserError, match="does not exist; measure one"):
        LatencyTable.load(str(tmp_path / "none.json"))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(UserError, match="is not readable JSON"):
        LatencyTable.load(str(tmp_path / "bad.json"))
    (tmp_path / "short.json").write_text(json.dumps({"runtime": "x", "head": 1}))
    with pytest.raises(UserError, match=r"lacks \['ffn', 'hidden', 'kv', 'layer', 'total'\]"):
        LatencyTable.load(str(tmp_path / "short.json"))
    (tmp_path / "neg.json").write_text(json.dumps({**json.loads(open(path).read()), "ffn": -1}))
    with pytest.raises(UserError, match="ffn must be a finite number >= 0"):
        LatencyTable.load(str(tmp_path / "neg.json"))
    with pytest.raises(PruningError, match="cost latency needs a latency table"):
        select_global(random_scores(arch_(), 0), 1000, Constraints(cost="latency"))
    with pytest.raises(PruningError, match="cost 'flops' is not one of params, latency"):
        select_global(random_scores(arch_(), 0), 1000, Constraints(cost="flops"))


def cfg_(*overrides):
    return load_config("configs/tiny_cpu.yaml", ["run_dir=/tmp/x", *overrides])


def test_config_keys_reach_the_selector(tmp_path):
    path = str(tmp_path / "lat.json")
    TABLE.save(path)
    cfg = cfg_("prune.width_multiple.ffn=32", "prune.width_multiple.hidden=16", "prune.cost=latency",
               f"prune.latency_table={path}")
    arch = arch_(ffn=96)
    c = Schedule(cfg, arch, arch.num_params()).constraints()
    assert (c.ffn_multiple, c.hidden_multiple, c.cost, c.latency) == (32, 16, "latency", TABLE)


@pytest.mark.parametrize("overrides,message", [
    (["prune.width_multiple.ffn=0"], "config key prune.width_multiple.ffn must be >= 1, got 0"),
    (["prune.width_multiple.heads=2"], "unknown config key prune.width_multiple.heads"),
    (["prune.cost=flops"], "config key prune.cost: 'flops' is not one of params, latency"),
    (["prune.cost=latency"], "prune.cost: latency needs prune.latency_table"),
    (["prune.cost=latency", "prune.latency_table=/nonexistent.json"], "prune.cost: latency needs prune.latency_table"),
    (["prune.latency_table=/x.json"], "prune.latency_table is set but prune.cost is params"),
    (["prune.cost=latency", "prune.strategy=uniform"], "prune.strategy uniform has no global ranking"),
])
def test_config_errors_are_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        cfg_(*overrides)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("argv,message", [
    (["--latency-table", "t.json"], "--latency-table is only read with --cost latency"),
    (["--cost", "latency", "--strategy", "uniform"], "--strategy uniform has no global ranking"),
])
def test_oneshot_cli_errors(argv, message):
    args = prune_oneshot.parse_args(["--model", "m", "--target-params", "0.5", "--out", "o", *argv])
    with pytest.raises(UserError, match=message):
        prune_oneshot.check_args(args)


def test_oneshot_cli_rounds_widths_and_stores_the_table(tiny_folder, tmp_path, capsys):
    root, arch, _, _, files = tiny_folder  # hidden 48, FFN 24
    table = str(tmp_path / "lat.json")
    TABLE.save(table)
    out = tmp_path / "pruned"
    prune_oneshot.main(["--model", str(root / "model"), "--target-params", "0.6", "--out", str(out), "--calib", *files,
                        "--calib-tokens", "256", "--seq-len", "32", "--ffn-multiple", "8", "--hidden-multiple", "16",
                        "--cost", "latency", "--latency-table", table, "--dtype", "float32"])
    from megatron_effllm.convert import hf_io

    got = hf_io.load_hf_model(str(out)).arch
    assert got.num_params() <= int(round(0.6 * arch.num_params()))
    assert got.hidden_size % 16 == 0 and all(s.ffn_hidden_size % 8 == 0 for s in got.layers)
    assert LatencyTable.load(str(out / "latency_table.json")) == TABLE
