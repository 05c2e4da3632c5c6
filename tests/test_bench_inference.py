"""`rta bench inference`: one JSON object with the per-batch timings and ratios it promises."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def _bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "infra.cli", "bench", "inference", *args],
                          capture_output=True, text=True, timeout=300)


def check_result(result: dict, batches: list[int]) -> None:
    """Every batch size timed on all four paths; the ratios are the quotients of those times."""
    assert sorted(int(b) for b in result["batches"]) == batches
    for row in result["batches"].values():
        t, tp, s, f = (row[k] for k in ("teacher_ms", "teacher_presampled_ms", "student_ms",
                                        "student_preprocessing_ms"))
        assert min(t, tp, s, f) > 0
        assert abs(row["ratio"] - t / s) <= 0.051 + 1e-3 * t / s
        assert abs(row["ratio_presampled"] - tp / s) <= 0.051 + 1e-3 * tp / s
        assert abs(row["ratio_presampled_ceiling"] - tp / f) <= 0.051 + 1e-3 * tp / f


def test_untrained_profile_architectures(tmp_path: Path):
    out = tmp_path / "bench.json"
    res = _bench("--profile", "tiny", "--batches", "1,32", "--repeats", "2", "--samples", "3",
                 "--out", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads(res.stdout)
    assert json.loads(out.read_text()) == result
    assert result["mode"] == "untrained tiny-profile architectures" and result["threads"] == 1
    check_result(result, [1, 32])


def test_bad_arguments_get_one_line(tmp_path: Path):
    for args, needle in ((["--profile", "nope"], "unknown profile 'nope'"),
                         (["--model", str(tmp_path / "missing")], "does not exist"),
                         (["--model", str(tmp_path), "--profile", "demo"], "cannot be combined"),
                         (["--batches", "0,512"], "batch sizes must be >= 1")):
        res = _bench(*args)
        assert res.returncode == 2 and needle in res.stderr, (args, res.stderr)
        assert res.stderr.startswith("rta: ") and res.stderr.strip().count("\n") == 0, res.stderr
