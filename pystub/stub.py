"""Host one instance of a Triton Python-backend model: import model.py, `initialize(args)`, serve
`execute(requests)` calls as the worker sends them, `finalize()` when asked.

Everything the model does wrong comes back to the worker as text that names it (the exception,
and the line of the model's own file it came from), so the worker can report it as the reason
a model is UNAVAILABLE or as a request's error. The main thread runs the model; the model may
send responses from any thread (decoupled models usually do), and the channel serialises them.
"""

from __future__ import annotations

import collections
import importlib.util
import inspect
import logging
import queue
import sys
import threading
import traceback
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

from broker.auth import ClientAuth
from pystub import triton_python_backend_utils as pb
from pystub.mesh import Mesh
from pystub.protocol import Channel, ChannelClosed, WireTensor, read_tensors

log = logging.getLogger(__name__)


# Cancelled request ids remembered (a stream's cancel may arrive before or after its execute).
_CANCEL_MEMORY = 4096


class ModelHost:
    def __init__(self, channel: Channel) -> None:
        self._channel = channel
        self._model: Any = None
        self._model_dir = ""
        self._decoupled = False
        self._async_execute = False
        self._output_names: list[str] = []
        self._mesh: Mesh | None = None
        self._inbox: queue.SimpleQueue[tuple[dict[str, Any], memoryview] | None] = queue.SimpleQueue()
        self._cancelled: collections.OrderedDict[str, None] = collections.OrderedDict()

    def serve(self) -> int:
        """Handle messages until finalize (0) or until the worker goes away (1).

        A thread of its own reads the channel, so that a cancellation reaches `is_cancelled()`
        while `execute` still runs on this one.
        """
        threading.Thread(target=self._receive, name="stub-receiver", daemon=True).start()
        while True:
            message = self._inbox.get()
            if message is None:
                log.warning("the worker closed the connection; exiting")
                return 1
            header, data = message
            op = header.get("op")
            if op == "execute":
                try:
                    self._execute(header, data)
                except ChannelClosed:
                    log.warning("the worker closed the connection; exiting")
                    return 1
                except Exception as exc:  # a fault of the stub itself: answer, keep serving
                    log.exception("execute failed in the stub")
                    self._done(int(header.get("batch", 0)), f"the stub failed: {type(exc).__name__}: {exc}")
            elif op == "init":
                self._init(header)
            elif op == "finalize":
                self._finalize()
                return 0
            elif op == "autocomplete":
                self._autocomplete(header)
                return 0
            else:
                log.error("unknown message %r from the worker", op)

    def _receive(self) -> None:
        while True:
            try:
                header, data = self._channel.recv()
            except ChannelClosed:
                self._inbox.put(None)
                return
            if header.get("op") == "cancel":
                self._cancelled[str(header.get("id", ""))] = None
                while len(self._cancelled) > _CANCEL_MEMORY:
                    self._cancelled.popitem(last=False)
            else:
                self._inbox.put((header, data))

    def _is_cancelled(self, request_id: str) -> bool:
        return bool(request_id) and request_id in self._cancelled

    # -- loading ------------------------------------------------------------------------------

    def _import_model(self, model_file: str) -> type[Any]:
        path = Path(model_file)
        self._model_dir = str(path.parent)
        # Triton's utilities under the name model code imports them by; no package of that name
        # is installed anywhere.
        sys.modules["triton_python_backend_utils"] = pb
        # Modules next to model.py import as they do under Triton.
        sys.path.insert(0, self._model_dir)
        spec = importlib.util.spec_from_file_location("model", path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot import {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules["model"] = module
        try:
            spec.loader.exec_module(module)
        except BaseException as exc:
            raise _Failure(f"failed to import {path.name}: {self._describe(exc)}") from None
        return self._model_class(module, path)

    @staticmethod
    def _model_class(module: ModuleType, path: Path) -> type[Any]:
        cls = getattr(module, "TritonPythonModel", None)
        if not inspect.isclass(cls):
            raise _Failure(f"{path.name} defines no class TritonPythonModel")
        if not callable(getattr(cls, "execute", None)):
            raise _Failure(f"{path.name}: TritonPythonModel has no execute(requests) method")
        return cls

    def _init(self, header: dict[str, Any]) -> None:
        try:
            self._mesh = Mesh(
                header.get("nats_url", ""),
                header.get("prefix", "natron"),
                ClientAuth.from_paths(header.get("nats_auth") or {}),
                header.get("inbox_prefix") or None,
            )
            mesh = self._mesh
            pb._install_mesh(lambda: mesh)
            cls = self._import_model(header["model_file"])
            self._decoupled = bool(header.get("decoupled", False))
            self._output_names = list(header.get("output_names", []))
            try:
                self._model = cls()
                initialize = getattr(self._model, "initialize", None)
                if callable(initialize):
                    result = initialize(dict(header["args"]))
                    if inspect.iscoroutine(result):
                        mesh.run(result)
            except BaseException as exc:
                raise _Failure(f"initialize() raised {self._describe(exc)}") from None
            self._async_execute = inspect.iscoroutinefunction(self._model.execute)
        except _Failure as failure:
            self._channel.send({"op": "init_error", "message": str(failure)})
            return
        self._channel.send({"op": "ready"})

    def _autocomplete(self, header: dict[str, Any]) -> None:
        try:
            cls = self._import_model(header["model_file"])
            complete = getattr(cls, "auto_complete_config", None)
            config = pb.ModelConfig(header["config"])
            if callable(complete):
                try:
                    returned = complete(config)
                except BaseException as exc:
                    raise _Failure(f"auto_complete_config() raised {self._describe(exc)}") from None
                if not isinstance(returned, pb.ModelConfig):
                    raise _Failure("auto_complete_config() must return the pb_utils.ModelConfig it was given")
                config = returned
        except _Failure as failure:
            self._channel.send({"op": "init_error", "message": str(failure)})
            return
        self._channel.send({"op": "autocompleted", "config": config.as_dict()})

    # -- serving ------------------------------------------------------------------------------

    def _execute(self, header: dict[str, Any], data: memoryview) -> None:
        batch = int(header["batch"])
        requests: list[pb.InferenceRequest] = []
        for index, raw in enumerate(header["requests"]):
            # Each request names the header key that lists its input tensors.
            tensors = [pb.Tensor(t.name, t.array) for t in read_tensors(header[raw["inputs"]], data)]
            request = pb.InferenceRequest(
                inputs=tensors,
                requested_output_names=list(raw["outputs"]) or list(self._output_names),
                request_id=raw.get("id", ""),
                parameters=raw.get("parameters") or {},
            )
            cancelled = partial(self._is_cancelled, request.request_id())
            request._bind(pb.InferenceResponseSender(partial(self._send, batch, index), cancelled), cancelled)
            requests.append(request)
        try:
            if self._async_execute:
                assert self._mesh is not None
                returned = self._mesh.run(self._model.execute(requests))
            else:
                returned = self._model.execute(requests)
        except Exception as exc:
            self._done(batch, f"execute() raised {self._describe(exc)}")
            return
        if self._decoupled:
            if returned is not None:
                self._done(
                    batch,
                    "a decoupled model's execute() must return None and answer through response senders",
                )
                return
        elif returned is not None:
            if not isinstance(returned, list | tuple) or len(returned) != len(requests):
                count = len(returned) if isinstance(returned, list | tuple) else type(returned).__name__
                self._done(
                    batch,
                    f"execute() returned {count} response(s) for {len(requests)} request(s): "
                    "it must return one InferenceResponse per request",
                )
                return
            for index, response in enumerate(returned):
                if not isinstance(response, pb.InferenceResponse):
                    self._send_error(
                        batch,
                        index,
                        f"execute() returned {type(response).__name__}, not an InferenceResponse",
                        500,
                    )
                else:
                    self._send(batch, index, response, True)
        self._done(batch, None)

    def _send(self, batch: int, index: int, response: pb.InferenceResponse | None, final: bool) -> None:
        if response is None:
            self._channel.send({"op": "response", "batch": batch, "index": index, "final": final})
            return
        error = response.error()
        if error is not None:
            self._send_error(batch, index, error.message(), pb.status_of(error))
            return
        try:
            tensors = []
            for tensor in response.output_tensors():
                if not isinstance(tensor, pb.Tensor):
                    raise TypeError(f"output_tensors holds a {type(tensor).__name__}, not a pb_utils.Tensor")
                tensors.append(WireTensor(tensor.name(), tensor.datatype(), tensor.as_numpy()))
            self._channel.send(
                {"op": "response", "batch": batch, "index": index, "final": final}, {"outputs": tensors}
            )
        except ChannelClosed:
            raise
        except Exception as exc:
            self._send_error(batch, index, f"response cannot be sent: {type(exc).__name__}: {exc}", 500)

    def _send_error(self, batch: int, index: int, message: str, status: int) -> None:
        self._channel.send(
            {
                "op": "response",
                "batch": batch,
                "index": index,
                "final": True,
                "error": message,
                "status": status,
            }
        )

    def _done(self, batch: int, error: str | None) -> None:
        self._channel.send({"op": "done", "batch": batch, "error": error})

    def _finalize(self) -> None:
        finalize = getattr(self._model, "finalize", None)
        if callable(finalize):
            try:
                result = finalize()
                if inspect.iscoroutine(result) and self._mesh is not None:
                    self._mesh.run(result)
            except Exception as exc:
                log.error("finalize() raised %s", self._describe(exc))
        if self._mesh is not None:
            self._mesh.close()
        try:
            self._channel.send({"op": "finalized"})
        except ChannelClosed:
            pass

    def _describe(self, exc: BaseException) -> str:
        """`Type: message (file, line N)`, naming the innermost line of the model's own files."""
        where = ""
        if isinstance(exc, SyntaxError) and exc.filename:
            where = f" ({Path(exc.filename).name}, line {exc.lineno})"
        else:
            for frame in reversed(traceback.extract_tb(exc.__traceback__)):
                if frame.filename.startswith(self._model_dir + "/"):
                    where = f" ({Path(frame.filename).name}, line {frame.lineno})"
                    break
        return f"{type(exc).__name__}: {exc}{where}"


class _Failure(Exception):
    """A load step failed; the text is the reason the worker reports."""
