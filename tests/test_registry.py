"""Named datasets: checksums of the local copies, resolution order, and the offline error path."""

import pytest

from gptforge.cli import main
from gptforge.data import registry
from gptforge.data.sources import expand_sources
from gptforge.errors import GptforgeError

SEED_DATASETS = [
    "tinyshakespeare",
    "tinystories",
    "fineweb-edu",
    "fineweb",
    "alpaca",
    "dolly",
    "instruction-data",
    "sms-spam",
    "hellaswag",
    "mmlu",
    "gpt2-vocab",
]


@pytest.fixture
def offline_empty(tmp_path, monkeypatch):
    """No data directory contents, an empty cache, downloads disabled."""
    monkeypatch.setenv("GPTFORGE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("GPTFORGE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("GPTFORGE_OFFLINE", "1")
    return tmp_path


def test_registry_covers_the_seed_datasets_with_a_public_source():
    for name in SEED_DATASETS:
        entry = registry.get(name)
        assert entry.url or entry.hub, name
    assert registry.get("fineweb-edu").hub_config == "sample-10BT"


def test_local_copies_match_the_registry_checksums(data_dir):
    checked = 0
    for entry in registry.DATASETS.values():
        path = data_dir / entry.relpath
        if entry.sha256 and path.is_file():
            assert registry.verify(entry, path), entry.name
            checked += 1
    assert checked >= 9


def test_resolve_prefers_explicit_path_then_data_dir(data_dir, tmp_path):
    own = tmp_path / "mine.txt"
    own.write_text("hello")
    assert registry.resolve(own) == own
    assert registry.resolve("tinyshakespeare") == data_dir / "pretrain/tinyshakespeare.txt"
    assert registry.resolve("sms") == data_dir / "classify/SMSSpamCollection"  # alias
    assert registry.resolve("hellaswag") == data_dir / "eval/hellaswag_val.jsonl"


def test_resolve_uses_the_cache_when_the_data_dir_lacks_the_file(offline_empty, data_dir):
    cached = offline_empty / "cache" / "instruct" / "instruction-data.json"
    cached.parent.mkdir(parents=True)
    cached.write_bytes((data_dir / "instruct/instruction-data.json").read_bytes())
    assert registry.resolve("instruction-data") == cached


def test_offline_without_a_copy_names_the_file_and_where_to_put_it(offline_empty):
    with pytest.raises(GptforgeError) as e:
        registry.resolve("hellaswag")
    msg = str(e.value)
    assert "hellaswag_val.jsonl" in msg and str(offline_empty / "data" / "eval/hellaswag_val.jsonl") in msg
    assert "rowanz/hellaswag" in msg and "GPTFORGE_OFFLINE" in msg
    with pytest.raises(GptforgeError, match="streams it from the hub"):
        registry.resolve("fineweb-edu")
    with pytest.raises(GptforgeError, match="unknown dataset 'nope'; known: tinyshakespeare"):
        registry.resolve("nope")


def test_streamable_corpus_without_local_copy_becomes_a_hub_source(offline_empty):
    src = expand_sources(["fineweb-edu"])[0]  # nothing is downloaded until iterated
    assert (src.kind, src.path, src.hub_config, src.field) == (
        "hub",
        "HuggingFaceFW/fineweb-edu",
        "sample-10BT",
        "text",
    )


def test_cli_list_and_fetch(data_dir, capsys, offline_empty, monkeypatch):
    monkeypatch.setenv("GPTFORGE_DATA_DIR", str(data_dir))
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    assert "tinyshakespeare" in out and "HuggingFaceFW/fineweb-edu" in out
    assert main(["data", "fetch", "tinyshakespeare", "mmlu", "--verify"]) == 0
    assert capsys.readouterr().out.split() == [
        str(data_dir / "pretrain/tinyshakespeare.txt"),
        str(data_dir / "eval/mmlu_test.jsonl"),
    ]
    assert main(["data", "fetch", "dolly"]) == 2
    assert "databricks-dolly-15k.jsonl" in capsys.readouterr().err
