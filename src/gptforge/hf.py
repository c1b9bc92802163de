"""Hugging Face interop: export to and import from the ``transformers`` GPT-2 format (needs the ``hf`` extra).

Exported directories load with ``AutoModelForCausalLM.from_pretrained`` as ``GPT2LMHeadModel`` without
``trust_remote_code``. GPT-2 always has biases, so a model trained with ``bias=False`` / ``qkv_bias=False`` is
exported with zero biases (which computes the same function). The modern family (:mod:`gptforge.model_modern`)
goes to ``LlamaForCausalLM`` / ``Qwen3ForCausalLM`` through :mod:`gptforge.hf_modern`; the functions here dispatch
on the model's family (export) or ``config.json``'s ``model_type`` (import).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from gptforge.errors import GptforgeError
from gptforge.io import read_json
from gptforge.model import GPT, GPTConfig
from gptforge.tokenizer import (
    EOT,
    IM_START,
    PAD,
    BPETokenizer,
    TiktokenTokenizer,
    Tokenizer,
    bytes_to_unicode,
)

# Hugging Face GPT-2 uses Conv1D (weight stored as in×out); these need a transpose.
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_HF_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def _require_transformers():
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise GptforgeError("Hugging Face interop needs transformers: pip install 'gptforge[hf]'") from None


def hf_config(config: GPTConfig, tokenizer: Tokenizer | None = None):
    """A ``GPT2Config`` describing ``config``."""
    from transformers import GPT2Config

    eos = tokenizer.eot_id if tokenizer is not None else None
    return GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.n_embd,
        n_layer=config.n_layer, n_head=config.n_head, n_inner=None, activation_function="gelu_new",
        resid_pdrop=config.dropout, embd_pdrop=config.dropout, attn_pdrop=config.dropout,
        layer_norm_epsilon=config.layer_norm_eps, tie_word_embeddings=config.tie_embeddings,
        bos_token_id=eos, eos_token_id=eos, pad_token_id=tokenizer.pad_id if tokenizer is not None else None,
        architectures=["GPT2LMHeadModel"],
    )


def to_hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our parameters under Hugging Face names, Conv1D weights transposed, missing biases as zeros."""
    cfg = model.config
    ours = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in ours.items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        out[name] = tensor.t().contiguous() if name.endswith(_CONV1D) else tensor.detach().clone()
    d = cfg.n_embd
    zeros = lambda n: torch.zeros(n, dtype=ours["transformer.wte.weight"].dtype)
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        wanted = {"ln_1.bias": d, "ln_2.bias": d, "attn.c_attn.bias": 3 * d, "attn.c_proj.bias": d,
                  "mlp.c_fc.bias": 4 * d, "mlp.c_proj.bias": d}
        for key, size in wanted.items():
            out.setdefault(p + key, zeros(size))
    out.setdefault("transformer.ln_f.bias", zeros(d))
    return out


def export_model(model: GPT, tokenizer: Tokenizer | None, out_dir: str | Path, extra_files: dict | None = None) -> Path:
    """Write a ``transformers``-loadable GPT-2 directory (weights, config, generation config, tokenizer); a modern
    model becomes a Llama or Qwen3 directory (:func:`gptforge.hf_modern.export_model`)."""
    _require_transformers()
    if getattr(model.config, "family", "gpt2") == "modern":
        from gptforge.hf_modern import export_model as export_modern

        return export_modern(model, tokenizer, out_dir, extra_files)
    from transformers import GenerationConfig, GPT2LMHeadModel

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.float().cpu()
    hf_model = GPT2LMHeadModel(hf_config(model.config, tokenizer))
    missing, unexpected = hf_model.load_state_dict(to_hf_state_dict(model), strict=False)
    missing = [k for k in missing if not k.endswith((".attn.bias", ".attn.masked_bias", "lm_head.weight"))]
    if missing or unexpected:
        raise GptforgeError(f"internal export mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if model.config.tie_embeddings:
        hf_model.tie_weights()
    hf_model.save_pretrained(out_dir, safe_serialization=True)
    if tokenizer is not None:
        eos = tokenizer.eot_id
        GenerationConfig(bos_token_id=eos, eos_token_id=_stop_ids(tokenizer), pad_token_id=tokenizer.pad_id,
                         do_sample=False).save_pretrained(out_dir)
        export_tokenizer(tokenizer, out_dir, model_max_length=model.config.block_size)
    for name, text in (extra_files or {}).items():
        (out_dir / name).write_text(text, encoding="utf-8")
    return out_dir


def _stop_ids(tokenizer: Tokenizer) -> list[int] | int:
    ids = [tokenizer.eot_id] + [i for t, i in tokenizer.special_tokens.items() if t == "<|im_end|>"]
    return ids if len(ids) > 1 else ids[0]


def hf_tokenizers_object(tokenizer: Tokenizer):
    """A ``tokenizers.Tokenizer`` equivalent to ours (tiktoken ranks are converted to vocab + merges)."""
    if isinstance(tokenizer, BPETokenizer):
        return tokenizer._tok
    if isinstance(tokenizer, TiktokenTokenizer):
        return tiktoken_ranks_to_hf(tokenizer._ranks, tokenizer.special_tokens)
    raise GptforgeError(f"cannot export tokenizer of kind {tokenizer.kind!r}")


def tiktoken_ranks_to_hf(ranks: dict[bytes, int], special_tokens: dict[str, int]):
    """Convert tiktoken mergeable ranks to a byte-level BPE ``tokenizers.Tokenizer`` with the same ids."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    from gptforge.tokenizer import GPT2_PATTERN

    byte_map = bytes_to_unicode()
    to_str = lambda b: "".join(byte_map[x] for x in b)
    vocab = {to_str(tok): rank for tok, rank in ranks.items()}
    merges = []
    for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(tok) == 1:
            continue
        left, right = _last_merge(ranks, tok, rank)
        merges.append((to_str(left), to_str(right)))
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GPT2_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    for tok, _ in sorted(special_tokens.items(), key=lambda kv: kv[1]):
        hf.add_special_tokens([AddedToken(tok, special=True, normalized=False)])
    return hf


def _last_merge(ranks: dict[bytes, int], token: bytes, max_rank: int) -> tuple[bytes, bytes]:
    """Replay BPE on ``token`` with merges below its rank; the two remaining parts form its merge."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best = None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < max_rank and (best is None or r < best[0]):
                best = (r, i)
        if best is None:
            break
        i = best[1]
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    if len(parts) != 2:
        raise GptforgeError(f"tiktoken ranks are not a BPE merge list (token {token!r})")
    return parts[0], parts[1]


def export_tokenizer(tokenizer: Tokenizer, out_dir: str | Path, model_max_length: int | None = None) -> None:
    """Save as a ``PreTrainedTokenizerFast`` (tokenizer.json + tokenizer_config.json with the chat template).

    ``model_max_length`` is the model's context, so ``truncation=True`` cuts to what the model can read; padding
    is on the left, as batched generation with a decoder-only model needs.
    """
    from transformers import PreTrainedTokenizerFast

    limits = {"model_max_length": model_max_length} if model_max_length else {}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=hf_tokenizers_object(tokenizer), eos_token=EOT, bos_token=EOT, unk_token=EOT,
        pad_token=PAD if PAD in tokenizer.special_tokens else EOT, padding_side="left", **limits,
    )
    extra = [t for t in tokenizer.special_tokens if t not in (EOT, PAD)]
    if extra:
        fast.add_special_tokens({"additional_special_tokens": extra})
    template = tokenizer.chat_template
    if template is None and IM_START in tokenizer.special_tokens:  # what gptforge chat/serve render with
        from gptforge.chat_template import default_template

        template = default_template()
    if template:
        fast.chat_template = template
    fast.save_pretrained(str(out_dir))


# ---- import ------------------------------------------------------------------------------------------------


def config_from_hf(hf_cfg: dict, where: str) -> GPTConfig:
    """Our config for a HF ``config.json``: GPT-2, or Llama/Qwen3 as a modern-family config."""
    from gptforge.hf_modern import MODEL_TYPES
    from gptforge.hf_modern import config_from_hf as modern_config

    if hf_cfg.get("model_type") in MODEL_TYPES:
        return modern_config(hf_cfg, where)
    if hf_cfg.get("model_type", "gpt2") != "gpt2":
        raise GptforgeError(f"{where}: model_type {hf_cfg.get('model_type')!r} is not gpt2, "
                            f"{', '.join(MODEL_TYPES)}")
    act = hf_cfg.get("activation_function", "gelu_new")
    if act not in _HF_ACTIVATIONS:
        raise GptforgeError(f"{where}: activation {act!r} is not GPT-2's tanh GELU")
    d = hf_cfg.get("n_embd", 768)
    if hf_cfg.get("n_inner") not in (None, 4 * d):
        raise GptforgeError(f"{where}: n_inner={hf_cfg['n_inner']} is not 4·n_embd")
    return GPTConfig(
        vocab_size=hf_cfg.get("vocab_size", 50257), block_size=hf_cfg.get("n_positions", 1024),
        n_layer=hf_cfg.get("n_layer", 12), n_head=hf_cfg.get("n_head", 12), n_embd=d,
        dropout=0.0, bias=True, qkv_bias=True, tie_embeddings=hf_cfg.get("tie_word_embeddings", True),
        layer_norm_eps=hf_cfg.get("layer_norm_epsilon", 1e-5),
    )


def _read_hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    from gptforge.checkpoint import read_safetensors

    st = directory / "model.safetensors"
    if st.is_file():
        return read_safetensors(st)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(read_json(index, "safetensors index")["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for f in files:
            state.update(read_safetensors(directory / f))
        return state
    binf = directory / "pytorch_model.bin"
    if binf.is_file():
        try:  # weights_only: tensors and plain containers, never arbitrary pickled objects
            return torch.load(binf, map_location="cpu", weights_only=True)
        except Exception as e:
            raise GptforgeError(f"cannot read {binf}: {type(e).__name__}: {' '.join(str(e).split())[:200]}; the "
                                "file is damaged or holds more than tensors (only weights are loaded)") from None
    raise GptforgeError(f"{directory}: no model.safetensors or pytorch_model.bin")


def import_hf(directory: str | Path) -> tuple[GPT, Tokenizer | None]:
    """Build our :class:`GPT` (and tokenizer, when present) from a Hugging Face GPT-2 directory; a Llama or Qwen3
    directory gives a :class:`~gptforge.model_modern.ModernGPT`."""
    from gptforge.hf_modern import MODEL_TYPES
    from gptforge.hf_modern import import_hf as import_modern

    directory = Path(directory)
    cfg_path = directory / "config.json"
    hf_cfg = read_json(cfg_path, "Hugging Face config")
    if isinstance(hf_cfg, dict) and hf_cfg.get("model_type") in MODEL_TYPES:
        return import_modern(directory, hf_cfg), import_hf_tokenizer(directory)
    config = config_from_hf(hf_cfg, str(cfg_path))
    raw = _read_hf_weights(directory)
    state: dict[str, torch.Tensor] = {}
    for name, tensor in raw.items():
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # causal-mask buffers of old checkpoints
        if not name.startswith(("transformer.", "lm_head.")):
            name = "transformer." + name  # OpenAI's original checkpoints have no prefix
        state[name] = tensor.t().contiguous() if name.endswith(_CONV1D) else tensor
    if "lm_head.weight" not in state:
        if not config.tie_embeddings:
            raise GptforgeError(f"{directory}: untied model without lm_head.weight")
        state["lm_head.weight"] = state["transformer.wte.weight"]
    model = GPT(config)
    try:
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except RuntimeError as e:
        raise GptforgeError(f"{directory}: weights do not match config.json: {e}") from None
    return model, import_hf_tokenizer(directory)


def import_hf_tokenizer(directory: Path) -> Tokenizer | None:
    """Our tokenizer from a HF directory's ``tokenizer.json`` (or vocab.json + merges.txt), if any."""
    if (directory / "tokenizer.json").is_file():
        tok = BPETokenizer.from_file(directory / "tokenizer.json", name=directory.name)
    elif (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers

        bpe = models.BPE.from_file(str(directory / "vocab.json"), str(directory / "merges.txt"))
        hf = HFTokenizer(bpe)
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        from tokenizers import AddedToken

        hf.add_special_tokens([AddedToken(EOT, special=True, normalized=False)])
        tok = BPETokenizer(hf, name=directory.name)
    else:
        return None
    cfg_path = directory / "tokenizer_config.json"
    if cfg_path.is_file():
        tok.chat_template = json.loads(cfg_path.read_text(encoding="utf-8")).get("chat_template")
    jinja = directory / "chat_template.jinja"
    if tok.chat_template is None and jinja.is_file():
        tok.chat_template = jinja.read_text(encoding="utf-8")
    return tok
