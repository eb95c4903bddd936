"""The frozen teacher of online distillation (the ``distill:`` config block).

The teacher is the source model (``distill.teacher: source``) or any model ``model.source``
accepts (HF folder, ``.gguf``, megatron checkpoint) with the student's tokenizer. It is built
once per run with the project's builder under the same megatron parallel state as the student,
so each tensor-parallel rank holds the same vocabulary slice of its output layer as of the
student's, and each pipeline stage the teacher's layers of that stage (``training.pipeline``
carries its hidden states beside the student's); it stays outside the training engine (no
optimizer state, no ZeRO partition, no gradient), in eval mode, and survives every compaction
(only the student is rebuilt). It is not saved in checkpoints: a resume builds it again from its
source, and the run's fingerprint (``distill.teacher`` by content, run_dir.BY_CONTENT) refuses a
resume with another teacher.

Precision: the run's training dtype. A bf16 run gets a bf16 teacher (half the memory, the tensor
cores); an fp32 run (the CPU configurations) an fp32 one, because bf16 matmuls on CPUs are
slower than fp32 ones and an fp32 teacher equal to the student gives exactly zero KL.

The loss per token (``Teacher.loss``): alpha * T^2 * KL(teacher || student at T) + (1 - alpha) *
the LM cross-entropy, both from the vocabulary-parallel logits (``distill.vocab_parallel_kl``,
megatron-core's ``vocab_parallel_cross_entropy``): the full vocabulary is never gathered. The
pruning runtimes' statistics (saliency scores, L0 gate gradients) come from the gradients of
this loss, so with distillation on they rank what the distillation objective loses.
"""
from __future__ import annotations

import dataclasses

import torch
from megatron.core import tensor_parallel

from megatron_effllm.architecture import Architecture
from megatron_effllm.data.tokenizer import load_tokenizer
from megatron_effllm.errors import UserError
from megatron_effllm.log import get_logger
from megatron_effllm.model.builder import build_gpt_model
from megatron_effllm.model.weights import load_canonical
from megatron_effllm.training.distill import distillation_loss, vocab_parallel_kl
from megatron_effllm.training.source import load_source

log = get_logger(__name__)

# Text whose token ids two tokenizers must agree on to share a vocabulary (prose, code, digits,
# whitespace runs, non-ASCII).
_PROBE = ("The quick brown fox jumps over the lazy dog. def f(x):\n    return x ** 2  # 12345\n"
          "Ünïcödé — 日本語の文章。  tabs\tand   spaces; {\"key\": [1, 2.5e-3]}")


def _check_same_vocabulary(teacher: str, t_arch: Architecture, t_tok: str,
                           s_arch: Architecture, s_tok: str) -> None:
    """One line when the teacher's logits would not index the student's vocabulary."""
    if t_arch.vocab_size != s_arch.vocab_size:
        raise UserError(f"distill.teacher {teacher} has a vocabulary of {t_arch.vocab_size} tokens, the "
                        f"student {s_arch.vocab_size}; give a teacher with the student's tokenizer")
    a, b = load_tokenizer(str(t_tok)), load_tokenizer(str(s_tok))
    if a.vocab_size != b.vocab_size or a.encode(_PROBE) != b.encode(_PROBE):
        raise UserError(f"distill.teacher {teacher} tokenizes text differently from the student's tokenizer "
                        f"{s_tok}; give a teacher with the student's tokenizer")


class Teacher:
    """A frozen megatron GPTModel (this rank's shard) and the distillation loss it teaches."""

    def __init__(self, model: torch.nn.Module, alpha: float, temperature: float):
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.alpha = float(alpha)
        self.temperature = float(temperature)

    @classmethod
    def build(cls, cfg, source_arch: Architecture, source_canonical: dict, tokenizer: str) -> Teacher:
        """The teacher of ``cfg.distill`` (collective when it is a megatron checkpoint)."""
        d = cfg.distill
        if d.teacher == "source":
            arch, canonical = source_arch, source_canonical
        else:
            model_cfg = dataclasses.replace(cfg.model, source=d.teacher, init=None)
            arch, canonical, t_tok = load_source(dataclasses.replace(cfg, model=model_cfg))
            _check_same_vocabulary(d.teacher, arch, t_tok, source_arch, tokenizer)
        dtype = torch.bfloat16 if cfg.model.dtype == "bf16" else torch.float32
        model = build_gpt_model(arch, params_dtype=dtype, init_weights=False,
                                use_te={"auto": None, "te": True, "local": False}[cfg.model.layers])
        load_canonical(model, arch, canonical)  # copied (and cast) into the shard
        log.info(f"[distill] teacher {d.teacher}: {arch.num_params():,} parameters ({dtype}), alpha "
                 f"{d.alpha}, temperature {d.temperature}")
        return cls(model, d.alpha, d.temperature)

    @torch.no_grad()
    def logits(self, tokens: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """This rank's vocabulary slice of the teacher's logits, ``[b, s, V / TP]``."""
        return self.model(tokens, position_ids, None)

    def loss(self, student_logits: torch.Tensor, tokens: torch.Tensor, position_ids: torch.Tensor,
             labels: torch.Tensor) -> torch.Tensor:
        """Per-token distillation loss ``[b, s]`` (fp32) from the student's vocabulary slice."""
        return self.mix(student_logits, self.logits(tokens, position_ids), labels)

    def mix(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-token distillation loss ``[b, s]`` from both models' vocabulary slices (the last
        pipeline stage has the teacher's logits from the pipeline, not from ``logits``)."""
        kl = vocab_parallel_kl(student_logits, teacher_logits, self.temperature)
        # after the KL: megatron's cross-entropy shifts fp32 logits in place
        lm = tensor_parallel.vocab_parallel_cross_entropy(student_logits, labels)
        return distillation_loss(lm, kl, self.alpha, self.temperature)
