"""The tokenizing side of ``data prepare``: one plain-text encoder shared by N threads.

Both backends encode in Rust with the GIL released (tiktoken's ``CoreBPE``, HF ``tokenizers``' ``encode``),
so N threads tokenize on N cores inside one process: no worker processes to start, no copy of the vocabulary
per worker, no texts and token arrays pickled between processes, and the main thread reads and writes beside
them. :func:`encode_batch` turns a batch of texts into one token array, the end-of-text token before every
document start, plus the tokens per text and the split of every document. With tiktoken, a batch's documents
go to Rust in one call (joined by the end-of-text token), so a thread needs the GIL only between batches.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from gptforge.errors import GptforgeError
from gptforge.tokenizer import EOT, BPETokenizer, TiktokenTokenizer, tiktoken_encoding

SPLIT_HASH_CHARS = 1024


def is_validation(text: str, val_fraction: float, salt: str = "gptforge") -> bool:
    """The stable per-document split: blake2b-64 of (salt, NUL, first 1,024 characters) / 2^64 < ``val_fraction``."""
    if val_fraction <= 0:
        return False
    data = f"{salt}\0{text[:SPLIT_HASH_CHARS]}".encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") / 2**64 < val_fraction


# Exercises every branch of GPT-2's regex (contractions, letters, digits, punctuation, whitespace runs, non-ASCII).
_CHECK_TEXT = (
    "It's 2024; they'll say: \"Don't!\"  Numbers 3.14159 and 1,000,000\n\n\tTabs   and  spaces  \n"
    "naïve café Ünïcödé — 東京 🙂 ¿qué? I'm, we've, you're, he'd 12ab34 ...!!! end   "
)


class PlainEncoder(NamedTuple):
    """What the tokenizing threads share: ``encode(text)`` gives the ids of ``text`` with special-token strings
    kept as plain text; ``eot`` goes before every document; ``dtype`` is the shards' token type.
    ``encode_docs`` (tiktoken only) encodes many documents in one call: a text where each document follows
    the end-of-text string, which alone becomes the ``eot`` id (other special-token strings stay text)."""

    encode: Callable[[str], np.ndarray]
    eot: int
    dtype: np.dtype
    encode_docs: Callable[[str], np.ndarray] | None = None


def encoder_payload(tokenizer) -> tuple:
    """The backend that encodes ``tokenizer``'s plain text fastest: ``("tiktoken", Encoding)`` or
    ``("hf", tokenizer)``."""
    if isinstance(tokenizer, TiktokenTokenizer):
        return ("tiktoken", tokenizer._enc)
    if isinstance(tokenizer, BPETokenizer):
        ranks = tokenizer.tiktoken_ranks()
        if ranks is not None:  # same ids, several times faster than HF on long texts; double-checked here
            enc = tiktoken_encoding(ranks, tokenizer.special_tokens)
            if enc.encode_ordinary(_CHECK_TEXT) == tokenizer.encode(_CHECK_TEXT):
                return ("tiktoken", enc)
        return ("hf", tokenizer)
    raise GptforgeError(f"cannot prepare data with a tokenizer of kind {tokenizer.kind!r}")


def plain_encoder(tokenizer, dtype: np.dtype, payload: tuple | None = None) -> PlainEncoder:
    """The encoder the tokenizing threads share (``payload``: :func:`encoder_payload`'s answer, if at hand)."""
    kind, backend = payload or encoder_payload(tokenizer)
    if kind != "tiktoken":
        return PlainEncoder(_hf_numpy(backend), tokenizer.eot_id, np.dtype(dtype))
    eot_only = {EOT}

    def encode_docs(text: str) -> np.ndarray:
        return backend.encode_to_numpy(text, allowed_special=eot_only, disallowed_special=())

    return PlainEncoder(_tiktoken_numpy(backend), tokenizer.eot_id, np.dtype(dtype), encode_docs)


def _tiktoken_numpy(enc) -> Callable[[str], np.ndarray]:
    """Plain-text tiktoken encoding straight into a numpy array (no Python list of ints)."""

    def encode(text: str) -> np.ndarray:
        try:
            return enc.encode_to_numpy(text, disallowed_special=())
        except UnicodeEncodeError:  # lone surrogates (e.g. from JSON escapes): replace them, as tiktoken does
            return enc.encode_to_numpy(
                text.encode("utf-16", "surrogatepass").decode("utf-16", "replace"), disallowed_special=()
            )

    return encode


def _hf_numpy(tokenizer) -> Callable[[str], np.ndarray]:
    def encode(text: str) -> np.ndarray:
        return np.asarray(tokenizer.encode(text), dtype=np.uint32)  # special-token strings stay plain text

    return encode


_LOCAL: PlainEncoder | None = None


def _init_local_encoder(tokenizer, payload: tuple | None, dtype: np.dtype) -> None:
    """Set the encoder :func:`encode_batch` uses when it is given none (single-threaded callers)."""
    global _LOCAL
    _LOCAL = plain_encoder(tokenizer, dtype, payload)


def encode_batch(
    texts: list[str],
    firsts: np.ndarray,
    val_fraction: float = 0.0,
    salt: str = "gptforge",
    all_val: bool = False,
    encoder: PlainEncoder | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token ids of the pieces in order with an end-of-text before each document start, tokens per piece,
    and the split (True: val) of each document starting in the batch: by :func:`is_validation`, or every
    document with ``all_val`` (a batch of a --val-split/--val-source input: batches never mix inputs' roles).
    Safe to call from several threads at once with the same ``encoder`` (default: :func:`_init_local_encoder`'s)."""
    encoder = encoder or _LOCAL
    firsts = np.asarray(firsts, dtype=bool).tolist()
    parts: list[np.ndarray] = []
    counts = np.empty(len(texts), dtype=np.int64)
    # Document starts that may share one call: the end-of-text string inside a document must stay plain text.
    joinable = [encoder.encode_docs is not None and f and EOT not in t for t, f in zip(texts, firsts)]
    i = 0
    while i < len(texts):
        j = i + 1
        if joinable[i]:  # a run of documents (or their first pieces): one call
            while j < len(texts) and joinable[j]:
                j += 1
            if _encode_joined(texts[i:j], encoder, parts, counts[i:j]):
                i = j
                continue
        for k in range(i, j):
            ids = encoder.encode(texts[k])
            if firsts[k]:
                parts.append(np.array([encoder.eot], dtype=np.uint32))
            parts.append(ids)
            counts[k] = len(ids) + firsts[k]
        i = j
    doc_val = [all_val or is_validation(t, val_fraction, salt) for t, f in zip(texts, firsts) if f]
    # ids fit dtype: it was chosen from the vocabulary size (shards.token_dtype)
    out = np.concatenate(parts, dtype=encoder.dtype, casting="unsafe") if parts else np.empty(0, encoder.dtype)
    return out, counts, np.array(doc_val, dtype=bool)


def _encode_joined(docs: list[str], encoder: PlainEncoder, parts: list, counts: np.ndarray) -> bool:
    """Encode ``docs`` (none holds the end-of-text string) in one call as EOT + doc + EOT + doc ...: the same ids
    as one call per document, since tiktoken encodes the text between special tokens separately, without
    the per-call cost, and with the GIL released for the whole run. False, with nothing added, for a lone
    surrogate in a document: the run then goes one by one."""
    try:
        ids = encoder.encode_docs(EOT + EOT.join(docs))
    except UnicodeEncodeError:
        return False
    starts = np.flatnonzero(ids == encoder.eot)
    if starts.size != len(docs):  # cannot happen (the eot id is no mergeable rank); be safe, not wrong
        return False
    counts[:] = np.diff(starts, append=ids.size)
    parts.append(ids)
    return True


def tokenizer_threads(workers: int):
    """The pool that runs :func:`encode_batch`: ``workers`` threads beside the main thread, which reads the
    inputs and writes the shards."""
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(workers, thread_name_prefix="gptforge-tokenize")
