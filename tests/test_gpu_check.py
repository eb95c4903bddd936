"""The prepared GPU check runs its CPU-runnable parts end to end (tiny shapes): every section
succeeds and reports what a GPU run fills in."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_smoke(tmp_path):
    out = tmp_path / "check.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "gpu_check.py"), "--smoke",
                           "--out", str(out), "--work", str(tmp_path / "work")],
                          env=env, capture_output=True, text=True, timeout=900)
    result = json.loads(out.read_text())
    failed = {k: v.get("error") for k, v in result.items() if isinstance(v, dict) and not v["ok"]}
    assert proc.returncode == 0 and not failed, (failed, proc.stderr[-3000:])
    e2e = result["tiny_e2e"]
    assert e2e["exit_codes"] == [0, 0] and e2e["resumed"] and e2e["compactions"] >= 1
    assert e2e["heldout_losses_finite"] and 0 < e2e["final_params"]
    assert result["plain_megatron"]["tokens_per_s"] > 0 and result["env"]["bf16_matmul_peak_tflops"] > 0
    trainer = result["trainer"]
    assert trainer["strategy_none"]["tokens_per_s"] > 0 and trainer["pruning_window"]["tokens_per_s"] > 0
