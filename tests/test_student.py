"""Student network: shapes, target rescaling both ways, persistence, config."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from student_data import TASKS, fitted, make_student

from model.student import Student, StudentConfig


def test_forward_shapes_and_ranges():
    pre, num, cat = fitted(2000)
    student = make_student(pre)
    p, u = student.predict(*pre.transform(num, cat))
    assert p.shape == u.shape == (2000, len(TASKS))
    assert np.all((p > 0) & (p < 1)) and np.all(u >= 0)


def test_mean_match_targets_have_the_label_mean_and_map_back_exactly():
    pre, _, _ = fitted(1000)
    s = Student(pre.n_inputs, pre.cardinalities, TASKS, StudentConfig(target_mode="mean_match"))
    rng = np.random.default_rng(0)
    u = (rng.random((50_000, 4)) ** 5 * 0.1).astype(np.float32)
    y = (rng.random((50_000, 4)) < [0.4, 0.1, 0.02, 0.005]).astype(np.float32)
    target = s.set_target_map(u, y)
    np.testing.assert_allclose(target.mean(0), y.mean(0), rtol=1e-4)
    back = s.to_teacher_scale(torch.from_numpy(target)).numpy()
    np.testing.assert_allclose(back, u, rtol=1e-5, atol=1e-9)
    m = s.target_map()
    assert m["mode"] == "mean_match" and set(m["factors"]) == set(TASKS)
    assert m["factors"]["deal"] < m["factors"]["click"]


def test_quantile_targets_are_uniform_ranks_and_the_table_inverts_them():
    pre, _, _ = fitted(1000)
    s = Student(pre.n_inputs, pre.cardinalities, TASKS,
                StudentConfig(target_mode="quantile", quantile_points=1025))
    rng = np.random.default_rng(1)
    u = (rng.lognormal(-8, 1.5, (40_000, 4))).astype(np.float32)  # heavy right tail
    target = s.set_target_map(u, np.zeros_like(u))
    assert target.min() == 0.0 and target.max() == 1.0
    np.testing.assert_allclose(np.sort(target[:, 0]), np.linspace(0, 1, 40_000), atol=1e-4)
    back = s.to_teacher_scale(torch.from_numpy(target)).numpy()
    # exact at the ends, rank-preserving, close in the body and the tail
    np.testing.assert_allclose(back.max(0), u.max(0), rtol=1e-5)
    np.testing.assert_allclose(back.min(0), u.min(0), rtol=1e-5)
    order = np.argsort(u[:, 0])
    ranked = back[order, 0]
    assert np.all(np.diff(ranked) >= -1e-5 * ranked[1:])  # monotone up to float32 rounding
    for q in (0.5, 0.9, 0.99):
        np.testing.assert_allclose(np.quantile(back, q, axis=0), np.quantile(u, q, axis=0), rtol=0.02)


def test_log_targets_are_standardised_and_map_back():
    pre, _, _ = fitted(1000)
    s = Student(pre.n_inputs, pre.cardinalities, TASKS, StudentConfig(target_mode="log"))
    rng = np.random.default_rng(2)
    u = rng.lognormal(-7, 2, (20_000, 4)).astype(np.float32)
    target = s.set_target_map(u, np.zeros_like(u))
    np.testing.assert_allclose(target.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(target.std(0), 1, atol=1e-3)
    back = s.to_teacher_scale(torch.from_numpy(target)).numpy()
    np.testing.assert_allclose(back, u, rtol=1e-4)
    assert s.target_map()["mode"] == "log"


def test_checkpoint_roundtrip_is_identical():
    pre, num, cat = fitted(1000)
    for mode in ("mean_match", "quantile", "log"):
        s = make_student(pre, mode)
        back = Student.from_checkpoint(s.to_checkpoint())
        x, idx = pre.transform(num, cat)
        a, b = s.predict(x, idx), back.predict(x, idx)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
        assert back.target_mode == mode


def test_config_from_dict_and_bad_values():
    cfg = StudentConfig.from_any({"hidden": [64], "target_mode": "quantile", "unknown_knob": 3})
    assert cfg.hidden == (64,) and cfg.target_mode == "quantile" and cfg.extra == {"unknown_knob": 3}
    assert StudentConfig.from_any(None) == StudentConfig()
    with pytest.raises(ValueError, match="target_mode"):
        StudentConfig(target_mode="median")
    with pytest.raises(ValueError, match="hidden"):
        StudentConfig(hidden=())
