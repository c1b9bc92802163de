"""``torchrun --nproc_per_node=2`` on CPU (gloo) matches one process with the same global batch."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process(shakespeare_shards, tmp_path, small_config, cli_args,
                                                  losses):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    cfg = small_config(shakespeare_shards, tmp_path, "single", steps=4)
    cfg.eval.interval = 2
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    # one process: micro-batch 4 × 2 accumulation steps; two processes: micro-batch 4 × 1 each (global 8)
    single = subprocess.run([sys.executable, "-m", "gptforge", "pretrain", *cli_args(cfg)], env=env,
                            capture_output=True, text=True, timeout=300, check=False)
    assert single.returncode == 0, single.stderr
    multi = subprocess.run([torchrun, "--nproc_per_node=2", "--master_port=29533", "-m", "gptforge", "pretrain",
                            *cli_args(cfg), "--name=ddp"], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert multi.returncode == 0, multi.stdout[-3000:] + multi.stderr[-3000:]
    assert "accumulation 1" in multi.stdout and "× 2" in multi.stdout
    a, b = losses(tmp_path / "single"), losses(tmp_path / "ddp")
    assert len(a) == len(b) == 4
    assert a == pytest.approx(b, abs=1e-5)
    val = [[json.loads(x).get("val_loss") for x in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
           for n in ("single", "ddp")]
    assert [v for v in val[0] if v] == pytest.approx([v for v in val[1] if v], abs=1e-5)
    wa = load_file(str(tmp_path / "single" / "ckpt" / "step_0000004" / "model.safetensors"))
    wb = load_file(str(tmp_path / "ddp" / "ckpt" / "step_0000004" / "model.safetensors"))
    assert wa.keys() == wb.keys()  # no "module." prefix from DDP
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


@pytest.mark.slow
def test_torchrun_fsdp2_matches_one_process_and_saves_full_weights(shakespeare_shards, tmp_path, small_config,
                                                                   cli_args, losses):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    cfg = small_config(shakespeare_shards, tmp_path, "single", steps=3)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    single = subprocess.run([sys.executable, "-m", "gptforge", "pretrain", *cli_args(cfg)], env=env,
                            capture_output=True, text=True, timeout=300, check=False)
    assert single.returncode == 0, single.stderr
    fsdp = subprocess.run([torchrun, "--nproc_per_node=2", "--master_port=29534", "-m", "gptforge", "pretrain",
                           *cli_args(cfg), "--name=fsdp", "--train.distributed=fsdp"], env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert fsdp.returncode == 0, fsdp.stdout[-3000:] + fsdp.stderr[-3000:]
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(tmp_path / "single"), abs=1e-5)
    from gptforge.checkpoint import load_model

    model, _, _ = load_model(tmp_path / "fsdp")  # gathered, unsharded, loadable in one process
    assert model.config.n_embd == 32
    wa = load_file(str(tmp_path / "single" / "ckpt" / "step_0000003" / "model.safetensors"))
    wb = load_file(str(tmp_path / "fsdp" / "ckpt" / "step_0000003" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
