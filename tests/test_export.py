"""student.onnx reproduces Preprocessor.transform + Student.forward on raw batches."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from student_data import TASKS, fitted, make_student, random_batch

from model.export import build_onnx, build_preprocessing_onnx
from model.preprocess import Preprocessor


def _session(pre, student) -> ort.InferenceSession:
    return ort.InferenceSession(build_onnx(pre, student).SerializeToString(),
                                providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("mode", ["mean_match", "quantile", "log"])
def test_onnx_matches_torch_on_10k_rows_with_missing_and_unseen(mode):
    pre, _, _ = fitted()
    student = make_student(pre, mode)
    _, num, cat = random_batch(10_000, seed=1, unseen=0.05)
    assert (cat == "").any() and (cat == "never-seen-before").any() and np.isnan(num).any()
    p, u = _session(pre, student).run(["p", "u"], {"num": num, "cat": cat})
    tp, tu = student.predict(*pre.transform(num, cat))
    assert p.shape == u.shape == (10_000, len(TASKS)) and p.dtype == u.dtype == np.float32
    assert np.abs(p - tp).max() <= 1e-5
    assert np.abs(u - tu).max() <= 1e-5
    assert np.all((p > 0) & (p < 1)) and np.all(u >= 0)
    assert u.std() > 0  # the graph really depends on the input


def test_dynamic_batch_dimension_and_row_independence():
    pre, _, _ = fitted()
    sess = _session(pre, make_student(pre))
    _, num, cat = random_batch(600, seed=2)
    full = sess.run(["p", "u"], {"num": num, "cat": cat})
    for n in (1, 7, 512):
        part = sess.run(["p", "u"], {"num": num[:n], "cat": cat[:n]})
        np.testing.assert_allclose(part[0], full[0][:n], atol=1e-6)
        np.testing.assert_allclose(part[1], full[1][:n], atol=1e-6)


def test_in_graph_preprocessing_changes_the_output_per_feature():
    pre, _, _ = fitted()
    sess = _session(pre, make_student(pre))
    _, num, cat = random_batch(2, seed=3)
    num[:] = 1.0
    cat[:] = "v1"
    base = sess.run(["p"], {"num": num, "cat": cat})[0]
    num2 = num.copy()
    num2[1, 0] = np.nan  # missing indicator path
    cat2 = cat.copy()
    cat2[1, 2] = "unseen!"  # unknown bucket path
    out = sess.run(["p"], {"num": num2, "cat": cat2})[0]
    np.testing.assert_array_equal(out[0], base[0])
    assert np.abs(out[1] - base[1]).max() > 0


def test_preprocessing_graph_gives_the_network_input():
    """The front of the serving graph alone (what `rta bench inference` times as the floor)."""
    import torch

    pre, _, _ = fitted()
    student = make_student(pre)
    _, num, cat = random_batch(3000, seed=5, unseen=0.05)
    sess = ort.InferenceSession(build_preprocessing_onnx(pre, student).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    (h0,) = sess.run(["h0"], {"num": num, "cat": cat})
    x, idx = pre.transform(num, cat)
    with torch.no_grad():
        emb = student.emb(torch.from_numpy(idx) + student.offsets).reshape(len(idx), -1).numpy()
    expected = np.concatenate([x, emb], axis=1)
    assert h0.shape == expected.shape == (3000, student.n_inputs + len(pre.cardinalities) * student.cfg.emb_dim)
    assert np.abs(h0 - expected).max() <= 1e-6


@pytest.mark.parametrize("n_num,n_cat", [(3, 1), (4, 0), (2, 5)])
def test_other_feature_shapes(n_num, n_cat):
    spec, num, cat = random_batch(3000, n_num=n_num, n_cat=n_cat, seed=4)
    pre = Preprocessor.fit(spec, num, cat)
    student = make_student(pre, "quantile")
    p, u = _session(pre, student).run(["p", "u"], {"num": num, "cat": cat})
    tp, tu = student.predict(*pre.transform(num, cat))
    assert np.abs(p - tp).max() <= 1e-5 and np.abs(u - tu).max() <= 1e-5


def test_student_for_another_preprocessor_is_refused():
    pre, _, _ = fitted()
    other, _, _ = fitted(n_cat=2)
    with pytest.raises(ValueError, match="different preprocessor"):
        build_onnx(other, make_student(pre))
