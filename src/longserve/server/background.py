"""Run an ASGI app with uvicorn in a background thread (tests, benchmarks, notebooks): the one helper for
both the server and the proxy.

Port 0 lets the OS pick a free port, read back once uvicorn is listening, so parallel runs never race
for a port (picking a free port first and binding it later does).
"""

from __future__ import annotations

import threading
import time

import uvicorn


class BackgroundServer:
    """`with BackgroundServer(app) as s: s.url` — serves until the block exits.

    `lifespan="on"`: the app's startup runs before `__enter__` returns, and a failing startup stops it."""

    def __init__(
        self,
        app,
        host: str = "127.0.0.1",
        port: int = 0,
        log_level: str = "warning",
        timeout_s: float = 30.0,
    ):
        self.app, self.timeout_s = app, timeout_s
        config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="longserve-uvicorn", daemon=True)
        self.url = ""

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + self.timeout_s
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(self.timeout_s)
