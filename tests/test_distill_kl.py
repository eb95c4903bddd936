"""The vocabulary-parallel distillation KL: equal to the full-vocabulary KL (one process, and two
tensor-parallel ranks each holding half the vocabulary), zero for a teacher equal to the student."""
import os

import pytest
import torch
import torch.nn.functional as F

from megatron_effllm.training.distill import distillation_loss, vocab_parallel_kl
from tests.dist_utils import run_ranks

VOCAB = 50  # even, so two ranks hold 25 entries each


def _logits(seed: int, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 7, VOCAB, generator=g) * scale


def _reference(student: torch.Tensor, teacher: torch.Tensor, temperature: float):
    """KL and its gradient by autograd through torch's own full-vocabulary functions (fp64)."""
    s = student.double().requires_grad_(True)
    kl = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(teacher.double() / temperature, -1),
                  log_target=True, reduction="none").sum(-1)
    kl.sum().backward()
    return kl.detach(), s.grad


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kl_and_gradient_equal_the_full_vocabulary_reference(temperature):
    student, teacher = _logits(0), _logits(1)
    ref_kl, ref_grad = _reference(student, teacher, temperature)
    s = student.clone().requires_grad_(True)
    kl = vocab_parallel_kl(s, teacher, temperature)
    kl.sum().backward()
    assert kl.dtype == torch.float32 and kl.shape == (2, 7)
    torch.testing.assert_close(kl.double(), ref_kl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.grad.double(), ref_grad, rtol=1e-5, atol=1e-7)
    assert (kl > 0).all()


def test_a_teacher_equal_to_the_student_gives_zero_kl_and_zero_gradient():
    student = _logits(3)
    s = student.clone().requires_grad_(True)
    kl = vocab_parallel_kl(s, student.clone(), 1.5)
    (kl.sum() * 7.0).backward()
    assert torch.equal(kl, torch.zeros_like(kl))
    assert torch.equal(s.grad, torch.zeros_like(s.grad))


def test_bf16_student_gets_a_bf16_gradient_from_fp32_statistics():
    student, teacher = _logits(4).bfloat16(), _logits(5).bfloat16()
    s = student.clone().requires_grad_(True)
    kl = vocab_parallel_kl(s, teacher, 1.0)
    kl.sum().backward()
    ref_kl, ref_grad = _reference(student.float(), teacher.float(), 1.0)
    assert kl.dtype == torch.float32 and s.grad.dtype == torch.bfloat16
    torch.testing.assert_close(kl.double(), ref_kl, rtol=1e-5, atol=1e-6)  # statistics in fp32
    torch.testing.assert_close(s.grad.double(), ref_grad, rtol=1e-2, atol=1e-4)  # bf16 rounding only


def test_loss_mixes_kl_and_lm_loss_with_the_temperature_squared():
    lm, kl = torch.tensor([2.0, 4.0]), torch.tensor([0.5, 1.0])
    assert torch.equal(distillation_loss(lm, kl, alpha=0.0, temperature=2.0), lm)
    assert torch.equal(distillation_loss(lm, kl, alpha=1.0, temperature=2.0), 4.0 * kl)
    assert torch.equal(distillation_loss(lm, kl, alpha=0.5, temperature=1.0), 0.5 * kl + 0.5 * lm)


def test_mismatched_vocabularies_are_refused():
    with pytest.raises(ValueError, match="share the vocabulary"):
        vocab_parallel_kl(torch.zeros(1, 2, 8), torch.zeros(1, 2, 9))
    with pytest.raises(ValueError, match="temperature"):
        vocab_parallel_kl(torch.zeros(1, 2, 8), torch.zeros(1, 2, 8), 0.0)


def _tp2_run(rank, world_size, temperature):
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(tensor_model_parallel_size=2)
    try:
        student, teacher = _logits(0), _logits(1)
        half = VOCAB // 2
        cut = slice(rank * half, (rank + 1) * half)
        s = student[..., cut].clone().requires_grad_(True)
        kl = vocab_parallel_kl(s, teacher[..., cut].clone(), temperature)
        kl.sum().backward()
        return kl.detach(), s.grad
    finally:
        ps.destroy_model_parallel()


def test_tensor_parallel_kl_equals_the_single_process_kl():
    """TP=2, each rank half the vocabulary: the KL (identical on both ranks) and each rank's
    gradient slice equal TP=1's to fp32 rounding (the reductions run in another order)."""
    temperature = 2.0
    (kl0, g0), (kl1, g1) = run_ranks(_tp2_run, world_size=2, args=(temperature,))
    s = _logits(0).requires_grad_(True)
    kl = vocab_parallel_kl(s, _logits(1), temperature)
    kl.sum().backward()
    assert torch.equal(kl0, kl1)
    torch.testing.assert_close(kl0, kl.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.cat([g0, g1], dim=-1), s.grad, rtol=1e-6, atol=1e-7)


def test_a_teacher_with_another_vocabulary_or_tokenization_is_refused(tmp_path):
    """Another vocabulary size, or the same size tokenizing text differently (fewer BPE merges),
    is refused in one line before any teacher is built."""
    import json
    import shutil

    from megatron_effllm.architecture import Architecture
    from megatron_effllm.assets import smollm2_hf_dir
    from megatron_effllm.errors import UserError
    from megatron_effllm.training.teacher import _check_same_vocabulary

    src = smollm2_hf_dir(dtype="float32")
    arch = Architecture.uniform(num_layers=1, hidden_size=8, num_heads=2, num_kv_groups=1,
                                ffn_hidden_size=8, vocab_size=49152)
    other = Architecture.uniform(num_layers=1, hidden_size=8, num_heads=2, num_kv_groups=1,
                                 ffn_hidden_size=8, vocab_size=32000)
    _check_same_vocabulary("t", arch, src, arch, src)  # the same tokenizer passes
    with pytest.raises(UserError, match="vocabulary of 32000 tokens, the student 49152"):
        _check_same_vocabulary("t", other, src, arch, src)
    tok = tmp_path / "tok"
    tok.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if os.path.isfile(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), tok / name)
    spec = json.loads((tok / "tokenizer.json").read_text())
    spec["model"]["merges"] = spec["model"]["merges"][:1000]
    (tok / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(UserError, match="tokenizes text differently") as err:
        _check_same_vocabulary("t", arch, str(tok), arch, src)
    assert "\n" not in str(err.value)
