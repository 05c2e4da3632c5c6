"""The synthetic world: base rates, funnel, truth calibration, determinism, CLI errors, streaming."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stream.features import CATEGORICAL, NUMERIC
from training.world import (
    META_FILE,
    TASKS,
    WorldConfig,
    feature_kinds,
    generate_table,
    write,
)

ROWS = 200_000


@pytest.fixture(scope="module")
def table() -> pa.Table:
    return generate_table(ROWS, seed=11)


def _labels(table: pa.Table) -> dict[str, np.ndarray]:
    return {t: table[t].to_numpy() for t in TASKS}


def _auc(y: np.ndarray, p: np.ndarray) -> float:
    ranks = np.empty(len(p))
    ranks[np.argsort(p, kind="stable")] = np.arange(1, len(p) + 1)
    n1 = y.sum()
    return float((ranks[y == 1].sum() - n1 * (n1 + 1) / 2) / (n1 * (len(y) - n1)))


def test_base_rates_in_the_papers_regime(table: pa.Table) -> None:
    rates = {t: float(v.mean()) for t, v in _labels(table).items()}
    assert 0.40 <= rates["click"] <= 0.60, rates
    assert 0.20 <= rates["online"] <= 0.40, rates
    assert 0.02 <= rates["cart"] <= 0.06, rates
    assert 0.005 <= rates["deal"] <= 0.02, rates


def test_funnel_consistency(table: pa.Table) -> None:
    y = _labels(table)
    assert np.all(y["online"] <= y["click"])
    assert np.all(y["cart"] <= y["online"])
    assert np.all(y["deal"] <= y["online"])
    # deal does not require cart, but a cart makes it far more likely
    assert np.any((y["deal"] == 1) & (y["cart"] == 0))
    assert y["deal"][y["cart"] == 1].mean() > 3 * y["deal"][y["cart"] == 0].mean()
    t = {k: table[f"true_{k}"].to_numpy() for k in TASKS}
    assert np.all(t["online"] <= t["click"] + 1e-6)
    assert np.all(t["cart"] <= t["online"] + 1e-6)
    assert np.all(t["deal"] <= t["online"] + 1e-6)


@pytest.mark.parametrize("task", TASKS)
def test_true_probabilities_match_label_frequencies(table: pa.Table, task: str) -> None:
    y = table[task].to_numpy().astype(float)
    p = table[f"true_{task}"].to_numpy().astype(float)
    bins = 10 if task in ("click", "online") else 5
    edges = np.quantile(p, np.linspace(0, 1, bins + 1))
    which = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, bins - 1)
    for b in range(bins):
        m = which == b
        mean_p, mean_y, n = p[m].mean(), y[m].mean(), m.sum()
        se = np.sqrt(max(mean_p * (1 - mean_p), 1e-6) / n)
        assert abs(mean_y - mean_p) < 4.5 * se + 1e-3, (task, b, mean_p, mean_y, n)


def test_truth_is_ambiguous_informative_and_tasks_correlate(table: pa.Table) -> None:
    y = _labels(table)
    pc = table["true_click"].to_numpy()
    # aleatoric ambiguity: many rows could end either way
    assert np.mean((pc > 0.2) & (pc < 0.8)) > 0.4
    # features carry signal, but the oracle is far from perfect
    for task in TASKS:
        auc = _auc(y[task], table[f"true_{task}"].to_numpy())
        assert 0.7 < auc < 0.97, (task, auc)
    # the shared latent intent makes tasks correlate
    assert np.corrcoef(table["true_click"].to_numpy(), table["true_deal"].to_numpy())[0, 1] > 0.2


def test_sparse_regions_behave_differently(table: pa.Table) -> None:
    seg = table["user_segment"].cast(pa.string()).to_numpy(zero_copy_only=False)
    deal = table["deal"].to_numpy()
    b2b = seg == "b2b"
    assert 0 < b2b.mean() < 0.01
    assert deal[b2b].mean() > 4 * deal.mean()
    # the Zipf tail: many device models are seen only a handful of times
    counts = np.asarray(table["device_model"].combine_chunks().value_counts().field("counts"))
    assert len(counts) > 1000
    assert np.sum(counts <= 5) > 300


def test_feature_kinds_from_dtypes(table: pa.Table) -> None:
    kinds = feature_kinds(table.schema)
    cfg = WorldConfig()
    assert list(kinds.items()) == cfg.feature_names()
    assert len(kinds) == 108
    n_cat = sum(k == CATEGORICAL for k in kinds.values())
    assert 20 <= n_cat <= 50 and sum(k == NUMERIC for k in kinds.values()) == 108 - n_cat
    assert table.schema.field("click").type == pa.int8()
    assert table.schema.field("true_deal").type == pa.float32()
    assert table.schema.field("ts_ms").type == pa.int64()
    # missing values at varying rates; high-cardinality categoricals
    rates = sorted(table[n].null_count / table.num_rows for n in kinds)
    assert rates[0] == 0 and rates[-1] > 0.4 and len({round(r, 2) for r in rates}) > 8
    assert len(pa.compute.unique(table["city"].combine_chunks().dictionary)) >= 1000
    assert np.all(np.diff(table["ts_ms"].to_numpy()) >= 0)


def test_feature_count_is_configurable() -> None:
    for n in (28, 40, 120):
        t = generate_table(500, seed=1, config=WorldConfig(features=n))
        assert len(feature_kinds(t.schema)) == n
    # the label model reads only the first 28: truth does not change with the feature count
    a = generate_table(500, seed=1, config=WorldConfig(features=28))
    b = generate_table(500, seed=1, config=WorldConfig(features=120))
    assert a["true_deal"].equals(b["true_deal"]) and a["deal"].equals(b["deal"])


def test_drift_moves_rates_over_time() -> None:
    t = generate_table(60_000, seed=2, config=WorldConfig(drift=2.0))
    c = t["true_click"].to_numpy()
    d = t["true_deal"].to_numpy()
    q = len(c) // 4
    assert c[:q].mean() > c[-q:].mean() + 0.05
    assert d[-q:].mean() > 1.3 * d[:q].mean()


def _digest(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def test_same_seed_gives_byte_identical_files(tmp_path: Path) -> None:
    write(tmp_path / "a", 40_000, seed=5, progress=False)
    write(tmp_path / "b", 40_000, seed=5, progress=False)
    write(tmp_path / "c", 40_000, seed=6, progress=False)
    write(tmp_path / "d", 40_000, seed=5, shards=3, progress=False)
    a = _digest(tmp_path / "a")
    assert set(a) == {"part-00000.parquet", META_FILE}
    assert a == _digest(tmp_path / "b")
    assert a["part-00000.parquet"] != _digest(tmp_path / "c")["part-00000.parquet"]
    # sharding changes files, never content; the directory reads as one dataset
    assert len(list((tmp_path / "d").glob("part-*.parquet"))) == 3
    assert pq.read_table(tmp_path / "a").equals(pq.read_table(tmp_path / "d"))
    # different seeds are different samples of the same world
    ta, tc = pq.read_table(tmp_path / "a"), pq.read_table(tmp_path / "c")
    assert not ta["tenure_days"].equals(tc["tenure_days"])
    assert abs(np.mean(ta["click"]) - np.mean(tc["click"])) < 0.02


def _rta(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "infra.cli", *args], capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("args, needle", [
    (["--rows", "0"], "--rows"),
    (["--rows", "10", "--features", "5"], "--features"),
    (["--rows", "10", "--drift", "nan"], "drift"),
    (["--rows", "3", "--shards", "5"], "--shards"),
    (["--rows", "ten"], "--rows"),
])
def test_bad_generate_args_are_one_line_errors(args: list[str], needle: str, tmp_path: Path) -> None:
    r = _rta("world", "generate", "--out", str(tmp_path / "w"), *args)
    assert r.returncode == 2, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in r.stderr, r.stderr


def test_generate_cli_writes_the_log(tmp_path: Path) -> None:
    r = _rta("world", "generate", "--rows", "3000", "--seed", "7", "--out", str(tmp_path / "w"),
             "--quiet")
    assert r.returncode == 0, r.stderr
    assert '"rows": 3000' in r.stdout
    t = pq.read_table(tmp_path / "w")
    assert t.num_rows == 3000 and t["request_id"][0].as_py() == "w7-0000000000"


# ----------------------------------------------------------------------------- streaming
def _consume(settings, n: int, timeout: float = 30.0) -> list:
    from confluent_kafka import OFFSET_BEGINNING, TopicPartition

    from stream.kafka import make_consumer

    # assign, not subscribe: no group join to wait for
    topic = settings.topic("requests")
    consumer = make_consumer(settings, group_id=f"world-test-{uuid.uuid4().hex[:8]}")
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(settings.partitions)])
    got, deadline = [], time.monotonic() + timeout
    try:
        while len(got) < n and time.monotonic() < deadline:
            for m in consumer.consume(500, timeout=0.5):
                if m.error() is None:
                    got.append(m)
    finally:
        consumer.close()
    return got


def test_stream_publishes_canonical_requests_and_truth(settings, tmp_path: Path) -> None:
    from stream.events import decode_requests
    from training.world_cli import stream_requests

    truth = tmp_path / "truth.parquet"
    cfg = WorldConfig()
    started = time.monotonic()
    summary = stream_requests(settings, count=300, rate=1000, seed=4, config=cfg, truth_out=truth)
    assert time.monotonic() - started >= 0.25  # rate-limited: 300 events at 1000/s
    assert summary["sent"] == summary["delivered"] == 300 and summary["failed"] == 0
    msgs = _consume(settings, 300)
    assert len(msgs) == 300
    batch = decode_requests([m.value() for m in msgs], [m.key() for m in msgs], cfg.feature_spec())
    assert batch.valid.all(), batch.errors[:3]
    assert all(m.key().decode() == rid for m, rid in zip(msgs, batch.request_id, strict=True))
    # the events carry exactly the world's rows: same ids and features as the log sample
    world = generate_table(300, seed=4, config=cfg)
    order = {rid: i for i, rid in enumerate(world["request_id"].to_pylist())}
    rows = np.array([order[r] for r in batch.request_id])
    spec = cfg.feature_spec()
    for j, name in enumerate(spec.numeric[:20]):
        expect = world[name].to_numpy(zero_copy_only=False).astype(np.float32)[rows]
        np.testing.assert_array_equal(batch.num[:, j], expect, err_msg=name)
    j = spec.categorical.index("device_model")
    expect = world["device_model"].cast(pa.string()).fill_null("").to_numpy(zero_copy_only=False)[rows]
    assert list(batch.cat[:, j]) == list(expect)
    t = pq.read_table(truth)
    assert t.num_rows == 300 and set(t["request_id"].to_pylist()) == set(batch.request_id)
    assert t["true_deal"].equals(world["true_deal"])


def test_stream_positional_carries_the_fingerprint(settings) -> None:
    from stream.events import decode_requests
    from stream.features import FeatureSpec
    from training.world_cli import stream_requests

    spec = FeatureSpec(("ctr_30d", "tenure_days", "device_price"), ("city", "channel"))
    summary = stream_requests(settings, count=50, rate=0, seed=1, spec=spec, positional=True)
    assert summary["fingerprint"] == spec.fingerprint() and summary["delivered"] == 50
    msgs = _consume(settings, 50)
    batch = decode_requests([m.value() for m in msgs], [m.key() for m in msgs], spec)
    assert len(msgs) == 50 and batch.valid.all(), batch.errors[:3]
    assert b'"fp"' in msgs[0].value()
    other = FeatureSpec(("tenure_days", "ctr_30d", "device_price"), ("city", "channel"))
    wrong = decode_requests([m.value() for m in msgs], None, other)
    assert not wrong.valid.any()


def test_stream_to_a_missing_topic_is_a_one_line_error(settings) -> None:
    from dataclasses import replace

    from stream.errors import StackError
    from training.world_cli import stream_requests

    missing = replace(settings, topics={**settings.topics, "requests": f"nope.{uuid.uuid4().hex}"})
    with pytest.raises(StackError, match="does not exist"):
        stream_requests(missing, count=5)


def test_stream_cli_sends_and_reports(settings, tmp_path: Path) -> None:
    import json
    import os

    env = {**os.environ, "RTA_TOPIC_REQUESTS": settings.topic("requests"),
           "RTA_STATE_DIR": str(tmp_path / ".rta")}
    r = subprocess.run([sys.executable, "-m", "infra.cli", "world", "stream", "--count", "40",
                        "--rate", "0", "--seed", "3", "--bootstrap", settings.kafka_bootstrap, "--quiet"],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["delivered"] == 40 and summary["first_request_id"] == "w3-0000000000"
    assert len(_consume(settings, 40)) == 40


@pytest.mark.parametrize("args, needle", [
    (["--count", "5", "--positional"], "--model-dir"),
    (["--count", "0"], "--count"),
    (["--count", "5", "--rate", "-1"], "--rate"),
    (["--count", "5", "--model-dir", "."], "bundle"),
])
def test_bad_stream_args_are_one_line_errors(args: list[str], needle: str) -> None:
    r = _rta("world", "stream", "--bootstrap", "127.0.0.1:1", *args)
    assert r.returncode == 2, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in r.stderr, r.stderr


# ----------------------------------------------------------------------------- shifts
SHIFTED = WorldConfig(new_source_from=0.5, drift_source_from=0.5)


@pytest.fixture(scope="module")
def shifted() -> pa.Table:
    return generate_table(80_000, seed=12, config=SHIFTED)


def _sources(t: pa.Table) -> np.ndarray:
    return t["true_source"].cast(pa.string()).to_numpy(zero_copy_only=False)


def test_shifts_start_at_their_row_with_their_shares(shifted: pa.Table) -> None:
    src = _sources(shifted)
    before, after = src[:40_000], src[40_000:]
    assert set(before) == {"known"}
    new, drift = (after == "new").mean(), (after == "drift").mean()
    assert abs(new - 0.05) < 0.006, new
    assert abs(drift / (1 - new) - 0.10) < 0.01, drift
    # the rows before the shift are the unshifted world's rows (the shift has its own stream)
    plain = generate_table(80_000, seed=12).slice(0, 40_000)
    for name in plain.column_names:
        a, b = plain[name], shifted[name].slice(0, 40_000)
        if pa.types.is_dictionary(a.type):
            a, b = a.cast(pa.string()), b.cast(pa.string())
        assert a.equals(b), name
    assert "true_source" not in plain.column_names
    share = generate_table(80_000, seed=12, config=WorldConfig(new_source_from=0.5, new_source_share=0.2))
    assert abs((_sources(share)[40_000:] == "new").mean() - 0.2) < 0.01


def test_new_source_has_high_intent(shifted: pa.Table) -> None:
    src = _sources(shifted)
    new, known = src == "new", (src == "known") & (np.arange(len(src)) >= 40_000)
    for task, factor in (("click", 1.1), ("cart", 1.5), ("deal", 2.5)):
        truth = shifted[f"true_{task}"].to_numpy()
        assert truth[new].mean() > factor * truth[known].mean(), task
    deal = shifted["deal"].to_numpy()
    assert deal[new].mean() > 2.5 * deal[known].mean()
    # the funnel still holds for the new source
    y = _labels(shifted)
    assert np.all(y["online"][new] <= y["click"][new]) and np.all(y["deal"][new] <= y["online"][new])


def test_new_source_is_out_of_distribution(shifted: pa.Table) -> None:
    from training.world import NEW_ID_PREFIX, NEW_SOURCE_IDS, NEW_SOURCE_UNITS

    src = _sources(shifted)
    new, known = src == "new", src == "known"
    for name in NEW_SOURCE_IDS:
        values = shifted[name].cast(pa.string()).to_numpy(zero_copy_only=False)
        seen = set(values[known]) - {None}
        fresh = values[new]
        fresh = fresh[fresh != None]  # noqa: E711 (object array of str/None)
        assert len(fresh) and all(v.startswith(NEW_ID_PREFIX) and v not in seen for v in fresh), name
    for name, factor in NEW_SOURCE_UNITS.items():
        x = shifted[name].to_numpy(zero_copy_only=False)
        mean_new, mean_known = np.nanmean(x[new]), np.nanmean(x[known])
        assert mean_new > 0.5 * factor * mean_known, (name, mean_new, mean_known)
        # most of the new source's non-zero values lie above what 99 % of known rows log
        logged = x[new][~np.isnan(x[new]) & (x[new] != 0)]
        assert np.mean(logged > np.nanquantile(x[known], 0.99)) > 0.5, name


def test_drifting_source_scales_up_over_time_with_known_labels(shifted: pa.Table) -> None:
    from training.world import DRIFT_SOURCE_COLUMNS

    src = _sources(shifted)
    rows = np.arange(len(src))
    drift = src == "drift"
    dwell = shifted[DRIFT_SOURCE_COLUMNS[0]].to_numpy()
    early, late = drift & (rows < 50_000), drift & (rows >= 70_000)
    known = src == "known"
    ratio_late = np.median(dwell[late]) / np.median(dwell[known])
    ratio_early = np.median(dwell[early]) / np.median(dwell[known])
    assert ratio_early < 3 < 7 < ratio_late, (ratio_early, ratio_late)
    # same users as known traffic: its categories are known ones and its rates those of known rows
    dm = shifted["device_model"].cast(pa.string()).to_numpy(zero_copy_only=False)
    assert not any(str(v).startswith("nx-") for v in dm[drift])
    deal = shifted["true_deal"].to_numpy()
    assert abs(deal[drift].mean() - deal[known].mean()) < 0.3 * deal[known].mean()


def test_periods_split_in_time_and_are_deterministic(tmp_path: Path) -> None:
    cfg = WorldConfig(new_source_from=0.6)
    write(tmp_path / "all", 30_000, seed=4, config=cfg, progress=False)
    b = write(tmp_path / "before", 30_000, seed=4, config=cfg, progress=False, period="before")
    a = write(tmp_path / "after", 30_000, seed=4, config=cfg, progress=False, period="after", shards=2)
    assert (b["rows"], a["rows"]) == (18_000, 12_000)
    assert b["sources"]["new"] == 0 and 0.03 < a["sources"]["new"] < 0.07
    whole = pq.read_table(tmp_path / "all")
    both = pa.concat_tables([pq.read_table(tmp_path / "before"), pq.read_table(tmp_path / "after")])
    assert both.equals(whole)
    assert pq.read_table(tmp_path / "before")["ts_ms"].to_numpy().max() <= whole["ts_ms"].to_numpy()[18_000]
    write(tmp_path / "again", 30_000, seed=4, config=cfg, progress=False, period="after", shards=2)
    assert _digest(tmp_path / "again") == _digest(tmp_path / "after")


@pytest.mark.parametrize("args, needle", [
    (["--rows", "100", "--period", "after"], "needs a shift"),
    (["--rows", "100", "--new-source-from", "1.5"], "--new-source-from"),
    (["--rows", "100", "--new-source-from", "0.5", "--new-source-share", "0"], "--new-source-share"),
    (["--rows", "100", "--drift-source-from", "0.5", "--drift-source-scale", "0.5"], "--drift-source-scale"),
])
def test_bad_shift_args_are_one_line_errors(args: list[str], needle: str, tmp_path: Path) -> None:
    r = _rta("world", "generate", "--out", str(tmp_path / "w"), *args)
    assert r.returncode != 0, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in r.stderr, r.stderr


def test_generate_cli_with_a_new_source_reports_sources(tmp_path: Path) -> None:
    import json

    r = _rta("world", "generate", "--rows", "20000", "--seed", "2", "--new-source-from", "0.5",
             "--period", "after", "--out", str(tmp_path / "w"), "--quiet")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["rows"] == 10_000 and 0.03 < out["sources"]["new"] < 0.07
    t = pq.read_table(tmp_path / "w")
    assert set(t["true_source"].cast(pa.string()).to_pylist()) == {"known", "new"}


def test_new_source_in_smaller_units_changes_only_its_own_rows(shifted: pa.Table) -> None:
    from training.world import NEW_SOURCE_UNITS_SMALLER

    small = generate_table(80_000, seed=12, config=WorldConfig(new_source_from=0.5, drift_source_from=0.5,
                                                               new_source_units="smaller"))
    src = _sources(small)
    new, known = src == "new", src == "known"
    assert np.array_equal(src, _sources(shifted))
    assert small["true_deal"].equals(shifted["true_deal"]) and small["deal"].equals(shifted["deal"])
    for name, factor in NEW_SOURCE_UNITS_SMALLER.items():
        x = small[name].to_numpy(zero_copy_only=False)
        assert np.nanmean(x[new]) < 2 * factor * np.nanmean(x[known]), name
        np.testing.assert_array_equal(x[~new], shifted[name].to_numpy(zero_copy_only=False)[~new])


def test_stream_with_a_new_source_marks_it_in_the_truth(settings, tmp_path: Path) -> None:
    from stream.events import decode_requests
    from training.world_cli import stream_requests

    cfg = WorldConfig(new_source_from=0.0, new_source_share=0.5)
    truth = tmp_path / "truth.parquet"
    summary = stream_requests(settings, count=200, rate=0, seed=6, config=cfg, truth_out=truth)
    assert summary["delivered"] == 200
    t = pq.read_table(truth)
    src = t["true_source"].cast(pa.string()).to_numpy(zero_copy_only=False)
    assert 0.3 < (src == "new").mean() < 0.7 and set(src) == {"known", "new"}
    msgs = _consume(settings, 200)
    batch = decode_requests([m.value() for m in msgs], [m.key() for m in msgs], cfg.feature_spec())
    j = cfg.feature_spec().categorical.index("device_model")
    by_id = dict(zip(t["request_id"].to_pylist(), src, strict=True))
    new_dm = [dm for rid, dm in zip(batch.request_id, batch.cat[:, j], strict=True) if by_id[rid] == "new" and dm]
    assert new_dm and all(v.startswith("nx-") for v in new_dm)
