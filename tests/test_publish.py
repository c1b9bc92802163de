import pytest
import torch
import yaml

transformers = pytest.importorskip("transformers")

from gptforge.chat_template import default_template
from gptforge.checkpoint import save_model
from gptforge.cli import main
from gptforge.model import GPT, GPTConfig
from gptforge.tokenizer import IM_END, IM_START, TiktokenTokenizer


def make_run(tmp_path):
    """A run directory like pretraining leaves: config.yaml, an eval result, ckpt/step_*/ and a latest pointer."""
    torch.manual_seed(0)
    tok = TiktokenTokenizer(extra_special=[IM_START, IM_END])
    tok.chat_template = default_template()
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=32))
    run = tmp_path / "runs" / "demo"
    save_model(run / "ckpt" / "step_0000010", model, tok)
    (run / "ckpt" / "latest").write_text("step_0000010")
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"path": "data/shakespeare"}, "train": {"steps": 10}}))
    (run / "eval").mkdir()
    (run / "eval" / "loss.json").write_text('{"loss": 5.25, "bits_per_byte": 2.1}')
    return run, tok


def test_export_writes_loadable_folder_with_model_card(tmp_path, data_dir):
    run, tok = make_run(tmp_path)
    out = tmp_path / "hf"
    assert main(["export", "--checkpoint", str(run), "--out", str(out), "--dataset", "karpathy/tinyshakespeare"]) == 0
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["license"] == "apache-2.0" and front["datasets"] == ["karpathy/tinyshakespeare"]
    assert "| parameters |" in card and "bits_per_byte" in card and "data/shakespeare" in card
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert model.config.vocab_size == tok.vocab_size
    msgs = [{"role": "user", "content": "Hi"}]
    ids = hf_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ids == tok.encode("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", allow_special=True)
    gen = transformers.GenerationConfig.from_pretrained(out)
    assert tok.token_id(IM_END) in gen.eos_token_id


def test_push_to_hub_offline_is_a_clear_error(tmp_path, capsys, monkeypatch):
    run, _ = make_run(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "hf"), "--push-to-hub", "me/demo"])
    assert code == 2
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err
    assert (tmp_path / "hf" / "model.safetensors").is_file()
