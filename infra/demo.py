"""`rta demo`: the whole loop on the embedded default, in one command.

Stack up (or reuse a configured one) -> synthetic world -> `rta train` v1 -> a worker (`rta
serve`), the logger (`rta log`) and the downstream simulator (`rta world outcomes`), each its own
process -> fresh requests in phases: warm-up, r1, r2 after an operator's live `rta ratio set`, then
a new source (docs/world.md) that v1 has never seen -> `rta retrain --canary` trains v2 from the logs
only (the world's truth is read by the simulator and this summary, never by training), gates it
off-policy and starts a canary: v2 decides half of the requests for a few seconds, then `rta model
promote` judges it on the two arms' own outcomes -> the worker reloads `current` -> the same
scenario under v2. The summary, read back from the
decisions topic: throughput, block share per phase against its target, the deals kept against an
oracle that knows the world's true probabilities, and the loop (before/after, gate, churn).

Every run uses its own topic and Redis key prefix, so a reused stack never mixes runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np
import orjson

from stream.config import Settings, load_settings, redact
from stream.errors import RtaError, StackError


@dataclass
class Phase:
    """One streaming phase: a target and the requests sent under it."""

    name: str
    r: float
    truth: Path
    started_at: float = 0.0


def _say(msg: str) -> None:
    click.secho(f"[demo] {msg}", fg="cyan", err=True)


def _answers(settings: Settings) -> bool:
    from infra.stack import wait_kafka, wait_redis

    try:
        wait_kafka(settings.kafka_bootstrap, timeout=3.0)
        wait_redis(settings.redis_url, timeout=3.0)
    except StackError:
        return False
    return True


@contextlib.contextmanager
def _stack(settings: Settings, state_dir: Path):
    """Use the configured stack when it answers; else start an embedded one owned by the demo."""
    if _answers(settings):
        _say(f"using the running stack: kafka {settings.kafka_bootstrap}, redis {redact(settings.redis_url)}")
        yield settings
        return
    from infra.stack import Embedded

    kafka, redis = Embedded("kafka", log_dir=state_dir), Embedded("redis", log_dir=state_dir)
    try:
        kafka.start()
        redis.start()
        _say(f"started embedded broker {kafka.address} and Redis {redis.address}")
        from dataclasses import replace

        yield replace(settings, kafka_bootstrap=kafka.address, redis_url=redis.address)
    finally:
        for part in (kafka, redis):
            with contextlib.suppress(StackError):
                part.stop()
        _say("embedded stack stopped")


def _run(argv: list[str], env: dict[str, str]) -> None:
    """Run an `rta` verb in a child process, its progress on our terminal."""
    cmd = [sys.executable, "-m", "infra.cli", *argv]
    proc = subprocess.run(cmd, env=env, check=False)
    if proc.returncode != 0:
        raise RtaError(f"demo step `rta {' '.join(argv)}` failed with exit code {proc.returncode}")


def _child_env(settings: Settings, model_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "RTA_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "RTA_REDIS_URL": settings.redis_url,
        "RTA_REDIS_PREFIX": settings.redis_prefix,
        "RTA_MODEL_DIR": str(model_dir),
        "PYTHONUNBUFFERED": "1",
    })
    env.update({f"RTA_TOPIC_{role.upper()}": name for role, name in settings.topics.items()})
    return env


@contextlib.contextmanager
def _control_plane(env: dict[str, str], workdir: Path):
    """`rta control serve` beside the demo (the live status page); yields its URL, or None when
    the control extra is not installed or it does not start (the demo goes on without it)."""
    from infra.stack import free_port, wait_control

    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    tokens = workdir / "control-tokens.json"
    proc = subprocess.Popen([sys.executable, "-m", "infra.cli", "control", "serve", "--port", str(port),
                             "--tokens", str(tokens), "--reports-dir", str(workdir)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_control(url, 20.0)
        _say(f"status page: {url}  (a token: rta control token add --role viewer --name NAME --tokens {tokens})")
        yield url
    except StackError:
        _say("status page not started (needs the control extra: pip install 'rta-filter[control]')")
        yield None
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


class _Reader:
    """The decisions topic read once from the start, kept open: the demo reads what it has while
    v2 trains (its own process is idle then) and only the rest at the end."""

    def __init__(self, settings: Settings) -> None:
        from stream.kafka import make_consumer

        self.consumer = make_consumer(settings, f"demo-reader-{os.getpid()}-{time.time_ns()}")
        self.consumer.subscribe([settings.topic("decisions")])
        self.got: dict[str, dict[str, Any]] = {}
        import threading

        self.stop = threading.Event()  # ends a read running in another thread

    def until(self, want: set[str], timeout: float) -> dict[str, dict[str, Any]]:
        """Read decisions until every wanted request_id has one (or time runs out)."""
        deadline = time.monotonic() + timeout
        while len(want - self.got.keys()) and time.monotonic() < deadline and not self.stop.is_set():
            for msg in self.consumer.consume(5000, 0.5):
                if msg.error() is None:
                    d = orjson.loads(msg.value())
                    self.got.setdefault(d["request_id"], d)
        return self.got

    def close(self) -> None:
        self.consumer.close()


def _ids(phases: list[Phase]) -> set[str]:
    import pyarrow.parquet as pq

    want: set[str] = set()
    for phase in phases:
        want.update(pq.read_table(phase.truth, columns=["request_id"]).column(0).to_pylist())
    return want


def _phase_summary(phase: Phase, decisions: dict[str, dict[str, Any]], settle: float) -> dict[str, Any]:
    """Block share after settling, and deals kept vs an oracle blocking the same share."""
    import pyarrow.parquet as pq

    truth = pq.read_table(phase.truth).to_pydict()
    ids = truth["request_id"]
    have = np.array([rid in decisions for rid in ids])
    block = np.array([decisions.get(rid, {}).get("decision") == "block" for rid in ids])
    reasons = [decisions[rid]["reason"] for rid in ids if rid in decisions]
    latency = _latency([decisions[rid] for rid in ids if rid in decisions])
    p_deal = np.asarray(truth["true_deal"], dtype=np.float64)
    tail = slice(int(len(ids) * settle), None)  # after the controller settled
    share_all = float(block[have].mean()) if have.any() else float("nan")
    share_tail = float(block[tail][have[tail]].mean()) if have[tail].any() else float("nan")
    # Oracle: knows true_deal, blocks the same share of requests, lowest expected deals first.
    k = int(round(block.sum()))
    oracle_blocked_deals = float(np.sort(p_deal)[:k].sum())
    total = float(p_deal.sum())
    kept = 1.0 - float(p_deal[block].sum()) / total
    oracle_kept = 1.0 - oracle_blocked_deals / total
    random_kept = 1.0 - k / max(len(ids), 1)
    return {
        "phase": phase.name, "target_r": phase.r, "requests": len(ids),
        "decided": int(have.sum()),
        "block_share": round(share_all, 4), "block_share_settled": round(share_tail, 4),
        "error_pp_settled": round(100 * (share_tail - phase.r), 2),
        "reasons": {r: reasons.count(r) for r in sorted(set(reasons))},
        "expected_deals": round(total, 1),
        "deals_kept": round(kept, 4), "deals_kept_oracle": round(oracle_kept, 4),
        "deals_kept_random": round(random_kept, 4),
        **({"latency_ms": latency} if latency else {}),
    }


def _latency(decisions: list[dict[str, Any]]) -> dict[str, float]:
    """p50/p99 of request->decision latency (ms) and how many decisions carried one; empty when
    none did."""
    lat = np.array([d["latency_ms"] for d in decisions if d.get("latency_ms") is not None], dtype=np.float64)
    if not lat.size:
        return {}
    return {"p50": round(float(np.percentile(lat, 50)), 1), "p99": round(float(np.percentile(lat, 99)), 1),
            "n": int(lat.size)}


# The loop's world: a partner integration sending 10% of the traffic, logged in coarser units
# (docs/world.md "New source"): a high-intent source the first model never saw.
NEW_SOURCE = {"new_source_from": 0.0, "new_source_share": 0.10, "new_source_units": "smaller"}
# The demo's downstream runs TIME_SCALE x faster than real time (a 5-minute deal after 0.5 s),
# so its attribution windows are as much shorter; every child reads them from $RTA_ATTRIBUTION.
TIME_SCALE = 600.0
ATTRIBUTION = "click=1s,online=2s,cart=4s,deal=6s"
# The newest logged traffic the gate judges on: longer than the 6 s deal window, so that ~12 s
# of it (36k requests, ~1800 explore rows at epsilon 0.05, ~25 deal positives expected) have
# their windows closed: the gate wants 10 deal positives in the explore sample before it trusts
# an estimate (a 14 s window held 9 and 10 in two runs: too close).
HOLDOUT_S = 18.0
EPSILON = 0.05  # the explore slice: what the loop learns the blocked traffic from, and the gate judges by
# v2, once the off-policy gate passes it, first decides half of the requests (by request_id hash)
# for CANARY_S seconds beside v1; `rta model promote --evidence canary` then judges it on the two
# arms' own matured outcomes (its deal windows, 6 s, close while the logger catches up).
CANARY_SHARE = 0.5
CANARY_S = 8.0


def _new_source_summary(phase: Phase, decisions: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The new source's share of the phase and the share of its expected deals the filter kept."""
    import pyarrow.parquet as pq

    t = pq.read_table(phase.truth, columns=["request_id", "true_deal", "true_source"]).to_pydict()
    new = np.array([s == "new" for s in t["true_source"]])
    block = np.array([decisions.get(r, {}).get("decision") == "block" for r in t["request_id"]])
    p = np.asarray(t["true_deal"], np.float64)
    kept = 1.0 - float(p[new & block].sum()) / max(float(p[new].sum()), 1e-12)
    return {"new_source_requests": int(new.sum()), "new_source_block_share": round(float(block[new].mean()), 4),
            "new_source_deals_kept": round(kept, 4)}


def _models(phase: Phase, decisions: dict[str, dict[str, Any]]) -> dict[str, int]:
    import pyarrow.parquet as pq

    ids = pq.read_table(phase.truth, columns=["request_id"]).column(0).to_pylist()
    models = [decisions[r].get("model", "?") for r in ids if r in decisions]
    return {m: models.count(m) for m in sorted(set(models))}


def _logged_rows(log_dir: Path) -> int:
    """Impression rows the logger has renamed into place so far."""
    import pyarrow.parquet as pq

    files = [f for f in (log_dir / "impressions").rglob("*.parquet") if not f.name.startswith((".", "_"))]
    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


def _wait_logged(log_dir: Path, want: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    n = _logged_rows(log_dir)
    while n < want and time.monotonic() < deadline:
        time.sleep(0.5)
        n = _logged_rows(log_dir)
    return n


def _retrain(env: dict[str, str], log_dir: Path, model_dir: Path, profile: str, holdout_s: float,
             since_s: float) -> dict[str, Any]:
    """v2 from the logs only, through `rta retrain` (train from current -> gate -> promote), its
    one JSON line parsed. `rta retrain` is the registry's verb (contract of issue 11, item 4)."""
    return _answer(env, ["retrain", "--logs", str(log_dir), "--model-dir", str(model_dir),
                         "--since-hours", f"{since_s / 3600:.6f}", "--holdout-hours", f"{holdout_s / 3600:.6f}",
                         "--profile", profile, "--version", "v2", "--attribution", ATTRIBUTION, "--quiet",
                         "--canary", str(CANARY_SHARE), "--reason", "rta demo: the new source, learnt from v1's logs"])


def _answer(env: dict[str, str], argv: list[str]) -> dict[str, Any]:
    """One `rta` step whose exit code is a gate's answer (0, 3, 4) and whose stdout's last line is
    its JSON; anything else is the demo's error."""
    proc = subprocess.run([sys.executable, "-m", "infra.cli", *argv], env=env, check=False, stdout=subprocess.PIPE,
                          text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip().startswith("{")]
    if proc.returncode not in (0, 3, 4) or not lines:  # promoted, refused, inconclusive: answers
        raise RtaError(f"demo step `rta {' '.join(argv)}` failed with exit code {proc.returncode}")
    return json.loads(lines[-1])


def _end_canary(env: dict[str, str], log_dir: Path, model_dir: Path, version: str) -> dict[str, Any]:
    """The canary judged on its own arms (`rta model promote --evidence canary`): promoted, or
    refused (the canary stops; v1 serves on), or inconclusive at this short a canary: then v2,
    which neither the off-policy gate nor its arms refused, is promoted, audited as forced with
    the canary's evidence attached (the demo's story needs v2 serving; a deployment would let the
    canary run until it decides)."""
    base = ["model", "promote", version, "--model-dir", str(model_dir), "--logs", str(log_dir), "--evidence",
            "canary", "--attribution", ATTRIBUTION]
    judged = _answer(env, [*base, "--reason", "rta demo: judged on the canary's own arms"])
    gate = judged.get("gate") or {}
    out = {"decision": gate.get("decision"), "outcome": judged.get("outcome"), "promoted_on": None,
           "evidence": _canary_evidence(gate)}
    if judged.get("outcome") == "promoted":
        out["promoted_on"] = "canary"
    elif gate.get("decision") == "inconclusive":
        again = _answer(env, [*base, "--force", "--reason", "rta demo: neither the canary (inconclusive at this "
                                                            "sample) nor the off-policy gate refused v2"])
        out.update(outcome=again.get("outcome"), promoted_on="forced: the canary and the off-policy gate did not "
                                                             "refuse it")
    else:
        _answer(env, ["model", "canary", "--stop", "--model-dir", str(model_dir), "--reason",
                      "rta demo: refused on the canary's own arms"])
    return out


def _serving_canary(settings: Settings, version: str, timeout: float) -> bool:
    """Wait until a live worker's status record says it serves `version` as a canary (it follows
    canary.json at its reload cadence), so the canary's phase is the canary's from its start."""
    from stream.canary import fleet_arms

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        workers, _ = fleet_arms(settings)
        if any((w.get("canary") or {}).get("version") == version for w in workers):
            return True
        time.sleep(0.25)
    return False


def _canary_evidence(gate: dict[str, Any]) -> dict[str, Any] | None:
    """The canary judgement's figures for summary.json (value per arm, difference, interval, MDE)."""
    v, verdict = gate.get("value"), gate.get("verdict") or {}
    if not v:
        return None
    cur = v.get("current") or 0.0
    rel = (lambda x: None if x is None or not cur else round(x / cur, 4))  # noqa: E731
    ci = v.get("difference_ci") or [None, None]
    return {"rows": v.get("rows"), "arms": v.get("arms"), "difference_relative": rel(v.get("difference")),
            "difference_relative_ci": [rel(ci[0]), rel(ci[1])], "mde_relative": verdict.get("mde_relative"),
            "guard_rails": {t: g.get("state") for t, g in (verdict.get("guard_rails") or {}).items()},
            "why": verdict.get("why"), "more_traffic_factor": verdict.get("more_traffic_factor"),
            "period_ms": (gate.get("canary") or {}).get("period_ms"), "unit": v.get("unit")}


@click.command(name="demo")
@click.option("--rows", type=click.IntRange(min=10_000), default=200_000, show_default=True,
              help="Rows of logged traffic v1 is trained on.")
@click.option("--events", type=click.IntRange(min=2_000), default=60_000, show_default=True,
              help="Fresh requests streamed in phases 1 and 2 (the live change of r).")
@click.option("--loop-events", type=click.IntRange(min=2_000), default=78_000, show_default=True,
              help="Requests with the new source streamed while v1 serves (the logs v2 learns from); "
                   "as many again once v2 serves.")
@click.option("--rate", type=click.FloatRange(min=100), default=3_000.0, show_default=True,
              help="Offered load while streaming (events/s).")
@click.option("--ratios", default="0.3,0.5", show_default=True,
              help="Target block share r of phase 1 and phase 2 (changed live in between); the loop runs at the second.")
@click.option("--warmup-s", type=click.FloatRange(min=0), default=8.0, show_default=True,
              help="Seconds of traffic before phase 1 (worker joins, window fills); not judged.")
@click.option("--profile", type=click.Choice(["tiny", "loop", "demo", "paper"]), default="loop", show_default=True,
              help="Training profile of v1 and v2 (`loop`: the demo profile with a faster student).")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=Path(".rta/demo"),
              show_default=True, help="Where the world, the logs, the model bundles and the summary go.")
@click.option("--retrain/--reuse-model", default=False, show_default=True,
              help="Train v1 even when the workdir already holds a bundle.")
def demo(rows: int, events: int, loop_events: int, rate: float, ratios: str, warmup_s: float, profile: str,
         workdir: Path, retrain: bool) -> None:
    """Stack, world, train v1, serve, change r live, a new source appears, log what v1 let
    through, retrain v2 from those logs, gate and promote it, serve v2; summarise vs the oracle."""
    try:
        r1, r2 = (float(x) for x in ratios.split(","))
    except ValueError:
        raise click.BadParameter(f"expected two numbers like 0.3,0.5, got {ratios!r}",
                                 param_hint="'--ratios'") from None
    started = time.monotonic()
    timings: dict[str, float] = {}
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    run_id = f"demo{int(time.time())}"
    base = load_settings()
    settings = base.with_topic_prefix(run_id)
    from dataclasses import replace

    settings = replace(settings, redis_prefix=run_id)
    if retrain and (workdir / "models").exists():
        import shutil

        shutil.rmtree(workdir / "models")  # v1 again, and no v2 of an earlier run left as current
    model_dir = workdir / "models"
    log_dir, truth_live = workdir / "log" / run_id, workdir / "truth-live" / run_id

    def lap(name: str, since: float) -> float:
        timings[name] = round(time.monotonic() - since, 1)
        return time.monotonic()

    with _stack(settings, workdir) as settings, contextlib.ExitStack() as stack:
        from stream.kafka import ensure_topics, make_admin
        from stream.window import RedisStore

        ensure_topics(make_admin(settings), settings.topics.values(), settings.partitions)
        env = {**_child_env(settings, model_dir), "RTA_ATTRIBUTION": ATTRIBUTION}
        t = lap("stack", started)

        world_dir = workdir / "world"
        from model.bundle import current_version, read_manifest, resolve_bundle

        if current_version(model_dir) is None:
            _say(f"1/7 world: {rows} rows of logged traffic -> {world_dir}")
            _run(["world", "generate", "--rows", str(rows), "--seed", "7", "--out", str(world_dir)], env)
            t = lap("world", t)
            _say(f"2/7 train v1 ({profile} profile): teacher + SWAG + student + ONNX bundle")
            # no evaluation report here (its baselines take a minute): `rta eval --model v1` makes it
            _run(["train", "--logs", str(world_dir), "--out", str(model_dir), "--profile", profile,
                  "--version", "v1", "--no-report"], env)
            t = lap("train_v1", t)
        else:
            from model import registry

            _say(f"1-2/7 reusing v1 in {model_dir} (--retrain to train again)")
            for old in model_dir.glob("v2*"):  # an earlier run's v2: this run learns its own
                import shutil

                shutil.rmtree(old)
            registry.publish_trained(model_dir / "v1", "rta demo", "demo: reuse v1")
        bundle = resolve_bundle(model_dir)
        manifest = read_manifest(bundle)

        store = RedisStore.from_url(settings.redis_url, settings.redis_prefix)
        store.update_targets("rta demo", "demo phase 1", r=r1, p_u=0.02, epsilon=EPSILON)
        page = stack.enter_context(_control_plane(env, workdir))
        _say(f"3/7 serve: model {manifest['version']}, r={r1}, p_u=0.02, epsilon={EPSILON}; the logger and "
             f"the downstream simulator ({TIME_SCALE:.0f}x real time) record what it lets through")
        procs: dict[str, subprocess.Popen] = {}
        procs["worker"] = subprocess.Popen(
            [sys.executable, "-m", "infra.cli", "serve", "--group", f"{run_id}-workers",
             "--no-metrics", "--log-level", "warning"], env=env)
        procs["logger"] = subprocess.Popen(
            [sys.executable, "-m", "infra.cli", "log", "--out", str(log_dir), "--group", f"{run_id}-logger",
             "--roll-seconds", "1", "--batch-wait-ms", "20", "--no-metrics", "--log-level", "warning"], env=env)
        procs["outcomes"] = subprocess.Popen(
            [sys.executable, "-m", "infra.cli", "world", "outcomes", "--truth", str(truth_live),
             "--time-scale", str(TIME_SCALE), "--group", f"{run_id}-outcomes"], env=env,
            stdout=subprocess.DEVNULL)
        from training.world import WorldConfig
        from training.world_cli import stream_requests

        sent: list[dict[str, Any]] = []
        promotion: dict[str, Any] = {}
        canary_phase: Phase | None = None
        canary_end: dict[str, Any] | None = None

        def stream(phase: Phase, count: int, seed: int, config: WorldConfig | None = None) -> None:
            phase.started_at = time.time()
            _say(f"stream {phase.name}: {count} fresh requests at {rate:.0f}/s, target r={phase.r}")
            sent.append(stream_requests(settings, count, rate=rate, seed=seed, config=config,
                                        truth_out=phase.truth, truth_dir=truth_live, progress=True))
            for name, proc in procs.items():
                if proc.poll() is not None:
                    raise RtaError(f"the {name} exited with code {proc.returncode}; see its log above")

        try:
            half = events // 2
            # The warm-up phase lets the worker join its group and the window fill; it is
            # reported but not judged.
            phases = [Phase("warm-up", r1, workdir / "truth-0.parquet"),
                      Phase("phase 1", r1, workdir / "truth-1.parquet"),
                      Phase("phase 2", r2, workdir / "truth-2.parquet")]
            _say("4/7 v1 serves the known traffic; the operator changes r live")
            for i, (phase, count) in enumerate(zip(phases, [max(1000, int(rate * warmup_s)), half, half],
                                                   strict=True)):
                if i == 2:
                    store.update_targets("rta demo", "demo phase 2: budget changed", r=r2)
                    _say(f"operator: rta ratio set {r2} --reason 'demo phase 2' (live)"
                         + (f"; watch the fleet follow on {page}" if page else ""))
                stream(phase, count, 1000 + i)
            t = lap("serve_v1", t)
            ns = WorldConfig(**NEW_SOURCE)
            before = Phase("new source, v1", r2, workdir / "truth-3.parquet")
            _say(f"5/7 a new source appears ({NEW_SOURCE['new_source_share']:.0%} of traffic, its own ids "
                 "and units); v1 serves it")
            stream(before, loop_events, 1003, ns)
            phases.append(before)
            t = lap("new_source_v1", t)
            total = sum(s["sent"] for s in sent)
            logged = _wait_logged(log_dir, total, 60.0)
            time.sleep(1.0)  # the last outcomes of the newest requests (their windows are open anyway)
            _say(f"6/7 retrain from the logs only: {logged} logged requests (passed ones labelled by the "
                 "simulated downstream), gate on the newest, promote or refuse")
            since_s = time.time() - phases[0].started_at + 60.0
            import threading

            reader = _Reader(settings)
            so_far = threading.Thread(target=reader.until, args=(_ids(phases), 600.0), daemon=True)
            so_far.start()  # v1's decisions are read while v2 trains
            # at most 70% of the new source's phase: v2 must see some of it (a short test run
            # then gives the gate too few closed windows, and it refuses: the summary says so)
            holdout_s = min(HOLDOUT_S, 0.7 * loop_events / rate)
            promotion = _retrain(env, log_dir, model_dir, profile, holdout_s, since_s)
            t = lap("retrain", t)
            _say(f"gate: {promotion.get('outcome')} {promotion.get('candidate')} (current was "
                 f"{promotion.get('current')})")
            if promotion.get("outcome") == "canary":
                canary_phase = Phase("canary", r2, workdir / "truth-c.parquet")
                _say(f"canary: v2 decides {CANARY_SHARE:.0%} of requests (by request_id hash) beside v1 for "
                     f"{CANARY_S:g} s; then judged on the two arms' own matured outcomes")
                _serving_canary(settings, "v2", timeout=10.0)
                stream(canary_phase, max(1000, int(rate * CANARY_S)), 1006, ns)
                phases.append(canary_phase)
                _wait_logged(log_dir, sum(s["sent"] for s in sent), 60.0)
                # the canary's newest deal windows close (6 s) and the logger writes their outcomes
                time.sleep(max(0.0, canary_phase.started_at + CANARY_S + 7.0 - time.time()))
                canary_end = _end_canary(env, log_dir, model_dir, "v2")
                promotion = {**promotion, "outcome": canary_end["outcome"]}
                _say(f"canary: {canary_end['decision']} on its arms -> {canary_end['outcome']}"
                     + (f" ({canary_end['promoted_on']})" if canary_end["promoted_on"] else ""))
                t = lap("canary", t)
            after = Phase("new source, v2", r2, workdir / "truth-5.parquet")
            switch = Phase("switch-over", r2, workdir / "truth-4.parquet")
            _say("7/7 the worker reloads `current` live; the same new-source traffic again")
            stream(switch, max(1000, int(rate * 3)), 1004, ns)  # the worker's reload interval is 2 s
            stream(after, loop_events, 1005, ns)
            phases += [switch, after]
            t = lap("new_source_v2", t)
            _say("collecting decisions")
            want = _ids(phases)
            reader.stop.set()
            so_far.join()
            reader.stop.clear()
            decisions = reader.until(want, timeout=60.0)
            reader.close()
            lap("collect", t)
        finally:
            for proc in procs.values():
                proc.send_signal(signal.SIGTERM)
            for proc in procs.values():
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()

    settle = 0.4  # the first 40% of a phase is the controller settling on the new target
    summaries = []
    for p in phases:
        row = _phase_summary(p, decisions, settle)
        row["models"] = _models(p, decisions)
        if p in (before, switch, after):
            row.update(_new_source_summary(p, decisions))
        summaries.append(row)
    by_name = {row["phase"]: row for row in summaries}
    b, a = by_name[before.name], by_name[after.name]
    loop = {
        "r": r2, "new_source": NEW_SOURCE, "v1": manifest["version"], "v2": promotion.get("candidate"),
        "promoted": promotion.get("outcome") == "promoted", "gate": promotion.get("gate"),
        "new_source_deals_kept": {"before": b["new_source_deals_kept"], "after": a["new_source_deals_kept"]},
        "deals_kept": {"before": b["deals_kept"], "after": a["deals_kept"]},
        "deals_kept_oracle": {"before": b["deals_kept_oracle"], "after": a["deals_kept_oracle"]},
        "deals_kept_vs_oracle": {"before": round(b["deals_kept"] - b["deals_kept_oracle"], 4),
                                 "after": round(a["deals_kept"] - a["deals_kept_oracle"], 4)},
        "served_by": {"before": b["models"], "after": a["models"]},
        "churn": _churn(model_dir, manifest["version"], promotion.get("candidate"), log_dir, r2,
                        int(before.started_at * 1000), int(switch.started_at * 1000)),
        "canary": None if canary_phase is None or canary_end is None else {
            "share": CANARY_SHARE, "seconds": CANARY_S, "requests": by_name[canary_phase.name]["requests"],
            "served_by": by_name[canary_phase.name]["models"],
            "block_share": by_name[canary_phase.name]["block_share_settled"], **canary_end},
    }
    summary = {
        "model": manifest["version"], "bundle": str(bundle),
        "report": (str(bundle / "report" / "report.md") if (bundle / "report" / "report.md").exists()
                   else f"rta eval --model {bundle} --logs {world_dir} --out {workdir / 'report'}"),
        "events_sent": sum(s["sent"] for s in sent), "events_decided": len(decisions),
        "missing_decisions": len(want - decisions.keys()),
        "phases": summaries, "loop": loop, "timings_s": timings,
        "seconds": round(time.monotonic() - started, 1),
        "summary": str(workdir / "summary.json"),
        "status_page": page,  # served while the demo ran
    }
    latency = _latency(list(decisions.values()))
    if latency:
        summary["latency_ms"] = latency  # all phases; each phase has its own (warm-up = group join)
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    _print_summary(summary, rate)


def _churn(model_dir: Path, v1: str, v2: str | None, log_dir: Path, r: float, from_ms: int,
           until_ms: int) -> dict[str, Any] | None:
    """Decisions flipped between v1 and v2 on the logged new-source traffic, both replayed at the
    loop's targets (`rta model diff`'s measure, training/churn.py); None without a v2."""
    if v2 is None or not (model_dir / v2).is_dir():
        return None
    from training.churn import diff_models
    from training.logs import Attribution
    from training.replay import Step

    rep = diff_models(model_dir / v1, model_dir / v2, log_dir, Step(r, 0.02, EPSILON),
                      attribution=Attribution.parse(ATTRIBUTION), from_ms=from_ms, until_ms=until_ms)
    c = rep["churn"]
    return {"rows": c["rows"], "flipped_share": round(c["share"], 4), "pass_to_block": round(c["pass_to_block"], 4),
            "block_to_pass": round(c["block_to_pass"], 4), "targets": rep["targets"],
            "window": "the new source's first phase (logged, served by v1)"}


def _print_summary(s: dict[str, Any], rate: float) -> None:
    click.echo("")
    click.echo(f"rta demo — model {s['model']}   ({s['seconds']} s)")
    click.echo(f"  requests: {s['events_sent']} sent at {rate:.0f}/s, {s['events_decided']} decided, "
               f"{s['missing_decisions']} missing")
    if "latency_ms" in s:
        per_phase = ", ".join(f"{p['phase']} {p['latency_ms']['p50']} / {p['latency_ms']['p99']}"
                              for p in s["phases"] if "latency_ms" in p)
        click.echo(f"  request->decision latency p50 / p99 ms: all {s['latency_ms']['p50']} / "
                   f"{s['latency_ms']['p99']} ({per_phase})")
    click.echo("  phase     target  block share (all / settled)  error   deals kept: filter / oracle / random")
    for p in s["phases"]:
        click.echo(f"  {p['phase']:8}  {p['target_r']:.3f}   {p['block_share']:.4f} / {p['block_share_settled']:.4f}"
                   f"           {p['error_pp_settled']:+.2f}pp   {p['deals_kept']:.3f} / "
                   f"{p['deals_kept_oracle']:.3f} / {p['deals_kept_random']:.3f}")
    click.echo("  reasons:  " + "; ".join(f"{p['phase']}: {p['reasons']}" for p in s["phases"]))
    loop = s["loop"]
    ns, dk, vo = loop["new_source_deals_kept"], loop["deals_kept"], loop["deals_kept_vs_oracle"]
    forced = str((loop.get("canary") or {}).get("promoted_on") or "").startswith("forced")
    promoted_how = ("promoted, forced after an inconclusive canary" if loop["promoted"] and forced else
                    "promoted by the gate" if loop["promoted"] else "NOT promoted by a gate")
    click.echo(f"  loop at r={loop['r']}: v1 {loop['v1']} -> v2 {loop['v2']} "
               f"({promoted_how})")
    click.echo(f"    new-source deals kept  before {ns['before']:.3f}  after {ns['after']:.3f}")
    click.echo(f"    all deals kept         before {dk['before']:.3f}  after {dk['after']:.3f}   "
               f"(vs oracle {vo['before']:+.3f} / {vo['after']:+.3f})")
    click.echo(f"    served by: before {loop['served_by']['before']}, after {loop['served_by']['after']}")
    c = loop.get("canary")
    if c is not None:
        ev = c.get("evidence") or {}
        lo, hi = ev.get("difference_relative_ci") or [None, None]
        figure = (f"value {ev['difference_relative']:+.2%} [{lo:+.2%}, {hi:+.2%}] of v1's"
                  if None not in (ev.get("difference_relative"), lo, hi) else "no value estimate")
        click.echo(f"    canary at {c['share']:.0%} for {c['seconds']:g} s ({c['served_by']}): {c['decision']} on its "
                   f"arms, {figure} -> {c['outcome']}" + (f" ({c['promoted_on']})" if c["promoted_on"] else ""))
    if loop.get("churn") is not None:
        c = loop["churn"]
        click.echo(f"    churn v1 -> v2 on the logged new-source phase: {c['flipped_share']:.2%} of "
                   f"{c['rows']} decisions flip ({c['pass_to_block']:.2%} pass->block, "
                   f"{c['block_to_pass']:.2%} block->pass)")
    click.echo("  seconds per step: " + ", ".join(f"{k} {v}" for k, v in s["timings_s"].items()))
    click.echo(f"  report:   {s['report']}")
    click.echo(f"  summary:  {s['summary']}")
