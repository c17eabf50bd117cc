"""`natron push REPO`: every version folder of every model of a Triton model repository into the
model store (broker/objects.py), as the router puts them there when it scans.

Run ahead of the router (from CI, say), it leaves the router nothing to send: files the bucket
holds already are skipped by their SHA-256, whichever host pushed them. It prints the digest of
each version, the names under which workers fetch them.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import orjson

from broker import jetstream
from broker.auth import ClientAuth
from broker.objects import ModelFiles, StoreKind
from natron.errors import InvalidArgument, NatronError
from natron.tasks import until
from router.repository import model_folders, version_dirs

log = logging.getLogger(__name__)


async def push_repository(
    nats_url: str,
    bucket: str,
    repository: Path,
    *,
    storage: StoreKind = "file",
    replicas: int = 1,
    auth: ClientAuth | None = None,
    inbox_prefix: str | None = None,
) -> dict[str, dict[str, str]]:
    """Push every version folder of every model of `repository` into `bucket` (made with
    `storage` and `replicas` when missing); model -> version -> digest.

    A model that cannot be pushed (over the limits, unreadable) does not stop the others: once
    they are pushed, InvalidArgument names every model that failed and why. The broker away
    raises Unavailable at once."""
    # The model store is the control plane's: pushing takes the router's credentials (`auth`),
    # and its inboxes (`inbox_prefix`).
    nc = await jetstream.connect(nats_url, name="natron-push", auth=auth, inbox_prefix=inbox_prefix)
    try:
        files = ModelFiles(nc, bucket)
        await files.ensure_bucket(storage, replicas)
        pushed: dict[str, dict[str, str]] = {}
        failed: list[str] = []
        for model_dir in await asyncio.to_thread(model_folders, repository):
            try:
                versions = [str(v) for v in sorted(await asyncio.to_thread(version_dirs, model_dir))]
                pushed[model_dir.name] = await files.push_versions(model_dir.name, model_dir, versions)
            except (InvalidArgument, OSError) as exc:
                reason = exc.message if isinstance(exc, NatronError) else str(exc)
                log.warning("model '%s' not pushed: %s", model_dir.name, reason)
                failed.append(f"'{model_dir.name}': {reason}")
        if failed:
            raise InvalidArgument(f"{len(failed)} model(s) of {repository} not pushed: {'; '.join(failed)}")
        return pushed
    finally:
        await jetstream.close_connection(nc)


async def run_push(
    nats_url: str,
    bucket: str,
    repositories: Sequence[Path],
    storage: StoreKind,
    replicas: int,
    auth: ClientAuth,
    inbox_prefix: str,
    stop: asyncio.Event,
) -> None:
    """`natron push`: push `repositories` one after the other and print model -> version ->
    digest as JSON; a stop signal ends it (what was pushed stays)."""
    pushed: dict[str, dict[str, str]] = {}
    for repository in repositories:
        pushed.update(
            await until(
                stop,
                push_repository(
                    nats_url,
                    bucket,
                    repository,
                    storage=storage,
                    replicas=replicas,
                    auth=auth,
                    inbox_prefix=inbox_prefix,
                ),
            )
        )
    sys.stdout.write(orjson.dumps(pushed, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode() + "\n")
