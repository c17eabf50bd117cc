"""The overhead limit: the least a Python aiohttp+uvloop server can do per KServe v2 JSON request.

It parses the infer body with orjson, builds a numpy array, computes OUTPUT0 = INPUT0 * 2 + 1
(what `tiny` computes, without any model runtime) and answers a Triton-shaped JSON response.
natron on `tiny` is measured against this: whatever natron spends beyond it is its own cost.

    python -m bench.bare_server --port 8790

It also answers the health and model-ready endpoints, so bench.py can point `--url` at it.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence

import numpy as np
import orjson
import uvloop
from aiohttp import web

_JSON = "application/json"


async def _ready(request: web.Request) -> web.Response:
    return web.Response(status=200)


async def _infer(request: web.Request) -> web.Response:
    model_name = request.match_info["model"]
    try:
        payload = orjson.loads(await request.read())
        tensor = payload["inputs"][0]
        array = np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, ValueError) as exc:
        return web.Response(status=400, body=orjson.dumps({"error": str(exc)}), content_type=_JSON)
    output = array * 2 + 1
    body = orjson.dumps(
        {
            "model_name": model_name,
            "model_version": "1",
            "outputs": [
                {
                    "name": "OUTPUT0",
                    "datatype": "FP32",
                    "shape": list(output.shape),
                    "data": output.ravel(),
                }
            ],
        },
        option=orjson.OPT_SERIALIZE_NUMPY,
    )
    return web.Response(body=body, content_type=_JSON)


def make_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/v2/health/ready", _ready)
    app.router.add_get("/v2/health/live", _ready)
    app.router.add_get("/v2/models/{model}/ready", _ready)
    app.router.add_get("/v2/models/{model}/versions/{version}/ready", _ready)
    app.router.add_post("/v2/models/{model}/infer", _infer)
    app.router.add_post("/v2/models/{model}/versions/{version}/infer", _infer)
    return app


async def serve(host: str, port: int) -> None:
    # No access log: formatting a log line per request would be measured as "overhead".
    runner = web.AppRunner(make_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    print(f"bare server listening on http://{host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="bare aiohttp+uvloop KServe v2 JSON echo server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8790)
    args = parser.parse_args(argv)
    uvloop.run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
