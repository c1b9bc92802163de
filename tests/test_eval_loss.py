"""Held-out loss / perplexity / bits-per-byte: windows like training, exact byte counts, checkpoint series."""

import json
import math

import numpy as np
import pytest
import torch

from gptforge.checkpoint import save_model
from gptforge.cli import main
from gptforge.data.shards import write_shard
from gptforge.errors import GptforgeError
from gptforge.eval.loss import (
    TokenStream,
    evaluate_loss,
    expand_checkpoints,
    loss_on_stream,
    text_stream,
    token_byte_lengths,
)
from gptforge.model import GPT, GPTConfig
from gptforge.tokenizer import TiktokenTokenizer

CFG = {"vocab_size": 50257, "block_size": 64, "n_layer": 2, "n_head": 2, "n_embd": 32}


@pytest.fixture(scope="module")
def tok(data_dir):
    return TiktokenTokenizer()


@pytest.fixture(scope="module")
def shakespeare_ids(tok, data_dir):
    text = (data_dir / "pretrain" / "tinyshakespeare.txt").read_text(encoding="utf-8")[:40_000]
    return text, tok.encode(text)


def random_model(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**CFG)).eval()


def sharpened_model(scale):
    """A random model whose output distribution is sharpened by ``scale``: larger scale → higher loss on text
    (the same seed, so the series differs only in that one dial; a stand-in for checkpoints of a run)."""
    model = random_model()
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    return model


def test_byte_table_counts_text_bytes_exactly(tok, shakespeare_ids, data_dir):
    text, ids = shakespeare_ids
    table = token_byte_lengths(tok)
    assert table[tok.eot_id] == 0
    assert int(table[np.array(ids)].sum()) == len(text.encode("utf-8"))
    unicode_text = "naïve café — 日本語 ✓"
    assert int(table[np.array(tok.encode(unicode_text))].sum()) == len(unicode_text.encode("utf-8"))


def test_byte_table_of_a_trained_bpe_counts_text_bytes_exactly(data_dir):
    from gptforge.tokenizer import train_bpe

    text = (data_dir / "pretrain" / "the-verdict.txt").read_text(encoding="utf-8")
    bpe = train_bpe([text], vocab_size=600)
    table = token_byte_lengths(bpe)
    probe = text[:3000] + " naïve — 日本"
    assert int(table[np.array(bpe.encode(probe))].sum()) == len(probe.encode("utf-8"))
    assert all(table[i] == 0 for i in bpe.special_tokens.values())


def test_windows_predict_every_token_once_and_match_a_single_forward(tok, shakespeare_ids):
    _, ids = shakespeare_ids
    model = random_model()
    stream = TokenStream([np.array(ids[:65])], "first 65 tokens")
    res = loss_on_stream(model, stream, seq_len=64, show_progress=False)
    x = torch.tensor([ids[:64]])
    y = torch.tensor([ids[1:65]])
    _, ref = model(x, targets=y)
    assert res["tokens"] == 64 and res["windows"] == 1
    assert res["loss"] == pytest.approx(ref.item(), abs=1e-5)
    assert res["perplexity"] == pytest.approx(math.exp(ref.item()), rel=1e-5)
    # shorter windows and a ragged last window: still every target once; batching does not change the sum
    a = loss_on_stream(model, TokenStream([np.array(ids[:300])], "x"), seq_len=48, batch_size=1, show_progress=False)
    b = loss_on_stream(model, TokenStream([np.array(ids[:300])], "x"), seq_len=48, batch_size=4, show_progress=False)
    assert a["tokens"] == b["tokens"] == 299
    assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)


def test_bits_per_byte_relates_loss_to_bytes(tok, shakespeare_ids):
    _, ids = shakespeare_ids
    model = random_model()
    res = evaluate_loss(model, TokenStream([np.array(ids[:801])], "s"), tokenizer=tok, seq_len=64,
                        show_progress=False)
    table = token_byte_lengths(tok)
    n_bytes = int(table[np.array(ids[1:801])].sum())
    assert res["bytes"] == n_bytes
    # no special tokens among the targets, so bpb = loss · tokens / ln 2 / bytes
    assert res["bits_per_byte"] == pytest.approx(res["loss"] * res["tokens"] / math.log(2) / n_bytes, rel=1e-9)


def test_text_documents_are_joined_with_eot_not_padded(tok, data_dir):
    stream = text_stream([data_dir / "pretrain" / "tinystories-5.txt"], tok)
    ids = stream.slice(0, len(stream))
    assert int((ids == tok.eot_id).sum()) == 5 and ids[0] == tok.eot_id  # one before every story
    raw = (data_dir / "pretrain" / "tinystories-5.txt").read_text(encoding="utf-8")
    second_eot = int(np.nonzero(ids == tok.eot_id)[0][1])
    assert tok.decode(ids[1:second_eot].tolist()).strip() == raw.split("<|endoftext|>")[0].strip()


def test_raw_text_gives_the_same_tokens_as_data_prepare(tok, data_dir, tmp_path):
    from gptforge.data.prepare import PrepareConfig, prepare

    src = data_dir / "pretrain" / "tinystories-sample.txt"
    prepare(PrepareConfig(sources=[str(src)], out=str(tmp_path / "prep"), val_fraction=0.0, workers=1,
                          progress=False, histogram=False), tokenizer=tok)
    from gptforge.eval.loss import shard_stream

    shards, _ = shard_stream(tmp_path / "prep", "train")
    raw = text_stream([src], tok)
    assert len(raw) == len(shards) and np.array_equal(raw.slice(0, 5000), shards.slice(0, 5000))
    model = random_model()
    a = evaluate_loss(model, tmp_path / "prep", tokenizer=tok, split="train", max_tokens=400, seq_len=64,
                      show_progress=False)
    b = evaluate_loss(model, src, tokenizer=tok, max_tokens=400, seq_len=64, show_progress=False)
    assert a["loss"] == pytest.approx(b["loss"], abs=1e-6) and a["bits_per_byte"] == pytest.approx(b["bits_per_byte"])
    # a model tokenizer that only adds special tokens (as sft does) is accepted for these shards
    chat_tok = TiktokenTokenizer(extra_special=["<|im_start|>", "<|im_end|>"])
    c = evaluate_loss(model, tmp_path / "prep", tokenizer=chat_tok, split="train", max_tokens=400, seq_len=64,
                      show_progress=False)
    assert c["loss"] == pytest.approx(a["loss"], abs=1e-9)


def test_jsonl_documents_and_bad_records(tok, tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "Hello there."}) + "\n" + json.dumps({"body": "x"}) + "\n")
    with pytest.raises(GptforgeError, match=r"docs\.jsonl:2"):
        text_stream([path], tok)


def test_shard_range_is_fixed_and_crosses_shard_boundaries(tok, shakespeare_ids, tmp_path):
    _, ids = shakespeare_ids
    arr = np.array(ids[:3000], dtype=np.uint16)
    write_shard(tmp_path / "val_00000.bin", arr[:1234], np.dtype("<u2"))
    write_shard(tmp_path / "val_00001.bin", arr[1234:], np.dtype("<u2"))
    model = random_model()
    sharded = evaluate_loss(model, tmp_path, tokenizer=tok, start=1000, max_tokens=600, seq_len=64,
                            show_progress=False)
    flat = evaluate_loss(model, TokenStream([arr[1000:1600]], "flat"), tokenizer=tok, seq_len=64,
                         show_progress=False)
    assert sharded["tokens"] == 599 and sharded["start"] == 1000 and sharded["stop"] == 1600
    assert sharded["loss"] == pytest.approx(flat["loss"], abs=1e-6)
    assert sharded["bits_per_byte"] == pytest.approx(flat["bits_per_byte"], abs=1e-6)
    with pytest.raises(GptforgeError, match="cannot take"):
        evaluate_loss(model, tmp_path, tokenizer=tok, start=2900, max_tokens=600, show_progress=False)


def test_shards_from_another_tokenizer_are_refused(tok, tmp_path):
    write_shard(tmp_path / "val_00000.bin", np.arange(100, dtype=np.uint16), np.dtype("<u2"))
    (tmp_path / "manifest.json").write_text(json.dumps({"tokenizer": {"name": "mine", "hash": "0123abcd"}}))
    with pytest.raises(GptforgeError, match="prepared with tokenizer 'mine'"):
        evaluate_loss(random_model(), tmp_path, tokenizer=tok, show_progress=False)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tok, shakespeare_ids):
    """A run with three checkpoints whose loss falls with the step, pointer files beside them."""
    run = tmp_path_factory.mktemp("runs") / "shakes"
    for step, scale in ((0, 12.0), (20, 4.0), (60, 1.0)):
        save_model(run / "ckpt" / f"step_{step:07d}", sharpened_model(scale), tok)
    (run / "ckpt" / "latest").write_text("step_0000060")
    (run / "ckpt" / "best").write_text("step_0000060")
    (run / "ckpt" / ".tmp-step_0000080").mkdir()
    return run


def test_expand_checkpoints_dedupes_pointers_and_orders_by_step(run_dir):
    paths = sorted((run_dir / "ckpt").iterdir())
    found = expand_checkpoints(paths)
    assert [p.name for p in found] == ["step_0000000", "step_0000020", "step_0000060"]


def test_cli_evaluates_series_marks_best_and_draws_chart(run_dir, data_dir, capsys):
    text_file = data_dir / "pretrain" / "the-verdict.txt"
    ckpts = [str(p) for p in sorted((run_dir / "ckpt").iterdir())]
    rc = main(["eval", "loss", "--checkpoints", *ckpts, "--data", str(text_file), "--start", "1000",
               "--tokens", "1200", "--batch-size", "4"])
    assert rc == 0
    out = capsys.readouterr().out
    report = json.loads((run_dir / "eval" / "loss.json").read_text())
    losses = [r["loss"] for r in report["results"]]
    assert [r["step"] for r in report["results"]] == [0, 20, 60]
    assert losses[0] > losses[1] > losses[2]
    assert report["best"] == 2 and report["results"][2]["best"]
    assert all(r["tokens"] == 1199 and r["start"] == 1000 for r in report["results"])
    assert "| step_0000060 * | 60 |" in out
    png = (run_dir / "eval" / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_reports_bad_data_path_in_one_line(run_dir, capsys):
    rc = main(["eval", "loss", "--checkpoints", str(run_dir), "--data", "/nonexistent/file.txt"])
    assert rc == 2
    assert "data file not found: /nonexistent/file.txt" in capsys.readouterr().err
