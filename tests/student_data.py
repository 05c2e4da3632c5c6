"""Small random worlds and bundles for the student, export, scorer and bundle tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from model.preprocess import Preprocessor
from stream.features import FeatureSpec

TASKS = ["click", "online", "cart", "deal"]


def random_batch(n: int, n_num: int = 6, n_cat: int = 3, seed: int = 0,
                 unseen: float = 0.02) -> tuple[FeatureSpec, np.ndarray, np.ndarray]:
    """Mixed-scale numerics (some skewed, 10% NaN, a few inf) and categoricals with "" and unseen values."""
    rng = np.random.default_rng(seed)
    spec = FeatureSpec(tuple(f"n{i}" for i in range(n_num)), tuple(f"c{i}" for i in range(n_cat)))
    num = rng.normal(0, 3, (n, n_num)).astype(np.float32)
    num[:, ::2] = rng.lognormal(1, 2, (n, len(range(0, n_num, 2)))).astype(np.float32)
    num[rng.random((n, n_num)) < 0.1] = np.nan
    num[rng.random((n, n_num)) < 0.001] = np.inf
    words = np.array([f"v{i}" for i in range(40)] + [""], dtype=object)
    cat = rng.choice(words, (n, n_cat))
    cat[rng.random((n, n_cat)) < unseen] = "never-seen-before"
    return spec, num, cat


def fitted(n: int = 5000, seed: int = 0, **kw) -> tuple[Preprocessor, np.ndarray, np.ndarray]:
    spec, num, cat = random_batch(n, seed=seed, unseen=0.0, **kw)
    return Preprocessor.fit(spec, num, cat, min_count=5), num, cat


def make_student(pre: Preprocessor, mode: str = "mean_match", seed: int = 0):
    """An untrained student with a fitted target map (random teacher uncertainties)."""
    import torch

    from model.student import Student, StudentConfig

    torch.manual_seed(seed)
    student = Student(pre.n_inputs, pre.cardinalities, TASKS,
                      StudentConfig(target_mode=mode, hidden=(32, 16), quantile_points=257))
    rng = np.random.default_rng(seed)
    student.set_target_map(rng.random((2000, 4)) ** 4 * 0.05,
                           (rng.random((2000, 4)) < [0.3, 0.1, 0.03, 0.01]).astype(np.float32))
    return student.eval()


def make_bundle(model_dir: Path, version: str = "v1", mode: str = "mean_match", seed: int = 0,
                publish: bool = True, distribution: bool = True, scale: float = 1.0,
                shift: float = 0.0) -> Path:
    """A complete (untrained-weights) bundle under model_dir/version, optionally published.

    ``scale`` multiplies the output weights (scores spread over several logit units, as a
    trained model's do); ``shift`` moves every task's probability logit (another model's
    score distribution); ``distribution`` records the served scores of held-out draws in the
    manifest, as training does (the controller's cold start)."""
    import torch

    from model import bundle
    from model.export import export_bundle

    pre, _, _ = fitted(seed=seed)
    student = make_student(pre, mode, seed)
    with torch.no_grad():
        student.head2_w.mul_(scale)
        student.head2_b[: len(TASKS)] += shift
    bundle_dir = Path(model_dir) / version
    export_bundle(bundle_dir, pre, student, metrics={"test": True})
    if distribution:  # other draws than the tests' traffic (seed 0..)
        from stream.prior import write_bundle_distribution

        _, num, cat = random_batch(20_000, seed=seed + 1000)
        write_bundle_distribution(bundle_dir, num, cat, fitted_on="random_batch")
    if publish:
        bundle.publish(bundle_dir)
    return bundle_dir
