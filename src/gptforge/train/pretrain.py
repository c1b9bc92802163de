"""Pretraining: from one CPU to many GPUs under ``torchrun``, resumable to the bit.

``run_pretrain(PretrainConfig(...))`` (or ``gptforge pretrain --config recipe.yaml``) builds the model (a preset,
or ``--model.init_from`` weights), the shard loader, AdamW and the LR schedule, then loops: gradient
accumulation over micro-batches (DDP ``no_sync`` on all but the last), pre-clip gradient norm, non-finite
gradient skipping, fp16 loss scaling, periodic validation loss, samples and checkpoints. Everything a step
measured goes to ``metrics.jsonl``; ``loss.png`` is redrawn at each checkpoint.
"""

from __future__ import annotations

import base64
import math
import os
import random
import resource
import signal
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptforge.errors import GptforgeError
from gptforge.model import GPT, PRESETS, GPTConfig, flops_per_token

# ---- configuration -------------------------------------------------------------------------------------------


@dataclass
class ModelSection:
    """A preset plus field overrides, or ``init_from`` existing weights (gptforge checkpoint or HF GPT-2 dir)."""

    preset: str = "tiny"
    init_from: str | None = None
    vocab_size: int | None = None  # default: the data's tokenizer
    block_size: int | None = None
    n_layer: int | None = None
    n_head: int | None = None
    n_embd: int | None = None
    dropout: float | None = None
    bias: bool | None = None
    qkv_bias: bool | None = None
    tie_embeddings: bool | None = None


@dataclass
class DataSection:
    path: str = ""  # a prepared shard directory (gptforge data prepare)
    tokenizer: str | None = None  # default: <path>/tokenizer, else the manifest's tokenizer name
    seq_len: int | None = None  # default: the model's context length
    sampling: str = "random"  # random windows | sequential (epochs over non-overlapping windows)
    val_tokens: int = 65536  # size of the fixed validation slice (first tokens of the val split)


@dataclass
class TrainSection:
    micro_batch: int | str = 8  # sequences per forward pass per process, or "auto"
    global_batch_tokens: int | None = None  # e.g. 524288; or
    global_batch_seqs: int | None = None  # default: micro_batch × world size (no accumulation)
    max_steps: int | None = None  # training length: exactly one of these four
    max_tokens: int | None = None
    epochs: float | None = None
    tokens_per_param: float | None = None  # Chinchilla: 20
    stop_at: int | None = None  # stop (with a checkpoint) after this step, keeping the full run's schedule
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    compile: bool = False
    tf32: bool = True
    grad_clip: float | None = 1.0
    seed: int = 1337
    device: str = "auto"
    distributed: str = "ddp"  # ddp | fsdp (only used under torchrun with >1 process)


@dataclass
class OptimSection:
    lr: float = 6e-4
    min_lr: float | None = None  # default: min_lr_ratio × lr
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    decay_embeddings: bool = False
    schedule: str = "cosine"  # cosine | constant | wsd
    warmup_steps: int | None = None
    warmup_ratio: float = 0.0
    decay_ratio: float = 0.2  # wsd: the final fraction of steps spent decaying


@dataclass
class EvalSection:
    interval: int = 0  # validation loss every N steps (0: only at the end)
    sample_interval: int = 0  # samples.md every N steps (0: only at the end)
    sample_prompts: list[str] = field(default_factory=lambda: ["\n"])
    sample_tokens: int = 64
    temperature: float = 0.8
    top_k: int = 50
    hellaswag_interval: int = 0  # HellaSwag accuracy on a fixed subset every N steps (0: off)
    hellaswag_items: int = 200  # size of that subset (the first N validation items)
    hellaswag_data: str | None = None  # rowanz jsonl; default: the data dir's copy, else the hub


@dataclass
class CheckpointSection:
    interval: int = 0  # checkpoint every N steps (0: only at the end)
    keep_last: int = 3
    resume: bool | str = False  # true: continue the run in out_dir/name; "auto": if it has a checkpoint
    fallback: bool = False  # resume from the newest *valid* checkpoint when the latest is corrupt


@dataclass
class LogSection:
    progress: bool = True
    trackers: list[str] = field(default_factory=list)  # tensorboard, mlflow, wandb
    plot: bool = True


@dataclass
class PretrainConfig:
    name: str = "pretrain"
    out_dir: str = "runs"
    overwrite: bool = False  # start over in an existing run directory
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    optim: OptimSection = field(default_factory=OptimSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name


@dataclass
class Plan:
    """The batch and length arithmetic derived from the config, printed by ``--dry-run``."""

    world_size: int
    micro_batch: int
    seq_len: int
    global_batch: int  # sequences per optimizer step
    grad_accum: int
    tokens_per_step: int
    total_steps: int
    warmup_steps: int
    params: int
    flops_per_token: float
    train_tokens: int | None  # tokens in the train split, when known

    @property
    def total_tokens(self) -> int:
        return self.total_steps * self.tokens_per_step


@dataclass
class PretrainResult:
    run_dir: Path
    steps: int  # optimizer steps completed (global)
    tokens: int
    final_loss: float
    final_val_loss: float | None
    best_val_loss: float | None
    checkpoint: Path | None
    interrupted: bool
    summary: dict


# ---- building blocks -----------------------------------------------------------------------------------------


def resolve_tokenizer(cfg: PretrainConfig):
    """The tokenizer that produced the shards (explicit, ``<data>/tokenizer/``, or the manifest's name)."""
    from gptforge.tokenizer import load_tokenizer

    if cfg.data.tokenizer:
        return load_tokenizer(cfg.data.tokenizer)
    data = Path(cfg.data.path)
    if (data / "tokenizer").is_dir():
        return load_tokenizer(data / "tokenizer")
    manifest = _manifest(data)
    tok = manifest.get("tokenizer") if manifest else None
    spec = None
    if isinstance(tok, str):
        spec = tok
    elif isinstance(tok, dict):
        for key in ("path", "dir", "name", "spec"):
            cand = tok.get(key)
            if not cand:
                continue
            if key == "name" and cand in ("gpt2", "gpt2-chat"):
                spec = cand
                break
            for path in (data / str(cand), Path(str(cand))):  # relative to the data directory first
                if key != "name" and path.exists():
                    spec = path
                    break
            if spec is not None:
                break
    if spec is None:
        raise GptforgeError(f"cannot tell which tokenizer made the shards in {data}: set data.tokenizer "
                            "(e.g. --data.tokenizer=gpt2 or a tokenizer directory)")
    return load_tokenizer(spec)


def _manifest(data: Path) -> dict | None:
    from gptforge.data.shards import read_manifest

    try:
        return read_manifest(data)
    except GptforgeError:
        return None


def build_model_config(cfg: PretrainConfig, vocab_size: int | None) -> GPTConfig:
    """Preset + overrides; the vocabulary defaults to the tokenizer's."""
    from gptforge.config import from_dict

    m = cfg.model
    if m.preset not in PRESETS:
        raise GptforgeError(f"unknown model.preset {m.preset!r}; choose one of: {', '.join(PRESETS)}")
    fields = {k: v for k, v in asdict(m).items() if k not in ("preset", "init_from") and v is not None}
    base = dict(PRESETS[m.preset])
    if vocab_size is not None and m.vocab_size is None:
        base["vocab_size"] = vocab_size
    return from_dict(GPTConfig, {**base, **fields}, where="model")


def compute_plan(cfg: PretrainConfig, model_config: GPTConfig, world_size: int, micro_batch: int,
                 train_tokens: int | None) -> Plan:
    """Global batch, accumulation and run length from the user's intent; clear errors when they do not fit."""
    t = cfg.train
    T = cfg.data.seq_len or model_config.block_size
    if T > model_config.block_size:
        raise GptforgeError(f"data.seq_len={T} exceeds the model's context length {model_config.block_size}; "
                            "lower data.seq_len or raise model.block_size")
    if micro_batch < 1:
        raise GptforgeError(f"train.micro_batch must be >= 1, got {micro_batch}")
    if t.global_batch_tokens is not None and t.global_batch_seqs is not None:
        raise GptforgeError("set only one of train.global_batch_tokens and train.global_batch_seqs")
    if t.global_batch_tokens is not None:
        if t.global_batch_tokens % T:
            raise GptforgeError(f"train.global_batch_tokens={t.global_batch_tokens:,} is not a multiple of the "
                                f"sequence length {T}; use a multiple such as {max(1, t.global_batch_tokens // T) * T:,}")
        G = t.global_batch_tokens // T
    elif t.global_batch_seqs is not None:
        G = t.global_batch_seqs
    else:
        G = micro_batch * world_size
    per_step = micro_batch * world_size
    if G % per_step:
        divisors = [d for d in range(1, G + 1) if G % (d * world_size) == 0]
        hint = (f"use train.micro_batch in {divisors[-6:]}" if divisors else
                f"use a global batch that is a multiple of the world size {world_size}")
        raise GptforgeError(f"global batch of {G} sequences is not divisible by micro_batch {micro_batch} × "
                            f"{world_size} process(es) = {per_step}; {hint}")
    accum = G // per_step
    tokens_per_step = G * T
    params = _count_params(model_config)
    lengths = {"max_steps": t.max_steps, "max_tokens": t.max_tokens, "epochs": t.epochs,
               "tokens_per_param": t.tokens_per_param}
    chosen = [k for k, v in lengths.items() if v is not None]
    if len(chosen) != 1:
        raise GptforgeError(f"set exactly one training length (train.max_steps, train.max_tokens, train.epochs or "
                            f"train.tokens_per_param); got {chosen or 'none'}")
    if t.max_steps is not None:
        steps = t.max_steps
    elif t.max_tokens is not None:
        steps = math.ceil(t.max_tokens / tokens_per_step)
    elif t.tokens_per_param is not None:
        steps = math.ceil(t.tokens_per_param * params / tokens_per_step)
    else:
        if train_tokens is None:
            raise GptforgeError(f"train.epochs needs the prepared data to count its tokens; {cfg.data.path!r} has "
                                "no train shards (prepare it first, or give train.max_tokens)")
        steps = math.ceil(t.epochs * train_tokens / tokens_per_step)
    if steps < 1:
        raise GptforgeError(f"the run would have {steps} steps; raise the training length")
    o = cfg.optim
    warmup = o.warmup_steps if o.warmup_steps is not None else round(o.warmup_ratio * steps)
    return Plan(world_size=world_size, micro_batch=micro_batch, seq_len=T, global_batch=G, grad_accum=accum,
                tokens_per_step=tokens_per_step, total_steps=steps, warmup_steps=warmup, params=params,
                flops_per_token=flops_per_token(model_config, T), train_tokens=train_tokens)


def _count_params(config: GPTConfig) -> int:
    from gptforge.model import count_params

    return count_params(config)


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if precision not in ("fp32", "bf16", "fp16"):
        raise GptforgeError(f"train.precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    return precision


def autocast_context(precision: str, device: torch.device):
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    def b64(t: torch.Tensor) -> str:
        return base64.b64encode(t.numpy().tobytes()).decode()

    np_state = np.random.get_state()
    state = {"torch": b64(torch.get_rng_state()), "python": _py_state_to_json(random.getstate()),
             "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    if torch.cuda.is_available():
        state["cuda"] = [b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    def unb64(s: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)

    torch.set_rng_state(unb64(state["torch"]))
    random.setstate(_py_state_from_json(state["python"]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([unb64(s) for s in state["cuda"]])


def _py_state_to_json(s):
    return [s[0], list(s[1]), s[2]]


def _py_state_from_json(s):
    return (s[0], tuple(s[1]), s[2])


def find_micro_batch(model: GPT, per_rank_batch: int, seq_len: int, precision: str, device: torch.device,
                     log=print) -> int:
    """The largest divisor of ``per_rank_batch`` that trains without running out of memory.

    On CUDA: binary search over the divisors, each trial two full forward/backward/AdamW steps (with LR 0 on a
    throwaway optimizer, so the weights do not change). Elsewhere: the largest divisor whose estimated training
    memory fits in half of the free RAM.
    """
    from gptforge.memory import human_bytes, training_memory

    divisors = [d for d in range(1, per_rank_batch + 1) if per_rank_batch % d == 0]
    if device.type != "cuda":
        avail = _available_ram()
        fitting = [d for d in divisors if training_memory(model.config, d, seq_len, precision).total <= avail / 2]
        chosen = fitting[-1] if fitting else 1
        log(f"micro-batch auto (no CUDA, memory estimate vs {human_bytes(avail)} free RAM): {chosen}")
        return chosen
    from gptforge.train.optim import configure_optimizer

    trial_opt = configure_optimizer(model, lr=0.0, weight_decay=0.0)  # LR 0: allocates state, moves nothing
    gen = torch.Generator(device=device).manual_seed(0)  # private: the training RNG stays untouched

    def runs(mb: int) -> bool:
        try:
            for _ in range(2):
                x = torch.randint(0, model.config.vocab_size, (mb, seq_len), device=device, generator=gen)
                with autocast_context(precision, device):
                    _, loss = model(x, x)
                loss.backward()
                trial_opt.step()
                trial_opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize(device)
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            trial_opt.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()

    lo, hi = 0, len(divisors) - 1
    best = None
    while lo <= hi:
        mid = (lo + hi) // 2
        if runs(divisors[mid]):
            best, lo = divisors[mid], mid + 1
        else:
            hi = mid - 1
    trial_opt.state.clear()
    torch.cuda.empty_cache()
    if best is None:
        raise GptforgeError(f"out of GPU memory even at micro-batch 1 × {seq_len} tokens; use a smaller model, "
                            "a shorter data.seq_len, bf16, or FSDP (--train.distributed=fsdp)")
    log(f"micro-batch auto: {best} (largest of {divisors} that fits on {torch.cuda.get_device_name(device)})")
    return best


def _available_ram() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@torch.no_grad()
def evaluate_loss(model, windows: np.ndarray, micro_batch: int, precision: str, device, dist_info) -> float:
    """Mean next-token loss over the fixed validation windows, split across ranks.

    Every rank runs the same number of forward passes (a rank out of windows repeats one and discards it),
    so sharded models never wait on each other, and the mean does not depend on the world size.
    """
    from gptforge.train.distributed import all_reduce_sum

    W = dist_info.world_size
    mine = windows[dist_info.rank::W]
    n_batches = math.ceil(math.ceil(len(windows) / W) / micro_batch)
    total = torch.zeros(2, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    for i in range(n_batches):
        part = mine[i * micro_batch:(i + 1) * micro_batch]
        weight = 1.0 if len(part) else 0.0
        chunk = torch.from_numpy(part if len(part) else windows[:1]).to(device)
        with autocast_context(precision, device):
            _, loss = model(chunk[:, :-1], chunk[:, 1:])
        total[0] += weight * loss.double() * chunk[:, 1:].numel()
        total[1] += weight * chunk[:, 1:].numel()
    model.train(was_training)
    all_reduce_sum(total, dist_info)
    return float(total[0] / total[1]) if total[1] > 0 else float("nan")


@torch.no_grad()
def sample_text(model: GPT, tokenizer, prompt: str, max_new_tokens: int, temperature: float, top_k: int,
                device, seed: int) -> str:
    """A short sample with top-k sampling from a private generator (the training RNG is left untouched)."""
    from gptforge.model import KVCache

    was_training = model.training
    model.eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    ids = tokenizer.encode(prompt) or [tokenizer.eot_id]
    ids = ids[-(model.config.block_size - 1):]
    x = torch.tensor([ids], device=device)
    budget = min(max_new_tokens, model.config.block_size - x.shape[1])
    cache = KVCache(model.config, 1, x.shape[1] + budget, device=device, dtype=next(model.parameters()).dtype)
    out: list[int] = []
    step_in = x
    for _ in range(max(0, budget)):
        logits, _ = model(step_in, kv_cache=cache)
        logits = logits[:, -1, :].float() / max(temperature, 1e-5)
        if top_k:
            v, _ = torch.topk(logits, min(top_k, logits.shape[-1]))
            logits[logits < v[:, [-1]]] = -float("inf")
        nxt = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=gen)
        tok = int(nxt.item())
        if tok == tokenizer.eot_id:
            break
        out.append(tok)
        step_in = nxt
    model.train(was_training)
    return tokenizer.decode(out)


def _data_train_tokens(data_path: str) -> int | None:
    from gptforge.data.shards import list_shards, read_header

    try:
        return sum(read_header(p)[1] for p in list_shards(data_path, "train"))
    except GptforgeError:
        return None


# ---- dry run -------------------------------------------------------------------------------------------------


def dry_run(cfg: PretrainConfig, log=print) -> dict:
    """Build the model on the meta device and report the plan: steps, tokens, accumulation, memory."""
    from gptforge.memory import human_bytes, training_memory

    world = int(os.environ.get("WORLD_SIZE", "1"))
    model_config = _dry_model_config(cfg)
    with torch.device("meta"):
        model = GPT(model_config)
    mb = cfg.train.micro_batch if isinstance(cfg.train.micro_batch, int) else 1
    micro_auto = not isinstance(cfg.train.micro_batch, int)
    if micro_auto and cfg.train.micro_batch != "auto":
        raise GptforgeError(f"train.micro_batch must be an integer or 'auto', got {cfg.train.micro_batch!r}")
    train_tokens = _data_train_tokens(cfg.data.path)
    length_unknown = cfg.train.epochs is not None and train_tokens is None
    if length_unknown:  # epochs over data that is not prepared here: show everything but the length
        import copy

        probe = copy.deepcopy(cfg)
        probe.train.epochs, probe.train.max_steps = None, 1
        plan = compute_plan(probe, model_config, world, mb, None)
    else:
        plan = compute_plan(cfg, model_config, world, mb, train_tokens)
    precision = cfg.train.precision if cfg.train.precision != "auto" else "bf16 (on CUDA) / fp32 (CPU)"
    mem_precision = cfg.train.precision if cfg.train.precision in ("fp32", "bf16", "fp16") else "bf16"
    mem = training_memory(model_config, plan.micro_batch, plan.seq_len, mem_precision)
    info = {
        "run_dir": str(cfg.run_dir), "params": model.num_params(), "model": model_config.to_dict(),
        "world_size": world, "micro_batch": "auto" if micro_auto else plan.micro_batch,
        "seq_len": plan.seq_len, "global_batch_seqs": plan.global_batch, "grad_accum": plan.grad_accum,
        "tokens_per_step": plan.tokens_per_step, "total_steps": plan.total_steps,
        "total_tokens": plan.total_tokens, "warmup_steps": plan.warmup_steps, "precision": precision,
        "flops_per_token": plan.flops_per_token, "total_flops": plan.flops_per_token * plan.total_tokens,
        "memory_per_process": {k: v for k, v in mem.rows()}, "train_tokens_available": plan.train_tokens,
    }
    log(f"dry run: {cfg.name} → {cfg.run_dir}")
    log(f"  model: {model_config.n_layer}L/{model_config.n_embd}d/{model_config.n_head}H, vocab "
        f"{model_config.vocab_size}, context {model_config.block_size}: {info['params']:,} parameters"
        + (f" (weights from {cfg.model.init_from})" if cfg.model.init_from else ""))
    log(f"  batch: {plan.global_batch} sequences × {plan.seq_len} tokens = {plan.tokens_per_step:,} tokens/step "
        f"= micro-batch {info['micro_batch']} × {world} process(es) × {plan.grad_accum} accumulation steps")
    if length_unknown:
        info["total_steps"] = info["total_tokens"] = None
        log(f"  length: {cfg.train.epochs:g} epoch(s) of {cfg.data.path} (not prepared here, so steps unknown), "
            f"warmup {plan.warmup_steps} steps, {cfg.optim.schedule} schedule, lr {cfg.optim.lr:g}")
    else:
        log(f"  length: {plan.total_steps:,} steps, {plan.total_tokens:,} tokens "
            f"({plan.total_tokens / max(1, plan.params):.1f} tokens/parameter), warmup {plan.warmup_steps} steps, "
            f"{cfg.optim.schedule} schedule, lr {cfg.optim.lr:g}")
    if length_unknown:
        info["total_flops"] = None
    log(f"  compute: {info['total_flops'] or 0:.3e} FLOPs; precision {precision}; compile {cfg.train.compile}")
    log(f"  memory per process (estimate, {mem_precision}, micro-batch {plan.micro_batch}): "
        + ", ".join(f"{k} {human_bytes(v)}" for k, v in mem.rows()))
    if plan.train_tokens is None:
        log(f"  data: {cfg.data.path or '(unset)'} not prepared yet")
    else:
        log(f"  data: {plan.train_tokens:,} train tokens ({plan.total_tokens / plan.train_tokens:.2f} epochs)")
    return info


def _dry_model_config(cfg: PretrainConfig) -> GPTConfig:
    if cfg.model.init_from:
        if Path(cfg.model.init_from).exists():
            return _init_source_config(cfg)
        print(f"  (weights {cfg.model.init_from} not found here: showing the shape of preset {cfg.model.preset!r})")
    vocab = None
    if cfg.model.vocab_size is None and cfg.data.path and Path(cfg.data.path).is_dir():
        try:
            vocab = resolve_tokenizer(cfg).vocab_size
        except GptforgeError:
            vocab = None
    return build_model_config(cfg, vocab)


def _init_source_config(cfg: PretrainConfig) -> GPTConfig:
    import json

    from gptforge.checkpoint import is_hf_directory, read_model_config, resolve_checkpoint

    d = resolve_checkpoint(cfg.model.init_from)
    if is_hf_directory(d):
        from gptforge.hf import config_from_hf

        base = config_from_hf(json.loads((d / "config.json").read_text()), str(d))
    else:
        base = GPTConfig(**read_model_config(d)["model"])
    if cfg.model.dropout is not None:
        base.dropout = cfg.model.dropout
    return base


# ---- the training run ----------------------------------------------------------------------------------------


class _StopFlag:
    """SIGTERM/SIGINT set a flag; the loop finishes its step, writes a checkpoint and returns."""

    def __init__(self):
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass

    def _handle(self, signum, frame) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self.signal = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def run_pretrain(cfg: PretrainConfig, log=None) -> PretrainResult:
    """Train according to ``cfg``; see the module docstring. Returns what was done and where it went."""
    from gptforge.train import distributed as D

    info = D.setup(cfg.train.device)
    say = (log or print) if info.is_main else (lambda *a, **k: None)
    stop = _StopFlag()
    stop.install()
    try:
        return _train(cfg, info, say, stop)
    finally:
        stop.restore()
        D.teardown()


def _train(cfg: PretrainConfig, info, say, stop: _StopFlag) -> PretrainResult:
    from gptforge.checkpoint import load_model
    from gptforge.config import save_config
    from gptforge.data.loader import TokenLoader, validation_windows
    from gptforge.train import checkpoint as C
    from gptforge.train import distributed as D
    from gptforge.train.metrics import MetricsLog, device_peak_flops, plot_metrics, summary_text
    from gptforge.train.optim import LRSchedule, configure_optimizer, set_lr
    from gptforge.train.trackers import make_trackers

    device = info.device
    precision = resolve_precision(cfg.train.precision, device)
    if device.type == "cuda" and cfg.train.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")
    if not cfg.data.path or not Path(cfg.data.path).is_dir():
        raise GptforgeError(f"data.path {cfg.data.path!r} is not a directory of prepared shards; run "
                            "`gptforge data prepare FILES --tokenizer gpt2 --out DIR` and pass --data.path=DIR")
    run_dir, ckpt_root = cfg.run_dir, cfg.run_dir / "ckpt"

    # -- where do we start? ---------------------------------------------------------------------------------
    resume_dir = None
    if cfg.checkpoint.resume not in (False, True, "auto"):
        raise GptforgeError(f"checkpoint.resume must be true, false or auto, got {cfg.checkpoint.resume!r}")
    if cfg.checkpoint.resume:
        resume_dir = C.find_resume_checkpoint(ckpt_root, fallback=cfg.checkpoint.fallback, log=say)
        if resume_dir is None and cfg.checkpoint.resume is True:
            raise GptforgeError(f"--resume: {ckpt_root} has no checkpoint to resume from; drop --resume to start")
    elif C.list_checkpoints(ckpt_root) and not cfg.overwrite:
        raise GptforgeError(f"{run_dir} already has checkpoints; continue it with --resume, start over with "
                            "--overwrite=true, or pick another --name")
    if info.is_main and resume_dir is None and cfg.overwrite and ckpt_root.exists():
        import shutil

        shutil.rmtree(ckpt_root)
    D.barrier(info)

    # -- model and tokenizer --------------------------------------------------------------------------------
    seed_everything(cfg.train.seed)
    if cfg.model.init_from:
        model, tokenizer, meta = load_model(cfg.model.init_from, device="cpu")
        if tokenizer is None:
            tokenizer = resolve_tokenizer(cfg)
        if cfg.model.dropout is not None:
            model.config.dropout = cfg.model.dropout
            for m in model.modules():
                if isinstance(m, torch.nn.Dropout):
                    m.p = cfg.model.dropout
        say(f"initialised from {meta['path']} ({model.num_params():,} parameters; tokenizer from the weights)")
    else:
        tokenizer = resolve_tokenizer(cfg)
        model = GPT(build_model_config(cfg, tokenizer.vocab_size))
    _check_vocab(cfg, model.config, tokenizer)
    model.to(device)
    model.train()

    per_rank_probe = cfg.train.micro_batch
    if per_rank_probe == "auto":
        G0 = _global_batch_seqs(cfg, model.config)
        per_rank = max(1, G0 // info.world_size) if G0 else 64
        micro_batch = find_micro_batch(model, per_rank, cfg.data.seq_len or model.config.block_size,
                                       precision, device, log=say)
    elif isinstance(per_rank_probe, int):
        micro_batch = per_rank_probe
    else:
        raise GptforgeError(f"train.micro_batch must be an integer or 'auto', got {per_rank_probe!r}")
    plan = compute_plan(cfg, model.config, info.world_size, micro_batch, _data_train_tokens(cfg.data.path))

    loader = TokenLoader(cfg.data.path, "train", plan.seq_len, plan.micro_batch, plan.grad_accum, info.rank,
                         info.world_size, seed=cfg.train.seed, mode=cfg.data.sampling, device=device)
    val = validation_windows(cfg.data.path, plan.seq_len, cfg.data.val_tokens)
    min_lr = cfg.optim.min_lr if cfg.optim.min_lr is not None else cfg.optim.lr * cfg.optim.min_lr_ratio
    schedule = LRSchedule(cfg.optim.schedule, cfg.optim.lr, min_lr, plan.warmup_steps, plan.total_steps,
                          cfg.optim.decay_ratio)
    bare = model
    strategy = cfg.train.distributed
    if strategy not in ("ddp", "fsdp"):
        raise GptforgeError(f"train.distributed must be ddp or fsdp, got {strategy!r}")
    model = D.wrap_model(model, info, strategy)
    optimizer = configure_optimizer(model if strategy == "fsdp" else bare, lr=cfg.optim.lr,
                                    weight_decay=cfg.optim.weight_decay, betas=(cfg.optim.beta1, cfg.optim.beta2),
                                    eps=cfg.optim.eps, decay_embeddings=cfg.optim.decay_embeddings)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    state: dict = {"step": 0, "tokens": 0, "best_val_loss": None, "nonfinite_steps": 0, "scaler_skips": 0,
                   "elapsed": 0.0}
    if resume_dir is not None:
        trainer_state = C.verify_checkpoint(resume_dir)
        weights = C.load_weights(resume_dir)
        if bare.config.tie_embeddings:
            weights["lm_head.weight"] = weights["transformer.wte.weight"]
        if strategy == "fsdp" and info.enabled:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))
        else:
            bare.load_state_dict(weights)
        opt_state = C.load_optimizer_state(resume_dir, map_location=device)
        D.load_optimizer(model, optimizer, opt_state["optimizer"], strategy)
        if scaler is not None and opt_state.get("scaler"):
            scaler.load_state_dict(opt_state["scaler"])
        loader.load_state_dict(trainer_state["loader"])
        rngs = trainer_state["rng"]
        set_rng_state(rngs[info.rank] if info.rank < len(rngs) else rngs[0])
        state.update({k: trainer_state[k] for k in state if k in trainer_state})
        say(f"resumed from {resume_dir} at step {state['step']} ({state['tokens']:,} tokens)")

    train_model = torch.compile(model) if cfg.train.compile else model
    peak, peak_source = device_peak_flops(device, precision)

    # -- run directory, logs, trackers (rank 0) --------------------------------------------------------------
    metrics = trackers = None
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        metrics = MetricsLog(run_dir / "metrics.jsonl", resume_from_step=state["step"] if resume_dir else None)
        if resume_dir is None and (run_dir / "samples.md").exists():
            (run_dir / "samples.md").unlink()
        trackers = make_trackers(cfg.log.trackers, run_dir, cfg.name, asdict(cfg))
    say(f"training {bare.num_params():,} parameters on {device} × {info.world_size} ({precision}"
        f"{', compiled' if cfg.train.compile else ''}): {plan.total_steps:,} steps × {plan.tokens_per_step:,} "
        f"tokens (micro-batch {plan.micro_batch} × {plan.seq_len}, accumulation {plan.grad_accum})")

    def save(step: int, val_loss: float | None) -> Path | None:
        is_best = val_loss is not None and math.isfinite(val_loss) and (
            state["best_val_loss"] is None or val_loss <= state["best_val_loss"])
        if is_best:
            state["best_val_loss"] = val_loss
        model_state, opt_state = D.full_state_dicts(model, optimizer, strategy)
        rngs = [rng_state()]
        if info.enabled:
            import torch.distributed as dist

            rngs = [None] * info.world_size
            dist.all_gather_object(rngs, rng_state())
        path = None
        if info.is_main:
            trainer_state = {**state, "step": step, "loader": loader.state_dict(), "rng": rngs,
                             "config": asdict(cfg), "plan": asdict(plan), "val_loss": val_loss}
            path = C.save_checkpoint(ckpt_root, step, model=bare, model_state=model_state, tokenizer=tokenizer,
                                     optimizer_state={"optimizer": opt_state,
                                                      "scaler": scaler.state_dict() if scaler else None},
                                     trainer_state=trainer_state, keep_last=cfg.checkpoint.keep_last,
                                     is_best=is_best)
            if cfg.log.plot:
                plot_metrics(run_dir / "metrics.jsonl", run_dir / "loss.png", cfg.train.grad_clip)
        D.barrier(info)
        return path

    hellaswag_items = None  # rank 0 scores a fixed subset; skipped under FSDP (the weights are sharded)
    if cfg.eval.hellaswag_interval and info.is_main and not (strategy == "fsdp" and info.enabled):
        from gptforge.eval.tasks import load_hellaswag

        hellaswag_items = load_hellaswag(cfg.eval.hellaswag_data, limit=cfg.eval.hellaswag_items)

    def write_samples(step: int) -> None:
        if not info.is_main or (strategy == "fsdp" and info.enabled):
            return
        lines = [f"## step {step}\n"]
        for i, prompt in enumerate(cfg.eval.sample_prompts):
            text = sample_text(bare, tokenizer, prompt, cfg.eval.sample_tokens, cfg.eval.temperature,
                               cfg.eval.top_k, device, seed=cfg.train.seed + i)
            lines.append(f"**prompt:** `{prompt!r}`\n\n```\n{prompt}{text}\n```\n")
        with open(run_dir / "samples.md", "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")

    # -- the loop -------------------------------------------------------------------------------------------
    from tqdm.auto import tqdm

    start_step = state["step"]
    end_step = plan.total_steps if cfg.train.stop_at is None else min(plan.total_steps, cfg.train.stop_at)
    bar = tqdm(total=plan.total_steps, initial=start_step, disable=not (info.is_main and cfg.log.progress),
               unit="step", dynamic_ncols=True)
    params = [p for p in model.parameters() if p.requires_grad]
    last_loss, last_val, last_ckpt = float("nan"), None, None
    run_t0 = time.perf_counter()
    tokens_this_session, interrupted = 0, False
    for step in range(start_step, end_step):
        t0 = time.perf_counter()
        lr = schedule.lr_at(step)
        set_lr(optimizer, lr)
        loss_sum = torch.zeros((), device=device)
        for micro in range(plan.grad_accum):
            x, y = loader.next_batch()
            with D.no_sync(train_model, micro == plan.grad_accum - 1), autocast_context(precision, device):
                _, loss = train_model(x, y)
                loss = loss / plan.grad_accum
            (scaler.scale(loss) if scaler else loss).backward()
            loss_sum += loss.detach()
        D.all_reduce_mean(loss_sum, info)
        if scaler is not None:
            scaler.unscale_(optimizer)
        grad_norm = _grad_norm(params, cfg.train.grad_clip)
        finite = math.isfinite(grad_norm)
        skipped = False
        if scaler is not None:
            scale_before = scaler.get_scale()
            scaler.step(optimizer)
            scaler.update()
            if scaler.get_scale() < scale_before:
                state["scaler_skips"] += 1
                skipped = True
        elif finite:
            optimizer.step()
        else:
            skipped = True
        if not finite:
            state["nonfinite_steps"] += 1
        optimizer.zero_grad(set_to_none=True)

        last_loss = float(loss_sum.item())
        dt = time.perf_counter() - t0
        state["step"] = step + 1
        state["tokens"] += plan.tokens_per_step
        tokens_this_session += plan.tokens_per_step
        tok_s = plan.tokens_per_step / dt
        mfu = plan.flops_per_token * tok_s / peak if peak else None
        record = {"step": step, "loss": last_loss, "lr": lr, "grad_norm": grad_norm, "tokens": state["tokens"],
                  "dt": dt, "tokens_per_s": tok_s, "skipped": skipped}
        if mfu is not None:
            record["mfu"] = mfu
        if device.type == "cuda":
            record["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30

        done = state["step"] == end_step
        stop_now = D.any_rank(stop.signal is not None, info)
        if len(val) and ((cfg.eval.interval and state["step"] % cfg.eval.interval == 0) or done or stop_now):
            # no activations are kept for backward, so evaluation can take bigger batches than training
            eval_batch = plan.micro_batch * min(4, plan.grad_accum * 2)
            last_val = evaluate_loss(train_model if strategy == "fsdp" else bare, val, eval_batch,
                                     precision, device, info)
            record["val_loss"] = last_val
        if hellaswag_items and (state["step"] % cfg.eval.hellaswag_interval == 0 or done):
            from gptforge.eval.choice import hellaswag_hook

            record.update(hellaswag_hook(bare, tokenizer, hellaswag_items))
        if info.is_main:
            metrics.write(record)
            for t in trackers:
                t.log(record, step)
        if (cfg.eval.sample_interval and state["step"] % cfg.eval.sample_interval == 0) or done:
            write_samples(state["step"])
        bar.set_postfix_str(f"loss {last_loss:.4f} lr {lr:.2e} gnorm {grad_norm:.2f} tok/s {tok_s:,.0f}"
                            + (f" MFU {100 * mfu:.1f}%" if mfu is not None else ""), refresh=False)
        bar.update(1)
        if (cfg.checkpoint.interval and state["step"] % cfg.checkpoint.interval == 0) or done or stop_now:
            state["elapsed"] += time.perf_counter() - run_t0
            run_t0 = time.perf_counter()
            last_ckpt = save(state["step"], record.get("val_loss"))
        if stop_now:
            interrupted = True
            name = signal.Signals(stop.signal).name if stop.signal else "another rank's signal"
            say(f"\nstopped by {name} after step {state['step']}; checkpoint {last_ckpt}; continue with --resume")
            break
    bar.close()
    if start_step >= end_step:
        say(f"nothing to do: the run is already at step {start_step} of {end_step}")
    state["elapsed"] += time.perf_counter() - run_t0

    # -- summary --------------------------------------------------------------------------------------------
    elapsed = max(1e-9, state["elapsed"])
    tok_s = state["tokens"] / elapsed
    summary = {"run_dir": str(run_dir), "steps": state["step"], "tokens": state["tokens"], "seconds": elapsed,
               "tokens_per_s": tok_s, "tokens_per_second": tok_s, "mfu": plan.flops_per_token * tok_s / peak if peak else None,
               "mfu_peak_source": peak_source, "peak_memory": _peak_memory(device), "final_loss": last_loss,
               "final_val_loss": last_val, "best_val_loss": state["best_val_loss"],
               "skipped_steps": state["nonfinite_steps"] + state["scaler_skips"] - _both(state),
               "nonfinite_steps": state["nonfinite_steps"], "scaler_skips": state["scaler_skips"],
               "params": bare.num_params(), "precision": precision, "world_size": info.world_size}
    if info.is_main:
        say(summary_text(summary))
        metrics.close()
        for t in trackers:
            t.close()
    return PretrainResult(run_dir=run_dir, steps=state["step"], tokens=state["tokens"], final_loss=last_loss,
                          final_val_loss=last_val, best_val_loss=state["best_val_loss"], checkpoint=last_ckpt,
                          interrupted=interrupted, summary=summary)


def _both(state: dict) -> int:
    # under fp16 a non-finite gradient is also a scaler skip: count such steps once
    return min(state["nonfinite_steps"], state["scaler_skips"])


def _grad_norm(params: list[torch.Tensor], clip: float | None) -> float:
    """Total L2 norm of the gradients before clipping (clipping in place when ``clip`` is set)."""
    if clip:
        norm = torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
    else:
        grads = [p.grad for p in params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, foreach=True) if grads else torch.zeros(())
    if hasattr(norm, "full_tensor"):  # DTensor under FSDP
        norm = norm.full_tensor()
    return float(norm)


def _global_batch_seqs(cfg: PretrainConfig, model_config: GPTConfig) -> int | None:
    T = cfg.data.seq_len or model_config.block_size
    if cfg.train.global_batch_tokens:
        return cfg.train.global_batch_tokens // T
    return cfg.train.global_batch_seqs


def _check_vocab(cfg: PretrainConfig, config: GPTConfig, tokenizer) -> None:
    """The model must cover every id the tokenizer (and so the shards) can produce."""
    if tokenizer.vocab_size > config.vocab_size:
        raise GptforgeError(f"the tokenizer has {tokenizer.vocab_size:,} tokens but the model only "
                            f"{config.vocab_size:,} embeddings; drop model.vocab_size (it defaults to the "
                            "tokenizer's) or prepare the data with the model's tokenizer")
    manifest = _manifest(Path(cfg.data.path)) or {}
    tok = manifest.get("tokenizer")
    want = tok.get("hash") if isinstance(tok, dict) else None
    if want and want != tokenizer.content_hash() and not _same_encoding(cfg, tokenizer):
        raise GptforgeError(f"{cfg.data.path}/manifest.json was made with tokenizer hash {want}, but the "
                            f"tokenizer in use has {tokenizer.content_hash()}; prepare the data with the same "
                            "tokenizer as the model (for --model.init_from, the one saved with the weights)")


def _same_encoding(cfg: PretrainConfig, tokenizer) -> bool:
    """Whether ``tokenizer`` encodes like the one saved with the data (re-serialised copies hash differently)."""
    try:
        data_tok = resolve_tokenizer(cfg)
    except GptforgeError:
        return False
    probe = "The quick brown fox, 1234 naïve café!\n\n  Second line\t<tab> — done."
    return data_tok.vocab_size == tokenizer.vocab_size and data_tok.encode(probe) == tokenizer.encode(probe)


def _peak_memory(device: torch.device) -> float | None:
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    try:
        return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    except (ValueError, OSError):
        return None
