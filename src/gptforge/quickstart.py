"""``gptforge quickstart``: the whole journey on CPU-sized defaults, with a report at the end.

Stages: train a byte-level BPE on the default corpus → prepare shards → pretrain a small model → SFT it on the
default instruction set with the chat template → evaluate (held-out loss/bpb, HellaSwag, SFT test responses)
→ samples → ``report.md`` + self-contained ``report.html``. Each finished stage leaves a marker recording its
parameters, the sha256 of its data and its outputs; a rerun skips stages whose marker matches and whose outputs
still exist.

Data (``resolve_data``, the one place the quickstart finds its files, through ``registry.locate``): a dataset
name resolves to ``$GPTFORGE_DATA_DIR``, then the download cache, then the copy embedded in the package
(``gptforge/embedded``: tinyshakespeare, the 1.1k instruction set, the first 1,000 HellaSwag items), then a
download. The default corpus's share-alike datasets (WikiText-2, TinyStories) are not embedded: without a local
copy they are skipped, so ``gptforge quickstart`` with nothing but the package runs offline on
tinyshakespeare. Datasets the user names explicitly (``--corpus=[...]``, a file, or a hub id such as
``--hellaswag=Rowan/hellaswag``) are required and may be downloaded. The report lists every file used, where it
came from and its sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gptforge.errors import GptforgeError
from gptforge.io import write_json

STAGES = ("tokenizer", "data", "pretrain", "sft", "dpo", "eval", "samples")
DEFAULT_CORPUS = ("tinyshakespeare", "wikitext2", "tinystories")


@dataclass
class QuickstartConfig:
    out: str = "runs/quickstart"
    corpus: list[str] = field(default_factory=lambda: list(DEFAULT_CORPUS))
    instructions: str = "instruction-data"
    hellaswag: str = "hellaswag"
    vocab_size: int = 4096
    preset: str = "mini"  # a GPT-2 preset, or a modern one (modern-mini: RoPE/RMSNorm/SwiGLU, see model_modern.py)
    optimizer: str = "adamw"  # pretraining optimizer: adamw | muon (Muon for the blocks' matrices)
    seq_len: int = 256
    val_fraction: float = 0.02
    pretrain_steps: int = 700
    micro_batch: int = 16
    lr: float = 2e-3
    sft_epochs: int = 3
    sft_lr: float = 1e-3
    sft_batch_size: int = 16
    sft_max_len: int = 256
    test_responses: int = 40
    dpo: bool = False  # an optional DPO stage after SFT (--dpo), on the book's preference pairs
    preferences: str = "instruction-preference"
    dpo_lr: float = 1e-4  # bench/results_dpo.md: what moves a CPU-sized model in one epoch
    dpo_beta: float = 0.1
    dpo_epochs: int = 1
    dpo_limit: int | None = None  # only N pairs (seeded sample)
    hellaswag_items: int = 300
    seed: int = 1337
    workers: int = 0
    precision: str = "auto"  # the one precision rule: bf16 on CPUs with AMX/AVX512-BF16, else fp32


def smoke_config(out: str) -> QuickstartConfig:
    """A seconds-long variant for tests: tiny vocabulary, model and step counts."""
    return QuickstartConfig(out=out, vocab_size=512, preset="tiny", seq_len=64, pretrain_steps=30, micro_batch=8,
                            sft_epochs=1, sft_batch_size=8, sft_max_len=64, test_responses=4, hellaswag_items=12,
                            dpo_limit=120)


class Stages:
    """Runs stages in order; skips those whose marker (params + outputs) is still valid."""

    def __init__(self, out: Path, say: Callable[[str], None]):
        self.out = out
        self.say = say
        self.markers = out / ".stages"
        self.timings: dict[str, float] = {}
        self.skipped: list[str] = []

    def _marker(self, name: str) -> Path:
        return self.markers / f"{name}.json"

    def valid(self, name: str, params: dict) -> bool:
        path = self._marker(name)
        if not path.is_file():
            return False
        try:
            marker = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            return False
        return marker.get("params") == params and all((self.out / o).exists() for o in marker.get("outputs", []))

    def run(self, name: str, params: dict, outputs: list[str], fn: Callable[[], dict | None]) -> dict:
        if self.valid(name, params):
            self.skipped.append(name)
            self.say(f"[{name}] up to date, skipping (outputs: {', '.join(outputs)}; --fresh reruns everything)")
            return json.loads(self._marker(name).read_text(encoding="utf-8")).get("result", {})
        self._marker(name).unlink(missing_ok=True)
        for o in outputs:  # a half-finished earlier attempt must not be mistaken for output
            path = self.out / o
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        self.say(f"[{name}] running")
        start = time.perf_counter()
        result = fn() or {}
        self.timings[name] = time.perf_counter() - start
        result = {**result, "seconds": self.timings[name]}
        self.markers.mkdir(parents=True, exist_ok=True)
        write_json(self._marker(name), {"params": params, "outputs": outputs, "result": result}, default=str)
        self.say(f"[{name}] done in {self.timings[name]:.1f}s")
        return result


def _params(cfg: QuickstartConfig, *keys: str, upstream: dict | None = None, data=None) -> dict:
    d = {k: getattr(cfg, k) for k in keys}
    if data is not None:  # the sha256 of the files a stage reads: other bytes (another data dir) rerun it
        d["data"] = data
    if upstream:
        d["upstream"] = hashlib.sha256(json.dumps(upstream, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return d


def run_quickstart(cfg: QuickstartConfig, fresh: bool = False, say: Callable[[str], None] = print) -> dict:
    """Run every stage (or skip the valid ones) and write the report; returns a summary dict."""
    data = resolve_data(cfg, say)
    out = Path(cfg.out)
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = [f.path for f in data.corpus]
    instructions, hellaswag = data.instructions.path, data.hellaswag.path
    stages = Stages(out, say)
    wall = time.perf_counter()

    p_tok = _params(cfg, "corpus", "vocab_size", data=[f.sha256 for f in data.corpus])
    tok_result = stages.run("tokenizer", p_tok, ["tokenizer"], lambda: _stage_tokenizer(cfg, corpus, out))
    p_data = _params(cfg, "corpus", "val_fraction", upstream=p_tok)
    data_result = stages.run("data", p_data, ["data"], lambda: _stage_data(cfg, corpus, out))
    p_pre = _params(cfg, "preset", "optimizer", "seq_len", "pretrain_steps", "micro_batch", "lr", "seed",
                    upstream=p_data)
    pre_result = stages.run("pretrain", p_pre, ["pretrain"], lambda: _stage_pretrain(cfg, out))
    p_sft = _params(cfg, "instructions", "sft_epochs", "sft_lr", "sft_batch_size", "sft_max_len", "test_responses",
                    "seed", upstream=p_pre, data=data.instructions.sha256 or data.instructions.path)
    sft_result = stages.run("sft", p_sft, ["sft"], lambda: _stage_sft(cfg, instructions, out))
    dpo_result = None
    if cfg.dpo:
        p_dpo = _params(cfg, "preferences", "dpo_lr", "dpo_beta", "dpo_epochs", "dpo_limit", "seed", upstream=p_sft,
                        data=data.preferences.sha256 or data.preferences.path)
        dpo_result = stages.run("dpo", p_dpo, ["dpo"], lambda: _stage_dpo(cfg, data.preferences.path, out))
    p_eval = _params(cfg, "hellaswag_items", upstream=p_sft, data=data.hellaswag.sha256 or data.hellaswag.path)
    eval_result = stages.run("eval", p_eval, ["eval"], lambda: _stage_eval(cfg, hellaswag, out))
    samples = stages.run("samples", _params(cfg, "seed", upstream=p_sft), ["samples.json"],
                         lambda: _stage_samples(cfg, out))

    timings = {name: json.loads((out / ".stages" / f"{name}.json").read_text())["result"].get("seconds")
               for name in STAGES if name != "dpo" or cfg.dpo}
    summary = {"tokenizer": tok_result, "data": data_result, "pretrain": pre_result, "sft": sft_result,
               "dpo": dpo_result, "eval": eval_result, "samples": samples, "timings": timings, "skipped": stages.skipped,
               "wall_seconds": time.perf_counter() - wall, "config": asdict(cfg), "data_sources": data.to_dict()}
    write_json(out / "summary.json", summary, default=str)
    _write_report(cfg, out, summary, data)
    say(_closing_paragraph(out, summary, data))
    return summary


# ---- data --------------------------------------------------------------------------------------------------

ORIGINS = {
    "embedded": "embedded package data",
    "GPTFORGE_DATA_DIR": "GPTFORGE_DATA_DIR",
    "cache": "download cache",
    "download": "downloaded now",
    "path": "file given",
    "hub": "Hugging Face hub",
}


@dataclass
class DataFile:
    """One file (or hub dataset) the quickstart reads, and where it came from."""

    role: str  # corpus | instructions | hellaswag
    name: str  # as configured: a registry name, a path or a hub id
    path: str  # the local file the stages read (the hub id for origin "hub")
    origin: str  # a key of ORIGINS
    shown: str  # the file as the report shows it: gptforge/embedded/..., $GPTFORGE_DATA_DIR/..., a path, a hub id
    sha256: str | None = None  # None for a hub dataset
    bytes: int | None = None
    note: str = ""  # e.g. what part of the dataset an embedded copy holds


@dataclass
class QuickstartData:
    corpus: list[DataFile]
    instructions: DataFile
    hellaswag: DataFile
    skipped: list[dict] = field(default_factory=list)  # default corpora without a local or embedded copy
    preferences: DataFile | None = None  # with --dpo

    def files(self) -> list[DataFile]:
        return [*self.corpus, self.instructions, self.hellaswag, *([self.preferences] if self.preferences else [])]

    def to_dict(self) -> dict:
        data_dir = os.environ.get("GPTFORGE_DATA_DIR")
        return {"files": [asdict(f) for f in self.files()], "skipped": self.skipped,
                "GPTFORGE_DATA_DIR": data_dir if any(f.origin == "GPTFORGE_DATA_DIR" for f in self.files()) else None}


def resolve_data(cfg: QuickstartConfig, say: Callable[[str], None] = print) -> QuickstartData:
    """The quickstart's data files (see the module doc for the order); says where each one came from."""
    data = QuickstartData(corpus=_resolve_corpus(cfg.corpus, say, skipped := []),
                          instructions=_resolve_file("instructions", cfg.instructions),
                          hellaswag=_resolve_file("hellaswag", cfg.hellaswag, subset_ok=True), skipped=skipped,
                          preferences=_resolve_file("preferences", cfg.preferences) if cfg.dpo else None)
    for f in data.files():
        digest = f", sha256 {f.sha256[:12]}…" if f.sha256 else ""
        say(f"[quickstart] {f.role}: {f.name} ← {ORIGINS[f.origin]} ({f.shown}{digest})"
            + (f"; {f.note}" if f.note else ""))
    subset = data.hellaswag.note and _embedded_info(data.hellaswag.name).get("subset")
    if subset and cfg.hellaswag_items > subset["records"]:
        say(f"[quickstart] hellaswag: the embedded copy holds {subset['records']:,} items, fewer than "
            f"--hellaswag_items={cfg.hellaswag_items}; set GPTFORGE_DATA_DIR or --hellaswag=Rowan/hellaswag for all")
    return data


def _resolve_corpus(names: list[str], say: Callable[[str], None], skipped: list[dict]) -> list[DataFile]:
    """The corpus files. A default corpus dataset with neither a local nor an embedded copy (the share-alike
    ones) is skipped, never downloaded; datasets the user names are required, except that a hub-only corpus
    without a local copy is skipped when online (streaming all of TinyStories would not fit the budget)."""
    from gptforge.data import registry

    default = list(names) == list(DEFAULT_CORPUS)
    files = []
    for name in names:
        entry = registry.DATASETS.get(registry.ALIASES.get(name, name))
        if entry is not None and not Path(name).exists() and registry.find_local(entry) is None \
                and entry.name not in registry.embedded_manifest():
            if default:
                reason = (f"no copy in GPTFORGE_DATA_DIR or the download cache; license {entry.license}, not "
                          "shipped with gptforge")
                skipped.append({"name": name, "reason": reason})
                say(f"[quickstart] corpus: {name} skipped: {reason}; set GPTFORGE_DATA_DIR to a folder with "
                    f"{entry.relpath}, or name it in --corpus=[...] to download it")
                continue
            if entry.streamable and not registry.is_offline():
                reason = f"no local copy under $GPTFORGE_DATA_DIR/{entry.relpath}"
                skipped.append({"name": name, "reason": reason})
                say(f"[quickstart] {name}: {reason}; skipped (streaming the whole hub dataset would not fit the "
                    "quickstart)")
                continue
        files.append(_data_file("corpus", name, registry.locate(name)))
    if not files:
        raise GptforgeError("no corpus for the quickstart: set GPTFORGE_DATA_DIR or pass --corpus=[FILE, ...]")
    return files


_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def _resolve_file(role: str, name: str, subset_ok: bool = False) -> DataFile:
    """Instructions or HellaSwag: a file, a registry name, or a hub id (OWNER/NAME) the loader fetches."""
    from gptforge.data import registry

    known = registry.ALIASES.get(name, name) in registry.DATASETS
    if not known and not Path(name).exists() and _HUB_ID.fullmatch(name) \
            and Path(name).suffix.lower() not in (".json", ".jsonl", ".parquet", ".txt"):
        return DataFile(role, name, name, "hub", f"hub dataset {name}")
    return _data_file(role, name, registry.locate(name, subset_ok=subset_ok))


def _embedded_info(name: str) -> dict:
    from gptforge.data import registry

    return registry.embedded_manifest().get(registry.ALIASES.get(name, name)) or {}


def _data_file(role: str, name: str, loc) -> DataFile:
    from gptforge.data import registry
    from gptforge.io import sha256_file

    path, note = loc.path, ""
    if loc.origin == "embedded":
        info = _embedded_info(loc.entry.name)
        sha, shown = info["sha256"], f"gptforge/embedded/{info['file']}"  # checked by registry.find_embedded
        if info.get("subset"):
            note = info["subset"]["how"]
    else:
        sha = sha256_file(path) if path.is_file() else None
        shown = {"GPTFORGE_DATA_DIR": f"$GPTFORGE_DATA_DIR/{loc.entry.relpath}" if loc.entry else str(path),
                 "cache": str(registry.cache_dir() / loc.entry.relpath) if loc.entry else str(path),
                 "download": str(path)}.get(loc.origin, str(path))
    return DataFile(role, name, str(path), loc.origin, shown, sha,
                    path.stat().st_size if path.is_file() else None, note)


# ---- stages ------------------------------------------------------------------------------------------------


def _stage_tokenizer(cfg: QuickstartConfig, corpus: list[str], out: Path) -> dict:
    from gptforge.data.sources import ReadStats, expand_sources, iter_texts
    from gptforge.tokenizer import train_bpe

    stats = ReadStats()
    texts = iter_texts(expand_sources(corpus, separator="blank"), stats)
    start = time.perf_counter()
    tok = train_bpe(texts, vocab_size=cfg.vocab_size, name="quickstart-bpe")
    tok.save(out / "tokenizer")
    return {"vocab_size": tok.vocab_size, "hash": tok.content_hash(), "train_seconds": time.perf_counter() - start}


def _stage_data(cfg: QuickstartConfig, corpus: list[str], out: Path) -> dict:
    from gptforge.data.prepare import PrepareConfig, prepare
    from gptforge.tokenizer import load_tokenizer

    tok = load_tokenizer(out / "tokenizer")
    manifest = prepare(PrepareConfig(sources=corpus, out=str(out / "data"), tokenizer=str(out / "tokenizer"),
                                     val_fraction=cfg.val_fraction, separator="blank", workers=cfg.workers), tok)
    return {"tokens": manifest.get("tokens"), "documents": manifest.get("documents")}


def _stage_pretrain(cfg: QuickstartConfig, out: Path) -> dict:
    from gptforge.train.core import CheckpointConfig, LogConfig, OptimConfig
    from gptforge.train.pretrain import (
        DataSection,
        EvalSection,
        ModelSection,
        PretrainConfig,
        TrainSection,
        run_pretrain,
    )

    steps = cfg.pretrain_steps
    pc = PretrainConfig(
        name="pretrain", out_dir=str(out),
        model=ModelSection(preset=cfg.preset, block_size=cfg.seq_len),
        data=DataSection(path=str(out / "data"), tokenizer=str(out / "tokenizer"), seq_len=cfg.seq_len),
        train=TrainSection(micro_batch=cfg.micro_batch, max_steps=steps, precision=cfg.precision, seed=cfg.seed),
        optim=OptimConfig(name=cfg.optimizer, lr=cfg.lr, warmup_steps=max(1, steps // 20), weight_decay=0.1),
        eval=EvalSection(interval=max(1, steps // 5), sample_interval=0, sample_prompts=["The ", "Once upon a time"]),
        checkpoint=CheckpointConfig(interval=max(1, steps // 2), keep_last=2),
        log=LogConfig(progress=True),
    )
    r = run_pretrain(pc)
    return {"steps": r.steps, "tokens": r.tokens, "final_loss": r.final_loss, "final_val_loss": r.final_val_loss,
            "best_val_loss": r.best_val_loss, "checkpoint": str(r.checkpoint),
            "tokens_per_second": r.summary.get("tokens_per_second"), "precision": r.summary.get("precision"),
            "precision_reason": r.summary.get("precision_reason")}


def _stage_sft(cfg: QuickstartConfig, instructions: str, out: Path) -> dict:
    from gptforge.train.core import OptimConfig
    from gptforge.train.sft import SFTConfig, SFTDataConfig, SFTGenerateConfig, SFTTrainConfig, run_sft

    sc = SFTConfig(
        base=str(out / "pretrain"), name="sft", out_dir=str(out), overwrite=True,
        data=SFTDataConfig(sources=[instructions], style="chat", max_len=cfg.sft_max_len, overlength="truncate"),
        train=SFTTrainConfig(epochs=cfg.sft_epochs, batch_size=cfg.sft_batch_size, patience=2, seed=cfg.seed,
                             precision=cfg.precision),
        optim=OptimConfig(lr=cfg.sft_lr, warmup_ratio=0.05, weight_decay=0.0),
        generate=SFTGenerateConfig(enabled=True, max_new_tokens=96, limit=cfg.test_responses, batch_size=16),
    ).validate()
    r = run_sft(sc)
    return {"steps": r.steps, "initial_val_loss": r.initial_val_loss, "best_val_loss": r.best_val_loss,
            "val_losses": r.val_losses, "stopped_early": r.stopped_early, "checkpoint": str(r.checkpoint),
            "test_responses": str(r.test_responses) if r.test_responses else None, "stop_rate": r.stop_rate,
            "data": r.data}


def _stage_dpo(cfg: QuickstartConfig, preferences: str, out: Path) -> dict:
    from gptforge.train.core import OptimConfig
    from gptforge.train.dpo import DPOConfig, DPODataConfig, DPOLossConfig, DPOTrainConfig, run_dpo

    dc = DPOConfig(
        base=str(out / "sft"), name="dpo", out_dir=str(out), overwrite=True,
        # long pairs are cut to the context; those whose prompt alone fills it are skipped (and counted)
        data=DPODataConfig(sources=[preferences], limit=cfg.dpo_limit, max_len=cfg.sft_max_len, overlength="truncate",
                           skip_bad=True),
        dpo=DPOLossConfig(beta=cfg.dpo_beta),
        train=DPOTrainConfig(epochs=cfg.dpo_epochs, seed=cfg.seed, precision=cfg.precision),
        optim=OptimConfig(lr=cfg.dpo_lr, schedule="constant", weight_decay=0.0),
    ).validate()
    r = run_dpo(dc)
    return {"steps": r.steps, "checkpoint": str(r.checkpoint), "data": r.data,
            "initial_test": r.initial_test, "test": r.test, "best_val": r.best_val}


def _stage_eval(cfg: QuickstartConfig, hellaswag: str, out: Path) -> dict:
    from gptforge.checkpoint import load_model
    from gptforge.eval.choice import evaluate_choice
    from gptforge.eval.loss import evaluate_loss

    (out / "eval").mkdir(parents=True, exist_ok=True)
    results: dict = {}
    for name in ("pretrain", "sft"):
        model, tok, _ = load_model(out / name)
        loss = evaluate_loss(model, out / "data", tokenizer=tok, split="val", seq_len=cfg.seq_len)
        hs = evaluate_choice(model, tok, task="hellaswag", data=hellaswag, limit=cfg.hellaswag_items)
        write_json(out / "eval" / f"{name}_loss.json", loss, default=str)
        write_json(out / "eval" / f"{name}_hellaswag.json", hs, default=str)
        results[name] = {"loss": loss.get("loss"), "perplexity": loss.get("perplexity"),
                         "bits_per_byte": loss.get("bits_per_byte"), "tokens": loss.get("tokens"),
                         "hellaswag_acc": hs["metrics"].get("acc"), "hellaswag_acc_norm": hs["metrics"].get("acc_norm"),
                         "hellaswag_items": len(hs["predictions"]), "hellaswag_items_per_second": hs["items_per_second"]}
    return results


SAMPLE_PROMPTS = ["Once upon a time", "The meaning of the", "KING HENRY:"]
CHAT_QUESTIONS = ["What is the capital of France?", "Rewrite the sentence in passive voice: The cat chased the mouse.",
                  "Give me a synonym for 'happy'."]


def _stage_samples(cfg: QuickstartConfig, out: Path) -> dict:
    from gptforge.engine import Engine, SamplingParams

    base = Engine.from_checkpoint(out / "pretrain")
    params = SamplingParams(max_new_tokens=48, temperature=0.8, top_p=0.95, repetition_penalty=1.1, seed=cfg.seed)
    completions = [{"prompt": p, "completion": c.text}
                   for p, c in zip(SAMPLE_PROMPTS, base.generate(SAMPLE_PROMPTS, params))]
    chat = Engine.from_checkpoint(out / "sft")
    answers = []
    for q in CHAT_QUESTIONS:
        c = chat.chat([{"role": "user", "content": q}], SamplingParams(max_new_tokens=64, temperature=0.0))
        answers.append({"question": q, "answer": c.text, "finish_reason": c.finish_reason})
    data = {"completions": completions, "chat": answers}
    write_json(out / "samples.json", data)
    return {"n_completions": len(completions), "n_chat": len(answers)}


# ---- report ------------------------------------------------------------------------------------------------


def _write_report(cfg: QuickstartConfig, out: Path, s: dict, data: QuickstartData) -> None:
    from gptforge.report import Report

    r = Report("gptforge quickstart report")
    r.paragraph(f"Output directory: `{out}`. Wall time of this invocation: {s['wall_seconds']:.0f} s"
                + (f" (skipped, already complete: {', '.join(s['skipped'])})" if s["skipped"] else "") + ".")
    r.heading("Data")
    r.paragraph(f"Data from {_data_origins(data)}." + _data_notes(data))
    r.table(["role", "dataset", "file", "from", "sha256"],
            [[f.role, f.name + (f": {f.note}" if f.note else ""), f.shown, ORIGINS[f.origin], f.sha256 or "n/a"]
             for f in data.files()])
    r.heading("Stages")
    r.table(["stage", "seconds", "result"], [
        ["tokenizer", s["timings"].get("tokenizer"), f"byte-level BPE, vocab {s['tokenizer'].get('vocab_size')}"],
        ["data", s["timings"].get("data"), _token_counts(s["data"].get("tokens"))],
        ["pretrain", s["timings"].get("pretrain"), f"{s['pretrain'].get('steps')} steps, "
                                                   f"{s['pretrain'].get('tokens')} tokens"],
        ["sft", s["timings"].get("sft"), f"{s['sft'].get('steps')} steps"],
        *([["dpo", s["timings"].get("dpo"), f"{s['dpo'].get('steps')} steps"]] if s.get("dpo") else []),
        ["eval", s["timings"].get("eval"), "held-out loss, HellaSwag"],
        ["samples", s["timings"].get("samples"), "completions and chat answers"],
    ])
    r.heading("Pretraining")
    pre = s["pretrain"]
    r.paragraph(f"Final training loss {_f(pre.get('final_loss'))}, validation loss {_f(pre.get('final_val_loss'))} "
                f"(best {_f(pre.get('best_val_loss'))}); precision {pre.get('precision')} "
                f"({pre.get('precision_reason')}), {_f(pre.get('tokens_per_second'))} tokens/s.")
    r.image(out / "pretrain" / "loss.png", "pretraining: loss, learning rate, gradient norm")
    r.heading("Instruction fine-tuning")
    sft = s["sft"]
    r.paragraph(f"Validation loss {_f(sft.get('initial_val_loss'))} before → {_f(sft.get('best_val_loss'))} best; "
                f"{_pct(sft.get('stop_rate'))} of test responses ended with the end-of-turn token.")
    r.image(out / "sft" / "loss.png", "SFT: training and validation loss")
    if s.get("dpo"):
        dpo, before, after = s["dpo"], s["dpo"].get("initial_test") or {}, s["dpo"].get("test") or {}
        r.heading("Preference tuning (DPO)")
        r.paragraph(f"{dpo.get('steps')} steps of DPO (beta {cfg.dpo_beta:g}, lr {cfg.dpo_lr:g}) from the SFT model on "
                    f"the preference pairs; on the held-out test pairs the reward accuracy (how often the implicit "
                    f"reward ranks the chosen answer above the rejected one; 50% at the start) went from "
                    f"{_pct(before.get('test_rewards_accuracies'))} to {_pct(after.get('test_rewards_accuracies'))} "
                    f"and the margin from {_f(before.get('test_rewards_margins'))} to "
                    f"{_f(after.get('test_rewards_margins'))}.")
        r.image(out / "dpo" / "loss.png", "DPO: loss, reward margin and accuracy")
    r.heading("Evaluation")
    ev = s["eval"]
    r.table(["model", "val loss", "perplexity", "bits/byte", "HellaSwag acc", "acc_norm", "items"],
            [[name, ev[name]["loss"], ev[name]["perplexity"], ev[name]["bits_per_byte"], ev[name]["hellaswag_acc"],
              ev[name]["hellaswag_acc_norm"], ev[name]["hellaswag_items"]] for name in ("pretrain", "sft")])
    r.paragraph("HellaSwag chance level is 0.25; a model this small is expected near chance.")
    samples = json.loads((out / "samples.json").read_text(encoding="utf-8"))
    r.heading("Samples")
    for item in samples["completions"]:
        r.code(item["prompt"] + item["completion"])
    r.heading("Chat answers (greedy, SFT model)")
    for item in samples["chat"]:
        r.code(f"user: {item['question']}\nassistant: {item['answer']}")
    responses = sft.get("test_responses")
    if responses and Path(responses).is_file():
        records = json.loads(Path(responses).read_text(encoding="utf-8"))
        records = records if isinstance(records, list) else records.get("records", [])
        r.heading("SFT test-split responses (first 5)")
        r.table(["instruction", "reference", "response"],
                [[x.get("instruction", "")[:120], x.get("reference", "")[:120], x.get("response", "")[:160]]
                 for x in records[:5]])
    r.heading("Reproduce or continue")
    r.code("\n".join(_commands(cfg, out, data)), "bash")
    r.write(out / "report.md", out / "report.html")


def _data_origins(data: QuickstartData) -> str:
    origins = list(dict.fromkeys(f.origin for f in data.files()))
    return " and ".join(ORIGINS[o] + (f" ({os.environ.get('GPTFORGE_DATA_DIR')})" if o == "GPTFORGE_DATA_DIR" else "")
                        for o in origins)


def _data_notes(data: QuickstartData) -> str:
    notes = []
    if any(f.origin == "embedded" for f in data.files()):
        notes.append("Embedded files ship inside the gptforge package (`gptforge/embedded/`); their sources, "
                     "licenses and attribution are in `gptforge/embedded/NOTICE`, and their sha256 were checked "
                     "against `gptforge/embedded/manifest.json` before use.")
    if data.skipped:
        notes.append("Skipped from the default corpus: " + "; ".join(f"{x['name']} ({x['reason']})"
                                                                    for x in data.skipped)
                     + ". Set GPTFORGE_DATA_DIR to a data directory that holds them to train on them too.")
    return "".join(" " + n for n in notes)


def _commands(cfg: QuickstartConfig, out: Path, data: QuickstartData) -> list[str]:
    corpus = " ".join(f.name for f in data.corpus)
    return [
        f"gptforge tokenizer train {corpus} --vocab-size {cfg.vocab_size} --out {out}/tokenizer",
        f"gptforge data prepare {corpus} --tokenizer {out}/tokenizer --separator blank "
        f"--val-fraction {cfg.val_fraction} --out {out}/data",
        f"gptforge pretrain --model.preset={cfg.preset} --model.block_size={cfg.seq_len} --data.path={out}/data "
        f"--train.max_steps={cfg.pretrain_steps} --train.micro_batch={cfg.micro_batch} --optim.lr={cfg.lr} "
        + (f"--optim.name={cfg.optimizer} " if cfg.optimizer != "adamw" else "") +
        f"--name=pretrain --out_dir={out}",
        f"gptforge sft --checkpoint {out}/pretrain --data {data.instructions.path} --out-dir {out} --name sft",
        *([f"gptforge dpo --checkpoint {out}/sft --data {data.preferences.path} --lr {cfg.dpo_lr} --beta "
           f"{cfg.dpo_beta} --epochs {cfg.dpo_epochs} --out-dir {out} --name dpo"] if data.preferences else []),
        f"gptforge eval loss --checkpoints {out}/pretrain {out}/sft --data {out}/data",
        (f"gptforge eval choice --checkpoint {out}/sft --task hellaswag --data {data.hellaswag.path} "
         f"--limit {cfg.hellaswag_items}"),
        f"gptforge chat --checkpoint {out}/sft",
        f"gptforge serve --checkpoint {out}/sft --port 8000",
        f"gptforge export --checkpoint {out}/sft --out {out}/hf",
    ]


def _token_counts(tokens) -> str:
    if isinstance(tokens, dict):
        return " / ".join(f"{v:,} {k}" for k, v in tokens.items()) + " tokens"
    return f"{tokens} tokens"


def _f(x) -> str:
    return f"{x:.3f}" if isinstance(x, (int, float)) else "n/a"


def _pct(x) -> str:
    return f"{100 * x:.0f}%" if isinstance(x, (int, float)) else "n/a"


def _closing_paragraph(out: Path, s: dict, data: QuickstartData) -> str:
    ev = s["eval"]
    return (f"\nquickstart finished in {s['wall_seconds']:.0f}s on {', '.join(f.name for f in data.files())} "
            f"({_data_origins(data)}). Base model val loss {_f(ev['pretrain']['loss'])} "
            f"({_f(ev['pretrain']['bits_per_byte'])} bits/byte), HellaSwag acc_norm "
            f"{_f(ev['pretrain']['hellaswag_acc_norm'])}; SFT model stops at end-of-turn on "
            f"{_pct(s['sft'].get('stop_rate'))} of test prompts.\nReport: {out / 'report.md'} and {out / 'report.html'}. "
            f"Talk to it: gptforge chat --checkpoint {out}/sft")
