"""`python -m pystub --fd N --parent-pid P --name NAME`: one model instance
in its own process, so each instance has a GIL of its own and a crash takes only itself down.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
import time

from pystub.protocol import Channel
from pystub.stub import ModelHost


def _watch_parent(parent_pid: int) -> None:
    """Leave when the worker is gone, even while the model is busy and never reads the socket."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os._exit(2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pystub")
    parser.add_argument("--fd", type=int, required=True, help="connected socket to the worker")
    parser.add_argument("--parent-pid", type=int, default=None)
    parser.add_argument("--name", default="python-model")
    args = parser.parse_args(argv)
    # Ctrl-C in a terminal reaches the whole process group; the worker decides when this
    # instance stops (it sends finalize after draining), so the stub ignores it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s %(levelname)s python-stub[%(process)d] {args.name}: %(message)s",
        stream=sys.stderr,
    )
    if args.parent_pid:
        threading.Thread(target=_watch_parent, args=(args.parent_pid,), daemon=True).start()
    channel = Channel(socket.socket(fileno=args.fd))
    code = ModelHost(channel).serve()
    sys.stdout.flush()
    sys.stderr.flush()
    # Threads the model started (a decoupled model's senders, say) must not keep an instance
    # that was told to finish alive.
    os._exit(code)


if __name__ == "__main__":
    main()
