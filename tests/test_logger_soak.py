"""The logger soak, scaled down (`rta bench soak --logger` runs the full one; docs/benchmarks.md)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_logger_soak_stall_kill_9_and_odd_inputs_lose_no_decision(settings, tmp_path: Path):
    """Issue 27's acceptance, small: a worker SIGSTOPped mid-stream, the logger kill -9'd twice,
    21 requests stamped ahead (one in year 9999), 100 with a 64-bit integer, 100 with
    `"gdpr": true` -> every request exactly once after the production reader's dedup, with the
    worker's decision; every outcome logged; the counters name every odd input.

    On a broker and Redis of its own, as `rta bench soak --logger` runs: the session's broker has
    served hundreds of tests by the time this one runs, and what this test asks of the logger
    (every row, whatever the stall) must not depend on what ran before it."""
    from bench.logsoak import LoggerSoakConfig, run_logger_soak
    from bench.soak import owned_stack

    # --idle-s 2, shorter than the stall: a partition paused through it must not count as idle on
    # resume (a full run dropped 8,367 decisions so; the codec test pins the at-end check down)
    cfg = LoggerSoakConfig(requests=8000, rate=1000, stall_s=10.0, logger_kills=2,
                           partitions=settings.partitions, max_buffered=3000, timeout_s=300, idle_s=2.0)
    with owned_stack(tmp_path / "stack") as (bootstrap, redis_url, _):
        own = replace(settings, kafka_bootstrap=bootstrap, redis_url=redis_url)
        out = run_logger_soak(cfg, own, tmp_path / "soak")
    assert out["missing"] == out["unexpected"] == out["without_decision"] == 0, out
    assert out["logged_after_dedup"] == 8000 and out["decision_differs_from_worker"] == 0, out
    assert not out["null_decision_fields"] and out["outcomes_logged"] == out["outcomes_published"] > 0, out
    assert out["odd_inputs_all_named"] and out["odd_logged"] == {"ahead": 20, "big_int": 100, "gdpr": 100,
                                                                 "year_9999": 1}, out
    assert out["exit_codes"] == {"logger": 0, "worker": 0} and out["logger_processes"] == 3, out
    assert out["ok"]
