"""Student -> its ONNX graphs: raw features in, per-task (p, u) out, preprocessing inside.

Two graphs of the same weights go into a bundle (bundle format 2):
- `student_codes.onnx`, what serving runs: `num` float32[N, n_num] (NaN = missing) and `cat`
  int64[N, n_cat] categorical codes (`stream.codes`: 0 missing, 1 unknown, k + 2 vocabulary
  word k), computed before onnxruntime from the vocabulary this graph carries in its metadata
  (`cat_vocab`), so the bundle stays self-contained and the graph's sha256 covers it. Handing
  onnxruntime a string tensor cost more than the network itself.
- `student.onnx`: `cat` string[N, n_cat] ("" = missing), the vocabulary lookup in the graph
  (LabelEncoder). Offline tools (distillation parity, `rta eval`) and format-1 readers feed it
  strings directly.
Outputs: `p` float32[N, T], `u` float32[N, T] (teacher's uncertainty scale).

The graph is written with `onnx.helper` straight from the trained weights rather than with
`torch.onnx.export`: torch 2.13 defaults to the dynamo exporter, which needs `onnxscript`
(not part of our dependencies), and the network is small enough that writing it node by node
keeps the graph readable and identical to `Preprocessor.transform` + `Student.forward`, which
this file mirrors op for op.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from model.bundle import STUDENT_ONNX, build_manifest, write_manifest
from model.novelty import Novelty
from model.preprocess import FIRST_VOCAB_INDEX, MISSING_INDEX, UNKNOWN_INDEX, Preprocessor
from model.student import Student
from stream.codes import CODES_FORMAT

OPSET = 17
SERVING_ONNX = "student_codes.onnx"
ML_OPSET = 2  # ai.onnx.ml LabelEncoder with keys_strings / values_int64s


class _Graph:
    """Collects nodes and constants with unique names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def name(self, stem: str) -> str:
        self._n += 1
        return f"{stem}_{self._n}"

    def const(self, stem: str, value: np.ndarray) -> str:
        name = self.name(stem)
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], stem: str | None = None, domain: str = "",
           **attrs: object) -> str:
        out = self.name(stem or op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, domain=domain, **attrs))
        return out


def _numeric(g: _Graph, pre: Preprocessor, num: str) -> tuple[str, str]:
    """x = [clip((log?(num) - center) / scale) with NaN -> 0, isnan(num)] -> float32[N, 2*n_num],
    and v = log?(num) before centring (what the novelty ranges are on)."""
    missing = g.op("IsNaN", [num], "missing")
    logged = g.op("Mul", [g.op("Sign", [num]),
                          g.op("Log", [g.op("Add", [g.op("Abs", [num]), g.const("one", np.float32(1.0))])])],
                  "signed_log1p")
    v = g.op("Where", [g.const("num_log", pre.num_log.astype(bool)), logged, num])
    z = g.op("Div", [g.op("Sub", [v, g.const("num_center", pre.num_center)]),
                     g.const("num_scale", pre.num_scale)])
    z = g.op("Clip", [z, g.const("lo", np.float32(-pre.clip)), g.const("hi", np.float32(pre.clip))])
    z = g.op("Where", [missing, g.const("zero", np.float32(0.0)), z], "z")
    ind = g.op("Cast", [missing], "missing_f", to=TensorProto.FLOAT)
    return g.op("Concat", [z, ind], "x", axis=1), v


def _categorical(g: _Graph, pre: Preprocessor, student: Student, cat: str) -> str:
    """Vocab lookup for all columns at once -> row of the shared embedding table, int64[N, n_cat].

    One LabelEncoder maps every string to an id in the union of all columns' vocabularies
    (default: a reserved "unknown" id); a [n_cat, n_union] table then gives, per column, the
    row offsets[j] + (0 missing | 1 unknown | 2.. vocab index), exactly as
    `Preprocessor.transform` + `Student.raw` do. This beats a Split + LabelEncoder + Concat per
    column: a handful of nodes whatever the number of columns.
    """
    words = sorted({w for col in pre.vocab for w in col} | {""})
    wid = {w: i for i, w in enumerate(words)}
    unknown_id = len(words)
    offsets = student.offsets.numpy().astype(np.int64)
    table = np.empty((len(pre.vocab), len(words) + 1), np.int64)
    for j, col in enumerate(pre.vocab):
        table[j, :] = offsets[j] + UNKNOWN_INDEX
        table[j, wid[""]] = offsets[j] + MISSING_INDEX
        for k, w in enumerate(col):
            table[j, wid[w]] = offsets[j] + FIRST_VOCAB_INDEX + k
    ids = g.op("LabelEncoder", [cat], "word_id", domain="ai.onnx.ml", keys_strings=words,
               values_int64s=list(range(len(words))), default_int64=unknown_id)
    col_base = g.const("col_base", np.arange(len(pre.vocab), dtype=np.int64) * table.shape[1])
    return g.op("Gather", [g.const("vocab_table", table.reshape(-1)), g.op("Add", [ids, col_base])],
                "emb_row", axis=0)


def _categorical_codes(g: _Graph, student: Student, cat: str) -> str:
    """Codes int64[N, n_cat] -> row of the shared embedding table (codes + column offsets)."""
    offsets = student.offsets.numpy().astype(np.int64)
    return g.op("Add", [cat, g.const("col_offsets", offsets)], "emb_row")


def _linear(g: _Graph, h: str, layer: torch.nn.Linear, stem: str) -> str:
    w = layer.weight.detach().numpy().T.astype(np.float32)
    b = layer.bias.detach().numpy().astype(np.float32)
    return g.op("Add", [g.op("MatMul", [h, g.const(f"{stem}_w", w)]), g.const(f"{stem}_b", b)], stem)


def _network_input(g: _Graph, student: Student, x: str, rows: str | None) -> str:
    """[x, flattened embeddings]: the first layer's input, float32[N, n_inputs + n_cat * emb_dim]."""
    parts = [x]
    if rows is not None:
        table = student.emb.weight.detach().numpy().astype(np.float32)
        e = g.op("Gather", [g.const("emb", table), rows], "emb", axis=0)  # [N, n_cat, d]
        width = len(student.cardinalities) * student.cfg.emb_dim
        parts.append(g.op("Reshape", [e, g.const("shape", np.array([0, width], np.int64))], "emb_flat"))
    return parts[0] if len(parts) == 1 else g.op("Concat", parts, "h0", axis=1)


def _network(g: _Graph, student: Student, h: str) -> tuple[str, str]:
    for i, layer in enumerate(m for m in student.bottom if isinstance(m, torch.nn.Linear)):
        h = g.op("Relu", [_linear(g, h, layer, f"bottom{i}")])
    a = g.op("Relu", [_linear(g, h, student.head1, "head1")])
    # Per-head second layer as one block-diagonal matmul: row k*hh + m feeds output k.
    w2 = student.head2_w.detach().numpy().astype(np.float32)
    n_out, hh = w2.shape
    block = np.zeros((n_out * hh, n_out), np.float32)
    for k in range(n_out):
        block[k * hh:(k + 1) * hh, k] = w2[k]
    out = g.op("Add", [g.op("MatMul", [a, g.const("head2_w", block)]),
                       g.const("head2_b", student.head2_b.detach().numpy().astype(np.float32))], "heads")
    n_tasks = len(student.tasks)
    ax = g.const("ax1", np.array([1], np.int64))
    logit = g.op("Slice", [out, g.const("s0", np.array([0], np.int64)),
                           g.const("sT", np.array([n_tasks], np.int64)), ax], "logit")
    u_raw = g.op("Slice", [out, g.const("sT", np.array([n_tasks], np.int64)),
                           g.const("s2T", np.array([2 * n_tasks], np.int64)), ax], "u_raw")
    p = g.op("Sigmoid", [logit], "p_out")
    return p, _uncertainty(g, student, u_raw)


def _uncertainty(g: _Graph, student: Student, u_raw: str) -> str:
    """Head output -> teacher scale, as `Student.to_teacher_scale`."""
    if student.target_mode == "mean_match":
        return g.op("Div", [g.op("Softplus", [u_raw]), g.const("rescale", student.rescale.numpy())], "u_out")
    if student.target_mode == "log":
        z = g.op("Add", [g.op("Mul", [u_raw, g.const("log_scale", student.log_scale.numpy())]),
                         g.const("log_loc", student.log_loc.numpy())])
        return g.op("Exp", [z], "u_out")
    q = g.op("Sigmoid", [u_raw], "q")
    table = student.quantiles.numpy().astype(np.float32)
    n_tasks, k = table.shape
    pos = g.op("Mul", [q, g.const("km1", np.float32(k - 1))], "pos")
    lo_i = g.op("Clip", [g.op("Floor", [pos]), g.const("zero", np.float32(0)),
                         g.const("km2", np.float32(k - 2))], "lo_i")
    frac = g.op("Sub", [pos, lo_i], "frac")
    gidx = g.op("Add", [g.op("Cast", [lo_i], to=TensorProto.INT64),
                        g.const("task_off", np.arange(n_tasks, dtype=np.int64) * k)], "gidx")
    flat = g.const("quantiles", table.reshape(-1))
    lo = g.op("Gather", [flat, gidx], "q_lo", axis=0)
    hi = g.op("Gather", [flat, g.op("Add", [gidx, g.const("one_i", np.int64(1))])], "q_hi", axis=0)
    return g.op("Add", [lo, g.op("Mul", [frac, g.op("Sub", [hi, lo])])], "u_out")


def _model(g: _Graph, pre: Preprocessor, outputs: dict[str, tuple[str, int]], name: str,
           codes: bool = False) -> onnx.ModelProto:
    """Raw-batch inputs (num, cat strings or codes) -> the named float32 outputs {name: (tensor, width)}."""
    for out, (tensor, _) in outputs.items():
        g.nodes.append(helper.make_node("Identity", [tensor], [out], name=out))
    graph = helper.make_graph(
        g.nodes, name,
        inputs=[helper.make_tensor_value_info("num", TensorProto.FLOAT, ["N", len(pre.spec.numeric)]),
                helper.make_tensor_value_info("cat", TensorProto.INT64 if codes else TensorProto.STRING,
                                              ["N", len(pre.spec.categorical)])],
        outputs=[helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", width])
                 for out, (_, width) in outputs.items()],
        initializer=g.inits,
    )
    model = helper.make_model(
        graph, producer_name="rta-filter",
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("ai.onnx.ml", ML_OPSET)],
    )
    model.ir_version = 8
    return model


def _front(g: _Graph, pre: Preprocessor, student: Student, codes: bool = False) -> tuple[str, str, str | None]:
    """(network input h0, numeric values v, embedding rows or None)."""
    if student.n_inputs != pre.n_inputs or student.cardinalities != pre.cardinalities:
        raise ValueError("student was built for a different preprocessor (input width or vocab sizes)")
    x, v = _numeric(g, pre, "num")
    rows = None
    if pre.spec.categorical:
        rows = _categorical_codes(g, student, "cat") if codes else _categorical(g, pre, student, "cat")
    return _network_input(g, student, x, rows), v, rows


def _novelty(g: _Graph, student: Student, novelty: Novelty, v: str, rows: str | None) -> str:
    """`Novelty.score` in the graph: weighted out-of-range and unseen-category events -> float32[N, 1]."""
    out = g.op("Or", [g.op("Less", [v, g.const("nov_lo", novelty.lo)]),
                      g.op("Greater", [v, g.const("nov_hi", novelty.hi)])], "out_of_range")
    score = g.op("MatMul", [g.op("Cast", [out], to=TensorProto.FLOAT),
                            g.const("nov_w_num", novelty.w_num.reshape(-1, 1))], "nov_num")
    if rows is not None:
        unknown_row = student.offsets.numpy().astype(np.int64) + UNKNOWN_INDEX
        unseen = g.op("Equal", [rows, g.const("unknown_row", unknown_row)], "unseen")
        score = g.op("Add", [score, g.op("MatMul", [g.op("Cast", [unseen], to=TensorProto.FLOAT),
                                                    g.const("nov_w_cat", novelty.w_cat.reshape(-1, 1))])])
    return g.op("Identity", [score], "novelty_score")


def _combine(g: _Graph, a: str, n: str, combine: dict[str, Any]) -> str:
    """`stream.policy.combine_uncertainty` in the graph: a + [n > gate] * ceiling * (1 + n / max(gate, 1))."""
    gate = float(combine["gate"])
    on = g.op("Cast", [g.op("Greater", [n, g.const("gate", np.float32(gate))])], to=TensorProto.FLOAT)
    grow = g.op("Add", [g.const("one", np.float32(1.0)),
                        g.op("Div", [n, g.const("gate_scale", np.float32(max(gate, 1.0)))])])
    ceiling = g.const("ceiling", np.asarray(combine["ceiling"], np.float32))
    return g.op("Add", [a, g.op("Mul", [g.op("Mul", [on, grow]), ceiling])], "u_served")


def build_onnx(pre: Preprocessor, student: Student, novelty: Novelty | None = None,
               combine: dict[str, Any] | None = None, codes: bool = False) -> onnx.ModelProto:
    """The complete graph: raw batch -> preprocessing -> student -> (p, u).

    With `novelty` and `combine` ({"gate", "ceiling"}), `u` is the served combination of the
    student's ambiguity and the input novelty (`stream.policy.combine_uncertainty`), and the graph
    also outputs `u_ambiguity` (the distilled head alone) and `novelty` [N, 1]. `codes`: `cat` is
    int64 codes and the graph carries its vocabulary (`cat_vocab`, bundle format 2); otherwise
    `cat` is strings, looked up in the graph.
    """
    student = student.eval()
    g = _Graph()
    h0, v, rows = _front(g, pre, student, codes)
    p, u = _network(g, student, h0)
    n_tasks = len(student.tasks)
    outputs = {"p": (p, n_tasks), "u": (u, n_tasks)}
    if novelty is not None:
        if combine is None:
            raise ValueError("a novelty graph needs its combination (gate, ceiling)")
        n = _novelty(g, student, novelty, v, rows)
        outputs = {"p": (p, n_tasks), "u": (_combine(g, u, n, combine), n_tasks),
                   "u_ambiguity": (u, n_tasks), "novelty": (n, 1)}
    model = _model(g, pre, outputs, "rta_student", codes)
    props = {"tasks": ",".join(student.tasks), "feature_fingerprint": pre.spec.fingerprint(),
             "target_mode": student.target_mode}
    if codes:
        props.update({"cat_input": "codes", "bundle_format": str(CODES_FORMAT),
                      "cat_vocab": json.dumps(pre.vocab, ensure_ascii=False)})
    helper.set_model_props(model, props)
    onnx.checker.check_model(model, full_check=True)
    return model


def build_preprocessing_onnx(pre: Preprocessor, student: Student, codes: bool = False) -> onnx.ModelProto:
    """Only the graph's front: raw batch (strings, or `codes`) -> the network's input `h0`.

    The same nodes `build_onnx` starts with. `rta bench inference` times it to show how much
    of a student call is input conversion and preprocessing, a cost no smaller network removes.
    """
    g = _Graph()
    h0 = _front(g, pre, student.eval(), codes)[0]
    width = student.n_inputs + len(student.cardinalities) * student.cfg.emb_dim
    model = _model(g, pre, {"h0": (h0, width)}, "rta_student_preprocessing", codes)
    onnx.checker.check_model(model, full_check=True)
    return model


def export_onnx(pre: Preprocessor, student: Student, path: str | Path, novelty: Novelty | None = None,
                combine: dict[str, Any] | None = None, codes: bool = False,
                model: onnx.ModelProto | None = None) -> Path:
    """Write one graph (temp file + rename, so a reader never sees half a graph)."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    model = model if model is not None else build_onnx(pre, student, novelty, combine, codes)
    tmp.write_bytes(model.SerializeToString())
    os.replace(tmp, path)
    return path


# Int8 weights for the serving graph hold only if, on a probe batch spread over the fitted
# ranges and vocabularies, the int8 graph ranks every task's p and u like the float one and
# 99% of its probabilities move by less than this (else the float graph serves; the manifest
# says why). On the trained demo bundle int8 moved AUC by < 0.001 and the click-u Spearman to
# the teacher from 0.963 to 0.962 (docs/benchmarks.md).
QUANT_P99_ABS = 0.02
QUANT_MIN_SPEARMAN = 0.99
QUANT_PROBE_ROWS = 4096


def quantize_serving(pre: Preprocessor, graph: onnx.ModelProto, seed: int = 0,
                     calibration: tuple[np.ndarray, np.ndarray] | None = None,
                     check: tuple[np.ndarray, np.ndarray] | None = None,
                     ) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """(int8 graph, the parity figures with `kept`): static int8 quantisation of the network's
    MatMuls (per-channel weights, activation scales calibrated once on a probe batch); `kept` says
    whether parity holds, i.e. whether it may serve.

    Why static: dynamic quantisation scales activations by each call's batch, so a row's score
    would depend on its batch-mates and replay could not reproduce the worker's decisions; fixed
    scales keep every row's output a function of that row alone. Only the network's matmuls are
    quantised (the preprocessing and novelty ops stay float: they compare against thresholds).

    `calibration` and `check` are (num, codes) batches; without them both come from
    `probe_batch` (synthetic rows around the fitted centres). `rta train` keeps the synthetic
    calibration and checks on validation rows: the synthetic rows spread wider than the traffic,
    so their scales leave room for shifted inputs (calibrated on real rows instead, the ranks of
    the synthetic rows fell to a Spearman of 0.69 on the demo bundle, from 0.995), while the
    parity that decides is read on the traffic that will be served."""
    import tempfile

    import onnxruntime as ort
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    num, codes = calibration if calibration is not None else probe_batch(pre, QUANT_PROBE_ROWS, seed)

    class _Probe(CalibrationDataReader):
        def __init__(self) -> None:
            self.at = 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self.at >= len(num):
                return None
            sl = slice(self.at, self.at + 512)
            self.at += 512
            return {"num": num[sl], "cat": codes[sl]}

    network = [n.name for n in graph.graph.node if n.op_type == "MatMul" and n.name.startswith("matmul_")]
    root = logging.getLogger()  # the quantiser's "consider pre-processing" warnings: not ours to act on
    level = root.level
    with tempfile.TemporaryDirectory(prefix="rta-quant-") as tmp:
        src, dst = Path(tmp) / "f.onnx", Path(tmp) / "q.onnx"
        src.write_bytes(graph.SerializeToString())
        root.setLevel(logging.ERROR)
        try:
            quantize_static(src, dst, _Probe(), quant_format=QuantFormat.QOperator, op_types_to_quantize=["MatMul"],
                            nodes_to_quantize=network, per_channel=True, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8)
        finally:
            root.setLevel(level)
        quant = onnx.load(dst)
    del quant.metadata_props[:]
    helper.set_model_props(quant, {p.key: p.value for p in graph.metadata_props})
    # not the calibration rows
    check_num, check_codes = check if check is not None else probe_batch(pre, QUANT_PROBE_ROWS, seed + 1)
    outs = [o.name for o in graph.graph.output]
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    ref, got = ([np.asarray(a, np.float64) for a in ort.InferenceSession(
        m.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(
            outs, {"num": check_num, "cat": check_codes})] for m in (graph, quant))
    diff = np.abs(ref[0] - got[0])
    figures = {"probe": "synthetic" if check is None else "real rows",
               "calibration_rows": len(num), "probe_rows": len(check_num), "quantised_matmuls": len(network),
               "p_max_abs_diff": float(diff.max(initial=0.0)),
               "p_p99_abs_diff": float(np.quantile(diff, 0.99)) if diff.size else 0.0,
               "min_spearman": float(min(_spearman(a[:, k], b[:, k]) for a, b in zip(ref, got, strict=True)
                                         for k in range(a.shape[1]))),
               "limits": {"p_p99_abs_diff": QUANT_P99_ABS, "min_spearman": QUANT_MIN_SPEARMAN}}
    figures["kept"] = figures["p_p99_abs_diff"] <= QUANT_P99_ABS and figures["min_spearman"] >= QUANT_MIN_SPEARMAN
    return quant, figures


def probe_batch(pre: Preprocessor, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Raw rows around the fitted centres (5% missing, some beyond the range) and categorical
    codes drawn over each vocabulary (with missing and unknown): a batch for parity checks."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1, (n, len(pre.spec.numeric))).astype(np.float32)
    v = pre.num_center + z * pre.num_scale
    with np.errstate(over="ignore"):  # expm1 of non-log columns is computed, then discarded
        num = np.where(pre.num_log, np.sign(v) * np.expm1(np.abs(v)), v).astype(np.float32)
    num[rng.random(num.shape) < 0.05] = np.nan
    codes = np.stack([rng.integers(0, len(words) + FIRST_VOCAB_INDEX, n) for words in pre.vocab], axis=1) \
        if pre.vocab else np.zeros((n, 0), np.int64)
    return num, codes.astype(np.int64)


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = (np.argsort(np.argsort(x, kind="stable"), kind="stable").astype(np.float64) for x in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(np.sqrt((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / den) if den > 0 else 1.0


def export_bundle(
    bundle_dir: str | Path,
    pre: Preprocessor,
    student: Student,
    *,
    measure: str = "prob_var",
    source_map: dict[str, str] | None = None,
    score_function: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    thresholds: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    novelty: Novelty | None = None,
    combine: dict[str, Any] | None = None,
    selection: dict[str, Any] | None = None,
    quantize: str | None = None,
    quantize_check: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Write the student part of a bundle (student.onnx, student_codes.onnx, student.pt,
    preprocess.json) + manifest.

    The serving graph (`student_codes.onnx`) gets int8 matmuls when `quantize="int8"` and the
    probe parity holds (`quantize_serving`; `quantize_check` = raw (num, cat strings) rows the
    parity is read on, e.g. validation rows, else synthetic ones), else float32 (exact parity with
    torch); `manifest.serving` records which and the figures. `student.onnx` (string input) always keeps
    the float weights: it is the reference.

    With `novelty` + `combine` the served u combines ambiguity and novelty (`build_onnx`); the
    manifest's `uncertainty.novelty` records both, `uncertainty.selection` how the measure and
    source map were chosen.

    The teacher part (teacher.pt, preprocess.json, ...) may already be there; a preprocess.json
    that disagrees with `pre` is refused, since the ONNX graph embeds `pre`. Returns the manifest.
    """
    bundle_dir = Path(bundle_dir)
    bundle_dir.mkdir(parents=True, exist_ok=True)
    pre_path = bundle_dir / "preprocess.json"
    if pre_path.exists():
        if Preprocessor.from_dict(json.loads(pre_path.read_text())).to_dict() != pre.to_dict():
            raise ValueError(f"{pre_path} differs from the preprocessor the student was trained with")
    else:
        pre_path.write_text(json.dumps(pre.to_dict()))
    export_onnx(pre, student, bundle_dir / STUDENT_ONNX, novelty, combine)
    serving_graph = build_onnx(pre, student, novelty, combine, codes=True)
    serving: dict[str, Any] = {"file": SERVING_ONNX, "format": CODES_FORMAT, "cat": "codes",
                               "weights": "float32",
                               "note": "cat = stream.codes codes of the graph's own cat_vocab"}
    if quantize == "int8":
        check = None
        if quantize_check is not None:
            from stream.codes import CategoryCodes

            check = (np.asarray(quantize_check[0], np.float32),
                     CategoryCodes(pre.vocab).encode(np.asarray(quantize_check[1], dtype=object)))
        quant, figures = quantize_serving(pre, serving_graph, check=check)
        serving["quantization"] = {"tried": "int8 static (network MatMuls, per-channel weights)", **figures}
        if figures["kept"]:
            serving_graph, serving["weights"] = quant, "int8"
    elif quantize is not None:
        raise ValueError(f"unknown quantisation {quantize!r} (int8 or None)")
    export_onnx(pre, student, bundle_dir / SERVING_ONNX, model=serving_graph)
    torch.save(student.to_checkpoint(), bundle_dir / "student.pt")
    uncertainty: dict[str, Any] = {
        "measure": measure, "rescale": student.target_map(),
        "note": "u[:, t] is task t's own uncertainty on the teacher's scale; "
                "the decision reads u[:, uncertainty_source[task]]"}
    if novelty is not None:
        uncertainty["note"] = ("u[:, t] = ambiguity (task t's own uncertainty on the teacher's scale) "
                               "combined with input novelty (stream.policy.combine_uncertainty); "
                               "the decision reads u[:, uncertainty_source[task]]")
        uncertainty["novelty"] = {**{k: v for k, v in combine.items()}, "model": novelty.to_dict(),
                                  "outputs": ["u_ambiguity", "novelty"]}
    if selection is not None:
        uncertainty["selection"] = selection
    manifest = build_manifest(
        bundle_dir, pre.spec, student.tasks,
        uncertainty=uncertainty,
        source_map=source_map, score_function=score_function, metrics=metrics,
        thresholds=thresholds, extra={**(extra or {}), "serving": serving},
    )
    write_manifest(bundle_dir, manifest)
    return manifest
