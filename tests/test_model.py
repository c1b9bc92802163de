import math

import pytest
import torch

from gptforge.errors import GptforgeError
from gptforge.model import GPT, GPTConfig, KVCache, count_params, flops_per_token, preset


def small_config(**kw):
    return GPTConfig(**{**dict(vocab_size=300, block_size=64, n_layer=2, n_head=4, n_embd=32), **kw})


def left_padded_batch(vocab=300, B=3, T=10):
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :3] = 0
    mask[2, :7] = 0
    return idx, mask


def test_gpt2_preset_has_124m_parameters():
    cfg = preset("gpt2")
    model = GPT(GPTConfig(**{**cfg.to_dict(), "n_layer": 1}))  # build one layer, count the rest from the formula
    assert count_params(cfg) == 124_439_808
    assert model.num_params() == count_params(model.config)
    assert model.num_params(non_embedding=True) == count_params(model.config, non_embedding=True)


def test_param_count_formula_matches_module_for_every_variant():
    for kw in [dict(), dict(bias=False), dict(qkv_bias=False), dict(tie_embeddings=False), dict(bias=False, qkv_bias=True)]:
        cfg = small_config(**kw)
        assert GPT(cfg).num_params() == count_params(cfg), kw


def test_flops_per_token_is_6n_plus_attention():
    cfg = preset("gpt2")
    n = count_params(cfg) - cfg.block_size * cfg.n_embd
    assert flops_per_token(cfg, 1024) == 6 * n + 12 * 12 * 768 * 1024


def test_initial_loss_is_near_log_vocab_with_tied_embeddings():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=50257, block_size=64, n_layer=2, n_head=2, n_embd=64, tie_embeddings=True)
    model = GPT(cfg)
    x = torch.randint(0, cfg.vocab_size, (4, 64))
    _, loss = model(x, x)
    assert abs(loss.item() - math.log(cfg.vocab_size)) < 1.0
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.transformer.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_residual_projections_use_scaled_init():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=256, block_size=32, n_layer=8, n_head=4, n_embd=256))
    std = model.transformer.h[0].mlp.c_proj.weight.std().item()
    assert std == pytest.approx(0.02 / math.sqrt(16), rel=0.05)


def test_loss_ignores_minus_100_targets():
    torch.manual_seed(0)
    model = GPT(small_config()).eval()
    x = torch.randint(0, 300, (2, 8))
    y = x.clone()
    y[:, :4] = -100
    logits, loss = model(x, y)
    ref = torch.nn.functional.cross_entropy(logits[:, 4:].reshape(-1, 300), x[:, 4:].reshape(-1))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)


def test_left_padding_gives_same_logits_as_unpadded():
    torch.manual_seed(0)
    model = GPT(small_config()).eval()
    idx, mask = left_padded_batch()
    batched, _ = model(idx, attention_mask=mask)
    for row in range(3):
        real = mask[row].bool()
        alone, _ = model(idx[row : row + 1, real])
        assert torch.allclose(batched[row, real], alone[0], atol=1e-5)


def test_kv_cache_incremental_decoding_matches_full_forward():
    torch.manual_seed(0)
    model = GPT(small_config()).eval()
    idx, mask = left_padded_batch(T=12)
    full, _ = model(idx, attention_mask=mask)
    cache = KVCache(model.config, batch_size=3, max_len=16)
    steps = [model(idx[:, :5], attention_mask=mask[:, :5], kv_cache=cache)[0]]
    for t in range(5, 12):
        steps.append(model(idx[:, t : t + 1], attention_mask=mask[:, : t + 1], kv_cache=cache)[0])
    incremental = torch.cat(steps, dim=1)
    real = mask.bool()
    assert torch.allclose(full[real], incremental[real], atol=1e-5)
    assert cache.length == 12


def test_kv_cache_without_padding_matches_full_forward():
    torch.manual_seed(0)
    model = GPT(small_config(bias=False)).eval()
    idx = torch.randint(0, 300, (2, 9))
    full, _ = model(idx)
    cache = KVCache(model.config, 2, 9)
    parts = [model(idx[:, :3], kv_cache=cache)[0]] + [model(idx[:, t : t + 1], kv_cache=cache)[0] for t in range(3, 9)]
    assert torch.allclose(full, torch.cat(parts, 1), atol=1e-5)


def test_four_dim_mask_blocks_attention_across_packed_examples():
    torch.manual_seed(0)
    model = GPT(small_config()).eval()
    a, b = torch.randint(0, 300, (1, 5)), torch.randint(0, 300, (1, 4))
    packed = torch.cat([a, b], 1)
    seg = torch.tensor([0] * 5 + [1] * 4)
    causal = torch.tril(torch.ones(9, 9, dtype=torch.bool))
    mask = (causal & (seg[:, None] == seg[None, :])).view(1, 1, 9, 9)
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3]])
    logits, _ = model(packed, attention_mask=mask, position_ids=pos)
    assert torch.allclose(logits[0, 5:], model(b)[0][0], atol=1e-5)
    assert torch.allclose(logits[0, :5], model(a)[0][0], atol=1e-5)


def test_sequence_longer_than_context_is_a_clear_error():
    model = GPT(small_config(block_size=8))
    with pytest.raises(GptforgeError, match="exceeds the model's context"):
        model(torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.parametrize("kw,msg", [(dict(n_embd=30, n_head=4), "divisible"), (dict(dropout=1.5), "dropout"),
                                    (dict(n_layer=0), "n_layer")])
def test_invalid_config_is_rejected(kw, msg):
    with pytest.raises(GptforgeError, match=msg):
        small_config(**kw)


def test_unknown_preset_lists_choices():
    with pytest.raises(GptforgeError, match="gpt2-medium"):
        preset("gpt5")
