"""Settings: flags, then environment, then a config file, then the running dev stack, then defaults.

librdkafka settings pass through unchanged: `RTA_KAFKA_SECURITY_PROTOCOL=SSL` becomes
`security.protocol=SSL`, and a `[kafka]` table in the config file is copied as is; they win
over the data plane's defaults (`Settings.kafka_config`), as Kafka users expect.

Secrets never reach an output or a state file: `redact()` masks the password of a URL
(`redis://user:***@host:6379/0`) wherever one is printed or recorded.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from stream.errors import ConfigError

TOPIC_ROLES = ("requests", "decisions", "outcomes", "dlq", "control", "audit")
DEFAULT_TOPICS = {
    "requests": "rta.requests",
    "decisions": "rta.decisions",
    "outcomes": "rta.outcomes",
    "dlq": "rta.requests.dlq",
    "control": "rta.control",
    "audit": "rta.audit",
}
# Environment names that are ours, not librdkafka pass-through.
_RESERVED_KAFKA_ENV = {"RTA_KAFKA_BOOTSTRAP"}


@dataclass(frozen=True)
class Settings:
    """Everything a process needs to find the cluster, Redis, models and its own state."""

    kafka_bootstrap: str = "127.0.0.1:9092"
    redis_url: str = "redis://127.0.0.1:6379/0"
    model_dir: Path = Path("models")
    state_dir: Path = Path(".rta")
    redis_prefix: str = "rta"
    partitions: int = 3
    ratio_max_step: float = 0.25  # largest change of r one `rta ratio set` may make
    topics: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_TOPICS))
    kafka: dict[str, str] = field(default_factory=dict)  # librdkafka pass-through
    # Where each value came from ("flag", "env", "file", "dev-stack", "default"), for `status`.
    origin: dict[str, str] = field(default_factory=dict, compare=False)

    def topic(self, role: str) -> str:
        """Topic name for a role ("requests", "decisions", ...)."""
        try:
            return self.topics[role]
        except KeyError:
            raise ConfigError(f"unknown topic role {role!r}; known: {', '.join(TOPIC_ROLES)}") from None

    def kafka_config(self, defaults: dict[str, Any] | None = None, **overrides: Any) -> dict[str, Any]:
        """librdkafka configuration, later wins: bootstrap, our `defaults` (throughput, group
        timing), the user's pass-through, then per-client `overrides` (what the code needs to
        work, e.g. on_delivery, transactional.id)."""
        conf: dict[str, Any] = {"bootstrap.servers": self.kafka_bootstrap}
        conf.update(defaults or {})
        conf.update(self.kafka)
        conf.update(overrides)
        return conf

    def with_topic_prefix(self, prefix: str) -> Settings:
        """Same settings with every topic renamed `<prefix>.<name>` (tests, side-by-side runs)."""
        return replace(self, topics={k: f"{prefix}.{v}" for k, v in self.topics.items()})


_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*:)(?P<pw>[^@\s]+)(?P<at>@)")


def redact(text: str) -> str:
    """Mask every URL password in `text` ("redis://u:pw@h" -> "redis://u:***@h")."""
    return _URL_PASSWORD.sub(lambda m: f"{m['head']}***{m['at']}", str(text))


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror}") from None
    try:
        if path.suffix == ".json":
            return json.loads(text)
        if path.suffix in {".yaml", ".yml"}:
            try:
                import yaml  # optional
            except ModuleNotFoundError:
                raise ConfigError(f"config file {path}: YAML needs PyYAML; use TOML or JSON") from None
            return yaml.safe_load(text) or {}
        return tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config file {path}: {exc}") from None


def _dev_stack_addresses(state_dir: Path) -> dict[str, str]:
    """Addresses recorded by `rta dev up`, so other verbs find a stack on non-default ports."""
    path = state_dir / "stack.json"
    if not path.exists():
        return {}
    try:
        state = json.loads(path.read_text())
    except ValueError:
        return {}
    out = {}
    if state.get("kafka", {}).get("bootstrap"):
        out["kafka_bootstrap"] = state["kafka"]["bootstrap"]
    url = state.get("redis", {}).get("url")
    if url and ":***@" not in url:  # a redacted (external, with a password) URL is no address
        out["redis_url"] = url
    return out


def load_settings(
    config_file: str | Path | None = None,
    env: dict[str, str] | None = None,
    **flags: Any,
) -> Settings:
    """Resolve settings. `flags` holds CLI values; None means "not given"."""
    env = dict(os.environ if env is None else env)
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    known = {f.name for f in fields(Settings)} - {"origin"}

    def put(key: str, value: Any, source: str) -> None:
        if key not in origin or _rank(source) < _rank(origin[key]):
            values[key] = value
            origin[key] = source

    # flags
    for key, value in flags.items():
        if value is None:
            continue
        if key not in known:
            raise ConfigError(f"unknown setting {key!r}")
        put(key, value, "flag")

    # environment
    env_map = {
        "RTA_KAFKA_BOOTSTRAP": "kafka_bootstrap",
        "RTA_REDIS_URL": "redis_url",
        "RTA_MODEL_DIR": "model_dir",
        "RTA_STATE_DIR": "state_dir",
        "RTA_REDIS_PREFIX": "redis_prefix",
        "RTA_PARTITIONS": "partitions",
        "RTA_RATIO_MAX_STEP": "ratio_max_step",
    }
    for var, key in env_map.items():
        if env.get(var):
            put(key, env[var], "env")
    env_topics = {
        role: env[f"RTA_TOPIC_{role.upper()}"] for role in TOPIC_ROLES if env.get(f"RTA_TOPIC_{role.upper()}")
    }
    env_kafka = {
        k[len("RTA_KAFKA_"):].lower().replace("_", "."): v
        for k, v in env.items()
        if k.startswith("RTA_KAFKA_") and k not in _RESERVED_KAFKA_ENV
    }

    # config file
    path = config_file or env.get("RTA_CONFIG") or ("rta.toml" if Path("rta.toml").exists() else None)
    file_values = _read_file(Path(path)) if path else {}
    file_kafka = {str(k): str(v) for k, v in (file_values.pop("kafka", None) or {}).items()}
    file_topics = dict(file_values.pop("topics", None) or {})
    for key, value in file_values.items():
        if key not in known:
            raise ConfigError(f"config file {path}: unknown setting {key!r}")
        put(key, value, "file")

    # a running dev stack
    state_dir = Path(values.get("state_dir", Settings.state_dir))
    for key, value in _dev_stack_addresses(state_dir).items():
        put(key, value, "dev-stack")

    topics = dict(DEFAULT_TOPICS)
    for source in (file_topics, env_topics, flags.get("topics") or {}):
        unknown = set(source) - set(TOPIC_ROLES)
        if unknown:
            raise ConfigError(f"unknown topic role(s) {sorted(unknown)}; known: {', '.join(TOPIC_ROLES)}")
        topics.update(source)
    values["topics"] = topics
    values["kafka"] = {**file_kafka, **env_kafka, **(flags.get("kafka") or {})}

    try:
        if "partitions" in values:
            values["partitions"] = int(values["partitions"])
            if values["partitions"] < 1:
                raise ValueError
    except ValueError:
        raise ConfigError(f"partitions must be a positive integer, got {values['partitions']!r}") from None
    try:
        if "ratio_max_step" in values:
            values["ratio_max_step"] = float(values["ratio_max_step"])
            if not 0 < values["ratio_max_step"] <= 1:
                raise ValueError
    except ValueError:
        raise ConfigError(f"ratio_max_step must be a number in (0, 1], got {values['ratio_max_step']!r}") from None
    for key in ("model_dir", "state_dir"):
        if key in values:
            values[key] = Path(values[key])
    return Settings(**values, origin=origin)


def _rank(source: str) -> int:
    return ["flag", "env", "file", "dev-stack", "default"].index(source)
