"""The GPU check: one command that tells us, in a few minutes, what gptforge does on a machine with one NVIDIA GPU.

    python bench/gpu_check.py                    # on the GPU machine (about 5-8 minutes on an H100)
    python bench/gpu_check.py --tiny             # tiny shapes on CPU: the same code path (run by the test suite)

Every check runs gptforge itself (no separate benchmark code) and is recorded, failed or not, in
``<out>/gpu_check.json`` and ``<out>/gpu_check.md``:

1. machine: GPU name, compute capability, memory, bf16 support, the peak FLOP/s MFU is measured against;
2. flash attention: whether SDPA's flash kernel runs in bf16 (it is what ``F.scaled_dot_product_attention`` uses);
3. pretraining GPT-2 124M at T=1024 (tiny on CPU) in bf16 with ``torch.compile`` and ``--micro-batch auto`` on real
   tokens (tinyshakespeare + The Verdict, GPT-2 tokenizer): tokens/s, MFU (goal >= 50% on an H100), fused AdamW in
   use, the loss falling;
4. the modern family with Muon, the same way, when ``gptforge.model_modern`` is installed;
5. checkpoint + exact resume: the same run stopped halfway and resumed, against the uninterrupted run;
6. generation: gptforge's engine vs ``transformers`` ``generate`` (greedy, batch 1 and 16): tokens/s, same tokens;
7. HellaSwag throughput (``eval choice``): items/s.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def machine(device: torch.device) -> dict:
    from gptforge.precision import cpu_native_bf16
    from gptforge.train.metrics import device_peak_flops

    info = {"python": platform.python_version(), "torch": torch.__version__, "device": str(device),
            "cpu": _cpu_model(), "cpu_native_bf16": cpu_native_bf16()}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1),
                    bf16=torch.cuda.is_bf16_supported(), cuda=torch.version.cuda)
    peak, source = device_peak_flops(device, "bf16" if device.type == "cuda" else "fp32")
    info.update(peak_flops=peak, peak_source=source)
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def flash_attention(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"ok": None, "detail": "n/a on CPU (SDPA uses its math or CPU-flash kernel)"}
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(2, 12, 1024, 64, device=device, dtype=torch.bfloat16)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises when the flash kernel cannot run this call
        torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
    torch.cuda.synchronize()
    return {"ok": True, "detail": "SDPA flash kernel runs in bf16 at T=1024, head dim 64"}


def prepare_data(out: Path) -> Path:
    from gptforge.data.prepare import PrepareConfig, prepare
    from gptforge.data.registry import resolve

    verdict = Path(resolve("tinyshakespeare")).parent / "the-verdict.txt"  # beside it in a data directory
    sources = [str(resolve("tinyshakespeare"))] + ([str(verdict)] if verdict.is_file() else [])
    prepare(PrepareConfig(sources=sources, out=str(out / "data"), tokenizer="gpt2", val_fraction=0.05, workers=1,
                          progress=False, histogram=False))
    return out / "data"


def pretrain(data: Path, out: Path, name: str, tiny: bool, family: str = "gpt2", steps: int | None = None,
             stop_at: int | None = None, resume: bool = False, compile_: bool = False) -> dict:
    from gptforge.train.pretrain import PretrainConfig, run_pretrain

    cfg = PretrainConfig(name=name, out_dir=str(out / "runs"))
    cfg.data.path = str(data)
    cfg.model.preset = ("tiny" if tiny else "gpt2") if family == "gpt2" else ("modern-tiny" if tiny else "modern-124m")
    if family != "gpt2":
        cfg.model.family = family  # the modern family's config key (gptforge.model_modern)
        cfg.optim.name = "muon"
    cfg.model.vocab_size = None
    cfg.data.seq_len = 64 if tiny else 1024
    cfg.data.val_tokens = 4096 if tiny else 65536
    cfg.train.max_steps = steps or (8 if tiny else 60)
    cfg.train.stop_at = stop_at
    cfg.train.micro_batch = 4 if tiny else "auto"
    cfg.train.global_batch_seqs = 8 if tiny else None
    cfg.train.global_batch_tokens = None if tiny else 524288
    cfg.train.precision = "fp32" if tiny else "bf16"
    cfg.train.compile = compile_
    cfg.optim.lr = 3e-3 if tiny else 6e-4
    cfg.optim.warmup_steps = 2 if tiny else 10
    cfg.eval.sample_tokens = 8
    cfg.checkpoint.resume = resume
    cfg.log.progress = False
    cfg.log.plot = False
    result = run_pretrain(cfg, log=lambda *_: None)
    records = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    s = result.summary
    return {"steps": result.steps, "tokens_per_s": s["tokens_per_s"], "mfu": s["mfu"], "precision": s["precision"],
            "first_loss": losses[0] if losses else None, "final_loss": result.final_loss,
            "loss_falls": bool(losses and losses[-1] < losses[0] - 0.1), "checkpoint": str(result.checkpoint),
            "weights_sha256": _sha256(Path(result.checkpoint) / "model.safetensors")}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fused_adamw(device: torch.device) -> dict:
    from gptforge.model import GPT, GPTConfig
    from gptforge.train.optim import configure_optimizer

    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32)).to(device)
    opt = configure_optimizer(model, lr=1e-3)
    fused = bool(opt.defaults.get("fused"))
    return {"ok": fused if device.type == "cuda" else None, "fused": fused, "foreach": bool(opt.defaults.get("foreach"))}


def generation(tiny: bool, device: torch.device) -> dict:
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_generate import build_models, real_prompts, time_interleaved

    from gptforge.engine import Engine, SamplingParams
    from gptforge.tokenizer import TiktokenTokenizer

    tok = TiktokenTokenizer()
    ours, hf = build_models("tiny" if tiny else "gpt2")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ours, hf = ours.to(device, dtype), hf.to(device, dtype)
    engine = Engine(ours, tok, device=device)
    engine.base_stop_ids = set()
    n = 16 if tiny else 128
    rows = []
    for batch in (1, 16):
        prompts = real_prompts(batch, 32 if tiny else 64, tok)
        width = max(map(len, prompts))
        ids = torch.tensor([[tok.eot_id] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)

        def run_ours():
            return [c.token_ids for c in engine.generate(prompts, SamplingParams(max_new_tokens=n, temperature=0))]

        def run_hf():
            with torch.inference_mode():
                out = hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                  pad_token_id=tok.eot_id)
            return out[:, width:].tolist()

        times, outs = time_interleaved({"gptforge": run_ours, "transformers": run_hf}, 1 if tiny else 3)
        ours_s, hf_s = min(times["gptforge"]), min(times["transformers"])
        rows.append({"batch": batch, "gptforge_tokens_per_s": batch * n / ours_s,
                     "hf_tokens_per_s": batch * n / hf_s, "speedup": hf_s / ours_s,
                     "identical": sum(a == b for a, b in zip(outs["gptforge"], outs["transformers"]))})
    return {"new_tokens": n, "dtype": str(dtype).replace("torch.", ""), "rows": rows}


def hellaswag(checkpoint: str, tiny: bool, device: torch.device) -> dict:
    from gptforge.checkpoint import load_model
    from gptforge.eval.choice import evaluate_choice

    model, tok, _ = load_model(checkpoint, device=device)
    n = 20 if tiny else 500
    t0 = time.perf_counter()
    result = evaluate_choice(model, tok, "hellaswag", limit=n, batch_size=32, show_progress=False)
    seconds = time.perf_counter() - t0
    return {"items": n, "seconds": seconds, "items_per_s": n / seconds,
            "acc_norm": result["metrics"].get("acc_norm"), "acc": result["metrics"].get("acc")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "bench" / "out" / "gpu_check"), help="report directory")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (automatic without a CUDA GPU)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (it is on for CUDA)")
    args = parser.parse_args(argv)
    for candidate in (ROOT.parent / "shared" / "data", ROOT / "shared" / "data"):  # the offline data, if beside us
        if "GPTFORGE_DATA_DIR" not in os.environ and candidate.is_dir():
            os.environ["GPTFORGE_DATA_DIR"] = str(candidate)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tiny = args.tiny or device.type != "cuda"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "tiny": tiny, "checks": {}}
    compile_ = device.type == "cuda" and not args.no_compile
    state: dict = {}

    def check(name: str, fn):
        t0 = time.perf_counter()
        print(f"[gpu_check] {name} ...", flush=True)
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                value = fn()
            entry = {"ok": value.get("ok", True) if isinstance(value, dict) else True, **(value or {})}
        except Exception as e:  # noqa: BLE001 - every check is recorded, failed or not
            entry = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        report["checks"][name] = entry
        print(f"[gpu_check] {name}: {'ok' if entry['ok'] else ('n/a' if entry['ok'] is None else 'FAILED')} "
              f"({entry['seconds']} s)", flush=True)
        return entry

    report["machine"] = machine(device)
    check("flash_attention", lambda: flash_attention(device))
    check("fused_adamw", lambda: fused_adamw(device))
    data = check("data", lambda: {"path": str(prepare_data(out))}).get("path")
    if data:
        run = check("pretrain_gpt2", lambda: pretrain(Path(data), out, "gpt2", tiny, compile_=compile_))
        state["ckpt"] = run.get("checkpoint")
        if run.get("ok"):
            run["ok"] = bool(run["loss_falls"])
        half = report["checks"]["pretrain_gpt2"].get("steps", 8) // 2 or 1

        def resume():
            full = run
            pretrain(Path(data), out, "resumed", tiny, stop_at=half, compile_=compile_)
            resumed = pretrain(Path(data), out, "resumed", tiny, resume=True, compile_=compile_)
            same = resumed["weights_sha256"] == full["weights_sha256"]
            return {"ok": same or device.type == "cuda", "identical_weights": same,
                    "final_loss": resumed["final_loss"], "uninterrupted_final_loss": full["final_loss"],
                    "detail": "bitwise equal" if same else "not bitwise equal (nondeterministic GPU kernels?)"}

        if run.get("ok"):
            check("exact_resume", resume)
        try:
            import gptforge.model_modern  # noqa: F401
            check("pretrain_modern_muon", lambda: pretrain(Path(data), out, "modern", tiny, family="modern",
                                                           compile_=compile_))
        except ImportError:
            report["checks"]["pretrain_modern_muon"] = {"ok": None, "detail": "gptforge.model_modern not installed"}
    check("generation_vs_hf", lambda: generation(tiny, device))
    if state.get("ckpt"):
        check("hellaswag_throughput", lambda: hellaswag(state["ckpt"], tiny, device))
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
    (out / "gpu_check.md").write_text(markdown(report), encoding="utf-8")
    print(markdown(report))
    failed = [k for k, v in report["checks"].items() if v.get("ok") is False]
    print(f"[gpu_check] report: {out / 'gpu_check.md'}; " + (f"FAILED: {', '.join(failed)}" if failed else "all ok"))
    return 1 if failed else 0


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"# gptforge GPU check ({report['date']}{', tiny shapes' if report['tiny'] else ''})", "",
             f"- device: {m.get('gpu', m['device'])} (capability {m.get('capability', '-')}, "
             f"{m.get('memory_gib', '-')} GiB, bf16 {m.get('bf16', '-')}); CPU {m['cpu']}; torch {m['torch']}",
             f"- MFU peak: {m['peak_flops']} FLOP/s ({m['peak_source']})", "", "| check | result | seconds |",
             "|---|---|---:|"]
    for name, c in report["checks"].items():
        status = "ok" if c.get("ok") else ("n/a" if c.get("ok") is None else "**FAILED**")
        detail = {k: v for k, v in c.items() if k not in ("ok", "seconds", "traceback", "checkpoint", "rows")}
        if "rows" in c:
            detail["rows"] = "; ".join(f"batch {r['batch']}: {r['gptforge_tokens_per_s']:,.0f} vs "
                                       f"{r['hf_tokens_per_s']:,.0f} tok/s ({r['speedup']:.2f}×, {r['identical']} "
                                       "identical)" for r in c["rows"])
        text = ", ".join(f"{k} {round(v, 4) if isinstance(v, float) else v}" for k, v in detail.items())
        lines.append(f"| {name} | {status}: {text} | {c.get('seconds', '')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
