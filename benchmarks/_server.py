"""BackgroundServer: the dermlens app under uvicorn in a daemon thread on a free loopback port, for tests and
benchmarks (shared by tests/ and benchmarks/)."""

from __future__ import annotations

import threading
import time

from fastapi import FastAPI

from dermlens.serve.settings import ServeSettings, load_settings


class BackgroundServer:
    """Run an app under uvicorn in a daemon thread on a free loopback port."""

    def __init__(
        self,
        app: FastAPI,
        host: str = "127.0.0.1",
        port: int = 0,
        log_level: str = "warning",
        settings: ServeSettings | None = None,
    ):
        import uvicorn

        from dermlens.serve.http import uvicorn_config

        settings = (settings or load_settings()).model_copy(update={"host": host, "port": port})
        self.server = uvicorn.Server(uvicorn_config(app, settings, log_level))
        self.thread = threading.Thread(target=self.server.run, name="dermlens-server", daemon=True)
        self.url = ""

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + 120
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the dermlens server did not start")
            time.sleep(0.05)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
