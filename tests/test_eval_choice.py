"""Multiple-choice evaluation: task loading (real HellaSwag/MMLU files) and lm-eval-compatible scoring."""

import json

import pytest
import torch

from gptforge.errors import GptforgeError
from gptforge.eval.choice import evaluate_choice, hellaswag_hook, score_items
from gptforge.eval.scoring import Request, encode_pair, rolling_windows, score_requests
from gptforge.eval.tasks import hellaswag_preprocess, load_hellaswag, load_jsonl_task, load_mmlu
from gptforge.model import GPT, GPTConfig
from gptforge.tokenizer import TiktokenTokenizer


@pytest.fixture(scope="module")
def tok(data_dir):
    return TiktokenTokenizer()


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50257, block_size=256, n_layer=2, n_head=2, n_embd=32))
    with torch.no_grad():  # sharpen the random model so choices get clearly different scores
        model.lm_head.weight.mul_(8)
    return model.eval()


def test_hellaswag_items_follow_lm_eval_preprocessing(data_dir):
    items = load_hellaswag(data_dir / "eval" / "hellaswag_val.jsonl", limit=20)
    assert len(items) == 20
    first = items[0]
    assert first.context == "Roof shingle removal: A man is sitting on a roof. He"
    assert first.choices[3] == "starts pulling up roofing on a roof."
    assert first.gold == 3
    # Same quirks as lm-eval: strip first, so a leading tag leaves a leading space.
    assert hellaswag_preprocess(" [header] How to x [title] Do it.  Now") == " How to x. Do it. Now"


def test_hellaswag_preprocessing_equals_lm_eval_on_real_items(data_dir):
    utils = pytest.importorskip("lm_eval.tasks.hellaswag.utils")
    with open(data_dir / "eval" / "hellaswag_val.jsonl") as f:
        records = [json.loads(line) for _, line in zip(range(300), f)]
    items = load_hellaswag(data_dir / "eval" / "hellaswag_val.jsonl", limit=300)
    for rec, item in zip(records, items):
        query = utils.preprocess(rec["activity_label"] + ": " + rec["ctx_a"] + " " + rec["ctx_b"].capitalize())
        assert item.context == query
        assert item.choices == [utils.preprocess(e) for e in rec["endings"]]


def test_mmlu_zero_and_five_shot_prompts(data_dir):
    zero = load_mmlu(data_dir / "eval" / "mmlu_test.jsonl", num_fewshot=0, limit=2)
    subjects = {i.group for i in zero}
    assert len(subjects) == 57 and len(zero) == 114
    item = zero[0]
    assert item.context.startswith("The following are multiple choice questions (with answers) about abstract algebra.\n\n")
    assert item.context.endswith("\nD. " + item.context.split("\nD. ")[1].split("\n")[0] + "\nAnswer:")
    assert item.choices == ["A", "B", "C", "D"]
    five = load_mmlu(data_dir / "eval" / "mmlu_test.jsonl", num_fewshot=5, subjects=["anatomy"], limit=1)
    dev = [json.loads(line) for line in (data_dir / "eval" / "mmlu_dev.jsonl").read_text().splitlines()]
    anatomy_dev = [d for d in dev if d["subject"] == "anatomy"]
    ctx = five[0].context
    assert ctx.count("\nAnswer:") == 6
    letter = "ABCD"[anatomy_dev[0]["answer"]]
    assert f"{anatomy_dev[0]['question'].strip()}\nA. {anatomy_dev[0]['choices'][0]}" in ctx
    assert f"\nAnswer: {letter}\n\n" in ctx


def test_mmlu_rejects_more_than_five_shots(data_dir):
    with pytest.raises(GptforgeError, match="0..5"):
        load_mmlu(data_dir / "eval" / "mmlu_test.jsonl", num_fewshot=6)


def test_jsonl_task_field_mapping_and_gold_forms(tmp_path):
    path = tmp_path / "t.jsonl"
    rows = [{"q": "2+2=", "opts": ["3", "4"], "ans": 1}, {"q": "sky is", "opts": ["blue", "green"], "ans": "blue"},
            {"q": "x", "opts": ["a", "b", "c"], "ans": "C"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    items = load_jsonl_task(path, context_field="q", choices_field="opts", gold_field="ans")
    assert [i.gold for i in items] == [1, 0, 2]
    templated = load_jsonl_task(path, template="Question: {q}\nAnswer:", choices_field="opts", gold_field="ans")
    assert templated[0].context == "Question: 2+2=\nAnswer:"
    path.write_text(json.dumps({"q": "x", "opts": ["a", "b"], "ans": "z"}) + "\n")
    with pytest.raises(GptforgeError, match=r"t\.jsonl:1: gold value 'z'"):
        load_jsonl_task(path, context_field="q", choices_field="opts", gold_field="ans")


def test_encode_pair_moves_trailing_space_to_continuation(tok):
    r = encode_pair(tok, "The cat ", "sat")
    assert r.context == tok.encode("The cat")
    assert tok.decode(r.continuation) == " sat"
    empty = encode_pair(tok, "", "hello")
    assert empty.context == [tok.eot_id] and empty.continuation == tok.encode("hello")


def test_scores_do_not_depend_on_batching(tiny_model, tok, data_dir):
    items = load_hellaswag(data_dir / "eval" / "hellaswag_val.jsonl", limit=6)
    one = score_items(tiny_model, tok, items, batch_size=1, show_progress=False)
    many = score_items(tiny_model, tok, items, batch_size=24, show_progress=False)
    for a, b in zip(one, many):
        assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], abs=1e-4)
        assert a["pred"] == b["pred"]


@pytest.mark.parametrize("task", ["hellaswag", "mmlu"])
def test_shared_context_cache_gives_the_same_scores(tiny_model, tok, data_dir, task):
    """Scoring each context once and continuing from its KV cache changes nothing but the speed."""
    if task == "hellaswag":
        items = load_hellaswag(data_dir / "eval" / "hellaswag_val.jsonl", limit=5)
    else:
        items = load_mmlu(data_dir / "eval" / "mmlu_test.jsonl", subjects=["anatomy", "virology"], limit=2)
    requests = [encode_pair(tok, i.context, " " + c) for i in items for c in i.choices]
    shared = score_requests(tiny_model, requests, batch_size=7, share_context=True)
    alone = score_requests(tiny_model, requests, batch_size=7, share_context=False)
    assert [s.logprob for s in shared] == pytest.approx([s.logprob for s in alone], abs=1e-4)
    assert [s.is_greedy for s in shared] == [s.is_greedy for s in alone]


def test_long_requests_are_truncated_from_the_left(tiny_model):
    ctx = list(range(1, 400))
    [long] = score_requests(tiny_model, [Request(ctx, [5, 6])])
    [cut] = score_requests(tiny_model, [Request(ctx[-255:], [5, 6])])
    assert long.logprob == pytest.approx(cut.logprob, abs=1e-5)


def test_rolling_windows_score_every_token_once():
    tokens = list(range(10, 30))
    windows = rolling_windows(tokens, prefix_token=0, max_len=8)
    assert [t for w in windows for t in w.continuation] == tokens
    assert windows[0].context == [0]
    assert all(len(w.context) + len(w.continuation) <= 8 + 8 for w in windows)


def test_loglikelihoods_match_transformers_reference(tiny_model, tok, data_dir, tmp_path):
    """On a tiny model exported to HF format, per-choice log-likelihoods equal transformers' own (≤1e-4)."""
    transformers = pytest.importorskip("transformers")
    from gptforge.hf import export_model

    export_model(tiny_model, tok, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    items = load_hellaswag(data_dir / "eval" / "hellaswag_val.jsonl", limit=8)
    ours = evaluate_choice(tiny_model, tok, "hellaswag", items=items, batch_size=8, show_progress=False)

    correct = 0
    for item, pred in zip(items, ours["predictions"]):
        ref = []
        for choice in item.choices:
            ctx_ids = hf_tok(item.context)["input_ids"]
            whole = hf_tok(item.context + " " + choice)["input_ids"]
            ids = torch.tensor([whole])
            with torch.no_grad():
                logp = torch.log_softmax(hf(ids).logits[0].double(), -1)
            ref.append(sum(logp[t - 1, whole[t]].item() for t in range(len(ctx_ids), len(whole))))
        assert pred["loglikelihoods"] == pytest.approx(ref, abs=1e-4)
        correct += int(max(range(len(ref)), key=lambda i: ref[i]) == item.gold)
    assert ours["metrics"]["acc"] == pytest.approx(correct / len(items))
    assert ours["metrics"]["n"] == 8


def test_mmlu_result_has_subjects_macro_and_micro(tiny_model, tok, data_dir):
    res = evaluate_choice(tiny_model, tok, "mmlu", data=data_dir / "eval" / "mmlu_test.jsonl", limit=1,
                          num_fewshot=0, batch_size=16, show_progress=False)
    m = res["metrics"]
    assert m["n"] == 57 and len(m["groups"]) == 57
    assert set(m["categories"]) == {"humanities", "other", "social_sciences", "stem"}
    assert m["acc_macro"] == pytest.approx(sum(g["acc"] for g in m["groups"].values()) / 57)
    assert m["acc_micro"] == pytest.approx(sum(p["acc"] for p in res["predictions"]) / 57)
    assert all(len(p["loglikelihoods"]) == 4 for p in res["predictions"])


def test_hellaswag_hook_is_deterministic_and_restores_mode(tiny_model, tok, data_dir):
    items = load_hellaswag(data_dir / "eval" / "hellaswag_val.jsonl", limit=4)
    tiny_model.train()
    a = hellaswag_hook(tiny_model, tok, items)
    assert tiny_model.training
    b = hellaswag_hook(tiny_model, tok, items)
    tiny_model.eval()
    assert a == b and a["hellaswag_n"] == 4 and 0.0 <= a["hellaswag_acc"] <= 1.0


def test_cli_choice_on_custom_jsonl_writes_per_item_results(tiny_model, tok, tmp_path, capsys):
    from gptforge.checkpoint import save_model
    from gptforge.cli import main

    save_model(tmp_path / "ckpt", tiny_model, tok)
    rows = [{"question": "The capital of France is", "options": ["Paris", "a banana"], "answer": "Paris"},
            {"question": "Two plus two equals", "options": ["four", "seven", "blue"], "answer": 0}]
    data = tmp_path / "quiz.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "quiz_results.json"
    rc = main(["eval", "choice", "--checkpoint", str(tmp_path / "ckpt"), "--task", "jsonl", "--data", str(data),
               "--field", "context=question", "--field", "choices=options", "--field", "gold=answer",
               "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["metrics"]["n"] == 2 and [p["gold"] for p in res["predictions"]] == [0, 0]
    assert [len(p["loglikelihoods"]) for p in res["predictions"]] == [2, 3]
    assert "jsonl: n=2" in capsys.readouterr().out
    rc = main(["eval", "choice", "--checkpoint", str(tmp_path / "ckpt"), "--task", "jsonl", "--data", str(data),
               "--field", "question=question"])
    assert rc == 2
