"""Memory and compute estimates (the "transformer math" worked through in seed 002).

Training memory = weights + gradients + optimizer state + activations (+ logits). Activations follow
Korthikanti et al. 2022 ("Reducing Activation Recomputation"): per layer ``s·b·h·(34 + 5·a·s/h)`` bytes for
16-bit activations; fused attention (SDPA flash/efficient kernels) does not store the ``a·s²`` score matrices,
so that term is dropped when ``flash=True``. Either model family (GPT-2 or :mod:`gptforge.model_modern`): a SwiGLU
MLP of width 8/3·h stores about what GPT-2's 4·h GELU MLP does, so the same per-layer figure is used.
"""

from __future__ import annotations

from dataclasses import dataclass

from gptforge.errors import GptforgeError
from gptforge.model import GPTConfig
from gptforge.model_modern import config_flops_per_token as flops_per_token
from gptforge.model_modern import config_params as count_params

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass
class MemoryEstimate:
    weights: float
    gradients: float
    optimizer: float
    activations: float
    logits: float
    optimizer_name: str = "AdamW"
    reference: float = 0.0  # DPO: the frozen reference model

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits + self.reference

    def rows(self) -> list[tuple[str, float]]:
        return [("weights", self.weights), ("gradients", self.gradients),
                (f"optimizer ({self.optimizer_name})", self.optimizer), ("activations", self.activations),
                ("logits + loss", self.logits), *([("reference model", self.reference)] if self.reference else []),
                ("total", self.total)]


def _check_precision(precision: str) -> int:
    if precision not in BYTES:
        raise GptforgeError(f"precision must be one of {', '.join(BYTES)}, got {precision!r}")
    return BYTES[precision]


def training_memory(config: GPTConfig, micro_batch: int, seq_len: int | None = None, precision: str = "bf16",
                    flash: bool = True, optimizer: str = "adamw") -> MemoryEstimate:
    """Bytes needed to train with AdamW (or Muon) at ``micro_batch × seq_len`` with fp32 master weights.

    Mixed precision keeps fp32 weights, gradients and two AdamW moments (16 bytes/parameter) and adds a
    16-bit working copy of the weights; activations are 16-bit under autocast, 32-bit in fp32. With
    ``optimizer="muon"`` the blocks' matrices keep one fp32 momentum buffer (4 bytes) instead of two moments.
    """
    if optimizer not in ("adamw", "muon"):
        raise GptforgeError(f"optimizer must be adamw or muon, got {optimizer!r}")
    act_bytes = _check_precision(precision)
    s = seq_len or config.block_size
    b, h, a, L, V = micro_batch, config.n_embd, config.n_head, config.n_layer, config.vocab_size
    n = count_params(config)
    weights = 4 * n + (2 * n if precision != "fp32" else 0)
    per_layer_16bit = s * b * h * 34 + (0 if flash else 5 * a * s * s * b)
    activations = L * per_layer_16bit * act_bytes / 2 + s * b * h * act_bytes * 2  # + embeddings, final LN
    # Logits (activation dtype) are upcast to fp32 for the loss; softmax gradient is fp32 too.
    logits = b * s * V * (act_bytes + 4 + 4)
    muon = muon_param_count(config) if optimizer == "muon" else 0
    return MemoryEstimate(weights=weights, gradients=4 * n, optimizer=8 * (n - muon) + 4 * muon,
                          activations=activations, logits=logits,
                          optimizer_name="Muon + AdamW" if optimizer == "muon" else "AdamW")


def muon_param_count(config) -> int:
    """Parameters Muon updates: the 2-D matrices inside the blocks (embeddings, head and gains use AdamW)."""
    return config.n_layer * sum(i * o for _, i, o in _block_linears(config))


def dpo_training_memory(config: GPTConfig, pairs: int, seq_len: int | None = None, precision: str = "bf16",
                        flash: bool = True, optimizer: str = "adamw", reference: str = "copy") -> MemoryEstimate:
    """Bytes for DPO (:mod:`gptforge.train.dpo`) at ``pairs`` preference pairs per micro-batch.

    The policy trains on the chosen and the rejected sequence of every pair (2·pairs rows). ``reference``:
    ``copy`` — a frozen fp32 copy of the starting model (its no-grad forward keeps no activations, only one
    batch of logits); ``precomputed`` (``--precompute-ref``) or ``none`` (SimPO; a LoRA policy uses itself with
    adapters off) — nothing beyond the policy.
    """
    if reference not in ("copy", "precomputed", "none"):
        raise GptforgeError(f"reference must be copy, precomputed or none, got {reference!r}")
    policy = training_memory(config, 2 * pairs, seq_len, precision, flash, optimizer)
    s = seq_len or config.block_size
    ref = 4 * count_params(config) + 2 * pairs * s * config.vocab_size * 4 if reference == "copy" else 0
    policy.reference = ref
    return policy


# LoRA: the default targets (the attention and MLP projections) of each family, under the model's module names.
LORA_TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
LORA_TARGETS_MODERN = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                       "mlp.down_proj")


def _block_linears(config) -> list[tuple[str, int, int]]:
    """``(name, in_features, out_features)`` of a block's linear layers."""
    d = config.n_embd
    if getattr(config, "family", "gpt2") != "modern":
        return [("attn.c_attn", d, 3 * d), ("attn.c_proj", d, d), ("mlp.c_fc", d, 4 * d), ("mlp.c_proj", 4 * d, d)]
    q, kv, f = config.n_head * config.head_dim, config.n_kv_head * config.head_dim, config.mlp_hidden
    return [("attn.q_proj", d, q), ("attn.k_proj", d, kv), ("attn.v_proj", d, kv), ("attn.o_proj", q, d),
            *([("mlp.gate_proj", d, f)] if config.mlp == "swiglu" else []), ("mlp.up_proj", d, f),
            ("mlp.down_proj", f, d)]


def _lora_layers(config, targets) -> list[tuple[int, int]]:
    """``(in, out)`` of every linear layer the target names hit (peft's suffix rule: ``c_proj`` hits both)."""
    blocks = _block_linears(config)
    named = [(f"transformer.h.{i}.{name}", a, b) for i in range(config.n_layer) for name, a, b in blocks]
    named.append(("lm_head", config.n_embd, config.vocab_size))
    hit = [(i, o) for n, i, o in named if any(n == t or n.endswith("." + t) for t in targets)]
    if not hit:
        raise GptforgeError(f"LoRA targets {list(targets)} hit no linear layer of this model; its layers are "
                            f"{', '.join(n for n, _, _ in blocks)}, lm_head")
    return hit


def default_lora_targets(config) -> tuple[str, ...]:
    """The attention and MLP projections of ``config``'s family."""
    return LORA_TARGETS_MODERN if getattr(config, "family", "gpt2") == "modern" else LORA_TARGETS


def lora_param_count(config: GPTConfig, r: int, targets=None) -> int:
    """Adapter parameters: ``r·(in + out)`` for every targeted linear layer."""
    return sum(r * (i + o) for i, o in _lora_layers(config, targets or default_lora_targets(config)))


def lora_training_memory(config: GPTConfig, micro_batch: int, seq_len: int | None = None, precision: str = "bf16",
                         r: int = 8, targets=None, dropout: float = 0.0, flash: bool = True,
                         trainable: int | None = None) -> MemoryEstimate:
    """Bytes to train LoRA adapters of rank ``r`` with AdamW (as :func:`gptforge.train.lora.apply_lora` does it).

    The frozen weights are stored in the training precision (2 bytes/parameter in bf16/fp16, 4 in fp32) and get
    no gradients or optimizer state; the adapters (``trainable`` parameters when given: a classifier head or new
    token rows train too) are fp32 with fp32 gradients and two AdamW moments (16 bytes/parameter). Activations
    are those of full training (backprop still runs through every layer to reach the first adapters), plus each
    adapter's dropped-out input when ``dropout > 0``.
    """
    act_bytes = _check_precision(precision)
    targets = targets or default_lora_targets(config)
    full = training_memory(config, micro_batch, seq_len, precision, flash)
    s = seq_len or config.block_size
    n = count_params(config)
    a = lora_param_count(config, r, targets) if trainable is None else trainable
    activations = full.activations
    if dropout > 0:  # the dropped-out copy of each adapted input (+ its 1-byte mask) is saved for backward
        activations += sum(i for i, _ in _lora_layers(config, targets)) * s * micro_batch * (act_bytes + 1)
    return MemoryEstimate(weights=n * act_bytes + 4 * a, gradients=4 * a, optimizer=8 * a,
                          activations=activations, logits=full.logits)


def inference_memory(config: GPTConfig, batch: int = 1, seq_len: int | None = None, precision: str = "bf16"
                     ) -> dict[str, float]:
    """Bytes for generation: weights in ``precision``, a full KV cache, and one step of logits."""
    nbytes = _check_precision(precision)
    s = seq_len or config.block_size
    weights = count_params(config) * nbytes
    kv_width = getattr(config, "n_kv_head", config.n_head) * config.head_dim  # grouped-query attention: fewer heads
    kv_cache = 2 * config.n_layer * batch * s * kv_width * nbytes
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
