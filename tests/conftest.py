"""Shared fixtures: the offline data folder (../shared/data), prepared shards, tiny models and helpers.

Test modules never import from one another: what several of them need is a fixture here (plain helper
functions and classes live in ``_helpers.py`` and are handed out by fixtures of the same name).
"""

import os
from pathlib import Path

import _helpers
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("GPTFORGE_DATA_DIR", ROOT.parent / "shared" / "data")).resolve()
os.environ["GPTFORGE_DATA_DIR"] = str(DATA)
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(DATA / "tokenizers" / "gpt2" / "tiktoken_cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.fail(f"offline data not found at {DATA}; set GPTFORGE_DATA_DIR")
    return DATA


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread (and do not fight other processes for cores).
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- prepared shards: test_loader, test_pretrain, test_pretrain_distributed ------------------------------


@pytest.fixture(scope="session")
def shakespeare_text(data_dir) -> str:
    return (data_dir / "pretrain" / "tinyshakespeare.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def shakespeare_bpe(shakespeare_text):
    return _helpers.train_small_bpe(shakespeare_text, 512)


@pytest.fixture(scope="session")
def shakespeare_shards(tmp_path_factory, shakespeare_bpe, shakespeare_text) -> Path:
    """tinyshakespeare in a 512-token BPE: two train shards, one val shard, tokenizer/ and manifest.json."""
    return _helpers.write_dataset(tmp_path_factory.mktemp("shakespeare") / "shards", shakespeare_bpe,
                                  shakespeare_text)


# ---- pretraining helpers: test_pretrain, test_pretrain_distributed -----------------------------------------


@pytest.fixture(scope="session")
def small_config():
    """``small_config(shards, out_dir, name="run", steps=6, **train)``: a tiny PretrainConfig."""
    return _helpers.small_config


@pytest.fixture(scope="session")
def losses():
    """``losses(run_dir)``: the per-step training losses from metrics.jsonl."""
    return _helpers.losses


@pytest.fixture(scope="session")
def cli_args():
    """``cli_args(cfg)``: a PretrainConfig as ``gptforge pretrain --section.key=value`` flags."""
    return _helpers.cli_args


# ---- SFT base: test_sft, test_sft_distributed -------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_base(data_dir, tmp_path_factory):
    """A small byte-level BPE (1,024 tokens) and a 2-layer GPT briefly pretrained on TinyStories."""
    return _helpers.pretrain_tiny_base(data_dir, tmp_path_factory.mktemp("base") / "tiny")


# ---- inference: test_engine, test_engine_cli, test_serve, test_browser -----------------------------------


@pytest.fixture(scope="session")
def make_tiny_model(data_dir):
    """``make_tiny_model(seed=0, block_size=96, chat_tokens=True) -> (model, tokenizer)``: a 2-layer GPT
    over the GPT-2 vocabulary (+ chat tokens) with no near-tie greedy choices."""
    return _helpers.tiny_model


@pytest.fixture(scope="session")
def live_server():
    """``live_server(app) -> LiveServer``: uvicorn on a free loopback port in a thread; call ``.close()``."""
    return _helpers.LiveServer


@pytest.fixture(scope="session")
def modern_chat_model():
    """``modern_chat_model(block_size=96) -> (model, tokenizer)``: a 2-layer modern model (GQA, QK-norm) over the
    GPT-2 vocabulary (+ chat tokens) with no near-tie greedy choices."""
    return _helpers.modern_chat_model


@pytest.fixture(scope="session")
def prefix_space_bpe(data_dir):
    """A small BPE with a prefix-space pre-tokenizer (one tiktoken cannot reproduce: prepared through HF)."""
    return _helpers.prefix_space_bpe(data_dir)
