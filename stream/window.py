"""The sliding window's storage: per-second buckets of counts and fixed-bin histograms.

A bucket is one flat vector of unsigned counters (``BucketLayout``)::

    [ total, blocked, uncertain, explore, invalid, degraded, scored, spare |
      e-histogram (e_bins) | u-histogram (u_bins) ]

- counts are of decisions (``degraded`` counts decisions published with reason degraded;
  ``scored`` = rows that reached the score stage = sum of the e-histogram);
- the e-histogram holds ``e`` of the rows that REACHED THE SCORE STAGE only (valid, not
  explored, ``u < tau_u``): that is the population ``theta`` cuts, so the controller never
  mixes in the e of rows the uncertainty stage already passed (the joint e/u issue);
- the u-histogram holds ``u`` of every valid row (explored ones too: the draw is independent
  of u, so it is the population ``tau_u`` cuts).

Bins are fixed and equal-width in a transformed space that resolves small values:
``logit(e)`` clipped to [-12, 12] (e from 6e-6 to 1 - 6e-6), ``log10(u)`` clipped to [-9, 3].
Values beyond the range land in the edge bins. Quantiles interpolate linearly inside a bin.

Two stores share this layout (``WindowStore``):

- ``RedisStore``: the global window. Second ``s`` is the Redis hash ``<prefix>:win:<s>``
  with one field per writer and model (``<controller id>@<model version>``) holding that
  writer's CUMULATIVE bucket for the second as packed big-endian u32 (``np.frombuffer('>u4')``);
  readers sum the fields: the counts of every field (the fleet's shares), the histograms only of
  the fields of the model the reader serves (``read(..., model=)``), since a new model's scores
  have another distribution and the old one's must not set its thresholds. During a rolling
  reload a second holds both models' fields. A batch
  is one pipelined round trip: ``HSET`` of the writer's updated vector + ``EXPIRE``. Writes
  are idempotent (a retried or replayed write cannot double count) and cost the client one
  ``tobytes()`` instead of encoding thousands of ``BITFIELD ... INCRBY`` arguments, which
  measured ~4 ms per 512-row batch in redis-py (the hot path cannot afford it). Live targets
  are the hash ``<prefix>:ratio:targets`` (r, p_u, epsilon, version, updated_ms, who), the
  audit trail the capped list ``<prefix>:ratio:audit`` (newest first, JSON), controllers'
  last state ``<prefix>:ctl:<id>`` (JSON, expires after 15 s), and ``<prefix>:win:epoch`` is
  bumped when a controller rewrites past seconds (rejoin after an outage) so other
  controllers drop their caches of closed seconds.
- ``MemoryStore``: the same in a dict (replay, unit tests, the controller's local fallback).

Every Redis failure (unreachable, or a refusal such as READONLY / OOM / NOPERM) surfaces as
``StoreUnavailable`` so callers need not import redis, and the controller degrades instead of
raising into the hot path.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from stream.errors import InfeasibleTargets, RtaError
from stream.policy import DEGRADED, EXPLORE, INVALID, SCORE, UNCERTAIN, Decisions, Targets

COUNTS = ("total", "blocked", "uncertain", "explore", "invalid", "degraded", "scored", "spare")
N_COUNTS = len(COUNTS)
AUDIT_CAP = 1000
MODEL_SEP = "@"  # a bucket field is "<controller id>@<model version>"


class StoreUnavailable(RtaError):
    """The window store (Redis) cannot be reached or timed out."""


@dataclass(frozen=True)
class HistSpec:
    """Fixed bins: ``e`` in logit space, ``u`` in log10 space (see module docstring)."""

    e_bins: int = 1024
    u_bins: int = 1024
    e_lo: float = -12.0
    e_hi: float = 12.0
    u_lo: float = -9.0
    u_hi: float = 3.0

    @property
    def size(self) -> int:
        return N_COUNTS + self.e_bins + self.u_bins

    @property
    def e_slice(self) -> slice:
        return slice(N_COUNTS, N_COUNTS + self.e_bins)

    @property
    def u_slice(self) -> slice:
        return slice(N_COUNTS + self.e_bins, self.size)

    def e_index(self, e: np.ndarray) -> np.ndarray:
        p = np.clip(np.asarray(e, dtype=np.float64), 1e-12, 1.0 - 1e-12)
        return _bin(np.log(p) - np.log1p(-p), self.e_lo, self.e_hi, self.e_bins)

    def u_index(self, u: np.ndarray) -> np.ndarray:
        x = np.log10(np.maximum(np.asarray(u, dtype=np.float64), 1e-300))
        return _bin(x, self.u_lo, self.u_hi, self.u_bins)

    def e_value(self, x: float) -> float:
        """Inverse transform of a logit-space position."""
        return float(1.0 / (1.0 + np.exp(-x)))

    def u_value(self, x: float) -> float:
        return float(10.0**x)


def _bin(x: np.ndarray, lo: float, hi: float, bins: int) -> np.ndarray:
    idx = np.floor((x - lo) * (bins / (hi - lo)))
    return np.clip(idx, 0, bins - 1).astype(np.int64)


def bucket_vector(e: np.ndarray, u: np.ndarray, d: Decisions, spec: HistSpec) -> np.ndarray:
    """The int64 bucket increment of one batch: counts + both histograms, all numpy."""
    stage = d.stage
    vec = np.zeros(spec.size, dtype=np.int64)
    stage_counts = np.bincount(stage, minlength=DEGRADED + 1)
    scored = stage == SCORE
    valid = stage != INVALID
    vec[0] = len(stage)
    vec[1] = int(np.count_nonzero(d.block))
    vec[2] = stage_counts[UNCERTAIN]
    vec[3] = stage_counts[EXPLORE]
    vec[4] = stage_counts[INVALID]
    vec[5] = int(np.count_nonzero(d.reason == DEGRADED))
    vec[6] = stage_counts[SCORE]
    if scored.any():
        vec[spec.e_slice] = np.bincount(spec.e_index(np.asarray(e)[scored]), minlength=spec.e_bins)
    if valid.any():
        vec[spec.u_slice] = np.bincount(spec.u_index(np.asarray(u)[valid]), minlength=spec.u_bins)
    return vec


def field_name(writer: str, model: str) -> str:
    """A writer's field in a second's hash: one per (controller, model), so histograms of the
    model now serving can be told from those of the one it replaced (module docstring)."""
    return f"{writer}{MODEL_SEP}{model}"


def field_model(name: str) -> str | None:
    """The model a field's histograms belong to (None: an untagged writer, any model)."""
    return name.rpartition(MODEL_SEP)[2] if MODEL_SEP in name else None


def sum_fields(items: Any, size: int, model: str | None = None) -> np.ndarray:
    """Sum (field name, vector) pairs: every field's counts, but the histograms only of fields
    of ``model`` (or untagged ones); ``model`` None sums everything."""
    out = np.zeros(size, dtype=np.int64)
    for name, v in items:
        n = min(len(v), size)
        tag = None if model is None else field_model(name)
        if tag is None or tag == model:
            out[:n] += v[:n]
        else:
            k = min(n, N_COUNTS)
            out[:k] += v[:k]
    return out


def counts_dict(vec: np.ndarray) -> dict[str, int]:
    return {name: int(vec[i]) for i, name in enumerate(COUNTS) if name != "spare"}


def hist_quantile(hist: np.ndarray, below: float, lo: float, hi: float) -> float:
    """Position x (transformed space) with ``below`` of the histogram's mass under it,
    interpolating linearly inside the bin. ``below`` is a count, 0 <= below <= hist.sum()."""
    cum = np.cumsum(hist, dtype=np.float64)
    total = cum[-1] if len(cum) else 0.0
    width = (hi - lo) / len(hist)
    if total <= 0:
        return lo
    below = min(max(below, 0.0), total)
    k = int(np.searchsorted(cum, below, side="left"))
    k = min(k, len(hist) - 1)
    before = cum[k - 1] if k > 0 else 0.0
    inside = hist[k]
    frac = (below - before) / inside if inside > 0 else 0.0
    return lo + (k + min(max(frac, 0.0), 1.0)) * width


@dataclass
class Snapshot:
    """What one refresh reads: buckets by second (only those present), targets, epoch."""

    buckets: dict[int, np.ndarray]
    targets: Targets | None
    targets_version: int = 0
    epoch: int = 0
    meta: dict[str, str] = field(default_factory=dict)
    server_time: float | None = None  # the store's clock (Redis TIME), when asked for


class WindowStore(Protocol):
    """Where the window lives. Each method is at most one round trip."""

    spec: HistSpec

    def put(self, writer: str, buckets: Mapping[int, np.ndarray], bump_epoch: bool = False) -> None:
        """Set ``writer``'s cumulative bucket for each second (idempotent, TTL'd)."""

    def read(self, seconds: Sequence[int], status: Mapping[str, Any] | None = None,
             server_time: bool = False, model: str | None = None) -> Snapshot:
        """Read buckets + targets (+ publish this controller's status, + the store's clock);
        with ``model``, histograms only of that model's fields (counts of all)."""

    def set_targets(self, targets: Targets, who: str, reason: str) -> dict[str, Any]:
        """Write targets atomically with an audit entry; returns the entry."""

    def update_targets(self, who: str, reason: str, r: float | None = None, p_u: float | None = None,
                       epsilon: float | None = None, max_step: float | None = None,
                       before_write: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Like set_targets, None keeping the current value; validated before writing (``r`` may
        move by at most ``max_step``); ``before_write(entry)`` runs before anything is written
        (the durable audit record) and aborts the change by raising."""

    def history(self, n: int = 20) -> list[dict[str, Any]]:
        """Newest-first audit entries."""

    def controllers(self) -> list[dict[str, Any]]:
        """Last published status of each live controller."""


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _targets_from_hash(h: Mapping[str, str]) -> tuple[Targets | None, int]:
    if not h or "r" not in h:
        return None, 0
    try:
        t = Targets(float(h["r"]), float(h.get("p_u", 0.0)), float(h.get("epsilon", 0.0)))
    except (ValueError, RtaError):
        return None, int(h.get("version", 0) or 0)  # unreadable or infeasible: caller keeps its last
    return t, int(h.get("version", 0) or 0)


def _merge(old: Targets | None, r: float | None, p_u: float | None, epsilon: float | None) -> Targets:
    old = old or Targets()
    return Targets(old.r if r is None else r, old.p_u if p_u is None else p_u,
                   old.epsilon if epsilon is None else epsilon)


def _check_step(old: Targets | None, new: Targets, max_step: float | None) -> None:
    """A fat-fingered `rta ratio set 0.9` (for 0.09) must not block most traffic at once."""
    if max_step is None or old is None:
        return
    if abs(new.r - old.r) > max_step + 1e-12:
        raise InfeasibleTargets(f"r would move from {old.r:g} to {new.r:g}, more than the max step {max_step:g} "
                                "per change; change it in steps, or raise --max-step")


def _audit_entry(old: Targets | None, new: Targets, who: str, reason: str, version: int) -> dict[str, Any]:
    now = time.time()
    return {
        "who": who,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
        "ts_ms": int(now * 1000),
        "old": old.to_dict() if old else None,
        "new": new.to_dict(),
        "reason": reason,
        "version": version,
    }


class MemoryStore:
    """The window in a dict: replay, unit tests and the controller's local fallback."""

    def __init__(self, spec: HistSpec | None = None, keep_seconds: int = 120,
                 targets: Targets | None = None) -> None:
        self.spec = spec or HistSpec()
        self.keep_seconds = keep_seconds
        self.buckets: dict[int, dict[str, np.ndarray]] = {}
        self.targets: Targets | None = targets
        self.version = 1 if targets else 0
        self.epoch = 0
        self.audit: list[dict[str, Any]] = []
        self.status: dict[str, dict[str, Any]] = {}

    def put(self, writer: str, buckets: Mapping[int, np.ndarray], bump_epoch: bool = False) -> None:
        for sec, vec in buckets.items():
            self.buckets.setdefault(sec, {})[writer] = np.array(vec, dtype=np.int64)
        if bump_epoch:
            self.epoch += 1
        if self.buckets:
            newest = max(self.buckets)
            for sec in [s for s in self.buckets if s <= newest - self.keep_seconds]:
                del self.buckets[sec]

    def read(self, seconds: Sequence[int], status: Mapping[str, Any] | None = None,
             server_time: bool = False, model: str | None = None) -> Snapshot:
        if status is not None:
            self.status[str(status.get("id", "local"))] = dict(status)
        got = {s: sum_fields(self.buckets[s].items(), self.spec.size, model)
               for s in seconds if s in self.buckets}
        return Snapshot(got, self.targets, self.version, self.epoch)

    def set_targets(self, targets: Targets, who: str, reason: str) -> dict[str, Any]:
        return self.update_targets(who, reason, targets.r, targets.p_u, targets.epsilon)

    def update_targets(self, who: str, reason: str, r: float | None = None, p_u: float | None = None,
                       epsilon: float | None = None, max_step: float | None = None,
                       before_write: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        targets = _merge(self.targets, r, p_u, epsilon)
        _check_step(self.targets, targets, max_step)
        entry = _audit_entry(self.targets, targets, who, reason, self.version + 1)
        if before_write is not None:
            before_write(entry)
        self.version += 1
        self.targets = targets
        self.audit.insert(0, entry)
        del self.audit[AUDIT_CAP:]
        return entry

    def history(self, n: int = 20) -> list[dict[str, Any]]:
        return self.audit[:n]

    def controllers(self) -> list[dict[str, Any]]:
        return list(self.status.values())


class RedisStore:
    """The global window in Redis (layout in the module docstring)."""

    STATUS_TTL = 15

    def __init__(self, client: Any, prefix: str = "rta", spec: HistSpec | None = None,
                 ttl_seconds: int = 120) -> None:
        self.r = client
        self.prefix = prefix
        self.spec = spec or HistSpec()
        self.ttl_seconds = int(ttl_seconds)
        self.k_targets = f"{prefix}:ratio:targets"
        self.k_audit = f"{prefix}:ratio:audit"
        self.k_epoch = f"{prefix}:win:epoch"

    @classmethod
    def from_url(cls, url: str, prefix: str = "rta", spec: HistSpec | None = None,
                 ttl_seconds: int = 120, socket_timeout: float = 0.25,
                 connect_timeout: float = 0.25) -> RedisStore:
        """A store with short socket timeouts and no client-side retries: a dead Redis costs
        the hot path at most one timeout, and the controller owns the retry policy."""
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        client = redis.Redis.from_url(
            url, socket_timeout=socket_timeout, socket_connect_timeout=connect_timeout,
            retry=Retry(NoBackoff(), 0), retry_on_timeout=False, health_check_interval=0,
        )
        return cls(client, prefix, spec, ttl_seconds)

    def bucket_key(self, sec: int) -> str:
        return f"{self.prefix}:win:{sec}"

    def _call(self, fn: Any) -> Any:
        """Run one round trip; EVERY Redis failure becomes StoreUnavailable: a lost connection,
        and also the server refusing (READONLY after a failover, OOM under noeviction, NOPERM
        for an ACL user), which would otherwise kill every worker at once."""
        import redis

        try:
            return fn()
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
            raise StoreUnavailable(f"redis unreachable: {_first_line(exc)}") from None
        except redis.exceptions.RedisError as exc:  # ResponseError (READONLY, OOM, NOPERM, ...)
            raise StoreUnavailable(f"redis refused: {_first_line(exc)}") from None

    def put(self, writer: str, buckets: Mapping[int, np.ndarray], bump_epoch: bool = False) -> None:
        def run() -> None:
            pipe = self.r.pipeline(transaction=False)
            for sec, vec in buckets.items():
                key = self.bucket_key(sec)
                pipe.hset(key, writer, np.asarray(vec).astype(">u4").tobytes())
                pipe.expire(key, self.ttl_seconds)
            if bump_epoch:
                pipe.incr(self.k_epoch)
            pipe.execute()

        self._call(run)

    def read(self, seconds: Sequence[int], status: Mapping[str, Any] | None = None,
             server_time: bool = False, model: str | None = None) -> Snapshot:
        seconds = list(seconds)

        def run() -> list[Any]:
            pipe = self.r.pipeline(transaction=False)
            for sec in seconds:
                pipe.hgetall(self.bucket_key(sec))
            pipe.hgetall(self.k_targets)
            pipe.get(self.k_epoch)
            if status is not None:
                pipe.set(f"{self.prefix}:ctl:{status.get('id', 'ctl')}", json.dumps(status), ex=self.STATUS_TTL)
            if server_time:
                pipe.time()
            return pipe.execute()

        replies = self._call(run)
        clock = float(replies[-1][0]) + float(replies[-1][1]) / 1e6 if server_time else None
        raw, (h, epoch) = replies[: len(seconds)], replies[len(seconds): len(seconds) + 2]
        size = self.spec.size
        buckets: dict[int, np.ndarray] = {}
        for sec, fields in zip(seconds, raw, strict=True):
            if fields:
                buckets[sec] = sum_fields(((k.decode("utf-8", "replace") if isinstance(k, bytes) else k,
                                             np.frombuffer(b, dtype=">u4")) for k, b in fields.items()),
                                           size, model)
        hd = {k.decode() if isinstance(k, bytes) else k: v.decode() if isinstance(v, bytes) else v
              for k, v in (h or {}).items()}
        targets, version = _targets_from_hash(hd)
        return Snapshot(buckets, targets, version, int(epoch or 0), hd, clock)

    def set_targets(self, targets: Targets, who: str, reason: str) -> dict[str, Any]:
        return self.update_targets(who, reason, targets.r, targets.p_u, targets.epsilon)

    def update_targets(self, who: str, reason: str, r: float | None = None, p_u: float | None = None,
                       epsilon: float | None = None, max_step: float | None = None,
                       before_write: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """WATCH/MULTI: read old, merge (None = keep), validate (``r`` moves by at most
        ``max_step``), call ``before_write(entry)`` (the durable audit record: raising aborts),
        then write new + audit entry atomically (retried on a race). Raises InfeasibleTargets
        before writing anything."""
        import redis

        def run() -> dict[str, Any]:
            with self.r.pipeline(transaction=True) as pipe:
                while True:
                    try:
                        pipe.watch(self.k_targets)
                        h = {k.decode(): v.decode() for k, v in pipe.hgetall(self.k_targets).items()}
                        old, version = _targets_from_hash(h)
                        targets = _merge(old, r, p_u, epsilon)
                        _check_step(old, targets, max_step)
                        entry = _audit_entry(old, targets, who, reason, version + 1)
                        if before_write is not None:
                            before_write(entry)
                        pipe.multi()
                        pipe.hset(self.k_targets, mapping={
                            "r": repr(float(targets.r)), "p_u": repr(float(targets.p_u)),
                            "epsilon": repr(float(targets.epsilon)), "version": version + 1,
                            "updated_ms": entry["ts_ms"], "who": who,
                        })
                        pipe.lpush(self.k_audit, json.dumps(entry))
                        pipe.ltrim(self.k_audit, 0, AUDIT_CAP - 1)
                        pipe.execute()
                        return entry
                    except redis.WatchError:
                        continue

        return self._call(run)

    def get_targets(self) -> tuple[Targets | None, dict[str, str]]:
        h = self._call(lambda: self.r.hgetall(self.k_targets))
        hd = {k.decode(): v.decode() for k, v in (h or {}).items()}
        return _targets_from_hash(hd)[0], hd

    def history(self, n: int = 20) -> list[dict[str, Any]]:
        """Newest-first audit entries; an entry that is not a JSON object is skipped (one bad
        entry must not hide the trail from `rta ratio history` or the control plane)."""
        rows = self._call(lambda: self.r.lrange(self.k_audit, 0, max(n, 1) - 1))
        out = []
        for x in rows:
            try:
                entry = json.loads(x)
            except ValueError:  # also UnicodeDecodeError
                continue
            if isinstance(entry, dict):
                out.append(entry)
        return out

    def controllers(self) -> list[dict[str, Any]]:
        def run() -> list[Any]:
            keys = list(self.r.scan_iter(match=f"{self.prefix}:ctl:*", count=500))
            return self.r.mget(keys) if keys else []

        return [json.loads(x) for x in self._call(run) if x]

    def ttl(self, sec: int) -> int:
        return int(self._call(lambda: self.r.ttl(self.bucket_key(sec))))

    def clear(self) -> int:
        """Delete every key under this prefix (tests, benchmarks)."""
        def run() -> int:
            keys = list(self.r.scan_iter(match=f"{self.prefix}:*", count=1000))
            return self.r.delete(*keys) if keys else 0

        return int(self._call(run))


# --- least privilege: Redis ACL users -----------------------------------------------------------

_CONNECT = "+ping +hello +select +client|setinfo +auth"
ACL_ROLES = ("worker", "operator")


def acl_rules(prefix: str, role: str) -> list[str]:
    """`ACL SETUSER <name> on ><password> <rules...>` rules for a role (DESIGN.md, security):

    - worker: write its window buckets, the window epoch, its controller state and its status
      record (``stream.status``); READ the targets (never write them or the audit list);
    - operator (also the control plane's user): write targets and append the audit list; read the
      window, controller states and worker status records.
    Needs Redis >= 7 (read-only key selectors ``%R~``)."""
    if role == "worker":
        keys = [f"~{prefix}:win:*", f"~{prefix}:ctl:*", f"~{prefix}:status:*", f"%R~{prefix}:ratio:targets"]
        cmds = "+hset +hgetall +expire +incr +get +set +mget +scan +time"
    elif role == "operator":
        keys = [f"~{prefix}:ratio:*", f"%R~{prefix}:win:*", f"%R~{prefix}:ctl:*", f"%R~{prefix}:status:*"]
        cmds = "+hgetall +hset +lpush +ltrim +lrange +watch +unwatch +multi +exec +discard +get +mget +scan +ttl"
    else:
        raise ValueError(f"unknown role {role!r}; known: {', '.join(ACL_ROLES)}")
    return ["resetkeys", *keys, "resetchannels", "-@all", *_CONNECT.split(), *cmds.split()]


def apply_acl(client: Any, prefix: str, role: str, user: str, password: str) -> None:
    """Create or reset `user` with the role's rules (an admin connection)."""
    client.execute_command("ACL", "SETUSER", user, "reset", "on", f">{password}", *acl_rules(prefix, role))
