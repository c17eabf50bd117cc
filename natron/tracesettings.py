"""Triton's trace extension as natron keeps it: the settings of `/v2/trace/setting` and
`/v2/models/{model}/trace/setting`, their validation, a model's settings over the global ones,
the answer as Triton writes it, and the record on the wire.

Values are as Triton's JSON has them: strings (`"trace_rate": "1000"`) and lists of strings
(`"trace_level": ["TIMESTAMPS"]`). A model's settings name only what differs from the global
ones; `null` clears a model's own value (the global one applies again) or puts a global setting
back to its default.

Beyond Triton's API: `trace_mode` and `trace_config` (the options of Triton's `--trace-config`
for the opentelemetry mode: url, resource, bsp_*) are set here too; they are global.
`trace_file` is never set over the API (as in Triton: a remote caller must not choose a file the
server writes): a gateway takes it from its command line (`--trace-config triton,file=PATH`,
`startup`), with its defaults for the other settings, and answers it as its own.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final

import orjson

from natron.errors import InvalidArgument

OFF: Final = "OFF"
LEVELS: Final = ("TIMESTAMPS", "TENSORS")
MODES: Final = ("triton", "opentelemetry")
TRITON: Final = "triton"
OPENTELEMETRY: Final = "opentelemetry"

# Triton's defaults (tritonserver --help), and its opentelemetry options with theirs.
DEFAULT_RATE: Final = 1000
OTEL_DEFAULTS: Final[Mapping[str, str]] = {
    "url": "http://localhost:4318/v1/traces",
    "resource": "",
    "bsp_max_queue_size": "2048",
    "bsp_schedule_delay": "5000",
    "bsp_max_export_batch_size": "512",
}
_BSP: Final = ("bsp_max_queue_size", "bsp_schedule_delay", "bsp_max_export_batch_size")

# What a model may set; the rest is global.
MODEL_KEYS: Final = ("trace_level", "trace_rate", "trace_count", "log_frequency")
GLOBAL_KEYS: Final = (*MODEL_KEYS, "trace_file", "trace_mode", "trace_config")
# The opentelemetry options are answered as keys of their own (as Triton answers them), so a
# request may name them so too: posting an answer back changes nothing.
REQUEST_KEYS: Final = (*GLOBAL_KEYS, *OTEL_DEFAULTS)

UINT32_MAX: Final = 2**32 - 1
INT32_MAX: Final = 2**31 - 1

TRACE_FILE_REFUSED: Final = (
    "trace file location can not be updated through network protocol: a remote caller must not "
    "choose a file the server writes"
)

_DIGITS = re.compile(r"^-?[0-9]+$")
_RESOURCE = re.compile(r"^[^=,\s]+=[^,]*(,[^=,\s]+=[^,]*)*$")


class Clear:
    """`null` in a request: a model's own value goes, a global one returns to its default."""

    def __repr__(self) -> str:
        return "CLEAR"


CLEAR: Final = Clear()


@dataclass(slots=True, frozen=True)
class ModelTrace:
    """A model's own settings: None where the global one applies."""

    trace_level: tuple[str, ...] | None = None
    trace_rate: int | None = None
    trace_count: int | None = None
    log_frequency: int | None = None
    # Which setting of trace_count this is (see TraceSettings.count_epoch).
    count_epoch: int = 0

    @property
    def empty(self) -> bool:
        return all(getattr(self, key) is None for key in MODEL_KEYS)


@dataclass(slots=True, frozen=True)
class Effective:
    """The settings a request to one model is traced by."""

    # Whose settings they are: "" for the global ones, or the model's when it has its own.
    scope: str
    level: tuple[str, ...]  # () is OFF
    rate: int
    count: int
    log_frequency: int
    trace_file: str
    mode: str
    config: Mapping[str, str]
    # Changes whenever trace_count is set for this scope: samplers count anew from `count`.
    count_epoch: int

    @property
    def on(self) -> bool:
        return bool(self.level)


@dataclass(slots=True, frozen=True)
class TraceSettings:
    """The deployment's trace settings: the global ones and each model's own."""

    trace_level: tuple[str, ...] = ()
    trace_rate: int = DEFAULT_RATE
    trace_count: int = -1
    log_frequency: int = 0
    trace_file: str = ""
    trace_mode: str = TRITON
    trace_config: Mapping[str, str] = field(default_factory=lambda: dict(OTEL_DEFAULTS))
    models: Mapping[str, ModelTrace] = field(default_factory=dict)
    # Which setting of the global trace_count this is: samplers key their remaining count by
    # it, so setting the same count again re-arms it (as in Triton).
    count_epoch: int = 0
    # The last epoch handed out, globally or to a model: each setting of a count gets a new one.
    last_epoch: int = 0

    def effective(self, model: str | None) -> Effective:
        own = self.models.get(model) if model else None
        if own is None:
            return Effective(
                "",
                self.trace_level,
                self.trace_rate,
                self.trace_count,
                self.log_frequency,
                self.trace_file,
                self.trace_mode,
                self.trace_config,
                self.count_epoch,
            )
        assert model is not None
        return Effective(
            model,
            self.trace_level if own.trace_level is None else own.trace_level,
            self.trace_rate if own.trace_rate is None else own.trace_rate,
            self.trace_count if own.trace_count is None else own.trace_count,
            self.log_frequency if own.log_frequency is None else own.log_frequency,
            self.trace_file,
            self.trace_mode,
            self.trace_config,
            self.count_epoch if own.trace_count is None else own.count_epoch,
        )

    def updated(self, changes: Mapping[str, object], model: str | None = None) -> TraceSettings:
        """These settings with `parse_changes`'s result applied, globally or to `model`."""
        counted = "trace_count" in changes
        epoch = self.last_epoch + 1 if counted else self.last_epoch
        values: dict[str, Any] = {"count_epoch": epoch} if counted else {}
        if model:
            own = self.models.get(model, ModelTrace())
            values.update({k: (None if v is CLEAR else v) for k, v in changes.items()})
            own = replace(own, **values)
            models = {name: trace for name, trace in self.models.items() if name != model}
            if not own.empty:
                models[model] = own
            return replace(self, models=models, last_epoch=epoch)
        defaults = TraceSettings()
        config = dict(self.trace_config)
        for key, value in changes.items():
            if key == "trace_config":
                config = dict(OTEL_DEFAULTS) if value is CLEAR else {**config, **value}  # type: ignore[dict-item]
            elif key in OTEL_DEFAULTS:
                config[key] = OTEL_DEFAULTS[key] if value is CLEAR else value  # type: ignore[assignment]
            else:
                values[key] = getattr(defaults, key) if value is CLEAR else value
        _check_batching(config)
        return replace(self, **values, trace_config=config, last_epoch=epoch)

    def answer(self, model: str | None, remaining: int | None = None) -> dict[str, str | list[str]]:
        """The JSON object Triton answers for these settings (of `model`, or the global ones);
        `remaining`: the traces still to be sampled, where a sampler counts them."""
        settings = self.effective(model)
        answer: dict[str, str | list[str]] = {
            "trace_level": list(settings.level) or [OFF],
            "trace_rate": str(settings.rate),
            "trace_count": str(settings.count if remaining is None else remaining),
        }
        if settings.mode == TRITON:
            answer["log_frequency"] = str(settings.log_frequency)
            answer["trace_file"] = settings.trace_file
        answer["trace_mode"] = settings.mode
        if settings.mode == OPENTELEMETRY:
            answer.update(settings.config)
        return answer


# -- requests ------------------------------------------------------------------------------


def parse_changes(body: Mapping[str, object], model: str | None = None) -> dict[str, object]:
    """A trace setting request's body as typed changes (CLEAR for `null`), every key checked
    before any applies: InvalidArgument naming the key otherwise. `model`: the request is for
    that model's settings, which hold MODEL_KEYS only."""
    changes: dict[str, object] = {}
    for key, value in body.items():
        if key not in REQUEST_KEYS:
            raise InvalidArgument(
                f"unknown trace setting '{key}': the settings are {', '.join(REQUEST_KEYS)}"
            )
        if model and key not in MODEL_KEYS:
            raise InvalidArgument(
                f"trace setting '{key}' is global: set it through /v2/trace/setting, not for model '{model}'"
            )
        if key == "trace_file" and value is not None:
            raise InvalidArgument(TRACE_FILE_REFUSED)
        if value is None:
            changes[key] = CLEAR
        elif key == "trace_config":
            changes[key] = {**changes.get(key, {}), **_config(value)}  # type: ignore[dict-item]
        else:
            changes[key] = _checked(key, value)
    return changes


def _checked(key: str, value: object) -> object:
    if key == "trace_level":
        return _level(value)
    if key in OTEL_DEFAULTS:
        return _option(key, _string(key, value))
    text = _string(key, value)
    if key == "trace_mode":
        if text not in MODES:
            raise InvalidArgument(
                f"trace setting 'trace_mode' must be one of {', '.join(MODES)}, got {_shown(text)}"
            )
        return text
    low, high = (-1, INT32_MAX) if key == "trace_count" else (0, UINT32_MAX)
    return _integer(key, text, low, high)


def _string(key: str, value: object) -> str:
    if not isinstance(value, str):
        raise InvalidArgument(
            f"trace setting '{key}' must be a string, as Triton's JSON has it, got {_shown(value)}"
        )
    return value


def _integer(key: str, text: str, low: int, high: int) -> int:
    # Triton's messages: "Unable to parse 'trace_rate', got: x", and the range when out of it.
    if not _DIGITS.match(text.strip()):
        raise InvalidArgument(f"Unable to parse '{key}', got: {_shown(text)}")
    number = int(text)
    if not low <= number <= high:
        raise InvalidArgument(
            f"Unable to parse '{key}', value is out of range [ {low}, {high} ], got: {number}"
        )
    return number


def _level(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidArgument(f"trace setting 'trace_level' must be a list of strings, got {_shown(value)}")
    if not value:
        raise InvalidArgument(
            f"trace setting 'trace_level' needs a level: {OFF}, or one or more of {', '.join(LEVELS)}"
        )
    for level in value:
        if level != OFF and level not in LEVELS:
            raise InvalidArgument(
                f"trace setting 'trace_level': unknown level {_shown(level)}; the levels are {OFF}, "
                f"{', '.join(LEVELS)}"
            )
    if OFF in value:
        if len(value) > 1:
            raise InvalidArgument("Expect only one trace level 'OFF' is specified")
        return ()
    return tuple(level for level in LEVELS if level in value)


def _config(value: object) -> dict[str, str]:
    """`trace_config`: Triton's `--trace-config` entries for the opentelemetry mode, as a list
    of "key=value" or "opentelemetry,key=value" strings."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidArgument(
            "trace setting 'trace_config' must be a list of \"<option>=<value>\" strings, got "
            + _shown(value)
        )
    config: dict[str, str] = {}
    for entry in value:
        mode, _, option = entry.partition(",") if "," in entry.split("=", 1)[0] else ("", "", entry)
        if mode not in ("", OPENTELEMETRY):
            raise InvalidArgument(
                f"trace setting 'trace_config': {_shown(entry)} configures the {mode} mode; natron "
                f"takes options of the {OPENTELEMETRY} mode only ({', '.join(OTEL_DEFAULTS)})"
            )
        key, equals, text = option.partition("=")
        if not equals or key not in OTEL_DEFAULTS:
            raise InvalidArgument(
                f"trace setting 'trace_config': {_shown(entry)} is not \"<option>=<value>\" with an "
                f"option of {', '.join(OTEL_DEFAULTS)}"
            )
        config[key] = _option(key, text)
    return config


def _option(key: str, text: str) -> str:
    if key in _BSP:
        return str(_integer(key, text, 0, UINT32_MAX))
    if key == "url" and not re.match(r"^https?://[^\s/]+", text):
        raise InvalidArgument(f"trace setting 'url' must be an http:// or https:// URL, got {_shown(text)}")
    if key == "resource" and text and not _RESOURCE.match(text):
        raise InvalidArgument(
            f"trace setting 'resource' must be \"key=value[,key=value...]\", got {_shown(text)}"
        )
    return text


def _check_batching(config: Mapping[str, str]) -> None:
    # As OpenTelemetry's BatchSpanProcessor requires, refused here rather than when a process
    # builds its exporter.
    for key in _BSP:
        if int(config[key]) <= 0:
            raise InvalidArgument(f"trace setting '{key}' must be positive, got {config[key]}")
    if int(config["bsp_max_export_batch_size"]) > int(config["bsp_max_queue_size"]):
        raise InvalidArgument(
            f"trace setting 'bsp_max_export_batch_size' ({config['bsp_max_export_batch_size']}) must not "
            f"exceed 'bsp_max_queue_size' ({config['bsp_max_queue_size']})"
        )


def _shown(value: object) -> str:
    text = orjson.dumps(value, default=repr).decode()
    return text if len(text) <= 60 else text[:57] + "..."


def grpc_changes(settings: Mapping[str, list[str]]) -> dict[str, object]:
    """A gRPC TraceSettingRequest's settings (each a list of strings) as the JSON body they
    stand for: no value is `null`, one value is the string, trace_level and trace_config stay
    lists."""
    body: dict[str, object] = {}
    for key, values in settings.items():
        if not values:
            body[key] = None
        elif key in ("trace_level", "trace_config"):
            body[key] = list(values)
        elif len(values) == 1:
            body[key] = values[0]
        else:
            raise InvalidArgument(f"trace setting '{key}' takes one value, got {len(values)}")
    return body


# -- the command line ----------------------------------------------------------------------

# Triton's `--trace-config triton,<setting>=<value>` settings; natron also takes them without
# the mode, and log_frequency spelled with an underscore, as the API spells it.
_TRITON_OPTIONS: Final[Mapping[str, str]] = {
    "file": "trace_file",
    "log-frequency": "log_frequency",
    "log_frequency": "log_frequency",
}
_GLOBAL_OPTIONS: Final[Mapping[str, str]] = {
    "level": "trace_level",
    "rate": "trace_rate",
    "count": "trace_count",
    "mode": "trace_mode",
}


def startup(entries: Sequence[str]) -> TraceSettings:
    """A process's trace settings from Triton's `--trace-config` entries, in order (a later
    one wins; `level` accumulates, `level=OFF` clears it): `[triton,]file=PATH`,
    `[triton,]log-frequency=N`, `level=TIMESTAMPS|TENSORS|OFF`, `rate=N`, `count=N`,
    `mode=triton|opentelemetry`, `opentelemetry,<option>=<value>`. ValueError naming the
    entry otherwise."""
    settings = TraceSettings()
    levels: list[str] = []
    changes: dict[str, Any] = {}
    config: dict[str, str] = {}
    for entry in entries:
        head, equals, value = entry.partition("=")
        mode, comma, key = head.partition(",")
        if not comma:
            mode, key = "", head
        mode, key = mode.strip(), key.strip()
        try:
            if not equals or not key:
                raise InvalidArgument("expected [<mode>,]<setting>=<value>")
            if mode in ("", TRITON) and key in _TRITON_OPTIONS:
                field_name = _TRITON_OPTIONS[key]
                if field_name == "trace_file":
                    if not value.strip():
                        raise InvalidArgument("the file needs a path")
                    changes[field_name] = value
                else:
                    changes[field_name] = _integer(field_name, value, 0, UINT32_MAX)
            elif mode == "" and key in _GLOBAL_OPTIONS:
                field_name = _GLOBAL_OPTIONS[key]
                if field_name == "trace_level":
                    levels = [] if value.strip().upper() == OFF else [*levels, value.strip().upper()]
                    changes[field_name] = _level(levels or [OFF])
                else:
                    changes[field_name] = _checked(field_name, value.strip())
            elif mode == OPENTELEMETRY and key in OTEL_DEFAULTS:
                config[key] = _option(key, value)
            else:
                raise InvalidArgument(
                    f"unknown setting; natron takes {', '.join(_GLOBAL_OPTIONS)}, "
                    f"triton,{{{','.join(_TRITON_OPTIONS)}}} and opentelemetry,{{{','.join(OTEL_DEFAULTS)}}}"
                )
        except InvalidArgument as exc:
            raise ValueError(f"--trace-config {entry!r}: {exc.message}") from None
    if config:
        full = {**OTEL_DEFAULTS, **config}
        try:
            _check_batching(full)
        except InvalidArgument as exc:
            raise ValueError(f"--trace-config: {exc.message}") from None
        changes["trace_config"] = full
    return replace(settings, **changes)


# -- the wire ------------------------------------------------------------------------------


def encode(settings: TraceSettings) -> bytes:
    models = {
        name: {**{k: _plain(getattr(own, k)) for k in MODEL_KEYS if getattr(own, k) is not None},
               "count_epoch": own.count_epoch}
        for name, own in settings.models.items()
    }  # fmt: skip
    body: dict[str, Any] = {k: _plain(getattr(settings, k)) for k in GLOBAL_KEYS}
    return orjson.dumps(
        {**body, "models": models, "count_epoch": settings.count_epoch, "last_epoch": settings.last_epoch}
    )


def _plain(value: object) -> object:
    return list(value) if isinstance(value, tuple) else dict(value) if isinstance(value, Mapping) else value


def decode(data: bytes) -> TraceSettings:
    """The settings `encode` wrote; InvalidArgument for anything else."""
    try:
        body = orjson.loads(data)
        models = {
            str(name): ModelTrace(
                **{k: _typed(k, raw[k]) for k in MODEL_KEYS if k in raw}, count_epoch=int(raw["count_epoch"])
            )
            for name, raw in body["models"].items()
        }
        return TraceSettings(
            **{k: _typed(k, body[k]) for k in GLOBAL_KEYS},
            models=models,
            count_epoch=int(body["count_epoch"]),
            last_epoch=int(body["last_epoch"]),
        )
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise InvalidArgument(f"trace settings record is unreadable: {exc!r}") from None


def _typed(key: str, value: Any) -> Any:
    if key == "trace_level":
        return tuple(str(v) for v in value)
    if key == "trace_config":
        return {str(k): str(v) for k, v in value.items()}
    if key in ("trace_file", "trace_mode"):
        return str(value)
    return int(value)
