"""`data prepare --sample-docs/--sample-seed` (HF datasets' shuffle+select set) and `--val-split/--val-source`."""

import json
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest

from gptforge.cli import main
from gptforge.data.prepare import PrepareConfig, prepare
from gptforge.data.sampling import keep_mask
from gptforge.data.shards import MANIFEST, list_shards, read_shard
from gptforge.data.sources import expand_sources, val_sources
from gptforge.errors import GptforgeError
from gptforge.tokenizer import load_tokenizer

EOT = 50256


@pytest.fixture(scope="module")
def gpt2():
    return load_tokenizer("gpt2")


def _blank_docs(path):
    return [d.strip() for d in path.read_text(encoding="utf-8").split("\n\n") if d.strip()]


def _tokens(out, split):
    shards = list_shards(out, split)
    return np.concatenate([read_shard(p) for p in shards]).tolist() if shards else []


def _docs(out, split, gpt2):
    """The documents of a split, decoded back from the shards (every document starts with end-of-text)."""
    ids, docs = _tokens(out, split), []
    for i in ids:
        if i == EOT:
            docs.append([])
        else:
            docs[-1].append(i)
    return [gpt2.decode(d) for d in docs]


def _hf_selection(texts, n, seed):
    import datasets

    return datasets.Dataset.from_list([{"text": t} for t in texts]).shuffle(seed=seed).select(range(n))["text"]


@pytest.fixture(scope="module")
def stories_jsonl(data_dir, tmp_path_factory):
    """The 1,230 TinyStories sample stories as .jsonl, with three empty-text rows (HF rows too, selected like any
    other, adding no document) and two blank lines (no rows)."""
    texts = _blank_docs(data_dir / "pretrain/tinystories-sample.txt")
    for at in (0, 57, 120):
        texts.insert(at, "")
    path = tmp_path_factory.mktemp("jsonl") / "stories.jsonl"
    lines = [json.dumps({"text": t}) for t in texts]
    lines.insert(30, "")
    lines.insert(90, "   ")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path, texts


@pytest.mark.parametrize("n, seed, workers, empty", [(60, 42, 1, 0), (500, 7, 2, 2)])
def test_sample_keeps_the_set_hf_shuffle_select_keeps(stories_jsonl, tmp_path, gpt2, n, seed, workers, empty):
    path, texts = stories_jsonl
    m = prepare(PrepareConfig([str(path)], str(tmp_path), val_fraction=0.1, workers=workers,
                              sample_docs=n, sample_seed=seed, progress=False, histogram=False))
    hf = [t for t in _hf_selection(texts, n, seed) if t]  # empty rows are selected like any other, add nothing
    kept = _docs(tmp_path, "train", gpt2) + _docs(tmp_path, "val", gpt2)
    assert Counter(kept) == Counter(hf) and len(kept) == n - empty  # a multiset: the sample has duplicates
    assert m["documents"]["train"] + m["documents"]["val"] == len(hf) and m["documents"]["val"] > 0
    assert m["sample"]["rows"] == len(texts) and m["sample"]["documents_kept"] == len(hf)
    assert m["sample"]["docs"] == n and m["sample"]["seed"] == seed
    assert m["fingerprint"]["sample"] == {"docs": n, "seed": seed}
    # Written in source order, not HF's shuffled order: the train documents are a subsequence of the file.
    rest = iter(texts)
    assert all(any(t == r for r in rest) for t in _docs(tmp_path, "train", gpt2))


def test_sample_across_txt_files_counts_rows_over_all_inputs(data_dir, tmp_path, gpt2):
    """Two .txt inputs: the rows are their documents in input order, as one HF dataset of both."""
    files = [data_dir / "pretrain/tinystories-sample.txt", data_dir / "pretrain/the-verdict.txt"]
    texts = _blank_docs(files[0]) + _blank_docs(files[1])
    m = prepare(PrepareConfig([str(f) for f in files], str(tmp_path), separator="blank", val_fraction=0,
                              workers=1, sample_docs=100, sample_seed=3, progress=False, histogram=False))
    assert Counter(_docs(tmp_path, "train", gpt2)) == Counter(_hf_selection(texts, 100, 3))
    assert m["sample"]["rows"] == len(texts) and m["documents"]["train"] == 100
    assert [s["documents"] for s in m["sources"]] == [len(_blank_docs(f)) for f in files]  # documents read


def test_keep_mask_is_hf_permutation_and_too_many_docs_is_an_error(stories_jsonl, tmp_path):
    mask = keep_mask(10, 4, seed=42)
    assert sorted(np.flatnonzero(mask)) == sorted(np.random.default_rng(42).permutation(10)[:4])
    path, texts = stories_jsonl
    with pytest.raises(GptforgeError, match=f"--sample-docs 2,000 is more than the {len(texts):,} documents"):
        prepare(PrepareConfig([str(path)], str(tmp_path / "a"), sample_docs=2000, workers=1, progress=False))
    with pytest.raises(SystemExit) as e:  # argparse: usage line + exit 2
        main(["data", "prepare", str(path), "--out", str(tmp_path / "b"), "--sample-docs", "0"])
    assert e.value.code == 2


def test_sample_options_are_in_the_resume_fingerprint(stories_jsonl, tmp_path, capsys):
    path, _ = stories_jsonl
    args = ["data", "prepare", str(path), "--out", str(tmp_path), "--workers", "1", "--val-fraction", "0.1"]
    assert main(args + ["--sample-docs", "50", "--sample-seed", "1"]) == 0
    assert json.loads((tmp_path / MANIFEST).read_text())["sample"]["docs"] == 50
    assert main(args + ["--sample-docs", "50", "--sample-seed", "1"]) == 0
    assert "already prepared" in capsys.readouterr().out
    assert main(args + ["--sample-docs", "50", "--sample-seed", "2"]) == 2
    assert "different options (sample)" in capsys.readouterr().err
    assert main(args) == 2  # the same files without sampling are other data too


def test_val_source_documents_all_go_to_val(data_dir, tmp_path, gpt2):
    train_file, val_file = data_dir / "pretrain/tinystories-sample.txt", data_dir / "pretrain/the-verdict.txt"
    train_docs, val_docs = _blank_docs(train_file), _blank_docs(val_file)
    m = prepare(PrepareConfig([str(train_file)], str(tmp_path), separator="blank", val_fraction=0.5,
                              val_sources=[str(val_file)], workers=2, shard_tokens=3000, progress=False,
                              histogram=False))
    # val_fraction 0.5 is ignored: no hash split, the val file alone is val, in order, tokens as encoded directly.
    assert _tokens(tmp_path, "val") == [t for d in val_docs for t in [EOT] + gpt2.encode(d)]
    assert _tokens(tmp_path, "train") == [t for d in train_docs for t in [EOT] + gpt2.encode(d)]
    assert m["documents"] == {"train": len(train_docs), "val": len(val_docs)}
    assert m["sources"][0]["path"] == str(val_file) and m["sources"][0]["all_val"] is True
    assert "all_val" not in m["sources"][1] and m["split"]["val_sources"] == [str(val_file)]


def test_val_source_is_read_first_so_a_budget_keeps_it(data_dir, tmp_path, gpt2):
    val_file = data_dir / "pretrain/tinystories-5.txt"
    docs = [d.strip() for d in val_file.read_text().split("<|endoftext|>") if d.strip()]
    val = [t for d in docs for t in [EOT] + gpt2.encode(d)]
    m = prepare(PrepareConfig([str(data_dir / "pretrain/tinyshakespeare.txt")], str(tmp_path),
                              val_sources=[str(val_file)], max_tokens=len(val) + 500, workers=1, progress=False,
                              histogram=False))
    assert _tokens(tmp_path, "val") == val and m["tokens"] == {"train": 500, "val": len(val)}


def test_sample_applies_to_the_training_inputs_only(stories_jsonl, data_dir, tmp_path, gpt2):
    path, texts = stories_jsonl
    val_file = data_dir / "pretrain/the-verdict.txt"
    m = prepare(PrepareConfig([str(path)], str(tmp_path), separator="blank", val_sources=[str(val_file)],
                              sample_docs=40, sample_seed=42, workers=1, progress=False, histogram=False))
    assert Counter(_docs(tmp_path, "train", gpt2)) == Counter(t for t in _hf_selection(texts, 40, 42) if t)
    assert m["documents"]["val"] == len(_blank_docs(val_file)) and m["sample"]["rows"] == len(texts)


def test_val_split_builds_a_second_hub_source_without_the_network():
    train = expand_sources(["hf:roneneldan/TinyStories"])
    val = val_sources(train, "validation")
    assert [(s.kind, s.path, s.hub_split, s.all_val) for s in val + train] == [
        ("hub", "roneneldan/TinyStories", "validation", True),
        ("hub", "roneneldan/TinyStories", "train", False),
    ]
    assert val[0].describe() == {"kind": "hub", "path": "roneneldan/TinyStories", "field": "text",
                                 "config": None, "split": "validation", "all_val": True}
    spec = expand_sources(["roneneldan/TinyStories"], hub_split="train")  # OWNER/NAME without hf: too
    assert val_sources(spec, "validation")[0].hub_split == "validation"


def test_val_split_prepares_a_hub_dataset_from_its_two_splits(monkeypatch, data_dir, tmp_path, gpt2):
    """The whole hub path offline: ``datasets.load_dataset`` serves local stories per split."""
    import datasets

    splits = {"train": _blank_docs(data_dir / "pretrain/tinystories-sample.txt"),
              "validation": _blank_docs(data_dir / "pretrain/the-verdict.txt")}
    calls = []

    def fake_load_dataset(path, name=None, split=None, streaming=False):
        calls.append((path, split, streaming))
        return iter([{"text": t} for t in splits[split]])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    m = prepare(PrepareConfig(["hf:roneneldan/TinyStories"], str(tmp_path), val_split="validation",
                              workers=1, progress=False, histogram=False))
    assert calls == [("roneneldan/TinyStories", "validation", True), ("roneneldan/TinyStories", "train", True)]
    assert _docs(tmp_path, "val", gpt2) == splits["validation"]
    assert _docs(tmp_path, "train", gpt2) == splits["train"]
    assert m["fingerprint"]["val_split"] == "validation" and m["split"]["val_split"] == "validation"


def test_sample_of_a_hub_dataset_counts_rows_from_its_metadata(monkeypatch, data_dir, tmp_path, gpt2):
    import datasets

    texts = _blank_docs(data_dir / "pretrain/tinystories-sample.txt")
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: iter([{"text": t} for t in texts]))

    class Builder:  # what load_dataset_builder reads from the hub's README metadata
        info = SimpleNamespace(splits={"train": datasets.SplitInfo("train", num_examples=len(texts))})

    monkeypatch.setattr(datasets, "load_dataset_builder", lambda *a, **k: Builder())
    prepare(PrepareConfig(["hf:roneneldan/TinyStories"], str(tmp_path / "a"), val_fraction=0, sample_docs=30,
                          sample_seed=42, workers=1, progress=False, histogram=False))
    assert Counter(_docs(tmp_path / "a", "train", gpt2)) == Counter(_hf_selection(texts, 30, 42))
    Builder.info.splits["train"] = datasets.SplitInfo("train", num_examples=len(texts) - 1)
    with pytest.raises(GptforgeError, match="counted .* before"):  # stale metadata: refuse, do not mis-sample
        prepare(PrepareConfig(["hf:roneneldan/TinyStories"], str(tmp_path / "b"), val_fraction=0, sample_docs=30,
                              workers=1, progress=False, histogram=False))


def test_val_options_errors(data_dir, tmp_path):
    local = str(data_dir / "pretrain/tinystories-sample.txt")
    with pytest.raises(GptforgeError, match="is a local file: pass the validation file.* --val-source"):
        prepare(PrepareConfig([local], str(tmp_path / "a"), val_split="validation", progress=False))
    with pytest.raises(GptforgeError, match="is the split the training documents"):
        prepare(PrepareConfig(["hf:roneneldan/TinyStories"], str(tmp_path / "b"), val_split="train",
                              progress=False))
    assert main(["data", "prepare", local, "--out", str(tmp_path / "c"), "--val-split", "validation",
                 "--val-source", local]) == 2


def test_interrupted_sampled_run_resumes_to_the_same_bytes(stories_jsonl, data_dir, tmp_path, monkeypatch):
    from gptforge.data import prepare as prep

    path, _ = stories_jsonl
    cfg = {"val_sources": [str(data_dir / "pretrain/the-verdict.txt")], "separator": "blank", "sample_docs": 700,
           "sample_seed": 5, "shard_tokens": 5000, "buffer_mb": 0.05, "workers": 1, "progress": False,
           "histogram": False}
    prepare(PrepareConfig([str(path)], str(tmp_path / "ref"), **cfg))
    real, calls = prep._Run._checkpoint, []

    def checkpoint_then_die(self):
        real(self)
        calls.append(self.pieces_done)
        if len(calls) == 4:  # of 7, in the middle of the sampled input
            raise KeyboardInterrupt

    monkeypatch.setattr(prep._Run, "_checkpoint", checkpoint_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare(PrepareConfig([str(path)], str(tmp_path / "cut"), **cfg))
    monkeypatch.setattr(prep._Run, "_checkpoint", real)
    m = prepare(PrepareConfig([str(path)], str(tmp_path / "cut"), **cfg))
    ref = {p.name: p.read_bytes() for p in sorted((tmp_path / "ref").glob("*.bin"))}
    assert {p.name: p.read_bytes() for p in sorted((tmp_path / "cut").glob("*.bin"))} == ref
    assert calls[-1] > 0 and m["sample"]["documents_kept"] == 700 - 2  # two empty rows among the 700 (seed 5)
