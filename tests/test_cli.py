import subprocess
import sys

from gptforge.cli import main


def test_help_lists_stages(capsys):
    main([])
    out = capsys.readouterr().out
    assert "model" in out


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
    out = subprocess.run([sys.executable, "-m", "gptforge", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "gptforge" in out.stdout
