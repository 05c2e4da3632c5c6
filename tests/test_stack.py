"""The local stack (`rta dev`, `rta topics`) and the session fixtures, against real processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner
from confluent_kafka import TopicPartition

from infra.cli import cli
from infra.stack import Embedded, alive, free_port, port_taken
from stream.config import DEFAULT_TOPICS, Settings
from stream.kafka import make_admin, make_consumer, make_producer


def round_trip(settings: Settings, topic: str, n: int = 30) -> list[bytes]:
    """Produce n messages over all partitions and read them back by assignment."""
    producer = make_producer(settings)
    for i in range(n):
        producer.produce(topic, key=str(i).encode(), value=f"v{i}".encode())
    assert producer.flush(10) == 0
    consumer = make_consumer(settings, group_id=f"g-{uuid.uuid4().hex}")
    parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, 0) for p in parts])
    got: list[bytes] = []
    for _ in range(40):
        got += [m.value() for m in consumer.consume(100, 0.25) if not m.error()]
        if len(got) >= n:
            break
    consumer.close()
    return got


def rta(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "infra.cli", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def processes_in(directory: Path) -> list[int]:
    """Live pids whose working directory is under `directory` (stack processes run in the state dir)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = Path(os.readlink(entry / "cwd"))
        except OSError:
            continue
        if cwd.is_relative_to(directory) and alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def test_fixtures_round_trip(settings: Settings, redis_client: redis.Redis) -> None:
    got = round_trip(settings, settings.topic("requests"))
    assert sorted(got) == sorted(f"v{i}".encode() for i in range(30))
    key = f"{settings.redis_prefix}:k"
    redis_client.set(key, "1")
    assert redis_client.get(key) == b"1"


_SEEN_SETTINGS: list[tuple[frozenset[str], str]] = []


@pytest.mark.parametrize("run", [1, 2])
def test_settings_are_unique_per_test_and_cleaned_up(settings: Settings, kafka, redis_client: redis.Redis,
                                                     run: int) -> None:
    # two tests (the two parametrised runs) must never share a topic or the Redis prefix
    assert all(name.startswith("t.") and name.endswith(DEFAULT_TOPICS[role])
               for role, name in settings.topics.items())
    assert settings.redis_prefix.startswith("test:")
    assert settings.kafka_bootstrap == kafka.bootstrap
    mine = (frozenset(settings.topics.values()), settings.redis_prefix)
    for topics_seen, prefix_seen in _SEEN_SETTINGS:
        assert not mine[0] & topics_seen and mine[1] != prefix_seen
    # ... and an earlier test's topics and Redis keys are gone once it ended (the fixture's teardown)
    existing = set(make_admin(settings).list_topics(timeout=10).topics)
    assert mine[0] <= existing
    for topics_seen, prefix_seen in _SEEN_SETTINGS:
        assert not topics_seen & existing, sorted(topics_seen & existing)
        assert not list(redis_client.scan_iter(f"{prefix_seen}:*")), prefix_seen
    redis_client.set(f"{settings.redis_prefix}:probe", "1")  # for the next run to find deleted
    _SEEN_SETTINGS.append(mine)
    if run == 2:
        assert len(_SEEN_SETTINGS) >= 2


def test_dev_up_status_down(clean_env: dict[str, str], tmp_path: Path) -> None:
    kport, rport = free_port(), free_port()
    state_file = Path(clean_env["RTA_STATE_DIR"]) / "stack.json"
    pids: list[int] = []
    try:
        up = rta(["dev", "up", "--kafka-port", str(kport), "--redis-port", str(rport)], clean_env, tmp_path)
        assert up.returncode == 0, up.stderr
        state = json.loads(state_file.read_text())
        pids = [state["kafka"]["pid"], state["redis"]["pid"]]
        assert state["kafka"]["bootstrap"] == f"127.0.0.1:{kport}"
        assert state["redis"]["url"] == f"redis://127.0.0.1:{rport}/0"
        assert all(alive(p) for p in pids)
        assert "6 created" in up.stdout

        s = Settings(kafka_bootstrap=state["kafka"]["bootstrap"], redis_url=state["redis"]["url"])
        assert sorted(round_trip(s, s.topic("requests"))) == sorted(f"v{i}".encode() for i in range(30))
        assert redis.Redis.from_url(s.redis_url).ping() is True

        status = rta(["dev", "status"], clean_env, tmp_path)
        assert status.returncode == 0, status.stdout + status.stderr
        assert status.stdout.count(" up ") == 2 and str(pids[0]) in status.stdout

        again = rta(["dev", "up", "--kafka-port", str(kport), "--redis-port", str(rport)], clean_env, tmp_path)
        assert again.returncode == 0 and again.stdout.count("already running") == 2
        assert json.loads(state_file.read_text())["kafka"]["pid"] == pids[0]

        down = rta(["dev", "down"], clean_env, tmp_path)
        assert down.returncode == 0, down.stderr
        assert not any(alive(p) for p in pids), "a stack process survived `rta dev down`"
        assert processes_in(Path(clean_env["RTA_STATE_DIR"])) == []
        assert not state_file.exists()
        assert not port_taken(kport) and not port_taken(rport)

        after = rta(["dev", "status"], clean_env, tmp_path)
        assert after.returncode == 1 and "no dev stack" in after.stdout
    finally:
        for pid in pids:
            if alive(pid):
                os.kill(pid, 9)


def test_dev_status_reports_a_dead_component(clean_env: dict[str, str], tmp_path: Path) -> None:
    kport, rport = free_port(), free_port()
    up = rta(["dev", "up", "--kafka-port", str(kport), "--redis-port", str(rport)], clean_env, tmp_path)
    assert up.returncode == 0, up.stderr
    state = json.loads((Path(clean_env["RTA_STATE_DIR"]) / "stack.json").read_text())
    try:
        os.kill(state["redis"]["pid"], 9)
        status = rta(["dev", "status"], clean_env, tmp_path)
        assert status.returncode == 1
        assert "redis  DOWN" in status.stdout and "kafka  up" in status.stdout
    finally:
        assert rta(["dev", "down"], clean_env, tmp_path).returncode == 0
    assert not alive(state["kafka"]["pid"])


def test_port_taken_is_one_line_and_leaves_nothing(clean_env: dict[str, str], tmp_path: Path) -> None:
    kport = free_port()
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        rport = blocker.getsockname()[1]
        res = rta(["dev", "up", "--kafka-port", str(kport), "--redis-port", str(rport)], clean_env, tmp_path)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and f"port 127.0.0.1:{rport} is already in use" in lines[0], res.stderr
    # kafka had started before redis failed: it must be stopped again
    assert not port_taken(kport) and processes_in(tmp_path) == []
    assert not (Path(clean_env["RTA_STATE_DIR"]) / "stack.json").exists()


def test_missing_broker_binary_is_one_line(clean_env: dict[str, str], tmp_path: Path) -> None:
    env = {**clean_env, "CALF_TANSU_BIN": str(tmp_path / "no-such-tansu")}
    res = rta(["dev", "up", "--kafka-port", str(free_port()), "--redis-port", str(free_port())], env, tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "broker binary missing" in res.stderr


def test_broker_that_never_answers_times_out_and_is_stopped(clean_env: dict[str, str], tmp_path: Path) -> None:
    fake = tmp_path / "fake-tansu"
    fake.write_text("#!/bin/sh\necho starting up slowly\nexec sleep 60\n")
    fake.chmod(0o755)
    env = {**clean_env, "CALF_TANSU_BIN": str(fake)}
    res = rta(["dev", "up", "--kafka-port", str(free_port()), "--redis-port", str(free_port()),
               "--timeout", "1"], env, tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0, res.stderr
    assert "did not answer within 1s" in res.stderr and "starting up slowly" in res.stderr
    assert processes_in(tmp_path) == [], "the hung broker was left running"


def test_dev_up_uses_external_servers(kafka, redis_server, clean_env: dict[str, str], tmp_path: Path) -> None:
    # every topic of this test is its own (dev up provisions all roles on the external cluster:
    # default names there would collide with whatever else uses that cluster)
    prefix = f"ext{uuid.uuid4().hex[:8]}"
    names = {role: f"{prefix}.{DEFAULT_TOPICS[role]}" for role in DEFAULT_TOPICS}
    env = {**clean_env, "RTA_KAFKA_BOOTSTRAP": kafka.bootstrap, "RTA_REDIS_URL": redis_server.url,
           **{f"RTA_TOPIC_{role.upper()}": name for role, name in names.items()}}
    before = set(make_admin(Settings(kafka_bootstrap=kafka.bootstrap)).list_topics(timeout=10).topics)
    up = rta(["dev", "up", "--kafka-port", "1", "--redis-port", "1"], env, tmp_path)
    assert up.returncode == 0, up.stderr
    assert up.stdout.count("using external") == 2
    state = json.loads((Path(clean_env["RTA_STATE_DIR"]) / "stack.json").read_text())
    assert state["kafka"]["external"] and "pid" not in state["kafka"] and "pid" not in state["redis"]
    s = Settings(kafka_bootstrap=kafka.bootstrap)
    after = set(make_admin(s).list_topics(timeout=10).topics)
    assert after - before == set(names.values())  # exactly this test's topics, none by default name
    assert len(round_trip(s, names["requests"], 5)) == 5  # the topic was created there
    down = rta(["dev", "down"], env, tmp_path)
    assert down.returncode == 0 and down.stdout.count("left alone") == 2
    assert redis.Redis.from_url(redis_server.url).ping()


def test_topics_create_is_idempotent(kafka, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    prefix = f"tc{uuid.uuid4().hex[:8]}"
    config = tmp_path / "rta.toml"
    config.write_text("[topics]\n" + "".join(f'{role} = "{prefix}.{name}"\n' for role, name in DEFAULT_TOPICS.items()))
    monkeypatch.setenv("RTA_STATE_DIR", str(tmp_path / "state"))
    runner = CliRunner()
    missing = runner.invoke(cli, ["topics", "list", "--bootstrap", kafka.bootstrap, "--config", str(config)])
    assert missing.exit_code == 1 and missing.output.count("MISSING") == len(DEFAULT_TOPICS)
    args = ["topics", "create", "--bootstrap", kafka.bootstrap, "--config", str(config), "--partitions", "2"]
    first = runner.invoke(cli, args)
    assert first.exit_code == 0, first.output
    assert first.output.count(" created ") == len(DEFAULT_TOPICS)
    second = runner.invoke(cli, args)
    assert second.exit_code == 0, second.output
    assert second.output.count(" exists ") == len(DEFAULT_TOPICS) and " created " not in second.output
    listed = runner.invoke(cli, ["topics", "list", "--bootstrap", kafka.bootstrap, "--config", str(config)])
    assert listed.exit_code == 0 and listed.output.count("  2 partitions") == len(DEFAULT_TOPICS)


def test_topics_create_unreachable_cluster(clean_env: dict[str, str], tmp_path: Path) -> None:
    env = {**clean_env, "RTA_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}"}
    res = rta(["topics", "create", "--timeout", "2"], env, tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "did not answer" in res.stderr, res.stderr


def test_embedded_restart_keeps_port(tmp_path: Path) -> None:
    server = Embedded("redis", log_dir=tmp_path)
    server.start()
    try:
        client = redis.Redis.from_url(server.address)
        assert client.ping()
        first_pid = server.proc.pid
        server.restart(crash=True)
        assert server.proc.pid != first_pid and not alive(first_pid)
        assert redis.Redis.from_url(server.address).ping()
    finally:
        server.stop()
    assert not port_taken(server.port)
