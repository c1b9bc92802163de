"""LoRA adapters (Hu et al. 2021) for ``sft``, ``classify`` and ``dpo``, through the ``peft`` library (``lora`` extra).

:func:`apply_lora` freezes the model and injects peft's LoRA layers into the linear layers named by the section
(``attn.c_attn``, ``attn.c_proj``, ``mlp.c_fc``, ``mlp.c_proj`` by default: our GPT keeps Hugging Face's GPT-2
names), so each targeted ``W`` computes ``W x + (alpha/r)·B A x`` with ``A`` random and ``B`` zero at the start.
``modules_to_save`` (a classifier's ``head``) train in full; chat tokens the stage just added (``new_tokens``)
train as peft "trainable tokens" (only their rows of the embedding, and of the head that shares it), since a
frozen embedding would leave ``<|im_start|>`` and ``<|im_end|>`` identical.

Checkpoints stay usable models: a step directory's weights are the merged ones (``W + (alpha/r)·B A``) under the
plain names every command loads, and ``lora/state.safetensors`` beside them holds what is needed to resume
exactly (the adapters and the frozen weights they sit on). At the end a run writes :func:`save_adapter`'s
peft directory (``adapter/``) and continues with the merged model (:func:`merge_lora`).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from gptforge.errors import GptforgeError

__all__ = ["DEFAULT_TARGETS", "LoraSection", "apply_lora", "describe", "finish_lora", "gpt_writer", "has_lora",
           "load_weights", "lora_disabled", "lora_state", "memory_line", "merge_lora", "merged_state", "save_adapter",
           "trainable_counts", "with_head", "write_lora_state"]

DEFAULT_TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
ADAPTER = "default"  # peft's adapter name; saved peft files drop it from the keys
STATE_DIR = "lora"  # inside a training step directory
STATE_FILE = "state.safetensors"
_WRAPPER_PARTS = ("base_layer", "token_adapter")  # name segments peft inserts above the wrapped module
_ADAPTER_PARTS = ("lora_A", "lora_B", "trainable_tokens_delta")  # name segments of adapter tensors


@dataclass
class LoraSection:
    """The ``lora`` section of a stage's config: rank ``r`` (0 = off), scale ``alpha/r``, dropout on the adapter
    input, the linear layers that get adapters, and modules that train in full (saved with the adapter)."""

    r: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    modules_to_save: list[str] = field(default_factory=list)

    def validate(self) -> LoraSection:
        if not isinstance(self.r, int) or self.r < 0:
            raise GptforgeError(f"lora.r must be an integer >= 0 (0 = no LoRA), got {self.r!r}")
        if not self.alpha > 0:
            raise GptforgeError(f"lora.alpha must be > 0, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise GptforgeError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        if self.r and not self.target_modules:
            raise GptforgeError("lora.target_modules is empty: name the linear layers that get adapters, e.g. "
                                "--lora-target attn.c_attn")
        for key in ("target_modules", "modules_to_save"):
            bad = [m for m in getattr(self, key) if not isinstance(m, str) or not m.strip(".")]
            if bad:
                raise GptforgeError(f"lora.{key} takes module names like attn.c_attn, got {bad[0]!r}")
        return self

    @property
    def scale(self) -> float:
        return self.alpha / self.r if self.r else 0.0


@dataclass
class _LoraInfo:  # what apply_lora did, kept on the model
    section: LoraSection
    new_tokens: list[int]
    embedding: str | None  # name of the token embedding when new_tokens train


def _peft():
    try:
        import peft
    except ImportError:
        raise GptforgeError("LoRA needs the peft library: pip install 'gptforge[lora]' (or set lora.r=0)") from None
    return peft


def _info(model: nn.Module) -> _LoraInfo | None:
    return getattr(model, "_gptforge_lora", None)


def has_lora(model: nn.Module) -> bool:
    """Whether :func:`apply_lora` added adapters to ``model`` (and :func:`merge_lora` has not removed them)."""
    return _info(model) is not None


def _matches(name: str, target: str) -> bool:  # peft's rule for a list of target names
    return name == target or name.endswith("." + target)


def _gpt(model: nn.Module) -> nn.Module:
    """The GPT inside ``model`` (the model itself, or a classifier's body)."""
    return model.gpt if hasattr(model, "gpt") and not hasattr(model, "transformer") else model


def _targets(model: nn.Module, section: LoraSection) -> list[str]:
    """Names of the modules the section targets; every name must hit a linear layer that LoRA can adapt."""
    modules = dict(model.named_modules())
    linear = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
    found = []
    for target in section.target_modules:
        hits = [n for n, m in modules.items() if _matches(n, target)]
        if not hits:
            layers = sorted({n.split(".h.")[-1].split(".", 1)[-1] for n in linear})
            raise GptforgeError(f"lora.target_modules: no module named {target!r} in the model; its linear layers "
                                f"are {', '.join(layers)}")
        for name in hits:
            if not isinstance(modules[name], nn.Linear):
                raise GptforgeError(f"lora.target_modules: {name} is a {type(modules[name]).__name__}, not a linear "
                                    "layer; LoRA here adapts linear layers (attn.c_attn, attn.c_proj, mlp.c_fc, ...)")
        found += hits
    gpt = _gpt(model)
    tied_head = getattr(gpt.config, "tie_embeddings", False) and isinstance(getattr(gpt, "lm_head", None), nn.Linear)
    if tied_head and any(modules[n] is gpt.lm_head for n in found):
        raise GptforgeError("lora.target_modules: lm_head shares its matrix with the token embedding (tied), so an "
                            "adapter on it cannot be merged; adapt the blocks' linear layers instead")
    return sorted(set(found))


def apply_lora(model: nn.Module, section: LoraSection, *, new_tokens: list[int] | None = None,
               frozen_dtype: torch.dtype | None = None) -> nn.Module:
    """Freeze ``model`` and add LoRA adapters where ``section`` says; returns the model (changed in place), ready
    for ``build_optimizer``. A no-op when ``section.r == 0``.

    ``new_tokens``: token ids whose embedding (and head) rows train too — tokens the stage just added.
    ``frozen_dtype``: store the frozen weights in this dtype (the 16-bit training precision), adapters stay fp32.
    """
    section.validate()
    if not section.r:
        return model
    if has_lora(model):
        raise GptforgeError("the model already has LoRA adapters")
    peft = _peft()
    if list(section.target_modules) == list(DEFAULT_TARGETS):  # "the attention and MLP projections", by family
        from gptforge.memory import default_lora_targets

        section = replace(section, target_modules=list(default_lora_targets(_gpt(model).config)))
    targets = _targets(model, section)
    save = _modules_to_save(model, section, targets)
    new_tokens = sorted(set(new_tokens or []))
    model.requires_grad_(False)
    gpt = _gpt(model)
    embedding = next((n for n, m in model.named_modules() if m is gpt.transformer.wte), None) if new_tokens else None
    token_layers = None
    if new_tokens:
        token_layers = {embedding: new_tokens}
        if not gpt.config.tie_embeddings:  # an untied head has its own rows for the new tokens
            token_layers[next(n for n, m in model.named_modules() if m is gpt.lm_head)] = new_tokens
    config = peft.LoraConfig(r=section.r, lora_alpha=section.alpha, lora_dropout=section.dropout,
                             target_modules=targets, trainable_token_indices=token_layers)
    model = peft.inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    if new_tokens and gpt.config.tie_embeddings:  # the tied head reads the embedding's trained rows
        from peft.utils.other import TrainableTokensWrapper

        gpt.lm_head = TrainableTokensWrapper(gpt.lm_head, ADAPTER, token_indices=new_tokens,
                                             tied_adapter=gpt.transformer.wte.token_adapter)
    for module in save:
        module.requires_grad_(True)
    if frozen_dtype is not None and frozen_dtype != torch.float32:
        for p in model.parameters():
            if not p.requires_grad and p.is_floating_point():
                p.data = p.data.to(frozen_dtype)
    model._gptforge_lora = _LoraInfo(section, new_tokens, embedding)
    return model


def _modules_to_save(model: nn.Module, section: LoraSection, targets: list[str]) -> list[nn.Module]:
    """The modules ``section.modules_to_save`` names (exact name or a dotted suffix; ``head`` is not ``lm_head``)."""
    out = []
    for name in section.modules_to_save:
        hits = [(n, m) for n, m in model.named_modules() if _matches(n, name)]
        if not hits:
            raise GptforgeError(f"lora.modules_to_save: no module named {name!r} in the model")
        clash = [n for n, _ in hits if any(_matches(t, n) or _matches(n, t) for t in targets)]
        if clash:
            raise GptforgeError(f"lora.modules_to_save: {clash[0]} also gets an adapter (lora.target_modules); "
                                "train a module one way")
        out += [m for _, m in hits]
    return out


def trainable_counts(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameters, shared tensors counted once."""
    params = list(model.parameters())  # parameters() already yields a shared tensor once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def describe(model: nn.Module) -> str:
    """One plan line: the adapters, and how many parameters train (and their share)."""
    trainable, total = trainable_counts(model)
    info = _info(model)
    head = ""
    if info is not None:
        s = info.section
        head = (f"LoRA r={s.r}, alpha={s.alpha:g} (scale {s.scale:g}), dropout {s.dropout:g} on "
                f"{', '.join(s.target_modules)}" + (f" + {', '.join(s.modules_to_save)} in full"
                                                    if s.modules_to_save else "")
                + (f" + token rows {info.new_tokens}" if info.new_tokens else "") + ": ")
    return f"{head}{trainable:,} of {total:,} parameters trainable ({trainable / max(total, 1):.2%})"


def memory_line(model: nn.Module, micro_batch: int, seq_len: int, precision: str) -> str:
    """The plan's memory estimate for training this LoRA model vs full fine-tuning (micro-batch × tokens)."""
    from gptforge.memory import human_bytes, lora_training_memory, training_memory

    info, config = _info(model), _gpt(model).config
    if info is None:
        return ""
    s = info.section
    try:
        lora = lora_training_memory(config, micro_batch, seq_len, precision, s.r, s.target_modules, s.dropout,
                                    trainable=trainable_counts(model)[0])
    except GptforgeError:  # target names the estimate does not know (e.g. a classifier's full paths)
        lora = lora_training_memory(config, micro_batch, seq_len, precision, s.r, trainable=trainable_counts(model)[0])
    full = training_memory(config, micro_batch, seq_len, precision)
    return (f"estimated training memory at {micro_batch} × {seq_len} tokens, {precision}: "
            f"{human_bytes(lora.total)} (full fine-tuning: {human_bytes(full.total)})")


@contextmanager
def lora_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """The base model's function while inside (adapters and trained token rows switched off): a DPO reference
    without a second copy of the weights. Modules trained in full (``modules_to_save``) stay as trained."""
    if not has_lora(model):
        yield model
        return
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield model
    finally:
        for m in layers:
            m.enable_adapters(True)  # peft marks the adapters (only) trainable again


# ---- names and states --------------------------------------------------------------------------------------


def _plain_key(key: str) -> str | None:
    """A state-dict key of the adapted model → the key of the plain model (``None`` for adapter tensors)."""
    parts = key.split(".")
    if any(p in _ADAPTER_PARTS for p in parts):
        return None
    return ".".join(p for p in parts if p not in _WRAPPER_PARTS)


def _dedup(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One entry per tensor storage (a tied matrix appears under two names; safetensors refuses that)."""
    seen, out = set(), {}
    for key, value in state.items():
        ptr = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
        if ptr not in seen:
            seen.add(ptr)
            out[key] = value
    return out


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors LoRA training changes, under ``model.state_dict()`` names: the adapters (``lora_A``/``lora_B``),
    trained token rows and ``modules_to_save`` (empty without LoRA)."""
    if not has_lora(model):
        return {}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    named = dict(model.named_parameters(remove_duplicate=False))
    return _dedup({k: v.detach() for k, v in named.items() if id(v) in trainable})


@torch.no_grad()
def merged_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The plain model's state dict with every adapter merged in (``W + (alpha/r)·B A``, trained token rows in
    place), fp32 on the CPU (one matrix at a time on the device: no second copy of the model there); the model
    itself is not changed. Without LoRA: ``model.state_dict()``."""
    if not has_lora(model):
        return model.state_dict()
    from peft.tuners.lora import LoraLayer
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    state = {}
    for key, value in model.state_dict().items():
        plain = _plain_key(key)
        if plain is not None:
            state[plain] = (value.float() if value.is_floating_point() else value).cpu()
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, LoraLayer):
            base = module.get_base_layer().weight
            state[_plain_key(f"{name}.weight")] = (base.float() + module.get_delta_weight(ADAPTER).float()).cpu()
        elif isinstance(module, TrainableTokensLayer):
            state[_plain_key(f"{name}.weight")] = module.get_merged_weights([ADAPTER]).float().cpu()
    return state


def _unwrapped_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapted model's own tensors that the plain (merged) state does not carry: adapters + wrapped bases."""
    return _dedup({k: v for k, v in model.state_dict().items() if _plain_key(k) != k})


def write_lora_state(model: nn.Module, directory: Path) -> None:
    """``directory/lora/``: what an exact resume needs beyond the merged weights (no-op without LoRA)."""
    info = _info(model)
    if info is None:
        return
    from safetensors.torch import save_file

    out = Path(directory) / STATE_DIR
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in _unwrapped_state(model).items()}
    save_file(state, str(out / STATE_FILE), metadata={"format": "pt"})
    (out / "lora.json").write_text(json.dumps({"section": asdict(info.section), "new_tokens": info.new_tokens},
                                              indent=1), encoding="utf-8")


def gpt_writer(model: nn.Module, tokenizer=None, extra: dict | None = None):
    """:func:`gptforge.train.checkpoint.gpt_writer` for a GPT with or without LoRA: with it, the merged weights
    under plain names (any command loads the step directory) plus ``lora/`` for an exact resume."""
    from gptforge.train import checkpoint as C

    info = _info(model)
    if info is None:
        return C.gpt_writer(model, tokenizer, None, extra)
    write_plain = C.gpt_writer(model, tokenizer, merged_state(model),
                               {**(extra or {}), "lora": {**asdict(info.section), "merged": True}})

    def write(directory: Path) -> None:
        write_plain(directory)
        write_lora_state(model, directory)
    return write


def load_weights(model: nn.Module, directory: str | Path, plain: dict[str, torch.Tensor]) -> None:
    """Load a training checkpoint into ``model``: ``plain`` (its merged weights, plain names) and, when the model
    has adapters, ``lora/state.safetensors`` — the exact state training left (for resume and the best weights)."""
    from gptforge.checkpoint import read_safetensors

    directory = Path(directory)
    path = directory / STATE_DIR / STATE_FILE
    info = _info(model)
    if info is None:
        if path.is_file():
            raise GptforgeError(f"{directory} was trained with LoRA (it has {STATE_DIR}/{STATE_FILE}); resume with "
                                "the run's lora settings (its config.yaml: --lora-r ...)")
        model.load_state_dict(plain)
        return
    if not path.is_file():
        raise GptforgeError(f"{directory} holds no LoRA state ({STATE_DIR}/{STATE_FILE}): it was trained without "
                            "LoRA; resume with the run's own settings (its config.yaml), or start a new run")
    stored = read_safetensors(path)
    own = model.state_dict()
    by_storage = defaultdict(list)
    for key, value in own.items():
        by_storage[(value.untyped_storage().data_ptr(), value.storage_offset())].append(key)
    full = {}
    for key, value in own.items():
        if key in stored:
            full[key] = stored[key]
        elif _plain_key(key) == key and key in plain:
            full[key] = plain[key]
        else:  # the second name of a tied tensor: stored once
            twin = next((k for k in by_storage[(value.untyped_storage().data_ptr(), value.storage_offset())]
                         if k in stored), None)
            if twin is not None:
                full[key] = stored[twin]
    model.load_state_dict(full, strict=True)


# ---- the end of a run: adapter directory and merged weights --------------------------------------------------


def _is_gpt2(model: nn.Module) -> bool:  # a GPT-2 LM: exported as HF GPT2LMHeadModel with the same names
    return (hasattr(model, "transformer") and hasattr(model, "lm_head")
            and getattr(model.config, "family", "gpt2") == "gpt2")


def save_adapter(model: nn.Module, directory: str | Path, section: LoraSection, base: str, tokenizer=None
                 ) -> Path:
    """Write a peft adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``).

    For a GPT the keys are those of the Hugging Face ``GPT2LMHeadModel`` that ``gptforge export`` writes
    (``base_model.model.transformer.h.0.attn.c_attn.lora_A.weight`` …; our linear layers are HF's ``Conv1D`` there,
    hence ``fan_in_fan_out``: the A/B matrices are the same, only the frozen weight is stored transposed), so
    ``PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(exported_base), directory)`` computes our merged
    model. Trained token rows go in as peft's ``trainable_token_indices`` (the HF base needs
    ``resize_token_embeddings`` to the new vocabulary first). Other models (a classifier, the modern family) keep
    our module names (load them with ``peft.inject_adapter_in_model`` + ``set_peft_model_state_dict``).
    ``tokenizer`` is exported beside it (HF format) when given.
    """
    info = _info(model)
    if info is None:
        raise GptforgeError("save_adapter: the model has no LoRA adapters (lora.r is 0)")
    if (section.r, section.alpha) != (info.section.r, info.section.alpha):
        raise GptforgeError(f"save_adapter: lora r={section.r}, alpha={section.alpha:g} is not what the model's "
                            f"adapters have (r={info.section.r}, alpha={info.section.alpha:g})")
    section = info.section  # as applied: target names resolved, a classifier's head included
    peft = _peft()
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    hf = _is_gpt2(model)
    from gptforge.hf import _CONV1D  # the weights HF GPT-2 stores transposed (Conv1D); names are ours already

    conv1d = [n.removesuffix(".weight") for n in _CONV1D]
    tensors = {}
    for key, value in lora_state(model).items():
        name = ".".join(p for p in key.split(".") if p != ADAPTER)
        tensors[f"base_model.model.{name}"] = value.detach().float().contiguous().cpu()
    tokens = None
    if info.new_tokens:
        gpt = _gpt(model)
        tokens = (list(info.new_tokens) if gpt.config.tie_embeddings and hf
                  else {info.embedding: list(info.new_tokens),
                        **({} if gpt.config.tie_embeddings else {"lm_head": list(info.new_tokens)})})
    config = peft.LoraConfig(
        r=section.r, lora_alpha=section.alpha, lora_dropout=section.dropout,
        target_modules=list(section.target_modules), modules_to_save=list(section.modules_to_save) or None,
        fan_in_fan_out=hf and any(_matches(n, t) for t in section.target_modules for n in conv1d),
        trainable_token_indices=tokens, task_type="CAUSAL_LM" if hf else None, base_model_name_or_path=base,
        inference_mode=True)
    config.save_pretrained(str(directory))
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        from gptforge.hf import export_tokenizer

        export_tokenizer(tokenizer, directory, model_max_length=_gpt(model).config.block_size)
    return directory


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Merge the adapters into the weights (``W + (alpha/r)·B A``, trained token rows in place) and remove peft's
    layers: returns the plain model (same object, fp32, every parameter trainable again). A no-op without LoRA."""
    if not has_lora(model):
        return model
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    state = merged_state(model)
    wrapped = [(n, m) for n, m in model.named_modules(remove_duplicate=False)
               if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper))]
    for name, module in wrapped:
        if name.endswith(".token_adapter"):
            continue  # the layer inside a trainable-tokens wrapper: goes with the wrapper
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        plain = module.token_adapter.base_layer if isinstance(module, AuxiliaryTrainingWrapper) else \
            module.get_base_layer()
        setattr(parent, child, plain)
    del model._gptforge_lora
    model.__dict__.pop("peft_config", None)  # set by peft's injection; the plain model has no adapters
    model.float()
    model.load_state_dict(state, strict=True)
    model.requires_grad_(True)
    return model


def finish_lora(model: nn.Module, run_dir: Path, base: str, tokenizer=None, is_main: bool = True, log=print
                ) -> nn.Module:
    """End a LoRA run: write ``run_dir/adapter`` (rank 0) from the final weights and return the merged model."""
    from gptforge.memory import human_bytes

    info = _info(model)
    if info is None:
        return model
    if is_main:
        path = save_adapter(model, Path(run_dir) / "adapter", info.section, base, tokenizer)
        size = sum(f.stat().st_size for f in path.iterdir() if f.name.startswith("adapter_"))
        where = ("peft format, for the base exported with gptforge export" if _is_gpt2(model)
                 else "peft layout, gptforge module names")
        log(f"LoRA adapter: {path} ({human_bytes(size)}; {where}); the run's model holds the merged weights")
    return merge_lora(model)


def with_head(section: LoraSection, head: str = "head") -> LoraSection:
    """``section`` with a classifier's ``head`` among the modules that train in full."""
    if head in section.modules_to_save:
        return section
    return replace(section, modules_to_save=[*section.modules_to_save, head])
