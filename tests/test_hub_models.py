"""Models by Hub name: `gptforge import openai-community/gpt2`, `--checkpoint gpt2`; offline, a one-line error."""

from __future__ import annotations

import pytest

from gptforge.cli import main


def test_hub_names_resolve_to_repos_and_local_paths_win(tmp_path, monkeypatch):
    from gptforge.hub_models import hub_repo

    assert hub_repo("gpt2") == "openai-community/gpt2" and hub_repo("gpt2-xl") == "openai-community/gpt2-xl"
    assert hub_repo("me/my-model") == "me/my-model"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gpt2").mkdir()
    assert hub_repo("gpt2") is None  # a local directory of that name is what the user means
    assert hub_repo("./x/y") is None and hub_repo("/abs/path") is None


def test_import_and_checkpoint_by_hub_name(make_tiny_model, tmp_path, monkeypatch, capsys):
    """The download itself needs the network; the snapshot function is replaced by the local export it would
    produce, so everything after it (import, --checkpoint gpt2 in generate) runs for real."""
    import huggingface_hub

    from gptforge.hf import export_model

    model, tok = make_tiny_model()
    snapshot = export_model(model, tok, tmp_path / "snapshot")
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, local_files_only=False):
        calls.append((repo_id, local_files_only))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.chdir(tmp_path)
    assert main(["import", "openai-community/gpt2", "--out", str(tmp_path / "ckpt")]) == 0
    assert (tmp_path / "ckpt" / "model.safetensors").is_file()
    assert main(["generate", "--checkpoint", "gpt2", "--prompt", "Hello", "--max-new-tokens", "3", "--greedy",
                 "--no-stream"]) == 0
    assert calls[0][0] == calls[1][0] == "openai-community/gpt2"


def test_offline_without_a_cached_copy_is_one_line(tmp_path, monkeypatch, capsys):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.chdir(tmp_path)
    assert main(["import", "openai-community/gpt2-xl", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gptforge: error: cannot get the Hub model openai-community/gpt2-xl")
    assert main(["generate", "--checkpoint", "no-such/model", "--prompt", "a"]) == 2
    assert "checkpoint not found: no-such/model is not a local path" in capsys.readouterr().err
