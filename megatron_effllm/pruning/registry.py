"""One vocabulary for the pruning choices: saliency estimators, selectors and strategies.

Each entry is registered once, where it is defined (``@ESTIMATORS.register`` on a class in
``pruning/estimators/<name>.py``, ``@SELECTORS.register`` in ``pruning/selectors/``, the
strategies in ``pruning/strategies.py``); the config's allowed values, the command-line choices,
the README table and the dispatch in the one-shot tool and the trainer all read the registries.

A registry finds its entries by importing its home module and, for a package, every module in
it, the first time it is asked: adding an estimator is one new file (plus its test).
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Callable, Iterator, Optional

from megatron_effllm.pruning.groups import PruningError


class Registry:
    """Named entries of one kind; ``register`` takes an entry (a class is instantiated once)."""

    def __init__(self, kind: str, home: str, order: Optional[Callable[[Any], Any]] = None):
        self.kind = kind
        self._home = home
        self._order = order
        self._entries: dict[str, Any] = {}
        self._loaded = False

    def register(self, entry):
        obj = entry() if isinstance(entry, type) else entry
        if obj.name in self._entries:
            raise ValueError(f"{self.kind} {obj.name!r} is registered twice")
        self._entries[obj.name] = obj
        return entry

    def _load(self) -> None:
        # Plug-ins import this module to register themselves, so they are imported here, on first
        # use, rather than at the top (that would be a cycle).
        if self._loaded:
            return
        self._loaded = True
        home = importlib.import_module(self._home)
        for info in pkgutil.iter_modules(getattr(home, "__path__", [])):
            importlib.import_module(f"{self._home}.{info.name}")

    def entries(self, **filters) -> list:
        """Entries whose attributes equal ``filters``, in listing order."""
        self._load()
        out = [e for e in self._entries.values() if all(getattr(e, k) == v for k, v in filters.items())]
        return sorted(out, key=self._order) if self._order else out

    def names(self, **filters) -> tuple[str, ...]:
        return tuple(e.name for e in self.entries(**filters))

    def get(self, name: str):
        self._load()
        if name not in self._entries:
            raise PruningError(f"unknown {self.kind} {name!r}; use one of {', '.join(self.names())}")
        return self._entries[name]

    def __iter__(self) -> Iterator:
        return iter(self.entries())

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._entries


# training estimators first, then by name
ESTIMATORS = Registry("estimator", "megatron_effllm.pruning.estimators", order=lambda e: (not e.in_training, e.name))
SELECTORS = Registry("selector", "megatron_effllm.pruning.selectors")
STRATEGIES = Registry("strategy", "megatron_effllm.pruning.strategies")


def help_text(registry: Registry, **filters) -> str:
    """'name: description; ...' for command-line help and config field help."""
    return "; ".join(f"{e.name}: {e.description}" for e in registry.entries(**filters))


def markdown_tables() -> str:
    """The README's tables of strategies and estimators (a test keeps README equal to this)."""
    yes = lambda b: "yes" if b else "no"  # noqa: E731
    lines = ["| `prune.strategy` / `--strategy` | runs as | one-shot | what |", "|---|---|---|---|"]
    for s in STRATEGIES:
        lines.append(f"| `{s.name}` | {s.runtime} | {yes(s.oneshot)} | {s.description} |")
    lines += ["", "| `prune.estimator` / `--estimator` | needs | in training | what |", "|---|---|---|---|"]
    for e in ESTIMATORS:
        lines.append(f"| `{e.name}` | {', '.join(e.needs)} | {yes(e.in_training)} | {e.description} |")
    return "\n".join(lines) + "\n"
