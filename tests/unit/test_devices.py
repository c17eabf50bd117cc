"""GPU and MIG discovery through pynvml, and its clean fallback to the CPU. pynvml is replaced
by small fakes here (this machine has no GPU); the same code runs against the real NVML on a
GPU machine (tests/test_backend_gpu.py)."""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass
from typing import Any

import pytest

from workers.devices import CPU, Device, discover_gpus, pick_device


@dataclass
class Memory:
    total: int
    free: int
    used: int = 0


def fake_nvml(gpus: list[dict[str, Any]], *, init_error: Exception | None = None) -> types.ModuleType:
    """A pynvml stand-in: `gpus` entries have uuid, name, total, and optionally migs (list)."""
    nvml = types.ModuleType("pynvml")
    nvml.NVML_DEVICE_MIG_ENABLE = 1  # type: ignore[attr-defined]

    def init() -> None:
        if init_error is not None:
            raise init_error

    handles: dict[Any, dict[str, Any]] = {}

    def by_index(index: int) -> Any:
        handle = ("gpu", index)
        handles[handle] = gpus[index]
        return handle

    def mig_mode(handle: Any) -> tuple[int, int]:
        info = handles[handle]
        if "migs" not in info:
            raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")
        return (1, 1) if info["migs"] else (0, 0)

    def mig_by_index(handle: Any, slot: int) -> Any:
        migs = handles[handle]["migs"]
        if slot >= len(migs):
            raise RuntimeError("NVML_ERROR_NOT_FOUND")
        mig = ("mig", handle, slot)
        handles[mig] = migs[slot]
        return mig

    nvml.nvmlInit = init  # type: ignore[attr-defined]
    nvml.nvmlShutdown = lambda: None  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetCount = lambda: len(gpus)  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetHandleByIndex = by_index  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetUUID = lambda h: handles[h]["uuid"].encode()  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetName = lambda h: handles[h].get("name", "GPU")  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetMemoryInfo = lambda h: Memory(handles[h]["total"], handles[h]["total"] // 2)  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetMigMode = mig_mode  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetMaxMigDeviceCount = lambda h: 7  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetMigDeviceHandleByIndex = mig_by_index  # type: ignore[attr-defined]
    return nvml


def test_without_pynvml_the_cpu_serves(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    assert discover_gpus() == []
    assert pick_device("gpu:0") == CPU


def test_a_failing_nvml_falls_back_to_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(
        sys.modules, "pynvml", fake_nvml([], init_error=RuntimeError("NVML_ERROR_DRIVER_NOT_LOADED"))
    )
    assert discover_gpus() == []


def test_a_discovery_error_midway_falls_back_to_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = fake_nvml([{"uuid": "GPU-a", "total": 8}])
    nvml.nvmlDeviceGetMemoryInfo = lambda h: (_ for _ in ()).throw(RuntimeError("GPU is lost"))  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    assert discover_gpus() == []


def test_whole_gpus_and_mig_slices_are_devices_of_their_own(monkeypatch: pytest.MonkeyPatch) -> None:
    gpus = [
        {"uuid": "GPU-whole", "name": "H100", "total": 80 * 2**30},
        {"uuid": "GPU-parent", "name": "H100", "total": 80 * 2**30, "migs": [
            {"uuid": "MIG-one", "total": 10 * 2**30}, {"uuid": "MIG-two", "total": 20 * 2**30}]},
        {"uuid": "GPU-mig-capable-but-off", "name": "A100", "total": 40 * 2**30, "migs": []},
    ]  # fmt: skip
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(gpus))
    devices = discover_gpus()
    assert [(d.uuid, d.index, d.memory_total_bytes) for d in devices] == [
        ("GPU-whole", 0, 80 * 2**30),
        ("MIG-one", 1, 10 * 2**30),
        ("MIG-two", 1, 20 * 2**30),
        ("GPU-mig-capable-but-off", 2, 40 * 2**30),
    ]
    assert all(d.kind == "GPU" for d in devices)
    assert devices[1].name == "H100 MIG 0"
    assert pick_device("gpu:MIG-two") == devices[2]
    assert pick_device("gpu:0") == devices[0]
    assert pick_device("cpu") == CPU
    assert isinstance(devices[0], Device)
