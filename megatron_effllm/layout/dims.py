"""The parallel dimensions of one rank, as one value instead of four integers."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ParallelDims:
    """This rank's place in a TP x PP x DP layout (defaults: one process holds everything).

    ``tp``/``pp``/``dp`` are the group sizes, ``*_rank`` the rank within each group. Layout
    functions take a ``ParallelDims`` so a shard (tp_rank, pp_rank) of any layout can be built
    or read in one process; ``parallel.comm.dims()`` gives the running process's own.
    """

    tp_rank: int = 0
    tp: int = 1
    pp_rank: int = 0
    pp: int = 1
    dp_rank: int = 0
    dp: int = 1

    def __post_init__(self):
        for rank, size, what in ((self.tp_rank, self.tp, "tensor"), (self.pp_rank, self.pp, "pipeline"),
                                 (self.dp_rank, self.dp, "data")):
            if size < 1 or not 0 <= rank < size:
                raise ValueError(f"{what}-parallel rank {rank} is out of range for size {size}")

    @property
    def first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def replica_leader(self) -> bool:
        """TP rank 0 of the first stage: the one rank per model replica that counts a batch once."""
        return self.tp_rank == 0 and self.pp_rank == 0

    def shard(self, tp_rank: int, pp_rank: int = 0) -> "ParallelDims":
        """The same layout seen from shard (tp_rank, pp_rank)."""
        return ParallelDims(tp_rank, self.tp, pp_rank, self.pp, self.dp_rank, self.dp)
