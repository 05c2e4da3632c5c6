"""Categorical codes before onnxruntime (bundle format 2): one numbering everywhere.

The serving graph takes int64 codes from `stream.codes`; these tests hold that the codes equal
`Preprocessor.transform`'s (what the torch student reads), whichever way they are computed (a
batch of strings, the decoder's fused pass, a Parquet dictionary column), that the codes graph
scores raw inputs like torch, and that the optional int8 graph keeps every row independent of
its batch.
"""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import orjson
import pyarrow as pa
import pytest
from student_data import fitted, make_bundle, make_student, random_batch

from model.export import QUANT_PROBE_ROWS, SERVING_ONNX, build_onnx, export_bundle, quantize_serving
from model.preprocess import Preprocessor
from stream import events
from stream.codes import MISSING_CODE, UNKNOWN_CODE, CategoryCodes
from stream.errors import BundleError
from stream.features import FeatureSpec
from stream.scorer import Scorer


def _pre(vocab: list[list[str]]) -> Preprocessor:
    spec = FeatureSpec((), tuple(f"c{j}" for j in range(len(vocab))))
    return Preprocessor(spec, np.zeros(0), np.ones(0), np.zeros(0, bool), vocab)


def test_codes_equal_the_preprocessor_for_strings_nulls_ints_and_unseen():
    vocab = [["a", "b", "5", "07"], ["b", "zz", "é", "x y"]]
    enc = CategoryCodes(vocab)
    rng = np.random.default_rng(0)
    pool = np.array(["a", "b", "5", "07", "zz", "é", "x y", "", None, "nope", "7"], dtype=object)
    cat = rng.choice(pool, (400, 2))
    cat[0, 0], cat[1, 1], cat[2, 0], cat[3, 0] = 5, 7, 10**30, -3  # JSON integers: their decimal string
    as_strings = np.where(np.equal(cat, None), "", cat).astype(str).astype(object)
    ref = _pre(vocab).transform(np.zeros((400, 0), np.float32), as_strings)[1]
    assert (enc.encode(cat) == ref).all()
    strings_only = as_strings.copy()
    strings_only[:4] = "a"
    want = _pre(vocab).transform(np.zeros((400, 0), np.float32), strings_only)[1]
    assert (enc.encode(strings_only) == want).all()
    assert (enc.encode_raw(strings_only, fresh=True)[0] == want).all()  # the Arrow lookup
    assert (enc.encode_raw(cat, fresh=True)[0] == ref).all()  # ints: the dict pass
    assert enc.encode(np.array([["", None]], dtype=object)).tolist() == [[MISSING_CODE, MISSING_CODE]]
    assert enc.encode(np.array([["zz", "a"]], dtype=object)).tolist() == [[UNKNOWN_CODE, UNKNOWN_CODE]]


def test_words_that_only_look_numeric_are_strings_not_ints():
    """"²" and "①" are str.isdigit() but no decimal int(): such a word in a vocabulary must
    not make the bundle unloadable, and only "-3"-like words map from JSON integers."""
    vocab = [["²", "①", "--1", "-3", "a"]]
    enc = CategoryCodes(vocab)
    got = enc.encode(np.array([["²"], ["①"], ["--1"], [-3], ["-3"], [3]], dtype=object))
    ref = _pre(vocab).transform(np.zeros((6, 0), np.float32),
                                np.array([["²"], ["①"], ["--1"], ["-3"], ["-3"], ["3"]], dtype=object))[1]
    assert (got == ref).all() and got[5, 0] == UNKNOWN_CODE


def test_dictionary_columns_give_the_same_codes_without_a_string_per_row():
    vocab = [["a", "b"], ["b", "c"]]
    enc = CategoryCodes(vocab)
    col = pa.array(["b", None, "c", "a", "", "b"]).dictionary_encode()
    got = enc.encode_dictionary(1, col.dictionary.to_pylist(), col.indices.fill_null(0).to_numpy(),
                                null=col.is_null().to_numpy(zero_copy_only=False))
    want = enc.encode(np.array([["a", v] for v in col.to_pylist()], dtype=object))[:, 1]
    assert got.tolist() == want.tolist() == [2, 0, 3, 1, 0, 2]


@pytest.mark.parametrize("typed", [True, False])
def test_decoder_codes_match_the_scorer_codes_of_its_strings(typed, monkeypatch):
    pre, _, _ = fitted()
    enc = CategoryCodes(pre.vocab)
    spec, num, cat = random_batch(300, seed=3, unseen=0.1)
    cat = cat.copy()
    cat[::7, 0] = None
    values = events.encode_requests([f"r{i}" for i in range(300)], np.arange(300), num, cat, spec)
    doc = orjson.loads(values[5])
    doc["features"][spec.categorical[1]] = 12  # an integer categorical
    values[5] = orjson.dumps(doc)
    values[9] = b"{not json"
    monkeypatch.setattr(events, "_use_typed", typed)
    batch = events.decode_requests(values, None, spec, codes=enc)
    plain = events.decode_requests(values, None, spec)
    assert (batch.cat == plain.cat).all() and (batch.valid == plain.valid).all() and batch.n_invalid == 1
    assert batch.codes.dtype == np.int64 and (batch.codes == enc.encode(plain.cat)).all()
    assert (batch.codes == pre.transform(plain.num, plain.cat)[1]).all()


def test_codes_graph_scores_raw_inputs_like_torch():
    pre, _, _ = fitted()
    student = make_student(pre, "quantile")
    _, num, cat = random_batch(5000, seed=1, unseen=0.05)
    sess = ort.InferenceSession(build_onnx(pre, student, codes=True).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    p, u = sess.run(["p", "u"], {"num": num, "cat": CategoryCodes(pre.vocab).encode(cat)})
    tp, tu = student.predict(*pre.transform(num, cat))
    assert np.abs(p - tp).max() <= 1e-5 and np.abs(u - tu).max() <= 1e-5


def test_format_2_bundle_serves_codes_and_a_format_1_bundle_still_loads(tmp_path):
    b = make_bundle(tmp_path, "v1")
    scorer = Scorer.load(b)
    assert scorer.encoder is not None and scorer.manifest["serving"]["file"] == SERVING_ONNX
    _, num, cat = random_batch(500, seed=4, unseen=0.05)
    p, u = scorer.score(num, cat)
    p2, u2 = scorer.score(num, scorer.codes(cat))
    sp, su = scorer.session.run(["p", "u"], {"num": num, "cat": cat})  # the string graph
    assert np.abs(p - sp).max() <= 1e-6 and np.array_equal(p, p2) and np.array_equal(u, u2)
    with pytest.raises(ValueError, match="outside the bundle's vocabulary"):
        scorer.score(num[:1], np.full((1, len(scorer.spec.categorical)), 10**6, np.int64))
    # a format-1 bundle (no serving graph): strings into student.onnx, as before
    m = json.loads((b / "manifest.json").read_text())
    del m["serving"], m["files"][SERVING_ONNX]
    (b / SERVING_ONNX).unlink()
    (b / "manifest.json").write_text(json.dumps(m))
    old = Scorer.load(b)
    assert old.encoder is None and old.codes(cat) is cat
    assert np.abs(old.score(num, cat)[0] - p).max() <= 1e-6
    m["serving"] = {"file": SERVING_ONNX, "format": 3}
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="serving graph format 3 is not one this build reads"):
        Scorer.load(b)


def test_int8_graph_is_row_independent_and_close_to_float(tmp_path):
    pre, _, _ = fitted()
    student = make_student(pre, "log")
    graph = build_onnx(pre, student, codes=True)
    quant, fig = quantize_serving(pre, graph)
    assert fig["kept"] == (fig["min_spearman"] >= 0.99 and fig["p_p99_abs_diff"] <= 0.02)
    assert fig["p_p99_abs_diff"] <= 0.02
    assert any(n.op_type == "QLinearMatMul" for n in quant.graph.node)
    sess = ort.InferenceSession(quant.SerializeToString(), providers=["CPUExecutionProvider"])
    _, num, cat = random_batch(700, seed=6, unseen=0.05)
    codes = CategoryCodes(pre.vocab).encode(cat)
    full = sess.run(["p", "u"], {"num": num, "cat": codes})
    for lo, hi in ((0, 1), (3, 70), (200, 700)):  # a row's output never depends on its batch-mates
        part = sess.run(["p", "u"], {"num": num[lo:hi], "cat": codes[lo:hi]})
        assert np.array_equal(part[0], full[0][lo:hi]) and np.array_equal(part[1], full[1][lo:hi])
    manifest = export_bundle(tmp_path / "q1", pre, student, quantize="int8")
    q = manifest["serving"]["quantization"]
    assert manifest["serving"]["weights"] == ("int8" if q["kept"] else "float32")
    assert Scorer.load(tmp_path / "q1").score(num[:5], cat[:5])[0].shape == (5, len(student.tasks))
    # the gate reads the rows it is given (rta train: validation rows), calibration stays synthetic
    manifest = export_bundle(tmp_path / "q2", pre, student, quantize="int8", quantize_check=(num, cat))
    q2 = manifest["serving"]["quantization"]
    assert (q2["probe"], q2["probe_rows"], q2["calibration_rows"]) == ("real rows", 700, QUANT_PROBE_ROWS)
    assert q2["p_max_abs_diff"] != q["p_max_abs_diff"]
    assert manifest["serving"]["weights"] == ("int8" if q2["kept"] else "float32")
    quant2, fig2 = quantize_serving(pre, graph, check=(num, codes))
    assert quant2.graph.SerializeToString() == quant.graph.SerializeToString()  # calibrated alike
    q_p, f_p = (ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        ["p"], {"num": num, "cat": codes})[0] for m in (quant2, graph))
    assert fig2["p_max_abs_diff"] == pytest.approx(float(np.abs(q_p - f_p).max()), rel=1e-5)


def test_binary_requests_decode_like_canonical_ones_and_bad_ones_get_their_code():
    import msgspec

    pre, _, _ = fitted()
    enc = CategoryCodes(pre.vocab)
    spec, num, cat = random_batch(200, seed=8, unseen=0.1)
    num = num.copy()
    num[np.isinf(num)] = np.nan  # canonical JSON cannot carry inf either (null = missing)
    ids = [f"r{i}" for i in range(200)]
    binary = events.encode_requests_binary(ids, np.arange(200), num, cat, spec)
    canonical = events.encode_requests(ids, np.arange(200), num, cat, spec)
    assert binary[0][:1] == events.BINARY_FIRST_BYTE and len(binary[0]) < len(canonical[0])
    b = events.decode_requests(binary, None, spec, codes=enc)
    c = events.decode_requests(canonical, None, spec, codes=enc)
    assert b.valid.all() and np.array_equal(b.num, c.num, equal_nan=True) and (b.cat == c.cat).all()
    assert (b.codes == c.codes).all() and (b.request_id == c.request_id).all() and (b.ts_ms == c.ts_ms).all()
    pack = msgspec.msgpack.encode
    block = num[0].astype("<f4")
    cats = [None if v == "" else v for v in cat[0]]
    fp = spec.fingerprint()
    inf = block.copy()
    inf[0] = np.inf
    bad = {
        "bad_binary": b"\x96\xc1",
        "bad_version": pack([2, "x1", 1, fp, block.tobytes(), cats]),
        "bad_request_id": pack([1, "", 1, fp, block.tobytes(), cats]),
        "bad_ts": pack([1, "x3", -1, fp, block.tobytes(), cats]),
        "bad_fingerprint": pack([1, "x4", 1, "0" * 16, block.tobytes(), cats]),
        "bad_features": pack([1, "x5", 1, fp, block.tobytes()[:-4], cats]),
        "bad_categorical": pack([1, "x6", 1, fp, block.tobytes(), [1.5] + cats[1:]]),
        "non_finite": pack([1, "x7", 1, fp, inf.tobytes(), cats]),
    }
    mixed = [*binary[:3], *bad.values(), canonical[3], pack([1, "ok", 5, fp, block.tobytes(), [12] + cats[1:]])]
    got = events.decode_requests(mixed, None, spec, codes=enc)
    assert [e.code for e in got.errors] == list(bad)
    assert [e.index for e in got.errors] == list(range(3, 3 + len(bad)))
    assert got.valid.tolist() == [True] * 3 + [False] * len(bad) + [True, True]
    assert got.request_id[4:11].tolist() == ["x1", got.request_id[5], "x3", "x4", "x5", "x6", "x7"][:7]
    assert got.cat[-1, 0] == "12" and got.codes[-1, 0] == enc.encode(np.array([["12"] + list(cat[0][1:])], object))[0, 0]
    assert (got.codes[:3] == c.codes[:3]).all() and (got.codes[3:3 + len(bad)] == 0).all()
