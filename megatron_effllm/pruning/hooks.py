"""Reading an HF-layout model for pruning: (weight, grad) pairs, activations, Hessians, masks.

Works on any torch model whose module names follow the HF Llama layout (``model.layers.{i}.
self_attn.o_proj`` ...): stock LlamaForCausalLM / Qwen2ForCausalLM / MistralForCausalLM and the
non-uniform model class of ``convert.hf_io``. Modules are found by canonical name, never by
class, so the per-layer widths may differ.
"""
from __future__ import annotations

from typing import Optional

import torch

from megatron_effllm.architecture import Architecture
from megatron_effllm.pruning.groups import PruningError, tensor_axes
from megatron_effllm.pruning.obs import HessianAccumulator
from megatron_effllm.pruning.saliency import ActivationSaliency
from megatron_effllm.pruning.surgery import check_masks, effective_head_mask, masked_rms_norm, norm_eps


def weights_and_grads(model: torch.nn.Module, arch: Architecture) -> tuple[dict, dict]:
    """Canonical {name: weight} and {name: grad} of the model's parameters (grads may be None).

    A tied lm_head is the embedding parameter and appears once, under the embedding's name.
    """
    axes = tensor_axes(arch)
    weights, grads = {}, {}
    for name, p in model.named_parameters():
        if name in axes:
            weights[name] = p.detach()
            grads[name] = None if p.grad is None else p.grad.detach()
    missing = sorted(set(axes) - set(weights))
    if missing:
        raise PruningError(
            f"model has no parameters named {missing[:3]}; it does not follow the HF Llama layout of this architecture"
        )
    return weights, grads


def canonical_tensors(model: torch.nn.Module, arch: Architecture) -> dict[str, torch.Tensor]:
    """The canonical state dict of an HF-layout model (detached, shared storage)."""
    return weights_and_grads(model, arch)[0]


def _module(model: torch.nn.Module, name: str) -> torch.nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise PruningError(f"model has no module {name}; it does not follow the HF Llama layout") from None


def _first_input(args, kwargs, key="hidden_states"):
    return args[0] if args else kwargs[key]


def _first_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


class ActivationRecorder:
    """Forward hooks feeding ActivationSaliency and/or HessianAccumulator during calibration.

    ``hessian_sites``: 'obs' records o_proj and down_proj inputs (what the OBS update of heads
    and FFN channels needs); 'all' also records q_proj (= k/v), gate_proj (= up) and lm_head
    inputs (for hidden-channel updates). Set ``token_mask`` ([batch, seq], 1 = real token)
    before a forward to ignore padding. Use as a context manager; hooks go on exit.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        arch: Architecture,
        activations: Optional[ActivationSaliency] = None,
        hessians: Optional[HessianAccumulator] = None,
        hessian_sites: str = "obs",
    ):
        if hessian_sites not in ("obs", "all"):
            raise PruningError(f"hessian_sites={hessian_sites!r}: use 'obs' or 'all'")
        self.model, self.arch = model, arch
        self.activations, self.hessians = activations, hessians
        self.hessian_sites = hessian_sites
        self.token_mask: Optional[torch.Tensor] = None
        self._handles = []

    def __enter__(self):
        m, acts, hess = self.model, self.activations, self.hessians
        add = self._handles.append
        if acts is not None:
            emb = _module(m, "model.embed_tokens")
            add(emb.register_forward_hook(lambda mod, args, out: acts.add_tokens(
                float(out.shape[0] * out.shape[1]) if self.token_mask is None else float(self.token_mask.sum()))))
            add(_module(m, "model.norm").register_forward_hook(
                lambda mod, args, out: acts.add_norm_output(out, self.token_mask)))
        for l in range(self.arch.num_layers):
            p = f"model.layers.{l}."
            if acts is not None:
                for norm in ("input_layernorm", "post_attention_layernorm"):
                    add(_module(m, p + norm).register_forward_hook(
                        lambda mod, args, out: acts.add_norm_output(out, self.token_mask)))
                add(_module(m, p + "self_attn.o_proj").register_forward_pre_hook(
                    lambda mod, args, l=l: acts.add_attention_output(l, args[0], self.token_mask)))
                add(_module(m, p + "mlp.down_proj").register_forward_pre_hook(
                    lambda mod, args, l=l: acts.add_ffn_activation(l, args[0], self.token_mask)))
                add(_module(m, f"model.layers.{l}").register_forward_hook(
                    lambda mod, args, kwargs, out, l=l: acts.add_block_io(
                        l, _first_input(args, kwargs), _first_output(out), self.token_mask),
                    with_kwargs=True))
            if hess is not None:
                sites = ["self_attn.o_proj", "mlp.down_proj"]
                if self.hessian_sites == "all":
                    sites += ["self_attn.q_proj", "mlp.gate_proj"]
                for site in sites:
                    add(_module(m, p + site).register_forward_pre_hook(
                        lambda mod, args, name=p + site + ".weight": hess.add(name, args[0], self.token_mask)))
        if hess is not None and self.hessian_sites == "all" and not self.arch.tie_word_embeddings:
            add(_module(m, "lm_head").register_forward_pre_hook(
                lambda mod, args: hess.add("lm_head.weight", args[0], self.token_mask)))
        return self

    def __exit__(self, *exc):
        self.remove()

    def remove(self):
        for h in self._handles:
            h.remove()
        self._handles.clear()


def install_mask_hooks(model: torch.nn.Module, arch: Architecture, masks: dict[str, torch.Tensor]) -> list:
    """Apply a mask dict in the forward without touching the weights (returns hook handles).

    Heads / FFN channels / layers: the inputs of o_proj / down_proj are multiplied by the mask
    (a masked layer's attention and MLP outputs vanish: the block is the identity). Hidden
    channels: the embedding, o_proj and down_proj outputs are masked (the residual stream stays
    zero there) and every RMSNorm takes its statistics over the kept channels only. The result
    equals the forward of the physically pruned model.
    """
    check_masks(arch, masks)
    handles = []
    d = arch.head_dim
    hm = masks["hidden"]
    hidden_masked = bool((hm == 0).any())

    def scale(mask):
        return lambda mod, args: (args[0] * mask.to(args[0].dtype).to(args[0].device),) + tuple(args[1:])

    def mask_out(mod, args, out):
        return out * hm.to(out.dtype).to(out.device)

    def norm_hook(mod, args, out):
        return masked_rms_norm(args[0], mod.weight, norm_eps(mod, arch.rms_norm_eps), hm)

    for l in range(arch.num_layers):
        p = f"model.layers.{l}."
        lm = masks["layer"][l]
        head = effective_head_mask(arch, masks, l).repeat_interleave(d) * lm
        handles.append(_module(model, p + "self_attn.o_proj").register_forward_pre_hook(scale(head)))
        handles.append(_module(model, p + "mlp.down_proj").register_forward_pre_hook(scale(masks[f"ffn.{l}"] * lm)))
        if hidden_masked:
            for name in ("self_attn.o_proj", "mlp.down_proj"):
                handles.append(_module(model, p + name).register_forward_hook(mask_out))
            for norm in ("input_layernorm", "post_attention_layernorm"):
                handles.append(_module(model, p + norm).register_forward_hook(norm_hook))
    if hidden_masked:
        handles.append(_module(model, "model.embed_tokens").register_forward_hook(mask_out))
        handles.append(_module(model, "model.norm").register_forward_hook(norm_hook))
    return handles
