"""Bundle format: manifest contents, hashes, and the atomic `current` pointer."""

from __future__ import annotations

import json
import os
import threading

import pytest
from student_data import TASKS, make_bundle

from model import bundle
from stream.errors import BundleError


def test_manifest_lists_everything_with_hashes(tmp_path):
    b = make_bundle(tmp_path, "v1")
    m = bundle.read_manifest(b)
    assert m["version"] == "v1" and m["tasks"] == TASKS
    assert m["feature_spec"]["fingerprint"] and m["uncertainty"]["rescale"]["mode"] == "mean_match"
    assert m["uncertainty_source"] == {"click": "click", "online": "online", "cart": "click", "deal": "click"}
    assert m["score_function"]["kind"] == "weighted" and m["metrics"] == {"test": True}
    # bundle format 2: the serving graph (codes in) beside the string graph
    assert set(m["files"]) == {"student.onnx", "student_codes.onnx", "student.pt", "preprocess.json"}
    assert m["serving"]["file"] == "student_codes.onnx" and m["serving"]["format"] == 2
    for rel, digest in m["files"].items():
        assert bundle.sha256_file(b / rel) == digest
    bundle.verify_files(b, m)  # passes as written


def test_update_manifest_rehashes_new_files(tmp_path):
    b = make_bundle(tmp_path, "v1", publish=False)
    (b / "report").mkdir()
    (b / "report" / "report.json").write_text("{}")
    m = bundle.update_manifest(b, metrics={"auc": 0.8})
    assert "report/report.json" in m["files"] and m["metrics"] == {"test": True, "auc": 0.8}
    assert bundle.read_manifest(b) == m


def test_publish_switches_current_and_resolve_follows_it(tmp_path):
    make_bundle(tmp_path, "v1")
    assert bundle.current_version(tmp_path) == "v1"
    assert bundle.resolve_bundle(tmp_path) == tmp_path / "v1"
    make_bundle(tmp_path, "v2", seed=1)
    assert bundle.current_version(tmp_path) == "v2"
    assert os.readlink(tmp_path / "current") == "v2"  # relative: the model dir can move
    assert bundle.resolve_bundle(tmp_path / "v1") == tmp_path / "v1"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_readers_never_see_a_missing_or_broken_current(tmp_path):
    make_bundle(tmp_path, "v1")
    make_bundle(tmp_path, "v2", seed=1)
    errors: list[Exception] = []
    seen: set[str] = set()
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                seen.add(bundle.read_manifest(bundle.resolve_bundle(tmp_path))["version"])
            except Exception as exc:  # noqa: BLE001 - any failure is the finding
                errors.append(exc)
                return

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for i in range(300):
        bundle.publish(tmp_path / ("v1" if i % 2 else "v2"))
    stop.set()
    for t in threads:
        t.join()
    assert not errors and seen == {"v1", "v2"}


def test_resolve_and_read_errors_name_the_problem(tmp_path):
    with pytest.raises(BundleError, match="no such model directory"):
        bundle.resolve_bundle(tmp_path / "nope")
    with pytest.raises(BundleError, match="neither a bundle"):
        bundle.resolve_bundle(tmp_path)
    os.symlink("ghost", tmp_path / "current")
    with pytest.raises(BundleError, match="'ghost', which does not exist"):
        bundle.resolve_bundle(tmp_path)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="unreadable manifest"):
        bundle.read_manifest(tmp_path / "bad")
    (tmp_path / "bad" / "manifest.json").write_text(json.dumps({"format": 99}))
    with pytest.raises(BundleError, match="unsupported manifest format 99"):
        bundle.read_manifest(tmp_path / "bad")
    with pytest.raises(BundleError, match="no manifest"):
        bundle.publish(tmp_path / "nope")
