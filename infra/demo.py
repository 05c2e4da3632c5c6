"""`rta demo`: the whole loop on the embedded default, in one command.

Stack up (or reuse a configured one) -> synthetic world -> `rta train` (teacher, SWAG, student,
ONNX bundle, report) -> a worker (`rta serve`, its own process) -> fresh requests streamed in two
phases with an operator's `rta ratio set` between them -> a summary read back from the decisions
topic: throughput, achieved block share per phase against its target, and the deals the filter
kept against an oracle that knows the world's true probabilities.

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


def _collect(settings: Settings, want: set[str], timeout: float) -> dict[str, dict[str, Any]]:
    """Read decisions until every wanted request_id has one (or time runs out)."""
    from stream.kafka import make_consumer

    consumer = make_consumer(settings, f"demo-reader-{os.getpid()}-{time.time_ns()}")
    consumer.subscribe([settings.topic("decisions")])
    got: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(want - got.keys()) and time.monotonic() < deadline:
            for msg in consumer.consume(5000, 0.5):
                if msg.error() is None:
                    d = orjson.loads(msg.value())
                    got.setdefault(d["request_id"], d)
    finally:
        consumer.close()
    return got


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


@click.command(name="demo")
@click.option("--rows", type=click.IntRange(min=10_000), default=200_000, show_default=True,
              help="Rows of logged traffic to train on.")
@click.option("--events", type=click.IntRange(min=2_000), default=60_000, show_default=True,
              help="Fresh requests streamed, split over the two phases.")
@click.option("--rate", type=click.FloatRange(min=100), default=3_000.0, show_default=True,
              help="Offered load while streaming (events/s).")
@click.option("--ratios", default="0.3,0.5", show_default=True,
              help="Target block share r of phase 1 and phase 2 (changed live in between).")
@click.option("--warmup-s", type=click.FloatRange(min=0), default=8.0, show_default=True,
              help="Seconds of traffic before phase 1 (worker joins, window fills); not judged.")
@click.option("--profile", type=click.Choice(["tiny", "demo", "paper"]), default="demo", show_default=True)
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=Path(".rta/demo"),
              show_default=True, help="Where the world, the model bundle and the summary go.")
@click.option("--retrain/--reuse-model", default=False, show_default=True,
              help="Train even when the workdir already holds a bundle.")
def demo(rows: int, events: int, rate: float, ratios: str, warmup_s: float, profile: str,
         workdir: Path, retrain: bool) -> None:
    """Stack, world, train, serve, stream, change r live, and summarise against the oracle."""
    try:
        r1, r2 = (float(x) for x in ratios.split(","))
    except ValueError:
        raise click.BadParameter(f"expected two numbers like 0.3,0.5, got {ratios!r}",
                                 param_hint="'--ratios'") from None
    started = time.monotonic()
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    run_id = f"demo{int(time.time())}"
    base = load_settings()
    settings = base.with_topic_prefix(run_id)
    from dataclasses import replace

    settings = replace(settings, redis_prefix=run_id)
    model_dir = workdir / "models"

    with _stack(settings, workdir) as settings:
        from stream.kafka import ensure_topics, make_admin
        from stream.window import RedisStore

        ensure_topics(make_admin(settings), settings.topics.values(), settings.partitions)
        env = _child_env(settings, model_dir)

        world_dir = workdir / "world"
        if retrain or not (model_dir / "current").exists():
            _say(f"1/5 world: {rows} rows of logged traffic -> {world_dir}")
            _run(["world", "generate", "--rows", str(rows), "--seed", "7", "--out", str(world_dir)], env)
            _say(f"2/5 train ({profile} profile): teacher + SWAG + student + ONNX bundle")
            _run(["train", "--logs", str(world_dir), "--out", str(model_dir), "--profile", profile], env)
        else:
            _say(f"1-2/5 reusing the bundle in {model_dir} (--retrain to train again)")
        from model.bundle import read_manifest, resolve_bundle

        bundle = resolve_bundle(model_dir)
        manifest = read_manifest(bundle)

        store = RedisStore.from_url(settings.redis_url, settings.redis_prefix)
        store.update_targets("rta demo", "demo phase 1", r=r1, p_u=0.02, epsilon=0.01)
        _say(f"3/5 serve: model {manifest['version']}, r={r1}, p_u=0.02, epsilon=0.01")
        worker = subprocess.Popen(
            [sys.executable, "-m", "infra.cli", "serve", "--group", f"{run_id}-workers",
             "--no-metrics", "--log-level", "warning"], env=env)
        try:
            half = events // 2
            # The warm-up phase lets the worker join its group and the window fill; it is
            # reported but not judged.
            phases = [Phase("warm-up", r1, workdir / "truth-0.parquet"),
                      Phase("phase 1", r1, workdir / "truth-1.parquet"),
                      Phase("phase 2", r2, workdir / "truth-2.parquet")]
            counts = [max(1000, int(rate * warmup_s)), half, half]
            from training.world_cli import stream_requests

            sent: list[dict[str, Any]] = []
            for i, (phase, count) in enumerate(zip(phases, counts, strict=True)):
                if i == 2:
                    store.update_targets("rta demo", "demo phase 2: budget changed", r=r2)
                    _say(f"operator: rta ratio set {r2} --reason 'demo phase 2' (live)")
                phase.started_at = time.time()
                _say(f"4/5 stream {phase.name}: {count} fresh requests at {rate:.0f}/s, target r={phase.r}")
                sent.append(stream_requests(settings, count, rate=rate, seed=1000 + i,
                                            truth_out=phase.truth, progress=True))
                if worker.poll() is not None:
                    raise RtaError(f"the worker exited with code {worker.returncode}; see its log above")
            _say("5/5 collecting decisions")
            import pyarrow.parquet as pq

            want = set()
            for phase in phases:
                want.update(pq.read_table(phase.truth, columns=["request_id"]).column(0).to_pylist())
            decisions = _collect(settings, want, timeout=60.0)
        finally:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                worker.kill()

    settle = 0.4  # the first 40% of a phase is the controller settling on the new target
    summary = {
        "model": manifest["version"], "bundle": str(bundle),
        "report": str(bundle / "report" / "report.md"),
        "events_sent": sum(s["sent"] for s in sent), "events_decided": len(decisions),
        "missing_decisions": len(want - decisions.keys()),
        "phases": [_phase_summary(p, decisions, settle) for p in phases],
        "seconds": round(time.monotonic() - started, 1),
        "summary": str(workdir / "summary.json"),
    }
    latency = _latency(list(decisions.values()))
    if latency:
        summary["latency_ms"] = latency  # all phases; each phase has its own (warm-up = group join)
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    _print_summary(summary, rate)


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
    click.echo(f"  report:   {s['report']}")
    click.echo(f"  summary:  {s['summary']}")
