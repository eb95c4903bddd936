"""What the training loop iterates: micro-batches of the resolved data settings
(``data.prepare.prepare_data``).

    args = prepare_data(cfg.data, tokenizer="smollm2-135m", out_dir=f"{run_dir}/data",
                        seed=cfg.seed, train_samples=cfg.train.steps * cfg.data.global_batch)
    it = make_train_iterator(args, dp_rank, dp_size, micro_batch, global_batch,
                             start_state=checkpoint.get("data"))
    batch = next(it)          # this rank's next micro-batch
    ...
    checkpoint["data"] = it.state_dict()     # at a step boundary
    if it.sampler is not None and it.sampler.update_due:
        it.update_domain_weights(heldout_losses)  # dynamic batch loading, same losses on all ranks

A micro-batch is megatron's dict form, every tensor on the CPU:
    tokens       [micro_batch, seq_len] int64   input ids
    labels       [micro_batch, seq_len] int64   next-token targets (tokens shifted by one)
    loss_mask    [micro_batch, seq_len] float32 1 where the label counts
    position_ids [micro_batch, seq_len] int64
    domain_id    [micro_batch]          int64   index into args.domains

Each global batch is ``global_batch`` samples; data-parallel rank r reads, for accumulation
step k, the samples ``[k*micro_batch*dp_size + r*micro_batch, ... + micro_batch)`` of it, so
the ranks never overlap and together read exactly the global batch (megatron's layout). The
sample order depends only on the seed, never on dp_size: a checkpoint resumes at another DP
size as long as the global batch stays the same. Nothing here needs a process group.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch

from megatron_effllm.data import blend
from megatron_effllm.data.dynamic_batch import DynamicBatchSampler
from megatron_effllm.errors import UserError

BLENDED_STATE_KIND = "blended/1"
BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")
_HELDOUT_CACHE: dict = {}


@dataclass
class DataArgs:
    """Resolved data settings: every domain is an indexed prefix (PREFIX.bin/.idx)."""

    train: dict                       # domain -> prefix
    heldout: Optional[dict] = None    # domain -> prefix of held-out data (else carved by `split`)
    weights: Optional[dict] = None    # domain -> initial weight (default: equal)
    seq_len: int = 256
    seed: int = 1234
    cache_dir: Optional[str] = None   # megatron-core index cache (put it in the run folder)
    split: str = "98,2,0"             # train/valid/test by documents, used without `heldout`
    train_samples: Optional[int] = None  # static blend: samples to index (steps * global batch)
    eod_mask_loss: bool = False
    dynamic: bool = False             # Sheared-LLaMA dynamic batch loading
    dynamic_interval: int = 50
    dynamic_eta: float = 1.0
    dynamic_smoothing: float = 1e-4
    dynamic_signed: bool = False
    reference_losses: Optional[dict] = None  # domain -> reference loss (dynamic)
    eod_id: Optional[int] = None      # only for prefixes without .meta.json
    vocab_size: Optional[int] = None

    @property
    def domains(self) -> list:
        return list(self.train)


_FIELDS = {f for f in DataArgs.__dataclass_fields__}


def coerce_args(args: Any) -> DataArgs:
    """A DataArgs from a DataArgs, a mapping, or any object with DataArgs' attribute names."""
    if isinstance(args, DataArgs):
        return args
    if isinstance(args, Mapping):
        values = {k: v for k, v in args.items() if k in _FIELDS}
    else:
        values = {k: getattr(args, k) for k in _FIELDS if hasattr(args, k)}
    if "train" not in values or not isinstance(values["train"], Mapping):
        raise UserError("data settings need `train` as a mapping domain -> indexed prefix; "
                        "resolve raw inputs with prepare_data first")
    return DataArgs(**values)


def _weights_list(args: DataArgs) -> list:
    if args.weights is None:
        return [1.0] * len(args.train)
    missing = [d for d in args.train if d not in args.weights]
    extra = [str(d) for d in args.weights if d not in args.train]
    if missing or extra:
        detail = (f"; missing {', '.join(missing)}" if missing else "") + \
            (f"; unknown {', '.join(extra)}" if extra else "")
        raise UserError(f"data.weights must name exactly the training domains "
                        f"{', '.join(args.train)}{detail}")
    return [float(args.weights[d]) for d in args.train]


def _tokens(args: DataArgs) -> blend.TokenInfo:
    prefixes = dict(args.train)
    prefixes.update({f"{d} (held-out)": p for d, p in (args.heldout or {}).items()})
    return blend.token_info_for(prefixes, args.eod_id, args.vocab_size)


def _collate(samples: list, domain_ids: list) -> dict:
    batch = {k: torch.stack([s[k] for s in samples]) for k in BATCH_KEYS}
    batch["domain_id"] = torch.tensor(domain_ids, dtype=torch.long)
    return batch


class _BlendedSource:
    """Static mixture: consecutive global batches of megatron-core's BlendedDataset."""

    def __init__(self, dataset, global_batch: int):
        self.dataset = dataset
        self.global_batch = global_batch
        self.step = 0
        self.sampler = None

    def next_global_batch(self) -> list:
        n = len(self.dataset)
        start = self.step * self.global_batch
        self.step += 1
        # Past the indexed length, wrap around (megatron sizes it to the run's sample count).
        return [(None, (start + j) % n) for j in range(self.global_batch)]

    def fetch(self, ref) -> tuple:
        sample = self.dataset[ref[1]]
        return sample, int(sample["dataset_id"])

    def state_dict(self) -> dict:
        return {"kind": BLENDED_STATE_KIND, "step": self.step, "global_batch": self.global_batch,
                "size": len(self.dataset)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != BLENDED_STATE_KIND:
            raise UserError(f"checkpoint data state is {state.get('kind')!r}, not a static blend's; "
                            "resume with the data settings the run started with (data.dynamic)")
        if state["global_batch"] != self.global_batch:
            raise UserError(f"checkpoint used global batch {state['global_batch']}, this run "
                            f"{self.global_batch}; resume with the same global batch")
        self.step = int(state["step"])


class _DynamicSource:
    """Adaptive mixture: the dynamic batch sampler over one GPTDataset per domain."""

    def __init__(self, datasets: list, sampler: DynamicBatchSampler):
        self.datasets = datasets
        self.sampler = sampler

    def next_global_batch(self) -> list:
        return self.sampler.next_global_batch()

    def fetch(self, ref) -> tuple:
        return self.datasets[ref[0]][ref[1]], ref[0]

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


class TrainDataIterator:
    """This rank's micro-batches, global batch after global batch (see the module docstring)."""

    def __init__(self, source, domains: Sequence[str], dp_rank: int, dp_size: int,
                 micro_batch: int, global_batch: int, start_state: Optional[dict] = None):
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise UserError(f"data-parallel rank {dp_rank} must be in [0, {dp_size})")
        if micro_batch < 1 or global_batch % (micro_batch * dp_size):
            raise UserError(f"global batch {global_batch} must be a positive multiple of "
                            f"micro_batch {micro_batch} x data-parallel size {dp_size}")
        self.source = source
        self.domains = list(domains)
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.micro_batch, self.global_batch = micro_batch, global_batch
        self.accumulation_steps = global_batch // (micro_batch * dp_size)
        self._refs: list = []        # this rank's sample refs of the current global batch
        self._micro = 0              # micro-batches of it already returned
        self._state_before: Optional[dict] = None  # source state before the current batch
        self.last_sample_refs: list = []
        if start_state is not None:
            self.load_state_dict(start_state)

    @property
    def sampler(self) -> Optional[DynamicBatchSampler]:
        """The dynamic batch sampler (None for a static blend)."""
        return self.source.sampler

    def __iter__(self):
        return self

    def _draw(self) -> None:
        self._state_before = self.source.state_dict()
        refs = self.source.next_global_batch()
        mb, dp, r = self.micro_batch, self.dp_size, self.dp_rank
        self._refs = [refs[k * mb * dp + r * mb: k * mb * dp + (r + 1) * mb]
                      for k in range(self.accumulation_steps)]
        self._micro = 0

    def __next__(self) -> dict:
        if not self._refs or self._micro == self.accumulation_steps:
            self._draw()
        refs = self._refs[self._micro]
        self._micro += 1
        fetched = [self.source.fetch(r) for r in refs]
        self.last_sample_refs = refs
        return _collate([s for s, _ in fetched], [d for _, d in fetched])

    def next_global_batch(self) -> list:
        """All ``accumulation_steps`` micro-batches of this rank for the next step."""
        if not self.at_step_boundary:
            raise RuntimeError("next_global_batch called in the middle of a global batch")
        return [next(self) for _ in range(self.accumulation_steps)]

    @property
    def at_step_boundary(self) -> bool:
        return not self._refs or self._micro == self.accumulation_steps

    def state_dict(self) -> dict:
        """Where the data stream stands; identical on every DP rank at a step boundary."""
        if self.at_step_boundary:
            return {"source": self.source.state_dict(), "micro": 0}
        return {"source": self._state_before, "micro": self._micro}

    def load_state_dict(self, state: dict) -> None:
        self.source.load_state_dict(state["source"])
        self._refs, self._micro = [], 0
        skip = int(state.get("micro", 0))
        if skip:  # saved inside a global batch: redraw it and skip what was already read
            if skip >= self.accumulation_steps:
                raise UserError("checkpoint data state was saved inside a global batch with more "
                                "accumulation steps than this run has; resume with the same batch "
                                "sizes and data-parallel size")
            self._draw()
            self._micro = skip

    def update_domain_weights(self, losses) -> dict:
        """Dynamic batch loading: new domain weights from each domain's held-out loss."""
        if self.sampler is None:
            raise UserError("domain weights are fixed in a static blend; set data.dynamic to "
                            "use dynamic batch loading")
        if not self.at_step_boundary:
            raise RuntimeError("update the domain weights between steps, not inside a global batch")
        return self.sampler.update(losses)


def make_train_iterator(args, dp_rank: int, dp_size: int, micro_batch: int, global_batch: int,
                        start_state: Optional[dict] = None) -> TrainDataIterator:
    """This rank's training micro-batches (megatron dict form; see the module docstring).

    ``args``: a ``DataArgs`` (or anything with its attribute names). Static blend
    (``dynamic=False``): megatron-core's ``BlendedDataset`` over the training prefixes with
    ``weights``, indexed for ``train_samples`` samples. Dynamic: one ``GPTDataset`` epoch per
    domain, mixed by ``DynamicBatchSampler``. ``start_state``: an earlier ``state_dict()``.
    Every process must call this (megatron-core synchronises index building over the default
    process group when torch.distributed is initialised).
    """
    args = coerce_args(args)
    tokens = _tokens(args)
    weights = _weights_list(args)
    domains = args.domains
    if args.dynamic:
        split = "100,0,0" if args.heldout else args.split
        built = blend.build_domain_datasets(args.train, args.seq_len, args.seed, args.cache_dir,
                                            split=split, tokens=tokens,
                                            eod_mask_loss=args.eod_mask_loss)
        datasets = [built[d][0] for d in domains]
        sampler = DynamicBatchSampler(
            domains, [len(ds) for ds in datasets], weights, global_batch, args.seed,
            update_interval=args.dynamic_interval, eta=args.dynamic_eta,
            smoothing=args.dynamic_smoothing, signed=args.dynamic_signed,
            reference_losses=args.reference_losses)
        source = _DynamicSource(datasets, sampler)
    else:
        n = args.train_samples
        if n is None:  # one pass over the training tokens
            info = blend.describe(args.train)
            n = max(global_batch, sum(v["tokens"] for v in info.values()) // args.seq_len)
        # Only the training split is read here (held-out batches: heldout_datasets), so the
        # others get no samples: a weighted blend must be told every split's size.
        train, _, _ = blend.build_blended_datasets(
            args.train, weights, args.seq_len, args.seed, args.cache_dir,
            num_samples=(int(n), 0, 0), valid=args.heldout, split=args.split,
            tokens=tokens, eod_mask_loss=args.eod_mask_loss)
        source = _BlendedSource(train, global_batch)
    return TrainDataIterator(source, domains, dp_rank, dp_size, micro_batch, global_batch,
                             start_state)


def heldout_datasets(args) -> dict:
    """{domain: megatron-core GPTDataset} of held-out samples (one epoch each).

    From ``args.heldout`` when given (whole files), else the valid part of ``args.split`` of
    each training prefix.
    """
    args = coerce_args(args)
    tokens = _tokens(args)
    if args.heldout:
        built = blend.build_domain_datasets(args.heldout, args.seq_len, args.seed, args.cache_dir,
                                            split="0,1,0", tokens=tokens,
                                            eod_mask_loss=args.eod_mask_loss)
    else:
        built = blend.build_domain_datasets(args.train, args.seq_len, args.seed, args.cache_dir,
                                            split=args.split, tokens=tokens,
                                            eod_mask_loss=args.eod_mask_loss)
    out = {}
    for d, splits in built.items():
        if splits[1] is None:
            raise UserError(f"no held-out data for domain {d}: give data.heldout or a split with a "
                            "valid part (e.g. 98,2,0)")
        out[d] = splits[1]
    return out


def make_heldout_batches(args, num_batches: int, micro_batch: int, dp_rank: int = 0,
                         dp_size: int = 1) -> dict:
    """{domain: [micro-batch, ...]}: fixed held-out batches for measuring each domain's loss.

    The same samples every call (the first ``num_batches * micro_batch`` of the held-out set,
    fewer if it is smaller); the latest result is kept, so repeated calls cost nothing. Treat
    the returned tensors as read-only. With dp_size > 1, batch b goes to rank b % dp_size, so the ranks
    share the work; average the losses over ranks weighted by ``loss_mask.sum()``.
    """
    if num_batches < 1 or micro_batch < 1:
        raise UserError("held-out batches: num_batches and micro_batch must be >= 1")
    args = coerce_args(args)
    # Evaluated every few steps: keep the latest batches instead of rebuilding the datasets.
    key = (json.dumps(dataclasses.asdict(args), sort_keys=True, default=str), num_batches,
           micro_batch, dp_rank, dp_size)
    if key in _HELDOUT_CACHE:
        return _HELDOUT_CACHE[key]
    domains = args.domains
    out = {}
    for d, ds in heldout_datasets(args).items():
        did = domains.index(d) if d in domains else -1
        n = min(len(ds), num_batches * micro_batch)
        batches = []
        for b, start in enumerate(range(0, n, micro_batch)):
            if b % dp_size != dp_rank:
                continue
            idx = range(start, min(start + micro_batch, n))
            batches.append(_collate([ds[i] for i in idx], [did] * len(idx)))
        out[d] = batches
    _HELDOUT_CACHE.clear()
    _HELDOUT_CACHE[key] = out
    return out
