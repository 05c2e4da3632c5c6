"""Each worker's status record: what the control plane's fleet view shows per worker.

The worker calls ``StatusPublisher.maybe_publish(worker)`` once per loop turn; it costs one clock
read and a comparison, and every ``interval`` seconds (default 2 s) one ``SET ... EX ttl`` of a
small JSON object to ``<prefix>:status:worker:<id>``. So the record is written at a bounded
cadence whatever the request rate (no per-request work), and a worker that stops publishing
disappears from the fleet when its TTL (default 15 s) runs out.

The record (all JSON)::

    {"id", "host", "pid", "ts_ms", "model", "theta", "tau_u", "degraded", "targets",
     "targets_version", "targets_source", "request_age_ms", "events", "partitions", "state",
     "canary"}   # canary: null, or this worker's per-arm counts (stream.worker.canary_status)

While the controller is degraded (Redis unreachable) nothing is published: the controller owns
the retry policy, and a dead Redis must not cost the hot path another timeout. A failed write is
counted and never raised (bad Redis replies must not stop a worker), and so is anything else
that goes wrong building the record (logged).
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
from typing import Any

from stream.window import StoreUnavailable

log = logging.getLogger("rta.status")

STATUS_KEY = "status:worker:"  # after "<prefix>:"


def status_key(prefix: str, worker_id: str) -> str:
    """The Redis key of one worker's status record."""
    return f"{prefix}:{STATUS_KEY}{worker_id}"


def status_pattern(prefix: str) -> str:
    """SCAN pattern of every worker's status record under a prefix."""
    return f"{prefix}:{STATUS_KEY}*"


def _finite(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and math.isfinite(v) else None


class StatusPublisher:
    """Publishes one worker's status record at a bounded cadence (module docstring)."""

    def __init__(self, store: Any, worker_id: str, interval: float = 2.0, ttl: int = 15) -> None:
        self.store = store  # a RedisStore (anything else, e.g. a MemoryStore: nothing to publish)
        self.worker_id = worker_id
        self.interval = float(interval)
        self.ttl = int(ttl)
        self.key = status_key(getattr(store, "prefix", "rta"), worker_id)
        self.published = 0
        self.errors = 0
        self._next = 0.0
        self._host = socket.gethostname()
        self._pid = os.getpid()

    def maybe_publish(self, worker: Any, now: float | None = None) -> bool:
        """Publish if ``interval`` has passed since the last attempt. True if written."""
        now = time.monotonic() if now is None else now
        if now < self._next:
            return False
        self._next = now + self.interval
        client = getattr(self.store, "r", None)
        if client is None or worker.controller.degraded:
            return False
        try:
            body = json.dumps(self.record(worker))
            self.store._call(lambda: client.set(self.key, body, ex=self.ttl))
        except StoreUnavailable:
            self.errors += 1
            return False
        except Exception as exc:  # noqa: BLE001 - a status record is never worth a worker
            self.errors += 1
            if self.errors == 1 or self.errors % 1000 == 0:
                log.warning("status record %s not published (%s: %s); the worker goes on", self.key,
                            type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            return False
        self.published += 1
        return True

    def record(self, worker: Any) -> dict[str, Any]:
        """The status record of ``worker`` (a stream.worker.Worker) right now."""
        th = worker.controller.thresholds()
        age = worker.metrics.registry.get_sample_value("rta_request_age_ms")
        return {
            "id": self.worker_id,
            "host": self._host,
            "pid": self._pid,
            "ts_ms": int(time.time() * 1000),
            "state": worker.metrics.state,
            "model": worker.scorer.version,
            "theta": _finite(th.theta),
            "tau_u": _finite(th.tau_u),
            "degraded": bool(th.degraded),
            "targets": th.targets.to_dict(),
            "targets_version": int(th.version),
            "targets_source": worker.controller.targets_source,
            "request_age_ms": _finite(age) if worker.stats.events else None,
            "events": int(worker.stats.events),
            "partitions": len(worker.assignment),
            "canary": getattr(worker, "canary_status", lambda: None)(),
        }
