"""Run an ASGI app with uvicorn in a background thread on 127.0.0.1 (tests, benchmarks)."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ThreadServer:
    """`with ThreadServer(app) as url: ...` -> "http://127.0.0.1:PORT"; stopped on exit."""

    def __init__(self, app, host: str = "127.0.0.1", port: int | None = None, timeout_s: float = 20.0):
        self.host, self.port, self.timeout_s = host, port or free_port(host), timeout_s
        self.server = uvicorn.Server(
            uvicorn.Config(app, host=self.host, port=self.port, log_level="warning", lifespan="on")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + self.timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {self.url} did not start")
            time.sleep(0.01)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=self.timeout_s)
