"""``data prepare --sample-docs N --sample-seed S``: keep the rows Hugging Face ``datasets`` would keep.

``Dataset.shuffle(seed=S).select(range(N))`` keeps the rows ``np.random.default_rng(S).permutation(D)[:N]`` of a
dataset of D rows: ``datasets`` 5.2.0, ``arrow_dataset.py``, ``Dataset.shuffle`` sets
``generator = np.random.default_rng(seed)`` and passes ``permutation = generator.permutation(len(self))`` to
``self.select``. So prepare first counts the rows (a pass without tokenizing), then builds a boolean keep-mask
from the first N indices of that permutation, and writes the kept documents in source order: the same *set*
as HF's selection, in the file's order (the pretraining loader shuffles anyway).

A row is what ``datasets`` counts as one (:attr:`ReadStats.rows`): every non-blank .jsonl line, .json array
element, .parquet row and hub record, those with empty or missing text included (kept, they add no document);
for .txt files, a document as ``--text-sep`` cuts it.
"""

from __future__ import annotations

import numbers

import numpy as np

from gptforge.data.sources import ReadStats, Source, decode_utf8
from gptforge.errors import GptforgeError


def keep_mask(rows: int, n: int, seed: int) -> np.ndarray:
    """True for the ``n`` of ``rows`` rows that ``Dataset.shuffle(seed=seed).select(range(n))`` keeps."""
    if n > rows:
        raise GptforgeError(
            f"--sample-docs {n:,} is more than the {rows:,} documents (rows) of the inputs: pass at most "
            f"{rows:,}, or leave --sample-docs out to keep them all"
        )
    mask = np.zeros(rows, dtype=bool)
    mask[np.random.default_rng(seed).permutation(rows)[:n]] = True
    return mask


def count_rows(src: Source, skip_bad: bool = False) -> int:
    """Rows of one input, without tokenizing: parquet metadata, a line scan of .jsonl, the hub's split
    metadata when it has it; otherwise (.txt, .json, hub without metadata) one reading pass."""
    if src.kind == "parquet":
        try:
            import pyarrow.parquet as pq

            return int(pq.ParquetFile(src.path).metadata.num_rows)
        except ImportError:
            raise GptforgeError("reading .parquet needs pyarrow: pip install 'gptforge[data]'") from None
        except (OSError, ValueError) as e:  # pyarrow's ArrowIOError / ArrowInvalid
            raise GptforgeError(f"cannot read parquet file {src.path}: {e}") from None
    if src.kind == "jsonl":
        stats, n = ReadStats(), 0
        with open(src.path, "rb") as f:
            for raw in f:  # the reader's rule for a blank line (decoded, then stripped)
                n += bool(raw.strip()) and bool(decode_utf8(raw, stats).strip())
        return n
    if src.kind == "hub":
        n = _hub_rows(src)
        if n is not None:
            return n
    stats = ReadStats()
    for _ in src.pieces(stats, skip_bad=skip_bad):
        pass
    return stats.rows


def _hub_rows(src: Source) -> int | None:
    """The split's row count from the dataset's metadata (no download of the data), or None."""
    try:
        import datasets

        builder = datasets.load_dataset_builder(src.path, name=src.hub_config)
        info = (builder.info.splits or {}).get(src.hub_split)
        n = getattr(info, "num_examples", None)
    except Exception:
        return None
    return int(n) if isinstance(n, numbers.Integral) and n > 0 else None


class Sample:
    """The keep-mask over the rows of the sampled inputs, in order (inputs that go all to val are not sampled)."""

    def __init__(self, sources: list[Source], n: int, seed: int, skip_bad: bool = False, progress: bool = False):
        self.n, self.seed = n, seed
        self.counts: dict[int, int] = {}  # source index -> rows
        self.offsets: dict[int, int] = {}  # source index -> index of its first row in the mask
        total = 0
        for i, src in enumerate(sources):
            if src.all_val:
                continue
            if progress:
                print(f"--sample-docs: counting the rows of {src.path}", flush=True)
            self.offsets[i], self.counts[i] = total, count_rows(src, skip_bad)
            total += self.counts[i]
        self.rows = total
        self.mask = keep_mask(total, n, seed)

    def keeps(self, source: int, row: int) -> bool:
        """Whether row ``row`` (0-based) of input ``source`` is in the sample."""
        return row < self.counts[source] and bool(self.mask[self.offsets[source] + row])

    def check(self, source: int, src: Source, rows: int) -> None:
        """The reading pass must see the rows the count saw, or the mask would select other rows."""
        if rows != self.counts[source]:
            raise GptforgeError(
                f"{src.path}: read {rows:,} rows but counted {self.counts[source]:,} before (the input "
                "changed, or the hub's metadata is off): --sample-docs needs a stable input; download it as "
                ".parquet/.jsonl and pass the files, then rerun with --overwrite"
            )

    def describe(self, kept: int, bytes_read: int) -> dict:
        """The manifest's ``sample`` entry (``kept``: documents written; rows with empty text add none)."""
        return {
            "docs": self.n,
            "seed": self.seed,
            "rows": self.rows,
            "documents_kept": kept,
            "bytes_read": bytes_read,
            "rule": "the rows Hugging Face datasets' Dataset.shuffle(seed).select(range(docs)) keeps: "
            "np.random.default_rng(seed).permutation(rows)[:docs], written in source order",
        }
