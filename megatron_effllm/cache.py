"""Where the package caches what it downloads or converts: ``.cache/assets`` in the repository,
or the folder named by the environment variable EFFLLM_CACHE."""
from __future__ import annotations

import os

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cache_dir() -> str:
    path = os.environ.get("EFFLLM_CACHE") or os.path.join(REPO_ROOT, ".cache", "assets")
    os.makedirs(path, exist_ok=True)
    return path
