"""Triton's restricted API groups (`--http-restricted-api`, `--grpc-restricted-protocol`), read
once at the edge into typed values that the gateway checks each request against.

A flag's value is `<group>[,<group>...]:<key>=<value>`; the flag may be given several times, each
with its own key and value, and a group may be named in one of them only (as in Triton, whose
`RestrictedFeatures` keeps one header per group). A request to a restricted group must carry the
header `<key>: <value>` over HTTP, and the metadata `triton-grpc-protocol-<key>: <value>` over
gRPC (Triton's prefix, so a Triton client's metadata works here unchanged).

This module is vocabulary: the settings validate with it, the gateway enforces with it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

# Triton's RESTRICTED_CATEGORY_NAMES, in its order.
GROUPS: tuple[str, ...] = (
    "health",
    "metadata",
    "inference",
    "shared-memory",
    "model-config",
    "model-repository",
    "statistics",
    "trace",
    "logging",
)
# What Triton prefixes a gRPC restriction's key with (grpc_server.h,
# kRestrictedProtocolHeaderTemplate).
GRPC_KEY_PREFIX = "triton-grpc-protocol-"

# An HTTP header name (RFC 9110 token); gRPC metadata keys are a subset of it, checked below.
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_GRPC_KEY = re.compile(r"^[0-9a-z_.-]+$")


@dataclass(slots=True, frozen=True)
class Restriction:
    """The header a group's requests must carry: `header` lower-cased (HTTP header names and
    gRPC metadata keys are case-blind), `value` compared exactly; `shown`: the header as the
    flag spelled it, for messages."""

    header: str
    value: str
    shown: str


def _empty() -> Mapping[str, Restriction]:
    return MappingProxyType({})


@dataclass(slots=True, frozen=True)
class Restrictions:
    """The restricted groups of one protocol; groups not named are open to every request."""

    by_group: Mapping[str, Restriction] = field(default_factory=_empty)

    def get(self, group: str) -> Restriction | None:
        return self.by_group.get(group)

    def __bool__(self) -> bool:
        return bool(self.by_group)


def parse(items: Iterable[str], flag: str, key_prefix: str = "") -> Restrictions:
    """The restrictions `items` (the flag's values) declare; ValueError naming the item and
    what is wrong with it. `key_prefix`: what the header's name starts with (gRPC's)."""
    by_group: dict[str, Restriction] = {}
    for item in items:
        # Triton's split: the groups end at the first ':', the key at the first '=' after it, so
        # a value may hold either.
        groups, colon, setting = item.partition(":")
        key, equals, value = setting.partition("=")
        key, value = key.strip(), value.strip()
        if not colon or not equals or not groups.strip() or not key or not value:
            raise ValueError(f"{flag} '{item}': expected <group>[,<group>...]:<key>=<value>")
        header = (key_prefix + key).lower()
        if not _TOKEN.match(header) or (key_prefix and not _GRPC_KEY.match(header)):
            raise ValueError(f"{flag} '{item}': '{key}' cannot be a header name")
        for group in (part.strip() for part in groups.split(",")):
            if group not in GROUPS:
                raise ValueError(f"{flag} '{item}': unknown group '{group}' (groups: {', '.join(GROUPS)})")
            if group in by_group:
                raise ValueError(f"{flag} '{item}': group '{group}' is restricted by another {flag} already")
            by_group[group] = Restriction(header, value, key_prefix + key)
    return Restrictions(MappingProxyType(by_group))


def http(items: Iterable[str]) -> Restrictions:
    return parse(items, "--http-restricted-api")


def grpc(items: Iterable[str]) -> Restrictions:
    return parse(items, "--grpc-restricted-protocol", GRPC_KEY_PREFIX)


def refusal(restriction: Restriction) -> str:
    """Triton's message for a request without the header (HTTP's; gRPC's says "protocol")."""
    return f"This API is restricted, expecting header '{restriction.shown}'"


def grpc_refusal(restriction: Restriction) -> str:
    return f"This protocol is restricted, expecting header '{restriction.shown}'"
