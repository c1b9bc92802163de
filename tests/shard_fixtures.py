"""Prepared-shard directories built from the real offline text, for the loader and pretraining tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from gptforge.data.shards import token_dtype, write_shard


def write_dataset(out: Path, tokenizer, text: str, val_fraction: float = 0.1, train_shards: int = 2) -> Path:
    """Encode ``text``, split the tail off as val, write ``train_*``/``val_*`` shards, manifest and tokenizer."""
    out.mkdir(parents=True, exist_ok=True)
    ids = np.array(tokenizer.encode(text), dtype=np.int64)
    n_val = int(len(ids) * val_fraction)
    train, val = ids[: len(ids) - n_val], ids[len(ids) - n_val:]
    dtype = token_dtype(tokenizer.vocab_size)
    for i, part in enumerate(np.array_split(train, train_shards)):
        write_shard(out / f"train_{i:05d}.bin", part, dtype)
    write_shard(out / "val_00000.bin", val, dtype)
    tokenizer.save(out / "tokenizer")
    manifest = {"tokenizer": {"name": tokenizer.name, "hash": tokenizer.content_hash(),
                              "vocab_size": tokenizer.vocab_size},
                "splits": {"train": {"tokens": len(train)}, "val": {"tokens": len(val)}}}
    (out / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return out


def train_small_bpe(text: str, vocab_size: int = 512):
    """A byte-level BPE with ``<|endoftext|>``, trained on ``text`` in a second or two."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from gptforge.tokenizer import BPETokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text], trainer=trainer)
    return BPETokenizer(tok, name="shakespeare-bpe")


import pytest


@pytest.fixture(scope="session")
def shakespeare_text(data_dir) -> str:
    return (data_dir / "pretrain" / "tinyshakespeare.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def shakespeare_bpe(shakespeare_text):
    return train_small_bpe(shakespeare_text, 512)


@pytest.fixture(scope="session")
def shakespeare_shards(tmp_path_factory, shakespeare_bpe, shakespeare_text) -> Path:
    """tinyshakespeare in a 512-token BPE: two train shards, one val shard, tokenizer/ and manifest.json."""
    return write_dataset(tmp_path_factory.mktemp("shakespeare") / "shards", shakespeare_bpe, shakespeare_text)
