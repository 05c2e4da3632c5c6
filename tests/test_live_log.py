"""Issue 10 acceptance, live: `rta world stream` -> `rta serve` -> `rta world outcomes` -> `rta log`,
each a process, on the real broker and Redis, with a `kill -9` of the logger mid-stream and a
restart (tests/live_log_support.py: `live_pipeline`, reusable by the replay acceptance).

The log must hold exactly one impression per request after dedup, every decision field equal to
the decision event's; outcome rows only for passed requests, and every label of every passed
request as an outcome once the delays elapsed. Read back with pyarrow.dataset and DuckDB. Then
the analysts' replay of that very log with the served bundle and the logged thresholds
(`rta replay --thresholds logged`) must reproduce every live decision and its reason.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from live_log_support import dedup_impressions, duckdb_count, live_pipeline, read_log, read_truth

from stream.events import OUTCOME_EVENTS
from stream.logger.schema import DECISION_COLUMNS

pytestmark = pytest.mark.slow

N = 50_000
_FIELD = {c: c for c in DECISION_COLUMNS} | {"decision_ts_ms": "ts_ms"}


def _expected_outcomes(truth_dir: Path, passed: set[str]) -> set[tuple[str, str]]:
    """(request_id, event) of every passed request's labels, clipped to the funnel."""
    t = read_truth(truth_dir)
    ids = np.asarray(t["request_id"].to_pylist(), dtype=object)
    lab = {e: t[e].to_numpy() > 0 for e in OUTCOME_EVENTS}
    lab["online"] &= lab["click"]
    lab["cart"] &= lab["online"]
    lab["deal"] &= lab["online"]
    keep = np.fromiter((r in passed for r in ids), bool, len(ids))
    return {(r, e) for e in OUTCOME_EVENTS for r in ids[keep & lab[e]].tolist()}


def test_live_log_has_every_request_once_with_its_decision_and_outcomes_only_when_passed(settings, tmp_path,
                                                                                        torch_one_thread):
    live = live_pipeline(settings, tmp_path, n=N)
    assert live.logger_restarts == 1 and live.killed_mid_stream and len(live.decisions) == N

    raw = read_log(live.log_dir)
    assert raw.num_rows >= N  # duplicates after the kill are allowed, losses are not
    table = dedup_impressions(raw)
    assert table.num_rows == N and set(table["request_id"].to_pylist()) == set(live.decisions)
    assert table["decision"].null_count == 0
    # the production reader (rta train, replay) agrees: every request once, each with its decision
    from training.logs import load_logged

    logs = load_logged(live.log_dir)
    assert len(logs) == N and set(logs.request_id.tolist()) == set(live.decisions)
    assert logs.decisions["decision"].null_count == 0
    # every decision field equal to the decision event's
    rows = table.to_pylist()
    mismatches = []
    for row in rows:
        d = live.decisions[row["request_id"]]
        for col, key in _FIELD.items():
            if row[col] != d.get(key):
                mismatches.append((row["request_id"], col, row[col], d.get(key)))
        for k in ("p", "u"):
            for task in OUTCOME_EVENTS:
                if row[f"{k}_{task}"] != d[k][task]:
                    mismatches.append((row["request_id"], f"{k}_{task}", row[f"{k}_{task}"], d[k][task]))
    assert not mismatches, mismatches[:5]
    passed = {r for r, d in live.decisions.items() if d["decision"] == "pass"}
    assert 0.5 * N < len(passed) < 0.9 * N  # r = 0.3 blocks a real share

    # outcomes: only passed requests, each label exactly once after dedup
    out = read_log(live.log_dir, "outcomes")
    pairs = set(zip(out["request_id"].to_pylist(), out["event"].to_pylist(), strict=True))
    assert {r for r, _ in pairs} <= passed
    expected = _expected_outcomes(live.truth_dir, passed)
    assert len(expected) > 500 and pairs == expected
    assert len(expected) == live.outcomes_published
    # funnel order in event time: online after click, deal after online
    ts = {(r, e): t for r, e, t in zip(out["request_id"].to_pylist(), out["event"].to_pylist(),
                                       out["ts_ms"].to_pylist(), strict=True)}
    for r, e in expected:
        if e == "online":
            assert ts[(r, "online")] > ts[(r, "click")]
        if e == "deal":
            assert ts[(r, "deal")] > ts[(r, "online")]
    # impressions sit in their request's event hour
    assert pc.all(pc.equal(pc.cast(raw["hour"], "int64"),
                           pc.hour(pc.cast(raw["ts_ms"], pa.timestamp("ms", tz="UTC"))))).as_py()

    # an independent reader agrees
    rows_duck, distinct_duck = duckdb_count(live.log_dir, "impressions")
    assert distinct_duck == N and rows_duck == raw.num_rows
    _, distinct_pairs = duckdb_count(live.log_dir, "outcomes", distinct="request_id || '/' || event")
    assert distinct_pairs == len(expected)

    # the analysts' replay: the same engine on the logged thresholds reproduces every decision
    from training.replay import ReplayConfig, replay

    rep = replay(live.model_dir, live.log_dir, tmp_path / "replay", ReplayConfig(thresholds="logged"))
    m = rep["runs"][0]["match"]
    assert m["decided_rows"] == N and m["undecided_rows"] == 0 and m["other_model_rows"] == 0, m
    assert m["mismatched"] == 0 and m["decision_and_reason_match"] == 1.0, m
    # ... and so says its decisions.parquet, read by DuckDB against the decision events themselves
    import duckdb

    got = duckdb.connect().execute(
        f"SELECT request_id, decision, reason FROM read_parquet('{tmp_path / 'replay' / 'decisions.parquet'}')"
    ).fetchall()
    assert len(got) == N
    assert all((live.decisions[r]["decision"], live.decisions[r]["reason"]) == (d, why) for r, d, why in got)
