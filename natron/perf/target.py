"""What `natron perf` drives: the server, its protocol and the model, as one frozen value."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Final
from urllib.parse import urlsplit

from broker.subjects import check_name
from natron.errors import InvalidArgument
from natron.perf.results import PerfError

PROTOCOLS: Final = ("http", "grpc", "ws", "nats")
INPUT_DATA: Final = ("random", "zero")

# Where each protocol listens when the URL names no port (Triton's and NATS's defaults).
_DEFAULT_PORTS: Final = {"http": 8000, "grpc": 8001, "ws": 8000, "nats": 4222}


@dataclass(frozen=True, slots=True)
class Target:
    url: str  # http://host:port | grpc://host:port | ws://host:port | nats://host:port[,nats://...]
    protocol: str  # "http" | "grpc" | "ws" | "nats"
    model: str
    version: str = ""  # "" = the highest READY version
    binary: bool = True  # http/ws: the binary tensor data extension; False = JSON tensors
    batch_size: int = 1
    # perf_analyzer's --shape: the dims (without the batch dim) of inputs with variable dims.
    shapes: Mapping[str, tuple[int, ...]] = field(default_factory=lambda: MappingProxyType({}))
    input_data: str = "random"  # "random" | "zero"
    stats_url: str = ""  # HTTP base of the statistics extension; default: url when http/ws
    timeout_s: float = 30.0
    nats_creds: Path | None = None  # an nkey seed or a .creds file, for protocol "nats"
    prefix: str = "natron"  # the NATS subject prefix of the deployment
    # gRPC: every request on one ModelStreamInfer stream (perf_analyzer's --streaming), the way
    # a decoupled model is driven over gRPC.
    streaming: bool = False
    nats_tls_ca: Path | None = None
    nats_tls_cert: Path | None = None
    nats_tls_key: Path | None = None

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise PerfError(f"unknown protocol '{self.protocol}' (one of {', '.join(PROTOCOLS)})")
        if not self.model:
            raise PerfError("no model named")
        if self.batch_size < 1:
            raise PerfError(f"batch size must be at least 1, got {self.batch_size}")
        if self.input_data not in INPUT_DATA:
            raise PerfError(f"input data must be one of {', '.join(INPUT_DATA)}, got '{self.input_data}'")
        if self.streaming and self.protocol != "grpc":
            raise PerfError(f"streaming applies to gRPC only, not {self.protocol}")
        if not self.timeout_s > 0:
            raise PerfError(f"timeout must be positive, got {self.timeout_s}")
        for name, dims in self.shapes.items():
            if any(d < 0 for d in dims):
                raise PerfError(f"shape of '{name}' has a negative dimension: {list(dims)}")
        try:
            check_name("prefix", self.prefix)
        except InvalidArgument as exc:
            raise PerfError(str(exc)) from None
        object.__setattr__(self, "url", normalize_url(self.url, self.protocol))

    @property
    def http_base(self) -> str:
        """http://host:port of the HTTP endpoint (http and ws targets)."""
        if self.protocol == "ws":
            return "http" + self.url.removeprefix("ws")
        return self.url

    @property
    def grpc_address(self) -> str:
        """host:port, as the gRPC client wants it."""
        return self.url.removeprefix("grpc://")

    @property
    def statistics_base(self) -> str:
        """Where the statistics extension is asked over HTTP; "" for none (gRPC asks its own)."""
        if self.stats_url:
            return normalize_url(self.stats_url, "http")
        return self.http_base if self.protocol in ("http", "ws") else ""


def normalize_url(url: str, protocol: str) -> str:
    """`url` with the scheme the protocol speaks and a port: perf_analyzer's `-u` takes a bare
    host:port (`localhost:8000`), so that is accepted too. A scheme of another protocol is a
    mistake worth naming (`-i grpc -u http://...`)."""
    if protocol == "nats":
        parts = [p.strip() for p in url.split(",") if p.strip()]
        if not parts:
            raise PerfError(f"no NATS server in URL '{url}'")
        return ",".join(_one_url(p, "nats") for p in parts)
    return _one_url(url, protocol)


def _one_url(url: str, protocol: str) -> str:
    schemes = {"http": ("http", "https"), "ws": ("ws", "wss", "http", "https"), "grpc": ("grpc",)}
    allowed = schemes.get(protocol, (protocol,))
    text = url.strip()
    if "://" not in text:
        text = f"{allowed[0]}://{text}"
    parts = urlsplit(text)
    if parts.scheme not in allowed:
        raise PerfError(f"URL '{url}' does not fit protocol {protocol} (expected {allowed[0]}://host:port)")
    if not parts.hostname:
        raise PerfError(f"URL '{url}' names no host")
    try:
        port = parts.port or _DEFAULT_PORTS[protocol]
    except ValueError:
        raise PerfError(f"URL '{url}' has a bad port") from None
    scheme = parts.scheme
    if protocol == "ws" and scheme.startswith("http"):
        scheme = scheme.replace("http", "ws")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{scheme}://{host}:{port}"
