"""Weight-exact interop with transformers' GPT2LMHeadModel (import, export, pipeline)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from gptforge.checkpoint import load_model, save_model
from gptforge.hf import export_model, import_hf
from gptforge.model import GPT, GPTConfig
from gptforge.tokenizer import TiktokenTokenizer


def batch(vocab):
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, vocab, (3, 12), generator=g)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[0, :5] = 0
    mask[2, :2] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return idx, mask, pos


def assert_same_logits(ours, hf, vocab):
    idx, mask, pos = batch(vocab)
    with torch.no_grad():
        a = ours(idx, attention_mask=mask)[0]
        b = hf(input_ids=idx, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    assert (a[real] - b[real]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("tie", [True, False])
def test_import_random_hf_model_matches_logits(tmp_path, tie):
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=500, n_positions=64, n_embd=48, n_layer=2, n_head=4, tie_word_embeddings=tie)
    hf = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # HF inits biases to zero; make them matter
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.05)
    hf.save_pretrained(tmp_path)
    ours, tok = import_hf(tmp_path)
    assert ours.config.tie_embeddings == tie
    assert_same_logits(ours.eval(), hf, 500)


@pytest.mark.parametrize("tie,bias,qkv_bias", [(True, True, True), (False, True, False), (True, False, False),
                                               (False, False, True)])
def test_export_loads_in_transformers_without_remote_code(tmp_path, tie, bias, qkv_bias):
    torch.manual_seed(0)
    ours = GPT(GPTConfig(vocab_size=500, block_size=64, n_layer=2, n_head=4, n_embd=48, bias=bias,
                         qkv_bias=qkv_bias, tie_embeddings=tie)).eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.05)
    export_model(ours, None, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == "GPT2LMHeadModel"
    assert hf.config.tie_word_embeddings == tie
    assert_same_logits(ours, hf, 500)


def test_checkpoint_roundtrip_through_hf_directory_and_pipeline(tmp_path, data_dir):
    torch.manual_seed(0)
    tok = TiktokenTokenizer()
    ours = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=32)).eval()
    save_model(tmp_path / "ckpt", ours, tok)
    export_model(*load_model(tmp_path / "ckpt")[:2], tmp_path / "hf")
    pipe = transformers.pipeline("text-generation", model=str(tmp_path / "hf"), device="cpu")
    out = pipe("Hello world", max_new_tokens=5, do_sample=False)
    assert out[0]["generated_text"].startswith("Hello world")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = (data_dir / "pretrain" / "the-verdict.txt").read_text()[:2000]
    assert hf_tok(text)["input_ids"] == tok.encode(text)
    # Loading the HF directory back through --checkpoint gives the same model.
    again, tok2, _ = load_model(tmp_path / "hf")
    assert_same_logits(again, AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval(), tok.vocab_size)
    assert tok2.encode(text) == tok.encode(text)
