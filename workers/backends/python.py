"""Python backend: models written for Triton's Python backend (`model.py`, `TritonPythonModel`),
run unchanged, each instance in a stub process of its own (its own GIL; a crash is its own).

The worker side is a RequestBackend. `execute_requests` sends the requests to the stub and waits
until the model's `execute` returns; a reader thread relays every response to the sink as it
arrives, so a decoupled model's answers flow while it runs and after it returned. When the stub
dies, every request still open on it is answered with a 500 that says so, the death is logged,
and the next request starts a fresh stub (as Triton restarts an unhealthy stub).
"""

from __future__ import annotations

import itertools
import json
import logging
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tritonclient.grpc import model_config_pb2 as pb

from natron import config as cfg
from natron.errors import InternalError, NatronError, Unavailable
from natron.inference import InferRequest, Tensor
from pystub.process import (
    FINALIZE_TIMEOUT_S,
    INIT_TIMEOUT_S,
    STUB_EXIT_TIMEOUT_S,
    Stub,
    next_instance_number,
    request_from,
    spawn,
)
from pystub.protocol import Channel, ChannelClosed, WireTensor, read_tensors
from workers.backends import BackendContext, ResponseSink, on_gpu

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Batch:
    """One execute call: its sink, the requests not yet answered with the final flag."""

    sink: ResponseSink
    wanted: list[list[str]]
    open: set[int]
    done: threading.Event = field(default_factory=threading.Event)
    error: NatronError | None = None


class PythonBackend:
    def __init__(self, config: pb.ModelConfig, model_file: Path, context: BackendContext) -> None:
        self._config = config
        self._name = config.name
        self._model_file = model_file
        self._context = context
        number = next_instance_number(config.name)
        self._instance = f"{config.name}_0_{number}"
        self._decoupled = bool(config.model_transaction_policy.decoupled)
        self._lock = threading.Lock()
        self._batches: dict[int, _Batch] = {}
        self._batch_ids = itertools.count(1)
        self._stub: Stub | None = None
        self._reader: threading.Thread | None = None
        self._finalized = threading.Event()
        self._closing = False

    @staticmethod
    def load(config: pb.ModelConfig, version_dir: Path, context: BackendContext) -> PythonBackend:
        model_file = version_dir / (config.default_model_filename or "model.py")
        if not model_file.exists():
            raise Unavailable(f"model '{config.name}': unable to find '{model_file}'")
        if "EXECUTION_ENV_PATH" in config.parameters:
            log.warning(
                "model '%s': parameter EXECUTION_ENV_PATH is ignored; the stub runs in the worker's "
                "Python environment",
                config.name,
            )
        backend = PythonBackend(config, model_file, context)
        backend._start()
        log.info("loaded %s as instance %s", model_file, backend._instance)
        return backend

    def _start(self) -> None:
        """Spawn the stub and initialize the model in it; raises with the model's reason."""
        gpu = on_gpu(self._config, self._context.device)
        groups = list(self._config.instance_group)
        kind = "GPU" if gpu else "CPU"
        if groups and all(g.kind == pb.ModelInstanceGroup.KIND_MODEL for g in groups):
            kind = "MODEL"  # the model places itself
        args = {
            "model_config": json.dumps(cfg.config_to_json(self._config)),
            "model_instance_kind": kind,
            "model_instance_name": self._instance,
            "model_instance_device_id": str(self._context.device.index if gpu else 0),
            "model_repository": str(self._model_file.parent.parent),
            "model_version": self._model_file.parent.name,
            "model_name": self._name,
        }
        stub = spawn(self._instance)
        try:
            request_from(
                stub,
                INIT_TIMEOUT_S,
                "ready",
                {
                    "op": "init",
                    "args": args,
                    "model_file": str(self._model_file),
                    "decoupled": self._decoupled,
                    "output_names": [o.name for o in self._config.output],
                    "nats_url": self._context.nats_url,
                    "nats_auth": self._context.nats_auth.paths() if self._context.nats_auth else {},
                    "inbox_prefix": self._context.inbox_prefix,
                    "prefix": self._context.prefix,
                },
            )
        except Unavailable as exc:
            stub.channel.close()
            raise Unavailable(f"model '{self._name}': {exc.message}") from None
        with self._lock:
            self._stub = stub
        self._reader = threading.Thread(
            target=self._read, args=(stub,), name=f"{self._instance}-reader", daemon=True
        )
        self._reader.start()

    # -- requests -----------------------------------------------------------------------------

    def execute_requests(self, requests: list[InferRequest], sink: ResponseSink) -> None:
        with self._lock:
            stub = self._stub
        if stub is None:
            self._restart()
        batch_id = next(self._batch_ids)
        batch = _Batch(sink, [list(r.outputs) for r in requests], set(range(len(requests))))
        with self._lock:
            # Registered only while this stub is current: a stub that died since is seen here,
            # and one that dies from now on finds the batch and fails it (no wait without end).
            stub = self._stub
            if stub is None:
                raise Unavailable(
                    f"python model '{self._name}': the stub process of instance {self._instance} "
                    "died before the request could be sent"
                )
            self._batches[batch_id] = batch
        header = {
            "op": "execute",
            "batch": batch_id,
            "requests": [{"id": r.id, "outputs": r.outputs, "parameters": r.parameters} for r in requests],
        }
        inputs = [[WireTensor(t.name, t.datatype, t.data) for t in r.inputs] for r in requests]
        try:
            self._send_execute(stub.channel, header, inputs)
        except ChannelClosed:
            pass  # the reader sees the same death and fails this batch with the reason
        batch.done.wait()
        if not self._decoupled:
            with self._lock:
                self._batches.pop(batch_id, None)
        if batch.error is not None:
            raise batch.error

    @staticmethod
    def _send_execute(channel: Channel, header: dict[str, Any], inputs: list[list[WireTensor]]) -> None:
        # One tensor list per request: the channel lays them out one after another, and each
        # request's entry names its own.
        flat = {f"inputs{i}": tensors for i, tensors in enumerate(inputs)}
        for i, request in enumerate(header["requests"]):
            request["inputs"] = f"inputs{i}"
        channel.send(header, flat)

    def _restart(self) -> None:
        log.warning("python model '%s': starting a new stub for instance %s", self._name, self._instance)
        try:
            self._start()
        except NatronError as exc:
            raise Unavailable(
                f"python model '{self._name}': its stub process died and cannot restart: {exc.message}"
            ) from None

    def cancel(self, request_id: str) -> None:
        """The client of `request_id` went away: the model sees it in `request.is_cancelled()`."""
        with self._lock:
            stub = self._stub
        if stub is None or not request_id:
            return
        try:
            stub.channel.send({"op": "cancel", "id": request_id})
        except ChannelClosed:
            pass  # the stub is gone, and its requests with it

    # -- answers ------------------------------------------------------------------------------

    def _read(self, stub: Stub) -> None:
        try:
            while True:
                header, data = stub.channel.recv()
                op = header.get("op")
                if op == "response":
                    self._on_response(header, data)
                elif op == "done":
                    self._on_done(header)
                elif op == "finalized":
                    self._finalized.set()
                    return
        except ChannelClosed:
            pass
        except Exception:  # a malformed frame: treat the stub as dead rather than hang its requests
            log.exception("python model '%s': unreadable message from the stub", self._name)
        self._on_stub_exit(stub)

    def _on_response(self, header: dict[str, Any], data: memoryview) -> None:
        index = int(header["index"])
        with self._lock:
            batch = self._batches.get(int(header["batch"]))
            if batch is None or index not in batch.open:
                return  # a late answer to a request that already has its final one
            final = bool(header.get("final")) or not self._decoupled or "error" in header
            if final:
                batch.open.discard(index)
        if "error" in header:
            batch.sink(
                index, NatronError.from_status(int(header.get("status", 500)), str(header["error"])), True
            )
        elif "outputs" in header:
            wanted = batch.wanted[index]
            tensors = [
                Tensor(t.name, t.datatype, tuple(t.array.shape), t.array)
                for t in read_tensors(header["outputs"], data)
                if not wanted or t.name in wanted
            ]
            batch.sink(index, tensors, final)
        else:
            batch.sink(index, None, final)
        self._forget_if_finished(int(header["batch"]))

    def _on_done(self, header: dict[str, Any]) -> None:
        batch_id = int(header["batch"])
        with self._lock:
            batch = self._batches.get(batch_id)
        if batch is None:
            return
        if header.get("error"):
            batch.error = InternalError(f"python model '{self._name}': {header['error']}")
            with self._lock:
                self._batches.pop(batch_id, None)  # the instance answers what is still open
        batch.done.set()
        self._forget_if_finished(batch_id)

    def _forget_if_finished(self, batch_id: int) -> None:
        with self._lock:
            batch = self._batches.get(batch_id)
            if batch is not None and self._decoupled and batch.done.is_set() and not batch.open:
                del self._batches[batch_id]

    def _on_stub_exit(self, stub: Stub) -> None:
        with self._lock:
            if self._stub is stub:
                self._stub = None
            batches, self._batches = self._batches, {}
            closing = self._closing
        if closing:
            error: NatronError = Unavailable(
                f"python model '{self._name}' was unloaded while the request ran"
            )
        else:
            how = stub.exit_description()
            stub.kill()  # it may be alive but speaking garbage: it is of no further use
            open_count = sum(len(b.open) for b in batches.values())
            error = InternalError(
                f"python model '{self._name}': the stub process of instance {self._instance} "
                f"(pid {stub.process.pid}) {how} while running the request"
            )
            log.error(
                "python model '%s': the stub process of instance %s (pid %d) %s; %d request(s) "
                "in flight failed; a new stub starts on the next request",
                self._name,
                self._instance,
                stub.process.pid,
                how,
                open_count,
            )
        for batch in batches.values():
            for index in sorted(batch.open):
                batch.sink(index, error, True)
            batch.open.clear()
            batch.error = batch.error or error
            batch.done.set()
        stub.channel.close()

    def close(self) -> None:
        with self._lock:
            self._closing = True
            stub = self._stub
        if stub is None:
            return
        try:
            stub.channel.send({"op": "finalize"})
            if not self._finalized.wait(FINALIZE_TIMEOUT_S):
                log.warning(
                    "python model '%s': finalize() did not return within %.0f s",
                    self._name,
                    FINALIZE_TIMEOUT_S,
                )
        except ChannelClosed:
            pass
        try:
            stub.process.wait(timeout=STUB_EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            stub.kill()
        stub.channel.close()
        if self._reader is not None:
            self._reader.join(timeout=STUB_EXIT_TIMEOUT_S)
        self._on_stub_exit(stub)  # answers any stream still open (a no-op when none is)
