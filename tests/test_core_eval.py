"""In-context-learning task types (llm-foundry formats, nanochat's rules) and the CORE score, on the real sets."""

import json
import random
import zipfile

import pytest
import torch

from gptforge.errors import GptforgeError
from gptforge.eval.core import (
    CORE_ENTRIES,
    LABELS,
    centered_accuracy,
    download_bundle,
    evaluate_core,
    sample_items,
    score_label,
)
from gptforge.eval.icl import (
    PromptEncoder,
    build_requests,
    evaluate_icl,
    fewshot_indices,
    prompt_segments,
    read_icl_jsonl,
    render_prompts,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# nanochat/core_eval.py's Jinja templates (karpathy/nanochat @ 3a5e0bc5), copied verbatim for a second opinion.
NANOCHAT_MC = """
{%- for example in fewshot_examples -%}
{{ example.query }}{{ continuation_delimiter }}{{ example.choices[example.gold] }}

{% endfor -%}
{{ item.query }}{{ continuation_delimiter }}{{ choice }}""".strip()
NANOCHAT_SCHEMA = """
{%- for example in fewshot_examples -%}
{{ example.context_options[example.gold] }}{{ continuation_delimiter }}{{ example.continuation }}

{% endfor -%}
{{ context }}{{ continuation_delimiter }}{{ item.continuation }}""".strip()
NANOCHAT_LM = """
{%- for example in fewshot_examples -%}
{{ example.context | trim }}{{ continuation_delimiter }}{{ example.continuation }}

{% endfor -%}
{{ item.context | trim }}{{ continuation_delimiter }}{% if include_continuation %}{{ item.continuation }}{% endif %}""".strip()


def nanochat_prompts(task_type, item, delimiter, shots):
    from jinja2 import Template

    ctx = {"fewshot_examples": shots, "continuation_delimiter": delimiter, "item": item}
    if task_type == "multiple_choice":
        return [Template(NANOCHAT_MC).render(choice=c, **ctx) for c in item["choices"]]
    if task_type == "schema":
        return [Template(NANOCHAT_SCHEMA).render(context=o, **ctx) for o in item["context_options"]]
    t = Template(NANOCHAT_LM)
    return [t.render(include_continuation=False, **ctx).strip(), t.render(include_continuation=True, **ctx)]


@pytest.fixture(scope="module")
def core_dir(data_dir):
    return data_dir / "eval" / "core"


def first_items(path, task_type, n):
    return read_icl_jsonl(path, task_type)[:n]


# ---- prompts -------------------------------------------------------------------------------------------------


def test_fewshot_draw_is_nanochats_and_excludes_the_item():
    for n, k, idx in [(3, 2, 0), (50, 10, 7), (20321, 10, 20320), (1000, 3, 999)]:
        expected = random.Random(1234 + idx).sample([i for i in range(n) if i != idx], k)
        assert fewshot_indices(idx, n, k) == expected
        assert idx not in expected
    assert fewshot_indices(0, 3, 2) == [2, 1]
    with pytest.raises(GptforgeError, match="10-shot prompts need at least 11 items"):
        fewshot_indices(0, 5, 10)


def test_multiple_choice_prompts_zero_and_few_shot(core_dir):
    copa = first_items(core_dir / "copa.jsonl", "multiple_choice", 1)[0]
    assert render_prompts("multiple_choice", copa, " ") == [
        "The man turned on the faucet, therefore the toilet filled with water.",
        "The man turned on the faucet, therefore water flowed from the spout."]
    arc = first_items(core_dir / "arc_easy.jsonl", "multiple_choice", 3)
    shots = [arc[i] for i in fewshot_indices(0, 3, 2)]  # items 2 then 1, each with its gold answer
    prompts = render_prompts("multiple_choice", arc[0], "\nAnswer: ", shots)
    assert len(prompts) == 4
    assert prompts[1] == (
        "Question: Meiosis is a type of cell division in which germ cells divide to produce haploid cells. Where "
        "does meiosis occur?\nAnswer: ovary cells\n\n"
        "Question: Which piece of safety equipment is used to keep mold spores from entering the respiratory "
        "system?\nAnswer: breathing mask\n\n"
        "Question: Which statement best explains why photosynthesis is the foundation of most food webs?\n"
        "Answer: Most ecosystems are found on land instead of in water.")


def test_schema_prompts_share_the_continuation(core_dir):
    wg = first_items(core_dir / "winogrande.jsonl", "schema", 2)
    assert render_prompts("schema", wg[0], " ") == [
        "Sarah was a much better surgeon than Maria so Sarah always got the easier cases.",
        "Sarah was a much better surgeon than Maria so Maria always got the easier cases."]
    # One shot: the other item with its gold option (gold 0 = "... so Sarah"), then a blank line.
    assert render_prompts("schema", wg[0], " ", [wg[1]])[0] == (
        "Sarah was a much better surgeon than Maria so Sarah always got the harder cases.\n\n"
        "Sarah was a much better surgeon than Maria so Sarah always got the easier cases.")


def test_language_modeling_prompts_trim_context_and_strip_the_prefix(core_dir):
    wiki = first_items(core_dir / "bigbench_qa_wikidata.jsonl", "language_modeling", 3)
    without, with_ = render_prompts("language_modeling", wiki[0], " ", [wiki[2], wiki[1]])
    shots = ("The country of citizenship of Isabel Martínez de Perón is Argentina\n\n"
             "The country of Novosibirsk is Russia\n\n")
    assert without == shots + "The native language of Daniel Schneidermann is"  # trailing delimiter stripped
    assert with_ == shots + "The native language of Daniel Schneidermann is French"
    jeopardy = first_items(core_dir / "jeopardy_all.jsonl", "language_modeling", 1)[0]
    clue = ("WORLD HISTORY: This Navy commander flew from a base at Little America to the South Pole & back Nov. "
            "28-29, 1929")
    assert render_prompts("language_modeling", jeopardy, "\nAnswer: ") == [
        clue + "\nAnswer:", clue + "\nAnswer: Admiral Richard Byrd"]


@pytest.mark.parametrize("entry", [e for e in CORE_ENTRIES if e.label not in ("squad", "coqa", "hellaswag",
                                                                                "hellaswag_zeroshot")],
                         ids=lambda e: e.label)
def test_rendering_equals_nanochats_templates_on_real_items(core_dir, entry):
    pytest.importorskip("jinja2")
    items = sample_items(read_icl_jsonl(core_dir / entry.dataset.split("/")[-1], entry.task_type), 60)
    for idx in range(0, len(items), 7):
        shots = [items[j] for j in fewshot_indices(idx, len(items), entry.num_fewshot)]
        assert render_prompts(entry.task_type, items[idx], entry.delimiter, shots) == nanochat_prompts(
            entry.task_type, items[idx], entry.delimiter, shots)


def test_piecewise_encoding_equals_whole_prompt_encoding(core_dir, data_dir, shakespeare_bpe):
    from gptforge.tokenizer import TiktokenTokenizer

    cases = [("arc_challenge.jsonl", "multiple_choice", 10, "\nAnswer: "), ("piqa.jsonl", "multiple_choice", 10,
             "\nAnswer: "), ("winograd_wsc.jsonl", "schema", 3, " "), ("bigbench_dyck_languages.jsonl",
             "language_modeling", 10, " "), ("lambada_openai.jsonl", "language_modeling", 2, " ")]
    for tok in (TiktokenTokenizer(), shakespeare_bpe):
        enc = PromptEncoder(tok)
        assert enc.fast
        for name, task_type, k, delim in cases:
            items = sample_items(read_icl_jsonl(core_dir / name, task_type), 40)
            for idx in range(0, 40, 5):
                shots = [items[j] for j in fewshot_indices(idx, len(items), k)]
                for pieces in prompt_segments(task_type, items[idx], delim, shots):
                    assert enc.encode(pieces) == [tok.eot_id] + tok.encode("\n\n".join(pieces))
    # A shot ending in whitespace is not split: the whole prompt is encoded.
    tok = TiktokenTokenizer()
    items = [{"context": "a b", "continuation": "c \n"}, {"context": "x", "continuation": "y"}]
    pieces = prompt_segments("language_modeling", items[1], " ", [items[0]])[1]
    assert PromptEncoder(tok).encode(pieces) == [tok.eot_id] + tok.encode("a b c \n\n\nx y")


# ---- scores against an independent transformers scorer -------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_hf(make_tiny_model, tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    from gptforge.hf import export_model

    model, tok = make_tiny_model(seed=3, block_size=96)
    out = tmp_path_factory.mktemp("hf") / "tiny"
    export_model(model, tok, out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    return model, tok, hf, hf_tok


def reference_scores(hf, hf_tok, task_type, items, k, delimiter, max_len):
    """nanochat's evaluate_example, written from its description with transformers: BOS + prompt, common
    prefix/suffix, crop to the last ``max_len`` tokens, mean cross-entropy / greedy match."""
    out = []
    for idx, item in enumerate(items):
        shots = [items[j] for j in random.Random(1234 + idx).sample([i for i in range(len(items)) if i != idx], k)]
        prompts = nanochat_prompts(task_type, item, delimiter, shots)
        seqs = [[hf_tok.eos_token_id] + hf_tok(p)["input_ids"] for p in prompts]
        if task_type == "language_modeling":
            start, seqs = len(seqs[0]), seqs[1:]
            spans = [(start, len(seqs[0]))]
        elif task_type == "multiple_choice":
            n = 0
            while all(len(s) > n and s[n] == seqs[0][n] for s in seqs):
                n += 1
            spans = [(n, len(s)) for s in seqs]
        else:
            n = 0
            while all(len(s) > n and s[-1 - n] == seqs[0][-1 - n] for s in seqs):
                n += 1
            spans = [(len(s) - n, len(s)) for s in seqs]
        losses, greedy = [], []
        for s, (a, b) in zip(seqs, spans):
            crop = max(0, len(s) - max_len)
            ids = torch.tensor([s[crop:]])
            with torch.no_grad():
                logp = torch.log_softmax(hf(ids).logits[0].double(), -1)
            pos = range(a - crop - 1, b - crop - 1)
            losses.append(-sum(logp[p, s[crop + p + 1]].item() for p in pos) / len(pos))
            greedy.append(all(int(logp[p].argmax()) == s[crop + p + 1] for p in pos))
        out.append((losses, greedy))
    return out


@pytest.mark.parametrize("name,task_type,k,delimiter", [
    ("arc_easy.jsonl", "multiple_choice", 2, "\nAnswer: "),
    ("winogrande.jsonl", "schema", 1, " "),
    ("bigbench_qa_wikidata.jsonl", "language_modeling", 3, " "),
    ("lambada_openai.jsonl", "language_modeling", 0, " "),
])
def test_per_item_scores_equal_an_independent_transformers_scorer(tiny_hf, core_dir, name, task_type, k, delimiter):
    model, tok, hf, hf_tok = tiny_hf
    items = sample_items(read_icl_jsonl(core_dir / name, task_type), 8)
    ours = evaluate_icl(model, tok, items, task_type, k, delimiter, batch_size=5, show_progress=False)
    ref = reference_scores(hf, hf_tok, task_type, items, k, delimiter, model.config.block_size)
    for pred, (losses, greedy) in zip(ours["predictions"], ref):
        if task_type == "language_modeling":
            assert pred["correct"] == greedy[0]
            assert -pred["logprob"] / pred["num_tokens"] == pytest.approx(losses[0], abs=1e-4)
        else:
            assert pred["mean_losses"] == pytest.approx(losses, abs=1e-4)
            assert pred["pred"] == losses.index(min(losses))
            assert pred["correct"] == (pred["pred"] == items[pred["index"]]["gold"])
    assert ours["accuracy"] == sum(p["correct"] for p in ours["predictions"]) / 8
    if name == "arc_easy.jsonl":
        assert ours["cropped"] > 0  # 2-shot ARC prompts exceed the 96-token context: cropping is exercised


def test_item_level_cropping_shares_one_context(make_tiny_model, core_dir):
    model, tok = make_tiny_model(seed=3, block_size=96)
    items = sample_items(read_icl_jsonl(core_dir / "arc_easy.jsonl", "multiple_choice"), 6)
    reqs, owners, cropped = build_requests(tok, items, "multiple_choice", 2, "\nAnswer: ", 96, crop="item")
    assert cropped > 0
    for first, count in owners:
        group = reqs[first : first + count]
        assert all(r.context == group[0].context for r in group)
        assert max(len(r.context) + len(r.continuation) for r in group) <= 96
    per_prompt = evaluate_icl(model, tok, items, "multiple_choice", 2, "\nAnswer: ", show_progress=False)
    per_item = evaluate_icl(model, tok, items, "multiple_choice", 2, "\nAnswer: ", show_progress=False, crop="item")
    assert per_item["crop"] == "item" and per_item["n"] == per_prompt["n"] == 6


# ---- CORE ----------------------------------------------------------------------------------------------------


def test_core_table_is_dclms_22_entries():
    assert len(CORE_ENTRIES) == 22 and len(set(LABELS)) == 22
    by = {e.label: e for e in CORE_ENTRIES}
    assert (by["hellaswag"].num_fewshot, by["hellaswag_zeroshot"].num_fewshot, by["agi_eval_lsat_ar"].num_fewshot) \
        == (10, 0, 3)
    assert by["winogrande"].task_type == "schema" and by["lambada_openai"].task_type == "language_modeling"
    assert by["arc_easy"].delimiter == by["boolq"].delimiter == by["jeopardy"].delimiter == "\nAnswer: "
    assert (by["boolq"].baseline, by["commonsense_qa"].baseline, by["bigbench_language_identification"].baseline) \
        == (62, 20, 9.1)


def test_centered_accuracy_reproduces_nanochats_numbers():
    assert centered_accuracy(0.25, 25) == 0.0 and centered_accuracy(1.0, 62) == 1.0
    assert centered_accuracy(0.3, 0) == 0.3
    # Per-task values from a nanochat d24 CORE log (accuracy → centered).
    assert centered_accuracy(0.481957, 62) == pytest.approx(-0.363271, abs=1e-6)  # boolq below chance
    assert centered_accuracy(0.2662, 20) == pytest.approx(0.0827, abs=1e-4)  # commonsense_qa
    assert centered_accuracy(0.2491, 9.1) == pytest.approx(0.1739, abs=1e-4)  # language identification


def test_score_label_never_calls_a_partial_set_core():
    assert score_label(list(LABELS)) == "CORE"
    assert score_label([x for x in LABELS if x not in ("squad", "coqa")]) == \
        "partial CORE (20 of 22 entries; missing: squad, coqa)"
    assert score_label(list(LABELS), max_per_task=50) == "CORE, estimate from at most 50 items per task"
    assert score_label(["copa", "piqa"]) == "partial CORE (2 of 22 entries: copa, piqa)"


def test_offline_core_is_partial_and_mean_of_centered(make_tiny_model):
    model, tok = make_tiny_model(seed=1, block_size=96)
    with pytest.raises(GptforgeError, match="--max-per-task must be at least 11"):
        evaluate_core(model, tok, max_per_task=10, show_progress=False, log=None)
    res = evaluate_core(model, tok, max_per_task=11, batch_size=16, show_progress=False, log=None)
    assert res["metric"] == ("partial CORE (20 of 22 entries; missing: squad, coqa), "
                             "estimate from at most 11 items per task")
    assert res["missing"] == ["squad", "coqa"] and not res["complete"]
    assert [r["label"] for r in res["entries"]] == [x for x in LABELS if x not in ("squad", "coqa")]
    assert res["score"] == pytest.approx(sum(r["centered"] for r in res["entries"]) / 20)
    for r in res["entries"]:
        assert r["centered"] == pytest.approx(centered_accuracy(r["accuracy"], r["baseline"]))
    hs = {r["label"]: r for r in res["entries"]}
    assert hs["hellaswag"]["data"].endswith("hellaswag_val.jsonl") and hs["hellaswag"]["n"] == 11


def test_max_per_task_is_a_seeded_shuffle_and_deterministic(make_tiny_model, core_dir, tmp_path, capsys):
    from gptforge.checkpoint import save_model
    from gptforge.cli import main

    model, tok = make_tiny_model(seed=2, block_size=96)
    save_model(tmp_path / "ckpt", model, tok)
    outs = []
    for run in ("a", "b"):
        argv = ["eval", "core", "--checkpoint", str(tmp_path / "ckpt"), "--max-per-task", "5", "--tasks", "copa",
                "winogrande", "lambada_openai", "--dtype", "float32", "--out", str(tmp_path / run)]  # all 0-shot
        assert main(argv) == 0
        outs.append((tmp_path / run / "core_items.jsonl").read_text())
        assert (tmp_path / run / "core.png").stat().st_size > 1000
    assert outs[0] == outs[1]
    res = json.loads((tmp_path / "a" / "core.json").read_text())
    assert res["metric"] == ("partial CORE (3 of 22 entries: copa, lambada_openai, winogrande), "
                             "estimate from at most 5 items per task") and res["items"] == 15
    copa = read_icl_jsonl(core_dir / "copa.jsonl", "multiple_choice")
    expected = copa[:]
    random.Random(1337).shuffle(expected)
    rows = [json.loads(line) for line in outs[0].splitlines() if '"copa"' in line]
    assert [r["gold"] for r in rows] == [x["gold"] for x in expected[:5]]
    assert "partial CORE (3 of 22 entries" in capsys.readouterr().out


# ---- CLI and data errors -------------------------------------------------------------------------------------


def test_missing_core_data_is_a_one_line_error(make_tiny_model, tmp_path, monkeypatch, capsys):
    from gptforge.checkpoint import save_model
    from gptforge.cli import main

    model, tok = make_tiny_model(block_size=96)
    save_model(tmp_path / "ckpt", model, tok)
    monkeypatch.setenv("GPTFORGE_DATA_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("GPTFORGE_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["eval", "core", "--checkpoint", str(tmp_path / "ckpt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gptforge: error: no CORE data found") and "\n" not in err
    assert main(["eval", "icl", "--checkpoint", str(tmp_path / "ckpt"), "--data", str(tmp_path / "nope.jsonl"),
                 "--type", "schema"]) == 2
    assert capsys.readouterr().err.strip() == f"gptforge: error: data file not found: {tmp_path / 'nope.jsonl'}"
    assert main(["eval", "core", "--checkpoint", str(tmp_path / "ckpt"), "--tasks", "mmlu"]) == 2
    assert "unknown CORE task(s) mmlu" in capsys.readouterr().err


def test_malformed_items_name_file_and_line(tmp_path):
    path = tmp_path / "wino.jsonl"
    path.write_text(json.dumps({"context_options": ["a", "b"], "continuation": "c", "gold": 0}) + "\n"
                    + json.dumps({"context_options": ["a", "b"], "continuation": "c", "gold": 2}) + "\n")
    with pytest.raises(GptforgeError, match=r"wino\.jsonl:2: gold must be an index 0\.\.1, got 2"):
        read_icl_jsonl(path, "schema")
    with pytest.raises(GptforgeError, match=r"wino\.jsonl:1: a multiple_choice item .* missing query, choices"):
        read_icl_jsonl(path, "multiple_choice")


def test_eval_choice_refuses_schema_records_and_eval_icl_scores_them(make_tiny_model, core_dir, tmp_path, capsys):
    from gptforge.checkpoint import save_model
    from gptforge.cli import main

    model, tok = make_tiny_model(block_size=96)
    save_model(tmp_path / "ckpt", model, tok)
    data = tmp_path / "wg.jsonl"
    data.write_text("".join((core_dir / "winogrande.jsonl").read_text().splitlines(True)[:6]))
    rc = main(["eval", "choice", "--checkpoint", str(tmp_path / "ckpt"), "--task", "jsonl", "--data", str(data),
               "--field", "choices=context_options", "--field", "context=continuation"])
    assert rc == 2 and "eval icl --type schema" in capsys.readouterr().err
    out = tmp_path / "wg.json"
    assert main(["eval", "icl", "--checkpoint", str(tmp_path / "ckpt"), "--data", str(data), "--type", "schema",
                 "--num-fewshot", "1", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["n"] == 6 and res["num_fewshot"] == 1
    assert all(len(p["logprobs"]) == 2 and len(p["mean_losses"]) == 2 for p in res["predictions"])
    assert "schema 1-shot  n=6" in capsys.readouterr().out


def test_bundle_download_unpacks_into_the_cache_and_is_used(make_tiny_model, core_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("GPTFORGE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("GPTFORGE_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    archive = tmp_path / "eval_bundle.zip"
    with zipfile.ZipFile(archive, "w") as z:  # the bundle's layout: eval_bundle/eval_data/<category>/<file>
        z.write(core_dir / "copa.jsonl", "eval_bundle/eval_data/commonsense_reasoning/copa.jsonl")
    monkeypatch.setenv("GPTFORGE_DATA_DIR", str(tmp_path / "empty"))
    target = download_bundle(archive.as_uri())
    assert target == tmp_path / "cache" / "eval_bundle" and (target / "eval_data").is_dir()
    model, tok = make_tiny_model(block_size=96)
    res = evaluate_core(model, tok, tasks=["copa"], max_per_task=3, show_progress=False, log=None)
    assert res["entries"][0]["data"] == str(target / "eval_data" / "commonsense_reasoning" / "copa.jsonl")
    monkeypatch.setenv("GPTFORGE_CACHE_DIR", str(tmp_path / "cache2"))
    monkeypatch.setenv("GPTFORGE_OFFLINE", "1")
    with pytest.raises(GptforgeError, match="offline .* cannot fetch the eval bundle"):
        download_bundle(archive.as_uri())
