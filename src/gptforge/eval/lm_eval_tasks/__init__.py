"""lm-eval task configs over the data directory's local copies of the benchmarks (``gptforge eval harness``).

lm-eval's stock tasks download their data from the Hugging Face Hub. These configs read the same benchmarks from
``$GPTFORGE_DATA_DIR`` instead, through lm-eval's ``--include_path``: :func:`write_task_dir` writes them into a
directory with absolute ``data_files`` paths (the shipped YAMLs say ``${GPTFORGE_DATA_DIR}``), plus ``utils.py``
and the generated MMLU configs, and ``gptforge eval harness`` passes that directory as ``--include_path``.

Naming: a local task has the **stock task's name** and replaces it (lm-eval >= 0.4.10 lets a task on the include
path override a built-in one of the same name; older versions keep the built-in), so ``--tasks hellaswag`` and the
results' keys are what users of lm-eval expect. That is done only where the items, prompt, choices and metrics
are stock's (``tests/test_harness_offline.py`` compares each task's requests with the stock task's):

=================  =====================================  ========================================================
task               file under ``$GPTFORGE_DATA_DIR``      difference from lm-eval's stock task
=================  =====================================  ========================================================
hellaswag          eval/hellaswag_val.jsonl               none (lm-eval's own process_docs)
mmlu (+ groups,    eval/mmlu_test.jsonl, mmlu_dev.jsonl   none (stock template, 5-shot from dev, groups, weights)
57 mmlu_<subject>)
arc_easy,          eval/core/arc_{easy,challenge}.jsonl   none in the requests (llm-foundry's copy of the data)
arc_challenge
piqa               eval/core/piqa.jsonl                   none in the requests (llm-foundry's copy of the data)
copa               eval/core/copa.jsonl                   none (prompt and choices rebuilt as stock builds them)
winogrande         eval/core/winogrande.jsonl             none (the same partial scoring)
lambada_openai     eval/core/lambada_openai.jsonl         none (context / " " + last word as stock splits them)
openbookqa         eval/core/openbook_qa.jsonl            none in the requests (llm-foundry's copy of the data)
boolq              eval/core/boolq.jsonl                  passages lack SuperGLUE's "<title> -- " prefix
=================  =====================================  ========================================================

No train split is local, so few-shot examples come from the evaluated file (never the item itself) where stock
draws them from train (MMLU's come from dev, as stock's); 0-shot, lm-eval's default, is unaffected.

``gptforge_commonsense_qa`` (eval/core/commonsense_qa.jsonl) is *not* stock ``commonsense_qa``: llm-foundry kept
4 of the 5 options and wrote its own prompt, so it has its own name. The llm-foundry sets without a stock
counterpart (BIG-bench, Jeopardy, AGIEval, WSC) are what ``gptforge eval core`` is for.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from gptforge.errors import GptforgeError
from gptforge.eval.tasks import MMLU_CATEGORIES

TASK_DIR = Path(__file__).resolve().parent
DATA_DIR_VAR = "GPTFORGE_DATA_DIR"
PLACEHOLDER = "${GPTFORGE_DATA_DIR}"
MMLU_FILES = ("eval/mmlu_test.jsonl", "eval/mmlu_dev.jsonl")
MMLU_TAGS = [f"mmlu_{category}_tasks" for category in MMLU_CATEGORIES]


@dataclass(frozen=True)
class LocalTask:
    """A task (or group) name lm-eval can be asked for and the data files it reads, relative to the data dir."""

    name: str
    files: tuple[str, ...]
    config: str  # the config file that defines it, as written into the task directory


class _Loader(yaml.SafeLoader):
    """YAML with lm-eval's ``!function`` tag kept as its text."""


_Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def local_tasks() -> dict[str, LocalTask]:
    """Every task and group name the local configs define (tasks, MMLU groups and subjects)."""
    tasks = {}
    for path in sorted(TASK_DIR.glob("*.yaml")):
        cfg = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
        files = tuple(str(v).replace(PLACEHOLDER + "/", "", 1)
                      for v in cfg["dataset_kwargs"]["data_files"].values())
        tasks[cfg["task"]] = LocalTask(cfg["task"], files, path.name)
    for name in _mmlu_configs():
        tasks[name] = LocalTask(name, MMLU_FILES, f"{name}.yaml")
    return dict(sorted(tasks.items()))


def data_dir_from_env() -> Path | None:
    """``$GPTFORGE_DATA_DIR`` as an absolute path, or None when it is not set."""
    value = os.environ.get(DATA_DIR_VAR)
    return Path(value).expanduser().resolve() if value else None


def missing_files(task: LocalTask, data_dir: Path) -> list[Path]:
    return [data_dir / f for f in task.files if not (data_dir / f).is_file()]


def write_task_dir(out_dir: str | Path, data_dir: str | Path) -> list[str]:
    """Write the configs of every local task whose files exist in ``data_dir`` into ``out_dir`` (for lm-eval's
    ``--include_path`` or ``TaskManager(include_path=...)``); returns the task and group names written."""
    out_dir, data_dir = Path(out_dir), Path(data_dir).expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    # Every placeholder sits inside a single-quoted YAML scalar, where only ' needs escaping (as '').
    quoted = str(data_dir).replace("'", "''")
    tasks = local_tasks()
    available = {name for name, t in tasks.items() if not missing_files(t, data_dir)}
    written = []
    for name, task in tasks.items():
        shipped = TASK_DIR / task.config
        if name in available and shipped.is_file():
            text = shipped.read_text(encoding="utf-8").replace(PLACEHOLDER, quoted)
            (out_dir / task.config).write_text(text, encoding="utf-8")
            written.append(name)
    if all(name in available for name in _mmlu_configs()):
        (out_dir / "_mmlu_template_yaml").write_text(_MMLU_TEMPLATE.replace(PLACEHOLDER, quoted), encoding="utf-8")
        for name, text in _mmlu_configs().items():
            (out_dir / f"{name}.yaml").write_text(text, encoding="utf-8")
            written.append(name)
    shutil.copyfile(TASK_DIR / "utils.py", out_dir / "utils.py")
    return sorted(written)


def check_requested(requested: list[str], data_dir: Path) -> list[LocalTask]:
    """The local tasks among ``requested``; a requested local task whose file is missing is an error."""
    tasks = local_tasks()
    found = []
    for name in requested:
        task = tasks.get(name)
        if task is None:
            continue
        missing = missing_files(task, data_dir)
        if missing:
            raise GptforgeError(
                f"task {name}: its local data file {missing[0]} is missing ({DATA_DIR_VAR}={data_dir}); put the "
                f"file there (it is {task.files[0]} in gptforge's offline data directory), point {DATA_DIR_VAR} "
                "at a data directory that has it, or add --stock-tasks to run lm-eval's stock task on data "
                "from the Hugging Face Hub")
        found.append(task)
    return found


# ---- MMLU: 57 subject tasks and 5 groups, as lm-eval's mmlu/default generates them -----------------------------

_MMLU_TEMPLATE = """\
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    test: '${GPTFORGE_DATA_DIR}/eval/mmlu_test.jsonl'
    dev: '${GPTFORGE_DATA_DIR}/eval/mmlu_dev.jsonl'
test_split: test
fewshot_split: dev
fewshot_config:
  sampler: first_n
output_type: multiple_choice
doc_to_text: "{{question.strip()}}\\nA. {{choices[0]}}\\nB. {{choices[1]}}\\nC. {{choices[2]}}\\nD. {{choices[3]}}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

_MMLU_GROUP = """\
group: {group}
{alias}task:
{tasks}aggregate_metric_list:
  - metric: acc
    weight_by_size: True
metadata:
  version: 2
"""


def _mmlu_configs() -> dict[str, str]:
    """``{name: YAML text}`` for the MMLU groups and subject tasks (stock names, tags and descriptions)."""
    configs = {"mmlu": _MMLU_GROUP.format(group="mmlu", alias="", tasks="".join(
        f"  - mmlu_{c}\n" for c in ("stem", "other", "social_sciences", "humanities")))}
    for category, subjects in MMLU_CATEGORIES.items():
        alias = f"group_alias: {category.replace('_', ' ')}\n"
        configs[f"mmlu_{category}"] = _MMLU_GROUP.format(group=f"mmlu_{category}", alias=alias,
                                                         tasks=f"  - mmlu_{category}_tasks\n")
        for subject in subjects.split():
            description = f"The following are multiple choice questions (with answers) about " \
                          f"{subject.replace('_', ' ')}.\n\n"
            configs[f"mmlu_{subject}"] = (
                "include: _mmlu_template_yaml\n"
                f"task: mmlu_{subject}\n"
                f"task_alias: {subject}\n"
                f"tag: mmlu_{category}_tasks\n"
                f"description: {json.dumps(description)}\n"
                f"process_docs: !function utils.mmlu_{subject}\n")
    return configs
