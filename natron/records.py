"""Model states as the router publishes them in the models KV bucket, and how a gateway or
worker reads them back. The JSON document per model is the contract between those services.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import orjson

READY = "READY"
UNAVAILABLE = "UNAVAILABLE"
LOADING = "LOADING"
UNLOADING = "UNLOADING"

# The reasons of an UNAVAILABLE version that waits for the fleet rather than failed: no worker
# (or, for an ensemble, no orchestrator) has joined that could take it. Placement writes them;
# strict readiness counts such a version as not settled yet.
NO_WORKER = "no live worker serves this model"
NO_ORCHESTRATOR = "no ensemble orchestrator (natron ensemble) has joined"
_WAITING_FOR_FLEET = (NO_WORKER, NO_ORCHESTRATOR)

# A worker's role: a worker runs model instances on its device; an orchestrator (`natron
# ensemble`) runs ensembles only, whose steps run on workers.
WORKER = "worker"
ORCHESTRATOR = "orchestrator"


@dataclass(slots=True)
class VersionState:
    state: str
    reason: str = ""


@dataclass(slots=True)
class ModelRecord:
    """One model of the repository: where its files are, its config, its versions' states.

    `generation` changes whenever what a worker must load changes (config, path, versions),
    so workers reload on a new generation and ignore updates that only change states.

    A load over a model that serves never takes it down: while the workers load the record's
    generation, `serving_config` holds the config that serves, which clients keep seeing
    (metadata, checks of requests) until the load has succeeded; if it fails, the router
    publishes the record that served again, with `failure` saying why the load failed.
    """

    name: str
    path: str
    config: dict[str, Any] | None  # Triton's JSON form; None when the config is broken
    versions: dict[str, VersionState] = field(default_factory=dict)
    reason: str = ""  # model-level failure (bad config, unloaded): every version is unavailable
    generation: str = ""
    # worker id -> instances it runs; decided by the router, not part of the generation, so a
    # worker joining or leaving never makes the others reload.
    placement: dict[str, int] = field(default_factory=dict)
    placement_reason: str = ""  # why no worker could take the model, when placement is empty
    files: str = ""  # signature of the model files (sizes, mtimes): part of the generation
    # The config that serves while a load of this record's generation is under way; None when
    # this record's own config is the one clients see. Not part of the generation.
    serving_config: dict[str, Any] | None = None
    # Why the last load of this model failed while this record served on; "" when it did not.
    failure: str = ""
    # version -> digest of its files in the model store (broker/objects.py); empty when the
    # router does not publish them. Part of the generation: other contents, another load.
    digests: dict[str, str] = field(default_factory=dict)

    def presented_config(self) -> dict[str, Any] | None:
        """The config clients see: the serving one while a load is under way."""
        return self.serving_config if self.serving_config is not None else self.config

    def compute_generation(self) -> str:
        digest = hashlib.sha256(
            orjson.dumps(
                [self.path, self.config, sorted(self.versions), self.files, self.digests],
                option=orjson.OPT_SORT_KEYS,
            )
        )
        return digest.hexdigest()[:16]

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "name": self.name,
                "path": self.path,
                "config": self.config,
                "versions": {v: {"state": s.state, "reason": s.reason} for v, s in self.versions.items()},
                "reason": self.reason,
                "generation": self.generation,
                "placement": self.placement,
                "placement_reason": self.placement_reason,
                "files": self.files,
                "serving_config": self.serving_config,
                "failure": self.failure,
                "digests": self.digests,
            }
        )

    @staticmethod
    def from_json(data: bytes) -> ModelRecord:
        raw = orjson.loads(data)
        return ModelRecord(
            name=raw["name"],
            path=raw["path"],
            config=raw["config"],
            versions={v: VersionState(s["state"], s.get("reason", "")) for v, s in raw["versions"].items()},
            reason=raw.get("reason", ""),
            generation=raw.get("generation", ""),
            placement=raw.get("placement", {}),
            placement_reason=raw.get("placement_reason", ""),
            files=raw.get("files", ""),
            serving_config=raw.get("serving_config"),
            failure=raw.get("failure", ""),
            digests=raw.get("digests", {}),
        )

    def settled(self) -> bool:
        """Whether nothing is left to wait for before the model serves or has failed for good:
        no version LOADING, nor UNAVAILABLE only for want of a worker or orchestrator (that
        waits for the fleet). READY, UNLOADING, failed versions and a model not loaded have."""
        if self.reason:
            return True  # not loaded (unloaded), or a config that failed for good
        return not any(
            state.state == LOADING or (state.state == UNAVAILABLE and state.reason in _WAITING_FOR_FLEET)
            for state in self.versions.values()
        )

    def ready_versions(self) -> list[str]:
        """READY versions, highest first: the first is what "no version" means."""
        ready = [v for v, s in self.versions.items() if s.state == READY]
        return sorted(ready, key=int, reverse=True)


@dataclass(slots=True)
class WorkerReport:
    """What a worker publishes under its key in the workers bucket, every heartbeat."""

    id: str
    host: str
    pid: int
    devices: list[dict[str, Any]]
    # model -> generation -> version -> state
    models: dict[str, dict[str, dict[str, VersionState]]] = field(default_factory=dict)
    stopping: bool = False
    role: str = WORKER
    # "model/version" -> cumulative statistics (natron/stats.py ModelStats.to_json()).
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Host memory of the worker and the processes it started (Python model stubs), in bytes, at
    # the last heartbeat: what `natron analyze` charges a configuration for on the host.
    rss_bytes: int = 0
    # Which processes see the same POSIX shared memory objects as this worker (natron/inference.py
    # host_scope()); None: none it would map (a report from before there was such a field, a
    # host without /dev/shm, or a worker told not to map clients' regions). A gateway sends
    # tensors by reference only to workers of its own scope.
    host_scope: str | None = None

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "id": self.id,
                "host": self.host,
                "pid": self.pid,
                "devices": self.devices,
                "models": {
                    m: {
                        g: {v: {"state": s.state, "reason": s.reason} for v, s in vs.items()}
                        for g, vs in gens.items()
                    }
                    for m, gens in self.models.items()
                },
                "stopping": self.stopping,
                "role": self.role,
                "stats": self.stats,
                "rss_bytes": self.rss_bytes,
                "host_scope": self.host_scope,
            }
        )

    @staticmethod
    def from_json(data: bytes) -> WorkerReport:
        raw = orjson.loads(data)
        return WorkerReport(
            id=raw["id"],
            host=raw["host"],
            pid=raw["pid"],
            devices=raw["devices"],
            models={
                m: {
                    g: {v: VersionState(s["state"], s.get("reason", "")) for v, s in vs.items()}
                    for g, vs in gens.items()
                }
                for m, gens in raw["models"].items()
            },
            stopping=raw.get("stopping", False),
            role=raw.get("role", WORKER),
            stats=raw.get("stats", {}),
            rss_bytes=int(raw.get("rss_bytes", 0)),
            host_scope=scope if isinstance(scope := raw.get("host_scope"), str) and scope else None,
        )
