"""Text sources: separators, piece cutting that never changes ids, JSONL/JSON/parquet, bad input."""

import json

import pytest

from gptforge.data.sources import ReadStats, Source, expand_sources, iter_texts
from gptforge.errors import GptforgeError
from gptforge.tokenizer import load_tokenizer


def _docs(src: Source, piece_chars=1 << 20, skip_bad=False):
    """Documents (pieces joined) of a source, and the read stats."""
    stats, docs = ReadStats(), []
    for p in src.pieces(stats, piece_chars, skip_bad):
        if p.first:
            docs.append(p.text)
        else:
            docs[-1] += p.text
    return docs, stats


def test_cutting_a_whole_file_into_small_pieces_keeps_every_token_id(data_dir):
    gpt2 = load_tokenizer("gpt2")
    path = data_dir / "pretrain/tinyshakespeare.txt"
    pieces = list(Source("txt", str(path)).pieces(ReadStats(), piece_chars=4096))
    assert len(pieces) > 250 and pieces[0].first and not any(p.first for p in pieces[1:])
    assert all(len(p.text) <= 4096 for p in pieces)
    whole = path.read_text(encoding="utf-8")
    assert "".join(p.text for p in pieces) == whole
    ids = [i for p in pieces for i in gpt2.encode(p.text)]
    assert ids == gpt2.encode(whole)  # 338,025 ids, identical


def test_literal_separator_splits_tinystories_into_its_five_stories(data_dir):
    docs, stats = _docs(
        Source("txt", str(data_dir / "pretrain/tinystories-5.txt"), separator="<|endoftext|>")
    )
    assert len(docs) == 5 == stats.documents
    assert all("<|endoftext|>" not in d and d == d.strip() for d in docs)
    assert docs[0].startswith("Once upon a time there was a little boy named Ben")


def test_blank_line_separator_and_long_documents(data_dir):
    path = data_dir / "pretrain/tinyshakespeare.txt"
    docs, _ = _docs(Source("txt", str(path), separator="blank"))
    small, _ = _docs(Source("txt", str(path), separator="blank"), piece_chars=4096)
    assert len(docs) == 7222 and small == docs
    assert docs[0] == "First Citizen:\nBefore we proceed any further, hear me speak."


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"caf\xc3\xa9 ok\n\n\xff\xfe broken \xc3 end\n")
    docs, stats = _docs(Source("txt", str(path), separator="blank"))
    assert docs == ["café ok", "\ufffd\ufffd broken \ufffd end"] and stats.bad_utf8 == 3


def test_jsonl_records_with_field_and_errors_with_file_and_line(data_dir, tmp_path):
    hs = data_dir / "eval/hellaswag_val.jsonl"
    lines = hs.read_text(encoding="utf-8").splitlines()[:50]
    good = tmp_path / "ok.jsonl"
    good.write_text("\n".join(lines) + "\n", encoding="utf-8")
    docs, _ = _docs(Source("jsonl", str(good), field="ctx"))
    assert docs == [json.loads(line)["ctx"] for line in lines]

    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines[:3] + ["{not json"] + lines[3:6]) + "\n", encoding="utf-8")
    with pytest.raises(GptforgeError, match=r"bad\.jsonl:4: malformed JSON.*--skip-bad"):
        _docs(Source("jsonl", str(bad), field="ctx"))
    docs, stats = _docs(Source("jsonl", str(bad), field="ctx"), skip_bad=True)
    assert len(docs) == 6 and stats.skipped == 1
    with pytest.raises(
        GptforgeError, match=r"ok\.jsonl:1: record has no field 'text' \(fields: ind, activity_label"
    ):
        _docs(Source("jsonl", str(good), field="text"))


def test_json_array_and_parquet_column(data_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs, _ = _docs(Source("json", str(data_dir / "instruct/instruction-data.json"), field="output"))
    assert len(docs) == 1100
    sms = [
        line.split("\t", 1)[1]
        for line in (data_dir / "classify/SMSSpamCollection").read_text(encoding="utf-8").splitlines()[:300]
    ]
    path = tmp_path / "sms.parquet"
    pq.write_table(pa.table({"message": sms, "n": list(range(len(sms)))}), path, row_group_size=64)
    docs, _ = _docs(Source("parquet", str(path), field="message"))
    assert docs == [s for s in sms if s]
    with pytest.raises(GptforgeError, match="no column 'text' .*columns: message, n"):
        _docs(Source("parquet", str(path), field="text"))


def test_expand_sources_globs_directories_names_and_hub_ids(data_dir):
    srcs = expand_sources([str(data_dir / "pretrain/tiny*.txt")])
    assert [s.path.rsplit("/", 1)[1] for s in srcs] == [
        "tinyshakespeare.txt",
        "tinystories-5.txt",
        "tinystories-sample.txt",
    ]
    named = expand_sources(["tinyshakespeare"])[0]
    assert named.path == str(data_dir / "pretrain/tinyshakespeare.txt") and named.separator == "blank"
    assert (
        expand_sources(["tinyshakespeare"], separator="file")[0].separator == "file"
    )  # the user's choice wins
    hub = expand_sources(["hf:HuggingFaceFW/fineweb-edu"], hub_config="sample-10BT")[0]
    assert (hub.kind, hub.path, hub.hub_config) == ("hub", "HuggingFaceFW/fineweb-edu", "sample-10BT")
    hub = expand_sources(["HuggingFaceFW/fineweb:sample-10BT"])[0]
    assert (hub.path, hub.hub_config, hub.hub_split) == ("HuggingFaceFW/fineweb", "sample-10BT", "train")
    assert expand_sources(["hf:cais/mmlu:all:test"])[0].hub_split == "test"
    with pytest.raises(GptforgeError, match="matches no files"):
        expand_sources([str(data_dir / "pretrain/*.nothing")])
    with pytest.raises(GptforgeError, match="input not found"):
        expand_sources(["no-such-dataset"])


def test_separator_auto_detection(data_dir, tmp_path):
    srcs = expand_sources(
        [str(data_dir / f"pretrain/{n}") for n in ("tinystories-5.txt", "tinyshakespeare.txt")]
    )
    assert [s.separator for s in srcs] == ["<|endoftext|>", "blank"]
    lines = tmp_path / "lines.txt"
    lines.write_text("one line\nanother line\n")
    assert expand_sources([str(lines)])[0].separator == "file"


def test_iter_texts_streams_all_sources_in_order(data_dir):
    srcs = expand_sources(
        [str(data_dir / "pretrain/the-verdict.txt"), str(data_dir / "pretrain/tinystories-5.txt")],
        separator="<|endoftext|>",
    )
    texts = list(iter_texts(srcs, ReadStats()))
    assert len(texts) == 6 and texts[0].startswith("I HAD always thought Jack Gisburn")


def test_hub_dataset_records_stream_through_datasets(monkeypatch, data_dir):
    """The hub path without the network: ``datasets.load_dataset`` replaced by local HellaSwag records."""
    import datasets

    records = [json.loads(line) for line in (data_dir / "eval/hellaswag_val.jsonl").open(encoding="utf-8")][
        :20
    ]
    calls = []

    def fake_load_dataset(path, name=None, split=None, streaming=False):
        calls.append((path, name, split, streaming))
        return iter(records)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    src = expand_sources(["hf:Rowan/hellaswag"], field="ctx", hub_split="validation")[0]
    docs, stats = _docs(src)
    assert calls == [("Rowan/hellaswag", None, "validation", True)]
    assert docs == [r["ctx"] for r in records] and stats.documents == 20


def test_auto_separator_recognises_one_document_per_line(tmp_path, data_dir):
    """Articles one per line (long lines, no blank lines) are documents; verse or prose lines are not."""
    from gptforge.data.sources import detect_separator, separator_rule

    words = (data_dir / "pretrain" / "wikitext2-raw-test.txt").read_text(encoding="utf-8").split()
    articles = "\n".join(" ".join(words[i * 60:(i + 1) * 60]) for i in range(50)) + "\n"
    (tmp_path / "articles.txt").write_text(articles, encoding="utf-8")
    rule, why = separator_rule(tmp_path / "articles.txt")
    assert rule == "line" and "50 documents" in why
    verse = "\n".join(line for line in (data_dir / "pretrain" / "tinyshakespeare.txt").read_text(
        encoding="utf-8").splitlines()[:400] if line.strip())
    (tmp_path / "verse.txt").write_text(verse, encoding="utf-8")
    assert detect_separator(tmp_path / "verse.txt") == "file"
    assert detect_separator(data_dir / "pretrain" / "wikitext2-raw-test.txt") == "blank"
