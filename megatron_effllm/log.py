"""Logging for the package: one ``megatron_effllm`` logger tree, each line prefixed with the rank.

Modules take ``log = get_logger(__name__)``. ``setup_logging()`` (the CLIs call it) installs one
stream handler on the package's root logger; by default only global rank 0 prints INFO, the
others WARNING and above, so an N-rank run does not print every line N times. The progress bar
(tqdm) writes to the terminal itself.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Optional

ROOT = "megatron_effllm"


def get_logger(name: str) -> logging.Logger:
    """The logger of module ``name`` (``__name__``), under the package's root logger."""
    return logging.getLogger(name if name.startswith(ROOT) else f"{ROOT}.{name}")


def _rank() -> int:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except ImportError:
        pass
    return int(os.environ.get("RANK", "0"))


class _RankFilter(logging.Filter):
    """Adds ``record.rank`` (read at emit time: the process group may start after setup)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = _rank()
        return True


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is at emit time (pytest's capture, a redirect)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):
        pass


class _QuietNonZeroRanks(logging.Filter):
    def __init__(self, all_ranks: bool):
        super().__init__()
        self.all_ranks = all_ranks

    def filter(self, record: logging.LogRecord) -> bool:
        return self.all_ranks or record.levelno >= logging.WARNING or getattr(record, "rank", 0) == 0


def setup_logging(level: int = logging.INFO, *, all_ranks: Optional[bool] = None, stream=None) -> logging.Logger:
    """Configure the package logger once (idempotent). ``all_ranks`` (default: the environment
    variable EFFLLM_LOG_ALL_RANKS=1) lets every rank print INFO lines."""
    if all_ranks is None:
        all_ranks = os.environ.get("EFFLLM_LOG_ALL_RANKS", "0") == "1"
    logger = logging.getLogger(ROOT)
    for h in list(logger.handlers):
        if getattr(h, "_effllm", False):
            logger.removeHandler(h)
    handler = logging.StreamHandler(stream) if stream is not None else _StdoutHandler()
    handler._effllm = True  # type: ignore[attr-defined]
    handler.addFilter(_RankFilter())
    handler.addFilter(_QuietNonZeroRanks(all_ranks))
    handler.setFormatter(logging.Formatter("[rank%(rank)s] %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return logger
