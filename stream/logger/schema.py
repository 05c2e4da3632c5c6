"""The logged-traffic layout: the one contract between `rta log` (writer) and its readers.

`rta log` writes, under its `--out` directory, Hive-style partitions by **event hour** (UTC):

    impressions/date=YYYY-MM-DD/hour=HH/<file>.parquet   one row per request (+ its decision)
    outcomes/date=YYYY-MM-DD/hour=HH/<file>.parquet      one row per observed funnel event

The date/hour of an impression is its request's `ts_ms`; of an outcome, the outcome's `ts_ms`.
Files are written under a temporary name, fsynced and renamed into place before the Kafka
offsets they hold are committed, so a reader sees only whole files; a crash between the rename
and the commit replays those offsets, so readers must drop duplicate `request_id`s
(impressions) and duplicate `(request_id, event)` pairs (outcomes). Among duplicate impressions
keep one whose `decision` is not null: after a crash a request can be read again while its
decision, already written and committed, is not, and the replayed copy then expires without one.

Impression columns (names here; dtypes in the comments):

* `request_id` (string), `ts_ms` (int64): the request's own;
* every feature of the request under its own name, typed as the bundles read it: a numeric
  feature as float64, a categorical one as string (integers as their decimals, as the worker
  reads them); a feature no bundle reads as float64 if numbers, string if strings come too.
  null = missing, or a value its column cannot hold (a boolean, object or array; counted as
  `rta_log_odd_inputs{what="feature_type"}`; a field holding only such values is not written).
  An integer beyond 2^53 in a float64 column is rounded (counted, `what="int_beyond_2^53"`).
  A feature name that collides with a reserved column below is refused by the logger (it
  cannot be told apart from a decision field); none of these ever drops the row;
* the decision: `DECISION_COLUMNS` plus `p_<task>` and `u_<task>` (float64) per task; all null
  for a request whose decision never came (the logger's join timeout, docs/operations.md);
* lineage: `kafka_partition` (int32), `kafka_offset` (int64) of the request message.

Outcome columns: `request_id` (string), `event` (string: a task name), `ts_ms` (int64).

This module holds names only (no pyarrow), so the serving image can import it.
"""

from __future__ import annotations

from datetime import UTC, datetime

from stream.features import DEFAULT_TASKS, RESERVED_COLUMNS

IMPRESSIONS_DIR = "impressions"
OUTCOMES_DIR = "outcomes"

# decision fields of an impression row, in file order (dtype in the comment)
DECISION_COLUMNS: tuple[str, ...] = (
    "decision",        # string: "pass" | "block" (null: no decision arrived, see the logger)
    "reason",          # string: uncertain | score | explore | invalid | degraded
    "score",           # float64: e = f(p)
    "uncertainty",     # float64: u of the uncertainty source task
    "threshold",       # float64: theta in force (full precision)
    "tau_u",           # float64: uncertainty threshold in force (full precision)
    "target_ratio",    # float64: r in force
    "propensity",      # float64: probability of the path taken (epsilon for explore)
    "model",           # string: bundle version
    "decision_ts_ms",  # int64: when the worker decided
    "latency_ms",      # float64
)
LINEAGE_COLUMNS: tuple[str, ...] = ("kafka_partition", "kafka_offset")
OUTCOME_COLUMNS: tuple[str, ...] = ("request_id", "event", "ts_ms")
# The latest event time an hour partition can name (9999-12-31T23:59:59.999Z): a later ts_ms
# (a producer sending microseconds, say) is malformed for the logger, not a crash.
MAX_LOG_TS_MS = 253_402_300_799_999


def task_columns(tasks: tuple[str, ...] = DEFAULT_TASKS) -> tuple[str, ...]:
    """`p_<task>` then `u_<task>` for every task, in task order."""
    return tuple(f"p_{t}" for t in tasks) + tuple(f"u_{t}" for t in tasks)


def reserved_columns(tasks: tuple[str, ...] = DEFAULT_TASKS) -> frozenset[str]:
    """Every column of an impression that is not a feature."""
    return (RESERVED_COLUMNS | set(DECISION_COLUMNS) | set(LINEAGE_COLUMNS)
            | set(task_columns(tasks)) | {"date", "hour"})


def partition_dir(ts_ms: int) -> str:
    """`date=YYYY-MM-DD/hour=HH` of an event time (UTC)."""
    t = datetime.fromtimestamp(ts_ms / 1000.0, tz=UTC)
    return f"date={t:%Y-%m-%d}/hour={t:%H}"
