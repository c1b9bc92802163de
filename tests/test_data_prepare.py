"""`gptforge data prepare`: exact tokens, deterministic split, workers, bounded memory, resume, budget, errors."""

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from gptforge.cli import main
from gptforge.data import prepare as prep
from gptforge.data.prepare import PrepareConfig, is_validation, prepare
from gptforge.data.shards import MANIFEST, list_shards, read_header, read_shard
from gptforge.errors import GptforgeError
from gptforge.tokenizer import load_tokenizer, train_bpe


def _tokens(out, split):
    return np.concatenate([read_shard(p) for p in list_shards(out, split)])


def _shard_bytes(out):
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.bin"))}


@pytest.fixture(scope="module")
def corpus(data_dir):
    """tinyshakespeare + wikitext (2.4 MB), paragraphs as documents."""
    return [str(data_dir / "pretrain/tinyshakespeare.txt"), str(data_dir / "pretrain/wikitext2-raw-test.txt")]


def test_shards_hold_eot_joined_documents_split_by_stable_hash(data_dir, tmp_path):
    path = data_dir / "pretrain/tinystories-sample.txt"
    m = prepare(
        PrepareConfig(
            [str(path)],
            str(tmp_path),
            separator="blank",
            val_fraction=0.2,
            workers=1,
            shard_tokens=4000,
            progress=False,
        )
    )
    gpt2 = load_tokenizer("gpt2")
    docs = [d.strip() for d in path.read_text(encoding="utf-8").split("\n\n") if d.strip()]
    expect = {"train": [], "val": []}
    for d in docs:
        expect["val" if is_validation(d, 0.2) else "train"] += [50256] + gpt2.encode(d)
    for split in ("train", "val"):
        assert _tokens(tmp_path, split).tolist() == expect[split]
    assert m["documents"]["val"] == sum(is_validation(d, 0.2) for d in docs) > 0
    assert m["tokens"] == {s: len(v) for s, v in expect.items()}
    # Fixed shard size, uint16 headers, checksums of the files.
    train = [s for s in m["shards"] if s["split"] == "train"]
    assert all(s["tokens"] == 4000 for s in train[:-1]) and 0 < train[-1]["tokens"] <= 4000
    for s in m["shards"]:
        assert read_header(tmp_path / s["name"]) == (np.dtype("<u2"), s["tokens"])
        assert hashlib.sha256((tmp_path / s["name"]).read_bytes()).hexdigest() == s["sha256"]
    assert m["tokenizer"]["hash"] == gpt2.content_hash() and m["dtype"] == "uint16"
    assert m["sources"][0]["documents"] == len(docs) and m["bytes"] == path.stat().st_size
    assert (tmp_path / "doc_lengths.png").stat().st_size > 1000
    assert sum(m["doc_length_histogram"]["counts"]) == len(docs)


def test_one_and_two_workers_write_identical_shards(corpus, tmp_path):
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        prepare(
            PrepareConfig(
                corpus,
                str(out),
                separator="blank",
                workers=workers,
                shard_tokens=150_000,
                buffer_mb=1,
                progress=False,
            )
        )
        outs.append(out)
    a, b = (_shard_bytes(o) for o in outs)
    assert list(a) == [f"train_{i:05d}.bin" for i in range(5)] + ["val_00000.bin"]
    assert a == b


def test_small_buffer_bounds_text_in_flight_and_changes_nothing(corpus, tmp_path, monkeypatch):
    ref = tmp_path / "ref"
    prepare(PrepareConfig(corpus, str(ref), separator="file", val_fraction=0, workers=1, progress=False))
    seen = []
    real = prep.encode_batch

    def spy(texts, firsts, *split):
        seen.append(sum(len(t) for t in texts))
        return real(texts, firsts, *split)

    monkeypatch.setattr(prep, "encode_batch", spy)
    small = tmp_path / "small"
    buffer_mb = 0.1  # the corpus is 2.4 MB: 24× the buffer, and each file is one long document
    prepare(
        PrepareConfig(
            corpus,
            str(small),
            separator="file",
            val_fraction=0,
            workers=1,
            buffer_mb=buffer_mb,
            progress=False,
        )
    )
    # One worker keeps 2 batches in flight + 1 being read: each batch is at most buffer / 4 characters.
    assert len(seen) > 80 and max(seen) <= buffer_mb * 2**20 / 4
    assert _shard_bytes(small) == _shard_bytes(ref)


def test_peak_memory_does_not_grow_with_the_corpus(data_dir, tmp_path):
    """Python-side peak allocations (numpy included) for 1× and 4× the corpus with a 0.25 MB buffer."""
    import shutil
    import tracemalloc

    gpt2 = load_tokenizer("gpt2")
    names = ["tinyshakespeare.txt"]

    runs = []

    def peak(copies: int) -> int:
        runs.append(copies)
        files = []
        for r in range(copies):
            for n in names:
                files.append(tmp_path / f"{copies}_{r}_{n}")
                shutil.copyfile(data_dir / "pretrain" / n, files[-1])
        cfg = PrepareConfig(
            [str(f) for f in files],
            str(tmp_path / f"out{len(runs)}"),
            workers=1,
            shard_tokens=100_000,
            buffer_mb=0.25,
            progress=False,
            histogram=False,
        )
        tracemalloc.start()
        try:
            prepare(cfg, tokenizer=gpt2)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    peak(1)  # warm-up: first-time allocations (imports, caches)
    small, large = peak(1), peak(4)
    # 3 extra copies = 3.3 MB more text (1.0 MB of uint16 tokens): holding either would show here.
    assert large < small + 600_000, (small, large)


def _wait_for_checkpointed_shard(out, proc, timeout: float = 120.0) -> bool:
    """Poll until ``out``'s checkpoint lists a train shard that is on disk; False when ``proc`` ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            shards = json.loads((out / prep.STATE).read_text())["shards"]["train"]
        except (OSError, ValueError):  # not written yet (the file is replaced atomically, never torn)
            shards = []
        if shards and all((out / s["name"]).is_file() for s in shards):
            return True
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    pytest.fail(f"no checkpointed shard in {out} after {timeout:.0f}s")


def test_killed_prepare_resumes_from_last_checkpoint_with_identical_bytes(data_dir, tmp_path):
    """SIGKILL `gptforge data prepare` from outside just after its first checkpointed shard, then rerun it."""
    sources = []
    (tmp_path / "src").mkdir()
    for i in range(3):  # 7.2 MB, ~1.9M tokens in ~460 shards: the run lasts long after its first shard
        for name in ("tinyshakespeare.txt", "wikitext2-raw-test.txt"):
            copy = shutil.copyfile(data_dir / "pretrain" / name, tmp_path / "src" / f"{i}_{name}")
            sources.append(str(copy))
    opts = ["--text-sep", "blank", "--shard-tokens", "4000", "--val-fraction", "0.05", "--buffer-mb", "0.5",
            "--no-progress"]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    assert main(["data", "prepare", *sources, *opts, "--workers", "1", "--out", str(ref)]) == 0
    want = json.loads((ref / MANIFEST).read_text())
    n_train = sum(s["split"] == "train" for s in want["shards"])
    assert n_train > 400

    argv = [sys.executable, "-m", "gptforge", "data", "prepare", *sources, *opts, "--workers", "1"]
    proc = subprocess.Popen([*argv, "--out", str(cut)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    saw_shard = _wait_for_checkpointed_shard(cut, proc)
    proc.kill()
    stderr = proc.communicate(timeout=60)[1].decode(errors="replace")
    killed_mid_run = saw_shard and proc.returncode == -signal.SIGKILL and not (cut / MANIFEST).exists()
    if killed_mid_run:
        state = json.loads((cut / prep.STATE).read_text())
        assert 0 < len(state["shards"]["train"]) < n_train and 0 < state["pieces_done"]
        for s in state["shards"]["train"] + state["shards"]["val"]:  # checkpointed shards are final already
            assert (cut / s["name"]).read_bytes() == (ref / s["name"]).read_bytes()

    # the rerun resumes from the checkpoint, with 2 workers: still the same bytes
    assert main(["data", "prepare", *sources, *opts, "--workers", "2", "--out", str(cut)]) == 0
    assert _shard_bytes(cut) == _shard_bytes(ref)
    got = json.loads((cut / MANIFEST).read_text())
    for key in ("tokens", "documents", "sources", "shards", "bytes", "doc_length_histogram"):
        assert got[key] == want[key], key
    assert not list(cut.glob(".prepare*")) and not list(cut.glob(".*.tmp"))
    assert killed_mid_run, f"the run was not killed mid-run (exit {proc.returncode}): {stderr[-2000:]}"


def test_max_tokens_budget_is_exact(corpus, tmp_path):
    m = prepare(
        PrepareConfig(
            corpus,
            str(tmp_path),
            separator="blank",
            max_tokens=123_457,
            workers=1,
            shard_tokens=50_000,
            progress=False,
        )
    )
    assert m["tokens"]["train"] + m["tokens"]["val"] == 123_457
    assert len(_tokens(tmp_path, "train")) + len(_tokens(tmp_path, "val")) == 123_457


def test_rerun_skips_and_tokenizer_mismatch_is_a_clear_error(data_dir, tmp_path, capsys):
    src = [str(data_dir / "pretrain/tinystories-5.txt")]
    cfg = dict(separator="<|endoftext|>", val_fraction=0.3, workers=1)
    prepare(PrepareConfig(src, str(tmp_path), **cfg))
    mtime = (tmp_path / "train_00000.bin").stat().st_mtime_ns
    prepare(PrepareConfig(src, str(tmp_path), **cfg))
    assert "already prepared" in capsys.readouterr().out
    assert (tmp_path / "train_00000.bin").stat().st_mtime_ns == mtime
    bpe = train_bpe([(data_dir / "pretrain/the-verdict.txt").read_text()], vocab_size=300)
    with pytest.raises(GptforgeError, match="made with tokenizer 'gpt2'.*--overwrite"):
        prepare(PrepareConfig(src, str(tmp_path), **cfg), tokenizer=bpe)
    m = prepare(PrepareConfig(src, str(tmp_path), overwrite=True, progress=False, **cfg), tokenizer=bpe)
    assert m["tokenizer"]["vocab_size"] == 300 and _tokens(tmp_path, "train").max() < 300


def test_bad_inputs_are_clear_errors(data_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    with pytest.raises(GptforgeError, match="no text in the inputs"):
        prepare(PrepareConfig([str(empty)], str(tmp_path / "a"), workers=1, progress=False))
    with pytest.raises(GptforgeError, match="no document fell into the validation split.*--text-sep blank"):
        prepare(
            PrepareConfig(
                [str(data_dir / "pretrain/the-verdict.txt")],
                str(tmp_path / "b"),
                separator="file",
                workers=1,
                progress=False,
            )
        )
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "oops"}\n')
    assert main(["data", "prepare", str(bad), "--out", str(tmp_path / "c"), "--workers", "1"]) == 2
    assert (
        main(
            [
                "data",
                "prepare",
                str(bad),
                "--out",
                str(tmp_path / "d"),
                "--workers",
                "1",
                "--skip-bad",
                "--val-fraction",
                "0",
                "--no-progress",
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "d" / MANIFEST).read_text())["skipped_records"] == 1
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "train_00000.bin").write_bytes(b"x")
    with pytest.raises(GptforgeError, match="already holds shards"):
        prepare(PrepareConfig([str(bad)], str(tmp_path / "e"), workers=1, skip_bad=True, progress=False))


def test_tokenizer_without_tiktoken_form_is_prepared_through_hf(data_dir, tmp_path, prefix_space_bpe):
    """A BPE whose pre-tokenization tiktoken cannot reproduce (prefix space) goes through HF tokenizers."""
    tok = prefix_space_bpe
    assert prep.encoder_payload(tok)[0] == "hf"
    path = data_dir / "pretrain/tinystories-5.txt"
    prepare(
        PrepareConfig([str(path)], str(tmp_path), val_fraction=0, workers=1, progress=False), tokenizer=tok
    )
    docs = [d.strip() for d in path.read_text(encoding="utf-8").split("<|endoftext|>") if d.strip()]
    assert _tokens(tmp_path, "train").tolist() == [i for d in docs for i in [0] + tok.encode(d)]
