"""Event codecs: every message gets one row, every bad one its precise error, round trips hold."""

from __future__ import annotations

import gc
import hashlib
import json
import math

import jsonschema
import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stream.events import (
    ERROR_CODES,
    MODEL_HEADER,
    REASONS,
    SCHEMAS,
    dead_letter_headers,
    dead_letters,
    decision_headers,
    decode_decision,
    decode_outcome,
    decode_requests,
    encode_decisions,
    encode_outcome,
    encode_request,
    encode_requests,
    encode_requests_positional,
    load_schema,
    round_sig,
)
from stream.features import FeatureSpec

SPEC = FeatureSpec(("age", "spend", "visits"), ("device", "city"))
FP = SPEC.fingerprint()


def _validator(name: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(load_schema(name))


def _req(**overrides) -> bytes:
    doc = {"v": 1, "request_id": "r1", "ts_ms": 1_700_000_000_000,
           "features": {"age": 31, "spend": 12.5, "visits": None, "device": "ios", "city": "x"}}
    doc.update(overrides)
    return orjson.dumps({k: v for k, v in doc.items() if v is not _ABSENT})


_ABSENT = object()


def _one(raw: bytes | None, key: bytes | None = None, **kw):
    batch = decode_requests([raw], [key], SPEC, **kw)
    assert len(batch) == 1
    return batch


def _code(raw: bytes | None, **kw) -> str:
    batch = _one(raw, **kw)
    assert not batch.valid[0]
    assert len(batch.errors) == 1 and batch.errors[0].index == 0
    assert np.isnan(batch.num[0]).all() and (batch.cat[0] == "").all()
    return batch.errors[0].code


# ----------------------------------------------------------------------------- valid requests


def test_canonical_request_decodes_to_spec_order():
    batch = _one(_req())
    assert batch.valid.tolist() == [True] and batch.errors == []
    assert batch.request_id[0] == "r1" and batch.ts_ms[0] == 1_700_000_000_000
    assert batch.num.dtype == np.float32 and batch.num.shape == (1, 3)
    np.testing.assert_array_equal(batch.num[0], np.array([31, 12.5, np.nan], dtype=np.float32))
    assert batch.cat.tolist() == [["ios", "x"]]


def test_null_and_absent_features_are_missing_not_invalid():
    batch = _one(_req(features={"spend": None, "device": None}))
    assert batch.valid[0]
    assert np.isnan(batch.num[0]).all() and batch.cat[0].tolist() == ["", ""]
    assert _one(_req(features={})).valid[0]


def test_unknown_features_are_counted_not_errors():
    feats = {"age": 1, "spend": 2, "visits": 3, "device": "a", "city": "b", "extra": "?", "more": [1]}
    batch = decode_requests([_req(features=feats), _req(features={"age": 1, "zzz": 1})], None, SPEC)
    assert batch.valid.all()
    assert batch.unknown_features == 3


def test_keys_in_any_order_give_the_same_row():
    ordered = {"age": 1, "spend": 2.5, "visits": 3, "device": "a", "city": "b"}
    shuffled = dict(reversed(list(ordered.items())))
    batch = decode_requests([_req(features=ordered), _req(features=shuffled)], None, SPEC)
    assert batch.valid.all()
    np.testing.assert_array_equal(batch.num[0], batch.num[1])
    assert batch.cat[0].tolist() == batch.cat[1].tolist() == ["a", "b"]


def test_integer_categoricals_become_their_decimal_string():
    batch = _one(_req(features={"device": 7, "city": -12}))
    assert batch.valid[0] and batch.cat[0].tolist() == ["7", "-12"]


def test_unknown_top_level_fields_are_ignored():
    assert _one(_req(source="sdk-3", trace={"a": 1})).valid[0]


def test_positional_fast_path_matches_canonical():
    pos = orjson.dumps({"v": 1, "request_id": "r1", "ts_ms": 1_700_000_000_000, "fp": FP,
                        "x": [31, 12.5, None, "ios", "x"]})
    a, b = _one(_req()), _one(pos)
    assert b.valid[0]
    np.testing.assert_array_equal(a.num, b.num)
    assert a.cat.tolist() == b.cat.tolist()
    assert a.request_id.tolist() == b.request_id.tolist() and a.ts_ms.tolist() == b.ts_ms.tolist()


def test_positional_fingerprint_can_be_pinned_by_caller():
    pos = orjson.dumps({"v": 1, "request_id": "r", "ts_ms": 1, "fp": "00ff00ff00ff00ff", "x": [1, 2, 3, "a", "b"]})
    assert _one(pos, fingerprint="00ff00ff00ff00ff").valid[0]
    assert _code(pos) == "bad_fingerprint"


def test_float32_extremes_and_big_integers():
    ok = _one(_req(features={"age": 3.0e38, "spend": -1e-45, "visits": 18446744073709551615}))
    assert ok.valid[0] and np.isfinite(ok.num[0]).all()
    assert ok.num[0, 2] == np.float32(18446744073709551615)


# ----------------------------------------------------------------------------- every error code

CASES = [
    ("empty", None),
    ("empty", b""),
    ("oversized", b'{"v":1,"request_id":"r","ts_ms":1,"features":{"device":"' + b"a" * 70_000 + b'"}}'),
    ("not_utf8", b'{"v":1,"request_id":"\xff\xfe"}'),
    ("not_json", b'{"v":1,'),
    ("not_json", b"hello"),
    ("not_json", b'{"v":1} {"v":1}'),
    ("not_json", b"\xef\xbb\xbf{}"),
    ("non_finite", b'{"v":1,"request_id":"r","ts_ms":1,"features":{"age":NaN}}'),
    ("non_finite", b'{"v":1,"request_id":"r","ts_ms":1,"features":{"age":-Infinity}}'),
    ("non_finite", b'{"v":1,"request_id":"r","ts_ms":1,"features":{"age":1e400}}'),
    ("non_finite", _req(features={"spend": 1e39})),
    ("not_object", b"[1,2,3]"),
    ("not_object", b'"r1"'),
    ("not_object", b"null"),
    ("bad_version", _req(v=_ABSENT)),
    ("bad_version", _req(v=2)),
    ("bad_version", _req(v="1")),
    ("bad_version", _req(v=True)),
    ("bad_version", _req(v=1.0)),
    ("missing_request_id", _req(request_id=_ABSENT)),
    ("missing_request_id", _req(request_id=None)),
    ("bad_request_id", _req(request_id=123)),
    ("bad_request_id", _req(request_id="")),
    ("bad_request_id", _req(request_id="x" * 257)),
    ("bad_request_id", _req(request_id=["r"])),
    ("bad_ts", _req(ts_ms=_ABSENT)),
    ("bad_ts", _req(ts_ms="1700000000000")),
    ("bad_ts", _req(ts_ms=-1)),
    ("bad_ts", _req(ts_ms=1.5)),
    ("bad_ts", _req(ts_ms=True)),
    ("bad_features", _req(features=_ABSENT)),
    ("bad_features", _req(features=None)),
    ("bad_features", _req(features=[1, 2, 3])),
    ("bad_features", orjson.dumps({"v": 1, "request_id": "r", "ts_ms": 1, "fp": FP, "x": [1, 2]})),
    ("bad_features", orjson.dumps({"v": 1, "request_id": "r", "ts_ms": 1, "fp": FP, "x": {"age": 1}})),
    ("bad_fingerprint", orjson.dumps({"v": 1, "request_id": "r", "ts_ms": 1, "x": [1, 2, 3, "a", "b"]})),
    ("bad_fingerprint", orjson.dumps({"v": 1, "request_id": "r", "ts_ms": 1, "fp": "0" * 16, "x": [1, 2, 3, "a", "b"]})),
    ("non_numeric", _req(features={"age": "31"})),
    ("non_numeric", _req(features={"age": "abc"})),
    ("non_numeric", _req(features={"spend": True})),
    ("non_numeric", _req(features={"visits": [1]})),
    ("non_numeric", _req(features={"visits": {"n": 1}})),
    ("non_numeric", orjson.dumps({"v": 1, "request_id": "r", "ts_ms": 1, "fp": FP, "x": ["a", 2, 3, "a", "b"]})),
    ("bad_categorical", _req(features={"device": True})),
    ("bad_categorical", _req(features={"device": 1.5})),
    ("bad_categorical", _req(features={"city": ["a"]})),
    ("bad_categorical", _req(features={"city": {"a": 1}})),
    ("bad_binary", b"\x96\xc1"),  # a binary request's first byte, then no msgpack
    ("bad_binary", b"\x96\x01\x02"),  # an array of 6 cut short
]


@pytest.mark.parametrize(("code", "raw"), CASES, ids=[f"{c}-{i}" for i, (c, _) in enumerate(CASES)])
def test_error_code(code, raw):
    assert _code(raw) == code


def test_every_documented_code_has_a_case():
    assert {c for c, _ in CASES} == set(ERROR_CODES)


def test_error_messages_name_the_culprit():
    batch = decode_requests([_req(features={"spend": "12"}), _req(features={"city": True}),
                             _req(features={"age": 1e39})], None, SPEC)
    assert [e.code for e in batch.errors] == ["non_numeric", "bad_categorical", "non_finite"]
    assert "'spend'" in batch.errors[0].message and "a string" in batch.errors[0].message
    assert "'city'" in batch.errors[1].message and "a boolean" in batch.errors[1].message
    assert "'age'" in batch.errors[2].message


_SHALLOW = ["bad_version", "bad_request_id", "bad_ts", "bad_fingerprint", "non_numeric", "bad_categorical",
            "not_object"]
# orjson parses at most 1024 nested levels: a value at depth d inside the request object is at
# level d + 1 (d + 2 inside "features"), so past the limit the whole message is `not_json`.
_DEPTH_CODES = {
    500: _SHALLOW, 1000: _SHALLOW,
    1023: _SHALLOW[:4] + ["not_json", "not_json", "not_object"],
    1024: ["not_json"] * 6 + ["not_object"],
    3000: ["not_json"] * 7,
}


@pytest.mark.parametrize("depth", sorted(_DEPTH_CODES))
def test_deeply_nested_values_never_raise(depth):
    nest = b"[" * depth + b"]" * depth
    values = [b'{"v":' + nest + b',"request_id":"r","ts_ms":1,"features":{}}',
              b'{"v":1,"request_id":' + nest + b',"ts_ms":1,"features":{}}',
              b'{"v":1,"request_id":"r","ts_ms":' + nest + b',"features":{}}',
              b'{"v":1,"request_id":"r","ts_ms":1,"fp":' + nest + b',"x":[]}',
              b'{"v":1,"request_id":"r","ts_ms":1,"features":{"age":' + nest + b'}}',
              b'{"v":1,"request_id":"r","ts_ms":1,"features":{"device":' + nest + b'}}',
              nest]
    batch = decode_requests(values, None, SPEC, max_bytes=10 * depth + 100)
    assert [e.code for e in batch.errors] == _DEPTH_CODES[depth]
    assert not batch.valid.any()


def test_limit_is_configurable():
    assert _code(_req(), max_bytes=50) == "oversized"


def test_invalid_rows_keep_body_id_else_key_else_digest():
    nan_raw = b'{"v":1,"request_id":"body-id","ts_ms":5,"features":{"age":NaN}}'
    values = [_req(request_id="r0", features={"age": "x"}), nan_raw, b"garbage", b"garbage", None]
    keys = [b"k0", b"k1", b"key-2", None, None]
    batch = decode_requests(values, keys, SPEC)
    assert batch.request_id.tolist() == [
        "r0", "body-id", "key-2", "invalid:" + hashlib.sha1(b"garbage").hexdigest(),
        "invalid:" + hashlib.sha1(b"").hexdigest()]
    assert batch.ts_ms.tolist() == [1_700_000_000_000, 5, 0, 0, 0]
    assert decode_requests([b"?"], ["str-key"], SPEC).request_id.tolist() == ["str-key"]
    assert decode_requests([b"?"], [b"\xff"], SPEC).request_id[0].startswith("invalid:")


def test_mixed_batch_keeps_order_and_one_row_per_message():
    good = [_req(request_id=f"g{i}", features={"age": i, "device": str(i)}) for i in range(5)]
    values = [good[0], b"{", good[1], None, good[2], _req(v=3), good[3], _req(features={"age": "1"}), good[4]]
    batch = decode_requests(values, [None] * len(values), SPEC)
    assert len(batch) == len(values)
    assert batch.valid.tolist() == [True, False, True, False, True, False, True, False, True]
    assert [e.index for e in batch.errors] == [1, 3, 5, 7]
    assert batch.num[batch.valid, 0].tolist() == [0, 1, 2, 3, 4]
    assert batch.cat[batch.valid, 0].tolist() == ["0", "1", "2", "3", "4"]
    assert batch.error_codes().tolist() == ["", "not_json", "", "empty", "", "bad_version", "", "non_numeric", ""]


def test_empty_batch_and_empty_spec():
    batch = decode_requests([], [], SPEC)
    assert len(batch) == 0 and batch.num.shape == (0, 3) and batch.cat.shape == (0, 2)
    empty_spec = FeatureSpec((), ())
    b = decode_requests([_req(features={}), _req(features={"q": 1})], None, empty_spec)
    assert b.valid.all() and b.num.shape == (2, 0) and b.unknown_features == 1


def test_single_feature_specs():
    num_only = FeatureSpec(("a",), ())
    b = decode_requests([_req(features={"a": 2}), _req(features={"b": 2})], None, num_only)
    assert b.valid.all() and b.num[:, 0].tolist()[0] == 2 and math.isnan(b.num[1, 0])
    cat_only = FeatureSpec((), ("c",))
    b = decode_requests([_req(features={"c": "z"}), _req(features={"c": 4})], None, cat_only)
    assert b.valid.all() and b.cat[:, 0].tolist() == ["z", "4"]


def test_gc_state_is_restored():
    assert gc.isenabled()
    decode_requests([_req()], None, SPEC)
    assert gc.isenabled()
    gc.disable()
    try:
        decode_requests([_req()], None, SPEC)
        assert not gc.isenabled()
    finally:
        gc.enable()


# ----------------------------------------------------------------------------- properties


def _check_invariants(batch, n: int) -> None:
    assert len(batch) == n
    assert batch.num.shape == (n, 3) and batch.cat.shape == (n, 2)
    assert batch.request_id.shape == (n,) and batch.ts_ms.shape == (n,)
    idx = [e.index for e in batch.errors]
    assert idx == sorted(set(idx))
    assert set(idx) == set(np.flatnonzero(~batch.valid).tolist())
    assert all(e.code in ERROR_CODES and e.message for e in batch.errors)
    assert all(isinstance(r, str) and r for r in batch.request_id.tolist())
    assert np.isnan(batch.num[~batch.valid]).all() and (batch.cat[~batch.valid] == "").all()
    assert not np.isinf(batch.num).any()
    assert all(isinstance(c, str) for c in batch.cat.ravel().tolist())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(st.none(), st.binary(max_size=300)), max_size=20),
       st.lists(st.one_of(st.none(), st.binary(max_size=20)), max_size=20))
def test_arbitrary_bytes_never_raise_and_never_lose_a_message(values, keys):
    keys = (keys + [None] * len(values))[: len(values)]
    _check_invariants(decode_requests(values, keys, SPEC, max_bytes=200), len(values))


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids, max_size=4),
    max_leaves=12,
)
_feature_value = st.one_of(_json, st.integers(-(2**70), 2**70), st.floats(width=32, allow_nan=False))
_features = st.dictionaries(st.sampled_from(["age", "spend", "visits", "device", "city", "other"]),
                           _feature_value, max_size=6)
_x = st.lists(_feature_value, min_size=5, max_size=5)
# Envelopes that are right, so the features decide (canonical, positional, or both keys present).
_good_docs = st.fixed_dictionaries(
    {"v": st.just(1), "request_id": st.text(min_size=1, max_size=10), "ts_ms": st.integers(0, 2**63 - 1)},
    optional={"features": st.one_of(_features, _json), "fp": st.just(FP), "x": st.one_of(_x, _json)},
)
# Anything goes.
_any_docs = st.fixed_dictionaries(
    {},
    optional={
        "v": st.one_of(st.just(1), _json),
        "request_id": st.one_of(st.text(min_size=1, max_size=10), _json),
        "ts_ms": st.one_of(st.integers(0, 2**63 - 1), _json),
        "features": st.one_of(_features, _json),
        "fp": st.one_of(st.just(FP), st.text(max_size=16)),
        "x": st.one_of(_x, _json),
    },
)
_docs = st.one_of(_good_docs, _good_docs, _any_docs)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(_docs, _json), max_size=12))
def test_arbitrary_json_never_raises_and_valid_rows_reflect_the_body(docs):
    values = [json.dumps(d).encode() for d in docs]  # stdlib: integers beyond 64 bits too
    batch = decode_requests(values, None, SPEC)
    _check_invariants(batch, len(values))
    for i in np.flatnonzero(batch.valid).tolist():
        doc = docs[i]
        assert batch.request_id[i] == doc["request_id"] and batch.ts_ms[i] == doc["ts_ms"]
        row = doc["x"] if "x" in doc else [doc["features"].get(n) for n in SPEC.names]
        for j, value in enumerate(row[:3]):
            assert (value is None and np.isnan(batch.num[i, j])) or batch.num[i, j] == np.float32(np.float64(value))
        for j, value in enumerate(row[3:]):
            assert batch.cat[i, j] == ("" if value is None else str(value))


_f32 = st.one_of(st.none(), st.floats(width=32, allow_nan=False, allow_infinity=False))
_catv = st.one_of(st.just(""), st.text(max_size=6))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.lists(_f32, min_size=3, max_size=3), st.lists(_catv, min_size=2, max_size=2)),
                min_size=1, max_size=15))
def test_batch_encoders_round_trip_canonical_and_positional(rows):
    num = np.array([[np.nan if v is None else v for v in r[0]] for r in rows], dtype=np.float32)
    cat = np.array([r[1] for r in rows], dtype=object)
    rids = [f"id-{i}" for i in range(len(rows))]
    ts = np.arange(len(rows), dtype=np.int64) * 1000
    for encoder in (encode_requests, encode_requests_positional):
        batch = decode_requests(encoder(rids, ts, num, cat, SPEC), None, SPEC)
        assert batch.valid.all(), batch.errors
        np.testing.assert_array_equal(batch.num, num)
        assert batch.cat.tolist() == cat.tolist()
        assert batch.request_id.tolist() == rids and batch.ts_ms.tolist() == ts.tolist()


@pytest.mark.parametrize("spec", [FeatureSpec(("a", "b"), ()), FeatureSpec((), ("c",)), FeatureSpec((), ())])
@pytest.mark.parametrize("encoder", [encode_requests, encode_requests_positional])
def test_batch_encoders_with_one_kind_or_none(spec, encoder):
    num = np.array([[1.5, np.inf], [np.nan, -2]], dtype=np.float32)[:, : len(spec.numeric)]
    cat = np.array([["x"], [""]], dtype=object)[:, : len(spec.categorical)]
    raws = encoder(["a", "b"], [1, 2], num, cat, spec)
    batch = decode_requests(raws, None, spec)
    assert batch.valid.all(), batch.errors
    expected = np.where(np.isinf(num), np.nan, num)  # inf is written as null: missing
    np.testing.assert_array_equal(batch.num, expected)
    assert batch.cat.tolist() == cat.tolist()
    assert encoder([], [], num[:0], cat[:0], spec) == []
    with pytest.raises(ValueError, match="do not match"):
        encoder(["a"], [1], num, cat, spec)


def test_encoders_write_float32_shortest():
    raws = encode_requests_positional(["r"], [1], np.array([[0.1, 2.5, np.nan]], dtype=np.float32),
                                      np.array([["ios", ""]], dtype=object), SPEC)
    assert orjson.loads(raws[0])["x"] == [0.1, 2.5, None, "ios", None]


def test_encode_request_round_trip_and_schema():
    raw = encode_request("abc", 123, {"age": np.float32(2.5), "spend": float("nan"), "device": "d"})
    assert orjson.loads(raw)["features"]["spend"] is None
    batch = _one(raw)
    assert batch.valid[0] and batch.request_id[0] == "abc" and batch.ts_ms[0] == 123
    assert batch.num[0, 0] == 2.5 and np.isnan(batch.num[0, 1:]).all()
    assert batch.cat[0].tolist() == ["d", ""]
    v = _validator("request")
    v.validate(orjson.loads(raw))
    num = np.array([[1, np.nan, 3]], dtype=np.float32)
    cat = np.array([["a", ""]], dtype=object)
    v.validate(orjson.loads(encode_requests_positional(["r"], [1], num, cat, SPEC)[0]))
    v.validate(orjson.loads(encode_requests(["r"], [1], num, cat, SPEC)[0]))
    for bad in (_req(v=2), _req(request_id=""), _req(features=_ABSENT), _req(features={"a": True})):
        assert not v.is_valid(orjson.loads(bad))


# ----------------------------------------------------------------------------- decisions


def _decisions(n: int = 6, **kw):
    rng = np.random.default_rng(0)
    p = rng.random((n, 4))
    reason = np.array((["score", "uncertain", "explore", "invalid", "degraded", "score"] * n)[:n], dtype=object)
    block = np.array(([True, False, False, False, True, False] * n)[:n])
    args = dict(threshold=0.1234567, target_ratio=0.3, model="v-2024", ts_ms=np.arange(n) + 10,
                latency_ms=rng.random(n) * 3,
                propensity=np.where(reason == "explore", 0.02, np.where(reason == "invalid", 1.0, 0.98)),
                tau_u=0.987654321, u_tasks=p[:, ::-1] / 7)
    args.update(kw)
    return encode_decisions([f"r{i}" for i in range(n)], block, reason, p[:, 3] * 0.9, rng.random(n), p, **args), p


def test_decisions_validate_against_the_schema_and_decode_back():
    raws, p = _decisions()
    v = _validator("decision")
    docs = [decode_decision(r) for r in raws]
    for doc in docs:
        v.validate(doc)
    assert [d["decision"] for d in docs] == ["block", "pass", "pass", "pass", "block", "pass"]
    assert [d["reason"] for d in docs] == ["score", "uncertain", "explore", "invalid", "degraded", "score"]
    assert docs[0]["p"] == pytest.approx(dict(zip(("click", "online", "cart", "deal"), p[0], strict=True)), rel=1e-5)
    # thresholds at full precision (a replay compares fresh scores against them), the rest rounded
    assert docs[0]["threshold"] == 0.1234567 and docs[0]["tau_u"] == 0.987654321
    assert docs[0]["model"] == "v-2024" and docs[0]["ts_ms"] == 10
    assert docs[0]["u"] == pytest.approx(dict(zip(("click", "online", "cart", "deal"), p[0, ::-1] / 7, strict=True)), rel=1e-5)
    assert docs[3]["u"] is None
    assert docs[3]["p"] is None and docs[3]["score"] is None and docs[3]["uncertainty"] is None
    assert [d["propensity"] for d in docs] == [0.98, 0.98, 0.02, 1.0, 0.98, 0.98]


@pytest.mark.parametrize("reason", ["uncertain", "explore", "invalid"])
def test_schema_forces_pass_for_uncertain_explore_and_invalid(reason):
    raws, _ = _decisions()
    doc = orjson.loads(raws[0])  # a "score" / "block" decision
    v = _validator("decision")
    v.validate(doc)
    doc["reason"] = reason
    if reason == "invalid":
        doc["score"] = doc["uncertainty"] = doc["p"] = doc["u"] = None
    assert not v.is_valid(doc)  # a block with this reason is refused by the schema
    doc["decision"] = "pass"
    v.validate(doc)


def test_decision_reason_codes_nan_and_validation():
    raws = encode_decisions(["a", "b"], np.array([False, True]), np.array([2, 1]), [np.nan, 0.5], [0.1, 0.2],
                            np.full((2, 2), 0.5), tasks=("click", "deal"), threshold=np.nan, target_ratio=0.5,
                            model="m", ts_ms=[1, 2], latency_ms=0.5)
    docs = [decode_decision(r) for r in raws]
    assert [d["reason"] for d in docs] == [REASONS[2], REASONS[1]]
    assert docs[0]["score"] is None and docs[0]["threshold"] is None
    assert "propensity" not in docs[0] and "tau_u" not in docs[0] and "u" not in docs[0]  # none given
    with pytest.raises(ValueError, match="unknown decision reason"):
        encode_decisions(["a"], [False], ["because"], [0.1], [0.1], [[0.1] * 4], threshold=0.1,
                         target_ratio=0.1, model="m", ts_ms=[1], latency_ms=1.0)
    with pytest.raises(ValueError):
        decode_decision(b'{"v":1,"request_id":"a","decision":"maybe","reason":"score"}')
    with pytest.raises(ValueError):
        decode_decision(b"not json")


def test_decision_header_carries_model():
    assert decision_headers("v7") == [(MODEL_HEADER, b"v7")]


def test_round_sig():
    x = np.array([0.123456789, 123456.789, 1.23456789e-7, 0.0, -2.5e10, np.nan, np.inf])
    out = round_sig(x)
    assert out[:5].tolist() == [0.123457, 123457.0, 1.23457e-7, 0.0, -2.5e10]
    assert np.isnan(out[5]) and np.isinf(out[6])


# ----------------------------------------------------------------------------- outcomes and DLQ


def test_outcome_round_trip_and_schema():
    raw = encode_outcome("r9", "cart", 1234)
    doc = decode_outcome(raw)
    assert doc == {"request_id": "r9", "event": "cart", "ts_ms": 1234}
    _validator("outcome").validate(doc)
    with pytest.raises(ValueError):
        encode_outcome("r9", "purchase", 1)
    for bad in (b'{"request_id":"r","event":"buy","ts_ms":1}', b'{"event":"click","ts_ms":1}',
                b'{"request_id":"r","event":"click","ts_ms":-4}', b"[]", b"{"):
        with pytest.raises(ValueError):
            decode_outcome(bad)


def test_dead_letters_carry_original_bytes_and_error_headers():
    values = [_req(), b"\x00garbage", None, _req(features={"age": "old"})]
    keys = [b"a", b"b", b"c", b"d"]
    batch = decode_requests(values, keys, SPEC)
    letters = dead_letters(batch, values, keys, "rta.requests", partitions=[0, 1, 2, 0], offsets=[10, 11, 12, 13])
    assert [d.index for d in letters] == [1, 2, 3]
    assert [d.value for d in letters] == [b"\x00garbage", b"", values[3]]
    assert [d.key for d in letters] == [b"b", b"c", b"d"]
    v = _validator("dead-letter-headers")
    for d in letters:
        headers = {k: val.decode() for k, val in d.headers}
        v.validate(headers)
        assert headers["rta-error"].startswith(headers["rta-error-code"] + ": ")
        assert headers["rta-source-topic"] == "rta.requests"
    h = dict(letters[2].headers)
    assert h["rta-error-code"] == b"non_numeric" and h["rta-source-offset"] == b"13" and h["rta-source-partition"] == b"0"
    assert dict(dead_letter_headers("empty", "no value", "t")).keys() == {"rta-error", "rta-error-code", "rta-source-topic"}


def test_schemas_are_valid_draft_2020_12():
    for name in SCHEMAS:
        schema = load_schema(name)
        assert schema["$schema"].endswith("2020-12/schema")
        jsonschema.Draft202012Validator.check_schema(schema)
    with pytest.raises(ValueError):
        load_schema("nope")


# ------------------------------------------------------------------ typed path == checked path


def _both_paths(values: list[bytes | None]):
    """Decode once with the msgspec fast path and once with the checked path only."""
    import stream.events as ev

    fast = decode_requests(values, None, SPEC)
    saved, ev._use_typed = ev._use_typed, False
    try:
        slow = decode_requests(values, None, SPEC)
    finally:
        ev._use_typed = saved
    return fast, slow


def _assert_same(fast, slow) -> None:
    assert fast.request_id.tolist() == slow.request_id.tolist()
    assert fast.ts_ms.tolist() == slow.ts_ms.tolist()
    np.testing.assert_array_equal(fast.valid, slow.valid)
    np.testing.assert_array_equal(fast.num, slow.num)  # NaN == NaN here
    assert fast.cat.tolist() == slow.cat.tolist()
    assert [(e.index, e.code) for e in fast.errors] == [(e.index, e.code) for e in slow.errors]


@pytest.mark.skipif(not __import__("stream.events").events._use_typed, reason="msgspec not installed")
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(_docs, _docs, _json), max_size=12))
def test_typed_fast_path_gives_exactly_the_checked_rows(docs):
    values = [json.dumps(d).encode() for d in docs]
    _assert_same(*_both_paths(values))


@pytest.mark.skipif(not __import__("stream.events").events._use_typed, reason="msgspec not installed")
@pytest.mark.parametrize("raw", [
    b'{"v":1,"request_id":"a","ts_ms":1,"features":{"age":1,"age":2}}',  # duplicate key
    b'{"v":1.0,"request_id":"a","ts_ms":1,"features":{}}',
    b'{"v":1,"request_id":"a","ts_ms":1,"features":{"age":true}}',
    b'{"v":1,"request_id":"a","ts_ms":1,"features":{"age":123456789012345678901234567890}}',
    b'{"v":1,"request_id":"a","ts_ms":1,"features":{"device":123456789012345678901234567890}}',
    b'{"v":1,"request_id":"a","ts_ms":1,"features":{"age":1e400}}',
    b'{"v":1,"request_id":"a","ts_ms":1,"features":{"age":NaN}}',
    b'{"v":1,"request_id":"a","ts_ms":1,"features":{"device":1.5}}',
    b'{"v":1,"request_id":"a","ts_ms":1,"features":{"device":false}}',
    b'{"v":1,"request_id":"a","ts_ms":1.5,"features":{}}',
    b'{"v":1,"request_id":"a","ts_ms":-1,"features":{}}',
    b'{"v":1,"request_id":"","ts_ms":1,"features":{}}',
    b'{"v":1,"request_id":"a","ts_ms":1,"features":{},"extra":[1,2]}',
    b'{"v":1,"request_id":"a","ts_ms":1,"fp":"' + FP.encode() + b'","x":[1,2,3,"a",null]}',
    b'{"v":1,"request_id":"a","ts_ms":1,"fp":"' + FP.encode() + b'","x":[1,2,3,"a"]}',
    b'{"v":1,"request_id":"a","ts_ms":1,"fp":"bad","x":[1,2,3,"a",null]}',
    b'{"v":1,"request_id":"a","ts_ms":1,"features":{"age":3.4028235e38,"spend":3.5e38}}',
    b'{"v":1,"request_id":"a\\u0000b","ts_ms":1,"features":{"city":"\\ud800"}}',
    b'\xef\xbb\xbf{"v":1,"request_id":"a","ts_ms":1,"features":{}}',
])
def test_typed_fast_path_edge_cases(raw):
    good = _req()
    _assert_same(*_both_paths([good, raw, good]))
