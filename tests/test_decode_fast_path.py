"""The decoding fast paths (issue 16) give the results of the plain ones: argmax in two passes, the one-sum
finiteness check, the engine's precomputed positions and key mask, and the static-shape step behind
``Engine(compile=True)`` (run here uncompiled, and traced by ``torch.compile`` without Inductor)."""

import copy
import dataclasses

import pytest
import torch

from gptforge.engine import Engine, SamplingParams
from gptforge.model import GPT, GPTConfig, KVCache
from gptforge.model_modern import ModernConfig, ModernGPT
from gptforge.sampling import apply_top_p, argmax_rows, draw, finite_logits, row_settings

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["The verdict was", "It had always been his fate to", "Yes", "Mrs. Gisburn said that the picture"]


# ---- sampling -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [50257, 8192, 300])
def test_argmax_rows_is_torch_argmax_with_ties_infinities_and_nan(dtype, vocab):
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(7, vocab, generator=g).to(dtype)
    scores[1, [vocab - 1, 5]] = 9.0  # tie: the first index wins
    scores[2, vocab - 1] = 9.0  # the maximum in the short last chunk
    scores[3, [100, 3000 % vocab]] = float("inf")
    scores[4] = float("-inf")
    scores[4, vocab // 2] = -1e30
    scores[5, [vocab // 3, vocab // 2]] = float("nan")  # NaN counts as the maximum, first one wins
    scores[6] = 0.0  # everything tied
    assert torch.equal(argmax_rows(scores), scores.argmax(dim=-1))
    assert torch.equal(argmax_rows(scores[2:5]), scores[2:5].argmax(dim=-1))  # a strided view


@pytest.mark.parametrize("scale", [0.5, 1.0, 3.0, 8.0, 30.0])
def test_top_p_without_sorting_keeps_the_set_transformers_keeps_at_gpt2_vocabulary(scale):
    """At a 50k vocabulary the nucleus is found without sorting (buckets of probabilities); the kept set is
    HF's except, at most, one token per row whose cumulative probability is within float32 rounding of the cut
    (HF's own softmax over the sorted row sums its normalizer in another order)."""
    tlp = pytest.importorskip("transformers.generation.logits_process")
    logits = torch.randn(8, 50257, generator=torch.Generator().manual_seed(int(scale * 10))) * scale
    for top_p in (0.01, 0.5, 0.9, 0.95, 0.999):
        expected = tlp.TopPLogitsWarper(top_p)(None, logits.clone())
        ours = apply_top_p(logits, torch.full((8, 1), 1 - top_p))
        differ = torch.isinf(ours) != torch.isinf(expected)
        assert differ.sum(dim=-1).max() <= 1
        assert torch.equal(ours[~differ], expected[~differ])
        for row, col in differ.nonzero().tolist():  # only a token right at the cut
            ordered, index = torch.sort(logits[row])
            cumulative = ordered.softmax(-1).cumsum(-1)[(index == col).nonzero().item()]
            assert abs(cumulative.item() - (1 - top_p)) < 1e-6


def test_top_p_without_sorting_keeps_a_nucleus_under_bf16_ties():
    """bf16 logits tie by the thousand: the kept tokens are still the most likely ones, they hold more than
    top_p of the mass, and dropping any one of the least likely kept tokens would leave at most top_p."""
    logits = (torch.randn(6, 50257, generator=torch.Generator().manual_seed(5)) * 2).bfloat16().float()
    logits[5] = 0.0  # all tied: uniform
    for top_p in (0.3, 0.9):
        ours = apply_top_p(logits, torch.full((6, 1), 1 - top_p))
        probs = torch.softmax(logits.double(), -1)
        for row in range(6):
            kept = ~torch.isinf(ours[row])
            assert probs[row][kept].min() >= probs[row][~kept].max() if (~kept).any() else True
            assert probs[row][kept].sum() > top_p - 1e-6
            assert probs[row][kept].sum() - probs[row][kept].min() <= top_p + 1e-6
        assert (~torch.isinf(ours[5])).sum() == pytest.approx(top_p * 50257, abs=2)


def test_two_level_draw_inverts_the_float64_cdf():
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(5, 50257, generator=g) * 3
    scores[1, 1000:40000] = float("-inf")  # filtered tokens: never drawn
    scores[2, :-1] = float("-inf")  # only the last token left
    u = torch.rand(400, 5, dtype=torch.float64, generator=g)
    u[0] = 0.0
    u[1] = 1 - 2**-53
    cdf = torch.softmax(scores.double(), -1).cumsum(-1)
    for sample in u:
        expected = torch.searchsorted(cdf, (sample * cdf[:, -1])[:, None], right=True).squeeze(1)
        chosen = draw(scores, sample)
        assert torch.equal(chosen, expected.clamp(max=50256))
        assert not torch.isinf(scores[torch.arange(5), chosen]).any()


def test_finite_check_passes_finite_logits_through_even_when_their_sum_overflows():
    huge = torch.full((2, 8), 3e38)  # every element finite, their sum is not
    assert finite_logits(huge) is huge
    plain = torch.randn(3, 50)
    assert finite_logits(plain) is plain
    broken = plain.clone()
    broken[0, 4], broken[1, 7], broken[2] = float("nan"), float("inf"), float("nan")
    fixed = finite_logits(broken)
    assert fixed[0, 4] == float("-inf") and fixed[1, 7] == torch.finfo(torch.float32).max
    assert torch.equal(fixed[2], torch.zeros(50))  # nothing finite left: uniform


def test_row_settings_temperature_flag_follows_the_rows_left_in_the_batch():
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.7), SamplingParams(temperature=1.0)]
    s = row_settings(params, "cpu")
    assert not s.all_temperature_one
    assert s.select(torch.tensor([0, 2])).all_temperature_one  # greedy rows divide by 1
    assert not s.select(torch.tensor([1, 2])).all_temperature_one
    assert row_settings(params[:1], "cpu").all_temperature_one


# ---- the model's decoding step --------------------------------------------------------------------------------


def _models():
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=300, block_size=64, n_layer=2, n_head=4, n_embd=48)).eval()
    modern = ModernGPT(ModernConfig(vocab_size=300, block_size=64, n_layer=2, n_head=4, n_embd=48,
                                    n_kv_head=2, qk_norm=True)).eval()
    return {"gpt2": gpt, "modern": modern}


@pytest.mark.parametrize("family", ["gpt2", "modern"])
def test_decode_step_equals_forward_bit_for_bit_and_its_static_form_closely(family):
    model = _models()[family]
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 300, (3, 10), generator=g)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[0, :4] = 0
    mask[2, :1] = 0
    new_cache = getattr(model, "new_kv_cache", lambda b, n: KVCache(model.config, b, n))
    with torch.inference_mode():
        ref, dyn, static = new_cache(3, 16), new_cache(3, 16), new_cache(3, 16)
        for cache in (ref, dyn, static):
            model(idx[:, :8], attention_mask=mask[:, :8], kv_cache=cache)
        keys = mask.bool().view(3, 1, 1, 10)
        positions = mask[:, :9].sum(-1, keepdim=True) - 1  # (B, 1): real tokens before the new one
        expected = model(idx[:, 8:9], attention_mask=mask[:, :9], kv_cache=ref)[0][:, -1]
        got = model.decode_step(idx[:, 8:9], positions, keys[..., :9], dyn)
        dyn.length += 1
        assert torch.equal(got, expected)
        # static: every one of the 16 columns attended, the ones not written hidden by the mask
        static_keys = torch.zeros(3, 1, 1, 16, dtype=torch.bool)
        static_keys[..., :9] = keys[..., :9]
        static.make_static(8)
        close = model.decode_step(idx[:, 8:9], positions, static_keys, static)
        torch.testing.assert_close(close, expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(static.k[0, :, :, :9], ref.k[0, :, :, :9])  # written in place at column 8
        assert static.k[:, :, :, 9:].abs().sum() == 0


@pytest.mark.parametrize("heads", [(12, 12), (8, 2)], ids=["mha", "gqa"])
def test_bf16_decoding_attention_on_cpu_is_as_close_to_float32_as_sdpa_bf16(heads):
    """One bf16 query per row on a CPU takes two matmuls instead of SDPA's slow kernel (HF's eager numerics):
    within about twice SDPA's own bf16 error of the float32 result, masked keys ignored, GQA groups shared."""
    from gptforge.model import attend

    g = torch.Generator().manual_seed(0)
    h, h_kv = heads
    q = torch.randn(5, h, 1, 32, generator=g) * 2
    k, v = torch.randn(5, h_kv, 256, 32, generator=g) * 2, torch.randn(5, h_kv, 256, 32, generator=g)
    mask = torch.rand(5, 1, 1, 256, generator=g) > 0.4
    mask[..., -1] = True
    exact = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=h != h_kv)
    half = [t.bfloat16() for t in (q, k, v)]
    sdpa = torch.nn.functional.scaled_dot_product_attention(*half, attn_mask=mask, enable_gqa=h != h_kv)
    ours = attend(*half, mask)
    assert ours.dtype == torch.bfloat16 and ours.shape == q.shape
    assert (ours.float() - exact).abs().max() <= 3 * (sdpa.float() - exact).abs().max()
    assert torch.equal(attend(q, k, v, mask), exact)  # float32: SDPA itself
    assert not torch.equal(ours, sdpa)  # the matmul path was taken
    k2 = k.bfloat16().clone()
    k2[~mask[:, 0, 0].unsqueeze(1).expand(5, h_kv, 256)] = 1e4  # masked keys may hold anything
    assert torch.equal(attend(half[0], k2, half[2], mask), ours)
    small = [t[:1, :, :64] for t in half]  # few keys: SDPA's one call
    assert torch.equal(attend(*small, mask[:1, ..., :64]),
                       torch.nn.functional.scaled_dot_product_attention(*small, attn_mask=mask[:1, ..., :64],
                                                                        enable_gqa=h != h_kv))


@pytest.mark.parametrize("family", ["gpt2", "modern"])
def test_a_bf16_model_decodes_with_its_cache_as_closely_as_its_full_forward(family, make_tiny_model):
    model = _models()[family].to(torch.bfloat16)
    reference = _models()[family]  # float32
    idx = torch.randint(0, 300, (3, 12), generator=torch.Generator().manual_seed(4))
    new_cache = getattr(model, "new_kv_cache", lambda b, n, dtype: KVCache(model.config, b, n, dtype=dtype))
    with torch.inference_mode():
        truth = reference(idx)[0][:, -1]
        full = model(idx)[0][:, -1].float()  # bf16, no cache: SDPA throughout
        cache = new_cache(3, 16, dtype=torch.bfloat16)
        model(idx[:, :11], kv_cache=cache)
        stepped = model(idx[:, 11:], kv_cache=cache)[0][:, -1].float()  # the decoding path
    bf16_error = (full - truth).abs().max().item()
    assert (stepped - truth).abs().max().item() <= 1.5 * bf16_error + 1e-2
    tiny, tok = make_tiny_model()
    out = Engine(copy.deepcopy(tiny).to(torch.bfloat16), tok).generate(PROMPTS, SamplingParams(max_new_tokens=6,
                                                                                                temperature=0))
    assert all(len(c.token_ids) == 6 for c in out)


@pytest.mark.parametrize("family", ["gpt2", "modern"])
def test_decode_step_compiles_as_one_graph(family):
    """``torch.compile`` traces the static step without a graph break (Dynamo only: Inductor's C++ build is
    what ``Engine(compile=True)`` adds, too slow for a unit test)."""
    model = _models()[family]
    cache = getattr(model, "new_kv_cache", lambda b, n: KVCache(model.config, b, n))(2, 8)
    cache.make_static(0)
    step = torch.compile(model.decode_step, backend="eager", fullgraph=True)
    keys = torch.zeros(2, 1, 1, 8, dtype=torch.bool)
    tokens, positions = torch.tensor([[5], [7]]), torch.tensor([[0], [0]])
    with torch.inference_mode():
        for column in range(3):
            keys[..., column] = True
            cache.write_at.fill_(column)
            logits = step(tokens, positions, keys, cache)
            positions += 1
    assert logits.shape == (2, 300) and torch.isfinite(logits).all()


# ---- the engine -----------------------------------------------------------------------------------------------


def _static_engine(model, tok) -> Engine:
    """An engine on the static-shape path with the step left uncompiled (the same code, minus Inductor)."""
    engine = Engine(model, tok)
    engine.compiled_step = engine.model.decode_step
    return engine


@pytest.mark.parametrize("params", [
    SamplingParams(max_new_tokens=12, temperature=0),
    SamplingParams(max_new_tokens=12, temperature=0.9, top_p=0.9, repetition_penalty=1.2, seed=3),
    SamplingParams(max_new_tokens=12, temperature=0.8, top_k=20, presence_penalty=0.5, frequency_penalty=0.5,
                   seed=4, logprobs=True, top_logprobs=2),
], ids=["greedy", "top-p+repetition", "top-k+penalties+logprobs"])
def test_static_shape_path_gives_the_eager_tokens_as_rows_stop_at_different_steps(make_tiny_model, params):
    model, tok = make_tiny_model()
    eager = Engine(model, tok)
    first = eager.generate(PROMPTS, dataclasses.replace(params, max_new_tokens=6))
    stops = [c.token_ids[1 + i] for i, c in enumerate(first)]  # rows stop at different steps
    params = dataclasses.replace(params, stop_token_ids=stops)
    expected = eager.generate(PROMPTS, params)
    assert len({len(c.token_ids) for c in expected}) > 1
    got = _static_engine(model, tok).generate(PROMPTS, params)
    for a, b in zip(got, expected):
        assert (a.token_ids, a.finish_reason, a.text) == (b.token_ids, b.finish_reason, b.text)
        if params.logprobs:
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)


def test_static_engine_reuses_its_cache_for_the_same_shape(make_tiny_model):
    model, tok = make_tiny_model()
    engine = _static_engine(model, tok)
    a = engine.generate(PROMPTS, SamplingParams(max_new_tokens=5, temperature=0))
    cache = engine._last_static
    b = engine.generate(PROMPTS, SamplingParams(max_new_tokens=5, temperature=0))
    assert engine._last_static is cache and [c.token_ids for c in a] == [c.token_ids for c in b]


class NoStep(torch.nn.Module):
    """A model with only ``forward`` (what the engine must still drive)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


def test_compile_needs_a_decode_step(make_tiny_model):
    from gptforge.errors import GptforgeError

    model, tok = make_tiny_model()
    with pytest.raises(GptforgeError, match="decode_step"):
        Engine(NoStep(model), tok, compile=True)
