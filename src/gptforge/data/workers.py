"""The tokenizing workers of ``data prepare``: a process pool whose workers hold the encoder.

The encoder travels to the workers as a small payload (:func:`encoder_payload`) and is rebuilt there once;
:func:`encode_batch` turns a batch of texts into one token array per text, with the end-of-text token first.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time

import numpy as np

from gptforge.errors import GptforgeError

SPLIT_HASH_CHARS = 1024



def is_validation(text: str, val_fraction: float, salt: str = "gptforge") -> bool:
    """The stable per-document split: blake2b-64 of (salt, NUL, first 1,024 characters) / 2^64 < ``val_fraction``."""
    if val_fraction <= 0:
        return False
    data = f"{salt}\0{text[:SPLIT_HASH_CHARS]}".encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") / 2**64 < val_fraction


_ENCODER = None


# Exercises every branch of GPT-2's regex (contractions, letters, digits, punctuation, whitespace runs, non-ASCII).
_CHECK_TEXT = (
    "It's 2024; they'll say: \"Don't!\"  Numbers 3.14159 and 1,000,000\n\n\tTabs   and  spaces  \n"
    "naïve café Ünïcödé — 東京 🙂 ¿qué? I'm, we've, you're, he'd 12ab34 ...!!! end   "
)


def encoder_payload(tokenizer) -> tuple:
    """A picklable description of ``tokenizer`` from which a worker rebuilds a fast plain-text encoder."""
    from gptforge.tokenizer import BPETokenizer, TiktokenTokenizer

    if isinstance(tokenizer, TiktokenTokenizer):
        return ("tiktoken", tokenizer._ranks, dict(tokenizer.special_tokens), tokenizer.eot_id)
    if isinstance(tokenizer, BPETokenizer):
        ranks = tokenizer.tiktoken_ranks()
        if ranks is not None:  # same ids, several times faster than HF on long texts; double-checked here
            from gptforge.tokenizer import tiktoken_encoding

            enc = tiktoken_encoding(ranks, tokenizer.special_tokens)
            if enc.encode_ordinary(_CHECK_TEXT) == tokenizer.encode(_CHECK_TEXT):
                return ("tiktoken", ranks, dict(tokenizer.special_tokens), tokenizer.eot_id)
        return ("hf", tokenizer._tok.to_str(), tokenizer.name, tokenizer.eot_id)
    raise GptforgeError(f"cannot prepare data with a tokenizer of kind {tokenizer.kind!r}")


def _exit_with_parent(parent: int) -> None:
    """Workers blocked on the task queue never notice a killed parent; this thread ends them."""
    def watch():
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _init_worker(payload: tuple, dtype: str, parent: int | None = None) -> None:
    global _ENCODER
    if parent is not None:
        _exit_with_parent(parent)
    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if payload[0] == "tiktoken":
        from gptforge.tokenizer import tiktoken_encoding

        encode = _numpy_encoder(tiktoken_encoding(payload[1], payload[2]))
    else:
        from tokenizers import Tokenizer as HFTokenizer

        from gptforge.tokenizer import BPETokenizer

        tok = BPETokenizer(HFTokenizer.from_str(payload[1]), name=payload[2])
        encode = tok.encode  # special-token strings in the text stay plain text
    _ENCODER = (encode, payload[-1], np.dtype(dtype))


def _numpy_encoder(enc):
    """Plain-text tiktoken encoding straight into a numpy array (no Python list of ints)."""

    def encode(text: str) -> np.ndarray:
        try:
            return enc.encode_to_numpy(text, disallowed_special=())
        except UnicodeEncodeError:  # lone surrogates (e.g. from JSON escapes): replace them, as tiktoken does
            return enc.encode_to_numpy(
                text.encode("utf-16", "surrogatepass").decode("utf-16", "replace"), disallowed_special=()
            )

    return encode


def _init_local_encoder(tokenizer, payload: tuple, dtype: np.dtype) -> None:
    """In-process encoding (one worker): reuse GPT-2's already built tiktoken encoding."""
    global _ENCODER
    from gptforge.tokenizer import TiktokenTokenizer

    if isinstance(tokenizer, TiktokenTokenizer):
        _ENCODER = (_numpy_encoder(tokenizer._enc), tokenizer.eot_id, dtype)
    else:
        _init_worker(payload, dtype.str)


def encode_batch(
    texts: list[str],
    firsts: np.ndarray,
    val_fraction: float = 0.0,
    salt: str = "gptforge",
    all_val: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token ids of the pieces in order with an end-of-text before each document start, tokens per piece,
    and the split (True: val) of each document starting in the batch: by :func:`is_validation`, or every
    document with ``all_val`` (a batch of a --val-split/--val-source input: batches never mix inputs' roles)."""
    encode, eot, dtype = _ENCODER
    eot_array = np.array([eot], dtype=dtype)
    parts = []
    counts = np.empty(len(texts), dtype=np.int64)
    doc_val = []
    for i, text in enumerate(texts):
        ids = encode(text)
        if firsts[i]:
            parts.append(eot_array)
            doc_val.append(all_val or is_validation(text, val_fraction, salt))
        parts.append(ids)
        counts[i] = len(ids) + int(firsts[i])
    out = np.concatenate(parts).astype(dtype, copy=False) if parts else np.empty(0, dtype=dtype)
    return out, counts, np.array(doc_val, dtype=bool)



def _worker_pool(workers: int, payload: tuple, dtype: np.dtype):
    """A process pool whose workers hold the encoder. Linux forks (fast start, the parent's tokenizer is
    inherited); elsewhere, or with GPTFORGE_MP_START=spawn, fresh interpreters. Workers start here, before
    any progress-bar thread exists."""
    import multiprocessing as mp
    import sys
    from concurrent.futures import ProcessPoolExecutor

    method = os.environ.get("GPTFORGE_MP_START") or ("fork" if sys.platform == "linux" else "spawn")
    pool = ProcessPoolExecutor(
        workers,
        mp_context=mp.get_context(method),
        initializer=_init_worker,
        initargs=(payload, dtype.str, os.getpid()),
    )
    pool.submit(int).result()  # launch the workers now
    return pool


