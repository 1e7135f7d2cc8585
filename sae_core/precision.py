"""Devices and precisions: which device a name means here, and whether half precision is worth computing
in on it (CPUs without native bf16/fp16 emulate it)."""
from __future__ import annotations

import math
import sys
import time

import torch

from .errors import UserError


def resolve_device(name: str, flag: str = "--device") -> str:
    """"auto" (CUDA where there is a GPU, else the CPU), "cpu", "cuda" or "cuda:N", checked against this
    machine before anything loads; UserError naming `flag` (where the name came from) otherwise."""
    name = str(name).strip()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:  # torch's own message lists twenty device types none of this runs on
        device = None
    if device is None or device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index is not None):
        raise UserError(f"{flag} {name} is not a device this runs on; use auto, cpu, cuda or cuda:N.")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{flag} {name} was asked for but no CUDA GPU is visible here; use cpu (or auto).")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"{flag} {name} names a GPU that is not here ({torch.cuda.device_count()} visible); "
                        f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}.")
    return name

HALF_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def _matmul_gflops(dtype: torch.dtype, size: int = 256, reps: int = 3) -> float:
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    a @ b  # warm-up
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * size ** 3 / best / 1e9


def slow_half_reason(device: str, dtype: torch.dtype) -> str | None:
    """Why computing in `dtype` (bf16 or fp16) would crawl on `device` (one sentence), or None;
    device "auto" is CUDA when there is one, else the CPU.

    CPUs without native half-precision matmuls (AVX2 only) emulate them: on an AMD EPYC host of this
    project bf16 and fp16 matmuls ran at 1.3-1.4 GFLOP/s against 70-156 in fp32, 100x slower. A 256^3
    probe of each dtype costs about 0.1 s there, far less elsewhere.
    """
    if dtype not in HALF_NAMES:
        raise ValueError(f"slow_half_reason probes bf16 or fp16, not {dtype}")
    if str(device).startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        return None
    fp32, half = _matmul_gflops(torch.float32), _matmul_gflops(dtype)
    if half >= 0.5 * fp32:
        return None
    return (f"{HALF_NAMES[dtype]} matmuls run at {half:.1f} GFLOP/s on this CPU against {fp32:.0f} in fp32 "
            f"(256^3; torch sees {torch.backends.cpu.get_cpu_capability()}, no native {HALF_NAMES[dtype]})")


def warn_if_slow_half(device: str, precision: str, fix: str) -> str | None:
    """Print one warning line to stderr when computing in `precision` (bf16/bfloat16, fp16/float16; any
    other value is fine) would crawl on `device`; `fix` names the option that avoids it. Returns the
    warning, or None."""
    dtype = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}.get(precision)
    reason = slow_half_reason(device, dtype) if dtype is not None else None
    if reason is None:
        return None
    line = f"warning: {reason}; {fix} is faster on this machine."
    print(line, file=sys.stderr)
    return line


def out_of_memory(error: BaseException) -> str | None:
    """Torch's own words (one line) when `error` is running out of memory, on a GPU or on the CPU, else None.

    The CPU allocator's failure is a plain RuntimeError ("[enforce fail at alloc_cpu.cpp:127] err == 0.
    DefaultCPUAllocator: can't allocate memory: ..."), not torch.OutOfMemoryError as CUDA's is, so an
    `except torch.OutOfMemoryError` misses it on the machines without a GPU."""
    text = str(error).strip()
    if isinstance(error, RuntimeError) and "DefaultCPUAllocator" in text:
        text = text[text.index("DefaultCPUAllocator"):]  # the C++ assertion before it says nothing to a user
    elif not isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return None
    return text.splitlines()[0].strip() if text else type(error).__name__
