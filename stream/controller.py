"""The ratio controller: holds the live block share ``r`` and direct-pass share ``p_u``.

Use (worker and replay alike; the worker needs nothing else)::

    ctl = RatioController.from_settings(settings)             # Redis window, global
    ctl = RatioController(MemoryStore(), ControllerConfig(), clock=sim_clock)   # replay
    th = ctl.thresholds()       # Thresholds(theta, tau_u, targets, degraded, version)
    d = policy.decide(e, u, valid, draw, th.theta, th.tau_u, th.targets.epsilon, th.degraded)
    ctl.observe(e, u, d)        # ONE pipelined round trip; refreshes thresholds when due
    ctl.status()                # dict for /metrics and `rta ratio get`

How thresholds are set (every ``refresh_interval`` seconds, and at least every ``refresh_rows``
decided rows so a backlog caught up at 100k events/s is refreshed as often per row as live
traffic at 2k/s; one more round trip that reads the window's open seconds and the live targets;
closed seconds are cached):

- Window = the last ``window_seconds`` per-second buckets, summed over all workers. The
  feed-forward quantiles use its newest seconds that hold ``quantile_rows`` rows (at least
  ``quantile_min_seconds``): quantile noise ~0.15 pp, and at high rates far less lag behind a
  drifting score distribution than the whole window (at 20k events/s: 5 s instead of 30 s).
- Feed-forward ``tau_u``: the rows reaching the uncertainty stage are the valid, non-explored
  ones, a share ``(valid/total)(1-epsilon)`` of all traffic; to pass ``p_u`` of ALL traffic,
  ``tau_u`` is the ``1 - q_u`` quantile of the u-histogram with
  ``q_u = p_u * total / (valid * (1 - epsilon))``.
- Feed-forward ``theta``: the score stage receives ``s = (valid/total)(1-epsilon) - p_u`` of
  all traffic, so ``theta`` is the ``q_b = r / s`` quantile of the e-histogram of rows that
  reached the score stage (``stream.window``: only those rows are histogrammed, so the
  uncertainty-passed rows, whose e may be correlated with u, never bias ``theta``).
- Feedback: ``q_b += I_b`` and ``q_u += I_u``. Once per CLOSED second (older than
  ``closed_after``; the same data for every controller, so controllers sharing a window keep
  identical integrals) ``I += gain * error / stage_share`` where ``error`` is the target minus
  the share observed over the ``feedback_horizon`` seconds ending there, clamped to
  ``+-feedback_limit``, with a small ``feedback_leak`` toward 0 (a late joiner converges to
  the others; residual error ``~ leak * I / gain``, < 0.1 pp). It absorbs what the
  feed-forward cannot see: a drifting score distribution (the window lags), the e/u coupling
  after a ``p_u`` change, bin discretisation. The gain is low (0.1/s) because the loop sees
  the share through a ``horizon``-second average and a ``closed_after`` delay; a step of
  ``r`` is the feed-forward's job (one refresh). The integral is frozen until the horizon
  holds only decisions made under the current targets, and kept, not reset, across changes.
- Targets missing from Redis (never set, or a Redis restarted empty) -> the last known ones
  (initially ``config.default_targets``).
- ``r == 0`` -> ``theta = 0`` (nothing blocked); ``p_u == 0`` -> ``tau_u = inf``.
- Cold start (``stream.prior``): the bundle carries its served score distribution on held-out
  rows; the quantiles read the window's histograms plus that distribution weighted as
  ``prior_rows`` rows less the live rows of the model (a linear hand-over: at 20k rows the
  window alone), so the first batch of a cold stack, of a burst after a quiet night or of a
  restarted worker is decided at the target shares. A bundle without one (trained before it
  existed) keeps the old behaviour: the initial thresholds (block nothing, pass no one for
  uncertainty) until the window holds ``min_rows`` rows.
- Model switch (``set_model``): bucket fields are per controller AND model, and a controller
  reads the counts of every field (the fleet's shares, whatever model decided them) but the
  histograms only of its own model's fields; so after a hot reload the old model's scores do not
  steer the new one's thresholds, the new bundle's distribution stands in until its own rows
  fill the window, and the feedback integrals restart at 0 (frozen for one horizon).

Degraded mode (Redis unreachable: connection refused, socket timeout): the controller never
raises into the hot path. It always keeps its own per-second buckets of the window in memory
(that is what it writes to Redis), so on failure it goes on refreshing thresholds from them
with the last known targets, ``degraded=True`` (decisions then say ``degraded``). It retries
Redis with exponential backoff (``backoff_initial`` doubling to ``backoff_max``) at refresh
time. On rejoin it rewrites its own buckets of every second still in the window (writes are
idempotent per writer, so nothing is counted twice) and bumps the window epoch so other
controllers drop cached seconds: the global window then counts every decision made, even if
Redis came back empty.

Clocks: ``clock()`` gives the BUCKET time in seconds (default ``time.time``; buckets of all
workers must align, so use wall-clock time in production). Buckets follow PROCESSING time, also
while a worker catches up on a backlog: the target is a share of the decisions being made now
(what the bidders downstream see per second), the window must be the fleet's recent decisions
with one clock for all workers, and a catching-up worker writing into event-time seconds would
write into seconds its peers have closed and cached (or that lie beyond the window), so its
decisions would be invisible to them. Replay has no processing time: it drives both clocks from
event time, which is what processing time was when the log was served live. ``timer()`` gives
the CADENCE time of refreshes and the Redis retry backoff (default ``time.monotonic`` with the
wall clock, the injected clock otherwise), so a wall-clock step back cannot freeze the
thresholds. Every
``skew_interval`` the controller reads Redis ``TIME`` with its refresh and keeps
``clock_skew`` = clock() - Redis time (published in its status, exported by the worker): a
worker whose clock is off writes into the wrong seconds of the shared window. Tests and
benchmarks inject a simulated clock; Redis TTLs are still real seconds (``window_seconds +
60``), which is safe whenever the simulated clock runs at least as fast as real time.

Targets after Redis restarts empty: a controller that saw targets keeps its last ones
(``targets_source`` "last"); one that never saw any (a worker started after the restart)
adopts the newest targets its live peers publish in their status (``"peers"``), so workers
never split between the last ``r`` and a default ``r = 0``. Only when no peer knows any does
it serve the defaults, with ``targets_source`` "default" (the worker exports it and alerts on
``/healthz``). Workers cannot write targets (least privilege): `rta ratio set` restores them.
"""

from __future__ import annotations

import math
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stream.errors import RtaError
from stream.policy import Decisions, Targets
from stream.prior import ScoreDistribution
from stream.window import (
    N_COUNTS,
    HistSpec,
    RedisStore,
    StoreUnavailable,
    WindowStore,
    bucket_vector,
    counts_dict,
    field_name,
    hist_quantile,
    sum_fields,
)

BLOCK_ALL = 1.0 + 1e-6  # theta above every score: block the whole score stage


@dataclass(frozen=True)
class ControllerConfig:
    """Knobs of the controller (defaults hold 0.5 pp at a few thousand events/s)."""

    window_seconds: int = 30
    refresh_interval: float = 0.25
    refresh_rows: int = 4096  # ... and at least every this many decided rows (a backlog, a burst)
    prior_rows: int = 20_000  # weight of the bundle's score distribution on an empty window
    feedback_horizon: int = 5
    feedback_gain: float = 0.1  # per second: share of the error corrected each second
    feedback_leak: float = 0.01  # per second: pull of the integral toward 0
    feedback_limit: float = 0.05  # |I| in quantile units of the stage's traffic
    closed_after: int = 2  # seconds older than this are closed and cached
    quantile_rows: int = 100_000  # feed-forward quantiles use the newest seconds holding this many
    quantile_min_seconds: int = 5
    min_rows: int = 200
    backoff_initial: float = 0.25
    backoff_max: float = 8.0
    socket_timeout: float = 0.25
    skew_interval: float = 10.0  # how often (timer seconds) Redis TIME is read for clock skew
    spec: HistSpec = field(default_factory=HistSpec)
    default_targets: Targets = field(default_factory=Targets)
    initial_theta: float = 0.0
    initial_tau_u: float = math.inf

    def __post_init__(self) -> None:
        if self.window_seconds < 2 or self.feedback_horizon < 1 or self.refresh_interval <= 0:
            raise ValueError("window_seconds >= 2, feedback_horizon >= 1, refresh_interval > 0")
        if self.refresh_rows < 1 or self.prior_rows < 0:
            raise ValueError("refresh_rows >= 1, prior_rows >= 0")


@dataclass(frozen=True)
class Thresholds:
    """What the policy needs for the next batch."""

    theta: float
    tau_u: float
    targets: Targets
    degraded: bool
    version: int = 0


class RatioController:
    """One per worker (or replay); many share one Redis window. See the module docstring."""

    def __init__(self, store: WindowStore, config: ControllerConfig | None = None,
                 clock: Callable[[], float] = time.time, controller_id: str | None = None,
                 timer: Callable[[], float] | None = None) -> None:
        self.store = store
        self.config = cfg = config or ControllerConfig()
        self.clock = clock  # bucket time
        # refresh cadence and backoff: monotonic with the wall clock, else the injected clock
        self.timer = timer or (time.monotonic if clock is time.time else clock)
        self.id = controller_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.spec = store.spec
        self.own: dict[int, dict[str, np.ndarray]] = {}  # cumulative bucket per second and model
        self.model = ""  # version of the model whose scores this controller sees (set_model)
        self.prior: ScoreDistribution | None = None  # that model's held-out score distribution
        self._prior_rows = 0.0  # weight the prior had at the last refresh (status)
        self._rows_since = 0  # rows observed since the last refresh
        self._th = Thresholds(cfg.initial_theta, cfg.initial_tau_u, cfg.default_targets, False, 0)
        self._cache: dict[int, np.ndarray] = {}
        self._epoch: int | None = None
        self._next_refresh = -math.inf
        self._fb_sec: int | None = None
        self._changed_sec = -(2**62)
        self._i_block = 0.0
        self._i_pass = 0.0
        self._retry_at = 0.0
        self._backoff = cfg.backoff_initial
        self._window = np.zeros(self.spec.size, dtype=np.int64)
        self.degraded = False
        self.store_errors = 0
        self.refreshes = 0
        self.last_error = ""
        self.targets_source = "default"  # "redis" | "last" | "peers" | "default" (module docstring)
        self._joined = False  # took the peers' feedback integrals (first global read)
        self._next_peer_check = -math.inf
        self.clock_skew: float | None = None  # clock() - Redis TIME, seconds
        self._next_skew = -math.inf

    @classmethod
    def from_settings(cls, settings: Any, config: ControllerConfig | None = None,
                      clock: Callable[[], float] = time.time,
                      controller_id: str | None = None,
                      timer: Callable[[], float] | None = None) -> RatioController:
        """A controller on the settings' Redis (``redis_url``, ``redis_prefix``)."""
        cfg = config or ControllerConfig()
        store = RedisStore.from_url(
            settings.redis_url, settings.redis_prefix, cfg.spec, ttl_seconds=cfg.window_seconds + 60,
            socket_timeout=cfg.socket_timeout, connect_timeout=cfg.socket_timeout,
        )
        return cls(store, cfg, clock, controller_id, timer)

    # --- hot path -------------------------------------------------------------------------

    def thresholds(self) -> Thresholds:
        """Current thresholds (refreshes first when due)."""
        if self.timer() >= self._next_refresh:
            self.refresh()
        return self._th

    def observe(self, e: np.ndarray, u: np.ndarray, decisions: Decisions) -> None:
        """Add a decided batch to the window (one round trip), then refresh when due."""
        now = self.clock()
        sec = int(now)
        vec = bucket_vector(e, u, decisions, self.spec)
        mine = self.own.setdefault(sec, {})
        cur = mine.get(self.model)
        mine[self.model] = vec if cur is None else cur + vec
        if len(self.own) > self.config.window_seconds + 5:
            for s in [s for s in self.own if s <= sec - self.config.window_seconds - 5]:
                del self.own[s]
        if not self.degraded:
            try:
                self.store.put(field_name(self.id, self.model), {sec: mine[self.model]})
            except StoreUnavailable as exc:
                self._fail(exc)
        self._rows_since += len(decisions.stage)
        if self._rows_since >= self.config.refresh_rows or self.timer() >= self._next_refresh:
            self.refresh(now)

    def set_model(self, model: str, prior: ScoreDistribution | None = None, join: bool = True) -> None:
        """The worker (or replay) now scores with ``model``. Its histograms start apart from the
        old model's (bucket fields are per model: ``stream.window``), the bundle's score
        distribution ``prior`` stands in until its own rows fill the window, and the feedback
        integrals restart at 0 and stay frozen for one horizon: they corrected the OLD model's
        feed-forward bias. The next ``thresholds()`` refreshes.

        ``join=False``: this controller never takes its peers' feedback integrals on its first
        global read (a canary arm's controller: its peers' integrals corrected another model)."""
        if not join:
            self._joined = True
        if model == self.model and prior is self.prior:
            return
        switched = bool(self.model) and model != self.model
        self.model, self.prior = model, prior
        self._cache.clear()  # cached closed seconds were summed for the old model
        self._next_refresh = -math.inf
        if switched:
            self._i_block = self._i_pass = 0.0
            self._changed_sec = int(self.clock())

    # --- refresh ----------------------------------------------------------------------------

    def refresh(self, now: float | None = None) -> Thresholds:
        """Recompute thresholds from the window (global if reachable, else local). ``now`` is
        bucket time (default ``clock()``); the next refresh is due ``refresh_interval`` later
        by ``timer()``."""
        now = self.clock() if now is None else now
        cfg = self.config
        t = self.timer()
        self._next_refresh = t + cfg.refresh_interval
        self._rows_since = 0
        sec = int(now)
        first = sec - cfg.window_seconds + 1
        targets = self._th.targets
        version = self._th.version
        present: dict[int, np.ndarray] | None = None

        if self.degraded and t >= self._retry_at:
            self._rejoin(first)
        if not self.degraded:
            try:
                present, snap_targets, version = self._read_global(sec, first, now, t)
                if snap_targets is not None:
                    targets, self.targets_source = snap_targets, "redis"
                else:  # none stored (or a Redis restarted empty): keep the last, else the peers'
                    targets, version = self._without_stored_targets(targets, version)
            except StoreUnavailable as exc:
                self._fail(exc)
        if present is None:  # degraded: this worker's own recent traffic
            present = {s: self._own_bucket(s) for s in self.own if first <= s <= sec}

        if targets != self._th.targets:
            self._changed_sec = sec
        self._window = _sum(present.values(), self.spec.size)
        if self._window[0] < cfg.min_rows:
            # not controlling yet (cold start, idle, an emptied Redis): the seconds decided with
            # the initial thresholds must not wind the feedback integral up
            self._changed_sec = sec
        self._feedback(present, targets, sec - cfg.closed_after)
        theta, tau_u = self._compute(self._recent_span(present, sec), targets)
        self._th = Thresholds(theta, tau_u, targets, self.degraded, version)
        self.refreshes += 1
        return self._th

    def _without_stored_targets(self, targets: Targets, version: int) -> tuple[Targets, int]:
        """No targets in the store: keep the last known; a controller that never saw any takes
        the newest its live peers hold (one SCAN a second at most, only while it knows none)."""
        if self.targets_source in ("redis", "last", "peers"):
            if self.targets_source == "redis":
                self.targets_source = "last"
            return targets, version
        t = self.timer()
        if t < self._next_peer_check:  # a SCAN: at most once a second while none is known
            return targets, version
        self._next_peer_check = t + 1.0
        known = [c for c in self.store.controllers()
                 if c.get("id") != self.id and c.get("targets_source") in ("redis", "last", "peers")
                 and isinstance(c.get("targets"), dict)]
        if not known:
            return targets, version
        best = max(known, key=lambda c: (int(c.get("targets_version") or 0), int(c.get("ts_ms") or 0)))
        try:
            t = best["targets"]
            adopted = Targets(float(t["r"]), float(t["p_u"]), float(t["epsilon"]))
        except (KeyError, TypeError, ValueError, RtaError):
            return targets, version
        self.targets_source = "peers"
        return adopted, int(best.get("targets_version") or 0)

    def _adopt_feedback(self) -> None:
        """A controller joining a running fleet starts from the peers' feedback integrals (their
        median), not 0: the integrals of controllers sharing a window move identically, so a
        late joiner at 0 would hold the global share off target until the leak evens them out
        (a replacement after kill -9 cost ~1 pp for a minute)."""
        peers = [c.get("feedback") for c in self.store.controllers() if c.get("id") != self.id]
        vals = [(float(f["block"]), float(f["pass"])) for f in peers
                if isinstance(f, dict) and isinstance(f.get("block"), int | float) and isinstance(f.get("pass"), int | float)]
        if vals:
            lim = self.config.feedback_limit
            self._i_block = float(np.clip(np.median([v[0] for v in vals]), -lim, lim))
            self._i_pass = float(np.clip(np.median([v[1] for v in vals]), -lim, lim))

    def _read_global(self, sec: int, first: int, now: float,
                     t: float) -> tuple[dict[int, np.ndarray], Targets | None, int]:
        cfg = self.config
        closed = sec - cfg.closed_after
        for s in [s for s in self._cache if s < first]:
            del self._cache[s]
        wanted = [s for s in range(first, sec + 1) if s > closed or s not in self._cache]
        with_time = t >= self._next_skew
        snap = self.store.read(wanted, self.status(), server_time=with_time, model=self.model)
        if with_time and snap.server_time is not None:
            self._next_skew = t + cfg.skew_interval
            self.clock_skew = now - snap.server_time
        if not self._joined:
            self._joined = True
            self._adopt_feedback()
        if self._epoch is not None and snap.epoch != self._epoch:
            self._cache.clear()  # someone wrote into past seconds: read them all again
            snap = self.store.read(list(range(first, sec + 1)), model=self.model)
        self._epoch = snap.epoch
        for s, v in snap.buckets.items():
            if s <= closed:
                self._cache[s] = v
        present = {s: v for s, v in {**self._cache, **snap.buckets}.items() if s >= first}
        return present, snap.targets, snap.targets_version

    def _feedback(self, present: dict[int, np.ndarray], t: Targets, closed: int) -> None:
        """Integrate once per newly CLOSED second on the shares of the ``feedback_horizon``
        seconds ending there. Closed seconds are the same data for every controller, so
        controllers sharing a window make identical updates (an integral per controller
        would otherwise random-walk apart: their sum is all the global share can correct);
        a small leak pulls a late joiner's integral to the others'."""
        cfg = self.config
        if self._fb_sec is None:
            self._fb_sec = closed
        h, g, lim, leak = cfg.feedback_horizon, cfg.feedback_gain, cfg.feedback_limit, cfg.feedback_leak
        # every closed second since the last update, as if refreshed each second (a controller
        # refreshing rarely, e.g. on sparse traffic, makes the same updates as a busy one): those
        # whose horizon is still in the window are integrated, older ones (a gap longer than the
        # window) only leak, so the work per refresh is bounded by the window, not by the gap
        start = max(self._fb_sec + 1, closed + cfg.closed_after - cfg.window_seconds + h)
        if start > self._fb_sec + 1:
            decay = (1.0 - leak) ** (start - self._fb_sec - 1)
            self._i_block *= decay
            self._i_pass *= decay
        for s in range(start, closed + 1):
            self._i_block *= 1.0 - leak
            self._i_pass *= 1.0 - leak
            if s < self._changed_sec + h:  # the horizon still holds old-target decisions
                continue
            rec = _sum((present[k][:N_COUNTS] for k in range(s - h + 1, s + 1) if k in present), N_COUNTS)
            if rec[0] < cfg.min_rows:
                continue
            rule_share = (1.0 - rec[4] / rec[0]) * (1.0 - t.epsilon)
            score_share = rule_share - t.p_u
            if t.r > 0 and score_share > 0:
                err = t.r - rec[1] / rec[0]
                self._i_block = float(np.clip(self._i_block + g * err / score_share, -lim, lim))
            if t.p_u > 0 and rule_share > 0:
                err = t.p_u - rec[2] / rec[0]
                self._i_pass = float(np.clip(self._i_pass + g * err / rule_share, -lim, lim))
        self._fb_sec = max(self._fb_sec, closed)

    def _recent_span(self, present: dict[int, np.ndarray], sec: int) -> np.ndarray:
        """The newest seconds holding ``quantile_rows`` rows (at least ``quantile_min_seconds``,
        at most the window): quantiles precise enough, with the least lag under drift."""
        cfg = self.config
        out = np.zeros(self.spec.size, dtype=np.int64)
        for k, s in enumerate(range(sec, sec - cfg.window_seconds, -1)):
            if k >= cfg.quantile_min_seconds and out[0] >= cfg.quantile_rows:
                break
            v = present.get(s)
            if v is not None:
                out += v
        return out

    def _compute(self, w: np.ndarray, t: Targets) -> tuple[float, float]:
        """Feed-forward thresholds from the window ``w`` (live rows) blended with the model's
        score distribution, weighted ``prior_rows`` less the live rows of this model."""
        cfg, spec = self.config, self.spec
        total, invalid = float(w[0]), float(w[4])
        theta, tau_u = self._th.theta, self._th.tau_u
        hu = w[spec.u_slice].astype(np.float64)
        he = w[spec.e_slice].astype(np.float64)
        prior = self.prior
        weight = max(0.0, cfg.prior_rows - float(hu.sum())) if prior is not None else 0.0
        self._prior_rows = weight
        if total < cfg.min_rows and weight <= 0:
            return (0.0 if t.r <= 0 else theta), (math.inf if t.p_u <= 0 else tau_u)
        if weight > 0:  # prior rows are valid ones: the invalid share comes from live rows only
            hu = hu + prior.u_hist * (weight / prior.rows)
        valid_share = 1.0 - invalid / total if total > 0 else 1.0
        rule_share = valid_share * (1.0 - t.epsilon)  # share on the rule path
        score_share = rule_share - t.p_u  # share that should reach the score stage

        if t.p_u <= 0:
            tau_u = math.inf
        elif rule_share <= 0 or t.p_u >= rule_share:
            tau_u = 0.0
        elif hu.sum() > 0:
            q_u = min(max(t.p_u / rule_share + self._i_pass, 0.0), 1.0)
            tau_u = spec.u_value(hist_quantile(hu, (1.0 - q_u) * hu.sum(), spec.u_lo, spec.u_hi))

        if weight > 0:  # the prior's rows that reach the score stage at THIS tau_u
            he = he + prior.e_below(tau_u) * (weight * (1.0 - t.epsilon) / prior.rows)
        if t.r <= 0:
            theta = 0.0
        elif score_share <= 0 or t.r >= score_share:
            theta = BLOCK_ALL
        elif he.sum() > 0:
            q_b = min(max(t.r / score_share + self._i_block, 0.0), 1.0)
            theta = spec.e_value(hist_quantile(he, q_b * he.sum(), spec.e_lo, spec.e_hi))
        return theta, tau_u

    # --- failure and rejoin -----------------------------------------------------------------

    def _fail(self, exc: Exception) -> None:
        self.store_errors += 1
        self.last_error = str(exc)
        if not self.degraded:
            self.degraded = True
            self._backoff = self.config.backoff_initial
            self._cache.clear()
        else:
            self._backoff = min(self._backoff * 2, self.config.backoff_max)
        self._retry_at = self.timer() + self._backoff
        self._th = Thresholds(self._th.theta, self._th.tau_u, self._th.targets, True, self._th.version)

    def _rejoin(self, first: int) -> None:
        models = list(dict.fromkeys(m for s in self.own if s >= first for m in self.own[s])) or [self.model]
        try:  # rewrite our own seconds of the window: idempotent, fills what the outage missed
            for k, m in enumerate(models):
                self.store.put(field_name(self.id, m),
                               {s: v[m] for s, v in self.own.items() if s >= first and m in v},
                               bump_epoch=k == len(models) - 1)
        except StoreUnavailable as exc:
            self._fail(exc)
            return
        self.degraded = False
        self._epoch = None
        self._cache.clear()
        self._backoff = self.config.backoff_initial

    def _own_bucket(self, sec: int) -> np.ndarray:
        """This controller's bucket of ``sec`` as the store would sum it for the model now
        serving: every model's counts, this model's histograms."""
        return sum_fields(((field_name(self.id, m), v) for m, v in self.own[sec].items()),
                           self.spec.size, self.model)

    # --- observability ------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Controller state for metrics and `rta ratio get` (also published to Redis)."""
        w = self._window
        c = counts_dict(w)
        total = max(c["total"], 1)
        th = self._th
        return {
            "id": self.id,
            "ts_ms": int(time.time() * 1000),
            "degraded": self.degraded,
            "theta": th.theta,
            "tau_u": th.tau_u if math.isfinite(th.tau_u) else None,
            "targets": th.targets.to_dict(),
            "targets_version": th.version,
            "targets_source": self.targets_source,
            "model": self.model,
            "prior_rows": round(self._prior_rows),
            "clock_skew_s": self.clock_skew,
            "window_seconds": self.config.window_seconds,
            "window": c,
            "shares": {
                "blocked": c["blocked"] / total, "uncertain": c["uncertain"] / total,
                "explore": c["explore"] / total, "invalid": c["invalid"] / total,
                "degraded": c["degraded"] / total,
            },
            "feedback": {"block": self._i_block, "pass": self._i_pass},
            "store_errors": self.store_errors,
            "refreshes": self.refreshes,
        }


def _sum(vectors: Any, size: int) -> np.ndarray:
    out = np.zeros(size, dtype=np.int64)
    for v in vectors:
        out += v[:size]
    return out
