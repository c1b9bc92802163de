"""Bad input and damaged files through the real CLI: every case exits with status 2, prints exactly one
``gptforge: error:`` line naming what is wrong (no traceback), and leaves every existing file as it was.

The table grows with every bad input someone finds: add a row to ``CASES`` (and, for a damaged checkpoint, a
damage to ``DAMAGE``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from gptforge.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

# Pretraining flags for a 2-layer, 32-wide model that runs a few steps in about a second.
TINY = ["--data.seq_len=32", "--model.n_layer=2", "--model.n_embd=32", "--model.n_head=2",
        "--train.max_steps=3", "--train.micro_batch=4", "--train.global_batch_seqs=8", "--train.precision=fp32",
        "--log.progress=false", "--log.plot=false", "--eval.sample_tokens=4", "--data.val_tokens=1024"]


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def ws(tmp_path_factory, data_dir):
    """A corpus, a 512-token BPE, prepared shards, a pretrained run and its Hugging Face export."""
    root = tmp_path_factory.mktemp("bad")
    text = (data_dir / "pretrain" / "tinyshakespeare.txt").read_text(encoding="utf-8")[:300_000]
    (root / "corpus.txt").write_text(text, encoding="utf-8")
    assert main(["tokenizer", "train", str(root / "corpus.txt"), "--vocab-size", "512", "--out",
                 str(root / "tok")]) == 0
    assert main(["data", "prepare", str(root / "corpus.txt"), "--tokenizer", str(root / "tok"), "--out",
                 str(root / "shards"), "--val-fraction", "0.1", "--workers", "1", "--no-progress"]) == 0
    assert main(["pretrain", "--name", "base", f"--out_dir={root}", f"--data.path={root / 'shards'}", *TINY]) == 0
    assert main(["export", "--checkpoint", str(root / "base"), "--out", str(root / "hf")]) == 0
    (root / "a_file").write_text("a user's file\n")
    (root / "users_dir").mkdir()
    (root / "users_dir" / "README.md").write_text("my own notes\n")
    (root / "binary.bin").write_bytes(bytes(range(256)) * 8)
    return root


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def assert_one_error(rc, err: str, expect: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("gptforge: error:")]
    assert rc == 2, f"exit status {rc}, stderr:\n{err[-2000:]}"
    assert len(lines) == 1, err[-2000:]
    assert "Traceback" not in err
    assert expect.lower() in lines[0].lower(), lines[0]
    return lines[0]


def pretrain(ws, name, *extra, data="shards"):
    return ["pretrain", "--name", name, f"--out_dir={ws / 'runs'}", f"--data.path={ws / data}", *TINY, *extra]


# ---- the table: (case id, argv builder, a substring the error line must contain) ------------------------------

CASES = {
    # configs: every key validated, one line naming key, value and range
    "tokenizer other than the shards'": (lambda ws: pretrain(ws, "t", "--data.tokenizer=gpt2"), "tokenizer hash"),
    "grad_clip -1": (lambda ws: pretrain(ws, "t", "--train.grad_clip=-1"), "train.grad_clip"),
    "min_lr_ratio -5": (lambda ws: pretrain(ws, "t", "--optim.min_lr_ratio=-5"), "optim.min_lr_ratio"),
    "min_lr above lr": (lambda ws: pretrain(ws, "t", "--optim.min_lr=1.0"), "optim.min_lr"),
    "negative warmup": (lambda ws: pretrain(ws, "t", "--optim.warmup_steps=-3"), "optim.warmup_steps"),
    "negative weight decay": (lambda ws: pretrain(ws, "t", "--optim.weight_decay=-1"), "optim.weight_decay"),
    "checkpoint interval -1": (lambda ws: pretrain(ws, "t", "--checkpoint.interval=-1"), "checkpoint.interval"),
    "lr -1": (lambda ws: pretrain(ws, "t", "--optim.lr=-1"), "optim.lr"),
    "lr nan": (lambda ws: pretrain(ws, "t", "--optim.lr=nan"), "optim.lr"),
    "beta2 5": (lambda ws: pretrain(ws, "t", "--optim.beta2=5"), "optim.beta2"),
    "seq_len -3": (lambda ws: pretrain(ws, "t", "--data.seq_len=-3"), "data.seq_len"),
    "seed too large": (lambda ws: pretrain(ws, "t", "--train.seed=99999999999999999999999"), "train.seed"),
    "max_nonfinite -1": (lambda ws: pretrain(ws, "t", "--train.max_nonfinite=-1"), "train.max_nonfinite"),
    "eval interval -5": (lambda ws: pretrain(ws, "t", "--eval.interval=-5"), "eval.interval"),
    "no CUDA": (lambda ws: pretrain(ws, "t", "--train.device=cuda:7"), "cuda"),
    "unknown key": (lambda ws: pretrain(ws, "t", "--optim.lrr=1"), "optim.lrr"),
    "binary YAML config": (lambda ws: ["pretrain", "--config", ws / "binary.bin"], "not a text"),
    "sft negative lr in YAML overrides": (lambda ws: ["sft", "--checkpoint", ws / "base", "--data", "x.json",
                                                      "--optim.lr=-1"], "optim.lr"),
    "YAML tag in model info --set": (lambda ws: ["model", "info", "--preset", "tiny", "--set", "n_layer=!foo 3"],
                                     "model.n_layer"),
    "python tag in model info --set": (lambda ws: ["model", "info", "--preset", "tiny", "--set",
                                                   "n_layer=!!python/object:os.system x"], "model.n_layer"),
    # command-line values: argparse errors in the same one-line format
    "eval choice --limit -1": (lambda ws: ["eval", "choice", "--checkpoint", ws / "base", "--task", "hellaswag",
                                           "--limit", "-1"], "--limit"),
    "sft --limit 0": (lambda ws: ["sft", "--checkpoint", ws / "base", "--data", "x.json", "--limit", "0"],
                      "--limit"),
    "prepare --buffer-mb 0": (lambda ws: ["data", "prepare", ws / "corpus.txt", "--out", ws / "new",
                                          "--buffer-mb", "0"], "--buffer-mb"),
    "prepare --max-tokens 2.5Q": (lambda ws: ["data", "prepare", ws / "corpus.txt", "--out", ws / "new",
                                              "--max-tokens", "2.5Q"], "--max-tokens"),
    "prepare --workers -3": (lambda ws: ["data", "prepare", ws / "corpus.txt", "--out", ws / "new",
                                         "--workers", "-3"], "--workers"),
    "generate --seed too large": (lambda ws: ["generate", "--checkpoint", ws / "base", "--prompt", "a",
                                              "--seed", "99999999999999999999999"], "--seed"),
    "generate --top-p 0": (lambda ws: ["generate", "--checkpoint", ws / "base", "--prompt", "a", "--top-p", "0"],
                           "top_p"),
    "generate --device cuda:7": (lambda ws: ["generate", "--checkpoint", ws / "base", "--prompt", "a",
                                             "--device", "cuda:7"], "cuda"),
    "binary --prompts-file": (lambda ws: ["generate", "--checkpoint", ws / "base", "--prompts-file",
                                          ws / "binary.bin"], "not utf-8"),
    "tokenizer info --sample missing": (lambda ws: ["tokenizer", "info", "gpt2", "--sample", ws / "nonexistent"],
                                        "not found"),
    # outputs: never replace a user's file or directory unasked
    "prepare --out is a file": (lambda ws: ["data", "prepare", ws / "corpus.txt", "--tokenizer", ws / "tok",
                                            "--out", ws / "a_file", "--no-progress"], "a_file"),
    "export --out is a file": (lambda ws: ["export", "--checkpoint", ws / "base", "--out", ws / "a_file"],
                               "a_file"),
    "export --out not empty": (lambda ws: ["export", "--checkpoint", ws / "base", "--out", ws / "users_dir"],
                               "not empty"),
    "import --out not empty": (lambda ws: ["import", ws / "hf", "--out", ws / "users_dir"], "not empty"),
    "tokenizer train --out is a file": (lambda ws: ["tokenizer", "train", ws / "corpus.txt", "--vocab-size",
                                                    "300", "--out", ws / "a_file"], "a_file"),
    "tokenizer train --out not empty": (lambda ws: ["tokenizer", "train", ws / "corpus.txt", "--vocab-size",
                                                    "300", "--out", ws / "users_dir"], "not empty"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, ws, capsys):
    build, expect = CASES[case]
    before = snapshot(ws)
    rc, _, err = run_cli(build(ws), capsys)
    assert_one_error(rc, err, expect)
    assert snapshot(ws) == before  # nothing written, nothing replaced
    shutil.rmtree(ws / "runs" / "t", ignore_errors=True)


# ---- damaged checkpoints: one verified loader behind every command that reads one -----------------------------


def _flip_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x55
    path.write_bytes(bytes(data))


def _without_manifest(d: Path) -> None:
    (d / "files.json").unlink()


DAMAGE = {  # name: (damage(step_dir), substring of the error)
    "bit flip in the weights": (lambda d: _flip_middle(d / "model.safetensors"), "sha-256"),
    "wrong hash in files.json": (lambda d: (d / "files.json").write_text(
        (d / "files.json").read_text().replace('"sha256": "', '"sha256": "00', 1)), "sha-256"),
    "truncated weights": (lambda d: (d / "model.safetensors").write_bytes(
        (d / "model.safetensors").read_bytes()[:100]), "bytes, expected"),
    "truncated weights, no manifest": (lambda d: (_without_manifest(d), (d / "model.safetensors").write_bytes(
        (d / "model.safetensors").read_bytes()[:100])), "safetensors"),
    "empty weights, no manifest": (lambda d: (_without_manifest(d), (d / "model.safetensors").write_bytes(b"")),
                                   "safetensors"),
    "model_config.json not JSON": (lambda d: (_without_manifest(d), (d / "model_config.json").write_text("{oops")),
                                   "model_config.json"),
    "model_config.json wrong type": (lambda d: (_without_manifest(d), (d / "model_config.json").write_text(
        '{"model": {"n_layer": "x"}}')), "model.n_layer"),
    "model_config.json a list": (lambda d: (_without_manifest(d), (d / "model_config.json").write_text("[1, 2]")),
                                 "model_config.json"),
    "files.json a list": (lambda d: (d / "files.json").write_text("[]"), "files.json"),
    "tokenizer_config.json not JSON": (lambda d: (_without_manifest(d), (d / "tokenizer" / "tokenizer_config.json")
                                                  .write_text("{oops")), "tokenizer_config.json"),
}

READERS = {  # name: argv reading checkpoint CKPT
    "generate": lambda ws, ckpt: ["generate", "--checkpoint", ckpt, "--prompt", "a", "--max-new-tokens", "2"],
    "export": lambda ws, ckpt: ["export", "--checkpoint", ckpt, "--out", ws / "exported"],
    "sft": lambda ws, ckpt: ["sft", "--checkpoint", ckpt, "--data", ws / "sft.json", "--out-dir", ws / "runs",
                             "--name", "t", "--max-steps", "1"],
    "classify": lambda ws, ckpt: ["classify", "--checkpoint", ckpt, "--data", ws / "spam.tsv", "--out-dir",
                                  ws / "runs", "--name", "t", "--max-steps", "1"],
    "eval loss": lambda ws, ckpt: ["eval", "loss", "--checkpoints", ckpt, "--data", ws / "shards"],
    "eval choice": lambda ws, ckpt: ["eval", "choice", "--checkpoint", ckpt, "--task", "hellaswag", "--limit", "2"],
    "pretrain --init-from": lambda ws, ckpt: pretrain(ws, "t", f"--model.init_from={ckpt}"),
    "model info": lambda ws, ckpt: ["model", "info", "--checkpoint", ckpt],
}


@pytest.fixture(scope="module")
def reader_data(ws, data_dir):
    records = json.loads((data_dir / "instruct" / "instruction-data.json").read_text(encoding="utf-8"))[:20]
    (ws / "sft.json").write_text(json.dumps(records), encoding="utf-8")
    rows = (data_dir / "classify" / "SMSSpamCollection").read_text(encoding="utf-8").splitlines()[:40]
    (ws / "spam.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return ws


@pytest.mark.parametrize("damage", list(DAMAGE))
@pytest.mark.parametrize("reader", list(READERS))
def test_damaged_checkpoint(reader, damage, reader_data, capsys):
    ws = reader_data
    if reader == "model info" and damage in ("bit flip in the weights", "wrong hash in files.json",
                                             "truncated weights", "truncated weights, no manifest",
                                             "empty weights, no manifest", "files.json a list",
                                             "tokenizer_config.json not JSON"):
        pytest.skip("model info reads only the model config")
    ckpt = ws / "damaged"
    shutil.rmtree(ckpt, ignore_errors=True)
    shutil.copytree(ws / "base" / "ckpt" / "step_0000003", ckpt)
    apply, expect = DAMAGE[damage]
    apply(ckpt)
    before = snapshot(ws)
    rc, _, err = run_cli(READERS[reader](ws, ckpt), capsys)
    assert_one_error(rc, err, expect)
    assert snapshot(ws) == before
    shutil.rmtree(ws / "runs" / "t", ignore_errors=True)


def test_damaged_hf_directory_on_import(ws, capsys):
    hf = ws / "hf_damaged"
    shutil.copytree(ws / "hf", hf)
    (hf / "model.safetensors").write_bytes((hf / "model.safetensors").read_bytes()[:64])
    rc, _, err = run_cli(["import", hf, "--out", ws / "imported"], capsys)
    assert_one_error(rc, err, "safetensors")
    assert not (ws / "imported").exists() or not any((ws / "imported").iterdir())


def test_hash_check_can_be_skipped_for_huge_files(ws, capsys, monkeypatch):
    """GPTFORGE_VERIFY_HASHES=0 keeps the size check but skips hashing (a same-size bit flip then loads)."""
    ckpt = ws / "unhashed"
    shutil.copytree(ws / "base" / "ckpt" / "step_0000003", ckpt)
    _flip_middle(ckpt / "model.safetensors")
    monkeypatch.setenv("GPTFORGE_VERIFY_HASHES", "0")
    rc, _, err = run_cli(["model", "info", "--checkpoint", ckpt], capsys)
    assert rc == 0
    rc, _, err = run_cli(["generate", "--checkpoint", ckpt, "--prompt", "a", "--max-new-tokens", "2"], capsys)
    assert rc == 0, err
    (ckpt / "model.safetensors").write_bytes((ckpt / "model.safetensors").read_bytes()[:-8])
    rc, _, err = run_cli(["generate", "--checkpoint", ckpt, "--prompt", "a", "--max-new-tokens", "2"], capsys)
    assert_one_error(rc, err, "bytes, expected")


# ---- training: damaged shards, changed shapes, divergence, finished runs -------------------------------------


def test_same_size_corrupted_shard_is_refused_before_training(ws, capsys):
    shutil.copytree(ws / "shards", ws / "shards_bad")
    shard = ws / "shards_bad" / "train_00000.bin"
    data = bytearray(shard.read_bytes())
    data[4096:4106] = b"\xff" * 10
    shard.write_bytes(bytes(data))
    rc, _, err = run_cli(pretrain(ws, "t", data="shards_bad"), capsys)
    assert_one_error(rc, err, "train_00000.bin")
    assert not list((ws / "runs").glob("t/ckpt/step_*"))
    shutil.rmtree(ws / "runs" / "t", ignore_errors=True)


def test_resume_with_another_model_shape(ws, capsys):
    assert run_cli(pretrain(ws, "shape"), capsys)[0] == 0
    before = snapshot(ws)
    rc, _, err = run_cli(pretrain(ws, "shape", "--resume", "--model.n_layer=3"), capsys)
    assert_one_error(rc, err, "cannot resume")
    assert {k: v for k, v in snapshot(ws).items() if k in before} == before


def test_resume_of_a_finished_run_says_so(ws, capsys, data_dir):
    assert run_cli(pretrain(ws, "done"), capsys)[0] == 0
    rc, out, err = run_cli(pretrain(ws, "done", "--resume"), capsys)
    assert rc == 0 and "Traceback" not in err
    assert "already finished (step 3 of 3)" in out + err and "train.max_steps" in out + err


def test_diverged_run_stops_with_a_checkpoint(ws, capsys):
    """lr 1e30 in fp32: every step after the first is non-finite; the run warns at once, stops after
    train.max_nonfinite skipped steps with a checkpoint of the last good state, and exits 2."""
    rc, out, err = run_cli(pretrain(ws, "diverged", "--optim.lr=1e30", "--train.max_steps=20",
                                    "--train.max_nonfinite=3", "--optim.warmup_steps=0"), capsys)
    line = assert_one_error(rc, err, "training diverged: 3 steps in a row")
    assert "warning: step 2 skipped: non-finite gradients" in out + err
    ckpts = sorted((ws / "runs" / "diverged" / "ckpt").glob("step_*"))
    assert [c.name for c in ckpts] == ["step_0000004"] and str(ckpts[0]) in line
    records = [json.loads(x) for x in (ws / "runs" / "diverged" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in records if "loss" in r] == [False, True, True, True]


def test_fp16_scaler_skips_warn_as_they_start_and_stop_a_run_that_keeps_skipping():
    from gptforge.train.core import StepStats
    from gptforge.train.nonfinite import NonFiniteGuard

    lines: list[str] = []
    guard = NonFiniteGuard(3, lines.append, fp16_scaler=True)
    ok = StepStats(loss=2.0, grad_norm=1.0, lr=1e-3, targets=8, skipped=False, nonfinite=False)
    backoff = StepStats(loss=2.0, grad_norm=float("inf"), lr=1e-3, targets=8, skipped=True, nonfinite=False)
    assert [guard.update(s, st) for s, st in enumerate([ok, backoff, ok, backoff, backoff], 1)] == [False] * 5
    assert len(lines) == 2 and "step 2 skipped: the fp16 loss scaler" in lines[0] and "2 skipped so far" in lines[1]
    assert guard.update(6, backoff) is True  # the third in a row
    assert "steps 4-6" in str(guard.error("ckpt/step_0000006"))
    never = NonFiniteGuard(0, lines.append)
    assert not any(never.update(s, backoff) for s in range(1, 50))


def test_sampling_from_a_diverged_model_does_not_crash(make_tiny_model):
    import torch

    from gptforge.engine import Engine, SamplingParams
    from gptforge.sampling import finite_logits

    model, tok = make_tiny_model()
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.fill_(float("nan"))
    engine = Engine(model, tok, device="cpu")
    for params in (SamplingParams(max_new_tokens=4, seed=1), SamplingParams(max_new_tokens=4, temperature=0),
                   SamplingParams(max_new_tokens=4, seed=1, top_p=0.9, top_k=5, repetition_penalty=1.1)):
        (out,) = engine.generate(["Hello"], params)
        assert len(out.token_ids) >= 1
    mixed = torch.tensor([[1.0, float("nan"), float("inf")], [float("nan")] * 3])
    fixed = finite_logits(mixed)
    assert fixed[0].argmax() == 2 and torch.isneginf(fixed[0, 1]) and torch.equal(fixed[1], torch.zeros(3))
    finite = torch.randn(2, 5)
    assert finite_logits(finite) is finite


def test_prepare_survives_a_huge_whitespace_run(ws, capsys):
    """tiktoken's regex gives up on ~1M-character whitespace runs; prepare cuts pieces small enough."""
    (ws / "spaces.txt").write_text("hello" + " " * 3_000_000 + "world\n\nsecond document\n", encoding="utf-8")
    rc, out, err = run_cli(["data", "prepare", ws / "spaces.txt", "--out", ws / "spaces", "--val-fraction", "0",
                            "--text-sep", "blank", "--no-progress", "--workers", "1"], capsys)
    assert rc == 0, err
    shutil.rmtree(ws / "spaces")
    (ws / "spaces.txt").unlink()


def test_prepare_refuses_an_input_edited_since_the_data_was_made(ws, capsys):
    """Same size, other bytes: the content hash in the fingerprint catches what path + size could not."""
    corpus = ws / "edited.txt"
    corpus.write_bytes((ws / "corpus.txt").read_bytes())
    argv = ["data", "prepare", corpus, "--tokenizer", ws / "tok", "--out", ws / "edited", "--val-fraction", "0.1",
            "--workers", "1", "--no-progress"]
    assert run_cli(argv, capsys)[0] == 0
    data = bytearray(corpus.read_bytes())
    data[1000:1004] = b"XXXX"
    corpus.write_bytes(bytes(data))
    before = snapshot(ws)
    rc, _, err = run_cli(argv, capsys)
    assert_one_error(rc, err, "edited.txt changed")
    assert snapshot(ws) == before
