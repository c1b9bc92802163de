"""Classification: labelled files, last-token head, freezing, and a spam classifier trained on the real SMS data."""

import json
from pathlib import Path

import pytest
import torch

from gptforge.checkpoint import save_model
from gptforge.cli import main as cli_main
from gptforge.config import load_config
from gptforge.errors import GptforgeError
from gptforge.model import GPT, GPTConfig
from gptforge.tokenizer import load_tokenizer
from gptforge.train.classify import (
    Classifier,
    ClassifyConfig,
    ClassifyDataConfig,
    balance_classes,
    class_order,
    collate,
    freeze,
    load_classifier,
    predict,
    read_labelled,
    run_classify,
)

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory, data_dir):
    """A randomly initialised 2-layer model with the GPT-2 tokenizer (the classifier learns from scratch)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50257, block_size=128, n_layer=2, n_head=2, n_embd=64))
    directory = tmp_path_factory.mktemp("cls") / "base"
    save_model(directory, model, load_tokenizer("gpt2"))
    return directory


def test_sms_spam_file_reads_as_label_then_text(data_dir):
    texts, labels, skipped = read_labelled(ClassifyDataConfig(path=str(data_dir / "classify" / "SMSSpamCollection")))
    assert len(texts) == 5574 and skipped == 0
    assert labels.count("ham") == 4827 and labels.count("spam") == 747
    assert labels[2] == "spam" and texts[2].startswith("Free entry in 2 a wkly comp")
    assert class_order(labels, []) == ["ham", "spam"]


def test_csv_with_header_and_jsonl_columns(tmp_path):
    csv_path = tmp_path / "d.csv"
    csv_path.write_text('Label,Text\nspam,"Win cash, now"\nham,see you\n')
    texts, labels, _ = read_labelled(ClassifyDataConfig(path=str(csv_path), text_column="Text", label_column="Label"))
    assert texts == ["Win cash, now", "see you"] and labels == ["spam", "ham"]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"sentence": "great", "y": 1}\n{"sentence": "awful", "y": 0}\n')
    texts, labels, _ = read_labelled(ClassifyDataConfig(path=str(jsonl), text_column="sentence", label_column="y"))
    assert texts == ["great", "awful"] and class_order(labels, []) == ["0", "1"]


def test_bad_rows_name_file_and_line_or_are_skipped(tmp_path):
    p = tmp_path / "d.tsv"
    p.write_text("ham\thello\nspam\nham\tbye\n")
    with pytest.raises(GptforgeError, match=r"d.tsv:2: expected at least 2 columns.*--skip-bad"):
        read_labelled(ClassifyDataConfig(path=str(p)))
    texts, _, skipped = read_labelled(ClassifyDataConfig(path=str(p), skip_bad=True))
    assert skipped == 1 and texts == ["hello", "bye"]
    with pytest.raises(GptforgeError, match="at least two classes"):
        class_order(["ham", "ham"], [])
    with pytest.raises(GptforgeError, match="not in data.labels"):
        class_order(["ham", "spam"], ["ham"])


def test_balancing_downsamples_to_the_smallest_class():
    targets = [0] * 90 + [1] * 10
    kept = balance_classes(list(range(100)), targets, seed=0)
    assert len(kept) == 20 and sum(targets[i] for i in kept) == 10
    assert kept == balance_classes(list(range(100)), targets, seed=0)


def test_head_reads_the_last_real_token_regardless_of_padding():
    torch.manual_seed(0)
    model = Classifier(GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=16)), 3).eval()
    short, long = [5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9]
    x, lengths = collate([short, long], pad_id=0)
    with torch.no_grad():
        batched = model(x, lengths)
        alone = model(torch.tensor([short]), torch.tensor([3]))
    torch.testing.assert_close(batched[0], alone[0])
    assert batched.shape == (2, 3)


@pytest.mark.parametrize("mode,expected", [
    ("all", None), ("head", "head"), ("last_blocks", "last"),
])
def test_freezing_modes(mode, expected):
    model = Classifier(GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=3, n_head=2, n_embd=16)), 2)
    n = freeze(model, mode, last_k=1)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    if expected is None:
        assert n == sum(p.numel() for p in model.parameters())
    elif expected == "head":
        assert trainable == {"head.weight", "head.bias"}
    else:
        assert {"head.weight", "gpt.transformer.ln_f.weight", "gpt.transformer.h.2.mlp.c_fc.weight"} <= trainable
        assert not any(name.startswith(("gpt.transformer.h.0.", "gpt.transformer.h.1.", "gpt.transformer.wte"))
                       for name in trainable)


def test_spam_classifier_beats_the_majority_class_on_real_sms(tiny_gpt2, tmp_path, data_dir):
    config = load_config(ClassifyConfig, None, {
        "base": str(tiny_gpt2), "out_dir": str(tmp_path), "name": "spam",
        "data": {"path": str(data_dir / "classify" / "SMSSpamCollection"), "balance": True, "max_len": 64},
        "train": {"epochs": 1, "batch_size": 16, "trainable": "all", "device": "cpu", "precision": "fp32"},
        "optim": {"lr": 1e-3},
    })
    result = run_classify(config, progress=False)
    val = result.metrics["val"]
    print(f"SMS spam (balanced): val accuracy {val.accuracy:.2%} vs majority {result.majority_rate:.2%}; "
          f"test {result.metrics['test'].accuracy:.2%}")
    assert result.majority_rate == pytest.approx(0.5, abs=0.05)
    assert val.accuracy >= 0.85
    assert result.metrics["test"].accuracy >= 0.8
    assert sum(map(sum, val.confusion)) == val.size == 149
    run = result.run_dir
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "results.json", "ckpt/best", "ckpt/latest"):
        assert (run / name).exists(), name
    saved = json.loads((run / "results.json").read_text())
    assert saved["metrics"]["val"]["accuracy"] == val.accuracy and saved["labels"] == ["ham", "spam"]

    # the saved classifier predicts the same way, with probabilities that sum to one
    model, tokenizer, info = load_classifier(run)
    spam = "WINNER!! As a valued network customer you have been selected to receivea £900 prize reward! To claim call 09061701461."
    rows = predict(model, tokenizer, info, [spam, "Ok lar... Joking wif u oni..."])
    assert rows[0]["label"] == "spam" and rows[1]["label"] == "ham"
    assert sum(rows[0]["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)


def test_predict_command_prints_probabilities(tiny_gpt2, tmp_path, data_dir, capsys):
    rc = cli_main(["classify", "--checkpoint", str(tiny_gpt2), "--data", str(data_dir / "classify" / "SMSSpamCollection"),
                   "--name", "c", "--out-dir", str(tmp_path), "--limit", "100", "--max-steps", "2",
                   "--trainable", "head", "--device", "cpu"])
    assert rc == 0
    capsys.readouterr()
    rc = cli_main(["classify", "predict", "--checkpoint", str(tmp_path / "c"), "--text", "free prize", "--json"])
    assert rc == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(row["probabilities"]) == {"ham", "spam"} and row["text"] == "free prize"
    assert cli_main(["classify", "predict", "--checkpoint", str(tmp_path / "c")]) == 2
    assert "nothing to classify" in capsys.readouterr().err


def test_classify_recipe_loads():
    config = load_config(ClassifyConfig, ROOT / "recipes" / "classify-sms-spam.yaml").validate()
    assert config.train.trainable == "last_blocks" and config.train.last_k == 1
    assert config.data.balance and config.train.dropout == 0.0 and config.data.split == [0.7, 0.1, 0.2]
