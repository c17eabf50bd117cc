"""Triton's logging extension (`/v2/logging`, gRPC LogSettings) on a real deployment: the answer,
the refusals, and the settings reaching every process through the broker, a gateway restarted
or a process started later included."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import signal
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from aiohttp import web
from tritonclient.grpc import service_pb2 as pb
from tritonclient.utils import InferenceServerException

from broker import shared_settings
from broker.server import EmbeddedNatsServer
from broker.subjects import Subjects
from gateway import logging_api
from gateway.app import create_app
from gateway.keys import GatewayOptions
from natron import logsettings
from natron.errors import InternalError, InvalidArgument
from natron.logsettings import LogSettings
from tests.harness import Mesh, Served, natron_serve, wait_until, wait_until_async

DEFAULTS = LogSettings().as_dict()


@pytest.fixture(scope="module")
def deployment(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """A deployment of its own: these tests change the log settings of every process in it."""
    with natron_serve(model_repository, ["tiny"], tmp_path_factory.mktemp("logging")) as served:
        yield served


@pytest.fixture
def client(deployment: Served) -> Iterator[httpclient.InferenceServerClient]:
    client = httpclient.InferenceServerClient(deployment.host_port)
    yield client
    # Each test starts from natron serve's own settings (--log-level info, default format).
    client.update_log_settings({k: v for k, v in DEFAULTS.items() if k != "log_file"})
    client.close()


def test_get_answers_the_six_settings(client: httpclient.InferenceServerClient) -> None:
    assert client.get_log_settings() == DEFAULTS


def test_a_change_names_a_subset_and_the_answer_holds_them_all(
    client: httpclient.InferenceServerClient,
) -> None:
    answer = client.update_log_settings({"log_verbose_level": 1, "log_format": "ISO8601"})
    assert answer == {**DEFAULTS, "log_verbose_level": 1, "log_format": "ISO8601"}
    assert client.get_log_settings() == answer
    # A second change keeps the first.
    assert client.update_log_settings({"log_warning": False}) == {**answer, "log_warning": False}


def test_an_empty_post_changes_nothing(deployment: Served, client: httpclient.InferenceServerClient) -> None:
    response = requests.post(f"{deployment.url}/v2/logging", timeout=10)
    assert response.status_code == 200
    assert response.json() == client.get_log_settings() == DEFAULTS


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b'{"log_infos": true}', "unknown log setting 'log_infos'"),
        (b'{"log_info": "false"}', "'log_info' must be a boolean"),
        (b'{"log_verbose_level": -1}', "'log_verbose_level' must be an integer from 0"),
        (b'{"log_verbose_level": true}', "'log_verbose_level' must be an integer"),
        (b'{"log_format": "json"}', "'log_format' must be one of default, ISO8601"),
        # One bad key refuses the whole request: the good one is not applied either.
        (b'{"log_verbose_level": 3, "log_error": null, "log_warning": 0}', "'log_warning' must be a boolean"),
        (b'{"log_file": "/tmp/natron.log"}', "log_file cannot be set over the API"),
        (b"[1, 2]", "log settings body must be a JSON object"),
        (b"{not json", "log settings body is not valid JSON"),
    ],
)
def test_a_bad_request_is_400_naming_the_key_and_changes_nothing(
    deployment: Served, client: httpclient.InferenceServerClient, body: bytes, needle: str
) -> None:
    response = requests.post(f"{deployment.url}/v2/logging", data=body, timeout=10)
    assert response.status_code == 400, response.text
    assert needle in response.json()["error"]
    assert client.get_log_settings() == DEFAULTS


def test_the_triton_client_reads_why_log_file_is_refused(client: httpclient.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as caught:
        client.update_log_settings({"log_file": "/var/log/natron.log"})
    assert "a remote caller must not choose a file the server writes" in str(caught.value)


async def test_a_change_is_stored_and_broadcast_to_the_deployment(deployment: Served) -> None:
    subjects = Subjects()
    nc = await nats.connect(deployment.nats_url, **deployment.nats_options("worker"))
    try:
        sub = await nc.subscribe(subjects.ctl("logging"))
        await nc.flush()
        answer = await asyncio.to_thread(
            httpclient.InferenceServerClient(deployment.host_port).update_log_settings,
            {"log_verbose_level": 2},
        )
        record = shared_settings.decode_record((await sub.next_msg(timeout=10)).data)
        assert logsettings.decode(record.value).as_dict() == answer
        stored = await shared_settings.read(nc, subjects, "logging")
        assert stored == record
    finally:
        await asyncio.to_thread(
            httpclient.InferenceServerClient(deployment.host_port).update_log_settings,
            {"log_verbose_level": 0},
        )
        await nc.close()


def test_the_gateway_logs_as_the_settings_say(
    deployment: Served, client: httpclient.InferenceServerClient
) -> None:
    client.update_log_settings({"log_verbose_level": 1})
    # The gateway's own follower applied the broadcast (after the change itself).
    applied = re.compile(
        r"INFO gateway\[\d+\] broker\.shared_settings: log settings of revision \d+ applied: "
        r"info, warning, error on, verbose level 1"
    )
    wait_until(lambda: applied.search(deployment.output.read_text(errors="replace")), 30, "gateway applied")
    # The format changes its lines' time stamps.
    client.update_log_settings({"log_format": "ISO8601"})
    iso_line = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ INFO gateway\[\d+\] ", re.MULTILINE)
    wait_until(lambda: iso_line.search(deployment.output.read_text(errors="replace")), 30, "ISO8601 line")


def test_every_process_of_the_deployment_applies_a_change(
    deployment: Served, client: httpclient.InferenceServerClient
) -> None:
    client.update_log_settings({"log_verbose_level": 4})
    for role in ("router", "worker", "ensemble"):
        applied = re.compile(
            rf"INFO {role}\[\d+\] broker\.shared_settings: log settings of revision \d+ "
            r"applied: .*verbose level 4"
        )
        wait_until(lambda a=applied: a.search(deployment.output.read_text(errors="replace")), 15, f"{role}")


def test_the_grpc_client_reads_and_changes_the_same_settings(
    deployment: Served, client: httpclient.InferenceServerClient
) -> None:
    grpc = grpcclient.InferenceServerClient(deployment.grpc_url)
    try:
        assert grpc.get_log_settings(as_json=True)["settings"]["log_verbose_level"] == {"uint32_param": 0}
        grpc.update_log_settings({"log_verbose_level": 2, "log_format": "ISO8601"})
        assert client.get_log_settings() == {**DEFAULTS, "log_verbose_level": 2, "log_format": "ISO8601"}
        with pytest.raises(InferenceServerException, match="log_file cannot be set over the API"):
            grpc.update_log_settings({"log_file": "/tmp/x.log"})
    finally:
        grpc.close()


# -- a gateway restarted, a process started later --------------------------------------------


@pytest.fixture
def mesh(model_repository: Path) -> Iterator[Mesh]:
    mesh = Mesh(model_repository)
    try:
        mesh.start_nats()
        yield mesh
    finally:
        mesh.stop()


def _start_gateway(mesh: Mesh) -> None:
    mesh.start_gateway()
    mesh.wait_until(
        lambda: requests.get(f"{mesh.url}/v2/health/live", timeout=2).status_code == 200, 30, "live"
    )


def _restart_with_settings(mesh: Mesh, changes: dict[str, object]) -> dict[str, object]:
    """Change the settings through a gateway, restart it, and answer what the new one reads."""
    _start_gateway(mesh)
    changed = requests.post(f"{mesh.url}/v2/logging", json=changes, timeout=10)
    assert changed.status_code == 200, changed.text
    mesh.signal("gateway", signal.SIGTERM)
    assert mesh.wait_exit("gateway") == 0
    _start_gateway(mesh)
    after: dict[str, object] = requests.get(f"{mesh.url}/v2/logging", timeout=10).json()
    assert after == changed.json()
    # The restarted gateway applied them to itself on start, as the first did on the broadcast.
    applied = re.compile(r"log settings of revision \d+ applied: info, error on, verbose level 3")
    mesh.wait_until(lambda: len(applied.findall(mesh.log("gateway"))) == 2, 30, "applied on restart")
    return after


async def test_settings_survive_a_gateway_restart_and_reach_a_process_started_later(mesh: Mesh) -> None:
    await asyncio.to_thread(_restart_with_settings, mesh, {"log_verbose_level": 3, "log_warning": False})
    # A process that joins now finds them too.
    late = logging.Logger("late-joiner", logging.INFO)
    late.addHandler(logging.NullHandler())
    nc = await nats.connect(mesh.nats_url, **mesh.nats_options("worker"))
    follower = asyncio.create_task(shared_settings.follow_log_settings(nc, Subjects(), late))
    try:
        await wait_until_async(lambda: late.level == logging.DEBUG, 15, "late joiner applied")
        assert logsettings.current(late) == LogSettings(log_warning=False, log_verbose_level=3)
        # ... and follows later changes.
        changed = await asyncio.to_thread(
            requests.post, f"{mesh.url}/v2/logging", json={"log_verbose_level": 0}, timeout=10
        )
        changed.raise_for_status()
        await wait_until_async(lambda: late.level == logging.INFO, 15, "late joiner followed")
    finally:
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower
        await nc.close()


# -- in one process: two gateways, gRPC, damaged records ------------------------------------


@pytest.fixture
def root_logging() -> Iterator[None]:
    """The gateway functions apply the settings to this process's root logger (pytest's
    handlers hang on it): put back what they change."""
    root = logging.getLogger()
    level = root.level
    saved = [(h, list(h.filters), h.formatter) for h in root.handlers]
    stamps = [(f, f.datefmt, f.converter) for _, _, f in saved if f is not None]
    yield
    root.setLevel(level)
    for handler, filters, formatter in saved:
        handler.filters[:] = filters
        handler.formatter = formatter
    for formatter, datefmt, converter in stamps:
        formatter.datefmt = datefmt
        formatter.converter = converter  # type: ignore[method-assign]


@contextlib.asynccontextmanager
async def _gateway(nats_url: str, prefix: str) -> AsyncIterator[web.Application]:
    app = create_app(GatewayOptions(nats_url=nats_url, subjects=Subjects(prefix)))
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        yield app
    finally:
        await runner.cleanup()


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


async def test_concurrent_changes_through_two_gateways_all_take_effect(
    nats_server: EmbeddedNatsServer, prefix: str, root_logging: None
) -> None:
    async with _gateway(nats_server.url, prefix) as one, _gateway(nats_server.url, prefix) as two:
        await asyncio.gather(
            logging_api.update_log_settings(one, {"log_info": False}),
            logging_api.update_log_settings(two, {"log_verbose_level": 5}),
            logging_api.update_log_settings(one, {"log_format": "ISO8601"}),
            logging_api.update_log_settings(two, {"log_warning": False}),
        )
        expected = LogSettings(log_info=False, log_warning=False, log_verbose_level=5, log_format="ISO8601")
        assert await logging_api.get_log_settings(one) == await logging_api.get_log_settings(two)
        assert await logging_api.get_log_settings(two) == expected.as_dict()


async def test_grpc_log_settings_reads_and_changes_with_tritons_types(
    nats_server: EmbeddedNatsServer, prefix: str, root_logging: None
) -> None:
    def as_dict(response: Any) -> dict[str, object]:
        return {k: getattr(v, v.WhichOneof("parameter_choice")) for k, v in response.settings.items()}

    def kinds(response: Any) -> dict[str, str]:
        return {k: v.WhichOneof("parameter_choice") for k, v in response.settings.items()}

    async with _gateway(nats_server.url, prefix) as app:
        read = await logging_api.log_settings_rpc(app, pb.LogSettingsRequest())
        assert set(as_dict(read)) == set(logsettings.KEYS)
        assert kinds(read) == {
            "log_file": "string_param",
            "log_info": "bool_param",
            "log_warning": "bool_param",
            "log_error": "bool_param",
            "log_verbose_level": "uint32_param",
            "log_format": "string_param",
        }
        request = pb.LogSettingsRequest()
        request.settings["log_verbose_level"].uint32_param = 2
        request.settings["log_info"].bool_param = False
        request.settings["log_error"].SetInParent()  # no value: left as it is
        changed = as_dict(await logging_api.log_settings_rpc(app, request))
        assert changed == {**as_dict(read), "log_verbose_level": 2, "log_info": False}

        wrong = pb.LogSettingsRequest()
        wrong.settings["log_warning"].string_param = "false"
        with pytest.raises(InvalidArgument, match="'log_warning' must be a boolean"):
            await logging_api.log_settings_rpc(app, wrong)
        refused = pb.LogSettingsRequest()
        refused.settings["log_file"].string_param = "/tmp/x"
        with pytest.raises(InvalidArgument, match="log_file cannot be set"):
            await logging_api.log_settings_rpc(app, refused)
        assert as_dict(await logging_api.log_settings_rpc(app, pb.LogSettingsRequest())) == changed


async def test_a_damaged_record_or_broadcast_is_skipped_and_following_goes_on(
    nats_server: EmbeddedNatsServer, prefix: str, root_logging: None, caplog: pytest.LogCaptureFixture
) -> None:
    subjects = Subjects(prefix)
    quiet = logging.Logger("follower", logging.INFO)
    quiet.addHandler(logging.NullHandler())
    nc = await nats.connect(nats_server.url)
    follower: asyncio.Task[Any] | None = None

    def logged(text: str) -> bool:
        return text in caplog.text

    try:
        kv = await nc.jetstream().create_key_value(bucket=shared_settings.bucket(subjects))
        await kv.put("logging", b"not settings")
        follower = asyncio.create_task(shared_settings.follow_log_settings(nc, subjects, quiet))
        await wait_until_async(lambda: logged("logging settings of revision 1 not applied"), 15, "stored")
        await nc.publish(subjects.ctl("logging"), b"\xc1 not msgpack")
        await nc.publish(
            subjects.ctl("logging"), shared_settings.encode_record(shared_settings.Record(2, b"{}"))
        )
        await wait_until_async(lambda: logged("ignored a logging settings broadcast"), 15, "garbage")
        await wait_until_async(lambda: logged("logging settings of revision 2 not applied"), 15, "bad value")
        assert quiet.level == logging.INFO
        async with _gateway(nats_server.url, prefix) as app:
            # A stored record the gateway cannot read is its fault, not the caller's: 500.
            with pytest.raises(InternalError, match="stored log settings are unreadable"):
                await logging_api.get_log_settings(app)
            await kv.put("logging", b"still not settings")  # revision 2, past the forged one
            # A change replaces it.
            answer = await logging_api.update_log_settings(app, {"log_verbose_level": 1})
            assert answer["log_verbose_level"] == 1
            assert await logging_api.get_log_settings(app) == answer
            await wait_until_async(lambda: quiet.level == logging.DEBUG, 15, "follower applied")
            assert not follower.done()
    finally:
        if follower is not None:
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower
        await nc.close()
