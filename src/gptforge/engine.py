"""Batched generation with a preallocated KV cache: the one inference path behind generate, chat and serve.

Prompts of different lengths are left-padded into one batch with an attention mask; the model's positions count
real tokens only, so padding changes nothing. Each sequence stops on its own (end-of-text / end-of-turn ids,
stop strings, ``max_new_tokens``, the context limit, or its ``on_token`` callback returning False); finished rows
leave the batch (the cache is compacted), so the rest decode faster. Sampling follows Hugging Face semantics
(see :mod:`gptforge.sampling`).

Two ways to batch: :meth:`Engine.generate` decodes a fixed set of prompts together (static batching: what
arrives meanwhile waits for the batch to end); :class:`gptforge.batching.ContinuousBatch` (the server's default)
keeps a running batch that new prompts join between decode steps, after a prefill done in chunks so a long prompt
never stalls the running rows for long. Both share one sampling step (:meth:`Engine._sample`), so a row's tokens
do not depend on which way it ran.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import queue
import random
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from gptforge.errors import GptforgeError
from gptforge.model import GPT, KVCache
from gptforge.sampling import choose_tokens, process_logits, row_settings
from gptforge.sampling_defaults import SAMPLING_DEFAULTS, SamplingDefaults  # noqa: F401 (re-exported)
from gptforge.tokenizer import IM_END, IM_START, Tokenizer

CONTEXT_POLICIES = ("error", "slide")


@dataclass
class SamplingParams:
    """How to continue a prompt. Its own defaults are neutral (plain sampling at temperature 1, no filters or
    penalties, as Hugging Face's ``generate``); what users get when they give nothing is
    :data:`gptforge.sampling_defaults.SAMPLING_DEFAULTS`."""

    max_new_tokens: int = 128
    temperature: float = 1.0  # 0 → greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # HF semantics: >1 discourages tokens already in prompt or output
    presence_penalty: float = 0.0  # OpenAI semantics, over generated tokens
    frequency_penalty: float = 0.0
    stop_token_ids: list[int] = field(default_factory=list)  # added to the tokenizer's EOT and <|im_end|>
    stop_strings: list[str] = field(default_factory=list)
    seed: int | None = None
    logprobs: bool = False  # record each chosen token's log-probability
    top_logprobs: int = 0  # and the most likely alternatives at each step (with logprobs)

    def validate(self) -> SamplingParams:
        """Raise :class:`GptforgeError` for values no sampler accepts."""
        checks = [
            (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1, "max_new_tokens must be an integer ≥ 1"),
            (math.isfinite(self.temperature) and self.temperature >= 0, "temperature must be ≥ 0 (0 = greedy)"),
            (isinstance(self.top_k, int) and self.top_k >= 0, "top_k must be an integer ≥ 0 (0 = off)"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0,
             "repetition_penalty must be > 0 (1 = off)"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
            (self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed < 2**63),
             "seed must be an integer in [0, 2^63)"),
            (isinstance(self.top_logprobs, int) and 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS,
             f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}]"),
        ]
        for ok, message in checks:
            if not ok:
                raise GptforgeError(f"invalid sampling setting: {message}")
        return self


MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat completions


@dataclass
class Completion:
    """One generated continuation. ``token_ids`` include a final stop token; ``text`` excludes stops."""

    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" | "length" | "cancelled"
    logprobs: list[float] | None = None  # log-probability of each chosen token under the model (unprocessed)
    # per token, the ``top_logprobs`` most likely (token id, log-probability) pairs, most likely first
    top_logprobs: list[list[tuple[int, float]]] | None = None


OnToken = Callable[[int, int, str], "bool | None"]
OnFinish = Callable[[int, "Completion"], None]
OnLogprob = Callable[[int, int, float, "list[tuple[int, float]]"], None]


def token_bytes(tokenizer: Tokenizer, token_id: int) -> bytes:
    """The raw bytes of one token (a byte-level token may hold part of a UTF-8 character)."""
    decode_bytes = getattr(tokenizer, "decode_bytes", None)
    if decode_bytes is not None:
        return decode_bytes([token_id])
    hf = getattr(tokenizer, "_tok", None)  # a byte-level HF BPE: map its piece back to bytes
    piece = hf.id_to_token(token_id) if hf is not None and token_id not in tokenizer.special_tokens.values() else None
    if piece and all(c in _byte_of() for c in piece):
        return bytes(_byte_of()[c] for c in piece)
    return tokenizer.decode([token_id]).encode("utf-8")


@functools.lru_cache(maxsize=1)
def _byte_of() -> dict[str, int]:
    from gptforge.tokenizer import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}


class _Row:
    """Book-keeping for one sequence while it decodes."""

    def __init__(self, index: int, prompt: list[int], params: SamplingParams, stop_ids: set[int], limit: int):
        self.index = index
        self.prompt = prompt
        self.params = params
        self.stop_ids = stop_ids
        self.limit = limit  # new tokens allowed (max_new_tokens, capped by the context)
        self.ids: list[int] = []
        self.logprobs: list[float] = []
        self.top_logprobs: list[list[tuple[int, float]]] = []
        self.text = ""  # decoded so far (only tracked when streaming or matching stop strings)
        self.emitted = 0  # characters of text already handed to on_token
        self.finish: str | None = None
        self.final_text: str | None = None
        self.generator: torch.Generator | None = None  # for sampled rows
        self.on_token: OnToken | None = None
        self.on_finish: OnFinish | None = None
        self.on_logprob: OnLogprob | None = None
        self.track_text = False  # decode text as tokens come (streaming or stop strings)


class Engine:
    """Generation over a :class:`GPT` and its tokenizer; one ``generate`` at a time (calls are serialized).

    ``dtype=None`` keeps the model's dtype; :meth:`from_checkpoint` applies the one precision rule
    (:mod:`gptforge.precision`: bf16 where the GPU or CPU computes it natively, else fp16 on CUDA, fp32 on CPU).
    ``compile=True`` decodes with the model's static-shape step under ``torch.compile`` (CUDA graphs on CUDA):
    see :meth:`_compile_step`. Off by default: on a CPU it is no faster, and eager decoding keeps the reference
    path's tokens exactly.
    """

    def __init__(self, model: GPT, tokenizer: Tokenizer, device="cpu", dtype=None, context_policy: str = "error",
                 compile: bool = False):
        if context_policy not in CONTEXT_POLICIES:
            raise GptforgeError(f"context_policy must be one of {CONTEXT_POLICIES}, got {context_policy!r}")
        if tokenizer is None:
            raise GptforgeError("the engine needs a tokenizer; the checkpoint has no tokenizer/ directory")
        self.device = torch.device(device)
        # dtype None keeps the model's own (a model being trained can be sampled from without a copy).
        self.model = model.to(device=self.device, dtype=dtype) if dtype else model.to(self.device)
        self.dtype = next(self.model.parameters()).dtype
        self.tokenizer = tokenizer
        self.context_policy = context_policy
        self.block_size = model.config.block_size
        self.base_stop_ids = {tokenizer.eot_id}
        if IM_END in tokenizer.special_tokens:
            self.base_stop_ids.add(tokenizer.special_tokens[IM_END])
        self.chat_template = getattr(tokenizer, "chat_template", None)
        self.lock = threading.Lock()
        self.compiled_step = self._compile_step() if compile else None

    def _compile_step(self):
        """The model's static-shape decoding step (:meth:`GPT.decode_step`) under ``torch.compile``, compiled on
        the first batch (seconds for small models, about a minute for GPT-2 on a CPU), again for a new batch
        shape. On CUDA with CUDA graphs (``mode="reduce-overhead"``: one graph replay per token; not tested here,
        there is no GPU in CI). On a CPU it measured no faster than eager (bench/results_generate.md), hence off
        by default. Tokens may differ from the eager path's in near-ties (fused kernels round differently)."""
        if not hasattr(self.model, "decode_step"):
            raise GptforgeError(f"compile=True needs a model with decode_step(); {type(self.model).__name__} has none")
        mode = "reduce-overhead" if self.device.type == "cuda" else None
        return torch.compile(self.model.decode_step, mode=mode)

    @classmethod
    def from_checkpoint(cls, path, device="cpu", dtype=None, context_policy: str = "error",
                        compile: bool = False) -> Engine:
        """Load any checkpoint form (step dir, run dir, HF directory) into an engine."""
        from gptforge.checkpoint import load_model
        from gptforge.precision import DTYPES, resolve_precision

        model, tokenizer, meta = load_model(path, device="cpu")
        if dtype is None:  # the one precision rule (gptforge.precision), as in training
            precision = resolve_precision("auto", torch.device(device))
        else:
            name = {v: k for k, v in DTYPES.items()}[dtype]
            precision = resolve_precision(name, torch.device(device))
        engine = cls(model, tokenizer, device=device, dtype=precision.dtype, context_policy=context_policy,
                     compile=compile)
        engine.meta = meta
        engine.precision = precision
        return engine

    # ---- prompts ------------------------------------------------------------------------------------

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, allow_special=True)
        ids = [int(t) for t in prompt]
        vocab = self.model.config.vocab_size
        if any(t < 0 or t >= vocab for t in ids):
            raise GptforgeError(f"prompt token ids must be in [0, {vocab}); got {min(ids)}..{max(ids)}")
        return ids

    def fit_prompt(self, ids: list[int], max_new_tokens: int, index: int = 0) -> list[int]:
        """Apply the context policy: a prompt that leaves no room to generate is an error or keeps its tail."""
        if not ids:
            raise GptforgeError(f"prompt {index} is empty; give at least one token")
        if len(ids) < self.block_size:
            return ids
        if self.context_policy == "error":
            raise GptforgeError(
                f"prompt {index} has {len(ids)} tokens but the model's context is {self.block_size}; shorten it "
                "or use context_policy='slide' (--context-policy slide) to keep its last tokens")
        keep = self.block_size - min(max_new_tokens, self.block_size // 2)
        return ids[-keep:]

    def render_chat(self, messages: list[dict]) -> str:
        """The prompt text, for display only: generation uses :meth:`encode_chat` (text alone cannot say which
        ``<|im_end|>`` is a turn marker and which one a user typed)."""
        from gptforge.chat_template import render_chat

        if not messages:
            raise GptforgeError("messages is empty; give at least one {'role': 'user', 'content': ...} message")
        return render_chat(messages, self.chat_template, add_generation_prompt=True)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Prompt ids of a conversation, exactly as SFT encoded it (:func:`gptforge.data.chat.encode_chat_prompt`):
        role markers are special tokens, message contents never are."""
        from gptforge.data.chat import encode_chat_prompt

        return encode_chat_prompt(messages, self.tokenizer)

    def chat_params(self, params: SamplingParams | None) -> SamplingParams:
        """Chat stops at end-of-turn; a tokenizer without chat tokens can only stop on their text."""
        params = dataclasses.replace(params or SamplingParams())
        missing = [t for t in (IM_END, IM_START) if t not in self.tokenizer.special_tokens]
        params.stop_strings = list(params.stop_strings) + [t for t in missing if t not in params.stop_strings]
        return params

    # ---- public API ---------------------------------------------------------------------------------

    def generate(self, prompts: list[str] | list[list[int]], params: SamplingParams | list[SamplingParams] | None = None,
                 on_token: OnToken | None = None, on_finish: OnFinish | None = None,
                 on_logprob: OnLogprob | None = None) -> list[Completion]:
        """Continue every prompt; returns one :class:`Completion` per prompt, in order.

        ``params`` is one setting for all prompts (with ``seed`` s, row i is seeded s + i so identical prompts
        give different, reproducible samples) or a list with one per prompt (seeds used as given).
        ``on_token(index, token_id, text_delta)`` is called for every new token; returning False stops that row.
        ``on_finish(index, completion)`` is called as soon as a row is done (the server answers early finishers).
        ``on_logprob(index, token_id, logprob, top)`` is called just before ``on_token`` for rows that asked for
        ``logprobs`` (the server streams them).
        """
        if isinstance(prompts, (str, bytes)) or (prompts and isinstance(prompts[0], int)):
            raise GptforgeError("generate() takes a list of prompts; wrap a single prompt in a list")
        if not prompts:
            return []
        if params is None or isinstance(params, SamplingParams):
            base = (params or SamplingParams()).validate()
            per_row = [dataclasses.replace(base, seed=None if base.seed is None else base.seed + i)
                       for i in range(len(prompts))]
        else:
            if len(params) != len(prompts):
                raise GptforgeError(f"got {len(params)} sampling settings for {len(prompts)} prompts")
            per_row = [p.validate() for p in params]
        rows = [self._new_row(i, prompt, p, i) for i, (prompt, p) in enumerate(zip(prompts, per_row))]
        with self.lock, torch.inference_mode():
            was_training = self.model.training  # the model may be mid-training (samples during a run)
            self.model.eval()
            try:
                for group in self._plan_batches(rows):
                    self._decode(group, on_token, on_finish, on_logprob)
            finally:
                self.model.train(was_training)
        return [self._completion(r) for r in rows]

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None) -> Iterator[str]:
        """Text deltas of one continuation as they are generated (stop strings never leak into them).

        Closing the iterator early (``break``) cancels the generation.
        """
        deltas: queue.Queue = queue.Queue()
        cancelled = threading.Event()
        done = object()
        self.last_completion: Completion | None = None

        def on_token(_i, _tok, delta):
            if delta:
                deltas.put(delta)
            return not cancelled.is_set()

        def worker():
            try:
                self.last_completion = self.generate([prompt], params, on_token=on_token)[0]
                deltas.put(done)
            except BaseException as e:  # noqa: BLE001 (hand any error, even KeyboardInterrupt, to the consumer)
                deltas.put(e)

        thread = threading.Thread(target=worker, daemon=True)
        thread.start()
        try:
            while True:
                item = deltas.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            cancelled.set()
            thread.join()

    def chat(self, messages: list[dict], params: SamplingParams | None = None,
             on_token: OnToken | None = None) -> Completion:
        """Reply to a conversation rendered with the tokenizer's chat template (default ChatML)."""
        return self.generate([self.encode_chat(messages)], self.chat_params(params), on_token=on_token)[0]

    def fit_messages(self, messages: list[dict], max_new_tokens: int) -> list[dict]:
        """Drop the oldest non-system turns until the rendered conversation leaves ``max_new_tokens`` of room."""
        messages = list(messages)
        budget = self.block_size - min(max_new_tokens, self.block_size // 2)
        while True:
            n = len(self.encode_chat(messages))
            droppable = [i for i, m in enumerate(messages[:-1]) if m.get("role") != "system"]
            if n <= budget or not droppable:
                return messages
            del messages[droppable[0]]

    # ---- decoding -----------------------------------------------------------------------------------

    def _plan_batches(self, rows: list[_Row]) -> list[list[_Row]]:
        """Group rows so that left padding never eats into a row's own context budget."""
        groups: list[list[_Row]] = []
        longest = budget = 0
        for row in sorted(rows, key=lambda r: -len(r.prompt)):
            need = max(budget, row.limit)
            if groups and max(longest, len(row.prompt)) + need <= self.block_size:
                groups[-1].append(row)
                budget = need
            else:
                groups.append([row])
                longest, budget = len(row.prompt), row.limit
        return groups

    def _new_row(self, index, prompt: str | list[int], params: SamplingParams, position: int = 0) -> _Row:
        """A row for ``prompt`` (the context policy applied, its token budget set); ``position`` names it in errors."""
        ids = self.fit_prompt(self.encode_prompt(prompt), params.max_new_tokens, position)
        stop_ids = self.base_stop_ids | set(params.stop_token_ids)
        return _Row(index, ids, params, stop_ids, min(params.max_new_tokens, self.block_size - len(ids)))

    def _new_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty KV cache for this model (a model may size its own, e.g. fewer key/value heads)."""
        make = getattr(self.model, "new_kv_cache", None)
        if make is not None:
            return make(batch_size, max_len, device=self.device, dtype=self.dtype)
        return KVCache(self.model.config, batch_size, max_len, device=self.device, dtype=self.dtype)

    def _pad_id(self) -> int:
        return self.tokenizer.pad_id if self.tokenizer.pad_id < self.model.config.vocab_size else 0

    def _decode(self, rows: list[_Row], on_token: OnToken | None, on_finish: OnFinish | None = None,
                on_logprob: OnLogprob | None = None) -> None:
        """Static batching: prefill ``rows`` together, then decode until every row is done.

        Per token, only what a step needs: the model gets positions and a key mask kept here (not rebuilt from
        the (B, S) mask), sampling skips the settings nobody uses (greedy rows: one argmax; penalty state only
        when a penalty is on). With ``compile=True`` the steps run the compiled static-shape step instead."""
        device, model = self.device, self.model
        B = len(rows)
        P = max(len(r.prompt) for r in rows)
        steps = max(r.limit for r in rows)
        vocab = model.config.vocab_size
        track_text = on_token is not None or any(r.params.stop_strings for r in rows)
        for r in rows:
            r.on_token, r.on_finish, r.on_logprob, r.track_text = on_token, on_finish, on_logprob, track_text
            r.generator = self._generator(r.params.seed) if r.params.temperature > 0 else None

        # The static step (compile=True) keeps one shape for every step of every batch of about this size: its
        # cache is rounded up to 64 columns (the mask hides the rest), so a new length rarely means a new graph.
        width = P + steps if self.compiled_step is None else min(self.block_size, -(-(P + steps) // 64) * 64)
        idx = torch.full((B, P), self._pad_id(), dtype=torch.long)
        mask = torch.zeros((B, width), dtype=torch.long)
        for b, r in enumerate(rows):
            idx[b, P - len(r.prompt):] = torch.tensor(r.prompt)
            mask[b, P - len(r.prompt):] = 1  # generated positions are real too
        idx, mask = idx.to(device), mask.to(device)

        settings = row_settings([r.params for r in rows], device)
        seen = counts = None
        if settings.any_repetition:
            seen = torch.zeros((B, vocab), dtype=torch.bool, device=device)
            for b, r in enumerate(rows):
                seen[b, torch.tensor(r.prompt, device=device)] = True
        if settings.any_presence_frequency:
            counts = torch.zeros((B, vocab), dtype=torch.int32, device=device)

        cache = self._new_cache(B, width) if self.compiled_step is None else self._static_cache(B, width)
        logits = model(idx, attention_mask=mask[:, :P], kv_cache=cache, logits_to_keep=1)[0][:, -1]
        # A decoding step feeds one token per row at a position known in advance: the positions and the key mask
        # are kept here, not rebuilt by the model from the (B, S) mask at every step (the same values).
        keys = mask.bool().view(B, 1, 1, width)  # (B, 1, 1, S_max): True = a real token
        positions = torch.tensor([[len(r.prompt)] for r in rows], device=device)  # (B, 1): the next token's
        static = None
        if self.compiled_step is not None:  # finished rows stay in the batch (ignored), so shapes never change
            keys = keys.clone()
            keys[..., P:] = False  # columns not written yet
            cache.make_static(P)
            static = torch.zeros((B, 1), dtype=torch.long, device=device), None  # (tokens fed, rows alive)
        active = list(rows)  # the rows still in the batch, in batch order
        for step in range(steps):
            chosen, keep = self._sample(logits, active, settings, seen, counts)
            if not keep or step == steps - 1:
                break
            if seen is not None:
                seen[torch.arange(len(active), device=device), chosen] = True
            if counts is not None:
                counts[torch.arange(len(active), device=device), chosen] += 1
            if len(keep) < len(active):  # compact: finished rows leave the batch
                k = torch.tensor(keep, device=device)
                chosen = chosen[k]
                settings = settings.select(k)
                seen = seen[k] if seen is not None else None
                counts = counts[k] if counts is not None else None
                active = [active[j] for j in keep]
                if static is None:
                    cache.reorder(k)
                    keys, positions = keys[k], positions[k]
                else:
                    static = static[0], (k if static[1] is None else static[1][k])
            if static is None:
                logits = model(chosen[:, None], attention_mask=keys[..., : cache.length + 1], position_ids=positions,
                               kv_cache=cache)[0][:, -1]
                positions = positions + 1
            else:
                logits = self._static_step(static, chosen, positions, keys, cache, P + step)

    def _static_cache(self, batch_size: int, width: int) -> KVCache:
        """The compiled step's cache: the last one again (zeroed) when the shape is the same, so that CUDA graphs
        keep their input addresses (marked static) and nothing is recompiled."""
        last = getattr(self, "_last_static", None)
        if last is not None and last.k.shape[1] == batch_size and last.max_len == width:
            last.k.zero_()
            last.v.zero_()
            last.length, last.write_at = 0, None
            return last
        cache = self._new_cache(batch_size, width)
        if self.device.type == "cuda":  # CUDA graphs keep these addresses (untested here: no GPU in CI)
            for k, v in cache.layers:
                torch._dynamo.mark_static_address(k)
                torch._dynamo.mark_static_address(v)
        self._last_static = cache
        return cache

    def _static_step(self, static, chosen, positions, keys, cache: KVCache, column: int) -> torch.Tensor:
        """One compiled decoding step over the whole batch (rows that finished are fed again and ignored):
        inputs updated in place, the new keys/values written at ``column``; logits of the rows alive."""
        tokens, alive = static
        tokens[alive if alive is not None else slice(None), 0] = chosen
        keys[..., column] = True
        cache.write_at.fill_(column)
        logits = self.compiled_step(tokens, positions, keys, cache)
        positions.add_(1)
        return logits[alive] if alive is not None else logits

    def _sample(self, logits: torch.Tensor, rows: list[_Row], settings, seen: torch.Tensor | None,
                counts: torch.Tensor | None) -> tuple[torch.Tensor, list[int]]:
        """One decoding step's bookkeeping, the same for static and continuous batching: choose each row's next
        token from its ``logits`` row, record it (log-probabilities, stop checks, text) and call the row's
        callbacks. Returns the chosen tokens and the positions in ``rows`` of the rows not finished."""
        scores = process_logits(logits, settings, seen, counts)
        chosen = choose_tokens(scores, settings.greedy, [r.generator for r in rows])
        logprobs = top_ids = top_values = None
        if any(r.params.logprobs for r in rows):  # under the model's own distribution: unprocessed logits
            top_n = max((r.params.top_logprobs for r in rows if r.params.logprobs), default=0)
            log_softmax = torch.log_softmax(logits.float(), dim=-1)
            logprobs = log_softmax.gather(1, chosen[:, None])[:, 0].tolist()
            if top_n:
                top = torch.topk(log_softmax, min(top_n, logits.size(-1)), dim=-1)
                top_ids, top_values = top.indices.tolist(), top.values.tolist()
        chosen_list = chosen.tolist()
        keep = []
        for j, row in enumerate(rows):
            token = chosen_list[j]
            row.ids.append(token)
            if logprobs is not None and row.params.logprobs:
                k = row.params.top_logprobs
                top_row = list(zip(top_ids[j][:k], top_values[j][:k])) if k else []
                row.logprobs.append(logprobs[j])
                row.top_logprobs.append(top_row)
                if row.on_logprob is not None:
                    row.on_logprob(row.index, token, logprobs[j], top_row)
            self._advance(row, token, row.track_text, row.on_token)
            if row.finish is None:
                keep.append(j)
            elif row.on_finish is not None:
                row.on_finish(row.index, self._completion(row))
        return chosen, keep

    def _generator(self, seed: int | None) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed(seed if seed is not None else random.SystemRandom().getrandbits(63))
        return g

    def _advance(self, row: _Row, token: int, track_text: bool, on_token: OnToken | None) -> None:
        """Record one token for ``row``: stop checks, text delta, callback."""
        if token in row.stop_ids:
            row.finish = "stop"
        elif len(row.ids) >= row.limit:
            row.finish = "length"
        if not track_text:
            return
        delta = ""
        if row.finish != "stop":
            row.text = self.tokenizer.decode(row.ids)
            delta = self._release_text(row)
        elif row.params.stop_strings or on_token:
            delta = row.text[row.emitted:]  # flush what was held back for a possible stop string
            row.emitted = len(row.text)
        if row.finish == "length":  # final flush, including held-back partial characters
            delta += row.text[row.emitted:]
            row.emitted = len(row.text)
        if on_token is not None and (on_token(row.index, token, delta) is False) and row.finish is None:
            row.finish = "cancelled"

    def _release_text(self, row: _Row) -> str:
        """The next safe text delta: never part of a stop string, never half a UTF-8 character."""
        text = row.text
        stops = row.params.stop_strings
        if stops:
            start = max(0, row.emitted - max(len(s) for s in stops))
            hits = [p for p in (text.find(s, start) for s in stops if s) if p >= 0]
            if hits:
                cut = min(hits)
                row.text = row.final_text = text[:cut]
                row.finish = "stop"
                delta = row.text[row.emitted:]
                row.emitted = len(row.text)
                return delta
        safe = len(text)
        while safe > row.emitted and text[safe - 1] == "\ufffd":  # an incomplete multi-byte character
            safe -= 1
        for s in stops:
            for k in range(min(len(s) - 1, safe - row.emitted), 0, -1):
                if s.startswith(text[safe - k:safe]):
                    safe -= k
                    break
        delta = text[row.emitted:safe]
        row.emitted = max(row.emitted, safe)
        return delta

    def _completion(self, row: _Row) -> Completion:
        if row.final_text is not None:
            text = row.final_text
        else:
            ids = row.ids[:-1] if row.finish == "stop" and row.ids and row.ids[-1] in row.stop_ids else row.ids
            text = self.tokenizer.decode(ids)
        return Completion(prompt_ids=row.prompt, token_ids=row.ids, text=text, finish_reason=row.finish or "length",
                          logprobs=row.logprobs if row.params.logprobs else None,
                          top_logprobs=row.top_logprobs if row.params.logprobs else None)
