"""A logged layout made offline from a world log: what `rta log` would have written.

Replay, its benchmark and the off-policy tests need logged traffic with a known truth, without
running the live stack. This runs the replay engine on a world log with live targets and an
explore share (the "live" filter), then writes, in the layout of `stream/logger/schema.py`:

* `impressions/date=.../hour=.../part-00000.parquet`: every row with its features and decision
  fields (exactly the contract's columns, so the live logger's files are read the same way);
* `outcomes/...`: for PASSED rows only, one event per positive funnel label of the world, at
  the request's time plus a random delay (click seconds, later steps after it: funnel order);
* optionally a truth directory (request_id, ts_ms, labels, true_<task>) for evaluation only.

Blocked rows get no outcome, as live: their labels are unobserved when read back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from stream.errors import DataError
from stream.logger.schema import IMPRESSIONS_DIR, OUTCOMES_DIR, partition_dir
from stream.policy import REASONS, ScorePolicy
from stream.scorer import Scorer
from training.logs import LogSet, load_logs
from training.replay import ReplayConfig, Step, replay_live, score_logs

# mean delay (s) of each funnel step after the previous one (compressed: a live deal takes days)
DEFAULT_DELAYS_S = {"click": 5.0, "online": 20.0, "cart": 30.0, "deal": 60.0}
_AFTER = {"click": None, "online": "click", "cart": "online", "deal": "online"}  # deal needs online, not cart
LATENCY_MS = 5.0
PARTITIONS = 3


def _write_hours(table: pa.Table, ts_ms: np.ndarray, root: Path) -> int:
    """One file per event hour under `root/date=.../hour=...`; returns the number of files."""
    hour = ts_ms // 3_600_000
    order = np.argsort(hour, kind="stable")
    starts = np.flatnonzero(np.diff(hour[order], prepend=-1))
    bounds = np.append(starts, len(order))
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        d = root / partition_dir(int(hour[order[a]]) * 3_600_000)
        d.mkdir(parents=True, exist_ok=True)
        pq.write_table(table.take(pa.array(order[a:b])), d / "part-00000.parquet")
    return len(bounds) - 1


def make_logged_layout(model: str | Path, world: LogSet | str | Path, out: str | Path, step: Step,
                       seed: int = 0, delays_s: dict[str, float] | None = None,
                       truth_out: str | Path | None = None, threads: int = 1) -> dict[str, Any]:
    """Filter `world` with `model` at `step`'s targets (replay's own controller on event time)
    and write the logged layout into `out`. Returns counts."""
    if step.epsilon <= 0:
        raise DataError("an offline log needs an explore share (epsilon > 0): it is what off-policy estimates read")
    scorer = Scorer.load(model, intra_threads=threads)
    policy = ScorePolicy.from_manifest(scorer.manifest)
    logs = world if isinstance(world, LogSet) else load_logs(world, tuple(scorer.tasks))
    if logs.masked or logs.decisions is not None:
        raise DataError(f"{logs.source}: make the offline log from a world log (labels on every row)")
    sc = score_logs(logs, scorer, policy)
    run = replay_live(sc, [step], ReplayConfig(steps=[step], seed=seed), name="offline logger")
    o = sc.order
    rid = logs.request_id[o].astype(str)
    ts = sc.ts_ms
    n = len(o)
    cols: dict[str, pa.Array] = {"request_id": pa.array(rid, pa.string()), "ts_ms": pa.array(ts, pa.int64())}
    for j, name in enumerate(logs.spec.numeric):
        cols[name] = pa.array(logs.num[o, j].astype(np.float64), pa.float64(), from_pandas=True)
    for j, name in enumerate(logs.spec.categorical):
        v = logs.cat[o, j]
        cols[name] = pa.array(v, pa.string(), mask=(v == ""))
    cols.update({
        "decision": pa.array(np.where(run.block, "block", "pass")),
        "reason": pa.array(np.asarray(REASONS, dtype=object)[run.reason].astype(str)),
        "score": pa.array(sc.e.astype(np.float64)), "uncertainty": pa.array(sc.u.astype(np.float64)),
        "threshold": pa.array(run.theta), "tau_u": pa.array(run.tau_u),
        "target_ratio": pa.array(np.full(n, step.r)),
        "propensity": pa.array(run.propensity.astype(np.float64)),
        "model": pa.array([scorer.version] * n, pa.string()),
        "decision_ts_ms": pa.array(ts + int(LATENCY_MS), pa.int64()),
        "latency_ms": pa.array(np.full(n, LATENCY_MS)),
    })
    for j, t in enumerate(sc.tasks):
        cols[f"p_{t}"] = pa.array(sc.p[:, j].astype(np.float64))
    for j, t in enumerate(sc.tasks):
        cols[f"u_{t}"] = pa.array(sc.u_tasks[:, j].astype(np.float64))
    part = (np.arange(n) % PARTITIONS).astype(np.int32)  # round-robin over the request partitions
    cols["kafka_partition"] = pa.array(part, pa.int32())
    offset = np.zeros(n, np.int64)
    for k in range(PARTITIONS):  # offsets count up per partition in event order
        at = np.flatnonzero(part == k)
        offset[at] = np.arange(len(at))
    cols["kafka_offset"] = pa.array(offset, pa.int64())
    root = Path(out)
    n_imp_files = _write_hours(pa.table(cols), ts, root / IMPRESSIONS_DIR)

    # outcomes: passed rows' positive labels, funnel-ordered delays
    delays = {**DEFAULT_DELAYS_S, **(delays_s or {})}
    rng = np.random.default_rng(seed + 1)
    labels = logs.labels[o]
    passed = ~run.block
    at: dict[str, np.ndarray] = {}
    o_rid, o_event, o_ts = [], [], []
    for j, t in enumerate(sc.tasks):
        prev = _AFTER.get(t)
        base = at[prev] if prev in at else ts.astype(np.float64)
        at[t] = base + rng.exponential(delays.get(t, 30.0) * 1000.0, n)
        hit = passed & (labels[:, j] == 1)
        o_rid.append(rid[hit])
        o_event.append(np.full(int(hit.sum()), t, dtype=object))
        o_ts.append(np.floor(at[t][hit]).astype(np.int64))
    o_ts_all = np.concatenate(o_ts)
    outcomes = pa.table({"request_id": pa.array(np.concatenate(o_rid), pa.string()),
                         "event": pa.array(np.concatenate(o_event).astype(str), pa.string()),
                         "ts_ms": pa.array(o_ts_all, pa.int64())})
    n_out_files = _write_hours(outcomes, o_ts_all, root / OUTCOMES_DIR) if len(o_ts_all) else 0
    if truth_out is not None:
        tdir = Path(truth_out)
        tdir.mkdir(parents=True, exist_ok=True)
        tcols: dict[str, Any] = {"request_id": pa.array(rid, pa.string()), "ts_ms": pa.array(ts, pa.int64())}
        for j, t in enumerate(sc.tasks):
            tcols[t] = pa.array(labels[:, j].astype(np.int8))
        if logs.truth is not None:
            for j, t in enumerate(sc.tasks):
                tcols[f"true_{t}"] = pa.array(logs.truth[o, j])
        pq.write_table(pa.table(tcols), tdir / "part-00000.parquet")
    return {"rows": n, "passed": int(passed.sum()), "blocked": int(run.block.sum()),
            "explore": int((run.reason == REASONS.index("explore")).sum()), "outcomes": len(o_ts_all),
            "impression_files": n_imp_files, "outcome_files": n_out_files, "model": scorer.version,
            "targets": {"r": step.r, "p_u": step.p_u, "epsilon": step.epsilon},
            "newest_event_ms": int(max(ts.max(), o_ts_all.max() if len(o_ts_all) else 0))}


@click.command("offline-log")
@click.option("--model", required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--world", required=True, type=click.Path(exists=True, path_type=Path), help="A world log.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--ratio", type=float, default=0.3, show_default=True)
@click.option("--pass-share", type=float, default=0.0, show_default=True)
@click.option("--explore", type=float, default=0.05, show_default=True)
@click.option("--truth-out", type=click.Path(file_okay=False, path_type=Path), default=None)
@click.option("--seed", type=int, default=0, show_default=True)
def main(model: Path, world: Path, out: Path, ratio: float, pass_share: float, explore: float,
         truth_out: Path | None, seed: int) -> None:
    """Write a logged layout (impressions + outcomes) from a world log, as `rta log` would."""
    info = make_logged_layout(model, world, out, Step(ratio, pass_share, explore), seed=seed, truth_out=truth_out)
    click.echo(json.dumps(info))


if __name__ == "__main__":  # pragma: no cover
    from stream.errors import RtaError

    try:
        main(standalone_mode=True)
    except RtaError as exc:
        raise SystemExit(f"offline-log: {exc}") from None
