"""broker.server.config_text: the one spelling of natron's nats-server settings, shared by
`natron serve` and the test harness."""

from __future__ import annotations

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
