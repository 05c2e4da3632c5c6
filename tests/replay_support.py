"""Worlds, bundles and logged layouts for the replay tests (no live stack)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from training.logs import LogSet, load_logs
from training.world import WorldConfig, write

TASKS = ("click", "online", "cart", "deal")


def world_log(out: Path, rows: int, seed: int = 0, rows_per_s: float = 1000.0) -> Path:
    """A world log whose event time runs at `rows_per_s` (live-like density for the controller)."""
    cfg = replace(WorldConfig(), span_days=rows / rows_per_s / 86_400.0)
    write(out, rows, seed=seed, config=cfg, progress=False)
    return out


def world_bundle(model_dir: Path, logs: LogSet, version: str = "v1", seed: int = 0) -> Path:
    """A complete bundle for the world's features: preprocessing fitted on `logs`, student
    weights untrained but spread (replay needs a scorer whose scores vary, not a good one)."""
    import torch

    from model.export import export_bundle
    from model.preprocess import Preprocessor
    from model.student import Student, StudentConfig

    pre = Preprocessor.fit(logs.spec, logs.num[:20_000], logs.cat[:20_000], min_count=5)
    torch.manual_seed(seed)
    student = Student(pre.n_inputs, pre.cardinalities, list(TASKS), StudentConfig(hidden=(32, 16)))
    with torch.no_grad():  # spread the scores like a trained model's (as bench/worker.py does)
        student.head2_w.mul_(40.0)
    student.eval()
    bundle_dir = Path(model_dir) / version
    export_bundle(bundle_dir, pre, student, metrics={"test": True})
    return bundle_dir


def world_and_bundle(tmp: Path, rows: int, seed: int = 0, rows_per_s: float = 1000.0) -> tuple[LogSet, Path]:
    path = world_log(tmp / f"world-{seed}", rows, seed, rows_per_s)
    logs = load_logs(path)
    return logs, world_bundle(tmp / "models", logs)
