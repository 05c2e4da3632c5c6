"""The compiled request decoder (stream/_fastreq.c) against the Python path it stands in for.

What must hold: for any batch, `decode_requests` gives the same rows (ids, timestamps, float32
bits, strings, codes, validity, error codes and messages, unknown-name counts) with the compiled
parser on as off; canonical requests are taken by the compiled parser itself (else the speed is
silently gone); hostile bodies never crash it; and the decisions made from both are byte-identical.
"""

from __future__ import annotations

import json
import random

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from student_data import random_batch
from worker_support import MALFORMED

import stream.events as ev
from stream.codes import CategoryCodes
from stream.events import dead_letters, decode_requests, encode_requests, set_decoder
from stream.features import FeatureSpec

SPEC = FeatureSpec(("age", "spend", "visits"), ("device", "city"))
FP = SPEC.fingerprint()
ENC = CategoryCodes([["ios", "android", "web", "12"], ["x", "y", "über", "日本"]])


def test_the_extension_is_built():
    """CI installs with gcc: a missing module would silently cost the speed, so it is a failure."""
    assert ev._fastreq is not None, "stream._fastreq was not compiled (pip install -e . with gcc)"
    assert ev.decoder_in_use() == "native"


def _paths(values, keys=None, spec=SPEC, enc=ENC):
    prev = set_decoder("native")
    try:
        native = decode_requests(values, keys, spec, codes=enc)
        set_decoder("python")
        python = decode_requests(values, keys, spec, codes=enc)
    finally:
        set_decoder(prev)
    return native, python


def _assert_same(a, b) -> None:
    assert a.request_id.tolist() == b.request_id.tolist()
    assert a.ts_ms.tolist() == b.ts_ms.tolist()
    np.testing.assert_array_equal(a.valid, b.valid)
    np.testing.assert_array_equal(a.num, b.num)  # NaN == NaN here; the sign of zero below
    np.testing.assert_array_equal(np.signbit(a.num), np.signbit(b.num))
    assert a.num.dtype == b.num.dtype == np.float32
    assert a.cat.tolist() == b.cat.tolist()
    assert (a.codes is None) == (b.codes is None)
    if a.codes is not None:
        assert a.codes.dtype == np.int64 and a.codes.tolist() == b.codes.tolist()
    assert [tuple(e) for e in a.errors] == [tuple(e) for e in b.errors]
    assert a.unknown_features == b.unknown_features


def _doc(**kw) -> dict:
    doc = {"v": 1, "request_id": "r1", "ts_ms": 1_700_000_000_000,
           "features": {"age": 31, "spend": 12.5, "visits": None, "device": "ios", "city": "über"}}
    doc.update(kw)
    return doc


GOOD = orjson.dumps(_doc())


def test_canonical_requests_are_taken_by_the_compiled_parser():
    spec, num, cat = random_batch(500, seed=4, unseen=0.1)
    values = encode_requests([f"r{i}" for i in range(500)], np.arange(500), num, cat, spec)
    native = ev._native_decoder(spec.numeric, spec.categorical, None)
    ok = np.zeros(500, np.uint8)
    native.decode(values, np.empty((500, 6), np.float32), None, np.zeros(500, np.int64), ok, 1 << 16)
    assert ok.all()
    _assert_same(*_paths(values, spec=spec, enc=CategoryCodes([[f"v{i}" for i in range(20)]] * 3)))


def test_spec_order_any_order_absent_and_null_features():
    feats = _doc()["features"]
    values = [GOOD,
              orjson.dumps(_doc(features=dict(reversed(list(feats.items()))))),
              orjson.dumps(_doc(features={"city": "y"})),
              orjson.dumps(_doc(features={})),
              orjson.dumps({"features": feats, "ts_ms": 5, "request_id": "z", "v": 1}),
              b' {\n"v" : 1 ,\t"request_id":"a", "ts_ms":0,"features":{ "age" : -0.0 , "device":""}}\r\n']
    native, python = _paths(values)
    assert native.valid.all()
    _assert_same(native, python)
    assert native.codes[2].tolist() == [0, 3] and native.cat[2].tolist() == ["", "y"]
    assert np.signbit(native.num[5, 0])


# Malformed and hostile bodies: each must give the Python path's row (and its error), next to
# good ones, without crashing or leaking into its neighbours.
HOSTILE = [
    *MALFORMED,
    b"[" * 100_000 + b"]" * 100_000,  # deep nesting
    b'{"v":1,"request_id":"a","ts_ms":1,"features":{"age":' + b"[" * 50_000 + b"]" * 50_000 + b"}}",
    b'{"v":1,"request_id":"a","ts_ms":1,"features":{"device":{"a":{"b":{"c":[1,[2,[3]]]}}}}}',
    b'{"v":1,"request_id":"a","ts_ms":1,"features":{"age":1' + b"0" * 400 + b"}}",  # huge integer
    b'{"v":1,"request_id":"a","ts_ms":1,"features":{"age":1e400}}',
    b'{"v":1,"request_id":"a","ts_ms":1,"features":{"age":-1e400}}',
    b'{"v":1,"request_id":"a","ts_ms":1,"features":{"age":1e39}}',  # beyond float32 only
    b'{"v":1,"request_id":"a","ts_ms":1,"features":{"age":3.4028235e38,"spend":3.4028236e38}}',
    b'{"v":1,"request_id":"a","ts_ms":1,"features":{"age":1e-400,"spend":-1e-400,"visits":1e-45}}',
    b'{"v":1,"request_id":"a","ts_ms":1,"features":{"age":4.9e-324,"spend":2.2250738585072014e-308}}',
    b'{"v":1,"request_id":"a","ts_ms":1,"features":{"age":NaN}}',
    b'{"v":1,"request_id":"a","ts_ms":1,"features":{"age":Infinity}}',
    b'{"v":1,"request_id":"a","ts_ms":1,"features":{"age":-Infinity}}',
    b'{"v":1,"request_id":"a","ts_ms":1,"features":{"age":nan}}',
    b'{"v":1,"request_id":"a","ts_ms":1,"features":{"city":"\xff\xfe"}}',  # invalid UTF-8 in a value
    b'{"v":1,"request_id":"\xc0\xaf","ts_ms":1,"features":{}}',  # overlong encoding
    b'{"v":1,"request_id":"a","ts_ms":1,"features":{"city":"\xed\xa0\x80"}}',  # a surrogate in UTF-8
    b'{"v":1,"request_id":"a","ts_ms":1,"features":{"city":"\\ud800"}}',  # a lone escaped surrogate
    b'{"v":1,"request_id":"a","ts_ms":1,"features":{"age":1,"age":2}}',  # duplicate keys
    b'{"v":1,"request_id":"a","ts_ms":1,"features":{"device":"ios","device":"web"}}',
    b'{"v":1,"v":1,"request_id":"a","ts_ms":1,"features":{}}',
    b'{"v":1,"request_id":"a","request_id":"b","ts_ms":1,"features":{}}',
    b'{"v":1,"request_id":"a","ts_ms":1,"features":{},"features":{"age":3}}',
    b'{"v":1,"request_id":"a","ts_ms":1,"features":{"\\u0061ge":5,"ci\\u0074y":"x"}}',  # escapes in keys
    b'{"v":1,"request_id":"a\\"b","ts_ms":1,"features":{"city":"\\u00fcber","device":"i\\/os"}}',
    b'{"v":1,"request_id":"a","ts_ms":1,"features":{"age":9007199254740993}}',  # > 2^53
    b'{"v":1,"request_id":"a","ts_ms":1,"features":{"age":18446744073709551616}}',  # 2^64
    b'{"v":1,"request_id":"a","ts_ms":1,"features":{"age":-9223372036854775809}}',
    b'{"v":1,"request_id":"a","ts_ms":1,"features":{"device":9007199254740993}}',
    b'{"v":1,"request_id":"a","ts_ms":1,"features":{"device":12,"city":-7}}',  # integer categoricals
    b'{"v":1,"request_id":"a","ts_ms":1,"features":{"device":18446744073709551616}}',
    b'{"v":1,"request_id":"a","ts_ms":9223372036854775807,"features":{}}',
    b'{"v":1,"request_id":"a","ts_ms":9223372036854775808,"features":{}}',
    b'{"v":1,"request_id":"a","ts_ms":01,"features":{}}',
    b'{"v":1,"request_id":"a","ts_ms":1e3,"features":{}}',
    b'{"v":1,"request_id":"a","ts_ms":-0,"features":{}}',
    b'{"v":1.0,"request_id":"a","ts_ms":1,"features":{}}',
    b'{"v":01,"request_id":"a","ts_ms":1,"features":{}}',
    b'{"v":true,"request_id":"a","ts_ms":1,"features":{}}',
    b'{"v":1,"request_id":true,"ts_ms":1,"features":{}}',
    b'{"v":1,"request_id":null,"ts_ms":1,"features":{}}',
    b'{"v":1,"request_id":"' + b"a" * 256 + b'","ts_ms":1,"features":{}}',
    b'{"v":1,"request_id":"' + b"a" * 257 + b'","ts_ms":1,"features":{}}',
    b'{"v":1,"request_id":"' + "é".encode() * 256 + b'","ts_ms":1,"features":{}}',
    b'{"v":1,"request_id":"' + "é".encode() * 257 + b'","ts_ms":1,"features":{}}',
    b'{"v":1,"request_id":"a","ts_ms":1,"features":{"age":true,"spend":false}}',  # booleans
    b'{"v":1,"request_id":"a","ts_ms":1,"features":{"device":true}}',
    b'{"v":1,"request_id":"a","ts_ms":1,"features":{"age":null,"device":null}}',  # nulls
    b'{"v":1,"request_id":"a","ts_ms":1,"features":null}',
    b'{"v":1,"request_id":"a","ts_ms":1,"features":[1,2,3]}',  # arrays
    b'{"v":1,"request_id":"a","ts_ms":1,"features":{"age":[1]}}',
    b'{"v":1,"request_id":"a","ts_ms":1,"features":{"age":"1.5"}}',
    b'{"v":1,"request_id":"a","ts_ms":1,"features":{"age":-0}}',
    b'{"v":1,"request_id":"a","ts_ms":1,"features":{"age":-0.0,"spend":0e10,"visits":-0E-5}}',
    b'{"v":1,"request_id":"a","ts_ms":1,"features":{"age":01}}',
    b'{"v":1,"request_id":"a","ts_ms":1,"features":{"age":1.}}',
    b'{"v":1,"request_id":"a","ts_ms":1,"features":{"age":.5}}',
    b'{"v":1,"request_id":"a","ts_ms":1,"features":{"age":+1}}',
    b'{"v":1,"request_id":"a","ts_ms":1,"features":{"age":1e}}',
    b'{"v":1,"request_id":"a","ts_ms":1,"features":{"age":0.1e-5,"spend":123456789012345678901234567890e-30}}',
    b'{"v":1,"request_id":"a","ts_ms":1,"features":{"age":0.30000000000000004,"spend":1.0000000596046448}}',
    b'{"v":1,"request_id":"a","ts_ms":1,"features":{"age":16777217,"spend":3.0000001192092896}}',
    b'{"v":1,"request_id":"a","ts_ms":1,"features":{"other":1,"age":2}}',  # an unknown name
    b'{"v":1,"request_id":"a","ts_ms":1,"features":{"age":2},"extra":{"deep":[[[]]]}}',
    b'{"v":1,"request_id":"a","ts_ms":1,"fp":"' + FP.encode() + b'","x":[1,2,3,"ios",null]}',
    b'{"v":1,"request_id":"a","ts_ms":1,"fp":"' + FP.encode() + b'","features":{"age":2}}',
    b'{"v":1,"request_id":"a","ts_ms":1,"features":{"city":"a\x01b"}}',  # a raw control character
    b'{"v":1,"request_id":"a","ts_ms":1,"features":{"city":"x"}} ',
    b'{"v":1,"request_id":"a","ts_ms":1,"features":{"city":"x"}}x',
    b'{"v":1,"request_id":"a","ts_ms":1,"features":{"city":"x"}}{}',
    b'{"v":1,"request_id":"a","ts_ms":1,"features":{"city":"x"},}',
    b'{"v":1,"request_id":"a","ts_ms":1,"features":{"city":"x",}}',
    b'{"v":1,"request_id":"a","ts_ms":1,"features":{"city":"x"}',  # truncated
    b'{"v":1,"request_id":"a","ts_ms":1,"features":{"city":"x',
    b'\xef\xbb\xbf{"v":1,"request_id":"a","ts_ms":1,"features":{}}',  # a BOM
    b'{"v":1,"request_id":"a","ts_ms":1,"features":{"age":1}}\x00',
    b"\x00" * 64,
    b"{" + b" " * 70_000 + b"}",  # oversized
    b"null", b"1", b'"a"', b"{}", b" ",
]


@pytest.mark.parametrize("raw", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_bodies_give_the_python_paths_row(raw):
    values = [GOOD, raw, GOOD]
    native, python = _paths(values, [b"k0", b"k1", None])
    _assert_same(native, python)
    assert native.valid[0] and native.valid[2]


def test_hostile_bodies_in_one_batch_and_their_dead_letters():
    values = [GOOD, *HOSTILE, GOOD, None, b""]
    keys = [f"k{i}".encode() for i in range(len(values))]
    native, python = _paths(values, keys)
    _assert_same(native, python)
    assert native.n_invalid > 40
    assert dead_letters(native, values, keys, "t") == dead_letters(python, values, keys, "t")


def test_without_a_vocabulary_and_with_an_empty_spec():
    values = [GOOD, HOSTILE[20], orjson.dumps(_doc(features={"city": "brand-new"}))]
    _assert_same(*_paths(values, enc=None))
    empty = FeatureSpec((), ())
    _assert_same(*_paths([GOOD, orjson.dumps(_doc(features={}))], spec=empty, enc=None))
    _assert_same(*_paths([], enc=ENC))


def test_bad_arguments_to_the_compiled_decoder_are_errors_not_crashes():
    native = ev._native_decoder(SPEC.numeric, SPEC.categorical, ENC)
    args = [[GOOD], np.empty((1, 3), np.float32), np.empty((1, 2), np.int64), np.zeros(1, np.int64),
            np.zeros(1, np.uint8), 1000]
    for at, bad in ((1, np.empty((1, 2), np.float32)), (2, np.empty((1, 2), np.int32)),
                    (3, np.zeros(2, np.int64)), (1, np.empty((1, 3), np.float32)[:, ::-1]),
                    (1, np.empty((1, 3), np.float32).tobytes())):
        with pytest.raises((ValueError, BufferError, TypeError)):
            native.decode(*args[:at], bad, *args[at + 1:])
    with pytest.raises(TypeError):
        native.decode((GOOD,), *args[1:])
    with pytest.raises(ValueError):
        ev._fastreq.Decoder(("a", "a"), ())
    with pytest.raises(ValueError):
        ev._fastreq.Decoder(("a",), ("b",), ["w", "w"], [0, 1])


_OWNERSHIP_SCRIPT = r"""
import gc
import numpy as np
from stream import _fastreq

# a half-made Decoder (its __init__ failed) refuses to decode instead of reading NULLs
half = _fastreq.Decoder.__new__(_fastreq.Decoder)
try:
    half.__init__(("a", "a"), ())
except ValueError:
    pass
try:
    half.decode([b"{}"], np.empty(2, np.float32), None, np.zeros(1, np.int64), np.zeros(1, np.uint8), 100)
    print("decoded by a half-made Decoder")
except TypeError:
    pass
# the vocabulary's words stay alive when the caller's list drops them (the Decoder keeps a copy)
words = ["".join(["word-", str(i), "-x" * 20]) for i in range(2000)]
d = _fastreq.Decoder(("n",), ("c",), words, list(range(1, 2001)), 0, 0)
words.clear()
gc.collect()
junk = ["".join(["junk-", str(i), "-y" * 20]) for i in range(20000)]
body = b'{"v":1,"request_id":"r","ts_ms":1,"features":{"n":1.5,"c":"word-7' + b"-x" * 20 + b'"}}'
ids = np.zeros(1, np.int64)
rids, cats = d.decode([body], np.empty(1, np.float32), ids, np.zeros(1, np.int64), np.zeros(1, np.uint8), 10000)
print(rids[0], cats[0] == "word-7" + "-x" * 20, int(ids[0]))
"""


def test_the_decoder_owns_what_it_points_into(tmp_path):
    """Run apart from the suite: the failure this guards against is a crash, not an assert."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _OWNERSHIP_SCRIPT], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"exit {out.returncode}: {out.stderr[-2000:]}"
    assert out.stdout.split() == ["r", "True", "8"], out.stdout


def test_the_choice_of_decoder():
    prev = set_decoder("python")
    try:
        assert ev.decoder_in_use() == "python"
        with pytest.raises(ValueError, match="unknown decoder"):
            set_decoder("fast")
    finally:
        set_decoder(prev)
    assert ev.decoder_in_use() == "native"


# ------------------------------------------------------------------------------ fuzzing

_words = st.sampled_from(["ios", "android", "web", "12", "x", "y", "über", "日本", "", "new", "a\"b", "c\\d",
                          "\u2028", "e\x01", "\ud800"])
_numbers = st.one_of(st.floats(), st.floats(width=32), st.integers(), st.integers(-(2**70), 2**70),
                     st.decimals(allow_nan=False, allow_infinity=False).map(float))
_value = st.one_of(st.none(), st.booleans(), _numbers, _words, st.text(max_size=6),
                   st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=2), st.none(), max_size=2))
_names = st.sampled_from(["age", "spend", "visits", "device", "city", "other", "Age", "ag\u00e9"])
_features = st.one_of(
    st.fixed_dictionaries({"age": _numbers, "spend": _numbers, "visits": st.none() | _numbers,
                           "device": _words, "city": _words | st.integers()}),
    st.dictionaries(_names, _value, max_size=7),
    _value,
)
_docs = st.fixed_dictionaries(
    {"v": st.just(1) | _value, "request_id": st.text(min_size=1, max_size=8) | _value,
     "ts_ms": st.integers(0, 2**63 - 1) | _value, "features": _features},
    optional={"fp": st.just(FP), "x": st.lists(_value, min_size=5, max_size=5), "junk": _value},
)


def _dump(doc, how: int) -> bytes:
    if how == 0:
        return json.dumps(doc).encode()  # \u escapes, NaN/Infinity literals, huge integers
    if how == 1:
        return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass")
    if how == 2:
        return json.dumps(doc, indent=1, sort_keys=True).encode()
    try:
        return orjson.dumps(doc)
    except (TypeError, orjson.JSONEncodeError):
        return json.dumps(doc).encode()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(_docs, st.integers(0, 3)), max_size=10))
def test_fuzzed_documents_give_the_python_paths_rows(docs):
    values = [_dump(d, how) for d, how in docs]
    _assert_same(*_paths(values))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 3), st.binary(min_size=1, max_size=3)),
                min_size=1, max_size=4))
def test_byte_mutations_of_a_canonical_body_give_the_python_paths_rows(edits):
    raw = bytearray(orjson.dumps(_doc(features={"age": 1.25e-3, "spend": -7, "visits": 3.4e38,
                                                "device": "android", "city": "日本"})))
    for at, op, data in edits:
        at %= len(raw) + 1
        if op == 0:
            raw[at:at] = data
        elif op == 1:
            del raw[at:at + len(data)]
        else:
            raw[at:at + len(data)] = data
    _assert_same(*_paths([GOOD, bytes(raw), GOOD]))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(width=32, allow_nan=False) | st.floats(allow_nan=False, allow_infinity=False)
                | st.none(), min_size=3, max_size=3))
def test_numbers_land_as_the_python_path_rounds_them(row):
    doc = _doc(features=dict(zip(SPEC.numeric, row, strict=True)))
    values = [json.dumps(doc).encode(), orjson.dumps(doc), repr(doc).replace("'", '"')
              .replace("None", "null").encode()]
    _assert_same(*_paths(values))


_decimal = st.builds(lambda sign, i, f, e: f"{sign}{i}{'.' + f if f else ''}{'e' + str(e) if e is not None else ''}",
                     st.sampled_from(["", "-"]), st.integers(0, 10**25).map(str), st.text("0123456789", max_size=25),
                     st.none() | st.integers(-400, 400))


@settings(max_examples=2000, deadline=None)
@given(st.one_of(st.floats(allow_nan=False, allow_infinity=False).map(repr), _decimal,
                 st.floats(width=32, allow_nan=False, allow_infinity=False).map(lambda x: f"{x:.25g}")))
def test_every_double_is_the_correctly_rounded_one(text):
    """The compiled number parser's double is Python's float() of the same text (correctly
    rounded), or a rejection (the Python path decides those): checked on the double itself,
    since a float32 cast would hide a 1-ulp slip."""
    got = ev._fastreq.number(text.encode())
    want = float(text)
    if got is None:
        assert not np.isfinite(want) or (text.startswith("-") and want == 0 and not set(text) & set(".eE")), text
    else:
        assert got == want and np.signbit(got) == np.signbit(want), text


# ------------------------------------------------------------------------------ decisions


def _traffic(n: int, seed: int) -> list[bytes]:
    """n requests of the student_data spec, ~5% of them malformed or hostile."""
    spec, num, cat = random_batch(n, seed=seed, unseen=0.05)
    values = encode_requests([f"r{i}" for i in range(n)], 1_700_000_000_000 + np.arange(n), num, cat, spec)
    rnd = random.Random(seed)
    for i in rnd.sample(range(n), n // 20):
        kind = rnd.random()
        if kind < 0.3:
            values[i] = rnd.choice(HOSTILE)
        elif kind < 0.6:  # a byte flipped, dropped or added somewhere
            raw = bytearray(values[i])
            at = rnd.randrange(len(raw))
            raw[at:at + rnd.randint(0, 2)] = bytes(rnd.randrange(256) for _ in range(rnd.randint(0, 2)))
            values[i] = bytes(raw)
        else:  # valid but off the compiled parser's road: escapes, integer categoricals, spacing
            doc = orjson.loads(values[i])
            doc["features"]["c0"] = rnd.choice([7, "v\u00e9", "a\"b", None])
            values[i] = json.dumps(doc, indent=rnd.choice([None, 1])).encode()
    return values


def _decisions(values: list[bytes], scorer, policy, decoder: str) -> list[bytes]:
    from stream.engine import score_batch
    from stream.policy import REASONS, decide

    prev = set_decoder(decoder)
    out: list[bytes] = []
    try:
        for start in range(0, len(values), 500):
            chunk = values[start:start + 500]
            keys = [f"k{start + i}".encode() for i in range(len(chunk))]
            batch = decode_requests(chunk, keys, scorer.spec, codes=scorer.encoder)
            p, u_tasks, e, u = score_batch(scorer, policy, batch.num, batch.codes)
            draw = np.random.default_rng(start).random(len(chunk))
            d = decide(e, u, batch.valid, draw, 0.02, 0.5, 0.05)
            out += ev.encode_decisions(batch.request_id, d.block, np.array(REASONS, dtype=object)[d.reason], e, u, p,
                                       threshold=0.02, target_ratio=0.3, model="v1", ts_ms=1, latency_ms=1.0,
                                       propensity=d.propensity, tau_u=0.5, u_tasks=u_tasks)
            out += [b"%d|%s|%s" % (dl.index + start, dl.value, repr(dl.headers).encode())
                    for dl in dead_letters(batch, chunk, keys, "t")]
    finally:
        set_decoder(prev)
    return out


def _decisions_identical(tmp_path, n: int) -> None:
    from student_data import make_bundle

    from stream.policy import ScorePolicy
    from stream.scorer import Scorer

    scorer = Scorer.load(make_bundle(tmp_path, "v1", distribution=False, scale=40.0))
    policy = ScorePolicy.from_manifest(scorer.manifest)
    assert scorer.encoder is not None  # a format-2 bundle: the decoder writes codes
    values = _traffic(n, seed=n)
    native, python = (_decisions(values, scorer, policy, d) for d in ("native", "python"))
    assert len(native) > n
    assert native == python


def test_decisions_are_byte_identical_on_5k_requests(tmp_path, torch_one_thread):
    _decisions_identical(tmp_path, 5_000)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_decisions_are_byte_identical_on_100k_requests(tmp_path, torch_one_thread):
    _decisions_identical(tmp_path, 100_000)
