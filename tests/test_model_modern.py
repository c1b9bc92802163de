"""The modern family: shapes and sizes, KV cache and left padding, the engine, checkpoints, pretraining config,
and weight-exact interop with transformers' LlamaForCausalLM and Qwen3ForCausalLM (export, import, pipeline)."""

import json

import pytest
import torch

from gptforge.checkpoint import load_model, save_model
from gptforge.engine import Engine, SamplingParams
from gptforge.errors import GptforgeError
from gptforge.model import GPT, GPTConfig, KVCache
from gptforge.model import PRESETS as GPT_PRESETS
from gptforge.model import count_params as gpt_params
from gptforge.model_modern import PRESETS, ModernConfig, ModernGPT, count_params, preset
from gptforge.train.pretrain_config import build_model_config

pytestmark = pytest.mark.usefixtures("one_thread")

VARIANTS = {
    "llama": {},
    "gqa+qk_norm": {"n_kv_head": 1, "qk_norm": True},
    "ablations": {"norm": "layernorm", "mlp": "relu2", "pos": "learned"},
    "gelu untied wide heads": {"mlp": "gelu", "tie_embeddings": False, "head_dim": 24},
}


def small(**kw) -> ModernConfig:
    return ModernConfig(**{"vocab_size": 300, "block_size": 64, "n_layer": 2, "n_head": 4, "n_embd": 48, **kw})


def randomised(config: ModernConfig, seed: int = 0) -> ModernGPT:
    """A model whose norm gains are not all ones (so a misplaced norm changes the logits)."""
    torch.manual_seed(seed)
    model = ModernGPT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.normal_(1.0, 0.2)
    return model


def left_padded(vocab: int, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, vocab, (3, 12), generator=g)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[0, :5] = 0
    mask[2, :2] = 0
    return idx, mask, (mask.cumsum(-1) - 1).clamp(min=0)


# ---- the model -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_shape_loss_and_parameter_count(variant):
    model = randomised(small(**VARIANTS[variant]))
    idx, _, _ = left_padded(300)
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 12, 300)
    assert 4.0 < loss.item() < 9.0  # near ln(300) = 5.7 for an untrained model
    assert model.num_params() == count_params(model.config)
    assert model(idx, logits_to_keep=2)[0].shape == (3, 2, 300)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("cache_kind", ["engine KVCache (n_head heads)", "model.new_kv_cache (n_kv_head heads)"])
def test_kv_cache_decoding_equals_the_full_forward_with_left_padding(variant, cache_kind):
    model = randomised(small(**VARIANTS[variant]))
    idx, mask, _ = left_padded(300)
    with torch.no_grad():
        full = model(idx, attention_mask=mask)[0]
        cache = (KVCache(model.config, 3, 12) if cache_kind.startswith("engine")
                 else model.new_kv_cache(3, 12))
        steps = [model(idx[:, :6], attention_mask=mask[:, :6], kv_cache=cache)[0]]
        for t in range(6, 12):
            steps.append(model(idx[:, t:t + 1], attention_mask=mask[:, :t + 1], kv_cache=cache)[0])
    real = mask.bool()
    assert (torch.cat(steps, 1) - full)[real].abs().max().item() < 1e-5
    expected_heads = model.config.n_head if cache_kind.startswith("engine") else model.config.n_kv_head
    assert cache.k.shape[2] == expected_heads


def test_a_left_padded_row_equals_the_row_alone():
    model = randomised(small(n_kv_head=2, qk_norm=True))
    idx, mask, _ = left_padded(300)
    with torch.no_grad():
        batch = model(idx, attention_mask=mask)[0]
        alone = model(idx[0:1, 5:])[0]
    assert (batch[0, 5:] - alone[0]).abs().max().item() < 1e-5


def test_rope_makes_attention_depend_on_relative_position_only():
    model = randomised(small())
    idx = torch.randint(0, 300, (1, 8))
    with torch.no_grad():
        a = model(idx)[0]
        shifted = model(idx, position_ids=torch.arange(20, 28)[None])[0]
    assert (a - shifted).abs().max().item() < 1e-4


def test_config_validation_names_the_key():
    with pytest.raises(GptforgeError, match="n_kv_head"):
        small(n_kv_head=3)
    with pytest.raises(GptforgeError, match="model.mlp"):
        small(mlp="geglu")
    with pytest.raises(GptforgeError, match="context"):
        ModernGPT(small())(torch.zeros(1, 65, dtype=torch.long))


def test_presets_match_their_gpt2_counterparts_in_parameters():
    pairs = {"modern-tiny": "tiny", "modern-mini": "mini", "modern-small": "small", "modern-124m": "gpt2",
             "modern-355m": "gpt2-medium", "modern-356m-52k": "gpt2-356m-52k"}
    for modern, gpt in pairs.items():
        vocab = {"vocab_size": 4096} if gpt in ("tiny", "mini", "small") else {}  # the quickstart's BPE
        ours = count_params(preset(modern, **vocab))
        theirs = gpt_params(GPTConfig(**{**GPT_PRESETS[gpt], **vocab}))
        assert abs(ours - theirs) / theirs < 0.005, (modern, ours, theirs)
    assert set(pairs) == set(PRESETS)


# ---- engine, checkpoints, pretraining config -------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_model(modern_chat_model):
    """A 2-layer modern model (GQA, QK-norm) over the GPT-2 vocabulary + chat tokens, with weights large enough
    that greedy choices are never near-ties."""
    return modern_chat_model(block_size=96)


def test_engine_greedy_batch_equals_argmax_of_full_forward(chat_model):
    model, tok = chat_model
    prompts = ["The verdict was", "Yes", "It had always been his fate to"]
    out = Engine(model, tok).generate(prompts, SamplingParams(max_new_tokens=8, temperature=0.0))
    for prompt, completion in zip(prompts, out):
        ids = tok.encode(prompt)
        for token in completion.token_ids:
            with torch.no_grad():
                nxt = int(model(torch.tensor([ids]))[0][0, -1].argmax())
            assert token == nxt
            ids.append(nxt)


def test_checkpoint_records_the_family_and_loads_the_right_class(tmp_path, chat_model):
    model, tok = chat_model
    save_model(tmp_path / "modern", model, tok)
    meta = json.loads((tmp_path / "modern" / "model_config.json").read_text())
    assert meta["family"] == "modern" and meta["model"]["n_kv_head"] == 2
    again, _, _ = load_model(tmp_path / "modern")
    assert isinstance(again, ModernGPT) and again.config == model.config
    idx = torch.tensor([tok.encode("Hello there")])
    assert torch.equal(again(idx)[0], model(idx)[0])
    # a file written before families existed (no "family" key) is GPT-2
    save_model(tmp_path / "gpt", GPT(GPTConfig(vocab_size=300, block_size=32, n_layer=1, n_head=2, n_embd=16)))
    path = tmp_path / "gpt" / "model_config.json"
    old = json.loads(path.read_text())
    del old["family"]
    path.write_text(json.dumps(old))
    assert type(load_model(tmp_path / "gpt")[0]) is GPT


def test_pretrain_config_picks_the_family():
    from gptforge.train.pretrain import PretrainConfig

    cfg = PretrainConfig()
    cfg.model.preset = "modern-mini"
    assert isinstance(build_model_config(cfg, 512), ModernConfig)
    cfg.model.preset, cfg.model.family, cfg.model.qk_norm = "mini", "modern", True  # the counterpart of mini
    config = build_model_config(cfg, 512)
    assert (config.n_layer, config.n_embd, config.mlp_hidden, config.vocab_size, config.qk_norm) == (4, 128, 368, 512,
                                                                                                      True)
    cfg.model.mlp = "gelu"  # another MLP gets its default width: 4·d, GPT-2's parameters again
    assert build_model_config(cfg, 512).mlp_hidden == 512
    cfg.model.family = "gpt2"
    with pytest.raises(GptforgeError, match="model.mlp does not apply to the gpt2 family"):
        build_model_config(cfg, 512)


def test_model_info_cli_reports_a_modern_preset(capsys):
    from gptforge.cli import main

    assert main(["model", "info", "--preset", "modern-124m", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["params"] == count_params(preset("modern-124m")) == 124_435_968
    assert info["flops_per_token"] == 6 * info["params"] + 12 * 12 * 768 * 1024
    assert info["config"]["family"] == "modern"


# ---- Hugging Face interop --------------------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")


def assert_same_logits(ours, hf, vocab):
    idx, mask, pos = left_padded(vocab)
    with torch.no_grad():
        a = ours(idx, attention_mask=mask)[0]
        b = hf(input_ids=idx, attention_mask=mask, position_ids=pos).logits
        c = hf(input_ids=idx, attention_mask=mask).logits  # transformers' own positions for left padding
    real = mask.bool()
    assert (a[real] - b[real]).abs().max().item() <= 1e-5
    assert (a[real] - c[real]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("qk_norm,hf_class", [(False, "LlamaForCausalLM"), (True, "Qwen3ForCausalLM")])
@pytest.mark.parametrize("tie", [True, False])
def test_export_loads_as_a_stock_class_with_equal_logits(tmp_path, qk_norm, hf_class, tie):
    from gptforge.hf import export_model

    ours = randomised(small(n_kv_head=2, qk_norm=qk_norm, tie_embeddings=tie, rope_theta=500.0))
    export_model(ours, None, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == hf_class
    assert hf.config.tie_word_embeddings == tie and hf.config.num_key_value_heads == 2
    assert_same_logits(ours, hf, 300)


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_import_random_transformers_model_matches_logits(tmp_path, kind):
    from gptforge.hf import import_hf

    torch.manual_seed(0)
    common = {"vocab_size": 300, "hidden_size": 48, "intermediate_size": 80, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64, "head_dim": 16,
              "rms_norm_eps": 1e-5}
    if kind == "llama":
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, rope_theta=1000.0))
    else:  # wider heads than hidden/heads, as real Qwen3 models
        hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common, tie_word_embeddings=True))
    with torch.no_grad():
        for p in hf.parameters():
            if p.ndim == 1:
                p.normal_(1.0, 0.2)
    hf.eval().save_pretrained(tmp_path)
    ours, _ = import_hf(tmp_path)
    assert isinstance(ours, ModernGPT) and ours.config.qk_norm == (kind == "qwen3")
    assert ours.config.head_dim == 16 and ours.config.norm_eps == 1e-5
    assert_same_logits(ours.eval(), hf, 300)


def test_ablation_choices_are_refused_by_export(tmp_path):
    from gptforge.hf import export_model

    with pytest.raises(GptforgeError, match="pos=learned"):
        export_model(ModernGPT(small(pos="learned")), None, tmp_path)
    assert not (tmp_path / "config.json").exists()


def test_export_with_tokenizer_runs_in_pipeline_and_generates_like_the_engine(tmp_path, chat_model):
    from gptforge.hf import export_model

    model, tok = chat_model
    save_model(tmp_path / "ckpt", model, tok)
    export_model(*load_model(tmp_path / "ckpt")[:2], tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "Qwen3ForCausalLM"
    # the chat template exported with the tokenizer renders what the engine encodes
    messages = [{"role": "user", "content": "Hello!"}]
    engine = Engine(model, tok)
    assert hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                      return_dict=False) == engine.encode_chat(messages)
    # greedy generation: transformers' pipeline and our engine agree token for token
    pipe = transformers.pipeline("text-generation", model=hf, tokenizer=hf_tok, device="cpu")
    text = pipe("The verdict was", max_new_tokens=8, do_sample=False, return_full_text=False)[0]["generated_text"]
    ours = engine.generate(["The verdict was"], SamplingParams(max_new_tokens=8, temperature=0.0))[0]
    assert text == ours.text
    # and the HF directory loads back through --checkpoint as the same model
    again, _, _ = load_model(tmp_path / "hf")
    assert isinstance(again, ModernGPT)
    assert_same_logits(again, hf, tok.vocab_size)
