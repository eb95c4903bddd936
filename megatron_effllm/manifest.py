"""``MANIFEST.json``: the size and sha256 of every file of a folder (a training checkpoint, a
megatron checkpoint), written last, so that a folder whose manifest verifies was written
completely and has not changed since.

A folder written by many processes is hashed by them in parallel: each process hashes the files it
wrote (``file_entries``, which records the writer's rank), one process writes the manifest from
all of them, and on reading each process checks the files its rank wrote (``verify_manifest``
with ``rank``/``world_size``).

It protects against crashes, full disks, truncated copies and bit rot, not against someone who
can write the folder: they can recompute it. What a file may contain is checked where it is
read (``megatron_effllm.safe_pickle``).
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Iterable, Optional, Sequence

from megatron_effllm.errors import UserError

MANIFEST = "MANIFEST.json"


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_entries(folder: str, rels: Iterable[str], rank: Optional[int] = None) -> dict:
    """``{relative path: {"bytes", "sha256"[, "rank"]}}`` of the files ``rels`` of ``folder``;
    ``rank``: the process that wrote them (it checks them on reading)."""
    out = {}
    for rel in rels:
        path = os.path.join(folder, rel)
        out[rel] = {"bytes": os.path.getsize(path), "sha256": sha256(path)}
        if rank is not None:
            out[rel]["rank"] = rank
    return out


def list_files(folder: str) -> list[str]:
    """Every file under ``folder`` but the manifest, relative to it."""
    out = []
    for root, _, names in os.walk(folder):
        out += [os.path.relpath(os.path.join(root, n), folder) for n in names if n != MANIFEST]
    return sorted(out)


def write_manifest(folder: str, entries: Optional[dict] = None) -> None:
    """Record every file under ``folder`` (atomically: written aside, then renamed). ``entries``:
    those already hashed (``file_entries``, by the processes that wrote them); the rest are
    hashed here."""
    files = dict(entries or {})
    files.update(file_entries(folder, [rel for rel in list_files(folder) if rel not in files]))
    tmp = os.path.join(folder, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"files": files}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(folder, MANIFEST))


def verify_manifest(folder: str, required: Sequence[str] = (), what: str = "checkpoint",
                    error: type = UserError, rank: int = 0, world_size: int = 1) -> list[str]:
    """The files the manifest of ``folder`` lists; ``error`` (one line) naming the first file that
    is missing, truncated or corrupted, or a ``required`` file the manifest does not list.

    Of ``world_size`` processes, process ``rank`` reads and hashes the files whose writer's rank
    is ``rank`` modulo ``world_size`` (files with no writer recorded: process 0); every process
    checks that the manifest lists the ``required`` files. The caller reports a missing manifest
    itself (what it means depends on the folder).
    """
    manifest = os.path.join(folder, MANIFEST)
    try:
        with open(manifest) as f:
            files = json.load(f)["files"]
        files = {str(rel): (int(meta["bytes"]), str(meta["sha256"]), int(meta.get("rank", 0)))
                 for rel, meta in files.items()}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError, UnicodeDecodeError):
        raise error(f"{what} manifest {manifest} is damaged") from None
    for rel, (size, digest, writer) in sorted(files.items()):
        path = os.path.join(folder, rel)
        if os.path.isabs(rel) or os.path.normpath(rel).startswith(".."):
            raise error(f"{what} manifest {manifest} lists {rel}, outside the folder; the manifest is damaged")
        if writer % world_size != rank:
            continue
        if not os.path.isfile(path):
            raise error(f"{what} file {path} is missing; the {what} is incomplete")
        actual = os.path.getsize(path)
        if actual != size:
            how = "truncated" if actual < size else "changed"
            raise error(f"{what} file {path} is {how} ({actual} of {size} bytes)")
        if sha256(path) != digest:
            raise error(f"{what} file {path} is corrupted (checksum mismatch)")
    for rel in required:
        if rel not in files:
            raise error(f"{what} manifest {manifest} does not list {rel}, which every {what} has; the "
                        f"manifest is damaged or the {what} incomplete")
    return sorted(files)
