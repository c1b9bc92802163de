"""The modern family through every stage: quickstart --family modern (pretrain with Muon, SFT, eval, chat samples),
then classify (train and predict), generate, eval choice / icl, export to a stock class and serve, on real data."""

import json

import pytest

from gptforge.cli import main


@pytest.fixture(scope="module")
def modern_run(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("qs-modern") / "run"
    assert main(["quickstart", "--smoke", "--family", "modern", "--out", str(out)]) == 0
    return out


def test_quickstart_family_modern_trains_the_modern_preset_with_muon(modern_run):
    summary = json.loads((modern_run / "summary.json").read_text())
    assert summary["config"]["preset"] == "modern-tiny" and summary["config"]["optimizer"] == "muon"
    from gptforge.checkpoint import load_model

    for stage in ("pretrain", "sft"):
        model, _, _ = load_model(modern_run / stage)
        assert type(model).__name__ == "ModernGPT", stage
    assert summary["pretrain"]["final_val_loss"] < 6.2  # ln(512) = 6.24 at initialisation
    assert summary["sft"]["best_val_loss"] < summary["sft"]["initial_val_loss"]
    assert "--optim.name=muon" in (modern_run / "report.md").read_text()


def test_classify_train_and_predict_on_a_modern_base(modern_run, tmp_path, data_dir, capsys):
    rc = main(["classify", "--checkpoint", str(modern_run / "pretrain"), "--data",
               str(data_dir / "classify" / "SMSSpamCollection"), "--name", "c", "--out-dir", str(tmp_path),
               "--limit", "100", "--max-steps", "2", "--trainable", "last_blocks", "--device", "cpu"])
    assert rc == 0
    capsys.readouterr()
    rc = main(["classify", "predict", "--checkpoint", str(tmp_path / "c"), "--text", "free prize", "--json"])
    assert rc == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(row["probabilities"]) == {"ham", "spam"}


def test_generate_eval_and_icl_take_a_modern_checkpoint(modern_run, tmp_path, data_dir, capsys):
    sft = str(modern_run / "sft")
    assert main(["generate", "--checkpoint", sft, "--prompt", "Once upon a time", "--max-new-tokens", "8",
                 "--temperature", "0"]) == 0
    assert main(["eval", "choice", "--checkpoint", sft, "--task", "hellaswag", "--data",
                 str(data_dir / "eval" / "hellaswag_val.jsonl"), "--limit", "8", "--out",
                 str(tmp_path / "hs.json")]) == 0
    assert main(["eval", "icl", "--checkpoint", sft, "--data", str(data_dir / "eval" / "core" / "winogrande.jsonl"),
                 "--type", "schema", "--limit", "8", "--out", str(tmp_path / "wg.json")]) == 0
    assert json.loads((tmp_path / "wg.json").read_text())["n"] == 8


def test_export_of_the_modern_sft_model_serves_through_transformers(modern_run, tmp_path):
    transformers = pytest.importorskip("transformers")
    assert main(["export", "--checkpoint", str(modern_run / "sft"), "--out", str(tmp_path / "hf")]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert type(model).__name__ in ("LlamaForCausalLM", "Qwen3ForCausalLM")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert "Hi" in text
