"""Pretraining's configuration and plan: the recipe's sections, the batch/length arithmetic, ``--dry-run``.

The ``optim``, ``checkpoint`` and ``log`` sections and the common ``train`` keys (precision, seed, device,
grad_clip) are the shared ones from :mod:`gptforge.train.core`, spelled the same in every stage.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from gptforge.checkpoint import is_hf_directory, model_config, read_model_config, resolve_checkpoint
from gptforge.config import from_dict
from gptforge.data.loader import SAMPLING_MODES, epoch_tokens
from gptforge.data.shards import read_manifest
from gptforge.errors import GptforgeError
from gptforge.hf import config_from_hf
from gptforge.io import read_json
from gptforge.memory import human_bytes, training_memory
from gptforge.model import PRESETS, GPTConfig
from gptforge.model_modern import FAMILIES, ModernConfig, build_model
from gptforge.model_modern import PRESETS as MODERN_PRESETS
from gptforge.model_modern import config_flops_per_token as flops_per_token
from gptforge.model_modern import config_params as count_params
from gptforge.precision import pick_device, resolve_precision
from gptforge.tokenizer import load_tokenizer
from gptforge.train.core import CheckpointConfig, LogConfig, OptimConfig, TrainCommon, require_at_least_one

# Old names, for code that imported them from here.
OptimSection, CheckpointSection, LogSection = OptimConfig, CheckpointConfig, LogConfig

@dataclass
class ModelSection:
    """A preset plus field overrides, or ``init_from`` existing weights (gptforge checkpoint or HF directory).

    ``family``: gpt2 (:mod:`gptforge.model`) or modern (:mod:`gptforge.model_modern`); unset, a ``modern-*`` preset
    means modern. With ``family: modern`` a GPT-2 preset name picks its same-sized counterpart (mini → modern-mini).
    """

    preset: str = "tiny"
    family: str | None = None  # gpt2 | modern (default: from the preset)
    init_from: str | None = None
    init: str = "gpt2"  # gpt2: N(0, 0.02) + scaled residuals | torch_default: PyTorch's layer defaults (seed 004)
    vocab_size: int | None = None  # default: the data's tokenizer
    block_size: int | None = None
    n_layer: int | None = None
    n_head: int | None = None
    n_embd: int | None = None
    dropout: float | None = None
    bias: bool | None = None
    qkv_bias: bool | None = None
    tie_embeddings: bool | None = None
    # the modern family's choices (ablations: each can be switched back alone)
    n_kv_head: int | None = None  # grouped-query attention
    mlp_hidden: int | None = None
    norm: str | None = None  # rmsnorm | layernorm
    mlp: str | None = None  # swiglu | gelu | relu2
    pos: str | None = None  # rope | learned
    qk_norm: bool | None = None
    rope_theta: float | None = None


_GPT2_ONLY = ("bias", "qkv_bias")
_MODERN_ONLY = ("n_kv_head", "mlp_hidden", "norm", "mlp", "pos", "qk_norm", "rope_theta")


@dataclass
class DataSection:
    path: str = ""  # a prepared shard directory (gptforge data prepare)
    tokenizer: str | None = None  # default: <path>/tokenizer, else the manifest's tokenizer name
    seq_len: int | None = None  # default: the model's context length
    # random: windows drawn with replacement (~63% of the tokens seen per nominal epoch) | sequential: every
    # non-overlapping window once per epoch, reshuffled each epoch | in_order: the same windows in file order
    sampling: str = "random"
    start_token: int = 0  # use the train split from this token offset on (continue on unseen tokens)
    val_tokens: int = 65536  # size of the fixed validation slice (first tokens of the val split)


@dataclass
class TrainSection(TrainCommon):
    """Pretraining's ``train`` keys; precision, seed, device and grad_clip are the shared ones."""

    micro_batch: int | str = 8  # sequences per forward pass per process, or "auto"
    global_batch_tokens: int | None = None  # e.g. 524288; or
    global_batch_seqs: int | None = None  # default: micro_batch × world size (no accumulation)
    max_steps: int | None = None  # training length: exactly one of these four
    max_tokens: int | None = None
    epochs: float | None = None
    tokens_per_param: float | None = None  # Chinchilla: 20
    stop_at: int | None = None  # stop (with a checkpoint) after this step, keeping the full run's schedule
    compile: bool = False
    tf32: bool = True
    distributed: str = "ddp"  # ddp | fsdp (only used under torchrun with >1 process)


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
    core_interval: int = 0  # CORE (centered accuracy, eval/core.py) on a fixed subset every N steps (0: off)
    core_items: int = 50  # items per CORE entry in that subset (seeded sample, as `eval core --max-per-task`)
    core_tasks: list[str] | None = None  # CORE entries to score (default: all whose data is found)


@dataclass
class PretrainConfig:
    name: str = "pretrain"
    out_dir: str = "runs"
    overwrite: bool = False  # start over in an existing run directory
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name

    def validate(self) -> PretrainConfig:
        """Ranges and relations of every section; each bad value is one error naming key, value and range."""
        d, t, e = self.data, self.train, self.eval
        if d.seq_len is not None and d.seq_len < 1:
            raise GptforgeError(f"data.seq_len={d.seq_len}: must be >= 1 (or unset: the model's context length)")
        if d.val_tokens < 0:
            raise GptforgeError(f"data.val_tokens={d.val_tokens}: must be >= 0 (0: no validation)")
        if d.sampling not in SAMPLING_MODES:
            raise GptforgeError(f"data.sampling must be one of {', '.join(SAMPLING_MODES)}, got {d.sampling!r}")
        if isinstance(d.start_token, bool) or not isinstance(d.start_token, int) or d.start_token < 0:
            raise GptforgeError(f"data.start_token={d.start_token!r}: must be an integer >= 0 (a token offset of "
                                "the train split; 0: from the start)")
        if isinstance(t.micro_batch, str) and t.micro_batch != "auto":
            raise GptforgeError(f"train.micro_batch must be an integer or 'auto', got {t.micro_batch!r}")
        require_at_least_one(t, "train", (), ("global_batch_tokens", "global_batch_seqs", "max_steps",
                                               "max_tokens", "stop_at"))
        if isinstance(t.micro_batch, int):
            require_at_least_one(t, "train", ("micro_batch",))
        for key in ("epochs", "tokens_per_param"):
            value = getattr(t, key)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise GptforgeError(f"train.{key}={value}: must be a finite number > 0 (or unset)")
        if t.distributed not in ("ddp", "fsdp"):
            raise GptforgeError(f"train.distributed must be ddp or fsdp, got {t.distributed!r}")
        for key in ("interval", "sample_interval", "sample_tokens", "top_k", "hellaswag_interval", "core_interval"):
            if getattr(e, key) < 0:
                raise GptforgeError(f"eval.{key}={getattr(e, key)}: must be >= 0 (0: off)")
        if not (math.isfinite(e.temperature) and e.temperature >= 0):
            raise GptforgeError(f"eval.temperature={e.temperature}: must be a finite number >= 0 (0: greedy)")
        require_at_least_one(e, "eval", ("hellaswag_items", "core_items"))
        if e.core_interval and e.core_tasks is not None:
            from gptforge.eval.core import select_entries

            if not isinstance(e.core_tasks, list) or not e.core_tasks:
                raise GptforgeError(f"eval.core_tasks must be a non-empty list of CORE task names, got {e.core_tasks!r}")
            select_entries(e.core_tasks)
        t.validate_common()
        self.optim.validate()
        self.checkpoint.validate()
        return self


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


# ---- the plan -------------------------------------------------------------------------------------------------


def resolve_tokenizer(cfg: PretrainConfig):
    """The tokenizer that produced the shards (explicit, ``<data>/tokenizer/``, or the manifest's name)."""
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
    try:
        return read_manifest(data)
    except GptforgeError:
        return None


def model_family(m: ModelSection) -> str:
    """``model.family``, or the preset's family when unset."""
    family = m.family or ("modern" if m.preset in MODERN_PRESETS else "gpt2")
    if family not in FAMILIES:
        raise GptforgeError(f"model.family must be one of {', '.join(FAMILIES)}, got {family!r}")
    return family


def build_model_config(cfg: PretrainConfig, vocab_size: int | None) -> GPTConfig | ModernConfig:
    """Preset + overrides, of the model's family; the vocabulary defaults to the tokenizer's."""
    m = cfg.model
    family = model_family(m)
    presets = MODERN_PRESETS if family == "modern" else PRESETS
    name = m.preset
    if family == "modern" and name not in presets and f"modern-{name}" in presets:
        name = f"modern-{name}"  # the same-sized counterpart of a GPT-2 preset
    if name not in presets:
        raise GptforgeError(f"unknown {family} model.preset {m.preset!r}; choose one of: {', '.join(presets)}")
    other = _GPT2_ONLY if family == "modern" else _MODERN_ONLY
    wrong = [k for k in other if getattr(m, k) is not None]
    if wrong:
        raise GptforgeError(f"model.{wrong[0]} does not apply to the {family} family (model.family={family}); "
                            "drop it or change model.family")
    skip = ("preset", "family", "init_from", "init")
    fields = {k: v for k, v in asdict(m).items() if k not in skip and v is not None}
    base = dict(presets[name])
    if vocab_size is not None and m.vocab_size is None:
        base["vocab_size"] = vocab_size
    if family == "modern" and m.mlp_hidden is None and (m.n_embd is not None or m.mlp is not None):
        base.pop("mlp_hidden", None)  # a preset's width fits its own d and MLP; another gets the default width
    if family == "modern":
        return from_dict(ModernConfig, {**base, **fields}, where="model")
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
    params = count_params(model_config)
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


def _data_train_tokens(data_path: str, seq_len: int, start_token: int = 0) -> int | None:
    """Tokens one epoch trains on (whole ``seq_len`` windows from ``start_token`` on); None when not prepared."""
    if not data_path or not Path(data_path).is_dir() or not any(Path(data_path).glob("train_*.bin")):
        return None
    return epoch_tokens(data_path, "train", seq_len, start_token)



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
    """Whether ``tokenizer`` encodes like the one saved with the data (re-serialised copies hash differently).

    Compared with the data's *own* tokenizer (``<data>/tokenizer/`` or the manifest's), never with
    ``data.tokenizer``, which may be the very tokenizer being checked.
    """
    try:
        data_tok = resolve_tokenizer(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=None)))
    except GptforgeError:
        return False
    probe = "The quick brown fox, 1234 naïve café!\n\n  Second line\t<tab> — done."
    return data_tok.vocab_size == tokenizer.vocab_size and data_tok.encode(probe) == tokenizer.encode(probe)


# ---- dry run -------------------------------------------------------------------------------------------------


def dry_run(cfg: PretrainConfig, log=print) -> dict:
    """Build the model on the meta device and report the plan: steps, tokens, accumulation, memory."""
    cfg.validate()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    model_config = _dry_model_config(cfg)
    with torch.device("meta"):
        model = build_model(model_config)
    mb = cfg.train.micro_batch if isinstance(cfg.train.micro_batch, int) else 1
    micro_auto = not isinstance(cfg.train.micro_batch, int)
    if micro_auto and cfg.train.micro_batch != "auto":
        raise GptforgeError(f"train.micro_batch must be an integer or 'auto', got {cfg.train.micro_batch!r}")
    train_tokens = _data_train_tokens(cfg.data.path, cfg.data.seq_len or model_config.block_size,
                                      cfg.data.start_token)
    length_unknown = cfg.train.epochs is not None and train_tokens is None
    if length_unknown:  # epochs over data that is not prepared here: show everything but the length
        probe = copy.deepcopy(cfg)
        probe.train.epochs, probe.train.max_steps = None, 1
        plan = compute_plan(probe, model_config, world, mb, None)
    else:
        plan = compute_plan(cfg, model_config, world, mb, train_tokens)
    precision = cfg.train.precision
    if precision == "auto":  # the rule, and what it gives on this machine's default device
        here = resolve_precision("auto", pick_device(cfg.train.device))
        precision = f"auto (bf16 where the GPU/CPU computes it natively; here {here.describe})"
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
    log(f"  model: {getattr(model_config, 'family', 'gpt2')} {model_config.n_layer}L/{model_config.n_embd}d/"
        f"{model_config.n_head}H, vocab "
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
            f"{cfg.optim.schedule} schedule, lr {cfg.optim.lr:g}"
            + (f", Muon for hidden matrices at lr {cfg.optim.muon_lr:g}" if cfg.optim.name == "muon" else ""))
    if length_unknown:
        info["total_flops"] = None
    log(f"  compute: {info['total_flops'] or 0:.3e} FLOPs; precision {precision}; compile {cfg.train.compile}")
    log(f"  memory per process (estimate, {mem_precision}, micro-batch {plan.micro_batch}): "
        + ", ".join(f"{k} {human_bytes(v)}" for k, v in mem.rows()))
    sampling = {"random": "random windows with replacement (one epoch's worth of draws sees ~63% of the tokens)",
                "sequential": "sequential (every window once per epoch, reshuffled per epoch)",
                "in_order": "in_order (every window once per epoch, in file order)"}.get(cfg.data.sampling,
                                                                                          cfg.data.sampling)
    start = f" from token {cfg.data.start_token:,}" if cfg.data.start_token else ""
    info["sampling"], info["start_token"] = cfg.data.sampling, cfg.data.start_token
    if plan.train_tokens is None:
        log(f"  data: {cfg.data.path or '(unset)'} not prepared yet; sampling {sampling}{start}")
    else:
        log(f"  data: {plan.train_tokens:,} train tokens in whole windows{start} "
            f"({plan.total_tokens / max(1, plan.train_tokens):.2f} epochs); sampling {sampling}")
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
    d = resolve_checkpoint(cfg.model.init_from)
    if is_hf_directory(d):
        base = config_from_hf(read_json(d / "config.json", "Hugging Face config"), str(d))
    else:
        base = model_config(read_model_config(d), d)
    if cfg.model.dropout is not None:
        base.dropout = cfg.model.dropout
    return base


