"""The broker refuses what each role has no business doing (broker/auth.py, docs/security.md):
the attacks of an outsider on the network, and of a client or a worker overstepping its role,
against a real `natron serve` whose embedded nats-server enforces the roles."""

from __future__ import annotations

import asyncio
import os
import shutil
import ssl
import stat
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import nats
import pytest
import requests
from nats.aio.client import Client
from nats.errors import NoServersError

from broker.auth import ROLES, Role, seed_path
from broker.subjects import Subjects
from tests.harness import Served, child_processes, natron_serve, wait_until_async

pytestmark = pytest.mark.mesh

SUBJECTS = Subjects()
TINY = {"inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": [1.0] * 16}]}
VIOLATION_WAIT_S = 10.0


class Connection:
    """A connection as `role`, with the errors the server sent it (permission violations come
    back asynchronously, as -ERR lines)."""

    def __init__(self) -> None:
        self.nc: Client | None = None
        self.errors: list[str] = []

    async def violation(self, subject: str) -> str:
        """The server's refusal naming `subject`; fails the test if none comes."""

        def found() -> str | None:
            # nats-py reports the server's -ERR in lower case.
            wanted = subject.lower()
            return next(
                (e for e in self.errors if "permissions violation" in e.lower() and wanted in e), None
            )

        await wait_until_async(lambda: found() is not None, VIOLATION_WAIT_S, f"a violation for {subject}")
        message = found()
        assert message is not None
        return message


@asynccontextmanager
async def connected(served: Served, role: Role) -> AsyncIterator[tuple[Client, Connection]]:
    connection = Connection()

    async def on_error(exc: Exception) -> None:
        connection.errors.append(str(exc))

    nc = await nats.connect(
        served.nats_url, error_cb=on_error, allow_reconnect=False, **served.nats_options(role)
    )
    connection.nc = nc
    try:
        yield nc, connection
    finally:
        await nc.close()


def infer_ok(served: Served) -> None:
    response = requests.post(f"{served.url}/v2/models/tiny/infer", json=TINY, timeout=30)
    assert response.status_code == 200, response.text


async def test_a_connection_without_credentials_is_refused(served: Served) -> None:
    with pytest.raises((NoServersError, nats.errors.Error, OSError)) as caught:
        await nats.connect(
            served.nats_url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=3
        )
    assert "authorization" in repr(caught.value).lower() or isinstance(caught.value, NoServersError)


async def test_a_seed_the_broker_does_not_know_is_refused(served: Served, tmp_path: Path) -> None:
    import nkeys

    stranger = tmp_path / "stranger.nk"
    stranger.write_bytes(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER))
    with pytest.raises((NoServersError, nats.errors.Error, OSError)):
        await nats.connect(
            served.nats_url, nkeys_seed=str(stranger), allow_reconnect=False, max_reconnect_attempts=0
        )


async def test_a_client_cannot_read_the_inference_traffic(served: Served) -> None:
    async with connected(served, "client") as (nc, connection):
        seen: list[str] = []

        async def collect(msg: Any) -> None:
            seen.append(msg.subject)

        await nc.subscribe(SUBJECTS.infer_all, cb=collect)
        await nc.subscribe(f"{SUBJECTS.prefix}.>", cb=collect)
        await nc.flush()
        await connection.violation(SUBJECTS.infer_all)
        await asyncio.to_thread(infer_ok, served)
        await asyncio.sleep(0.5)
        assert seen == []


async def test_a_client_cannot_read_the_answers_on_the_services_inboxes(served: Served) -> None:
    async with connected(served, "client") as (nc, _):
        seen: list[str] = []

        async def collect(msg: Any) -> None:
            seen.append(msg.subject)

        await nc.subscribe("_INBOX.>", cb=collect)  # allowed: a client's own inboxes live there
        await nc.flush()
        for _ in range(3):
            await asyncio.to_thread(infer_ok, served)
        await asyncio.sleep(0.5)
        # The gateway's answers went to _INBOX.natron.gateway.…, which this client is denied.
        assert not [s for s in seen if s.startswith(f"_INBOX.{SUBJECTS.prefix}.")], seen


async def test_a_client_cannot_forge_answers_to_the_gateway(served: Served) -> None:
    async with connected(served, "client") as (nc, connection):
        target = f"_INBOX.{SUBJECTS.prefix}.gateway.forged.1"
        await nc.publish(target, b"forged answer")
        await nc.flush()
        await connection.violation(target)
    await asyncio.to_thread(infer_ok, served)


@pytest.mark.parametrize("role", ["client", "gateway", "worker"])
async def test_only_the_router_may_write_model_records(served: Served, role: Role) -> None:
    subject = f"$KV.{SUBJECTS.models_bucket}.tiny"
    async with connected(served, role) as (nc, connection):
        await nc.publish(subject, b'{"name": "tiny", "forged": true}')
        await nc.flush()
        await connection.violation(subject)
    await asyncio.to_thread(infer_ok, served)


@pytest.mark.parametrize("role", ["client", "gateway"])
async def test_no_one_but_a_worker_may_write_a_heartbeat(served: Served, role: Role) -> None:
    subject = f"$KV.{SUBJECTS.workers_bucket}.spoofed"
    async with connected(served, role) as (nc, connection):
        await nc.publish(subject, b"{}")
        await nc.flush()
        await connection.violation(subject)


@pytest.mark.parametrize("verb", ["load", "unload"])
async def test_a_client_cannot_send_control_messages(served: Served, verb: str) -> None:
    subject = SUBJECTS.ctl(verb)
    async with connected(served, "client") as (nc, connection):
        await nc.publish(subject, b'{"model": "tiny"}')
        await nc.flush()
        await connection.violation(subject)
    await asyncio.to_thread(infer_ok, served)


@pytest.mark.parametrize("role", ["client", "gateway", "worker", "orchestrator"])
async def test_only_the_router_may_delete_or_purge_the_queue(served: Served, role: Role) -> None:
    async with connected(served, role) as (nc, connection):
        for verb in ("DELETE", "PURGE", "UPDATE"):
            subject = f"$JS.API.STREAM.{verb}.{SUBJECTS.stream}"
            await nc.publish(subject, b"{}", reply=nc.new_inbox())
            await nc.flush()
            await connection.violation(subject)
    # The queue is still there: the gateway serves.
    await asyncio.to_thread(infer_ok, served)


async def test_a_worker_cannot_answer_on_the_routers_inbox(served: Served) -> None:
    async with connected(served, "worker") as (nc, connection):
        target = f"_INBOX.{SUBJECTS.prefix}.router.forged"
        await nc.publish(target, b"forged")
        await nc.flush()
        await connection.violation(target)


async def test_a_worker_cannot_listen_to_control_or_another_roles_inbox(served: Served) -> None:
    async with connected(served, "worker") as (nc, connection):
        for subject in (SUBJECTS.ctl("load"), f"_INBOX.{SUBJECTS.prefix}.gateway.>"):
            await nc.subscribe(subject)
            await nc.flush()
            await connection.violation(subject)


async def test_a_client_infers_over_nats_and_reads_the_records_but_writes_nothing(served: Served) -> None:
    async with connected(served, "client") as (nc, _):
        kv = await nc.jetstream().key_value(SUBJECTS.models_bucket)
        assert (await kv.get("tiny")).value
        with pytest.raises(Exception):  # noqa: B017 - the put's request is refused, then times out
            await asyncio.wait_for(kv.put("tiny", b"{}"), 5)
        assert b"forged" not in (await kv.get("tiny")).value


def test_credentials_are_private_files_and_never_in_a_command_line(served: Served) -> None:
    assert served.creds_dir is not None
    assert stat.S_IMODE(served.creds_dir.stat().st_mode) == 0o700
    seeds = []
    for role in ROLES:
        path = seed_path(served.creds_dir, role)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        seeds.append(path.read_bytes().strip().decode())
    processes = child_processes(served.pid)
    assert processes, "natron serve has children"
    for pid, command in processes:
        environ = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
        for seed in seeds:
            assert seed not in command and seed not in environ, f"a seed in process {pid}"
    log = served.output.read_text(errors="replace")
    assert not any(seed in log for seed in seeds)


def test_the_embedded_broker_listens_on_loopback_only(served: Served) -> None:
    port = int(served.nats_url.rsplit(":", 1)[1])
    listening = subprocess.run(
        ["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=False
    )
    if listening.returncode != 0:
        pytest.skip("no ss on this machine")
    addresses = {line.split()[3].rsplit(":", 1)[0] for line in listening.stdout.splitlines() if line.strip()}
    assert addresses and all(a.startswith("127.") or a == "[::1]" for a in addresses), addresses


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, made by the openssl command line."""
    cert, key = directory / "nats.pem", directory / "nats.key"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=natron-test", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl to make a certificate")
async def test_with_tls_every_service_connects_encrypted_and_a_plain_client_is_refused(
    model_repository: Path, tmp_path: Path
) -> None:
    cert, key = self_signed(tmp_path)
    tls = ("--nats-tls-cert", str(cert), "--nats-tls-key", str(key))
    with natron_serve(model_repository, ["tiny"], tmp_path, tls) as served:
        await asyncio.to_thread(infer_ok, served)  # router, worker and gateway came up over TLS
        options = served.nats_options("client")
        with pytest.raises((NoServersError, nats.errors.Error, OSError)):
            await nats.connect(served.nats_url, allow_reconnect=False, max_reconnect_attempts=0, **options)
        context = ssl.create_default_context(cafile=str(cert))
        nc = await nats.connect(served.nats_url, tls=context, allow_reconnect=False, **options)
        try:
            kv = await nc.jetstream().key_value(SUBJECTS.models_bucket)
            assert (await kv.get("tiny")).value
        finally:
            await nc.close()


async def test_a_worker_of_natron_serve_writes_its_own_report_and_no_other(served: Served) -> None:
    assert served.creds_dir is not None
    (seed,) = [p for p in (served.creds_dir / "workers").iterdir() if "-cpu-" in p.name]
    worker_id = seed.name.removesuffix(".nk")
    connection = Connection()

    async def on_error(exc: Exception) -> None:
        connection.errors.append(str(exc))

    nc = await nats.connect(
        served.nats_url,
        error_cb=on_error,
        allow_reconnect=False,
        nkeys_seed=str(seed),
        inbox_prefix=f"_INBOX.{SUBJECTS.prefix}.worker",
    )
    try:
        other = f"$KV.{SUBJECTS.workers_bucket}.{worker_id}-impostor"
        await nc.publish(other, b"{}")
        await nc.flush()
        await connection.violation(other)
        # Its own key is its to write (read here, not overwritten: the worker is live).
        kv = await nc.jetstream().key_value(SUBJECTS.workers_bucket)
        assert (await kv.get(worker_id)).value
    finally:
        await nc.close()
