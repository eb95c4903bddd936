"""Megatron checkpoint folders: megatron-core ``dist_checkpointing`` weights + architecture.

Folder layout::

    <ckpt>/effllm_checkpoint.json   format tag, dtype, the TP/PP layout it was written for
    <ckpt>/architecture.json        the Architecture (per-layer widths)
    <ckpt>/model/                   megatron-core dist_checkpointing (torch_dist) weights
    <ckpt>/tokenizer/               tokenizer files copied from the source model (optional)
    <ckpt>/MANIFEST.json            size and sha256 of every file above (written last)

dist_checkpointing stores every tensor once, as a global tensor under a layout-free key, so a
checkpoint written at one TP/PP layout loads at any other: each rank reads the slices its own
model shard needs. Saving and loading are collective over all ranks (``torch.distributed``;
a one-process group is created when none exists). dist_checkpointing may start worker
processes, so scripts calling these functions need an ``if __name__ == "__main__":`` guard.

Writes are atomic: everything goes to a hidden sibling ``.<name>.partial-*`` folder that is
renamed when complete.

Reading verifies the manifest (a damaged or changed byte anywhere is named) and checks the
pickled parts before megatron reads them: ``model/.metadata`` may name only torch's
distributed-checkpoint metadata classes, and every ``.pt`` file only tensors and plain values
(``megatron_effllm.safe_pickle``); a file naming anything else is refused in one line.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from typing import Optional, Union

import torch
from megatron.core import dist_checkpointing, parallel_state

from megatron_effllm.architecture import Architecture
from megatron_effllm.convert.hf_io import TOKENIZER_FILES
from megatron_effllm.errors import UserError
from megatron_effllm.layout import TE, check_state_dict, from_megatron, megatron_shapes, stage_layer_counts
from megatron_effllm.manifest import MANIFEST as CHECKSUMS, verify_manifest, write_manifest
from megatron_effllm.model.builder import build_gpt_model
from megatron_effllm.model.weights import load_canonical, local_state_dict
from megatron_effllm.parallel import comm
from megatron_effllm.parallel.runtime import init_model_parallel
from megatron_effllm.safe_pickle import check_torch_file, load_dcp_metadata

FORMAT = "megatron_effllm.megatron_checkpoint/1"
MANIFEST = "effllm_checkpoint.json"
ARCH_FILE = "architecture.json"
WEIGHTS_DIR = "model"
TOKENIZER_DIR = "tokenizer"
META_FILE = f"{WEIGHTS_DIR}/.metadata"  # torch distributed checkpoint's index (a pickle)
# What every checkpoint has (dist_checkpointing's own files next to the .distcp shards).
REQUIRED = (MANIFEST, ARCH_FILE, META_FILE, f"{WEIGHTS_DIR}/metadata.json", f"{WEIGHTS_DIR}/common.pt")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _broadcast_error(err: Optional[str]) -> None:
    """Raise the same UserError on every rank when rank 0 found a problem."""
    err = comm.broadcast_object(err, 0)
    if err:
        raise UserError(err)


def checkpoint_tensor_shapes(arch: Architecture) -> dict[str, tuple[int, ...]]:
    """Global tensor keys and shapes a checkpoint of ``arch`` holds: the TP=PP=1 layout, norm
    weights under the TransformerEngine names in both naming styles."""
    return megatron_shapes(arch, style=TE)


# ----------------------------------------------------------------------------- reading
def read_checkpoint_info(ckpt_dir: str) -> tuple[Architecture, dict]:
    """(Architecture, manifest) of a checkpoint folder; UserError if it is not one."""
    if not os.path.isdir(ckpt_dir):
        raise UserError(f"checkpoint folder {ckpt_dir} does not exist")
    manifest_path = os.path.join(ckpt_dir, MANIFEST)
    if not os.path.isfile(manifest_path):
        raise UserError(
            f"{ckpt_dir} is not a megatron_effllm checkpoint ({MANIFEST} missing); "
            "write one with effllm-convert-megatron"
        )
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{manifest_path} is unreadable ({err}); the checkpoint is damaged") from None
    if manifest.get("format") != FORMAT:
        raise UserError(
            f"{manifest_path}: unsupported checkpoint format {manifest.get('format')!r} "
            f"(expected {FORMAT})"
        )
    arch = Architecture.load(os.path.join(ckpt_dir, ARCH_FILE))
    return arch, manifest


def verify_checkpoint(ckpt_dir: str, arch: Optional[Architecture] = None) -> None:
    """Check every file against the manifest, the pickled files for what they may hold (nothing
    that runs code), and that every tensor the architecture needs is present with its shape."""
    if arch is None:
        arch, _ = read_checkpoint_info(ckpt_dir)
    weights = os.path.join(ckpt_dir, WEIGHTS_DIR)
    meta_file = os.path.join(weights, ".metadata")
    if not os.path.isfile(os.path.join(ckpt_dir, CHECKSUMS)):
        raise UserError(f"checkpoint {ckpt_dir} has no {CHECKSUMS}: it was not completely written; "
                        "write it again with effllm-convert-megatron")
    listed = verify_manifest(ckpt_dir, REQUIRED)
    meta = load_dcp_metadata(meta_file)
    for rel in listed:
        if rel.endswith(".pt"):
            check_torch_file(os.path.join(ckpt_dir, rel))
    needed: dict[str, int] = {}
    for info in meta.storage_data.values():
        end = info.offset + info.length
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for rel, end in sorted(needed.items()):
        path = os.path.join(weights, rel)
        if not os.path.isfile(path):
            raise UserError(f"weight file {path} is missing; the checkpoint is incomplete")
        if os.path.getsize(path) < end:
            raise UserError(
                f"weight file {path} is truncated ({os.path.getsize(path)} of {end} bytes); "
                "the checkpoint is incomplete"
            )
    stored = {
        k: tuple(v.size) for k, v in meta.state_dict_metadata.items() if hasattr(v, "size")
    }
    for key, shape in checkpoint_tensor_shapes(arch).items():
        if key not in stored:
            raise UserError(
                f"{meta_file}: tensor {key} is missing; the weights do not match {ARCH_FILE}"
            )
        if stored[key] != shape:
            raise UserError(
                f"{meta_file}: tensor {key} has shape {stored[key]}, {ARCH_FILE} needs {shape}; "
                "the weights do not match the architecture"
            )


def load_into_model(model: torch.nn.Module, ckpt_dir: str, arch: Optional[Architecture] = None) -> Architecture:
    """Load a checkpoint into this rank's shard of ``model`` (collective over all ranks).

    ``arch`` (the model's architecture), when given, must equal the checkpoint's.
    """
    err = None
    ck_arch = None
    if comm.global_rank() == 0:
        try:
            ck_arch, _ = read_checkpoint_info(ckpt_dir)
            verify_checkpoint(ckpt_dir, ck_arch)
            if arch is not None and arch != ck_arch:
                err = (
                    f"checkpoint {ckpt_dir} holds architecture [{ck_arch.widths_summary()}], "
                    f"the model is [{arch.widths_summary()}]; build the model from the checkpoint's "
                    f"{ARCH_FILE}"
                )
        except UserError as e:
            err = str(e)
    _broadcast_error(err)
    if ck_arch is None:
        ck_arch, _ = read_checkpoint_info(ckpt_dir)
    loaded = dist_checkpointing.load(model.sharded_state_dict(), os.path.join(ckpt_dir, WEIGHTS_DIR))
    model.load_state_dict(loaded, strict=True)
    return ck_arch


def load_megatron_model(
    ckpt_dir: str,
    tp: Optional[int] = None,
    pp: Optional[int] = None,
    *,
    params_dtype: Optional[torch.dtype] = None,
    use_te: Optional[bool] = None,
):
    """(Architecture, this rank's GPTModel shard) from a checkpoint, at any TP/PP layout.

    ``tp``/``pp`` (re)initialise megatron's groups; when omitted the current groups are used
    (one process, TP=PP=1 if none exist). ``params_dtype`` defaults to the stored dtype.
    """
    arch, manifest = read_checkpoint_info(ckpt_dir)
    if tp is not None or pp is not None or not parallel_state.model_parallel_is_initialized():
        init_model_parallel(tp=tp or 1, pp=pp or 1)
    if params_dtype is None:
        params_dtype = _DTYPES.get(manifest.get("dtype"), torch.float32)
    model = build_gpt_model(arch, params_dtype=params_dtype, use_te=use_te, init_weights=False)
    load_into_model(model, ckpt_dir, arch)
    return arch, model


def load_megatron_checkpoint(ckpt_dir: str, tp: Optional[int] = None, pp: Optional[int] = None):
    """(Architecture, this rank's megatron state dict) at the given TP/PP layout.

    The state dict has the model's names (local spec, or TE names where TE is used), layer
    indices local to this rank's pipeline stage, no ``_extra_state``.
    """
    arch, model = load_megatron_model(ckpt_dir, tp, pp)
    return arch, {k: v.detach().clone() for k, v in local_state_dict(model).items()}


def load_canonical_checkpoint(ckpt_dir: str) -> tuple[Architecture, dict[str, torch.Tensor], Optional[str]]:
    """(Architecture, canonical HF-named state dict, tokenizer folder or None), read in this
    process at TP=PP=1."""
    arch, local = load_megatron_checkpoint(ckpt_dir, tp=1, pp=1)
    tok = os.path.join(ckpt_dir, TOKENIZER_DIR)
    return arch, from_megatron(arch, {(0, 0): local}, 1, 1), tok if os.path.isdir(tok) else None


# ----------------------------------------------------------------------------- writing
def save_megatron_checkpoint(
    model_or_sharded_sd: Union[torch.nn.Module, dict],
    arch: Architecture,
    out_dir: str,
    tokenizer_src: Optional[str] = None,
    *,
    dtype: Optional[torch.dtype] = None,
    layout: Optional[tuple[int, int]] = None,
) -> None:
    """Write a checkpoint folder from a (sharded) GPTModel or its ``sharded_state_dict()``.

    Collective over all ranks. ``out_dir`` must not exist yet. ``dtype`` and ``layout``
    (tp, pp) are recorded in the manifest; by default they are read from the model and
    megatron's groups.
    """
    out_dir = os.path.abspath(out_dir)
    err = None
    box = [None]
    if comm.global_rank() == 0:
        if os.path.exists(out_dir):
            err = f"output folder {out_dir} already exists; choose a new folder or remove it"
        elif tokenizer_src is not None and not os.path.isdir(tokenizer_src):
            err = f"tokenizer folder {tokenizer_src} does not exist"
        else:
            parent, base = os.path.split(out_dir)
            box[0] = os.path.join(parent, f".{base}.partial-{uuid.uuid4().hex[:8]}")
            try:
                os.makedirs(os.path.join(box[0], WEIGHTS_DIR))
            except OSError as e:
                err = f"cannot create {box[0]} ({e.strerror}); check the output path and permissions"
    _broadcast_error(err)
    tmp = comm.broadcast_object(box[0], 0)
    try:
        if isinstance(model_or_sharded_sd, torch.nn.Module):
            if dtype is None:
                dtype = next(model_or_sharded_sd.parameters()).dtype
            sharded = model_or_sharded_sd.sharded_state_dict()
        else:
            sharded = model_or_sharded_sd
        if layout is None and parallel_state.model_parallel_is_initialized():
            layout = (
                parallel_state.get_tensor_model_parallel_world_size(),
                parallel_state.get_pipeline_model_parallel_world_size(),
            )
        dist_checkpointing.save(sharded, os.path.join(tmp, WEIGHTS_DIR))
        comm.barrier()
        err = None
        if comm.global_rank() == 0:
            try:
                _finish(tmp, out_dir, arch, tokenizer_src, dtype, layout)
            except UserError as e:
                err = str(e)
        _broadcast_error(err)
    except BaseException:
        if comm.global_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _finish(tmp, out_dir, arch, tokenizer_src, dtype, layout) -> None:
    """Rank 0: architecture, tokenizer and manifest next to the weights, verify, rename."""
    arch.save(os.path.join(tmp, ARCH_FILE))
    if tokenizer_src is not None:
        os.makedirs(os.path.join(tmp, TOKENIZER_DIR))
        for name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(tokenizer_src, name)):
                shutil.copyfile(os.path.join(tokenizer_src, name), os.path.join(tmp, TOKENIZER_DIR, name))
    names = {v: k for k, v in _DTYPES.items()}
    manifest = {
        "format": FORMAT,
        "dtype": names.get(dtype, "float32") if dtype is not None else None,
        # The layout it was written from / meant for; it loads at any other.
        "tensor_parallel": layout[0] if layout else None,
        "pipeline_parallel": layout[1] if layout else None,
        "num_params": arch.num_params(),
    }
    with open(os.path.join(tmp, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=2)
    write_manifest(tmp)
    verify_checkpoint(tmp, arch)
    os.replace(tmp, out_dir)


def check_layout(arch: Architecture, tp: int, pp: int) -> None:
    """UserError unless ``arch`` can be split over ``tp`` x ``pp`` ranks."""
    if tp < 1 or pp < 1:
        raise UserError(f"tensor/pipeline parallel sizes must be >= 1, got tp={tp} pp={pp}")
    arch.validate(tensor_parallel=tp)
    if arch.vocab_size % tp:
        raise UserError(
            f"vocab size {arch.vocab_size} is not divisible by tensor parallel size {tp}; "
            "choose a TP size that divides the vocabulary"
        )
    stage_layer_counts(arch.num_layers, pp)


def save_canonical_checkpoint(
    arch: Architecture,
    state_dict: dict,
    out_dir: str,
    tokenizer_src: Optional[str] = None,
    *,
    dtype: torch.dtype = torch.float32,
    tp: int = 1,
    pp: int = 1,
) -> None:
    """Write a checkpoint from a canonical state dict, in this process (no model sharding is
    needed: the stored tensors are global). ``tp``/``pp`` are checked against the
    architecture and recorded as the layout the checkpoint is meant for; it loads at any.

    Uses megatron's groups at TP=PP=1 (initialised here if needed).
    """
    check_layout(arch, tp, pp)
    check_state_dict(arch, state_dict, "canonical state dict")
    if not (
        parallel_state.model_parallel_is_initialized()
        and parallel_state.get_tensor_model_parallel_world_size() == 1
        and parallel_state.get_pipeline_model_parallel_world_size() == 1
    ):
        init_model_parallel(1, 1)
    model = build_gpt_model(arch, params_dtype=dtype, init_weights=False, use_te=False)
    load_canonical(model, arch, state_dict)
    save_megatron_checkpoint(model, arch, out_dir, tokenizer_src, dtype=dtype, layout=(tp, pp))
