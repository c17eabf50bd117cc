"""The parent side of a Python-model stub process: start one with a socket pair, exchange the
first request with it, and run a model's `auto_complete_config` in a short-lived stub.

Both the worker's Python backend (one stub per instance) and the router (auto-completing a
config at the repository scan) use it; the stub itself is `pystub.stub`.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from tritonclient.grpc import model_config_pb2 as pb

from natron import config as cfg
from natron.errors import Unavailable
from pystub.protocol import Channel, ChannelClosed

# initialize() may load large weights; finalize() should be quick.
INIT_TIMEOUT_S = 600.0
FINALIZE_TIMEOUT_S = 30.0
STUB_EXIT_TIMEOUT_S = 5.0

_instance_numbers: dict[str, itertools.count[int]] = {}
_instance_numbers_lock = threading.Lock()


def next_instance_number(model: str) -> int:
    with _instance_numbers_lock:
        return next(_instance_numbers.setdefault(model, itertools.count()))


class Stub:
    """One stub process and the channel to it."""

    def __init__(self, process: subprocess.Popen[bytes], channel: Channel) -> None:
        self.process = process
        self.channel = channel

    def exit_description(self) -> str:
        try:
            code = self.process.wait(timeout=STUB_EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return "stopped answering"
        if code < 0:
            try:
                return f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"was killed by signal {-code}"
        return f"exited with code {code}"

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


def spawn(name: str) -> Stub:
    parent, child = socket.socketpair()
    try:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pystub",
                "--fd",
                str(child.fileno()),
                "--parent-pid",
                str(os.getpid()),
                "--name",
                name,
            ],
            pass_fds=[child.fileno()],
            stdin=subprocess.DEVNULL,
        )
    except BaseException:
        parent.close()
        raise
    finally:
        child.close()
    return Stub(process, Channel(parent))


def request_from(stub: Stub, timeout_s: float, expected: str, header: dict[str, Any]) -> dict[str, Any]:
    """Send `header` and wait for the one answer (before the reader thread runs)."""
    stub.channel.settimeout(timeout_s)
    try:
        stub.channel.send(header)
        answer, _ = stub.channel.recv()
    except (ChannelClosed, TimeoutError) as exc:
        stub.kill()
        raise Unavailable(
            f"the stub process {stub.exit_description()} before answering {header['op']} ({exc}); "
            "see the worker's log for its output"
        ) from None
    finally:
        stub.channel.settimeout(None)
    if answer.get("op") == expected:
        return answer
    stub.kill()
    message = answer.get("message") or f"unexpected answer {answer.get('op')!r} from the stub"
    raise Unavailable(str(message))


def complete_config(config: pb.ModelConfig, version_dir: Path) -> None:
    """Run the model's `auto_complete_config` (when model.py defines one) in a short-lived stub
    and take the config it returns, as Triton does at load. Raises ConfigError with the reason."""
    model_file = version_dir / (config.default_model_filename or "model.py")
    try:
        source = model_file.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise cfg.ConfigError(f"model '{config.name}': cannot read {model_file}: {exc}") from None
    if "auto_complete_config" not in source:
        return  # importing model code (and what it imports) costs seconds; skip when pointless
    stub = spawn(f"{config.name}-autocomplete")
    try:
        answer = request_from(
            stub,
            INIT_TIMEOUT_S,
            "autocompleted",
            {
                "op": "autocomplete",
                "config": json.dumps(cfg.config_to_json(config)),
                "model_file": str(model_file),
            },
        )
    except Unavailable as exc:
        raise cfg.ConfigError(f"model '{config.name}': {exc.message}") from None
    finally:
        stub.kill()
        stub.channel.close()
    completed = cfg.config_from_json(answer["config"])
    config.CopyFrom(completed)
