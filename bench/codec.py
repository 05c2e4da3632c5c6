"""Request/decision codec throughput: what the worker's decode and encode steps can sustain.

`python -m bench.codec [--batch 1000] [--numeric 80] [--categorical 28] [--seconds 2]`
prints one JSON object: events/s for canonical and positional decode, and decision encode,
plus the positional/canonical ratio. Single thread, same process, same data.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import click
import numpy as np
import orjson

from stream.events import (
    decode_requests,
    encode_decisions,
    encode_requests,
    encode_requests_positional,
)
from stream.features import FeatureSpec


def _traffic(n: int, n_num: int, n_cat: int, seed: int = 0) -> tuple[FeatureSpec, list[str], np.ndarray,
                                                                     np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    spec = FeatureSpec(tuple(f"num_{i}" for i in range(n_num)), tuple(f"cat_{i}" for i in range(n_cat)))
    num = rng.lognormal(0.0, 2.0, size=(n, n_num)).astype(np.float32)
    num[rng.random(num.shape) < 0.1] = np.nan  # 10% missing
    vocab = np.array([f"v{i}" for i in range(5000)], dtype=object)
    cat = vocab[rng.zipf(1.3, size=(n, n_cat)) % 5000]
    cat[rng.random(cat.shape) < 0.1] = ""
    rids = [f"req-{i:012d}" for i in range(n)]
    ts = 1_700_000_000_000 + np.arange(n, dtype=np.int64)
    return spec, rids, ts, num, cat


def _rates(fns: dict[str, Callable[[], object]], n: int, seconds: float, rounds: int = 5) -> dict[str, float]:
    """events/s of each fn: rounds interleaved (a shared box drifts), median of the rounds."""
    per: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # warm up
    for _ in range(rounds):
        for name, fn in fns.items():
            done, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds / rounds:
                fn()
                done += n
            per[name].append(done / (time.perf_counter() - start))
    return {k: float(np.median(v)) for k, v in per.items()}


def run(batch: int = 1000, n_num: int = 80, n_cat: int = 28, seconds: float = 2.0) -> dict[str, object]:
    spec, rids, ts, num, cat = _traffic(batch, n_num, n_cat)
    canonical = encode_requests(rids, ts, num, cat, spec)
    positional = encode_requests_positional(rids, ts, num, cat, spec)
    keys = [r.encode() for r in rids]
    assert decode_requests(canonical, keys, spec).valid.all()
    assert decode_requests(positional, keys, spec).valid.all()
    rng = np.random.default_rng(1)
    p = rng.random((batch, 4))
    block = rng.random(batch) < 0.3
    reason = rng.choice(["score", "uncertain", "explore", "invalid"], size=batch, p=[0.8, 0.1, 0.05, 0.05])
    latency = rng.random(batch) * 5
    u = rng.random(batch)
    propensity = np.where(reason == "explore", 0.02, 0.98)
    rates = _rates({
        "canonical": lambda: decode_requests(canonical, keys, spec),
        "positional": lambda: decode_requests(positional, keys, spec),
        "parse_only": lambda: list(map(orjson.loads, canonical)),
        "parse_only_positional": lambda: list(map(orjson.loads, positional)),
        "encode": lambda: encode_decisions(rids, block, reason, p[:, 3], u, p, threshold=0.12,
                                           target_ratio=0.3, model="bench", ts_ms=ts,
                                           latency_ms=latency, propensity=propensity),
    }, batch, seconds)
    canon_rate, pos_rate, parse_only, enc_rate = (rates[k] for k in ("canonical", "positional", "parse_only", "encode"))
    return {
        "batch": batch, "numeric": n_num, "categorical": n_cat,
        "bytes_per_request": {"canonical": round(float(np.mean([len(v) for v in canonical])), 1),
                              "positional": round(float(np.mean([len(v) for v in positional])), 1)},
        "decode_events_per_s": {"canonical": round(canon_rate), "positional": round(pos_rate)},
        "orjson_parse_only_events_per_s": {"canonical": round(parse_only),
                                           "positional": round(rates["parse_only_positional"])},
        "encode_decisions_per_s": round(enc_rate),
        "ratio_positional_vs_canonical": round(pos_rate / canon_rate, 2),
        "ratio_canonical_decode_vs_parse_only": round(canon_rate / parse_only, 2),
    }


@click.command(name="codec")
@click.option("--batch", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--numeric", type=click.IntRange(min=0), default=80, show_default=True)
@click.option("--categorical", type=click.IntRange(min=0), default=28, show_default=True)
@click.option("--seconds", type=click.FloatRange(min=0, min_open=True), default=2.0, show_default=True,
              help="Per measured function, over 5 interleaved rounds.")
def codec(batch: int, numeric: int, categorical: int, seconds: float) -> None:
    """Request decode (canonical vs positional) and decision encode rates; one JSON object."""
    click.echo(orjson.dumps(run(batch, numeric, categorical, seconds), option=orjson.OPT_INDENT_2).decode())


if __name__ == "__main__":
    codec()
