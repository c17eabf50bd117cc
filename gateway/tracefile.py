"""The trace file of the trace extension's triton mode: the traces a gateway samples, written as
tritonserver writes them (`--trace-config triton,file=PATH`), a JSON array of trace objects.

Writing never waits on the event loop: `submit` puts an encoded trace on a bounded queue and
returns; one task takes them off in batches and appends them in a thread. A trace that finds the
queue full is dropped and counted (`dropped`), as a trace is worth less than the requests' time.

The file is valid JSON whenever a batch has been written, not only at exit as Triton's is: a
file starts as `[<trace>]`, and each later trace overwrites the closing `]` with
`,\\n<trace>]`. So a trace file can be read while the gateway runs, and a gateway killed
mid-run leaves whole files behind (at worst missing the batch it was writing).

`log_frequency` (the deployment's global setting, read at each trace): 0 writes every trace to
PATH; N > 0 writes N traces to PATH.0, the next N to PATH.1, and so on, as Triton names them.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import IO, Any

import orjson

log = logging.getLogger(__name__)

# Traces waiting for the writer; past this, new ones are dropped (and counted).
QUEUE_SIZE = 4096


class TraceFile:
    """A trace file being written (see the module's docstring). `submit` and `close` run on
    the event loop; the file itself is touched only by the writer's thread."""

    def __init__(self, path: str, log_frequency: int = 0, *, queue_size: int = QUEUE_SIZE) -> None:
        self.path = path
        self.log_frequency = log_frequency
        self.written = 0
        self.dropped = 0
        self._queue_size = queue_size
        self._queue: asyncio.Queue[bytes | None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        # The writer thread's state: the open file, its name, its traces, the next index.
        self._file: IO[bytes] | None = None
        self._name = ""
        self._in_file = 0
        self._index = 0
        self._failed = False
        self._plain_used = False

    def submit(self, trace: dict[str, Any]) -> None:
        """Queue one trace object for the file; never waits. Dropped (and counted) when the
        writer is that far behind, or after `close`."""
        if self._closed:
            self.dropped += 1
            return
        if self._queue is None:
            self._queue = asyncio.Queue(self._queue_size)
            self._task = asyncio.get_running_loop().create_task(self._write_loop(), name="gateway-trace-file")
        try:
            self._queue.put_nowait(orjson.dumps(trace))
        except asyncio.QueueFull:
            if not self.dropped:
                log.warning("trace file %s: the writer is behind, dropping traces", self.path)
            self.dropped += 1

    async def close(self) -> None:
        """Write what is queued, then close the file."""
        self._closed = True
        if self._queue is not None and self._task is not None:
            await self._queue.put(None)
            await self._task
        await asyncio.to_thread(self._close_file)
        if self.dropped:
            log.warning("trace file %s: %d traces dropped", self.path, self.dropped)

    async def _write_loop(self) -> None:
        assert self._queue is not None
        queue = self._queue
        while True:
            blobs: list[bytes] = []
            item = await queue.get()
            done = item is None
            if item is not None:
                blobs.append(item)
            while not done and not queue.empty():
                item = queue.get_nowait()
                if item is None:
                    done = True
                else:
                    blobs.append(item)
            if blobs:
                try:
                    await asyncio.to_thread(self._append, blobs)
                except Exception:  # a bug here must not end tracing for good
                    log.exception("trace file %s: writing failed", self.path)
            if done:
                return

    # -- the writer's thread ---------------------------------------------------------------

    def _append(self, blobs: list[bytes]) -> None:
        if self._failed:
            self.dropped += len(blobs)
            return
        try:
            for blob in blobs:
                frequency = self.log_frequency
                plain = self._name == self.path
                if (
                    self._file is None
                    or (frequency == 0 and not plain)
                    or (frequency and (plain or self._in_file >= frequency))
                ):
                    self._open_next()
                assert self._file is not None
                if self._in_file:
                    self._file.seek(-1, os.SEEK_END)  # over the closing "]"
                    self._file.write(b",\n" + blob + b"]")
                else:
                    self._file.write(b"[" + blob + b"]")
                self._in_file += 1
                self.written += 1
            assert self._file is not None
            self._file.flush()
        except OSError as exc:
            # The file cannot be written (its disk is full, its directory went): said once,
            # and later traces are dropped rather than failing again on every one.
            self._failed = True
            self.dropped += len(blobs)
            log.error(
                "trace file %s cannot be written, tracing to it stops: %s", self._name or self.path, exc
            )

    def _open_next(self) -> None:
        self._close_file()
        self._in_file = 0
        if self.log_frequency == 0:
            self._name = self.path
            if self._plain_used:
                # Back to PATH after log_frequency was set and cleared: its traces stay.
                self._file = open(self._name, "r+b")
                self._in_file = 1
                return
            self._plain_used = True
        else:
            self._name = f"{self.path}.{self._index}"
            self._index += 1
        self._file = open(self._name, "wb")

    def _close_file(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError as exc:
                log.error("trace file %s: closing failed: %s", self._name, exc)
            self._file = None
