"""Reading `rta log`'s layout: the label join's rule, deduplication, and bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stream.errors import DataError
from stream.logger.schema import (
    DECISION_COLUMNS,
    IMPRESSIONS_DIR,
    OUTCOMES_DIR,
    partition_dir,
    task_columns,
)
from training.logs import Attribution, load_logs

TASKS = ("click", "online", "cart", "deal")
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
WIN = Attribution({"click": 60, "online": 60, "cart": 60, "deal": 600})


def impressions(rids: list[str], ts: list[int], decision: list[str | None], **override) -> pa.Table:
    n = len(rids)
    rng = np.random.default_rng(len(rids))
    reason = ["score" if d == "block" else ("uncertain" if d == "pass" else None) for d in decision]
    cols = {
        "request_id": pa.array(rids, pa.string()), "ts_ms": pa.array(ts, pa.int64()),
        "age": pa.array(rng.normal(30, 5, n)), "city": pa.array(rng.choice(["a", "b", None], n).tolist(), pa.string()),
        "decision": pa.array(decision, pa.string()), "reason": pa.array(reason, pa.string()),
        **{c: pa.array(rng.random(n)) for c in ("score", "uncertainty", "threshold", "tau_u")},
        "target_ratio": pa.array(np.full(n, 0.3)), "propensity": pa.array(np.full(n, 1.0)),
        "model": pa.array(["v1"] * n), "decision_ts_ms": pa.array(np.asarray(ts) + 3, pa.int64()),
        "latency_ms": pa.array(np.full(n, 3.0)),
        **{c: pa.array(rng.random(n)) for c in task_columns(TASKS)},
        "kafka_partition": pa.array(np.zeros(n, np.int32)), "kafka_offset": pa.array(np.arange(n, dtype=np.int64)),
    }
    cols.update(override)
    return pa.table({k: v for k, v in cols.items() if v is not None})


def outcomes(rows: list[tuple[str, str, int]]) -> pa.Table:
    rid, event, ts = zip(*rows, strict=True) if rows else ([], [], [])
    return pa.table({"request_id": pa.array(list(rid), pa.string()), "event": pa.array(list(event), pa.string()),
                     "ts_ms": pa.array(list(ts), pa.int64())})


def put(root: Path, kind: str, table: pa.Table, ts_ms: int, name: str = "part-0.parquet") -> Path:
    d = root / kind / partition_dir(ts_ms)
    d.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, d / name)
    return d / name


def test_contract_columns_are_what_the_fixture_writes():
    t = impressions(["a"], [T0], ["pass"])
    assert set(DECISION_COLUMNS) <= set(t.schema.names)


def test_label_join_rule_window_open_closed_blocked_and_duplicates(tmp_path: Path):
    # a: passed, click after 10 s (in window), deal after 100 s (in its 600 s window)
    # b: passed, click after 90 s (after the 60 s window) -> 0 once closed
    # c: blocked -> every task unobserved, even with a stray outcome
    # d: passed at the end: click window still open -> unobserved; e: undecided -> unobserved
    now = T0 + 700_000
    rids = ["a", "b", "c", "d", "e"]
    ts = [T0, T0, T0, now - 30_000, T0]
    put(tmp_path, IMPRESSIONS_DIR, impressions(rids, ts, ["pass", "pass", "block", "pass", None]), T0)
    # the logger replayed a file: the same impressions again, and a duplicate outcome
    put(tmp_path, IMPRESSIONS_DIR, impressions(["a", "b"], [T0, T0], ["pass", "pass"]), T0, "part-1.parquet")
    put(tmp_path, OUTCOMES_DIR, outcomes([("a", "click", T0 + 10_000), ("a", "click", T0 + 10_000),
                                          ("a", "online", T0 + 20_000), ("a", "deal", T0 + 100_000),
                                          ("b", "click", T0 + 90_000), ("c", "click", T0 + 5_000),
                                          ("zz", "click", T0), ("a", "wishlist", T0 + 1)]), T0)
    logs = load_logs(tmp_path, attribution=Attribution(WIN.windows_s, as_of_ms=now))
    assert len(logs) == 5 and logs.masked
    row = {r: i for i, r in enumerate(logs.request_id)}
    lab = logs.labels
    np.testing.assert_array_equal(lab[row["a"]], [1, 1, 0, 1])
    np.testing.assert_array_equal(lab[row["b"]], [0, 0, 0, 0])  # click too late; windows closed
    assert np.isnan(lab[row["c"]]).all() and np.isnan(lab[row["e"]]).all()
    assert np.isnan(lab[row["d"]]).all()  # 30 s after: every window still open
    c = logs.info["counts"]
    assert c["duplicate_impressions"] == 2 and c["duplicate_outcomes"] == 1
    assert c["orphan_outcomes"] == 1 and c["unknown_events"] == 1 and c["outcomes_for_blocked"] == 1
    assert c["undecided"] == 1
    assert logs.labelled() == {"click": 2, "online": 2, "cart": 2, "deal": 2}
    assert logs.decisions is not None and logs.decisions.column("decision").to_pylist()[row["c"]] == "block"
    # the default "as of" is the time both kinds are logged up to: the newest outcome here (the
    # outcome files lag the impressions), not d's newer impression
    assert load_logs(tmp_path, attribution=WIN).info["as_of_ms"] == T0 + 100_000
    # as of an earlier time only matured windows are labels: at 50 s a's click (in at 10 s) is
    # still unobserved (its 60 s window is open); at 65 s it is a 1 and its deal (600 s) is not
    early = load_logs(tmp_path, attribution=Attribution(WIN.windows_s, as_of_ms=T0 + 50_000))
    row = {r: i for i, r in enumerate(early.request_id)}
    assert np.isnan(early.labels[row["a"]]).all()
    assert early.info["matured"]["click"]["early_positives_unobserved"] == 1
    later = load_logs(tmp_path, attribution=Attribution(WIN.windows_s, as_of_ms=T0 + 65_000))
    row = {r: i for i, r in enumerate(later.request_id)}
    assert later.labels[row["a"], 0] == 1 and np.isnan(later.labels[row["a"], 3])


def test_duplicate_keeps_the_copy_with_a_decision(tmp_path: Path):
    # after a crash the logger re-reads a request whose decision it already logged: the
    # replayed copy expires undecided; the decided copy must win whichever file comes first
    put(tmp_path, IMPRESSIONS_DIR, impressions(["a", "b"], [T0, T0], [None, None]), T0, "part-0.parquet")
    put(tmp_path, IMPRESSIONS_DIR, impressions(["a"], [T0], ["block"]), T0, "part-1.parquet")
    logs = load_logs(tmp_path)
    got = dict(zip(logs.request_id, logs.decisions.column("decision").to_pylist(), strict=True))
    assert got == {"a": "block", "b": None}
    assert logs.info["counts"]["duplicate_impressions"] == 1 and logs.info["counts"]["undecided"] == 1


def test_window_closes_later_as_of(tmp_path: Path):
    put(tmp_path, IMPRESSIONS_DIR, impressions(["a"], [T0], ["pass"]), T0)
    put(tmp_path, OUTCOMES_DIR, outcomes([("a", "click", T0 + 5_000)]), T0)
    early = load_logs(tmp_path, attribution=Attribution(WIN.windows_s, as_of_ms=T0 + 30_000))
    late = load_logs(tmp_path, attribution=Attribution(WIN.windows_s, as_of_ms=T0 + 10 * 60_000))
    assert np.isnan(early.labels[0]).all()  # the click came, but its window is open: unobserved
    np.testing.assert_array_equal(late.labels[0], [1, 0, 0, 0])


def test_features_and_flat_layout_untouched(tmp_path: Path):
    put(tmp_path, IMPRESSIONS_DIR, impressions(["a", "b"], [T0, T0 + 1], ["pass", "block"]), T0)
    logs = load_logs(tmp_path)
    assert logs.spec.numeric == ("age",) and logs.spec.categorical == ("city",)
    assert logs.cat.dtype == object and set(logs.cat[:, 0]) <= {"a", "b", ""}


def test_attribution_parse():
    a = Attribution.parse("click=90s, deal=2d,cart=1.5h")
    assert a.window("click") == 90 and a.window("deal") == 172_800 and a.window("cart") == 5400
    assert a.window("online") == 3600
    with pytest.raises(DataError, match="expected TASK=DURATION"):
        Attribution.parse("click:5m")


# ---- bad input: one line naming the file and the column, or handled and counted -------------
def test_missing_decision_column_names_file_and_column(tmp_path: Path):
    f = put(tmp_path, IMPRESSIONS_DIR, impressions(["a"], [T0], ["pass"], tau_u=None), T0)
    with pytest.raises(DataError, match=rf"{f}: column 'tau_u' is missing") as exc:
        load_logs(tmp_path)
    assert "\n" not in str(exc.value)


def test_missing_outcome_column(tmp_path: Path):
    put(tmp_path, IMPRESSIONS_DIR, impressions(["a"], [T0], ["pass"]), T0)
    f = put(tmp_path, OUTCOMES_DIR, outcomes([("a", "click", T0)]).drop_columns(["event"]), T0)
    with pytest.raises(DataError, match=rf"{f}: column 'event' is missing"):
        load_logs(tmp_path)


def test_mixed_schemas_across_hours_are_handled_and_counted(tmp_path: Path):
    # the logger writes what each hour's traffic had: a feature absent from a whole file, or
    # all-missing in it (nulls of any type), is missing on those rows, not a broken log
    first = impressions(["a"], [T0], ["pass"], age=pa.array([41.0]), city=pa.array(["x"]))
    put(tmp_path, IMPRESSIONS_DIR, first, T0)
    later = T0 + 3_600_000
    f = put(tmp_path, IMPRESSIONS_DIR, impressions(["b"], [later], ["pass"], age=None,
                                                   city=pa.array([None], pa.float64())), later)
    logs = load_logs(tmp_path)
    assert logs.spec.numeric == ("age",) and logs.spec.categorical == ("city",)
    order = np.argsort(logs.request_id)
    assert logs.num[order, 0][0] == 41.0 and np.isnan(logs.num[order, 0][1])
    assert logs.cat[order, 0].tolist() == ["x", ""]
    assert logs.info["counts"]["files_missing_a_feature"] == 1
    # a feature that is a number in one hour and a string in another is a string, counted
    f.unlink()
    f = put(tmp_path, IMPRESSIONS_DIR, impressions(["b"], [later], ["pass"], age=pa.array(["old"])), later)
    logs = load_logs(tmp_path)
    assert logs.spec.categorical == ("age", "city") and logs.info["counts"]["kind_conflicts"] == 1
    assert sorted(logs.cat[:, 0].tolist()) == ["41", "old"]  # (Arrow writes 41.0 as "41")
    # a decision column of another type: cast when possible, else named
    f.unlink()
    f = put(tmp_path, IMPRESSIONS_DIR, impressions(["b"], [later], ["pass"], threshold=pa.array(["x"])), later)
    with pytest.raises(DataError, match=rf"{f}: column 'threshold' is string, expected double"):
        load_logs(tmp_path)


def test_empty_hour_and_empty_file_are_counted(tmp_path: Path):
    put(tmp_path, IMPRESSIONS_DIR, impressions(["a"], [T0], ["pass"]), T0)
    later = T0 + 3_600_000
    (tmp_path / IMPRESSIONS_DIR / partition_dir(later + 3_600_000)).mkdir(parents=True)  # an hour, no file
    put(tmp_path, IMPRESSIONS_DIR, impressions(["a"], [T0], ["pass"]).slice(0, 0), later)  # a file, no row
    (tmp_path / IMPRESSIONS_DIR / partition_dir(later) / ".part-9.parquet.tmp").write_bytes(b"partial")
    logs = load_logs(tmp_path)
    c = logs.info["counts"]
    assert len(logs) == 1 and c["impression_empty_hours"] == 1 and c["impression_empty_files"] == 1


def test_no_impressions_and_unreadable_file(tmp_path: Path):
    (tmp_path / IMPRESSIONS_DIR).mkdir()
    with pytest.raises(DataError, match="impressions: no Parquet files"):
        load_logs(tmp_path)
    d = tmp_path / IMPRESSIONS_DIR / partition_dir(T0)
    d.mkdir(parents=True)
    (d / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match=r"bad.parquet: unreadable"):
        load_logs(tmp_path)


def test_null_request_id_is_named(tmp_path: Path):
    f = put(tmp_path, IMPRESSIONS_DIR, impressions(["a", None], [T0, T0], ["pass", "pass"]), T0)
    with pytest.raises(DataError, match=rf"{f}: column 'request_id' has 1 missing values"):
        load_logs(tmp_path)


def test_categoricals_stay_dictionary_encoded_across_files(tmp_path: Path):
    # Parquet's dictionary is kept (per column: its few words, an index per row), one dictionary
    # across files whose own dictionaries differ; the strings appear only if `cat` is read
    from stream.codes import CategoryCodes

    put(tmp_path, IMPRESSIONS_DIR, impressions(["a", "b", "c"], [T0] * 3, ["pass"] * 3,
                                               city=pa.array(["x", None, "y"])), T0)
    later = T0 + 3_600_000
    put(tmp_path, IMPRESSIONS_DIR, impressions(["d", "e"], [later] * 2, ["block"] * 2,
                                               city=pa.array(["z", "x"])), later)
    put(tmp_path, IMPRESSIONS_DIR, impressions(["f"], [later + 1], ["block"], city=None), later, "part-1.parquet")
    logs = load_logs(tmp_path)
    cols = logs.cat_columns
    assert cols is not None and logs._cat is None  # not decoded by loading
    by_id = dict(zip(logs.request_id.tolist(), range(len(logs)), strict=True))
    want = {"a": "x", "b": "", "c": "y", "d": "z", "e": "x", "f": ""}
    assert sorted(cols.words[0].tolist()) == ["", "x", "y", "z"]  # the distinct values once, "" last
    assert {r: logs.cat[i, 0] for r, i in by_id.items()} == want
    # the codes of the dictionary form are the codes of the strings (the worker's path)
    enc = CategoryCodes([["y", "x"]])
    got = enc.encode_dictionary(0, cols.words[0], cols.index[0])
    assert np.array_equal(got, enc.encode(logs.cat)[:, 0])
    sub = logs.take(np.array([by_id["b"], by_id["d"]]))  # a take keeps the dictionary form
    assert sub.cat_columns is not None and sub.cat[:, 0].tolist() == ["", "z"]


# ---- label maturity and the "as of" clock (issue 25 item 1, issue 27 item 6) ----------------
HOUR = 3_600_000


def test_recent_logs_with_default_windows_give_no_positive_whose_window_is_open(tmp_path: Path):
    # 4 days of passed traffic; a third of it clicks after a minute and deals after an hour.
    # Read with the default windows (deal 7 d) and the last 48 h kept (`rta retrain
    # --since-hours 48`): no training/validation label may be a 1 whose window is still open
    # (on the old rule every observed deal label of this window was 1). The break this catches:
    # labelling `passed & hit` 1 whatever `closed` says.
    ts = T0 + np.arange(0, 96 * HOUR, 10 * 60_000)
    rids = [f"r{i}" for i in range(len(ts))]
    put(tmp_path, IMPRESSIONS_DIR, impressions(rids, ts.tolist(), ["pass"] * len(ts)), T0)
    hits = [(r, ev, int(t) + lag) for i, (r, t) in enumerate(zip(rids, ts, strict=True)) if i % 3 == 0
            for ev, lag in (("click", 60_000), ("deal", HOUR))]
    put(tmp_path, OUTCOMES_DIR, outcomes(hits), T0)
    now = int(ts.max()) + 2 * HOUR
    logs = load_logs(tmp_path, attribution=Attribution(now_ms=now))
    recent = logs.between(int(ts.max()) - 48 * HOUR)
    as_of = logs.info["as_of_ms"]
    for j, t in enumerate(TASKS):
        open_ = (as_of - recent.ts_ms) < Attribution().window(t) * 1000
        assert not (recent.labels[open_, j] == 1).any(), t
        assert np.isnan(recent.labels[open_, j]).all(), t
    # deal: nothing in the window has matured; click: the matured rows hold both 1s and 0s
    assert np.isnan(recent.labels[:, 3]).all()
    click = recent.labels[:, 0][np.isfinite(recent.labels[:, 0])]
    assert 0.2 < click.mean() < 0.45 and len(click) > 200
    m = logs.info["matured"]
    assert m["deal"]["share"] == 0.0 and m["deal"]["early_positives_unobserved"] > 0
    assert m["click"]["share"] > 0.99


def test_a_lagging_outcome_partition_does_not_turn_late_clicks_into_0s(tmp_path: Path):
    # requests on partitions 0 and 1; the logger has written partition 0's outcomes up to 3 h
    # but partition 1's only up to 1 h (its consumer lags). A partition-1 request at 2 h whose
    # click is not logged yet must stay unobserved, not become a 0 ("as of" = the newest
    # outcome of all partitions turned it into one).
    ts = [T0, T0, T0 + 2 * HOUR, T0 + 2 * HOUR, T0 + 3 * HOUR]
    rids = ["a0", "a1", "b0", "b1", "c0"]
    part = pa.array(np.array([0, 1, 0, 1, 0], np.int32))
    put(tmp_path, IMPRESSIONS_DIR, impressions(rids, ts, ["pass"] * 5, kafka_partition=part), T0)
    put(tmp_path, OUTCOMES_DIR, outcomes([("a0", "click", T0 + 10_000), ("a1", "click", T0 + HOUR),
                                          ("c0", "click", T0 + 3 * HOUR + 5_000)]), T0)
    logs = load_logs(tmp_path, attribution=Attribution(WIN.windows_s, now_ms=T0 + 4 * HOUR))
    row = {r: i for i, r in enumerate(logs.request_id)}
    assert logs.info["as_of_ms"] == T0 + HOUR  # partition 1's newest outcome
    assert logs.info["outcome_clock"] == {"0": T0 + 3 * HOUR + 5_000, "1": T0 + HOUR}
    assert np.isnan(logs.labels[row["b1"]]).all() and np.isnan(logs.labels[row["b0"]]).all()
    assert logs.labels[row["a0"], 0] == 1 and logs.labels[row["a1"], 0] == 0  # a1's click: too late
    # partition 1 catches up to 2 h 2 min, in a file that records each outcome's own partition
    # (used as it is, also for an outcome whose request is not in the log)
    put(tmp_path, OUTCOMES_DIR, outcomes([("b1", "click", T0 + 2 * HOUR + 20_000),
                                          ("zz", "click", T0 + 2 * HOUR + 120_000)]).append_column(
        "kafka_partition", pa.array([1, 1], pa.int32())), T0, "part-1.parquet")
    logs = load_logs(tmp_path, attribution=Attribution(WIN.windows_s, now_ms=T0 + 4 * HOUR))
    row = {r: i for i, r in enumerate(logs.request_id)}
    assert logs.info["as_of_ms"] == T0 + 2 * HOUR + 120_000
    assert logs.labels[row["b1"], 0] == 1 and logs.labels[row["b0"], 0] == 0


def test_rows_stamped_past_the_clock_are_ignored_and_counted(tmp_path: Path):
    # one impression and one outcome stamped in year 9999, one 2 h ahead of the clock: none of
    # them may become the log's "newest" time (which would close every window, or leave the
    # retrain / gate windows empty); each is counted
    from training.logs import newest_logged_ts_ms as newest_ts_ms

    y9999 = 253_402_300_000_000
    now = T0 + 10 * HOUR
    put(tmp_path, IMPRESSIONS_DIR, impressions(["a", "b", "late", "ahead"], [T0, T0 + HOUR, y9999, now + 2 * HOUR],
                                               ["pass"] * 4), T0)
    put(tmp_path, OUTCOMES_DIR, outcomes([("a", "click", T0 + 1_000), ("b", "click", y9999)]), T0)
    logs = load_logs(tmp_path, attribution=Attribution(WIN.windows_s, now_ms=now))
    c = logs.info["counts"]
    assert sorted(logs.request_id.tolist()) == ["a", "b"]
    assert c["out_of_range_impressions"] == 2 and c["out_of_range_outcomes"] == 1
    assert logs.info["as_of_ms"] == T0 + 1_000  # the newest in-range outcome, not year 9999
    assert newest_ts_ms(tmp_path, now_ms=now) == T0 + HOUR
