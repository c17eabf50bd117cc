"""Placement of model instances on the workers of the fleet, following `instance_group`.

natron reads `count` as Triton does on one host, per device: every worker whose device matches
a group runs `count` instances of the model, so capacity grows with the fleet ("start another
worker"), and each instance pulls from the version's shared consumer only what it can batch.

- KIND_GPU: workers on a GPU (a whole GPU or a MIG slice), restricted to the `gpus` indices
  when the group lists them.
- KIND_CPU: workers on the CPU; when the fleet has none, every worker (each has a CPU).
- KIND_AUTO: GPU workers when the fleet has any, else the CPU workers, as Triton picks.
- Ensembles go to the orchestrators (`natron ensemble`), and nothing else does.

On GPU workers a model goes only where its estimated size (the files of its versions) fits the
device memory not yet promised to other models, largest models first, so a full device is
skipped rather than overcommitted. When a worker leaves, the next placement runs over the
remaining fleet: models only it could hold find another device if one has room now.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from natron.records import NO_ORCHESTRATOR, NO_WORKER, ORCHESTRATOR, ModelRecord, WorkerReport


@dataclass(slots=True, frozen=True)
class Group:
    kind: str  # KIND_AUTO, KIND_CPU, KIND_GPU
    count: int
    gpus: tuple[int, ...] = ()


def groups_of(record: ModelRecord) -> list[Group]:
    config = record.config or {}
    groups = []
    for raw in config.get("instance_group", []) or [{}]:
        groups.append(
            Group(
                kind=str(raw.get("kind", "KIND_AUTO")),
                count=max(1, int(raw.get("count", 1))),
                gpus=tuple(int(g) for g in raw.get("gpus", [])),
            )
        )
    return groups


def _device(worker: WorkerReport) -> dict[str, Any]:
    return worker.devices[0] if worker.devices else {"kind": "CPU"}


def model_size_bytes(record: ModelRecord) -> int:
    """The files of the served versions: a floor for the device memory the model needs."""
    total = 0
    for version in record.versions:
        folder = Path(record.path) / version
        if folder.is_dir():
            total += sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    return total


def place(
    records: list[ModelRecord], workers: list[WorkerReport], sizes: dict[str, int]
) -> dict[str, tuple[dict[str, int], str]]:
    """Model name -> (worker id -> instance count, reason when nothing could be placed)."""
    live = [w for w in workers if not w.stopping]
    orchestrators = [w for w in live if w.role == ORCHESTRATOR]
    live = [w for w in live if w.role != ORCHESTRATOR]
    gpu_workers = [w for w in live if _device(w).get("kind") == "GPU"]
    cpu_workers = [w for w in live if _device(w).get("kind") != "GPU"]
    # Device memory not yet promised, per GPU worker; absent when the device does not say (then
    # nothing is held back), and never confused with 0 bytes left.
    free: dict[str, int] = {}
    for worker in gpu_workers:
        device = _device(worker)
        known = int(device.get("memory_free_bytes") or device.get("memory_total_bytes") or 0)
        if known:
            free[worker.id] = known
    result: dict[str, tuple[dict[str, int], str]] = {}
    # Largest first: a small model can fit the gaps a big one leaves.
    for record in sorted(records, key=lambda r: -sizes.get(r.name, 0)):
        if record.reason or record.config is None:
            result[record.name] = ({}, "")
            continue
        if record.config.get("platform") == "ensemble":
            # Ensembles run on every orchestrator, one instance each; their steps run wherever
            # the composing models are placed.
            placement = {w.id: 1 for w in orchestrators}
            reason = "" if placement else NO_ORCHESTRATOR
            result[record.name] = (placement, reason)
            continue
        size = sizes.get(record.name, 0)
        placement = {}
        wanted_gpu = False
        for group in groups_of(record):
            kind = group.kind
            if kind == "KIND_AUTO":
                kind = "KIND_GPU" if gpu_workers else "KIND_CPU"
            if kind == "KIND_GPU":
                wanted_gpu = True
                for worker in gpu_workers:
                    index = int(_device(worker).get("index", 0) or 0)
                    if group.gpus and index not in group.gpus:
                        continue
                    left = free.get(worker.id)
                    if left is not None and size > left and worker.id not in placement:
                        continue
                    placement[worker.id] = placement.get(worker.id, 0) + group.count
            else:
                for worker in cpu_workers or live:
                    placement[worker.id] = placement.get(worker.id, 0) + group.count
        for worker_id in placement:
            if worker_id in free:
                free[worker_id] -= size
        reason = ""
        if not placement:
            if not live:
                reason = NO_WORKER
            elif wanted_gpu and not gpu_workers:
                reason = "the model's instance_group asks for a GPU and no GPU worker has joined"
            elif wanted_gpu:
                reason = f"no GPU worker with a matching index and {size} bytes of device memory free"
            else:
                reason = "no worker matches the model's instance_group"
        result[record.name] = (placement, reason)
    return result
