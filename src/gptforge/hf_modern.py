"""Hugging Face interop for the modern family: export to and import from ``LlamaForCausalLM`` and ``Qwen3ForCausalLM``.

A :class:`~gptforge.model_modern.ModernGPT` with the default choices (RMSNorm, SwiGLU, RoPE) *is* a Llama (without
QK-norm) or a Qwen3 (with QK-norm): the export renames parameters, nothing else, and the directory loads with
``AutoModelForCausalLM`` (no ``trust_remote_code``), vLLM, llama.cpp's converter and ``pipeline``. The ablation
choices (LayerNorm, GELU/ReLU² MLPs, learned positions) have no stock ``transformers`` class and are refused.
Tokenizer, chat template and generation config are written as for GPT-2 (:mod:`gptforge.hf`).
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import torch

from gptforge.errors import GptforgeError
from gptforge.model_modern import ModernConfig, ModernGPT
from gptforge.tokenizer import Tokenizer

MODEL_TYPES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}

# Our name → Hugging Face's (both classes share the layout; Qwen3 adds q_norm/k_norm).
_RENAMES = [
    (r"^transformer\.wte\.weight$", "model.embed_tokens.weight"),
    (r"^transformer\.ln_f\.weight$", "model.norm.weight"),
    (r"^transformer\.h\.(\d+)\.ln_1\.weight$", r"model.layers.\1.input_layernorm.weight"),
    (r"^transformer\.h\.(\d+)\.ln_2\.weight$", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"^transformer\.h\.(\d+)\.attn\.(q_proj|k_proj|v_proj|o_proj|q_norm|k_norm)\.weight$",
     r"model.layers.\1.self_attn.\2.weight"),
    (r"^transformer\.h\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight$", r"model.layers.\1.mlp.\2.weight"),
    (r"^lm_head\.weight$", "lm_head.weight"),
]
_BACK = [
    (r"^model\.embed_tokens\.weight$", "transformer.wte.weight"),
    (r"^model\.norm\.weight$", "transformer.ln_f.weight"),
    (r"^model\.layers\.(\d+)\.input_layernorm\.weight$", r"transformer.h.\1.ln_1.weight"),
    (r"^model\.layers\.(\d+)\.post_attention_layernorm\.weight$", r"transformer.h.\1.ln_2.weight"),
    (r"^model\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|o_proj|q_norm|k_norm)\.weight$",
     r"transformer.h.\1.attn.\2.weight"),
    (r"^model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight$", r"transformer.h.\1.mlp.\2.weight"),
    (r"^lm_head\.weight$", "lm_head.weight"),
]


def _rename(name: str, rules) -> str | None:
    for pattern, repl in rules:
        if re.match(pattern, name):
            return re.sub(pattern, repl, name)
    return None


def hf_model_type(config: ModernConfig) -> str:
    """``qwen3`` for a model with QK-norm, else ``llama``; an ablation choice with no stock class is an error."""
    odd = [f"{k}={getattr(config, k)}" for k, want in (("norm", "rmsnorm"), ("mlp", "swiglu"), ("pos", "rope"))
           if getattr(config, k) != want]
    if odd:
        raise GptforgeError(f"cannot export a modern model with {', '.join(odd)}: only norm=rmsnorm, mlp=swiglu, "
                            "pos=rope map onto a stock transformers class (LlamaForCausalLM / Qwen3ForCausalLM); "
                            "the other choices are for ablations")
    return "qwen3" if config.qk_norm else "llama"


def hf_config(config: ModernConfig, tokenizer: Tokenizer | None = None):
    """A ``LlamaConfig`` or ``Qwen3Config`` describing ``config``."""
    from transformers import LlamaConfig, Qwen3Config

    kind = hf_model_type(config)
    cls = Qwen3Config if kind == "qwen3" else LlamaConfig
    eos = tokenizer.eot_id if tokenizer is not None else None
    rope = ({"rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta}}
            if "rope_parameters" in inspect.signature(cls.__init__).parameters else {"rope_theta": config.rope_theta})
    kwargs = dict(
        vocab_size=config.vocab_size, hidden_size=config.n_embd, intermediate_size=config.mlp_hidden,
        num_hidden_layers=config.n_layer, num_attention_heads=config.n_head, num_key_value_heads=config.n_kv_head,
        head_dim=config.head_dim, hidden_act="silu", max_position_embeddings=config.block_size,
        rms_norm_eps=config.norm_eps, tie_word_embeddings=config.tie_embeddings, attention_bias=False,
        attention_dropout=0.0, bos_token_id=eos, eos_token_id=eos,
        pad_token_id=tokenizer.pad_id if tokenizer is not None else None, architectures=[MODEL_TYPES[kind]], **rope,
    )
    if kind == "llama":
        kwargs["mlp_bias"] = False
    else:
        kwargs.update(use_sliding_window=False, max_window_layers=config.n_layer)
    return cls(**kwargs)


def to_hf_state_dict(model: ModernGPT) -> dict[str, torch.Tensor]:
    """Our parameters under Hugging Face names (a tied head is left out: ``tie_word_embeddings`` restores it)."""
    out = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_embeddings:
            continue
        hf_name = _rename(name, _RENAMES)
        if hf_name is None:
            raise GptforgeError(f"internal export error: no Hugging Face name for {name}")
        out[hf_name] = tensor.detach().clone()
    return out


def export_model(model: ModernGPT, tokenizer: Tokenizer | None, out_dir: str | Path,
                 extra_files: dict | None = None) -> Path:
    """Write a ``transformers``-loadable Llama or Qwen3 directory (weights, config, generation config, tokenizer)."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    from gptforge.hf import _stop_ids, export_tokenizer

    cfg = hf_config(model.config, tokenizer)  # refuses ablation-only choices before anything is written
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.float().cpu()
    hf_model = AutoModelForCausalLM.from_config(cfg)
    missing, unexpected = hf_model.load_state_dict(to_hf_state_dict(model), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_embeddings)]
    if missing or unexpected:
        raise GptforgeError(f"internal export mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if model.config.tie_embeddings:
        hf_model.tie_weights()
    hf_model.save_pretrained(out_dir, safe_serialization=True)
    if tokenizer is not None:
        GenerationConfig(bos_token_id=tokenizer.eot_id, eos_token_id=_stop_ids(tokenizer),
                         pad_token_id=tokenizer.pad_id, do_sample=False).save_pretrained(out_dir)
        export_tokenizer(tokenizer, out_dir, model_max_length=model.config.block_size)
    for name, text in (extra_files or {}).items():
        (out_dir / name).write_text(text, encoding="utf-8")
    return out_dir


# ---- import ------------------------------------------------------------------------------------------------


def _rope_theta(hf_cfg: dict, where: str) -> float:
    params = hf_cfg.get("rope_parameters") or {}
    scaling = hf_cfg.get("rope_scaling") or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise GptforgeError(f"{where}: RoPE scaling {kind!r} is not supported (plain RoPE only)")
    return float(params.get("rope_theta", hf_cfg.get("rope_theta", 10000.0)))


def config_from_hf(hf_cfg: dict, where: str) -> ModernConfig:
    """A :class:`ModernConfig` from a Llama or Qwen3 ``config.json``; what the family cannot express is an error."""
    kind = hf_cfg.get("model_type")
    if kind not in MODEL_TYPES:
        raise GptforgeError(f"{where}: model_type {kind!r} is not one of {', '.join(MODEL_TYPES)}")
    if hf_cfg.get("hidden_act", "silu") != "silu":
        raise GptforgeError(f"{where}: hidden_act {hf_cfg['hidden_act']!r} is not SwiGLU's silu")
    for key in ("attention_bias", "mlp_bias"):
        if hf_cfg.get(key):
            raise GptforgeError(f"{where}: {key}=true; the modern family has no biases")
    if hf_cfg.get("use_sliding_window"):
        raise GptforgeError(f"{where}: sliding-window attention is not supported")
    d, heads = hf_cfg.get("hidden_size", 4096), hf_cfg.get("num_attention_heads", 32)
    return ModernConfig(
        vocab_size=hf_cfg.get("vocab_size", 32000), block_size=hf_cfg.get("max_position_embeddings", 2048),
        n_layer=hf_cfg.get("num_hidden_layers", 32), n_head=heads,
        n_kv_head=hf_cfg.get("num_key_value_heads") or heads, n_embd=d,
        head_dim=hf_cfg.get("head_dim") or d // heads, mlp_hidden=hf_cfg.get("intermediate_size", 11008),
        qk_norm=kind == "qwen3", rope_theta=_rope_theta(hf_cfg, where), norm_eps=hf_cfg.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(hf_cfg.get("tie_word_embeddings", False)),
    )


def import_hf(directory: str | Path, hf_cfg: dict) -> ModernGPT:
    """Our :class:`ModernGPT` from a Hugging Face Llama/Qwen3 directory (``hf_cfg``: its parsed config.json)."""
    from gptforge.hf import _read_hf_weights

    directory = Path(directory)
    config = config_from_hf(hf_cfg, str(directory / "config.json"))
    state: dict[str, torch.Tensor] = {}
    for name, tensor in _read_hf_weights(directory).items():
        if name.endswith("rotary_emb.inv_freq"):
            continue  # a buffer some older checkpoints saved; RoPE is recomputed from rope_theta
        ours = _rename(name, _BACK)
        if ours is None:
            raise GptforgeError(f"{directory}: unexpected weight {name} for a {hf_cfg.get('model_type')} model")
        state[ours] = tensor.float()
    if "lm_head.weight" not in state:
        if not config.tie_embeddings:
            raise GptforgeError(f"{directory}: untied model without lm_head.weight")
        state["lm_head.weight"] = state["transformer.wte.weight"]
    model = ModernGPT(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise GptforgeError(f"{directory}: weights do not match config.json: {' '.join(str(e).split())[:300]}") from None
    return model
