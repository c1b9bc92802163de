"""``torchrun --nproc_per_node=2 gptforge sft`` on CPU (gloo) matches one process with the same global batch."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")  # fixtures one_thread, tiny_base: conftest.py


def _metrics(run: Path) -> tuple[list[float], list[float]]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r], [r["val_loss"] for r in rows if "val_loss" in r]


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process(tiny_base, tmp_path, data_dir):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    common = ["sft", "--checkpoint", str(tiny_base), "--data", str(data_dir / "instruct" / "instruction-data.json"),
              "--out-dir", str(tmp_path), "--limit", "80", "--style", "alpaca", "--batch-size", "4",
              "--max-steps", "3", "--eval-every", "1", "--device", "cpu", "--no-test-responses",
              "--optim.lr=1e-3"]
    # one process: 4 examples × 2 accumulation steps; two processes: 4 examples each (global 8)
    single = subprocess.run([sys.executable, "-m", "gptforge", *common, "--name", "single", "--grad-accum", "2"],
                            env=env, capture_output=True, text=True, timeout=300, check=False)
    assert single.returncode == 0, single.stderr[-3000:]
    multi = subprocess.run([torchrun, "--nproc_per_node=2", "--master_port=29541", "-m", "gptforge", *common,
                            "--name", "ddp"], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert multi.returncode == 0, multi.stdout[-3000:] + multi.stderr[-3000:]
    train_a, val_a = _metrics(tmp_path / "single")
    train_b, val_b = _metrics(tmp_path / "ddp")
    assert len(train_a) == len(train_b) == 3 and len(val_a) == len(val_b) == 4  # before training + 3 steps
    assert train_a == pytest.approx(train_b, abs=1e-5)
    assert val_a == pytest.approx(val_b, abs=1e-5)
    assert multi.stdout.count("SFT done") == 1  # only rank 0 reports
    assert (tmp_path / "ddp" / "ckpt" / "best").read_text().strip() == "step_0000003"
