"""Per-rank memory of a training run: the terms a GPU holds at the peak of a step or a compaction.

Bytes per parameter element of the rank's shard (Psi), b = 2 (bf16) or 4 (fp32), DP data ranks:

- weights: Psi * b (ZeRO-3: / DP);
- gradients and optimizer, as DeepSpeed 0.19 holds them: ZeRO-0 keeps the module's gradients
  (Psi * b) and so does fp32 ZeRO-1 until the boundary's reduction; ZeRO-2's backward hooks move
  each gradient into the flat reduce bucket (``reduce_bucket_size`` elements, allocated whole
  whatever the model size) and free it, and the bf16 optimizer of ZeRO-1 adds each into its fp32
  buffer and frees it: there one tensor's gradient exists at a time. Optimizer: AdamW moments
  8 Psi, the fp32 master copy 4 Psi and the fp32 gradient of that master 4 Psi (ZeRO-1/2/3 keep a
  flat fp32 partition even for an fp32 model; ZeRO-0 only with bf16), / DP from ZeRO-1 on, except
  the bf16 ZeRO-1 optimizer's fp32 gradient buffer: the whole flat model on every rank;
- activations of one micro-batch of T = seq_len x micro_batch tokens, per layer: what autograd
  keeps for the backward of a SwiGLU GQA block of the local layer spec (counted with
  ``saved_tensors_hooks`` on built layers): b bytes per element of 6 h (both norms' inputs and
  outputs, the two residual sums), 3 q and 3 kv (the QKV output, the rotary outputs, the
  attention output), 5 f (fc1's two halves, SiLU's output, the product), 4 bytes per query head
  (SDPA's fp32 log-sum-exp) and with bf16 the norms' fp32 upcasts of their inputs (2 x 4 h
  bytes); q, kv, f are the rank's widths, h is replicated over TP without sequence parallelism;
  1F1B keeps min(PP - stage, micro-batches per step) of them in flight; with full recompute a
  layer keeps only its input (T h b) and one layer's activations exist at a time. Attention runs
  as flash SDPA (a GPU's flash / memory-efficient kernel, the CPU's fused one): no s x s scores;
- logits on the last stage: T x vocab / TP from the output layer in b, and the loss's fp32 copy
  that megatron's cross entropy upcasts to and turns into the softmax and then the gradient in
  place: 4 bytes a logit in fp32 (the upcast is the same tensor), 2 + 4 in bf16;
- pruning: the saliency accumulators (fp64 vectors over the whole model's groups, every rank),
  the OBS Hessians of the rank's o_proj / down_proj inputs (fp32 w x w), one 0/1 byte mask per
  weight entry;
- the compaction peak: the model state plus one tensor's full fp32 master and moments and their
  slice in flight (the engine rebuild moves one tensor at a time; the sliced state waits on the
  host, reported apart).
"""
from __future__ import annotations

from dataclasses import dataclass

from megatron_effllm.architecture import Architecture
from megatron_effllm.planning.ranks import Layout, Shard
from megatron_effllm.pruning.saliency import GradSaliency

DEEPSPEED_REDUCE_BUCKET = 500_000_000  # elements: DeepSpeed's default reduce_bucket_size
ADAM_MOMENTS, FP32 = 8, 4


@dataclass(frozen=True)
class Memory:
    """Bytes of one rank. ``terms``: what a training step's peak holds (name -> bytes);
    ``compaction_peak``: the device peak of a compaction; ``host_compaction``: the sliced state
    parked on the host during it; ``activations_recompute``: activations with full recompute."""

    terms: dict
    activations_recompute: int
    compaction_peak: int
    host_compaction: int

    @property
    def step_peak(self) -> int:
        return sum(self.terms.values())

    @property
    def peak(self) -> int:
        return max(self.step_peak, self.compaction_peak)

    def largest(self) -> tuple[str, int]:
        terms = dict(self.terms, compaction=self.compaction_peak - self._model_state())
        return max(terms.items(), key=lambda kv: kv[1])

    def _model_state(self) -> int:
        keep = ("weights", "gradients", "optimizer", "saliency", "hessians", "masks", "teacher")
        return sum(self.terms[k] for k in keep)


def state_bytes(psi: int, b: int, zero: int, dp: int, largest: int = 0) -> dict:
    """weights, gradients, optimizer state and reduce bucket of ``psi`` elements at ZeRO ``zero``;
    ``largest``: elements of the largest tensor (the one gradient in flight when gradients are
    not kept)."""
    part = -(-psi // dp)  # a rank's partition, rounded up as DeepSpeed pads
    bf16_optimizer = zero == 1 and b != FP32  # DeepSpeed's BF16_Optimizer, not ZeRO's
    kept_grads = zero == 0 or (zero == 1 and not bf16_optimizer)
    master = FP32 if (zero > 0 or b != FP32) else 0
    master_grad = master * (psi if bf16_optimizer else (part if zero > 0 else psi))
    return {
        "weights": psi * b if zero < 3 else part * b,
        "gradients": psi * b if kept_grads else (part * b if zero == 3 else largest * b),
        "optimizer": (part if zero > 0 else psi) * (ADAM_MOMENTS + master) + master_grad,
        "zero_buckets": DEEPSPEED_REDUCE_BUCKET * b if zero == 2 else 0,
    }


def layer_activation_bytes(arch: Architecture, layer: int, tokens: int, b: int, tp: int) -> int:
    shape = arch.layers[layer]
    heads = shape.num_heads // tp
    q, kv, f = heads * arch.head_dim, shape.num_kv_groups * arch.head_dim // tp, shape.ffn_hidden_size // tp
    h = arch.hidden_size
    upcast = 2 * FP32 * h if b != FP32 else 0  # the norms' fp32 copies of their inputs
    return tokens * (b * (6 * h + 3 * q + 3 * kv + 5 * f) + FP32 * heads + upcast)


def activation_bytes(arch: Architecture, sh: Shard, lay: Layout, tokens: int, b: int, micro_batches: int) -> tuple[int, int]:
    """(without recompute, with full recompute) of the rank's stage."""
    in_flight = min(lay.pp - sh.pp_rank, micro_batches)
    per_layer = [layer_activation_bytes(arch, i, tokens, b, lay.tp) for i in sh.layers]
    plain = in_flight * sum(per_layer)
    recompute = in_flight * len(per_layer) * tokens * arch.hidden_size * b + max(per_layer)
    return plain, recompute


def pruning_bytes(cfg, arch: Architecture, sh: Shard) -> dict:
    if cfg.prune.strategy == "none":
        return {"saliency": 0, "hessians": 0, "masks": 0}
    sal = GradSaliency(arch, estimators=(cfg.prune.estimator,), device="meta")
    return {
        "saliency": sum(t.numel() * t.element_size() for t in sal.state.values()),
        "hessians": sum(w * w for w in sh.row_inputs) * FP32 if cfg.prune.obs else 0,
        "masks": sh.params,
    }


def rank_memory(cfg, arch: Architecture, sh: Shard, lay: Layout, grad_accum: int) -> Memory:
    b = 2 if cfg.model.dtype == "bf16" else 4
    zero = cfg.parallel.zero_stage
    tokens = cfg.data.seq_len * cfg.data.micro_batch
    terms = state_bytes(sh.params, b, zero, lay.dp, sh.largest)
    plain, recompute = activation_bytes(arch, sh, lay, tokens, b, grad_accum)
    terms["activations"] = recompute if cfg.model.recompute == "full" else plain
    last = sh.pp_rank == lay.pp - 1
    # the output in b and the loss's fp32 copy of it (the same tensor in fp32)
    per_logit = FP32 + (b if b != FP32 else 0)
    terms["logits"] = tokens * (arch.vocab_size // lay.tp) * per_logit if last else 0
    terms.update(pruning_bytes(cfg, arch, sh))
    # online distillation: the frozen teacher's shard (the source's shape, the training dtype)
    # and, on the last stage, its logits in the fp32 softmax statistics beside the student's
    teacher = cfg.distill.alpha > 0
    terms["teacher"] = (sh.params * b + (tokens * (arch.vocab_size // lay.tp) * FP32 if last else 0)) if teacher else 0
    state = sum(terms[k] for k in ("weights", "gradients", "optimizer", "saliency", "hessians", "masks", "teacher"))
    in_flight = 2 * sh.largest * (FP32 + ADAM_MOMENTS)  # one tensor's full state and its slice
    host = -(-sh.params // lay.dp) * (FP32 + ADAM_MOMENTS)
    return Memory(terms, recompute, state + in_flight, host if cfg.prune.strategy != "none" else 0)
