"""What the control plane does, framework-free: the HTTP routes (control/app.py) only call this.

- Targets: read, and change through the same store call `rta ratio set` makes
  (``RedisStore.update_targets``: validated, ``max_step`` on r, the audit topic acknowledged
  first, then targets + audit entry written atomically). ``expected_version`` is checked inside
  that WATCHed transaction (``before_write``), so of two operators working from the same version
  the second gets a conflict instead of silently overwriting the first.
- Fleet: each worker's status record (``stream.status``) + the live targets + the served model.
- Series: a sampler thread reads the window's newest seconds from Redis once a second into an
  in-memory ring (per-second block / uncertain / explore shares, the targets in force at that
  second from the audit trail, the fleet's thresholds). It reads Redis only: no work for workers.
- Models: list / show through model.registry; promote and rollback run `rta model promote|rollback`
  as a subprocess (their logic and the gate live in training/, which the control plane does not
  import), promote as a background job whose JSON result (the gate's verdict) is kept.
- Reports: a read-only listing of a reports directory; a path outside it is refused.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import logging
import math
import os
import subprocess
import sys
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model import bundle, registry
from stream.config import Settings, redact
from stream.errors import BundleError, ConfigError, InfeasibleTargets, RtaError
from stream.operators import produce_audit
from stream.policy import check_targets
from stream.status import status_pattern
from stream.window import N_COUNTS, RedisStore, StoreUnavailable, counts_dict

log = logging.getLogger("rta.control")

REPORT_SUFFIXES = {".json", ".md", ".png", ".csv", ".html", ".txt", ".svg"}


class Conflict(RtaError):
    """The targets moved since the version the caller decided against (HTTP 409)."""


class NotFound(RtaError):
    """No such model version, job or report (HTTP 404)."""


class Unavailable(RtaError):
    """Redis or the audit topic did not answer (HTTP 503)."""


def _finite(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and math.isfinite(v) else None


@dataclass
class Job:
    """A background `rta model promote`: its state and, when done, its JSON result."""

    id: str
    kind: str
    who: str
    args: list[str]
    state: str = "running"  # running | done | failed
    started_ms: int = field(default_factory=lambda: int(time.time() * 1000))
    ended_ms: int | None = None
    exit_code: int | None = None
    result: Any = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("id", "kind", "who", "state", "started_ms", "ended_ms",
                                               "exit_code", "result", "error")}


class ControlService:
    """The control plane's operations over Redis, the audit topic and the model directory."""

    def __init__(self, settings: Settings, store: RedisStore, reports_dir: str | Path | None = None,
                 ring_seconds: int = 3600, audit_topic: bool = True,
                 private: Iterable[str | Path] = ()) -> None:
        """``private``: files never listed or served as reports (the token file, should it sit
        inside the reports directory)."""
        self.settings = settings
        self.store = store
        self.reports_dir = Path(reports_dir) if reports_dir else None
        self.private = {Path(p).resolve() for p in private}
        self._write_lock = threading.Lock()  # one target change at a time (set_targets)
        self.audit_topic = audit_topic
        self.ring_seconds = int(ring_seconds)
        self.ring: OrderedDict[int, dict[str, Any]] = OrderedDict()
        self._ring_lock = threading.Lock()
        self._changes: list[tuple[int, dict[str, float]]] = []  # (ts_ms, targets) from the audit list
        self._changes_version = -1
        self.sampler_errors = 0
        self._sampler_logged: set[str] = set()
        self.samples = 0
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.job_timeout_s = 3600.0  # a promote's gate reads logs: long, but never forever
        self.rollback_timeout_s = 120.0
        self._model_change = threading.Lock()  # one promote or rollback at a time
        self._running: Job | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- targets --------------------------------------------------------------------------------

    def targets(self) -> dict[str, Any]:
        """Live targets, their version and who set them last."""
        t, meta = self._redis(self.store.get_targets)
        return {"targets": t.to_dict() if t else None, "version": int(meta.get("version", 0) or 0),
                "updated_ms": int(meta["updated_ms"]) if meta.get("updated_ms") else None,
                "updated_by": meta.get("who")}

    def set_targets(self, who: str, body: Any) -> dict[str, Any]:
        """Change the targets (see the module docstring). ``who`` is the authenticated name."""
        req = _target_request(body)
        check_targets(req["r"] if req["r"] is not None else 0.0, req["p_u"] or 0.0, req["epsilon"] or 0.0)
        expected = req["expected_version"]

        def before_write(entry: dict[str, Any]) -> None:
            if entry["version"] - 1 != expected:
                raise Conflict(f"targets are at version {entry['version'] - 1}, not {expected}: someone "
                               "changed them meanwhile; reload and decide again")
            entry["via"] = "rta control"
            if self.audit_topic:
                why = produce_audit(self.settings, entry)
                if why is not None:
                    raise Unavailable(f"audit topic {self.settings.topic('audit')} not written ({redact(why)}); "
                                      "targets NOT changed")

        # One change at a time from this process: the audit record is produced before the WATCHed
        # EXEC, so two changes racing from one version would both reach the topic while only one
        # lands (the loser's retry then ends in Conflict). Serialised here, the loser reads the
        # moved version and is refused before producing anything. (`rta ratio set` from elsewhere
        # can still race one change: docs/operations.md.)
        with self._write_lock:
            return self._redis(lambda: self.store.update_targets(
                who, req["reason"], req["r"], req["p_u"], req["epsilon"],
                max_step=self.settings.ratio_max_step, before_write=before_write))

    def audit(self, n: int = 50) -> list[dict[str, Any]]:
        """Newest-first target changes (the Redis audit list; the topic is the durable copy)."""
        return self._redis(lambda: self.store.history(n))

    # --- fleet ----------------------------------------------------------------------------------

    def workers(self) -> list[dict[str, Any]]:
        """Every live worker's status record (stream.status), oldest id first."""
        def run() -> list[Any]:
            keys = sorted(self.store.r.scan_iter(match=status_pattern(self.store.prefix), count=500))
            return self.store.r.mget(keys) if keys else []

        out = []
        for raw in self._redis(lambda: self.store._call(run)):
            try:
                rec = json.loads(raw) if raw else None
            except ValueError:
                continue  # one bad record must not hide the fleet
            if isinstance(rec, dict):
                out.append(rec)
        return sorted(out, key=lambda r: str(r.get("id")))

    def fleet(self) -> dict[str, Any]:
        now_ms = int(time.time() * 1000)
        workers = self.workers()
        for w in workers:
            ts = w.get("ts_ms")
            w["last_seen_s"] = round((now_ms - ts) / 1000, 1) if isinstance(ts, int) else None
        models = sorted({str(w.get("model")) for w in workers if w.get("model")})
        current = None
        with contextlib.suppress(OSError, BundleError):
            current = bundle.current_version(self.settings.model_dir)
        return {**self.targets(), "workers": workers, "models": models, "mixed_models": len(models) > 1,
                "registry_current": current, "now_ms": now_ms}

    # --- series ---------------------------------------------------------------------------------

    def _target_at(self, sec: int) -> dict[str, float] | None:
        i = bisect.bisect_right([c[0] for c in self._changes], sec * 1000 + 999) - 1
        return self._changes[i][1] if i >= 0 else None

    def _refresh_changes(self, version: int) -> None:
        if version == self._changes_version:
            return
        rows = self.store.history(200)
        self._changes = sorted((int(r["ts_ms"]), r["new"]) for r in rows
                               if isinstance(r, dict) and isinstance(r.get("ts_ms"), int) and isinstance(r.get("new"), dict))
        self._changes_version = version

    def sample(self, now: float | None = None, back: int = 5) -> None:
        """One sampler tick: the newest ``back`` seconds of the window into the ring."""
        now = time.time() if now is None else now
        sec = int(now)
        seconds = list(range(sec - back + 1, sec + 1))
        snap = self.store.read(seconds)
        self._refresh_changes(snap.targets_version)
        live = [w for w in self.workers() if not w.get("degraded")]
        thetas = [w["theta"] for w in live if _finite(w.get("theta")) is not None]
        taus = [w["tau_u"] for w in live if _finite(w.get("tau_u")) is not None]
        current = snap.targets.to_dict() if snap.targets else None
        with self._ring_lock:
            for s in seconds:
                vec = snap.buckets.get(s)
                if vec is None:
                    continue
                c = counts_dict(vec[:N_COUNTS])
                total = c["total"]
                rec = self.ring.get(s, {})
                rec.update({"t": s, "total": total,
                            "block": c["blocked"] / total if total else None,
                            "uncertain": c["uncertain"] / total if total else None,
                            "explore": c["explore"] / total if total else None,
                            "targets": self._target_at(s) or current})
                if "theta" not in rec or s == sec:
                    rec["theta"] = sum(thetas) / len(thetas) if thetas else None
                    rec["tau_u"] = sum(taus) / len(taus) if taus else None
                self.ring[s] = rec
            for s in sorted(self.ring):
                if s > sec - self.ring_seconds:
                    break
                del self.ring[s]
            self.ring = OrderedDict(sorted(self.ring.items()))
        self.samples += 1

    def series(self, seconds: int = 300) -> dict[str, Any]:
        """The ring's newest ``seconds`` seconds, as columns (what the page's charts take)."""
        with self._ring_lock:
            rows = [r for s, r in self.ring.items() if s > int(time.time()) - seconds]
        cols: dict[str, list[Any]] = {k: [] for k in ("t", "total", "block", "uncertain", "explore", "r",
                                                       "p_u", "epsilon", "theta", "tau_u")}
        for r in rows:
            t = r.get("targets") or {}
            for k in ("t", "total", "block", "uncertain", "explore", "theta", "tau_u"):
                cols[k].append(r.get(k))
            for k in ("r", "p_u", "epsilon"):
                cols[k].append(t.get(k))
        return {"seconds": seconds, "ring_seconds": self.ring_seconds, "samples": self.samples,
                "sampler_errors": self.sampler_errors, "series": cols}

    def _tick(self, back: int = 5) -> None:
        """One sampler tick that never ends the sampler: a Redis outage or an odd reply (a
        malformed bucket, a bad record) is counted, logged once per kind, and the next tick
        retries. A dead sampler would freeze the page's charts with no sign of it."""
        try:
            self.sample(back=back)
        except Exception as exc:  # noqa: BLE001 - the sampler must outlive any one reply
            self.sampler_errors += 1
            kind = type(exc).__name__
            if kind not in self._sampler_logged:
                self._sampler_logged.add(kind)
                log.warning("series sampler: %s: %s (counted in /healthz sampler_errors; retrying)",
                            kind, redact(str(exc).splitlines()[0] if str(exc) else kind))

    def start(self, interval: float = 1.0) -> None:
        """Run the sampler in a daemon thread (stopped by ``stop()``); a second call is a no-op."""
        if self._thread is not None and self._thread.is_alive():
            return

        def loop() -> None:
            self._tick(back=min(self.ring_seconds, 110))  # back-fill what Redis still holds
            while not self._stop.wait(interval):
                self._tick()

        self._thread = threading.Thread(target=loop, name="rta-control-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    # --- models ---------------------------------------------------------------------------------

    def models(self) -> dict[str, Any]:
        """Every version (registry.summary); a model directory not created yet lists none."""
        if not Path(self.settings.model_dir).is_dir():
            return {"current": None, "versions": [], "note": f"{self.settings.model_dir}: no such model directory"}
        return {"current": bundle.current_version(self.settings.model_dir),
                "versions": registry.summary(self.settings.model_dir)}

    def canary(self) -> dict[str, Any]:
        """The canary in force, its per-arm counts over the live workers and the watcher's newest
        value judgement (`rta model canary status`'s JSON: stream.canary.status)."""
        from stream.canary import status

        return status(self.settings.model_dir, self.settings)

    def model(self, version: str) -> dict[str, Any]:
        try:
            path = registry.version_dir(self.settings.model_dir, version)
            m = bundle.read_manifest(path)
        except (BundleError, ConfigError) as exc:
            raise NotFound(str(exc)) from None
        return {"version": version, "current": bundle.current_version(self.settings.model_dir) == version,
                "created_at": m.get("created_at"), "tasks": m.get("tasks"),
                "feature_fingerprint": (m.get("feature_spec") or {}).get("fingerprint"),
                "lineage": registry.lineage(path), "metrics": m.get("metrics"),
                "gate": registry.read_gate(path), "serving": m.get("serving"),
                "switches": [e for e in registry.read_log(self.settings.model_dir)
                             if version in (e.get("new"), e.get("old"))]}

    def _rta_model(self, args: list[str]) -> list[str]:
        return [sys.executable, "-m", "infra.cli", "model", *args]

    def _env(self) -> dict[str, str]:
        """The child's settings: ours (so it writes the same audit topic and model dir)."""
        s = self.settings
        env = dict(os.environ)
        env.update({"RTA_KAFKA_BOOTSTRAP": s.kafka_bootstrap, "RTA_REDIS_URL": s.redis_url,
                    "RTA_REDIS_PREFIX": s.redis_prefix, "RTA_MODEL_DIR": str(s.model_dir),
                    **{f"RTA_TOPIC_{role.upper()}": name for role, name in s.topics.items()}})
        return env

    def promote(self, who: str, body: Any) -> Job:
        """Start `rta model promote VERSION` (the gate, then the audited switch) in the background."""
        if not isinstance(body, dict):
            raise ConfigError("body must be a JSON object")
        version, reason = body.get("version"), body.get("reason")
        logs, force = body.get("logs"), body.get("force", False)
        if not isinstance(version, str) or not version:
            raise ConfigError("'version' must be a non-empty string")
        if not isinstance(reason, str) or not reason.strip():
            raise ConfigError("'reason' must be a non-empty string (kept in the audit trail)")
        if logs is not None and not isinstance(logs, str):
            raise ConfigError("'logs' must be a path string")
        if not isinstance(force, bool):
            raise ConfigError("'force' must be true or false")
        self.model(version)  # 404 before a job is started
        args = ["promote", version, "--model-dir", str(self.settings.model_dir), "--reason", reason, "--who", who]
        if logs:
            args += ["--logs", logs]
        if force:
            args.append("--force")
        if not self.audit_topic:
            args.append("--no-audit-topic")
        job = Job(uuid.uuid4().hex[:12], "promote", who, args)
        self._begin_model_change(job)
        self.jobs[job.id] = job
        while len(self.jobs) > 100:
            self.jobs.popitem(last=False)  # only finished ones: one job runs at a time
        try:
            threading.Thread(target=self._run_job, args=(job,), name=f"rta-control-job-{job.id}",
                             daemon=True).start()
        except RuntimeError:
            self._end_model_change()
            raise
        return job

    def _begin_model_change(self, job: Job | None) -> None:
        """Take the one model-change slot, or Conflict: two gates racing to switch `current`, or a
        rollback under a running promote, would leave the fleet on whichever finished last."""
        if not self._model_change.acquire(blocking=False):
            running = self._running
            if running is None:
                raise Conflict("a rollback is running; try again when it has ended")
            raise Conflict(f"promote job {running.id} (by {running.who}) is running; wait for it "
                           f"(GET /api/v1/jobs/{running.id})")
        self._running = job

    def _end_model_change(self) -> None:
        self._running = None
        self._model_change.release()

    def _run_job(self, job: Job) -> None:
        """Run the child to its end; whatever happens the job ends (state done or failed) and
        frees the model-change slot."""
        state, error, exit_code, result = "failed", None, None, None
        try:
            proc = subprocess.run(self._rta_model(job.args), env=self._env(), capture_output=True, text=True,
                                  errors="replace", timeout=self.job_timeout_s)
            exit_code = proc.returncode
            lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
            with contextlib.suppress(ValueError):
                result = json.loads(lines[-1]) if lines else None
            err = [ln for ln in proc.stderr.splitlines() if ln.strip()]
            error = None if proc.returncode == 0 else (err[-1] if err else f"exit {proc.returncode}")
            state = "done" if proc.returncode in (0, 3, 4) else "failed"  # 3: refused, 4: inconclusive
        except subprocess.TimeoutExpired:
            error = f"timed out after {self.job_timeout_s:g} s (the child was killed; `current` is as the registry says)"
        except Exception as exc:  # noqa: BLE001 - the job must end, whatever failed
            error = f"{type(exc).__name__}: {redact(str(exc))}"
            log.warning("promote job %s: %s", job.id, error)
        finally:
            job.exit_code, job.result, job.error = exit_code, result, error
            job.ended_ms = int(time.time() * 1000)
            job.state = state  # last: a reader that sees the end sees all of it
            self._end_model_change()

    def job(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r}")
        return job

    def rollback(self, who: str, body: Any) -> dict[str, Any]:
        """`rta model rollback` (the audited switch back along the registry's chain), synchronous."""
        if not isinstance(body, dict) or not isinstance(body.get("reason"), str) or not body["reason"].strip():
            raise ConfigError("body must be {\"reason\": \"...\"} (kept in the audit trail)")
        args = ["rollback", "--model-dir", str(self.settings.model_dir), "--reason", body["reason"], "--who", who]
        if not self.audit_topic:
            args.append("--no-audit-topic")
        self._begin_model_change(None)
        try:
            proc = subprocess.run(self._rta_model(args), env=self._env(), capture_output=True, text=True,
                                  errors="replace", timeout=self.rollback_timeout_s)
        except subprocess.TimeoutExpired:
            raise Unavailable(f"rollback timed out after {self.rollback_timeout_s:g} s (the child was killed); "
                              "check `current` (GET /api/v1/models)") from None
        except OSError as exc:
            raise Unavailable(f"rollback could not start: {exc.strerror or exc}") from None
        finally:
            self._end_model_change()
        if proc.returncode != 0:
            err = [ln for ln in proc.stderr.splitlines() if ln.strip()]
            raise ConfigError((err[-1] if err else f"rollback failed (exit {proc.returncode})").removeprefix("rta: "))
        return {"message": proc.stdout.strip(), "current": bundle.current_version(self.settings.model_dir)}

    # --- reports --------------------------------------------------------------------------------

    def _reports_root(self) -> Path:
        if self.reports_dir is None or not self.reports_dir.is_dir():
            raise NotFound("no reports directory configured (rta control serve --reports-dir)")
        return self.reports_dir.resolve()

    def reports(self) -> list[dict[str, Any]]:
        """Report files under the reports directory (relative paths, size, mtime); symlinks skipped."""
        if self.reports_dir is None or not self.reports_dir.is_dir():
            return []
        root = self._reports_root()
        out = []
        for p in sorted(root.rglob("*")):
            if (p.is_symlink() or not p.is_file() or p.suffix.lower() not in REPORT_SUFFIXES
                    or p.resolve() in self.private):
                continue
            st = p.stat()
            out.append({"path": p.relative_to(root).as_posix(), "bytes": st.st_size, "mtime_ms": int(st.st_mtime * 1000)})
        return out[:5000]

    def report(self, rel: str) -> Path:
        """The file at ``rel`` inside the reports directory; anything outside it is NotFound."""
        root = self._reports_root()
        if not rel or "\x00" in rel or rel.startswith("/"):
            raise NotFound(f"no report {rel!r}")
        path = (root / rel).resolve()
        if (not path.is_relative_to(root) or not path.is_file() or path.suffix.lower() not in REPORT_SUFFIXES
                or path in self.private):
            raise NotFound(f"no report {rel!r}")
        return path

    # --- health ---------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        try:
            self.store._call(self.store.r.ping)
            redis_ok = True
        except StoreUnavailable:
            redis_ok = False
        return {"ok": redis_ok, "redis": "ok" if redis_ok else "unreachable", "samples": self.samples,
                "sampler_errors": self.sampler_errors}

    def _redis(self, fn: Any) -> Any:
        try:
            return fn()
        except StoreUnavailable as exc:
            raise Unavailable(f"redis at {redact(self.settings.redis_url)}: {exc}") from None


def _target_request(body: Any) -> dict[str, Any]:
    """Validate a POST /targets body; one clear message for the first problem."""
    if not isinstance(body, dict):
        raise ConfigError("body must be a JSON object {r, p_u?, epsilon?, reason, expected_version}")
    unknown = set(body) - {"r", "p_u", "epsilon", "reason", "expected_version"}
    if unknown:
        raise ConfigError(f"unknown field(s): {', '.join(sorted(unknown))}")
    out: dict[str, Any] = {}
    for k in ("r", "p_u", "epsilon"):
        v = body.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v)):
            raise InfeasibleTargets(f"'{k}' must be a finite number, got {v!r}")
        out[k] = None if v is None else float(v)
    if out["r"] is None:
        raise ConfigError("'r' is required")
    reason = body.get("reason")
    if not isinstance(reason, str) or not reason.strip():
        raise ConfigError("'reason' must be a non-empty string (kept in the audit trail)")
    ev = body.get("expected_version")
    if isinstance(ev, bool) or not isinstance(ev, int) or ev < 0:
        raise ConfigError("'expected_version' must be the integer version the change was decided against")
    out["reason"], out["expected_version"] = reason.strip()[:500], ev
    return out
