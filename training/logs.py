"""Logged traffic in, arrays out: what the trainer, the evaluation and replay read.

DESIGN.md's log format: Parquet (one file or a directory of them) or JSONL, one row per
request. Reserved columns are `request_id`, `ts_ms`, the task labels (0/1), optional `passed`,
`propensity` and, for synthetic data, `true_<task>`. Every other column is a feature whose
dtype decides its kind: numbers (and booleans) numeric, strings / dictionaries categorical.

Anything wrong with the input is a one-line `DataError` naming the file and the column.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from stream.errors import DataError
from stream.features import CATEGORICAL, DEFAULT_TASKS, NUMERIC, RESERVED_COLUMNS, FeatureSpec

_PARQUET = (".parquet", ".pq")
_JSONL = (".jsonl", ".json", ".ndjson")


@dataclass
class LogSet:
    """One log set as arrays (rows aligned across every field)."""

    spec: FeatureSpec
    num: np.ndarray  # float32[N, n_num], NaN = missing
    cat: np.ndarray  # object[N, n_cat] of str, "" = missing
    labels: np.ndarray  # float32[N, T] of 0/1
    truth: np.ndarray | None  # float32[N, T] true probabilities (synthetic worlds only)
    request_id: np.ndarray  # object[N] of str
    ts_ms: np.ndarray  # int64[N]
    tasks: tuple[str, ...] = DEFAULT_TASKS
    source: str = ""

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def take(self, rows: np.ndarray) -> LogSet:
        return replace(
            self, num=self.num[rows], cat=self.cat[rows], labels=self.labels[rows],
            truth=None if self.truth is None else self.truth[rows],
            request_id=self.request_id[rows], ts_ms=self.ts_ms[rows],
        )

    def fingerprint(self) -> str:
        """Digest of row count and request ids: tells whether two loads are the same traffic."""
        h = hashlib.sha256(str(len(self)).encode())
        h.update("\x1f".join(self.request_id.astype(str).tolist()).encode())
        return h.hexdigest()[:16]


def split(logs: LogSet, test_fraction: float = 0.2, seed: int = 0) -> tuple[LogSet, LogSet]:
    """Random train/test split (the paper's 80/20), reproducible from the seed."""
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test fraction must be in (0, 1), got {test_fraction}")
    n = len(logs)
    n_test = int(round(n * test_fraction))
    if n_test < 1 or n - n_test < 1:
        raise DataError(f"{logs.source or 'logs'}: {n} rows are too few to split {test_fraction:.0%} off")
    order = np.random.default_rng(seed).permutation(n)
    return logs.take(np.sort(order[n_test:])), logs.take(np.sort(order[:n_test]))


# ---- reading ------------------------------------------------------------------------------
def _files(path: Path) -> list[Path]:
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if path.is_file():
        return [path]
    # Parquet parts if there are any, else JSON-lines files (world.json etc. are metadata).
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in _PARQUET)
    files = files or sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in (".jsonl", ".ndjson"))
    if not files:
        raise DataError(f"{path}: no Parquet or JSONL files in this directory")
    return files


def _read(file: Path) -> pa.Table:
    if file.stat().st_size == 0:
        raise DataError(f"{file}: empty file")
    try:
        table = pa_json.read_json(file) if file.suffix.lower() in _JSONL else pq.read_table(file)
    except (pa.ArrowInvalid, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{file}: unreadable ({first})") from None
    if table.num_rows == 0:
        raise DataError(f"{file}: no rows")
    return table


def _kind(field: pa.Field, file: Path) -> str | None:
    """Feature kind from the column's dtype; None for an all-null JSON column (either kind)."""
    t = field.type.value_type if pa.types.is_dictionary(field.type) else field.type
    if pa.types.is_null(t):
        return None
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return CATEGORICAL
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t):
        return NUMERIC
    raise DataError(f"{file}: column {field.name!r} has type {field.type}, neither numeric nor categorical")


def _feature_kinds(tables: list[tuple[Path, pa.Table]], tasks: tuple[str, ...]) -> dict[str, str]:
    """Feature name -> kind, checked to agree across files (else a schema-mismatch error)."""
    reserved = RESERVED_COLUMNS | set(tasks) | {f"true_{t}" for t in tasks}
    first_file, first = tables[0]
    kinds: dict[str, str | None] = {
        f.name: _kind(f, first_file) for f in first.schema if f.name not in reserved
    }
    for file, table in tables[1:]:
        names = set(table.schema.names)
        for name in kinds:
            if name not in names:
                raise DataError(f"schema mismatch: {file} lacks column {name!r} (present in {first_file})")
        for f in table.schema:
            if f.name in reserved:
                continue
            if f.name not in kinds:
                raise DataError(f"schema mismatch: {file} has column {f.name!r} not in {first_file}")
            k = _kind(f, file)
            if kinds[f.name] is None:
                kinds[f.name] = k
            elif k is not None and k != kinds[f.name]:
                raise DataError(f"schema mismatch: column {f.name!r} is {k} in {file} but "
                                f"{kinds[f.name]} in {first_file}")
    return {name: (k or NUMERIC) for name, k in kinds.items()}


def _numeric(col: pa.ChunkedArray) -> np.ndarray:
    if pa.types.is_null(col.type):
        return np.full(len(col), np.nan, np.float32)
    col = pc.cast(col, pa.float32())
    return pc.fill_null(col, np.nan).to_numpy().astype(np.float32, copy=False)


def _strings(col: pa.ChunkedArray) -> np.ndarray:
    """object[N] of str, nulls -> "" ; dictionary columns are decoded per chunk (no per-row loop)."""
    if pa.types.is_null(col.type):
        return np.full(len(col), "", dtype=object)
    parts = []
    for chunk in col.chunks:
        if pa.types.is_dictionary(chunk.type):
            words = pc.fill_null(chunk.dictionary.cast(pa.string()), "").to_numpy(zero_copy_only=False)
            codes = pc.fill_null(chunk.indices, -1).to_numpy(zero_copy_only=False)
            parts.append(np.append(words, "").astype(object)[codes])  # -1 (null) -> ""
        else:
            parts.append(pc.fill_null(chunk.cast(pa.string()), "").to_numpy(zero_copy_only=False))
    return np.concatenate(parts).astype(object, copy=False) if parts else np.empty(0, object)


def _labels(table: pa.Table, file: Path, tasks: tuple[str, ...]) -> np.ndarray:
    cols = []
    for t in tasks:
        col = table.column(t)
        if col.null_count:
            raise DataError(f"{file}: label column {t!r} has {col.null_count} missing values")
        try:
            v = pc.cast(col, pa.float32()).to_numpy()
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise DataError(f"{file}: label column {t!r} is {col.type}, expected 0/1") from None
        if not np.isin(v, (0.0, 1.0)).all():
            raise DataError(f"{file}: label column {t!r} has values other than 0/1")
        cols.append(v)
    return np.stack(cols, axis=1).astype(np.float32)


def load_logs(path: str | Path, tasks: tuple[str, ...] = DEFAULT_TASKS) -> LogSet:
    """Read logged traffic (a Parquet/JSONL file or a directory of them) into a LogSet."""
    path = Path(path)
    tasks = tuple(tasks)
    tables = [(f, _read(f)) for f in _files(path)]
    for file, table in tables:
        present = [t for t in tasks if t in table.schema.names]
        if not present:
            raise DataError(f"{file}: no label columns (expected {', '.join(tasks)})")
        if len(present) < len(tasks):
            missing = next(t for t in tasks if t not in present)
            raise DataError(f"{file}: label column {missing!r} is missing")
    kinds = _feature_kinds(tables, tasks)
    spec = FeatureSpec(tuple(n for n, k in kinds.items() if k == NUMERIC),
                       tuple(n for n, k in kinds.items() if k == CATEGORICAL))
    if not spec.names:
        raise DataError(f"{tables[0][0]}: no feature columns besides the reserved ones")
    has_truth = all(f"true_{t}" in table.schema.names for _, table in tables for t in tasks)

    num, cat, labels, truth, rid, ts = [], [], [], [], [], []
    for file, table in tables:
        n = table.num_rows
        num.append(np.stack([_numeric(table.column(c)) for c in spec.numeric], axis=1)
                   if spec.numeric else np.zeros((n, 0), np.float32))
        cat.append(np.stack([_strings(table.column(c)) for c in spec.categorical], axis=1)
                   if spec.categorical else np.zeros((n, 0), object))
        labels.append(_labels(table, file, tasks))
        if has_truth:
            truth.append(np.stack([_numeric(table.column(f"true_{t}")) for t in tasks], axis=1))
        names = table.schema.names
        rid.append(_strings(table.column("request_id")) if "request_id" in names
                   else np.array([f"{file.stem}:{i}" for i in range(n)], dtype=object))
        ts.append(pc.cast(table.column("ts_ms"), pa.int64()).to_numpy(zero_copy_only=False)
                  if "ts_ms" in names else np.zeros(n, np.int64))
    return LogSet(
        spec=spec, num=np.concatenate(num), cat=np.concatenate(cat), labels=np.concatenate(labels),
        truth=np.concatenate(truth) if has_truth else None, request_id=np.concatenate(rid),
        ts_ms=np.concatenate(ts).astype(np.int64), tasks=tasks, source=str(path),
    )
