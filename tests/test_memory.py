import json
import subprocess
import sys
from pathlib import Path

from gptforge.memory import inference_memory, training_memory
from gptforge.model import GPTConfig, preset

PROBE = Path(__file__).with_name("_memprobe.py")


def test_training_memory_estimate_matches_measured_cpu_peak_within_30_percent():
    """One AdamW step of a ~17M-parameter model on CPU: measured peak RSS growth vs the estimate."""
    cfg = dict(vocab_size=8192, block_size=256, n_layer=4, n_head=8, n_embd=512)
    out = subprocess.run([sys.executable, str(PROBE), json.dumps(cfg), "8", "256"], capture_output=True, text=True,
                         check=True)
    measured = int(out.stdout.strip())
    estimate = training_memory(GPTConfig(**cfg), micro_batch=8, seq_len=256, precision="fp32").total
    assert 0.7 < measured / estimate < 1.3, (measured, estimate)


def test_gpt2_training_state_is_16_bytes_per_parameter():
    est = training_memory(preset("gpt2"), micro_batch=1, seq_len=1024, precision="fp32")
    n = 124_439_808
    assert est.weights + est.gradients + est.optimizer == 16 * n


def test_inference_kv_cache_size():
    mem = inference_memory(preset("gpt2"), batch=1, seq_len=1024, precision="bf16")
    assert mem["kv_cache"] == 2 * 12 * 1024 * 768 * 2
