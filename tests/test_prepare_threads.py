"""`data prepare` tokenizes on threads of its own process; any number of them writes the same bytes."""

import json
import os
import threading

import numpy as np
import pytest

from gptforge.data import prepare as prep
from gptforge.data.prepare import PrepareConfig, prepare
from gptforge.data.shards import list_shards, read_shard
from gptforge.errors import GptforgeError
from gptforge.io import sha256_file
from gptforge.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def corpus(data_dir):
    """tinyshakespeare + wikitext (2.4 MB), paragraphs as documents."""
    return [str(data_dir / "pretrain/tinyshakespeare.txt"), str(data_dir / "pretrain/wikitext2-raw-test.txt")]


def _shard_bytes(out):
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.bin"))}


def _manifest(out) -> dict:
    m = json.loads((out / "manifest.json").read_text())
    m.pop("elapsed_s")  # the only field that may differ between runs
    return m


def test_one_two_and_three_workers_write_identical_shards_and_manifests(corpus, tmp_path):
    """Many batches (0.5 MB buffer), many shards, both splits, a budget ending mid-document."""
    outs = []
    for workers in (1, 2, 3):
        out = tmp_path / f"w{workers}"
        prepare(PrepareConfig(corpus, str(out), separator="blank", workers=workers, val_fraction=0.05,
                              shard_tokens=40_000, max_tokens=500_000, buffer_mb=0.5, progress=False,
                              histogram=False))
        outs.append(out)
    ref = _shard_bytes(outs[0])
    assert len(ref) == 13 and sum(name.startswith("val_") for name in ref) == 1  # 12 train shards + 1 val shard
    for out in outs[1:]:
        assert _shard_bytes(out) == ref
        assert _manifest(out) == _manifest(outs[0])
    m = _manifest(outs[0])
    assert m["tokens"]["train"] + m["tokens"]["val"] == 500_000
    assert all(sha256_file(outs[0] / s["name"]) == s["sha256"] for s in m["shards"])


def test_val_source_batches_keep_their_split_on_threads(data_dir, tmp_path):
    """--val-source documents go to val whichever thread tokenizes them: 1 and 3 workers agree with encode()."""
    train, val = data_dir / "pretrain/tinyshakespeare.txt", data_dir / "pretrain/tinystories-sample.txt"
    gpt2 = load_tokenizer("gpt2")
    for workers in (1, 3):
        out = tmp_path / f"w{workers}"
        prepare(PrepareConfig([str(train)], str(out), separator="blank", val_sources=[str(val)], workers=workers,
                              buffer_mb=0.2, progress=False, histogram=False))
        docs = [d.strip() for d in val.read_text(encoding="utf-8").split("\n\n") if d.strip()]
        got = np.concatenate([read_shard(p) for p in list_shards(out, "val")]).tolist()
        assert got == [i for d in docs for i in [gpt2.eot_id] + gpt2.encode(d)]
    assert _shard_bytes(tmp_path / "w1") == _shard_bytes(tmp_path / "w3")


def test_tokenizing_runs_on_threads_of_this_process_which_end_with_the_run(corpus, tmp_path, monkeypatch):
    seen = []
    real = prep.encode_batch

    def spy(texts, firsts, *args):
        seen.append((threading.current_thread().name, os.getpid()))
        return real(texts, firsts, *args)

    monkeypatch.setattr(prep, "encode_batch", spy)
    before = threading.active_count()
    prepare(PrepareConfig(corpus, str(tmp_path), separator="blank", workers=3, buffer_mb=1, progress=False,
                          histogram=False))
    assert len(seen) > 10
    assert {pid for _, pid in seen} == {os.getpid()}
    assert all(name.startswith("gptforge-tokenize") for name, _ in seen)
    assert threading.active_count() == before


def test_an_error_in_a_tokenizing_thread_surfaces_and_stops_the_threads(corpus, tmp_path, monkeypatch):
    calls = []
    real = prep.encode_batch

    def failing(texts, firsts, *args):
        calls.append(1)
        if len(calls) == 3:
            raise GptforgeError("broken batch")
        return real(texts, firsts, *args)

    monkeypatch.setattr(prep, "encode_batch", failing)
    before = threading.active_count()
    with pytest.raises(GptforgeError, match="broken batch"):
        prepare(PrepareConfig(corpus, str(tmp_path), separator="blank", workers=2, buffer_mb=0.5, progress=False))
    assert threading.active_count() == before


def test_hf_tokenizer_on_threads_matches_its_own_encode(data_dir, tmp_path, prefix_space_bpe):
    """A BPE tiktoken cannot reproduce (prefix space) goes through HF tokenizers: 1 and 3 threads, same ids."""
    tok = prefix_space_bpe
    assert prep.encoder_payload(tok)[0] == "hf"
    path = data_dir / "pretrain/tinystories-sample.txt"
    for workers in (1, 3):
        prepare(PrepareConfig([str(path)], str(tmp_path / f"w{workers}"), separator="blank", val_fraction=0,
                              workers=workers, buffer_mb=0.05, progress=False, histogram=False), tokenizer=tok)
    docs = [d.strip() for d in path.read_text(encoding="utf-8").split("\n\n") if d.strip()]
    got = np.concatenate([read_shard(p) for p in list_shards(tmp_path / "w3", "train")]).tolist()
    assert got == [i for d in docs for i in [tok.eot_id] + tok.encode(d)]
    assert _shard_bytes(tmp_path / "w1") == _shard_bytes(tmp_path / "w3")


def test_histogram_is_a_png_of_the_document_lengths(data_dir, tmp_path):
    from PIL import Image

    m = prepare(PrepareConfig([str(data_dir / "pretrain/tinystories-sample.txt")], str(tmp_path),
                              separator="blank", val_fraction=0, workers=2, progress=False))
    with Image.open(tmp_path / "doc_lengths.png") as img:
        assert img.format == "PNG" and img.size == (800, 400)
        pixels = np.asarray(img.convert("RGB")).reshape(-1, 3)
    assert sum(m["doc_length_histogram"]["counts"]) == m["documents"]["train"]
    assert (pixels == [0x4C, 0x72, 0xB0]).all(axis=1).sum() > 10_000  # the bars


def test_encode_batch_joins_documents_into_one_call_with_the_ids_of_one_call_each():
    """Runs of whole documents go to tiktoken in one call; documents holding the end-of-text string (plain
    text there) or a lone surrogate, and continuation pieces, are encoded one by one: ids never change."""
    from gptforge.data.workers import encode_batch, plain_encoder

    gpt2 = load_tokenizer("gpt2")
    texts = ["Hello world.", "It's  2024;\n\nok", "a <|endoftext|> inside", "next doc", " continued here",
             "bad \ud800 surrogate", "last one", "tail piece", "<|endoftext|>"]
    firsts = np.array([True, True, True, True, False, True, True, False, True])
    enc = plain_encoder(gpt2, np.dtype("<u2"))
    calls = []
    joined = enc.encode_docs
    enc = enc._replace(encode_docs=lambda text: calls.append(text) or joined(text))
    ids, counts, vals = encode_batch(texts, firsts, 0.5, "salt", False, enc)
    want = [[gpt2.eot_id] * f + gpt2.encode(t) for t, f in zip(texts, firsts.tolist())]
    assert ids.tolist() == [i for w in want for i in w] and ids.dtype == np.dtype("<u2")
    assert counts.tolist() == [len(w) for w in want]
    assert vals.tolist() == [prep.is_validation(t, 0.5, "salt") for t, f in zip(texts, firsts) if f]
    assert calls == ["<|endoftext|>Hello world.<|endoftext|>It's  2024;\n\nok",  # two documents, one call
                     "<|endoftext|>next doc",
                     "<|endoftext|>bad \ud800 surrogate<|endoftext|>last one"]  # refused, then one by one
