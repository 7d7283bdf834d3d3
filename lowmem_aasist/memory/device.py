"""Facts about the machine: which device to use and which precision it runs natively.

The only module that asks the hardware; everything else takes these facts as arguments.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch


class DeviceError(Exception):
    """A device request that cannot be met; one line naming the option."""


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {name}: no CUDA GPU is visible to PyTorch; use --device cpu or auto")
        return torch.device(name)
    raise DeviceError(f"--device {name!r}: choose auto, cpu or cuda")


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True where the CPU has bf16 instructions (AVX512-BF16 or AMX); elsewhere bf16 is emulated and ~2x slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def cuda_has_native_bf16(device: torch.device) -> bool:
    # is_bf16_supported() also says yes on Turing, where bf16 is emulated; tensor-core bf16 starts at sm_80.
    return torch.cuda.get_device_capability(device)[0] >= 8


def resolve_precision(precision: str, device: torch.device) -> str:
    """Turn ``auto`` into fp32 / bf16 / fp16 for this device; reject fp16 on CPU (no GradScaler there)."""
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if cuda_has_native_bf16(device) else "fp16"
        return "bf16" if cpu_has_native_bf16() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise DeviceError("--precision fp16 needs a CUDA GPU (loss scaling); use bf16 or fp32 on CPU")
    return precision


def autocast_dtype(precision: str) -> torch.dtype | None:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
