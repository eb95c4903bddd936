"""``MANIFEST.json``: the size and sha256 of every file of a folder (a training checkpoint, a
megatron checkpoint), written last, so that a folder whose manifest verifies was written
completely and has not changed since.

It protects against crashes, full disks, truncated copies and bit rot, not against someone who
can write the folder: they can recompute it. What a file may contain is checked where it is
read (``megatron_effllm.safe_pickle``).
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Sequence

from megatron_effllm.errors import UserError

MANIFEST = "MANIFEST.json"


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: str) -> None:
    """Record every file under ``folder`` (atomically: written aside, then renamed)."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in sorted(names):
            if name == MANIFEST:
                continue
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            files[rel] = {"bytes": os.path.getsize(path), "sha256": sha256(path)}
    tmp = os.path.join(folder, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"files": files}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(folder, MANIFEST))


def verify_manifest(folder: str, required: Sequence[str] = (), what: str = "checkpoint",
                    error: type = UserError) -> list[str]:
    """The files the manifest of ``folder`` lists; ``error`` (one line) naming the first file that
    is missing, truncated or corrupted, or a ``required`` file the manifest does not list.

    The caller reports a missing manifest itself (what it means depends on the folder).
    """
    manifest = os.path.join(folder, MANIFEST)
    try:
        with open(manifest) as f:
            files = json.load(f)["files"]
        files = {str(rel): (int(meta["bytes"]), str(meta["sha256"])) for rel, meta in files.items()}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError, UnicodeDecodeError):
        raise error(f"{what} manifest {manifest} is damaged") from None
    for rel, (size, digest) in sorted(files.items()):
        path = os.path.join(folder, rel)
        if os.path.isabs(rel) or os.path.normpath(rel).startswith(".."):
            raise error(f"{what} manifest {manifest} lists {rel}, outside the folder; the manifest is damaged")
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
