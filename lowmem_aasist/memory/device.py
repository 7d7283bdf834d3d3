"""Facts about the machine: which device to use, which precision it runs natively and how much memory it has.

The only module that asks the hardware; everything else takes these facts as arguments.

Memory facts (``device_facts``) come from NVML on CUDA (the driver's own view: it sees other processes, the
driver's reservation and this process's CUDA context, none of which PyTorch's allocator knows about), from
``torch.cuda.mem_get_info`` when NVML is unusable, and from psutil on CPU. NVML trouble of any kind (library
missing, old driver, PIDs hidden by a container) degrades to the next source with a note; it never raises.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import platform
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import psutil
import torch

MiB = 2**20

# Used when NVML cannot report this process's GPU memory (pynvml missing, usedGpuMemory None on WDDM, or a
# container whose PID namespace hides our PID from the driver). A CUDA 12 context on recent GPUs, including the
# cuBLAS/cuDNN handles and kernels a training step loads, typically takes 300-600 MiB; 500 MiB sits near the top so
# a plan built on it errs towards fitting.
DEFAULT_CONTEXT_BYTES = 500 * MiB

# NVML and CUDA agree on a device's total memory to well under 1% (T4: 15,360 MiB both); a larger gap means the NVML
# handle is not the device PyTorch uses (a MIG slice reported as its parent GPU, or a mis-mapped index), so its
# numbers are dropped for torch's.
_TOTAL_MISMATCH = 0.02

# Cgroup limit files, v2 then v1. Containers (Docker, Colab, CI runners) see the host's RAM in /proc/meminfo, so
# psutil alone overstates what the process may use; the container's own cgroup is mounted at the root.
_CGROUP_LIMIT_FILES = (
    (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory.current")),
    (Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"), Path("/sys/fs/cgroup/memory/memory.usage_in_bytes")),
)


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
    return _capability_native_bf16(torch.cuda.get_device_capability(device))


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


def autocast_ctx(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast for bf16/fp16; a no-op for fp32 so callers never branch on precision."""
    dtype = autocast_dtype(precision)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


@dataclasses.dataclass(frozen=True)
class DeviceFacts:
    """What the memory planner needs to know about one device, read once at setup.

    ``free_bytes`` on CUDA is what this process could use: the device's free memory plus what PyTorch's cache
    already holds, plus this process's CUDA context when NVML measured it (the planner charges ``context_bytes``
    separately, so counting it as used here too would charge it twice). When the context is only the default
    estimate it is *not* added back, which errs towards a smaller plan.
    """

    kind: str  # "cuda" or "cpu"
    name: str
    total_bytes: int
    free_bytes: int
    reserved_bytes: int  # driver-reserved memory (NVML v2), else 0
    compute_capability: tuple[int, int] | None
    native_bf16: bool
    context_bytes: int
    source: str  # "nvml", "torch" or "psutil"
    driver: str = ""
    notes: tuple[str, ...] = ()  # how a number was obtained when it is an estimate or a fallback

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["compute_capability"] = list(self.compute_capability) if self.compute_capability else None
        d["notes"] = list(self.notes)
        return d


def device_facts(device: torch.device) -> DeviceFacts:
    """Memory and precision facts for ``device``; CPU facts never touch ``torch.cuda``."""
    if device.type == "cuda":
        return _cuda_facts(device)
    return _cpu_facts()


def process_gpu_bytes(device: torch.device) -> int | None:
    """GPU memory NVML charges to this process on ``device`` (context + allocator), or None when it cannot tell.

    This is what ``nvidia-smi`` shows and what runs out, unlike ``torch.cuda.max_memory_reserved``, which omits the
    context. Opens and closes NVML on every call (NVML's init is reference counted and takes milliseconds).
    """
    if device.type != "cuda":
        return None
    try:
        with _nvml() as nvml:
            return _own_usage(nvml, _nvml_handle(nvml, device))
    except Exception:  # a logging aid must never stop training; unknown is a valid answer
        return None


# --- CPU ---------------------------------------------------------------------------------------------------


def _cpu_facts() -> DeviceFacts:
    vm = psutil.virtual_memory()
    total, free = int(vm.total), int(vm.available)
    notes: list[str] = []
    limit = _cgroup_limit()
    if limit is not None and limit[0] < total:
        total, free = limit[0], min(free, max(limit[0] - limit[1], 0))
        notes.append(f"host RAM capped by the cgroup memory limit ({limit[0]} bytes)")
    return DeviceFacts(
        kind="cpu",
        name=_cpu_name(),
        total_bytes=total,
        free_bytes=free,
        reserved_bytes=0,
        compute_capability=None,
        native_bf16=cpu_has_native_bf16(),
        context_bytes=0,
        source="psutil",
        notes=tuple(notes),
    )


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    # ARM Linux has no "model name"; macOS and Windows have no /proc at all.
    return platform.processor() or platform.machine() or "cpu"


def _cgroup_limit(files: tuple[tuple[Path, Path], ...] = _CGROUP_LIMIT_FILES) -> tuple[int, int] | None:
    """(limit, current usage) of this container's memory cgroup, or None when unlimited or unreadable."""
    for limit_file, usage_file in files:
        try:
            raw = limit_file.read_text().strip()
        except OSError:
            continue
        if not raw.isdigit():  # "max" (v2) means unlimited
            return None
        limit = int(raw)
        # v1 spells "unlimited" as a huge page-aligned number (2^63 rounded down), far beyond any real RAM.
        if limit >= 2**60:
            return None
        try:
            usage = int(usage_file.read_text().strip())
        except (OSError, ValueError):
            usage = 0
        return limit, usage
    return None


# --- CUDA --------------------------------------------------------------------------------------------------


def _capability_native_bf16(capability: tuple[int, int]) -> bool:
    # Tensor-core bf16 starts at sm_80; is_bf16_supported() also says yes on Turing, where it is emulated.
    return capability[0] >= 8


def _init_cuda_context(device: torch.device) -> None:
    """Create this process's CUDA context on ``device`` so NVML can measure it (a separate seam for tests)."""
    torch.cuda.init()
    with torch.cuda.device(device):
        torch.empty(1, device=device)
        torch.cuda.synchronize(device)


def _cuda_facts(device: torch.device) -> DeviceFacts:
    if device.index is None:  # "cuda" means the current device, as torch itself reads it
        device = torch.device("cuda", torch.cuda.current_device())
    try:
        # The context must exist before NVML looks, or there is nothing of ours to measure.
        _init_cuda_context(device)
    except (RuntimeError, AssertionError) as err:  # torch's CPU build asserts instead of raising
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DeviceError(f"{device}: CUDA could not start ({first})") from err
    capability = tuple(torch.cuda.get_device_capability(device))
    cap = (int(capability[0]), int(capability[1]))
    notes: list[str] = []
    try:
        facts = _nvml_cuda_facts(device, cap, notes)
    except Exception as err:  # any NVML failure (ImportError, NVMLError, odd bindings) falls back to torch
        notes.append(f"NVML unavailable ({type(err).__name__}: {err}); memory from torch.cuda.mem_get_info")
        facts = None
    if facts is not None:
        return facts
    free, total = torch.cuda.mem_get_info(device)
    notes.append(f"CUDA context not measurable; assumed {DEFAULT_CONTEXT_BYTES // MiB} MiB")
    return DeviceFacts(
        kind="cuda",
        name=torch.cuda.get_device_name(device),
        total_bytes=int(total),
        # Our cached blocks are ours to reuse; the context is not added back (it is only an estimate).
        free_bytes=int(free) + int(torch.cuda.memory_reserved(device)),
        reserved_bytes=0,
        compute_capability=cap,
        native_bf16=_capability_native_bf16(cap),
        context_bytes=DEFAULT_CONTEXT_BYTES,
        source="torch",
        notes=tuple(notes),
    )


def _nvml_cuda_facts(device: torch.device, cap: tuple[int, int], notes: list[str]) -> DeviceFacts | None:
    """Facts from NVML, or None (with a note) when NVML's device does not look like torch's."""
    with _nvml() as nvml:
        handle = _nvml_handle(nvml, device)
        total, free, reserved = _memory_info(nvml, handle, notes)
        torch_total = int(getattr(torch.cuda.get_device_properties(device), "total_memory", 0) or 0)
        if torch_total and abs(total - torch_total) > _TOTAL_MISMATCH * torch_total:
            notes.append(
                f"NVML total {total} bytes differs from CUDA's {torch_total} (MIG slice or another GPU); "
                "memory from torch.cuda.mem_get_info"
            )
            return None
        own = _own_usage(nvml, handle)
        cached = int(torch.cuda.memory_reserved(device))
        if own is not None and own > cached:
            context, free = own - cached, free + own
        else:
            context, free = DEFAULT_CONTEXT_BYTES, free + cached
            notes.append(
                f"NVML does not show this process's memory (PID hidden or not reported); "
                f"CUDA context assumed {DEFAULT_CONTEXT_BYTES // MiB} MiB"
            )
        return DeviceFacts(
            kind="cuda",
            name=_text(nvml.nvmlDeviceGetName(handle)),
            total_bytes=total,
            free_bytes=free,
            reserved_bytes=reserved,
            compute_capability=cap,
            native_bf16=_capability_native_bf16(cap),
            context_bytes=context,
            source="nvml",
            driver=_driver_version(nvml),
            notes=tuple(notes),
        )


@contextlib.contextmanager
def _nvml() -> Iterator[ModuleType]:
    """pynvml, initialised for the duration of the block and always shut down after."""
    import pynvml  # imported here: a missing or broken binding must only cost the NVML path

    pynvml.nvmlInit()
    try:
        yield pynvml
    finally:
        with contextlib.suppress(Exception):  # shutdown failing must not hide the real result or error
            pynvml.nvmlShutdown()


def _nvml_handle(nvml: ModuleType, device: torch.device) -> Any:
    """The NVML handle of torch's ``device``.

    NVML numbers GPUs in PCI bus order over all GPUs; CUDA numbers only the visible ones, fastest first unless
    CUDA_DEVICE_ORDER=PCI_BUS_ID. So the PCI address torch reports is tried first (exact whatever the ordering);
    then a CUDA_VISIBLE_DEVICES entry that is a plain index (right on single-GPU and same-model machines); then the
    torch index itself. A wrong pick is caught afterwards by comparing total memory with CUDA's.
    """
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    bus, dev, domain = (getattr(props, a, None) for a in ("pci_bus_id", "pci_device_id", "pci_domain_id"))
    if isinstance(bus, int) and isinstance(dev, int):
        with contextlib.suppress(nvml.NVMLError):
            return nvml.nvmlDeviceGetHandleByPciBusId(f"{domain or 0:08x}:{bus:02x}:{dev:02x}.0")
    visible = [e.strip() for e in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if e.strip()]
    if visible and all(e.isdigit() for e in visible) and index < len(visible):
        return nvml.nvmlDeviceGetHandleByIndex(int(visible[index]))
    return nvml.nvmlDeviceGetHandleByIndex(index)


def _memory_info(nvml: ModuleType, handle: Any, notes: list[str]) -> tuple[int, int, int]:
    """(total, free, driver-reserved) bytes; v2 (which splits out the reservation) where driver and binding allow."""
    version = getattr(nvml, "nvmlMemory_v2", None)
    if version is not None:
        try:
            info = nvml.nvmlDeviceGetMemoryInfo(handle, version=version)
            return int(info.total), int(info.free), int(info.reserved)
        except (nvml.NVMLError, TypeError):  # drivers before R510 lack the v2 call; old bindings lack `version`
            pass
    info = nvml.nvmlDeviceGetMemoryInfo(handle)
    notes.append("NVML memory info v1: driver-reserved memory not reported")
    return int(info.total), int(info.free), 0


def _own_usage(nvml: ModuleType, handle: Any) -> int | None:
    pid = os.getpid()
    for proc in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
        if getattr(proc, "pid", None) == pid:
            used = getattr(proc, "usedGpuMemory", None)
            return int(used) if used is not None else None
    return None


def _driver_version(nvml: ModuleType) -> str:
    try:
        return _text(nvml.nvmlSystemGetDriverVersion())
    except Exception:  # the version is informational; not knowing it must not cost the NVML memory numbers
        return ""


def _text(value: str | bytes) -> str:
    # Bindings before nvidia-ml-py 11.515 return bytes.
    return value.decode() if isinstance(value, bytes) else str(value)
