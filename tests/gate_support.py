"""Worlds split in event time, shuffled-label copies and trained candidates for the gate tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from replay_support import TASKS, world_bundle, world_log

WINDOWS = {"click": 300.0, "online": 300.0, "cart": 300.0, "deal": 900.0}  # > every offline delay's bulk


def split_world(world: Path, out: Path, train_share: float = 2 / 3) -> tuple[Path, Path]:
    """The world's first `train_share` of event time (training) and the rest (the gate's window),
    as two world logs."""
    table = pq.read_table(world)
    table = table.sort_by("ts_ms")
    cut = int(len(table) * train_share)
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(table.slice(0, cut), out / "train.parquet")
    pq.write_table(table.slice(cut), out / "holdout.parquet")
    return out / "train.parquet", out / "holdout.parquet"


def split_world_and_v0(tmp: Path, rows: int, seed: int) -> tuple[Path, Path, Path]:
    """A world log split in event time (train, holdout) and a model dir holding v0, an untrained
    spread bundle for its features (published as current)."""
    from model import bundle
    from training.logs import load_logs

    world = world_log(tmp / "world", rows, seed=seed)
    train, holdout = split_world(world / "part-00000.parquet", tmp / "split")
    models = tmp / "models"
    bundle.publish(world_bundle(models, load_logs(train), "v0"))
    return train, holdout, models


def shuffled_labels(world: Path, out: Path, seed: int = 0) -> Path:
    """The same rows with the label columns permuted together: a model trained on it learns nothing."""
    table = pq.read_table(world)
    perm = pa.array(np.random.default_rng(seed).permutation(len(table)))
    for name in TASKS:
        i = table.schema.get_field_index(name)
        table = table.set_column(i, name, pc.take(table[name], perm))
    pq.write_table(table, out)
    return out


def rta(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    base = {**os.environ, "RTA_TORCH_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "infra.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=base)


def train_tiny(logs: Path, model_dir: Path, version: str, seed: int = 0) -> Path:
    """A tiny-profile bundle (teacher + student) trained on `logs`, in-process."""
    from training.pipeline import run_training
    from training.profiles import get_profile

    return run_training(logs, model_dir, get_profile("tiny"), seed=seed, version=version, report=False,
                        progress=False, threads=1)
