"""The broker goes away under load and comes back: no process restarts, nothing loads again,
no answer is wrong, no request waits past its deadline, and clients are told 503 with a reason
while the broker is away (bench/faults.py runs the same scenarios and prints their figures)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats
import pytest

from bench.faults import Outcome, broker_kill, broker_pause, cluster_node_kill, mesh_for, worker_kill
from broker.subjects import Subjects
from examples.build_models import build
from tests.harness import natron_serve, wait_until

pytestmark = pytest.mark.mesh


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("faults")
    build(repo, ["tiny"], quiet=True)
    return repo


# The gateway's deadline in these meshes (bench/faults.py), and what answering at it may take.
DEADLINE_MS = 30_000
MARGIN_MS = 2_000


def check_survived(outcome: Outcome) -> None:
    print(outcome)
    assert outcome.wrong == 0
    assert outcome.lost == 0, "a request got no answer at all"
    # Nothing hung: every request was answered by its deadline at the latest.
    for phase in (outcome.before, outcome.during, outcome.after):
        assert phase.longest_ms < DEADLINE_MS + MARGIN_MS, phase
    assert outcome.before.ok == outcome.before.requests > 0
    assert outcome.recovered_s is not None, "service did not come back"
    assert outcome.after.requests > 0 and outcome.after.by_status == {"200": outcome.after.requests}
    assert outcome.processes_restarted == []
    assert outcome.model_reloads == 0, "the worker loaded its model again"
    assert outcome.ready_during == 503, "the gateway said ready while it had no broker"


def test_a_broker_killed_under_load_comes_back_empty_and_the_mesh_rebuilds_its_state(
    repository: Path,
) -> None:
    """Memory storage: the queue, consumers and buckets are gone with the broker. The router
    re-creates them and re-publishes the records, the worker its report; the gateway publishes
    again the requests the dead broker held, and refuses new ones at once while it is away."""
    with mesh_for(repository) as mesh:
        outcome = broker_kill(mesh, "broker-kill-memory")
        check_survived(outcome)
        # Killed, the broker closes the connections: nobody waits for a deadline.
        assert outcome.during.longest_ms < DEADLINE_MS / 2, outcome.during
        assert set(outcome.during.by_status) <= {"200", "503"}, outcome.during
        # What the gateway had published when the broker died was published again and
        # answered 200; a request that reached the gateway after the connection broke was
        # refused at once, saying so.
        for reason in outcome.in_flight.reasons:
            assert "connection to NATS is down" in reason, outcome.in_flight
        assert outcome.in_flight.ok > 0, outcome.in_flight
        assert "re-asserted" in mesh.log("router")


def test_with_file_storage_requests_the_broker_acknowledged_are_answered_after_it_restarts(
    repository: Path,
) -> None:
    """A slow worker keeps a queue: the requests in it when the broker dies are stored, and
    are answered once it is back, not failed."""
    with mesh_for(repository, "--jetstream-storage", "file") as mesh:
        mesh.processes["w0"].terminate()
        mesh.wait_exit("w0")
        mesh.start_worker("w0", "--jetstream-storage", "file", "--throttle-ms", "100")
        mesh.wait_until(lambda: mesh.infer_tiny(1.0).status_code == 200, 30, "the slow worker serving")
        outcome = broker_kill(mesh, "broker-kill-file")
        check_survived(outcome)
        # Stored requests waited for the broker and got their answers: some requests that
        # began before the broker died ended with a 200 after it was back.
        assert outcome.during.ok > 0
        assert set(outcome.during.by_status) <= {"200", "503"}, outcome.during


def test_a_broker_paused_past_the_heartbeat_timeout_reloads_nothing(repository: Path) -> None:
    """SIGSTOP for 10 s, longer than the router's 6 s heartbeat timeout: the router does not
    count the worker dead for a gap in its own view, and the worker reloads nothing. An answer
    the worker sent before the gateway had subscribed again is lost with the old connection:
    its request gets 503 at most 10 s after the reconnect, not a 504 at its deadline."""
    with mesh_for(repository) as mesh:
        outcome = broker_pause(mesh, "broker-pause-10s")
        check_survived(outcome)
        assert set(outcome.during.by_status) <= {"200", "503"}, outcome.during
        assert "stopped heart-beating" not in mesh.log("router")


def test_a_killed_workers_requests_are_answered_by_another_within_the_ack_wait(repository: Path) -> None:
    """Two workers; one is SIGKILLed under load. The requests it held come back after the ack
    wait (two heartbeats, 4 s: the survivor keeps its own alive every third of it), not after
    the 10 s it used to be; none is lost or answered wrong."""
    with mesh_for(repository, workers=2) as mesh:
        outcome = worker_kill(mesh, "worker-kill")
        print(outcome)
        assert outcome.wrong == outcome.lost == 0
        for phase in (outcome.before, outcome.during, outcome.after):
            assert set(phase.by_status) == {"200"}, phase
        assert outcome.during.longest_ms < 8_000, outcome.during
        assert outcome.processes_restarted == ["w1"]


def test_a_three_node_cluster_loses_nothing_when_the_stream_leader_is_killed(
    repository: Path, tmp_path: Path
) -> None:
    """`natron serve --nats-cluster 3`: replicas 3 for the stream and buckets; the node that
    leads the inference stream is SIGKILLed under load. Publishes that found no leader during
    the election are published again, connections move to the other nodes, serve starts the
    node again and it catches up."""
    with natron_serve(repository, ["tiny"], tmp_path, ("--nats-cluster", "3")) as served:
        outcome = cluster_node_kill(served, "cluster-node-kill")
        print(outcome)
        assert outcome.wrong == outcome.lost == 0
        assert set(outcome.before.by_status) == set(outcome.after.by_status) == {"200"}
        # A service whose own node was killed refuses for the moment it reconnects; nothing waits
        # for its deadline (60 s here).
        assert set(outcome.during.by_status) <= {"200", "503"}, outcome.during
        assert outcome.during.longest_ms < 30_000, outcome.during
        assert outcome.processes_restarted == [] and outcome.model_reloads == 0
        assert "starting it again" in served.output.read_text()

        async def replicas_current() -> bool:
            nc = await nats.connect(served.nats_url, **served.nats_options("admin"))
            try:
                info = await nc.jetstream().stream_info(Subjects().stream)
                assert info.config.num_replicas == 3
                replicas = (info.cluster.replicas or []) if info.cluster else []
                return len(replicas) == 2 and all(r.current for r in replicas)
            finally:
                await nc.close()

        wait_until(lambda: asyncio.run(replicas_current()), 30, "the restarted node caught up")
