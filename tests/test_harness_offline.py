"""`gptforge eval harness` offline: the shipped task configs read $GPTFORGE_DATA_DIR and build exactly the requests
lm-eval's stock tasks build; the harness's accuracy equals `gptforge eval choice` on the same items; failures
are one `gptforge: error:` line."""

import json
import logging
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

import datasets
import lm_eval
from lm_eval.api.task import ConfigurableTask
from lm_eval.tasks import TaskManager
from lm_eval.tasks._yaml_loader import load_yaml

from gptforge.checkpoint import save_model
from gptforge.cli import main
from gptforge.eval import lm_eval_tasks

STOCK = Path(lm_eval.__file__).parent / "tasks"
LETTERS = "ABCDE"


@pytest.fixture(scope="module", autouse=True)
def small_stock_index():
    """lm-eval parses all ~14,000 of its task YAMLs on every run (8 s, 25 s on a busy 2-core machine). Here it sees
    only the stock folders these tests involve; the rest of lm-eval (CLI, index, override, evaluation) is unchanged."""
    from lm_eval.tasks._index import TaskIndex

    original = getattr(TaskIndex, "_iter_yaml_files", None)
    if original is None:  # another lm-eval layout: run at its own speed
        yield
        return
    keep = [STOCK / d for d in ("hellaswag", "arc", "piqa", "mmlu/default")]

    def iter_yaml_files(root):
        for path in original(root):
            if Path(root).resolve() != STOCK.resolve() or any(path.is_relative_to(k) for k in keep):
                yield path

    TaskIndex._iter_yaml_files = staticmethod(iter_yaml_files)
    yield
    TaskIndex._iter_yaml_files = staticmethod(original)


class _CurrentStderr:
    def write(self, text):
        return sys.stderr.write(text)

    def flush(self):
        sys.stderr.flush()


@pytest.fixture(scope="module", autouse=True)
def lm_eval_logs_to_current_stderr():
    """lm-eval's log handler is made once and keeps the stderr of that moment; under pytest's capture that file is
    closed by the next test. Make it write to whatever stderr is current."""
    from lm_eval.utils import setup_logging

    setup_logging()
    for handler in logging.getLogger("lm_eval").handlers:
        if type(handler) is logging.StreamHandler:  # not pytest's own capturing handlers
            handler.stream = _CurrentStderr()
    yield


@pytest.fixture(scope="module")
def ckpt(make_tiny_model, tmp_path_factory):
    model, tok = make_tiny_model(block_size=128, chat_tokens=False)
    return save_model(tmp_path_factory.mktemp("harness") / "ckpt", model, tok)


def error_lines(text: str) -> list[str]:
    assert "Traceback" not in text
    return [line for line in text.splitlines() if line.startswith("gptforge: error:")]


# ---- the shipped configs are the stock tasks over local files --------------------------------------------------


def _common_prefix(a: str, b: str) -> int:
    i = 0
    while i < min(len(a), len(b)) and a[i] == b[i]:
        i += 1
    return i


def _winogrande(r):
    i = _common_prefix(*r["context_options"])  # any cut inside the shared prefix rebuilds the same two contexts
    return {"sentence": r["context_options"][0][:i] + "_ " + r["continuation"], "option1": r["context_options"][0][i:],
            "option2": r["context_options"][1][i:], "answer": str(r["gold"] + 1)}


def _mc(r, question_field, question):
    return {"id": "x", question_field: question, "answerKey": LETTERS[r["gold"]],
            "choices": {"text": r["choices"], "label": list(LETTERS[: len(r["choices"])])}}


def _split_boolq(r):
    passage, question = r["query"].removeprefix("Passage: ").rsplit("\nQuestion: ", 1)
    return {"passage": passage, "question": question.removesuffix("?"), "label": r["gold"], "idx": 0}


def _copa(r):
    premise, connector = r["query"].rsplit(", ", 1)
    up = [c[:1].upper() + c[1:] for c in r["choices"]]
    return {"premise": premise + ".", "question": {"therefore": "effect", "because": "cause"}[connector],
            "choice1": up[0], "choice2": up[1], "label": r["gold"], "idx": 0}


# task: (stock config, local file, each local record as the hub dataset has it)
STOCK_TWINS = {
    "hellaswag": ("hellaswag/hellaswag.yaml", "eval/hellaswag_val.jsonl", lambda r: dict(r, label=str(r["label"]))),
    "arc_easy": ("arc/arc_easy.yaml", "eval/core/arc_easy.jsonl",
                 lambda r: _mc(r, "question", r["query"].removeprefix("Question: "))),
    "arc_challenge": ("arc/arc_challenge.yaml", "eval/core/arc_challenge.jsonl",
                      lambda r: _mc(r, "question", r["query"].removeprefix("Question: "))),
    "openbookqa": ("openbookqa/openbookqa.yaml", "eval/core/openbook_qa.jsonl",
                   lambda r: _mc(r, "question_stem", r["query"])),
    "piqa": ("piqa/piqa.yaml", "eval/core/piqa.jsonl",
             lambda r: {"goal": r["query"].removeprefix("Question: ").removesuffix("\n"), "sol1": r["choices"][0],
                        "sol2": r["choices"][1], "label": r["gold"]}),
    "copa": ("super_glue/copa/default.yaml", "eval/core/copa.jsonl", _copa),
    "boolq": ("super_glue/boolq/default.yaml", "eval/core/boolq.jsonl", _split_boolq),
    "winogrande": ("winogrande/default.yaml", "eval/core/winogrande.jsonl", _winogrande),
    "lambada_openai": ("lambada/lambada_openai.yaml", "eval/core/lambada_openai.jsonl",
                       lambda r: {"text": r["context"] + " " + r["continuation"]}),
}


def _records(path: Path, n: int | None = None, subject: str | None = None) -> list[dict]:
    out = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            if subject is None or rec["subject"] == subject:
                out.append(rec)
            if n and len(out) >= n:
                break
    return out


def _stock_task(config: Path, splits: dict[str, list[dict]]) -> ConfigurableTask:
    cfg = load_yaml(config, resolve_func=True)
    cfg.pop("tag", None)
    names = {cfg.get(k) for k in ("training_split", "validation_split", "test_split", "fewshot_split")} - {None}
    docs = next(iter(splits.values()))
    cfg["custom_dataset"] = lambda **_: datasets.DatasetDict(
        {name: datasets.Dataset.from_list(splits.get(name, docs)) for name in names})
    return ConfigurableTask(config=cfg)


def _requests(task, n: int, shots: int = 0) -> list:
    out = []
    for i, doc in enumerate(list(task.eval_docs)[:n]):
        inst = task.construct_requests(doc, task.fewshot_context(doc, shots), metadata=(task.config.task, i, 1))
        out.append([x.arguments for x in (inst if isinstance(inst, list) else [inst])])
    return out


def _scoring(task) -> tuple:
    return task.OUTPUT_TYPE, task.aggregation(), task.higher_is_better(), task.config.target_delimiter


def test_shipped_configs_build_the_stock_tasks_requests(data_dir, tmp_path):
    """Each local task, fed the local file, sends the model exactly the (context, continuation) pairs lm-eval's
    stock task sends for the same records in the hub's layout, and scores them with the same metrics."""
    written = lm_eval_tasks.write_task_dir(tmp_path / "tasks", data_dir)
    assert set(STOCK_TWINS) | {"mmlu", "mmlu_anatomy", "gptforge_commonsense_qa"} <= set(written)
    tm = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
    ours = tm.load(list(STOCK_TWINS) + ["mmlu_anatomy", "mmlu_high_school_us_history"])["tasks"]
    for name, (config, rel, to_hub) in STOCK_TWINS.items():
        records = _records(data_dir / rel, 40)
        stock = _stock_task(STOCK / config, {"all": [to_hub(r) for r in records]})
        assert _requests(ours[name], 40) == _requests(stock, 40), name
        assert _scoring(ours[name]) == _scoring(stock), name
        assert ours[name].config.metadata["version"] == stock.config.metadata["version"], name
    for subject in ("anatomy", "high_school_us_history"):  # the stock prompt, 5 shots from dev ("first_n")
        test = _records(data_dir / "eval/mmlu_test.jsonl", 8, subject)
        dev = _records(data_dir / "eval/mmlu_dev.jsonl", subject=subject)
        stock = _stock_task(STOCK / f"mmlu/default/mmlu_{subject}.yaml", {"test": test, "dev": dev})
        for shots in (0, 5):
            assert _requests(ours[f"mmlu_{subject}"], 8, shots) == _requests(stock, 8, shots), (subject, shots)
    # the generated MMLU groups and tags are stock's
    for group in ("_mmlu.yaml", "_mmlu_stem.yaml", "_mmlu_social_sciences.yaml"):
        stock_cfg = load_yaml(STOCK / "mmlu/default" / group, resolve_func=False)
        our_cfg = load_yaml(tmp_path / "tasks" / group.lstrip("_"), resolve_func=False)
        assert our_cfg == stock_cfg
    for path in (STOCK / "mmlu/default").glob("mmlu_*.yaml"):
        stock_cfg = load_yaml(path, resolve_func=False)
        our_cfg = load_yaml(tmp_path / "tasks" / path.name, resolve_func=False)
        for key in ("task", "task_alias", "tag", "description", "doc_to_text", "doc_to_choice", "doc_to_target",
                    "fewshot_split", "fewshot_config", "test_split", "metric_list"):
            assert our_cfg[key] == stock_cfg[key], (path.name, key)


def test_few_shot_examples_never_include_the_item_itself(data_dir, tmp_path):
    """No train split is local, so shots come from the evaluated file: with 4 records and 3 shots, each item's
    shots are exactly the other three."""
    small = tmp_path / "data"
    for rel in ("eval/hellaswag_val.jsonl", "eval/core/arc_easy.jsonl", "eval/core/piqa.jsonl",
                "eval/core/lambada_openai.jsonl"):
        (small / rel).parent.mkdir(parents=True, exist_ok=True)
        (small / rel).write_text("".join((data_dir / rel).read_text(encoding="utf-8").splitlines(True)[:4]))
    lm_eval_tasks.write_task_dir(tmp_path / "tasks", small)
    tm = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
    tasks = tm.load(["hellaswag", "arc_easy", "piqa", "lambada_openai"])["tasks"]
    for name, task in tasks.items():
        docs = list(task.eval_docs)
        prompts = [task.doc_to_text(d) for d in docs]
        for doc, prompt in zip(docs, prompts):
            context = task.fewshot_context(doc, 3)
            assert context.endswith(prompt) and context.count(prompt) == 1, name
            assert all(other in context for other in prompts if other != prompt), name


def test_data_paths_survive_quotes_and_spaces(data_dir, tmp_path):
    odd = tmp_path / "it's data dir"
    (odd / "eval" / "core").mkdir(parents=True)
    (odd / "eval" / "core" / "copa.jsonl").write_bytes((data_dir / "eval/core/copa.jsonl").read_bytes())
    assert lm_eval_tasks.write_task_dir(tmp_path / "tasks", odd) == ["copa"]
    cfg = load_yaml(tmp_path / "tasks" / "copa.yaml", resolve_func=False)
    assert cfg["dataset_kwargs"]["data_files"] == {"validation": str(odd / "eval/core/copa.jsonl")}


# ---- the command ----------------------------------------------------------------------------------------------


def test_harness_runs_offline_and_equals_eval_choice(ckpt, data_dir, tmp_path, capsys):
    """--tasks hellaswag (and arc_easy, and a user's own --include_path task) offline; the accuracy is
    `eval choice`'s on the same 20 items: both use lm-eval's definitions (acc: highest summed log-likelihood;
    acc_norm: divided by the choice's length in characters; lm-eval's byte-length variant is acc_bytes)."""
    user = tmp_path / "user_tasks"
    user.mkdir()
    (user / "few.jsonl").write_text("".join((data_dir / "eval/core/piqa.jsonl").read_text().splitlines(True)[:5]))
    (user / "my_piqa.yaml").write_text(
        f"task: my_piqa\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: '{user / 'few.jsonl'}'\n"
        "output_type: multiple_choice\ntest_split: test\ndoc_to_text: '{{query}}Answer:'\ndoc_to_target: gold\n"
        "doc_to_choice: choices\nmetric_list:\n  - metric: acc\n")
    out = tmp_path / "out"
    rc = main(["eval", "harness", "--model_args", f"checkpoint={ckpt},dtype=float32", "--device", "cpu",
               "--tasks", "hellaswag,arc_easy,my_piqa", "--include_path", str(user), "--limit", "20",
               "--output_path", str(out), "--log_samples"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-2000:]
    assert "hellaswag (eval/hellaswag_val.jsonl), arc_easy (eval/core/arc_easy.jsonl)" in captured.err
    [result_file] = out.rglob("results*.json")
    harness = json.loads(result_file.read_text())
    assert harness["results"]["my_piqa"]["acc,none"] is not None  # the user's include path still works
    assert harness["configs"]["hellaswag"]["dataset_kwargs"]["data_files"]["validation"] == \
        str(data_dir / "eval/hellaswag_val.jsonl")

    choice = {}
    for task, extra in (("hellaswag", ["--task", "hellaswag"]),
                        ("arc_easy", ["--task", "jsonl", "--data", str(data_dir / "eval/core/arc_easy.jsonl"),
                                      "--template", "{query}\\nAnswer:"])):
        rc = main(["eval", "choice", "--checkpoint", str(ckpt), *extra, "--limit", "20", "--device", "cpu",
                   "--dtype", "float32", "--batch-size", "16", "--out", str(tmp_path / f"{task}.json")])
        assert rc == 0
        choice[task] = json.loads((tmp_path / f"{task}.json").read_text())
        assert choice[task]["metrics"]["n"] == 20
        ours, theirs = choice[task]["metrics"], harness["results"][task]
        assert theirs["acc,none"] == pytest.approx(ours["acc"], abs=1e-12), task
        assert theirs["acc_norm,none"] == pytest.approx(ours["acc_norm"], abs=1e-12), task
        # per item: the same log-likelihood for every choice
        [samples] = out.rglob(f"samples_{task}_*.jsonl")
        rows = sorted((json.loads(line) for line in samples.read_text().splitlines()), key=lambda s: s["doc_id"])
        assert len(rows) == 20
        for row, pred in zip(rows, choice[task]["predictions"]):
            lls = [float(r[0]) for r in row["filtered_resps"]]
            assert lls == pytest.approx(pred["loglikelihoods"], abs=1e-4), task
            assert int(row["target"]) == pred["gold"], task


def test_missing_data_file_is_one_error_line(ckpt, data_dir, tmp_path, monkeypatch, capsys):
    partial = tmp_path / "data"
    (partial / "eval" / "core").mkdir(parents=True)
    (partial / "eval" / "core" / "arc_easy.jsonl").write_bytes((data_dir / "eval/core/arc_easy.jsonl").read_bytes())
    monkeypatch.setenv("GPTFORGE_DATA_DIR", str(partial))
    rc = main(["eval", "harness", "--model_args", f"checkpoint={ckpt}", "--device", "cpu",
               "--tasks", "arc_easy,hellaswag", "--limit", "2"])
    [line] = error_lines(capsys.readouterr().err)
    assert rc == 2
    assert "task hellaswag" in line and str(partial / "eval" / "hellaswag_val.jsonl") in line


def test_unknown_task_is_one_error_line(ckpt, capsys):
    rc = main(["eval", "harness", "--model_args", f"checkpoint={ckpt}", "--device", "cpu",
               "--tasks", "hellaswag,no_such_task", "--limit", "2"])
    [line] = error_lines(capsys.readouterr().err)
    assert rc == 2
    assert "no task named no_such_task" in line


def test_stock_task_offline_is_one_error_line_naming_what_is_missing(ckpt, capsys):
    """The issue's failure: the stock hellaswag fetches Rowan/hellaswag from the Hub, offline."""
    rc = main(["eval", "harness", "--stock-tasks", "--model_args", f"checkpoint={ckpt}", "--device", "cpu",
               "--tasks", "hellaswag", "--limit", "2"])
    [line] = error_lines(capsys.readouterr().err)
    assert rc == 2
    assert "task hellaswag" in line and "Rowan/hellaswag" in line and "eval/hellaswag_val.jsonl" in line
