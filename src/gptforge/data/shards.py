"""Token shard files: a fixed 256-byte header, then raw little-endian token ids.

Header layout (little-endian): magic ``b"GPTFSHRD"`` (8 bytes), format version (uint32), bytes per token
(uint32: 2 for uint16, 4 for uint32), token count (uint64), zero padding to 256 bytes. Shards are named
``{split}_{index:05d}.bin`` and read with ``numpy.memmap``; ``manifest.json`` beside them describes the corpus
and records each shard's sha256, which readers check once per process before they use a shard
(:func:`verify_shard`).
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import numpy as np

from gptforge.errors import GptforgeError
from gptforge.io import atomic_write_bytes, read_json, sha256_file

MAGIC = b"GPTFSHRD"
VERSION = 1
HEADER_BYTES = 256
_HEADER = struct.Struct("<8sIIQ")
MANIFEST = "manifest.json"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab ≤ 65,536), else uint32."""
    return np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<u4")


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:05d}.bin"


def write_shard(path: str | Path, tokens: np.ndarray, dtype: np.dtype) -> None:
    """Write ``tokens`` with a header to ``path`` atomically (temp file, fsync, rename)."""
    path = Path(path)
    arr = np.ascontiguousarray(tokens, dtype=dtype)
    data = bytearray(HEADER_BYTES + arr.nbytes)  # one copy of the tokens, as arr.tobytes() would make
    _HEADER.pack_into(data, 0, MAGIC, VERSION, arr.dtype.itemsize, arr.size)
    data[HEADER_BYTES:] = arr.data.cast("B")
    atomic_write_bytes(path, data, fsync=True)


def read_header(path: str | Path) -> tuple[np.dtype, int]:
    """(dtype, token count) of a shard; a clear error for files that are not shards or are truncated."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except OSError as e:
        raise GptforgeError(f"cannot read shard {path}: {e}") from None
    if len(raw) < _HEADER.size:
        raise GptforgeError(f"{path} is not a gptforge shard (file too short)")
    magic, version, itemsize, count = _HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise GptforgeError(f"{path} is not a gptforge shard (bad magic); prepare data with `gptforge data prepare`")
    if version != VERSION:
        raise GptforgeError(f"{path}: shard format version {version}, this gptforge reads version {VERSION}")
    if itemsize not in (2, 4):
        raise GptforgeError(f"{path}: invalid token width {itemsize}")
    expected = HEADER_BYTES + itemsize * count
    if path.stat().st_size != expected:
        raise GptforgeError(f"{path} is truncated or corrupt: {path.stat().st_size} bytes, header says {expected}")
    return np.dtype("<u2" if itemsize == 2 else "<u4"), count


def read_shard(path: str | Path) -> np.memmap:
    """Memory-map a shard's tokens (read-only)."""
    dtype, count = read_header(path)
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(count,))


def list_shards(directory: str | Path, split: str) -> list[Path]:
    """Shards of ``split`` in order; a clear error when there are none."""
    directory = Path(directory)
    shards = sorted(directory.glob(f"{split}_*.bin"))
    if not shards:
        raise GptforgeError(f"no {split} shards in {directory}; run `gptforge data prepare ... --out {directory}`")
    return shards


def read_manifest(directory: str | Path) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise GptforgeError(f"{path} not found: {directory} is not a prepared dataset")
    return read_json(path, "dataset manifest")


# ---- integrity ----------------------------------------------------------------------------------------------

# (resolved path, size, mtime_ns) -> (sha256 of the whole file, largest token id): each shard is read once per
# process however many loaders, validation slices and eval streams open it; a rewritten file gets a new key.
_VERIFIED: dict[tuple[str, int, int], tuple[str, int]] = {}
_SCAN_BLOCK = 16 << 20


def _scan_shard(path: Path, dtype: np.dtype) -> tuple[str, int]:
    """(sha256 of the file, largest token id) in one sequential read."""
    h = hashlib.sha256()
    top = -1
    with open(path, "rb") as f:
        h.update(f.read(HEADER_BYTES))
        # a multiple of both token widths, no larger than the shard (zeroing a big buffer costs time too)
        buf = bytearray(min(_SCAN_BLOCK, max(4, (path.stat().st_size - HEADER_BYTES + 3) // 4 * 4)))
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
            if n >= dtype.itemsize:
                top = max(top, int(np.frombuffer(buf, dtype=dtype, count=n // dtype.itemsize).max()))
    return h.hexdigest(), top


def verify_shard(path: str | Path, expected_sha256: str | None, vocab_size: int | None = None) -> int:
    """Check a shard before it is used; returns its largest token id (-1 when empty).

    Checks the header and file size (:func:`read_header`), the sha256 when ``expected_sha256`` is given (from
    the manifest) and, with ``vocab_size``, that every id fits the model's vocabulary. The file is read once
    per process: results are cached by (resolved path, size, mtime_ns).
    """
    path = Path(path)
    dtype, _ = read_header(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _VERIFIED:
        try:
            _VERIFIED[key] = _scan_shard(path, dtype)
        except OSError as e:
            raise GptforgeError(f"cannot read shard {path}: {e.strerror or e}") from None
    actual, top = _VERIFIED[key]
    if expected_sha256 is not None and actual != expected_sha256:
        raise GptforgeError(
            f"shard {path} is corrupted: sha256 {actual}, the manifest records {expected_sha256}; "
            f"re-run `gptforge data prepare ... --out {path.parent} --overwrite` (same inputs and options) "
            "or copy the directory again")
    if vocab_size is not None and top >= vocab_size:
        raise GptforgeError(
            f"shard {path} holds token id {top} but the model's vocabulary has only {vocab_size:,} tokens "
            "(tokenizer mismatch): prepare the data with the model's tokenizer "
            "(`gptforge data prepare ... --tokenizer <the model's tokenizer>`) "
            "or train with a matching vocab_size")
    return top


def shard_checksums(directory: str | Path, split: str, paths: list[Path]) -> dict[str, str]:
    """``{shard name: sha256}`` of ``split`` from ``manifest.json``; ``{}`` without a manifest or shard list.

    A shard the manifest lists but ``paths`` lacks (an incomplete copy) is an error.
    """
    directory = Path(directory)
    if not (directory / MANIFEST).is_file():
        return {}
    listed = read_manifest(directory).get("shards")
    if not isinstance(listed, list):
        return {}
    sums = {s["name"]: s.get("sha256") for s in listed if isinstance(s, dict) and s.get("split") == split
            and "name" in s}
    missing = sorted(set(sums) - {p.name for p in paths})
    if missing:
        raise GptforgeError(
            f"{directory / MANIFEST} lists {len(sums)} {split} shards but {missing[0]}"
            f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''} is missing from {directory}: "
            "copy the directory again or re-run `gptforge data prepare ... --overwrite`")
    return {name: sha for name, sha in sums.items() if isinstance(sha, str)}


class ShardWriter:
    """Accumulates one split's tokens and writes full shards of exactly ``shard_tokens`` tokens."""

    def __init__(self, out: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out, self.split, self.dtype, self.shard_tokens = out, split, dtype, shard_tokens
        self.chunks: list[np.ndarray] = []
        self.pending = 0
        self.shards: list[dict] = []
        self.tokens = 0  # all tokens appended, written or pending

    def append(self, tokens: np.ndarray) -> bool:
        """Add tokens; returns True when at least one shard was written."""
        if tokens.size == 0:
            return False
        self.chunks.append(tokens)
        self.pending += tokens.size
        self.tokens += tokens.size
        wrote = False
        while self.pending >= self.shard_tokens:
            buf = np.concatenate(self.chunks)
            self._write(buf[: self.shard_tokens])
            rest = buf[self.shard_tokens :]
            self.chunks, self.pending = ([rest] if rest.size else []), rest.size
            wrote = True
        return wrote

    def tail(self) -> np.ndarray:
        return np.concatenate(self.chunks) if self.chunks else np.empty(0, dtype=self.dtype)

    def restore(self, shards: list[dict], tail: np.ndarray) -> None:
        self.shards = list(shards)
        self.chunks = [tail] if tail.size else []
        self.pending = tail.size
        self.tokens = sum(s["tokens"] for s in shards) + tail.size

    def finish(self) -> None:
        if self.pending:
            self._write(self.tail())
            self.chunks, self.pending = [], 0

    def _write(self, tokens: np.ndarray) -> None:
        name = shard_name(self.split, len(self.shards))
        path = self.out / name
        write_shard(path, tokens, self.dtype)
        self.shards.append(
            {"name": name, "split": self.split, "tokens": int(tokens.size), "sha256": sha256_file(path)}
        )
