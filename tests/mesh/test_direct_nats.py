"""Clients that skip HTTP: a plain nats-py client, following docs/wire-format.md, against a real
`natron serve`. No natron code is on the request path: requests are built and answers read by
examples/nats_direct.py, which imports nats-py, msgpack and numpy only.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import msgpack
import nats
import numpy as np
import pytest
from nats.aio.client import Client
from nats.js.errors import NotFoundError

from examples.nats_direct import DEADLINE_NS, DirectClient, InferenceError, encode_request
from tests.harness import ROOT, Served, wait_until_async

pytestmark = pytest.mark.timeout(90)

EXAMPLE = ROOT / "examples" / "nats_direct.py"
STREAM = "NATRON_INFER"
TINY = "natron.infer.tiny.1"
ANSWER_TIMEOUT_S = 20.0  # generous for a loaded 2-core machine; a hang still ends


def tiny_input(rows: int = 1, datatype: str = "FP32") -> dict[str, tuple[str, np.ndarray]]:
    x = np.arange(rows * 16, dtype=np.float32).reshape(rows, 16)
    if datatype != "FP32":
        x = x.astype(np.int32)
    return {"INPUT0": (datatype, x)}


@pytest.fixture(scope="module")
async def nc(served: Served) -> AsyncIterator[Client]:
    connection = await nats.connect(
        served.nats_url, connect_timeout=5, max_reconnect_attempts=3, **served.nats_options("client")
    )
    yield connection
    await connection.close()


@pytest.fixture(scope="module")
async def admin(served: Served) -> AsyncIterator[Client]:
    """An operator's connection: what a client may not do (purge the queue, publish outside
    the inference subjects), the tests do as admin."""
    connection = await nats.connect(served.nats_url, connect_timeout=5, **served.nats_options("admin"))
    yield connection
    await connection.close()


@pytest.fixture(scope="module")
async def client(nc: Client) -> AsyncIterator[DirectClient]:
    async with DirectClient(nc) as direct:
        yield direct


async def assert_tiny_still_answers(client: DirectClient) -> None:
    version, outputs = await client.infer("tiny", tiny_input(2), timeout_s=ANSWER_TIMEOUT_S)
    assert version == "1"
    datatype, y = outputs["OUTPUT0"]
    assert datatype == "FP32"
    np.testing.assert_array_equal(y, 2 * tiny_input(2)["INPUT0"][1] + 1)


# -- the happy path ----------------------------------------------------------------------------


async def test_a_plain_nats_client_infers_tiny_as_the_document_describes(client: DirectClient) -> None:
    assert await client.resolve_version("tiny") == "1"
    version, outputs = await client.infer(
        "tiny", tiny_input(3), request_id="direct-1", outputs=["OUTPUT0"], timeout_s=ANSWER_TIMEOUT_S
    )
    assert version == "1"
    assert list(outputs) == ["OUTPUT0"]
    datatype, y = outputs["OUTPUT0"]
    assert datatype == "FP32" and y.shape == (3, 16)
    np.testing.assert_array_equal(y, 2 * np.arange(48, dtype=np.float32).reshape(3, 16) + 1)


async def test_the_answer_echoes_the_id_and_names_the_version_that_ran(client: DirectClient) -> None:
    payload = encode_request("tiny", tiny_input(), request_id="echo-me", version="")
    answer = await client.send(TINY, payload, timeout_s=ANSWER_TIMEOUT_S)
    assert answer.status == 200
    assert answer.body is not None
    assert answer.body["v"] == 1
    assert (answer.body["id"], answer.body["model"], answer.body["version"]) == ("echo-me", "tiny", "1")
    assert isinstance(answer.body["outputs"][0]["data"], bytes)


def test_the_example_script_prints_tinys_answer(served: Served) -> None:
    creds = served.nats_options("client")["nkeys_seed"]
    done = subprocess.run(
        [
            sys.executable,
            str(EXAMPLE),
            "--nats-url",
            served.nats_url,
            "--timeout-s",
            "20",
            "--nats-creds",
            creds,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path("/"),  # nothing of the repository on sys.path but the script's own folder
    )
    assert done.returncode == 0, done.stderr
    expected = [float(2 * i + 1) for i in range(16)]
    assert f"OUTPUT0 FP32 [1, 16] = {expected}" in done.stdout


# -- what workers do with bad or late messages -------------------------------------------------


async def test_a_request_whose_deadline_has_passed_is_answered_504_without_running(
    client: DirectClient,
) -> None:
    payload = encode_request("tiny", tiny_input(), request_id="late")
    answer = await client.send(
        TINY, payload, timeout_s=ANSWER_TIMEOUT_S, deadline_ns=time.time_ns() - 1_000_000_000
    )
    assert answer.status == 504
    assert answer.body is not None and answer.body["id"] == "late"
    assert "expired" in answer.error
    await assert_tiny_still_answers(client)


async def test_a_garbage_body_gets_400_and_the_worker_keeps_serving(client: DirectClient) -> None:
    answer = await client.send(TINY, b"\xc1 this is not msgpack", timeout_s=ANSWER_TIMEOUT_S)
    assert answer.status == 400
    assert answer.body is not None and answer.body["id"] == ""
    assert "msgpack" in answer.error
    await assert_tiny_still_answers(client)


async def test_a_msgpack_body_of_another_format_version_gets_400_naming_the_version(
    client: DirectClient,
) -> None:
    body = msgpack.unpackb(encode_request("tiny", tiny_input()))
    answer = await client.send(TINY, msgpack.packb({**body, "v": 2}), timeout_s=ANSWER_TIMEOUT_S)
    assert answer.status == 400
    assert "unsupported wire format version 2" in answer.error


async def test_a_request_naming_another_model_than_its_subject_gets_400(client: DirectClient) -> None:
    payload = encode_request("simple", tiny_input(), request_id="misrouted")
    answer = await client.send(TINY, payload, timeout_s=ANSWER_TIMEOUT_S)
    assert answer.status == 400
    assert answer.body is not None and answer.body["id"] == "misrouted"
    assert "'simple'" in answer.error and "'tiny'" in answer.error


async def test_a_message_without_a_reply_header_is_dropped_and_acknowledged(
    served: Served, nc: Client, client: DirectClient
) -> None:
    js = nc.jetstream()
    deadline = str(time.time_ns() + 60 * 1_000_000_000)
    ack = await js.publish(
        TINY, encode_request("tiny", tiny_input()), timeout=ANSWER_TIMEOUT_S, headers={DEADLINE_NS: deadline}
    )
    assert ack.stream == STREAM
    await assert_tiny_still_answers(client)
    # Acknowledged, not left for redelivery: a work queue removes what was acknowledged. (Read
    # as an operator: a client may not read the queue.)
    admin = await nats.connect(served.nats_url, **served.nats_options("admin"))

    async def removed() -> bool:
        try:
            await admin.jetstream().get_msg(STREAM, ack.seq)
        except NotFoundError:
            return True
        return False

    try:
        await wait_until_async(
            removed, ANSWER_TIMEOUT_S, f"message {ack.seq} acknowledged and out of {STREAM}"
        )
    finally:
        await admin.close()
    dropped = "dropping a request without a Natron-Reply-To header"
    await wait_until_async(
        lambda: dropped in served.output.read_text(errors="replace"),
        ANSWER_TIMEOUT_S,
        "the worker logging the dropped request",
    )


async def test_a_wrong_input_datatype_gets_400_naming_the_input(client: DirectClient) -> None:
    with pytest.raises(InferenceError) as caught:
        await client.infer("tiny", tiny_input(datatype="INT32"), timeout_s=ANSWER_TIMEOUT_S)
    assert caught.value.status == 400
    message = caught.value.message
    assert "'INPUT0'" in message and "INT32" in message and "FP32" in message


async def test_a_tensor_whose_data_does_not_fit_its_shape_gets_400(client: DirectClient) -> None:
    body = msgpack.unpackb(encode_request("tiny", tiny_input()))
    body["inputs"][0]["data"] = body["inputs"][0]["data"][:-4]
    answer = await client.send(TINY, msgpack.packb(body), timeout_s=ANSWER_TIMEOUT_S)
    assert answer.status == 400
    assert "needs 64 bytes, got 60" in answer.error


# -- refusals the client sees before any worker ------------------------------------------------


async def test_a_full_queue_refuses_the_publish_with_503(
    nc: Client, admin: Client, client: DirectClient
) -> None:
    # No consumer serves this subject: its per-subject bound (4096) fills and stays full.
    subject = "natron.infer.no_such_model.1"
    js = admin.jetstream()
    try:
        for _ in range(4096):
            await nc.publish(subject, b"x")
        await nc.flush(timeout=int(ANSWER_TIMEOUT_S))
        with pytest.raises(InferenceError) as caught:
            await client.send(subject, b"x", timeout_s=ANSWER_TIMEOUT_S)
        assert caught.value.status == 503
        assert "maximum messages per subject exceeded" in caught.value.message
    finally:
        await js.purge_stream(STREAM, subject=subject)


async def test_a_subject_no_stream_takes_is_refused_with_503(admin: Client) -> None:
    # (A client may publish only where the stream takes it: this needs a wider role.)
    async with DirectClient(admin, prefix="no_such_deployment") as other:
        with pytest.raises(InferenceError) as caught:
            await other.send("no_such_deployment.infer.tiny.1", b"x", timeout_s=ANSWER_TIMEOUT_S)
    assert caught.value.status == 503


async def test_a_request_nobody_serves_times_out_at_the_client(admin: Client, client: DirectClient) -> None:
    subject = "natron.infer.tiny.99"  # queued (the stream takes it) but no worker consumes it
    try:
        started = time.monotonic()
        with pytest.raises(InferenceError) as caught:
            await client.send(subject, encode_request("tiny", tiny_input()), timeout_s=0.5)
        assert caught.value.status == 504
        assert time.monotonic() - started < 10
    finally:
        await admin.jetstream().purge_stream(STREAM, subject=subject)


async def test_unknown_models_and_versions_are_resolved_to_404_from_the_models_bucket(
    client: DirectClient,
) -> None:
    with pytest.raises(InferenceError) as caught:
        await client.resolve_version("no_such_model")
    assert caught.value.status == 404
    with pytest.raises(InferenceError) as caught:
        await client.resolve_version("tiny", "99")
    assert caught.value.status == 404
    with pytest.raises(InferenceError) as caught:
        await client.resolve_version("broken")
    assert caught.value.status == 503


async def test_a_request_over_max_payload_is_refused_before_publishing(
    nc: Client, client: DirectClient
) -> None:
    # Headers count toward max_payload: a body of exactly max_payload bytes must not be sent.
    with pytest.raises(InferenceError) as caught:
        await client.send(TINY, b"\x00" * nc.max_payload, timeout_s=ANSWER_TIMEOUT_S)
    assert caught.value.status == 413
    assert nc.is_connected
    await assert_tiny_still_answers(client)
