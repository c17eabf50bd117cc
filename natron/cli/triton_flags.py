"""tritonserver's command line, read as natron's: a Triton user's flags work wherever they mean
something here, and the others are refused by name, with the reason.

Every flag of `tritonserver --help` (TRITONSERVER_FLAGS) is one of four kinds:

- a natron setting under Triton's name. A field is named after Triton's flag (`--http-port`,
  `--allow-grpc`, `--metrics-config`, ...) or takes Triton's spelling as well
  (natron.settings.TRITON_SPELLINGS: `--exit-timeout-secs`, `--http-thread-count`,
  `--model-store`); natron/cli/main.py adds both from the settings, nothing here.
- translated into natron settings: `--log-verbose`, `--log-info`, `--log-warning` and
  `--log-error` into `log_level`; the `--backend-config` settings that mean something here
  into theirs; Triton's deprecated `--trace-file`, `--trace-level`, `--trace-rate`,
  `--trace-count` and `--trace-log-frequency` into `trace_config` entries (`translate`).
- accepted with the one value natron behaves as (`--exit-on-error=false`), so that a command
  line written for Triton runs unchanged; any other value is refused, with the reason.
- refused, with the reason (REFUSED), and so is a flag of another subcommand: `natron worker
  --http-port` names the subcommands that take it.

A setting natron would not apply is refused rather than ignored with a warning: a server that
starts is then a server that does what its command line says.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

from pydantic import TypeAdapter, ValidationError

from natron.settings import LogLevel, SettingsError

# The release whose `tritonserver --help` TRITONSERVER_FLAGS lists (the nvidia-pytriton wheel's).
TRITONSERVER_VERSION = "2.41.0"

TRITONSERVER_FLAGS: tuple[str, ...] = (
    # Server
    "--id", "--exit-timeout-secs",
    # Logging
    "--log-verbose", "--log-info", "--log-warning", "--log-error", "--log-format", "--log-file",
    # Model repository
    "--model-store", "--model-repository", "--exit-on-error", "--disable-auto-complete-config",
    "--strict-readiness", "--model-control-mode", "--repository-poll-secs", "--load-model",
    "--model-load-thread-count", "--model-namespacing",
    # HTTP
    "--allow-http", "--http-address", "--http-port", "--reuse-http-port",
    "--http-header-forward-pattern", "--http-thread-count", "--http-restricted-api",
    # gRPC
    "--allow-grpc", "--grpc-address", "--grpc-port", "--reuse-grpc-port",
    "--grpc-header-forward-pattern", "--grpc-infer-allocation-pool-size", "--grpc-use-ssl",
    "--grpc-use-ssl-mutual", "--grpc-server-cert", "--grpc-server-key", "--grpc-root-cert",
    "--grpc-infer-response-compression-level", "--grpc-keepalive-time", "--grpc-keepalive-timeout",
    "--grpc-keepalive-permit-without-calls", "--grpc-http2-max-pings-without-data",
    "--grpc-http2-min-recv-ping-interval-without-data", "--grpc-http2-max-ping-strikes",
    "--grpc-restricted-protocol",
    # SageMaker, Vertex AI
    "--allow-sagemaker", "--sagemaker-port", "--sagemaker-safe-port-range", "--sagemaker-thread-count",
    "--allow-vertex-ai", "--vertex-ai-port", "--vertex-ai-thread-count", "--vertex-ai-default-model",
    # Metrics
    "--allow-metrics", "--allow-gpu-metrics", "--allow-cpu-metrics", "--metrics-address",
    "--metrics-port", "--metrics-interval-ms", "--metrics-config",
    # Tracing, backends, repository agents, the response cache, the rate limiter
    "--trace-config", "--backend-directory", "--backend-config", "--repoagent-directory",
    "--cache-config", "--cache-directory", "--rate-limit", "--rate-limit-resource",
    # Memory and devices
    "--pinned-memory-pool-byte-size", "--cuda-memory-pool-byte-size", "--cuda-virtual-address-size",
    "--min-supported-compute-capability", "--buffer-manager-thread-count", "--host-policy",
    "--model-load-gpu-limit",
    # Deprecated in Triton
    "--strict-model-config", "--response-cache-byte-size", "--trace-file", "--trace-level",
    "--trace-rate", "--trace-count", "--trace-log-frequency",
)  # fmt: skip

_TLS = "natron's gRPC listens without TLS: terminate TLS in front of it (a proxy, the ingress)"
_GRPC_TUNING = (
    "a tuning knob of Triton's own gRPC server; natron's keeps grpcio's defaults for it (its idle and "
    "handshake bounds follow --http-keepalive-timeout-s and --http-request-read-timeout-s)"
)
_SAGEMAKER = "natron has no SageMaker endpoint"
_VERTEX = "natron has no Vertex AI endpoint"
_CACHE = "natron has no response cache"
_MEMORY = "natron leaves device and pinned memory to the frameworks (ONNX Runtime, PyTorch, TensorRT)"

REFUSED: dict[str, str] = {
    "--id": "natron names itself in the server metadata; --prefix tells deployments apart",
    "--log-file": "natron's processes log to stderr: redirect it, or let the supervisor "
    "(systemd, Docker, Kubernetes) keep it",
    "--disable-auto-complete-config": "natron always completes a model's configuration "
    "(ONNX from the model file, Python from auto_complete_config)",
    "--http-header-forward-pattern": "natron forwards no HTTP header as a request parameter",
    "--grpc-header-forward-pattern": "natron forwards no gRPC header as a request parameter",
    "--grpc-infer-allocation-pool-size": _GRPC_TUNING,
    "--grpc-server-cert": _TLS,
    "--grpc-server-key": _TLS,
    "--grpc-root-cert": _TLS,
    "--grpc-infer-response-compression-level": _GRPC_TUNING,
    "--grpc-keepalive-time": _GRPC_TUNING,
    "--grpc-keepalive-timeout": _GRPC_TUNING,
    "--grpc-keepalive-permit-without-calls": _GRPC_TUNING,
    "--grpc-http2-max-pings-without-data": _GRPC_TUNING,
    "--grpc-http2-min-recv-ping-interval-without-data": _GRPC_TUNING,
    "--grpc-http2-max-ping-strikes": _GRPC_TUNING,
    "--sagemaker-port": _SAGEMAKER,
    "--sagemaker-safe-port-range": _SAGEMAKER,
    "--sagemaker-thread-count": _SAGEMAKER,
    "--vertex-ai-port": _VERTEX,
    "--vertex-ai-thread-count": _VERTEX,
    "--vertex-ai-default-model": _VERTEX,
    "--metrics-address": "the metrics endpoint binds --http-address",
    "--backend-directory": "natron's backends (ONNX Runtime, PyTorch, TensorRT, Python) are part "
    "of natron, not shared libraries to look for",
    "--repoagent-directory": "natron has no repository agents",
    "--cache-config": _CACHE,
    "--cache-directory": _CACHE,
    "--response-cache-byte-size": _CACHE,
    "--rate-limit-resource": "natron has no rate limiter: its workers pull requests as their capacity allows",
    "--pinned-memory-pool-byte-size": _MEMORY,
    "--cuda-memory-pool-byte-size": _MEMORY,
    "--cuda-virtual-address-size": _MEMORY,
    "--min-supported-compute-capability": "a worker serves the device it is given: leave a GPU "
    "out with CUDA_VISIBLE_DEVICES, or run natron worker --device for each one to serve",
    "--buffer-manager-thread-count": "natron copies tensors in the worker that runs the model, "
    "with no buffer manager to size",
    "--host-policy": "pin a worker to cores or a NUMA node with taskset or numactl",
    "--model-load-gpu-limit": "natron places model instances on the workers' devices without a "
    "memory limit per GPU",
}

_BOOL = TypeAdapter(bool)


@dataclass(slots=True, frozen=True)
class Behaviour:
    """A tritonserver flag natron takes with one value only: the one it behaves as."""

    value: str
    why_not_otherwise: str
    # How a given value compares: the same spelling rules as the flag's type in Triton.
    kind: str = "bool"  # bool, word or number

    def matches(self, given: str) -> bool:
        """Whether `given` means natron's value; ValueError when it is no value of the kind."""
        if self.kind == "bool":
            try:
                return _BOOL.validate_python(given) == _BOOL.validate_python(self.value)
            except ValidationError:
                raise ValueError("expected true or false") from None
        if self.kind == "number":
            try:
                return float(given) == float(self.value)
            except ValueError:
                raise ValueError("expected a number") from None
        return given.lower() == self.value.lower()


NATRON_BEHAVIOUR: dict[str, Behaviour] = {
    "--exit-on-error": Behaviour(
        "false", "natron keeps serving when a model fails to load: that model is UNAVAILABLE, with its reason"
    ),
    "--model-namespacing": Behaviour(
        "false", "a model's name is unique in a deployment: it names the model's NATS subjects"
    ),
    "--reuse-http-port": Behaviour(
        "false",
        "natron's own gateway processes share the HTTP port (--http-workers); "
        "it joins no port that another server holds",
    ),
    "--reuse-grpc-port": Behaviour("false", "natron joins no gRPC port that another server holds"),
    "--grpc-use-ssl": Behaviour("false", _TLS),
    "--grpc-use-ssl-mutual": Behaviour("false", _TLS),
    "--allow-sagemaker": Behaviour("false", _SAGEMAKER),
    "--allow-vertex-ai": Behaviour("false", _VERTEX),
    "--allow-gpu-metrics": Behaviour("true", "the metrics carry the figures of every GPU a worker serves"),
    "--allow-cpu-metrics": Behaviour("false", "natron's metrics carry no CPU figures (nv_cpu_*)"),
    "--metrics-interval-ms": Behaviour(
        "2000",
        "a worker samples its GPU with each heartbeat, every 2 s (Triton's default); "
        "the other metrics are current at each scrape",
        kind="number",
    ),
    "--rate-limit": Behaviour(
        "off", "natron has no rate limiter: its workers pull requests as their capacity allows", kind="word"
    ),
    "--strict-model-config": Behaviour(
        "false",
        "natron always completes a model's configuration (ONNX from the model file, "
        "Python from auto_complete_config)",
    ),
}

# --log-verbose/--log-info/--log-warning/--log-error: the argparse destinations they fill.
_LOG_DESTS = {
    "--log-verbose": "tritonserver_log_verbose",
    "--log-info": "tritonserver_log_info",
    "--log-warning": "tritonserver_log_warning",
    "--log-error": "tritonserver_log_error",
}
_BACKEND_CONFIG_DEST = "tritonserver_backend_config"
# Triton's deprecated trace flags: (argparse destination, the --trace-config setting each is,
# metavar, help). Each is a --trace-config entry, as Triton reads it.
_TRACE_FLAGS: dict[str, tuple[str, str, str, str]] = {
    "--trace-file": (
        "tritonserver_trace_file",
        "triton,file",
        "PATH",
        "--trace-config triton,file=PATH [default: none]",
    ),
    "--trace-level": (
        "tritonserver_trace_level",
        "level",
        "LEVEL",
        "--trace-config level=LEVEL: TIMESTAMPS, TENSORS or OFF (repeatable) [default OFF]",
    ),
    "--trace-rate": ("tritonserver_trace_rate", "rate", "N", "--trace-config rate=N [default 1000]"),
    "--trace-count": (
        "tritonserver_trace_count",
        "count",
        "N",
        "--trace-config count=N [default -1: no end]",
    ),
    "--trace-log-frequency": (
        "tritonserver_trace_log_frequency",
        "triton,log-frequency",
        "N",
        "--trace-config triton,log-frequency=N [default 0]",
    ),
}
_SEVERITIES: tuple[LogLevel, ...] = ("debug", "info", "warning", "error")


def _bool(text: str) -> bool:
    try:
        return _BOOL.validate_python(text)
    except ValidationError:
        raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}") from None


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, not {text!r}")
    return value


class _TakenAs(argparse.Action):
    """A tritonserver flag with the value natron behaves as: nothing to set; otherwise refused."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        # Bare, it is refused with the reason rather than with argparse's "expected one argument".
        super().__init__(option_strings, dest, nargs="?", **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option: str | None = None,
    ) -> None:
        flag = self.option_strings[0]
        behaviour = NATRON_BEHAVIOUR[flag]
        given = flag if values is None else f"{flag}={values}"
        if values is not None:
            try:
                if behaviour.matches(str(values)):
                    return
            except ValueError as exc:
                _exit(parser, f"{flag}={values!r}: {exc}")
        _exit(
            parser,
            f"{given} is a tritonserver setting natron does not support: {behaviour.why_not_otherwise}; "
            f"natron takes {flag}={behaviour.value} only, its behaviour",
        )


class RefusedFlag(argparse.Action):
    """A tritonserver flag this subcommand does not take: refused by name, with the reason."""

    def __init__(self, option_strings: list[str], dest: str, why: str, **kwargs: Any) -> None:
        self.why = why
        # A value, if one follows, goes with the flag rather than being read as something else.
        super().__init__(option_strings, dest, nargs="?", help=argparse.SUPPRESS, **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option: str | None = None,
    ) -> None:
        _exit(parser, self.why)


def _exit(parser: argparse.ArgumentParser, message: str) -> NoReturn:
    parser.exit(2, f"{parser.prog}: {message}\n")


def add_translated(parser: argparse.ArgumentParser, fields: Mapping[str, object]) -> None:
    """The tritonserver flags that `translate` turns into settings of a model with `fields`,
    and those natron takes with the value it behaves as, each with its help line."""
    group = parser.add_argument_group(
        f"tritonserver's flags (Triton {TRITONSERVER_VERSION}; the others are refused by name)"
    )
    if "log_level" in fields:
        group.add_argument(
            "--log-verbose",
            dest=_LOG_DESTS["--log-verbose"],
            type=_count,
            metavar="N",
            help="1 or more: log at debug (--log-level debug) [default 0]",
        )
        for severity in ("info", "warning", "error"):
            flag = f"--log-{severity}"
            group.add_argument(
                flag,
                dest=_LOG_DESTS[flag],
                type=_bool,
                metavar="{true,false}",
                help=f"log {severity} messages; natron logs from one level up, so false here "
                f"turns off the lower ones too [default true]",
            )
    if "cpu_threads" in fields:
        group.add_argument(
            "--backend-config",
            dest=_BACKEND_CONFIG_DEST,
            action="append",
            metavar="BACKEND,SETTING=VALUE",
            help="onnxruntime,intra_op_thread_count=N is --cpu-threads N; see docs/deployment.md for "
            "the others (repeatable) [default: none]",
        )
    if "trace_config" in fields:
        for flag, (dest, _, metavar, help_line) in _TRACE_FLAGS.items():
            group.add_argument(
                flag,
                dest=dest,
                action="append" if flag == "--trace-level" else "store",
                metavar=metavar,
                help=f"deprecated in Triton: {help_line}",
            )
    for flag, behaviour in NATRON_BEHAVIOUR.items():
        group.add_argument(
            flag,
            action=_TakenAs,
            metavar=f"{{{behaviour.value}}}",
            help=f"only {behaviour.value}: {behaviour.why_not_otherwise} [default {behaviour.value}]",
        )


def refuse_the_rest(parsers: Mapping[str, argparse.ArgumentParser]) -> None:
    """Every tritonserver flag a subcommand has not taken is refused there by name: with the
    reason natron has none, or naming the subcommands that take it."""
    taken = {command: set(parser._option_string_actions) for command, parser in parsers.items()}
    for command, parser in parsers.items():
        for flag in TRITONSERVER_FLAGS:
            if flag in taken[command]:
                continue
            elsewhere = [f"natron {other}" for other in parsers if flag in taken[other]]
            if flag in REFUSED:
                why = f"{flag} is a tritonserver flag natron does not support: {REFUSED[flag]}"
            elif not elsewhere:
                raise ValueError(f"{flag}: no subcommand takes it, and REFUSED says not why")
            else:
                why = (
                    f"{flag} is a tritonserver flag natron {command} does not take ({_listed(elsewhere)} do)"
                )
            parser.add_argument(flag, action=RefusedFlag, dest=argparse.SUPPRESS, why=why)


def _listed(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def translate(flags: dict[str, Any]) -> dict[str, Any]:
    """`flags` (the command line's, as argparse left them) with the translated tritonserver
    flags turned into natron settings. SettingsError when they cannot be."""
    settings = {k: v for k, v in flags.items() if not k.startswith("tritonserver_")}
    logs = {flag: flags[dest] for flag, dest in _LOG_DESTS.items() if dest in flags}
    if logs:
        if "log_level" in settings:
            raise SettingsError(
                "--log-level and tritonserver's --log-verbose/--log-info/--log-warning/--log-error "
                "set the same thing: give one or the other"
            )
        settings["log_level"] = log_level(logs)
    deprecated = trace_entries(flags)
    if deprecated:
        # Before --trace-config's own entries, which win where both set one (the later entry).
        settings["trace_config"] = [*deprecated, *settings.get("trace_config", ())]
    if _BACKEND_CONFIG_DEST in flags:
        for field, value in backend_config(flags[_BACKEND_CONFIG_DEST]).items():
            if field in settings and str(settings[field]) != str(value):
                raise SettingsError(
                    f"--backend-config sets {field} to {value} and --{field.replace('_', '-')} "
                    f"to {settings[field]}: give one"
                )
            settings[field] = value
    return settings


def trace_entries(flags: Mapping[str, Any]) -> list[str]:
    """Triton's deprecated trace flags given in `flags` as the --trace-config entries they are."""
    entries: list[str] = []
    for dest, setting, _, _ in _TRACE_FLAGS.values():
        value = flags.get(dest)
        if value is None:
            continue
        for one in value if isinstance(value, list) else [value]:
            entries.append(f"{setting}={one}")
    return entries


def log_level(given: Mapping[str, Any]) -> LogLevel:
    """natron's one level from Triton's switch per severity. natron logs a level and every
    level above it, so a severity off below one on cannot be done, nor errors off."""
    on = {
        "debug": int(given.get("--log-verbose", 0)) > 0,
        "info": bool(given.get("--log-info", True)),
        "warning": bool(given.get("--log-warning", True)),
        "error": bool(given.get("--log-error", True)),
    }
    if not on["error"]:
        raise SettingsError("--log-error=false: natron always logs errors")
    lowest = next(severity for severity in _SEVERITIES if on[severity])
    for severity in _SEVERITIES[_SEVERITIES.index(lowest) :]:
        if not on[severity]:
            below = "--log-verbose" if lowest == "debug" else f"--log-{lowest}"
            raise SettingsError(
                f"--log-{severity}=false with {below} on: natron logs one level and every level "
                f"above it, so it cannot show {lowest} messages and hide {severity} ones"
            )
    return lowest


# Why a --backend-config setting natron has no use for is refused, by backend.
_BACKEND_WHY: dict[str, str] = {
    "onnxruntime": "natron's ONNX Runtime backend has no such setting; a model's own config.pbtxt "
    "parameters (intra_op_thread_count, inter_op_thread_count, ...) apply as in Triton",
    "pytorch": "natron's PyTorch backend reads its settings from each model's config.pbtxt "
    "parameters (INTRA_OP_THREAD_COUNT, INTER_OP_THREAD_COUNT, ...), as Triton's does",
    "python": "natron's Python models talk to their worker over a socket, with no shared-memory "
    "region or stub timeout to set",
    "tensorrt": "natron's TensorRT backend has no server-wide settings",
}


def backend_config(items: list[str]) -> dict[str, Any]:
    """The natron settings Triton's `--backend-config` settings stand for (the last of a
    repeated one wins, as in Triton).

    - onnxruntime,intra_op_thread_count=N: cpu_threads, which only ONNX Runtime sessions read
      (a worker gives each session N intra-op threads, where Triton's global pool would share N).
    - onnxruntime,enable-global-threadpool=0, and default-max-batch-size=4 (global or
      onnxruntime's): what natron does already.
    - Anything else: refused, by backend and setting."""
    # Imported here: the model configuration's module brings protobuf, which parsing the
    # command line of every process should not pay for.
    from natron.config import DEFAULT_MAX_BATCH_SIZE

    settings: dict[str, Any] = {}
    for item in items:
        backend, setting, value = _split_backend_config(item)
        where = f"--backend-config {item}"
        if (backend, setting) == ("onnxruntime", "intra_op_thread_count"):
            settings["cpu_threads"] = _whole(where, value)
        elif (backend, setting) == ("onnxruntime", "enable-global-threadpool"):
            if _whole(where, value) != 0:
                raise SettingsError(
                    f"{where}: natron has no global thread pool; each ONNX Runtime session has its own "
                    "(enable-global-threadpool=0, natron's behaviour, is accepted)"
                )
        elif setting == "default-max-batch-size" and backend in ("", "onnxruntime"):
            if _whole(where, value) != DEFAULT_MAX_BATCH_SIZE:
                raise SettingsError(
                    f"{where}: natron completes a batching ONNX model's configuration with "
                    f"max_batch_size {DEFAULT_MAX_BATCH_SIZE}; set max_batch_size in its config.pbtxt "
                    f"(default-max-batch-size={DEFAULT_MAX_BATCH_SIZE} is accepted)"
                )
        else:
            why = _BACKEND_WHY.get(backend, f"natron has no '{backend}' backend" if backend else "")
            raise SettingsError(
                f"{where}: a tritonserver backend setting natron does not support"
                + (f": {why}" if why else ": natron has no such global setting")
            )
    return settings


def _split_backend_config(item: str) -> tuple[str, str, str]:
    """Triton's `<backend>,<setting>=<value>`, or `<setting>=<value>` for every backend."""
    head, equals, value = item.partition("=")
    backend, comma, setting = head.partition(",")
    if not comma:
        backend, setting = "", head
    if not equals or not setting.strip() or (comma and not backend.strip()):
        raise SettingsError(f"--backend-config {item!r}: expected <backend>,<setting>=<value>")
    return backend.strip(), setting.strip(), value.strip()


def _whole(where: str, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise SettingsError(f"{where}: expected a whole number, not {text!r}") from None
    if value < 0:
        raise SettingsError(f"{where}: expected 0 or more, not {text!r}")
    return value
