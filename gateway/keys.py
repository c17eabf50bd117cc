"""The gateway's settings and the typed keys of its app state, in a module of their own so that
every handler module reads them without importing the app that registers the handlers."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web
from nats.aio.client import Client

from broker.auth import ClientAuth
from broker.jetstream import Storage
from broker.requester import Requester
from broker.subjects import Subjects
from broker.view import ModelRegistry, ModelView
from gateway.fleet import FleetView
from gateway.kserve import DEFAULT_LIMITS, InputLimits
from gateway.metrics import GatewayMetrics
from natron.tasks import EssentialTasks
from natron.tracesettings import TraceSettings


@dataclass(slots=True, frozen=True)
class GatewayOptions:
    nats_url: str
    # Its identity on the broker (broker/auth.py).
    nats_auth: ClientAuth | None = None
    subjects: Subjects = Subjects()
    default_timeout_s: float = 60.0
    # HTTP bodies above this are refused with 413 before being read whole.
    max_body_bytes: int = 64 * 1024 * 1024
    # Bounds on an infer request's tensors beyond its size (gateway/kserve.py).
    limits: InputLimits = DEFAULT_LIMITS
    # A load answers once every placed worker has the model READY: loads can take minutes.
    control_timeout_s: float = 600.0
    # Ready (HTTP /v2/health/ready, gRPC ServerReady) only once the models settled and a
    # worker is live, as Triton's --strict-readiness; False: once connected and synced.
    strict_readiness: bool = True
    # Where the stream and buckets live when this gateway is the first to need them.
    storage: Storage = field(default_factory=Storage)
    # Its trace settings from its command line (--trace-config): its trace file, and the
    # defaults until the deployment's are set (gateway/tracing.py).
    trace: TraceSettings = field(default_factory=TraceSettings)


NATS: web.AppKey[Client] = web.AppKey("nats", Client)
REQUESTER: web.AppKey[Requester] = web.AppKey("requester", Requester)
REGISTRY: web.AppKey[ModelRegistry] = web.AppKey("registry", ModelRegistry)
OPTIONS: web.AppKey[GatewayOptions] = web.AppKey("options", GatewayOptions)
METRICS: web.AppKey[GatewayMetrics] = web.AppKey("metrics", GatewayMetrics)
FLEET: web.AppKey[FleetView] = web.AppKey("fleet", FleetView)
# The gateway's own essential loops (the broker-state watch); the views own theirs.
GATEWAY_TASKS: web.AppKey[EssentialTasks] = web.AppKey("gateway-tasks", EssentialTasks)


def model_view(request: web.Request) -> tuple[ModelView, str]:
    """The model the URL names (404 when unknown) and the version it asks for ("" for none)."""
    view = request.app[REGISTRY].get(request.match_info["model"])
    return view, request.match_info.get("version", "")
