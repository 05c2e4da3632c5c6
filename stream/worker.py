"""`rta serve`: one consumer-group member that decides every request it is assigned.

A batch follows one path, step by step, each step a module:

    consume (Kafka)  ->  decode (stream.events)  ->  score (stream.scorer)
    ->  decide (stream.policy + stream.controller)  ->  produce decisions (+ DLQ)
    ->  checkpoint (stream.checkpoint: commit only after every decision is acknowledged)

The guarantee is the checkpoint's: offsets of a batch are committed only after the broker
acknowledged every decision of it, so a crash replays and never skips (at-least-once); with
`--exactly-once` decisions and offsets are committed in one Kafka transaction. Invalid
requests go to the DLQ with their error AND get a pass decision with reason `invalid`.

Between batches the worker commits when the checkpoint is due, and every
`reload_interval_s` checks `<model_dir>/current`: a new version is loaded and validated
before it serves; a bad one is refused (logged, counted) and the old model keeps serving.
SIGTERM/SIGINT stop consuming, commit what was decided, leave the group and exit 0.

Faults cost as little as they can: a message `produce()` refuses (too large, ...) costs only
that message (a dead letter is truncated or sent as headers only; a decision is never dropped,
the checkpoint fails instead); a checkpoint that keeps failing is retried with exponential
backoff (consumption paused, `/healthz` 503, the failing topic named in the log) instead of
replaying as fast as the loop turns; a rewind that cannot seek back stops the worker (exit
code 2) rather than commit over undelivered decisions.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np
from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition

from model.bundle import current_version
from stream.canary import ArmGuard, canary_arm, read_canary
from stream.canary import stop as stop_canary
from stream.checkpoint import Checkpoint, CheckpointError, CheckpointFatalError, DeliveryReports
from stream.config import Settings, load_settings
from stream.controller import ControllerConfig, RatioController
from stream.engine import score_batch
from stream.errors import BundleError, ConfigError, RtaError, WorkerError
from stream.events import (
    MAX_BYTES,
    RequestBatch,
    dead_letters,
    decision_headers,
    decode_requests,
    decoder_in_use,
    encode_decisions,
)
from stream.kafka import consume_ready, make_consumer, make_producer, wait_reachable
from stream.metrics import MetricsServer, WorkerMetrics
from stream.policy import (
    DEGRADED,
    EXPLORE,
    NAN_OUTPUT,
    REASONS,
    UNCERTAIN,
    Decisions,
    ScorePolicy,
    decide,
)
from stream.prior import ScoreDistribution
from stream.scorer import Scorer
from stream.status import StatusPublisher

log = logging.getLogger("rta.worker")

# Consumer-group timing: Tansu holds a join for about half the session timeout, and a
# killed member is noticed after one session timeout, so keep it short (librdkafka pass-
# through in the settings wins).
GROUP_DEFAULTS: dict[str, Any] = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000}
_REASON_NAMES = np.asarray(REASONS, dtype=object)
INVALID = REASONS.index("invalid")
# A dead letter's value is cut to this many bytes (header rta-truncated = original length), so a
# request the broker accepted compressed never exceeds the producer's message.max.bytes (1 MB).
DLQ_MAX_BYTES = 512 * 1024
# The steps of `Worker.process`, in order, as `rta bench worker` reports them.
STAGES = ("consume", "decode", "route", "codes", "score", "policy", "encode", "produce", "controller", "account")


class _StageClock:
    """Wall and thread-CPU time per stage of one batch: two clock reads per stage, so the
    per-stage table of `rta bench worker` costs the worker ~1 us per batch."""

    __slots__ = ("wall", "cpu", "_w", "_c")

    def __init__(self, wall: dict[str, float], cpu: dict[str, float]) -> None:
        self.wall, self.cpu = wall, cpu
        self._w, self._c = time.perf_counter(), time.thread_time()

    def lap(self, stage: str) -> None:
        w, c = time.perf_counter(), time.thread_time()
        self.wall[stage] += w - self._w
        self.cpu[stage] += c - self._c
        self._w, self._c = w, c


@dataclass
class CanaryArm:
    """The canary model served beside `current` (stream.canary): its own scorer, policy and
    ratio controller (its own histograms under the fleet's one r), headers naming its version."""

    version: str
    share: float
    scorer: Scorer
    policy: ScorePolicy
    controller: RatioController
    _headers: list[tuple[str, bytes]]
    fingerprint: str


def _arm_counts() -> dict[str, float]:
    return {"rows": 0, "blocked": 0, "nan": 0, "score_s": 0.0, "rows_w": 0, "blocked_w": 0}


@dataclass
class WorkerConfig:
    """Knobs of one worker (the `rta serve` flags)."""

    group_id: str = "rta-worker"
    batch_size: int = 1000
    batch_wait_ms: int = 20  # longest wait for a batch's first message (then: what is queued)
    commit_interval_s: float = 1.0
    commit_every: int = 0
    exactly_once: bool = False
    reload_interval_s: float = 2.0
    metrics_port: int | None = None  # None: no HTTP server; 0: any free port
    metrics_host: str = "127.0.0.1"
    intra_threads: int = 1
    max_bytes: int = MAX_BYTES
    flush_timeout_s: float = 30.0
    startup_timeout_s: float = 30.0  # wait for the cluster at start-up, then fail (0: no check)
    dlq_max_bytes: int = DLQ_MAX_BYTES
    checkpoint_backoff_s: float = 0.5  # first pause after a failed checkpoint, doubling ...
    checkpoint_backoff_max_s: float = 30.0  # ... up to this
    unhealthy_after_failures: int = 3  # consecutive failed checkpoints -> /healthz 503
    worker_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}")
    # Stable per worker slot, so a replacement fences its crashed predecessor (--exactly-once).
    # None: "<group>-<hostname>" (a container's or pod's name is its slot).
    transactional_id: str | None = None
    seed: int | None = None
    controller: ControllerConfig | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {self.batch_size}")
        if self.batch_wait_ms < 0:
            raise ConfigError(f"batch wait must be >= 0 ms, got {self.batch_wait_ms}")
        if self.commit_interval_s < 0 or self.commit_every < 0:
            raise ConfigError("commit interval and commit-every must be >= 0")
        if self.exactly_once and self.commit_interval_s >= 50:
            raise ConfigError("with --exactly-once the commit interval must stay below the 60 s "
                              "transaction timeout")


@dataclass
class WorkerStats:
    """Running totals (tests, the demo and the benchmark read them)."""

    events: int = 0
    invalid: int = 0
    blocked: int = 0
    degraded: int = 0
    batches: int = 0
    commits: int = 0
    commit_s: float = 0.0  # wall time inside checkpoint commits (flush + offset commit)
    commit_max_s: float = 0.0
    checkpoint_failures: int = 0
    lost_partitions: int = 0  # partitions the group took away without a revoke (session timeout)
    producer_renewals: int = 0  # producers replaced after the broker stopped accepting their identity
    reloads: int = 0
    refused_reloads: int = 0
    busy_s: float = 0.0  # wall time inside batch processing
    busy_cpu_s: float = 0.0  # CPU time of the worker thread inside batch processing
    # per stage of `process` (STAGES): wall and thread-CPU seconds, summed over batches
    stage_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    stage_cpu_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    produce_errors: int = 0  # messages produce() refused (each cost only itself)
    nan_outputs: int = 0  # valid requests the model scored NaN/inf (reason nan_output)
    unknown_features: int = 0  # feature names the bundle does not know (another schema?)
    failing_checkpoints: int = 0  # consecutive failed checkpoints (0 once one commits)


class Worker:
    """One group member: `run()` until `stop()` (or a signal, from the CLI)."""

    def __init__(self, settings: Settings, config: WorkerConfig | None = None,
                 controller: RatioController | None = None) -> None:
        self.settings = settings
        self.config = cfg = config or WorkerConfig()
        self.stats = WorkerStats()
        self.metrics = WorkerMetrics(cfg.worker_id)
        self.metrics.unhealthy_after_failures = cfg.unhealthy_after_failures
        self._stop = threading.Event()
        self.assignment: set[tuple[str, int]] = set()  # kept by the rebalance callbacks
        self._rng = np.random.default_rng(cfg.seed)
        self.requests_topic = settings.topic("requests")
        self.decisions_topic = settings.topic("decisions")
        self.dlq_topic = settings.topic("dlq")

        self._load_model(self._current_bundle())
        # canary (stream.canary): loaded beside current when <model_dir>/canary.json names one
        self.canary: CanaryArm | None = None
        self.canary_problem: str | None = None  # why the canary in force is not served here
        self._canary_refused: tuple[str, float] | None = None
        self.arms: dict[str, dict[str, float]] = {"current": _arm_counts(), "canary": _arm_counts()}
        self.guard = ArmGuard()
        self._refused: str | None = None
        self._next_reload_check = time.monotonic() + cfg.reload_interval_s

        if cfg.startup_timeout_s > 0:
            # the model is checked first (local), then the cluster: fail fast, in one line
            wait_reachable(settings, cfg.startup_timeout_s)
        self.controller = controller or RatioController.from_settings(
            settings, cfg.controller, controller_id=cfg.worker_id)
        self.controller.set_model(self.scorer.version, self.prior)
        self.controller.refresh()  # read the live targets now, before the first batch
        self.status = StatusPublisher(self.controller.store, cfg.worker_id)  # fleet view, every 2 s
        self._follow_canary()

        self.reports = DeliveryReports()
        self.transactional_id = cfg.transactional_id or f"{cfg.group_id}-{socket.gethostname()}"
        txn = {"transactional.id": self.transactional_id} if cfg.exactly_once else {}
        self.producer = make_producer(settings, **self.reports.producer_config(), **txn)
        if cfg.exactly_once:
            try:
                self.producer.init_transactions(cfg.flush_timeout_s)
            except KafkaException as exc:
                raise ConfigError(f"--exactly-once: the cluster refused transactions ({exc.args[0].str()})") from None
        self.consumer = make_consumer(settings, cfg.group_id, GROUP_DEFAULTS)
        self.checkpoint = Checkpoint(
            self.consumer, self.producer, self.reports, exactly_once=cfg.exactly_once,
            commit_interval_s=cfg.commit_interval_s, commit_every=cfg.commit_every,
            flush_timeout_s=cfg.flush_timeout_s)
        self.server = (MetricsServer(self.metrics, cfg.metrics_host, cfg.metrics_port)
                       if cfg.metrics_port is not None else None)
        self._hold_until = 0.0  # consumption paused (checkpoint backoff) until this monotonic time
        self._fatal: CheckpointFatalError | None = None

    # --- model ----------------------------------------------------------------------------

    def _current_bundle(self) -> Path:
        model_dir = Path(self.settings.model_dir)
        version = current_version(model_dir)
        if version is None:
            # Also accept a bundle directory given directly as the model dir.
            if (model_dir / "manifest.json").is_file():
                return model_dir
            raise BundleError(f"{model_dir}/current: no model published; train one (`rta train`) "
                              "or point --model-dir at a model directory")
        return model_dir / version

    def _load_model(self, bundle: Path) -> None:
        """Load, verify and smoke-test a bundle; ANY failure is a BundleError naming it, so a
        bad bundle is refused (reload) or reported on one line (start-up), never a crash."""
        scorer, policy, prior = self._load_bundle(bundle)
        self.scorer, self.policy, self.prior = scorer, policy, prior
        self.bundle = bundle
        if prior is None:
            log.warning("model %s carries no score distribution (trained before it existed, or in other "
                        "bins): the ratio controller starts from its window alone", scorer.version,
                        extra={"event": "no_score_distribution", "version": scorer.version})
        self._headers = decision_headers(scorer.version)
        self._fingerprint = scorer.spec.fingerprint()
        self.metrics.model.info({"version": scorer.version, "path": str(bundle),
                                 "fingerprint": self._fingerprint})

    def _load_bundle(self, bundle: Path) -> tuple[Scorer, ScorePolicy, ScoreDistribution | None]:
        try:
            scorer = Scorer.load(bundle, intra_threads=self.config.intra_threads)
            policy = ScorePolicy.from_manifest(scorer.manifest)
            _smoke_test(scorer, policy)
            spec = (self.config.controller or ControllerConfig()).spec
            prior = ScoreDistribution.from_manifest(scorer.manifest, spec, where=f"{bundle}/manifest.json")
        except BundleError:
            raise
        except Exception as exc:  # onnxruntime, PermissionError, malformed manifest values, ...
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise BundleError(f"{bundle}: refused ({type(exc).__name__}: {first})") from None
        return scorer, policy, prior

    def _follow_canary(self) -> None:
        """Serve the canary `<model_dir>/canary.json` names (or stop serving one). A canary this
        worker cannot load (or an unreadable state file) leaves `current` deciding ALL traffic:
        one log line, `/healthz` alert `canary_not_served`, metric `rta_canary_state{state="refused"}`."""
        model_dir = Path(self.settings.model_dir)
        try:
            state = read_canary(model_dir)
            problem = None
        except BundleError as exc:
            state, problem = None, str(exc)
        if state is None or state.version == self.scorer.version:
            if self.canary is not None:
                log.info("canary %s stopped: current %s decides all traffic", self.canary.version,
                         self.scorer.version, extra={"event": "canary_stopped", "version": self.canary.version})
                self.canary = None
            self._canary_not_served(problem, None)
            return
        if self.canary is not None and self.canary.version == state.version:
            self.canary.share = state.share
            return
        if self._canary_refused == (state.version, state.share):
            return
        try:
            scorer, policy, prior = self._load_bundle(model_dir / state.version)
        except BundleError as exc:
            self.canary = None
            self._canary_not_served(f"canary {state.version} not served, current {self.scorer.version} "
                                    f"decides all traffic: {exc}", (state.version, state.share))
            return
        ctl = self.controller
        canary_ctl = RatioController(ctl.store, ctl.config, ctl.clock, f"{self.config.worker_id}~canary", ctl.timer)
        # its feedback starts at 0: the peers' integrals corrected current's model
        canary_ctl.set_model(scorer.version, prior, join=False)
        self.canary = CanaryArm(state.version, state.share, scorer, policy, canary_ctl,
                                decision_headers(scorer.version), scorer.spec.fingerprint())
        self.arms = {"current": _arm_counts(), "canary": _arm_counts()}
        self._canary_not_served(None, None)
        self.metrics.set_canary("serving")
        log.info("canary %s serves %.2f%% of requests beside %s", state.version, 100 * state.share,
                 self.scorer.version, extra={"event": "canary_started", "version": state.version})

    def _canary_not_served(self, problem: str | None, refused: tuple[str, float] | None) -> None:
        self._canary_refused = refused
        if problem is not None and problem != self.canary_problem:
            log.error("%s", problem, extra={"event": "canary_refused"})
        self.canary_problem = problem
        self.metrics.set_canary("refused" if problem else "none")

    def _auto_stop_canary(self, why: str) -> None:
        """A guard rail breached on this worker's canary arm: stop routing to it now, and stop the
        canary for the fleet through the audited path (stream.canary.stop)."""
        arm = self.canary
        assert arm is not None
        self.canary = None
        self._canary_refused = (arm.version, arm.share)
        self.metrics.set_canary("rolled_back")
        reason = f"automatic rollback: {why}"
        log.error("canary %s stopped on %s: %s", arm.version, self.config.worker_id, reason,
                  extra={"event": "canary_rollback", "version": arm.version})
        from stream.operators import produce_audit

        evidence = {k: dict(v) for k, v in self.arms.items()}
        try:
            stop_canary(self.settings.model_dir, f"worker {self.config.worker_id}", reason,
                        audit=lambda entry: produce_audit(self.settings, entry, key=b"model"), automatic=True,
                        evidence=evidence, expect_version=arm.version)
        except (RtaError, OSError) as exc:
            log.error("canary %s: automatic stop not recorded (%s); this worker no longer routes to it",
                      arm.version, exc, extra={"event": "canary_rollback_unrecorded"})

    def canary_status(self) -> dict[str, Any] | None:
        """Per-arm counts of this worker since the canary started here (status record, CLI)."""
        arm = self.canary
        if arm is None and self.canary_problem is None:
            return None
        return {"version": None if arm is None else arm.version, "share": None if arm is None else arm.share,
                "problem": self.canary_problem,
                "arms": {k: {"rows": int(v["rows"]), "blocked": int(v["blocked"]), "nan": int(v["nan"]),
                             "block_share": v["blocked"] / v["rows"] if v["rows"] else None,
                             "score_us_per_row": 1e6 * v["score_s"] / v["rows"] if v["rows"] else None}
                         for k, v in self.arms.items()}}

    def maybe_reload(self, force: bool = False) -> bool:
        """Between batches: follow `<model_dir>/current` if it moved. True if a new model serves."""
        now = time.monotonic()
        if not force and now < self._next_reload_check:
            return False
        self._next_reload_check = now + self.config.reload_interval_s
        self._follow_canary()
        version = current_version(self.settings.model_dir)
        if version is None or version == self.bundle.name or version == self._refused:
            return False
        target = Path(self.settings.model_dir) / version
        try:
            self._load_model(target)
        except BundleError as exc:
            self._refused = version
            self.stats.refused_reloads += 1
            self.metrics.reloads.labels("refused").inc()
            log.error("model %s refused, still serving %s: %s", version, self.scorer.version, exc,
                      extra={"event": "reload_refused", "version": version})
            return False
        self._refused = None
        self.controller.set_model(self.scorer.version, self.prior)  # its own histograms + prior
        self.stats.reloads += 1
        self.metrics.reloads.labels("ok").inc()
        log.info("now serving model %s", self.scorer.version,
                 extra={"event": "reloaded", "version": self.scorer.version})
        return True

    # --- the loop -------------------------------------------------------------------------

    def run(self, install_signals: bool = False, max_seconds: float | None = None) -> WorkerStats:
        """Consume, decide, produce and checkpoint until `stop()`; then drain and leave."""
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self.stop())
        deadline = time.monotonic() + max_seconds if max_seconds else None
        cfg = self.config
        wait_s = cfg.batch_wait_ms / 1000.0
        self.consumer.subscribe([self.requests_topic], on_assign=self._on_assign,
                                on_revoke=self._on_revoke, on_lost=self._on_lost)
        self.metrics.state = "running"
        log.info("worker %s serving model %s: %s -> %s", cfg.worker_id, self.scorer.version,
                 self.requests_topic, self.decisions_topic,
                 extra={"event": "started", "decoder": decoder_in_use()})
        try:
            while not self._stop.is_set():
                self.metrics.last_loop = now = time.monotonic()
                if self._hold_until:
                    self._hold(now)
                msgs = consume_ready(self.consumer, cfg.batch_size, wait_s)
                if msgs:
                    self.process(msgs)
                else:  # idle (or rebalancing): keep targets, thresholds and our status fresh,
                    self.checkpoint.poll(0)  # so a peer started meanwhile finds the fleet's targets
                    self.controller.thresholds()
                if self.checkpoint.expired():
                    self._commit()
                self.maybe_reload()
                self.status.maybe_publish(self)  # bounded cadence: a clock read per turn
                if deadline is not None and time.monotonic() >= deadline:
                    break
        except CheckpointFatalError as exc:  # e.g. fenced while serving delivery reports
            self._fail_fatal(exc)
        finally:
            self._drain()
        if self._fatal is not None:
            raise WorkerError(f"worker {cfg.worker_id} stopped: {self._fatal}")
        return self.stats

    def stop(self) -> None:
        """Ask the loop to finish its batch, commit and leave (signal-safe)."""
        self._stop.set()

    def process(self, msgs: list[Message]) -> None:
        """One batch: decode -> score -> decide -> produce -> record offsets (not yet committed)."""
        t0, c0 = time.perf_counter(), time.thread_time()
        clock = _StageClock(self.stats.stage_s, self.stats.stage_cpu_s)
        # message fields through C-level map (no Python frame per message)
        errs = list(map(Message.error, msgs))
        if errs.count(None) != len(msgs):
            msgs = self._drop_errors(msgs, errs)
            if not msgs:
                return
        n = len(msgs)
        values = list(map(Message.value, msgs))
        keys = list(map(Message.key, msgs))
        partitions = np.fromiter(map(Message.partition, msgs), np.int32, n)
        offsets = np.fromiter(map(Message.offset, msgs), np.int64, n)
        clock.lap("consume")

        # decode; with a format-2 bundle the decoder also writes the categorical codes (the
        # bundle's vocabulary, before onnxruntime), else they are the strings the graph reads
        batch = decode_requests(values, keys, self.scorer.spec, fingerprint=self._fingerprint,
                                max_bytes=self.config.max_bytes, codes=self.scorer.encoder)
        clock.lap("decode")
        # route: without a canary the whole batch is current's (no copy); with one, a hash of each
        # request_id picks its arm, and the canary's rows are decoded again with its own spec
        arms: list[tuple[str, Any, Any, list[Any], list[Any], np.ndarray, np.ndarray]] = [
            ("current", self, batch, values, keys, partitions, offsets)]
        canary = self.canary
        if canary is not None:
            arms = self._route(canary, batch, values, keys, partitions, offsets)
        clock.lap("route")
        now_ms = time.time() * 1000.0
        decided = []
        for name, arm, b, vals, ks, parts, offs in arms:
            codes = b.codes if b.codes is not None else arm.scorer.codes(b.cat)
            clock.lap("codes")
            # score (the step replay shares: stream.engine)
            t_score = time.perf_counter()
            p, u_tasks, e, u = score_batch(arm.scorer, arm.policy, b.num, codes)
            score_s = time.perf_counter() - t_score
            clock.lap("score")
            th = arm.controller.thresholds()
            d = decide(e, u, b.valid, self._rng.random(len(b)), th.theta, th.tau_u,
                       th.targets.epsilon, th.degraded)
            clock.lap("policy")
            latency = np.where(b.ts_ms > 0, now_ms - b.ts_ms, np.nan)
            bodies = encode_decisions(
                b.request_id, d.block, _REASON_NAMES[d.reason], e, u, p,
                threshold=th.theta, target_ratio=th.targets.r, model=arm.scorer.version,
                ts_ms=int(now_ms), latency_ms=latency, tasks=arm.scorer.tasks, propensity=d.propensity,
                tau_u=th.tau_u, u_tasks=u_tasks)
            clock.lap("encode")
            # produce: decisions (the arm's version in the header), then dead letters
            self._produce(self.decisions_topic, bodies, b.request_id.tolist(), arm._headers)
            if b.n_invalid:
                self._dead_letters(b, vals, ks, parts, offs)
            clock.lap("produce")
            decided.append((name, arm, e, u, d, th, score_s))
        self.checkpoint.poll(0)  # serve delivery reports (failures only)
        # checkpoint: these offsets are now processed (committed later, after delivery)
        self.checkpoint.store_offsets(self.requests_topic, partitions, offsets)
        clock.lap("produce")
        # window: one round trip per arm to the controller's store
        for _, arm, e, u, d, _, _ in decided:
            arm.controller.observe(e, u, d)
        clock.lap("controller")

        if batch.unknown_features:
            self.stats.unknown_features += batch.unknown_features
            self.metrics.unknown_features.inc(batch.unknown_features)
        d, th = decided[0][4], decided[0][5]
        if canary is not None:
            d = self._count_arms(decided)
        n_invalid = batch.n_invalid if canary is None else int(np.count_nonzero(d.reason == INVALID))
        self._account(d, th, n, n_invalid, time.perf_counter() - t0,
                      now_ms - batch.ts_ms.max())
        clock.lap("account")
        self.stats.busy_cpu_s += time.thread_time() - c0

    def _dead_letters(self, batch: Any, values: list[Any], keys: list[Any], partitions: np.ndarray,
                      offsets: np.ndarray) -> None:
        """Invalid requests of one arm to the DLQ (cut to dlq_max_bytes), with their error."""
        dead = dead_letters(batch, values, keys, self.requests_topic, partitions, offsets)
        cap = self.config.dlq_max_bytes
        for dl in dead:
            value, headers = dl.value, dl.headers
            if len(value) > cap:
                value, headers = value[:cap], [*headers, ("rta-truncated", str(len(value)).encode())]
            self._produce(self.dlq_topic, [value], [dl.key], headers)
        for err in batch.errors:
            self.metrics.dlq.labels(err.code).inc()

    def _route(self, canary: CanaryArm, batch: Any, values: list[Any], keys: list[Any],
               partitions: np.ndarray, offsets: np.ndarray) -> list[Any]:
        """Split a batch by the hash of its request ids (stream.canary.canary_arm): current's rows
        as decoded, the canary's decoded again with the canary's spec (its vocabulary may differ)."""
        to_canary = canary_arm(batch.request_id, canary.share)
        if not to_canary.any():
            return [("current", self, batch, values, keys, partitions, offsets)]
        out = []
        for name, rows in (("current", np.flatnonzero(~to_canary)), ("canary", np.flatnonzero(to_canary))):
            if not len(rows):
                continue
            idx = rows.tolist()
            vals, ks = [values[i] for i in idx], [keys[i] for i in idx]
            if name == "current":
                b = _take(batch, rows)
            else:
                b = decode_requests(vals, ks, canary.scorer.spec, fingerprint=canary.fingerprint,
                                    max_bytes=self.config.max_bytes, codes=canary.scorer.encoder)
            out.append((name, self if name == "current" else canary, b, vals, ks, partitions[rows], offsets[rows]))
        return out

    def _count_arms(self, decided: list[Any]) -> Any:
        """Per-arm counts and metrics (canary in force); the batch's decisions as one, for _account.
        Then the live guard rails (stream.canary.ArmGuard): a breach stops the canary."""
        for name, _, _, _, d, _, score_s in decided:
            a = self.arms[name]
            rows, blocked = len(d), int(np.count_nonzero(d.block))
            bad = int(np.count_nonzero((d.reason == NAN_OUTPUT) | (d.reason == INVALID)))
            if a["rows"] >= self.guard.warmup_rows:  # block share judged after the warm-up
                a["rows_w"] += rows
                a["blocked_w"] += blocked
            a["rows"] += rows
            a["blocked"] += blocked
            a["nan"] += bad
            a["score_s"] += score_s
            self.metrics.arm_decisions.labels(name, "block").inc(blocked)
            self.metrics.arm_decisions.labels(name, "pass").inc(rows - blocked)
            self.metrics.arm_bad.labels(name).inc(bad)
            self.metrics.arm_block_share.labels(name).set(a["blocked"] / a["rows"])
        if self.canary is not None:
            why = self.guard.breach(self.arms, decided[0][5].targets.r)
            if why is not None:
                self._auto_stop_canary(why)
        if len(decided) == 1:
            return decided[0][4]
        ds = [x[4] for x in decided]
        return Decisions(*(np.concatenate([getattr(d, f) for d in ds])
                           for f in ("block", "reason", "stage", "propensity")))

    def _produce(self, topic: str, values: list[bytes], keys: list[Any],
                 headers: list[tuple[str, bytes]]) -> None:
        produce = self.producer.produce
        i = 0
        while i < len(values):
            try:
                for j in range(i, len(values)):
                    produce(topic, values[j], keys[j], headers=headers)
                return
            except BufferError:  # local queue full: let librdkafka drain, then go on from j
                i = j
                self.checkpoint.poll(0.05)
            except KafkaException as exc:  # refused locally (e.g. MSG_SIZE_TOO_LARGE): this one only
                self._refused_message(topic, values[j], keys[j], headers, exc.args[0])
                i = j + 1

    def _refused_message(self, topic: str, value: bytes, key: Any, headers: list[tuple[str, bytes]],
                         err: KafkaError) -> None:
        """One message produce() refused. A dead letter goes out as headers only; a decision is
        never dropped silently: it is recorded as undelivered, so the checkpoint does not commit."""
        self.stats.produce_errors += 1
        self.metrics.produce_errors.labels(topic, err.name()).inc()
        log.error("produce to %s refused a %d-byte message (%s)", topic, len(value or b""), err.str(),
                  extra={"event": "produce_refused", "topic": topic, "code": err.name()})
        if topic == self.dlq_topic:
            try:
                self.producer.produce(topic, b"", key, headers=[*headers, ("rta-dropped", err.name().encode())])
                return
            except (KafkaException, BufferError) as exc:
                err = exc.args[0] if isinstance(exc, KafkaException) else err
        self.reports.record(topic, f"{topic}: produce refused ({err.str()})")

    def _hold(self, now: float) -> None:
        """Checkpoint backoff: consumption of the assigned partitions stays paused until it ends."""
        if now < self._hold_until:
            return
        self._hold_until = 0.0
        try:
            self.consumer.resume(self.consumer.assignment())
        except (KafkaException, RuntimeError) as exc:
            log.warning("resume after backoff failed: %s", exc, extra={"event": "resume_failed"})

    def _drop_errors(self, msgs: list[Message], errs: list[KafkaError | None]) -> list[Message]:
        for err in errs:
            if err is not None and err.code() != KafkaError._PARTITION_EOF:
                log.warning("consumer error: %s", err.str(), extra={"event": "consumer_error"})
        return [m for m, err in zip(msgs, errs, strict=True) if err is None]

    def _account(self, d: Any, th: Any, n: int, n_invalid: int, seconds: float, age_ms: float) -> None:
        s, m = self.stats, self.metrics
        blocked = int(np.count_nonzero(d.block))
        stages = np.bincount(d.stage, minlength=len(REASONS))
        by_reason = np.bincount(d.reason, minlength=len(REASONS))
        degraded = int(by_reason[DEGRADED])
        if by_reason[NAN_OUTPUT]:
            s.nan_outputs += int(by_reason[NAN_OUTPUT])
            m.nan_outputs.inc(int(by_reason[NAN_OUTPUT]))
            m.last_nan = time.monotonic()
        s.events += n
        s.invalid += n_invalid
        s.blocked += blocked
        s.degraded += degraded
        s.batches += 1
        s.busy_s += seconds
        m.events.inc(n)
        m.batches.inc()
        m.batch_seconds.observe(seconds)
        m.batch_size.observe(n)
        m.block_share.set(blocked / n)
        m.uncertain_share.set(stages[UNCERTAIN] / n)
        m.explore_share.set(stages[EXPLORE] / n)
        m.theta.set(th.theta)
        m.tau_u.set(th.tau_u)
        m.target_ratio.set(th.targets.r)
        m.set_redis(th.degraded)
        m.set_targets_source(self.controller.targets_source)
        if self.controller.clock_skew is not None:
            m.clock_skew.set(self.controller.clock_skew)
        m.lag_ms.set(age_ms)
        blocked_by = np.bincount(d.reason[d.block], minlength=len(REASONS))
        for k in np.flatnonzero(by_reason).tolist():
            if blocked_by[k]:
                m.decisions.labels("block", REASONS[k]).inc(int(blocked_by[k]))
            if by_reason[k] > blocked_by[k]:
                m.decisions.labels("pass", REASONS[k]).inc(int(by_reason[k] - blocked_by[k]))
        if th.degraded != getattr(self, "_was_degraded", False):
            self._was_degraded = th.degraded
            log.warning("redis %s", "unreachable: deciding from the local window (degraded)"
                        if th.degraded else "back: global window rejoined",
                        extra={"event": "degraded" if th.degraded else "rejoined"})

    # --- checkpoint and group membership --------------------------------------------------

    def _commit(self) -> bool:
        """Commit the checkpoint; on failure replay it (never skip) after a backoff that doubles
        with each failure in a row. True if committed. A rewind that cannot seek back stops the
        worker (`_fatal`): its successor replays from the committed offsets."""
        if self._fatal is not None:
            return False
        t0 = time.perf_counter()
        commits = self.checkpoint.commits
        try:
            try:
                self.checkpoint.commit()
            except CheckpointFatalError:
                raise
            except CheckpointError as exc:
                self._checkpoint_failed(exc)
                return False
        except CheckpointFatalError as exc:
            self._fail_fatal(exc)
            return False
        if self.checkpoint.commits == commits:  # nothing to commit
            return True
        if self.stats.failing_checkpoints:
            log.warning("checkpoint committed again after %d failures", self.stats.failing_checkpoints,
                        extra={"event": "checkpoint_recovered"})
        self.stats.failing_checkpoints = 0
        self.metrics.failing_checkpoints.set(0)
        took = time.perf_counter() - t0
        self.stats.commits += 1
        self.stats.commit_s += took
        self.stats.commit_max_s = max(self.stats.commit_max_s, took)
        self.metrics.commits.inc()
        self.metrics.commit_seconds.observe(took)
        return True

    def _renew_producer(self) -> None:
        """Replace a producer whose identity the broker no longer accepts (STALE_PRODUCER_CODES):
        otherwise every replay of the checkpoint fails the same way until a restart. Called after
        the rewind, so what the old producer still holds is replayed anyway: it is purged, and
        its purge reports are not counted against the replay."""
        old = self.producer
        with contextlib.suppress(KafkaException, RuntimeError):
            old.purge()
            old.flush(0)
        self.reports.take()
        self.reports.stale_producer = False
        self.producer = make_producer(self.settings, **self.reports.producer_config())
        self.checkpoint.replace_producer(self.producer)
        self.stats.producer_renewals += 1
        log.warning("producer renewed: the broker no longer accepted the old one's identity "
                    "(fenced / unknown producer id)", extra={"event": "producer_renewed"})

    def _fail_fatal(self, exc: CheckpointFatalError) -> None:
        """Nothing can be committed safely any more: stop; run() raises WorkerError (exit 2)."""
        self._fatal = exc
        self._stop.set()
        self.metrics.state = "failed"
        log.critical("%s", exc, extra={"event": "checkpoint_fatal"})

    def _checkpoint_failed(self, exc: CheckpointError) -> None:
        """Count, log (naming the topic), rewind, and pause consuming for the backoff."""
        cfg, st = self.config, self.stats
        st.checkpoint_failures += 1
        st.failing_checkpoints += 1
        self.metrics.checkpoint_failures.labels(type(exc).__name__).inc()
        self.metrics.failing_checkpoints.set(st.failing_checkpoints)
        backoff = min(cfg.checkpoint_backoff_s * 2 ** (st.failing_checkpoints - 1), cfg.checkpoint_backoff_max_s)
        log.error("checkpoint failed (%d in a row), replaying it in %.1f s: %s", st.failing_checkpoints,
                  backoff, exc, extra={"event": "checkpoint_failed", "in_a_row": st.failing_checkpoints})
        self.checkpoint.rewind()  # may raise CheckpointFatalError (handled by _commit)
        if self.reports.stale_producer and not cfg.exactly_once:
            self._renew_producer()
        self._hold_until = time.monotonic() + backoff
        try:
            self.consumer.pause(self.consumer.assignment())
        except (KafkaException, RuntimeError) as err:
            log.warning("pause for backoff failed: %s", err, extra={"event": "pause_failed"})

    def _on_assign(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        # librdkafka keeps a partition's pause flag across unassign/assign: a partition paused
        # for a checkpoint backoff, then lost and assigned again, would never be fetched. So an
        # assignment says explicitly whether it is consumed (paused only inside a backoff).
        try:
            (consumer.pause if self._hold_until else consumer.resume)(partitions)
        except (KafkaException, RuntimeError) as exc:
            log.warning("pause/resume on assignment failed: %s", exc, extra={"event": "assign_failed"})
        self.assignment |= {(tp.topic, tp.partition) for tp in partitions}
        log.info("assigned %s", _tps(partitions), extra={"event": "assigned"})

    def _on_revoke(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        # Everything decided so far is produced: flush and commit before the partitions move.
        self._commit()
        self.assignment -= {(tp.topic, tp.partition) for tp in partitions}
        log.info("revoked %s", _tps(partitions), extra={"event": "revoked"})

    def _on_lost(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        # Another member may own these already: committing would be wrong; let it replay.
        if self.config.exactly_once:
            try:
                self.checkpoint.rewind()
            except CheckpointFatalError as exc:
                self._fail_fatal(exc)
        else:
            self.checkpoint.forget(partitions)
        self.assignment -= {(tp.topic, tp.partition) for tp in partitions}
        self.stats.lost_partitions += len(partitions)
        log.warning("lost %s", _tps(partitions), extra={"event": "lost"})

    def _drain(self) -> None:
        self.metrics.state = "draining"
        try:
            self._commit()
            self.consumer.close()  # leaves the group (revoke -> commit of anything left)
        except (KafkaException, RuntimeError) as exc:
            log.error("while leaving the group: %s", exc, extra={"event": "drain_error"})
        finally:
            self.checkpoint.close()
            with contextlib.suppress(CheckpointError):  # a fatal producer: nothing left to deliver
                self.checkpoint.serve(self.producer.flush, self.config.flush_timeout_s)
            self.metrics.state = "failed" if self._fatal is not None else "stopped"
            if self.server is not None:
                self.server.close()
        st = self.stats
        log.info("worker %s stopped after %d events (%d invalid, %d commits taking %.3f s, longest %.3f s)",
                 self.config.worker_id, st.events, st.invalid, st.commits, st.commit_s, st.commit_max_s,
                 extra={"event": "stopped", "events": st.events, "commits": st.commits,
                        "commit_s": round(st.commit_s, 4), "commit_max_s": round(st.commit_max_s, 4)})


def _smoke_test(scorer: Scorer, policy: ScorePolicy) -> None:
    """A model must score an all-missing batch into finite probabilities before it serves."""
    n_num, n_cat = len(scorer.spec.numeric), len(scorer.spec.categorical)
    num = np.full((4, n_num), np.nan, np.float32)
    num[1:] = np.linspace(-1, 1, 3, dtype=np.float32)[:, None]
    cat = np.full((4, n_cat), "", dtype=object)
    try:
        p, u = scorer.score(num, cat)
    except Exception as exc:  # onnxruntime's own error types
        raise BundleError(f"{scorer.path}: the student fails on a smoke-test batch "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    if p.shape != (4, len(scorer.tasks)) or u.shape != p.shape:
        raise BundleError(f"{scorer.path}: student returned shapes {p.shape}, {u.shape}")
    if not (np.isfinite(p).all() and (p >= 0).all() and (p <= 1).all() and np.isfinite(u).all()):
        raise BundleError(f"{scorer.path}: student returns non-finite or out-of-range outputs")
    policy.score(p)


def _take(batch: RequestBatch, rows: np.ndarray) -> RequestBatch:
    """The rows `rows` (sorted positions) of a decoded batch, errors re-indexed."""
    at = {int(i): k for k, i in enumerate(rows.tolist())}
    errors = [err._replace(index=at[err.index]) for err in batch.errors if err.index in at]
    return RequestBatch(batch.request_id[rows], batch.ts_ms[rows], batch.num[rows], batch.cat[rows],
                        batch.valid[rows], errors, batch.unknown_features,
                        None if batch.codes is None else batch.codes[rows])


def _tps(partitions: list[TopicPartition]) -> str:
    return ",".join(f"{tp.topic}[{tp.partition}]" for tp in partitions)


# --- CLI ----------------------------------------------------------------------------------


@click.command(name="serve")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="Config file (TOML/JSON).")
@click.option("--bootstrap", default=None, help="Kafka bootstrap servers [default: settings].")
@click.option("--redis-url", default=None, help="Redis URL [default: settings].")
@click.option("--model-dir", type=click.Path(file_okay=False), default=None,
              help="Model directory whose `current` is served [default: settings].")
@click.option("--group", "group_id", default="rta-worker", show_default=True, help="Consumer group id.")
@click.option("--batch-size", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Most messages per batch.")
@click.option("--batch-wait-ms", type=click.IntRange(min=0), default=20, show_default=True,
              help="Longest wait for a batch's first message; the rest is what is already "
                   "queued (a batch never waits to fill).")
@click.option("--commit-interval-ms", type=click.IntRange(min=0), default=1000, show_default=True,
              help="Commit at most this often (0: after every batch); never before delivery.")
@click.option("--commit-every", type=click.IntRange(min=0), default=0, show_default=True,
              help="Also commit after this many messages (0: time only).")
@click.option("--exactly-once", is_flag=True, help="Decisions and offsets in one Kafka transaction.")
@click.option("--reload-interval-s", type=click.FloatRange(min=0.1), default=2.0, show_default=True,
              help="How often to check <model-dir>/current for a new version.")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=9400, show_default=True,
              help="Port for /metrics and /healthz (0: any free port).")
@click.option("--metrics-host", default="127.0.0.1", show_default=True,
              help="Address for /metrics and /healthz (0.0.0.0 to let Prometheus in another container scrape).")
@click.option("--no-metrics", is_flag=True, help="Do not start the HTTP server.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="onnxruntime intra-op threads.")
@click.option("--worker-id", default=None, help="Name in logs, metrics and the controller [default: host-pid].")
@click.option("--startup-timeout", type=click.FloatRange(min=0), default=30.0, show_default=True,
              help="Seconds to wait for the Kafka cluster at start-up before exiting with an error "
                   "(0: do not check; librdkafka then retries for ever).")
@click.option("--transactional-id", default=None,
              help="--exactly-once: this worker slot's stable transactional.id, so a replacement fences "
                   "a crashed predecessor [default: <group>-<hostname>].")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True)
def serve(config_file: str | None, bootstrap: str | None, redis_url: str | None,
          model_dir: str | None, group_id: str, batch_size: int, batch_wait_ms: int,
          commit_interval_ms: int, commit_every: int, exactly_once: bool, reload_interval_s: float,
          metrics_port: int, metrics_host: str, no_metrics: bool, threads: int, worker_id: str | None,
          startup_timeout: float, transactional_id: str | None, log_level: str) -> None:
    """Consume requests, decide each one, produce decisions; commit only after delivery."""
    from stream.logs import setup_json_logging

    setup_json_logging(log_level)
    settings = load_settings(config_file, kafka_bootstrap=bootstrap, redis_url=redis_url,
                             model_dir=model_dir)
    cfg = WorkerConfig(
        group_id=group_id, batch_size=batch_size, batch_wait_ms=batch_wait_ms,
        commit_interval_s=commit_interval_ms / 1000.0, commit_every=commit_every,
        exactly_once=exactly_once, reload_interval_s=reload_interval_s,
        metrics_port=None if no_metrics else metrics_port, metrics_host=metrics_host, intra_threads=threads,
        startup_timeout_s=startup_timeout, transactional_id=transactional_id,
        **({"worker_id": worker_id} if worker_id else {}))
    try:
        worker = Worker(settings, cfg)
    except OSError as exc:  # e.g. the metrics port is taken
        port_problem = exc.errno in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL)
        where = f" (metrics port {cfg.metrics_host}:{cfg.metrics_port})" if port_problem and cfg.metrics_port else ""
        raise RtaError(f"serve: cannot start{where}: {exc.strerror or exc}") from None
    if worker.server is not None:
        log.info("metrics on http://%s:%d/metrics", cfg.metrics_host, worker.server.port,
                 extra={"event": "metrics", "port": worker.server.port})
    worker.run(install_signals=True)
