"""Devices a worker can place model instances on: GPUs through pynvml when it is installed
and finds any, else the CPU. pynvml missing or failing is a clean fallback, never an error.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(slots=True, frozen=True)
class Device:
    kind: str  # "CPU" or "GPU"
    index: int = 0
    uuid: str = ""
    name: str = "cpu"
    memory_total_bytes: int = 0

    def describe(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "index": self.index,
            "uuid": self.uuid,
            "name": self.name,
            "memory_total_bytes": self.memory_total_bytes,
        }


CPU = Device("CPU", name=f"cpu ({os.cpu_count()} cores)")


def discover_gpus() -> list[Device]:
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
            uuid = pynvml.nvmlDeviceGetUUID(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            devices.append(
                Device(
                    "GPU",
                    index,
                    uuid.decode() if isinstance(uuid, bytes) else str(uuid),
                    name.decode() if isinstance(name, bytes) else str(name),
                    int(memory.total),
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
