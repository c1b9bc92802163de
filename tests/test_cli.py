import argparse
import subprocess
import sys

import pytest

from gptforge import cli
from gptforge.cli import build_parser, main

# The stages of the design, in the order of the user's journey (and of ``gptforge --help``). Written out
# here on purpose: checking the parser against cli.COMMAND_MODULES would pass whatever that list holds.
DESIGN_COMMANDS = ["quickstart", "model", "tokenizer", "data", "pretrain", "sft", "classify", "dpo",
                   "generate", "chat", "serve", "eval", "compare", "export", "import"]


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return {name: p for action in parser._actions if isinstance(action, argparse._SubParsersAction)
            for name, p in action.choices.items()}


def help_of(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code in (0, None), f"gptforge {' '.join(argv)} --help exited {exit_.value.code}"
    return capsys.readouterr().out


def runnable_paths(command: str) -> list[list[str]]:
    """``[command]`` and/or ``[command, action]`` for every parser a user runs (a group whose action is
    required, like ``gptforge model``, only lists its actions; each action has its own example)."""
    paths = []

    def walk(p, path):
        actions = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        if not any(a.required for a in actions):
            paths.append(path)
        for name, child in subcommands(p).items():
            walk(child, [*path, name])
    walk(subcommands(build_parser())[command], [command])
    return paths


def test_help_lists_stages(capsys):
    main([])
    out = capsys.readouterr().out
    assert "model" in out


def test_parser_has_every_command_of_the_design_in_journey_order():
    assert list(subcommands(build_parser())) == DESIGN_COMMANDS


def test_a_command_module_that_fails_to_import_is_an_error_not_a_missing_command(monkeypatch):
    monkeypatch.setattr(cli, "COMMAND_MODULES", [*cli.COMMAND_MODULES, "no_such_stage"])
    with pytest.raises(ModuleNotFoundError, match="no_such_stage"):
        build_parser()


@pytest.mark.parametrize("command", DESIGN_COMMANDS)
def test_every_command_has_help_ending_with_an_example(command, capsys):
    assert command in help_of(capsys)  # listed in gptforge --help
    help_of(capsys, command)  # exits 0
    for path in runnable_paths(command):
        text = help_of(capsys, *path)
        head, found, tail = text.rpartition("\nexample:\n")
        assert found, f"gptforge {' '.join(path)} --help has no 'example:' section"
        assert "options:" in head and "options:" not in tail, "the example comes after the options, at the end"
        example = tail.splitlines()[0]
        assert f"gptforge {' '.join(path)}" in example, example


def test_help_imports_no_heavy_modules():
    code = ("import sys; from gptforge.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'numpy', 'transformers', 'tokenizers', 'tiktoken', 'fastapi', "
            "'safetensors', 'datasets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_model_info_prints_params_and_memory(capsys):
    assert main(["model", "info", "--preset", "gpt2", "--micro-batch", "4"]) == 0
    out = capsys.readouterr().out
    assert "124,439,808" in out and "optimizer (AdamW)" in out and "kv_cache" in out


def test_user_errors_exit_2_with_one_line(capsys):
    assert main(["model", "info", "--preset", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gptforge: error: unknown model preset") and "\n" not in err
    assert main(["model", "info", "--preset", "tiny", "--set", "n_head=3"]) == 2
    assert "divisible" in capsys.readouterr().err


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "gptforge", "--help"], capture_output=True, text=True, check=False)
    assert out.returncode == 0 and "gptforge" in out.stdout
