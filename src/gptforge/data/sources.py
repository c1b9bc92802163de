"""Text sources for tokenizer training and corpus preparation: .txt, .jsonl/.json, .parquet, globs, hub datasets.

Every source streams *pieces*: ``Piece(text, first, nbytes, where)``. A document is one or more consecutive
pieces (``first`` marks its start). Long documents are cut into pieces of at most ``piece_chars`` characters,
only at points where GPT-2's pre-tokenization regex splits anyway (``x\\nY`` or ``x Y``), so cutting never
changes the token ids: the output does not depend on the piece size. Memory stays bounded by the piece size
whatever the file or document size.

Invalid UTF-8 is replaced with U+FFFD and counted. Malformed records (bad JSON, missing field, null value)
raise a ``GptforgeError`` naming file:line (or the parquet row), unless ``skip_bad`` is set, which counts them.
"""

from __future__ import annotations

import codecs
import glob as globlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from gptforge.errors import GptforgeError

TEXT_SUFFIXES = {".txt", ".text", ".md"}
JSONL_SUFFIXES = {".jsonl", ".ndjson"}
JSON_SUFFIXES = {".json"}
PARQUET_SUFFIXES = {".parquet"}
DEFAULT_PIECE_CHARS = 1 << 18  # tiktoken fails on ~1M-character whitespace runs; cuts never change the ids
MIN_PIECE_CHARS = 4096
_READ_BLOCK = 1 << 20
# A cut is safe right before " Y" after a non-space, or right after "x\n" before a non-space (see module doc).
_SAFE_CUT = re.compile(r"(?<=\S)(?= \S)|(?<=\S\n)(?=\S)")
_BLANK_LINE = re.compile(r"\n[ \t\r\f\v]*\n\s*")


@dataclass(slots=True)
class Piece:
    """A slice of a document: ``first`` starts a new document; ``nbytes`` raw input bytes it consumed."""

    text: str
    first: bool
    nbytes: int
    where: str


@dataclass
class ReadStats:
    """Counters the readers fill while streaming (documents, bad UTF-8 sequences, skipped records)."""

    documents: int = 0
    # Rows as Hugging Face ``datasets`` counts them (the index ``--sample-docs`` samples): every non-blank .jsonl
    # line, .json element, .parquet row and hub record, empty or malformed ones included; a .txt document.
    rows: int = 0
    bad_utf8: int = 0
    skipped: int = 0
    empty_files: list[str] = field(default_factory=list)
    skipped_examples: list[str] = field(default_factory=list)

    def skip(self, message: str, skip_bad: bool) -> None:
        if not skip_bad:
            raise GptforgeError(
                f"{message}; fix or remove the record, or pass --skip-bad to skip such records"
            )
        self.skipped += 1
        if len(self.skipped_examples) < 5:
            self.skipped_examples.append(message)


class _Utf8Counter:
    """A decode error handler that replaces invalid bytes with U+FFFD and counts them."""

    def __init__(self):
        self.count = 0
        codecs.register_error("gptforge_count_replace", self)

    def __call__(self, err: UnicodeDecodeError):
        self.count += 1
        return "\ufffd", err.end


_UTF8 = _Utf8Counter()


def decode_utf8(raw: bytes, stats: ReadStats) -> str:
    """Decode bytes, replacing (and counting in ``stats``) invalid sequences."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        before = _UTF8.count
        text = raw.decode("utf-8", errors="gptforge_count_replace")
        stats.bad_utf8 += _UTF8.count - before
        return text


def safe_cut(text: str, limit: int) -> int:
    """The largest safe cut position in ``text[limit // 2 : limit]`` (``limit`` when there is none).

    Searched in growing tails ending at ``limit`` (the last safe point is nearly always close to it), so a cut
    costs O(distance to it), not O(limit). A tail misses only points at its first two characters (the
    regex cannot look behind the tail); any point it finds is larger, and when it finds none the next, longer
    tail sees them: the result is that of one search over the whole range."""
    lo = max(1, limit // 2)
    span = 4096
    while True:
        start = max(lo, limit - span)
        last = None
        for m in _SAFE_CUT.finditer(text[start : limit + 1]):
            if m.start() + start <= limit:
                last = m.start()
        if last is not None and last > 0:
            return start + last
        if start == lo:
            return limit
        span *= 16


def split_document(text: str, where: str, piece_chars: int, nbytes: int) -> Iterator[Piece]:
    """Cut one document into pieces at safe points; the bytes are attributed to the first piece."""
    first = True
    while len(text) > piece_chars:
        cut = safe_cut(text, piece_chars)
        yield Piece(text[:cut], first, nbytes if first else 0, where)
        text, first = text[cut:], False
    yield Piece(text, first, nbytes if first else 0, where)


# ---- sources -------------------------------------------------------------------------------------------------


@dataclass
class Source:
    """One input: a local file (txt/jsonl/json/parquet) or a hub dataset; ``describe()`` goes into the manifest."""

    kind: str  # txt | jsonl | json | parquet | hub
    path: str
    separator: str = "file"  # txt: file | blank | line | a literal string
    field: str = "text"  # jsonl/json/parquet/hub: the text field or column
    hub_config: str | None = None
    hub_split: str = "train"
    all_val: bool = False  # every document goes to the val shards (--val-split / --val-source)

    def describe(self) -> dict:
        d = {"kind": self.kind, "path": self.path}
        if self.kind == "txt":
            d["separator"] = self.separator
        else:
            d["field"] = self.field
        if self.kind == "hub":
            d.update(config=self.hub_config, split=self.hub_split)
        if self.all_val:  # only then: fingerprints of runs without it stay as they were
            d["all_val"] = True
        return d

    @property
    def size(self) -> int | None:
        """Input bytes when known (local files), for progress and ETA."""
        return None if self.kind == "hub" else os.path.getsize(self.path)

    def pieces(
        self, stats: ReadStats, piece_chars: int = DEFAULT_PIECE_CHARS, skip_bad: bool = False
    ) -> Iterator[Piece]:
        piece_chars = max(MIN_PIECE_CHARS, piece_chars)
        reader = {
            "txt": _txt_pieces,
            "jsonl": _jsonl_pieces,
            "json": _json_pieces,
            "parquet": _parquet_pieces,
            "hub": _hub_pieces,
        }[self.kind]
        return reader(self, stats, piece_chars, skip_bad)


def _decoded_blocks(path: str, stats: ReadStats) -> Iterator[tuple[str, int]]:
    """(text, raw bytes) blocks of a file, decoded incrementally (sequences split across blocks are kept)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="gptforge_count_replace")
    before = _UTF8.count
    with open(path, "rb") as f:
        while True:
            raw = f.read(_READ_BLOCK)
            text = decoder.decode(raw, final=not raw)
            stats.bad_utf8 += _UTF8.count - before
            before = _UTF8.count
            if text or raw:
                yield text, len(raw)
            if not raw:
                return


def _txt_pieces(src: Source, stats: ReadStats, piece_chars: int, skip_bad: bool) -> Iterator[Piece]:
    if src.separator == "file":
        yield from _whole_file_pieces(src, stats, piece_chars)
        return
    sep = src.separator
    pattern = (
        _BLANK_LINE
        if sep == "blank"
        else re.compile(r"\r?\n")
        if sep == "line"
        else re.compile(re.escape(sep))
    )
    state = {"index": 0, "pending": 0, "open": False}

    def where() -> str:
        return f"{src.path} document {state['index']}"

    def finish(part: str) -> Iterator[Piece]:
        if state["open"]:  # the rest of a long document whose head was already emitted
            state["open"] = False
            for p in split_document(part.rstrip(), where(), piece_chars, 0):
                if p.text:
                    yield Piece(p.text, False, 0, p.where)
            return
        text = part.strip()
        if not text:
            return
        state["index"] += 1
        stats.documents += 1
        stats.rows += 1
        yield from split_document(text, where(), piece_chars, state["pending"])
        state["pending"] = 0

    buf = ""
    for text, nbytes in _decoded_blocks(src.path, stats):
        buf += text
        state["pending"] += nbytes
        parts = pattern.split(buf)
        buf = parts.pop()
        for part in parts:
            if not state["open"]:  # what finish() does, inline for the common case: a document of one piece
                doc = part.strip()
                if not doc:
                    continue
                if len(doc) <= piece_chars:
                    state["index"] += 1
                    stats.documents += 1
                    stats.rows += 1
                    yield Piece(doc, True, state["pending"], where())
                    state["pending"] = 0
                    continue
            yield from finish(part)
        while len(buf) > 2 * piece_chars:  # an unfinished document this long: emit its head now
            if not state["open"]:
                buf = buf.lstrip()
                state["index"] += 1
                stats.documents += 1
                stats.rows += 1
            cut = safe_cut(buf, piece_chars)
            yield Piece(buf[:cut], not state["open"], state["pending"], where())
            state["pending"], state["open"], buf = 0, True, buf[cut:]
    yield from finish(buf)
    if state["index"] == 0:
        stats.empty_files.append(src.path)


def _whole_file_pieces(src: Source, stats: ReadStats, piece_chars: int) -> Iterator[Piece]:
    """The whole file is one document (e.g. tinyshakespeare), streamed in safe-cut pieces."""
    where = f"{src.path}"
    buf, pending, first = "", 0, True
    for text, nbytes in _decoded_blocks(src.path, stats):
        buf += text
        pending += nbytes
        while len(buf) > 2 * piece_chars:
            if first:
                stats.documents += 1
                stats.rows += 1
            cut = safe_cut(buf, piece_chars)
            yield Piece(buf[:cut], first, pending, where)
            buf, pending, first = buf[cut:], 0, False
    if first and not buf.strip():
        stats.empty_files.append(src.path)
        return
    if first:
        stats.documents += 1
        stats.rows += 1
    for p in split_document(buf, where, piece_chars, pending):
        yield Piece(p.text, first and p.first, p.nbytes, where)


def file_text_chunks(
    path: str | Path, stats: ReadStats, piece_chars: int = DEFAULT_PIECE_CHARS
) -> Iterator[tuple[str, int]]:
    """The exact decoded text of one file as consecutive ``(text, raw bytes)`` chunks of at most
    ``piece_chars`` characters, cut at safe points (module doc), so tokenizing chunk by chunk gives the ids
    of tokenizing the whole text. Unlike a ``txt`` source nothing is stripped, split into documents or
    dropped (a whitespace-only file comes back as it is). Invalid UTF-8 is replaced and counted in
    ``stats``; memory stays O(piece_chars + read block) whatever the line length."""
    piece_chars = max(MIN_PIECE_CHARS, piece_chars)
    buf, pending = "", 0
    for text, nbytes in _decoded_blocks(str(path), stats):
        buf += text
        pending += nbytes
        while len(buf) > 2 * piece_chars:
            cut = safe_cut(buf, piece_chars)
            yield buf[:cut], pending
            buf, pending = buf[cut:], 0
    for p in split_document(buf, str(path), piece_chars, pending):
        if p.text or p.nbytes:
            yield p.text, p.nbytes


def _record_text(record, src: Source, where: str, stats: ReadStats, skip_bad: bool) -> str | None:
    if not isinstance(record, dict):
        stats.skip(
            f"{where}: expected a JSON object with field {src.field!r}, got {type(record).__name__}", skip_bad
        )
        return None
    if src.field not in record:
        fields = ", ".join(list(record)[:10])
        stats.skip(
            f"{where}: record has no field {src.field!r} (fields: {fields}); choose one with --field",
            skip_bad,
        )
        return None
    text = record[src.field]
    if not isinstance(text, str):
        stats.skip(f"{where}: field {src.field!r} is {type(text).__name__}, not text", skip_bad)
        return None
    return text


def _jsonl_pieces(src: Source, stats: ReadStats, piece_chars: int, skip_bad: bool) -> Iterator[Piece]:
    any_text = False
    with open(src.path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = decode_utf8(raw, stats)
            if not line.strip():
                continue
            stats.rows += 1
            where = f"{src.path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                stats.skip(f"{where}: malformed JSON ({e.msg} at column {e.colno})", skip_bad)
                continue
            text = _record_text(record, src, where, stats, skip_bad)
            if not text:
                continue
            any_text = True
            stats.documents += 1
            yield from split_document(text, where, piece_chars, len(raw))
    if not any_text:
        stats.empty_files.append(src.path)


def _json_pieces(src: Source, stats: ReadStats, piece_chars: int, skip_bad: bool) -> Iterator[Piece]:
    """A JSON array of records (e.g. Alpaca files). Loaded whole: use .jsonl for large corpora."""
    raw = Path(src.path).read_bytes()
    try:
        records = json.loads(decode_utf8(raw, stats))
    except json.JSONDecodeError as e:
        raise GptforgeError(f"{src.path}:{e.lineno}: malformed JSON ({e.msg}); fix the file") from None
    if not isinstance(records, list):
        raise GptforgeError(
            f"{src.path}: expected a JSON array of records (for one record per line use .jsonl)"
        )
    per_record = len(raw) // max(1, len(records))
    any_text = False
    for i, record in enumerate(records):
        stats.rows += 1
        text = _record_text(record, src, f"{src.path} record {i}", stats, skip_bad)
        if not text:
            continue
        any_text = True
        stats.documents += 1
        yield from split_document(text, f"{src.path} record {i}", piece_chars, per_record)
    if not any_text:
        stats.empty_files.append(src.path)


def _parquet_pieces(src: Source, stats: ReadStats, piece_chars: int, skip_bad: bool) -> Iterator[Piece]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise GptforgeError("reading .parquet needs pyarrow: pip install 'gptforge[data]'") from None
    try:
        pf = pq.ParquetFile(src.path)
    except Exception as e:
        raise GptforgeError(f"cannot read parquet file {src.path}: {e}") from None
    columns = pf.schema_arrow.names
    if src.field not in columns:
        raise GptforgeError(
            f"{src.path}: no column {src.field!r} (columns: {', '.join(columns)}); choose one with --column"
        )
    rows = max(1, pf.metadata.num_rows)
    per_row = os.path.getsize(src.path) / rows
    row = 0
    any_text = False
    for batch in pf.iter_batches(columns=[src.field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            where = f"{src.path} row {row}"
            row += 1
            stats.rows += 1
            if not isinstance(text, str):
                stats.skip(
                    f"{where}: column {src.field!r} is {'null' if text is None else type(text).__name__}",
                    skip_bad,
                )
                continue
            if not text:
                continue
            any_text = True
            stats.documents += 1
            yield from split_document(text, where, piece_chars, int(per_row))
    if not any_text:
        stats.empty_files.append(src.path)


def _hub_pieces(src: Source, stats: ReadStats, piece_chars: int, skip_bad: bool) -> Iterator[Piece]:
    try:
        import datasets
    except ImportError:
        raise GptforgeError(
            "hub datasets need the `datasets` package: pip install 'gptforge[data]'"
        ) from None
    try:
        ds = datasets.load_dataset(src.path, name=src.hub_config, split=src.hub_split, streaming=True)
    except Exception as e:
        raise GptforgeError(
            f"cannot open hub dataset {src.path!r} (config {src.hub_config}, split "
            f"{src.hub_split}): {e}. Offline? Download it as .parquet/.jsonl and pass the files"
        ) from None
    for i, record in enumerate(ds):
        stats.rows += 1
        where = f"{src.path} record {i}"
        text = _record_text(record, src, where, stats, skip_bad)
        if not text:
            continue
        stats.documents += 1
        yield from split_document(text, where, piece_chars, len(text.encode("utf-8")))


# ---- resolving user arguments to sources ---------------------------------------------------------------------


def _kind_of(path: str) -> str | None:
    suffix = Path(path).suffix.lower()
    if suffix in TEXT_SUFFIXES or suffix == "":
        return "txt"
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in JSON_SUFFIXES:
        return "json"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    return None


def detect_separator(path: str | Path) -> str:
    """The document separator of a .txt file judged from its first MiB (see :func:`separator_rule`)."""
    return separator_rule(path)[0]


def separator_rule(path: str | Path) -> tuple[str, str]:
    """``(separator, why)`` for a .txt file judged from its first MiB: ``<|endoftext|>`` when it occurs; else
    ``blank`` when there are blank lines; else ``line`` when the file looks like one document per line (two or
    more lines, median length >= 200 characters: articles or records, not verse or prose lines); else ``file``
    (the whole file is one document). ``why`` names the rule and the documents counted in that first MiB."""
    with open(path, "rb") as f:
        head = f.read(1 << 20).decode("utf-8", errors="replace")
    if "<|endoftext|>" in head:
        return "<|endoftext|>", f"<|endoftext|> occurs ({head.count('<|endoftext|>') + 1} documents in the first MiB)"
    if _BLANK_LINE.search(head):
        n = len([d for d in _BLANK_LINE.split(head) if d.strip()])
        return "blank", f"blank lines separate paragraphs ({n} documents in the first MiB)"
    lines = [len(line) for line in head.split("\n") if line.strip()]
    if len(lines) >= 2 and sorted(lines)[len(lines) // 2] >= 200:
        return "line", (f"no blank lines and long lines (median {sorted(lines)[len(lines) // 2]} characters): one "
                        f"document per line ({len(lines)} documents in the first MiB)")
    return "file", "no blank lines, no <|endoftext|> and short lines: the whole file is one document"


def expand_sources(
    items: list[str],
    separator: str | None = None,
    field: str = "text",
    column: str | None = None,
    hub_config: str | None = None,
    hub_split: str = "train",
) -> list[Source]:
    """Turn paths, globs, registry names and hub ids into sources (globs sorted; order = document order).

    A registry name (``tinyshakespeare``, ``fineweb-edu``, ...) resolves to its local copy, or for hub
    datasets to the hub when no local copy exists; ``separator=None`` (or ``"auto"``) means the registry
    entry's separator for named datasets, else ``detect_separator`` for each .txt file. Hub datasets may
    carry their configuration and split: ``HuggingFaceFW/fineweb:sample-10BT:train``. ``hf:OWNER/NAME`` (or an ``OWNER/NAME`` that is not a
    local path) is a hub dataset streamed with ``datasets``.
    """
    if not items:
        raise GptforgeError(
            "no input given: pass text files (.txt/.jsonl/.json/.parquet), globs, or a dataset name"
        )
    sources: list[Source] = []
    for item in items:
        sources.extend(_expand_one(item, separator, field, column, hub_config, hub_split))
    return sources


def _expand_one(item, separator, field, column, hub_config, hub_split) -> list[Source]:
    from gptforge.data import registry

    def file_source(path: str, sep=None, fld=None) -> Source:
        kind = _kind_of(path)
        if kind is None:
            raise GptforgeError(
                f"{path}: unknown file type {Path(path).suffix!r} (use .txt, .jsonl, .json, .parquet)"
            )
        text_field = (column or field) if kind == "parquet" else field
        chosen = separator if separator not in (None, "auto") else sep
        if kind == "txt" and chosen in (None, "auto"):
            chosen = detect_separator(path)
        return Source(kind, path, separator=chosen or "file", field=fld or text_field)

    def hub_source(spec: str) -> Source:
        # OWNER/NAME[:CONFIG[:SPLIT]]; --hub-config / --hub-split fill what the spec leaves out.
        name, _, rest = spec.partition(":")
        config, _, split = rest.partition(":")
        return Source(
            "hub", name, field=column or field, hub_config=config or hub_config, hub_split=split or hub_split
        )

    if item.startswith("hf:"):
        return [hub_source(item[3:])]
    if os.path.isdir(item):
        files = sorted(
            p
            for p in globlib.glob(os.path.join(item, "**", "*"), recursive=True)
            if os.path.isfile(p) and _kind_of(p) and Path(p).suffix
        )
        if not files:
            raise GptforgeError(f"{item} is a directory without .txt/.jsonl/.json/.parquet files")
        return [file_source(p) for p in files]
    if os.path.isfile(item):
        return [file_source(item)]
    if globlib.has_magic(item):
        files = sorted(p for p in globlib.glob(item, recursive=True) if os.path.isfile(p))
        if not files:
            raise GptforgeError(f"the pattern {item!r} matches no files")
        return [file_source(p) for p in files]
    entry = registry.DATASETS.get(registry.ALIASES.get(item, item))
    if entry is not None:
        local = registry.find_local(entry)
        if local is not None:
            return [file_source(str(local), sep=entry.separator, fld=entry.text_field)]
        if entry.hub and entry.streamable:
            return [
                Source(
                    "hub",
                    entry.hub,
                    field=entry.text_field or "text",
                    hub_config=entry.hub_config,
                    hub_split=entry.hub_split,
                )
            ]
        return [file_source(str(registry.resolve(item)), sep=entry.separator, fld=entry.text_field)]
    if re.fullmatch(r"[\w.-]+/[\w.-]+(:[\w.-]+){0,2}", item) and not os.path.exists(item):
        return [hub_source(item)]
    raise GptforgeError(
        f"input not found: {item!r} is neither a file, a glob, a known dataset "
        f"({', '.join(registry.DATASETS)}) nor a hub id OWNER/NAME"
    )


def val_sources(
    train: list[Source],
    val_split: str | None = None,
    val_items: list[str] | None = None,
    **expand_args,
) -> list[Source]:
    """The sources whose every document goes to val: each hub source of ``train`` again with ``split=val_split``
    (``--val-split``), or the files ``val_items`` (``--val-source``, expanded like the inputs)."""
    if val_split is not None:
        local = [s.path for s in train if s.kind != "hub"]
        if local:
            raise GptforgeError(
                f"--val-split {val_split} takes a hub dataset's own split, but {local[0]} is a local file: "
                "pass the validation file(s) with --val-source FILE... instead"
            )
        same = [s.path for s in train if s.hub_split == val_split]
        if same:
            raise GptforgeError(
                f"--val-split {val_split} is the split the training documents of {same[0]} come from: "
                "name the dataset's validation split (e.g. validation or test)"
            )
        return [replace(s, hub_split=val_split, all_val=True) for s in train]
    if val_items:
        return [replace(s, all_val=True) for s in expand_sources(val_items, **expand_args)]
    return []


def iter_texts(
    sources: list[Source], stats: ReadStats, piece_chars: int = DEFAULT_PIECE_CHARS, skip_bad: bool = False
) -> Iterator[str]:
    """The pieces' texts of all sources in order (for tokenizer training)."""
    for src in sources:
        for piece in src.pieces(stats, piece_chars, skip_bad):
            yield piece.text
