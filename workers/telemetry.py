"""GPU telemetry through pynvml for the device a worker serves: utilization, memory, power and
energy, sampled with each heartbeat. Without pynvml, a driver or a GPU there is nothing to
sample and nothing fails."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from workers.devices import Device

log = logging.getLogger(__name__)


class GpuTelemetry:
    def __init__(self, device: Device) -> None:
        self._device = device
        self._nvml: Any = None
        self._handle: Any = None
        self._energy_start_mj: int | None = None
        if device.kind != "GPU":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByUUID(device.uuid)
            self._nvml = pynvml
        except Exception as exc:  # no NVML here: telemetry is simply absent
            log.info("no GPU telemetry for %s: %s", device.uuid, exc)

    def sample(self) -> dict[str, float]:
        """Current readings; each one NVML cannot give (a MIG slice has no power) is left out."""
        if self._nvml is None:
            return {}
        nvml, handle = self._nvml, self._handle
        readings: dict[str, float] = {}

        def read(key: str, reader: Any) -> None:
            try:
                readings[key] = float(reader())
            except Exception:  # not supported on this device or slice
                pass

        read("utilization", lambda: nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0)
        read("memory_total_bytes", lambda: nvml.nvmlDeviceGetMemoryInfo(handle).total)
        read("memory_used_bytes", lambda: nvml.nvmlDeviceGetMemoryInfo(handle).used)
        read("power_usage_w", lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0)
        read("power_limit_w", lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000.0)
        try:
            energy_mj = int(nvml.nvmlDeviceGetTotalEnergyConsumption(handle))
            if self._energy_start_mj is None:
                self._energy_start_mj = energy_mj
            readings["energy_j"] = (energy_mj - self._energy_start_mj) / 1000.0
        except Exception:  # older GPUs have no energy counter
            pass
        return readings

    def close(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:  # shutting down must never fail a worker's stop
                pass
            self._nvml = None


_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes(pid: int, proc: Path = Path("/proc")) -> int:
    """Resident memory of `pid` and its descendants (a worker's Python model stubs are its
    children), from /proc; 0 where /proc cannot tell (another OS, a process gone meanwhile).

    Descendants come from each thread's `children` file (Linux 3.5+), so no scan of /proc."""
    total, seen, todo = 0, set(), [pid]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        try:
            # statm's second field: resident pages.
            total += int((proc / str(current) / "statm").read_text().split()[1]) * _PAGE_BYTES
            for task in (proc / str(current) / "task").iterdir():
                todo.extend(int(child) for child in (task / "children").read_text().split())
        except (OSError, ValueError, IndexError):
            continue
    return total
