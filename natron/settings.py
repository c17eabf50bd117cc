"""Settings of every `natron` process, parsed and validated once, at the edge.

One model per role (`natron serve`, `gateway`, `router`, `worker`, `ensemble`). A value comes
from, in order of precedence: the command line, a `NATRON_<FIELD>` environment variable
(`NATRON_HTTP_PORT=8000`, `NATRON_LOAD_MODEL=a,b`), the default here. A field's name is its
flag's name (`--repository-poll-secs` is `repository_poll_secs`), so the three spellings of a
setting never drift apart; where tritonserver spells the flag otherwise, TRITON_SPELLINGS holds
its spelling too. Durations and sizes carry their unit in their names.

A child of `natron serve` gets its settings whole, as JSON in `NATRON_SETTINGS_JSON`, validated
by the same model: a setting reaches it as the value its parent decided, not as a flag rebuilt
and parsed again, and no field of one role reaches another (an orchestrator has no cpu_threads).

This module is vocabulary: it imports nothing from the services, and reads the environment
only through pydantic-settings, when the command line asks it to.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar, get_args

from pydantic import AfterValidator, Field, FilePath, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "NATRON_"
# How `natron serve` hands a child its settings (see `settings_json`).
SETTINGS_ENV = "NATRON_SETTINGS_JSON"
DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
# NATS refuses a max_payload above 64 MiB.
MAX_PAYLOAD_LIMIT_MB = 64
# Gateway processes sharing one HTTP port: each takes a core, and past a few dozen the box's
# cores, not the count, are the limit.
MAX_HTTP_WORKERS = 64
# Model versions a worker loads at once (tritonserver's --model-load-thread-count); each takes a
# thread of the process's executor while it loads.
MAX_MODEL_LOAD_THREADS = 256

Port = Annotated[int, Field(ge=0, le=65535)]
PositiveSeconds = Annotated[float, Field(gt=0)]
LogLevel = Literal["debug", "info", "warning", "error"]
# Triton's --log-format: "default" is natron's own line, ISO8601 stamps it in UTC as Triton does.
LogFormat = Literal["default", "ISO8601"]
StorageKind = Literal["memory", "file"]
# The model store (broker/objects.py): where the router publishes each version's files, and
# where a worker takes them from (workers/model_cache.py).
ModelFilesStore = Literal["off", "memory", "file"]
ModelFilesMode = Literal["auto", "path", "store"]
ControlMode = Literal["none", "poll", "explicit"]

# What tritonserver calls a setting that natron names otherwise: the command line takes both
# spellings, and an error about the setting names both.
TRITON_SPELLINGS: dict[str, str] = {
    "shutdown_timeout_s": "--exit-timeout-secs",
    "http_workers": "--http-thread-count",
    "model_repository": "--model-store",
}


_NAME = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_DEVICE = re.compile(r"^(cpu|gpu:\S+)$")


def _name(text: str) -> str:
    # The prefix is a subject token, a stream name and part of bucket names.
    if not _NAME.match(text):
        raise ValueError("use letters, digits, '_' and '-' (at most 128)")
    return text


def _http_workers(count: int, info: ValidationInfo) -> int:
    # Port 0 would give each process a free port of its own instead of one port they share.
    if count > 1 and info.data.get("http_port") == 0:
        raise ValueError("several processes share one HTTP port: set --http-port to a port, not 0")
    return count


# Checked after http_port, which every model declares before it.
HttpWorkers = Annotated[
    int,
    Field(
        ge=1,
        le=MAX_HTTP_WORKERS,
        description="gateway processes sharing the HTTP port (SO_REUSEPORT), one core each",
    ),
    AfterValidator(_http_workers),
]


def _directories(paths: tuple[Path, ...]) -> tuple[Path, ...]:
    for path in paths:
        if not path.is_dir():
            raise ValueError(f"'{path}' is not a directory")
    resolved = tuple(path.resolve() for path in paths)
    if len(set(resolved)) < len(resolved):
        raise ValueError("a repository is named twice")
    return resolved


def _metrics_config(items: tuple[str, ...]) -> tuple[str, ...]:
    # Only the shape here; what each setting means is the metrics' business.
    for item in items:
        key, equals, value = item.partition("=")
        if not (key.strip() and equals and value.strip()):
            raise ValueError(f"'{item}': expected <setting>=<value>, as Triton's --metrics-config")
    return items


def _device(text: str) -> str:
    if not _DEVICE.match(text):
        raise ValueError("expected 'cpu', 'gpu:N' or 'gpu:<UUID>'")
    return text


# Every model and mixin below carries the same config: pydantic merges the configs of all
# bases, so a mixin with BaseSettings' own (no prefix) would undo the prefix.
_CONFIG = SettingsConfigDict(
    env_prefix=ENV_PREFIX,
    # A typo in a field name is an error, not a setting silently ignored.
    extra="forbid",
    frozen=True,
    # Compose interpolates an unset `${NATRON_X:-}` to "": that means the default.
    env_ignore_empty=True,
    # Triton's names start with "model_" (model_repository, model_control_mode).
    protected_namespaces=(),
)


class _Base(BaseSettings):
    """What every process has: the deployment's prefix, the log level, its supervisor."""

    model_config = _CONFIG
    # The `natron` subcommand this model configures.
    command: ClassVar[str]

    prefix: Annotated[str, AfterValidator(_name), Field(description="subject prefix of this deployment")] = (
        "natron"
    )
    log_level: Annotated[LogLevel, Field(description="one of debug, info, warning, error")] = "info"
    log_format: Annotated[
        LogFormat, Field(description="default (natron's, local time) or ISO8601 (UTC), as Triton's")
    ] = "default"
    parent_pid: Annotated[
        int | None, Field(gt=0, description="set by natron serve: stop once this process is gone")
    ] = None
    # The one shutdown budget (natron/cli/services.py): compose's stop_grace_period and Helm's
    # terminationGracePeriodSeconds are set longer (tests/mesh/test_deploy.py checks it).
    shutdown_timeout_s: Annotated[
        PositiveSeconds,
        Field(description="after SIGTERM, exit within this long (natron serve: each child's budget)"),
    ] = 25.0

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _any_case(cls, value: object, info: ValidationInfo) -> object:
        # INFO reads as info, iso8601 as ISO8601; anything else stays as given, so the error
        # quotes it verbatim.
        choices = get_args(LogLevel if info.field_name == "log_level" else LogFormat)
        if isinstance(value, str):
            for choice in choices:
                if value.lower() == choice.lower():
                    return choice
        return value


class _Storage(BaseSettings):
    """Where the mesh's JetStream state lives (broker/jetstream.py, Storage): every role has it,
    since whichever service needs the stream or a bucket first makes it."""

    model_config = _CONFIG

    jetstream_replicas: Annotated[
        int, Field(ge=1, le=5, description="replicas of the stream and buckets (3 on a 3-node cluster)")
    ] = 1


class _NatsClient(BaseSettings):
    """How a process proves its role to NATS and trusts it (broker/auth.py, docs/security.md).
    Paths only: a secret never travels in argv or the environment. Each must name a file that
    is there: a wrong path is refused at start with the flag, not when the connection opens."""

    model_config = _CONFIG

    nats_creds: Annotated[
        FilePath | None,
        Field(description="this role's NATS credentials: an nkey seed file (natron creds) or a .creds file"),
    ] = None
    nats_tls_ca: Annotated[
        FilePath | None, Field(description="CA bundle that signed the NATS server's certificate")
    ] = None
    nats_tls_cert: Annotated[
        FilePath | None, Field(description="TLS client certificate for NATS (servers that verify clients)")
    ] = None
    nats_tls_key: Annotated[FilePath | None, Field(description="the key of --nats-tls-cert")] = None


class CommonSettings(_NatsClient, _Storage, _Base):
    """A service alone, against a NATS server somewhere."""

    nats_url: Annotated[
        str, Field(min_length=1, description="the NATS server, or a cluster's comma-separated URLs")
    ] = DEFAULT_NATS_URL
    jetstream_storage: Annotated[
        StorageKind, Field(description="memory (lost when the broker restarts) or file (kept)")
    ] = "memory"


class _Repositories(BaseSettings):
    """Model repositories: the router's, `natron serve`'s and `natron push`'s."""

    model_config = _CONFIG

    # Several, as tritonserver's --model-repository is repeatable, scanned as one (a model
    # name in more than one of them is served from none); from the environment,
    # comma-separated.
    model_repository: Annotated[
        tuple[Path, ...],
        NoDecode,
        Field(min_length=1, description="a Triton model repository (repeatable)"),
        AfterValidator(_directories),
    ]

    @field_validator("model_repository", mode="before")
    @classmethod
    def _repositories(cls, value: object) -> object:
        if isinstance(value, Path):
            return (value,)
        if isinstance(value, str):
            return tuple(Path(part.strip()) for part in value.split(",") if part.strip())
        return value


class _Repository(_Repositories):
    """The model repositories and how their models are loaded: `natron serve`'s and the
    router's alike, as the router is the one that scans them."""

    model_config = _CONFIG

    model_control_mode: Annotated[
        ControlMode, Field(description="none (load all, fixed), poll (follow changes), explicit")
    ] = "none"
    repository_poll_secs: Annotated[
        float, Field(gt=0, description="poll mode: rescan the repository this often (seconds)")
    ] = 15.0
    # NoDecode: from the environment this is "a,b", not JSON.
    load_model: Annotated[
        tuple[str, ...], NoDecode, Field(description="explicit mode: load at start ('*' for all)")
    ] = ()
    upload_dir: Annotated[
        Path | None, Field(description="where files uploaded with a load request go (default: a temp dir)")
    ] = None
    # Uploaded files land on the router's disk: a load request may not fill it (router/uploads.py).
    max_upload_files: Annotated[
        int, Field(ge=1, le=1_000_000, description="files one load request may upload; more: 400")
    ] = 1000
    max_upload_mb: Annotated[
        int,
        Field(ge=1, le=1024 * 1024, description="decoded bytes one load request may upload (MiB); more: 413"),
    ] = 1024

    @field_validator("load_model", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(name.strip() for name in value.split(",") if name.strip())
        return value


class _Queues(BaseSettings):
    """The inference queues' policy: the router alone configures the stream and the consumers,
    so one value holds fleet-wide instead of the last worker started winning."""

    model_config = _CONFIG

    # Two heartbeats: a worker keeps what it holds alive every third of this, so only a dead
    # (or frozen) one lets it run out.
    ack_wait_s: Annotated[
        PositiveSeconds, Field(description="redeliver a dead worker's requests after this long")
    ] = 4.0


class _Drain(BaseSettings):
    model_config = _CONFIG

    drain_timeout_s: Annotated[
        PositiveSeconds,
        Field(description="on stop, finish what is held for at most this long (within the shutdown budget)"),
    ] = 20.0


class _Compute(BaseSettings):
    model_config = _CONFIG

    cpu_threads: Annotated[
        int, Field(ge=0, description="intra-op threads per CPU model instance (0: framework default)")
    ] = 0
    throttle_ms: Annotated[
        float, Field(ge=0, description="testing aid: sleep this long after each batch")
    ] = 0.0
    model_load_thread_count: Annotated[
        int, Field(ge=1, le=MAX_MODEL_LOAD_THREADS, description="model versions a worker loads at once")
    ] = 4


class _Front(BaseSettings):
    """What a gateway serves, and where: the flags a gateway shares with Triton's server."""

    model_config = _CONFIG

    http_address: Annotated[str, Field(min_length=1, description="address the HTTP server binds")] = "0.0.0.0"
    http_port: Annotated[Port, Field(description="KServe v2 / Triton HTTP port")] = 8000
    allow_http: Annotated[bool, Field(description="serve HTTP (and WebSocket) on --http-port")] = True
    grpc_address: Annotated[str, Field(min_length=1, description="address the gRPC server binds")] = "0.0.0.0"
    grpc_port: Annotated[Port, Field(description="KServe v2 / Triton gRPC port")] = 8001
    allow_grpc: Annotated[bool, Field(description="serve Triton's gRPC protocol on --grpc-port")] = True
    allow_metrics: Annotated[bool, Field(description="serve Prometheus metrics on --metrics-port")] = True
    # NoDecode: from the environment this is whitespace-separated, as a value may hold commas
    # (Triton's summary_quantiles=0.5:0.05,0.9:0.01).
    metrics_config: Annotated[
        tuple[str, ...],
        NoDecode,
        AfterValidator(_metrics_config),
        Field(description="a metrics setting, <setting>=<value>, as Triton's (repeatable)"),
    ] = ()
    strict_readiness: Annotated[
        bool, Field(description="ready only once every model has settled and a worker is live")
    ] = True
    # Triton's trace settings (natron/tracesettings.py `startup` reads them; natron/cli/main.py
    # checks them at the edge): the triton mode's file, and defaults the trace API may change.
    # NoDecode: from the environment, whitespace-separated, as a value holds commas.
    trace_config: Annotated[
        tuple[str, ...],
        NoDecode,
        Field(
            description="a trace setting, as Triton's: triton,file=PATH, triton,log-frequency=N, "
            "level=TIMESTAMPS, rate=N, count=N (repeatable)"
        ),
    ] = ()
    # With more than one, `natron gateway` supervises that many gateway processes; each of them
    # has its place in http_worker_index (see natron/cli/services.py). After http_port, which
    # its check reads.
    http_workers: HttpWorkers = 1
    # Triton's restricted API groups (natron/restricted_api.py reads them; natron/cli/main.py
    # checks them at the edge). NoDecode: from the environment, whitespace-separated, as a
    # value holds commas.
    http_restricted_api: Annotated[
        tuple[str, ...],
        NoDecode,
        Field(
            description="<group>[,<group>...]:<key>=<value>: those HTTP APIs need that header (repeatable)"
        ),
    ] = ()
    grpc_restricted_protocol: Annotated[
        tuple[str, ...],
        NoDecode,
        Field(
            description="<group>[,<group>...]:<key>=<value>: those gRPC methods need the metadata "
            "triton-grpc-protocol-<key> (repeatable)"
        ),
    ] = ()
    allow_code_upload: Annotated[
        bool,
        Field(
            description="take a load whose uploaded files hold code (.py, .so, a python-backend "
            "model) without model-repository being restricted"
        ),
    ] = False
    # Slow and idle clients (docs/security.md): each connection costs a file descriptor and
    # memory, so none is held open for ever by a client that sends nothing.
    http_keepalive_timeout_s: Annotated[
        PositiveSeconds,
        Field(description="close an HTTP connection idle this long between requests (gRPC: with no call)"),
    ] = 75.0
    http_request_read_timeout_s: Annotated[
        PositiveSeconds,
        Field(
            description="close a connection whose request head is not in within this long, or whose "
            "body stalls this long (gRPC: its handshake)"
        ),
    ] = 30.0
    http_max_connections: Annotated[
        int,
        Field(ge=1, le=1_000_000, description="open HTTP connections per gateway process; past it, 503"),
    ] = 10_000

    @field_validator(
        "metrics_config", "trace_config", "http_restricted_api", "grpc_restricted_protocol", mode="before"
    )
    @classmethod
    def _split_words(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(value.split())
        return value


class _InputLimits(BaseSettings):
    """Bounds on one infer request beyond its body size (gateway/kserve.py, InputLimits):
    each 400 names its flag."""

    model_config = _CONFIG

    max_tensor_elements: Annotated[
        int, Field(ge=1, description="elements one input tensor may have (its shape's product); more: 400")
    ] = 1 << 28
    max_bytes_element_mb: Annotated[
        int, Field(ge=1, le=4096, description="bytes one BYTES element may hold (MiB); longer: 400")
    ] = 64
    # 1024 is orjson's own ceiling for any JSON: deeper is invalid JSON whatever this says.
    max_json_depth: Annotated[
        int, Field(ge=1, le=1024, description="nesting of an input's JSON 'data' arrays; deeper: 400")
    ] = 1024


class GatewaySettings(_InputLimits, _Front, CommonSettings):
    command: ClassVar[str] = "gateway"

    metrics_port: Annotated[Port, Field(description="the fleet's Prometheus metrics; 0: none")] = 0
    default_timeout_s: Annotated[
        PositiveSeconds, Field(description="a request's deadline when it names none")
    ] = 60.0
    max_body_mb: Annotated[
        int, Field(ge=1, le=1024, description="larger HTTP bodies are refused with 413 (MiB)")
    ] = 64
    http_worker_index: Annotated[
        int | None,
        Field(ge=0, description="set by the process that starts the gateway processes: this one's place"),
    ] = None

    @field_validator("http_worker_index")
    @classmethod
    def _within_workers(cls, index: int | None, info: ValidationInfo) -> int | None:
        workers = info.data.get("http_workers", 1)
        if index is not None and index >= workers:
            raise ValueError(f"must be below http_workers ({workers})")
        return index


class RouterSettings(_Queues, _Repository, CommonSettings):
    command: ClassVar[str] = "router"

    metrics_port: Annotated[Port, Field(description="the router's own metrics; 0: none")] = 0
    model_files_store: Annotated[
        ModelFilesStore,
        Field(
            description="publish each version's files to the model store with this storage, for workers "
            "without the repository; off: workers read the repository's folders"
        ),
    ] = "file"


class WorkerSettings(_Compute, _Drain, CommonSettings):
    command: ClassVar[str] = "worker"

    worker_id: Annotated[
        str | None, Field(min_length=1, description="unique in the fleet (default: worker-<random>)")
    ] = None
    device: Annotated[
        str,
        AfterValidator(_device),
        Field(description="'cpu', 'gpu:N' or 'gpu:<UUID>' (GPU or MIG slice)"),
    ] = "cpu"
    metrics_port: Annotated[Port, Field(description="this worker's own metrics; 0: none")] = 0
    model_files: Annotated[
        ModelFilesMode,
        Field(
            description="where a version's files come from: auto (the repository's folder where this host "
            "has it, else the model store), path (the folder only), store (the store only)"
        ),
    ] = "auto"
    model_cache_dir: Annotated[
        Path | None, Field(description="the model store's files on this host (default: a temp dir)")
    ] = None
    model_cache_gb: Annotated[
        float, Field(gt=0, description="bound of the model cache (GiB); versions in use are never evicted")
    ] = 32.0
    system_shm: Annotated[
        Literal["auto", "off"],
        Field(
            description="auto: map clients' system shared memory regions of this host, so that its gateways "
            "send those tensors by reference; off: never map clients' memory (gateways carry the bytes)"
        ),
    ] = "auto"


class OrchestratorSettings(_Drain, CommonSettings):
    """The ensemble orchestrator: chains other models, computes nothing itself, so it has no
    device, threads or throttle."""

    command: ClassVar[str] = "ensemble"

    worker_id: Annotated[
        str | None, Field(min_length=1, description="unique in the fleet (default: worker-<random>)")
    ] = None
    metrics_port: Annotated[Port, Field(description="the orchestrator's own metrics; 0: none")] = 0


class ServeSettings(
    _NatsClient, _InputLimits, _Front, _Compute, _Drain, _Queues, _Repository, _Storage, _Base
):
    """`natron serve`. With the embedded broker, --nats-tls-cert/--nats-tls-key are its server
    certificate (and --nats-tls-ca what its services trust, the certificate itself by default);
    with --nats-url, the --nats-* files are every service's, as a single service's."""

    command: ClassVar[str] = "serve"

    nats_url: Annotated[
        str | None,
        Field(min_length=1, description="this NATS server or cluster (default: an embedded one)"),
    ] = None
    nats_port: Annotated[Port, Field(description="port of the embedded NATS server (a cluster's first)")] = (
        4222
    )
    nats_listen: Annotated[
        str,
        Field(
            min_length=1,
            description="address the embedded NATS server binds (0.0.0.0 for services on other hosts)",
        ),
    ] = "127.0.0.1"
    nats_creds_dir: Annotated[
        Path | None,
        Field(
            description="where the embedded NATS server's per-role credentials are kept (made when missing; "
            "default: a private temporary directory)"
        ),
    ] = None
    nats_cluster: Annotated[
        int,
        Field(
            ge=1, le=5, description="embedded NATS servers, as one JetStream cluster (3 survives one loss)"
        ),
    ] = 1
    jetstream_storage: Annotated[
        StorageKind | None,
        Field(description="memory or file (default: file with --jetstream-dir, else memory)"),
    ] = None
    jetstream_dir: Annotated[
        Path | None, Field(description="where the embedded NATS server keeps JetStream's files")
    ] = None
    max_payload_mb: Annotated[
        int,
        Field(ge=1, le=MAX_PAYLOAD_LIMIT_MB, description="NATS max_payload and the largest HTTP body (MiB)"),
    ] = 16
    metrics_port: Annotated[Port, Field(description="Prometheus metrics port")] = 8002
    workers: Annotated[int, Field(ge=1, le=1024, description="CPU worker processes (without a GPU)")] = 1
    ready_timeout_s: Annotated[
        PositiveSeconds, Field(description="print the model table once settled, or after this long")
    ] = 120.0


class PushSettings(_Repositories, CommonSettings):
    """`natron push REPO`: a repository's model files into the model store, as a router
    publishes them."""

    command: ClassVar[str] = "push"

    model_files_store: Annotated[
        StorageKind, Field(description="storage of the model store's bucket, when this makes it")
    ] = "file"


RoleSettings = (
    GatewaySettings | RouterSettings | WorkerSettings | OrchestratorSettings | ServeSettings | PushSettings
)
ROLES: dict[str, type[RoleSettings]] = {
    model.command: model
    for model in (
        ServeSettings,
        GatewaySettings,
        RouterSettings,
        WorkerSettings,
        OrchestratorSettings,
        PushSettings,
    )
}

S = TypeVar("S", bound=_Base)


class SettingsError(ValueError):
    """Invalid settings; the message names each field, its value and where it can be set."""


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def _shown(value: object) -> str:
    """A value as given: a path or a list of them as text, not as Python's PosixPath(...)."""
    if isinstance(value, tuple | list):
        return "(" + ", ".join(_shown(item) for item in value) + ")"
    return repr(str(value) if isinstance(value, Path) else value)


def describe(error: ValidationError) -> str:
    """One line per invalid field: its name, the value given, why, and its flags and variable."""
    lines = []
    for item in error.errors():
        # A list's item is located by its index too (model_repository.1): the field is first.
        field = str(item["loc"][0]) if item["loc"] else "settings"
        triton = f"; tritonserver's {TRITON_SPELLINGS[field]}" if field in TRITON_SPELLINGS else ""
        where = f"({flag_name(field)} or {env_name(field)}{triton})"
        if item["type"] == "missing":
            lines.append(f"{field} is required {where}")
        elif item["type"] == "extra_forbidden":
            lines.append(f"{field}={_shown(item['input'])}: no such setting")
        else:
            # pydantic words a ValueError raised here as "Value error, <why>".
            why = item["msg"].removeprefix("Value error, ")
            lines.append(f"{field}={_shown(item['input'])}: {why} {where}")
    return "; ".join(lines)


def exactly(model: type[S], values: Mapping[str, Any]) -> S:
    """`model` from `values` and its defaults alone, never from the environment: every field is
    given, so no `NATRON_*` variable can fill one in. How a parent builds a child's settings,
    and how the child reads them back."""
    given = {
        name: field.get_default(call_default_factory=True)
        for name, field in model.model_fields.items()
        if not field.is_required()
    }
    given.update(values)
    try:
        return model(**given)
    except ValidationError as exc:
        raise SettingsError(f"invalid {model.command} settings: {describe(exc)}") from exc


def load(model: type[S], flags: Mapping[str, Any], settings_json: str | None = None) -> S:
    """The settings of one process: `flags` (the command line's, only those given) over
    `NATRON_*` variables over defaults; or, in a child of `natron serve`, `flags` over the
    whole settings its parent sent in `settings_json` (the environment then plays no part)."""
    if settings_json is not None:
        try:
            sent = json.loads(settings_json)
        except json.JSONDecodeError as exc:
            raise SettingsError(f"{SETTINGS_ENV} is not JSON: {exc}") from exc
        if not isinstance(sent, dict):
            raise SettingsError(f"{SETTINGS_ENV} is not a JSON object")
        return exactly(model, {**sent, **flags})
    try:
        return model(**flags)
    except ValidationError as exc:
        raise SettingsError(f"invalid {model.command} settings: {describe(exc)}") from exc


def settings_json(settings: _Base) -> str:
    """What a parent puts in `NATRON_SETTINGS_JSON` for a child: every field, explicitly."""
    return settings.model_dump_json()
