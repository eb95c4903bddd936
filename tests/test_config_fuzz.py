"""Property-based checks of configuration validation.

Every config key, walked from the schema (a new key is covered without touching this file), is
set to wrong types, NaN, infinities, negatives, zero, huge values, strings, lists and mappings,
in the YAML file and as a command-line override. Each configuration either validates or stops
with one line (a UserError), never another exception; one that validates holds only finite
numbers inside the ranges the schema declares, and reloads unchanged from its saved copy.
Validation only (no model, no data): the whole file takes a few seconds.
"""
import dataclasses
import gzip
import math
import typing

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megatron_effllm.errors import UserError
from megatron_effllm.training.config import RunConfig, load_config, save_config

BASE = {"model": {"source": "smollm2-135m"}}


def schema(cls=RunConfig, prefix=""):
    """(dotted key, type, dataclass field) of every section and leaf of the configuration."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key, tp = prefix + f.name, hints[f.name]
        yield key, tp, f
        if dataclasses.is_dataclass(tp):
            yield from schema(tp, key + ".")


KEYS = [key for key, _, _ in schema()]
NUMERIC = [(key, f) for key, tp, f in schema() if tp in (int, float)]

BAD_VALUES = [
    float("nan"), float("inf"), float("-inf"), -1, -0.5, -1e-300, 0, 0.0, 1, 0.5, 1.5, 3,
    10**9, 10**30, -10**30, 10**400, 2**32, 2**63, 1e308, -1e308, 5e-324,
    "", " ", "x", "1e9", "1e400", "nan", "-inf", "2001-02-30", "a\nb", "\x00",
    [], [1, 2], {}, {"a": 1}, {"a": float("nan")}, {"a": -1}, {"a": "b"}, None, True, False,
]
# override texts that are not the YAML dump of any value
RAW_TEXTS = [".nan", ".inf", "-.inf", "1e999", "NaN", "[", "{a: ", "'open", "!!int abc", "!!float x",
             "!!python/object/apply:os.system ['true']", "0x10", "1_000", "~", "1:20", "2001-02-30",
             "{a: {b: {c: .nan}}}"]


def _yaml_text(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=math.inf).removesuffix("\n...\n").strip()


def _tree_with(changes) -> dict:
    """BASE with each (dotted key, value) of ``changes`` set, sections created as needed."""
    tree = {"model": dict(BASE["model"])}
    for dotted, value in changes:
        node = tree
        *parents, leaf = dotted.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[leaf] = value
    return tree


def _check_valid(cfg, tmp_path=None) -> None:
    """What validation promises about a configuration it accepts (with ``tmp_path``: its saved
    copy loads back the same)."""
    for key, f in NUMERIC:
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        assert not isinstance(value, float) or math.isfinite(value), f"{key}={value!r} passed validation"
        rng = f.metadata.get("range")
        assert rng is None or rng.contains(value), f"{key}={value!r} passed outside {rng.describe()}"
    for key, mapping in (("data.weights", cfg.data.weights), ("data.reference_losses", cfg.data.reference_losses)):
        for dom, value in (mapping.items() if isinstance(mapping, dict) else ()):
            assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{key}.{dom}={value!r}"
            assert math.isfinite(value) and value >= 0, f"{key}.{dom}={value!r} passed validation"
    assert 0 <= cfg.seed < 2**32 and cfg.run_dir.strip()
    if tmp_path is not None:
        saved = tmp_path / "saved.yaml"
        save_config(cfg, str(saved))
        assert yaml.safe_dump(load_config(str(saved)).to_dict()) == yaml.safe_dump(cfg.to_dict())


def _load(tmp_path, tree=None, overrides=(), text=None, raw=None, round_trip=False):
    """load_config on overrides, after a file when given (a tree, YAML text or raw bytes; else
    only the model comes from an override): the config, or None after a one-line UserError.
    Any other exception fails the test."""
    path = None
    if tree is not None or text is not None or raw is not None:
        path = tmp_path / "run.yaml"
        path.write_bytes(raw if raw is not None else (text if text is not None else yaml.safe_dump(tree)).encode())
    else:
        overrides = ["model.source=smollm2-135m", *overrides]
    try:
        cfg = load_config(path and str(path), list(overrides))
    except UserError as err:
        msg = str(err)
        assert msg.strip() and "\n" not in msg and "\r" not in msg, repr(msg)
        return None
    _check_valid(cfg, tmp_path if round_trip else None)
    return cfg


@pytest.mark.parametrize("key", KEYS)
def test_every_key_with_every_bad_value(tmp_path, key):
    """Each value in the file and as an override of ``key``; each raw text as an override."""
    for value in BAD_VALUES:
        _load(tmp_path, tree=_tree_with([(key, value)]))
        _load(None, overrides=[f"{key}={_yaml_text(value)}"])
    for text in RAW_TEXTS:
        _load(None, overrides=[f"{key}={text}"])


def test_deep_nesting(tmp_path):
    """YAML nested past Python's recursion limit, in the file and as an override."""
    assert _load(tmp_path, text="a: " + "[" * 700) is None
    assert _load(tmp_path, overrides=["model.init=" + "[" * 700]) is None


def test_every_numeric_field_declares_a_range():
    """The schema states each number's range (one validator enforces it: build)."""
    missing = [key for key, f in NUMERIC if f.metadata.get("range") is None]
    assert NUMERIC and missing == []


def test_non_finite_numbers_are_refused(tmp_path):
    """The cases that passed before: one line naming the key, for every numeric field."""
    for key, f in NUMERIC:
        for text in (".nan", ".inf", "-.inf"):
            with pytest.raises(UserError, match=key.replace(".", r"\.")):
                load_config(None, ["model.source=smollm2-135m", f"{key}={text}"])


VALUES = st.one_of(
    st.sampled_from(BAD_VALUES),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-2**70, max_value=2**70),
    st.text(max_size=12),
    st.booleans(),
    st.none(),
    st.lists(st.one_of(st.integers(), st.floats(), st.text(max_size=4)), max_size=3),
    st.dictionaries(st.text(max_size=6), st.one_of(st.floats(), st.integers(), st.text(max_size=4)), max_size=3),
)
FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(changes=st.lists(st.tuples(st.sampled_from(KEYS), VALUES), min_size=1, max_size=4),
       as_override=st.lists(st.booleans(), min_size=4, max_size=4))
def test_random_combinations(tmp_path, changes, as_override):
    """Several keys at once, each in the file or as an override."""
    in_file = [c for c, o in zip(changes, as_override) if not o]
    overrides = [f"{k}={_yaml_text(v)}" for (k, v), o in zip(changes, as_override) if o]
    _load(tmp_path, tree=_tree_with(in_file), overrides=overrides, round_trip=True)


@FUZZ
@given(key=st.sampled_from(KEYS), text=st.text(max_size=20))
def test_random_override_text(tmp_path, key, text):
    _load(tmp_path, overrides=[f"{key}={text}"])


@settings(max_examples=80, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.one_of(st.binary(max_size=300), st.binary(max_size=300).map(gzip.compress),
                     st.text(max_size=200).map(str.encode)))
def test_random_config_files(tmp_path, raw):
    """Bytes as the config file (a binary or compressed file given by mistake)."""
    _load(tmp_path, raw=raw)
