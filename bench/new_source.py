"""`rta bench new-source`: the loop on a world the first model never saw, end to end offline.

A world whose second half has a new high-intent source (docs/world.md "New source", its own
units and ids). v1 is trained on the first half (no new source) and published; the second
half is logged as v1 serving it (`training/offline_log.py`: its decisions, a 5 % explore slice,
outcomes of passed requests after funnel delays). Then `rta retrain` runs as cron would, from
those logs only, and gates the candidate against v1 on the newest logged window. Judged
afterwards on the world's truth (never shown to the loop): the share of the new source's
expected deals each model keeps on the gate's window, both replayed at the same targets.
Prints one JSON object.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click
import numpy as np
import pyarrow.parquet as pq

ROWS_PER_S = 1000.0
WINDOWS = "click=2s,online=4s,cart=8s,deal=12s"
DELAYS = {"click": 0.2, "online": 0.5, "cart": 1.0, "deal": 2.0}


def _kept_new_source(model: Path, world: Path, from_ms: int, ratio: float) -> dict[str, float]:
    """Share of the expected deals (true_deal) kept, new source and all, on rows >= from_ms."""
    from stream.policy import ScorePolicy
    from stream.scorer import Scorer
    from training.logs import load_logs
    from training.replay import ReplayConfig, Step, replay_live, score_logs

    logs = load_logs(world).between(from_ms)
    src = pq.read_table(world, columns=["ts_ms", "true_source"]).to_pydict()
    ts = np.asarray(src["ts_ms"])
    new_all = np.array([s == "new" for s in src["true_source"]])[ts >= from_ms]
    scorer = Scorer.load(model)
    sc = score_logs(logs, scorer, ScorePolicy.from_manifest(scorer.manifest))
    step = Step(ratio, 0.02, 0.05)
    run = replay_live(sc, [step], ReplayConfig(steps=[step], seed=0), name=scorer.version)
    p = logs.truth[sc.order, list(logs.tasks).index("deal")].astype(np.float64)
    new = new_all[sc.order]
    kept = ~run.block
    return {"new_source_deals_kept": float(p[new & kept].sum() / p[new].sum()),
            "all_deals_kept": float(p[kept].sum() / p.sum()), "new_source_rows": int(new.sum())}


@click.command("new-source")
@click.option("--rows", type=click.IntRange(min=20_000), default=90_000, show_default=True,
              help="World rows (1000 per event-second); the new source from the middle on.")
@click.option("--share", type=float, default=0.10, show_default=True, help="New source's share of traffic.")
@click.option("--units", type=click.Choice(["smaller", "larger"]), default="smaller", show_default=True,
              help="The new source's units (docs/world.md); `larger` ones look so novel that v1 passes them.")
@click.option("--profile", default="loop", show_default=True, help="v1's training profile (v2 inherits it).")
@click.option("--ratio", type=float, default=0.5, show_default=True)
@click.option("--seed", type=int, default=21, show_default=True)
@click.option("--workdir", type=click.Path(path_type=Path), default=None)
def new_source(rows: int, share: float, units: str, profile: str, ratio: float, seed: int, workdir: Path | None) -> None:
    """v1 without the new source -> its logs -> rta retrain -> gate; judged on the world's truth."""
    from training.logs import load_logs
    from training.offline_log import make_logged_layout
    from training.pipeline import run_training
    from training.profiles import get_profile
    from training.replay import Step
    from training.world import WorldConfig, write

    t0 = time.perf_counter()
    tmp = Path(workdir or tempfile.mkdtemp(prefix="rta-bench-new-source-"))
    cfg = WorldConfig(span_days=rows / ROWS_PER_S / 86_400.0, new_source_from=0.5, new_source_share=share,
                      new_source_units=units)
    write(tmp / "world", rows, seed=seed, config=cfg, progress=False)
    table = pq.read_table(tmp / "world" / "part-00000.parquet").sort_by("ts_ms")
    half = rows // 2
    pq.write_table(table.slice(0, half), tmp / "before.parquet")
    pq.write_table(table.slice(half), tmp / "after.parquet")
    models = tmp / "models"
    run_training(tmp / "before.parquet", models, get_profile(profile), seed=0, version="v1", report=False,
                 progress=False, threads=1, publish=True)
    info = make_logged_layout(models / "v1", load_logs(tmp / "after.parquet"), tmp / "log",
                              Step(ratio, 0.02, 0.05), seed=seed, delays_s=DELAYS)
    span_s = (rows - half) / ROWS_PER_S
    holdout_s = span_s / 3
    dead = f"redis://127.0.0.1:{_free_port()}/0"
    argv = ["retrain", "--logs", str(tmp / "log"), "--model-dir", str(models),
            "--since-hours", f"{(span_s + 5) / 3600:.6f}", "--holdout-hours", f"{holdout_s / 3600:.6f}",
            "--version", "v2", "--attribution", WINDOWS, "--ratio", str(ratio), "--pass-share", "0.02",
            "--explore", "0.05", "--redis-url", dead, "--no-audit-topic", "--quiet", "--threads", "1",
            "--reason", "bench new-source"]
    proc = subprocess.run([sys.executable, "-m", "infra.cli", *argv], capture_output=True, text=True,
                          env={**os.environ, "RTA_TORCH_THREADS": "1"})
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    res: dict[str, Any] = json.loads(line[-1]) if line else {}
    human = [ln for ln in proc.stderr.splitlines() if ln.startswith("rta retrain:")]
    gate = res.get("gate") or {}
    window_from = (gate.get("window") or {}).get("from_ms")
    judged = {}
    if window_from is not None and (models / "v2").is_dir():
        for v in ("v1", "v2"):
            judged[v] = _kept_new_source(models / v, tmp / "after.parquet", int(window_from), ratio)
    value = gate.get("value") or {}
    out = {"rows": rows, "new_source_share": share, "units": units, "profile": profile, "ratio": ratio, "seed": seed,
           "logged": {k: info[k] for k in ("rows", "passed", "explore") if k in info},
           "command": "rta " + " ".join(argv), "exit_code": proc.returncode, "outcome": res.get("outcome"),
           "gate_line": human[-1] if human else proc.stderr[-2000:],
           "value_relative": value.get("relative"),
           "value_relative_ci": ([x / value["current"] for x in value["difference_ci"]]
                                 if value.get("current") and None not in value.get("difference_ci", [None]) else None),
           "truth_on_gate_window": judged, "seconds": round(time.perf_counter() - t0, 1), "workdir": str(tmp)}
    click.echo(json.dumps(out, indent=1, default=str))


def _free_port() -> int:
    from infra.stack import free_port

    return free_port()
