"""`rta bench inference`: teacher (M SWAG passes, torch) vs student (one ONNX pass), same process.

Both sides start from the same raw batch (num float32 with NaN, cat strings), so both pay their
preprocessing: the teacher `Preprocessor.transform` + `SWAG.predict(M)` (which draws the M weight
vectors and runs the M passes batched), the student one onnxruntime call with preprocessing in
the graph. Same thread count for torch and onnxruntime. Prints one JSON object.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import numpy as np

DEFAULT_BATCHES = "1,64,512,4096"


def _parse_batches(value: str) -> list[int]:
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None
    if not out or min(out) < 1:
        raise click.BadParameter(f"batch sizes must be >= 1, got {value!r}")
    return out


def _interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2
                         ) -> dict[str, float]:
    """Median ms of each function, timed round-robin so load changes on a shared box hit all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def _raw_rows(pre: Any, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Plausible raw rows for any preprocessor: values around the fitted centre, 5% missing,
    categories from the vocabulary with some missing and unseen ones."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1, (n, len(pre.spec.numeric))).astype(np.float32)
    v = pre.num_center + z * pre.num_scale
    with np.errstate(over="ignore"):  # expm1 of non-log columns is computed, then discarded
        num = np.where(pre.num_log, np.sign(v) * np.expm1(np.abs(v)), v).astype(np.float32)
    num[rng.random(num.shape) < 0.05] = np.nan
    cat = np.empty((n, len(pre.spec.categorical)), dtype=object)
    for j, words in enumerate(pre.vocab):
        pool = np.array(list(words[:50]) + ["", "unseen-value"], dtype=object)
        cat[:, j] = rng.choice(pool, n)
    return num, cat


def _untrained_demo(threads: int, workdir: Path) -> tuple[Any, Any, Any, Any, dict[str, Any]]:
    """Demo-profile teacher and student with untrained weights (same shapes, same cost)."""
    import torch

    from model.export import export_onnx
    from model.ple import MultiTaskNet, NetConfig
    from model.preprocess import Preprocessor
    from model.student import Student, StudentConfig
    from model.swag import SWAG
    from training.world import generate_table

    profile, source = _demo_profile()
    table = generate_table(20_000, seed=1)
    num, cat, spec = _table_arrays(table)
    pre = Preprocessor.fit(spec, num, cat)
    tasks = list(profile.tasks) if getattr(profile, "tasks", None) else ["click", "online", "cart", "deal"]
    net_fields = profile.net.to_dict() if profile is not None else {}
    net_fields.update(tasks=tuple(tasks), n_num=len(spec.numeric), cardinalities=tuple(pre.cardinalities))
    model = MultiTaskNet(NetConfig(**{k: v for k, v in net_fields.items() if k in NetConfig.__dataclass_fields__}))
    model.eval()
    rank = int(getattr(profile, "max_rank", 20))
    swag = SWAG(sum(p.numel() for p in model.parameters()), max_rank=rank)
    base = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    gen = torch.Generator().manual_seed(0)
    for _ in range(max(rank, 2)):  # snapshots around the initial weights: a full-rank posterior
        swag.collect(base + 0.01 * torch.randn(base.shape, generator=gen))
    scfg = StudentConfig.from_any(getattr(profile, "student", None))
    student = Student(pre.n_inputs, pre.cardinalities, tasks, scfg)
    rng = np.random.default_rng(0)
    student.set_target_map(rng.random((1000, len(tasks))) * 0.01, rng.random((1000, len(tasks))) < 0.1)
    onnx_path = export_onnx(pre, student, workdir / "student.onnx")
    info = {"mode": "untrained demo-profile architectures", "profile_source": source,
            "teacher_config": model.cfg.to_dict(),
            "student_config": scfg.to_dict(), "swag_rank": swag.rank,
            "teacher_method": getattr(profile, "inference", "vmap")}
    return model, swag, pre, onnx_path, info


def _demo_profile() -> tuple[Any, str]:
    """The demo profile, or (until training/profiles.py exists) the NetConfig defaults, named as such."""
    try:
        from training.profiles import get_profile
    except ImportError:
        return None, "NetConfig/StudentConfig defaults (training.profiles not available)"
    return get_profile("demo"), "training.profiles demo"


def _table_arrays(table: Any) -> tuple[np.ndarray, np.ndarray, Any]:
    from stream.features import FeatureSpec
    from training.world import feature_kinds

    kinds = feature_kinds(table.schema)
    numeric = tuple(n for n, k in kinds.items() if k == "numeric")
    categorical = tuple(n for n, k in kinds.items() if k == "categorical")
    num = np.stack([table.column(n).to_numpy(zero_copy_only=False).astype(np.float32) for n in numeric], 1)
    cat = np.stack([np.asarray(table.column(n).fill_null("").to_pylist(), dtype=object) for n in categorical], 1)
    return num, cat, FeatureSpec(numeric, categorical)


def _from_bundle(model_dir: Path) -> tuple[Any, Any, Any, Path, dict[str, Any]]:
    from model.bundle import STUDENT_ONNX, resolve_bundle
    from training.pipeline import load_teacher

    bundle = resolve_bundle(model_dir)
    model, swag, pre, cfg = load_teacher(bundle)
    model.eval()
    return model, swag, pre, bundle / STUDENT_ONNX, {"mode": "bundle", "bundle": str(bundle),
                                                     "swag_rank": swag.rank,
                                                     "teacher_method": cfg["profile"].inference}


def run(model_dir: Path | None, batches: list[int], repeats: int, threads: int, samples: int) -> dict[str, Any]:
    """Time both models per batch size; returns the JSON-able result."""
    import onnxruntime as ort
    import torch
    from torch.nn.utils import vector_to_parameters

    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # already set in this process
        torch.set_num_interop_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        if model_dir is None:
            model, swag, pre, onnx_path, info = _untrained_demo(threads, Path(tmp))
        else:
            model, swag, pre, onnx_path, info = _from_bundle(model_dir)
        method = info.get("teacher_method", "vmap")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sess = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"])
        num_all, cat_all = _raw_rows(pre, max(batches))
        # The paper's setting: M weight vectors drawn once, then M forward passes per batch.
        presampled = swag.sample(samples, generator=torch.Generator().manual_seed(0))
        results = {}
        for b in batches:
            num, cat = num_all[:b], cat_all[:b]

            def teacher(num: np.ndarray = num, cat: np.ndarray = cat) -> object:
                x, idx = pre.transform(num, cat)
                return swag.predict(model, x, idx, n_samples=samples, method=method)

            def teacher_presampled(num: np.ndarray = num, cat: np.ndarray = cat) -> object:
                x, idx = (torch.from_numpy(a) for a in pre.transform(num, cat))
                with torch.no_grad():
                    probs = []
                    for w in presampled:
                        vector_to_parameters(w, model.parameters())
                        probs.append(torch.sigmoid(model(x, idx)))
                    p = torch.stack(probs)
                    return p.mean(0).numpy(), p.var(0, unbiased=False).numpy()

            def student(num: np.ndarray = num, cat: np.ndarray = cat) -> object:
                return sess.run(["p", "u"], {"num": num, "cat": cat})

            reps = repeats if b <= 512 else max(3, repeats // 3)
            ms = _interleaved_medians({"teacher": teacher, "teacher_presampled": teacher_presampled,
                                       "student": student}, reps)
            t_ms, tp_ms, s_ms = ms["teacher"], ms["teacher_presampled"], ms["student"]
            results[str(b)] = {
                "teacher_ms": round(t_ms, 3),
                "teacher_presampled_ms": round(tp_ms, 3),
                "student_ms": round(s_ms, 4),
                "ratio": round(t_ms / s_ms, 1),
                "ratio_presampled": round(tp_ms / s_ms, 1),
                "student_events_per_s_per_core": round(b / (s_ms / 1e3) / threads),
                "teacher_presampled_events_per_s_per_core": round(b / (tp_ms / 1e3) / threads),
            }
    return {
        "bench": "inference",
        "teacher": f"Preprocessor.transform + SWAG.predict(M={samples}), which draws the M weight vectors "
                   f"per call (torch {torch.__version__})",
        "teacher_presampled": f"Preprocessor.transform + {samples} forward passes with weights drawn once "
                              "(the paper's timing); ratio_presampled is the conservative ratio",
        "student": f"student.onnx, preprocessing in graph (onnxruntime {ort.__version__})",
        "threads": threads,
        "repeats": repeats,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        **info,
        "batches": results,
        "ratio_at_512": results.get("512", {}).get("ratio"),
        "ratio_presampled_at_512": results.get("512", {}).get("ratio_presampled"),
    }


@click.command("inference")
@click.option("--model", "model_dir", type=click.Path(path_type=Path, file_okay=False),
              default=None, help="Bundle or model dir (follows current). Default: untrained demo-profile nets.")
@click.option("--batches", default=DEFAULT_BATCHES, show_default=True, help="Comma-separated batch sizes.")
@click.option("--repeats", default=20, show_default=True, type=click.IntRange(1), help="Timed runs per batch size.")
@click.option("--threads", default=1, show_default=True, type=click.IntRange(1), help="Threads for torch AND onnxruntime.")
@click.option("--samples", default=11, show_default=True, type=click.IntRange(2), help="SWAG samples M for the teacher.")
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), default=None, help="Also write the JSON here.")
def inference(model_dir: Path | None, batches: str, repeats: int, threads: int, samples: int, out: Path | None) -> None:
    """Teacher (M SWAG samples, torch) vs student (ONNX): median ms per batch and their ratio."""
    result = run(model_dir, _parse_batches(batches), repeats, threads, samples)
    text = json.dumps(result, indent=2)
    if out is not None:
        out.write_text(text + "\n")
    click.echo(text)
