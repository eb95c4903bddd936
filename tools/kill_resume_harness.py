#!/usr/bin/env python
"""Kill-and-resume harness: SIGKILL one rank of a 2-rank CPU run, restart it with resume: auto,
and check that the final architecture and weights equal those of an uninterrupted run.

    python tools/kill_resume_harness.py                  # the full set (14 kill points, ~15 min on 2 cores)
    python tools/kill_resume_harness.py --quick          # the CI set: two kills chained in one run
    python tools/kill_resume_harness.py --random 6 --seed 7 --named none

Every launch is two real processes (effllm-train with RANK/WORLD_SIZE set, as a
launcher starts them), so a kill is a real SIGKILL. Two kinds of kill:
  named   the rank kills itself at a point inside the trainer (EFFLLM_KILL_AT, see
          megatron_effllm/training/fault_injection.py): inside a checkpoint write, inside a compaction...;
          two of them stop the rank (SIGSTOP) instead: a hung peer, noticed by the timeout
  random  the harness kills a random rank after a random delay
For each kill the surviving rank must exit by itself (within parallel.comm_timeout_s) with one
line saying it lost contact; then both ranks are restarted with resume: auto. Two uninterrupted
reference runs are made first; that they are bit-identical is the CPU determinism check.
Prints a table; --json writes the same as JSON. Exit code 0 when every case ended identical.
"""
import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

from megatron_effllm.errors import UserError, cli_entry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = os.path.join(ROOT, "configs", "tiny_cpu.yaml")
# 16 steps: checkpoints at 4, 8, 12, 16; prune events 3..12; compactions at events 3, 6, 9 and
# at the end of the window (steps 5, 8, 11, 12).
OVERRIDES = ["train.steps=16", "train.checkpoint_interval=4", "train.log_interval=1",
             "train.keep_checkpoints=2", "prune.start_step=2", "prune.end_step=12",
             "prune.compact_every=3", "data.dynamic_interval=4", "export.hf_dtype=fp32",
             "train.progress_bar=false"]
COMM_TIMEOUT_S = 60
# (point, step, rank, signal): every named point at least once; checkpoint points on rank 0
# where only rank 0 acts, the others on both ranks; two hangs (SIGSTOP).
NAMED = [
    ("ckpt.after_engine_save", 8, 1, "KILL"),
    ("ckpt.after_manifest", 8, 0, "KILL"),
    ("ckpt.after_rename", 12, 0, "KILL"),
    ("ckpt.after_latest", 4, 0, "KILL"),
    ("compact.after_gather", 5, 1, "KILL"),
    ("compact.after_destroy", 11, 0, "KILL"),
    ("prune.after_event", 10, 1, "KILL"),
    ("step.end", 14, 0, "KILL"),
    ("ckpt.after_engine_save", 4, 0, "STOP"),
    ("step.end", 6, 1, "STOP"),
]
QUICK_CHAIN = [("ckpt.after_engine_save", 8, 1, "KILL"), ("compact.after_destroy", 11, 0, "KILL")]
RANK_PREFIX = re.compile(r"^\[rank\d+\] ")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Launch:
    """Two ranks of effllm-train on one run directory."""

    def __init__(self, run_dir: str, tag: str, kill_at: str = "", kill_signal: str = "KILL", extra=()):
        self.run_dir = run_dir
        self.tag = tag
        port = free_port()
        self.procs, self.logs = [], []
        os.makedirs(os.path.dirname(run_dir), exist_ok=True)
        for rank in range(2):
            env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                       PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
            env.pop("EFFLLM_KILL_AT", None)
            env.pop("EFFLLM_INJECT_NONFINITE", None)
            env["EFFLLM_KILL_SIGNAL"] = kill_signal
            if kill_at:
                env["EFFLLM_KILL_AT"] = kill_at
            log = f"{run_dir}.{tag}.rank{rank}.log"
            self.logs.append(log)
            with open(log, "w") as f:
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "megatron_effllm.cli.train", "--config", CONFIG,
                     f"run_dir={run_dir}", f"parallel.comm_timeout_s={COMM_TIMEOUT_S}", *OVERRIDES, *extra],
                    cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT))
        self.t0 = time.time()

    def wait(self, timeout: float) -> list:
        deadline = time.time() + timeout
        for p in self.procs:
            try:
                p.wait(timeout=max(1.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
        return [p.poll() for p in self.procs]

    def kill_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()  # SIGKILL ends a stopped process too
                p.wait()

    def stopped(self, rank: int) -> bool:
        try:
            with open(f"/proc/{self.procs[rank].pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] == "T"
        except OSError:
            return False

    def log_lines(self, rank: int) -> list:
        """The rank's output lines, without the logger's "[rankN] " prefix."""
        with open(self.logs[rank], errors="replace") as f:
            return [RANK_PREFIX.sub("", l.rstrip("\n")) for l in f if l.strip()]

    def last_step(self) -> int:
        steps = [int(l.split()[1].split("/")[0]) for l in self.log_lines(0) if l.startswith("step ")]
        return steps[-1] if steps else 0

    def resumed_from(self) -> str:
        for line in self.log_lines(0):
            if line.startswith("[resume] continuing from"):
                return os.path.basename(line.split()[3])
        return "start"


def final_weights(run_dir: str):
    from safetensors.torch import load_file

    with open(os.path.join(run_dir, "final", "architecture.json")) as f:
        arch = json.load(f)
    return arch, load_file(os.path.join(run_dir, "final", "hf", "model.safetensors"))


def compare(run_a: str, run_b: str) -> str:
    """identical | DIFFERENT (what) | no result."""
    try:
        arch_a, w_a = final_weights(run_a)
        arch_b, w_b = final_weights(run_b)
    except (OSError, ValueError) as err:
        return f"no result ({type(err).__name__})"
    if arch_a != arch_b:
        return "DIFFERENT (architecture)"
    if set(w_a) != set(w_b):
        return "DIFFERENT (tensor names)"
    for k in sorted(w_a):
        if w_a[k].shape != w_b[k].shape or not bool((w_a[k] == w_b[k]).all()):
            diff = (w_a[k].float() - w_b[k].float()).abs().max().item() if w_a[k].shape == w_b[k].shape else "shape"
            return f"DIFFERENT ({k}: max abs diff {diff})"
    return "identical"


def survivor_verdict(launch: Launch, killed: int) -> tuple[str, str]:
    """(how the other rank ended, its last line)."""
    other = 1 - killed
    rc = launch.procs[other].poll()
    lines = launch.log_lines(other)
    last = lines[-1] if lines else ""
    if rc is None:
        return "HUNG", last
    if rc == 0:
        return "finished", last
    ok = last.startswith("error: ") and "lost contact" in last
    return ("exited, one-line message" if ok else f"exited rc={rc}, unclear message"), last


def run_reference(work: str, n: int, timeout: float, concurrent: bool) -> tuple[list, float]:
    """``n`` uninterrupted runs, at once or one after the other; (their run dirs, wall seconds
    of one run when sequential, of all when concurrent)."""
    launches, t0 = [], time.time()
    for i in range(n):
        launches.append(Launch(os.path.join(work, f"reference{i}"), "run"))
        if not concurrent:
            launches[-1].wait(timeout)
    for l in launches:
        l.wait(timeout)
    wall = (time.time() - t0) / (1 if concurrent else n)
    for l in launches:
        rcs = l.wait(timeout)
        if rcs != [0, 0]:
            l.kill_all()
            tail = "\n".join(l.log_lines(0)[-15:])
            raise SystemExit(f"reference run {l.run_dir} failed (exit codes {rcs}):\n{tail}")
    return [l.run_dir for l in launches], wall


def kill_case(run_dir: str, tag: str, timeout: float, *, named=None, delay=None, rank=None) -> dict:
    """One launch killed (by a named point or after ``delay`` s); returns what happened."""
    kill_at = f"{named[0]}@{named[1]}:{named[2]}" if named else ""
    launch = Launch(run_dir, tag, kill_at=kill_at, kill_signal=named[3] if named else "KILL")
    if named:
        rank, stop = named[2], named[3] == "STOP"
        deadline = time.time() + timeout
        while time.time() < deadline and launch.procs[rank].poll() is None and not (stop and launch.stopped(rank)):
            time.sleep(0.2)
        reached = launch.stopped(rank) if stop else launch.procs[rank].poll() == -signal.SIGKILL
        if reached:  # the survivor gets the timeout to notice, and a margin
            try:
                launch.procs[1 - rank].wait(timeout=COMM_TIMEOUT_S + 60)
            except subprocess.TimeoutExpired:
                pass
        else:
            launch.wait(timeout)
    else:
        reached = False
        deadline = time.time() + delay
        while time.time() < deadline and launch.procs[rank].poll() is None:
            time.sleep(0.05)
        if launch.procs[rank].poll() is None:
            launch.procs[rank].send_signal(signal.SIGKILL)
            reached = True
        launch.wait(COMM_TIMEOUT_S + 60 if reached else timeout)
    survivor, message = survivor_verdict(launch, rank) if reached else ("-", "")
    step = launch.last_step()
    launch.kill_all()  # a hung survivor (reported above) must not block the resume
    what = (f"{'hang' if named[3] == 'STOP' else 'kill'} {named[0]}@{named[1]}" if named
            else f"kill after {delay:.1f}s")
    return {"kill": what,
            "rank": rank, "reached": reached, "step": step, "survivor": survivor, "message": message,
            "started_from": launch.resumed_from()}


def resume_case(run_dir: str, tag: str, timeout: float) -> tuple[bool, str]:
    launch = Launch(run_dir, tag)
    rcs = launch.wait(timeout)
    launch.kill_all()
    return rcs == [0, 0], launch.resumed_from()


def print_table(rows: list) -> None:
    head = ("#", "kill", "rank", "last logged step", "survivor", "resumed from", "result")
    table = [head] + [(str(i + 1), r["kill"], str(r["rank"]), str(r["step"]) if r["reached"] else "-",
                       r["survivor"], r.get("resumed_from", "-"), r["result"]) for i, r in enumerate(rows)]
    widths = [max(len(row[c]) for row in table) for c in range(len(head))]
    for j, row in enumerate(table):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def parse_named(text: str) -> list:
    if text == "all":
        return list(NAMED)
    if text == "none":
        return []
    from megatron_effllm.training.fault_injection import KILL_POINTS

    out = []
    for item in text.split(","):
        try:
            point, rest = item.split("@")
            parts = rest.split(":")
            step, rank = int(parts[0]), int(parts[1])
            sig = parts[2].upper() if len(parts) > 2 else "KILL"
            if len(parts) > 3 or sig not in ("KILL", "STOP"):
                raise ValueError
        except (ValueError, IndexError):
            raise UserError(f"--named item {item!r} must look like POINT@STEP:RANK or POINT@STEP:RANK:STOP, "
                            "e.g. ckpt.after_engine_save@8:1") from None
        if point not in KILL_POINTS:
            raise UserError(f"--named: unknown kill point {point!r}; known: {', '.join(KILL_POINTS)}")
        if rank not in (0, 1) or not 1 <= step <= 16:
            raise UserError(f"--named item {item!r}: rank must be 0 or 1 and step in 1..16")
        out.append((point, step, rank, sig))
    return out


@cli_entry
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--work", default=os.path.join(ROOT, "runs", "kill_resume"),
                    help="folder for the runs (emptied first; default runs/kill_resume)")
    ap.add_argument("--quick", action="store_true",
                    help="the CI set: kills at %s chained in one run" % ", ".join(f"{p}@{s}" for p, s, _, _ in QUICK_CHAIN))
    ap.add_argument("--named", default="all",
                    help="named kill points POINT@STEP:RANK[:STOP],... or all (default) or none")
    ap.add_argument("--random", type=int, default=4,
                    help="random-time kills, alternating ranks (default 4)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random kills (default 0)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds one launch may take (default 600)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if args.random < 0:
        raise UserError(f"--random must be >= 0, got {args.random}")
    if args.timeout <= 0:
        raise UserError(f"--timeout must be positive, got {args.timeout}")
    named = parse_named(args.named)
    if not args.quick and not named and args.random == 0:
        raise UserError("nothing to do: give --named points, --random N > 0 or --quick")
    if os.path.exists(args.work):
        shutil.rmtree(args.work)
    os.makedirs(args.work)

    refs, ref_wall = run_reference(args.work, 2, args.timeout, concurrent=args.quick)
    determinism = compare(refs[0], refs[1])
    print(f"reference: two uninterrupted runs ({ref_wall:.0f} s); same seed and config: {determinism}",
          flush=True)
    rows = []
    if args.quick:
        run_dir = os.path.join(args.work, "chain")
        # Start from the reference's tokenized data: this case is about the kills, and it saves
        # a minute of CI time (the full set tokenizes in every case).
        shutil.copytree(os.path.join(refs[0], "data", "train"), os.path.join(run_dir, "data", "train"))
        shutil.copytree(os.path.join(refs[0], "data", "heldout"), os.path.join(run_dir, "data", "heldout"))
        for i, point in enumerate(QUICK_CHAIN):
            row = kill_case(run_dir, f"kill{i}", args.timeout, named=point)
            rows.append(row)
            print(f"  {row['kill']} on rank {row['rank']}: survivor {row['survivor']}", flush=True)
            if not row["reached"]:
                break
        ok, resumed = resume_case(run_dir, "final", args.timeout)
        result = compare(refs[0], run_dir) if ok else "resume FAILED"
        starts = [r["started_from"] for r in rows[1:]] + [resumed]
        for row, start in zip(rows, starts):
            row["result"], row["resumed_from"] = result, start
    else:
        rng = random.Random(args.seed)
        cases = [("named", p) for p in named]
        cases += [("random", (rng.uniform(3.0, 0.9 * ref_wall), i % 2)) for i in range(args.random)]
        for i, (kind, spec) in enumerate(cases):
            run_dir = os.path.join(args.work, f"case{i + 1:02d}")
            if kind == "named":
                row = kill_case(run_dir, "kill", args.timeout, named=spec)
            else:
                row = kill_case(run_dir, "kill", args.timeout, delay=spec[0], rank=spec[1])
            ok, row["resumed_from"] = resume_case(run_dir, "resume", args.timeout)
            row["result"] = compare(refs[0], run_dir) if ok else "resume FAILED"
            if not row["reached"] and row["result"] == "identical":
                row["result"] = "identical (not killed: the run ended first)"
            rows.append(row)
            print(f"  [{i + 1}/{len(cases)}] {row['kill']} rank {row['rank']}: {row['result']}", flush=True)
    print()
    print_table(rows)
    identical = sum(r["result"] == "identical" for r in rows)
    clean_exits = sum(r["survivor"] in ("exited, one-line message", "finished", "-") for r in rows)
    print(f"\n{identical}/{len(rows)} resumed runs identical to the uninterrupted run; "
          f"{clean_exits}/{len(rows)} survivors exited by themselves; determinism: {determinism}")
    report = {"determinism": determinism, "reference_seconds": ref_wall, "cases": rows,
              "identical": identical, "total": len(rows)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    good = identical == len(rows) and clean_exits == len(rows) and determinism == "identical"
    raise SystemExit(0 if good else 1)


if __name__ == "__main__":
    main()
