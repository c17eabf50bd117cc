"""natron/logsettings.py: the logging extension's settings, checked, encoded and applied to a
logger of the test's own (never the process's root, which pytest's handlers hang on)."""

from __future__ import annotations

import io
import logging
import re
import time
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from natron import logsettings
from natron.errors import InvalidArgument
from natron.logsettings import KEYS, LogSettings

pytestmark = pytest.mark.unit


@pytest.fixture
def logger() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A root-like logger with one stream handler, as natron's command line sets one up."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log = logging.Logger("natron-test-root", logging.INFO)
    log.addHandler(handler)
    yield log, out
    handler.close()


def _levels(log: logging.Logger, out: io.StringIO) -> list[str]:
    out.seek(0)
    out.truncate()
    log.debug("d")
    log.info("i")
    log.warning("w")
    log.error("e")
    return [line.split()[-2] for line in out.getvalue().splitlines()]


def test_defaults_are_tritons_answer() -> None:
    assert LogSettings().as_dict() == {
        "log_file": "",
        "log_info": True,
        "log_warning": True,
        "log_error": True,
        "log_verbose_level": 0,
        "log_format": "default",
    }
    assert tuple(LogSettings().as_dict()) == KEYS


def test_a_change_names_only_what_changes() -> None:
    changed = LogSettings().updated({"log_verbose_level": 2, "log_info": False})
    assert changed == LogSettings(log_info=False, log_verbose_level=2)


def test_null_leaves_a_setting_as_it_is() -> None:
    settings = LogSettings(log_info=False)
    assert settings.updated({"log_info": None, "log_file": None}) == settings


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"log_infos": True}, "unknown log setting 'log_infos'"),
        ({"log_warnings": True}, "unknown log setting 'log_warnings'"),
        ({"log_info": "true"}, "'log_info' must be a boolean, got \"true\""),
        ({"log_error": 1}, "'log_error' must be a boolean, got 1"),
        ({"log_verbose_level": True}, "'log_verbose_level' must be an integer"),
        ({"log_verbose_level": -1}, "'log_verbose_level' must be an integer from 0 to 4294967295, got -1"),
        ({"log_verbose_level": 2**32}, "got 4294967296"),
        ({"log_verbose_level": 1.5}, "got 1.5"),
        ({"log_format": "json"}, "'log_format' must be one of default, ISO8601, got \"json\""),
        ({"log_format": 8601}, "'log_format' must be one of default, ISO8601, got 8601"),
        ({"log_file": "/etc/passwd"}, "log_file cannot be set over the API"),
        ({"log_file": ""}, "a remote caller must not choose a file the server writes"),
    ],
)
def test_a_bad_change_is_refused_naming_the_key(changes: dict[str, object], needle: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        LogSettings().updated(changes)
    assert needle in caught.value.message


def test_a_request_with_one_bad_key_changes_nothing() -> None:
    with pytest.raises(InvalidArgument, match="log_error"):
        logsettings.parse_changes({"log_verbose_level": 1, "log_error": "no"})


def test_log_format_takes_any_case_and_answers_tritons_spelling() -> None:
    assert LogSettings().updated({"log_format": "iso8601"}).log_format == "ISO8601"
    assert LogSettings().updated({"log_format": "DEFAULT"}).log_format == "default"


def test_a_long_bad_value_is_shortened_in_the_message() -> None:
    with pytest.raises(InvalidArgument) as caught:
        LogSettings().updated({"log_format": "x" * 1000})
    assert len(caught.value.message) < 200


@given(
    st.builds(
        LogSettings,
        log_file=st.text(max_size=20),
        log_info=st.booleans(),
        log_warning=st.booleans(),
        log_error=st.booleans(),
        log_verbose_level=st.integers(0, logsettings.MAX_VERBOSE_LEVEL),
        log_format=st.sampled_from(logsettings.FORMATS),
    )
)
def test_settings_round_trip_the_wire(settings: LogSettings) -> None:
    assert logsettings.decode(logsettings.encode(settings)) == settings


@pytest.mark.parametrize(
    "data",
    [b"", b"[]", b"{}", b'{"log_info": true}', b"not json", b'{"log_file": "", "log_info": 1, '
     b'"log_warning": true, "log_error": true, "log_verbose_level": 0, "log_format": "default"}'],
)  # fmt: skip
def test_decoding_anything_else_is_invalid_argument(data: bytes) -> None:
    with pytest.raises(InvalidArgument):
        logsettings.decode(data)


@pytest.mark.parametrize(
    ("settings", "shown"),
    [
        (LogSettings(), ["INFO", "WARNING", "ERROR"]),
        (LogSettings(log_verbose_level=1), ["DEBUG", "INFO", "WARNING", "ERROR"]),
        (LogSettings(log_info=False), ["WARNING", "ERROR"]),
        # A severity off between two that are on: the handler's filter drops it.
        (LogSettings(log_warning=False), ["INFO", "ERROR"]),
        (LogSettings(log_verbose_level=3, log_info=False), ["DEBUG", "WARNING", "ERROR"]),
        (LogSettings(log_info=False, log_warning=False, log_error=False), []),
    ],
)
def test_apply_logs_exactly_the_severities_that_are_on(
    logger: tuple[logging.Logger, io.StringIO], settings: LogSettings, shown: list[str]
) -> None:
    log, out = logger
    logsettings.apply(settings, log)
    assert _levels(log, out) == shown


def test_applying_again_replaces_the_filter(logger: tuple[logging.Logger, io.StringIO]) -> None:
    log, out = logger
    logsettings.apply(LogSettings(log_warning=False), log)
    logsettings.apply(LogSettings(), log)
    assert _levels(log, out) == ["INFO", "WARNING", "ERROR"]
    assert len(log.handlers[0].filters) == 1


def test_the_root_level_is_the_lowest_severity_on(logger: tuple[logging.Logger, io.StringIO]) -> None:
    log, _ = logger
    logsettings.apply(LogSettings(log_info=False, log_warning=False), log)
    # A record nobody will see is not even built.
    assert log.level == logging.ERROR
    assert not log.isEnabledFor(logging.WARNING)


def test_iso8601_stamps_utc_to_the_second_and_default_restores_local_time(
    logger: tuple[logging.Logger, io.StringIO],
) -> None:
    log, out = logger
    logsettings.apply(LogSettings(log_format="ISO8601"), log)
    log.info("stamped")
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ INFO stamped$", out.getvalue().strip())
    formatter = log.handlers[0].formatter
    assert formatter is not None and formatter.converter is time.gmtime
    out.seek(0)
    out.truncate()
    logsettings.apply(LogSettings(), log)
    log.info("local")
    # logging's own stamp: local time with milliseconds after a comma.
    assert re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO local$", out.getvalue().strip())


def test_a_handler_without_formatter_gets_its_own(logger: tuple[logging.Logger, io.StringIO]) -> None:
    log, _ = logger
    bare = logging.StreamHandler(io.StringIO())
    log.addHandler(bare)
    logsettings.apply(LogSettings(log_format="ISO8601"), log)
    assert bare.formatter is not None and bare.formatter is not logging._defaultFormatter
    assert logging._defaultFormatter.datefmt is None


def test_current_reads_back_what_was_applied(logger: tuple[logging.Logger, io.StringIO]) -> None:
    log, _ = logger
    settings = LogSettings(log_warning=False, log_verbose_level=7, log_format="ISO8601")
    logsettings.apply(settings, log)
    assert logsettings.current(log) == settings


@pytest.mark.parametrize(
    ("level", "expected"),
    [
        (logging.DEBUG, LogSettings(log_verbose_level=1)),
        (logging.INFO, LogSettings()),
        (logging.WARNING, LogSettings(log_info=False)),
        (logging.ERROR, LogSettings(log_info=False, log_warning=False)),
    ],
)
def test_current_before_any_change_is_the_start_up_level(
    logger: tuple[logging.Logger, io.StringIO], level: int, expected: LogSettings
) -> None:
    log, _ = logger
    log.setLevel(level)
    assert logsettings.current(log) == expected


def test_current_sees_a_start_up_iso8601_format(logger: tuple[logging.Logger, io.StringIO]) -> None:
    log, _ = logger
    log.handlers[0].setFormatter(
        logging.Formatter("%(asctime)s %(message)s", datefmt=logsettings.ISO8601_DATEFMT)
    )
    assert logsettings.current(log).log_format == "ISO8601"


def test_describe_says_what_is_on() -> None:
    assert LogSettings(log_info=False, log_verbose_level=1).describe() == (
        "warning, error on, verbose level 1, format default"
    )
    assert "no severity on" in LogSettings(log_info=False, log_warning=False, log_error=False).describe()
