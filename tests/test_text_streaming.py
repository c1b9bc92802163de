"""Raw text is read in bounded pieces: `tokenizer info --sample` and `eval loss` on raw text keep memory
flat on a huge single-line file, count exactly what encoding the whole text gives, and fail in one line on
bad paths."""

import json
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from gptforge.checkpoint import save_model
from gptforge.cli import main
from gptforge.commands.tokenizer import sample_stats
from gptforge.data.sources import _SAFE_CUT, MIN_PIECE_CHARS, ReadStats, file_text_chunks, safe_cut
from gptforge.eval.loss import text_stream
from gptforge.model import GPT, GPTConfig
from gptforge.tokenizer import load_tokenizer

MiB = 1 << 20

# Runs a gptforge command and reports its peak RSS growth over the fixed cost of the imports the commands
# need (torch, tiktoken, numpy, gptforge): VmHWM of this process's own address space (see _memprobe.py).
PROBE = r"""
import sys
def hwm():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")
import numpy, tiktoken, torch
import gptforge.commands.tokenizer, gptforge.eval.loss
from gptforge.cli import main
base = hwm()
rc = main(sys.argv[1:])
print("GROWTH", hwm() - base, file=sys.stderr)
sys.exit(rc)
"""


@pytest.fixture(scope="module")
def gpt2():
    return load_tokenizer("gpt2")


@pytest.fixture(scope="module")
def shakespeare_path(data_dir):
    return data_dir / "pretrain" / "tinyshakespeare.txt"


def probe(*args) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stderr.rsplit("GROWTH", 1)[1].split()[0])


# ---- exact counts ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("piece_chars", [MIN_PIECE_CHARS, 1 << 18])
def test_sample_count_equals_encoding_the_whole_text(gpt2, shakespeare_path, piece_chars):
    """Pieces are cut only where GPT-2's regex splits anyway, so the summed count is exact, whatever the piece
    size (4 Ki characters gives ~270 cuts in tinyshakespeare)."""
    raw = shakespeare_path.read_bytes()
    s = sample_stats(gpt2, shakespeare_path, piece_chars=piece_chars)
    assert s["tokens"] == len(gpt2.encode(raw.decode("utf-8"))) == 338_025
    assert s["bytes"] == len(raw)
    assert "invalid_utf8_replaced" not in s


def test_sample_count_is_exact_for_a_trained_bpe_and_on_one_long_line(shakespeare_bpe, shakespeare_text,
                                                                      tmp_path):
    path = tmp_path / "line.txt"
    text = shakespeare_text.replace("\n", " ") + " \r\n  trailing  \t"
    path.write_bytes(text.encode("utf-8"))
    s = sample_stats(shakespeare_bpe, path, piece_chars=MIN_PIECE_CHARS)
    assert s["tokens"] == len(shakespeare_bpe.encode(text))


def test_chunks_reassemble_the_file_byte_for_byte(tmp_path):
    rng = random.Random(0)
    cases = {
        "mixed": ("word " * 20_000 + "x\r\ny\n\n  z\t" * 3_000 + "end").encode(),
        "spaces": b" " * 50_000,  # whitespace only: kept, not dropped
        "empty": b"",
        "binary": bytes(rng.randrange(256) for _ in range(60_000)),
        "no_cut_point": b"a" * 30_000,
    }
    for name, raw in cases.items():
        path = tmp_path / f"{name}.txt"
        path.write_bytes(raw)
        stats = ReadStats()
        chunks = list(file_text_chunks(path, stats, MIN_PIECE_CHARS))
        assert "".join(t for t, _ in chunks) == raw.decode("utf-8", errors="replace"), name
        assert sum(n for _, n in chunks) == len(raw), name
        assert all(len(t) <= MIN_PIECE_CHARS for t, _ in chunks), name
        assert (stats.bad_utf8 > 0) == (name == "binary"), name


def _safe_cut_reference(text, limit):
    """The original single search over the whole window (safe_cut searches growing tails instead)."""
    lo = max(1, limit // 2)
    last = None
    for m in _SAFE_CUT.finditer(text[lo : limit + 1]):
        if m.start() + lo <= limit:
            last = m.start()
    return lo + last if last is not None and last > 0 else limit


def test_safe_cut_tail_search_matches_a_whole_window_search():
    rng = random.Random(0)
    for _ in range(300):
        alphabet = rng.choice(["ab \n", "a" * 60 + " \n\r", "a" * 3000 + " \n", "a\n\n  \t"])
        n = rng.choice([10, 300, 5000, 20_000, 70_000])
        text = "".join(rng.choices(alphabet, k=n + 3))
        limit = rng.randint(2, n)
        assert safe_cut(text, limit) == _safe_cut_reference(text, limit)
    for limit in (10_000, 262_144):  # a lone cut point at the first characters of a searched tail
        for offset in range(-2, 6):
            for pattern in ("a b", "a\nb"):
                chars = ["a"] * (limit + 10)
                at = limit - 4096 + offset
                chars[at : at + 3] = pattern
                text = "".join(chars)
                assert safe_cut(text, limit) == _safe_cut_reference(text, limit), (limit, offset, pattern)


def test_text_stream_keeps_compact_ids_equal_to_whole_file_encoding(gpt2, shakespeare_text, tmp_path):
    path = tmp_path / "line.txt"
    text = shakespeare_text.replace("\n", " ")
    path.write_text(text, encoding="utf-8")
    stream = text_stream([path], gpt2)
    assert all(a.dtype == np.uint16 for a in stream.arrays)
    assert stream.slice(0, len(stream)).tolist() == [gpt2.eot_id] + gpt2.encode(text)


def test_a_whitespace_run_too_long_for_tiktoken_is_cut_not_a_crash(gpt2, tmp_path):
    """tiktoken's regex fails on a whitespace run of ~1 M characters ("Max stack size exceeded"); pieces of
    at most 256 Ki characters keep every run below that."""
    path = tmp_path / "gap.txt"
    path.write_text("hello" + " " * 1_200_000 + "world", encoding="utf-8")
    assert sample_stats(gpt2, path)["tokens"] > 1_000
    assert len(text_stream([path], gpt2)) > 1_000


# ---- one-line errors ---------------------------------------------------------------------------------------


def test_missing_sample_is_a_one_line_error(tmp_path, capsys):
    missing = tmp_path / "nope.txt"
    assert main(["tokenizer", "info", "gpt2", "--sample", str(missing)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"gptforge: error: sample file not found: {missing}") and "\n" not in err
    assert main(["tokenizer", "info", "gpt2", "--sample", str(tmp_path)]) == 2
    assert "is not a file" in capsys.readouterr().err
    assert main(["tokenizer", "encode", "gpt2", "--file", str(missing)]) == 2
    assert "not found" in capsys.readouterr().err


def test_binary_sample_is_decoded_with_replacement_and_counted(gpt2, tmp_path, capsys):
    raw = b"ok \xff\xfe then \xc3\x28 and a cut " * 2000 + b"end \xe2\x82"  # 3 bad sequences per repeat + 1
    path = tmp_path / "blob.bin"
    path.write_bytes(raw)
    assert main(["tokenizer", "info", "gpt2", "--sample", str(path), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)["sample"]
    assert s["invalid_utf8_replaced"] == 3 * 2000 + 1
    assert s["bytes"] == len(raw)
    assert s["tokens"] == len(gpt2.encode(raw.decode("utf-8", errors="replace")))


# ---- memory on a huge single line --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_line_20mb(tmp_path_factory, shakespeare_text):
    """~20 MB of tinyshakespeare with newlines turned into spaces: one line, one document."""
    line = shakespeare_text.replace("\n", " ")
    path = tmp_path_factory.mktemp("oneline") / "one_line.txt"
    path.write_text((line * (20_000_000 // len(line) + 1))[:20_000_000], encoding="utf-8")
    return path


def test_tokenizer_info_memory_stays_flat_on_a_20mb_single_line(one_line_20mb):
    """Old code (whole file read and encoded at once): +246 MiB; now about +27 MiB (piece buffers only)."""
    growth = probe("tokenizer", "info", "gpt2", "--sample", one_line_20mb)
    assert growth < 64 * MiB, f"tokenizer info grew {growth / MiB:.0f} MiB"


def test_eval_loss_memory_is_compact_token_ids_on_a_20mb_single_line(one_line_20mb, gpt2, tmp_path):
    """The whole file is tokenized (its length bounds --start/--tokens), into uint16 arrays: the growth over
    the same command on a 100 KB file is ~2 bytes per token plus piece buffers. Old code (Python lists of
    all ids, then int64): +190 MiB over that floor; now about +27 MiB."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50257, block_size=64, n_layer=1, n_head=1, n_embd=16))
    ckpt = save_model(tmp_path / "ckpt", model, gpt2)
    small = tmp_path / "small.txt"
    small.write_bytes(one_line_20mb.read_bytes()[:100_000])
    args = ["eval", "loss", "--checkpoints", ckpt, "--tokens", "2000", "--batch-size", "1", "--device", "cpu",
            "--out", tmp_path / "eval", "--data"]
    floor = probe(*args, small)
    growth = probe(*args, one_line_20mb)
    tokens = 5_401_770  # [eot] + gpt2 ids of the 20 MB line
    assert growth - floor < 4 * tokens + 48 * MiB, f"eval loss grew {(growth - floor) / MiB:.0f} MiB more"
