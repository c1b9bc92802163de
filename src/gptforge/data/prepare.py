"""``gptforge data prepare``: tokenize text sources into headered shards plus ``manifest.json``.

Pipeline: the main thread streams pieces from the sources (``data/sources.py``), groups them into batches of
bounded size and hands them to N tokenizing threads (``data/workers.py``: the encoders release the GIL, so
the threads use N cores without worker processes); results are consumed in submission order, so the shards
do not depend on N. Every document is preceded by the end-of-text token (so documents are joined with it) and
goes to ``train`` or ``val`` by a stable hash of its first 1,024 characters: the same document lands in the
same split on every run, with any number of workers. With ``--val-split``/``--val-source`` the hash split is
off instead: those inputs are read first and all go to ``val``, the others all to ``train`` (a batch never mixes
the two, so the split is a per-batch flag). ``--sample-docs`` keeps the documents HF ``datasets``' shuffle+select
would keep (``data/sampling.py``), in source order.

Memory is bounded by ``buffer_mb`` (text and tokens in flight) plus one shard per split being filled.
After every completed shard a checkpoint (``.prepare_state.json`` + the unfinished shard tails) is written
atomically; a killed run continues from the last checkpoint and produces the same bytes. The checkpoint and
the manifest carry a fingerprint of the options, the tokenizer and every input (local files by size and
sha256), so a rerun whose inputs changed in between is refused instead of mixing old and new text.
"""

from __future__ import annotations

import math
import numbers
import os
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from gptforge.data import shards as shardfmt
from gptforge.data.prepare_report import plot_histogram, summary
from gptforge.data.prepare_state import (
    HISTOGRAM_PNG,
    STATE,
    check_existing,
    fingerprint_of,
    temp_files,
)
from gptforge.data.sampling import Sample
from gptforge.data.shards import ShardWriter
from gptforge.data.sources import DEFAULT_PIECE_CHARS, ReadStats, expand_sources, separator_rule, val_sources
from gptforge.data.workers import (  # noqa: F401  (is_validation: the split rule, part of this module's API)
    SPLIT_HASH_CHARS,
    encode_batch,
    encoder_payload,
    is_validation,
    plain_encoder,
    tokenizer_threads,
)
from gptforge.errors import GptforgeError
from gptforge.io import write_json

FORMAT = "gptforge-shards-1"


@dataclass
class PrepareConfig:
    """Options of ``gptforge data prepare`` (``workers`` and ``buffer_mb`` never change the output)."""

    sources: list[str]
    out: str
    tokenizer: str = "gpt2"
    val_fraction: float = 0.01
    shard_tokens: int = 100_000_000
    max_tokens: int | None = None
    workers: int = 0  # tokenizing threads; 0: all usable cores
    # .txt documents: file | blank | line | a literal; None: auto-detect (sources.detect_separator)
    separator: str | None = None
    field: str = "text"  # .jsonl/.json field
    column: str | None = None  # .parquet column (default: field)
    hub_config: str | None = None
    hub_split: str = "train"
    split_salt: str = "gptforge"
    skip_bad: bool = False
    buffer_mb: float = 256.0
    overwrite: bool = False
    progress: bool = True
    histogram: bool = True
    sample_docs: int | None = None  # keep the rows HF's Dataset.shuffle(seed=sample_seed).select(range(N)) keeps
    sample_seed: int = 0
    val_split: str | None = None  # hub inputs: this split of the same dataset is the val shards
    val_sources: list[str] | None = None  # files whose documents all go to val


# ---- writing --------------------------------------------------------------------------------------------------


class DocStats:
    """Documents per split and a log2 histogram of document lengths in tokens (end-of-text excluded)."""

    BINS = 40

    def __init__(self):
        self.docs = {"train": 0, "val": 0}
        self.hist = np.zeros(self.BINS, dtype=np.int64)
        self.open_len = -1  # tokens so far of the document still being read (-1: none)
        self.max_len = 0

    def add(self, counts: np.ndarray, firsts: np.ndarray, vals: np.ndarray) -> None:
        lengths = counts - firsts  # EOT not counted
        starts = np.flatnonzero(firsts)
        if starts.size == 0:
            if self.open_len >= 0:
                self.open_len += int(lengths.sum())
            return
        if self.open_len >= 0:
            self._record(np.array([self.open_len + int(lengths[: starts[0]].sum())]))
        sums = np.add.reduceat(lengths, starts)
        self._record(sums[:-1])
        self.open_len = int(sums[-1])
        n_val = int(vals[starts].sum())
        self.docs["val"] += n_val
        self.docs["train"] += int(starts.size) - n_val

    def close(self) -> None:
        if self.open_len >= 0:
            self._record(np.array([self.open_len]))
            self.open_len = -1

    def _record(self, lengths: np.ndarray) -> None:
        if lengths.size:
            bins = np.frexp(lengths.astype(np.float64))[1]  # bin b holds lengths in [2^(b-1), 2^b)
            self.hist += np.bincount(np.clip(bins, 0, self.BINS - 1), minlength=self.BINS)
            self.max_len = max(self.max_len, int(lengths.max()))

    def state(self) -> dict:
        return {
            "docs": self.docs,
            "hist": self.hist.tolist(),
            "open_len": self.open_len,
            "max_len": self.max_len,
        }

    def load(self, s: dict) -> None:
        self.docs, self.hist = dict(s["docs"]), np.array(s["hist"], dtype=np.int64)
        self.open_len, self.max_len = s["open_len"], s["max_len"]


# ---- the run --------------------------------------------------------------------------------------------------


def _whole(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _validate(cfg: PrepareConfig) -> None:
    """One clear error per impossible option, before anything is loaded or written."""
    if not 0 <= cfg.val_fraction < 1:
        raise GptforgeError(f"--val-fraction must be in [0, 1), got {cfg.val_fraction}")
    if not (_whole(cfg.shard_tokens) and cfg.shard_tokens >= 1):
        raise GptforgeError(f"--shard-tokens must be an integer >= 1, got {cfg.shard_tokens!r}")
    if cfg.max_tokens is not None and not (_whole(cfg.max_tokens) and cfg.max_tokens >= 1):
        raise GptforgeError(f"--max-tokens must be an integer >= 1 (leave it out for no budget), "
                            f"got {cfg.max_tokens!r}")
    if not (_whole(cfg.workers) and cfg.workers >= 0):
        raise GptforgeError(f"--workers must be an integer >= 0 (0: all cores), got {cfg.workers!r}")
    if not (isinstance(cfg.buffer_mb, numbers.Real) and math.isfinite(cfg.buffer_mb) and cfg.buffer_mb > 0):
        raise GptforgeError(f"--buffer-mb must be a finite number > 0 (MB of text in flight, default 256), "
                            f"got {cfg.buffer_mb!r}")
    if cfg.sample_docs is not None and not (_whole(cfg.sample_docs) and cfg.sample_docs >= 1):
        raise GptforgeError(f"--sample-docs must be an integer >= 1, got {cfg.sample_docs!r}")
    if not (_whole(cfg.sample_seed) and cfg.sample_seed >= 0):
        raise GptforgeError(f"--sample-seed must be an integer >= 0, got {cfg.sample_seed!r}")
    if cfg.val_split is not None and cfg.val_sources:
        raise GptforgeError("--val-split and --val-source both choose the validation documents: pass one of them")
    if cfg.val_split is not None and not cfg.val_split.strip():
        raise GptforgeError("--val-split needs a split name, e.g. validation")
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise GptforgeError(f"--out {out} is an existing file, not a directory: pass a new directory or "
                            "one that holds a prepared dataset")


def prepare(cfg: PrepareConfig, tokenizer=None) -> dict:
    """Tokenize ``cfg.sources`` into ``cfg.out``; returns the manifest. See the module doc for guarantees."""
    from gptforge.tokenizer import load_tokenizer

    _validate(cfg)
    tokenizer = tokenizer or load_tokenizer(cfg.tokenizer)
    sources = expand_sources(cfg.sources, cfg.separator, cfg.field, cfg.column, cfg.hub_config, cfg.hub_split)
    # Val inputs first: a --max-tokens budget never cuts them off.
    sources = val_sources(sources, cfg.val_split, cfg.val_sources, separator=cfg.separator, field=cfg.field,
                          column=cfg.column, hub_config=cfg.hub_config, hub_split=cfg.hub_split) + sources
    if cfg.progress and cfg.separator in (None, "auto"):  # say which rule split each text file, before tokenizing
        for src in sources:
            if src.kind == "txt":
                rule, why = separator_rule(src.path)
                reason = f": {why}" if rule == src.separator else " (the dataset's own rule)"
                print(f"{src.path}: documents split by {src.separator!r}{reason}; --text-sep chooses another")
    out = Path(cfg.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GptforgeError(f"cannot create the --out directory {out}: {e.strerror or e}; "
                            "pass a writable directory path") from None
    fingerprint = fingerprint_of(cfg, tokenizer, sources)
    status, previous = check_existing(out, fingerprint, cfg.overwrite)
    if status == "done":
        if cfg.progress:
            print(
                f"{out}: already prepared ({previous['tokens']['train']:,} train + {previous['tokens']['val']:,} "
                "val tokens); pass --overwrite to redo it"
            )
        return previous
    if cfg.progress and any(s.all_val for s in sources):
        print("validation: every document of the --val-split/--val-source inputs; the hash split "
              "(--val-fraction) is off, every other document goes to train")
    sample = None
    if cfg.sample_docs is not None:
        sample = Sample(sources, cfg.sample_docs, cfg.sample_seed, cfg.skip_bad, cfg.progress)
    return _Run(cfg, tokenizer, sources, out, fingerprint, previous, sample).run()


class Batch(NamedTuple):
    """Pieces to tokenize together: ``split`` are :func:`encode_batch`'s split arguments; ``read_bytes``
    counts the input bytes of pieces left out by --sample-docs too (for progress)."""

    texts: list
    firsts: np.ndarray
    nbytes: int
    split: tuple
    read_bytes: int


class _Run:
    def __init__(self, cfg, tokenizer, sources, out, fingerprint, previous, sample=None):
        self.cfg, self.tokenizer, self.sources, self.out = cfg, tokenizer, sources, out
        self.sample = sample
        self.fingerprint = fingerprint
        self.dtype = shardfmt.token_dtype(tokenizer.vocab_size)
        self.writers = {s: ShardWriter(out, s, self.dtype, cfg.shard_tokens) for s in ("train", "val")}
        self.docs = DocStats()
        self.read = ReadStats()
        self.per_source_docs: list[int] = []
        # Per finished source: pieces read up to its end and its read counters (lets a resume skip it unread).
        self.source_ends: list[dict] = []
        self.pieces_done = 0
        self.bytes_done = 0
        self.bytes_read = 0  # bytes_done plus the bytes of documents --sample-docs left out
        self.generation = 0
        self.workers = cfg.workers or _usable_cores()
        self.inflight = 2 * self.workers
        buffer_chars = int(cfg.buffer_mb * 2**20)
        # Text in flight ≈ (inflight + 1) batches; a piece never exceeds a batch. Batches of ~1M characters
        # (~50 ms of tokenizing) keep the threads evenly busy to the end at a negligible cost per batch.
        self.batch_chars = max(1 << 12, min(1 << 20, buffer_chars // (self.inflight + 2)))
        self.piece_chars = min(DEFAULT_PIECE_CHARS, self.batch_chars)
        self.budget = cfg.max_tokens
        self.split_args = (cfg.val_fraction, cfg.split_salt, False)
        if any(s.all_val for s in sources):  # the split is by input: no hash split
            self.split_args = (0.0, cfg.split_salt, False)
        self.start_time = time.time()
        self.elapsed_before = 0.0
        self.current_is_val = False  # the split of the document the last consumed piece belongs to
        if previous is not None:
            self._restore(previous)

    # -- checkpoints --

    def _restore(self, state: dict) -> None:
        tails_path = self.out / state["tails"]
        with np.load(tails_path) as z:
            tails = {s: z[s].astype(self.dtype) for s in ("train", "val")}
        for s, w in self.writers.items():
            w.restore(state["shards"][s], tails[s])
        keep = {d["name"] for shards in state["shards"].values() for d in shards}
        for stale in list(self.out.glob("train_*.bin*")) + list(self.out.glob("val_*.bin*")):
            if stale.name not in keep:
                stale.unlink()  # written after the last checkpoint: will be written again
        for tmp in temp_files(self.out):
            tmp.unlink(missing_ok=True)  # a write the kill interrupted
        self.docs.load(state["docs"])
        self.pieces_done, self.bytes_done = state["pieces_done"], state["bytes_done"]
        self.bytes_read = state.get("bytes_read", self.bytes_done)
        self.generation = state["generation"]
        self.current_is_val = state["current_is_val"]
        self.source_ends = list(state.get("source_ends", []))
        self.elapsed_before = state.get("elapsed_s", 0.0)

    def _checkpoint(self) -> None:
        self.generation += 1
        tails = f".prepare_tail_{self.generation:06d}.npz"
        tmp = self.out / (tails + ".tmp.npz")
        np.savez(tmp, train=self.writers["train"].tail(), val=self.writers["val"].tail())
        os.replace(tmp, self.out / tails)
        state = {
            "fingerprint": self.fingerprint,
            "generation": self.generation,
            "tails": tails,
            "pieces_done": self.pieces_done,
            "bytes_done": self.bytes_done,
            "bytes_read": self.bytes_read,
            "docs": self.docs.state(),
            "current_is_val": self.current_is_val,
            "source_ends": [e for e in self.source_ends if e["pieces_end"] <= self.pieces_done],
            "shards": {s: w.shards for s, w in self.writers.items()},
            "elapsed_s": self.elapsed_before + time.time() - self.start_time,
        }
        write_json(self.out / STATE, state, fsync=True)
        for old in self.out.glob(".prepare_tail_*.npz"):
            if old.name != tails:
                old.unlink()

    # -- reading --

    def _batches(self):
        """Batches of the pieces after the ``pieces_done`` already written (pieces --sample-docs leaves out
        are not counted). The main thread only reads, samples and cuts; hashing for the split and
        tokenizing happen in the tokenizing threads."""
        texts, firsts, nbytes, chars, left_out = [], [], 0, 0, 0
        split = self.split_args
        index = 0
        pieces_done, batch_chars = self.pieces_done, self.batch_chars
        for i, src in enumerate(self.sources):
            if i < len(self.source_ends):  # finished before the checkpoint we resume from: skip unread
                end = self.source_ends[i]
                index = end["pieces_end"]
                self.per_source_docs.append(end["documents"])
                self.read.documents += end["documents"]
                self.read.bad_utf8 += end["bad_utf8"]
                self.read.skipped += end["skipped"]
                if end["empty"]:
                    self.read.empty_files.append(src.path)
                continue
            src_split = (0.0, self.cfg.split_salt, True) if src.all_val else self.split_args
            if texts and src_split != split:  # one split rule per batch
                yield Batch(texts, np.array(firsts), nbytes, split, nbytes + left_out)
                texts, firsts, nbytes, chars, left_out = [], [], 0, 0, 0
            split = src_split
            sampled = self.sample is not None and not src.all_val
            kept = True
            before = (self.read.documents, self.read.bad_utf8, self.read.skipped, len(self.read.empty_files))
            rows_before = self.read.rows
            for piece in src.pieces(self.read, self.piece_chars, self.cfg.skip_bad):
                if sampled:
                    if piece.first:
                        kept = self.sample.keeps(i, self.read.rows - rows_before - 1)
                    if not kept:
                        if index >= self.pieces_done:  # after the resume point: not yet counted
                            left_out += piece.nbytes
                        continue
                index += 1
                if index <= pieces_done:
                    continue
                text = piece.text
                if texts and chars + len(text) > batch_chars:  # a batch never exceeds batch_chars
                    yield Batch(texts, np.array(firsts), nbytes, split, nbytes + left_out)
                    texts, firsts, nbytes, chars, left_out = [], [], 0, 0, 0
                texts.append(text)
                firsts.append(piece.first)
                nbytes += piece.nbytes
                chars += len(text)
            if sampled:
                self.sample.check(i, src, self.read.rows - rows_before)
            self.per_source_docs.append(self.read.documents - before[0])
            self.source_ends.append(
                {
                    "pieces_end": index,
                    "documents": self.read.documents - before[0],
                    "bad_utf8": self.read.bad_utf8 - before[1],
                    "skipped": self.read.skipped - before[2],
                    "empty": len(self.read.empty_files) > before[3],
                }
            )
        if texts or left_out:
            yield Batch(texts, np.array(firsts, dtype=bool), nbytes, split, nbytes + left_out)

    # -- main loop --

    def run(self) -> dict:
        encoder = plain_encoder(self.tokenizer, self.dtype)
        if self.pieces_done == 0 and not (self.out / STATE).exists():
            self._checkpoint()  # marks the directory as ours from the first byte on
        total_bytes = (
            sum(s.size for s in self.sources) if all(s.size is not None for s in self.sources) else None
        )
        if self._budget_left() == 0:
            return self._finish()
        pool = tokenizer_threads(self.workers)
        try:
            with _progress(self.cfg.progress, total_bytes, self.bytes_read) as bar:
                self._run_pool(pool, bar, encoder)
        finally:  # an error or Ctrl-C: drop the queued batches, let the running ones end
            pool.shutdown(wait=True, cancel_futures=True)
        return self._finish()

    def _run_pool(self, pool, bar, encoder) -> None:
        """Keep ``inflight`` batches queued; consume results strictly in submission order."""
        pending: deque = deque()
        batches = self._batches()
        exhausted = False
        while True:
            while not exhausted and len(pending) < self.inflight:
                batch = next(batches, None)
                if batch is None:
                    exhausted = True
                    break
                future = pool.submit(encode_batch, batch.texts, batch.firsts, *batch.split, encoder)
                pending.append((batch, future))
            if not pending:
                return
            batch, future = pending.popleft()
            if self._consume(batch, future.result(), bar):
                return

    def _budget_left(self) -> int | None:
        if self.budget is None:
            return None
        return max(0, self.budget - self.writers["train"].tokens - self.writers["val"].tokens)

    def _consume(self, batch, result, bar) -> bool:
        """Route one batch's tokens to the splits; returns True when the token budget is reached."""
        firsts, nbytes = batch.firsts, batch.nbytes
        tokens, counts, doc_val = result
        self.bytes_read += batch.read_bytes
        if not batch.texts:  # only documents --sample-docs left out
            bar.update(batch.read_bytes)
            return False
        # Each piece takes the split of its document; pieces before the first start continue the open one.
        doc_index = np.cumsum(firsts)
        vals = np.concatenate([[self.current_is_val], doc_val])[doc_index]
        if vals.size:
            self.current_is_val = bool(vals[-1])
        left = self._budget_left()
        stop = False
        if left is not None and tokens.size >= left:
            cum = np.cumsum(counts)
            last = int(np.searchsorted(cum, left, side="left"))  # the piece that reaches the budget
            counts = counts[: last + 1].copy()
            counts[-1] -= int(cum[last]) - left
            tokens, firsts, vals = tokens[:left], firsts[: last + 1], vals[: last + 1]
            stop = True
        if vals.any():
            mask = np.repeat(vals, counts)
            wrote = self.writers["train"].append(tokens[~mask])
            wrote = self.writers["val"].append(tokens[mask]) or wrote
        else:
            wrote = self.writers["train"].append(tokens)
        self.docs.add(counts, firsts.astype(np.int64), vals)
        self.pieces_done += len(counts)
        self.bytes_done += nbytes
        bar.update(batch.read_bytes)
        elapsed = max(1e-9, time.time() - self.start_time)
        bar.set_postfix_str(
            f"{(self.writers['train'].tokens + self.writers['val'].tokens) / elapsed / 1e6:.2f}M tok/s",
            refresh=False,
        )
        if wrote and not stop:
            self._checkpoint()
        return stop

    def _kept_docs(self) -> int:
        """Documents of the sampled inputs that were kept (those of all-val inputs are not sampled)."""
        val_docs = sum(n for src, n in zip(self.sources, self.per_source_docs) if src.all_val)
        return self.docs.docs["train"] + self.docs.docs["val"] - val_docs

    def _finish(self) -> dict:
        cfg = self.cfg
        if self.read.empty_files and len(self.read.empty_files) == len(self.sources):
            raise GptforgeError(
                f"no text in the inputs: {', '.join(self.read.empty_files[:5])} "
                "hold no documents (empty files, or every record skipped)"
            )
        total = self.writers["train"].tokens + self.writers["val"].tokens
        if total == 0:
            raise GptforgeError("the inputs produced no tokens (empty files, or every record skipped)")
        val_inputs = [s.path for s in self.sources if s.all_val]
        if val_inputs and 0 in (self.writers["val"].tokens, self.writers["train"].tokens):
            which = "validation" if self.writers["val"].tokens == 0 else "training"
            raise GptforgeError(
                f"no {which} tokens: the validation inputs ({', '.join(val_inputs[:3])}) go to val, every other "
                "input to train (read after them, within --max-tokens); give both some documents and add "
                "--overwrite to redo"
            )
        if not val_inputs and cfg.val_fraction > 0 and self.writers["val"].tokens == 0:
            n = self.docs.docs["train"] + self.docs.docs["val"]
            raise GptforgeError(
                f"no document fell into the validation split ({n:,} documents, --val-fraction {cfg.val_fraction}): "
                "the split is per document, so use more documents (e.g. --text-sep blank for paragraphs, or a "
                "literal separator), a larger --val-fraction, or --val-fraction 0; add --overwrite to redo"
            )
        self.docs.close()
        for w in self.writers.values():
            w.finish()
        elapsed = self.elapsed_before + time.time() - self.start_time
        tok_dir = self.out / "tokenizer"
        self.tokenizer.save(tok_dir)
        manifest = {
            "format": FORMAT,
            "fingerprint": self.fingerprint,
            "tokenizer": {
                "name": self.tokenizer.name,
                "kind": self.tokenizer.kind,
                "hash": self.tokenizer.content_hash(),
                "vocab_size": self.tokenizer.vocab_size,
                "eot_id": self.tokenizer.eot_id,
                "path": "tokenizer",
            },
            "dtype": self.dtype.name,
            "shard_tokens": cfg.shard_tokens,
            "sources": [
                {
                    **s.describe(),
                    "bytes": s.size,
                    "documents": self.per_source_docs[i] if i < len(self.per_source_docs) else None,
                }
                for i, s in enumerate(self.sources)
            ],
            "documents": dict(self.docs.docs),
            "tokens": {s: w.tokens for s, w in self.writers.items()},
            "bytes": self.bytes_done,
            "split": {
                "rule": f"per document: blake2b-64(split_salt + NUL + first {SPLIT_HASH_CHARS} characters) "
                "/ 2^64 < val_fraction",
                "val_fraction": cfg.val_fraction,
                "split_salt": cfg.split_salt,
            } if not val_inputs else {
                "rule": "per input: every document of the inputs marked all_val (read first) goes to val, every "
                "other to train (no hash split, val_fraction ignored)",
                "val_split": cfg.val_split,
                "val_sources": val_inputs,
            },
            "document_boundary": "<|endoftext|> (eot_id) before every document",
            "max_tokens": cfg.max_tokens,
            **({"sample": self.sample.describe(self._kept_docs(), self.bytes_read)} if self.sample else {}),
            "bad_utf8_replaced": self.read.bad_utf8,
            "skipped_records": self.read.skipped,
            "doc_length_histogram": {
                "bins": "bin b counts documents of [2^(b-1), 2^b) tokens",
                "counts": self.docs.hist.tolist(),
                "max": self.docs.max_len,
            },
            "shards": self.writers["train"].shards + self.writers["val"].shards,
            "elapsed_s": round(elapsed, 3),
        }
        write_json(self.out / shardfmt.MANIFEST, manifest, fsync=True)
        (self.out / STATE).unlink(missing_ok=True)
        for old in self.out.glob(".prepare_tail_*.npz"):
            old.unlink()
        if cfg.histogram:
            plot_histogram(manifest, self.out / HISTOGRAM_PNG)
        if cfg.progress:
            print(summary(manifest, self.out))
        return manifest


def _usable_cores() -> int:
    """Cores this process may run on (a container's or taskset's limit, not the machine's count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def _progress(enabled: bool, total: int | None, initial: int):
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        unit="B",
        unit_scale=True,
        desc="prepare",
        disable=not enabled,
        smoothing=0.1,
        dynamic_ncols=True,
    )
