"""The orchestrator role (`natron ensemble`): a worker whose only loader is the ensemble's, with
the model view and the request client its ensembles send their steps through.

It joins the fleet like any worker (heartbeats, placement, the shared consumers), but reports
the role `orchestrator`, so the router places ensembles on it and nothing else.
"""

from __future__ import annotations

import dataclasses

from nats.aio.client import Client

from broker import jetstream, recovery
from broker.requester import Requester
from broker.subjects import Subjects
from broker.view import ModelRegistry
from ensemble.backend import EnsembleMesh, ensemble_loader
from natron.records import ORCHESTRATOR
from natron.tasks import EssentialTasks
from workers.service import Worker, WorkerOptions


class Orchestrator:
    """`await orchestrator.start()` ... `await orchestrator.stop()`; `worker` is the worker it
    runs, for its metrics."""

    def __init__(self, nc: Client, subjects: Subjects, options: WorkerOptions) -> None:
        self._nc = nc
        self._subjects = subjects
        self._registry = ModelRegistry()
        self._requester = Requester(nc, subjects)
        mesh = EnsembleMesh(self._requester, self._registry)
        self.worker = Worker(
            nc,
            subjects,
            dataclasses.replace(options, role=ORCHESTRATOR, loaders={"ensemble": ensemble_loader(mesh)}),
        )

    @property
    def essential(self) -> tuple[EssentialTasks, ...]:
        """The worker's loops and the model view's watch: ensembles resolve their steps' versions
        in that view, so a dead watch would route them by a stale picture."""
        return (*self.worker.essential, self._registry.tasks)

    async def start(self) -> None:
        models_kv = await jetstream.ensure_bucket(
            self._nc.jetstream(), self._subjects.models_bucket, self.worker.storage
        )
        await self._registry.start(models_kv, recovery.reconnects_of(self._nc))
        await self._requester.start()
        await self.worker.start()

    async def stop(self) -> None:
        """The worker drains first: its ensembles still send steps while they finish. Safe after
        a partial start."""
        try:
            await self.worker.stop()
        finally:
            await self._requester.close()
            await self._registry.stop()
