"""Instruction SFT end to end on real data, from a tiny model pretrained inside the test session."""

import json
import math
from pathlib import Path

import pytest
import torch

from gptforge.checkpoint import load_model
from gptforge.cli import main as cli_main
from gptforge.config import load_config
from gptforge.errors import GptforgeError
from gptforge.model import GPT, GPTConfig
from gptforge.tokenizer import IM_END, IM_START
from gptforge.train.sft import SFTConfig, neftune_hook, resize_vocab, run_sft

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # fixtures one_thread, tiny_base: conftest.py


def _config(base, out_dir, **sections) -> SFTConfig:
    tree = {"base": str(base), "out_dir": str(out_dir), "name": "run",
            "data": {}, "train": {"device": "cpu", "precision": "fp32"}, "optim": {}, "generate": {}}
    for section, values in sections.items():
        if isinstance(values, dict):
            tree[section].update(values)
        else:
            tree[section] = values
    return load_config(SFTConfig, None, tree)


def test_sft_on_real_instructions_lowers_val_loss_and_learns_to_stop(tiny_base, tmp_path, data_dir):
    config = _config(tiny_base, tmp_path, name="chat",
                     data={"sources": [str(data_dir / "instruct" / "instruction-data.json")], "limit": 300},
                     train={"epochs": 4, "batch_size": 16, "neftune_alpha": 5.0},
                     optim={"lr": 2e-3, "warmup_ratio": 0.05},
                     generate={"max_new_tokens": 48})
    result = run_sft(config, progress=False)

    assert result.best_val_loss < result.initial_val_loss - 1.0, (result.initial_val_loss, result.val_losses)
    assert result.best_val_loss == min(result.val_losses)
    assert result.stop_rate >= 0.6, result.stop_rate  # ends its answers with <|im_end|> on most test prompts
    records = json.loads((result.run_dir / "test_responses.json").read_text())
    assert len(records) == 30  # 10 % of 300
    assert set(records[0]) >= {"instruction", "input", "reference", "response", "model"}
    assert all(IM_END not in r["response"] for r in records)

    run = result.run_dir
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "summary.json", "ckpt/best", "ckpt/latest"):
        assert (run / name).exists(), name
    assert (run / "ckpt" / "latest").read_text().strip() == result.checkpoint.name
    # the checkpoint carries the grown vocabulary, the new tokens and the chat template
    model, tokenizer, meta = load_model(run, device="cpu")
    assert {IM_START, IM_END} <= set(tokenizer.special_tokens)
    assert model.config.vocab_size == tokenizer.vocab_size == 1026
    assert "<|im_start|>" in tokenizer.chat_template
    assert meta["sft"]["style"] == "chat"


def test_early_stopping_restores_the_best_weights(tiny_base, tmp_path, data_dir):
    # an absurd learning rate makes validation loss rise after the first evaluation
    config = _config(tiny_base, tmp_path, name="early",
                     data={"sources": [str(data_dir / "instruct" / "instruction-data.json")], "limit": 120,
                           "style": "alpaca", "batching": "pack", "max_len": 256},
                     train={"epochs": 20, "batch_size": 4, "eval_every": 2, "patience": 2, "grad_clip": 0.0},
                     optim={"lr": 0.05, "warmup_ratio": 0.0, "schedule": "constant"},
                     generate={"enabled": False})
    result = run_sft(config, progress=False)
    assert result.stopped_early
    assert result.steps < 20 * 100
    best = min(result.val_losses)
    assert result.best_val_loss == best
    assert result.val_losses[-1] > best and result.val_losses[-2] > best  # patience 2 used up
    # the saved final model is the best one: its validation loss is the best loss, not the last
    from gptforge.data.chat import encode_dataset, load_records, prompt_style, split_indices, to_conversations
    from gptforge.train.sft import evaluate_loss

    model, tokenizer, _ = load_model(result.run_dir, device="cpu")
    convs, _ = to_conversations(load_records(config.data.sources[0]))
    import random

    random.Random(0).shuffle(convs)
    convs = convs[:120]
    val = [convs[i] for i in split_indices(120, [0.85, 0.05, 0.10], 0)[1]]
    examples, _ = encode_dataset(val, tokenizer, prompt_style("alpaca"), 256, progress=False)
    from contextlib import nullcontext

    loss = evaluate_loss(model, examples, 16, tokenizer.eot_id, "cpu", nullcontext())
    assert math.isclose(loss, best, rel_tol=1e-4)


@pytest.mark.parametrize("tied", [True, False])
def test_resize_vocab_initialises_new_rows_to_the_mean_and_keeps_old_logits(tied):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=100, block_size=16, n_layer=1, n_head=2, n_embd=16, tie_embeddings=tied)).eval()
    x = torch.randint(0, 100, (2, 8))
    with torch.no_grad():
        before, _ = model(x)
    old_wte = model.transformer.wte.weight.detach().clone()
    old_head = model.lm_head.weight.detach().clone()
    resize_vocab(model, 102)
    assert model.config.vocab_size == 102 and model.transformer.wte.weight.shape == (102, 16)
    assert model.lm_head.weight.shape == (102, 16)
    assert (model.lm_head.weight is model.transformer.wte.weight) == tied
    torch.testing.assert_close(model.transformer.wte.weight[100], old_wte.mean(0))
    torch.testing.assert_close(model.lm_head.weight[101], old_head.mean(0))
    with torch.no_grad():
        after, _ = model(x)
    torch.testing.assert_close(after[..., :100], before)


def test_chat_tokens_reuse_spare_rows_of_a_padded_vocabulary():
    from gptforge.data.chat import prompt_style
    from gptforge.tokenizer import load_tokenizer
    from gptforge.train.sft import prepare_chat_model

    torch.manual_seed(0)
    tokenizer = load_tokenizer("gpt2")
    model = GPT(GPTConfig(vocab_size=50304, block_size=16, n_layer=1, n_head=2, n_embd=8))  # padded for speed
    added = prepare_chat_model(model, tokenizer, prompt_style("chat"))
    assert added == [IM_START, IM_END] and model.config.vocab_size == 50304  # no resize needed
    rows = model.transformer.wte.weight.detach()
    torch.testing.assert_close(rows[50258], rows[:50257].mean(0))
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template


def test_neftune_noise_has_the_paper_scale():
    torch.manual_seed(0)
    x = torch.zeros(4, 50, 32)
    noisy = neftune_hook(5.0)(x)
    bound = 5.0 / math.sqrt(50 * 32)
    assert noisy.abs().max() <= bound
    assert noisy.abs().mean() == pytest.approx(bound / 2, rel=0.05)  # uniform(-b, b) has mean |x| = b/2


@pytest.mark.parametrize("recipe,check", [
    ("sft-alpaca-dolly.yaml", lambda c: c.train.neftune_alpha == 5.0 and c.train.patience == 3
     and c.data.style == "chat" and c.data.split == [0.9, 0.1, 0.0] and c.train.batch_size * c.train.grad_accum == 32),
    ("sft-alpaca-gpt2-2epochs.yaml", lambda c: c.train.epochs == 2 and c.data.style == "alpaca"
     and c.data.split == [0.85, 0.05, 0.10]),
])
def test_sft_recipes_load_into_the_config(recipe, check):
    config = load_config(SFTConfig, ROOT / "recipes" / recipe)
    assert check(config.validate())


def test_cli_reports_bad_records_with_their_index(tiny_base, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "a", "input": "", "output": "b"}, {"instruction": "c", "input": ""}]))
    rc = cli_main(["sft", "--checkpoint", str(tiny_base), "--data", str(bad), "--out-dir", str(tmp_path)])
    assert rc == 2
    assert "record 1: missing field 'output'" in capsys.readouterr().err
    rc = cli_main(["sft", "--data", str(bad)])
    assert rc == 2 and "--checkpoint" in capsys.readouterr().err


def test_cli_runs_a_short_sft_with_overrides(tiny_base, tmp_path, data_dir):
    rc = cli_main(["sft", "--checkpoint", str(tiny_base), "--data", str(data_dir / "instruct" / "sharegpt-dummy.json"),
                   "--name", "cli", "--out-dir", str(tmp_path), "--limit", "60", "--max-steps", "3",
                   "--batching", "group", "--train-on", "last", "--max-new-tokens", "4", "--device", "cpu",
                   "--optim.lr=1e-3"])
    assert rc == 0
    lines = [json.loads(x) for x in (tmp_path / "cli" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == [1, 2, 3]  # one schema: every step, 1-based
    assert json.loads((tmp_path / "cli" / "summary.json").read_text())["steps"] == 3
    with pytest.raises(GptforgeError, match="unknown key"):
        load_config(SFTConfig, None, ["--train.nope=1"])
