from dataclasses import dataclass, field

import pytest

from gptforge.config import load_config, parse_overrides
from gptforge.errors import GptforgeError


@dataclass
class Optim:
    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])


@dataclass
class Run:
    name: str = "run"
    steps: int = 10
    compile: bool = False
    precision: str = "fp32"
    optim: Optim = field(default_factory=Optim)
    init_from: str | None = None


def test_yaml_plus_dotted_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: base\nsteps: 5\noptim:\n  lr: 1e-3\n")
    cfg = load_config(Run, path, ["--steps=7", "--optim.lr", "6e-4", "--compile"])
    assert (cfg.name, cfg.steps, cfg.compile, cfg.optim.lr) == ("base", 7, True, 6e-4)
    assert cfg.optim.betas == [0.9, 0.95]


def test_unknown_key_names_the_key_and_the_known_ones(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("optim:\n  lrr: 1\n")
    with pytest.raises(GptforgeError, match=r"unknown key config\.optim\.lrr .*known keys.*lr"):
        load_config(Run, path)


def test_wrong_type_is_rejected():
    with pytest.raises(GptforgeError, match=r"config\.steps: expected an integer"):
        load_config(Run, None, ["--steps=ten"])
    with pytest.raises(GptforgeError, match=r"config\.compile: expected true/false"):
        load_config(Run, None, {"compile": "yes please"})


def test_bad_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: a\nsteps: [1, 2\n")
    with pytest.raises(GptforgeError, match=r"bad\.yaml:\d+"):
        load_config(Run, path)


def test_missing_file():
    with pytest.raises(GptforgeError, match="not found"):
        load_config(Run, "/nonexistent/x.yaml")


def test_optional_fields_accept_null_and_values():
    assert load_config(Run, None, ["--init_from=runs/x"]).init_from == "runs/x"
    assert parse_overrides(["--a.b-c=1"]) == {"a": {"b_c": 1}}
