"""Preference tuning (DPO/IPO/SimPO) on the book's real preference pairs, from a tiny SFT model made in the session."""

import json
import math
import shutil
import types
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gptforge.checkpoint import load_model
from gptforge.cli import main as cli_main
from gptforge.config import load_config
from gptforge.data.chat import encode_prompt, load_records, style_for
from gptforge.data.preferences import encode_pairs, to_pair, to_pairs
from gptforge.errors import GptforgeError
from gptforge.model import IGNORE_INDEX
from gptforge.tokenizer import IM_END
from gptforge.train.dpo import DPOConfig, run_dpo
from gptforge.train.dpo_loss import DPOLossConfig, pair_batch, pair_forward

pytestmark = pytest.mark.usefixtures("one_thread")  # fixtures one_thread, tiny_base, data_dir: conftest.py


@pytest.fixture(scope="module")
def prefs(data_dir) -> Path:
    return data_dir / "instruct" / "instruction-data-with-preference.json"


@pytest.fixture(scope="module")
def sft_model(tiny_base, data_dir, tmp_path_factory) -> Path:
    """The tiny base briefly fine-tuned on the book's instructions (ChatML template, <|im_end|> added)."""
    from gptforge.train.sft import SFTConfig, run_sft

    config = load_config(SFTConfig, None, {
        "base": str(tiny_base), "out_dir": str(tmp_path_factory.mktemp("sft")), "name": "sft",
        "data": {"sources": [str(data_dir / "instruct" / "instruction-data.json")], "limit": 160, "max_len": 192,
                 "overlength": "truncate", "split": [1.0, 0.0, 0.0]},
        "train": {"epochs": 1, "batch_size": 16, "device": "cpu", "precision": "fp32"},
        "optim": {"lr": 2e-3}, "generate": {"enabled": False}, "log": {"progress": False, "plot": False}})
    return run_sft(config, log=lambda *a: None, progress=False).run_dir


def _config(base, out_dir, prefs, **sections) -> DPOConfig:
    tree = {"base": str(base), "out_dir": str(out_dir), "name": "run",
            "data": {"sources": [str(prefs)], "max_len": 192, "overlength": "truncate"},
            "train": {"device": "cpu", "precision": "fp32"}, "log": {"progress": False, "plot": False}}
    for section, values in sections.items():
        tree[section] = {**tree.get(section, {}), **values} if isinstance(values, dict) else values
    return load_config(DPOConfig, None, tree)


def _real_pairs(sft_model, prefs, n=8, start=0):
    _, tokenizer, _ = load_model(sft_model)
    style = style_for(tokenizer)
    pairs, _ = to_pairs(load_records(prefs)[start:start + n], source=str(prefs))
    encoded, _ = encode_pairs(pairs, tokenizer, style, 192, "truncate", progress=False)
    return pairs, encoded, tokenizer, style


# ---- data ---------------------------------------------------------------------------------------------------


def test_every_layout_gives_the_same_pair(prefs):
    book = load_records(prefs)[1]  # {instruction, input, output, chosen, rejected}
    user = f"{book['instruction']}\n\n{book['input']}"
    asst = lambda text: [{"role": "assistant", "content": text}]
    convo = lambda text: [{"role": "user", "content": user}, *asst(text)]
    layouts = {
        "trl standard": {"prompt": user, "chosen": book["chosen"], "rejected": book["rejected"]},
        "trl conversational": {"prompt": [{"role": "user", "content": user}], "chosen": asst(book["chosen"]),
                               "rejected": asst(book["rejected"])},
        "implicit prompt": {"chosen": convo(book["chosen"]), "rejected": convo(book["rejected"])},
        "ultrafeedback": {"prompt": user, "chosen": convo(book["chosen"]), "rejected": convo(book["rejected"])},
        "anthropic hh": {"chosen": f"\n\nHuman: {user}\n\nAssistant: {book['chosen']}",
                         "rejected": f"\n\nHuman: {user}\n\nAssistant: {book['rejected']}"},
    }
    for name, record in layouts.items():
        pair = to_pair(record, 7)
        assert pair.prompt == [{"role": "user", "content": user}], name
        assert pair.chosen == asst(book["chosen"]) and pair.rejected == asst(book["rejected"]), name
    pair = to_pair(book, 1)  # the book's layout keeps instruction and input apart, as SFT's alpaca reader does
    assert pair.prompt == [{"role": "user", "content": book["instruction"], "input": book["input"]}]
    assert pair.chosen == asst(book["chosen"])
    # a multi-turn conversation: the shared beginning (an earlier assistant turn included) is the prompt
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
               {"role": "user", "content": user}]
    pair = to_pair({"chosen": history + asst("Yes."), "rejected": history + asst("No.")}, 0)
    assert pair.prompt == history and pair.chosen == asst("Yes.")


def test_masks_label_only_the_answers_and_both_sides_share_the_prompt_ids(sft_model, prefs):
    pairs, encoded, tokenizer, style = _real_pairs(sft_model, prefs)
    im_end = tokenizer.special_tokens[IM_END]
    assert style.name == "chat"
    for pair, enc in zip(pairs, encoded):
        prompt_ids = encode_prompt(pair.prompt, tokenizer, style)  # exactly what inference feeds the model
        n = enc.prompt_len
        assert n == len(prompt_ids)
        for ex, answer in ((enc.chosen, pair.chosen), (enc.rejected, pair.rejected)):
            assert ex.ids[:n] == prompt_ids
            assert all(t == IGNORE_INDEX for t in ex.labels[:n])
            labelled = [t for t in ex.labels if t != IGNORE_INDEX]
            assert labelled == ex.ids[n:n + len(labelled)]  # one contiguous answer right after the prompt
            assert labelled[-1] == im_end  # the end-of-turn token is learned; the newline after it is not
            assert tokenizer.decode(labelled[:-1]) == answer[0]["content"]
    # a multi-turn prompt: its earlier assistant turn is context, never labelled
    pair = to_pair({"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                               {"role": "user", "content": "Name a colour."},
                               {"role": "assistant", "content": "Blue."}],
                    "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                                 {"role": "user", "content": "Name a colour."},
                                 {"role": "assistant", "content": "No."}]}, 0)
    (enc,), _ = encode_pairs([pair], tokenizer, style, 192, progress=False)
    assert tokenizer.decode([t for t in enc.chosen.labels if t != IGNORE_INDEX]) == f"Blue.{IM_END}"


def test_malformed_records_fail_in_one_line_naming_the_record(sft_model, prefs, tmp_path, capsys):
    good = load_records(prefs)[:3]
    cases = {
        "no_rejected": ({k: v for k, v in good[0].items() if k != "rejected"}, "record 2: missing field(s) ['rejected']"),
        "empty_chosen": ({**good[0], "chosen": "  "}, "record 2 (chosen): field 'chosen' is empty"),
        "user_last": ({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                       "rejected": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                    {"role": "user", "content": "c"}]},
                      "record 2: the chosen conversation is the beginning of the other one"),
        "bad_role": ({"prompt": [{"role": "robot", "content": "x"}], "chosen": "a", "rejected": "b"},
                     "record 2 (chosen), turn 0: unknown role 'robot'"),
        "no_prompt": ({"chosen": "a", "rejected": "b"}, "record 2: cannot tell the layout"),
    }
    for name, (bad, message) in cases.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps([good[0], good[1], bad]))
        with pytest.raises(GptforgeError) as err:
            to_pairs(load_records(path), source=str(path))
        assert message in str(err.value) and "--skip-bad" in str(err.value), (name, str(err.value))
    # the CLI prints it in one line and exits 2
    rc = cli_main(["dpo", "--checkpoint", str(sft_model), "--data", str(path), "--out-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "record 2: cannot tell the layout" in err
    # --skip-bad counts it; a pair whose sides are identical carries no preference and is counted, not trained
    pairs, stats = to_pairs([*good, bad, {**good[0], "rejected": good[0]["chosen"]}], skip_bad=True)
    assert len(pairs) == 3 and stats.skipped_bad == 1 and stats.identical == 1
    # a side left without answer tokens (cut by max_len) is an error naming the record, or a counted skip
    _, tokenizer, _ = load_model(sft_model)
    with pytest.raises(GptforgeError, match=r"record 0: no answer token is supervised in chosen and rejected"):
        encode_pairs(pairs[:1], tokenizer, style_for(tokenizer), 12, "truncate", progress=False)
    with pytest.raises(GptforgeError, match=r"no usable pair among 3 \(.*3 without answer tokens skipped"):
        encode_pairs(pairs, tokenizer, style_for(tokenizer), 12, "truncate", skip_bad=True, progress=False)


# ---- the losses against independent computations ------------------------------------------------------------


@torch.no_grad()
def _answer_logps(model, enc_pairs):
    """Summed and per-token log-probs of each side's answer, written out position by position."""
    out = []
    for enc in enc_pairs:
        row = []
        for ex in (enc.chosen, enc.rejected):
            logits, _ = model(torch.tensor([ex.ids[:-1]]))
            logp = torch.log_softmax(logits[0].double(), dim=-1)
            picks = [logp[i - 1, ex.ids[i]] for i in range(1, len(ex.ids)) if ex.labels[i] != IGNORE_INDEX]
            row.append((float(sum(picks)), len(picks)))
        out.append(row)
    return out


@pytest.fixture(scope="module")
def two_models(sft_model):
    """The SFT model as reference and a perturbed copy of it as policy (so the log-ratios are not zero)."""
    ref, _, _ = load_model(sft_model)
    policy, _, _ = load_model(sft_model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    return policy.eval(), ref.eval()


def _ours(loss_type, policy, ref, enc, **kw):
    cfg = DPOLossConfig(loss_type=loss_type, **kw)
    for p, (c, r) in zip(enc, _answer_logps(ref, enc)):
        p.ref_chosen, p.ref_rejected = c[0], r[0]
    with torch.no_grad():
        losses, rows = pair_forward(policy, pair_batch(enc, 0), cfg)
    return losses.double(), rows


def test_dpo_loss_equals_the_formula_and_trl_on_a_real_batch(two_models, sft_model, prefs):
    policy, ref = two_models
    _, enc, _, _ = _real_pairs(sft_model, prefs, n=6)
    beta = 0.3
    losses, rows = _ours("sigmoid", policy, ref, enc, beta=beta)
    pol, rf = _answer_logps(policy, enc), _answer_logps(ref, enc)
    h = torch.tensor([(pc - rc) - (pr - rr) for ((pc, _), (pr, _)), ((rc, _), (rr, _)) in zip(pol, rf)],
                     dtype=torch.float64)
    expected = torch.log1p(torch.exp(-beta * h))  # -log σ(β h)
    assert h.abs().min() > 1e-3  # a real test: the log-ratios differ
    torch.testing.assert_close(losses, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(rows[:, 1], beta * torch.tensor([pc - rc for ((pc, _), _), ((rc, _), _) in
                                                                 zip(pol, rf)], dtype=torch.float64),
                               rtol=1e-4, atol=1e-4)  # rewards/chosen
    assert rows[:, 4].tolist() == (h > 0).double().tolist()  # rewards/accuracies
    # conservative DPO (label smoothing ε): -(1-ε) log σ(βh) - ε log σ(-βh)
    smoothed, _ = _ours("sigmoid", policy, ref, enc, beta=beta, label_smoothing=0.2)
    torch.testing.assert_close(smoothed, 0.8 * expected + 0.2 * torch.log1p(torch.exp(beta * h)),
                               rtol=1e-4, atol=1e-5)

    # TRL's own DPO loss, with its own forward of the same weights as a transformers GPT-2
    trl = pytest.importorskip("trl")
    from trl.trainer.dpo_trainer import DPOTrainer

    trl_losses = _trl_dpo(DPOTrainer, trl, policy, enc, "sigmoid", beta)
    torch.testing.assert_close(losses.mean(), trl_losses, rtol=1e-4, atol=1e-5)
    # TRL's CPO sigmoid loss, given log-ratios instead of log-probs, is conservative DPO with label smoothing
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    cpo = types.SimpleNamespace(alpha=0.0, loss_type="sigmoid", beta=beta, label_smoothing=0.2,
                                accelerator=types.SimpleNamespace(device="cpu"))
    ratios = torch.tensor([[pc - rc, pr - rr] for ((pc, _), (pr, _)), ((rc, _), (rr, _)) in zip(pol, rf)])
    trl_smoothed, _, _ = CPOTrainer.cpo_loss(cpo, ratios[:, 0], ratios[:, 1])
    torch.testing.assert_close(smoothed.float(), trl_smoothed.float(), rtol=1e-4, atol=1e-5)


def _trl_dpo(DPOTrainer, trl, policy, enc, loss_type, beta):
    """``DPOTrainer._compute_loss`` on a transformers copy of ``policy`` with our reference log-probs."""
    from transformers import GPT2LMHeadModel
    from trl.trainer.utils import add_fused_lm_head

    from gptforge.hf import hf_config, to_hf_state_dict

    hf = GPT2LMHeadModel(hf_config(policy.config))
    hf.load_state_dict(to_hf_state_dict(policy), strict=False)
    hf.tie_weights()
    hf.eval()
    add_fused_lm_head(hf, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    rows = [p.chosen for p in enc] + [p.rejected for p in enc]
    T = max(len(e.ids) for e in rows)
    input_ids = torch.zeros(len(rows), T, dtype=torch.long)
    attention = torch.zeros(len(rows), T, dtype=torch.long)
    completion = torch.zeros(len(rows), T, dtype=torch.long)
    for i, e in enumerate(rows):
        input_ids[i, :len(e.ids)] = torch.tensor(e.ids)
        attention[i, :len(e.ids)] = 1
        completion[i, :len(e.ids)] = torch.tensor([int(t != IGNORE_INDEX) for t in e.labels])
    inputs = {"input_ids": input_ids, "attention_mask": attention, "completion_mask": completion,
              "ref_chosen_logps": torch.tensor([p.ref_chosen for p in enc]),
              "ref_rejected_logps": torch.tensor([p.ref_rejected for p in enc])}
    accel = types.SimpleNamespace(device=torch.device("cpu"), gather=lambda t: t, gather_for_metrics=lambda t: t)
    fake = types.SimpleNamespace(model=hf, accelerator=accel, aux_loss_enabled=False, ld_alpha=None,
                                 precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type],
                                 loss_weights=[1.0], beta=beta, use_weighting=False, label_smoothing=0.0,
                                 _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
                                 _total_train_tokens=0, _tp_size=1)
    with torch.no_grad():
        return DPOTrainer._compute_loss(fake, hf, inputs, False).double()


def test_ipo_and_simpo_losses_equal_their_formulas(two_models, sft_model, prefs):
    policy, ref = two_models
    _, enc, _, _ = _real_pairs(sft_model, prefs, n=6, start=20)
    pol, rf = _answer_logps(policy, enc), _answer_logps(ref, enc)
    # IPO (Azar et al. Eq. 17, per-token log-ratios as in TRL): (h - 1/(2τ))²
    tau = 0.5
    ipo, _ = _ours("ipo", policy, ref, enc, beta=tau)
    h = torch.tensor([(pc - rc) / n_c - (pr - rr) / n_r for ((pc, n_c), (pr, n_r)), ((rc, _), (rr, _))
                      in zip(pol, rf)], dtype=torch.float64)
    torch.testing.assert_close(ipo, (h - 1 / (2 * tau)) ** 2, rtol=1e-4, atol=1e-5)
    # SimPO (Meng et al. Eq. 6): -log σ(β/|y_w| log π(y_w) - β/|y_l| log π(y_l) - γ), no reference at all
    beta, gamma = 2.0, 0.8
    for p in enc:
        p.ref_chosen = p.ref_rejected = None
    with torch.no_grad():
        simpo, _ = pair_forward(policy, pair_batch(enc, 0), DPOLossConfig("simpo", beta, simpo_gamma=gamma))
    margin = torch.tensor([beta * pc / n_c - beta * pr / n_r - gamma for (pc, n_c), (pr, n_r) in pol],
                          dtype=torch.float64)
    torch.testing.assert_close(simpo.double(), torch.log1p(torch.exp(-margin)), rtol=1e-4, atol=1e-5)

    trl = pytest.importorskip("trl")
    from trl.experimental.cpo.cpo_trainer import CPOTrainer
    from trl.trainer.dpo_trainer import DPOTrainer

    for p, ((rc, _), (rr, _)) in zip(enc, rf):
        p.ref_chosen, p.ref_rejected = rc, rr
    torch.testing.assert_close(ipo.mean(), _trl_dpo(DPOTrainer, trl, policy, enc, "ipo", tau), rtol=1e-4, atol=1e-5)
    cpo = types.SimpleNamespace(alpha=0.0, loss_type="simpo", beta=beta, simpo_gamma=gamma, label_smoothing=0.0,
                                accelerator=types.SimpleNamespace(device="cpu"))
    avg = torch.tensor([[pc / n_c, pr / n_r] for (pc, n_c), (pr, n_r) in pol])
    trl_simpo, _, _ = CPOTrainer.cpo_loss(cpo, avg[:, 0], avg[:, 1])
    torch.testing.assert_close(simpo.float(), trl_simpo.float(), rtol=1e-4, atol=1e-5)


# ---- training -----------------------------------------------------------------------------------------------


def test_a_few_dpo_steps_raise_reward_accuracy_on_the_training_batch(sft_model, prefs, tmp_path):
    rc = cli_main(["dpo", "--checkpoint", str(sft_model), "--data", str(prefs), "--out-dir", str(tmp_path),
                   "--name", "dpo", "--limit", "24", "--split", "1,0,0", "--batch-size", "24", "--max-steps", "8",
                   "--lr", "3e-3", "--beta", "0.5", "--max-len", "192", "--data.overlength=truncate",
                   "--optim.warmup_ratio=0", "--optim.schedule=constant", "--train.precision=fp32",
                   "--log.progress=false", "--device", "cpu"])
    assert rc == 0
    run = tmp_path / "dpo"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))
    assert {"rewards_chosen", "rewards_rejected", "rewards_margins", "rewards_accuracies", "logps_chosen",
            "logps_rejected", "logps_accuracy", "train_accuracy", "lr", "grad_norm", "tokens", "pairs"} <= set(steps[0])
    # step 1 sees the policy equal to the reference: every reward is 0 and the loss is log 2
    assert steps[0]["rewards_accuracies"] == 0.0 and abs(steps[0]["loss"] - math.log(2)) < 1e-6
    # each step's metrics are of the (whole) training batch before its update
    assert steps[-1]["rewards_accuracies"] >= 0.9, [s["rewards_accuracies"] for s in steps]
    assert steps[-1]["rewards_margins"] > 0 and steps[-1]["loss"] < 0.5
    assert steps[-1]["logps_accuracy"] > steps[0]["logps_accuracy"]
    for name in ("config.yaml", "summary.json", "ckpt/latest"):
        assert (run / name).exists(), name
    _, tokenizer, meta = load_model(run)
    assert meta["dpo"]["loss_type"] == "sigmoid" and "<|im_start|>" in tokenizer.chat_template


def test_resume_is_exact_with_precomputed_reference_and_ends_on_the_best(sft_model, prefs, tmp_path):
    config = _config(sft_model, tmp_path, prefs, data={"limit": 60, "split": [0.8, 0.2, 0.0]},
                     dpo={"precompute_ref": True, "beta": 0.5},
                     train={"batch_size": 4, "max_steps": 7, "eval_every": 3, "dropout": 0.1},
                     optim={"lr": 2e-3, "warmup_ratio": 0.0}, checkpoint={"interval": 2, "keep_last": 10})
    full = run_dpo(config, log=lambda *a: None, progress=False)
    ckpt = full.run_dir / "ckpt"
    assert full.steps == 7 and (full.run_dir / "ref_logps.json").is_file()
    assert full.initial_val["val_rewards_accuracies"] == 0.0 and abs(full.initial_val["val_loss"] - math.log(2)) < 1e-6
    assert [v["step"] for v in full.val_history] == [3, 6, 7]
    best = min(full.val_history, key=lambda v: v["val_loss"])
    assert full.best_val == best and (ckpt / "latest").read_text().strip() == f"step_{best['step']:07d}"
    reference = load_file(str(ckpt / "step_0000007" / "model.safetensors"))
    for later in ("step_0000006", "step_0000007"):  # a kill after step 4: the later checkpoints never happened
        shutil.rmtree(ckpt / later)
    config.checkpoint.resume = True
    lines = []
    resumed = run_dpo(config, log=lines.append, progress=False)
    assert any("read back" in line for line in lines)
    again = load_file(str(ckpt / "step_0000007" / "model.safetensors"))
    assert reference.keys() == again.keys() and all(torch.equal(reference[k], again[k]) for k in reference)
    assert resumed.val_history == full.val_history
    records = [json.loads(line) for line in (full.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 8))  # each step once


def test_lora_dpo_uses_the_model_with_its_adapters_off_as_reference(sft_model, prefs, tmp_path):
    pytest.importorskip("peft")
    config = _config(sft_model, tmp_path, prefs, data={"limit": 16, "split": [1.0, 0.0, 0.0]}, dpo={"beta": 0.5},
                     train={"batch_size": 16, "max_steps": 4}, optim={"lr": 1e-2, "warmup_ratio": 0.0},
                     lora={"r": 4, "alpha": 8})
    result = run_dpo(config, log=lambda *a: None, progress=False)
    steps = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "loss" in r]
    assert abs(steps[0]["loss"] - math.log(2)) < 1e-6  # adapters start at B = 0: the policy is the reference
    assert steps[-1]["rewards_margins"] > 0 and steps[-1]["rewards_accuracies"] > 0.5
    assert (result.run_dir / "adapter" / "adapter_model.safetensors").is_file()
    tuned, _, meta = load_model(result.run_dir)  # the merged model, under plain names
    start, _, _ = load_model(sft_model)
    assert meta["lora"]["r"] == 4
    assert not torch.equal(tuned.transformer.h[0].attn.c_attn.weight, start.transformer.h[0].attn.c_attn.weight)
    assert torch.equal(tuned.transformer.wpe.weight, start.transformer.wpe.weight)  # frozen


def test_the_recipe_loads_with_the_books_settings():
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "dpo-instruction-preference.yaml"
    config = load_config(DPOConfig, recipe, {"base": "runs/sft"}).validate()
    assert (config.dpo.loss_type, config.dpo.beta, config.optim.lr, config.train.batch_size) == ("sigmoid", 0.1,
                                                                                                5e-6, 8)
    assert config.data.split == [0.85, 0.05, 0.10] and config.optim.schedule == "constant"
