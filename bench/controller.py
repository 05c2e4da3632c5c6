"""`rta bench controller`: settling time and steady-state error of the ratio controller.

Simulated workers feed batches of model-like scores (logit-normal e, log-normal u correlated
with it) through the real policy and real controllers on a REAL Redis (every batch is one
pipelined round trip, every refresh another); only the clock is simulated, so a 3-minute
scenario runs in seconds. Scenarios: 1 worker; 2 workers seeing different traffic (only a
global window holds the global share); 2 workers under a drifting score distribution. Each
steps r through ``--steps`` (p_u and epsilon fixed). Per step it reports:

- ``settle_s``: time T after the step such that every ``--measure``-second span of
  decisions starting later than step + T (within the step) has its block share within
  ``--band`` pp of r (0.25 s grid: 0.25 means the first refresh after the step already held);
- ``error_pp``: |block share - r| over the second half of the step, all decisions;
- ``window_settle_s`` / ``window_error_pp``: the same for the share over the controller's
  own window (``--window`` seconds, what `rta ratio get` shows; it lags by construction).

Redis: ``--redis-url``, else the configured one if it answers, else an embedded one started
and stopped here. Keys live under a throwaway prefix and are deleted afterwards.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import click
import numpy as np
from tqdm import tqdm

from stream.config import load_settings
from stream.controller import ControllerConfig, RatioController
from stream.policy import Targets, decide
from stream.prior import ScoreDistribution
from stream.window import RedisStore, StoreUnavailable


class SimClock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _traffic(rng: np.random.Generator, n: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
    z = rng.normal(size=n)
    e = 1.0 / (1.0 + np.exp(-(-4.0 + shift + 1.5 * z)))
    u = np.exp(-6.0 + 0.5 * shift + 0.6 * z + rng.normal(size=n))
    return e, u


def run_scenario(store: RedisStore, name: str, workers: int, drift: float, steps: list[float],
                 step_s: float, rate: float, batch: int, cfg: ControllerConfig, p_u: float,
                 epsilon: float, seed: int, bar: tqdm) -> dict[str, Any]:
    """One scenario: returns per-batch records and timings."""
    rng = np.random.default_rng(seed)
    clock = SimClock(float(int(time.time())))
    t0 = clock.t
    ctls = [RatioController(store, cfg, clock=clock, controller_id=f"{name}-{i}") for i in range(workers)]
    offsets = [0.0] if workers == 1 else list(np.linspace(0.5, -0.5, workers))
    total_s = step_s * len(steps)
    dt = batch / rate  # simulated seconds between batches (all workers together)
    rows, lat = [], []
    for k, r in enumerate(steps):
        store.set_targets(Targets(r, p_u, epsilon), "bench", f"step {k}")
        end = t0 + (k + 1) * step_s
        i = 0
        while clock.t < end:
            w = i % workers
            ctl = ctls[w]
            shift = offsets[w] + drift * (clock.t - t0) / total_s
            e, u = _traffic(rng, batch, shift)
            th = ctl.thresholds()
            d = decide(e, u, None, rng.random(batch), th.theta, th.tau_u, th.targets.epsilon, th.degraded)
            t_obs = time.perf_counter()
            ctl.observe(e, u, d)
            lat.append(time.perf_counter() - t_obs)
            rows.append((clock.t - t0, k, batch, int(d.block.sum()), int((d.stage == 1).sum())))
            clock.t += dt
            i += 1
            bar.update(1)
    return {"rows": np.array(rows, dtype=np.float64), "lat": np.array(lat),
            "refreshes": sum(c.refreshes for c in ctls), "errors": sum(c.store_errors for c in ctls)}


EDGE_TARGETS = Targets(0.5, 0.10, 0.01)  # issue 15's cold-start targets


def _feed(ctl: RatioController, clock: SimClock, rng: np.random.Generator, rows: int, batch: int,
          rate: float, shift: float = 0.0) -> np.ndarray:
    """``rows`` requests through one controller at ``rate`` per simulated second: blocked flags."""
    out = []
    for _ in range(max(1, rows // batch)):
        e, u = _traffic(rng, batch, shift)
        th = ctl.thresholds()
        d = decide(e, u, None, rng.random(batch), th.theta, th.tau_u, th.targets.epsilon, th.degraded)
        ctl.observe(e, u, d)
        out.append(d.block)
        clock.t += batch / rate
    return np.concatenate(out)


def run_edges(url: str, cfg: ControllerConfig, seeds: int, bar: tqdm) -> dict[str, Any]:
    """Issue 15's edges, each with the new controller and with the old behaviour (no bundle
    distribution, refresh by time only, one histogram for all models) in the same run:

    - cold burst: 60k requests at once (processed at 100k/s) on an empty window; block share
      over all rows and the first 5,000;
    - backlog: 10 minutes of 3k/s (1.8M requests) caught up at 100k/s by a restarted worker;
      block share over the catch-up and the worst 5,000-row stretch;
    - model switch: 20k/s, after 40 s the scores shift by +1.5 logit (a new model); block share
      over the 30 s after the switch and the worst 1 s.
    """
    old_cfg = replace(cfg, refresh_rows=10**12)
    out: dict[str, Any] = {}

    def store() -> RedisStore:
        s = RedisStore.from_url(url, f"bench:{uuid.uuid4().hex[:8]}", cfg.spec, ttl_seconds=cfg.window_seconds + 120,
                                socket_timeout=2, connect_timeout=2)
        s.set_targets(EDGE_TARGETS, "bench", "edges")
        return s

    def controller(st: RedisStore, clock: SimClock, new: bool, prior: Any, name: str) -> RatioController:
        ctl = RatioController(st, cfg if new else old_cfg, clock=clock, controller_id=name)
        ctl.set_model("v1", prior if new else None)
        return ctl

    def err(x: np.ndarray) -> float:
        return round(abs(float(x.mean()) - EDGE_TARGETS.r) * 100, 3)

    def worst(x: np.ndarray, n: int) -> float:
        k = len(x) // n
        return round(float(np.abs(x[: k * n].reshape(k, n).mean(axis=1) - EDGE_TARGETS.r).max()) * 100, 3)

    cold: dict[str, list[float]] = {f"{w}_{m}": [] for w in ("new", "old") for m in ("all_pp", "first5k_pp")}
    backlog: dict[str, list[float]] = {f"{w}_{m}": [] for w in ("new", "old") for m in ("all_pp", "worst5k_pp")}
    switch: dict[str, list[float]] = {f"{w}_{m}": [] for w in ("new", "old") for m in ("after30s_pp", "worst1s_pp")}
    for seed in range(seeds):
        prior = ScoreDistribution.fit(*_traffic(np.random.default_rng(10_000 + seed), 50_000, 0.0))
        prior2 = ScoreDistribution.fit(*_traffic(np.random.default_rng(20_000 + seed), 50_000, 1.5))
        for new in (True, False):
            w = "new" if new else "old"
            st = store()
            try:
                clock = SimClock(float(int(time.time())))
                b = _feed(controller(st, clock, new, prior, "cold"), clock, np.random.default_rng(seed), 60_000, 1000, 1e5)
                cold[f"{w}_all_pp"].append(err(b))
                cold[f"{w}_first5k_pp"].append(err(b[:5000]))
                bar.update(1)
                clock.t += 120  # the cold run's seconds leave the window
                b = _feed(controller(st, clock, new, prior, "backlog"), clock, np.random.default_rng(seed + 100),
                          1_800_000, 1000, 1e5)
                backlog[f"{w}_all_pp"].append(err(b))
                backlog[f"{w}_worst5k_pp"].append(worst(b, 5000))
                bar.update(1)
                clock.t += 120
                ctl = controller(st, clock, new, prior, "switch")
                _feed(ctl, clock, np.random.default_rng(seed + 200), 800_000, 500, 2e4)
                if new:
                    ctl.set_model("v2", prior2)
                b = _feed(ctl, clock, np.random.default_rng(seed + 300), 600_000, 500, 2e4, shift=1.5)
                switch[f"{w}_after30s_pp"].append(err(b))
                switch[f"{w}_worst1s_pp"].append(worst(b, 20_000))
                bar.update(1)
            finally:
                st.clear()

    def agg(d: dict[str, list[float]]) -> dict[str, Any]:
        return {k: {"mean": round(float(np.mean(v)), 3), "max": round(float(np.max(v)), 3)} for k, v in d.items()}

    out["cold_burst_60k"] = agg(cold)
    out["backlog_10min_3k_per_s"] = agg(backlog)
    out["model_switch_plus_1_5_logit"] = agg(switch)
    out["seeds"] = seeds
    out["note"] = ("pp = |block share - 0.5| x 100; new = bundle distribution + refresh every "
                   f"{cfg.refresh_rows} rows + per-model histograms; old = none of them (same run, same traffic)")
    return out


def _trailing_share(rows: np.ndarray, at: np.ndarray, span: float, col: int = 3,
                    since: float = -np.inf) -> np.ndarray:
    """Share of ``col`` among decisions in (max(at - span, since), at]."""
    t = rows[:, 0]
    cn = np.concatenate([[0.0], np.cumsum(rows[:, 2])])
    cb = np.concatenate([[0.0], np.cumsum(rows[:, col])])
    hi = np.searchsorted(t, at, side="right")
    lo = np.searchsorted(t, np.maximum(at - span, since), side="left")
    with np.errstate(invalid="ignore", divide="ignore"):
        return (cb[hi] - cb[lo]) / (cn[hi] - cn[lo])


def _settle(rows: np.ndarray, start: float, end: float, target: float, band: float, measure: float,
            grid: float = 0.25) -> float | None:
    """Smallest T such that every ``measure``-second span of decisions starting at or after
    start + T (within the step) has its block share within ``band`` of target."""
    begins = np.arange(start, end - measure + 1e-9, grid)
    share = _trailing_share(rows, begins + measure, measure)
    outside = np.flatnonzero(~(np.abs(share - target) <= band))
    if len(outside) and outside[-1] == len(begins) - 1:
        return None  # still outside at the end of the step
    return round(float(begins[outside[-1]] + grid - start), 2) if len(outside) else 0.0


def _window_settle(ticks: np.ndarray, share: np.ndarray, start: float, target: float,
                   band: float) -> float | None:
    outside = np.flatnonzero(~(np.abs(share - target) <= band))
    if len(outside) and outside[-1] == len(share) - 1:
        return None
    return round(float(ticks[outside[-1]] - start), 2) if len(outside) else 0.0


def summarise(res: dict[str, Any], steps: list[float], step_s: float, window: int, measure: float,
              band_pp: float, p_u: float) -> dict[str, Any]:
    rows = res["rows"]
    band = band_pp / 100
    out = []
    for k, r in enumerate(steps):
        start, end = k * step_s, (k + 1) * step_s
        ticks = np.arange(start + 0.25, end + 1e-9, 0.25)
        slow = _trailing_share(rows, ticks, window)
        half = (rows[:, 0] >= start + step_s / 2) & (rows[:, 0] < end)
        share = rows[half, 3].sum() / rows[half, 2].sum()
        unc = rows[half, 4].sum() / rows[half, 2].sum()
        out.append({
            "r": r,
            "settle_s": _settle(rows, start, end, r, band, measure),
            "error_pp": round(abs(share - r) * 100, 3),
            "window_settle_s": _window_settle(ticks, slow, start, r, band),
            "window_error_pp": round(abs(slow[-1] - r) * 100, 3),
            "uncertain_error_pp": round(abs(unc - p_u) * 100, 3),
        })
    lat = res["lat"] * 1000
    return {
        "steps": out,
        "within_band": all(s["error_pp"] <= band_pp and s["settle_s"] is not None for s in out),
        "batches": len(rows),
        "refreshes": res["refreshes"],
        "store_errors": res["errors"],
        "observe_ms": {"mean": round(float(lat.mean()), 3), "p99": round(float(np.percentile(lat, 99)), 3)},
    }


def _plot(path: Path, results: dict[str, dict[str, Any]], steps: list[float], step_s: float,
          measure: float, window: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 1, figsize=(9, 2.6 * len(results)), sharex=True)
    for ax, (name, res) in zip(np.atleast_1d(axes), results.items(), strict=True):
        rows = res["rows"]
        ticks = np.arange(0.25, rows[-1, 0], 0.25)
        ax.plot(ticks, 100 * _trailing_share(rows, ticks, 1.0), lw=0.5, alpha=0.5, label="block share, 1 s")
        ax.plot(ticks, 100 * _trailing_share(rows, ticks, measure), lw=1.2, label=f"block share, {measure:g} s")
        ax.plot(ticks, 100 * _trailing_share(rows, ticks, window), lw=1.0, ls="--", label=f"window {window} s")
        tgt = np.repeat(np.array(steps) * 100, 2)
        edges = np.repeat(np.arange(len(steps) + 1) * step_s, 2)[1:-1]
        ax.plot(edges, tgt, color="k", lw=0.8, label="target r")
        ax.set_ylabel("%")
        ax.set_title(name, fontsize=9)
    np.atleast_1d(axes)[0].legend(fontsize=7, loc="upper right")
    np.atleast_1d(axes)[-1].set_xlabel("simulated seconds")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _redis(url: str | None) -> tuple[str, Any]:
    """A reachable Redis URL and the embedded server to stop afterwards (or None)."""
    candidates = [url] if url else [load_settings().redis_url]
    for cand in candidates:
        try:
            RedisStore.from_url(cand, f"bench-probe-{uuid.uuid4().hex[:6]}", socket_timeout=1,
                                connect_timeout=1).read([])
            return cand, None
        except StoreUnavailable:
            if url:
                raise
    from infra.stack import Embedded

    server = Embedded("redis")
    server.start()
    return server.address, server


@click.command()
@click.option("--redis-url", default=None, help="Redis to use (else the configured one, else an embedded one).")
@click.option("--steps", default="0.3,0.5,0.2", show_default=True, help="Targets r, one per step.")
@click.option("--step-seconds", type=click.FloatRange(min=10), default=60, show_default=True)
@click.option("--rate", type=click.FloatRange(min=500), default=20000, show_default=True,
              help="Simulated events/s (all workers together).")
@click.option("--batch", type=click.IntRange(16, 100000), default=512, show_default=True)
@click.option("--window", type=click.IntRange(2, 600), default=30, show_default=True, help="Window seconds.")
@click.option("--pass-share", "p_u", type=click.FloatRange(0, 1), default=0.05, show_default=True)
@click.option("--explore", "epsilon", type=click.FloatRange(0, 1), default=0.01, show_default=True)
@click.option("--drift", type=float, default=1.0, show_default=True,
              help="Logit shift of the scores over the drifting scenario.")
@click.option("--measure", type=click.FloatRange(min=0.5), default=5.0, show_default=True,
              help="Trailing seconds for the settling measure.")
@click.option("--band", "band_pp", type=click.FloatRange(min=0.01), default=0.5, show_default=True,
              help="Tolerance in percentage points.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path),
              default=Path(".rta/bench/controller.png"), show_default=True)
@click.option("--feedback-gain", type=click.FloatRange(min=0), default=None,
              help="Override the controller's feedback gain (1/s).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--edge-seeds", type=click.IntRange(0, 50), default=3, show_default=True,
              help="Seeds of the cold-burst / backlog / model-switch scenarios (0: skip them).")
def controller(redis_url: str | None, steps: str, step_seconds: float, rate: float, batch: int, window: int,
               p_u: float, epsilon: float, drift: float, measure: float, band_pp: float,
               plot_path: Path, feedback_gain: float | None, seed: int, edge_seeds: int) -> None:
    """Ratio controller settling after steps of r (1 and 2 workers, drifting scores); JSON out."""
    try:
        targets = [float(x) for x in steps.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"not a comma-separated list of numbers: {steps!r}", param_hint="--steps") from None
    for r in targets:
        Targets(r, p_u, epsilon)  # InfeasibleTargets -> one line
    cfg = ControllerConfig(window_seconds=window)
    if feedback_gain is not None:
        cfg = replace(cfg, feedback_gain=feedback_gain)
    url, server = _redis(redis_url)
    scenarios = [("1 worker", 1, 0.0), ("2 workers", 2, 0.0), (f"2 workers, drift {drift:+g} logit", 2, drift)]
    n_batches = int(sum(np.ceil(step_seconds * len(targets) * rate / batch) for _ in scenarios))
    results: dict[str, dict[str, Any]] = {}
    summary: dict[str, Any] = {}
    try:
        with tqdm(total=n_batches, desc="controller bench", unit="batch", leave=False, mininterval=2) as bar:
            for i, (name, workers, dr) in enumerate(scenarios):
                store = RedisStore.from_url(url, f"bench:{uuid.uuid4().hex[:8]}", cfg.spec,
                                            ttl_seconds=window + 120, socket_timeout=2, connect_timeout=2)
                try:
                    res = run_scenario(store, f"s{i}", workers, dr, targets, step_seconds, rate, batch,
                                       cfg, p_u, epsilon, seed + i, bar)
                finally:
                    store.clear()
                results[name] = res
                summary[name] = summarise(res, targets, step_seconds, window, measure, band_pp, p_u)
        edges = None
        if edge_seeds:
            with tqdm(total=3 * 2 * edge_seeds, desc="edge scenarios", unit="run", leave=False) as bar:
                edges = run_edges(url, cfg, edge_seeds, bar)
    finally:
        if server is not None:
            server.stop()
    _plot(plot_path, results, targets, step_seconds, measure, window)
    click.echo(json.dumps({
        "bench": "controller",
        "config": {"steps": targets, "step_seconds": step_seconds, "rate": rate, "batch": batch,
                   "window_seconds": window, "p_u": p_u, "epsilon": epsilon, "measure_seconds": measure,
                   "band_pp": band_pp, "refresh_interval": cfg.refresh_interval,
                   "feedback_gain": cfg.feedback_gain, "redis": "embedded" if server else "configured"},
        "scenarios": summary,
        "all_within_band": all(s["within_band"] for s in summary.values()),
        "edges": edges,
        "plot": str(plot_path),
    }))
