"""lm-evaluation-harness adapter: the model type ``gptforge`` for native checkpoints (needs the ``eval`` extra).

Importing this module registers the type. lm-eval (0.4.x) has no plugin discovery for model types, so run it
through gptforge, which imports this module first::

    gptforge eval harness --model_args checkpoint=runs/mini --tasks hellaswag,arc_easy --limit 200
    python -m gptforge.eval.harness --model gptforge --model_args checkpoint=runs/mini --tasks hellaswag

or from Python: ``import gptforge.eval.harness`` and then ``lm_eval.simple_evaluate(model="gptforge", ...)``.
``--model_args``: ``checkpoint`` (required; step dir, run dir, ``ckpt/best`` or HF dir), ``dtype``
(float32 | bfloat16), ``max_gen_toks`` (default 256); batch size and device come from lm-eval's own
``--batch_size`` / ``--device`` (``gptforge eval harness`` defaults them to 16 and CUDA, else MPS, else CPU).

The three request types use the same scorer as ``gptforge eval choice`` (:mod:`gptforge.eval.scoring`), so
numbers agree with our own evaluation, and ``generate_until`` uses :class:`gptforge.engine.Engine` greedily.

Offline tasks: :func:`cli_main` puts :mod:`gptforge.eval.lm_eval_tasks` (configs for hellaswag, mmlu, arc_easy,
arc_challenge, piqa, copa, winogrande, lambada_openai, openbookqa, boolq over the files in
``$GPTFORGE_DATA_DIR``, named like the stock tasks they replace) on lm-eval's include path; a requested task
whose file is missing, and any lm-eval failure, is one :class:`GptforgeError` line. From Python:
``lm_eval_tasks.write_task_dir(d, data_dir)`` then ``TaskManager(include_path=d)``.
"""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

import torch

from gptforge.errors import GptforgeError
from gptforge.precision import pick_device

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise GptforgeError("the lm-eval adapter needs lm-evaluation-harness: pip install 'gptforge[eval]'") from e

from gptforge.eval.scoring import Request, encode_pair, rolling_windows, score_requests


@register_model("gptforge")
class GptforgeLM(LM):
    """lm-eval ``LM`` over a gptforge checkpoint (or an in-memory model and tokenizer)."""

    def __init__(self, checkpoint: str | None = None, device: str | None = None, batch_size: int | str = 16,
                 dtype: str = "float32", max_gen_toks: int = 256, model=None, tokenizer=None, **_ignored):
        super().__init__()
        if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            device = "auto"  # lm-eval's CLI defaults to cuda: fall back to what this machine has
        device = pick_device(device)
        if model is None:
            if not checkpoint:
                raise GptforgeError("model_args needs checkpoint=PATH (a step dir, run dir or HF directory)")
            from gptforge.checkpoint import load_model

            model, ckpt_tok, _ = load_model(checkpoint, device=device, dtype=getattr(torch, dtype))
            tokenizer = tokenizer or ckpt_tok
        if tokenizer is None:
            raise GptforgeError(f"{checkpoint}: the checkpoint has no tokenizer/ directory")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = 16 if str(batch_size).startswith("auto") else int(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        self.max_length = model.config.block_size
        self._engine = None

    @property
    def tokenizer_name(self) -> str:
        return f"gptforge-{self.tokenizer.name}-{self.tokenizer.content_hash()}"

    # ---- log-likelihoods -------------------------------------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """``(log p(continuation | context), is_greedy)`` for each ``(context, continuation)`` request."""
        pairs = [encode_pair(self.tokenizer, *req.args[:2]) for req in requests]
        scores = score_requests(self.model, pairs, batch_size=self.batch_size)
        return [(s.logprob, s.is_greedy) for s in scores]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Total log-likelihood of each string, conditioned on end-of-text, in context-sized disjoint windows."""
        out = []
        for req in requests:
            tokens = self.tokenizer.encode(req.args[0])
            windows = rolling_windows(tokens, self.tokenizer.eot_id, self.max_length)
            out.append(sum(s.logprob for s in score_requests(self.model, windows, batch_size=self.batch_size)))
        return out

    # ---- generation ------------------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, cut at the first of the request's ``until`` strings (default: end-of-text)."""
        from gptforge.engine import Engine, SamplingParams

        if self._engine is None:
            self._engine = Engine(self.model, self.tokenizer, device=next(self.model.parameters()).device,
                                  dtype=next(self.model.parameters()).dtype)
        out = []
        for req in requests:
            context, kwargs = req.args[0], dict(req.args[1] or {})
            until = kwargs.pop("until", None) or [self.tokenizer.decode([self.tokenizer.eot_id])]
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            max_new = max(1, min(max_new, self.max_length - 1))
            ids = self.tokenizer.encode(context) or [self.tokenizer.eot_id]
            ids = ids[-(self.max_length - max_new):]
            params = SamplingParams(temperature=0.0, max_new_tokens=max_new, stop_strings=until)
            [completion] = self._engine.generate([ids], params)
            text = completion.text
            for stop in until:  # the engine already stops there; cut defensively for decoders that overshoot
                if stop and stop in text:
                    text = text[: text.index(stop)]
            out.append(text)
        return out


def score_pairs(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int = 16) -> list[float]:
    """Our own scorer on string pairs (for comparing with lm-eval's requests)."""
    return [s.logprob for s in score_requests(model, [encode_pair(tokenizer, c, x) for c, x in pairs], batch_size)]


def cli_main(argv: list[str] | None = None, stock_tasks: bool = False) -> int:
    """Run lm-eval's command line with the ``gptforge`` model type registered.

    Unless ``stock_tasks``, gptforge's local task configs (:mod:`gptforge.eval.lm_eval_tasks`) over
    ``$GPTFORGE_DATA_DIR`` go on lm-eval's include path and replace the stock tasks of the same names, so
    ``--tasks hellaswag,arc_easy`` runs offline. A failure inside lm-eval (an unknown task, data it cannot load)
    becomes one :class:`GptforgeError` line naming the task and what is missing.
    """
    import tempfile

    from lm_eval.__main__ import cli_evaluate

    from gptforge.eval import lm_eval_tasks

    argv = list(sys.argv[1:] if argv is None else argv)
    requested, user_include = _requested_tasks(argv)
    data_dir = None if stock_tasks else lm_eval_tasks.data_dir_from_env()
    with tempfile.TemporaryDirectory(prefix="gptforge-lm-eval-tasks-") as tmp:
        local: list = []
        if data_dir is not None:
            local = lm_eval_tasks.check_requested(requested, data_dir)
            if local and _lm_eval_version() < (0, 4, 10):
                raise GptforgeError(
                    f"the local copies of {', '.join(t.name for t in local)} need lm-eval >= 0.4.10 (older versions "
                    f"let the stock task win over a task of the same name on the include path); you have "
                    f"{_lm_eval_version_text()}: pip install -U 'lm-eval>=0.4.10', or add --stock-tasks")
            task_dir = Path(tmp) / "tasks"
            lm_eval_tasks.write_task_dir(task_dir, data_dir)
            if user_include:  # lm-eval takes one include path: theirs goes in beside ours and wins over it
                if not Path(user_include).is_dir():
                    raise GptforgeError(f"--include_path {user_include}: not a directory of task configs")
                shutil.copytree(user_include, task_dir / "0_user_include_path", dirs_exist_ok=True)
                argv = _without_option(argv, "--include_path")
            argv += ["--include_path", str(task_dir)]
        if local:
            print(f"gptforge: lm-eval tasks from {lm_eval_tasks.DATA_DIR_VAR}={data_dir}: "
                  + ", ".join(f"{t.name} ({', '.join(t.files)})" for t in local)
                  + " (stock prompts and metrics; --stock-tasks for the Hub's copies)", file=sys.stderr)
        saved = sys.argv
        sys.argv = ["lm_eval"] + argv
        quiet = _QuietOverrides(list(lm_eval_tasks.local_tasks()) + lm_eval_tasks.MMLU_TAGS)
        logging.getLogger("lm_eval.tasks._index").addFilter(quiet)
        try:
            cli_evaluate()
        except SystemExit as e:  # lm-eval's argparse exits on bad arguments and after --help
            return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except GptforgeError:
            raise
        except Exception as e:
            if _raised_by_model(e.__traceback__):
                raise  # our adapter's own code: a bug, keep the traceback
            raise GptforgeError(_explain(e, requested, data_dir, stock_tasks)) from None
        finally:
            sys.argv = saved
            logging.getLogger("lm_eval.tasks._index").removeFilter(quiet)
    return 0


def _lm_eval_version_text() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:  # pragma: no cover - a source checkout without metadata
        import lm_eval

        return getattr(lm_eval, "__version__", "0")


def _lm_eval_version() -> tuple[int, ...]:
    import re

    return tuple(int(x) for x in re.findall(r"\d+", _lm_eval_version_text())[:3])


def _requested_tasks(argv: list[str]) -> tuple[list[str], str | None]:
    """The task names given with ``--tasks``/``-t`` (space or comma separated) and ``--include_path``."""
    import argparse

    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--tasks", "-t", nargs="+", action="append", default=[])
    parser.add_argument("--include_path", default=None)
    known, _ = parser.parse_known_args(argv)
    names = [n.strip() for group in known.tasks for value in group for n in value.split(",") if n.strip()]
    return names, known.include_path


def _without_option(argv: list[str], option: str) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            out.append(arg)
    return out


class _QuietOverrides(logging.Filter):
    """Drop lm-eval's warning that each of our tasks (and MMLU's tags) overrides the stock one: that is the point."""

    def __init__(self, names):
        super().__init__()
        self.names = set(names)

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        return not ("overrides existing task" in str(record.msg) and args and args[0] in self.names)


def _raised_by_model(tb) -> bool:
    """Whether the exception passed through this module's model code (GptforgeLM), not only lm-eval's."""
    tb = tb.tb_next if tb is not None else None  # skip cli_main's own frame
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == __file__:
            return True
        tb = tb.tb_next
    return False


def _failing_task(tb) -> str | None:
    """The lm-eval task being built or run when the exception was raised (innermost first)."""
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        config = getattr(frame.f_locals.get("self"), "config", None)
        name = getattr(config, "task", None) if config is not None else None
        if name is None and isinstance(config, dict):
            name = config.get("task")
        if isinstance(name, str):
            return name
        entry = frame.f_locals.get("entry")
        if isinstance(getattr(entry, "name", None), str):
            return entry.name
    return None


def _explain(e: Exception, requested: list[str], data_dir: Path | None, stock_tasks: bool = False) -> str:
    """One line: which task failed and what it is missing."""
    from gptforge.eval import lm_eval_tasks

    local = lm_eval_tasks.local_tasks()
    message = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, ValueError) and message.startswith("Tasks not found:"):
        names = message.split(":", 1)[1].strip()
        return (f"lm-eval has no task named {names} (list them with `lm_eval ls tasks`); gptforge's local tasks: "
                f"{', '.join(n for n in local if not n.startswith('mmlu_'))} and mmlu_<subject>")
    task = _failing_task(e.__traceback__) or ", ".join(requested)
    prefix = f"lm-eval task {task}: " if task else "lm-eval: "
    if not (isinstance(e, ConnectionError) or "Hub" in message or "offline" in message.lower()):
        cause = e.__cause__ or e.__context__
        while cause is not None and (cause.__cause__ or cause.__context__) is not None:
            cause = cause.__cause__ or cause.__context__
        if cause is not None and str(cause).strip():
            message += f" ({type(cause).__name__}: {' '.join(str(cause).split())})"
        if task in local and data_dir is not None:
            prefix = f"lm-eval task {task} (data: {', '.join(str(data_dir / f) for f in local[task].files)}): "
        return f"{prefix}{type(e).__name__}: {message}"
    if task in local and stock_tasks:
        hint = f"; without --stock-tasks it reads the local copy ({', '.join(local[task].files)})"
    elif task in local:
        hint = (f"; gptforge has a local copy of {task}: set {lm_eval_tasks.DATA_DIR_VAR} to a data directory "
                f"holding {', '.join(local[task].files)}")
    elif f"gptforge_{task}" in local:
        hint = f"; offline, gptforge_{task} is a local variant of it (see README)"
    else:
        hint = "; run it once online so that the datasets cache holds it"
    where = _dataset_of(e.__traceback__)
    return f"{prefix}cannot load its data{f' {where}' if where else ''} from the Hugging Face Hub: {message}{hint}"


def _dataset_of(tb) -> str | None:
    """The dataset (``path`` / ``name``) the failing task asked for, if a frame knows it."""
    while tb is not None:
        config = getattr(tb.tb_frame.f_locals.get("self"), "config", None)
        path = getattr(config, "dataset_path", None)
        if isinstance(path, str):
            name = getattr(config, "dataset_name", None)
            return f"{path!r}" + (f" ({name})" if name else "")
        tb = tb.tb_next
    return None


__all__ = ["GptforgeLM", "Request", "cli_main", "score_pairs"]


if __name__ == "__main__":
    try:
        sys.exit(cli_main())
    except GptforgeError as err:
        print("gptforge: error: " + " ".join(str(err).split()), file=sys.stderr)
        sys.exit(2)
