"""The ratio controller: holds the live block share ``r`` and direct-pass share ``p_u``.

Use (worker and replay alike; the worker needs nothing else)::

    ctl = RatioController.from_settings(settings)             # Redis window, global
    ctl = RatioController(MemoryStore(), ControllerConfig(), clock=sim_clock)   # replay
    th = ctl.thresholds()       # Thresholds(theta, tau_u, targets, degraded, version)
    d = policy.decide(e, u, valid, draw, th.theta, th.tau_u, th.targets.epsilon, th.degraded)
    ctl.observe(e, u, d)        # ONE pipelined round trip; refreshes thresholds when due
    ctl.status()                # dict for /metrics and `rta ratio get`

How thresholds are set (every ``refresh_interval`` seconds at most, one more round trip that
reads the window's open seconds and the live targets; closed seconds are cached):

- Window = the last ``window_seconds`` per-second buckets, summed over all workers.
- Feed-forward ``tau_u``: the rows reaching the uncertainty stage are the valid, non-explored
  ones, a share ``(valid/total)(1-epsilon)`` of all traffic; to pass ``p_u`` of ALL traffic,
  ``tau_u`` is the ``1 - q_u`` quantile of the u-histogram with
  ``q_u = p_u * total / (valid * (1 - epsilon))``.
- Feed-forward ``theta``: the score stage receives ``s = (valid/total)(1-epsilon) - p_u`` of
  all traffic, so ``theta`` is the ``q_b = r / s`` quantile of the e-histogram of rows that
  reached the score stage (``stream.window``: only those rows are histogrammed, so the
  uncertainty-passed rows, whose e may be correlated with u, never bias ``theta``).
- Feedback: ``q_b += I_b`` and ``q_u += I_u`` where ``I`` integrates the error of the observed
  share over the last ``feedback_horizon`` seconds (``I += gain * error / stage_share * dt``,
  clamped to ``+-feedback_limit``). It absorbs what the feed-forward cannot see: a drifting
  score distribution (the window lags), the e/u coupling after a ``p_u`` change, bin
  discretisation. The integral is frozen for ``feedback_horizon + 1`` s after a target change
  (the recent window still holds old-target decisions and would wind it up) and kept, not
  reset, across changes.
- ``r == 0`` -> ``theta = 0`` (nothing blocked); ``p_u == 0`` -> ``tau_u = inf``. Until the
  window holds ``min_rows`` rows the initial thresholds stay (block nothing, pass no one
  for uncertainty), so the first batch of a cold start is passed.

Degraded mode (Redis unreachable: connection refused, socket timeout): the controller never
raises into the hot path. It keeps a local in-memory window of this worker's own batches at
all times, so on failure it goes on refreshing thresholds from that local window with the
last known targets, ``degraded=True`` (decisions then say ``degraded``). It retries Redis with
exponential backoff (``backoff_initial`` doubling to ``backoff_max``) at refresh time. On
rejoin it PUSHES the batches it decided while degraded (still within the window) into their
seconds, and bumps the window epoch so other controllers drop cached seconds: the global
window then counts every decision made. The batch whose write failed is pushed too, so if
that write had in fact landed, one batch is counted twice (at most one per outage).

Clock: ``clock()`` gives seconds (default ``time.time``; buckets of all workers must align,
so use wall-clock time in production). Tests and benchmarks inject a simulated clock; Redis
TTLs are still real seconds (``window_seconds + 60``), which is safe whenever the simulated
clock runs at least as fast as real time.
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

from stream.policy import Decisions, Targets
from stream.window import (
    N_COUNTS,
    HistSpec,
    MemoryStore,
    RedisStore,
    StoreUnavailable,
    WindowStore,
    bucket_vector,
    counts_dict,
    hist_quantile,
)

BLOCK_ALL = 1.0 + 1e-6  # theta above every score: block the whole score stage


@dataclass(frozen=True)
class ControllerConfig:
    """Knobs of the controller (defaults hold 0.5 pp at a few thousand events/s)."""

    window_seconds: int = 30
    refresh_interval: float = 0.25
    feedback_horizon: int = 5
    feedback_gain: float = 0.5  # 1/s: integral rate per unit of quantile error
    feedback_limit: float = 0.05  # |I| in quantile units of the stage's traffic
    closed_after: int = 2  # seconds older than this are closed and cached
    min_rows: int = 200
    backoff_initial: float = 0.25
    backoff_max: float = 8.0
    socket_timeout: float = 0.25
    spec: HistSpec = field(default_factory=HistSpec)
    default_targets: Targets = field(default_factory=Targets)
    initial_theta: float = 0.0
    initial_tau_u: float = math.inf

    def __post_init__(self) -> None:
        if self.window_seconds < 2 or self.feedback_horizon < 1 or self.refresh_interval <= 0:
            raise ValueError("window_seconds >= 2, feedback_horizon >= 1, refresh_interval > 0")


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
                 clock: Callable[[], float] = time.time, controller_id: str | None = None) -> None:
        self.store = store
        self.config = cfg = config or ControllerConfig()
        self.clock = clock
        self.id = controller_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.spec = store.spec
        self.local = MemoryStore(self.spec, keep_seconds=cfg.window_seconds + 5)
        self.pending = MemoryStore(self.spec, keep_seconds=cfg.window_seconds + 5)
        self._th = Thresholds(cfg.initial_theta, cfg.initial_tau_u, cfg.default_targets, False, 0)
        self._cache: dict[int, np.ndarray] = {}
        self._epoch: int | None = None
        self._next_refresh = -math.inf
        self._last_refresh: float | None = None
        self._hold_until = -math.inf
        self._i_block = 0.0
        self._i_pass = 0.0
        self._retry_at = 0.0
        self._backoff = cfg.backoff_initial
        self._window = np.zeros(self.spec.size, dtype=np.int64)
        self._recent = np.zeros(N_COUNTS, dtype=np.int64)
        self.degraded = False
        self.store_errors = 0
        self.refreshes = 0
        self.last_error = ""

    @classmethod
    def from_settings(cls, settings: Any, config: ControllerConfig | None = None,
                      clock: Callable[[], float] = time.time,
                      controller_id: str | None = None) -> RatioController:
        """A controller on the settings' Redis (``redis_url``, ``redis_prefix``)."""
        cfg = config or ControllerConfig()
        store = RedisStore.from_url(
            settings.redis_url, settings.redis_prefix, cfg.spec, ttl_seconds=cfg.window_seconds + 60,
            socket_timeout=cfg.socket_timeout, connect_timeout=cfg.socket_timeout,
        )
        return cls(store, cfg, clock, controller_id)

    # --- hot path -------------------------------------------------------------------------

    def thresholds(self) -> Thresholds:
        """Current thresholds (refreshes first when due)."""
        now = self.clock()
        if now >= self._next_refresh:
            self.refresh(now)
        return self._th

    def observe(self, e: np.ndarray, u: np.ndarray, decisions: Decisions) -> None:
        """Add a decided batch to the window (one round trip), then refresh when due."""
        now = self.clock()
        sec = int(now)
        vec = bucket_vector(e, u, decisions, self.spec)
        self.local.add({sec: vec})
        if self.degraded:
            self.pending.add({sec: vec})
        else:
            try:
                self.store.add({sec: vec})
            except StoreUnavailable as exc:
                self.pending.add({sec: vec})
                self._fail(now, exc)
        if now >= self._next_refresh:
            self.refresh(now)

    # --- refresh ----------------------------------------------------------------------------

    def refresh(self, now: float | None = None) -> Thresholds:
        """Recompute thresholds from the window (global if reachable, else local)."""
        now = self.clock() if now is None else now
        cfg = self.config
        self._next_refresh = now + cfg.refresh_interval
        sec = int(now)
        first = sec - cfg.window_seconds + 1
        targets = self._th.targets
        version = self._th.version
        window: np.ndarray | None = None

        if self.degraded and now >= self._retry_at:
            self._rejoin(now, first)
        if not self.degraded:
            try:
                window, snap_targets, version = self._read_global(sec, first)
                if snap_targets is not None:
                    targets = snap_targets
                elif version == 0:
                    targets = cfg.default_targets
            except StoreUnavailable as exc:
                self._fail(now, exc)
        if window is None:  # degraded: this worker's own recent traffic
            snap = self.local.read(range(first, sec + 1))
            window = _sum(snap.buckets.values(), self.spec.size)
            self._recent = _sum((v[:N_COUNTS] for s, v in snap.buckets.items()
                                 if s > sec - cfg.feedback_horizon), N_COUNTS)

        self._window = window
        if targets != self._th.targets:
            self._hold_until = now + cfg.feedback_horizon + 1
        theta, tau_u = self._compute(window, targets, now)
        self._th = Thresholds(theta, tau_u, targets, self.degraded, version)
        self._last_refresh = now
        self.refreshes += 1
        return self._th

    def _read_global(self, sec: int, first: int) -> tuple[np.ndarray, Targets | None, int]:
        cfg = self.config
        closed = sec - cfg.closed_after
        for s in [s for s in self._cache if s < first]:
            del self._cache[s]
        wanted = [s for s in range(first, sec + 1) if s > closed or s not in self._cache]
        snap = self.store.read(wanted, self.status())
        if self._epoch is not None and snap.epoch != self._epoch:
            self._cache.clear()  # someone wrote into past seconds: read them all again
            wanted = list(range(first, sec + 1))
            snap = self.store.read(wanted)
        self._epoch = snap.epoch
        for s, v in snap.buckets.items():
            if s <= closed:
                self._cache[s] = v
        present = {**self._cache, **snap.buckets}
        window = _sum((present[s] for s in range(first, sec + 1) if s in present), self.spec.size)
        self._recent = _sum((present[s][:N_COUNTS] for s in range(sec - cfg.feedback_horizon + 1, sec + 1)
                             if s in present), N_COUNTS)
        return window, snap.targets, snap.targets_version

    def _compute(self, w: np.ndarray, t: Targets, now: float) -> tuple[float, float]:
        cfg, spec = self.config, self.spec
        total, invalid = float(w[0]), float(w[4])
        theta, tau_u = self._th.theta, self._th.tau_u
        if total < cfg.min_rows:
            return (0.0 if t.r <= 0 else theta), (math.inf if t.p_u <= 0 else tau_u)
        valid_share = (total - invalid) / total
        rule_share = valid_share * (1.0 - t.epsilon)  # share of all traffic on the rule path
        score_share = rule_share - t.p_u  # share of all traffic that should reach the score stage

        # feedback on the recent observed shares
        rec = self._recent
        dt = min(now - self._last_refresh, 1.0) if self._last_refresh is not None else 0.0
        if now >= self._hold_until and rec[0] >= cfg.min_rows and dt > 0:
            lim, g = cfg.feedback_limit, cfg.feedback_gain
            if t.r > 0 and score_share > 0:
                err_b = t.r - rec[1] / rec[0]
                self._i_block = float(np.clip(self._i_block + g * err_b / score_share * dt, -lim, lim))
            if t.p_u > 0 and rule_share > 0:
                err_u = t.p_u - rec[2] / rec[0]
                self._i_pass = float(np.clip(self._i_pass + g * err_u / rule_share * dt, -lim, lim))

        hu = w[spec.u_slice]
        if t.p_u <= 0:
            tau_u = math.inf
        elif rule_share <= 0 or t.p_u >= rule_share:
            tau_u = 0.0
        elif hu.sum() > 0:
            q_u = min(max(t.p_u / rule_share + self._i_pass, 0.0), 1.0)
            tau_u = spec.u_value(hist_quantile(hu, (1.0 - q_u) * hu.sum(), spec.u_lo, spec.u_hi))

        he = w[spec.e_slice]
        if t.r <= 0:
            theta = 0.0
        elif score_share <= 0 or t.r >= score_share:
            theta = BLOCK_ALL
        elif he.sum() > 0:
            q_b = min(max(t.r / score_share + self._i_block, 0.0), 1.0)
            theta = spec.e_value(hist_quantile(he, q_b * he.sum(), spec.e_lo, spec.e_hi))
        return theta, tau_u

    # --- failure and rejoin -----------------------------------------------------------------

    def _fail(self, now: float, exc: Exception) -> None:
        self.store_errors += 1
        self.last_error = str(exc)
        if not self.degraded:
            self.degraded = True
            self._backoff = self.config.backoff_initial
            self._cache.clear()
        else:
            self._backoff = min(self._backoff * 2, self.config.backoff_max)
        self._retry_at = now + self._backoff
        self._th = Thresholds(self._th.theta, self._th.tau_u, self._th.targets, True, self._th.version)

    def _rejoin(self, now: float, first: int) -> None:
        backlog = self.pending.pop_since(first)
        try:
            self.store.add(backlog, bump_epoch=True)
        except StoreUnavailable as exc:
            self.pending.add(backlog)
            self._fail(now, exc)
            return
        self.pending.buckets.clear()
        self.degraded = False
        self._epoch = None
        self._cache.clear()
        self._backoff = self.config.backoff_initial

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
