"""GPT-2 in plain PyTorch, readable top to bottom.

Token + learned position embeddings → ``n_layer`` pre-LayerNorm blocks (causal self-attention through
``scaled_dot_product_attention``, GELU(tanh) MLP) → final LayerNorm → LM head. Parameter names follow the
Hugging Face GPT-2 layout (``transformer.h.0.attn.c_attn`` …) so interop is a transpose, not a rename.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gptforge.errors import GptforgeError

IGNORE_INDEX = -100


@dataclass
class GPTConfig:
    vocab_size: int = 50257
    block_size: int = 1024  # maximum sequence length (learned position embeddings)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear layers and LayerNorms
    qkv_bias: bool | None = None  # bias of the fused q/k/v projection; None means "same as bias"
    tie_embeddings: bool = True  # LM head shares the token embedding matrix
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.qkv_bias is None:
            self.qkv_bias = self.bias
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) <= 0:
                raise GptforgeError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head != 0:
            raise GptforgeError(
                f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise GptforgeError(f"model.dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS: dict[str, dict] = {
    # OpenAI GPT-2 family (vocab 50,257, context 1024).
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
    # Seed 000: 24L/1024/16H with an own 52k byte-level BPE.
    "gpt2-356m-52k": dict(n_layer=24, n_head=16, n_embd=1024, vocab_size=52000),
    # Seed 004: GPT-2 small shape, untied head (163M parameters), no QKV bias, dropout 0.1.
    "gpt2-163m-untied": dict(n_layer=12, n_head=12, n_embd=768, tie_embeddings=False),
    # CPU-sized presets for tests, laptops and the quickstart.
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=128, vocab_size=4096),
    "mini": dict(n_layer=4, n_head=4, n_embd=128, block_size=256, vocab_size=8192),
    "small": dict(n_layer=6, n_head=6, n_embd=384, block_size=512, vocab_size=16384),
}


def preset(name: str, **overrides) -> GPTConfig:
    """A :class:`GPTConfig` from a named preset, with optional field overrides."""
    if name not in PRESETS:
        raise GptforgeError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return GPTConfig(**{**PRESETS[name], **overrides})


class KVCache:
    """Preallocated keys/values for incremental decoding: ``(n_layer, B, n_head, max_len, head_dim)``.

    A forward pass over ``T`` new tokens writes them at ``[length, length+T)`` in every layer; the model
    advances ``length`` once all layers are done. ``attention_mask`` passed alongside a cache covers all
    ``length + T`` positions (past and new), as in Hugging Face.

    Static-shape decoding (:meth:`GPT.decode_step`, what ``torch.compile`` and CUDA graphs take): after
    :meth:`make_static`, one new token per row is written at the column held in the ``(1,)`` tensor ``write_at``
    and attention sees every column (the caller's mask hides the ones not written yet); ``length`` is then the
    caller's.
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        if max_len > config.block_size:
            raise GptforgeError(f"KV cache length {max_len} exceeds the model's context ({config.block_size})")
        shape = (config.n_layer, batch_size, config.n_head, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0
        self.write_at: torch.Tensor | None = None  # (1,) column for static-shape decoding, else None
        # Each layer's keys/values as views made once, for static-shape decoding: a compiled step updates them in
        # place, while a view of the whole 5-D tensor taken inside the graph would make it copy that tensor.
        self.layers = list(zip(self.k.unbind(0), self.v.unbind(0)))

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def make_static(self, column: int) -> None:
        """Switch to static-shape decoding, the next token written at ``column``."""
        self.write_at = torch.tensor([column], device=self.k.device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's keys/values ``(B, n_head, T, head_dim)`` for ``layer``; return all keys/values so far
        ``(B, n_head, S, head_dim)`` (static: every column, S = max_len)."""
        if self.write_at is not None:  # in place at a column held in a tensor: the same shapes at every step
            k_all, v_all = self.layers[layer]
            k_all.index_copy_(2, self.write_at, k)
            v_all.index_copy_(2, self.write_at, v)
            return k_all, v_all
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise GptforgeError(f"KV cache full: {end} positions needed, {self.max_len} allocated")
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep only the batch rows in ``index`` (e.g. after some sequences finished)."""
        self.k = self.k[:, index]
        self.v = self.v[:, index]
        self.layers = list(zip(self.k.unbind(0), self.v.unbind(0)))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
           dropout_p: float = 0.0) -> torch.Tensor:
    """Attention of ``(B, h, T, hd)`` queries over ``(B, h_kv, S, hd)`` keys/values (``h`` a multiple of
    ``h_kv``: grouped-query heads share theirs); ``mask`` boolean, broadcast to ``(B, 1, T, S)`` (True = may
    attend), or None for plain causal attention. Returns ``(B, h, T, hd)``.

    ``scaled_dot_product_attention``, except for a decoding step (one query per row) in bf16 on a CPU over
    32k+ key elements: there SDPA's kernel converts block by block and is 2–8× slower than two matmuls (gpt2
    shape, 16 rows: ~2.9 vs ~0.7 ms per layer). That step is computed as Hugging Face's eager attention does:
    scores from a bf16 matmul (float32 accumulation, rounded to bf16), softmax in float32, weights back in bf16
    for the product with the values. Its error against float32 attention is about twice SDPA's bf16 kernel's,
    far below what bf16 weights and activations already add to the logits.
    """
    B, h, T, hd = q.shape
    h_kv = k.shape[1]
    if T == 1 and mask is not None and q.device.type == "cpu" and q.dtype == torch.bfloat16 and dropout_p == 0.0 \
            and k.numel() >= 32768:  # below, SDPA's one call beats the matmuls' per-op overhead
        grouped = q.reshape(B, h_kv, h // h_kv, hd)  # (B, h_kv, g, hd): a group's queries together
        # k·qᵀ, not q·kᵀ: a cache's keys are a strided view, which bmm copies when it is the transposed operand
        scores = (k @ grouped.transpose(-1, -2)).transpose(-1, -2).float() * hd**-0.5  # (B, h_kv, g, S)
        scores = scores.masked_fill(~mask.reshape(mask.shape[0], 1, 1, mask.shape[-1]), float("-inf"))
        return (scores.softmax(dim=-1).to(v.dtype) @ v).view(B, h, 1, hd)
    gqa = {"enable_gqa": True} if h_kv != h else {}
    if mask is None:  # plain causal attention: lets SDPA pick the flash/efficient kernels
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, **gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, **gqa)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.qkv_bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, kv_cache: KVCache | None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)
        y = attend(q, k, v, mask, self.dropout if self.training else 0.0)  # (B, h, T, hd)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, mask, kv_cache):
        x = x + self.attn(self.ln_1(x), mask, kv_cache)
        return x + self.mlp(self.ln_2(x))


INITS = ("gpt2", "torch_default")


class GPT(nn.Module):
    """``init``: ``gpt2`` (N(0, 0.02), scaled residual projections; see :meth:`reset_parameters`) or
    ``torch_default`` (PyTorch's own layer defaults: Kaiming-uniform linears, N(0, 1) embeddings — what a model
    built from plain ``nn`` layers gets, as in seed 004's baseline). Not part of the architecture: not saved."""

    def __init__(self, config: GPTConfig, init: str = "gpt2"):
        super().__init__()
        if init not in INITS:
            raise GptforgeError(f"model.init must be one of {', '.join(INITS)}, got {init!r}")
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        if init == "gpt2":
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, 0.02) everywhere, residual projections scaled by 1/sqrt(2·n_layer), zero biases.

        The tied matrix is initialised once, as an embedding with std 0.02 — never with nn.Linear's
        uniform default, which would make the first loss far above ln(vocab_size).
        """
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                std = residual_std if name.endswith("c_proj") else 0.02
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

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

        ``attention_mask``: ``(B, S)`` with 1 for real tokens and 0 for padding (S = cached + new positions),
        or a boolean ``(B, 1, T, S)`` mask (True = may attend) for packed sequences.
        ``position_ids`` default to counting real tokens, so left-padded rows start at position 0.
        ``logits_to_keep=k > 0`` computes logits for the last ``k`` positions only (generation's prefill).
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
        mask = self._attention_bias(attention_mask, B, T, past, idx.device)

        x = self.transformer.wte(idx)
        x = self.transformer.drop(x + self.transformer.wpe(position_ids))
        for block in self.transformer.h:
            x = block(x, mask, kv_cache)
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
        """Next-token logits ``(B, V)`` for one new token per row, ``idx`` ``(B, 1)`` at ``position_ids`` ``(B, 1)``,
        with the boolean key mask ``mask`` ``(B, 1, 1, S)`` (True = may attend) built by the caller.

        :meth:`forward`'s math without its bookkeeping (no Python number changes from one step to the next), so
        that with a static cache (:meth:`KVCache.make_static`, S = the cache's length) the step has the same
        shapes every time: what ``torch.compile`` and CUDA graphs take. ``kv_cache.length`` is the caller's.
        """
        x = self.transformer.wte(idx) + self.transformer.wpe(position_ids)  # (B, 1, C)
        for block in self.transformer.h:
            x = block(x, mask, kv_cache)
        return self.lm_head(self.transformer.ln_f(x))[:, -1]  # (B, V)

    @staticmethod
    def _attention_bias(attention_mask, B: int, T: int, past: int, device) -> torch.Tensor | None:
        """Boolean ``(B, 1, T, S)`` mask (True = attend), or None for the plain causal case."""
        if attention_mask is not None and attention_mask.dim() == 4:
            return attention_mask.bool()
        if attention_mask is None and past == 0:
            return None
        S = past + T
        q_pos = torch.arange(past, S, device=device).view(T, 1)
        k_pos = torch.arange(S, device=device).view(1, S)
        allowed = (k_pos <= q_pos).view(1, 1, T, S)
        if attention_mask is not None:
            keys = attention_mask[:, :S].bool().view(B, 1, 1, S)
            # A padded query would see no key at all (NaN in softmax); let it see itself. Its output is ignored.
            allowed = allowed & (keys | (k_pos == q_pos).view(1, 1, T, S))
        return allowed.expand(B, 1, T, S)

    # ---- sizes and costs ------------------------------------------------------------------------------

    def num_params(self, non_embedding: bool = False) -> int:
        """Total parameters (the tied matrix counted once); ``non_embedding`` drops wte, wpe and an untied head."""
        total = sum(p.numel() for p in self.parameters())
        if non_embedding:
            total -= self.transformer.wte.weight.numel() + self.transformer.wpe.weight.numel()
            if not self.config.tie_embeddings:
                total -= self.lm_head.weight.numel()
        return total

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6·N (forward + backward matmuls) + 12·L·d·T (attention scores)."""
        return flops_per_token(self.config, seq_len)


def count_params(config: GPTConfig, non_embedding: bool = False) -> int:
    """Parameter count from a config alone (no allocation)."""
    d, L, V = config.n_embd, config.n_layer, config.vocab_size
    b = 1 if config.bias else 0
    qkv_b = 1 if config.qkv_bias else 0
    per_block = (
        2 * d * b + 2 * d  # two LayerNorms (weight + optional bias)
        + d * 3 * d + 3 * d * qkv_b  # c_attn
        + d * d + d * b  # attn c_proj
        + d * 4 * d + 4 * d * b  # c_fc
        + 4 * d * d + d * b  # mlp c_proj
    )
    body = L * per_block + d + d * b  # + ln_f
    if non_embedding:
        return body
    head = 0 if config.tie_embeddings else V * d
    return body + V * d + config.block_size * d + head


def flops_per_token(config: GPTConfig, seq_len: int | None = None) -> float:
    """Training FLOPs per token (PaLM appendix B): 6·N + 12·L·d·T, N excluding position embeddings."""
    T = seq_len or config.block_size
    n = count_params(config) - config.block_size * config.n_embd
    return 6 * n + 12 * config.n_layer * config.n_embd * T
