"""Selectors, one per module, each registered in ``registry.SELECTORS``: from group scores and a
parameter target to a ``PrunePlan``. Users pick a strategy (``pruning/strategies.py``), which
names its selector; the selector names are internal."""
