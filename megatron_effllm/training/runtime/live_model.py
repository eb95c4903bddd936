"""Hooks on the live megatron model shard inside the engine: the masks (ZeRO-3 partitions
included) with the RMSNorm correction for masked hidden channels, and the saliency feed from
every parameter's gradient (with the tied-embedding hand-over under PP)."""
from __future__ import annotations

from typing import Callable, Mapping, Optional

import torch

from megatron_effllm.architecture import Architecture
from megatron_effllm.engine.base import TrainEngine
from megatron_effllm.layout.dims import ParallelDims
from megatron_effllm.model.sequence_parallel import factor_for_column_shards
from megatron_effllm.model.weights import model_style
from megatron_effllm.parallel import comm
from megatron_effllm.parallel.distributed_pruning import feed_parameter, local_weight_masks
from megatron_effllm.pruning.saliency import GradSaliency, elementwise
from megatron_effllm.pruning.surgery import kept_norm_scale, norm_eps, plan_from_masks, rescale_to_kept

NORM_MODULES = ("input_layernorm", "pre_mlp_layernorm", "final_layernorm")
# TransformerEngine's spec fuses input_layernorm / pre_mlp_layernorm into the next linear.
FUSED_NORM_WEIGHT = "layer_norm_weight"
# A tied embedding's two megatron copies under PP: the first stage's, the last stage's.
TIED_COPIES = ("embedding.word_embeddings.weight", "output_layer.weight")


def recomputing() -> bool:
    """Whether this forward runs inside a backward: activation recompute repeats a forward there
    (megatron's checkpointed layers or core attention), so hooks that add statistics count the
    first forward only. Hooks that change outputs (the masks) must run in both."""
    return torch._C._current_graph_task_id() != -1


class LiveMasks:
    """Masks on a live model shard: masked weights are zeroed before every forward (the
    optimizer step writes them again), and with masked hidden channels every RMSNorm takes its
    statistics over the kept channels, so the forward is exactly the pruned model's.

    Masked hidden channels are exactly zero in the residual stream (embedding columns and
    o_proj / down_proj rows are zero), so rescaling the norm output
    (``surgery.rescale_to_kept``) gives the physically pruned model's norm.
    """

    def __init__(self, model: torch.nn.Module, dims: ParallelDims, engine: Optional[TrainEngine] = None):
        # ``engine``: the one holding ``model``, asked which parameters live in partitions
        # between uses (ZeRO-3); without one every parameter is whole.
        self.model, self.dims, self.engine = model, dims, engine
        self._live: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        self._zero3_hooks: list = []
        self._hidden_kept: Optional[float] = None
        self._hooks = [model.register_forward_pre_hook(self._apply)]
        for name, module in model.named_modules():
            if isinstance(getattr(module, FUSED_NORM_WEIGHT, None), torch.nn.Parameter):
                self._hooks.append(module.register_forward_hook(self._fused_norm_hook))
            elif name.endswith(NORM_MODULES) and getattr(module, "weight", None) is not None:
                # (TransformerEngine's spec leaves IdentityOps under these names: nothing to correct)
                self._hooks.append(module.register_forward_hook(self._norm_hook))
        self._default_eps = 0.0

    def set(self, arch: Architecture, masks: Mapping[str, torch.Tensor]) -> None:
        """Mask with ``masks`` (over ``arch``, the shard's physical shape) from the next forward."""
        self.clear()
        plan = plan_from_masks(arch, masks)
        if plan.is_identity:
            return
        self._default_eps = arch.rms_norm_eps
        params = dict(self.model.named_parameters())
        meg = local_weight_masks(arch, masks, self.dims, style=model_style(self.model),
                                 device=next(iter(params.values())).device)
        zero3: dict[str, list] = {}  # owning module name -> [(param, full mask, local mask)]
        # The masks stay bool (a byte per masked weight, not the weight's dtype): multiplying by
        # them gives the same bits as by 0.0 / 1.0.
        for name, m in meg.items():
            if name in params:
                p = params[name]
                if self.engine is not None and self.engine.is_partitioned(p):
                    full = m.to(device=self.engine.local_partition(p).device)
                    zero3.setdefault(name.rsplit(".", 1)[0], []).append(
                        (p, full, self.engine.local_part_of(full, p, fill=1.0)))
                else:
                    self._live.append((p, m.to(device=p.device)))
        modules = dict(self.model.named_modules())
        for owner, masked in zero3.items():
            self._zero3_hooks.append(modules[owner].register_forward_pre_hook(
                self._zero3_mask_hook(self.engine, masked)))
        if plan.after.hidden_size != arch.hidden_size:
            self._hidden_kept = float(plan.after.hidden_size)

    def clear(self) -> None:
        """Nothing masked any more (the weights already zeroed stay zero)."""
        for h in self._zero3_hooks:
            h.remove()
        self._live, self._zero3_hooks, self._hidden_kept = [], [], None

    def remove(self) -> None:
        self.clear()
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _apply(self, module, args):
        """Before the model's forward (ZeRO-3: ``_zero3_mask_hook`` instead)."""
        with torch.no_grad():
            for p, m in self._live:
                p.data.mul_(m)

    @staticmethod
    def _zero3_mask_hook(engine: TrainEngine, masked: list):
        """Pre-forward hook of a module owning ZeRO-3 parameters, after DeepSpeed's gather: the
        gathered weights and this rank's partition (which a later gather reads, e.g. for the
        backward) are masked; ZeRO-3 may keep parameters gathered across uses, so masking the
        partitions alone is not enough."""

        def hook(module, args):
            with torch.no_grad():
                for p, full, local in masked:
                    if p.data.numel() == full.numel():
                        p.data.mul_(full.view_as(p.data))
                    engine.local_partition(p).mul_(local)

        return hook

    def _norm_hook(self, module, args, output):
        if self._hidden_kept is None:
            return output
        return rescale_to_kept(args[0], output, norm_eps(module, self._default_eps), self._hidden_kept)

    def _fused_norm_hook(self, module, args, output):
        """A norm fused into its linear (TE's LayerNormColumnParallelLinear: ``linear_qkv``,
        ``linear_fc1``): the kept-channel factor of the norm applies to the linear's output
        without the bias the module added inside it. megatron's linears return (output, bias)."""
        if self._hidden_kept is None:
            return output
        out, rest = (output[0], output[1:]) if isinstance(output, tuple) else (output, None)
        scale = kept_norm_scale(args[0], norm_eps(module, self._default_eps), self._hidden_kept)
        scale = factor_for_column_shards(scale, out.shape[0])
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.Tensor) and bias.numel() and not getattr(module, "skip_bias_add", False):
            out = ((out.float() - bias.float()) * scale + bias.float()).to(out.dtype)
        else:
            out = (out.float() * scale).to(out.dtype)
        return out if rest is None else (out, *rest)


class GradientFeed:
    """Tensor hooks folding every parameter's micro-batch gradient into the saliency sums
    (``distributed_pruning.feed_parameter``: this shard's pieces at their canonical places).

    ``stats()`` is the accumulator to feed (the runtime's current one); ``scale()`` turns a
    hooked gradient into a sum over the micro-batch's samples; nothing is fed unless
    ``collecting()``. Under PP with tied embeddings the first stage keeps its copy's gradient
    rows and ``end_pipeline_schedule`` hands them to the last stage, which scores the sum.
    """

    def __init__(self, model: torch.nn.Module, arch: Architecture, dims: ParallelDims,
                 stats: Callable[[], GradSaliency], scale: Callable[[], float], collecting: Callable[[], bool]):
        self.model, self.arch, self.dims = model, arch, dims
        self.stats, self.scale, self.collecting = stats, scale, collecting
        self.tied_pp = dims.pp > 1 and arch.tie_word_embeddings
        self._rows, self._g_in, self._g_out = [], [], []
        self._hooks = [p.register_hook(self._hook(name, p)) for name, p in model.named_parameters()
                       if p.requires_grad]

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _hook(self, name: str, param: torch.nn.Parameter):
        def hook(grad):
            if self.collecting():
                with torch.no_grad():
                    w = param.detach().float()
                    g = grad.detach().float() * self.scale()
                    if self.tied_pp and name in TIED_COPIES:
                        first = name == TIED_COPIES[0]
                        kept = self._g_in if first else self._g_out
                        kept.append(g[self._rows[len(kept)]])
                        if first:  # added to the last stage's copy after the schedule
                            return grad
                    feed_parameter(self.stats(), name, w, g, self.dims, check=False)
            return grad

        return hook

    def before_micro_batch_backward(self, batch: dict) -> None:
        """``batch``'s backward comes next on this stage: its tokens are the embedding rows whose
        gradient has two parts under PP with tied embeddings (first and last stage)."""
        if not (self.tied_pp and self.collecting()):
            return
        n = self.arch.vocab_size // self.dims.tp
        rows = torch.unique(batch["tokens"]) - self.dims.tp_rank * n  # this TP rank's vocabulary shard
        self._rows.append(rows[(rows >= 0) & (rows < n)])

    @torch.no_grad()
    def end_pipeline_schedule(self) -> None:
        """After the step's micro-batches: the first stage's part of the tied embedding's
        gradient joins the last stage's. The scores see each micro-batch's full gradient
        g = g_in + g_out, as at PP=1: the last stage fed f(w * g_out) for every row, and adds
        f(w * g) - f(w * g_out) on the rows the micro-batch's tokens touch (g_in is zero
        elsewhere). The transfer is the touched rows only (tokens x hidden per micro-batch).
        Collective over the embedding group (first and last stage)."""
        if not self.tied_pp:
            return
        rows, g_in, g_out = self._rows, self._g_in, self._g_out
        self._rows, self._g_in, self._g_out = [], [], []
        if not (self.collecting() and rows) or not comm.in_embedding_group():
            return
        first = self.dims.first_stage
        sizes = [len(r) for r in rows]
        if first:
            buf = torch.cat(g_in)
        else:
            w = dict(self.model.named_parameters())[TIED_COPIES[1]].detach().float()
            buf = torch.empty(sum(sizes), w.shape[1], dtype=torch.float32, device=w.device)
        comm.broadcast_(buf, comm.pipeline_first_rank(), "embedding")
        if first:
            return
        # Only the touched rows: the embedding's scores are sums over its rows (its one pruned
        # axis is the hidden one, whole on every TP rank), so the other rows would add zeros.
        stats = self.stats()
        for r, gi, go in zip(rows, buf.split(sizes), g_out):
            wr = w[r]
            for q in stats.quantities:
                delta = elementwise(q, wr * (gi + go)) - elementwise(q, wr * go)
                stats.add_elementwise(q, "model.embed_tokens.weight", delta)
