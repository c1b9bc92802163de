"""Byte-level BPE training, tiktoken-rank export, GPT-2 offline, and the `gptforge tokenizer` commands."""

import pytest

from gptforge.cli import main
from gptforge.errors import GptforgeError
from gptforge.tokenizer import (
    EOT,
    IM_END,
    IM_START,
    PAD,
    TIKTOKEN_FILE,
    load_tiktoken_file,
    load_tokenizer,
    train_bpe,
)


def _read(path, limit=None):
    return path.read_text(encoding="utf-8", errors="replace")[:limit]


@pytest.fixture(scope="module")
def bpe(data_dir, tmp_path_factory):
    """A 1,024-token BPE trained on tinyshakespeare + wikitext, saved to a directory."""
    text = _read(data_dir / "pretrain/tinyshakespeare.txt") + _read(
        data_dir / "pretrain/wikitext2-raw-test.txt", 400_000
    )
    chunks = (text[i : i + 50_000] for i in range(0, len(text), 50_000))
    tok = train_bpe(chunks, vocab_size=1024, name="shakes-1k")
    out = tmp_path_factory.mktemp("bpe") / "shakes-1k"
    tok.save(out)
    return tok, out


def test_trained_bpe_has_exact_vocab_and_special_tokens_first(bpe):
    tok, _ = bpe
    assert tok.vocab_size == 1024
    assert tok.special_tokens == {EOT: 0, PAD: 1, IM_START: 2, IM_END: 3}
    assert tok.eot_id == 0 and tok.pad_id == 1
    # Real merges were learned: common words are single tokens.
    assert len(tok.encode(" the")) == 1 and len(tok.encode(" and")) == 1


def test_trained_bpe_round_trips_unseen_text_including_non_ascii(bpe, data_dir):
    tok, _ = bpe
    text = _read(data_dir / "pretrain/the-verdict.txt") + " naïve café — 東京 🙂"
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize(
    "rel", ["pretrain/tinyshakespeare.txt", "pretrain/wikitext2-raw-test.txt", "classify/SMSSpamCollection"]
)
def test_tiktoken_export_gives_identical_ids(bpe, data_dir, rel):
    tok, out = bpe
    assert (out / TIKTOKEN_FILE).is_file()
    enc = load_tiktoken_file(out)
    text = _read(data_dir / rel, 300_000)
    ids = tok.encode(text)
    assert enc.encode_ordinary(text) == ids
    assert len(ids) > 50_000  # a 1k vocabulary compresses ~3 bytes/token; this really encoded the text


def test_saved_bpe_reloads_with_same_hash_and_ids(bpe, data_dir):
    tok, out = bpe
    again = load_tokenizer(out)
    text = _read(data_dir / "pretrain/the-verdict.txt")
    assert again.content_hash() == tok.content_hash() and again.encode(text) == tok.encode(text)
    assert again.name == "shakes-1k"


def test_special_token_strings_are_text_unless_allowed(bpe):
    tok, _ = bpe
    text = f"a{EOT}b"
    assert 0 not in tok.encode(text)
    assert tok.encode(text, allow_special=True).count(0) == 1
    assert tok.decode(tok.encode(text)) == text


def test_vocab_smaller_than_bytes_plus_specials_is_a_clear_error():
    with pytest.raises(GptforgeError, match="at least 260"):
        train_bpe(["hello world"], vocab_size=100)


def test_gpt2_works_offline_from_the_data_dir(data_dir):
    tok = load_tokenizer("gpt2")
    assert tok.vocab_size == 50257 and tok.eot_id == 50256
    assert len(tok.encode(_read(data_dir / "pretrain/tinyshakespeare.txt"))) == 338_025


def test_gpt2_chat_adds_chat_tokens_after_the_vocabulary():
    tok = load_tokenizer("gpt2-chat")
    assert tok.special_tokens[IM_START] == 50257 and tok.special_tokens[IM_END] == 50258
    assert tok.vocab_size == 50259
    ids = tok.encode(f"{IM_START}user\nhi{IM_END}", allow_special=True)
    assert ids[0] == 50257 and ids[-1] == 50258
    assert load_tokenizer("gpt2", extra_special=[PAD]).special_tokens[PAD] == 50257


def test_cli_train_info_encode(data_dir, tmp_path, capsys):
    out = tmp_path / "tok"
    src = str(data_dir / "pretrain/tinystories-sample.txt")
    assert (
        main(["tokenizer", "train", src, "--vocab-size", "600", "--out", str(out), "--text-sep", "blank"])
        == 0
    )
    printed = capsys.readouterr().out
    assert "vocab 600" in printed and (out / "tokenizer.json").is_file() and (out / TIKTOKEN_FILE).is_file()
    assert main(["tokenizer", "info", str(out), "--sample", str(data_dir / "pretrain/the-verdict.txt")]) == 0
    printed = capsys.readouterr().out
    assert "vocab 600" in printed and "bytes/token" in printed
    assert main(["tokenizer", "encode", "gpt2", "Hello world", "--json"]) == 0
    printed = capsys.readouterr().out
    assert '"ids": [15496, 995]' in printed and '"round_trip": true' in printed
    assert main(["tokenizer", "train", "/nonexistent.txt", "--vocab-size", "600", "--out", str(out)]) == 2


def test_tiktoken_export_is_refused_when_pretokenization_differs(bpe):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import pre_tokenizers

    from gptforge.tokenizer import BPETokenizer

    tok, _ = bpe
    hf = HFTokenizer.from_str(tok._tok.to_str())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    assert tok.tiktoken_ranks() is not None and BPETokenizer(hf).tiktoken_ranks() is None
