"""The end of a ``data prepare`` run: its one-paragraph summary and the document-length histogram."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gptforge.charts import save_figure
from gptforge.data.prepare_state import HISTOGRAM_PNG


def summary(manifest: dict, out: Path) -> str:
    """One paragraph: tokens, documents, shards, throughput, warnings, where things went."""
    tok, docs = manifest["tokens"], manifest["documents"]
    total = tok["train"] + tok["val"]
    secs = max(manifest["elapsed_s"], 1e-9)
    n_train = sum(1 for s in manifest["shards"] if s["split"] == "train")
    n_val = len(manifest["shards"]) - n_train
    text = (
        f"prepared {total:,} tokens ({tok['train']:,} train / {tok['val']:,} val) from {docs['train'] + docs['val']:,} "
        f"documents ({docs['val']:,} val) and {manifest['bytes'] / 1e6:.1f} MB of text "
        f"({manifest['bytes'] / max(total, 1):.2f} bytes/token) with tokenizer {manifest['tokenizer']['name']} "
        f"(vocab {manifest['tokenizer']['vocab_size']:,}, {manifest['dtype']}) in {secs:.1f}s "
        f"({manifest['bytes'] / secs / 1e6:.1f} MB/s, {total / secs / 1e6:.2f}M tokens/s); "
        f"{n_train} train + {n_val} val shards in {out}"
    )
    if "sample" in manifest:
        smp = manifest["sample"]
        text += (f"; --sample-docs kept {smp['documents_kept']:,} documents of {smp['docs']:,} rows sampled from "
                 f"{smp['rows']:,} (seed {smp['seed']}, HF datasets' shuffle+select set, in file order)")
    if manifest["split"].get("val_sources"):
        text += f"; val = every document of {', '.join(map(str, manifest['split']['val_sources'][:3]))}"
    if manifest["bad_utf8_replaced"]:
        text += f"; {manifest['bad_utf8_replaced']:,} invalid UTF-8 sequences replaced with U+FFFD"
    if manifest["skipped_records"]:
        text += f"; {manifest['skipped_records']:,} bad records skipped"
    if (out / HISTOGRAM_PNG).exists():
        text += f"; document lengths: {out / HISTOGRAM_PNG}"
    return text + "."


def plot_histogram(manifest: dict, path: Path) -> None:
    """Document-length histogram (log2 bins) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = np.array(manifest["doc_length_histogram"]["counts"])
    nz = np.flatnonzero(counts)
    if nz.size == 0:
        return
    lo, hi = int(nz[0]), int(nz[-1])
    labels = [f"<{2**b:,}" if b > 0 else "0" for b in range(lo, hi + 1)]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(range(len(labels)), counts[lo : hi + 1], color="#4c72b0")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_xlabel("document length (tokens, log2 bins)")
    ax.set_ylabel("documents")
    docs = manifest["documents"]
    ax.set_title(f"{docs['train'] + docs['val']:,} documents, {sum(manifest['tokens'].values()):,} tokens")
    fig.tight_layout()
    save_figure(fig, path)
