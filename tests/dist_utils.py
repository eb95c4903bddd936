"""Run a function on N real processes (gloo) from pytest.

    def _body(rank, world_size, arg):   # top-level, so it pickles
        ...
        return something_picklable

    results = run_ranks(_body, world_size=2, args=(arg,))   # list indexed by rank

Each rank gets torch.distributed initialised over gloo on a free loopback port (``backend=None``:
only the launcher's variables, the code under test creates the group), one thread, and its own
exception re-raised in the parent with the rank's traceback. Launching costs
several seconds of imports, so group checks per launch.
"""
from __future__ import annotations

import os
import socket
import traceback

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, queue, backend):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS="1",
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        if backend is not None:
            dist.init_process_group(backend, rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        queue.put((rank, "ok", result))
    except BaseException:  # report everything, including assertion failures
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass


def run_ranks(fn, world_size: int = 2, args: tuple = (), timeout: float = 600.0, backend="gloo"):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue, backend))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results, errors = {}, []
    import queue as _q

    try:
        for _ in range(world_size):
            # After a failure, peers either fail too (collect their reports: the root cause
            # may be theirs) or hang on a collective (stop waiting soon).
            wait = 15.0 if errors else timeout
            try:
                rank, status, payload = queue.get(timeout=wait)
            except _q.Empty:
                if errors:
                    break
                raise TimeoutError(f"ranks did not finish within {timeout}s") from None
            if status == "ok":
                results[rank] = payload
            else:
                errors.append(f"--- rank {rank} ---\n{payload}")
    finally:
        for p in procs:
            p.join(timeout=5 if errors else 30)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("a rank failed:\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]
