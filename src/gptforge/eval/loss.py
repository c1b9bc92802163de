"""Held-out loss, perplexity and bits-per-byte, for one checkpoint or a series of them.

The evaluated text is one token stream, exactly as training sees it: a prepared split's shards concatenated in
order, or raw text/jsonl files read and tokenized as ``gptforge data prepare`` does (end-of-text before every
document, all concatenated). The stream ``[start, start + max_tokens)`` is
cut into consecutive windows of ``seq_len + 1`` tokens that overlap by one, so every token after the first is
predicted exactly once, with as much context as training gives it. Evaluating per-document padded windows
instead (seed 000's pitfall) reports a different, misleading number.

Bits-per-byte compares models with different tokenizers: the summed loss (nats → bits) of all non-special
target tokens divided by the UTF-8 bytes those tokens decode to. Bytes are counted exactly per token from the
tokenizer's vocabulary (special tokens such as end-of-text have no bytes and are left out of both sums).

The standard error ``loss_se`` treats the windows as the sampled units (:func:`weighted_mean_se`): the loss is
the token-weighted mean of the per-window mean losses, and its SE is estimated from their spread. Windows cut
from the same document are somewhat correlated, so the SE is, if anything, a little optimistic.
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gptforge.charts import save_figure
from gptforge.errors import GptforgeError
from gptforge.io import write_json  # noqa: F401  (re-exported for callers of the old name)
from gptforge.precision import pick_device, resolve_precision
from gptforge.tokenizer import BPETokenizer, TiktokenTokenizer, Tokenizer

MAX_LOGITS_PER_BATCH = 2**27
_DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


# ---- the token stream ----------------------------------------------------------------------------------------


class TokenStream:
    """A read-only concatenation of token arrays (memory-mapped shards or an in-memory array)."""

    def __init__(self, arrays: list[np.ndarray], description: str):
        self.arrays = [a for a in arrays if len(a)]
        self.offsets = np.cumsum([0] + [len(a) for a in self.arrays])
        self.description = description

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def slice(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` as an int64 array, across array boundaries."""
        parts = []
        for i, arr in enumerate(self.arrays):
            lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
            if hi <= start or lo >= stop:
                continue
            parts.append(np.asarray(arr[max(start, lo) - lo : min(stop, hi) - lo], dtype=np.int64))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def shard_stream(directory: str | Path, split: str = "val", vocab_size: int | None = None
                 ) -> tuple[TokenStream, dict]:
    """The ``split`` shards of a prepared dataset as one stream, plus its manifest (``{}`` when absent).

    Every shard is verified up front (:func:`gptforge.data.shards.verify_shard`: the manifest's sha256, and
    token ids below ``vocab_size`` when given); results are cached per process."""
    from gptforge.data.shards import (
        MANIFEST,
        list_shards,
        read_manifest,
        read_shard,
        shard_checksums,
        verify_shard,
    )

    directory = Path(directory)
    paths = list_shards(directory, split)
    manifest = read_manifest(directory) if (directory / MANIFEST).is_file() else {}
    checksums = shard_checksums(directory, split, paths)
    for p in paths:
        verify_shard(p, checksums.get(p.name), vocab_size)
    return TokenStream([read_shard(p) for p in paths], f"{directory} ({split}, {len(paths)} shards)"), manifest


# Raw text is read in pieces of at most TEXT_PIECE_CHARS characters (cut where GPT-2's pre-tokenizer splits
# anyway, so the ids do not depend on it; 256 Ki keeps a hard cut in a huge whitespace run below the ~1 M
# characters at which tiktoken's regex fails), tokenized TEXT_BATCH_CHARS at a time, kept in blocks of
# TEXT_BLOCK_TOKENS.
TEXT_PIECE_CHARS = 1 << 18
TEXT_BATCH_CHARS = 1 << 22
TEXT_BLOCK_TOKENS = 1 << 24


def text_stream(files: list[str | Path], tokenizer: Tokenizer, text_field: str = "text",
                separator: str | None = None) -> TokenStream:
    """Raw text/jsonl/parquet files tokenized exactly as ``gptforge data prepare`` does: documents found by the
    same readers (``separator``: None = auto-detect for .txt), an end-of-text token before every document,
    all concatenated.

    Reading and tokenizing go in bounded pieces with prepare's own readers and encoder, and the ids are kept
    as compact arrays (uint16 when the vocabulary fits, else uint32): memory is 2–4 bytes per token plus a
    few MB, whatever the file or line length. The whole input is tokenized (its length bounds
    ``--start``/``--tokens``)."""
    import sys

    from gptforge.data.shards import token_dtype
    from gptforge.data.sources import ReadStats, expand_sources
    from gptforge.data.workers import _init_local_encoder, encode_batch, encoder_payload

    for f in files:
        if not Path(f).exists():
            raise GptforgeError(f"data file not found: {f}")
    sources = expand_sources([str(f) for f in files], separator, text_field)
    stats = ReadStats()
    dtype = token_dtype(tokenizer.vocab_size)
    _init_local_encoder(tokenizer, encoder_payload(tokenizer), dtype)

    def batches():
        texts, firsts, chars = [], [], 0
        for src in sources:
            for piece in src.pieces(stats, TEXT_PIECE_CHARS):
                if texts and chars + len(piece.text) > TEXT_BATCH_CHARS:
                    yield texts, np.array(firsts, dtype=bool)
                    texts, firsts, chars = [], [], 0
                texts.append(piece.text)
                firsts.append(piece.first)
                chars += len(piece.text)
        if texts:
            yield texts, np.array(firsts, dtype=bool)

    blocks: list[np.ndarray] = []
    pending: list[np.ndarray] = []
    pending_tokens = 0
    for texts, firsts in batches():
        ids = encode_batch(texts, firsts)[0]
        pending.append(ids)
        pending_tokens += len(ids)
        if pending_tokens >= TEXT_BLOCK_TOKENS:
            blocks.append(np.concatenate(pending))
            pending, pending_tokens = [], 0
    if pending:
        blocks.append(np.concatenate(pending))
    if not blocks:
        raise GptforgeError(f"no documents in {', '.join(map(str, files))}")
    if stats.bad_utf8:
        print(f"gptforge: {', '.join(map(str, files))}: {stats.bad_utf8:,} invalid UTF-8 sequences replaced "
              "with U+FFFD", file=sys.stderr)
    return TokenStream(blocks, ", ".join(map(str, files)))


def is_prepared_dir(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (any(path.glob("*_*.bin")) or (path / "manifest.json").is_file())


# ---- bytes per token ---------------------------------------------------------------------------------------


def token_byte_lengths(tokenizer: Tokenizer, size: int | None = None) -> np.ndarray:
    """UTF-8 byte length of every token id (0 for special tokens and ids beyond the vocabulary)."""
    n = max(size or 0, tokenizer.vocab_size)
    lengths = np.zeros(n, dtype=np.int64)
    specials = set(tokenizer.special_tokens.values())
    if isinstance(tokenizer, TiktokenTokenizer):
        for i in range(tokenizer.vocab_size):
            if i not in specials:
                lengths[i] = len(tokenizer._enc.decode_single_token_bytes(i))
    elif isinstance(tokenizer, BPETokenizer) and _is_byte_level(tokenizer):
        # Byte-level BPE pieces use one printable character per byte.
        for i in range(tokenizer.vocab_size):
            piece = tokenizer._tok.id_to_token(i)
            if i not in specials and piece is not None:
                lengths[i] = len(piece)
    else:
        for i in range(tokenizer.vocab_size):
            if i not in specials:
                lengths[i] = len(tokenizer.decode([i]).encode("utf-8"))
    return lengths


def _is_byte_level(tokenizer: BPETokenizer) -> bool:
    decoder = json.loads(tokenizer._tok.to_str()).get("decoder") or {}
    return decoder.get("type") == "ByteLevel"


# ---- evaluation --------------------------------------------------------------------------------------------


def weighted_mean_se(values, weights) -> float | None:
    """Standard error of the weighted mean ``Σ w·v / Σ w`` of per-window values (``None`` below 2 windows).

    The ratio-estimator (cluster-sampling) formula ``sqrt(n/(n-1) · Σ w²(v - mean)²) / Σ w``; with equal
    weights it is exactly ``std(v, ddof=1) / sqrt(n)``. ``gptforge eval loss`` uses it on per-window mean losses,
    ``gptforge compare`` on per-window paired differences.
    """
    v = np.asarray(values, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    n = len(v)
    if n < 2 or w.sum() <= 0:
        return None
    mean = float((w * v).sum() / w.sum())
    return float(math.sqrt(n / (n - 1) * float((w**2 * (v - mean) ** 2).sum())) / w.sum())



def token_nll(model, input_ids: torch.Tensor, targets: torch.Tensor, autocast=None, **forward_kwargs
              ) -> torch.Tensor:
    """Per-target negative log-likelihood in nats, ``(B·T,)`` float64; ignored targets (-100) give 0.

    The one LM-loss computation for evaluation: pretrain's validation, SFT's validation and ``eval loss``.
    """
    from gptforge.model import IGNORE_INDEX

    with autocast if autocast is not None else torch.autocast(input_ids.device.type, enabled=False):
        logits, _ = model(input_ids, **forward_kwargs)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="none").double()


@torch.no_grad()
def mean_lm_loss(model, batches: list, autocast=None, dist_info=None) -> float:
    """Mean loss per valid target over ``batches`` (this process's share: ``(input_ids, targets, kwargs)``).

    Under ``torchrun`` the sums are reduced over the processes, and every process runs the same number of
    forward passes (extra ones weighted 0), so sharded (FSDP) models never wait on each other.
    """
    from gptforge.model import IGNORE_INDEX
    from gptforge.train.distributed import all_reduce_sum

    device = next(model.parameters()).device
    passes = len(batches)
    if dist_info is not None and dist_info.enabled:
        import torch.distributed as dist

        n = torch.tensor([passes], device=device)
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
        passes = int(n.item())
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    for i in range(passes):
        if i < len(batches):
            input_ids, targets, kwargs = batches[i]
        else:  # a padding pass: one ignored target
            input_ids = torch.zeros(1, 1, dtype=torch.long, device=device)
            targets, kwargs = torch.full_like(input_ids, IGNORE_INDEX), {}
        nll = token_nll(model, input_ids.to(device), targets.to(device), autocast, **kwargs)
        sums[0] += nll.sum()
        sums[1] += (targets != IGNORE_INDEX).sum()
    model.train(was_training)
    if dist_info is not None:
        all_reduce_sum(sums, dist_info)
    return float(sums[0] / sums[1]) if sums[1] > 0 else float("nan")


@torch.no_grad()
def loss_on_stream(model, stream: TokenStream, seq_len: int | None = None, start: int = 0,
                   max_tokens: int | None = None, batch_size: int = 8, byte_lengths: np.ndarray | None = None,
                   dtype: str = "auto", show_progress: bool = True, desc: str = "eval loss",
                   per_window: bool = False) -> dict:
    """Loss over tokens ``[start, start + max_tokens)`` of ``stream``; see the module docstring.

    The result always has ``loss_se`` (standard error over windows); ``per_window=True`` adds
    ``window_losses`` (each window's mean loss, in stream order) and ``window_tokens`` (its target count), the
    paired samples ``gptforge compare`` needs."""
    from gptforge.checkpoint import unwrap

    bare = unwrap(model)
    seq_len = seq_len or bare.config.block_size
    if seq_len > bare.config.block_size:
        raise GptforgeError(f"--seq-len {seq_len} exceeds the model's context {bare.config.block_size}")
    total = len(stream)
    if start < 0 or start >= total:
        raise GptforgeError(f"--start {start:,} outside the {total:,} tokens of {stream.description}")
    stop = total if max_tokens is None else min(total, start + max_tokens)
    if max_tokens is not None and start + max_tokens > total:
        raise GptforgeError(f"{stream.description} has {total:,} tokens; cannot take {max_tokens:,} from "
                            f"position {start:,}; lower --tokens or --start")
    n_targets = stop - start - 1
    if n_targets < 1:
        raise GptforgeError(f"need at least 2 tokens to evaluate, got {stop - start}")
    device = next(bare.parameters()).device
    precision = resolve_precision(_DTYPE_NAMES.get(dtype, dtype), device)
    vocab = bare.config.vocab_size
    rows = max(1, min(batch_size, MAX_LOGITS_PER_BATCH // (seq_len * vocab)))
    window_starts = list(range(start, stop - 1, seq_len))
    was_training = bare.training
    bare.eval()

    nats = 0.0  # all targets
    window_nats: list[float] = []  # per window, in stream order
    window_tokens: list[int] = []
    nats_text = 0.0  # targets with bytes (for bits-per-byte)
    n_bytes = 0
    bar = None
    if show_progress:
        from tqdm import tqdm

        bar = tqdm(total=n_targets, desc=desc, unit="tok", unit_scale=True, leave=False)
    t0 = time.perf_counter()
    for b in range(0, len(window_starts), rows):
        group = window_starts[b : b + rows]
        windows = [stream.slice(s, min(s + seq_len + 1, stop)) for s in group]
        # A final short window goes in a batch of its own so every row has the same length.
        full = [w for w in windows if len(w) == len(windows[0])]
        for batch in (full, [w for w in windows if len(w) != len(windows[0])]):
            if not batch:
                continue
            data = torch.from_numpy(np.stack(batch)).to(device)
            x, y = data[:, :-1], data[:, 1:]
            if int(data.max()) >= vocab:
                raise GptforgeError(f"token id {int(data.max())} in {stream.description} is outside the model's "
                                    f"vocabulary ({vocab}); the data was prepared with a different tokenizer")
            ce = token_nll(bare, x, y, precision.autocast())
            nats += float(ce.sum())
            window_nats.extend(ce.reshape(y.shape).sum(dim=1).tolist())
            window_tokens.extend([y.shape[1]] * y.shape[0])
            if byte_lengths is not None:
                yb = torch.from_numpy(byte_lengths).to(device)[y.reshape(-1)]
                nats_text += float(ce[yb > 0].sum())
                n_bytes += int(yb.sum())
            if bar:
                bar.update(y.numel())
    if bar:
        bar.close()
    if was_training:
        bare.train()
    seconds = time.perf_counter() - t0
    loss = nats / n_targets
    counts = np.array(window_tokens, dtype=np.float64)
    means = np.array(window_nats, dtype=np.float64) / counts
    result = {
        "precision": precision.describe, "loss": loss, "loss_se": weighted_mean_se(means, counts),
        "perplexity": math.exp(min(loss, 700.0)), "tokens": n_targets, "start": start,
        "stop": stop, "seq_len": seq_len, "windows": len(window_starts), "seconds": seconds,
        "tokens_per_second": n_targets / max(seconds, 1e-9), "data": stream.description,
    }
    if per_window:
        result["window_losses"] = means.tolist()
        result["window_tokens"] = window_tokens
    if byte_lengths is not None and n_bytes > 0:
        result["bits_per_byte"] = nats_text / math.log(2) / n_bytes
        result["bytes"] = n_bytes
    return result


def evaluate_loss(checkpoint_or_model, data, tokenizer: Tokenizer | None = None, split: str = "val",
                  start: int = 0, max_tokens: int | None = None, seq_len: int | None = None, batch_size: int = 8,
                  device: str | None = None, dtype: str = "auto", text_field: str = "text",
                  separator: str | None = None, show_progress: bool = True, _stream_cache: dict | None = None,
                  per_window: bool = False) -> dict:
    """Loss, perplexity and bits-per-byte of a model on held-out data.

    ``checkpoint_or_model``: a checkpoint path (any form ``load_model`` accepts) or a :class:`GPT`.
    ``data``: a prepared dataset directory (its ``split`` shards), a text/jsonl/parquet file or a list of them
    (documents split by ``separator`` as in ``data prepare``), or a :class:`TokenStream`. ``tokenizer`` defaults to the checkpoint's; it is needed for raw text and for
    bits-per-byte. Returns ``{"loss", "loss_se", "perplexity", "bits_per_byte", "tokens", ...}``; with
    ``per_window=True`` also the per-window losses (see :func:`loss_on_stream`).
    """
    meta: dict = {}
    if isinstance(checkpoint_or_model, (str, Path)):
        from gptforge.checkpoint import load_model

        model, ckpt_tok, meta = load_model(checkpoint_or_model, device=device or _default_device())
        tokenizer = tokenizer or ckpt_tok
    else:
        model = checkpoint_or_model
        if device is not None:
            model.to(device)
    cache_key = tokenizer.content_hash() if tokenizer is not None else ""
    if _stream_cache is not None and cache_key in _stream_cache:
        stream, manifest = _stream_cache[cache_key]
    else:
        stream, manifest = _stream_for(data, tokenizer, split, text_field, separator, model.config.vocab_size)
        if _stream_cache is not None:
            _stream_cache[cache_key] = (stream, manifest)
    _check_tokenizer(manifest, tokenizer, stream, data if isinstance(data, (str, Path)) else None)
    byte_lengths = token_byte_lengths(tokenizer, model.config.vocab_size) if tokenizer is not None else None
    result = loss_on_stream(model, stream, seq_len=seq_len, start=start, max_tokens=max_tokens,
                            batch_size=batch_size, byte_lengths=byte_lengths, dtype=dtype,
                            show_progress=show_progress, per_window=per_window)
    if meta:
        result["checkpoint"] = meta.get("path")
        result["step"] = checkpoint_step(Path(meta["path"]))
    return result


def _default_device() -> str:
    return str(pick_device("auto"))


def _stream_for(data, tokenizer, split, text_field, separator=None, vocab_size: int | None = None
                ) -> tuple[TokenStream, dict]:
    if isinstance(data, TokenStream):
        return data, {}
    files = [data] if isinstance(data, (str, Path)) else list(data)
    if len(files) == 1 and is_prepared_dir(files[0]):
        return shard_stream(files[0], split, vocab_size=vocab_size)
    for f in files:
        if Path(f).is_dir():
            raise GptforgeError(f"{f} is a directory without shards; pass a prepared dataset directory "
                                "(from `gptforge data prepare`) or text/jsonl files")
    if tokenizer is None:
        raise GptforgeError("raw text needs a tokenizer: the checkpoint has none, pass --tokenizer")
    return text_stream(files, tokenizer, text_field, separator), {}


def _check_tokenizer(manifest: dict, tokenizer: Tokenizer | None, stream: TokenStream, directory=None) -> None:
    """Refuse shards prepared with a tokenizer other than the model's (when the manifest says which).

    A model tokenizer that only extends the data's (special tokens appended, as ``gptforge sft`` does) is fine:
    when the manifest's hash differs, the saved data tokenizer and the model's must decode a sample of the
    shards to the same text.
    """
    info = manifest.get("tokenizer") if isinstance(manifest, dict) else None
    if not isinstance(info, dict) or tokenizer is None:
        return
    expected = info.get("hash")
    if not expected or expected == tokenizer.content_hash():
        return
    saved = Path(directory) / info.get("path", "tokenizer") if directory is not None else None
    if saved is not None and saved.is_dir():
        from gptforge.tokenizer import load_tokenizer

        data_tok = load_tokenizer(saved)
        sample = stream.slice(0, min(len(stream), 4096)).tolist()
        if tokenizer.vocab_size >= data_tok.vocab_size and data_tok.decode(sample) == tokenizer.decode(sample):
            return
    raise GptforgeError(f"{stream.description} was prepared with tokenizer {info.get('name')!r} "
                        f"(hash {expected}), the model uses {tokenizer.name!r} (hash {tokenizer.content_hash()});"
                        " evaluate on data prepared with the model's tokenizer")


# ---- several checkpoints ----------------------------------------------------------------------------------


def checkpoint_step(path: Path) -> int | None:
    """Training step of a checkpoint directory (``state.json`` or the ``step_NNNNNNN`` name)."""
    state = path / "state.json"
    if state.is_file():
        try:
            step = json.loads(state.read_text(encoding="utf-8")).get("step")
            if isinstance(step, int):
                return step
        except json.JSONDecodeError:
            pass
    m = re.search(r"step_(\d+)", path.name)
    return int(m.group(1)) if m else None


def expand_checkpoints(paths: list[str | Path]) -> list[Path]:
    """Concrete checkpoint directories for ``paths`` (run dirs, step dirs, ``latest``/``best`` pointers),
    de-duplicated and ordered by step; entries that are not checkpoints (stray files) are skipped."""
    from gptforge.checkpoint import resolve_checkpoint

    found: dict[Path, None] = {}
    for p in paths:
        p = Path(p)
        if p.is_file() and p.name not in ("latest", "best"):
            continue
        if p.name.endswith(".tmp") or p.name.startswith("."):
            continue  # a checkpoint being written
        found[resolve_checkpoint(p).resolve()] = None
    if not found:
        raise GptforgeError(f"no checkpoints among: {', '.join(map(str, paths))}")
    return sorted(found, key=lambda d: (checkpoint_step(d) is None, checkpoint_step(d) or 0, str(d)))


def evaluate_checkpoints(paths: list[str | Path], data, **kwargs) -> dict:
    """Evaluate every checkpoint on the same tokens; returns ``{"results": [...], "best": index}``."""
    checkpoints = expand_checkpoints(paths)
    streams: dict[str, tuple[TokenStream, dict]] = {}  # raw text is tokenized once per tokenizer, not once per checkpoint
    results = []
    for i, ckpt in enumerate(checkpoints):
        res = evaluate_loss(ckpt, data, _stream_cache=streams, **kwargs)
        res["name"] = ckpt.name
        results.append(res)
        print(f"[{i + 1}/{len(checkpoints)}] {ckpt.name}: loss {res['loss']:.4f}"
              + (f", bpb {res['bits_per_byte']:.4f}" if "bits_per_byte" in res else ""), flush=True)
    best = min(range(len(results)), key=lambda i: results[i]["loss"])
    for i, r in enumerate(results):
        r["best"] = i == best
    return {"results": results, "best": best}


def format_table(results: list[dict]) -> str:
    """A Markdown table of checkpoint results; the best (lowest loss) row is marked with ``*``.

    The loss column is ``loss ± 1.96·SE`` (a normal 95% interval over windows; ``–`` for a single window)."""
    lines = ["| checkpoint | step | loss ± 1.96·SE | perplexity | bits/byte | tokens |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        bpb = f"{r['bits_per_byte']:.4f}" if "bits_per_byte" in r else "–"
        mark = " *" if r.get("best") else ""
        step = r.get("step") if r.get("step") is not None else "–"
        se = r.get("loss_se")
        loss = f"{r['loss']:.4f} ± {1.96 * se:.4f}" if se is not None else f"{r['loss']:.4f} ± –"
        lines.append(f"| {r.get('name', r.get('checkpoint', 'model'))}{mark} | {step} | {loss} | "
                     f"{r['perplexity']:.2f} | {bpb} | {r['tokens']:,} |")
    return "\n".join(lines)


def plot_losses(results: list[dict], path: str | Path) -> Path:
    """Loss per checkpoint (x = step when known), the best marked; written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    have_steps = all(r.get("step") is not None for r in results)
    xs = [r["step"] for r in results] if have_steps else list(range(len(results)))
    ys = [r["loss"] for r in results]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(xs, ys, marker="o", label="held-out loss")
    best = min(range(len(ys)), key=ys.__getitem__)
    ax.scatter([xs[best]], [ys[best]], s=160, facecolors="none", edgecolors="red", linewidths=2,
               label=f"best: {results[best].get('name', best)} ({ys[best]:.4f})", zorder=3)
    ax.set_xlabel("step" if have_steps else "checkpoint")
    if not have_steps:
        ax.set_xticks(xs, [r.get("name", str(i)) for i, r in enumerate(results)], rotation=30, ha="right")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(f"held-out loss on {results[0]['tokens']:,} tokens")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)
