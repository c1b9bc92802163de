"""bench/gpu_check.py is known to work before a GPU ever runs it: the same code path with tiny shapes on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_on_cpu_with_tiny_shapes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--tiny", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    checks = report["checks"]
    assert checks["pretrain_gpt2"]["ok"] and checks["pretrain_gpt2"]["loss_falls"]
    assert checks["exact_resume"]["identical_weights"]  # CPU fp32: bitwise
    assert all(r["identical"] == r["batch"] for r in checks["generation_vs_hf"]["rows"])
    assert checks["hellaswag_throughput"]["items_per_s"] > 0
    assert "| pretrain_gpt2 | ok" in (tmp_path / "gpu_check.md").read_text()
