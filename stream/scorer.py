"""Score a raw feature batch with the bundle's student: onnxruntime only, never torch.

`Scorer.load` verifies the bundle before anything is served: the sha256 of the student graph
against the manifest (every entry's path checked to lie inside the bundle; training files are
neither hashed nor required, so a serving-only bundle is valid), the feature spec against its fingerprint (and the caller's, when given), and the ONNX
graph's inputs/outputs against the spec and tasks. A bundle that fails any check is refused with
a `BundleError` naming the file and what was expected, so a worker keeps its old model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from model.bundle import (
    STUDENT_ONNX,
    bundle_file,
    read_manifest,
    resolve_bundle,
    verify_files,
    verify_spec,
)
from stream.errors import BundleError
from stream.features import FeatureSpec


@dataclass
class Scorer:
    """A verified bundle's student session; `score(num, cat) -> (p, u)`."""

    path: Path
    version: str
    spec: FeatureSpec
    tasks: list[str]
    manifest: dict[str, Any]
    session: ort.InferenceSession = field(repr=False)

    @classmethod
    def load(cls, path: str | Path, intra_threads: int = 1, inter_threads: int = 1,
             expected_fingerprint: str | None = None) -> Scorer:
        """Load a bundle dir, or a model dir's `current` version (resolved once)."""
        bundle = resolve_bundle(path)
        manifest = read_manifest(bundle)
        onnx_path = bundle / STUDENT_ONNX
        try:
            onnx_bytes = bundle_file(bundle, STUDENT_ONNX).read_bytes()
        except OSError as exc:  # PermissionError, a directory, ...
            raise BundleError(f"{onnx_path}: unreadable ({exc.strerror or exc})") from None
        # Hash exactly the bytes we load, so a swap between check and load cannot slip through;
        # only what serving reads (training files such as teacher.pt are neither hashed nor needed).
        verify_files(bundle, manifest, preloaded={STUDENT_ONNX: onnx_bytes}, only={STUDENT_ONNX})
        spec = verify_spec(bundle, manifest, expected_fingerprint)
        tasks = [str(t) for t in manifest["tasks"]]
        try:
            session = ort.InferenceSession(onnx_bytes, sess_options=session_options(intra_threads, inter_threads),
                                           providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise BundleError(f"{onnx_path}: onnxruntime cannot load it ({str(exc).splitlines()[0]})") from None
        _check_signature(onnx_path, session, spec, tasks)
        return cls(bundle, str(manifest["version"]), spec, tasks, manifest, session)

    def score(self, num: np.ndarray, cat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """num float32[N, n_num] (NaN = missing), cat str[N, n_cat] ("" = missing) -> (p, u) float32[N, T]."""
        num = np.ascontiguousarray(num, dtype=np.float32)
        cat = np.asarray(cat, dtype=object)
        n_num, n_cat = len(self.spec.numeric), len(self.spec.categorical)
        if num.ndim != 2 or num.shape[1] != n_num or cat.shape != (num.shape[0], n_cat):
            raise ValueError(f"expected num [N, {n_num}] and cat [N, {n_cat}], got {num.shape} and {cat.shape}")
        if num.shape[0] == 0:
            empty = np.zeros((0, len(self.tasks)), np.float32)
            return empty, empty.copy()
        p, u = self.session.run(["p", "u"], {"num": num, "cat": cat})
        return p, u


def session_options(intra_threads: int = 1, inter_threads: int = 1) -> ort.SessionOptions:
    """The onnxruntime options the worker serves with (`rta bench inference` times the same)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(intra_threads)
    opts.inter_op_num_threads = int(inter_threads)
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return opts


def _check_signature(onnx_path: Path, session: ort.InferenceSession, spec: FeatureSpec,
                     tasks: list[str]) -> None:
    meta = session.get_modelmeta().custom_metadata_map
    graph_fp = meta.get("feature_fingerprint")
    if graph_fp != spec.fingerprint():
        raise BundleError(f"{onnx_path}: feature fingerprint mismatch (manifest {spec.fingerprint()}, "
                          f"graph built for {graph_fp})")
    if meta.get("tasks") is not None and meta["tasks"].split(",") != tasks:
        raise BundleError(f"{onnx_path}: graph outputs tasks {meta['tasks']}, the manifest lists {','.join(tasks)}")
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    want = {"num": len(spec.numeric), "cat": len(spec.categorical)}
    for name, width in want.items():
        if name not in inputs:
            raise BundleError(f"{onnx_path}: graph has no input {name!r}")
        got = inputs[name].shape[1] if len(inputs[name].shape) == 2 else None
        if got != width:
            raise BundleError(f"{onnx_path}: input {name!r} has width {got}, the feature spec needs {width}")
    for name in ("p", "u"):
        if name not in outputs:
            raise BundleError(f"{onnx_path}: graph has no output {name!r}")
        got = outputs[name].shape[1] if len(outputs[name].shape) == 2 else None
        if got != len(tasks):
            raise BundleError(f"{onnx_path}: output {name!r} has {got} tasks, the manifest lists {len(tasks)}")
