"""``gptforge generate`` and ``gptforge chat`` on a saved checkpoint (chat driven through piped stdin)."""

import io
import json

import pytest

from gptforge.checkpoint import save_model
from gptforge.cli import main


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, make_tiny_model):
    model, tok = make_tiny_model(block_size=64)
    return str(save_model(tmp_path_factory.mktemp("ckpt") / "step_0000010", model, tok))


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_json_batch_from_args_and_file(ckpt, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Once upon a time\n\nThe verdict was\n", encoding="utf-8")
    code, out, _ = run_cli(capsys, "generate", "--checkpoint", ckpt, "--prompt", "Hello", "--prompts-file",
                           str(prompts), "--max-new-tokens", "7", "--greedy", "--json", "--logprobs")
    assert code == 0
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["prompt"] for r in records] == ["Hello", "Once upon a time", "The verdict was"]
    assert all(r["completion_tokens"] == 7 and len(r["logprobs"]) == 7 for r in records)
    # Greedy is deterministic and independent of batching.
    code, again, _ = run_cli(capsys, "generate", "--checkpoint", ckpt, "--prompt", "The verdict was",
                             "--max-new-tokens", "7", "--greedy", "--json", "--batch-size", "1")
    assert json.loads(again)["completion"] == records[2]["completion"]


def test_generate_sampling_flags_and_seed(ckpt, capsys):
    argv = ["generate", "--checkpoint", ckpt, "--prompt", "Hello", "--num-samples", "2", "--json",
            "--max-new-tokens", "6", "--temperature", "0.9", "--top-k", "40", "--top-p", "0.9", "--min-p", "0.01",
            "--repetition-penalty", "1.2", "--presence-penalty", "0.5", "--frequency-penalty", "0.5", "--seed", "11"]
    code, out, _ = run_cli(capsys, *argv)
    first = [json.loads(line)["completion"] for line in out.splitlines()]
    assert code == 0 and len(first) == 2 and first[0] != first[1]
    assert [json.loads(line)["completion"] for line in run_cli(capsys, *argv)[1].splitlines()] == first


def test_generate_streams_a_single_prompt(ckpt, capsys):
    code, out, _ = run_cli(capsys, "generate", "--checkpoint", ckpt, "--prompt", "Hello", "--max-new-tokens", "5",
                           "--seed", "1")
    assert code == 0 and out.startswith("Hello") and len(out.strip()) > len("Hello")


def test_generate_bad_inputs_are_one_line_errors(ckpt, tmp_path, capsys):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt field"}\n', encoding="utf-8")
    code, _, err = run_cli(capsys, "generate", "--checkpoint", ckpt, "--prompts-file", str(bad))
    assert code == 2 and f"{bad}:2" in err and "prompt" in err
    code, _, err = run_cli(capsys, "generate", "--checkpoint", ckpt, "--prompt", "x", "--top-p", "0")
    assert code == 2 and "top_p" in err
    code, _, err = run_cli(capsys, "generate", "--checkpoint", ckpt, "--prompt", "word " * 100)
    assert code == 2 and "context" in err and "slide" in err
    code, out, _ = run_cli(capsys, "generate", "--checkpoint", ckpt, "--prompt", "word " * 100, "--context-policy",
                           "slide", "--max-new-tokens", "4", "--json")
    assert code == 0 and json.loads(out)["prompt_tokens"] == 60


def test_chat_repl_from_piped_stdin(ckpt, capsys, monkeypatch):
    script = "Hello there\n/system You are terse.\nWho are you?\n/history\n/reset\n/history\nBye\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(script))
    code, out, _ = run_cli(capsys, "chat", "--checkpoint", ckpt, "--max-new-tokens", "6", "--seed", "0")
    assert code == 0
    assert out.count("assistant: ") == 3
    assert "[system prompt set; conversation reset]" in out and "[conversation reset]" in out
    history = out.split("[system prompt set; conversation reset]")[1].split("[conversation reset]")[0]
    assert "[system] You are terse." in history and "[user] Who are you?" in history
    assert "[user] Hello there" not in history  # /system started a new conversation


def test_chat_keeps_history_within_the_context(ckpt, capsys, monkeypatch):
    turns = "".join(f"message number {i} with some words in it\n" for i in range(8))
    monkeypatch.setattr("sys.stdin", io.StringIO(turns))
    code, out, err = run_cli(capsys, "chat", "--checkpoint", ckpt, "--max-new-tokens", "8", "--greedy")
    assert code == 0 and out.count("assistant: ") == 8
    assert "dropped to fit the context" in err
