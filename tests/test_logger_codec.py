"""The logger's decoding and table logic, and the simulator's funnel timing, without a broker."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stream.events import encode_decisions, encode_outcome
from stream.logger.codec import (
    concat,
    decision_schema,
    decode_decisions_generic,
    decode_outcomes_generic,
    decode_requests_generic,
)
from stream.logger.schema import MAX_LOG_TS_MS, partition_dir, reserved_columns
from training.outcomes import MEDIAN_DELAY_S, outcome_times

TASKS = ("click", "online", "cart", "deal")


def _req(rid: str, features: dict, ts: int = 1000) -> bytes:
    return orjson.dumps({"v": 1, "request_id": rid, "ts_ms": ts, "features": features})


def test_request_features_are_typed_per_column_and_bad_rows_counted():
    values = [
        _req("a", {"x": 1, "city": "c1", "score": 3.0}),
        _req("b", {"x": 2.5, "city": 7}),  # an integer among strings: a string column, like the worker
        _req("c", {"city": None, "x": None, "new": "n"}),  # other keys, other order: the slow path
        _req("d", {"x": True}),  # a boolean feature: the value is odd, the row stays (issue 27)
        _req("e", {"x": [1]}),  # an array: the same
        b"{not json", None, _req("", {}), b'{"v": 1, "request_id": "f", "ts_ms": 1, "fp": "ab", "x": [1]}',
    ]
    rows, bad, reserved = decode_requests_generic(values, np.arange(len(values)), 2, reserved_columns())
    assert rows.ids == ["a", "b", "c", "d", "e"] and bad == 4 and reserved == 1
    t = rows.table
    assert t.schema.field("x").type == pa.float64() and t.schema.field("city").type == pa.string()
    assert t["x"].to_pylist() == [1.0, 2.5, None, None, None]
    assert t["city"].to_pylist() == ["c1", "7", None, None, None]
    assert t["new"].to_pylist() == [None, None, "n", None, None] and "score" not in t.column_names
    assert t["kafka_partition"].to_pylist() == [2] * 5 and rows.offsets.tolist() == [0, 1, 2, 3, 4]
    assert rows.odd == {"feature_type": 2}


BIG = 2**63 - 25  # a 64-bit id: no float64 holds it


@pytest.mark.parametrize("path", ["arrow", "per_message"])
def test_a_64bit_integer_feature_costs_nothing_and_is_counted(path):
    """Issue 27 item 3. On main the Arrow path's safe cast raised ArrowInvalid out of the decoder
    (the logger crash-looped on one value). Break tried: `safe=False` removed -> this fails."""
    values = [_req(f"r{i}", {"x": float(i), "uid": i}) for i in range(300)]
    values[150] = _req("r150", {"x": 150.0, "uid": BIG})
    if path == "per_message":
        values.append(_req("extra", {"y": "s"}))  # other keys: the batch goes message by message
    rows, bad, _ = decode_requests_generic(values, np.arange(len(values)), 0, reserved_columns())
    assert bad == 0 and len(rows.ids) == len(values) and rows.odd == {"int_beyond_2^53": 1}
    uid = rows.table["uid"].to_pylist()
    assert uid[150] == float(BIG) and uid[149] == 149.0
    # a bundle that reads it as a categorical gets its exact decimals
    rows, bad, _ = decode_requests_generic(values, np.arange(len(values)), 0, reserved_columns(),
                                           kinds={"uid": "categorical"})
    assert bad == 0 and rows.table["uid"].to_pylist()[150] == str(BIG) and not rows.odd


def test_a_conversion_failure_costs_only_its_message(monkeypatch):
    """Whatever raises while converting a batch, the batch is retried message by message and
    only the message that fails is lost (counted malformed). Break tried: no per-message retry
    in decode_requests_generic -> the exception escapes."""
    import stream.logger.codec as codec

    real = codec._feature_array

    def fragile(values, kind, odd):
        if "boom" in values.tolist():
            raise pa.ArrowInvalid("a conversion nobody foresaw")
        return real(values, kind, odd)

    monkeypatch.setattr(codec, "_feature_array", fragile)
    monkeypatch.setattr(codec, "_read_json_batch", lambda *a: None)  # every batch per message
    values = [_req("a", {"x": 1.0, "s": "ok"}), _req("b", {"x": 2.0, "s": "boom"}), _req("c", {"x": 3, "t": 1})]
    rows, bad, _ = decode_requests_generic(values, np.arange(3), 0, reserved_columns())
    assert rows.ids == ["a", "c"] and bad == 1 and rows.offsets.tolist() == [0, 2]
    assert rows.table["x"].to_pylist() == [1.0, 3.0]


def test_fields_no_bundle_reads_never_drop_the_impression_and_bundle_features_keep_their_types():
    """Issue 27 item 4: `"gdpr": true`, objects and arrays drop nothing (the worker ignores such
    fields); an integer categorical is written as the bundle's string, so replay accepts it.
    On main the rows with odd fields were dropped as malformed and `city` was float64."""
    kinds = {"x": "numeric", "city": "categorical"}
    clean = [_req(f"q{i}", {"x": float(i), "city": i % 7, "gdpr": True, "meta": {"a": 1}, "tags": [1, 2]})
             for i in range(50)]
    mixed = [*clean, _req("q50", {"x": "high", "city": 3.5, "gdpr": False})]  # kinds the bundle cannot read
    for values in (clean, mixed):
        rows, bad, _ = decode_requests_generic(values, np.arange(len(values)), 0, reserved_columns(), kinds=kinds)
        t = rows.table
        assert bad == 0 and len(rows.ids) == len(values)
        assert t.schema.field("city").type == pa.string() and t["city"].to_pylist()[:8] == [str(i % 7) for i in range(8)]
        assert t.schema.field("x").type == pa.float64()
        assert not {"gdpr", "meta", "tags"} & set(t.column_names)
    assert t["x"].to_pylist()[-1] is None and t["city"].to_pylist()[-1] is None
    assert rows.odd["feature_type"] == 3 * 50 + 3


def test_event_times_no_hour_partition_can_name_are_malformed_not_fatal():
    # a producer sending microseconds (year ~55,000): counted as bad rows, on both decode paths
    micro = 1_735_660_800_000_000
    assert partition_dir(MAX_LOG_TS_MS) == "date=9999-12-31/hour=23"
    clean = [_req("a", {"x": 1.0}), _req("b", {"x": 2.0}, ts=micro)]  # one schema: the arrow path
    mixed = [*clean, _req("c", {"y": "s"})]  # other keys: the per-message path
    for values in (clean, mixed):
        rows, bad, _ = decode_requests_generic(values, np.arange(len(values)), 0, reserved_columns())
        assert "b" not in rows.ids and "a" in rows.ids and bad == 1
    rows, bad = decode_outcomes_generic([encode_outcome("a", "click", 5), encode_outcome("b", "deal", micro)],
                                        np.arange(2))
    assert rows.ids == ["a"] and bad == 1


def test_decisions_decode_to_the_fixed_schema_and_bad_types_are_refused():
    body = encode_decisions(["a", "b"], np.array([True, False]), ["score", "explore"], np.array([0.1, 0.2]),
                            np.array([0.01, 0.02]), np.full((2, 4), 0.5), threshold=0.123456789012,
                            target_ratio=0.3, model="m", ts_ms=5000, latency_ms=np.array([4.0, 1000.0]),
                            propensity=np.array([0.98, 0.02]), tau_u=0.7, u_tasks=np.full((2, 4), 0.05))
    wrong = orjson.loads(body[0])
    wrong["request_id"], wrong["score"] = "c", "high"
    rows, bad = decode_decisions_generic([*body, orjson.dumps(wrong), b"{}"], np.arange(4), TASKS)
    assert rows.ids == ["a", "b"] and bad == 2
    assert rows.table.schema.remove(0) == decision_schema(TASKS)
    assert rows.table["threshold"].to_pylist() == [0.123456789012] * 2
    assert rows.ts.tolist() == [4996, 4000]  # the decided request's time: ts_ms - latency_ms


def test_concat_fills_missing_columns_and_turns_a_kind_conflict_into_strings():
    a = pa.table({"request_id": ["a"], "x": pa.array([1.0]), "y": pa.array([2.0])})
    b = pa.table({"request_id": ["b"], "x": pa.array(["s"])})
    t = concat([a, b])
    assert t["x"].to_pylist() == ["1", "s"] and t["y"].to_pylist() == [2.0, None]


def test_outcomes_follow_the_funnel_and_the_time_scale():
    rng = np.random.default_rng(0)
    n = 20_000
    bits = rng.integers(0, 16, n)
    base = np.full(n, 1_000_000.0)
    t = outcome_times(bits, base, rng, time_scale=60.0)
    click, online, cart, deal = (t[e] >= 0 for e in TASKS)
    assert (click == ((bits & 1) > 0)).all()
    assert not (online & ~click).any() and not (cart & ~online).any() and not (deal & ~online).any()
    assert (t["online"][online] > t["click"][online]).all() and (t["deal"][deal] > t["online"][deal]).all()
    both = deal & cart
    assert (t["deal"][both] > t["cart"][both]).all()
    median_click_s = np.median(t["click"][click] - base[click]) / 1000.0
    assert median_click_s == pytest.approx(MEDIAN_DELAY_S["click"] / 60.0, rel=0.05)


def test_truth_chunks_are_whole_files_with_every_true_column(tmp_path: Path):
    from training.world import generate_table
    from training.world_cli import TruthChunks, truth_table

    world = generate_table(3000, seed=2)
    world = world.append_column("true_source", pa.array(["known"] * world.num_rows))
    chunks = TruthChunks(tmp_path / "truth", seed=2, rows=1000)
    for batch in world.to_batches(max_chunksize=700):
        chunks.add(truth_table(batch, np.full(batch.num_rows, 42, np.int64)))
    chunks.close()
    files = sorted((tmp_path / "truth").glob("truth-*.parquet"))
    assert len(files) == chunks.files == 3 and not list((tmp_path / "truth").glob(".*"))
    t = pq.read_table(tmp_path / "truth")
    assert t.num_rows == 3000 and t["request_id"].to_pylist() == world["request_id"].to_pylist()
    assert set(t.column_names) == {"request_id", "ts_ms", *TASKS, *(f"true_{x}" for x in TASKS), "true_source"}


@pytest.mark.parametrize("args, needle", [
    (["log"], "--out"),
    pytest.param(["log", "--out", "x", "--bootstrap", "127.0.0.1:1"], "cannot reach Kafka",
                 marks=pytest.mark.slow),  # waits out the 10 s metadata timeout
    (["log", "--out", "x", "--roll-seconds", "0"], "--roll-seconds"),
    (["world", "outcomes", "--truth", "t", "--time-scale", "0"], "--time-scale"),
])
def test_bad_logger_and_simulator_args_are_one_line_errors(args, needle, tmp_path: Path):
    r = subprocess.run([sys.executable, "-m", "infra.cli", *args], capture_output=True, text=True,
                       timeout=60, cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "RTA_STATE_DIR": str(tmp_path),
                                                      "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    lines = [line for line in r.stderr.strip().splitlines() if not line.startswith("%")]  # librdkafka's own
    assert r.returncode == 2 and len(lines) == 1 and needle in lines[0], r.stderr[-2000:]


def test_positional_requests_are_named_by_a_bundle_spec_and_equal_canonical_ones(tmp_path: Path):
    from student_data import random_batch

    from stream.events import encode_requests, encode_requests_positional
    from stream.logger.service import bundle_specs

    spec, num, cat = random_batch(300, seed=4)
    ids, ts = [f"q{i}" for i in range(300)], np.arange(300, dtype=np.int64)
    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "manifest.json").write_bytes(orjson.dumps({"feature_spec": spec.to_dict()}))
    specs = bundle_specs(tmp_path)
    assert specs == {spec.fingerprint(): spec.names}
    offs = np.arange(300)
    canonical, bad_c, _ = decode_requests_generic(encode_requests(ids, ts, num, cat, spec), offs, 0, reserved_columns())
    positional_values = encode_requests_positional(ids, ts, num, cat, spec)
    named, bad_p, _ = decode_requests_generic(positional_values, offs, 0, reserved_columns(), positional=specs)
    assert bad_c == bad_p == 0 and named.table.equals(canonical.table)
    unknown, bad_u, _ = decode_requests_generic(positional_values, offs, 0, reserved_columns())
    assert bad_u == 300 and unknown.table.num_rows == 0


def test_the_join_aligns_pairs_compacts_mostly_resolved_batches_and_holds_commits(tmp_path: Path):
    """The join state machine driven directly (its consumer never connects: no broker needed)."""
    from stream.config import Settings
    from stream.logger.service import Logger, LoggerConfig

    settings = Settings(kafka_bootstrap="127.0.0.1:1", model_dir=tmp_path / "models")
    lg = Logger(settings, LoggerConfig(out_dir=tmp_path / "log", roll_seconds=3600))
    rt, dt = settings.topic("requests"), settings.topic("decisions")
    try:
        n = 2000
        ids = [f"j{i}" for i in range(n)]
        reqs = [_req(r, {"x": i}, ts=10_000 + i) for i, r in enumerate(ids)]
        score = np.arange(n) / n
        decs = encode_decisions(ids, np.zeros(n, bool), ["score"] * n, score, score, np.zeros((n, 4)),
                                threshold=0.5, target_ratio=0.3, model="m", ts_ms=20_000, latency_ms=0.0)
        rows, _, _ = decode_requests_generic(reqs, np.arange(n), 0, reserved_columns())
        lg._on_requests((rt, 0), rows, 0.0)
        # decisions for all but the last ten, in reverse order and two batches
        late = n - 10
        order = np.arange(late)[::-1]
        for part in np.array_split(order, 2):
            d, _ = decode_decisions_generic([decs[i] for i in part], part + 100, TASKS)
            lg._on_decisions((dt, 0), d, 0.0)
        (b,) = lg._req.values()
        assert len(b.ids) == 10 and b.n_alive == 10  # compacted: only the waiting rows are kept
        assert all(lg._req_index[r][0] is b for r in ids[late:])
        lg._next = {(rt, 0): n, (dt, 0): late + 100}
        lg.assignment = {(rt, 0), (dt, 0)}
        held = {(tp.topic, tp.partition): tp.offset for tp in lg.committable()}
        assert held == {(rt, 0): 0, (dt, 0): 100}  # the open file holds everything from the first row
        d, _ = decode_decisions_generic(decs[late:], np.arange(late, n) + 100, TASKS)
        lg._on_decisions((dt, 0), d, 0.0)
        lg._next[(dt, 0)] = n + 100
        assert not lg._req and not lg._req_index and not lg._dec_index
        lg.roll(due_only=False)
        held = {(tp.topic, tp.partition): tp.offset for tp in lg.committable()}
        assert held == {(rt, 0): n, (dt, 0): n + 100}  # renamed: everything may commit
        t = pq.read_table(tmp_path / "log" / "impressions").sort_by("ts_ms")
        assert t["request_id"].to_pylist() == ids
        assert t["x"].to_pylist() == list(range(n)) and t["score"].to_pylist() == score.tolist()
    finally:
        lg.consumer.close()


def test_open_files_beyond_the_cap_roll_oldest_first(tmp_path: Path):
    from stream.logger.files import _Sink

    sink = _Sink(tmp_path, "impressions", "p", lambda t: t)
    for h in range(5):
        sink.add(pa.table({"request_id": [f"r{h}"], "ts_ms": [h * 3_600_000]}), {})
    assert sink.due(0.0, 1 << 30, 1e9, max_open=3) == [0, 1]


@pytest.mark.parametrize("typed", [False, True])
def test_the_one_call_arrow_path_equals_the_per_message_path(monkeypatch, typed: bool):
    """A clean batch takes pyarrow's JSON reader; it must give exactly the per-message result,
    with or without the bundle's feature kinds."""
    from student_data import random_batch

    import stream.logger.codec as lg
    from stream.events import encode_requests

    spec, num, cat = random_batch(500, seed=5)
    ids, ts = [f"z{i}" for i in range(500)], np.arange(500, dtype=np.int64) + 7
    reqs = encode_requests(ids, ts, num, cat, spec)
    rng = np.random.default_rng(1)
    reason = np.where(rng.random(500) < 0.05, "invalid", "score")  # invalid: null score, p, u
    decs = encode_decisions(ids, rng.random(500) < 0.3, reason, rng.random(500), rng.random(500),
                            rng.random((500, 4)), threshold=0.25, target_ratio=0.3, model="m", ts_ms=ts + 9,
                            latency_ms=np.where(rng.random(500) < 0.05, np.nan, 2.0), propensity=0.98,
                            tau_u=0.5, u_tasks=rng.random((500, 4)))
    offs = np.arange(500)
    kinds = {**dict.fromkeys(spec.numeric, "numeric"), **dict.fromkeys(spec.categorical, "categorical")} if typed else {}
    fast_r = lg._decode_requests_arrow(reqs, offs, 1, reserved_columns(), 65536, kinds)
    fast_d = lg._decode_decisions_arrow(decs, offs, TASKS)
    assert fast_r is not None and fast_d is not None
    monkeypatch.setattr(lg, "_decode_requests_arrow", lambda *a: None)
    monkeypatch.setattr(lg, "_decode_decisions_arrow", lambda *a: None)
    slow_r = decode_requests_generic(reqs, offs, 1, reserved_columns(), kinds=kinds)
    slow_d = decode_decisions_generic(decs, offs, TASKS)
    for fast, slow in ((fast_r[0], slow_r[0]), (fast_d[0], slow_d[0])):
        assert fast.table.equals(slow.table) and fast.ids == slow.ids
        assert (fast.ts == slow.ts).all() and (fast.offsets == slow.offsets).all()


def test_a_dirty_batch_is_refused_by_the_arrow_path():
    import stream.logger.codec as lg

    clean = [_req(f"a{i}", {"x": i}) for i in range(3)]
    assert lg._decode_requests_arrow(clean, np.arange(3), 0, reserved_columns(), 65536, {}) is not None
    for dirty in ([*clean, b"not json"], [*clean, None], [*clean, _req("b", {"x": "s"})],
                  [*clean, _req("c", {"x": True})], [*clean, b'{"v": 2, "request_id": "d", "ts_ms": 1, "features": {}}'],
                  [*clean, b'{"v": 1, "request_id": "e",\n "ts_ms": 1, "features": {}}']):
        assert lg._decode_requests_arrow(dirty, np.arange(len(dirty)), 0, reserved_columns(), 65536, {}) is None


def test_a_crashed_writers_temp_files_are_removed_at_start_and_fresh_ones_kept(tmp_path: Path):
    """Issue 27 item 9: a temp file older than one write is a crash's leftover (never renamed, so
    none of its offsets were committed); a fresh one may be another live writer's."""
    import os
    import time

    from stream.config import Settings
    from stream.logger.service import Logger, LoggerConfig

    d = tmp_path / "log" / "impressions" / "date=2025-01-01" / "hour=00"
    d.mkdir(parents=True)
    stale, fresh = d / ".part-a-000001.parquet.tmp", d / ".part-b-000001.parquet.tmp"
    for f in (stale, fresh):
        f.write_bytes(b"PAR1")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    lg = Logger(Settings(kafka_bootstrap="127.0.0.1:1", model_dir=tmp_path / "models"),
                LoggerConfig(out_dir=tmp_path / "log"))
    lg.consumer.close()
    assert lg.stats.temp_files_removed == 1 and not stale.exists() and fresh.exists()


def test_a_decision_of_a_request_stamped_ahead_moves_no_watermark_even_in_a_backlog(tmp_path: Path):
    """Found by the full logger soak: after a 120 s stall the worker decided a request stamped 10
    minutes ahead ~2 minutes late; bounded by its decision's broker time (+10 s) it still moved the
    decisions' watermark ~2 minutes past the requests waiting for theirs, which were written
    without a decision. An outlier now never moves a watermark. Break tried: bounding the outlier
    by broker time + slack (the first fix) -> ten orphans here."""
    from stream.config import Settings
    from stream.logger.service import Logger, LoggerConfig

    settings = Settings(kafka_bootstrap="127.0.0.1:1", model_dir=tmp_path / "models")
    lg = Logger(settings, LoggerConfig(out_dir=tmp_path / "log", roll_seconds=3600, join_timeout_s=60))
    rt, dt = settings.topic("requests"), settings.topic("decisions")
    try:
        t = 1_764_000_000_000
        ids = [f"b{i}" for i in range(10)] + ["ahead"]
        ts = np.r_[t + np.arange(10) * 100, t + 600_000].astype(np.int64)
        reqs = [_req(r, {"x": 1.0}, ts=int(x)) for r, x in zip(ids, ts, strict=True)]
        rows, _, _ = decode_requests_generic(reqs, np.arange(11), 0, reserved_columns())
        lg._on_requests((rt, 0), rows, 0.0, broker_ts=np.full(11, t + 1000))
        assert lg.stats.odd["future_ts"] == 1
        # the worker, back from a stall, decides "ahead" first, 300 s after it was offered
        late = t + 300_000
        body = encode_decisions(["ahead"], np.zeros(1, bool), ["score"], np.ones(1), np.ones(1), np.ones((1, 4)),
                                threshold=0.5, target_ratio=0.3, model="m", ts_ms=late,
                                latency_ms=np.array([late - (t + 600_000)], float))
        d, _ = decode_decisions_generic(body, np.arange(1), TASKS)
        lg._on_decisions((dt, 0), d, 0.0, broker_ts=np.full(1, late))
        lg.expire(0.0)
        assert lg.stats.orphan_requests == 0 and len(lg._req_index) == 10
        bodies = encode_decisions(ids[:10], np.zeros(10, bool), ["score"] * 10, np.ones(10), np.ones(10),
                                  np.ones((10, 4)), threshold=0.5, target_ratio=0.3, model="m", ts_ms=late + 5,
                                  latency_ms=(late + 5 - ts[:10]).astype(float))
        d, _ = decode_decisions_generic(bodies, np.arange(1, 11), TASKS)
        lg._on_decisions((dt, 0), d, 0.0, broker_ts=np.full(10, late + 5))
        assert not lg._req_index and lg.stats.orphan_requests == 0
    finally:
        lg.consumer.close()


def test_an_integer_categorical_is_logged_as_the_bundle_reads_it_and_the_trainer_agrees(tmp_path: Path):
    """Issue 27 item 4, through the logger and the production reader: a bundle's categorical fed
    integers is written as strings, so `load_logged` (what rta train and replay read) sees a
    categorical. On main it was float64: a numeric feature, which replay refuses for the bundle."""
    from stream.config import Settings
    from stream.features import FeatureSpec
    from stream.logger.service import Logger, LoggerConfig
    from training.logs import load_logged

    models = tmp_path / "models"
    (models / "v1").mkdir(parents=True)
    spec = FeatureSpec(("x",), ("city",))
    (models / "v1" / "manifest.json").write_bytes(orjson.dumps({"feature_spec": spec.to_dict()}))
    settings = Settings(kafka_bootstrap="127.0.0.1:1", model_dir=models)
    lg = Logger(settings, LoggerConfig(out_dir=tmp_path / "log", roll_seconds=3600))
    rt, dt = settings.topic("requests"), settings.topic("decisions")
    try:
        n, t = 40, 1_764_000_000_000
        ids = [f"k{i}" for i in range(n)]
        reqs = [_req(r, {"x": float(i), "city": i % 5, "gdpr": True}, ts=t + i) for i, r in enumerate(ids)]
        rows, bad, _ = decode_requests_generic(reqs, np.arange(n), 0, reserved_columns(), kinds=lg._kinds)
        lg._on_requests((rt, 0), rows, 0.0)
        decs = encode_decisions(ids, np.zeros(n, bool), ["score"] * n, np.ones(n), np.ones(n), np.ones((n, 4)),
                                threshold=0.5, target_ratio=0.3, model="v1", ts_ms=t + 100, latency_ms=1.0)
        d, _ = decode_decisions_generic(decs, np.arange(n), TASKS)
        lg._on_decisions((dt, 0), d, 0.0)
        lg.roll(due_only=False)
    finally:
        lg.consumer.close()
    logs = load_logged(tmp_path / "log")
    assert bad == 0 and len(logs) == n and logs.spec.categorical == ("city",) and logs.spec.numeric == ("x",)
    assert sorted(set(logs.cat[:, 0].tolist())) == ["0", "1", "2", "3", "4"]


def test_a_silent_requests_partition_the_logger_is_behind_on_is_not_idle(tmp_path: Path):
    """Found by a second full soak: a requests partition resumed after a long pause had delivered
    nothing "for 60 s", so it counted as idle and the decisions waiting for its unread requests
    were dropped (8,367 in one logger; their requests then waited for ever). Idle now needs it read
    to its end (position at the high watermark; this consumer never fetched: not at its end).
    Break tried: the silence test alone -> the decision is dropped here."""
    import time

    from stream.config import Settings
    from stream.logger.service import Logger, LoggerConfig

    settings = Settings(kafka_bootstrap="127.0.0.1:1", model_dir=tmp_path / "models")
    lg = Logger(settings, LoggerConfig(out_dir=tmp_path / "log", roll_seconds=3600, idle_s=1.0))
    rt, dt = settings.topic("requests"), settings.topic("decisions")
    try:
        t = int(time.time() * 1000) - 600_000  # decided 10 minutes ago: far behind the wall clock
        body = encode_decisions(["d0"], np.zeros(1, bool), ["score"], np.ones(1), np.ones(1), np.ones((1, 4)),
                                threshold=0.5, target_ratio=0.3, model="m", ts_ms=t, latency_ms=1.0)
        d, _ = decode_decisions_generic(body, np.arange(1), TASKS)
        lg.assignment = {(rt, 0), (dt, 0)}
        lg._on_decisions((dt, 0), d, 0.0, broker_ts=np.full(1, t))
        lg._next[(rt, 0)] = 500  # it delivered requests before (its position: this consumer never fetched)
        lg._last_msg[(rt, 0)] = time.monotonic() - 120  # silent for 2 minutes (it was paused)
        lg.expire(time.monotonic())
        assert lg.stats.orphan_decisions == 0 and "d0" in lg._dec_index
        # a restarted logger whose requests partition had nothing left to read (all committed)
        # and delivered nothing since: at its end, so the replayed decision goes (a third full
        # soak held the decisions' commit on such decisions for ever)
        del lg._next[(rt, 0)]
        lg.expire(time.monotonic())
        assert lg.stats.orphan_decisions == 1 and not lg._dec_index
    finally:
        lg.consumer.close()
