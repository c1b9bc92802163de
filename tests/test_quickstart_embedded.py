"""The quickstart's embedded package data: checksums, licenses, refusal of damaged copies, and resolution when
no data directory is set (conftest sets GPTFORGE_DATA_DIR for the session: these tests unset it)."""

import json
import shutil

import pytest

from gptforge.cli import main
from gptforge.data import registry
from gptforge.errors import GptforgeError
from gptforge.io import sha256_file
from gptforge.quickstart import QuickstartConfig, resolve_data, smoke_config

EMBEDDED = registry.EMBEDDED_DIR
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def no_data_dir(tmp_path, monkeypatch):
    """As on a fresh install: no GPTFORGE_DATA_DIR, an empty download cache, no network."""
    monkeypatch.delenv("GPTFORGE_DATA_DIR", raising=False)
    monkeypatch.setenv("GPTFORGE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("GPTFORGE_OFFLINE", "1")
    return tmp_path


def test_manifest_hashes_sizes_and_licenses_match_the_files(data_dir):
    manifest = json.loads((EMBEDDED / "manifest.json").read_text())["datasets"]
    assert set(manifest) == {"tinyshakespeare", "instruction-data", "instruction-preference", "hellaswag"}
    notice = (EMBEDDED / "NOTICE").read_text()
    total = 0
    for name, info in manifest.items():
        path = EMBEDDED / info["file"]
        assert sha256_file(path) == info["sha256"] and path.stat().st_size == info["bytes"], name
        assert info["license"] in ("public domain", "MIT", "Apache-2.0"), name  # no share-alike data shipped
        assert info["license_file"] is None or (EMBEDDED / info["license_file"]).is_file(), name
        assert info["file"] in notice and info["source"] in notice, name
        entry = registry.get(name)
        subset = info["subset"]
        # a whole copy has the registry's bytes; a subset records the original's hash and its first lines
        assert (subset["of_sha256"] if subset else info["sha256"]) == entry.sha256, name
        if subset:
            original = (data_dir / entry.relpath).read_bytes()
            assert sha256_file(data_dir / entry.relpath) == subset["of_sha256"]
            assert original.count(b"\n") == subset["of_records"]
            assert original.startswith(path.read_bytes()) and path.read_bytes().count(b"\n") == subset["records"]
        else:
            assert path.read_bytes() == (data_dir / entry.relpath).read_bytes(), name
        total += info["bytes"]
    assert total < 4_000_000  # a few MB at most


def test_resolution_falls_back_to_the_embedded_copy_without_a_data_dir(no_data_dir, data_dir, monkeypatch):
    found = registry.locate("tinyshakespeare")
    assert (found.origin, found.path) == ("embedded", EMBEDDED / "pretrain" / "tinyshakespeare.txt")
    assert registry.resolve("book-instructions") == EMBEDDED / "instruct" / "instruction-data.json"  # alias
    assert registry.resolve("book-preferences") == EMBEDDED / "instruct" / "instruction-data-with-preference.json"
    # the HellaSwag copy is a subset: only for callers that accept one (the quickstart), never silently
    with pytest.raises(GptforgeError, match="hellaswag_val.jsonl"):
        registry.resolve("hellaswag")
    assert registry.locate("hellaswag", subset_ok=True).subset["records"] == 1000

    data = resolve_data(QuickstartConfig(), say=lambda _: None)
    assert [f.name for f in data.corpus] == ["tinyshakespeare"]  # the share-alike corpora are not shipped
    assert [x["name"] for x in data.skipped] == ["wikitext2", "tinystories"]
    assert {f.origin for f in data.files()} == {"embedded"}
    assert data.hellaswag.path == str(EMBEDDED / "eval" / "hellaswag_val_first1000.jsonl")

    # GPTFORGE_DATA_DIR, when it holds a file, takes precedence; a named hub dataset is passed to its loader
    monkeypatch.setenv("GPTFORGE_DATA_DIR", str(data_dir))
    assert registry.locate("tinyshakespeare").origin == "GPTFORGE_DATA_DIR"
    data = resolve_data(QuickstartConfig(hellaswag="Rowan/hellaswag"), say=lambda _: None)
    assert [f.origin for f in data.files()] == ["GPTFORGE_DATA_DIR"] * 4 + ["hub"]
    assert data.hellaswag.path == "Rowan/hellaswag" and not data.skipped


def test_a_damaged_embedded_file_is_refused_with_one_line(no_data_dir, monkeypatch, capsys):
    copy = no_data_dir / "embedded"
    shutil.copytree(EMBEDDED, copy)
    target = copy / "pretrain" / "tinyshakespeare.txt"
    raw = bytearray(target.read_bytes())
    raw[1000] ^= 0x01
    target.write_bytes(bytes(raw))
    monkeypatch.setattr(registry, "EMBEDDED_DIR", copy)
    with pytest.raises(GptforgeError) as e:
        registry.resolve("tinyshakespeare")
    msg = str(e.value)
    assert "\n" not in msg and str(target) in msg and "damaged" in msg and "reinstall gptforge" in msg
    assert sha256_file(target) in msg and "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed" in msg
    assert main(["quickstart", "--smoke", "--out", str(no_data_dir / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gptforge: error: embedded data file") and "damaged" in err[0]
    assert not (no_data_dir / "run").exists()  # refused before any stage ran

    target.unlink()
    with pytest.raises(GptforgeError, match="embedded data file .* is missing"):
        registry.resolve("tinyshakespeare")


def test_quickstart_on_embedded_data_reports_where_its_data_came_from(no_data_dir, monkeypatch):
    monkeypatch.chdir(no_data_dir)
    cfg = smoke_config(str(no_data_dir / "run"))
    cfg.pretrain_steps, cfg.sft_batch_size, cfg.test_responses, cfg.hellaswag_items = 5, 32, 2, 4
    cfg.dpo, cfg.dpo_limit = True, 40  # the preference pairs are embedded too
    from gptforge.quickstart import run_quickstart

    summary = run_quickstart(cfg, say=lambda _: None)
    md = (no_data_dir / "run" / "report.md").read_text()
    assert "## Data" in md and "Data from embedded package data" in md and "gptforge/embedded/NOTICE" in md
    for info in registry.embedded_manifest().values():
        assert f"gptforge/embedded/{info['file']}" in md and info["sha256"] in md
    assert "wikitext2" in md and "CC BY-SA 3.0" in md  # the skipped corpora are named, with their license
    assert {f["origin"] for f in summary["data_sources"]["files"]} == {"embedded"}
    assert summary["eval"]["pretrain"]["hellaswag_items"] == 4
