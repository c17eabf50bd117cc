"""Triton's queue policy and priority levels against a real `natron serve`: a full queue is
refused at once (503 on HTTP, UNAVAILABLE on gRPC) and what it refuses never runs; a request
that waits past its queue timeout is dropped unrun (REJECT) or still runs (DELAY); the request's
`timeout` shortens the queue timeout only where the policy allows it; and a higher priority
level is served first.

The models are Python models that run one request at a time, slowly, and write each request's
tag to a file when its execution starts: the file is the proof of what ran, and in which order.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from broker import codec
from broker.requester import Requester
from broker.subjects import BATCH, Subjects
from natron.inference import InferRequest, InferResponse, Tensor
from tests.harness import Served, natron_serve, wait_until

pytestmark = [pytest.mark.mesh, pytest.mark.timeout(300)]

# Long enough that a queue forms behind one execution, and that an answer given "at once" is
# told apart from one that waited for an execution.
SLOW_S = 2.0
# A generous bound for "at once": a refusal costs no execution, so far less than SLOW_S.
AT_ONCE_S = SLOW_S * 0.75

_MODEL = """
import json
import time

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        parameters = json.loads(args["model_config"])["parameters"]
        self.log = parameters["LOG"]["string_value"]
        self.sleep_s = float(parameters["SLEEP_S"]["string_value"])

    def execute(self, requests):
        responses = []
        for request in requests:
            tag = pb_utils.get_input_tensor_by_name(request, "TAG").as_numpy()
            with open(self.log, "a") as log:
                log.write(f"{int(tag[0])}\\n")
            time.sleep(self.sleep_s)
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("OUT", tag)]))
        return responses
"""

MODELS = {
    "q_full": "default_queue_policy { max_queue_size: 2 }",
    "q_reject": "default_queue_policy { default_timeout_microseconds: 300000 }",
    "q_delay": "default_queue_policy { default_timeout_microseconds: 300000 timeout_action: DELAY }",
    "q_override": "default_queue_policy { default_timeout_microseconds: 30000000 allow_timeout_override: 1 }",
    "q_no_override": "default_queue_policy { default_timeout_microseconds: 30000000 }",
    "q_priority": "priority_levels: 2 default_priority_level: 2",
    "q_plain": "",
}


def _write_model(repo: Path, name: str, batching: str, sleep_s: float) -> None:
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "1" / "model.py").write_text(_MODEL)
    (repo / name / "config.pbtxt").write_text(
        f'name: "{name}"\nbackend: "python"\nmax_batch_size: 0\n'
        'input [ { name: "TAG" data_type: TYPE_INT32 dims: [ 1 ] } ]\n'
        'output [ { name: "OUT" data_type: TYPE_INT32 dims: [ 1 ] } ]\n'
        "instance_group [ { count: 1 kind: KIND_CPU } ]\n"
        f"dynamic_batching {{ {batching} }}\n"
        f'parameters {{ key: "LOG" value {{ string_value: "{repo / name / "ran.log"}" }} }}\n'
        f'parameters {{ key: "SLEEP_S" value {{ string_value: "{sleep_s}" }} }}\n'
    )


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    repo = tmp_path_factory.mktemp("queue_models")
    for name, batching in MODELS.items():
        _write_model(repo, name, batching, 0.05 if name == "q_plain" else SLOW_S)
    with natron_serve(repo, list(MODELS), tmp_path_factory.mktemp("queue_logs"), timeout_s=180) as served:
        yield served


def ran(served: Served, model: str) -> list[int]:
    """The tags of the requests that started executing, in the order they started."""
    path = served.repository / model / "ran.log"
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def infer(served: Served, model: str, tag: int, **parameters: Any) -> tuple[int, dict[str, Any], float]:
    """(status, body, seconds) of one HTTP infer carrying `tag`."""
    body: dict[str, Any] = {
        "id": f"t{tag}",
        "inputs": [{"name": "TAG", "shape": [1], "datatype": "INT32", "data": [tag]}],
    }
    if parameters:
        body["parameters"] = parameters
    started = time.monotonic()
    answer = requests.post(f"{served.url}/v2/models/{model}/infer", json=body, timeout=120)
    return answer.status_code, answer.json(), time.monotonic() - started


def occupy(
    served: Served, pool: concurrent.futures.Executor, model: str, tag: int
) -> concurrent.futures.Future[Any]:
    """Start a request and wait until the model runs it: the instance is busy for SLOW_S."""
    future = pool.submit(infer, served, model, tag)
    wait_until(lambda: tag in ran(served, model), timeout_s=30, what=f"request {tag} running on {model}")
    return future


def settle(futures: list[concurrent.futures.Future[Any]]) -> list[Any]:
    return [future.result(timeout=120) for future in futures]


def test_a_full_queue_is_refused_at_once_over_http_and_what_it_refuses_never_runs(served: Served) -> None:
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        first = occupy(served, pool, "q_full", 100)
        answers = settle([pool.submit(infer, served, "q_full", 101 + i) for i in range(6)])
        assert first.result(timeout=60)[0] == 200
    refused = [(i, body, took) for i, (status, body, took) in enumerate(answers) if status == 503]
    accepted = [i for i, (status, _, _) in enumerate(answers) if status == 200]
    assert len(accepted) + len(refused) == 6, answers
    # max_queue_size 2: two wait, the others are refused. A gateway never lets the queue grow
    # past the bound; it may count a request it published as queued until its next look at the
    # queue (gateway/admission.py), so one fewer may be let in, never one more.
    assert 1 <= len(accepted) <= 2, answers
    for i, body, took in refused:
        assert body["error"] == f"[request id: t{101 + i}] Exceeds maximum queue size"
        assert took < AT_ONCE_S, f"a refusal took {took:.2f} s"
    time.sleep(0.5)  # anything that was going to run has started by now
    assert sorted(ran(served, "q_full")) == sorted([100, *(101 + i for i in accepted)])


def test_a_full_queue_is_unavailable_over_grpc(served: Served) -> None:
    # Channels are opened, and connected, before the queue fills, and the six requests leave
    # together: on a loaded machine opening a channel can take longer than an execution, and a
    # request that only arrives once the queue has drained is rightly admitted.
    clients = [grpcclient.InferenceServerClient(served.grpc_url) for _ in range(6)]
    for client in clients:
        assert client.is_server_live()
    start = threading.Barrier(6)

    def grpc_infer(client: grpcclient.InferenceServerClient, tag: int) -> tuple[str, str, float]:
        tensor = grpcclient.InferInput("TAG", [1], "INT32")
        tensor.set_data_from_numpy(np.array([tag], dtype=np.int32))
        start.wait(timeout=30)
        started = time.monotonic()
        try:
            client.infer("q_full", [tensor], request_id=f"g{tag}")
            return "OK", "", time.monotonic() - started
        except InferenceServerException as exc:
            return str(exc.status()), exc.message() or "", time.monotonic() - started

    try:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            occupy(served, pool, "q_full", 200)
            answers = settle([pool.submit(grpc_infer, client, 201 + i) for i, client in enumerate(clients)])
    finally:
        for client in clients:
            client.close()
    refused = [(i, message, took) for i, (code, message, took) in enumerate(answers) if code != "OK"]
    assert len(refused) in (4, 5), answers
    for i, (code, _, _) in enumerate(answers):
        assert code in ("OK", "StatusCode.UNAVAILABLE"), answers[i]
    for i, message, took in refused:
        assert message == f"[request id: g{201 + i}] Exceeds maximum queue size"
        assert took < AT_ONCE_S
    time.sleep(0.5)
    refused_tags = {201 + i for i, _, _ in refused}
    assert not refused_tags & set(ran(served, "q_full"))


def _waits_behind_one(
    served: Served, model: str, first: int, **parameters: Any
) -> tuple[int, dict[str, Any]]:
    """A request sent while another runs for SLOW_S, so it waits about that long to be taken."""
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        running = occupy(served, pool, model, first)
        status, body, _ = infer(served, model, first + 1, **parameters)
        assert running.result(timeout=60)[0] == 200
    return status, body


def test_a_request_past_its_queue_timeout_is_rejected_without_running(served: Served) -> None:
    status, body = _waits_behind_one(served, "q_reject", 300)
    assert (status, body["error"]) == (503, "Request timeout expired")
    assert 301 not in ran(served, "q_reject")
    # Without a queue ahead of it, a request is taken in time and runs.
    assert infer(served, "q_reject", 302)[0] == 200
    assert 302 in ran(served, "q_reject")


def test_a_request_past_its_queue_timeout_still_runs_under_delay(served: Served) -> None:
    status, body = _waits_behind_one(served, "q_delay", 400)
    assert status == 200, body
    assert body["outputs"][0]["data"] == [401]
    assert ran(served, "q_delay") == [400, 401]


def test_the_request_timeout_shortens_the_queue_timeout_where_the_policy_allows_it(served: Served) -> None:
    status, body = _waits_behind_one(served, "q_override", 500, timeout=300_000)
    assert (status, body["error"]) == (503, "Request timeout expired")
    assert 501 not in ran(served, "q_override")
    # A timeout longer than the default does not lengthen it (Triton: only a shorter one counts).
    status, body = _waits_behind_one(served, "q_override", 502, timeout=60_000_000)
    assert status == 200, body


def test_the_request_timeout_is_ignored_where_the_policy_does_not_allow_it(served: Served) -> None:
    # Triton's meaning: with a queue policy, `timeout` is only the time it may wait to be taken,
    # here not overridable; the whole request keeps the gateway's deadline.
    status, body = _waits_behind_one(served, "q_no_override", 600, timeout=300_000)
    assert status == 200, body
    assert ran(served, "q_no_override") == [600, 601]


def test_a_higher_priority_request_is_served_before_a_backlog(served: Served) -> None:
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        first = occupy(served, pool, "q_priority", 700)
        backlog = [pool.submit(infer, served, "q_priority", 701 + i, priority=2) for i in range(3)]
        time.sleep(0.3)  # the backlog is queued
        urgent = pool.submit(infer, served, "q_priority", 710, priority=1)
        answers = settle([first, *backlog, urgent])
    assert all(status == 200 for status, _, _ in answers), answers
    order = ran(served, "q_priority")
    assert order[:2] == [700, 710], order
    assert sorted(order[2:]) == [701, 702, 703]


def test_priority_zero_or_beyond_the_levels_means_the_default_level(served: Served) -> None:
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        first = occupy(served, pool, "q_priority", 800)
        default = pool.submit(infer, served, "q_priority", 801, priority=0)
        time.sleep(0.2)
        beyond = pool.submit(infer, served, "q_priority", 802, priority=9)
        time.sleep(0.2)
        urgent = pool.submit(infer, served, "q_priority", 803, priority=1)
        answers = settle([first, default, beyond, urgent])
    assert all(status == 200 for status, _, _ in answers), answers
    order = [tag for tag in ran(served, "q_priority") if tag >= 800]
    assert order == [800, 803, 801, 802], order


def test_a_bad_priority_is_a_client_error(served: Served) -> None:
    status, body, _ = infer(served, "q_priority", 900, priority=-1)
    assert status == 400 and "priority" in body["error"]


def test_the_model_config_shows_the_queue_policy(served: Served) -> None:
    config = requests.get(f"{served.url}/v2/models/q_priority/config", timeout=10).json()
    assert config["dynamic_batching"]["priority_levels"] == 2
    config = requests.get(f"{served.url}/v2/models/q_full/config", timeout=10).json()
    assert config["dynamic_batching"]["default_queue_policy"]["max_queue_size"] == 2


async def test_a_request_whose_caller_left_before_its_message_went_out_never_runs(served: Served) -> None:
    """A client that resets its connection while the gateway is busy: its request was read and
    is waiting to share a message with others. It stays out of the message (no worker sees it)
    and the others still go."""
    nc = await nats.connect(
        served.nats_url, connect_timeout=5, max_reconnect_attempts=3, **served.nats_options("client")
    )
    # What goes out on the model's subject, seen by a subscriber allowed to see it.
    observer = await nats.connect(
        served.nats_url, connect_timeout=5, max_reconnect_attempts=3, **served.nats_options("admin")
    )
    published = await observer.subscribe(Subjects().infer("q_plain", "1"))
    await observer.flush()
    try:
        async with Requester(nc, Subjects()) as requester:

            def request(tag: int) -> InferRequest:
                data = np.array([tag], dtype=np.int32)
                return InferRequest(f"left{tag}", "q_plain", "1", [Tensor("TAG", "INT32", (1,), data)])

            tasks = [
                asyncio.create_task(requester.infer(request(1000 + i), "1", 60.0, max_rows=8))
                for i in range(5)
            ]
            await asyncio.sleep(0)  # every task waits: the first opened the message, the others joined
            tasks[0].cancel()  # the one that opened it
            tasks[3].cancel()  # one that joined it
            results = await asyncio.gather(*tasks, return_exceptions=True)
            assert requester.in_flight == 0
        message = await published.next_msg(timeout=10)
        with pytest.raises(nats.errors.TimeoutError):
            await published.next_msg(timeout=0.5)  # one message, and only one
    finally:
        await nc.close()
        await observer.close()
    assert message.headers is not None and message.headers[BATCH] == "3"
    entries = codec.decode_batch(message.data, 3)
    assert [entry.request.id if entry.request else "" for entry in entries] == [
        "left1001",
        "left1002",
        "left1004",
    ]
    assert isinstance(results[0], asyncio.CancelledError) and isinstance(results[3], asyncio.CancelledError)
    for i in (1, 2, 4):
        result = results[i]
        assert isinstance(result, InferResponse), result
        assert result.outputs[0].data.tolist() == [1000 + i]
    assert sorted(ran(served, "q_plain")) == [1001, 1002, 1004]


def generate(served: Served, model: str, tag: int) -> tuple[int, str]:
    """(status, body) of one `generate` call (the flat JSON of Triton's generate extension)."""
    answer = requests.post(f"{served.url}/v2/models/{model}/generate", json={"TAG": tag}, timeout=120)
    return answer.status_code, answer.text


def test_the_generate_endpoint_honours_the_queue_bound_too(served: Served) -> None:
    """generate, generate_stream and the WebSocket go through the same admission as infer."""
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        first = occupy(served, pool, "q_full", 300)
        answers = settle([pool.submit(generate, served, "q_full", 301 + i) for i in range(6)])
        assert first.result(timeout=60)[0] == 200
    statuses = [status for status, _ in answers]
    assert set(statuses) <= {200, 503}, answers
    assert 1 <= statuses.count(200) <= 2, answers
    assert all("Exceeds maximum queue size" in text for status, text in answers if status == 503)
    time.sleep(0.5)
    assert len([tag for tag in ran(served, "q_full") if tag >= 300]) == 1 + statuses.count(200)
