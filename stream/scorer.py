"""Score a raw feature batch with the bundle's student: onnxruntime only, never torch.

A format-2 bundle serves `student_codes.onnx`, whose `cat` input is int64 codes: `Scorer.codes`
turns the decoder's categorical strings into them from the graph's own vocabulary
(`stream.codes`), before onnxruntime, which is where the worker and replay both call it. A
format-1 bundle (string input only, the vocabulary lookup in the graph) still loads and serves,
at its old cost: `codes` then passes the strings through.

`Scorer.load` verifies the bundle before anything is served: the sha256 of the student graph
against the manifest (every entry's path checked to lie inside the bundle; training files are
neither hashed nor required, so a serving-only bundle is valid), the feature spec against its fingerprint (and the caller's, when given), and the ONNX
graph's inputs/outputs against the spec and tasks. A bundle that fails any check is refused with
a `BundleError` naming the file and what was expected, so a worker keeps its old model.
"""

from __future__ import annotations

import json
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
from stream.codes import CODES_FORMAT, CategoryCodes
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
    serving: ort.InferenceSession = field(repr=False)  # the graph `score` runs
    encoder: CategoryCodes | None = field(default=None, repr=False)  # None: the graph takes strings
    threads: tuple[int, int] = (1, 1)
    _strings_graph: bytes | None = field(default=None, repr=False)  # verified student.onnx (format 2)
    _strings_session: ort.InferenceSession | None = field(default=None, repr=False)

    @property
    def session(self) -> ort.InferenceSession:
        """A session fed string categoricals (student.onnx), for callers that run the graph
        themselves; built on first use from the verified bytes. Prefer `run`: it takes codes."""
        if self.encoder is None:
            return self.serving
        if self._strings_session is None:
            assert self._strings_graph is not None
            self._strings_session = ort.InferenceSession(
                self._strings_graph, sess_options=session_options(*self.threads), providers=["CPUExecutionProvider"])
        return self._strings_session

    @classmethod
    def load(cls, path: str | Path, intra_threads: int = 1, inter_threads: int = 1,
             expected_fingerprint: str | None = None) -> Scorer:
        """Load a bundle dir, or a model dir's `current` version (resolved once)."""
        bundle = resolve_bundle(path)
        manifest = read_manifest(bundle)
        graph = _serving_graph(bundle, manifest)
        onnx_path = bundle / graph
        onnx_bytes = _read(bundle, graph)
        # Hash exactly the bytes we load, so a swap between check and load cannot slip through;
        # only the student graphs (training files such as teacher.pt are neither hashed nor needed;
        # the string graph is checked too, so a bundle with either graph corrupt is refused).
        strings = onnx_bytes if graph == STUDENT_ONNX else _read(bundle, STUDENT_ONNX)
        verify_files(bundle, manifest, preloaded={graph: onnx_bytes, STUDENT_ONNX: strings},
                     only={graph, STUDENT_ONNX})
        spec = verify_spec(bundle, manifest, expected_fingerprint)
        tasks = [str(t) for t in manifest["tasks"]]
        try:
            session = ort.InferenceSession(onnx_bytes, sess_options=session_options(intra_threads, inter_threads),
                                           providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise BundleError(f"{onnx_path}: onnxruntime cannot load it ({str(exc).splitlines()[0]})") from None
        encoder = _check_signature(onnx_path, session, spec, tasks)
        return cls(bundle, str(manifest["version"]), spec, tasks, manifest, session, encoder,
                   (intra_threads, inter_threads), strings if encoder is not None else None)

    def codes(self, cat: np.ndarray) -> np.ndarray:
        """What the graph's `cat` input takes: int64 codes (format 2) of categorical values
        (str/int, ""/None = missing); a format-1 graph's strings as they are."""
        if self.encoder is None or np.asarray(cat).dtype.kind in "iu":
            return cat
        return self.encoder.encode(cat)

    def score(self, num: np.ndarray, cat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """num float32[N, n_num] (NaN = missing), cat str[N, n_cat] ("" = missing) or the int64
        codes of `codes(cat)` -> (p, u) float32[N, T]."""
        p, u = self.run(["p", "u"], num, cat)
        return p, u

    def run(self, outputs: list[str], num: np.ndarray, cat: np.ndarray) -> list[np.ndarray]:
        """Any of the graph's outputs (p, u, and u_ambiguity, novelty where the bundle has them)
        for a raw batch: strings or codes, as `score`."""
        num = np.ascontiguousarray(num, dtype=np.float32)
        cat = self.codes(cat)
        cat = np.ascontiguousarray(cat, dtype=np.int64 if self.encoder is not None else object)
        n_num, n_cat = len(self.spec.numeric), len(self.spec.categorical)
        if num.ndim != 2 or num.shape[1] != n_num or cat.shape != (num.shape[0], n_cat):
            raise ValueError(f"expected num [N, {n_num}] and cat [N, {n_cat}], got {num.shape} and {cat.shape}")
        if num.shape[0] == 0:
            width = {o.name: o.shape[1] for o in self.serving.get_outputs()}
            return [np.zeros((0, width[o]), np.float32) for o in outputs]
        if self.encoder is not None and cat.size and (cat.min() < 0 or (cat > self.encoder.max_code).any()):
            raise ValueError("categorical codes outside the bundle's vocabulary")
        return self.serving.run(outputs, {"num": num, "cat": cat})


def session_options(intra_threads: int = 1, inter_threads: int = 1) -> ort.SessionOptions:
    """The onnxruntime options the worker serves with (`rta bench inference` times the same)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(intra_threads)
    opts.inter_op_num_threads = int(inter_threads)
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return opts


def _read(bundle: Path, rel: str) -> bytes:
    try:
        return bundle_file(bundle, rel).read_bytes()
    except OSError as exc:  # PermissionError, a directory, ...
        raise BundleError(f"{bundle / rel}: unreadable ({exc.strerror or exc})") from None


def _serving_graph(bundle: Path, manifest: dict[str, Any]) -> str:
    """The graph serving loads: the manifest's `serving.file` (format 2), else student.onnx."""
    serving = manifest.get("serving")
    if serving is None:
        return STUDENT_ONNX
    if not isinstance(serving, dict) or not isinstance(serving.get("file"), str):
        raise BundleError(f"{bundle / 'manifest.json'}: 'serving' must name the graph file")
    if serving.get("format") != CODES_FORMAT:
        raise BundleError(f"{bundle / 'manifest.json'}: serving graph format {serving.get('format')!r} "
                          f"is not one this build reads ({CODES_FORMAT}); upgrade rta-filter")
    return serving["file"]


def _check_signature(onnx_path: Path, session: ort.InferenceSession, spec: FeatureSpec,
                     tasks: list[str]) -> CategoryCodes | None:
    """Graph vs manifest; the graph's categorical encoder when it takes codes."""
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
    if inputs["cat"].type == "tensor(string)":
        return None
    if inputs["cat"].type != "tensor(int64)" or meta.get("cat_input") != "codes":
        raise BundleError(f"{onnx_path}: input 'cat' is {inputs['cat'].type} without the codes metadata")
    try:
        vocab = json.loads(meta["cat_vocab"])
        encoder = CategoryCodes(vocab)
    except (KeyError, ValueError, TypeError) as exc:
        raise BundleError(f"{onnx_path}: unreadable categorical vocabulary ({exc})") from None
    if encoder.n_columns != len(spec.categorical):
        raise BundleError(f"{onnx_path}: vocabulary for {encoder.n_columns} categorical columns, the "
                          f"feature spec has {len(spec.categorical)}")
    return encoder
