"""Settings resolution: flags > env > file > running dev stack > defaults; librdkafka pass-through."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stream.config import DEFAULT_TOPICS, Settings, load_settings
from stream.errors import ConfigError


@pytest.fixture(autouse=True)
def _empty_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No stray rta.toml or .rta/ from the checkout may leak into these tests."""
    monkeypatch.chdir(tmp_path)


def write_stack(state_dir: Path, bootstrap: str, url: str) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / "stack.json").write_text(json.dumps({"kafka": {"bootstrap": bootstrap}, "redis": {"url": url}}))


def test_defaults() -> None:
    s = load_settings(env={})
    assert s.kafka_bootstrap == Settings.kafka_bootstrap and s.redis_url == Settings.redis_url
    assert s.topics == DEFAULT_TOPICS and s.partitions == 3 and s.kafka == {}
    assert "kafka_bootstrap" not in s.origin


@pytest.mark.parametrize("layers, winner", [
    ({"stack"}, "stack"),
    ({"stack", "file"}, "file"),
    ({"stack", "file", "env"}, "env"),
    ({"stack", "file", "env", "flag"}, "flag"),
    ({"file", "flag"}, "flag"),
    ({"stack", "env"}, "env"),
])
def test_precedence(tmp_path: Path, layers: set[str], winner: str) -> None:
    state = tmp_path / "state"
    if "stack" in layers:
        write_stack(state, "stack:1", "redis://stack:1/0")
    config = tmp_path / "c.toml"
    config.write_text(f'kafka_bootstrap = "file:1"\nredis_url = "redis://file:1/0"\nstate_dir = "{state}"\n')
    env = {"RTA_KAFKA_BOOTSTRAP": "env:1", "RTA_REDIS_URL": "redis://env:1/0"} if "env" in layers else {}
    flags = {"kafka_bootstrap": "flag:1", "redis_url": "redis://flag:1/0"} if "flag" in layers else {}
    s = load_settings(config if "file" in layers else None, env=env, state_dir=state, **flags)
    assert s.kafka_bootstrap == f"{winner}:1"
    assert s.redis_url == f"redis://{winner}:1/0"
    assert s.origin["kafka_bootstrap"] == {"stack": "dev-stack"}.get(winner, winner)


def test_none_flag_means_not_given() -> None:
    s = load_settings(env={"RTA_KAFKA_BOOTSTRAP": "env:1"}, kafka_bootstrap=None)
    assert s.kafka_bootstrap == "env:1"


def test_state_dir_from_env_finds_the_dev_stack(tmp_path: Path) -> None:
    write_stack(tmp_path / "st", "127.0.0.1:19092", "redis://127.0.0.1:16379/0")
    s = load_settings(env={"RTA_STATE_DIR": str(tmp_path / "st")})
    assert s.kafka_bootstrap == "127.0.0.1:19092" and s.redis_url == "redis://127.0.0.1:16379/0"
    assert s.state_dir == tmp_path / "st" and s.origin["redis_url"] == "dev-stack"


def test_corrupt_stack_file_is_ignored(tmp_path: Path) -> None:
    (tmp_path / "st").mkdir()
    (tmp_path / "st" / "stack.json").write_text("{not json")
    assert load_settings(env={}, state_dir=tmp_path / "st").kafka_bootstrap == Settings.kafka_bootstrap


def test_kafka_pass_through_from_env() -> None:
    env = {"RTA_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "RTA_KAFKA_SASL_MECHANISM": "PLAIN",
           "RTA_KAFKA_BOOTSTRAP": "b:9093"}
    s = load_settings(env=env)
    assert s.kafka == {"security.protocol": "SASL_SSL", "sasl.mechanism": "PLAIN"}
    conf = s.kafka_config(**{"group.id": "g"})
    assert conf == {"bootstrap.servers": "b:9093", "security.protocol": "SASL_SSL",
                    "sasl.mechanism": "PLAIN", "group.id": "g"}


def test_kafka_pass_through_layers(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[kafka]\n"security.protocol" = "SSL"\n"client.id" = "from-file"\n"linger.ms" = 7\n')
    s = load_settings(config, env={"RTA_KAFKA_CLIENT_ID": "from-env"})
    assert s.kafka == {"security.protocol": "SSL", "client.id": "from-env", "linger.ms": "7"}
    s = load_settings(config, env={"RTA_KAFKA_CLIENT_ID": "from-env"}, kafka={"client.id": "from-flag"})
    assert s.kafka["client.id"] == "from-flag"


def test_topics_from_file_and_env(tmp_path: Path) -> None:
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"topics": {"requests": "f.req", "audit": "f.audit"}, "partitions": 6}))
    s = load_settings(config, env={"RTA_TOPIC_REQUESTS": "e.req"})
    assert s.topic("requests") == "e.req" and s.topic("audit") == "f.audit"
    assert s.topic("decisions") == DEFAULT_TOPICS["decisions"] and s.partitions == 6
    prefixed = s.with_topic_prefix("x")
    assert prefixed.topic("requests") == "x.e.req" and s.topic("requests") == "e.req"


def test_rta_toml_in_cwd_is_read(tmp_path: Path) -> None:
    (tmp_path / "rta.toml").write_text('redis_prefix = "cwd"\n')
    s = load_settings(env={})
    assert s.redis_prefix == "cwd" and s.origin["redis_prefix"] == "file"


def test_types_are_normalised() -> None:
    s = load_settings(env={"RTA_PARTITIONS": "12", "RTA_MODEL_DIR": "/m"})
    assert s.partitions == 12 and s.model_dir == Path("/m")


@pytest.mark.parametrize("name, text, match", [
    ("bad.toml", "kafka_bootstrap = ", "bad.toml"),
    ("bad.json", "{", "bad.json"),
    ("unknown.toml", 'kafak_bootstrap = "x"\n', "unknown setting 'kafak_bootstrap'"),
    ("role.toml", '[topics]\nrequets = "x"\n', "unknown topic role"),
    ("parts.toml", "partitions = 0\n", "partitions must be a positive integer"),
])
def test_bad_config_file(tmp_path: Path, name: str, text: str, match: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_settings(path, env={})


def test_missing_config_file_and_bad_values(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file"):
        load_settings(tmp_path / "nope.toml", env={})
    with pytest.raises(ConfigError, match="config file"):
        load_settings(env={"RTA_CONFIG": str(tmp_path / "nope.toml")})
    with pytest.raises(ConfigError, match="partitions"):
        load_settings(env={"RTA_PARTITIONS": "many"})
    with pytest.raises(ConfigError, match="unknown setting"):
        load_settings(env={}, bootstrap="x")
    with pytest.raises(ConfigError, match="unknown topic role"):
        Settings().topic("request")


def test_the_users_fetch_settings_win_over_the_consumer_defaults() -> None:
    from stream.kafka import CONSUMER_DEFAULTS, make_consumer
    from stream.worker import GROUP_DEFAULTS

    defaults = {**CONSUMER_DEFAULTS, **GROUP_DEFAULTS}
    assert defaults["fetch.queue.backoff.ms"] == 50 and defaults["fetch.wait.max.ms"] == 50
    env = {"RTA_KAFKA_FETCH_WAIT_MAX_MS": "7", "RTA_KAFKA_FETCH_QUEUE_BACKOFF_MS": "3"}
    conf = load_settings(env=env).kafka_config(defaults, **{"group.id": "g"})
    assert conf["fetch.wait.max.ms"] == "7" and conf["fetch.queue.backoff.ms"] == "3"
    # librdkafka knows every default by name (it refuses an unknown property at construction)
    make_consumer(load_settings(env={}), "g", GROUP_DEFAULTS).close()
