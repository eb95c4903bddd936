"""The held-out loss of an exported HF model, measured as the trainer measures its own model's."""
import os

import torch


def hf_heldout_losses(cfg, run_dir: str, hf_dir: str) -> dict:
    """Mean token loss per held-out domain of the HF model in ``hf_dir`` on the held-out batches
    of the run ``cfg`` in ``run_dir`` (all of them: one process holds every data-parallel rank's
    share), summed as the trainer sums them."""
    from transformers import AutoModelForCausalLM

    from megatron_effllm.data.loader import make_heldout_batches
    from megatron_effllm.data.prepare import prepare_data

    args = prepare_data(cfg.data, tokenizer=cfg.model.tokenizer, out_dir=os.path.join(run_dir, "data"),
                        seed=cfg.seed, train_samples=cfg.train.steps * cfg.data.global_batch, progress=False)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True, dtype=torch.float32).eval()
    out = {}
    with torch.no_grad():
        for domain, batches in make_heldout_batches(args, cfg.data.heldout_batches, cfg.data.micro_batch).items():
            tot = torch.zeros(2, dtype=torch.float64)
            for b in batches:
                logits = model(input_ids=b["tokens"], position_ids=b["position_ids"]).logits
                per_token = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), b["labels"],
                                                              reduction="none")
                mask = b["loss_mask"].float()
                tot += torch.tensor([float((per_token * mask).sum()), float(mask.sum())], dtype=torch.float64)
            out[domain] = float(tot[0] / tot[1].clamp(min=1))
    return out
