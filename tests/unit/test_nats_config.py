"""broker.server.config_text: the one spelling of natron's nats-server settings, shared by
`natron serve` and the test harness."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest

from broker.server import MAX_PAYLOAD_LIMIT_BYTES, ServerOptions, config_text

MiB = 1024 * 1024


def test_the_config_listens_where_asked_and_stores_jetstream_where_asked(tmp_path: Path) -> None:
    text = config_text(ServerOptions(port=4333, host="0.0.0.0"), tmp_path / "js")
    assert 'listen: "0.0.0.0:4333"' in text
    assert f'store_dir: "{tmp_path / "js"}"' in text
    assert f"max_memory_store: {1024 * MiB}" in text
    assert "http_port" not in text  # no monitoring port unless one is asked for
    assert "http_port: 8222" in config_text(ServerOptions(port=4333, monitor_port=8222), tmp_path)


def test_max_pending_holds_four_maximal_messages_and_never_less_than_64_mib(tmp_path: Path) -> None:
    small = config_text(ServerOptions(port=4333, max_payload_bytes=1 * MiB), tmp_path)
    assert f"max_payload: {1 * MiB}" in small and f"max_pending: {64 * MiB}" in small
    large = config_text(ServerOptions(port=4333, max_payload_bytes=32 * MiB), tmp_path)
    assert f"max_payload: {32 * MiB}" in large and f"max_pending: {128 * MiB}" in large


@pytest.mark.parametrize("size", [0, MAX_PAYLOAD_LIMIT_BYTES + 1])
def test_a_max_payload_nats_server_would_refuse_is_refused_naming_it(tmp_path: Path, size: int) -> None:
    with pytest.raises(ValueError, match=f"max_payload_bytes={size}"):
        config_text(ServerOptions(port=4333, max_payload_bytes=size), tmp_path)


def test_a_port_must_be_chosen_before_the_config_is_written(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="port"):
        config_text(ServerOptions(), tmp_path)


def test_a_single_server_config_is_exactly_what_it_was_before_clusters(tmp_path: Path) -> None:
    # Pinned byte for byte: `natron serve`, the harness and every deployment configure a single
    # server with it, and no cluster setting may leak into theirs.
    assert config_text(ServerOptions(port=4333), Path("/data/js")) == (
        'listen: "127.0.0.1:4333"\n'
        "max_payload: 16777216\n"
        "max_pending: 67108864\n"
        "jetstream {\n"
        '  store_dir: "/data/js"\n'
        "  max_memory_store: 1073741824\n"
        "}\n"
    )


def test_a_cluster_node_names_itself_listens_for_routes_and_routes_to_the_others() -> None:
    options = ServerOptions(
        port=4222,
        server_name="natron-0",
        cluster_port=6222,
        routes=("nats-route://127.0.0.1:6223", "nats-route://127.0.0.1:6224"),
    )
    text = config_text(options, Path("/data/js"))
    assert text.endswith(
        'server_name: "natron-0"\n'
        "cluster {\n"
        '  name: "natron"\n'
        '  listen: "127.0.0.1:6222"\n'
        "  routes [\n"
        '    "nats-route://127.0.0.1:6223"\n'
        '    "nats-route://127.0.0.1:6224"\n'
        "  ]\n"
        "}\n"
    )
    # The single-server part is the same as without a cluster.
    assert text.startswith(config_text(ServerOptions(port=4222), Path("/data/js")))


def test_a_cluster_listens_on_the_servers_host_under_the_name_asked(tmp_path: Path) -> None:
    text = config_text(
        ServerOptions(port=4222, host="0.0.0.0", server_name="a", cluster_port=6222, cluster_name="edge"),
        tmp_path,
    )
    assert 'listen: "0.0.0.0:6222"' in text and 'name: "edge"' in text
    assert "routes [\n  ]" in text  # a first node, which the others route to


NODE = ServerOptions(port=4222, server_name="n", cluster_port=6222)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (replace(NODE, server_name=None), "server_name"),
        (replace(NODE, cluster_port=0), "cluster_port=0"),
        (replace(NODE, cluster_port=None, routes=("nats-route://127.0.0.1:6223",)), "need a cluster_port"),
        (replace(NODE, routes=("127.0.0.1:6223",)), "nats-route"),
        (replace(NODE, server_name='n" x'), "server_name='n\" x'"),
        (replace(NODE, cluster_name="my cluster"), "cluster_name='my cluster'"),
    ],
)
def test_a_cluster_setting_nats_server_would_misread_is_refused_naming_it(
    tmp_path: Path, options: ServerOptions, message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        config_text(options, tmp_path)
