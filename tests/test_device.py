"""Device facts: CPU from psutil for real; CUDA through a fake pynvml and patched torch.cuda (no GPU needed)."""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path

import pytest
import torch

from lowmem_aasist.memory import device as dev
from lowmem_aasist.memory.device import (
    DEFAULT_CONTEXT_BYTES,
    DeviceError,
    DeviceFacts,
    device_facts,
    process_gpu_bytes,
)

MiB = 2**20
GiB = 2**30
TOTAL = 15360 * MiB  # a Tesla T4 as NVML and CUDA both report it
CUDA0 = torch.device("cuda", 0)


class FakeNVMLError(Exception):
    pass


def fake_pynvml(
    *,
    v2: bool = True,
    v2_fails: bool = False,
    total: int = TOTAL,
    free: int = 14 * GiB,
    reserved: int = 300 * MiB,
    processes: list[tuple[int, int | None]] | None = None,
    fail: bool = False,
) -> types.ModuleType:
    """A pynvml stand-in that records its calls in ``calls``; ``fail`` makes nvmlInit raise NVMLError."""
    m = types.ModuleType("pynvml")
    m.calls = []  # type: ignore[attr-defined]
    m.NVMLError = FakeNVMLError  # type: ignore[attr-defined]

    def init() -> None:
        m.calls.append("init")
        if fail:
            raise FakeNVMLError("Driver Not Loaded")

    def memory_info(handle: object, version: int | None = None) -> types.SimpleNamespace:
        m.calls.append(f"mem v{2 if version else 1}")
        if version and v2_fails:
            raise FakeNVMLError("Function Not Found")
        if version:
            return types.SimpleNamespace(total=total, free=free, reserved=reserved, used=total - free - reserved)
        return types.SimpleNamespace(total=total, free=free, used=total - free)

    def by_index(i: int) -> str:
        m.calls.append(f"index {i}")
        return f"handle{i}"

    def by_pci(bus_id: str) -> str:
        m.calls.append(f"pci {bus_id}")
        return "handle-pci"

    m.nvmlInit = init  # type: ignore[attr-defined]
    m.nvmlShutdown = lambda: m.calls.append("shutdown")  # type: ignore[attr-defined]
    m.nvmlDeviceGetHandleByIndex = by_index  # type: ignore[attr-defined]
    m.nvmlDeviceGetHandleByPciBusId = by_pci  # type: ignore[attr-defined]
    m.nvmlDeviceGetMemoryInfo = memory_info  # type: ignore[attr-defined]
    m.nvmlDeviceGetName = lambda h: b"Tesla T4"  # type: ignore[attr-defined]  # old bindings return bytes
    m.nvmlSystemGetDriverVersion = lambda: "550.54.15"  # type: ignore[attr-defined]
    m.nvmlDeviceGetComputeRunningProcesses = lambda h: [  # type: ignore[attr-defined]
        types.SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in (processes or [])
    ]
    if v2:
        m.nvmlMemory_v2 = 0x02000028  # type: ignore[attr-defined]
    return m


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> dict:
    """Patch torch.cuda as a T4 (sm_75) would answer; edit the returned dict to change the answers."""
    state: dict = {
        "capability": (7, 5),
        "reserved": 2 * MiB,
        "mem_get_info": (13 * GiB, TOTAL),
        "props": types.SimpleNamespace(total_memory=TOTAL),
    }
    monkeypatch.setattr(dev, "_init_cuda_context", lambda device: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: state["capability"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Tesla T4 (torch)")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d=None: state["props"])
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: state["mem_get_info"])
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d=None: state["reserved"])
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return state


def install(monkeypatch: pytest.MonkeyPatch, module: types.ModuleType | None) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", module)  # None makes `import pynvml` raise ImportError


# --- CPU -------------------------------------------------------------------------------------------------------


def test_cpu_facts_from_psutil(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_cuda(*args: object, **kwargs: object) -> None:
        raise AssertionError("the CPU path must not touch torch.cuda")

    for name in ("is_available", "init", "mem_get_info", "get_device_properties", "memory_reserved"):
        monkeypatch.setattr(torch.cuda, name, no_cuda)
    facts = device_facts(torch.device("cpu"))
    assert facts.kind == "cpu" and facts.source == "psutil"
    assert 0 < facts.free_bytes <= facts.total_bytes
    assert facts.name and facts.compute_capability is None and facts.context_bytes == 0
    assert facts.native_bf16 == dev.cpu_has_native_bf16()
    assert json.loads(json.dumps(facts.to_dict()))["kind"] == "cpu"
    assert process_gpu_bytes(torch.device("cpu")) is None


def test_cgroup_limit(tmp_path: Path) -> None:
    limit, usage = tmp_path / "memory.max", tmp_path / "memory.current"
    files = ((limit, usage),)
    assert dev._cgroup_limit(files) is None  # no files: not in a cgroup we can read
    limit.write_text("max\n")
    assert dev._cgroup_limit(files) is None
    limit.write_text(f"{2**63 - 4096}\n")  # cgroup v1's "unlimited"
    assert dev._cgroup_limit(files) is None
    limit.write_text(f"{4 * GiB}\n")
    usage.write_text(f"{GiB}\n")
    assert dev._cgroup_limit(files) == (4 * GiB, GiB)


def test_cpu_facts_capped_by_cgroup(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dev, "_cgroup_limit", lambda: (2 * GiB, GiB // 2))
    facts = device_facts(torch.device("cpu"))
    assert facts.total_bytes == 2 * GiB and facts.free_bytes <= 1536 * MiB
    assert any("cgroup" in n for n in facts.notes)


# --- CUDA via fake NVML ---------------------------------------------------------------------------------------


def test_nvml_v2_measures_context(monkeypatch: pytest.MonkeyPatch, fake_cuda: dict) -> None:
    nvml = fake_pynvml(processes=[(1, 900 * MiB), (os.getpid(), 402 * MiB)])
    install(monkeypatch, nvml)
    facts = device_facts(CUDA0)
    assert facts.source == "nvml" and facts.kind == "cuda"
    assert facts.name == "Tesla T4" and facts.driver == "550.54.15"
    assert facts.total_bytes == TOTAL and facts.reserved_bytes == 300 * MiB
    assert facts.compute_capability == (7, 5) and facts.native_bf16 is False
    assert facts.context_bytes == 400 * MiB  # NVML's 402 MiB for our PID minus torch's 2 MiB cache
    assert facts.free_bytes == 14 * GiB + 402 * MiB  # what we hold is ours to plan with
    assert "mem v2" in nvml.calls and "mem v1" not in nvml.calls
    assert nvml.calls[-1] == "shutdown"
    d = json.loads(json.dumps(facts.to_dict()))
    assert d["compute_capability"] == [7, 5] and d["source"] == "nvml"


def test_nvml_v1_when_v2_missing_or_failing(monkeypatch: pytest.MonkeyPatch, fake_cuda: dict) -> None:
    for nvml in (fake_pynvml(v2=False), fake_pynvml(v2_fails=True)):
        install(monkeypatch, nvml)
        facts = device_facts(CUDA0)
        assert facts.source == "nvml" and facts.reserved_bytes == 0
        assert "mem v1" in nvml.calls and nvml.calls[-1] == "shutdown"


def test_default_context_when_pid_not_listed(monkeypatch: pytest.MonkeyPatch, fake_cuda: dict) -> None:
    for processes in ([], [(os.getpid(), None)]):  # hidden by a container / not reported (WDDM)
        install(monkeypatch, fake_pynvml(processes=processes))
        facts = device_facts(CUDA0)
        assert facts.source == "nvml" and facts.context_bytes == DEFAULT_CONTEXT_BYTES
        assert facts.free_bytes == 14 * GiB + 2 * MiB  # the estimate is not added back: errs small
        assert any("assumed" in n for n in facts.notes)


@pytest.mark.parametrize("module", ["error", "missing", "broken"])
def test_torch_fallback(monkeypatch: pytest.MonkeyPatch, fake_cuda: dict, module: str) -> None:
    if module == "error":
        nvml: types.ModuleType | None = fake_pynvml(fail=True)
    elif module == "missing":
        nvml = None
    else:
        nvml = types.ModuleType("pynvml")  # bindings without the functions: AttributeError
    install(monkeypatch, nvml)
    facts = device_facts(CUDA0)
    assert facts.source == "torch"
    assert facts.name == "Tesla T4 (torch)"
    assert facts.total_bytes == TOTAL and facts.free_bytes == 13 * GiB + 2 * MiB
    assert facts.context_bytes == DEFAULT_CONTEXT_BYTES and facts.reserved_bytes == 0
    assert any("NVML unavailable" in n for n in facts.notes)
    if module == "error":
        assert nvml is not None and nvml.calls == ["init"]  # failed init: nothing to shut down
    assert process_gpu_bytes(CUDA0) is None


def test_shutdown_even_when_a_query_fails(monkeypatch: pytest.MonkeyPatch, fake_cuda: dict) -> None:
    nvml = fake_pynvml()

    def boom(handle: object, version: int | None = None) -> None:
        raise FakeNVMLError("GPU is lost")

    nvml.nvmlDeviceGetMemoryInfo = boom  # type: ignore[attr-defined]
    install(monkeypatch, nvml)
    assert device_facts(CUDA0).source == "torch"
    assert nvml.calls[-1] == "shutdown"


def test_mismatched_total_falls_back_to_torch(monkeypatch: pytest.MonkeyPatch, fake_cuda: dict) -> None:
    # A MIG slice: NVML's handle is the whole 80 GB GPU, CUDA sees 10 GB.
    fake_cuda["props"] = types.SimpleNamespace(total_memory=10 * GiB)
    fake_cuda["mem_get_info"] = (9 * GiB, 10 * GiB)
    install(monkeypatch, fake_pynvml(total=80 * GiB, free=70 * GiB))
    facts = device_facts(CUDA0)
    assert facts.source == "torch" and facts.total_bytes == 10 * GiB


@pytest.mark.parametrize(("capability", "native"), [((7, 5), False), ((8, 6), True), ((9, 0), True), ((6, 1), False)])
def test_native_bf16_from_capability(
    monkeypatch: pytest.MonkeyPatch, fake_cuda: dict, capability: tuple[int, int], native: bool
) -> None:
    fake_cuda["capability"] = capability
    install(monkeypatch, fake_pynvml())
    facts = device_facts(CUDA0)
    assert facts.native_bf16 is native and facts.compute_capability == capability
    assert dev.cuda_has_native_bf16(CUDA0) is native
    # And the same on the torch fallback.
    install(monkeypatch, None)
    assert device_facts(CUDA0).native_bf16 is native


def test_handle_by_pci_bus_id(monkeypatch: pytest.MonkeyPatch, fake_cuda: dict) -> None:
    fake_cuda["props"] = types.SimpleNamespace(total_memory=TOTAL, pci_bus_id=0x3B, pci_device_id=0, pci_domain_id=0)
    nvml = fake_pynvml()
    install(monkeypatch, nvml)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    assert device_facts(CUDA0).source == "nvml"
    assert "pci 00000000:3b:00.0" in nvml.calls and not any(c.startswith("index") for c in nvml.calls)


@pytest.mark.parametrize(("visible", "expected"), [("2,5", "index 5"), ("GPU-1234abcd", "index 1"), ("", "index 1")])
def test_handle_by_visible_devices(
    monkeypatch: pytest.MonkeyPatch, fake_cuda: dict, visible: str, expected: str
) -> None:
    nvml = fake_pynvml()
    install(monkeypatch, nvml)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    device_facts(torch.device("cuda", 1))
    assert expected in nvml.calls


def test_bare_cuda_means_current_device(monkeypatch: pytest.MonkeyPatch, fake_cuda: dict) -> None:
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    nvml = fake_pynvml()
    install(monkeypatch, nvml)
    device_facts(torch.device("cuda"))
    assert "index 1" in nvml.calls


def test_cuda_that_cannot_start_is_a_device_error(monkeypatch: pytest.MonkeyPatch, fake_cuda: dict) -> None:
    def fail(device: torch.device) -> None:
        raise RuntimeError("CUDA error: no CUDA-capable device is detected\nmore detail")

    monkeypatch.setattr(dev, "_init_cuda_context", fail)
    with pytest.raises(DeviceError, match="no CUDA-capable device") as err:
        device_facts(CUDA0)
    assert "\n" not in str(err.value)


def test_process_gpu_bytes(monkeypatch: pytest.MonkeyPatch, fake_cuda: dict) -> None:
    install(monkeypatch, fake_pynvml(processes=[(os.getpid(), 1234 * MiB)]))
    assert process_gpu_bytes(CUDA0) == 1234 * MiB
    install(monkeypatch, fake_pynvml(processes=[(os.getpid() + 1, 1234 * MiB)]))
    assert process_gpu_bytes(CUDA0) is None
    install(monkeypatch, fake_pynvml(processes=[(os.getpid(), None)]))
    assert process_gpu_bytes(CUDA0) is None


def test_to_dict_round_trips_through_json() -> None:
    facts = DeviceFacts("cuda", "X", 1, 1, 0, (8, 0), True, 0, "nvml", notes=("n",))
    assert json.loads(json.dumps(facts.to_dict())) == {
        "kind": "cuda", "name": "X", "total_bytes": 1, "free_bytes": 1, "reserved_bytes": 0,
        "compute_capability": [8, 0], "native_bf16": True, "context_bytes": 0, "source": "nvml",
        "driver": "", "notes": ["n"],
    }


# --- real GPU -----------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_nvml_and_torch_agree_on_total_memory() -> None:
    device = torch.device("cuda", torch.cuda.current_device())
    facts = device_facts(device)
    assert facts.source == "nvml", facts.notes
    torch_total = torch.cuda.get_device_properties(device).total_memory
    assert abs(facts.total_bytes - torch_total) <= 0.01 * torch_total
    assert 0 < facts.free_bytes <= facts.total_bytes
    # Measured, not the DEFAULT_CONTEXT_BYTES guess that a process NVML does not list would get.
    assert not any("context assumed" in note for note in facts.notes), facts.notes
    assert facts.context_bytes > 0
    block = torch.empty(64 * MiB, dtype=torch.uint8, device=device)
    used = process_gpu_bytes(device)
    assert used is not None, "NVML runs but does not list this process (a PID namespace hides it?)"
    reserved = torch.cuda.memory_reserved(device)
    assert reserved >= 64 * MiB
    # Beyond the allocator's segments NVML charges the context, which nothing between the two readings changed.
    assert abs(used - reserved - facts.context_bytes) <= 32 * MiB, (used, reserved, facts.context_bytes)
    del block
