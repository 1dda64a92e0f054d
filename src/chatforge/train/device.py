"""Device and precision choice, and the machine's measured peak matmul throughput (for MFU)."""

from __future__ import annotations

import contextlib
import time

import torch

from chatforge.errors import ChatforgeError


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name not in ("cpu", "cuda", "mps") and not name.startswith("cuda:"):
        raise ChatforgeError(f"train.device must be auto, cpu, cuda or mps, got '{name}'")
    return torch.device(name)


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def pick_dtype(precision: str, device: torch.device) -> torch.dtype:
    """auto: bf16 where the device computes it natively (fp32 master weights stay), else fp32."""
    if precision == "auto":
        return torch.bfloat16 if bf16_supported(device) else torch.float32
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    raise ChatforgeError(f"train.precision must be auto, fp32 or bf16, got '{precision}'")


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def peak_matmul_flops(device: torch.device, dtype: torch.dtype, n: int = 512, seconds: float = 1.0) -> float:
    """FLOP/s of a square n×n matmul, the best this device does: the denominator of MFU. On a 2-core
    CPU 512 is the fastest size (its matrices stay in cache), see BENCHMARKS.md."""
    g = torch.Generator(device=device).manual_seed(0)  # its own generator: training's RNG stream is untouched
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    warm_until = time.perf_counter() + seconds / 4  # kernels, caches and clocks settle first
    while time.perf_counter() < warm_until:
        a @ b
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(4):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - t))
    return best
