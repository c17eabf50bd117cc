"""A view of the models, rebuilt from the models KV bucket and kept current by a watch: a
restarted gateway or orchestrator knows everything at once and holds no state of its own.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

from nats.js.kv import KeyValue

from broker.mirror import BucketMirror
from broker.recovery import Reconnects
from natron import config as cfg
from natron.errors import NotFound, Unavailable
from natron.records import READY, ModelRecord
from natron.spec import ModelSpec
from natron.tasks import EssentialTasks

log = logging.getLogger(__name__)


@dataclass(slots=True, frozen=True)
class ModelView:
    """A model as clients see it. While a load is under way over a model that serves, `record`
    carries the config that serves (the record's `serving_config`), and `spec` is built from
    it: metadata and the checks of requests stay the old ones until the load has succeeded."""

    record: ModelRecord
    spec: ModelSpec | None  # None when the config is broken
    # The highest READY version, worked out once per record rather than on every request.
    latest: str | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        ready = self.record.ready_versions()
        object.__setattr__(self, "latest", ready[0] if ready else None)

    def resolve(self, version: str) -> str:
        """The version a request goes to: as asked, or the highest READY one."""
        name = self.record.name
        if version:
            state = self.record.versions.get(version)
            if state is None:
                raise NotFound(f"model '{name}' has no version {version}")
            if state.state != READY:
                reason = f": {state.reason}" if state.reason else ""
                raise Unavailable(f"model '{name}' version {version} is {state.state}{reason}")
            return version
        if self.latest is not None:
            return self.latest
        reasons = "; ".join(
            f"v{v} {s.state}{' (' + s.reason + ')' if s.reason else ''}"
            for v, s in self.record.versions.items()
        )
        raise Unavailable(f"model '{name}' has no READY version: {reasons or self.record.reason}")


class ModelRegistry:
    """The models by name, from the bucket. Its watch is an essential task (`tasks`): a view
    that stopped following would answer from a stale picture for ever."""

    def __init__(self) -> None:
        self._mirror = BucketMirror("model record", lambda data: self._view(ModelRecord.from_json(data)))
        self._models = self._mirror.values
        self.synced = self._mirror.synced
        self.tasks = EssentialTasks("model view")

    def get(self, name: str) -> ModelView:
        view = self._models.get(name)
        if view is None:
            raise NotFound(f"unknown model '{name}'")
        return view

    def all(self) -> list[ModelView]:
        return [self._models[name] for name in sorted(self._models)]

    def put(self, record: ModelRecord) -> None:
        self._models[record.name] = self._view(record)

    @staticmethod
    def _view(record: ModelRecord) -> ModelView:
        if record.serving_config is not None:
            record = dataclasses.replace(record, config=record.presented_config())
        spec = None
        if record.config is not None:
            try:
                spec = ModelSpec.from_config(cfg.config_from_json(record.config))
            except Exception as exc:  # the router validated it; a newer router may differ
                log.warning("model '%s' config unusable here: %s", record.name, exc)
        return ModelView(record, spec)

    async def start(self, kv: KeyValue, reconnects: Reconnects | None = None) -> None:
        """Follow `kv`; with `reconnects`, watched again after each reconnect."""
        self.tasks.spawn(self._mirror.follow(kv, reconnects=reconnects), "follow-models")

    async def stop(self) -> None:
        await self.tasks.stop()
