"""Crashes: a rank killed at any moment (inside a checkpoint write, inside a compaction) costs
nothing but time. The survivor stops by itself with one line, and the run restarted with
resume: auto ends bit-identical to an uninterrupted one.

CI runs the reduced set: two kills chained in one run (tools/kill_resume_harness.py --quick,
about 3 minutes on 2 cores). The full set (every named kill point, two hangs, random-time kills)
runs with EFFLLM_FULL_RELIABILITY=1 (about 15 minutes), or directly as
``python tools/kill_resume_harness.py``.
"""
import json
import os
import re
import subprocess
import sys
import time

import pytest

from dist_utils import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HARNESS = os.path.join(ROOT, "tools", "kill_resume_harness.py")
FULL = os.environ.get("EFFLLM_FULL_RELIABILITY") == "1"

PEER = r"""
import os, signal, sys, time
sys.path.insert(0, {root!r})
import torch, torch.distributed as dist
from megatron_effllm.parallel.runtime import init_model_parallel
from megatron_effllm.training.faults import PeerFailure, peer_failures
from megatron.core import parallel_state as ps

init_model_parallel(1, 1, timeout_s={timeout})
x = torch.ones(1)
dist.all_reduce(x, group=ps.get_data_parallel_group())
if dist.get_rank() == 1:
    os.kill(os.getpid(), signal.{sig})
time.sleep(1)
t0 = time.time()
try:
    with peer_failures({timeout}, {logs!r}):
        dist.all_reduce(x, group=ps.get_data_parallel_group())
except PeerFailure as err:
    print(f"after {{time.time() - t0:.1f}} s: error: {{err}}", file=sys.stderr, flush=True)
    os._exit(1)
"""


@pytest.mark.parametrize("sig, words", [
    ("SIGKILL", "a peer process closed its connection: it most likely crashed or was killed"),
    ("SIGSTOP", "no answer from another rank within 5 s (parallel.comm_timeout_s): a peer hung"),
])
def test_survivor_of_a_lost_peer_exits_with_one_line(sig, words, tmp_path):
    """A dead peer fails the survivor's collective at once, a hung one after the timeout (5 s
    here); either way the survivor ends by itself with one line saying what to do, naming the
    original error and the log holding its traceback."""
    logs = str(tmp_path / "logs")
    port = free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-c", PEER.format(root=ROOT, timeout=5, sig=sig, logs=logs)],
                                      env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    try:
        _, stderr = procs[0].communicate(timeout=120)
    finally:
        procs[1].kill()
        procs[1].wait()
    last = stderr.strip().splitlines()[-1]
    assert procs[0].returncode == 1, stderr[-2000:]
    waited = float(last.split()[1])
    assert waited < 3 if sig == "SIGKILL" else 4 < waited < 30, last
    message = last.split(" s: ", 1)[1]
    assert message.startswith("error: rank 0 of 2 lost contact with the other ranks: ") and words in message
    assert "resume: auto" in message
    log_file = os.path.join(logs, "rank_0.log")
    assert re.search(r" \(\w*(Error|Exception)\w*: ", message) and f"full traceback in {log_file})" in message
    with open(log_file) as f:
        assert "Traceback (most recent call last)" in f.read()

LATE_PEER = r"""
import os, sys, time
sys.path.insert(0, {root!r})
if os.environ["RANK"] == "1":
    time.sleep({delay})
import torch, torch.distributed as dist
from megatron_effllm.parallel.runtime import init_model_parallel
init_model_parallel(1, 1, timeout_s={timeout})
x = torch.ones(1)
dist.all_reduce(x)
print(int(x.item()))
"""


def test_a_late_rank_joins_although_collectives_time_out_sooner():
    """Ranks start with skew: the rendezvous waits longer than a collective (here a rank arrives
    6 s late under a 2 s collective timeout) and the job runs."""
    port = free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-c", LATE_PEER.format(root=ROOT, delay=6, timeout=2)],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
        assert out.strip() == "2"



def test_kill_and_resume_end_identical(tmp_path):
    """Two uninterrupted runs are bit-identical (CPU determinism); every killed run, resumed,
    ends with the same architecture and weights; every survivor exits with the one line."""
    report_path = tmp_path / "report.json"
    cmd = [sys.executable, HARNESS, "--work", str(tmp_path / "work"), "--json", str(report_path)]
    if not FULL:
        cmd.append("--quick")
    t0 = time.time()
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=3600 if FULL else 900)
    print(res.stdout)
    assert report_path.exists(), res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["determinism"] == "identical"
    named = [c for c in report["cases"] if not c["kill"].startswith("kill after")]
    assert all(c["reached"] for c in named), named
    for case in report["cases"]:
        assert case["result"].startswith("identical"), case
        if case["reached"] and case["survivor"] != "finished":
            assert case["survivor"] == "exited, one-line message", case
            assert case["message"].startswith("error: rank ") and "lost contact" in case["message"], case
    assert report["total"] >= (10 if FULL else 2)
    if not FULL:  # the chain resumed twice: from the last checkpoint before each kill
        assert [c["resumed_from"] for c in report["cases"]] == ["step_000004", "step_000008"]
    assert res.returncode == 0, res.stdout[-3000:]
    print(f"harness: {time.time() - t0:.0f} s")
