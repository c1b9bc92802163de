"""Start-up: the command line and `data prepare` import only what the stage being run uses.

Each check runs a fresh interpreter (this test process has torch loaded already, by conftest) and lists the
heavy packages found in ``sys.modules`` afterwards. No timings: what is imported is what costs the time.
"""

import json
import subprocess
import sys

HEAVY = ("torch", "numpy", "transformers", "datasets", "pyarrow", "matplotlib", "PIL", "tiktoken", "tokenizers",
         "safetensors", "fastapi", "peft", "lm_eval")

REPORT = """
import json, sys
loaded = sorted({m.split(".")[0] for m in sys.modules} & set(HEAVY))
commands = sorted(m.split(".")[-1] for m in sys.modules if m.startswith("gptforge.commands."))
print(json.dumps({"heavy": loaded, "commands": commands}))
"""


def _after(code: str) -> dict:
    """Heavy packages and command modules imported once ``code`` has run in a fresh interpreter."""
    script = f"HEAVY = {HEAVY!r}\n{code}\n{REPORT}"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _main(argv: list[str]) -> str:
    """``gptforge.cli.main(argv)`` with ``--help``'s SystemExit(0) caught and its output silenced."""
    return ("import contextlib, io\nfrom gptforge.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            f"    try:\n        main({argv!r})\n    except SystemExit as e:\n        assert e.code in (0, None), e\n")


def test_help_imports_no_heavy_package():
    assert _after(_main(["--help"]))["heavy"] == []


def test_data_prepare_help_imports_no_heavy_package_and_no_other_command():
    seen = _after(_main(["data", "prepare", "--help"]))
    assert seen["heavy"] == []
    assert "data" in seen["commands"] and "generate" not in seen["commands"] and "eval" not in seen["commands"]


def test_building_and_parsing_data_prepare_imports_no_heavy_package():
    code = ("from gptforge.cli import build_parser\n"
            "args = build_parser().parse_args(['data', 'prepare', 'in.txt', '--out', 'out', '--workers', '2'])\n"
            "assert args.func.__name__ == 'run_prepare' and args.workers == 2\n")
    assert _after(code)["heavy"] == []


def test_a_data_prepare_run_imports_only_what_it_uses(data_dir, tmp_path):
    """Reading, tokenizing (tiktoken, numpy) and the histogram (Pillow): no torch, no matplotlib."""
    src = data_dir / "pretrain" / "the-verdict.txt"
    argv = ["data", "prepare", str(src), "--out", str(tmp_path / "out"), "--val-fraction", "0", "--workers", "2"]
    seen = _after(_main(argv))
    assert seen["heavy"] == ["PIL", "numpy", "tiktoken"]
    assert (tmp_path / "out" / "manifest.json").is_file() and (tmp_path / "out" / "doc_lengths.png").is_file()
