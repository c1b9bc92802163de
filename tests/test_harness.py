"""The lm-eval adapter: its three request types agree with our own scorer and engine, offline."""

import json

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance

from gptforge.checkpoint import save_model
from gptforge.eval.choice import evaluate_choice
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


@pytest.mark.slow
def test_lm_eval_cli_on_local_hellaswag_matches_eval_choice(lm, data_dir, tmp_path):
    """`gptforge eval harness` (lm-eval's CLI, its own hellaswag preprocessing and metrics) on a native
    checkpoint and a local copy of the data gives our eval choice numbers."""
    from gptforge.cli import main

    rows = (data_dir / "eval" / "hellaswag_val.jsonl").read_text().splitlines(keepends=True)[:8]
    (tmp_path / "hs.jsonl").write_text("".join(rows))
    (tmp_path / "hs_utils.py").write_text(
        "from lm_eval.tasks.hellaswag.utils import process_docs, preprocess  # noqa: F401\n")
    (tmp_path / "hellaswag_local.yaml").write_text(
        "task: hellaswag_local\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    validation: {tmp_path / 'hs.jsonl'}\n"
        "output_type: multiple_choice\nvalidation_split: validation\n"
        "process_docs: !function hs_utils.process_docs\ndoc_to_text: '{{query}}'\ndoc_to_target: '{{label}}'\n"
        "doc_to_choice: choices\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    save_model(tmp_path / "run" / "ckpt" / "step_0000001", lm.model, lm.tokenizer)
    (tmp_path / "run" / "ckpt" / "latest").write_text("step_0000001")
    rc = main(["eval", "harness", "--model_args", f"checkpoint={tmp_path / 'run'}", "--tasks", "hellaswag_local",
               "--include_path", str(tmp_path), "--output_path", str(tmp_path / "out")])
    assert rc == 0
    [result_file] = list((tmp_path / "out").rglob("results*.json"))
    theirs = json.loads(result_file.read_text())["results"]["hellaswag_local"]
    ours = evaluate_choice(lm.model, lm.tokenizer, "hellaswag", data=tmp_path / "hs.jsonl", show_progress=False)
    assert ours["metrics"]["n"] == 8
    assert theirs["acc,none"] == pytest.approx(ours["metrics"]["acc"])
    assert theirs["acc_norm,none"] == pytest.approx(ours["metrics"]["acc_norm"])
