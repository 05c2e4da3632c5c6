"""The ratio holds from the first request, through a backlog and across a model switch (issue 15).

The stack tests run the worker in-process against the real broker and Redis, at the issue's
targets r = 0.5, p_u = 0.10, epsilon = 0.01. Shares are read back from the decisions topic.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from student_data import random_batch
from worker_support import (
    decisions,
    feeding,
    make_spread_bundle,
    produce,
    request_values,
    running,
    wait_for,
)

from model.bundle import publish, read_manifest
from stream.controller import ControllerConfig, RatioController
from stream.errors import BundleError
from stream.policy import Targets, decide
from stream.prior import KEY, ScoreDistribution, fit_bundle
from stream.window import HistSpec, MemoryStore, RedisStore
from stream.worker import Worker, WorkerConfig

TARGETS = Targets(0.5, 0.10, 0.01)
BAND = 0.01  # the 1 pp


def _coupled(rng: np.random.Generator, n: int, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Scores whose uncertainty rises with them (the coupling the u-strata exist for)."""
    z = rng.normal(size=n)
    e = 1.0 / (1.0 + np.exp(-(-3.0 + shift + 1.5 * z)))
    u = np.exp(-6.0 + 0.8 * z + 0.5 * rng.normal(size=n))
    return e, u


def _set_targets(settings) -> RedisStore:
    store = RedisStore.from_url(settings.redis_url, settings.redis_prefix)
    store.set_targets(TARGETS, "test", "issue 15 targets")
    return store


def _block_share(rows: list[dict]) -> float:
    return float(np.mean([d["decision"] == "block" for d in rows]))


# --- the distribution itself ---------------------------------------------------------------

def test_the_distribution_round_trips_and_cuts_like_the_rows_it_was_fitted_on():
    rng = np.random.default_rng(0)
    e, u = _coupled(rng, 50_000)
    dist = ScoreDistribution.fit(e, u, fitted_on="test")
    back = ScoreDistribution.from_manifest(json.loads(json.dumps({KEY: dist.to_manifest()})))
    assert back is not None and back.rows == 50_000 == dist.rows
    assert np.array_equal(back.u_hist, dist.u_hist) and np.array_equal(back.e_hists, dist.e_hists)
    spec = dist.spec
    for q_u in (0.02, 0.1, 0.3, 0.6):
        tau = float(np.quantile(u, 1 - q_u))
        below = back.e_below(tau)
        kept = e[u < tau]
        assert abs(below.sum() - len(kept)) <= 0.002 * len(e)  # the mass under tau_u
        # the median of the score stage's e: strata keep the e/u coupling (one e-histogram of
        # all rows would put it at the median of all e, off by the coupling)
        from stream.window import hist_quantile

        med = spec.e_value(hist_quantile(below, 0.5 * below.sum(), spec.e_lo, spec.e_hi))
        assert abs(med - np.median(kept)) <= 0.02 * np.median(kept), (q_u, med, np.median(kept))
    assert back.e_below(float("inf")).sum() == 50_000 and back.e_below(0.0).sum() == 0
    # the manifest holds one short line per stratum, not tens of thousands of numbers
    assert len(json.dumps(dist.to_manifest(), indent=2).splitlines()) < 8 + 5 * len(dist.strata_end)


@pytest.mark.parametrize("corrupt", [
    lambda d: d.update(rows=d["rows"] + 1),
    lambda d: d["strata"][0].update(e_hist="5:1 5:2"),
    lambda d: d.update(u_hist="2000:3"),
    lambda d: d.update(strata=[]),
    lambda d: d.update(format=99),
    lambda d: d["strata"][3].update(e_hist=7),
])
def test_a_malformed_distribution_refuses_the_bundle(corrupt, tmp_path, settings):
    """At start-up a one-line BundleError naming the key (a reload refuses the same way and
    keeps the old model: `test_worker`'s corrupt-reload test covers that path)."""
    bundle = make_spread_bundle(tmp_path / "models", "v1")
    path = bundle / "manifest.json"
    m = json.loads(path.read_text())
    corrupt(m[KEY])
    path.write_text(json.dumps(m))
    with pytest.raises(BundleError, match=KEY) as err:
        ScoreDistribution.from_manifest(read_manifest(bundle), where=str(path))
    assert "\n" not in str(err.value)
    from dataclasses import replace

    with pytest.raises(BundleError, match=KEY):
        Worker(replace(settings, model_dir=tmp_path / "models"), WorkerConfig(startup_timeout_s=0))


def test_a_bundle_without_a_distribution_still_serves_from_its_window(tmp_path):
    """Older bundles have none: None, and the controller behaves as before (blocks nothing
    until min_rows), instead of refusing a model that served yesterday."""
    from student_data import make_bundle

    bundle = make_bundle(tmp_path, "v0", distribution=False, publish=False)
    assert ScoreDistribution.from_manifest(read_manifest(bundle)) is None
    # other bins than the controller's: unusable, not malformed
    dist = fit_bundle(bundle, *random_batch(2000, seed=3)[1:], fitted_on="t")
    assert ScoreDistribution.from_manifest({KEY: dist.to_manifest()}, HistSpec(e_bins=512)) is None


# --- the controller alone (simulated clock, in-memory window) -----------------------------

def _burst(prior: ScoreDistribution | None, refresh_rows: int, seed: int, n: int = 60_000,
           batch: int = 1000, rate: float = 100_000.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = [1000.0]
    ctl = RatioController(MemoryStore(targets=TARGETS), ControllerConfig(refresh_rows=refresh_rows),
                          clock=lambda: t[0], controller_id="c")
    ctl.set_model("m", prior)
    out = []
    for _ in range(n // batch):
        e, u = _coupled(rng, batch)
        th = ctl.thresholds()
        d = decide(e, u, None, rng.random(batch), th.theta, th.tau_u, th.targets.epsilon, th.degraded)
        ctl.observe(e, u, d)
        out.append(d.block)
        t[0] += batch / rate
    return np.concatenate(out)


def test_a_cold_controller_decides_its_first_batch_at_the_target():
    prior = ScoreDistribution.fit(*_coupled(np.random.default_rng(99), 50_000))
    blocked = _burst(prior, 4096, seed=1)
    assert abs(blocked.mean() - 0.5) <= 0.005 and abs(blocked[:1000].mean() - 0.5) <= 0.03
    # what it replaces: no distribution and time-only refreshes block nothing for the first
    # 0.25 s of a 100k/s burst, and the warm-up rows' e-histogram (every row reached the score
    # stage, tau_u = inf) bias theta afterwards
    old = _burst(None, 10**9, seed=1)
    assert old[:5000].mean() == 0.0 and old.mean() < 0.48


def test_histograms_are_per_model_so_a_switch_is_not_steered_by_the_old_scores(settings):
    """Two controllers share a Redis window; one switches to a model whose scores are 2 logits
    higher. Its thresholds come from the new model's distribution at once, while the shares it
    reads still count both models' decisions; the peer still on the old model is not disturbed."""
    store = RedisStore.from_url(settings.redis_url, settings.redis_prefix)
    store.set_targets(TARGETS, "test", "t")
    rng = np.random.default_rng(2)
    t = [float(int(time.time()))]
    old_prior = ScoreDistribution.fit(*_coupled(rng, 50_000))
    new_prior = ScoreDistribution.fit(*_coupled(rng, 50_000, shift=2.0))
    a, b = (RatioController(store, ControllerConfig(), clock=lambda: t[0], controller_id=i) for i in "ab")
    for c in (a, b):
        c.set_model("v1", old_prior)
    for _ in range(60):  # 6 s of 10k/s on v1: the window is full of v1 scores
        for c in (a, b):
            e, u = _coupled(rng, 500)
            th = c.thresholds()
            c.observe(e, u, decide(e, u, None, rng.random(500), th.theta, th.tau_u, 0.01, False))
        t[0] += 0.1
    theta_v1 = a.thresholds().theta
    a.set_model("v2", new_prior)
    th = a.thresholds()
    e2, u2 = _coupled(np.random.default_rng(7), 200_000, shift=2.0)
    d2 = decide(e2, u2, None, np.random.default_rng(8).random(len(e2)), th.theta, th.tau_u, 0.01, False)
    assert abs(d2.block.mean() - 0.5) <= 0.01, (theta_v1, th.theta)  # v1's histogram would give ~0.1
    assert th.theta > theta_v1 and a.status()["model"] == "v2" and a.status()["prior_rows"] > 0
    assert b.thresholds().theta == pytest.approx(theta_v1, rel=0.05)  # the peer's v1 view is intact
    snap = store.read(range(int(t[0]) - 6, int(t[0]) + 1), model="v2")
    assert sum(v[0] for v in snap.buckets.values()) == 2 * 60 * 500  # counts: every model's rows
    assert sum(v[store.spec.e_slice].sum() for v in snap.buckets.values()) == 0  # no v2 row yet


# --- the worker on the real stack ----------------------------------------------------------

def test_a_cold_stack_decides_a_60k_burst_at_the_target_from_the_first_rows(settings):
    """The issue's run: a fresh stack, 60,000 requests waiting, then `rta serve`. Before this
    change 4,646 were decided with threshold 0 and the burst came out at 0.463."""
    make_spread_bundle(settings.model_dir, "v1")
    _set_targets(settings)
    ids, values = request_values(60_000, prefix="c", seed=5)
    produce(settings, values, list(ids))
    with running(settings, group_id="cold", seed=3) as w:
        wait_for(lambda: w.stats.events >= len(ids), 120, "the burst decided")
    got = decisions(settings, len(ids), quiet=0.5)
    assert len(got) == len(ids)
    got.sort(key=lambda d: d["ts_ms"])  # decision time: batch order across partitions
    first = got[:5000]
    print(json.dumps({"cold_burst": {"all": _block_share(got), "first_5000": _block_share(first)}}))
    assert abs(_block_share(got) - 0.5) <= BAND, _block_share(got)
    assert abs(_block_share(first) - 0.5) <= BAND, _block_share(first)
    assert not any(d["threshold"] == 0.0 for d in got)  # nothing decided with "block nothing"
    uncertain = np.mean([d["reason"] == "uncertain" for d in got])
    assert abs(uncertain - 0.10) <= BAND, uncertain


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_worker_back_from_a_60_s_stop_holds_the_share_through_its_catch_up(settings):
    """3k/s arrive throughout; the worker serves 5 s, stops for 60 s (its window expires), and a
    new one catches up on the 180k-request backlog while the traffic goes on."""
    make_spread_bundle(settings.model_dir, "v1")
    _set_targets(settings)
    rate = 3000
    phases = {p: request_values(int(rate * s), prefix=p, seed=k)
              for k, (p, s) in enumerate((("live", 5), ("down", 60), ("after", 10)))}
    cfg = {"group_id": "backlog", "seed": 4}
    with running(settings, **cfg), feeding(settings, phases["live"][1], list(phases["live"][0]), rate) as f:
        f.join(60)
    with feeding(settings, phases["down"][1], list(phases["down"][0]), rate) as f:
        f.join(120)  # the worker is stopped for these 60 s
    n = sum(len(ids) for ids, _ in phases.values())
    with running(settings, **cfg) as w, feeding(settings, phases["after"][1], list(phases["after"][0]), rate) as f:
        f.join(60)
        wait_for(lambda: w.stats.events >= len(phases["down"][0]) + len(phases["after"][0]), 120,
                 "the backlog and the new traffic decided")
    got = decisions(settings, n, timeout=120, quiet=0.5)
    by_phase = {p: [d for d in got if d["request_id"].startswith(p)] for p in phases}
    assert len(by_phase["down"]) == len(phases["down"][0])
    backlog = _block_share(by_phase["down"])
    print(json.dumps({"backlog": backlog, "after": _block_share(by_phase["after"])}))
    assert abs(backlog - 0.5) <= BAND, backlog
    assert abs(_block_share(by_phase["after"]) - 0.5) <= BAND, _block_share(by_phase["after"])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_hot_reload_to_a_shifted_model_holds_the_share_over_the_next_30_s(settings):
    """v1 serves 15 s at 3k/s (its scores fill the window), then v2, whose scores are about
    1.5 logits higher, is published; the share over the 30 s after the switch stays in band."""
    make_spread_bundle(settings.model_dir, "v1")
    make_spread_bundle(settings.model_dir, "v2", seed=1, shift=1.5, publish=False)
    _set_targets(settings)
    rate, before, after = 3000, 15, 32
    ids, values = request_values(rate * (before + after), prefix="s", seed=6)
    with running(settings, group_id="switch", seed=5, reload_interval_s=0.25) as w, \
            feeding(settings, values, list(ids), rate) as f:
        time.sleep(before)
        publish(settings.model_dir / "v2")
        wait_for(lambda: w.scorer.version == "v2", 10, "the worker on v2")
        f.join(after + 30)
        wait_for(lambda: w.stats.events >= len(ids), 60, "every request decided")
    got = decisions(settings, len(ids), quiet=0.5)
    v1 = [d for d in got if d["model"] == "v1"]
    v2 = [d for d in got if d["model"] == "v2"]
    assert v1 and v2
    shift = np.median([d["score"] for d in v2]) / np.median([d["score"] for d in v1])
    assert shift > 2.0, shift  # the new model really scores differently
    switch = min(d["ts_ms"] for d in v2)
    window = [d for d in got if switch <= d["ts_ms"] < switch + 30_000]
    assert len(window) >= 0.8 * 30 * rate
    print(json.dumps({"switch_30s": _block_share(window), "score_ratio": float(shift)}))
    assert abs(_block_share(window) - 0.5) <= BAND, _block_share(window)
