"""The device and the one precision rule, shared by every stage (train, eval, generate, serve).

Rule for ``auto``: CUDA → bf16 where the GPU supports it, else fp16 (+ a GradScaler when training);
CPU → bf16 autocast where the CPU has native bf16 (AMX tiles or AVX512-BF16), else fp32; MPS → fp32.
Every stage prints the chosen precision with its reason (:attr:`Precision.describe`).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from gptforge.errors import GptforgeError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(requested: str | torch.device | None = "auto") -> torch.device:
    """``auto``: CUDA, else MPS, else CPU; anything else is passed to :class:`torch.device` (checked)."""
    if requested is None or str(requested) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError):
        raise GptforgeError(f"unknown device {requested!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GptforgeError(f"device {requested!r} asked for, but this machine has no CUDA GPU; use --device cpu")
    return device


def cpu_native_bf16() -> tuple[bool, str]:
    """Whether this CPU computes bf16 natively, and which feature says so (AMX or AVX512-BF16)."""
    cpu = torch.cpu
    if getattr(cpu, "_is_amx_tile_supported", lambda: False)():
        return True, "AMX"
    if getattr(cpu, "_is_avx512_bf16_supported", lambda: False)():
        return True, "AVX512-BF16"
    return False, "no AMX or AVX512-BF16"


@dataclass(frozen=True)
class Precision:
    """A resolved precision: ``name`` in fp32/bf16/fp16 on ``device``, and why it was chosen."""

    name: str
    device: torch.device
    reason: str

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.name]

    def autocast(self):
        """The autocast context for forward passes (a no-op context for fp32)."""
        if self.name == "fp32":
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """A loss scaler for fp16 training; ``None`` otherwise (bf16 has fp32's range)."""
        return torch.amp.GradScaler(self.device.type) if self.name == "fp16" else None

    @property
    def describe(self) -> str:
        return f"{self.name} ({self.reason})"


def resolve_precision(requested: str, device: torch.device) -> Precision:
    """Apply the rule (module docstring) to ``auto``; check an explicit choice."""
    device = torch.device(device)
    if requested not in PRECISIONS:
        raise GptforgeError(f"precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    if requested != "auto":
        if requested == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise GptforgeError("precision bf16 asked for, but this GPU has no bf16; use fp16 or auto")
        return Precision(requested, device, "asked for")
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Precision("bf16", device, f"auto: {torch.cuda.get_device_name(device)} supports bf16")
        return Precision("fp16", device, f"auto: {torch.cuda.get_device_name(device)} has no bf16; fp16 + scaler")
    if device.type == "cpu":
        native, feature = cpu_native_bf16()
        if native:
            return Precision("bf16", device, f"auto: the CPU has {feature}")
        return Precision("fp32", device, f"auto: the CPU has {feature}")
    return Precision("fp32", device, f"auto: fp32 on {device.type}")
