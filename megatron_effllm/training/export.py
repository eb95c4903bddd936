"""What a run exports: the final model as an HF folder (and GGUF), and with ``export.snapshots``
the same for every fraction of the source's size the model passes while it is pruned, so that
one run yields a family of models.

    RUN/final/hf, RUN/final/model.gguf
    RUN/snapshots/<fraction>/hf, RUN/snapshots/<fraction>/model.gguf

A snapshot is taken at the step boundary after the prune event at which the pruned model's size
(its effective architecture: what the masks keep, or the compacted shape) first drops to at most
``fraction x`` the source's parameters. The weights are the live model's, gathered over TP / PP
and, where groups are still only masked, sliced to the kept ones: the masked forward is the pruned
model's (``training.runtime.live_model.LiveMasks``), so the folder computes what the run computed
at that step. Taking one reads the model and runs the held-out evaluation (no update, no
statistics): training continues with the same numbers.
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable

import torch

from megatron_effllm.architecture import Architecture
from megatron_effllm.convert.gguf_export import export_gguf
from megatron_effllm.convert.hf_io import save_hf_model
from megatron_effllm.data.tokenizer import save_hf_tokenizer
from megatron_effllm.errors import UserError
from megatron_effllm.log import get_logger
from megatron_effllm.model.weights import gather_canonical
from megatron_effllm.parallel import comm
from megatron_effllm.pruning.surgery import slice_state_dict

log = get_logger(__name__)


def write_model(arch: Architecture, canonical: dict, folder: str, tokenizer, export_cfg) -> dict:
    """Rank 0: ``folder/hf`` in ``export.hf_dtype`` with the tokenizer's files, and
    ``folder/model.gguf`` when ``export.gguf``; returns the paths written (``hf_dir``, ``gguf``)."""
    dtype = torch.bfloat16 if export_cfg.hf_dtype == "bf16" else torch.float32
    tok_dir = tokenizer if os.path.isdir(str(tokenizer)) else None
    hf_dir = os.path.join(folder, "hf")
    save_hf_model(arch, {k: v.float() for k, v in canonical.items()}, hf_dir, tokenizer_dir=tok_dir,
                  dtype=dtype, overwrite=True)
    out = {"hf_dir": hf_dir}
    # a .gguf, the builtin or a hub id: write its HF tokenizer files
    if tok_dir is None and not save_hf_tokenizer(str(tokenizer), hf_dir,
                                                 model_max_length=arch.max_position_embeddings):
        log.warning(f"[export] no tokenizer files in {hf_dir}: {tokenizer} is a sentencepiece model; "
                    "copy the source's HF tokenizer files there")
    if export_cfg.gguf:
        gguf = os.path.join(folder, "model.gguf")
        try:
            export_gguf(hf_dir, gguf, dtype="f16", overwrite=True)
            out["gguf"] = gguf
        except UserError as err:  # the HF model is the result; say why GGUF is missing
            log.warning(f"[export] no GGUF: {err}")
    return out


def snapshot_folder(run_dir: str, fraction: float) -> str:
    return os.path.join(run_dir, "snapshots", f"{fraction:g}")


class Snapshots:
    """The fractions of ``export.snapshots`` and the snapshots written so far (checkpointed with
    the trainer state, so that a resumed run neither repeats nor skips one)."""

    def __init__(self, cfg, source_params: int, target: int, tokenizer, metrics, is_main: bool):
        self.fractions = sorted(cfg.export.snapshots, reverse=True)
        self.cfg, self.source_params = cfg, source_params
        self.tokenizer, self.metrics, self.is_main = tokenizer, metrics, is_main
        self.written: list[dict] = []
        for f in self.fractions:  # config_checks refuses these where the target is a plain fraction
            if cfg.prune.strategy != "none" and round(f * source_params) < target:
                raise UserError(
                    f"export.snapshots: {f:g} x {source_params:,} source parameters is below the run's target of "
                    f"{target:,} (prune.target_params {cfg.prune.target_params:g}), so the run never reaches it; "
                    "drop it or lower prune.target_params")

    def state_dict(self) -> list[dict]:
        return [dict(r) for r in self.written]

    def load_state_dict(self, records) -> None:
        self.written = [dict(r) for r in records or []]

    def due(self, params: int) -> list[float]:
        """The fractions not yet written that a model of ``params`` parameters has reached."""
        done = {r["fraction"] for r in self.written}
        return [f for f in self.fractions if f not in done and params <= f * self.source_params]

    def unreached(self) -> list[float]:
        done = {r["fraction"] for r in self.written}
        return [f for f in self.fractions if f not in done]

    def take_due(self, engine, pruning, step: int, heldout: Callable[[object], dict]) -> None:
        """Collective (every rank, the same decision: the masks agree): write the snapshots the
        model has reached after ``step``; rank 0 writes and tells every rank what it wrote."""
        if not self.unreached():  # nothing to do (the default): not even the plan
            return
        plan = pruning.effective_plan()
        fractions = self.due(plan.after.num_params())
        if not fractions:
            return
        with engine.gathered():
            canonical = gather_canonical(engine.module, pruning.arch)
        if not plan.is_identity:
            canonical = slice_state_dict(canonical, plan)
        held = heldout(engine)
        arch = plan.after
        for f in fractions:
            folder = snapshot_folder(self.cfg.run_dir, f)
            record = {"fraction": f, "step": step, "params": arch.num_params(),
                      "path": os.path.join(folder, "hf"),
                      "heldout_ppl": {d: math.exp(v) for d, v in held.items()}}
            if self.is_main:
                try:
                    paths = write_model(arch, canonical, folder, self.tokenizer, self.cfg.export)
                    record.update({k: v for k, v in paths.items() if k != "hf_dir"})
                except UserError as err:  # a lost snapshot must not end hours of training
                    record["error"] = str(err)
                    log.warning(f"[snapshot] {f:g} not written: {err}")
                self.metrics.log({"kind": "snapshot", **record})
                log.info(f"[snapshot] step {step}: {arch.num_params():,} parameters (<= {f:g} x "
                         f"{self.source_params:,}) -> {record['path']}")
            # every rank holds rank 0's record (its GGUF path, or why it wrote nothing)
            self.written.append(comm.broadcast_object(record, 0))
