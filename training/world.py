"""The synthetic traffic world: logged RTA requests with funnel labels and their true probabilities.

Why a world of our own: the paper's JD data is private, and a generator whose true
probabilities are known lets us check calibration, uncertainty and interception against an
oracle. The world makes the paper's phenomena possible without hard-coding them:

* ~108 observed user/device/context features (skewed counts, bounded ratios, missing values,
  Zipf high-cardinality categoricals, pure noise, redundant proxies);
* a latent purchase intent `h` in {browse, consider, buy}, never logged, shared by the four
  funnel tasks (so they correlate beyond what the features explain);
* the funnel: online implies click; cart and deal imply online; deal does NOT require cart
  ("buy now" exists) but a cart makes a deal far more likely;
* aleatoric ambiguity (labels are Bernoulli draws, intent is hidden), sparse regions (rare
  device models / cities / categories with their own random effects, a 0.4% `b2b` segment
  and a luxury-device tail that convert very differently), non-linear interactions
  (channel x hour, coupon x price sensitivity, tenure inverted-U, luxury x order value);
* optional drift: intent and click propensity move linearly with `ts_ms`;
* optional shifts (`true_source` marks each row): from a given row on, a NEW traffic source of
  high-intent users whose features are out of distribution (other units, categories never seen
  before), and a known client release whose time features drift in scale (see `_SHIFTS`).

True probabilities. For observed features x (and ts, which only matters with drift):

    pi_h(x)          = softmax over h of intent logits           (3 classes)
    c_h, o_h, k_h    = sigmoid(a_click(x) + d_click[h]), ... online|click, cart|online
    q1_h, q0_h       = sigmoid(a_deal(x) + d_deal[h] + gamma), sigmoid(a_deal(x) + d_deal[h])
    true_click  = sum_h pi_h c_h
    true_online = sum_h pi_h c_h o_h
    true_cart   = sum_h pi_h c_h o_h k_h
    true_deal   = sum_h pi_h c_h o_h (k_h q1_h + (1 - k_h) q0_h)

Labels are drawn exactly by that model (h ~ pi, then the funnel), so `true_t` is the exact
P(t = 1 | logged features, ts): the best any model can do. The per-task intercepts are solved
once per config on a fixed calibration sample so base rates hit `WorldConfig.base_rates`.

Determinism: rows are made in fixed blocks of `BLOCK_ROWS`; block b draws from
`SeedSequence(seed, spawn_key=(b,))`, so output depends on (rows, seed, config) only, never on
shards or row-group sizes. The world's structure (random effects, vocabularies) comes from
`structure_seed`, independent of `seed`: different seeds are different samples of one world.
Shifts draw from their own stream `SeedSequence(seed, spawn_key=(b, 1))`, so the Parquet of a world
without shifts is byte-identical to one made before shifts existed, and the rows before a shift
starts are the same with and without it (but for the `true_source` column).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from stream.errors import ConfigError
from stream.features import CATEGORICAL, NUMERIC, FeatureSpec

GENERATOR_VERSION = "world-1"
BLOCK_ROWS = 16_384  # part of the generator's definition: changing it changes every dataset
ROW_GROUP_ROWS = 131_072
META_FILE = "_world.json"  # "_" prefix: Parquet dataset readers ignore it
TASKS = ("click", "online", "cart", "deal")
DEFAULT_START_MS = 1_735_660_800_000  # 2025-01-01T00:00:00+08:00
_TZ_OFFSET_MS = 8 * 3_600_000  # hour/day features are local time (UTC+8)
_CALIBRATION_ROWS = 65_536
_N, _C = NUMERIC, CATEGORICAL

# ----------------------------------------------------------------------------- catalogue
# (name, kind) in output order. The first `_LABEL_FEATURE_COUNT` are the only ones the label
# model reads; everything after is a redundant proxy of the persona or pure noise.
_WINDOWS = ("1d", "3d", "14d", "60d")
CATALOGUE: tuple[tuple[str, str], ...] = (
    # --- label-relevant (28)
    ("tenure_days", _N), ("sessions_7d", _N), ("clicks_30d", _N), ("impressions_30d", _N),
    ("ctr_30d", _N), ("orders_90d", _N), ("days_since_last_order", _N), ("avg_order_value", _N),
    ("cart_adds_30d", _N), ("coupon_use_rate", _N), ("device_price", _N), ("dwell_sec_avg", _N),
    ("hours_since_last_visit", _N), ("searches_7d", _N), ("wishlist_size", _N),
    ("hour_of_day", _N), ("bid_floor", _N), ("price_sensitivity", _N),
    ("channel", _C), ("device_os", _C), ("user_segment", _C), ("device_model", _C), ("city", _C),
    ("ad_slot", _C), ("category_pref", _C), ("network", _C), ("age_band", _C), ("day_of_week", _C),
    # --- redundant proxies of the persona (65)
    ("city_tier", _C), ("province", _C), ("gender", _C), ("app_version", _C),
    ("os_version", _N), ("carrier", _C), ("browser", _C), ("screen_class", _C),
    *((f"{m}_{w}", _N) for m in ("views", "favs", "shares", "visits", "cart_views", "coupon_claims",
                                  "search_terms") for w in _WINDOWS),
    ("ram_gb", _N), ("storage_free_gb", _N), ("battery_level", _N), ("screen_width", _N),
    ("screen_height", _N), ("apps_installed", _N), ("font_scale", _N),
    ("account_verified", _C), ("membership_level", _C), ("referral_source", _C), ("ip_asn", _C),
    ("language", _C), ("login_method", _C),
    *((f"interest_tag_{i}", _C) for i in range(1, 5)),
    ("session_min_7d", _N), ("session_min_30d", _N), ("pages_per_session", _N),
    ("bounce_rate", _N), ("night_activity_ratio", _N), ("weekend_ratio", _N),
    ("push_open_rate", _N), ("email_open_rate", _N), ("reviews_written", _N),
    ("shops_followed", _N), ("returns_90d", _N), ("refund_rate", _N),
    # --- pure noise (15)
    *((f"noise_num_{i:02d}", _N) for i in range(10)),
    *((f"noise_cat_{i:02d}", _C) for i in range(5)),
)
_LABEL_FEATURE_COUNT = 28
DEFAULT_FEATURES = len(CATALOGUE)
assert DEFAULT_FEATURES == 108


@dataclass(frozen=True)
class WorldConfig:
    """The world's knobs. `seed` picks a sample; `structure_seed` picks the world itself."""

    features: int = DEFAULT_FEATURES
    drift: float = 0.0  # logit units the intent/click propensity move over the whole span
    span_days: float = 7.0
    start_ms: int = DEFAULT_START_MS
    base_rates: tuple[float, float, float, float] = (0.50, 0.30, 0.04, 0.011)
    structure_seed: int = 2511
    signal: float = 1.0  # scales every feature effect: 0 -> labels independent of features
    # Shifts (docs/world.md "Shifts"): a start is a fraction of the rows (rows are in time
    # order, so "from row i on" is "from ts_ms of row i on"); None = the shift is off.
    new_source_from: float | None = None
    new_source_share: float = 0.05  # share of ALL traffic from the new source once it starts
    new_source_units: str = "larger"  # "larger" (cents, ms, ...) | "smaller" (thousands, minutes, years, ...)
    drift_source_from: float | None = None
    drift_source_share: float = 0.10  # share of the known traffic on the drifting client
    drift_source_scale: float = 10.0  # the drifting features' unit factor at the end of the span

    @property
    def shifted(self) -> bool:
        """True when any shift is on (the output then has a `true_source` column)."""
        return self.new_source_from is not None or self.drift_source_from is not None

    def shift_row(self, rows: int) -> int:
        """Index of the first row any shift may touch (`rows` when none is on)."""
        starts = [f for f in (self.new_source_from, self.drift_source_from) if f is not None]
        return min(int(round(f * rows)) for f in starts) if starts else rows

    def validate(self) -> None:
        if not isinstance(self.features, int) or self.features < _LABEL_FEATURE_COUNT:
            raise ConfigError(f"features must be an integer >= {_LABEL_FEATURE_COUNT} (the label "
                              f"model reads that many), got {self.features!r}")
        if not np.isfinite(self.drift) or abs(self.drift) > 10:
            raise ConfigError(f"drift must be a finite number in [-10, 10], got {self.drift!r}")
        if not (self.span_days > 0 and np.isfinite(self.span_days)):
            raise ConfigError(f"span_days must be > 0, got {self.span_days!r}")
        r = self.base_rates
        if len(r) != 4 or not all(0 < x < 1 for x in r) or not (r[0] >= r[1] >= max(r[2], r[3])):
            raise ConfigError(f"base_rates must be 4 rates in (0,1) following the funnel "
                              f"(click >= online >= cart, deal), got {r!r}")
        if not (0 <= self.signal <= 5):
            raise ConfigError(f"signal must be in [0, 5], got {self.signal!r}")
        for name in ("new_source_from", "drift_source_from"):
            v = getattr(self, name)
            if v is not None and not (0 <= v < 1):
                raise ConfigError(f"{name} must be a fraction of the rows in [0, 1), got {v!r}")
        for name in ("new_source_share", "drift_source_share"):
            v = getattr(self, name)
            if not (0 < v < 1):
                raise ConfigError(f"{name} must be in (0, 1), got {v!r}")
        if self.new_source_units not in NEW_SOURCE_UNIT_SETS:
            raise ConfigError(f"new_source_units must be one of {', '.join(NEW_SOURCE_UNIT_SETS)}, "
                              f"got {self.new_source_units!r}")
        if not (np.isfinite(self.drift_source_scale) and 1 <= self.drift_source_scale <= 1e4):
            raise ConfigError(f"drift_source_scale must be in [1, 10000], got {self.drift_source_scale!r}")

    def feature_names(self) -> list[tuple[str, str]]:
        """(name, kind) of every feature in output order."""
        cols = list(CATALOGUE[: self.features])
        cols += [(f"noise_extra_{i:03d}", _N) for i in range(self.features - len(CATALOGUE))]
        return cols

    def feature_spec(self) -> FeatureSpec:
        cols = self.feature_names()
        return FeatureSpec(tuple(n for n, k in cols if k == _N), tuple(n for n, k in cols if k == _C))


def _check_rows_seed(rows: int, seed: int) -> None:
    if not isinstance(rows, int | np.integer) or rows < 1:
        raise ConfigError(f"rows must be a positive integer, got {rows!r}")
    if not isinstance(seed, int | np.integer) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")


# ----------------------------------------------------------------------------- structure
def _zipf_cdf(k: int, s: float) -> np.ndarray:
    p = np.arange(1, k + 1, dtype=np.float64) ** -s
    cdf = np.cumsum(p / p.sum())
    cdf[-1] = 1.0
    return cdf


def _names(prefix: str, k: int, rng: np.random.Generator, width: int = 4) -> np.ndarray:
    """Vocabulary whose labels don't reveal frequency rank."""
    ids = rng.permutation(10 ** width - 10 ** (width - 1))[:k] + 10 ** (width - 1)
    return np.array([f"{prefix}{i}" for i in ids], dtype=object)


_LOW_CARD: dict[str, list[str]] = {
    "channel": ["search", "feed", "push", "email", "affiliate", "direct", "social"],
    "device_os": ["android", "ios", "harmonyos", "windows", "macos", "linux"],
    "user_segment": ["new", "casual", "regular", "vip", "dormant", "b2b"],
    "network": ["wifi", "5g", "4g", "3g"],
    "age_band": ["<18", "18-24", "25-34", "35-44", "45-54", "55-64", "65+"],
    "day_of_week": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"],
    "city_tier": ["tier1", "tier2", "tier3", "tier4", "tier5"],
    "gender": ["f", "m", "u"],
    "carrier": ["cm", "cu", "ct", "cb", "other"],
    "browser": ["app", "chrome", "safari", "wechat", "qq", "uc", "edge", "other"],
    "screen_class": [f"s{i}" for i in range(12)],
    "account_verified": ["yes", "no"],
    "membership_level": ["bronze", "silver", "gold", "platinum", "diamond"],
    "language": ["zh", "en", "ko", "ja", "ru", "es", "fr", "ar"],
    "login_method": ["password", "sms", "wechat", "qr", "sso"],
}
# Zipf-distributed categoricals: (vocabulary size, exponent, label prefix)
_ZIPF: dict[str, tuple[int, float, str]] = {
    "device_model": (5000, 1.05, "dm"),
    "city": (3000, 1.1, "c"),
    "ad_slot": (48, 0.8, "slot"),
    "category_pref": (400, 1.0, "cat"),
    "province": (34, 0.9, "p"),
    "app_version": (80, 1.3, "v"),
    "referral_source": (20, 1.2, "ref"),
    "ip_asn": (1500, 1.15, "as"),
    **{f"interest_tag_{i}": (800, 1.0, "t") for i in range(1, 5)},
    "noise_cat_00": (10, 0.0, "n"),
    "noise_cat_01": (2000, 1.1, "n"),
    "noise_cat_02": (50, 0.5, "n"),
    "noise_cat_03": (3, 0.0, "n"),
    "noise_cat_04": (300, 1.0, "n"),
}


@dataclass
class _Structure:
    """Fixed per world: vocabularies, random effects, maps. Built from `structure_seed`."""

    vocab: dict[str, np.ndarray]
    cdf: dict[str, np.ndarray]
    re_dm_click: np.ndarray
    re_dm_deal: np.ndarray
    dm_price: np.ndarray
    re_city: np.ndarray
    city_tier: np.ndarray
    city_province: np.ndarray
    re_slot: np.ndarray
    re_cat_cart: np.ndarray
    re_cat_deal: np.ndarray
    chan_amp: np.ndarray
    chan_peak: np.ndarray
    chan_base: np.ndarray


@lru_cache(maxsize=4)
def _structure(structure_seed: int) -> _Structure:
    rng = np.random.default_rng(np.random.SeedSequence(structure_seed, spawn_key=(2**31,)))
    vocab = {k: np.array(v, dtype=object) for k, v in _LOW_CARD.items()}
    cdf = {}
    for name, (k, s, prefix) in _ZIPF.items():
        vocab[name] = _names(prefix, k, rng, width=len(str(k)) + 1)
        cdf[name] = _zipf_cdf(k, s)
    n_dm, n_city, n_cat = _ZIPF["device_model"][0], _ZIPF["city"][0], _ZIPF["category_pref"][0]
    rank_dm = np.arange(n_dm)
    # Rare device models and categories carry larger effects: the sparse tail behaves differently.
    tail_dm = 0.35 + 0.45 * (rank_dm > 300)
    rank_cat = np.arange(n_cat)
    tail_cat = 0.3 + 0.5 * (rank_cat > 60)
    city_rank = np.arange(n_city)
    tier = np.digitize(city_rank, [5, 35, 200, 900])
    return _Structure(
        vocab=vocab,
        cdf=cdf,
        re_dm_click=rng.normal(0, 1, n_dm) * tail_dm * 0.6,
        re_dm_deal=rng.normal(0, 1, n_dm) * tail_dm,
        dm_price=rng.normal(7.2, 0.55, n_dm),
        re_city=rng.normal(0, 0.25, n_city),
        city_tier=tier.astype(np.int32),
        city_province=rng.integers(0, _ZIPF["province"][0], n_city).astype(np.int32),
        re_slot=rng.normal(0, 0.35, _ZIPF["ad_slot"][0]),
        re_cat_cart=rng.normal(0, 1, n_cat) * tail_cat,
        re_cat_deal=rng.normal(0, 1, n_cat) * tail_cat,
        chan_amp=np.array([0.45, 0.3, 0.9, 0.3, 0.2, 0.25, 0.5]),
        chan_peak=np.array([21.0, 12.5, 20.0, 9.0, 15.0, 22.0, 23.0]),
        chan_base=np.array([0.45, 0.0, -0.35, -0.5, -0.15, 0.25, -0.2]),
    )


# ----------------------------------------------------------------------------- features
def _gumbel_pick(rng: np.random.Generator, logits: np.ndarray) -> np.ndarray:
    """One categorical draw per row from row-wise logits (Gumbel-max)."""
    return np.argmax(logits + rng.gumbel(size=logits.shape), axis=1).astype(np.int32)


def _from_cdf(rng: np.random.Generator, n: int, cdf: np.ndarray) -> np.ndarray:
    return np.minimum(np.searchsorted(cdf, rng.random(n), side="right"), len(cdf) - 1).astype(np.int32)


def _missing(rng: np.random.Generator, x: np.ndarray, rate: float | np.ndarray) -> np.ndarray:
    m = rng.random(len(x)) < rate
    if x.dtype.kind == "f":
        return np.where(m, np.nan, x)
    return np.where(m, -1, x).astype(np.int32)


def _lognormal(rng: np.random.Generator, mu: np.ndarray | float, sigma: float, n: int) -> np.ndarray:
    return np.exp(mu + sigma * rng.standard_normal(n))


def _features(rng: np.random.Generator, n: int, ts: np.ndarray, s: _Structure) -> dict[str, np.ndarray]:
    """Observed features of one block: float64 (NaN = missing) or int32 codes (-1 = missing)."""
    f: dict[str, np.ndarray] = {}
    # Persona: affluence, engagement, tech savviness, loyalty (latent, never logged).
    z = rng.standard_normal((4, n))
    aff = z[0]
    eng = 0.3 * aff + 0.95 * z[1]
    tech = 0.4 * aff + 0.9 * z[2]
    loy = 0.3 * eng + 0.95 * z[3]
    pois = rng.poisson

    f["tenure_days"] = np.clip(np.round(_lognormal(rng, 5.0 + 0.9 * loy, 0.9, n)), 1, 6000)
    f["sessions_7d"] = pois(np.exp(1.1 + 0.8 * eng + 0.5 * rng.standard_normal(n))).astype(float)
    impr = pois(np.exp(3.8 + 0.7 * eng + 0.4 * rng.standard_normal(n))).astype(float)
    ctr_true = 1 / (1 + np.exp(-(-2.6 + 0.35 * eng + 0.4 * rng.standard_normal(n))))
    clicks = rng.binomial(impr.astype(np.int64), ctr_true).astype(float)
    f["clicks_30d"] = clicks
    f["impressions_30d"] = _missing(rng, impr, 0.04)
    with np.errstate(invalid="ignore", divide="ignore"):
        f["ctr_30d"] = np.where(impr > 0, np.round(clicks / impr, 4), np.nan)
    orders = pois(np.exp(-0.9 + 0.6 * aff + 0.5 * loy + 0.3 * eng)).astype(float)
    f["orders_90d"] = orders
    f["days_since_last_order"] = np.where(orders > 0, np.ceil(rng.exponential(90 / (orders + 1.5))), np.nan)
    aov = np.round(_lognormal(rng, 4.6 + 0.55 * aff, 0.6, n), 2)
    f["avg_order_value"] = _missing(rng, np.where(orders > 0, aov, np.nan), 0.05)
    f["cart_adds_30d"] = pois(np.exp(-0.3 + 0.7 * eng + 0.3 * aff)).astype(float)
    f["coupon_use_rate"] = _missing(rng, np.round(rng.beta(1.2 + np.exp(-0.4 * aff), 3.0), 4), 0.35)
    dm = _from_cdf(rng, n, s.cdf["device_model"])
    price = np.round(_lognormal(rng, s.dm_price[dm] + 0.35 * aff + 0.2 * tech, 0.35, n))
    f["device_price"] = _missing(rng, price, 0.12)
    f["dwell_sec_avg"] = np.round(_lognormal(rng, 3.4 + 0.4 * eng, 0.7, n), 1)
    f["hours_since_last_visit"] = _missing(rng, np.round(rng.exponential(np.exp(3.0 - 0.8 * eng)), 2), 0.05)
    f["searches_7d"] = pois(np.exp(0.4 + 0.6 * eng + 0.3 * z[0] * z[1])).astype(float)
    wish = pois(np.exp(0.8 + 0.5 * eng + 0.3 * aff))
    f["wishlist_size"] = np.where(rng.random(n) < 0.45, 0, wish).astype(float)
    local = (ts + _TZ_OFFSET_MS) // 3_600_000
    f["hour_of_day"] = (local % 24).astype(float)
    f["bid_floor"] = np.round(_lognormal(rng, -1.0 + 0.2 * aff, 0.5, n), 3)
    f["price_sensitivity"] = _missing(rng, np.round(1 / (1 + np.exp(0.9 * aff + 0.6 * rng.standard_normal(n))), 3), 0.2)

    f["channel"] = _gumbel_pick(rng, np.log(np.array([0.28, 0.30, 0.10, 0.05, 0.09, 0.12, 0.06]))
                                + np.outer(eng, [0.2, 0.1, -0.2, -0.3, 0, 0.2, 0.1]))
    f["device_os"] = _gumbel_pick(rng, np.log(np.array([0.55, 0.3, 0.1, 0.03, 0.015, 0.005]))
                                  + np.outer(tech, [-0.3, 0.5, 0.0, 0.2, 0.6, 0.8]))
    seg_logits = np.column_stack([
        np.full(n, 0.0) - 1.2 * loy, np.full(n, 0.8), 0.6 + 0.5 * loy + 0.2 * aff,
        -1.3 + 0.9 * aff + 0.6 * loy, -0.6 - 0.9 * eng, np.full(n, np.log(0.004 * 6)),
    ])
    f["user_segment"] = _gumbel_pick(rng, seg_logits)
    f["device_model"] = _missing(rng, dm, 0.03)
    city = _from_cdf(rng, n, s.cdf["city"])
    f["city"] = _missing(rng, city, 0.08)
    f["ad_slot"] = _from_cdf(rng, n, s.cdf["ad_slot"])
    f["category_pref"] = _missing(rng, _from_cdf(rng, n, s.cdf["category_pref"]), 0.2)
    f["network"] = _missing(rng, _gumbel_pick(rng, np.log(np.array([0.5, 0.2, 0.25, 0.05]))
                                              + np.outer(tech, [0.2, 0.5, 0, -0.6])), 0.06)
    age = np.clip(np.round(2.5 + 0.4 * loy + 1.3 * rng.standard_normal(n)), 0, 6).astype(np.int32)
    f["age_band"] = _missing(rng, age, np.where(f["user_segment"] == 0, 0.35, 0.15))
    f["day_of_week"] = ((local // 24 + 3) % 7).astype(np.int32)  # 1970-01-01 was a Thursday

    # --- proxies
    tier = s.city_tier[city]
    f["city_tier"] = np.where(f["city"] < 0, -1, tier).astype(np.int32)
    f["province"] = _missing(rng, s.city_province[city], 0.08)
    f["gender"] = _missing(rng, rng.integers(0, 3, n).astype(np.int32), 0.25)
    f["app_version"] = _from_cdf(rng, n, s.cdf["app_version"])
    f["os_version"] = _missing(rng, np.round(np.clip(11 + 1.5 * tech + rng.normal(0, 1.2, n), 4, 18)), 0.02)
    f["carrier"] = _gumbel_pick(rng, np.log(np.array([0.5, 0.22, 0.2, 0.03, 0.05])) + np.zeros((n, 1)))
    f["browser"] = _gumbel_pick(rng, np.log(np.array([0.55, 0.1, 0.08, 0.12, 0.05, 0.04, 0.03, 0.03]))
                                + np.outer(tech, [0.1, 0.2, 0.3, -0.1, -0.2, -0.3, 0.2, 0]))
    f["screen_class"] = np.clip(np.round(6 + 2.0 * tech + rng.normal(0, 1.5, n)), 0, 11).astype(np.int32)
    for m, base, load in (("views", 2.5, 0.9), ("favs", -0.5, 0.6), ("shares", -1.5, 0.5),
                          ("visits", 0.5, 0.8), ("cart_views", -0.2, 0.7),
                          ("coupon_claims", -1.2, 0.4), ("search_terms", 0.3, 0.6)):
        rate = np.exp(base + load * eng + 0.5 * rng.standard_normal(n))
        for w in _WINDOWS:
            days = float(w[:-1])
            f[f"{m}_{w}"] = _missing(rng, pois(rate * days / 7).astype(float), 0.02)
    f["ram_gb"] = np.clip(np.round(2 ** np.round(2 + 0.8 * tech + rng.normal(0, 0.5, n))), 1, 32)
    f["storage_free_gb"] = _missing(rng, np.round(_lognormal(rng, 2.8 + 0.4 * tech, 0.9, n), 1), 0.1)
    f["battery_level"] = _missing(rng, np.round(rng.beta(3, 1.5, n), 2), 0.3)
    width = np.round(np.clip(390 + 40 * tech + rng.normal(0, 30, n), 320, 1440))
    f["screen_width"] = width
    f["screen_height"] = np.round(width * rng.choice([1.78, 2.0, 2.17, 2.22], n))
    f["apps_installed"] = pois(np.exp(3.8 + 0.3 * tech)).astype(float)
    f["font_scale"] = _missing(rng, rng.choice([0.85, 1.0, 1.0, 1.0, 1.15, 1.3], n), 0.15)
    f["account_verified"] = (rng.random(n) > 1 / (1 + np.exp(-(1.5 + loy)))).astype(np.int32)
    f["membership_level"] = _missing(rng, np.clip(np.round(1 + aff + loy * 0.5 + rng.normal(0, 0.8, n)), 0, 4)
                                     .astype(np.int32), 1 / (1 + np.exp(-(0.4 - 0.8 * loy))))
    f["referral_source"] = _missing(rng, _from_cdf(rng, n, s.cdf["referral_source"]), 0.4)
    f["ip_asn"] = _missing(rng, _from_cdf(rng, n, s.cdf["ip_asn"]), 0.01)
    f["language"] = _gumbel_pick(rng, np.log(np.array([0.92, 0.04, 0.01, 0.01, 0.005, 0.005, 0.005, 0.005]))
                                 + np.zeros((n, 1)))
    f["login_method"] = _gumbel_pick(rng, np.log(np.array([0.3, 0.3, 0.25, 0.1, 0.05])) + np.zeros((n, 1)))
    for i in range(1, 5):
        f[f"interest_tag_{i}"] = _missing(rng, _from_cdf(rng, n, s.cdf[f"interest_tag_{i}"]), 0.1 * i)
    smin = _lognormal(rng, 2.5 + 0.6 * eng, 0.6, n)
    f["session_min_7d"] = np.round(smin * f["sessions_7d"], 1)
    f["session_min_30d"] = _missing(rng, np.round(smin * pois(4 * np.exp(1.1 + 0.8 * eng)), 1), 0.05)
    f["pages_per_session"] = np.round(_lognormal(rng, 1.5 + 0.3 * eng, 0.5, n), 2)
    f["bounce_rate"] = _missing(rng, np.round(rng.beta(2, 4 + np.exp(0.5 * eng)), 3), 0.08)
    f["night_activity_ratio"] = np.round(rng.beta(1.5, 6, n), 3)
    f["weekend_ratio"] = np.round(rng.beta(2, 5, n), 3)
    f["push_open_rate"] = _missing(rng, np.round(rng.beta(1, 8, n) * (1 + 0.3 * np.tanh(eng)), 4), 0.5)
    f["email_open_rate"] = _missing(rng, np.round(rng.beta(1, 12, n), 4), 0.7)
    f["reviews_written"] = pois(0.6 * (orders + 0.2)).astype(float)
    f["shops_followed"] = pois(np.exp(0.5 + 0.5 * loy + 0.3 * eng)).astype(float)
    returns = rng.binomial(orders.astype(np.int64), 0.08).astype(float)
    f["returns_90d"] = returns
    with np.errstate(invalid="ignore", divide="ignore"):
        f["refund_rate"] = np.where(orders > 0, np.round(returns / orders, 4), np.nan)

    # --- pure noise: independent of everything
    f["noise_num_00"] = rng.standard_normal(n)
    f["noise_num_01"] = rng.random(n)
    f["noise_num_02"] = np.round(_lognormal(rng, 1.0, 1.2, n), 3)
    f["noise_num_03"] = pois(3.0, n).astype(float)
    f["noise_num_04"] = _missing(rng, rng.standard_normal(n), 0.5)
    f["noise_num_05"] = rng.standard_t(3, n)
    f["noise_num_06"] = rng.integers(0, 2, n).astype(float)
    f["noise_num_07"] = _missing(rng, rng.exponential(10.0, n), 0.15)
    f["noise_num_08"] = rng.integers(0, 100, n).astype(float)
    f["noise_num_09"] = _missing(rng, np.round(rng.beta(0.5, 0.5, n), 3), 0.05)
    for i in range(5):
        name = f"noise_cat_{i:02d}"
        f[name] = _from_cdf(rng, n, s.cdf[name])
    f["noise_cat_04"] = _missing(rng, f["noise_cat_04"], 0.3)
    return f


# ----------------------------------------------------------------------------- labels
# Intent h = 0 browse, 1 consider, 2 buy. Offsets per task and intent.
_D_CLICK = np.array([-1.0, 0.3, 1.0])
_D_ONLINE = np.array([-0.9, 0.2, 1.1])
_D_CART = np.array([-1.6, 0.3, 1.3])
_D_DEAL = np.array([-2.2, 0.0, 1.6])
_GAMMA_CART_DEAL = 1.6
_SEG = {  # click, online, cart, deal, buy-intent effects per user_segment
    "click": np.array([0.25, 0.0, 0.1, 0.15, -0.6, -0.1]),
    "online": np.array([0.1, 0.0, 0.05, 0.2, -0.3, 0.8]),
    "cart": np.array([-0.3, 0.0, 0.15, 0.4, -0.2, 1.8]),
    "deal": np.array([-0.7, 0.0, 0.25, 0.7, -0.3, 2.6]),
    "intent": np.array([-0.4, 0.0, 0.2, 0.5, -0.6, 1.0]),
}
_OS_ONLINE = np.array([0.0, 0.25, 0.05, -0.2, 0.2, -0.3])
_NET_ONLINE = np.array([0.15, 0.2, 0.0, -0.8, -0.1])  # last = missing
_AGE_DEAL = np.array([-0.8, -0.2, 0.2, 0.3, 0.2, -0.1, -0.4, 0.0])  # last = missing


def _lg(x: np.ndarray) -> np.ndarray:
    return np.log1p(np.maximum(x, 0))


def _logits(f: dict[str, np.ndarray], ts: np.ndarray, cfg: WorldConfig, s: _Structure
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-row (intent logits[n,3], a_click, a_online, a_cart, a_deal) from observed features.

    Reads only the label-relevant features (the first 28 of the catalogue), so the truth is a
    function of what is logged.
    """
    g = cfg.signal
    nan0 = np.nan_to_num
    sess, clk, dwell = _lg(f["sessions_7d"]), _lg(f["clicks_30d"]), np.log(f["dwell_sec_avg"] + 1)
    engage = 0.45 * (sess - 1.35) + 0.35 * (clk - 1.2) + 0.3 * (dwell - 3.5)
    ctr = f["ctr_30d"]
    ctr_t = np.where(np.isnan(ctr), -0.25, np.clip(3.0 * (np.sqrt(nan0(ctr)) - 0.27), -1.5, 1.5))
    hv = f["hours_since_last_visit"]
    recency = np.where(np.isnan(hv), -0.3, -0.35 * (_lg(nan0(hv)) - 2.3))
    dlo = f["days_since_last_order"]
    buy_hist = (0.6 * _lg(f["orders_90d"]) + np.where(np.isnan(dlo), -0.5, 0.8 * np.exp(-nan0(dlo) / 15))
                + 0.3 * _lg(f["cart_adds_30d"]) + 0.2 * _lg(f["wishlist_size"]))
    lt = np.log(f["tenure_days"])
    tenure_deal = -0.25 * (lt - 5.5) ** 2 + 0.3  # inverted U: brand-new and ancient accounts buy less
    tenure_click = 0.35 * (lt < np.log(30))
    cpn = f["coupon_use_rate"]
    ps = f["price_sensitivity"]
    # interaction: coupon hunters who are price sensitive add to cart; not either alone
    coupon_x = np.where(np.isnan(cpn) | np.isnan(ps), 0.0, 4.0 * (nan0(cpn) - 0.25) * (nan0(ps) - 0.45))
    searches = _lg(f["searches_7d"])
    hour = f["hour_of_day"]
    chan = f["channel"]
    chan_t = s.chan_base[chan] + s.chan_amp[chan] * np.cos(2 * np.pi * (hour - s.chan_peak[chan]) / 24)
    night = ((hour >= 1) & (hour <= 5)).astype(float)
    seg = f["user_segment"]
    dm = f["device_model"]
    re_dm_c = np.where(dm < 0, 0.0, s.re_dm_click[np.maximum(dm, 0)])
    re_dm_d = np.where(dm < 0, 0.0, s.re_dm_deal[np.maximum(dm, 0)])
    city = f["city"]
    tier = np.where(city < 0, 2, s.city_tier[np.maximum(city, 0)])
    re_city = np.where(city < 0, 0.0, s.re_city[np.maximum(city, 0)]) + 0.12 * (2 - tier)
    cat = f["category_pref"]
    re_cat_k = np.where(cat < 0, -0.2, s.re_cat_cart[np.maximum(cat, 0)])
    re_cat_d = np.where(cat < 0, -0.3, s.re_cat_deal[np.maximum(cat, 0)])
    price = f["device_price"]
    lp = np.log(np.where(np.isnan(price), 1500.0, price))
    aov = f["avg_order_value"]
    # Luxury tail: very expensive device AND a high order value -> deals far more likely.
    lux = np.where(np.isnan(price) | np.isnan(aov), 0.0,
                   np.clip(lp - 8.4, 0, None) * np.clip(_lg(nan0(aov)) - 4.8, 0, None) * 3.0)
    net = np.where(f["network"] < 0, 4, f["network"])
    age = np.where(f["age_band"] < 0, 7, f["age_band"])
    weekend = (f["day_of_week"] >= 5).astype(float)
    bid = _lg(f["bid_floor"])

    a_click = g * 1.5 * (0.55 * engage + 0.9 * ctr_t + 0.4 * recency + chan_t + 0.8 * s.re_slot[f["ad_slot"]]
                   + re_dm_c + tenure_click + _SEG["click"][seg] - 0.3 * night + 0.5 * bid
                   + 0.25 * np.tanh(engage * ctr_t * 2))
    a_online = g * (0.3 * engage + 0.5 * (chan == 0) + _OS_ONLINE[f["device_os"]] + _NET_ONLINE[net]
                    - 0.25 * np.clip(lp - 7.0, -2, 2) * (net == 3) + _SEG["online"][seg]
                    + 0.2 * re_city + 0.3 * np.tanh(searches - 1))
    a_cart = g * (0.6 * buy_hist + 0.25 * engage + coupon_x + re_cat_k + _SEG["cart"][seg]
                  + 0.3 * re_city + 0.25 * searches)
    a_deal = g * (0.7 * buy_hist + tenure_deal + re_dm_d * 0.6 + re_cat_d + lux + _SEG["deal"][seg]
                  + _AGE_DEAL[age] + 0.2 * weekend + 0.4 * np.where(np.isnan(ps), 0, 0.5 - nan0(ps))
                  + 0.3 * re_city)
    tau = (ts - cfg.start_ms) / (cfg.span_days * 86_400_000.0) - 0.5
    intent = np.column_stack([
        np.zeros_like(engage),
        g * (0.3 + 0.5 * engage + 0.4 * searches - 0.3),
        g * (-1.0 + 0.8 * buy_hist + 0.4 * engage + _SEG["intent"][seg] + 0.3 * re_cat_d)
        + 1.5 * cfg.drift * tau,
    ])
    a_click = a_click - cfg.drift * tau
    return intent, a_click, a_online, a_cart, a_deal


def _sig(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _task_probs(intent: np.ndarray, a: tuple[np.ndarray, ...], b: np.ndarray
                ) -> tuple[np.ndarray, ...]:
    """Per-intent conditionals and the mixture weights, for truth and sampling."""
    pi = np.exp(intent - intent.max(axis=1, keepdims=True))
    pi /= pi.sum(axis=1, keepdims=True)
    c = _sig(a[0][:, None] + _D_CLICK + b[0])
    o = _sig(a[1][:, None] + _D_ONLINE + b[1])
    k = _sig(a[2][:, None] + _D_CART + b[2])
    q0 = _sig(a[3][:, None] + _D_DEAL + b[3])
    q1 = _sig(a[3][:, None] + _D_DEAL + b[3] + _GAMMA_CART_DEAL)
    return pi, c, o, k, q0, q1


def _truth(pi, c, o, k, q0, q1) -> np.ndarray:
    co = c * o
    return np.column_stack([
        (pi * c).sum(1), (pi * co).sum(1), (pi * co * k).sum(1), (pi * co * (k * q1 + (1 - k) * q0)).sum(1),
    ])


def _intercepts(cfg: WorldConfig) -> np.ndarray:
    """Per-task intercepts making the base rates hit `cfg.base_rates` on a calibration sample."""
    # Only what the label model reads matters; drift is measured from the span's middle.
    return _solve_intercepts(replace(cfg, features=_LABEL_FEATURE_COUNT, drift=0.0, new_source_from=None,
                                     drift_source_from=None))


@lru_cache(maxsize=16)
def _solve_intercepts(cfg: WorldConfig) -> np.ndarray:
    s = _structure(cfg.structure_seed)
    rng = np.random.default_rng(np.random.SeedSequence(cfg.structure_seed, spawn_key=(2**31 + 1,)))
    n = _CALIBRATION_ROWS
    ts = cfg.start_ms + np.sort(rng.integers(0, int(cfg.span_days * 86_400_000), n))
    f = _features(rng, n, ts, s)
    intent, a_click, a_online, a_cart, a_deal = _logits(f, ts, cfg, s)
    pi = np.exp(intent - intent.max(axis=1, keepdims=True))
    pi /= pi.sum(axis=1, keepdims=True)

    def solve(target: float, mean_rate) -> float:
        lo, hi = -20.0, 20.0
        for _ in range(45):  # bisection: each rate is increasing in its own intercept
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if mean_rate(mid) < target else (lo, mid)
        return 0.5 * (lo + hi)

    x_c, x_o = a_click[:, None] + _D_CLICK, a_online[:, None] + _D_ONLINE
    x_k, x_d = a_cart[:, None] + _D_CART, a_deal[:, None] + _D_DEAL
    rates = cfg.base_rates
    b_c = solve(rates[0], lambda b: (pi * _sig(x_c + b)).sum(1).mean())
    w = pi * _sig(x_c + b_c)
    b_o = solve(rates[1], lambda b: (w * _sig(x_o + b)).sum(1).mean())
    w = w * _sig(x_o + b_o)
    b_k = solve(rates[2], lambda b: (w * _sig(x_k + b)).sum(1).mean())
    k = _sig(x_k + b_k)
    b_d = solve(rates[3], lambda b: (w * (k * _sig(x_d + b + _GAMMA_CART_DEAL)
                                          + (1 - k) * _sig(x_d + b))).sum(1).mean())
    return np.array([b_c, b_o, b_k, b_d])



# ----------------------------------------------------------------------------- shifts
# The new source: a partner integration whose users come to buy and whose client logs in other
# units with its own id spaces. Labels come from the canonical (known-unit, known-id) features
# plus the intent boost; only the LOGGED features are transformed, by a bijection per source, so
# true_<task> stays the exact P(task | logged features): the source is recognisable from them.
NEW_SOURCE_INTENT = np.array([0.0, 1.0, 3.0])  # added to the (browse, consider, buy) intent logits
NEW_SOURCE_DEAL = 0.8  # added to the deal logit: high intent shows most at the bottom of the funnel
NEW_SOURCE_UNITS: dict[str, float] = {  # logged value = canonical value x factor
    "device_price": 100.0, "avg_order_value": 100.0, "bid_floor": 100.0,  # cents, not yuan
    "dwell_sec_avg": 1000.0,  # milliseconds
    "hours_since_last_visit": 60.0,  # minutes
    "tenure_days": 24.0,  # hours
    "ctr_30d": 100.0, "coupon_use_rate": 100.0, "price_sensitivity": 100.0,  # percent
    "bounce_rate": 100.0, "push_open_rate": 100.0, "email_open_rate": 100.0, "refund_rate": 100.0,
    "screen_width": 3.0, "screen_height": 3.0,  # physical pixels
    "storage_free_gb": 1024.0,  # MB
}
# The same partner logging in coarser units: its users then look like new, low-value, idle ones
# (the failure mode the issue describes: a high-intent source a model scores low and blocks).
NEW_SOURCE_UNITS_SMALLER: dict[str, float] = {
    "device_price": 1e-3, "avg_order_value": 1e-3, "bid_floor": 1e-3,  # thousands of yuan
    "dwell_sec_avg": 1 / 60, "hours_since_last_visit": 1 / 24, "tenure_days": 1 / 365,  # min, days, years
    "screen_width": 1 / 3, "screen_height": 1 / 3, "storage_free_gb": 1 / 1024,  # points, TB
    "session_min_7d": 1 / 60, "session_min_30d": 1 / 60,  # hours
}
NEW_SOURCE_UNIT_SETS = {"larger": NEW_SOURCE_UNITS, "smaller": NEW_SOURCE_UNITS_SMALLER}
# categorical columns whose values the new source names in its own id space (never seen before)
NEW_SOURCE_IDS = ("device_model", "city", "province", "app_version", "ip_asn", "carrier",
                  "referral_source", "browser")
NEW_ID_PREFIX = "nx-"
# The drifting client: a known release whose time features drift from seconds toward another
# unit: logged = canonical x (1 + (scale - 1) x progress), progress 0 -> 1 from the start to the
# end of the rows. Labels and categories stay those of known traffic.
DRIFT_SOURCE_COLUMNS = ("dwell_sec_avg", "hours_since_last_visit", "session_min_7d", "session_min_30d",
                        "pages_per_session")
SOURCES = ("known", "new", "drift")


def _shift_sources(cfg: WorldConfig, rows: int, seed: int, b: int, idx: np.ndarray) -> np.ndarray:
    """Source code per row of block b (0 known, 1 new, 2 drift), from the shifts' own stream."""
    n = len(idx)
    src = np.zeros(n, np.int8)
    if not cfg.shifted:
        return src
    draw = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(b, 1))).random((n, 2))
    if cfg.new_source_from is not None:
        src[(idx >= round(cfg.new_source_from * rows)) & (draw[:, 0] < cfg.new_source_share)] = 1
    if cfg.drift_source_from is not None:
        start = round(cfg.drift_source_from * rows)
        src[(src == 0) & (idx >= start) & (draw[:, 1] < cfg.drift_source_share)] = 2
    return src


def _drift_factor(cfg: WorldConfig, rows: int, idx: np.ndarray) -> np.ndarray:
    start = round(cfg.drift_source_from * rows)
    progress = np.clip((idx - start) / max(rows - 1 - start, 1), 0.0, 1.0)
    return 1.0 + (cfg.drift_source_scale - 1.0) * progress


def _logged_features(f: dict[str, np.ndarray], src: np.ndarray, cfg: WorldConfig, rows: int,
                     idx: np.ndarray) -> dict[str, np.ndarray]:
    """What the shifted sources log: canonical features with their units and id spaces changed.
    New-source categorical codes are offset by the vocabulary size (the `nx-` half of the
    dictionary `_block` writes)."""
    out = dict(f)
    new, drift = src == 1, src == 2
    if new.any():
        for name, factor in NEW_SOURCE_UNIT_SETS[cfg.new_source_units].items():
            if name in out:
                out[name] = np.where(new, out[name] * factor, out[name])
    if drift.any():
        k = _drift_factor(cfg, rows, idx)
        for name in DRIFT_SOURCE_COLUMNS:
            if name in out:
                out[name] = np.where(drift, out[name] * k, out[name])
    return out

# ----------------------------------------------------------------------------- blocks
def _block(cfg: WorldConfig, rows: int, seed: int, b: int) -> pa.RecordBatch:
    s = _structure(cfg.structure_seed)
    row0 = b * BLOCK_ROWS
    n = min(BLOCK_ROWS, rows - row0)
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(b,)))
    idx = np.arange(row0, row0 + n, dtype=np.float64)
    span_ms = cfg.span_days * 86_400_000.0
    ts = cfg.start_ms + np.floor((idx + rng.random(n)) * (span_ms / rows)).astype(np.int64)
    f = _features(rng, n, ts, s)
    intent, *a = _logits(f, ts, cfg, s)
    src = _shift_sources(cfg, rows, seed, b, idx)
    new = src == 1
    if new.any():
        intent = intent + np.where(new[:, None], NEW_SOURCE_INTENT, 0.0)
        a[3] = a[3] + np.where(new, NEW_SOURCE_DEAL, 0.0)
    pi, c, o, k, q0, q1 = _task_probs(intent, tuple(a), _intercepts(cfg))
    truth = _truth(pi, c, o, k, q0, q1)
    # Sample intent, then walk the funnel with the same per-intent conditionals.
    h = (rng.random(n)[:, None] > np.cumsum(pi, axis=1)[:, :2]).sum(1)
    r = np.arange(n)
    u = rng.random((n, 4))
    click = u[:, 0] < c[r, h]
    online = click & (u[:, 1] < o[r, h])
    cart = online & (u[:, 2] < k[r, h])
    deal = online & (u[:, 3] < np.where(cart, q1[r, h], q0[r, h]))

    ids = pc.binary_join_element_wise(
        f"w{seed}-", pc.utf8_lpad(pc.cast(pa.array(np.arange(row0, row0 + n)), pa.string()), 10, "0"), "")
    cols: dict[str, pa.Array] = {"request_id": ids, "ts_ms": pa.array(ts, pa.int64())}
    for name, lab in zip(TASKS, (click, online, cart, deal), strict=True):
        cols[name] = pa.array(lab.astype(np.int8))
    for j, name in enumerate(TASKS):
        cols[f"true_{name}"] = pa.array(truth[:, j].astype(np.float32))
    if cfg.shifted:
        cols["true_source"] = pa.DictionaryArray.from_arrays(pa.array(src.astype(np.int32)),
                                                             pa.array(SOURCES, pa.string()))
    logged = _logged_features(f, src, cfg, rows, idx) if src.any() else f
    for name, kind in cfg.feature_names():
        if kind == _N:
            x = logged[name] if name in logged else rng.standard_normal(n)
            cols[name] = pa.array(x.astype(np.float32), pa.float32(), from_pandas=True)
        else:
            code = logged[name]
            vocab = s.vocab[name]
            if cfg.new_source_from is not None and name in NEW_SOURCE_IDS:
                # one dictionary for every block: known names, then the new source's own names
                code = np.where(new & (code >= 0), code + len(vocab), code)
                vocab = np.concatenate([vocab, np.array([NEW_ID_PREFIX + v for v in vocab], dtype=object)])
            cols[name] = pa.DictionaryArray.from_arrays(
                pa.array(code, pa.int32(), mask=code < 0), pa.array(vocab, pa.string()))
    return pa.RecordBatch.from_pydict(cols)


PERIODS = ("all", "before", "after")


def period_rows(rows: int, config: WorldConfig, period: str = "all") -> tuple[int, int]:
    """Row index range [lo, hi) of a period: `before` / `after` the first shift's start row.

    Rows are in time order, so this is the time-ordered split the shift experiments need: train
    on the traffic before the new source, test on the traffic after (same ids and content as
    the whole world's rows).
    """
    if period not in PERIODS:
        raise ConfigError(f"period must be one of {', '.join(PERIODS)}, got {period!r}")
    if period == "all":
        return 0, rows
    if not config.shifted:
        raise ConfigError(f"period {period!r} needs a shift (a new source or a drifting source) to split at")
    cut = config.shift_row(rows)
    lo, hi = (0, cut) if period == "before" else (cut, rows)
    if hi <= lo:
        raise ConfigError(f"period {period!r} of {rows} rows split at row {cut} is empty")
    return lo, hi


def generate(rows: int, seed: int = 0, config: WorldConfig | None = None,
             progress: bool = False, period: str = "all") -> Iterator[pa.RecordBatch]:
    """Logged traffic in blocks of `BLOCK_ROWS` (the DESIGN.md log format); `period` keeps the
    rows before / after the first shift (blocks outside it are never made)."""
    cfg = config or WorldConfig()
    cfg.validate()
    _check_rows_seed(rows, seed)
    lo, hi = period_rows(rows, cfg, period)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=hi - lo, unit="rows", unit_scale=True, file=sys.stderr, desc="world")
    try:
        for b in range(lo // BLOCK_ROWS, (hi + BLOCK_ROWS - 1) // BLOCK_ROWS):
            batch = _block(cfg, rows, seed, b)
            row0 = b * BLOCK_ROWS
            start, stop = max(lo - row0, 0), min(hi - row0, batch.num_rows)
            if (start, stop) != (0, batch.num_rows):
                batch = batch.slice(start, stop - start)
            if bar is not None:
                bar.update(batch.num_rows)
            yield batch
    finally:
        if bar is not None:
            bar.close()


def generate_table(rows: int, seed: int = 0, config: WorldConfig | None = None,
                   period: str = "all") -> pa.Table:
    """The whole sample (or one period of it) as one table (tests, small sizes)."""
    return pa.Table.from_batches(list(generate(rows, seed, config, period=period)))


def feature_kinds(schema: pa.Schema) -> dict[str, str]:
    """Kind of every feature column from its dtype (DESIGN.md: numbers numeric, strings categorical)."""
    from stream.features import RESERVED_COLUMNS

    out = {}
    for fld in schema:
        if fld.name in RESERVED_COLUMNS:
            continue
        t = fld.type.value_type if pa.types.is_dictionary(fld.type) else fld.type
        if pa.types.is_string(t) or pa.types.is_large_string(t):
            out[fld.name] = CATEGORICAL
        elif pa.types.is_floating(t) or pa.types.is_integer(t):
            out[fld.name] = NUMERIC
        else:
            raise ConfigError(f"column {fld.name!r} has type {fld.type}, neither numeric nor categorical")
    return out


def write(out_dir: str | Path, rows: int, seed: int = 0, config: WorldConfig | None = None,
          shards: int = 1, progress: bool = True, period: str = "all") -> dict[str, Any]:
    """Write `part-XXXXX.parquet` shards and `_world.json`; returns the `_world.json` content.

    `rows` is the world's size; `period` writes only the rows before / after its first shift.

    The metadata file starts with "_" so Parquet readers given the directory skip it
    (`pyarrow.parquet.read_table(out_dir)` reads exactly the shards).
    """
    cfg = config or WorldConfig()
    cfg.validate()
    _check_rows_seed(rows, seed)
    lo, hi = period_rows(rows, cfg, period)
    count = hi - lo
    if not isinstance(shards, int) or not 1 <= shards <= count:
        raise ConfigError(f"shards must be an integer in [1, rows written], got {shards!r}")
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create output directory {out}: {exc.strerror}") from None
    for old in out.glob("part-*.parquet"):
        old.unlink()
    bounds = [count * k // shards for k in range(shards + 1)]
    files: list[dict[str, Any]] = []
    label_sum = np.zeros(4)
    true_sum = np.zeros(4)
    source_sum = np.zeros(len(SOURCES))
    started = time.perf_counter()
    writer: pq.ParquetWriter | None = None
    pending: list[pa.RecordBatch] = []
    shard, pos = 0, 0

    def flush() -> None:
        if pending:
            writer.write_table(pa.Table.from_batches(pending), row_group_size=ROW_GROUP_ROWS)
            pending.clear()

    try:
        for batch in generate(rows, seed, cfg, progress=progress, period=period):
            for j, t in enumerate(TASKS):
                label_sum[j] += pc.sum(batch.column(t)).as_py()
                true_sum[j] += pc.sum(pc.cast(batch.column(f"true_{t}"), pa.float64())).as_py()
            if cfg.shifted:
                source_sum += np.bincount(batch.column("true_source").indices.to_numpy(), minlength=len(SOURCES))
            while batch.num_rows:
                if writer is None:
                    name = f"part-{shard:05d}.parquet"
                    writer = pq.ParquetWriter(out / name, batch.schema, compression="zstd",
                                              write_statistics=True)
                    files.append({"file": name, "rows": bounds[shard + 1] - bounds[shard]})
                take = min(batch.num_rows, bounds[shard + 1] - pos)
                pending.append(batch.slice(0, take))
                if sum(p.num_rows for p in pending) >= ROW_GROUP_ROWS:
                    flush()
                batch = batch.slice(take)
                pos += take
                if pos == bounds[shard + 1]:
                    flush()
                    writer.close()
                    writer, shard = None, shard + 1
    finally:
        if writer is not None:
            writer.close()
    elapsed = time.perf_counter() - started
    info = {
        "generator": GENERATOR_VERSION,
        "rows": count,
        "seed": seed,
        "config": asdict(cfg),
        "tasks": list(TASKS),
        "base_rates": {t: round(label_sum[j] / count, 6) for j, t in enumerate(TASKS)},
        "true_rates": {t: round(true_sum[j] / count, 6) for j, t in enumerate(TASKS)},
        "features": [{"name": n, "kind": k} for n, k in cfg.feature_names()],
        "feature_spec": cfg.feature_spec().to_dict(),
        "files": files,
        "truth": "true_<task> = P(task=1 | logged features, ts_ms) under the generative model "
                 "(latent intent integrated out exactly); see docs/world.md",
    }
    if cfg.shifted:
        info["world_rows"] = rows
        info["period"] = {"name": period, "first_row": lo, "end_row": hi, "shift_row": cfg.shift_row(rows)}
        info["sources"] = {name: round(float(v) / count, 6) for name, v in zip(SOURCES, source_sum, strict=True)}
    (out / META_FILE).write_text(json.dumps(info, indent=2) + "\n")
    info["seconds"] = round(elapsed, 2)  # not in the file: it is deterministic
    return info
