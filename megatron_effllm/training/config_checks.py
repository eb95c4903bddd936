"""How the run configuration is checked: each numeric field's range is declared in the schema
(``number(...)`` in ``config.py``) and enforced here, in one place, together with the type of
every key and the checks that involve several keys.

Every failure is a ``ConfigError`` (a UserError) with one line naming the key and the fix.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Union

from megatron_effllm.errors import UserError
from megatron_effllm.pruning.registry import ESTIMATORS, STRATEGIES


class ConfigError(UserError):
    pass


# The static blend indexes every training sample up front (megatron-core BlendedDataset: an int16
# dataset id and an int64 sample id; the GPTDataset under it: two int32 offsets and a uint32
# shuffle entry): at least 22 bytes a sample, in memory while it is built and on disk after.
INDEX_BYTES_PER_SAMPLE = 22
SAMPLE_INDEX_LIMIT_BYTES = 8 << 30


@dataclass(frozen=True)
class Range:
    """The values a numeric field accepts (always finite): ``ge``/``gt`` below, ``le``/``lt`` above."""
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def contains(self, value) -> bool:
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))

    def describe(self) -> str:
        low = ("[", self.ge) if self.ge is not None else ("(", self.gt) if self.gt is not None else None
        high = (self.le, "]") if self.le is not None else (self.lt, ")") if self.lt is not None else None
        if low and high:
            return f"in {low[0]}{low[1]}, {high[0]}{high[1]}"
        if low:
            return f"{'>=' if low[0] == '[' else '>'} {low[1]}"
        return f"{'<=' if high[1] == ']' else '<'} {high[0]}"


def number(default, *, ge=None, gt=None, le=None, lt=None):
    """A numeric config field with its accepted range (every numeric field declares one)."""
    return field(default=default, metadata={"range": Range(ge=ge, gt=gt, le=le, lt=lt)})


def show_value(value: Any, limit: int = 80) -> str:
    """repr of a user value for a one-line message (escapes newlines; long values cut)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def show_name(value: Any) -> str:
    """A key or path as written, or its repr when that would not stay on one line."""
    return value if isinstance(value, str) and value.isprintable() else show_value(value)


def _check_type(key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(key, value, arg)
            except ConfigError:
                continue
        names = " or ".join(getattr(a, "__name__", str(a)) for a in args)
        raise ConfigError(f"config key {key}: expected {names}, got {show_value(value)}")
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key {key}: expected true or false, got {show_value(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):  # YAML 1.1 reads 1e9 (no dot) as a string
            value = _parse_float(value, value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"config key {key}: expected an integer, got {show_value(value)}")
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            value = _parse_float(value, value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key {key}: expected a number, got {show_value(value)}")
        try:
            return float(value)
        except OverflowError:  # an integer with hundreds of digits
            raise ConfigError(f"config key {key}: {show_value(value, 20)} is too large for a number") from None
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key {key}: expected a string, got {show_value(value)}")
        return value
    if tp is list or origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key {key}: expected a list, got {show_value(value)}")
        item = (typing.get_args(tp) or (Any,))[0]
        return [_check_type(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key}: expected a mapping, got {show_value(value)}")
        return value
    raise ConfigError(f"config key {key}: unsupported type {tp}")


def _parse_float(text: str, fallback):
    try:
        return float(text)
    except ValueError:
        return fallback


def _check_range(key: str, value, rng: Range) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"config key {key} must be a finite number {rng.describe()}, got {value}")
    if not rng.contains(value):
        raise ConfigError(f"config key {key} must be {rng.describe()}, got {value}")


def build(cls, data: Any, prefix: str, choices: dict):
    """An instance of the config dataclass ``cls`` from a parsed YAML mapping: every key known,
    of its declared type, inside its declared range (numbers) or choices."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section {prefix or 'top level'} must be a mapping, got {show_value(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; known keys: {', '.join(sorted(fields))}"
            raise ConfigError(f"unknown config key {prefix}{show_name(key)}{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = build(tp, {} if value is None else value, f"{full}.", choices)
            continue
        kwargs[key] = _check_type(full, value, tp)
        rng = fields[key].metadata.get("range")
        if rng is not None:
            _check_range(full, kwargs[key], rng)
        allowed = choices.get(full)
        if allowed and kwargs[key] not in allowed:
            raise ConfigError(f"config key {full}: {show_value(kwargs[key])} is not one of {', '.join(map(str, allowed))}")
    return cls(**kwargs)


def _check_number_map(key: str, mapping: dict, need_positive: bool = False) -> None:
    """A mapping domain -> finite number >= 0 (data.weights, data.reference_losses)."""
    for dom, val in mapping.items():
        if isinstance(val, bool) or not isinstance(val, (int, float)) or not math.isfinite(val) or val < 0:
            raise ConfigError(f"{key}.{show_name(dom)} must be a finite number >= 0, got {show_value(val)}")
    if need_positive and mapping and not any(v > 0 for v in mapping.values()):
        raise ConfigError(f"{key}: every weight is 0; give at least one domain a positive weight")


def _check_sample_index(cfg) -> None:
    """The static blend indexes train.steps x data.global_batch samples before the first step:
    refuse a run whose index would not fit, instead of allocating it."""
    d, t = cfg.data, cfg.train
    samples = t.steps * d.global_batch
    need = samples * INDEX_BYTES_PER_SAMPLE
    if d.dynamic or need <= SAMPLE_INDEX_LIMIT_BYTES:
        return
    raise ConfigError(
        f"train.steps {t.steps} x data.global_batch {d.global_batch} = {samples:,} training samples need a "
        f"sample index of {need // 10**9:,} GB ({INDEX_BYTES_PER_SAMPLE} bytes a sample), above the "
        f"{SAMPLE_INDEX_LIMIT_BYTES >> 30} GiB limit (at most "
        f"{SAMPLE_INDEX_LIMIT_BYTES // INDEX_BYTES_PER_SAMPLE:,} samples); lower train.steps"
    )


def _check_sequence_parallel(cfg) -> None:
    """Sequence parallelism splits each sequence over the TP ranks; layouts it cannot serve."""
    par, seq = cfg.parallel, cfg.data.seq_len
    if par.tp < 2:
        raise ConfigError("parallel.sequence_parallel: true needs parallel.tp >= 2 (it splits the sequence over the "
                          "tensor-parallel ranks); raise parallel.tp or set it to false")
    if seq % par.tp:
        raise ConfigError(f"parallel.sequence_parallel: data.seq_len {seq} is not divisible by parallel.tp "
                          f"{par.tp}; choose a multiple of {par.tp} or set sequence_parallel to false")
    if par.pp > 1:
        raise ConfigError(f"parallel.sequence_parallel: true with parallel.pp={par.pp} is not supported (the "
                          "pipeline sends whole sequences between stages); set one of them off")
    if STRATEGIES.get(cfg.prune.strategy).runtime == "l0":
        raise ConfigError(f"parallel.sequence_parallel: true with prune.strategy {cfg.prune.strategy} is not "
                          "supported (the L0 gates' gradients assume whole sequences); set it to false")


def _check_cluster_knobs(cfg) -> None:
    """Precision and speed settings that the engine or the model cannot honour together."""
    m, par = cfg.model, cfg.parallel
    if par.sequence_parallel:
        _check_sequence_parallel(cfg)
    if m.dtype == "bf16" and m.fp32_grad_accum and par.zero_stage == 0:
        raise ConfigError("model.fp32_grad_accum: true with model.dtype bf16 needs parallel.zero_stage 1, 2 or 3 "
                          "(DeepSpeed has no fp32 accumulation without ZeRO); raise the stage or set it to false")
    if m.recompute == "full" and par.pp > 1:
        raise ConfigError(f"model.recompute: full with parallel.pp={par.pp}: the pipeline schedule takes each "
                          "stage's gradients from autograd, which recomputed layers bypass; use selective or none")
    if m.recompute == "full" and STRATEGIES.get(cfg.prune.strategy).runtime == "l0":
        raise ConfigError(f"model.recompute: full with prune.strategy {cfg.prune.strategy}: the L0 gates' "
                          "gradients would be taken inside the recomputed layers; use selective or none")


def validate(cfg) -> None:
    """Checks that involve several keys, or values no field type can express."""
    p, d, t, o = cfg.prune, cfg.data, cfg.train, cfg.optim
    _check_cluster_knobs(cfg)
    if not cfg.run_dir.strip() or "\0" in cfg.run_dir:
        raise ConfigError(f"run_dir {cfg.run_dir!r} is not a folder name; set run_dir (e.g. runs/my_run)")
    if o.min_lr > o.lr:
        raise ConfigError(f"optim.min_lr {o.min_lr} is above optim.lr {o.lr}; lower optim.min_lr")
    if d.global_batch % d.micro_batch:
        raise ConfigError(
            f"data.global_batch {d.global_batch} must be a multiple of data.micro_batch {d.micro_batch}"
        )
    _check_sample_index(cfg)
    if STRATEGIES.get(p.strategy).runtime == "saliency" and not ESTIMATORS.get(p.estimator).in_training:
        raise ConfigError(
            f"prune.estimator {p.estimator!r} works in one-shot pruning only (effllm-prune-oneshot); "
            f"during training use one of {', '.join(ESTIMATORS.names(in_training=True))}"
        )
    _check_cost(p)
    if p.strategy != "none":
        if not p.start_step < p.end_step:
            raise ConfigError(f"prune.start_step {p.start_step} must be below prune.end_step {p.end_step}")
        if p.end_step > t.steps:
            raise ConfigError(
                f"prune.end_step {p.end_step} is after the last step train.steps {t.steps}; "
                "lower prune.end_step or raise train.steps"
            )
    if d.weights is not None:
        _check_number_map("data.weights", d.weights, need_positive=True)
    ref = d.reference_losses
    if isinstance(ref, str) and ref != "source":
        raise ConfigError(f"data.reference_losses must be 'source' or a mapping domain -> loss, got {show_value(ref)}")
    if isinstance(ref, dict):
        _check_number_map("data.reference_losses", ref)
    if not cfg.model.source and not cfg.model.init:
        raise ConfigError("set model.source (HF folder, .gguf or smollm2-135m) or model.init (random init)")
    _check_distill(cfg)
    _check_snapshots(cfg)
    if cfg.resume not in ("auto", "none", "fresh") and not os.path.isdir(cfg.resume):
        raise ConfigError(f"resume: {show_name(cfg.resume)} is not a checkpoint folder; "
                          "use auto, none, fresh or a path")


def _check_cost(p) -> None:
    if p.cost != "latency":
        if p.latency_table:
            raise ConfigError(f"prune.latency_table is set but prune.cost is {p.cost}; set prune.cost: latency "
                              "or drop the table")
        return
    if STRATEGIES.get(p.strategy).selector != "global":
        raise ConfigError(f"prune.cost: latency ranks units globally; prune.strategy {p.strategy} has no global "
                          f"ranking; use one of {', '.join(s.name for s in STRATEGIES if s.selector == 'global')}")
    if not p.latency_table or not os.path.isfile(p.latency_table):
        raise ConfigError(f"prune.cost: latency needs prune.latency_table, a file measured with python -m "
                          f"megatron_effllm.pruning.latency --model SOURCE --out PATH (got {show_name(p.latency_table)!s})")


def _check_distill(cfg) -> None:
    k = cfg.distill
    if not k.alpha:
        return
    if k.topk and cfg.parallel.pp > 1:
        raise ConfigError(f"distill.topk {k.topk} with parallel.pp {cfg.parallel.pp}: the teacher cache is read "
                          "at pp 1 only; set distill.topk: 0 (online) or parallel.pp: 1")
    if k.teacher != "source" and not os.path.exists(k.teacher) and k.teacher != "smollm2-135m":
        raise ConfigError(f"distill.teacher {show_value(k.teacher)} not found; give source, an HF model "
                          "folder, a .gguf, a megatron checkpoint folder or smollm2-135m")


def _check_snapshots(cfg) -> None:
    """export.snapshots: distinct fractions in (0, 1) the run can reach; kept largest first."""
    fractions, p = cfg.export.snapshots, cfg.prune
    for f in fractions:
        if not (math.isfinite(f) and 0 < f < 1):
            raise ConfigError(f"export.snapshots: {f} is not a fraction of the source's parameters in (0, 1); "
                              "write e.g. [0.75, 0.5]")
        if fractions.count(f) > 1:
            raise ConfigError(f"export.snapshots lists {f:g} twice; give each fraction once")
    if fractions and p.strategy == "none":
        raise ConfigError("export.snapshots with prune.strategy none: the model never shrinks, so no snapshot "
                          "would be written; choose a pruning strategy or drop export.snapshots")
    if p.target_params <= 1 and p.count_embeddings and fractions and min(fractions) < p.target_params:
        raise ConfigError(f"export.snapshots: {min(fractions):g} is below prune.target_params {p.target_params:g}, "
                          "so the run never reaches it; drop it or lower prune.target_params")
    cfg.export.snapshots = sorted(fractions, reverse=True)
