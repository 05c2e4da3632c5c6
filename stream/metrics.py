"""Worker metrics (Prometheus) and the `/metrics` + `/healthz` HTTP endpoints.

Each worker owns a registry, so several workers in one process (tests, the demo) never mix
their numbers. Updates happen once per batch with batch totals, never per event.
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)

REDIS_STATES = ("ok", "degraded")
CANARY_STATES = ("none", "serving", "refused", "rolled_back")


class WorkerMetrics:
    """Everything an operator watches on one worker."""

    def __init__(self, worker_id: str) -> None:
        self.worker_id = worker_id
        r = self.registry = CollectorRegistry()
        self.events = Counter("rta_events", "Requests decided (valid + invalid).", registry=r)
        self.decisions = Counter("rta_decisions", "Decisions by outcome and reason.",
                                 ["decision", "reason"], registry=r)
        self.dlq = Counter("rta_dlq", "Requests sent to the dead-letter topic.", ["code"], registry=r)
        self.batches = Counter("rta_batches", "Batches processed.", registry=r)
        self.batch_seconds = Histogram(
            "rta_batch_seconds", "Wall time of one batch: decode -> score -> decide -> produce.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5), registry=r)
        self.batch_size = Histogram("rta_batch_size", "Messages per batch.",
                                    buckets=(1, 10, 50, 100, 250, 500, 1000, 2000, 5000), registry=r)
        self.block_share = Gauge("rta_block_share", "Share of the last batch that was blocked.", registry=r)
        self.uncertain_share = Gauge("rta_uncertain_share", "Share passed as uncertain (last batch).", registry=r)
        self.explore_share = Gauge("rta_explore_share", "Share passed as explore (last batch).", registry=r)
        self.theta = Gauge("rta_theta", "Score threshold in use.", registry=r)
        self.tau_u = Gauge("rta_tau_u", "Uncertainty threshold in use.", registry=r)
        self.target_ratio = Gauge("rta_target_ratio", "Live target block share r.", registry=r)
        self.model = Info("rta_model", "Model version being served.", registry=r)
        self.reloads = Counter("rta_model_reloads", "Model reload attempts by result.", ["result"], registry=r)
        self.redis_state = Gauge("rta_redis_state", "1 for the current Redis state.", ["state"], registry=r)
        self.commits = Counter("rta_commits", "Checkpoint commits.", registry=r)
        self.commit_seconds = Histogram(
            "rta_commit_seconds", "Wall time of one checkpoint (producer flush + offset commit); the loop "
            "consumes nothing meanwhile, so it adds to the latency of requests arriving then.",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0), registry=r)
        self.checkpoint_failures = Counter("rta_checkpoint_failures", "Failed checkpoint commits by kind.",
                                           ["kind"], registry=r)
        self.lag_ms = Gauge("rta_request_age_ms", "Age of the newest request of the last batch at decision.",
                            registry=r)
        self.produce_errors = Counter("rta_produce_errors", "Messages produce() refused (each cost only "
                                      "itself), by topic and librdkafka error.", ["topic", "code"], registry=r)
        self.failing_checkpoints = Gauge("rta_checkpoint_failing", "Consecutive failed checkpoints (0: the "
                                         "last one committed); replays back off while > 0.", registry=r)
        self.nan_outputs = Counter("rta_nan_outputs", "Valid requests the model scored NaN/inf "
                                   "(passed, reason nan_output): a model fault.", registry=r)
        self.unknown_features = Counter("rta_unknown_features", "Request feature names the bundle does not "
                                        "know (a producer on another feature schema?).", registry=r)
        self.clock_skew = Gauge("rta_clock_skew_seconds", "This host's clock minus Redis TIME (buckets of "
                                "the shared window are misaligned by this much).", registry=r)
        self.targets_source = Gauge("rta_targets_source", "1 for where the targets in force come from: redis, "
                                    "last (Redis lost them), peers (adopted), default (none known).",
                                    ["source"], registry=r)
        self._targets_source = ""
        # canary (stream.canary): per-arm decisions of this worker, and whether it serves the canary
        self.arm_decisions = Counter("rta_arm_decisions", "Decisions by arm (current, canary) while a canary "
                                     "runs.", ["arm", "decision"], registry=r)
        self.arm_bad = Counter("rta_arm_bad_outputs", "NaN/invalid outputs by arm while a canary runs.", ["arm"],
                               registry=r)
        self.arm_block_share = Gauge("rta_arm_block_share", "Block share of each arm since the canary started "
                                     "on this worker.", ["arm"], registry=r)
        self.canary_state = Gauge("rta_canary_state", "1 for this worker's canary state: none, serving, refused "
                                  "(named but not loadable: current decides all traffic), rolled_back.",
                                  ["state"], registry=r)
        self._canary = ""
        self.set_canary("none")
        self.last_loop = time.monotonic()  # liveness: updated every loop iteration
        self.last_nan = -float("inf")  # monotonic time of the last NaN output
        self.unhealthy_after_failures = 3
        self.state = "starting"
        self.set_redis(False)

    def set_targets_source(self, source: str) -> None:
        if source != self._targets_source:
            self._targets_source = source
            for s in ("redis", "last", "peers", "default"):
                self.targets_source.labels(s).set(1.0 if s == source else 0.0)

    def set_canary(self, state: str) -> None:
        if state != self._canary:
            self._canary = state
            for s in CANARY_STATES:
                self.canary_state.labels(s).set(1.0 if s == state else 0.0)

    def set_redis(self, degraded: bool) -> None:
        for s in REDIS_STATES:
            self.redis_state.labels(s).set(1.0 if (s == "degraded") == degraded else 0.0)

    def health(self, stall_s: float = 30.0, alert_s: float = 300.0) -> tuple[bool, dict[str, Any]]:
        """Healthy = the loop turned within `stall_s`, the worker is running and checkpoints
        commit (fewer than `unhealthy_after_failures` failures in a row). `alerts` lists what an
        operator should look at without restarting the worker (NaN outputs in the last `alert_s`)."""
        now = time.monotonic()
        since = now - self.last_loop
        failing = int(self.failing_checkpoints._value.get())
        ok = (self.state in ("starting", "running", "draining") and since < stall_s
              and failing < self.unhealthy_after_failures)
        alerts = []
        if failing:
            alerts.append("checkpoint_failing")
        if now - self.last_nan < alert_s:
            alerts.append("nan_outputs")
        if self._targets_source == "default":
            alerts.append("targets_default")
        if self._canary in ("refused", "rolled_back"):
            alerts.append(f"canary_{self._canary}")
        return ok, {"worker": self.worker_id, "state": self.state, "loop_age_s": round(since, 3),
                    "checkpoint_failing": failing, "nan_outputs": int(self.nan_outputs._value.get()),
                    "alerts": alerts}


class MetricsServer:
    """A tiny HTTP server: `/metrics` (Prometheus text) and `/healthz` (200 or 503, JSON)."""

    def __init__(self, metrics: WorkerMetrics, host: str = "127.0.0.1", port: int = 0) -> None:
        registry = metrics.registry

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    body, status, ctype = generate_latest(registry), 200, CONTENT_TYPE_LATEST
                elif path in ("/healthz", "/health"):
                    ok, info = metrics.health()
                    body, status, ctype = orjson.dumps(info), 200 if ok else 503, "application/json"
                else:
                    body, status, ctype = b"not found\n", 404, "text/plain"
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                return  # scrapes are not worth a log line

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="rta-metrics", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
