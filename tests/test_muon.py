"""Muon (``optim.name: muon``): the update rule against references, the parameter split, the LR schedule,
gradient accumulation, exact resume, and torchrun DDP (2 processes, gloo) against one process."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gptforge.model import GPT, GPTConfig
from gptforge.model_modern import ModernConfig, ModernGPT
from gptforge.train.core import OptimConfig, build_optimizer
from gptforge.train.optim import MuonAdamW, configure_muon, set_lr, zeropower_via_newtonschulz
from gptforge.train.pretrain import run_pretrain

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


def reference_newton_schulz(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """modded-nanogpt's ``zeropower_via_newtonschulz5``, in fp32."""
    a, b, c = (3.4445, -4.7750, 2.0315)
    X = G.float()
    if G.size(-2) > G.size(-1):
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    if G.size(-2) > G.size(-1):
        X = X.mT
    return X


def grads(shape, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


@pytest.mark.parametrize("shape", [(24, 8), (8, 24)])
@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_update_equals_torch_optim_muon_bit_for_bit(shape, nesterov):
    torch.manual_seed(0)
    w0 = torch.randn(shape)
    ours_p, theirs_p = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    ours = MuonAdamW([{"params": [ours_p], "kind": "muon", "weight_decay": 0.1}], lr=0.02, momentum=0.9,
                     nesterov=nesterov, ns_dtype=torch.bfloat16)
    theirs = torch.optim.Muon([theirs_p], lr=0.02, weight_decay=0.1, momentum=0.9, nesterov=nesterov)
    for g in grads(shape, 4):
        ours_p.grad, theirs_p.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    assert torch.equal(ours_p, theirs_p)
    assert torch.equal(ours.state[ours_p]["momentum_buffer"], theirs.state[theirs_p]["momentum_buffer"])


def test_newton_schulz_in_fp32_matches_the_reference_and_orthogonalises():
    g = grads((32, 12), 1)[0]
    ours = zeropower_via_newtonschulz(g, 5, torch.float32)
    assert torch.allclose(ours, reference_newton_schulz(g), atol=1e-6)
    s = torch.linalg.svdvals(ours)
    assert s.min() > 0.5 and s.max() < 1.25  # every direction of g gets a comparable step
    assert torch.linalg.svdvals(g).max() / torch.linalg.svdvals(g).min() > 3  # which g itself did not have


def test_adamw_groups_equal_torch_adamw():
    torch.manual_seed(0)
    params = [torch.randn(6, 5), torch.randn(5)]
    ours_p = [torch.nn.Parameter(p.clone()) for p in params]
    theirs_p = [torch.nn.Parameter(p.clone()) for p in params]
    ours = MuonAdamW([{"params": ours_p[:1], "kind": "adamw", "weight_decay": 0.1},
                      {"params": ours_p[1:], "kind": "adamw", "weight_decay": 0.0}], lr=1e-2, betas=(0.9, 0.95))
    theirs = torch.optim.AdamW([{"params": theirs_p[:1], "weight_decay": 0.1},
                                {"params": theirs_p[1:], "weight_decay": 0.0}], lr=1e-2, betas=(0.9, 0.95),
                               foreach=False)
    for step in range(5):
        for a, b, g in zip(ours_p, theirs_p, grads((6, 5), 1, step) + grads((5,), 1, step)):
            a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    for a, b in zip(ours_p, theirs_p):
        assert torch.allclose(a, b, atol=1e-7, rtol=0)


@pytest.mark.parametrize("family", ["gpt2", "modern"])
def test_muon_takes_the_block_matrices_and_adamw_the_rest(family):
    if family == "modern":
        model = ModernGPT(ModernConfig(vocab_size=100, block_size=16, n_layer=2, n_head=2, n_embd=16,
                                       qk_norm=True, tie_embeddings=False))
    else:
        model = GPT(GPTConfig(vocab_size=100, block_size=16, n_layer=2, n_head=2, n_embd=16))
    opt = build_optimizer(model, OptimConfig(name="muon", lr=1e-3, muon_lr=0.05))
    names = {id(p): n for n, p in model.named_parameters()}
    muon = [names[id(p)] for g in opt.param_groups if g["kind"] == "muon" for p in g["params"]]
    adamw = [names[id(p)] for g in opt.param_groups if g["kind"] == "adamw" for p in g["params"]]
    assert muon and all(n.startswith("transformer.h.") and n.endswith(".weight") for n in muon)
    assert "transformer.wte.weight" in adamw
    assert all(model.get_parameter(n).ndim == 1 for n in adamw if ".h." in n)  # gains and biases only
    assert len(muon) + len(adamw) == len(list(model.parameters()))
    set_lr(opt, 5e-4)  # the schedule scales Muon's LR alongside AdamW's
    assert {g["kind"]: g["lr"] for g in opt.param_groups} == {"adamw": 5e-4, "muon": pytest.approx(0.025)}


def test_optimizer_state_dict_round_trip_continues_identically():
    def run(split: bool):
        torch.manual_seed(0)
        model = ModernGPT(ModernConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=16))
        opt = configure_muon(model, lr=1e-2, muon_lr=0.02)
        x = torch.randint(0, 50, (4, 8))
        for step in range(4):
            if split and step == 2:
                state = opt.state_dict()
                opt = configure_muon(model, lr=1e-2, muon_lr=0.02)
                opt.load_state_dict(state)
            model(x, x)[1].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return [p.detach().clone() for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(run(False), run(True)))


def test_resuming_adamw_state_into_muon_is_a_clear_error():
    from gptforge.errors import GptforgeError
    from gptforge.train.optim import configure_optimizer

    model = ModernGPT(ModernConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=16))
    with pytest.raises(GptforgeError, match="another optim.name"):
        configure_muon(model, lr=1e-3).load_state_dict(configure_optimizer(model, lr=1e-3).state_dict())


def quiet(*_args, **_kwargs) -> None:
    pass


def muon_config(small_config, shards, out, name, steps=6, **train):
    cfg = small_config(shards, out, name, steps=steps, **train)
    cfg.model.family = "modern"
    cfg.optim.name, cfg.optim.muon_lr = "muon", 0.02
    return cfg


def test_gradient_accumulation_matches_one_big_micro_batch(shakespeare_shards, tmp_path, small_config, losses):
    run_pretrain(muon_config(small_config, shakespeare_shards, tmp_path, "accum", steps=3), log=quiet)
    one = muon_config(small_config, shakespeare_shards, tmp_path, "one", steps=3, micro_batch=8)
    run_pretrain(one, log=quiet)
    assert losses(tmp_path / "accum") == pytest.approx(losses(tmp_path / "one"), abs=1e-5)


def test_resume_with_muon_gives_identical_losses_and_weights(shakespeare_shards, tmp_path, small_config, losses):
    full = muon_config(small_config, shakespeare_shards, tmp_path, "full")
    full.model.dropout = 0.1  # dropout masks depend on the restored RNG state
    run_pretrain(full, log=quiet)
    split = muon_config(small_config, shakespeare_shards, tmp_path, "split", stop_at=3)
    split.model.dropout = 0.1
    run_pretrain(split, log=quiet)
    split.train.stop_at, split.checkpoint.resume = None, True
    run_pretrain(split, log=quiet)
    assert len(losses(tmp_path / "split")) == 6
    assert losses(tmp_path / "split") == losses(tmp_path / "full")  # exact, per step
    a = load_file(str(tmp_path / "full" / "ckpt" / "step_0000006" / "model.safetensors"))
    b = load_file(str(tmp_path / "split" / "ckpt" / "step_0000006" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state = torch.load(tmp_path / "split" / "ckpt" / "step_0000006" / "optimizer.pt", weights_only=True)
    assert {g["kind"] for g in state["optimizer"]["param_groups"]} == {"muon", "adamw"}


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process_with_muon(shakespeare_shards, tmp_path, small_config, cli_args,
                                                            losses):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    cfg = muon_config(small_config, shakespeare_shards, tmp_path, "single", steps=4)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    # one process: micro-batch 4 × 2 accumulation steps; two processes: micro-batch 4 × 1 each (global 8)
    single = subprocess.run([sys.executable, "-m", "gptforge", "pretrain", *cli_args(cfg)], env=env,
                            capture_output=True, text=True, timeout=300, check=False)
    assert single.returncode == 0, single.stderr
    multi = subprocess.run([torchrun, "--nproc_per_node=2", "--master_port=29541", "-m", "gptforge", "pretrain",
                            *cli_args(cfg), "--name=ddp"], env=env, capture_output=True, text=True, timeout=300,
                           check=False)
    assert multi.returncode == 0, multi.stdout[-3000:] + multi.stderr[-3000:]
    assert "accumulation 1" in multi.stdout and "× 2" in multi.stdout
    a, b = losses(tmp_path / "single"), losses(tmp_path / "ddp")
    assert len(a) == len(b) == 4
    assert a == pytest.approx(b, abs=1e-5)
    wa = load_file(str(tmp_path / "single" / "ckpt" / "step_0000004" / "model.safetensors"))
    wb = load_file(str(tmp_path / "ddp" / "ckpt" / "step_0000004" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


@pytest.mark.parametrize("family", ["gpt2", "modern"])
@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_memory_estimate_counts_the_optimizer_state_the_optimizer_keeps(family, name):
    from gptforge.memory import training_memory

    if family == "modern":
        config = ModernConfig(vocab_size=100, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                              tie_embeddings=False)
        model = ModernGPT(config)
    else:
        config = GPTConfig(vocab_size=100, block_size=16, n_layer=2, n_head=2, n_embd=16)
        model = GPT(config)
    opt = build_optimizer(model, OptimConfig(name=name, lr=1e-3))
    model(torch.randint(0, 100, (2, 16)), targets=torch.randint(0, 100, (2, 16)))[1].backward()
    opt.step()
    kept = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
               if torch.is_tensor(t) and t.ndim > 0)
    estimate = training_memory(config, 2, 16, "fp32", optimizer=name)
    assert estimate.optimizer == kept
    assert estimate.optimizer_name == ("Muon + AdamW" if name == "muon" else "AdamW")


def test_model_info_prints_muon_and_dpo_estimates(capsys):
    from gptforge.cli import main
    from gptforge.memory import dpo_training_memory, training_memory
    from gptforge.model_modern import PRESETS, config_from_dict

    assert main(["model", "info", "--preset", "modern-124m", "--optimizer", "muon", "--dpo-pairs", "4"]) == 0
    out = capsys.readouterr().out
    assert "optimizer (Muon + AdamW)" in out and "DPO training memory, 4 pairs (8 sequences)" in out
    assert "reference model" in out
    config = config_from_dict({**PRESETS["modern-124m"], "family": "modern"})
    plain = training_memory(config, 8, 1024)
    dpo = dpo_training_memory(config, 4, 1024)  # 4 pairs train like 8 sequences, plus the frozen fp32 copy
    assert dpo.total - dpo.reference == plain.total and dpo.reference > 4 * 124e6
    assert dpo_training_memory(config, 4, 1024, reference="precomputed").total == plain.total
