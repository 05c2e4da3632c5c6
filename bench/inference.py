"""`rta bench inference`: teacher (M SWAG passes, torch) vs student (one ONNX pass), same process.

Every side starts from the same raw batch (num float32 with NaN, cat strings), so each pays its
preprocessing. Timed round-robin, per batch size:
- teacher: `Preprocessor.transform` + `SWAG.predict(M)`, which draws the M weight vectors on
  every call, as `rta eval` and the distillation run it;
- teacher_presampled: `Preprocessor.transform` + M networks holding weights drawn once, one pass
  each (what a server keeping its samples would pay; the conservative reference);
- student: what the worker's `Scorer` does: the batch's category strings -> int64 codes from the
  bundle's vocabulary (`stream.codes`, before onnxruntime), then one onnxruntime call of the
  serving graph (`student_codes.onnx`; numeric preprocessing in the graph);
- student_strings: one call of `student.onnx`, the string graph (vocabulary lookup in the graph,
  what format-1 bundles serve), for comparison in the same run;
- student_preprocessing: the front of the serving path alone (codes + the graph's front, raw batch
  -> network input). It is the part of a student call no smaller network removes, so
  teacher_presampled / it bounds the ratio.
Same thread count for torch and onnxruntime. Prints one JSON object.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
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
    from model.export import probe_batch

    num = probe_batch(pre, n, seed)[0]  # the export's parity rows; strings drawn here instead of codes
    rng = np.random.default_rng(seed + 1)
    cat = np.empty((n, len(pre.spec.categorical)), dtype=object)
    for j, words in enumerate(pre.vocab):
        pool = np.array(list(words[:50]) + ["", "unseen-value"], dtype=object)
        cat[:, j] = rng.choice(pool, n)
    return num, cat


def _untrained(profile_name: str) -> tuple[Any, Any, Any, Any, dict[str, Any]]:
    """A profile's teacher and student with untrained weights (same shapes, same cost)."""
    import torch

    from model.ple import MultiTaskNet
    from model.preprocess import Preprocessor
    from model.student import Student, StudentConfig
    from model.swag import SWAG
    from training.pipeline import net_config
    from training.profiles import get_profile
    from training.world import generate_table

    profile = get_profile(profile_name)
    table = generate_table(20_000, seed=1)
    num, cat, spec = _table_arrays(table)
    pre = Preprocessor.fit(spec, num, cat)
    tasks = ("click", "online", "cart", "deal")
    model = MultiTaskNet(net_config(profile, pre, tasks)).eval()
    rank = profile.max_rank
    swag = SWAG(sum(p.numel() for p in model.parameters()), max_rank=rank)
    base = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    gen = torch.Generator().manual_seed(0)
    for _ in range(max(rank, 2)):  # snapshots around the initial weights: a full-rank posterior
        swag.collect(base + 0.01 * torch.randn(base.shape, generator=gen))
    scfg = StudentConfig.from_any(profile.student)
    student = Student(pre.n_inputs, pre.cardinalities, list(tasks), scfg)
    rng = np.random.default_rng(0)
    student.set_target_map(rng.random((1000, len(tasks))) * 0.01, rng.random((1000, len(tasks))) < 0.1)
    info = {"mode": f"untrained {profile_name}-profile architectures", "profile": profile_name,
            "teacher_config": model.cfg.to_dict(), "student_config": scfg.to_dict(),
            "swag_rank": swag.rank, "teacher_method": profile.inference}
    return model, swag, pre, student, info


def _table_arrays(table: Any) -> tuple[np.ndarray, np.ndarray, Any]:
    from stream.features import FeatureSpec
    from training.world import feature_kinds

    kinds = feature_kinds(table.schema)
    numeric = tuple(n for n, k in kinds.items() if k == "numeric")
    categorical = tuple(n for n, k in kinds.items() if k == "categorical")
    num = np.stack([table.column(n).to_numpy(zero_copy_only=False).astype(np.float32) for n in numeric], 1)
    cat = np.stack([np.asarray(table.column(n).fill_null("").to_pylist(), dtype=object) for n in categorical], 1)
    return num, cat, FeatureSpec(numeric, categorical)


def _from_bundle(model_dir: Path) -> tuple[Any, Any, Any, Any, dict[str, Any]]:
    import torch

    from model.bundle import STUDENT_ONNX, read_manifest, resolve_bundle
    from model.student import Student
    from stream.errors import BundleError
    from training.pipeline import load_teacher

    bundle = resolve_bundle(model_dir)
    if not (bundle / STUDENT_ONNX).exists() or not (bundle / "student.pt").exists():
        raise BundleError(f"{bundle} has no student ({STUDENT_ONNX} + student.pt); "
                          "was it trained with --teacher-only?")
    model, swag, pre, cfg = load_teacher(bundle)
    model.eval()
    student = Student.from_checkpoint(torch.load(bundle / "student.pt", weights_only=True))
    novelty = read_manifest(bundle).get("uncertainty", {}).get("novelty")
    return model, swag, pre, student, {"mode": "bundle", "bundle": str(bundle), "swag_rank": swag.rank,
                                       "teacher_method": cfg["profile"].inference, "novelty": novelty}


def _novelty_of(info: dict[str, Any]) -> tuple[Any, Any]:
    """(novelty, combine) of a bundle's served graph, (None, None) otherwise."""
    nov = info.get("novelty")
    if not nov:
        return None, None
    from model.novelty import Novelty

    return Novelty.from_dict(nov["model"]), {"gate": nov["gate"], "ceiling": nov["ceiling"]}


def _session(model: Any, threads: int) -> Any:
    """A session with the worker's own options (stream.scorer), so the bench times what serves."""
    import onnxruntime as ort

    from stream.scorer import session_options

    return ort.InferenceSession(model.SerializeToString(), sess_options=session_options(threads, 1),
                                providers=["CPUExecutionProvider"])


def run(model_dir: Path | None, batches: list[int], repeats: int, threads: int, samples: int,
        profile: str = "demo") -> dict[str, Any]:
    """Time the teacher (per-call and presampled) and the student (whole and its front) per batch size."""
    import copy

    import onnx
    import onnxruntime as ort
    import torch
    from torch.nn.utils import vector_to_parameters

    from model.bundle import STUDENT_ONNX
    from model.export import SERVING_ONNX, build_onnx, build_preprocessing_onnx
    from stream.codes import CategoryCodes

    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # already set in this process
        torch.set_num_interop_threads(1)
    if model_dir is None:
        model, swag, pre, student_net, info = _untrained(profile)
        student_graph = build_onnx(pre, student_net, codes=True)
        strings_graph = build_onnx(pre, student_net)
    else:
        model, swag, pre, student_net, info = _from_bundle(model_dir)
        bundle_dir = Path(info["bundle"])
        strings_graph = onnx.load(bundle_dir / STUDENT_ONNX)
        # the served file itself (a format-1 bundle has no codes graph: built from its weights)
        student_graph = (onnx.load(bundle_dir / SERVING_ONNX) if (bundle_dir / SERVING_ONNX).exists()
                         else build_onnx(pre, student_net, *_novelty_of(info), codes=True))
    method = info.get("teacher_method", "loop")
    sess = _session(student_graph, threads)
    strings_sess = _session(strings_graph, threads)
    front = _session(build_preprocessing_onnx(pre, student_net, codes=True), threads)
    encoder = CategoryCodes(pre.vocab)
    from model.export import quantize_serving

    int8_graph, int8_parity = quantize_serving(pre, build_onnx(pre, student_net, *_novelty_of(info), codes=True))
    info.pop("novelty", None)  # used above; the manifest has it
    int8_sess = _session(int8_graph, threads)  # timed either way; int8.kept says if it may serve
    num_all, cat_all = _raw_rows(pre, max(batches))
    # The paper's setting as we read it: M weight vectors drawn once, held as M networks, M passes.
    replicas = []
    for w in swag.sample(samples, generator=torch.Generator().manual_seed(0)):
        replica = copy.deepcopy(model)
        vector_to_parameters(w, replica.parameters())
        replicas.append(replica.eval())
    results = {}
    for b in batches:
        num, cat = num_all[:b], cat_all[:b]

        def teacher(num: np.ndarray = num, cat: np.ndarray = cat) -> object:
            x, idx = pre.transform(num, cat)
            return swag.predict(model, x, idx, n_samples=samples, method=method)

        def teacher_presampled(num: np.ndarray = num, cat: np.ndarray = cat) -> object:
            x, idx = (torch.from_numpy(a) for a in pre.transform(num, cat))
            with torch.no_grad():
                p = torch.stack([torch.sigmoid(r(x, idx)) for r in replicas])
                return p.mean(0).numpy(), p.var(0, unbiased=False).numpy()

        def student(num: np.ndarray = num, cat: np.ndarray = cat) -> object:
            return sess.run(["p", "u"], {"num": num, "cat": encoder.encode(cat)})

        def student_strings(num: np.ndarray = num, cat: np.ndarray = cat) -> object:
            return strings_sess.run(["p", "u"], {"num": num, "cat": cat})

        def student_preprocessing(num: np.ndarray = num, cat: np.ndarray = cat) -> object:
            return front.run(["h0"], {"num": num, "cat": encoder.encode(cat)})

        codes = encoder.encode(cat)

        def student_codes_only(num: np.ndarray = num, codes: np.ndarray = codes) -> object:
            return sess.run(["p", "u"], {"num": num, "cat": codes})

        def student_int8_codes(num: np.ndarray = num, codes: np.ndarray = codes) -> object:
            return int8_sess.run(["p", "u"], {"num": num, "cat": codes})

        def teacher_presampled_codes(num: np.ndarray = num, codes: np.ndarray = codes) -> object:
            x, idx = torch.from_numpy(pre.transform_numeric(num)), torch.from_numpy(codes)
            with torch.no_grad():
                p = torch.stack([torch.sigmoid(r(x, idx)) for r in replicas])
                return p.mean(0).numpy(), p.var(0, unbiased=False).numpy()

        def student_int8(num: np.ndarray = num, cat: np.ndarray = cat) -> object:
            return int8_sess.run(["p", "u"], {"num": num, "cat": encoder.encode(cat)})

        reps = repeats if b <= 512 else max(3, repeats // 3)
        fns = {"teacher": teacher, "teacher_presampled": teacher_presampled,
               "student": student, "student_preprocessing": student_preprocessing,
               "student_strings": student_strings, "student_graph": student_codes_only}
        fns.update({"student_int8": student_int8, "student_int8_graph": student_int8_codes,
                    "teacher_presampled_codes": teacher_presampled_codes})
        ms = _interleaved_medians(fns, reps)
        t_ms, tp_ms, s_ms, f_ms = (ms[k] for k in ("teacher", "teacher_presampled", "student",
                                                   "student_preprocessing"))
        results[str(b)] = {
            "teacher_ms": round(t_ms, 3),
            "teacher_presampled_ms": round(tp_ms, 3),
            "student_ms": round(s_ms, 4),
            "student_preprocessing_ms": round(f_ms, 4),
            "student_graph_ms": round(ms["student_graph"], 4),  # codes given (the decoder's output)
            "student_strings_ms": round(ms["student_strings"], 4),
            "ratio_presampled_strings_graph": round(tp_ms / ms["student_strings"], 1),
            "student_int8_ms": round(ms["student_int8"], 4),
            "ratio_presampled_int8": round(tp_ms / ms["student_int8"], 1),
            # both sides from categorical codes (what the worker's decoder hands over): the
            # categorical encoding is then neither side's cost
            "codes_in": {"teacher_presampled_ms": round(ms["teacher_presampled_codes"], 3),
                         "student_ms": round(ms["student_graph"], 4),
                         "student_int8_ms": round(ms["student_int8_graph"], 4),
                         "ratio_presampled": round(ms["teacher_presampled_codes"] / ms["student_graph"], 1),
                         "ratio_presampled_int8": round(ms["teacher_presampled_codes"] / ms["student_int8_graph"], 1)},
            "ratio": round(t_ms / s_ms, 1),
            "ratio_presampled": round(tp_ms / s_ms, 1),
            "ratio_presampled_ceiling": round(tp_ms / f_ms, 1),
            "student_events_per_s_per_core": round(b / (s_ms / 1e3) / threads),
            "teacher_presampled_events_per_s_per_core": round(b / (tp_ms / 1e3) / threads),
        }
    return {
        "bench": "inference",
        "teacher": f"Preprocessor.transform + SWAG.predict(M={samples}), which draws the M weight vectors "
                   f"per call (torch {torch.__version__})",
        "teacher_presampled": f"Preprocessor.transform + {samples} networks holding weights drawn once, "
                              "one pass each; ratio_presampled is the conservative ratio",
        "student": f"category strings -> stream.codes codes + {SERVING_ONNX} (onnxruntime {ort.__version__}); "
                   "student_graph_ms: the graph call alone, codes given; student_strings_ms: student.onnx, "
                   "the string graph (vocabulary lookup in the graph)",
        "student_preprocessing": "codes + the front of the serving graph alone (raw batch in, network input out): "
                                 "ratio_presampled_ceiling is the ratio a student with no network would get",
        "threads": threads,
        "repeats": repeats,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        **info,
        "batches": results,
        "int8": int8_parity,
        "ratio_at_512": results.get("512", {}).get("ratio"),
        "ratio_presampled_at_512": results.get("512", {}).get("ratio_presampled"),
        "ratio_presampled_ceiling_at_512": results.get("512", {}).get("ratio_presampled_ceiling"),
    }


@click.command("inference")
@click.option("--model", "model_dir", type=click.Path(path_type=Path, file_okay=False),
              default=None, help="Bundle or model dir (follows current). Default: untrained nets of --profile.")
@click.option("--profile", default=None, help="Without --model: whose architectures to time.  [default: demo]")
@click.option("--batches", default=DEFAULT_BATCHES, show_default=True, help="Comma-separated batch sizes.")
@click.option("--repeats", default=20, show_default=True, type=click.IntRange(1), help="Timed runs per batch size.")
@click.option("--threads", default=1, show_default=True, type=click.IntRange(1), help="Threads for torch AND onnxruntime.")
@click.option("--samples", default=11, show_default=True, type=click.IntRange(2), help="SWAG samples M for the teacher.")
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), default=None, help="Also write the JSON here.")
def inference(model_dir: Path | None, profile: str | None, batches: str, repeats: int, threads: int,
              samples: int, out: Path | None) -> None:
    """Teacher (M SWAG samples, torch) vs student (ONNX): median ms per batch and their ratio."""
    from training.profiles import PROFILES

    if model_dir is not None and profile is not None:
        raise click.UsageError("--profile times untrained architectures; it cannot be combined with --model")
    if profile is not None and profile not in PROFILES:
        raise click.BadParameter(f"unknown profile {profile!r}; known: {', '.join(PROFILES)}",
                                 param_hint="--profile")
    if model_dir is not None and not model_dir.exists():
        raise click.BadParameter(f"{model_dir} does not exist", param_hint="--model")
    result = run(model_dir, _parse_batches(batches), repeats, threads, samples, profile or "demo")
    text = json.dumps(result, indent=2)
    if out is not None:
        out.write_text(text + "\n")
    click.echo(text)
