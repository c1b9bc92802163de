"""LoRA through peft: merging, SFT and classify with adapters, exact resume, the peft round trip, memory estimates."""

import copy
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from gptforge.checkpoint import load_model
from gptforge.cli import main as cli_main
from gptforge.config import load_config
from gptforge.errors import GptforgeError
from gptforge.memory import lora_param_count, lora_training_memory, training_memory
from gptforge.model import GPT, GPTConfig, preset
from gptforge.train.lora import (
    LoraSection,
    apply_lora,
    lora_disabled,
    lora_state,
    merge_lora,
    trainable_counts,
)
from gptforge.train.sft import SFTConfig

pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")  # fixtures one_thread, tiny_base, data_dir: conftest.py

TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def _tiny_gpt(seed=0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{"vocab_size": 96, "block_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 16,
                            **overrides}))


def _randomise_adapters(model) -> None:
    """B starts at zero (the adapted model starts as the base): give every adapter a value to merge."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)


def _sft_config(base, out_dir, data_dir, name, **sections):
    tree = {"base": str(base), "out_dir": str(out_dir), "name": name,
            "data": {"sources": [str(data_dir / "instruct" / "instruction-data.json")], "limit": 160},
            "train": {"device": "cpu", "precision": "fp32", "max_steps": 16, "batch_size": 8},
            "optim": {"lr": 1e-2}, "log": {"progress": False}, "generate": {"enabled": False},
            "lora": {"r": 8, "alpha": 16}}
    for section, values in sections.items():
        tree[section] = {**tree.get(section, {}), **values}
    return load_config(SFTConfig, None, tree)


# ---- the adapters themselves --------------------------------------------------------------------------------


def test_merged_weights_are_base_plus_scaled_BA_exactly():
    base = _tiny_gpt()
    model = apply_lora(copy.deepcopy(base), LoraSection(r=4, alpha=8))
    _randomise_adapters(model)
    adapters = {k: v.clone() for k, v in lora_state(model).items()}
    x = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        adapted = model.eval()(x)[0]
    merged = merge_lora(model)
    assert type(merged.transformer.h[0].attn.c_attn) is torch.nn.Linear  # peft's layers are gone
    assert merged.lm_head.weight is merged.transformer.wte.weight  # still tied
    assert not hasattr(merged, "peft_config") and not any(p.dtype != torch.float32 for p in merged.parameters())
    base_state, merged_state = base.state_dict(), merged.state_dict()
    for i in range(2):
        for layer in TARGETS:
            key = f"transformer.h.{i}.{layer}"
            A, B = adapters[f"{key}.lora_A.default.weight"], adapters[f"{key}.lora_B.default.weight"]
            assert torch.equal(merged_state[f"{key}.weight"], base_state[f"{key}.weight"] + (B @ A) * (8 / 4))
            assert torch.equal(merged_state[f"{key}.bias"], base_state[f"{key}.bias"])
    for key in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.h.1.ln_2.weight"):
        assert torch.equal(merged_state[key], base_state[key])
    with torch.no_grad():
        torch.testing.assert_close(merged(x)[0], adapted, atol=1e-5, rtol=0)


def test_apply_lora_freezes_the_base_and_counts_what_trains():
    model = _tiny_gpt()
    assert apply_lora(model, LoraSection(r=0)) is model and all(p.requires_grad for p in model.parameters())
    apply_lora(model, LoraSection(r=4, target_modules=["c_attn"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"transformer.h.{i}.attn.c_attn.lora_{m}.default.weight" for i in range(2) for m in "AB"}
    n, total = trainable_counts(model)
    assert n == 2 * 4 * (16 + 48) and total == sum(p.numel() for p in _tiny_gpt().parameters()) + n
    with pytest.raises(GptforgeError, match="no module named 'qkv'"):
        apply_lora(_tiny_gpt(), LoraSection(r=4, target_modules=["qkv"]))
    with pytest.raises(GptforgeError, match="tied"):
        apply_lora(_tiny_gpt(), LoraSection(r=4, target_modules=["lm_head"]))
    with pytest.raises(GptforgeError, match="lora.dropout"):
        LoraSection(r=4, dropout=1.0).validate()


def test_disabled_adapters_compute_the_base_model():
    base = _tiny_gpt().eval()
    model = apply_lora(copy.deepcopy(base), LoraSection(r=4), new_tokens=[94, 95])
    _randomise_adapters(model)
    x = torch.randint(0, 96, (2, 12))
    with torch.no_grad(), lora_disabled(model):
        torch.testing.assert_close(model.eval()(x)[0], base(x)[0], atol=0, rtol=0)
    with torch.no_grad():
        assert not torch.allclose(model(x)[0], base(x)[0])
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(lora_state(model))


def test_16_bit_training_keeps_frozen_weights_in_bf16_and_adapters_in_fp32():
    base = _tiny_gpt()
    model = apply_lora(copy.deepcopy(base), LoraSection(r=4), new_tokens=[95], frozen_dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}
    x = torch.randint(0, 96, (2, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = model(x, targets=x)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    c_attn = model.transformer.h[0].attn.c_attn
    frozen = c_attn.base_layer.weight.float()
    A, B = c_attn.lora_A["default"].weight, c_attn.lora_B["default"].weight
    merged = merge_lora(model)
    assert merged.transformer.wte.weight.dtype == torch.float32
    assert torch.equal(merged.transformer.h[0].attn.c_attn.weight, frozen + (B @ A).detach() * 4.0)


# ---- SFT with LoRA on the real instruction set ----------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_sft(tiny_base, data_dir, tmp_path_factory):
    """A 16-step LoRA SFT run (chat style: two new tokens) on 160 real instructions."""
    from gptforge.train.sft import run_sft

    lines = []
    config = _sft_config(tiny_base, tmp_path_factory.mktemp("lora"), data_dir, "lora-sft")
    return run_sft(config, log=lines.append, progress=False), lines


def test_lora_sft_lowers_the_loss_and_states_what_trains(lora_sft):
    result, lines = lora_sft
    losses = [json.loads(line)["loss"] for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert len(losses) == 16
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.2, losses
    assert result.best_val_loss < result.initial_val_loss - 0.5, (result.initial_val_loss, result.best_val_loss)
    plan = next(line for line in lines if line.startswith("LoRA r=8"))
    # 2 layers × r·(64+192 + 64+64 + 64+256 + 256+64) + the two new tokens' embedding rows (tied head)
    assert "token rows [1024, 1025]: 16,512 of 198,656 parameters trainable (8.31%)" in plan
    assert "estimated training memory" in plan


def test_lora_sft_leaves_the_base_weights_unchanged_before_merging(lora_sft, tiny_base):
    result, _ = lora_sft
    base = load_file(str(tiny_base / "model.safetensors"))
    step = result.run_dir / "ckpt" / f"step_{result.steps:07d}"
    unmerged = load_file(str(step / "lora" / "state.safetensors"))
    for i in range(2):
        for layer in TARGETS:
            key = f"transformer.h.{i}.{layer}"
            assert torch.equal(unmerged[f"{key}.base_layer.weight"], base[f"{key}.weight"])
            assert torch.equal(unmerged[f"{key}.base_layer.bias"], base[f"{key}.bias"])
            assert unmerged[f"{key}.lora_B.default.weight"].abs().max() > 0  # the adapters did train
    wte = unmerged["transformer.wte.token_adapter.base_layer.weight"]
    assert torch.equal(wte[:1024], base["transformer.wte.weight"])  # the old rows; 1024, 1025 are the new tokens
    merged = load_file(str(step / "model.safetensors"))
    for key in ("transformer.wpe.weight", "transformer.h.0.ln_1.weight", "transformer.ln_f.bias"):
        assert torch.equal(merged[key], base[key])
    # the run's model holds W + (alpha/r)·B·A, and the new tokens' trained rows
    key = "transformer.h.1.mlp.c_fc"
    A, B = unmerged[f"{key}.lora_A.default.weight"], unmerged[f"{key}.lora_B.default.weight"]
    assert torch.equal(merged[f"{key}.weight"], base[f"{key}.weight"] + (B @ A) * 2.0)
    rows = unmerged["transformer.wte.token_adapter.trainable_tokens_delta.default"]
    assert torch.equal(merged["transformer.wte.weight"][1024:], rows)
    assert not torch.equal(rows[0], rows[1])  # <|im_start|> and <|im_end|> learned different embeddings


def test_saved_adapter_loads_with_peft_on_the_exported_base_and_matches_the_merged_model(lora_sft, tiny_base,
                                                                                           tmp_path):
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    from gptforge.hf import export_model

    result, _ = lora_sft
    adapter = result.run_dir / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["fan_in_fan_out"] and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == (8, 16, str(tiny_base))
    assert config["trainable_token_indices"] == [1024, 1025]
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    assert "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight" in tensors
    assert (adapter / "adapter_model.safetensors").stat().st_size < 0.15 * (result.checkpoint / "model.safetensors"
                                                                              ).stat().st_size

    base_model, base_tok, _ = load_model(tiny_base)
    export_model(base_model, base_tok, tmp_path / "hf-base")
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf-base")
    hf.resize_token_embeddings(1026)  # the chat tokens SFT added; their rows come from the adapter
    peft_model = PeftModel.from_pretrained(hf, adapter).eval()

    merged, tokenizer, _ = load_model(result.run_dir)
    prompt = ("<|im_start|>user\nGive three tips for staying healthy.<|im_end|>\n<|im_start|>assistant\n"
              "Eat well, sleep, move.<|im_end|>")
    ids = torch.tensor([tokenizer.encode(prompt, allow_special=True)])
    assert {1024, 1025} <= set(ids[0].tolist())
    with torch.no_grad():
        ours = merged(ids)[0]
        theirs = peft_model(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


def test_lora_sft_resume_is_exact(tiny_base, data_dir, tmp_path):
    from gptforge.train.sft import run_sft

    config = _sft_config(tiny_base, tmp_path, data_dir, "resume", train={"max_steps": 6, "neftune_alpha": 5.0},
                         lora={"dropout": 0.1}, checkpoint={"interval": 2, "keep_last": 10},
                         data={"limit": 80, "split": [0.9, 0.1, 0.0]})
    full = run_sft(config, log=lambda *a: None, progress=False)
    last = full.run_dir / "ckpt" / "step_0000006"
    reference = {f: load_file(str(last / f)) for f in ("model.safetensors", "lora/state.safetensors")}
    for later in ("step_0000004", "step_0000006"):  # a kill after step 2
        shutil.rmtree(full.run_dir / "ckpt" / later)
    shutil.rmtree(full.run_dir / "adapter")
    config.checkpoint.resume = True
    resumed = run_sft(config, log=lambda *a: None, progress=False)
    assert resumed.steps == 6
    for name, tensors in reference.items():
        again = load_file(str(last / name))
        assert tensors.keys() == again.keys()
        assert all(torch.equal(tensors[k], again[k]) for k in tensors), name
    assert (full.run_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_cli_lora_flags_reach_the_config_and_bad_targets_are_one_line(tiny_base, data_dir, tmp_path, capsys):
    data = str(data_dir / "instruct" / "instruction-data.json")
    common = ["sft", "--checkpoint", str(tiny_base), "--data", data, "--out-dir", str(tmp_path), "--limit", "40",
              "--max-steps", "1", "--device", "cpu", "--no-test-responses"]
    assert cli_main([*common, "--name", "bad", "--lora-r", "4", "--lora-target", "attn.qkv"]) == 2
    assert "no module named 'attn.qkv'" in capsys.readouterr().err
    assert cli_main([*common, "--name", "ok", "--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0.05",
                     "--lora-target", "attn.c_attn", "--lora-target", "mlp.c_fc"]) == 0
    assert "LoRA adapter (peft)" in capsys.readouterr().out
    import yaml

    saved = yaml.safe_load((tmp_path / "ok" / "config.yaml").read_text())["lora"]
    assert saved == {"r": 4, "alpha": 8.0, "dropout": 0.05, "target_modules": ["attn.c_attn", "mlp.c_fc"],
                     "modules_to_save": []}


# ---- classify with LoRA ------------------------------------------------------------------------------------


def test_classify_with_lora_trains_the_adapters_and_the_head(tiny_base, data_dir, tmp_path):
    from gptforge.train.classify import ClassifyConfig, load_classifier, run_classify

    config = load_config(ClassifyConfig, None, {
        "base": str(tiny_base), "out_dir": str(tmp_path), "name": "spam",
        "data": {"path": str(data_dir / "classify" / "SMSSpamCollection"), "balance": True, "max_len": 64,
                 "limit": 400},
        "train": {"max_steps": 30, "batch_size": 16, "eval_every": 30, "device": "cpu", "precision": "fp32"},
        "optim": {"lr": 5e-3}, "checkpoint": {"interval": 10, "keep_last": 5}, "log": {"progress": False},
        "lora": {"r": 8}})
    lines = []
    result = run_classify(config, log=lines.append, progress=False)
    assert any("+ head in full: 16,514 of 198,530 parameters trainable" in line for line in lines), lines
    assert result.metrics["val"].accuracy >= 0.75 > result.majority_rate + 0.2
    ckpt = result.run_dir / "ckpt"
    first = load_file(str(ckpt / "step_0000010" / "classifier.safetensors"))
    final = load_file(str(ckpt / "step_0000030" / "classifier.safetensors"))
    base = load_file(str(tiny_base / "model.safetensors"))
    assert not torch.equal(first["head.weight"], final["head.weight"])  # the head trains in full
    for key in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.h.1.ln_1.weight"):
        assert torch.equal(final[f"gpt.{key}"], base[key])  # the body is frozen (adapters aside)
    assert not torch.equal(final["gpt.transformer.h.0.attn.c_attn.weight"], base["transformer.h.0.attn.c_attn.weight"])
    adapter = result.run_dir / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["modules_to_save"] == ["head"]
    assert {"base_model.model.head.weight", "base_model.model.head.bias"} <= set(
        load_file(str(adapter / "adapter_model.safetensors")))
    model, _, _ = load_classifier(result.run_dir)  # the run's classifier: merged, loads like any other
    assert torch.equal(model.head.weight, load_file(str(result.checkpoint / "classifier.safetensors"))["head.weight"])


# ---- memory ---------------------------------------------------------------------------------------------------


def test_lora_parameter_count_matches_what_apply_lora_trains():
    config = GPTConfig(vocab_size=96, block_size=32, n_layer=3, n_head=2, n_embd=16)
    for targets in (TARGETS, ("c_proj",), ("attn.c_attn", "mlp.c_fc")):
        model = apply_lora(GPT(config), LoraSection(r=4, target_modules=list(targets)))
        assert lora_param_count(config, 4, targets) == trainable_counts(model)[0], targets
    assert lora_param_count(preset("gpt2-xl"), 8) == 48 * 8 * 16 * 1600  # r·(d+3d + d+d + d+4d + 4d+d) per layer


def test_gpt2_xl_lora_fits_a_24_gb_gpu_where_full_fine_tuning_does_not(capsys):
    xl = preset("gpt2-xl")
    lora = lora_training_memory(xl, micro_batch=4, seq_len=1024, precision="bf16", r=8)
    n = 1_557_611_200
    assert lora.weights == 2 * n + 4 * 9_830_400 and lora.optimizer == 8 * 9_830_400
    assert lora.total < 0.9 * 24 * 2**30  # about 15 GiB
    assert training_memory(xl, micro_batch=1, seq_len=1024, precision="bf16").total > 24 * 2**30
    assert cli_main(["model", "info", "--preset", "gpt2-xl", "--lora-r", "8", "--micro-batch", "4"]) == 0
    out = capsys.readouterr().out
    assert "9,830,400 trainable parameters" in out and "fits a 24 GB GPU" in out
