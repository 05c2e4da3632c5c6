"""stream.scorer: verified loading (hashes, fingerprint, graph signature) and onnxruntime scoring."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from student_data import TASKS, make_bundle, random_batch

from model import bundle
from stream.errors import BundleError
from stream.scorer import Scorer


def test_scores_like_the_torch_student_from_model_dir_and_bundle_dir(tmp_path):
    import torch

    from model.preprocess import Preprocessor
    from model.student import Student

    b = make_bundle(tmp_path, "v1", mode="quantile")
    scorer = Scorer.load(tmp_path, intra_threads=2, inter_threads=1)
    assert scorer.version == "v1" and scorer.tasks == TASKS and scorer.path == b
    assert scorer.spec.fingerprint() == scorer.manifest["feature_spec"]["fingerprint"]
    assert scorer.session.get_session_options().intra_op_num_threads == 2
    _, num, cat = random_batch(3000, seed=5, unseen=0.05)
    p, u = scorer.score(num, cat)
    pre = Preprocessor.from_dict(json.loads((b / "preprocess.json").read_text()))
    student = Student.from_checkpoint(torch.load(b / "student.pt", weights_only=False))
    tp, tu = student.predict(*pre.transform(num, cat))
    assert np.abs(p - tp).max() <= 1e-5 and np.abs(u - tu).max() <= 1e-5
    p2, _ = Scorer.load(b).score(num[:10], cat[:10])
    np.testing.assert_allclose(p2, p[:10], atol=1e-6)
    e_p, e_u = scorer.score(num[:0], cat[:0])
    assert e_p.shape == e_u.shape == (0, len(TASKS))


def test_follows_current_to_the_new_version(tmp_path):
    make_bundle(tmp_path, "v1")
    make_bundle(tmp_path, "v2", seed=3)
    assert Scorer.load(tmp_path).version == "v2"


def test_tampered_onnx_is_refused_naming_the_file(tmp_path):
    b = make_bundle(tmp_path, "v1")
    data = bytearray((b / "student.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (b / "student.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"student\.onnx: sha256 mismatch \(manifest [0-9a-f]{12}\.\.\., file"):
        Scorer.load(tmp_path)


def test_serving_hashes_only_what_it_reads_and_full_verification_every_file(tmp_path):
    # DESIGN.md: serving never hashes or loads training files; a serving-only bundle is valid
    b = make_bundle(tmp_path, "v1")
    (b / "preprocess.json").write_text("{}")
    (b / "student.pt").unlink()
    assert Scorer.load(b).version == "v1"
    m = bundle.read_manifest(b)
    with pytest.raises(BundleError, match=r"preprocess\.json: sha256 mismatch"):  # the trainer's check
        bundle.verify_files(b, m)
    m["files"]["preprocess.json"] = bundle.sha256_file(b / "preprocess.json")
    with pytest.raises(BundleError, match=r"student\.pt: listed in the manifest but missing"):
        bundle.verify_files(b, m)


def test_manifest_with_wrong_fingerprint_is_refused(tmp_path):
    b = make_bundle(tmp_path, "v1")
    m = bundle.read_manifest(b)
    m["feature_spec"]["fingerprint"] = "0123456789abcdef"
    bundle.write_manifest(b, m)
    with pytest.raises(BundleError, match="fingerprint 0123456789abcdef does not match"):
        Scorer.load(b)


def test_manifest_spec_that_disagrees_with_the_graph_is_refused(tmp_path):
    b = make_bundle(tmp_path, "v1")
    m = bundle.read_manifest(b)
    from stream.features import FeatureSpec

    spec = FeatureSpec.from_dict(m["feature_spec"])
    swapped = FeatureSpec(spec.numeric[::-1], spec.categorical)  # consistent fingerprint, wrong order
    m["feature_spec"] = swapped.to_dict()
    bundle.write_manifest(b, m)
    with pytest.raises(BundleError, match="feature fingerprint mismatch"):
        Scorer.load(b)


def test_expected_fingerprint_is_enforced(tmp_path):
    b = make_bundle(tmp_path, "v1")
    fp = bundle.read_manifest(b)["feature_spec"]["fingerprint"]
    assert Scorer.load(b, expected_fingerprint=fp).spec.fingerprint() == fp
    with pytest.raises(BundleError, match=f"expected ffffffffffffffff, bundle has {fp}"):
        Scorer.load(b, expected_fingerprint="ffffffffffffffff")


def test_bad_batch_shape_is_a_clear_error(tmp_path):
    make_bundle(tmp_path, "v1")
    scorer = Scorer.load(tmp_path)
    _, num, cat = random_batch(5, seed=0)
    with pytest.raises(ValueError, match=r"expected num \[N, 6\] and cat \[N, 3\]"):
        scorer.score(num[:, :5], cat)


def test_scorer_imports_no_torch(tmp_path):
    make_bundle(tmp_path, "v1")
    code = (
        "import sys; from stream.scorer import Scorer; import numpy as np\n"
        f"s = Scorer.load({str(tmp_path)!r})\n"
        "n, c = len(s.spec.numeric), len(s.spec.categorical)\n"
        "p, u = s.score(np.zeros((4, n), np.float32), np.full((4, c), '', dtype=object))\n"
        "assert p.shape == (4, len(s.tasks))\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'training'))\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
