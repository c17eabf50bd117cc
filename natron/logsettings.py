"""Triton's logging extension as natron's processes apply it: the six settings of `/v2/logging`,
their validation, their meaning for Python's logging, and their form on the wire.

Triton switches each severity on or off; Python's logging has one threshold per logger. Both
are kept: the root logger's level is the lowest severity that is on (so a record nobody will
see is never built), and a filter on each root handler drops the severities that are off above
it (`log_warning` off with `log_info` on, say). `log_verbose_level` above 0 lets DEBUG through;
natron has one verbose level, so 1 and 2 mean the same, but the number given is kept and
answered back as Triton does.

`log_format`: "default" is natron's own line with a local time stamp, "ISO8601" stamps it in
UTC to the second with a Z, as Triton's ISO8601 format and `natron --log-format ISO8601` do.

`log_file` is answered ("" : natron's processes log to stderr) but never set over the API: a
remote caller must not choose a file that the server writes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any, Final

import orjson

from natron.errors import InvalidArgument

KEYS: Final = ("log_file", "log_info", "log_warning", "log_error", "log_verbose_level", "log_format")
FORMATS: Final = ("default", "ISO8601")
# Triton's log_verbose_level is a uint32.
MAX_VERBOSE_LEVEL: Final = 2**32 - 1
# As natron.cli.main.configure_logging stamps ISO8601 lines.
ISO8601_DATEFMT: Final = "%Y-%m-%dT%H:%M:%SZ"
# A threshold above every level: nothing passes (each severity switched off).
_SILENT: Final = logging.CRITICAL + 1

LOG_FILE_REFUSED: Final = (
    "log_file cannot be set over the API: a remote caller must not choose a file the server "
    "writes. natron's processes log to stderr; redirect it, or let the supervisor collect it"
)


@dataclass(slots=True, frozen=True)
class LogSettings:
    log_file: str = ""
    log_info: bool = True
    log_warning: bool = True
    log_error: bool = True
    log_verbose_level: int = 0
    log_format: str = "default"

    def as_dict(self) -> dict[str, Any]:
        """The JSON object `/v2/logging` answers."""
        return asdict(self)

    def updated(self, changes: Mapping[str, object]) -> LogSettings:
        """These settings with a request's `changes` applied (see `parse_changes`)."""
        return replace(self, **parse_changes(changes))

    @property
    def threshold(self) -> int:
        """The root logger's level: the lowest severity that is on."""
        if self.log_verbose_level > 0:
            return logging.DEBUG
        for level, on in (
            (logging.INFO, self.log_info),
            (logging.WARNING, self.log_warning),
            (logging.ERROR, self.log_error),
        ):
            if on:
                return level
        return _SILENT

    def allows(self, levelno: int) -> bool:
        """Whether a record of this level is logged. Levels between the named ones count with
        the named one below them (Python allows any number)."""
        if levelno >= logging.ERROR:
            return self.log_error
        if levelno >= logging.WARNING:
            return self.log_warning
        if levelno >= logging.INFO:
            return self.log_info
        return self.log_verbose_level > 0

    def describe(self) -> str:
        """One line for the log: what is on."""
        on = [name for name, flag in (("info", self.log_info), ("warning", self.log_warning),
                                      ("error", self.log_error)) if flag]  # fmt: skip
        return (
            f"{', '.join(on) or 'no severity'} on, verbose level {self.log_verbose_level}, "
            f"format {self.log_format}"
        )


def parse_changes(changes: Mapping[str, object]) -> dict[str, Any]:
    """A `POST /v2/logging` body as typed changes, every key checked before any applies.

    Unknown keys and wrong types are an InvalidArgument naming the key; `null` leaves a setting
    as it is, as in Triton; `log_file` is refused (LOG_FILE_REFUSED)."""
    parsed: dict[str, Any] = {}
    for key, value in changes.items():
        if key not in KEYS:
            raise InvalidArgument(f"unknown log setting '{key}': the settings are {', '.join(KEYS)}")
        if value is None:
            continue
        if key == "log_file":
            raise InvalidArgument(LOG_FILE_REFUSED)
        parsed[key] = _checked(key, value)
    return parsed


def _checked(key: str, value: object) -> object:
    if key in ("log_info", "log_warning", "log_error"):
        if not isinstance(value, bool):
            raise InvalidArgument(f"log setting '{key}' must be a boolean, got {_shown(value)}")
        return value
    if key == "log_verbose_level":
        # bool is an int to Python, not to JSON: `true` is no level.
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_VERBOSE_LEVEL:
            raise InvalidArgument(
                f"log setting 'log_verbose_level' must be an integer from 0 to {MAX_VERBOSE_LEVEL}, "
                f"got {_shown(value)}"
            )
        return value
    if key == "log_format":
        # Any case, as the command line's --log-format takes it; answered as Triton spells it.
        if isinstance(value, str):
            for choice in FORMATS:
                if value.lower() == choice.lower():
                    return choice
        raise InvalidArgument(
            f"log setting 'log_format' must be one of {', '.join(FORMATS)}, got {_shown(value)}"
        )
    if not isinstance(value, str):  # log_file, read from the wire
        raise InvalidArgument(f"log setting '{key}' must be a string, got {_shown(value)}")
    return value


def _shown(value: object) -> str:
    text = orjson.dumps(value, default=repr).decode()
    return text if len(text) <= 60 else text[:57] + "..."


# -- the wire ------------------------------------------------------------------------------


def encode(settings: LogSettings) -> bytes:
    return orjson.dumps(settings.as_dict())


def decode(data: bytes) -> LogSettings:
    """The settings `encode` wrote; InvalidArgument for anything else (every key required)."""
    try:
        parsed = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise InvalidArgument(f"log settings are not valid JSON: {exc}") from None
    if not isinstance(parsed, dict) or set(parsed) != set(KEYS):
        raise InvalidArgument(f"log settings must be an object with exactly the keys {', '.join(KEYS)}")
    return LogSettings(**{key: _checked(key, parsed[key]) for key in KEYS})  # type: ignore[arg-type]


# -- Python's logging ----------------------------------------------------------------------


class _SeverityFilter(logging.Filter):
    """On a root handler: drops the severities switched off above the root's threshold. It
    holds the settings it applies, so `current` can read them back."""

    def __init__(self, settings: LogSettings) -> None:
        super().__init__()
        self.settings = settings

    def filter(self, record: logging.LogRecord) -> bool:
        return self.settings.allows(record.levelno)


def apply(settings: LogSettings, root: logging.Logger | None = None) -> None:
    """Make `root` (the process's root logger by default) and its handlers log as `settings`
    say. Idempotent; handlers added afterwards are not covered until the next call."""
    root = root if root is not None else logging.getLogger()
    root.setLevel(settings.threshold)
    for handler in root.handlers:
        for old in [f for f in handler.filters if isinstance(f, _SeverityFilter)]:
            handler.removeFilter(old)
        handler.addFilter(_SeverityFilter(settings))
        _stamp(handler, settings.log_format)


def _stamp(handler: logging.Handler, log_format: str) -> None:
    # The line stays the handler's own (its role, its pid); only the time stamp changes.
    formatter = handler.formatter
    if formatter is None:
        # logging's shared default formatter must not change under every other handler.
        formatter = logging.Formatter()
        handler.setFormatter(formatter)
    if log_format == "ISO8601":
        formatter.datefmt = ISO8601_DATEFMT
        formatter.converter = time.gmtime
    else:
        formatter.datefmt = None
        formatter.converter = time.localtime


def current(root: logging.Logger | None = None) -> LogSettings:
    """This process's settings as its logging has them: the ones last applied, or else what its
    start-up configuration amounts to (its level, and its first handler's time stamp)."""
    root = root if root is not None else logging.getLogger()
    for handler in root.handlers:
        for found in handler.filters:
            if isinstance(found, _SeverityFilter):
                return found.settings
    level = root.getEffectiveLevel()
    iso = bool(root.handlers) and _is_iso8601(root.handlers[0].formatter)
    return LogSettings(
        log_info=level <= logging.INFO,
        log_warning=level <= logging.WARNING,
        log_error=level <= logging.ERROR,
        log_verbose_level=1 if level <= logging.DEBUG else 0,
        log_format="ISO8601" if iso else "default",
    )


def _is_iso8601(formatter: logging.Formatter | None) -> bool:
    return formatter is not None and formatter.datefmt == ISO8601_DATEFMT
