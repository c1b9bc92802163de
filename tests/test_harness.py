"""The lm-eval adapter: its three request types agree with our own scorer and engine, offline.

`gptforge eval harness` end to end (shipped local tasks vs `eval choice`, errors) is in test_harness_offline.py."""

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance

from gptforge.checkpoint import save_model
from gptforge.eval.harness import GptforgeLM, score_pairs
from gptforge.eval.scoring import Request, score_requests
from gptforge.model import GPT, GPTConfig
from gptforge.tokenizer import TiktokenTokenizer


@pytest.fixture(scope="module")
def lm(data_dir):
    torch.manual_seed(1)
    model = GPT(GPTConfig(vocab_size=50257, block_size=64, n_layer=2, n_head=2, n_embd=32)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8)
    return GptforgeLM(model=model, tokenizer=TiktokenTokenizer(), batch_size=4, max_gen_toks=12)


def instances(kind, args_list):
    return [Instance(request_type=kind, doc={}, arguments=args, idx=i) for i, args in enumerate(args_list)]


def test_loglikelihood_matches_our_scorer_and_a_direct_forward(lm):
    pairs = [("The cat sat on the", " mat"), ("Hello", ", world!"), ("", "Just a continuation"),
             ("Trailing space ", "moves")]
    got = lm.loglikelihood(instances("loglikelihood", pairs))
    ours = score_pairs(lm.model, lm.tokenizer, pairs)
    assert [g[0] for g in got] == pytest.approx(ours, abs=1e-6)
    ctx, cont = lm.tokenizer.encode("The cat sat on the"), lm.tokenizer.encode(" mat")
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(torch.tensor([ctx + cont]))[0][0].double(), -1)
    direct = sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))
    assert got[0][0] == pytest.approx(direct, abs=1e-4)
    assert all(isinstance(g[1], bool) for g in got)


def test_loglikelihood_rolling_uses_lm_eval_windows(lm, data_dir):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    text = (data_dir / "pretrain" / "the-verdict.txt").read_text(encoding="utf-8")[:1500]
    tokens = lm.tokenizer.encode(text)
    assert len(tokens) > 2 * lm.max_length  # several windows
    [got] = lm.loglikelihood_rolling(instances("loglikelihood_rolling", [(text,)]))
    windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
        token_list=tokens, prefix_token=lm.tokenizer.eot_id, max_seq_len=lm.max_length, context_len=1)]
    reference = score_requests(lm.model, [Request(list(c), list(x)) for c, x in windows])
    assert sum(len(x) for _, x in windows) == len(tokens)
    assert got == pytest.approx(sum(s.logprob for s in reference), abs=1e-3)
    short = "A short sentence."
    [roll] = lm.loglikelihood_rolling(instances("loglikelihood_rolling", [(short,)]))
    [(ll, _)] = lm.loglikelihood(instances("loglikelihood", [("", short)]))
    assert roll == pytest.approx(ll, abs=1e-6)


def test_generate_until_is_greedy_and_stops_at_until(lm):
    prompt = "Once upon a time"
    [free] = lm.generate_until(instances("generate_until", [(prompt, {"until": ["<never>"], "max_gen_toks": 12})]))
    ids = lm.tokenizer.encode(prompt)
    with torch.no_grad():
        for _ in range(12):
            ids.append(int(lm.model(torch.tensor([ids]))[0][0, -1].argmax()))
    greedy_text = lm.tokenizer.decode(ids[len(lm.tokenizer.encode(prompt)):])
    eot = lm.tokenizer.decode([lm.tokenizer.eot_id])
    assert free == greedy_text.split(eot)[0]
    assert len(free) > 0
    stop = free[len(free) // 2 :][:2] or free[:1]
    [cut] = lm.generate_until(instances("generate_until", [(prompt, {"until": [stop], "max_gen_toks": 12})]))
    assert cut == free[: free.index(stop)]


def test_native_checkpoint_loads_through_model_args(tmp_path, lm):
    save_model(tmp_path / "ckpt", lm.model, lm.tokenizer)
    loaded = GptforgeLM.create_from_arg_string(f"checkpoint={tmp_path / 'ckpt'},batch_size=2", {"device": "cpu"})
    pairs = [("The cat", " sat")]
    a = loaded.loglikelihood(instances("loglikelihood", pairs))
    b = lm.loglikelihood(instances("loglikelihood", pairs))
    assert a[0][0] == pytest.approx(b[0][0], abs=1e-6)
