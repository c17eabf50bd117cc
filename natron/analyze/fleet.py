"""What the fleet is made of, and what its workers hold in memory, read from the gateway's
Prometheus endpoint: `natron_worker_resident_memory_bytes` (one sample per worker, labelled with
the device it serves) and Triton's `nv_gpu_memory_used_bytes` (per GPU or MIG slice).

Reading metrics rather than the broker means `natron analyze` needs no NATS credentials: the
HTTP endpoints a Triton user already points Model Analyzer at are enough.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from natron.analyze.space import DeviceClass

WORKER_MEMORY = "natron_worker_resident_memory_bytes"
GPU_MEMORY = "nv_gpu_memory_used_bytes"
_MB = 1024 * 1024


@dataclass(slots=True)
class FleetReading:
    """One scrape: the device classes, and memory per worker and per GPU."""

    classes: list[DeviceClass] = field(default_factory=list)
    rss_bytes: dict[str, float] = field(default_factory=dict)  # worker id -> bytes
    gpu_uuid: dict[str, str] = field(default_factory=dict)  # worker id -> its GPU's uuid
    gpu_used_bytes: dict[str, float] = field(default_factory=dict)  # uuid -> bytes

    def memory_mb(self, device: DeviceClass) -> tuple[float, float]:
        """(host RSS, GPU memory used) of the busiest worker of a class, in MB."""
        rss = max((self.rss_bytes.get(w, 0.0) for w in device.workers), default=0.0)
        gpu = max(
            (self.gpu_used_bytes.get(self.gpu_uuid.get(w, ""), 0.0) for w in device.workers),
            default=0.0,
        )
        return rss / _MB, gpu / _MB


def parse(text: str) -> FleetReading:
    reading = FleetReading()
    members: dict[tuple[str, str], list[str]] = defaultdict(list)
    indices: dict[tuple[str, str], set[int]] = defaultdict(set)
    for family in text_string_to_metric_families(text):
        if family.name == WORKER_MEMORY:
            for sample in family.samples:
                labels = sample.labels
                if labels.get("role", "worker") != "worker":
                    continue  # orchestrators run ensembles, not model instances
                worker = labels.get("worker", "")
                kind = labels.get("device_kind", "CPU")
                name = "cpu" if kind == "CPU" else labels.get("device", "GPU")
                members[(kind, name)].append(worker)
                if kind == "GPU":
                    indices[(kind, name)].add(int(labels.get("device_index", "0") or 0))
                    reading.gpu_uuid[worker] = labels.get("gpu_uuid", "")
                reading.rss_bytes[worker] = sample.value
        elif family.name == GPU_MEMORY:
            for sample in family.samples:
                reading.gpu_used_bytes[sample.labels.get("gpu_uuid", "")] = sample.value
    # GPUs first: a GPU class is what a fleet with GPUs is usually sized by.
    for (kind, name), workers in sorted(members.items(), key=lambda item: (item[0][0] != "GPU", item[0][1])):
        reading.classes.append(
            DeviceClass(kind, name, tuple(sorted(workers)), tuple(sorted(indices.get((kind, name), ()))))
        )
    return reading


async def read(session: aiohttp.ClientSession, metrics_url: str) -> FleetReading:
    async with session.get(metrics_url, timeout=aiohttp.ClientTimeout(total=10)) as response:
        response.raise_for_status()
        return parse(await response.text())


def overlapping(classes: list[DeviceClass]) -> list[str]:
    """GPU classes that `instance_group.gpus` cannot tell apart (the same index holds different
    devices on different hosts): measured together, and the report says so."""
    seen: dict[int, str] = {}
    clashes = []
    for device in classes:
        for index in device.gpu_indices:
            other = seen.setdefault(index, device.label)
            if other != device.label:
                clashes.append(f"GPU index {index} is {other} on one host and {device.label} on another")
    return clashes
