"""Memory and compute estimates (the "transformer math" worked through in seed 002).

Training memory = weights + gradients + optimizer state + activations (+ logits). Activations follow
Korthikanti et al. 2022 ("Reducing Activation Recomputation"): per layer ``s·b·h·(34 + 5·a·s/h)`` bytes for
16-bit activations; fused attention (SDPA flash/efficient kernels) does not store the ``a·s²`` score matrices,
so that term is dropped when ``flash=True``.
"""

from __future__ import annotations

from dataclasses import dataclass

from gptforge.errors import GptforgeError
from gptforge.model import GPTConfig, count_params, flops_per_token

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass
class MemoryEstimate:
    weights: float
    gradients: float
    optimizer: float
    activations: float
    logits: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits

    def rows(self) -> list[tuple[str, float]]:
        return [("weights", self.weights), ("gradients", self.gradients), ("optimizer (AdamW)", self.optimizer),
                ("activations", self.activations), ("logits + loss", self.logits), ("total", self.total)]


def _check_precision(precision: str) -> int:
    if precision not in BYTES:
        raise GptforgeError(f"precision must be one of {', '.join(BYTES)}, got {precision!r}")
    return BYTES[precision]


def training_memory(config: GPTConfig, micro_batch: int, seq_len: int | None = None, precision: str = "bf16",
                    flash: bool = True) -> MemoryEstimate:
    """Bytes needed to train with AdamW at ``micro_batch × seq_len`` with fp32 master weights.

    Mixed precision keeps fp32 weights, gradients and two AdamW moments (16 bytes/parameter) and adds a
    16-bit working copy of the weights; activations are 16-bit under autocast, 32-bit in fp32.
    """
    act_bytes = _check_precision(precision)
    s = seq_len or config.block_size
    b, h, a, L, V = micro_batch, config.n_embd, config.n_head, config.n_layer, config.vocab_size
    n = count_params(config)
    weights = 4 * n + (2 * n if precision != "fp32" else 0)
    per_layer_16bit = s * b * h * 34 + (0 if flash else 5 * a * s * s * b)
    activations = L * per_layer_16bit * act_bytes / 2 + s * b * h * act_bytes * 2  # + embeddings, final LN
    # Logits (activation dtype) are upcast to fp32 for the loss; softmax gradient is fp32 too.
    logits = b * s * V * (act_bytes + 4 + 4)
    return MemoryEstimate(weights=weights, gradients=4 * n, optimizer=8 * n, activations=activations, logits=logits)


def inference_memory(config: GPTConfig, batch: int = 1, seq_len: int | None = None, precision: str = "bf16"
                     ) -> dict[str, float]:
    """Bytes for generation: weights in ``precision``, a full KV cache, and one step of logits."""
    nbytes = _check_precision(precision)
    s = seq_len or config.block_size
    weights = count_params(config) * nbytes
    kv_cache = 2 * config.n_layer * batch * s * config.n_embd * nbytes
    logits = batch * config.vocab_size * 4
    return {"weights": weights, "kv_cache": kv_cache, "logits": logits, "total": weights + kv_cache + logits}


def model_summary(config: GPTConfig, micro_batch: int = 8, seq_len: int | None = None, precision: str = "bf16"
                  ) -> dict:
    """Everything ``gptforge model info`` prints, as a dict."""
    s = seq_len or config.block_size
    return {
        "config": config.to_dict(),
        "params": count_params(config),
        "params_non_embedding": count_params(config, non_embedding=True),
        "flops_per_token": flops_per_token(config, s),
        "training": training_memory(config, micro_batch, s, precision),
        "inference": inference_memory(config, 1, s, precision),
        "micro_batch": micro_batch, "seq_len": s, "precision": precision,
    }


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def human_count(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))
