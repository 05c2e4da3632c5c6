"""Canary rollout: a candidate serves a hashed share of live traffic beside `current`.

    <model_dir>/canary.json     {"version", "share", "who", "reason", "started_ms"}: the canary in force

Routing (`canary_arm`): a request goes to the candidate when a stable 64-bit hash of its
`request_id` (a multilinear hash of its characters with fixed keys, then the splitmix64
finaliser), read as a number in [0, 1), is below the share. It depends on the id only: never on
the process (Python's `hash()` is salted per process), the worker, the batch or the time, so a
re-delivered request always gets the same arm and every worker agrees without talking.
Vectorised over the batch (~0.4 us per request for 36-character ids on the shared box).

Every start and stop is audited like a promotion: the Kafka audit topic first (when an audit
hook is given), then the state file (one rename), then `registry.jsonl` (actions `canary-start`,
`canary-stop`; the rollback chain ignores them). Workers follow the file at their reload cadence
(stream.worker). A worker that stops a canary on a guard-rail breach (`stop(..., automatic=True)`)
goes through the same path, with the reason in one line.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stream.errors import BundleError, ConfigError

CANARY_FILE = "canary.json"


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, in place (uint64 arithmetic wraps)."""
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


with np.errstate(over="ignore"):
    # one fixed odd 64-bit key per character position (the hash's definition: never change them)
    _KEYS = _mix(np.arange(1, 1025, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)) | np.uint64(1)


def id_hash(request_ids: Any) -> np.ndarray:
    """uint64[N]: a multilinear hash of each id's code points (sum of code point x the position's
    fixed key, mod 2^64), then splitmix64's finaliser so every bit is uniform. numpy's
    fixed-width strings pad with NUL, which adds 0: an id hashes the same in any batch."""
    ids = np.asarray(request_ids)
    if ids.size == 0:
        return np.zeros(0, np.uint64)
    u = ids.astype(str)
    width = u.dtype.itemsize // 4
    cols = u.view(np.uint32).reshape(len(u), width)
    if width > len(_KEYS):  # ids longer than 1024 characters: their tail folds onto the keys
        pad = -width % len(_KEYS)
        cols = np.pad(cols, ((0, 0), (0, pad))).reshape(len(u), -1, len(_KEYS)).sum(axis=1, dtype=np.uint64)
        width = len(_KEYS)
    with np.errstate(over="ignore"):
        h = (cols.astype(np.uint64) * _KEYS[:width]).sum(axis=1, dtype=np.uint64)
        return _mix(h)


def id_unit(request_ids: Any) -> np.ndarray:
    """float64[N] in [0, 1): the id's hash as a uniform number (its top 53 bits)."""
    return (id_hash(request_ids) >> np.uint64(11)).astype(np.float64) * 2.0**-53


def canary_arm(request_ids: Any, share: float) -> np.ndarray:
    """bool[N]: True for the requests the canary decides (`share` of ids, by hash)."""
    if share <= 0:
        return np.zeros(len(request_ids), bool)
    return id_unit(request_ids) < share


@dataclass(frozen=True)
class CanaryState:
    """The canary in force (`<model_dir>/canary.json`)."""

    version: str
    share: float
    who: str = ""
    reason: str = ""
    started_ms: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.version, str) or not self.version:
            raise ConfigError("canary: no version")
        if not isinstance(self.share, int | float) or not 0.0 < float(self.share) < 1.0:
            raise ConfigError(f"canary share must be in (0, 1), got {self.share!r}")


def read_canary(model_dir: str | Path) -> CanaryState | None:
    """The canary in force, None when there is none; BundleError (one line) when the file is
    unreadable or malformed (a worker then serves `current` for all traffic and says so)."""
    path = Path(model_dir) / CANARY_FILE
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path}: unreadable canary state ({type(exc).__name__})") from None
    if not isinstance(doc, dict):
        raise BundleError(f"{path}: canary state is not an object")
    try:
        return CanaryState(str(doc.get("version") or ""), float(doc.get("share", 0.0)), str(doc.get("who", "")),
                           str(doc.get("reason", "")), int(doc.get("started_ms", 0)))
    except (ConfigError, TypeError, ValueError) as exc:
        raise BundleError(f"{path}: {exc}") from None


def _write_state(root: Path, state: CanaryState | None) -> None:
    path = root / CANARY_FILE
    if state is None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return
    tmp = root / f".{CANARY_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(asdict(state)))
    os.replace(tmp, path)


def _audited(root: Path, entry: dict[str, Any], state: CanaryState | None, audit: Any) -> dict[str, Any]:
    """Audit topic first (no change without its acknowledgement), then the state, then the log."""
    from model import registry

    lock = os.open(root / registry.LOCK_FILE, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if audit is not None:
            why = audit(entry)
            if why is not None:
                raise BundleError(f"audit topic not written ({why}); canary NOT changed; "
                                  "--no-audit-topic skips the topic")
        _write_state(root, state)
        registry._append_log(root, entry)
    finally:
        os.close(lock)
    return entry


def _entry(action: str, who: str, reason: str, root: Path, **extra: Any) -> dict[str, Any]:
    if not reason or not reason.strip():
        raise ConfigError(f"{action} needs --reason (kept in the audit trail)")
    return {"kind": f"model.{action}", "action": action, "who": who, "reason": " ".join(reason.split()),
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "ts_ms": int(time.time() * 1000),
            "model_dir": str(root.resolve()), **extra}


def start(model_dir: str | Path, version: str, share: float, who: str, reason: str,
          audit: Any = None, gate: dict[str, Any] | None = None) -> dict[str, Any]:
    """Start (or re-share) a canary of `version`: verified first, never `current` itself.
    `gate`: the off-policy gate's verdict that let it start (kept in the audit entry)."""
    from model import bundle, registry

    root = Path(model_dir)
    registry.version_dir(root, version)
    registry.verify(root / version)
    current = bundle.current_version(root)
    if current is None:
        raise BundleError(f"{root}: no current version; a canary runs beside one")
    if version == current:
        raise ConfigError(f"{version} is current already; a canary needs another version")
    state = CanaryState(version, float(share), who, " ".join(reason.split()) if reason else "", int(time.time() * 1000))
    entry = _entry("canary-start", who, reason, root, old=current, new=version, share=state.share,
                   **({"gate": gate} if gate else {}))
    return _audited(root, entry, state, audit)


def stop(model_dir: str | Path, who: str, reason: str, audit: Any = None, automatic: bool = False,
         evidence: dict[str, Any] | None = None, expect_version: str | None = None) -> dict[str, Any] | None:
    """Stop the canary in force (None if there is none, or if it is no longer `expect_version`:
    another worker or an operator stopped or replaced it first)."""
    root = Path(model_dir)
    try:
        state = read_canary(root)
    except BundleError:
        state = None
        if expect_version is not None:
            return None
    if state is None and not (root / CANARY_FILE).exists():
        return None
    if expect_version is not None and (state is None or state.version != expect_version):
        return None
    from model import bundle

    entry = _entry("canary-stop", who, reason, root, old=bundle.current_version(root),
                   new=None if state is None else state.version, share=None if state is None else state.share,
                   automatic=automatic, **({"evidence": evidence} if evidence else {}))
    return _audited(root, entry, None, audit)


@dataclass
class ArmGuard:
    """Guard rails measured live on one worker's canary arm (rows since the canary started here):
    its block share off the target r beyond `block_bound` (over the rows after the arm's first
    `warmup_rows`, while its controller's window fills: a bundle without a score distribution
    blocks nothing until then), its NaN/invalid output rate beyond the current arm's plus
    `bad_bound`, its scoring cost per row beyond `latency_ratio` x current's AND beyond it by
    `latency_floor_s`. Judged once `min_rows` canary rows are in (a few hundred rows cannot tell
    3 pp).

    The scoring cost is a per-row slope, not time / rows: the canary scores `share` of each batch,
    so a fixed cost per call (the onnxruntime call, a GIL wait on a loaded box) spread over its
    fewer rows made a model as fast as current look 3.6-4.6x slower per row at share 0.3 (35.6 vs
    7.7, 69.7 vs 19.6 us/row, measured) and stopped it. Every batch after the warm-up is one
    sample per arm (rows, seconds); one least-squares fit with a common per-call cost and a slope
    per arm, t = a + b_arm x rows, separates the two (the arms' batch sizes differ by the share);
    it trips only when the canary's slope exceeds `latency_ratio` x current's by `latency_z`
    standard errors (it looks again every batch; a loaded box's per-call noise is large) and
    current's by `latency_floor_s` (100 us/row: a canary that costs that much more breaks the
    worker's 20 us/request budget even at share 0.2). On the loaded box two models equally fast
    offline still fitted 75.5 vs 11.9 us/row once (load bursts make big batches slow for both
    arms): finer latency comparisons are `rta bench worker --canary-share`'s job.
    `breach` is called once per batch with the cumulative counts (the worker's `_count_arms`)."""

    min_rows: int = 2000
    warmup_rows: int = 2000
    block_bound: float = 0.05
    bad_bound: float = 0.01
    latency_ratio: float = 3.0
    latency_floor_s: float = 100e-6
    min_calls: int = 30
    latency_z: float = 4.0
    _last: dict[str, tuple[float, float]] = field(default_factory=dict, repr=False)
    _xtx: np.ndarray = field(default_factory=lambda: np.zeros((3, 3)), repr=False)
    _xty: np.ndarray = field(default_factory=lambda: np.zeros(3), repr=False)
    _yy: float = field(default=0.0, repr=False)
    _calls: dict[str, int] = field(default_factory=lambda: {"current": 0, "canary": 0}, repr=False)

    def _observe(self, arms: dict[str, dict[str, float]]) -> None:
        """This batch's scoring call per arm (the change of its cumulative counts) as a sample;
        counts that went back (the worker reset them for a new canary) start a new fit."""
        if any(float((arms.get(n) or {}).get("rows", 0)) < self._last.get(n, (0.0, 0.0))[0] for n in self._last):
            self._xtx, self._xty, self._yy = np.zeros((3, 3)), np.zeros(3), 0.0
            self._calls = {"current": 0, "canary": 0}
            self._last = {}
        for j, name in ((1, "current"), (2, "canary")):
            a = arms.get(name) or {}
            rows, secs = float(a.get("rows", 0)), float(a.get("score_s", 0.0))
            last_rows, last_secs = self._last.get(name, (rows, secs))
            self._last[name] = (rows, secs)
            dr, ds = rows - last_rows, secs - last_secs
            if dr <= 0 or rows - dr < self.warmup_rows:  # no call this batch, or still warming up
                continue
            x = np.zeros(3)
            x[0], x[j] = 1.0, dr
            self._xtx += np.outer(x, x)
            self._xty += x * ds
            self._yy += ds * ds
            self._calls[name] += 1

    def slopes(self) -> tuple[float, float, float, float] | None:
        """(per-call seconds, current's seconds per row, the canary's, the standard error of
        canary - latency_ratio x current) once both arms have `min_calls` samples; None before."""
        n = sum(self._calls.values())
        if min(self._calls.values()) < self.min_calls:
            return None
        inv = np.linalg.pinv(self._xtx)
        coef = inv @ self._xty
        rss = max(self._yy - 2 * coef @ self._xty + coef @ self._xtx @ coef, 0.0)
        contrast = np.array([0.0, -self.latency_ratio, 1.0])
        se = float(np.sqrt(max(rss / max(n - 3, 1) * contrast @ inv @ contrast, 0.0)))
        return float(coef[0]), float(coef[1]), float(coef[2]), se

    def breach(self, arms: dict[str, dict[str, float]], r: float) -> str | None:
        """One line naming the breached guard rail, or None."""
        self._observe(arms)
        c, k = arms.get("current", {}), arms.get("canary", {})
        n, n_w = k.get("rows", 0), k.get("rows_w", 0)
        if n_w >= self.min_rows:
            block = k["blocked_w"] / n_w
            if abs(block - r) > self.block_bound:
                return (f"canary arm block share {block:.3f} is off the target r={r:.3f} by more than "
                        f"{self.block_bound:.3f} ({n_w} rows after warm-up)")
        if n < self.min_rows:
            return None
        bad = k["nan"] / n
        base = c.get("nan", 0) / max(c.get("rows", 0), 1)
        if bad > base + self.bad_bound:
            return f"canary arm NaN/invalid output rate {bad:.4f} exceeds current's {base:.4f} + {self.bad_bound:.3f} ({n} rows)"
        fit = self.slopes()
        if fit is not None:
            per_call, cs, ks, se = fit
            if cs > 0 and ks - self.latency_ratio * cs > self.latency_z * se and ks - cs > self.latency_floor_s:
                return (f"canary arm scoring {ks * 1e6:.1f} us/row is over {self.latency_ratio:g}x current's "
                        f"{cs * 1e6:.1f} us/row (per-call cost {per_call * 1e6:.0f} us apart; "
                        f"{self._calls['canary']} canary calls)")
        return None


def fleet_arms(settings: Any) -> tuple[list[dict[str, Any]], str | None]:
    """Every live worker's canary record (from its status record in Redis), and why not if
    Redis could not be read."""
    from stream.status import status_pattern
    from stream.window import RedisStore, StoreUnavailable

    try:
        store = RedisStore.from_url(settings.redis_url, settings.redis_prefix, socket_timeout=2.0,
                                    connect_timeout=2.0)

        def run() -> list[Any]:
            keys = sorted(store.r.scan_iter(match=status_pattern(store.prefix), count=500))
            return store.r.mget(keys) if keys else []

        raws = store._call(run)
    except (StoreUnavailable, OSError) as exc:
        return [], f"redis: {exc}"
    out = []
    for raw in raws:
        try:
            rec = json.loads(raw) if raw else None
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append({"worker": rec.get("id"), "model": rec.get("model"), "canary": rec.get("canary")})
    return out, None


VALUE_FILE = "canary-value.json"  # written by `rta model canary-watch` (training/canary_judge.py)


def read_value(model_dir: str | Path, version: str | None) -> dict[str, Any] | None:
    """The canary watcher's newest judgement of `version`'s arms: per-arm value with intervals, the
    difference, the decision (None: no judgement of this canary yet)."""
    try:
        rec = json.loads((Path(model_dir) / VALUE_FILE).read_bytes())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and version is not None and rec.get("version") == version else None


def status(model_dir: str | Path, settings: Any | None) -> dict[str, Any]:
    """The canary in force, its audit trail, and per-arm counts summed over the live workers."""
    from model import bundle, registry

    root = Path(model_dir)
    try:
        state, problem = read_canary(root), None
    except BundleError as exc:
        state, problem = None, str(exc)
    workers, redis_problem = fleet_arms(settings) if settings is not None else ([], "no settings")
    arms: dict[str, dict[str, float]] = {}
    for w in workers:
        c = w.get("canary") or {}
        if state is None or c.get("version") != state.version:
            continue
        for name, a in (c.get("arms") or {}).items():
            t = arms.setdefault(name, {"rows": 0, "blocked": 0, "nan": 0})
            for k in t:
                t[k] += int(a.get(k) or 0)
    for a in arms.values():
        a["block_share"] = a["blocked"] / a["rows"] if a["rows"] else None
        a["bad_share"] = a["nan"] / a["rows"] if a["rows"] else None
    trail = [e for e in registry.read_log(root) if str(e.get("action", "")).startswith("canary")]
    return {"canary": None if state is None else asdict(state), "problem": problem,
            "current": bundle.current_version(root), "arms": arms,
            "value": read_value(root, None if state is None else state.version),
            "workers": workers, "redis_problem": redis_problem, "last": trail[-1] if trail else None}


def _cli() -> Any:
    import click

    @click.command("canary")
    @click.argument("version", required=False)
    @click.option("--model-dir", required=True, type=click.Path(path_type=Path),
                  help="Model directory: <model_dir>/<version>/ bundles, `current` and canary.json.")
    @click.option("--share", type=float, default=None, help="Share of requests (by request_id hash) the "
                  "candidate decides, in (0, 1).")
    @click.option("--stop", "stop_", is_flag=True, help="Stop the canary in force (current decides all traffic).")
    @click.option("--reason", default=None, help="Why (required to start or stop; kept in the audit trail).")
    @click.option("--who", default=None, help="Who (default: $USER).")
    @click.option("--audit-topic/--no-audit-topic", default=True, show_default=True,
                  help="Record on the Kafka audit topic first (no change without its acknowledgement).")
    @click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None, help="Config file.")
    @click.option("--redis-url", default=None, help="Redis URL (per-arm counts of the live workers).")
    @click.option("--redis-prefix", default=None, help="Key prefix of this deployment (default rta).")
    def canary_cmd(version: str | None, model_dir: Path, share: float | None, stop_: bool, reason: str | None,
                   who: str | None, audit_topic: bool, config_file: str | None, redis_url: str | None,
                   redis_prefix: str | None) -> None:
        """Canary rollout: `VERSION --share S --reason R` starts one, `--stop --reason R` ends it,
        `status` prints the canary in force and its per-arm counts (JSON)."""
        import getpass

        from stream.config import load_settings
        from stream.operators import produce_audit

        settings = load_settings(config_file, redis_url=redis_url, redis_prefix=redis_prefix)
        who = who or os.environ.get("USER") or getpass.getuser()
        audit = (lambda entry: produce_audit(settings, entry, key=b"model")) if audit_topic else None
        if version == "status" and not stop_:
            click.echo(json.dumps(status(model_dir, settings), default=str))
            return
        if not reason or not reason.strip():
            raise click.UsageError("canary needs --reason TEXT (kept in the audit trail)")
        if stop_:
            if version is not None:
                raise click.UsageError("--stop takes no VERSION (it stops the canary in force)")
            entry = stop(model_dir, who, reason, audit)
            if entry is None:
                raise ConfigError(f"{model_dir}: no canary in force")
            click.echo(f"[rta model] canary {entry['new']} stopped: {entry['old']} decides all traffic", err=True)
            click.echo(json.dumps(entry))
            return
        if version is None or share is None:
            raise click.UsageError("canary VERSION --share S --reason R (or --stop, or status)")
        if not 0.0 < share < 1.0:
            raise click.BadParameter(f"must be in (0, 1), got {share:g}", param_hint="--share")
        entry = start(model_dir, version, share, who, reason, audit)
        click.echo(f"[rta model] canary {version} decides {share:.2%} of requests beside {entry['old']}", err=True)
        click.echo(json.dumps(entry))

    return canary_cmd


canary_cmd = _cli()
