"""Devices a worker can place model instances on: GPUs through pynvml when it is installed
and finds any, else the CPU. pynvml missing or failing is a clean fallback, never an error.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass(slots=True, frozen=True)
class Device:
    kind: str  # "CPU" or "GPU"
    index: int = 0
    uuid: str = ""
    name: str = "cpu"
    memory_total_bytes: int = 0
    memory_free_bytes: int = 0

    def describe(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "index": self.index,
            "uuid": self.uuid,
            "name": self.name,
            "memory_total_bytes": self.memory_total_bytes,
            "memory_free_bytes": self.memory_free_bytes,
        }


CPU = Device("CPU", name=f"cpu ({os.cpu_count()} cores)")


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _mig_slices(nvml: Any, handle: Any, index: int) -> list[Device]:
    """The MIG slices of a GPU in MIG mode (empty when MIG is off or unsupported)."""
    try:
        current, _ = nvml.nvmlDeviceGetMigMode(handle)
    except Exception:  # not MIG-capable
        return []
    if current != getattr(nvml, "NVML_DEVICE_MIG_ENABLE", 1):
        return []
    slices: list[Device] = []
    for slot in range(nvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
        try:
            mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
        except Exception:  # an empty slot
            continue
        memory = nvml.nvmlDeviceGetMemoryInfo(mig)
        slices.append(
            Device(
                "GPU",
                index,
                _text(nvml.nvmlDeviceGetUUID(mig)),
                f"{_text(nvml.nvmlDeviceGetName(handle))} MIG {slot}",
                int(memory.total),
                int(memory.free),
            )
        )
    return slices


def discover_gpus() -> list[Device]:
    """Every GPU, or every MIG slice of a GPU in MIG mode; [] without pynvml, driver or GPU."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # no driver, no device: the CPU serves
        log.info("no GPU: NVML unavailable (%s)", exc)
        return []
    try:
        devices: list[Device] = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            slices = _mig_slices(pynvml, handle, index)
            if slices:
                devices.extend(slices)
                continue
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            devices.append(
                Device(
                    "GPU",
                    index,
                    _text(pynvml.nvmlDeviceGetUUID(handle)),
                    _text(pynvml.nvmlDeviceGetName(handle)),
                    int(memory.total),
                    int(memory.free),
                )
            )
        return devices
    except Exception as exc:
        log.warning("GPU discovery failed, serving on the CPU: %s", exc)
        return []
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # shutting down a half-initialised NVML must not fail discovery
            pass


def pick_device(device_spec: str) -> Device:
    """'cpu', 'gpu:<index>' or 'gpu:<UUID>' (a GPU or MIG slice UUID) -> the device."""
    if not device_spec.startswith("gpu"):
        return CPU
    wanted = device_spec.partition(":")[2] or "0"
    gpus = discover_gpus()
    for gpu in gpus:
        if wanted in (gpu.uuid, str(gpu.index)):
            return gpu
    log.warning("GPU %s not found (%d GPU devices seen); serving on the CPU", wanted, len(gpus))
    return CPU
