"""Plain helpers shared by several test modules. Tests reach them through the fixtures in conftest.py
(never by importing this module or another test module)."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import numpy as np
import torch

from gptforge.data.shards import token_dtype, write_shard

# ---- prepared shards (loader and pretraining tests) -------------------------------------------------------


def write_dataset(out: Path, tokenizer, text: str, val_fraction: float = 0.1, train_shards: int = 2) -> Path:
    """Encode ``text``, split the tail off as val, write ``train_*``/``val_*`` shards, manifest and tokenizer."""
    out.mkdir(parents=True, exist_ok=True)
    ids = np.array(tokenizer.encode(text), dtype=np.int64)
    n_val = int(len(ids) * val_fraction)
    train, val = ids[: len(ids) - n_val], ids[len(ids) - n_val:]
    dtype = token_dtype(tokenizer.vocab_size)
    for i, part in enumerate(np.array_split(train, train_shards)):
        write_shard(out / f"train_{i:05d}.bin", part, dtype)
    write_shard(out / "val_00000.bin", val, dtype)
    tokenizer.save(out / "tokenizer")
    manifest = {"tokenizer": {"name": tokenizer.name, "hash": tokenizer.content_hash(),
                              "vocab_size": tokenizer.vocab_size},
                "splits": {"train": {"tokens": len(train)}, "val": {"tokens": len(val)}}}
    (out / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return out


def train_small_bpe(text: str, vocab_size: int = 512):
    """A byte-level BPE with ``<|endoftext|>``, trained on ``text`` in a second or two."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from gptforge.tokenizer import BPETokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text], trainer=trainer)
    return BPETokenizer(tok, name="shakespeare-bpe")


# ---- pretraining runs (test_pretrain, test_pretrain_distributed) -------------------------------------------


def small_config(shards, out_dir, name="run", steps=6, **train):
    """A 2-layer, 32-wide pretraining config on ``shards`` that runs a few steps in seconds on CPU."""
    from gptforge.train.pretrain import PretrainConfig

    cfg = PretrainConfig(name=name, out_dir=str(out_dir))
    cfg.data.path = str(shards)
    cfg.data.seq_len = 32
    cfg.data.val_tokens = 2048
    cfg.model.n_layer, cfg.model.n_embd, cfg.model.n_head = 2, 32, 2
    cfg.train.max_steps = steps
    cfg.train.micro_batch = 4
    cfg.train.global_batch_seqs = 8
    cfg.train.precision = "fp32"
    cfg.optim.lr = 3e-3
    cfg.optim.warmup_steps = 2
    cfg.log.progress = False
    cfg.log.plot = False
    cfg.eval.sample_tokens = 8
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def losses(run_dir: Path) -> list[float]:
    """The per-step training losses a run wrote to ``metrics.jsonl``."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]  # checkpoint records carry only period counts


def cli_args(cfg) -> list[str]:
    """``cfg`` as ``gptforge pretrain`` flags (``--section.key=value``)."""
    from gptforge.config import to_dict

    flat = []

    def walk(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            elif v is not None:
                flat.append(f"--{prefix}{k}={json.dumps(v) if isinstance(v, (list, bool)) else v}")
    walk(to_dict(cfg))
    return flat


# ---- a tiny pretrained base for SFT (test_sft, test_sft_distributed) ---------------------------------------


def pretrain_tiny_base(data_dir: Path, directory: Path) -> Path:
    """A small byte-level BPE (1,024 tokens) and a 2-layer GPT briefly pretrained on TinyStories, saved to
    ``directory``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from gptforge.checkpoint import save_model
    from gptforge.model import GPT, GPTConfig
    from gptforge.tokenizer import EOT, BPETokenizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    stories = (data_dir / "pretrain" / "tinystories-sample.txt").read_text(encoding="utf-8")
    records = json.loads((data_dir / "instruct" / "instruction-data.json").read_text(encoding="utf-8"))
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator([stories] + [f"{r['instruction']} {r['input']} {r['output']}" for r in records], trainer)
    tokenizer = BPETokenizer(hf, "tiny-bpe")

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=256, n_layer=2, n_head=2, n_embd=64))
    data = torch.tensor(tokenizer.encode(stories))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    T, B = 128, 8
    for _ in range(80):
        starts = torch.randint(len(data) - T - 1, (B,))
        x = torch.stack([data[s:s + T] for s in starts])
        y = torch.stack([data[s + 1:s + T + 1] for s in starts])
        _, loss = model(x, targets=y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 6.0  # well below ln(1024) = 6.93: it learned something
    torch.set_num_threads(threads)
    save_model(directory, model, tokenizer)
    return directory


def prefix_space_bpe(data_dir: Path):
    """A small BPE whose pre-tokenization (a prefix space) tiktoken cannot reproduce: prepared through HF
    tokenizers."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import pre_tokenizers

    from gptforge.tokenizer import BPETokenizer, train_bpe

    base = train_bpe([(data_dir / "pretrain/the-verdict.txt").read_text()], vocab_size=400)
    hf = HFTokenizer.from_str(base._tok.to_str())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    return BPETokenizer(hf, name="prefix-space")


# ---- inference: a tiny chat model and a live server (engine, engine CLI, serve, browser) ------------------


def tiny_model(seed: int = 0, block_size: int = 96, chat_tokens: bool = True):
    """A 2-layer GPT over the real GPT-2 vocabulary (+ chat tokens), with weights large enough that
    greedy choices are never near-ties (so float rounding cannot flip an argmax)."""
    from gptforge.model import GPT, GPTConfig
    from gptforge.tokenizer import IM_END, IM_START, TiktokenTokenizer

    tok = TiktokenTokenizer()
    if chat_tokens:
        tok.add_special_tokens([IM_START, IM_END])
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=block_size, n_layer=2, n_head=2, n_embd=32))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    return model.eval(), tok


def modern_chat_model(block_size: int = 96):
    """A 2-layer modern model (GQA: 2 key/value heads for 4 query heads, QK-norm) over the GPT-2 vocabulary
    (+ chat tokens), with weights large enough that greedy choices are never near-ties."""
    from gptforge.model_modern import ModernConfig, ModernGPT
    from gptforge.tokenizer import IM_END, IM_START, TiktokenTokenizer

    tok = TiktokenTokenizer()
    tok.add_special_tokens([IM_START, IM_END])
    torch.manual_seed(0)
    model = ModernGPT(ModernConfig(vocab_size=tok.vocab_size, block_size=block_size, n_layer=2, n_head=4,
                                   n_kv_head=2, n_embd=32, qk_norm=True))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return model.eval(), tok


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """A real uvicorn server on a free loopback port, in a background thread."""

    def __init__(self, app):
        import uvicorn

        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.05)

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.app.state.api.scheduler.stop()
