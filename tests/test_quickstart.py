"""The main job end to end, in its seconds-long smoke variant, on the real default data."""

import json

import pytest

from gptforge.cli import main


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("qs") / "run"
    assert main(["quickstart", "--smoke", "--out", str(out)]) == 0
    return out


def test_quickstart_writes_report_with_numbers_charts_and_commands(smoke_run):
    md = (smoke_run / "report.md").read_text()
    html = (smoke_run / "report.html").read_text()
    for heading in ("Pretraining", "Instruction fine-tuning", "Evaluation", "Samples", "Reproduce or continue"):
        assert f"## {heading}" in md
    assert "gptforge chat --checkpoint" in md and "gptforge export" in md and "gptforge serve" in md
    assert "![pretraining" in md and (smoke_run / "pretrain" / "loss.png").is_file()
    assert html.count("data:image/png;base64,") >= 2 and "<img" in html and 'src="' in html
    assert "loss.png" not in html  # self-contained: no links to files beside it
    summary = json.loads((smoke_run / "summary.json").read_text())
    ev = summary["eval"]["pretrain"]
    assert 0 < ev["loss"] < 7 and ev["bits_per_byte"] > 0 and ev["hellaswag_items"] == 12
    assert summary["sft"]["best_val_loss"] < summary["sft"]["initial_val_loss"]
    assert summary["pretrain"]["final_val_loss"] < 6.2  # ln(512) = 6.24 at initialisation
    # GPTFORGE_DATA_DIR (set for the tests) takes precedence over the embedded copies: the report says so
    assert "## Data" in md and "$GPTFORGE_DATA_DIR/pretrain/tinyshakespeare.txt" in md
    assert "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed" in md  # its sha256
    files = summary["data_sources"]["files"]
    assert [f["name"] for f in files] == ["tinyshakespeare", "wikitext2", "tinystories", "instruction-data",
                                          "hellaswag"]
    assert {f["origin"] for f in files} == {"GPTFORGE_DATA_DIR"} and not summary["data_sources"]["skipped"]


def test_rerun_skips_completed_stages(smoke_run, capsys):
    assert main(["quickstart", "--smoke", "--out", str(smoke_run)]) == 0
    out = capsys.readouterr().out
    for stage in ("tokenizer", "data", "pretrain", "sft", "eval", "samples"):
        assert f"[{stage}] up to date, skipping" in out
    summary = json.loads((smoke_run / "summary.json").read_text())
    assert summary["skipped"] == ["tokenizer", "data", "pretrain", "sft", "eval", "samples"]


def test_changed_parameter_reruns_that_stage_and_downstream(smoke_run, capsys):
    assert main(["quickstart", "--smoke", "--out", str(smoke_run), "--hellaswag_items=8"]) == 0
    out = capsys.readouterr().out
    assert "[pretrain] up to date" in out and "[eval] running" in out
    summary = json.loads((smoke_run / "summary.json").read_text())
    assert summary["eval"]["sft"]["hellaswag_items"] == 8


def test_unknown_override_is_a_clear_error(tmp_path, capsys):
    assert main(["quickstart", "--smoke", "--out", str(tmp_path / "x"), "--pretrain_stepz=3"]) == 2
    assert "unknown key quickstart.pretrain_stepz" in capsys.readouterr().err


def test_offline_without_a_named_dataset_names_the_missing_file(tmp_path, capsys, monkeypatch):
    # a corpus the user names is required (the defaults fall back to the embedded copies or are skipped)
    monkeypatch.setenv("GPTFORGE_DATA_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("GPTFORGE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("GPTFORGE_OFFLINE", "1")
    assert main(["quickstart", "--smoke", "--out", str(tmp_path / "run"), "--corpus=[wikitext2]"]) == 2
    err = capsys.readouterr().err
    assert "wikitext2-raw-test.txt" in err and str(tmp_path / "empty") in err


def test_dpo_stage_runs_after_sft_and_reports_held_out_reward_accuracy(smoke_run, capsys):
    assert main(["quickstart", "--smoke", "--dpo", "--out", str(smoke_run)]) == 0
    out = capsys.readouterr().out
    assert "[sft] up to date" in out and "[dpo] running" in out
    summary = json.loads((smoke_run / "summary.json").read_text())
    before, after = summary["dpo"]["initial_test"], summary["dpo"]["test"]
    assert before["test_rewards_accuracies"] == 0.0 or before["test_rewards_margins"] == pytest.approx(0, abs=1e-3)
    assert 0 <= after["test_rewards_accuracies"] <= 1 and summary["dpo"]["steps"] > 0
    assert (smoke_run / "dpo" / "loss.png").is_file()
    md = (smoke_run / "report.md").read_text()
    assert "## Preference tuning (DPO)" in md and "gptforge dpo --checkpoint" in md
    prefs = [f for f in summary["data_sources"]["files"] if f["role"] == "preferences"]
    assert prefs and prefs[0]["sha256"] == "305315abf14f65fa42c01a0877572f832606571c2a7d49f152ac1d758b16756e"
