"""The control plane for tests: the real app under uvicorn in a thread, on a free port, over the
test's Redis and broker, with a viewer and an operator token."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn

from control.app import create_app
from control.auth import Auth, RateLimit, TokenStore
from control.service import ControlService
from stream.config import Settings
from stream.window import RedisStore


@dataclass
class Control:
    url: str
    service: ControlService
    tokens: TokenStore
    operator: str  # token of "alice" (operator)
    viewer: str  # token of "victor" (viewer)

    def client(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)


@contextmanager
def control_plane(settings: Settings, tmp: Path, writes_per_minute: float = 600.0,
                  sample_interval: float = 1.0, audit_topic: bool = True,
                  reports_dir: Path | None = None) -> Iterator[Control]:
    tokens = TokenStore(tmp / "tokens.json")
    operator, _ = tokens.add("alice", "operator")
    viewer, _ = tokens.add("victor", "viewer")
    store = RedisStore.from_url(settings.redis_url, settings.redis_prefix, socket_timeout=2.0, connect_timeout=2.0)
    reports = reports_dir or tmp / "reports"
    reports.mkdir(exist_ok=True)
    service = ControlService(settings, store, reports_dir=reports, audit_topic=audit_topic, private=[tokens.path])
    app = create_app(service, Auth(tokens, RateLimit(writes_per_minute, burst=5)))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
    t = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="control-test")
    service.start(sample_interval)
    t.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not t.is_alive():
            raise AssertionError("control plane did not start")
        time.sleep(0.05)
    try:
        yield Control(f"http://127.0.0.1:{sock.getsockname()[1]}", service, tokens, operator, viewer)
    finally:
        server.should_exit = True
        t.join(15)
        service.stop()
        sock.close()
