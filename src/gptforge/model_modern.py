"""The modern model family in plain PyTorch, readable top to bottom: what changed since GPT-2.

Token embeddings (no learned positions) → ``n_layer`` pre-norm blocks → final norm → LM head, where each block is

* RMSNorm instead of LayerNorm (no mean subtraction, no bias);
* attention with rotary position embeddings (RoPE) on queries and keys, grouped-query attention (``n_kv_head`` key/value
  heads shared by ``n_head`` query heads) and optional QK-norm (an RMSNorm per head on queries and keys, as Qwen3);
* a SwiGLU MLP (``down(silu(gate(x)) · up(x))``, hidden width 8/3·d so it has the parameters of GPT-2's 4·d MLP);
* no biases anywhere, tied or untied embeddings.

Each choice can be switched back for ablations (``norm``, ``mlp``, ``pos``, ``qk_norm`` in :class:`ModernConfig`).
The default choices map one-to-one onto ``LlamaForCausalLM`` (``qk_norm=False``) and ``Qwen3ForCausalLM``
(``qk_norm=True``): see :mod:`gptforge.hf_modern`. Module names keep GPT's skeleton (``transformer.wte``,
``transformer.h``, ``transformer.ln_f``, ``lm_head``) so everything that works on a :class:`~gptforge.model.GPT` —
the engine and its KV cache, SFT, classification, evaluation, FSDP, checkpoints — works on a :class:`ModernGPT`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from gptforge.errors import GptforgeError
from gptforge.model import GPT, IGNORE_INDEX, INITS, GPTConfig, KVCache, attend

FAMILIES = ("gpt2", "modern")
NORMS = ("rmsnorm", "layernorm")
MLPS = ("swiglu", "gelu", "relu2")
POSITIONS = ("rope", "learned")


def swiglu_hidden(n_embd: int) -> int:
    """8/3·d rounded up to a multiple of 16: a SwiGLU MLP (three matrices) with the parameters of a 4·d one (two)."""
    return 16 * math.ceil(8 * n_embd / 3 / 16)


@dataclass
class ModernConfig:
    vocab_size: int = 50257
    block_size: int = 1024  # maximum sequence length (RoPE itself has none; the engine and the cache need one)
    n_layer: int = 12
    n_head: int = 12  # query heads
    n_kv_head: int | None = None  # key/value heads; None means n_head (no grouping)
    n_embd: int = 768
    head_dim: int | None = None  # None: n_embd / n_head (Qwen3 models may use wider heads than that)
    mlp_hidden: int | None = None  # None: 8/3·d (swiglu, rounded up to 16) or 4·d (gelu, relu2)
    norm: str = "rmsnorm"  # rmsnorm | layernorm (ablation: GPT-2's norm, without bias)
    mlp: str = "swiglu"  # swiglu | gelu | relu2 (squared ReLU, as modded-nanogpt)
    pos: str = "rope"  # rope | learned (ablation: GPT-2's learned position table)
    qk_norm: bool = False  # RMSNorm on each query/key head before RoPE (Qwen3)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    dropout: float = 0.0
    family: str = "modern"  # recorded in model_config.json so checkpoints load as this class

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None:
            if self.n_head > 0 and self.n_embd % self.n_head != 0:
                raise GptforgeError(f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head}) "
                                    "unless model.head_dim is set")
            self.head_dim = self.n_embd // max(1, self.n_head)
        if self.mlp_hidden is None:
            self.mlp_hidden = swiglu_hidden(self.n_embd) if self.mlp == "swiglu" else 4 * self.n_embd
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "n_embd", "head_dim", "mlp_hidden"):
            if getattr(self, name) <= 0:
                raise GptforgeError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.family != "modern":
            raise GptforgeError(f"model.family of a ModernConfig must be modern, got {self.family!r}")
        for name, allowed in (("norm", NORMS), ("mlp", MLPS), ("pos", POSITIONS)):
            if getattr(self, name) not in allowed:
                raise GptforgeError(f"model.{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.n_head % self.n_kv_head != 0:
            raise GptforgeError(f"model.n_head ({self.n_head}) must be a multiple of model.n_kv_head "
                                f"({self.n_kv_head}): each key/value head serves a whole group of query heads")
        if self.pos == "rope" and self.head_dim % 2:
            raise GptforgeError(f"RoPE needs an even head size, got model.head_dim={self.head_dim}")
        if not (math.isfinite(self.rope_theta) and self.rope_theta > 0):
            raise GptforgeError(f"model.rope_theta must be a finite number > 0, got {self.rope_theta}")
        if not 0 < self.norm_eps < 1:
            raise GptforgeError(f"model.norm_eps must be in (0, 1), got {self.norm_eps}")
        if not 0.0 <= self.dropout < 1.0:
            raise GptforgeError(f"model.dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS: dict[str, dict] = {
    # Each preset has the parameters of its GPT-2 counterpart in model.py (same layers, heads and width): the MLP
    # width absorbs what dropping biases and the position table saves. Counts (tied embeddings):
    # CPU-sized, at the quickstart's 4,096-token BPE (pretraining sets the vocabulary to the data's tokenizer):
    "modern-tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=128, vocab_size=4096,
                        mlp_hidden=192),  # 368,960 (tiny: 370,432)
    "modern-mini": dict(n_layer=4, n_head=4, n_embd=128, block_size=256, vocab_size=8192,
                        mlp_hidden=368),  # 1,352,832 at vocab 4,096 (mini: 1,350,400)
    "modern-small": dict(n_layer=6, n_head=6, n_embd=384, block_size=512, vocab_size=16384,
                         mlp_hidden=1056),  # 12,415,872 at vocab 4,096 (small: 12,417,024)
    # GPU-sized, GPT-2's vocabulary (50,257) and context (1,024):
    "modern-124m": dict(n_layer=12, n_head=12, n_embd=768, mlp_hidden=2080),  # 124,435,968 (gpt2: 124,439,808)
    "modern-355m": dict(n_layer=24, n_head=16, n_embd=1024, mlp_hidden=2752),  # 355,076,096 (gpt2-medium: 354,823,168)
    # seed 000's 356M shape with its own 52k BPE
    "modern-356m-52k": dict(n_layer=24, n_head=16, n_embd=1024, mlp_hidden=2752,
                            vocab_size=52000),  # 356,860,928 (gpt2-356m-52k: 356,608,000)
}


def preset(name: str, **overrides) -> ModernConfig:
    """A :class:`ModernConfig` from a named preset, with optional field overrides."""
    if name not in PRESETS:
        raise GptforgeError(f"unknown modern model preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return ModernConfig(**{**PRESETS[name], **overrides})


# ---- the blocks ---------------------------------------------------------------------------------------------


def make_norm(config: ModernConfig, dim: int) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(dim, eps=config.norm_eps)
    return nn.LayerNorm(dim, eps=config.norm_eps, bias=False)


def rope_angles(position_ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin ``(B or 1, 1, T, head_dim/2)`` of each position's rotation, in fp32 (as transformers computes
    them: frequencies ``theta^(-2i/head_dim)``)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32)
                                / head_dim))
    angles = position_ids.float()[:, None, :, None] * inv_freq  # (B, 1, T, head_dim/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (first half, second half) pair of ``x`` ``(B, h, T, head_dim)`` by its position's angle —
    the Llama/NeoX layout (not GPT-J's interleaved pairs), so exported weights need no permutation."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: ModernConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.dropout = config.dropout
        d, q, kv = config.n_embd, config.n_head * config.head_dim, config.n_kv_head * config.head_dim
        self.q_proj = nn.Linear(d, q, bias=False)
        self.k_proj = nn.Linear(d, kv, bias=False)
        self.v_proj = nn.Linear(d, kv, bias=False)
        self.o_proj = nn.Linear(q, d, bias=False)
        if config.qk_norm:
            self.q_norm = nn.RMSNorm(config.head_dim, eps=config.norm_eps)
            self.k_norm = nn.RMSNorm(config.head_dim, eps=config.norm_eps)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, rope: tuple | None, mask: torch.Tensor | None,
                kv_cache: KVCache | None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)  # (B, T, h, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)  # (B, T, h_kv, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        if hasattr(self, "q_norm"):  # QK-norm: bounded attention logits, whatever the residual stream's scale
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv_cache is not None:
            if kv_cache.k.shape[2] != self.n_kv_head:  # a cache sized for every query head (the engine's KVCache)
                group = self.n_head // self.n_kv_head
                k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, h or h_kv, S, hd), S = cached + T
        # grouped keys/values: each serves n_head / n_kv_head query heads (as repeat_interleave would)
        y = attend(q, k, v, mask, self.dropout if self.training else 0.0)  # (B, h, T, hd)
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_head * self.head_dim)
        return self.resid_dropout(self.o_proj(y))


class MLP(nn.Module):
    def __init__(self, config: ModernConfig):
        super().__init__()
        self.kind = config.mlp
        d, f = config.n_embd, config.mlp_hidden
        if self.kind == "swiglu":
            self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            h = F.silu(self.gate_proj(x)) * self.up_proj(x)  # (B, T, f)
        elif self.kind == "relu2":
            h = F.relu(self.up_proj(x)).square()
        else:
            h = F.gelu(self.up_proj(x), approximate="tanh")
        return self.dropout(self.down_proj(h))


class Block(nn.Module):
    def __init__(self, config: ModernConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = make_norm(config, config.n_embd)
        self.attn = Attention(config, layer_idx)
        self.ln_2 = make_norm(config, config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, rope, mask, kv_cache):
        x = x + self.attn(self.ln_1(x), rope, mask, kv_cache)
        return x + self.mlp(self.ln_2(x))


# ---- the model ----------------------------------------------------------------------------------------------


class ModernGPT(nn.Module):
    """The modern family with :class:`~gptforge.model.GPT`'s interface: the same ``forward`` (attention masks,
    per-row positions for left padding, KV cache, ``logits_to_keep``), module skeleton, sizes and costs.

    ``init``: ``gpt2`` (N(0, 0.02), residual projections scaled by 1/sqrt(2·n_layer), norms at one) or
    ``torch_default`` (PyTorch's layer defaults), as for GPT.
    """

    def __init__(self, config: ModernConfig, init: str = "gpt2"):
        super().__init__()
        if init not in INITS:
            raise GptforgeError(f"model.init must be one of {', '.join(INITS)}, got {init!r}")
        self.config = config
        modules = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if config.pos == "learned":
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        modules.update(drop=nn.Dropout(config.dropout),
                       h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
                       ln_f=make_norm(config, config.n_embd))
        self.transformer = nn.ModuleDict(modules)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        if init == "gpt2":
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """N(0, 0.02) for matrices and embeddings, 0.02/sqrt(2·n_layer) for the projections into the residual
        stream (o_proj, down_proj), ones for norm gains. A tied matrix is initialised once, as an embedding."""
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                std = residual_std if name.endswith(("o_proj", "down_proj")) else 0.02
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            elif isinstance(module, (nn.RMSNorm, nn.LayerNorm)):
                nn.init.ones_(module.weight)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        logits_to_keep: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits ``(B, T, V)`` and, with ``targets``, the mean cross-entropy over targets != -100.

        Arguments as :meth:`gptforge.model.GPT.forward`: ``attention_mask`` ``(B, S)`` (1 = real token, S = cached +
        new) or boolean ``(B, 1, T, S)``; ``position_ids`` default to counting real tokens (left padding starts
        at 0); ``logits_to_keep=k`` computes the last ``k`` positions' logits only.
        """
        B, T = idx.shape
        past = kv_cache.length if kv_cache is not None else 0
        if past + T > self.config.block_size:
            raise GptforgeError(
                f"sequence of {past + T} tokens exceeds the model's context of {self.config.block_size}"
            )
        if position_ids is None:
            if attention_mask is not None and attention_mask.dim() == 2:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past : past + T]
            else:
                position_ids = torch.arange(past, past + T, device=idx.device).unsqueeze(0)
        mask = GPT._attention_bias(attention_mask, B, T, past, idx.device)  # the same masking rule as GPT

        x = self.transformer.wte(idx)  # (B, T, d)
        rope = None
        if self.config.pos == "rope":
            rope = rope_angles(position_ids, self.config.head_dim, self.config.rope_theta)
        else:
            x = x + self.transformer.wpe(position_ids)
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, rope, mask, kv_cache)
        if kv_cache is not None:
            kv_cache.length += T
        if logits_to_keep > 0:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(self.transformer.ln_f(x))

        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX
            )
        return logits, loss

    def decode_step(self, idx: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor,
                    kv_cache: KVCache) -> torch.Tensor:
        """Next-token logits ``(B, V)`` for one new token per row, as :meth:`gptforge.model.GPT.decode_step`
        (the static-shape step that ``torch.compile`` and CUDA graphs take)."""
        x = self.transformer.wte(idx)  # (B, 1, d)
        rope = None
        if self.config.pos == "rope":
            rope = rope_angles(position_ids, self.config.head_dim, self.config.rope_theta)
        else:
            x = x + self.transformer.wpe(position_ids)
        for block in self.transformer.h:
            x = block(x, rope, mask, kv_cache)
        return self.lm_head(self.transformer.ln_f(x))[:, -1]  # (B, V)

    def new_kv_cache(self, batch_size: int, max_len: int, device=None, dtype=torch.float32) -> KVCache:
        """A KV cache with ``n_kv_head`` heads per layer (grouped-query attention's memory saving). The engine's
        own ``KVCache(model.config, ...)`` holds ``n_head`` heads; the attention fills either kind."""
        c = self.config
        shape = SimpleNamespace(n_layer=c.n_layer, n_head=c.n_kv_head, head_dim=c.head_dim, block_size=c.block_size)
        return KVCache(shape, batch_size, max_len, device=device, dtype=dtype)

    # ---- sizes and costs ------------------------------------------------------------------------------

    def num_params(self, non_embedding: bool = False) -> int:
        """Total parameters (the tied matrix counted once); ``non_embedding`` drops wte, wpe and an untied head."""
        total = sum(p.numel() for p in self.parameters())
        if non_embedding:
            total -= self.transformer.wte.weight.numel()
            if self.config.pos == "learned":
                total -= self.transformer.wpe.weight.numel()
            if not self.config.tie_embeddings:
                total -= self.lm_head.weight.numel()
        return total

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6·N (forward + backward matmuls) + 12·L·d·T (attention scores)."""
        return flops_per_token(self.config, seq_len)


def count_params(config: ModernConfig, non_embedding: bool = False) -> int:
    """Parameter count from a config alone (no allocation)."""
    d, L, V, f = config.n_embd, config.n_layer, config.vocab_size, config.mlp_hidden
    q, kv = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
    per_block = (
        2 * d  # two norm gains
        + 2 * d * q + 2 * d * kv  # q, o and k, v
        + (2 * config.head_dim if config.qk_norm else 0)
        + (3 if config.mlp == "swiglu" else 2) * d * f
    )
    body = L * per_block + d  # + ln_f
    if non_embedding:
        return body
    head = 0 if config.tie_embeddings else V * d
    pos = config.block_size * d if config.pos == "learned" else 0
    return body + V * d + pos + head


def flops_per_token(config: ModernConfig, seq_len: int | None = None) -> float:
    """Training FLOPs per token (PaLM appendix B): 6·N + 12·L·(n_head·head_dim)·T, N excluding a position table
    (a lookup). Grouped key/value heads save parameters (in N), not attention-score FLOPs."""
    T = seq_len or config.block_size
    n = count_params(config) - (config.block_size * config.n_embd if config.pos == "learned" else 0)
    return 6 * n + 12 * config.n_layer * config.n_head * config.head_dim * T


# ---- one entry point for either family ---------------------------------------------------------------------


def build_model(config: GPTConfig | ModernConfig, init: str = "gpt2") -> GPT | ModernGPT:
    """The model class of ``config``'s family."""
    return ModernGPT(config, init=init) if isinstance(config, ModernConfig) else GPT(config, init=init)


def config_params(config: GPTConfig | ModernConfig, non_embedding: bool = False) -> int:
    """:func:`count_params` of either family."""
    if isinstance(config, ModernConfig):
        return count_params(config, non_embedding)
    from gptforge.model import count_params as gpt_count

    return gpt_count(config, non_embedding)


def config_flops_per_token(config: GPTConfig | ModernConfig, seq_len: int | None = None) -> float:
    """:func:`flops_per_token` of either family."""
    if isinstance(config, ModernConfig):
        return flops_per_token(config, seq_len)
    from gptforge.model import flops_per_token as gpt_flops

    return gpt_flops(config, seq_len)


def config_from_dict(data: dict, where: str = "model") -> GPTConfig | ModernConfig:
    """A config of the family ``data`` names (``family``: gpt2, the default, or modern), every key type-checked."""
    from gptforge.config import from_dict

    family = data.get("family", "gpt2")
    if family not in FAMILIES:
        raise GptforgeError(f"{where}.family must be one of {', '.join(FAMILIES)}, got {family!r}")
    if family == "modern":
        return from_dict(ModernConfig, data, where=where)
    return from_dict(GPTConfig, {k: v for k, v in data.items() if k != "family"}, where=where)
