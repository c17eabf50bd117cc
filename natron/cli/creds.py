"""`natron creds DIR`: the per-role NATS credentials of a deployment whose broker natron does not
start (compose, Kubernetes, a NATS cluster of the operator's), as `natron serve` makes them for
its embedded one.

It writes, in DIR (mode 0700, kept when they are already there):
- `<role>.nk` for router, gateway, worker, orchestrator, client and admin: each role's nkey seed,
  mode 0600, to hand to that service alone (`--nats-creds DIR/<role>.nk`);
- `auth.conf`: the nats-server `authorization` block with each role's public key and
  permissions (broker/auth.py), to `include` in the server's configuration. It holds no secret.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from broker import auth
from broker.subjects import Subjects

AUTH_CONF = "auth.conf"


def write(directory: Path, prefix: str) -> Path:
    """The credentials and the server's `auth.conf` in `directory`; the latter's path."""
    keys = auth.ensure_credentials(directory)
    conf = directory / AUTH_CONF
    conf.write_text(auth.authorization_block(keys, Subjects(prefix)) + "\n")
    # Public keys and permissions only: the broker's own user may read it.
    conf.chmod(0o644)
    return conf


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="natron creds", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("directory", type=Path, help="where the credentials are kept")
    parser.add_argument("--prefix", default="natron", help="subject prefix of the deployment")
    args = parser.parse_args(argv)
    try:
        conf = write(args.directory, args.prefix)
    except (OSError, ValueError) as exc:
        print(f"natron creds: error: {exc}", file=sys.stderr)
        return 1
    roles = ", ".join(auth.ROLES)
    print(f"credentials for {roles} in {args.directory}; the broker's authorization: {conf}")
    return 0
