"""Who may do what on the broker: one NATS identity per role, each with only the subjects its
job needs (docs/security.md has the threat model and the table in words).

Identities are NATS nkeys: the server's configuration holds only public keys, a process proves
its identity by signing the server's nonce with its seed, and no secret crosses the network. A
seed lives in a file of its own, mode 0600, in a directory of mode 0700; nothing puts it in argv,
the environment or a log. A deployment with its own NATS accounts (operator mode, `nsc`) passes
a `.creds` file instead; both are read by nats-py.

The permissions follow the mesh's data path (docs/design.md):
- a client publishes inference requests and cancellations, reads the model records, and receives
  answers on its own inboxes, never on the services';
- a gateway is a client that also sends control requests, registers shared memory, sets the
  shared log and trace settings, and asks the workers for their statistics;
- a worker takes work from the inference consumers, answers on the requesters' inboxes, writes
  its report, reads model records and model files, and (Python models calling other models) is
  a client too;
- the orchestrator is a worker that computes nothing and holds no model files;
- the router is the control plane: streams, consumers, model records, model files, control;
- admin: everything, for operators' tools and the test suite.

Each service's private inboxes (the answers to its requests, JetStream's replies) live under
`_INBOX.<prefix>.<role>.`: nobody else may subscribe there, so no role reads another's answers.
"""

from __future__ import annotations

import contextlib
import json
import os
import ssl
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, Protocol, get_args

import nkeys

from broker.subjects import Subjects

Role = Literal["router", "gateway", "worker", "orchestrator", "client", "admin"]
ROLES: Final[tuple[Role, ...]] = get_args(Role)
SERVICE_ROLES: Final[tuple[Role, ...]] = ("router", "gateway", "worker", "orchestrator")

_SEED_SUFFIX = ".nk"
# NATS's spelling of the two kinds of credentials a file may hold.
_JWT_MARK = "-----BEGIN NATS USER JWT-----"
_USER_SEED_PREFIX = "SU"


# -- permissions ------------------------------------------------------------------------------


def private_inbox(subjects: Subjects, role: Role) -> str:
    """The prefix of a service's own inboxes: nats-py's `inbox_prefix` for its connection, under
    which its requester's answer inbox lives too."""
    return subjects.inbox(role)


def _read_bucket(subjects: Subjects, bucket: str) -> list[str]:
    """Read a KV bucket or object store `bucket` (its stream's name): look it up, get a key, and
    watch it (an ordered consumer, created and deleted by the reader)."""
    return [
        f"$JS.API.STREAM.INFO.{bucket}",
        f"$JS.API.DIRECT.GET.{bucket}",
        f"$JS.API.DIRECT.GET.{bucket}.>",
        f"$JS.API.STREAM.MSG.GET.{bucket}",
        f"$JS.API.CONSUMER.CREATE.{bucket}",
        f"$JS.API.CONSUMER.CREATE.{bucket}.>",
        f"$JS.API.CONSUMER.DELETE.{bucket}.>",
        f"$JS.API.CONSUMER.INFO.{bucket}.>",
    ]


def _create_stream(name: str) -> list[str]:
    """Any service may come up first, so the ones that need a stream or bucket make it when it is
    missing (broker/jetstream.py ensure_*): creating a stream by its exact name, never updating,
    purging or deleting one."""
    return [f"$JS.API.STREAM.CREATE.{name}", f"$JS.API.STREAM.INFO.{name}"]


def _kv(bucket: str) -> str:
    return f"KV_{bucket}"


def _requester(subjects: Subjects) -> list[str]:
    """What publishing inference requests takes: the request (its JetStream acknowledgement comes
    to the requester's inbox) and the cancellation of one whose client went away."""
    return [subjects.infer_all, subjects.cancel_all]


def _settings_followers(subjects: Subjects) -> list[str]:
    # broker/shared_settings.py: the log and trace settings' broadcasts, and their bucket.
    return [subjects.ctl("logging"), subjects.ctl("trace")]


def _answers() -> list[str]:
    """Where a worker answers: the requester's inbox named in the request's header. Any inbox,
    since clients choose theirs; the answer can only be one to a request the broker delivered
    it, which only a requester could publish."""
    return ["_INBOX.>"]


def _queue_taker(subjects: Subjects) -> list[str]:
    """Taking work from the inference consumers: pull, look the consumer up, acknowledge."""
    stream = subjects.stream
    return [
        f"$JS.API.CONSUMER.MSG.NEXT.{stream}.>",
        f"$JS.API.CONSUMER.INFO.{stream}.>",
        f"$JS.ACK.{stream}.>",
    ]


def permissions(role: Role, subjects: Subjects, report_key: str | None = None) -> dict[str, Any]:
    """nats-server's `permissions` block for `role`. Answers to core requests (control, the
    statistics query) go out through `allow_responses`: a role may answer only what it was
    asked, on the asker's reply subject. A worker or orchestrator with a `report_key` (an
    identity of its own, see `ensure_worker_credentials`) writes that key of the workers bucket
    alone; without one, any."""
    models, workers, shm = _kv(subjects.models_bucket), _kv(subjects.workers_bucket), _kv(subjects.shm_bucket)
    settings = _kv(subjects.settings_bucket)
    files = f"OBJ_{subjects.files_bucket}"
    own_inbox = f"{private_inbox(subjects, role)}.>"
    flow_control = "$JS.FC.>"  # ordered consumers (bucket watches) answer the broker's flow control
    publish: list[str]
    subscribe: list[str]
    deny_publish: list[str] = []
    deny_subscribe: list[str] = []
    if role == "admin":
        return {"publish": {"allow": [">"]}, "subscribe": {"allow": [">"]}, "allow_responses": True}
    if role == "client":
        # A client's inboxes are its own choice (nats-py's default `_INBOX.<random>`), so it may
        # subscribe under `_INBOX.` but never where the services receive.
        publish = [*_requester(subjects), *_read_bucket(subjects, models), flow_control]
        subscribe = ["_INBOX.>"]
        deny_subscribe = [subjects.all_inboxes]
    elif role == "gateway":
        publish = [
            *_requester(subjects),
            subjects.ctl(">"),  # load/unload/index requests, statistics queries, settings broadcasts
            f"$KV.{subjects.shm_bucket}.>",
            f"$KV.{subjects.settings_bucket}.>",
            *_create_stream(subjects.stream),
            f"$JS.API.CONSUMER.INFO.{subjects.stream}.>",  # queue depths
            *[
                s
                for b in (models, workers, shm, settings)
                for s in (*_create_stream(b), *_read_bucket(subjects, b))
            ],
            flow_control,
        ]
        subscribe = [own_inbox, *_settings_followers(subjects)]
    elif role in ("worker", "orchestrator"):
        publish = [
            *_queue_taker(subjects),
            *_answers(),
            *_requester(subjects),  # Python models' and ensembles' requests to other models
            f"$KV.{subjects.workers_bucket}.{report_key or '>'}",
            *_create_stream(subjects.stream),
            *[
                s
                for b in (models, workers, settings)
                for s in (*_create_stream(b), *_read_bucket(subjects, b))
            ],
            flow_control,
        ]
        if role == "worker":
            publish += _read_bucket(subjects, files)
        # Answers go to requesters; the router's inboxes hold its JetStream replies, which no
        # worker may forge.
        deny_publish = [f"{private_inbox(subjects, 'router')}.>"]
        subscribe = [
            own_inbox,
            subjects.cancel_all,
            subjects.stats_query,
            *_settings_followers(subjects),
        ]
    else:  # router: the control plane owns the streams, consumers, records and files
        publish = [
            "$JS.API.>",
            f"$KV.{subjects.models_bucket}.>",
            f"$KV.{subjects.workers_bucket}.>",
            f"$O.{subjects.files_bucket}.>",
            flow_control,
        ]
        subscribe = [own_inbox, subjects.ctl("load"), subjects.ctl("unload"), *_settings_followers(subjects)]
    block: dict[str, Any] = {
        "publish": {"allow": publish},
        "subscribe": {"allow": subscribe},
        "allow_responses": True,
    }
    if deny_publish:
        block["publish"]["deny"] = deny_publish
    if deny_subscribe:
        block["subscribe"]["deny"] = deny_subscribe
    return block


def authorization_block(
    public_keys: dict[Role, str], subjects: Subjects, reporters: dict[str, tuple[Role, str]] | None = None
) -> str:
    """The `authorization` section of nats-server's configuration: one nkey user per role, and
    one per worker with an identity of its own (`reporters`: worker id -> its role and public
    key), which writes only its own report. (nats-server's configuration format reads JSON.)"""
    users = [{"nkey": key, "permissions": permissions(role, subjects)} for role, key in public_keys.items()]
    users += [
        {"nkey": key, "permissions": permissions(role, subjects, report_key=worker_id)}
        for worker_id, (role, key) in (reporters or {}).items()
    ]
    return "authorization " + json.dumps({"users": users}, indent=1)


# -- credentials ------------------------------------------------------------------------------


def seed_path(directory: Path, role: Role) -> Path:
    return directory / f"{role}{_SEED_SUFFIX}"


def _private_directory(directory: Path) -> None:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    mode = stat.S_IMODE(directory.stat().st_mode)
    if mode & 0o077:
        directory.chmod(0o700)


def ensure_credentials(directory: Path, roles: tuple[Role, ...] = ROLES) -> dict[Role, str]:
    """Each role's nkey seed in `directory` (kept when it is there, so services started with an
    earlier run's files still connect; made otherwise), and its public key."""
    _private_directory(directory)
    keys: dict[Role, str] = {}
    for role in roles:
        path = seed_path(directory, role)
        if not path.exists():
            _write_seed(path)
        keys[role] = public_key(path)
    return keys


def worker_seed_path(directory: Path, worker_id: str) -> Path:
    return directory / "workers" / f"{worker_id}{_SEED_SUFFIX}"


def ensure_worker_credentials(directory: Path, worker_ids: list[str]) -> dict[str, str]:
    """An identity for each of `worker_ids` (kept or made as `ensure_credentials` does), under
    `directory/workers`; worker id -> public key. A worker that has one cannot write another's
    report (`natron serve` gives each of its workers one; a fleet scaled by an orchestrator
    shares the worker role's)."""
    keys: dict[str, str] = {}
    _private_directory(directory / "workers")
    for worker_id in worker_ids:
        if "/" in worker_id or worker_id.startswith("."):
            raise ValueError(f"worker id {worker_id!r} cannot name a credentials file")
        path = worker_seed_path(directory, worker_id)
        if not path.exists():
            _write_seed(path)
        keys[worker_id] = public_key(path)
    return keys


def _write_seed(path: Path) -> None:
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    # Created 0600 from the start: never readable by others, not even for a moment.
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(seed + b"\n")


def public_key(path: Path) -> str:
    seed = path.read_bytes().strip()
    pair = nkeys.from_seed(bytearray(seed))
    try:
        return str(pair.public_key.decode())
    finally:
        with contextlib.suppress(Exception):
            pair.wipe()


class NatsClientSettings(Protocol):
    """The --nats-creds and --nats-tls-* settings every role has (natron/settings.py)."""

    @property
    def nats_creds(self) -> Path | None: ...
    @property
    def nats_tls_ca(self) -> Path | None: ...
    @property
    def nats_tls_cert(self) -> Path | None: ...
    @property
    def nats_tls_key(self) -> Path | None: ...


@dataclass(slots=True, frozen=True)
class ClientAuth:
    """How a service proves who it is, and trusts the broker: a credentials file (an nkey seed
    that `natron serve` or `natron creds` made, or a NATS `.creds` file), and TLS files."""

    creds: Path | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None

    @classmethod
    def of(cls, settings: NatsClientSettings) -> ClientAuth:
        """The files a process's settings name."""
        return cls(settings.nats_creds, settings.nats_tls_ca, settings.nats_tls_cert, settings.nats_tls_key)

    def paths(self) -> dict[str, str]:
        """The file paths, to hand to a child process (never the secrets themselves)."""
        return {name: str(getattr(self, name)) for name in self.__slots__ if getattr(self, name) is not None}

    @classmethod
    def from_paths(cls, paths: dict[str, str]) -> ClientAuth:
        return cls(**{name: Path(paths[name]) for name in cls.__slots__ if name in paths})

    def connect_options(self) -> dict[str, Any]:
        """nats-py's `connect` keyword arguments."""
        options: dict[str, Any] = {}
        if self.creds is not None:
            text = self.creds.read_text(errors="replace")
            if _JWT_MARK in text:
                options["user_credentials"] = str(self.creds)
            elif text.strip().startswith(_USER_SEED_PREFIX):
                options["nkeys_seed"] = str(self.creds)
            else:
                raise ValueError(
                    f"{self.creds}: not a NATS credentials file (an nkey user seed 'SU...' or a .creds file)"
                )
        if self.tls_ca is not None or self.tls_cert is not None:
            context = ssl.create_default_context(cafile=str(self.tls_ca) if self.tls_ca else None)
            if self.tls_cert is not None:
                context.load_cert_chain(str(self.tls_cert), str(self.tls_key) if self.tls_key else None)
            options["tls"] = context
        return options
