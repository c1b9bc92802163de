"""The inference engine: batched KV-cache generation, stopping, sampling, and agreement with transformers."""

import dataclasses

import pytest
import torch

from gptforge.engine import Completion, Engine, SamplingParams
from gptforge.errors import GptforgeError
from gptforge.sampling import process_logits, row_settings
from gptforge.tokenizer import IM_END, IM_START

PROMPTS = ["The verdict was", "It had always been his fate to", "Yes", "Mrs. Gisburn said that the picture"]


@pytest.fixture(scope="module")
def engine(make_tiny_model):
    model, tok = make_tiny_model()
    return Engine(model, tok)


def greedy(n, **kw):
    return SamplingParams(max_new_tokens=n, temperature=0.0, **kw)


# ---- agreement with transformers ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_model(engine, tmp_path_factory):
    """The engine's model exported with ``export_model`` and loaded back as ``GPT2LMHeadModel``."""
    transformers = pytest.importorskip("transformers")
    from gptforge.hf import export_model

    out = tmp_path_factory.mktemp("hf")
    export_model(engine.model, engine.tokenizer, out)
    return transformers.GPT2LMHeadModel.from_pretrained(out).eval()


def test_greedy_batch_matches_transformers_generate_with_left_padding(engine, hf_model):
    hf = hf_model
    ids = [engine.tokenizer.encode(p) for p in PROMPTS]
    assert len({len(i) for i in ids}) > 2  # genuinely mixed lengths
    width = max(map(len, ids))
    pad = engine.tokenizer.eot_id
    input_ids = torch.tensor([[pad] * (width - len(i)) + i for i in ids])
    attention = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
    n = 24
    with torch.no_grad():
        hf_out = hf.generate(input_ids, attention_mask=attention, max_new_tokens=n, do_sample=False,
                             pad_token_id=pad, eos_token_id=sorted(engine.base_stop_ids))
    ours = engine.generate(PROMPTS, greedy(n))
    for row, completion in zip(hf_out[:, width:].tolist(), ours):
        stops = [k for k, t in enumerate(row) if t in engine.base_stop_ids]
        expected = row[: stops[0] + 1] if stops else row
        assert completion.token_ids == expected
    assert len({tuple(c.token_ids) for c in ours}) == len(PROMPTS)


def test_greedy_with_repetition_penalty_matches_transformers_generate(engine, hf_model):
    ids = engine.tokenizer.encode(PROMPTS[1])
    with torch.no_grad():
        hf_out = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                   max_new_tokens=20, do_sample=False, repetition_penalty=1.3,
                                   pad_token_id=engine.tokenizer.eot_id, eos_token_id=sorted(engine.base_stop_ids))
    ours = engine.generate([ids], greedy(20, repetition_penalty=1.3))[0]
    plain = engine.generate([ids], greedy(20))[0]
    assert ours.finish_reason == "stop" or len(ours.token_ids) == 20
    assert ours.token_ids == hf_out[0, len(ids):].tolist()[: len(ours.token_ids)]
    assert ours.token_ids != plain.token_ids  # the penalty changed the greedy path


HF_CASES = [
    dict(temperature=0.7),
    dict(top_k=7),
    dict(top_p=0.9),
    dict(top_p=0.95, temperature=1.3),
    dict(repetition_penalty=1.1),
    dict(repetition_penalty=0.8, temperature=0.5, top_k=50, top_p=0.8),
    dict(min_p=0.05, temperature=0.9),
]


@pytest.mark.parametrize("case", HF_CASES, ids=[",".join(f"{k}={v}" for k, v in c.items()) for c in HF_CASES])
def test_processed_distribution_identical_to_transformers_logits_processors(case):
    tlp = pytest.importorskip("transformers.generation.logits_process")
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 2000, generator=g) * 4
    input_ids = torch.randint(0, 2000, (3, 30), generator=g)
    p = SamplingParams(**case)
    chain = []
    if p.repetition_penalty != 1.0:
        chain.append(tlp.RepetitionPenaltyLogitsProcessor(p.repetition_penalty))
    if p.temperature != 1.0:
        chain.append(tlp.TemperatureLogitsWarper(p.temperature))
    if p.top_k:
        chain.append(tlp.TopKLogitsWarper(p.top_k))
    if p.top_p < 1.0:
        chain.append(tlp.TopPLogitsWarper(p.top_p))
    if p.min_p:
        chain.append(tlp.MinPLogitsWarper(p.min_p))
    expected = logits.clone()
    for proc in chain:
        expected = proc(input_ids, expected)
    seen = torch.zeros(3, 2000, dtype=torch.bool)
    seen.scatter_(1, input_ids, True)
    ours = process_logits(logits, row_settings([p] * 3, "cpu"), seen=seen)
    assert torch.equal(torch.isinf(ours), torch.isinf(expected))
    assert torch.equal(ours, expected)
    assert torch.equal(torch.softmax(ours, -1), torch.softmax(expected, -1))
    if p.top_k or p.top_p < 1.0 or p.min_p:
        assert torch.isinf(ours).any()  # the filter really removed something


@pytest.mark.parametrize("scale", [4.0, 0.5], ids=["peaked", "flat"])
def test_top_p_matches_transformers_on_peaked_and_flat_distributions(scale):
    tlp = pytest.importorskip("transformers.generation.logits_process")
    logits = torch.randn(4, 5000, generator=torch.Generator().manual_seed(2)) * scale
    for top_p in (0.5, 0.9, 0.95):
        expected = tlp.TopPLogitsWarper(top_p)(None, logits.clone())
        ours = process_logits(logits, row_settings([SamplingParams(top_p=top_p)] * 4, "cpu"))
        assert torch.equal(ours, expected)
        assert 0 < torch.isinf(ours).sum() < ours.numel()


def test_mixed_settings_in_one_batch_match_each_row_alone():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 500, generator=g) * 3
    params = [SamplingParams(top_k=5), SamplingParams(top_p=0.5, temperature=0.7), SamplingParams(temperature=0)]
    together = process_logits(logits, row_settings(params, "cpu"))
    for i, p in enumerate(params):
        alone = process_logits(logits[i : i + 1], row_settings([p], "cpu"))
        assert torch.equal(together[i : i + 1], alone)


# ---- batching and stopping ----------------------------------------------------------------------------


def test_batched_generation_equals_one_prompt_at_a_time(engine):
    batched = engine.generate(PROMPTS, greedy(12))
    for prompt, b in zip(PROMPTS, batched):
        alone = engine.generate([prompt], greedy(12))[0]
        assert alone.token_ids == b.token_ids and alone.text == b.text
        assert b.prompt_ids == engine.tokenizer.encode(prompt)


def test_greedy_equals_argmax_of_full_forward_without_cache(engine):
    c = engine.generate([PROMPTS[1]], greedy(8, logprobs=True))[0]
    ids = list(c.prompt_ids)
    for token, logprob in zip(c.token_ids, c.logprobs):
        with torch.no_grad():
            logits = engine.model(torch.tensor([ids]))[0][0, -1]
        assert int(logits.argmax()) == token
        assert logprob == pytest.approx(float(torch.log_softmax(logits, -1)[token]), abs=1e-4)
        ids.append(token)


def test_max_new_tokens_gives_length_finish(engine):
    c = engine.generate(["Hello"], SamplingParams(max_new_tokens=5, seed=0))[0]
    assert isinstance(c, Completion) and len(c.token_ids) == 5 and c.finish_reason == "length"
    assert c.text == engine.tokenizer.decode(c.token_ids)


def test_each_row_stops_independently_on_its_stop_token(engine):
    free = engine.generate(PROMPTS[:2], greedy(10))
    stop_token = free[0].token_ids[3]  # row 0's 4th token becomes a stop token for both rows
    stopped = engine.generate(PROMPTS[:2], greedy(10, stop_token_ids=[stop_token]))
    assert stopped[0].finish_reason == "stop"
    assert stopped[0].token_ids == free[0].token_ids[: free[0].token_ids.index(stop_token) + 1]
    assert stopped[0].text == engine.tokenizer.decode(stopped[0].token_ids[:-1])
    if stop_token not in free[1].token_ids:
        assert stopped[1].token_ids == free[1].token_ids and stopped[1].finish_reason == "length"


def test_stop_string_truncates_text_and_never_streams(engine):
    free = engine.generate([PROMPTS[0]], greedy(16))[0]
    stop = free.text[7:11]
    assert stop and stop in free.text
    c = engine.generate([PROMPTS[0]], greedy(16, stop_strings=[stop]))[0]
    assert c.finish_reason == "stop" and c.text == free.text[: free.text.find(stop)]
    streamed = "".join(engine.stream(PROMPTS[0], greedy(16, stop_strings=[stop])))
    assert streamed == c.text and stop not in streamed


def test_stream_concatenates_to_the_completion_text(engine):
    params = SamplingParams(max_new_tokens=20, seed=3)
    deltas = list(engine.stream(PROMPTS[2], params))
    assert len(deltas) > 3
    assert "".join(deltas) == engine.generate([PROMPTS[2]], params)[0].text


def test_on_token_false_cancels_only_that_row(engine):
    seen = []

    def on_token(i, token, delta):
        seen.append(i)
        return not (i == 0 and seen.count(0) >= 2)

    out = engine.generate(PROMPTS[:2], greedy(8), on_token=on_token)
    assert out[0].finish_reason == "cancelled" and len(out[0].token_ids) == 2
    assert len(out[1].token_ids) == 8


def test_prompt_longer_than_context_is_a_clear_error_or_slides(make_tiny_model):
    model, tok = make_tiny_model(block_size=32)
    long_prompt = list(range(100, 140))
    with pytest.raises(GptforgeError, match="context is 32"):
        Engine(model, tok).generate([long_prompt], greedy(4))
    c = Engine(model, tok, context_policy="slide").generate([long_prompt], greedy(4))[0]
    assert c.prompt_ids == long_prompt[-28:] and len(c.token_ids) == 4


def test_generation_stops_at_the_context_limit(make_tiny_model):
    model, tok = make_tiny_model(block_size=32)
    c = Engine(model, tok).generate([list(range(100, 125))], greedy(50))[0]
    assert len(c.prompt_ids) + len(c.token_ids) == 32 and c.finish_reason == "length"


def test_short_prompt_in_batch_with_long_one_keeps_its_own_budget(make_tiny_model):
    model, tok = make_tiny_model(block_size=32)
    out = Engine(model, tok).generate([list(range(100, 125)), [100, 101]], greedy(20))
    assert len(out[0].token_ids) == 7 and len(out[1].token_ids) == 20


# ---- sampling -----------------------------------------------------------------------------------------


def test_seed_reproducible_per_request(engine):
    p = SamplingParams(max_new_tokens=12, temperature=1.0, top_k=200, seed=1234)
    a = engine.generate([PROMPTS[0]], p)[0].token_ids
    assert engine.generate([PROMPTS[0]], p)[0].token_ids == a
    assert engine.generate([PROMPTS[0]], dataclasses.replace(p, seed=99))[0].token_ids != a
    # Same request inside a bigger batch (explicit per-row settings) samples the same tokens.
    mixed = engine.generate([PROMPTS[1], PROMPTS[0]], [greedy(12), p])
    assert mixed[1].token_ids == a


def test_one_seed_for_a_batch_gives_distinct_reproducible_rows(engine):
    p = SamplingParams(max_new_tokens=10, seed=5)
    rows = engine.generate([PROMPTS[0]] * 3, p)
    assert len({tuple(r.token_ids) for r in rows}) == 3
    assert [r.token_ids for r in engine.generate([PROMPTS[0]] * 3, p)] == [r.token_ids for r in rows]


def test_top_k_1_sampling_is_greedy(engine):
    assert engine.generate([PROMPTS[3]], SamplingParams(max_new_tokens=10, top_k=1, seed=0))[0].token_ids == \
        engine.generate([PROMPTS[3]], greedy(10))[0].token_ids


def test_penalties_break_greedy_loops(engine):
    looping = engine.generate(["Hello there"], greedy(12))[0].token_ids
    assert len(set(looping)) < len(looping)  # a small random model repeats itself under greedy decoding
    for params in (greedy(12, repetition_penalty=50.0), greedy(12, frequency_penalty=2.0, presence_penalty=2.0)):
        out = engine.generate(["Hello there"], params)[0].token_ids
        assert len(set(out)) > len(set(looping))


def test_invalid_sampling_settings_are_rejected(engine):
    for bad in (dict(temperature=-1), dict(top_p=0), dict(max_new_tokens=0), dict(top_k=-2)):
        with pytest.raises(GptforgeError, match="invalid sampling setting"):
            engine.generate(["x"], SamplingParams(**bad))


# ---- chat ---------------------------------------------------------------------------------------------


def test_chat_renders_template_and_stops_at_end_of_turn(engine):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    free = engine.chat(messages, greedy(6))
    tok = engine.tokenizer
    expected_tail = tok.encode(f"{IM_START}assistant\n", allow_special=True)
    assert free.prompt_ids[-len(expected_tail):] == expected_tail
    assert free.prompt_ids.count(tok.special_tokens[IM_START]) == 3
    assert tok.special_tokens[IM_END] in engine.base_stop_ids


def test_fit_messages_drops_oldest_turns_but_keeps_system(make_tiny_model):
    model, tok = make_tiny_model(block_size=64)
    eng = Engine(model, tok)
    msgs = [{"role": "system", "content": "sys"}]
    for i in range(8):
        msgs += [{"role": "user", "content": f"question {i} " * 3}, {"role": "assistant", "content": f"answer {i}"}]
    msgs.append({"role": "user", "content": "last"})
    fitted = eng.fit_messages(msgs, max_new_tokens=16)
    assert fitted[0]["role"] == "system" and fitted[-1]["content"] == "last"
    assert len(fitted) < len(msgs)
    assert len(eng.encode_prompt(eng.render_chat(fitted))) <= 64 - 16
    assert fitted[1:] == msgs[len(msgs) - len(fitted) + 1 :]  # the most recent turns, in order
    one_more = [fitted[0]] + msgs[len(msgs) - len(fitted) :]
    assert len(eng.encode_prompt(eng.render_chat(one_more))) > 48  # nothing droppable was kept needlessly


def test_sampler_draws_from_the_processed_distribution():
    from gptforge.sampling import choose_tokens

    probs = torch.tensor([0.5, 0.0, 0.3, 0.15, 0.05])
    scores = torch.log(probs).expand(4000, 5).clone()  # 4000 rows sampled at once
    g = torch.Generator().manual_seed(0)
    draws = choose_tokens(scores, torch.zeros(4000, dtype=torch.bool), [g] * 4000)
    freq = torch.bincount(draws, minlength=5).float() / 4000
    assert freq[1] == 0  # a filtered (-inf) token is never drawn
    assert torch.allclose(freq, probs, atol=0.03)


def test_sampling_from_a_model_in_training_keeps_its_mode_and_dtype(make_tiny_model):
    model, tok = make_tiny_model()
    model.train()
    eng = Engine(model, tok)
    assert eng.generate(["Hi"], greedy(3))[0].token_ids
    assert model.training and eng.dtype == torch.float32 and eng.model is model


def test_on_finish_reports_each_row_as_soon_as_it_is_done(engine):
    events = []
    out = engine.generate(PROMPTS[:2], [greedy(3), greedy(9)],
                          on_token=lambda i, t, d: events.append(("token", i)),
                          on_finish=lambda i, c: events.append(("finish", i, len(c.token_ids))))
    finish_0 = events.index(("finish", 0, 3))
    assert events[finish_0 - 1] == ("token", 0) and ("token", 1) in events[finish_0 + 1 :]
    assert events[-1] == ("finish", 1, 9) and [len(c.token_ids) for c in out] == [3, 9]


# ---- log-probabilities and the shared sampling defaults --------------------------------------------------


def test_top_logprobs_are_the_models_own_distribution(engine):
    c = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=6, seed=4, temperature=1.5, top_k=20,
                                                     logprobs=True, top_logprobs=5))[0]
    assert len(c.logprobs) == len(c.top_logprobs) == len(c.token_ids) == 6
    ids = list(c.prompt_ids)
    for token, logprob, top in zip(c.token_ids, c.logprobs, c.top_logprobs):
        with torch.no_grad():  # unprocessed: temperature and top-k change the draw, not the reported numbers
            expected = torch.log_softmax(engine.model(torch.tensor([ids]))[0][0, -1].float(), -1)
        values, indices = expected.topk(5)
        assert [t for t, _ in top] == indices.tolist()
        assert [v for _, v in top] == pytest.approx(values.tolist(), abs=1e-4)
        assert logprob == pytest.approx(float(expected[token]), abs=1e-4)
        ids.append(token)


def test_logprobs_per_row_in_a_mixed_batch(engine):
    out = engine.generate(PROMPTS[:3], [greedy(4, logprobs=True, top_logprobs=2), greedy(4),
                                         greedy(4, logprobs=True)])
    assert [len(t) for t in out[0].top_logprobs] == [2] * 4 and out[0].top_logprobs[0][0][0] == out[0].token_ids[0]
    assert out[1].logprobs is None and out[1].top_logprobs is None
    assert out[2].top_logprobs == [[]] * 4 and len(out[2].logprobs) == 4


def test_sampling_defaults_are_one_set_and_greedy_is_plain_argmax():
    from gptforge.engine import SAMPLING_DEFAULTS

    sampled = SAMPLING_DEFAULTS.params(max_new_tokens=5)
    assert (sampled.temperature, sampled.top_p, sampled.repetition_penalty) == (0.8, 0.95, 1.1)
    plain = SAMPLING_DEFAULTS.params(temperature=0.0)
    assert plain.repetition_penalty == 1.0 and plain.presence_penalty == plain.frequency_penalty == 0.0
    asked = SAMPLING_DEFAULTS.params(temperature=0.0, repetition_penalty=1.3, frequency_penalty=0.5)
    assert asked.repetition_penalty == 1.3 and asked.frequency_penalty == 0.5
    assert SAMPLING_DEFAULTS.params(temperature=0.5).repetition_penalty == 1.1  # sampling keeps the default
