"""Token shard files: a fixed 256-byte header, then raw little-endian token ids.

Header layout (little-endian): magic ``b"GPTFSHRD"`` (8 bytes), format version (uint32), bytes per token
(uint32: 2 for uint16, 4 for uint32), token count (uint64), zero padding to 256 bytes. Shards are named
``{split}_{index:05d}.bin`` and read with ``numpy.memmap``; ``manifest.json`` beside them describes the corpus.
"""

from __future__ import annotations

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
