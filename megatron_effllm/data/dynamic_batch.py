"""Sheared-LLaMA dynamic batch loading (arXiv 2310.06694, section 2.2).

Every ``update_interval`` steps each domain's held-out loss l_i is compared with a reference
loss r_i (the source model's, or a scaling-law estimate for the target size):

    delta_i = max(l_i - r_i, 0)          (or l_i - r_i with signed=True)
    alpha   = softmax(log w + eta * delta)
    w'      = (1 - c) * alpha + c / k     (eta = 1, c = 1e-4 in the paper)

so domains that lag their reference get more of the next batches.

``DynamicBatchSampler`` turns the weights into global batches of (domain, sample) pairs:

- each sample's domain is drawn from the current weights with a generator seeded by
  (seed, step), so a batch depends only on the seed, the step and the sampler's state;
- each domain walks through its samples in a seeded permutation per epoch and keeps its
  position, so no sample repeats before that domain's epoch is complete;
- the whole global batch is computed identically on every data-parallel rank; each rank then
  reads only its own slice (see ``loader.TrainDataIterator``);
- ``state_dict()`` holds the weights, the per-domain positions and epochs, and the step (the
  random stream is a pure function of seed and step, so the step *is* the generator state):
  a run restored from it draws exactly the batches an uninterrupted run would have drawn.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping, Optional, Sequence, Union

import numpy

from megatron_effllm.errors import UserError

Floats = Union[Sequence[float], Mapping[str, float], numpy.ndarray]

STATE_KIND = "dynamic_batch/1"


def update_weights(weights: Sequence[float], losses: Sequence[float], reference: Sequence[float],
                   eta: float = 1.0, smoothing: float = 1e-4, signed: bool = False) -> numpy.ndarray:
    """One Sheared-LLaMA weight update (see the module docstring); returns the new weights."""
    w = numpy.asarray(weights, dtype=numpy.float64)
    l = numpy.asarray(losses, dtype=numpy.float64)
    r = numpy.asarray(reference, dtype=numpy.float64)
    if not (w.shape == l.shape == r.shape) or w.ndim != 1:
        raise UserError(f"dynamic batch update: {w.size} weights, {l.size} losses and {r.size} "
                        "reference losses must be one per domain")
    if not numpy.all(numpy.isfinite(l)) or not numpy.all(numpy.isfinite(r)):
        raise UserError(f"dynamic batch update: losses {l.tolist()} and references {r.tolist()} "
                        "must be finite")
    delta = l - r
    if not signed:
        delta = numpy.maximum(delta, 0.0)
    with numpy.errstate(divide="ignore"):
        logits = numpy.log(w) + eta * delta
    logits -= logits.max()
    alpha = numpy.exp(logits)
    alpha /= alpha.sum()
    k = w.size
    return (1.0 - smoothing) * alpha + smoothing / k


def measure_reference_losses(loss_fn: Callable[[str], float], domains: Sequence[str]) -> dict:
    """{domain: loss_fn(domain)} with a check that every value is a finite number.

    ``loss_fn`` evaluates the reference model (e.g. the unpruned source) on a domain's held-out
    batches; call it before training changes the model.
    """
    out = {}
    for d in domains:
        value = float(loss_fn(d))
        if not math.isfinite(value):
            raise UserError(f"reference loss of domain {d} is {value}; check the held-out data")
        out[d] = value
    return out


def _ordered(values: Floats, domains: Sequence[str], what: str) -> numpy.ndarray:
    if isinstance(values, Mapping):
        missing = [d for d in domains if d not in values]
        extra = [d for d in values if d not in domains]
        if missing or extra:
            raise UserError(f"{what} must name exactly the domains {', '.join(domains)}"
                            + (f"; missing {', '.join(missing)}" if missing else "")
                            + (f"; unknown {', '.join(map(str, extra))}" if extra else ""))
        values = [values[d] for d in domains]
    arr = numpy.asarray(values, dtype=numpy.float64)
    if arr.shape != (len(domains),):
        raise UserError(f"{what}: expected {len(domains)} values (one per domain), got {arr.size}")
    return arr


class DynamicBatchSampler:
    """Global batches of (domain index, sample index) drawn by adaptive domain weights."""

    def __init__(self, domains: Sequence[str], sizes: Sequence[int], weights: Optional[Floats],
                 global_batch: int, seed: int, update_interval: int = 0, eta: float = 1.0,
                 smoothing: float = 1e-4, signed: bool = False,
                 reference_losses: Optional[Floats] = None):
        self.domains = list(domains)
        self.sizes = [int(s) for s in sizes]
        if len(self.sizes) != len(self.domains) or not self.domains:
            raise UserError("the dynamic batch sampler needs one size per domain")
        for d, n in zip(self.domains, self.sizes):
            if n < 1:
                raise UserError(f"domain {d} has no training samples; add data or lower seq_len")
        if global_batch < 1:
            raise UserError(f"global batch must be >= 1, got {global_batch}")
        self.global_batch = int(global_batch)
        self.seed = int(seed)
        self.update_interval = int(update_interval)
        self.eta = float(eta)
        self.smoothing = float(smoothing)
        self.signed = bool(signed)
        k = len(self.domains)
        w = numpy.full(k, 1.0 / k) if weights is None else _ordered(weights, self.domains, "weights")
        if numpy.any(w < 0) or not w.sum() > 0 or not numpy.all(numpy.isfinite(w)):
            raise UserError("domain weights must be non-negative with a positive sum, "
                            f"got {w.tolist()}")
        self.weights = w / w.sum()
        self.reference = None
        if reference_losses is not None:
            self.set_reference_losses(reference_losses)
        self.step = 0
        self.positions = [0] * k
        self.epochs = [0] * k
        self.history: list[dict] = []
        self._perm_cache: dict[int, tuple[int, numpy.ndarray]] = {}

    # --- weights ---
    def set_reference_losses(self, reference: Floats) -> None:
        r = _ordered(reference, self.domains, "reference losses")
        if not numpy.all(numpy.isfinite(r)):
            raise UserError(f"reference losses must be finite, got {r.tolist()}")
        self.reference = r

    @property
    def update_due(self) -> bool:
        """True after every ``update_interval``-th global batch (never with interval 0)."""
        return self.update_interval > 0 and self.step > 0 and self.step % self.update_interval == 0

    def update(self, losses: Floats) -> dict:
        """Apply one weight update from each domain's held-out loss; returns {domain: weight}.

        Every data-parallel rank must pass the same losses (reduce them first) so that the
        ranks keep identical samplers.
        """
        if self.reference is None:
            raise UserError("dynamic batch loading needs reference losses per domain; set "
                            "data.reference_losses or measure them from the source model")
        l = _ordered(losses, self.domains, "held-out losses")
        self.weights = update_weights(self.weights, l, self.reference, self.eta, self.smoothing,
                                      self.signed)
        self.history.append({"step": self.step, "losses": l.tolist(),
                             "weights": self.weights.tolist()})
        return self.weights_dict()

    def weights_dict(self) -> dict:
        return {d: float(w) for d, w in zip(self.domains, self.weights)}

    # --- sampling ---
    def _perm(self, i: int, epoch: int) -> numpy.ndarray:
        cached = self._perm_cache.get(i)
        if cached is None or cached[0] != epoch:
            rng = numpy.random.Generator(numpy.random.PCG64(
                numpy.random.SeedSequence([self.seed, 1, i, epoch])))
            cached = (epoch, rng.permutation(self.sizes[i]))
            self._perm_cache[i] = cached
        return cached[1]

    def _take(self, i: int) -> int:
        idx = int(self._perm(i, self.epochs[i])[self.positions[i]])
        self.positions[i] += 1
        if self.positions[i] == self.sizes[i]:
            self.positions[i] = 0
            self.epochs[i] += 1
        return idx

    def next_global_batch(self) -> list[tuple[int, int]]:
        """The next global batch: ``global_batch`` pairs (domain index, sample index)."""
        rng = numpy.random.Generator(numpy.random.PCG64(
            numpy.random.SeedSequence([self.seed, 0, self.step])))
        choice = rng.choice(len(self.domains), size=self.global_batch, p=self.weights)
        batch = [(int(i), self._take(int(i))) for i in choice]
        self.step += 1
        return batch

    # --- checkpointing ---
    def state_dict(self) -> dict:
        return {
            "kind": STATE_KIND, "domains": list(self.domains), "sizes": list(self.sizes),
            "seed": self.seed, "global_batch": self.global_batch, "step": self.step,
            "weights": self.weights.tolist(), "positions": list(self.positions),
            "epochs": list(self.epochs),
            "reference": None if self.reference is None else self.reference.tolist(),
            "history": [dict(h) for h in self.history],
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != STATE_KIND:
            raise UserError(f"checkpoint data state is {state.get('kind')!r}, not the dynamic batch "
                            "sampler's; resume with the data settings the run started with")
        if state["domains"] != self.domains or state["sizes"] != self.sizes:
            raise UserError(
                f"checkpoint data sampler was built for domains {state['domains']} with "
                f"{state['sizes']} samples, this run has {self.domains} with {self.sizes}; resume "
                "with the same data, seq_len and seed"
            )
        if state["seed"] != self.seed or state["global_batch"] != self.global_batch:
            raise UserError(
                f"checkpoint data sampler used seed {state['seed']} and global batch "
                f"{state['global_batch']}, this run {self.seed} and {self.global_batch}; resume "
                "with the same seed and global batch"
            )
        self.step = int(state["step"])
        self.weights = numpy.asarray(state["weights"], dtype=numpy.float64)
        self.positions = [int(p) for p in state["positions"]]
        self.epochs = [int(e) for e in state["epochs"]]
        if state.get("reference") is not None and self.reference is None:
            self.reference = numpy.asarray(state["reference"], dtype=numpy.float64)
        self.history = [dict(h) for h in state.get("history", [])]
        self._perm_cache.clear()
