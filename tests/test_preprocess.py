"""Preprocessor: fitted normalisation + vocab lookup, the numpy reference the ONNX graph copies."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.preprocess import MISSING_INDEX, UNKNOWN_INDEX, Preprocessor, signed_log1p
from stream.features import FeatureSpec

SPEC = FeatureSpec(("age", "n_orders", "score"), ("city", "device"))


def _batch(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    num = np.stack(
        [rng.normal(40, 10, n), rng.exponential(1.0, n) ** 3 * 50, rng.normal(0, 1, n)], axis=1
    ).astype(np.float32)
    num[rng.random((n, 3)) < 0.1] = np.nan
    cities = np.array(["bj", "sh", "gz", "sz", ""] + [f"rare{i}" for i in range(50)], dtype=object)
    p = np.r_[[0.3, 0.25, 0.2, 0.1, 0.05], np.full(50, 0.1 / 50)]
    cat = np.stack([rng.choice(cities, n, p=p), rng.choice(np.array(["ios", "android"], dtype=object), n)], axis=1)
    return num, cat


def test_fit_picks_log_for_skewed_counts_and_standardises():
    num, cat = _batch(20_000)
    pre = Preprocessor.fit(SPEC, num, cat)
    assert pre.num_log.tolist() == [False, True, False]
    x, idx = pre.transform(num, cat)
    assert x.dtype == np.float32 and x.shape == (20_000, 6)
    assert idx.dtype == np.int64 and idx.shape == (20_000, 2)
    present = ~np.isnan(num)
    for j in range(3):
        z = x[present[:, j], j]
        assert abs(z.mean()) < 0.05 and 0.9 < z.std() < 1.1
    # missing indicators and NaN -> 0
    np.testing.assert_array_equal(x[:, 3:], (~present).astype(np.float32))
    assert np.all(x[:, :3][~present] == 0.0)
    assert np.abs(x[:, :3]).max() <= pre.clip


def test_vocab_respects_min_count_order_and_cap():
    num, cat = _batch(20_000)
    pre = Preprocessor.fit(SPEC, num, cat, max_vocab=3, min_count=5)
    assert pre.vocab[0] == ["bj", "sh", "gz"]  # most frequent first, capped, no ""
    assert pre.cardinalities == [5, 4]
    _, idx = pre.transform(num, cat)
    city = cat[:, 0]
    assert np.all(idx[city == "", 0] == MISSING_INDEX)
    assert np.all(idx[city == "bj", 0] == 2)
    assert np.all(idx[city == "sz", 0] == UNKNOWN_INDEX)
    pre2 = Preprocessor.fit(SPEC, num, cat, min_count=10**9)
    assert pre2.vocab[0] == [] and pre2.cardinalities[0] == 2


def test_unseen_and_missing_categories_and_extreme_numbers():
    num, cat = _batch(5_000)
    pre = Preprocessor.fit(SPEC, num, cat)
    raw = np.array([[np.inf, -np.inf, 1e30], [np.nan, np.nan, np.nan]], np.float32)
    c = np.array([["never-seen", ""], ["", "ios"]], dtype=object)
    x, idx = pre.transform(raw, c)
    assert np.all(np.isfinite(x))
    assert x[0, 0] == pre.clip and x[0, 1] == -pre.clip and x[0, 2] == pre.clip
    assert x[1, :3].tolist() == [0, 0, 0] and x[1, 3:].tolist() == [1, 1, 1]
    assert idx.tolist() == [[UNKNOWN_INDEX, MISSING_INDEX], [MISSING_INDEX, pre._lookup[1]["ios"]]]


def test_roundtrip_through_json_is_exact():
    num, cat = _batch(5_000)
    pre = Preprocessor.fit(SPEC, num, cat)
    back = Preprocessor.from_dict(json.loads(json.dumps(pre.to_dict())))
    a, b = pre.transform(num, cat), back.transform(num, cat)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert back.spec == SPEC and back.vocab == pre.vocab


def test_tampered_spec_fingerprint_is_refused():
    num, cat = _batch(1_000)
    d = Preprocessor.fit(SPEC, num, cat).to_dict()
    d["spec"]["numeric"] = ["age", "score", "n_orders"]
    with pytest.raises(ValueError, match="fingerprint"):
        Preprocessor.from_dict(d)


def test_shape_errors_and_empty_batch():
    num, cat = _batch(1_000)
    pre = Preprocessor.fit(SPEC, num, cat)
    with pytest.raises(ValueError, match="num must be"):
        pre.transform(num[:, :2], cat)
    with pytest.raises(ValueError, match="cat must be"):
        pre.transform(num, cat[:10])
    x, idx = pre.transform(num[:0], cat[:0])
    assert x.shape == (0, 6) and idx.shape == (0, 2)


def test_no_features_of_a_kind():
    spec = FeatureSpec(("a",), ())
    pre = Preprocessor.fit(spec, np.ones((10, 1), np.float32), np.empty((10, 0), object))
    x, idx = pre.transform(np.ones((4, 1), np.float32), np.empty((4, 0), object))
    assert x.shape == (4, 2) and idx.shape == (4, 0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=1, max_size=50))
def test_transform_always_finite_and_bounded(values):
    num, cat = _batch(2_000)
    pre = Preprocessor.fit(SPEC, num, cat)
    raw = np.tile(np.asarray(values, np.float32)[:, None], (1, 3))
    x, _ = pre.transform(raw, np.full((len(values), 2), "x", dtype=object))
    assert np.all(np.isfinite(x)) and np.abs(x).max() <= pre.clip


def test_signed_log1p_is_odd_and_monotone():
    v = np.linspace(-1e4, 1e4, 1001, dtype=np.float32)
    y = signed_log1p(v)
    np.testing.assert_allclose(y, -signed_log1p(-v), atol=0)
    assert np.all(np.diff(y) >= 0)
