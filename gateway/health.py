"""Server readiness (HTTP /v2/health/ready, gRPC ServerReady), as Triton's --strict-readiness.

Strict (the default): ready once this gateway is connected to NATS and has synced its views, at
least one worker (not an orchestrator, not stopping) is live, and every model the router has
published has settled (natron/records.py `ModelRecord.settled`):

- a version READY, or UNAVAILABLE with a reason (it failed for good: a broken config, files or
  a backend that fail to load, an instance_group no worker can take), has settled; so has a
  version UNLOADING (on its way out: nothing to wait for) and a model not loaded (explicit
  mode): with nothing loaded, the server is ready once a worker is live;
- a version LOADING has not, nor one UNAVAILABLE only because no worker, or for an ensemble no
  orchestrator, has joined that could take it: that waits for the fleet, it has not failed. So
  a repository with ensembles is ready only once an orchestrator (`natron ensemble`) serves them;
- a model reloading over one that serves stays READY throughout (the previous model serves),
  and so does one whose reload failed: a reload never takes the server out of readiness.

Triton's strict readiness stays unready while any model failed; here a failed model has settled,
so one bad model in a repository does not keep the others out of service. A gateway that starts
before the router has published the repository knows of no model yet and, like Triton with an
empty repository, counts as ready once a worker is live; `natron serve` waits for the
repository's models itself before it prints their table.

Not strict: ready once connected to NATS and the model view is synced.
"""

from __future__ import annotations

from aiohttp import web

from gateway.keys import FLEET, NATS, OPTIONS, REGISTRY
from natron.records import WORKER

# How many unsettled models a 503's reason names before it says "and N more".
_NAMED_AT_MOST = 5


def not_ready_reason(app: web.Application) -> str | None:
    """None when the server is ready; else why not, for the 503's body."""
    if not app[NATS].is_connected:
        return "the gateway is not connected to NATS"
    registry = app[REGISTRY]
    if not registry.synced.is_set():
        return "the gateway has not synced the model view yet"
    if not app[OPTIONS].strict_readiness:
        return None
    fleet = app[FLEET]
    if not fleet.synced.is_set():
        return "the gateway has not synced the fleet view yet"
    if not any(w.role == WORKER and not w.stopping for w in fleet.workers):
        return "no live worker has joined"
    waiting = [view.record.name for view in registry.all() if not view.record.settled()]
    if not waiting:
        return None
    named = ", ".join(f"'{name}'" for name in waiting[:_NAMED_AT_MOST])
    more = f" and {len(waiting) - _NAMED_AT_MOST} more" if len(waiting) > _NAMED_AT_MOST else ""
    return f"models not settled yet (loading, or waiting for a worker): {named}{more}"
