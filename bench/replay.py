"""`rta bench replay`: rows/s of `rta replay` end to end on a logged layout.

Builds (unless given `--model`/`--logs`) a 200k-row world log whose event time runs at
`--rows-per-s`, a 108-feature student bundle with untrained but spread weights (the serving
cost of the worker benchmark's bundle; replay's cost does not depend on how well the model was
trained), and the logged layout the live system would have written for it
(`training.offline_log`: r = 0.3, p_u = 0.02, epsilon = 0.05). Then times `training.replay.replay`
— load + label join, score, decide, write decisions.parquet and the report — in both modes:
`--thresholds logged` and live targets (replay's own controller on event time), each with the
report's PNGs and without them (`rta replay --no-plots`). Prints one JSON object: rows/s per
mode end to end (and of load + score + decide alone), the time of each phase, the process's CPU
seconds (every thread's), and the ratio to the 100k rows/s goal. `--quantize int8` serves the
generated bundle's int8 graph when the export's parity gate keeps it (`serving` says which).
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

GOAL_ROWS_PER_S = 100_000


def _fixture(tmp: Path, rows: int, rows_per_s: float, seed: int,
             quantize: str | None = None) -> tuple[Path, Path, dict[str, Any]]:
    from bench.worker import _bundle
    from training.logs import load_logs
    from training.offline_log import make_logged_layout
    from training.replay import Step
    from training.world import WorldConfig, write

    world_dir = tmp / "world"
    write(world_dir, rows, seed=seed, config=replace(WorldConfig(), span_days=rows / rows_per_s / 86_400.0),
          progress=False)
    world = load_logs(world_dir)
    bundle = _bundle(tmp / "models", world.spec, world.num[:20_000], world.cat[:20_000], quantize)
    info = make_logged_layout(bundle, world, tmp / "log", Step(0.3, 0.02, 0.05), seed=seed)
    return bundle, tmp / "log", info


def _time(model: Path, logs: Path, out: Path, cfg: Any, threads: int, attribution: Any,
          plots: bool = True) -> dict[str, Any]:
    from training.replay import replay

    cpu0, t0 = time.process_time(), time.perf_counter()
    report = replay(model, logs, out, cfg, attribution=attribution, threads=threads, plots=plots)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    run = report["runs"][0]
    out_d = {"rows": report["rows"], "seconds": round(wall, 3), "rows_per_s": round(report["rows"] / wall),
             "cpu_s": round(cpu, 3),
             "phases_s": {k: v for k, v in report["timing"].items() if k.endswith("_s") and k != "rows_per_s"}}
    engine_s = sum(report["timing"][k] for k in ("load_s", "score_s", "decide_s"))
    out_d["engine_rows_per_s"] = round(report["rows"] / max(engine_s, 1e-9))  # load + score + decide
    if "match" in run:
        out_d["decision_and_reason_match"] = run["match"]["decision_and_reason_match"]
    if run.get("max_settled_error_pp") is not None:
        out_d["max_settled_error_pp"] = round(run["max_settled_error_pp"], 4)
    return out_d


@click.command(name="replay")
@click.option("--rows", type=click.IntRange(min=10_000), default=200_000, show_default=True)
@click.option("--rows-per-s", type=click.FloatRange(min=1), default=1000.0, show_default=True,
              help="Event-time density of the generated log.")
@click.option("--model", type=click.Path(exists=True, path_type=Path), default=None,
              help="Bundle to replay with (with --logs); default: a generated one.")
@click.option("--logs", "logs_path", type=click.Path(exists=True, path_type=Path), default=None,
              help="Logged layout to replay (with --model); default: generated.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True, help="onnxruntime threads.")
@click.option("--quantize", type=click.Choice(["int8"]), default=None,
              help="Generated bundle: serve its int8 graph if the export's parity gate keeps it.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also write the JSON here.")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="ray: also time both modes with `--engine ray` (no plots) in the same run: rows/s, "
                   "scoring rows/s per worker process, Ray's start/stop, the ratio to local.")
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True,
              help="Scoring actors with --engine ray.")
def replay(rows: int, rows_per_s: float, model: Path | None, logs_path: Path | None, threads: int,
           quantize: str | None, seed: int, out: Path | None, engine: str = "local", workers: int = 2) -> None:
    """Time `rta replay` (logged thresholds, and live targets; with and without plots) end to
    end; JSON out."""
    from model.bundle import read_manifest, resolve_bundle
    from training.logs import Attribution
    from training.replay import ReplayConfig, Step

    if (model is None) != (logs_path is None):
        raise click.UsageError("give --model and --logs together (or neither: both are generated)")
    with tempfile.TemporaryDirectory(prefix="rta-bench-replay-") as tmp_s:
        tmp = Path(tmp_s)
        made: dict[str, Any] = {}
        t0 = time.perf_counter()
        if model is None:
            model, logs_path, made = _fixture(tmp, rows, rows_per_s, seed, quantize)
        setup_s = time.perf_counter() - t0
        serving = read_manifest(resolve_bundle(model)).get("serving", {})
        # the generated log is complete: read its labels as of long after its last outcome
        att = Attribution(as_of_ms=made["newest_event_ms"] + 30 * 86_400_000) if made else None
        result: dict[str, Any] = {
            "bench": "replay", "goal_rows_per_s": GOAL_ROWS_PER_S, "threads": threads,
            "log": str(logs_path) if not made else {"generated": made, "rows_per_s_event_time": rows_per_s},
            "setup_s": round(setup_s, 1),
            "serving": {k: serving[k] for k in ("weights", "quantization") if k in serving},
        }
        # live: explore draws of another seed than the log's own (`make_logged_layout` used `seed`),
        # else replay explores exactly the logged explore rows and the OPE degenerates to [1, 1]
        modes = {"logged": ReplayConfig(thresholds="logged"),
                 "live": ReplayConfig(steps=[Step(0.5, 0.02, 0.05)], seed=seed + 1)}
        # with plots first: the first of them pays matplotlib's import, as one `rta replay` does
        for plots, suffix in ((True, ""), (False, "_no_plots")):
            for mode, cfg in modes.items():
                result[mode + suffix] = _time(model, logs_path, tmp / f"out-{mode}{suffix}", cfg, threads, att, plots)
        for mode, cfg in modes.items() if engine == "ray" else ():
            ray_cfg = dataclasses.replace(cfg, engine="ray", workers=workers)
            r = _time(model, logs_path, tmp / f"out-{mode}-ray", ray_cfg, threads, att, plots=False)
            local = result[mode + "_no_plots"]
            r["workers"] = workers
            r["score_rows_per_s_per_worker"] = round(r["rows"] / r["phases_s"]["score_s"] / workers)
            r["local_score_rows_per_s"] = round(local["rows"] / local["phases_s"]["score_s"])
            r["vs_local_end_to_end"] = round(r["rows_per_s"] / local["rows_per_s"], 3)
            result[mode + "_ray"] = r
    for mode in ("logged", "live", "logged_no_plots", "live_no_plots"):
        result[f"{mode}_vs_goal"] = round(result[mode]["rows_per_s"] / GOAL_ROWS_PER_S, 3)
    text = json.dumps(result, indent=1)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "replay.json").write_text(text + "\n")
    click.echo(text)
