"""Logged traffic in, arrays out: what the trainer, the evaluation and replay read.

DESIGN.md's log format: Parquet (one file or a directory of them) or JSONL, one row per
request. Reserved columns are `request_id`, `ts_ms`, the task labels (0/1), optional `passed`,
`propensity` and, for synthetic data, `true_<task>`. Every other column is a feature whose
dtype decides its kind: numbers (and booleans) numeric, strings / dictionaries categorical.

Logged traffic from the live system (`rta log`, the layout of `stream/logger/schema.py`:
`impressions/date=.../hour=.../*.parquet` + `outcomes/...`) is detected by its
`impressions/` directory. Its labels come from joining impressions and outcomes within a
per-task attribution window (`Attribution`), matured rows only: passed, window closed, an
outcome within it -> 1; passed, window closed, none -> 0; blocked, undecided, or window still
open (even if its outcome already came) -> unobserved, which is NaN in `LogSet.labels` (a
mask, never a silent 0). "As of" is the oldest outcome partition's newest outcome (bounded by
the newest impression and the wall clock); event times outside [0, wall clock + 10 min] are
ignored and counted (`info["counts"]["out_of_range_*"]`). The decision columns stay on the
LogSet (`decisions`) for replay. Duplicate request ids (an at-least-once logger replaying a
file's offsets) and duplicate (request_id, event) outcomes are dropped and counted.

Anything wrong with the input is a one-line `DataError` naming the file and the column.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from stream.errors import DataError
from stream.features import CATEGORICAL, DEFAULT_TASKS, NUMERIC, RESERVED_COLUMNS, FeatureSpec
from stream.logger.schema import (
    DECISION_COLUMNS,
    IMPRESSIONS_DIR,
    LINEAGE_COLUMNS,
    MAX_LOG_TS_MS,
    OUTCOME_COLUMNS,
    OUTCOMES_DIR,
    reserved_columns,
    task_columns,
)
from stream.logger.storage import RemoteFile, is_uri, join, kind_of, list_files, resolve

_PARQUET = (".parquet", ".pq")
_JSONL = (".jsonl", ".json", ".ndjson")


@dataclass(frozen=True)
class CatColumns:
    """Categorical columns as Parquet stores them: per column its few distinct words and one
    small int per row. Replay maps each column's words to codes once
    (`stream.codes.CategoryCodes.encode_dictionary`) and gathers, so no Python string is made
    per row; `decode` gives the object[N, n_cat] strings the trainer reads."""

    words: tuple[np.ndarray, ...]  # per column: object[K_j + 1] of str, the last one "" (missing)
    index: np.ndarray  # int32[n_cat, N]: row i of column j is words[j][index[j, i]]

    def __len__(self) -> int:
        return int(self.index.shape[1])

    def take(self, rows: np.ndarray) -> CatColumns:
        return CatColumns(self.words, np.ascontiguousarray(self.index[:, rows]))

    def decode(self) -> np.ndarray:
        """object[N, n_cat] of str ("" = missing); one str object per distinct word, shared."""
        out = np.empty((len(self), len(self.words)), dtype=object)
        for j, words in enumerate(self.words):
            out[:, j] = words[self.index[j]]
        return out


@dataclass
class LogSet:
    """One log set as arrays (rows aligned across every field).

    `cat` (object[N, n_cat] of str, "" = missing) may be given as a `CatColumns`: it is then
    decoded on first read, and `cat_columns` keeps the dictionary form for replay."""

    spec: FeatureSpec
    num: np.ndarray  # float32[N, n_num], NaN = missing
    cat: np.ndarray  # object[N, n_cat] of str, "" = missing (or a CatColumns, decoded lazily)
    labels: np.ndarray  # float32[N, T] of 0/1; NaN = unobserved (logged layout only)
    truth: np.ndarray | None  # float32[N, T] true probabilities (synthetic worlds only)
    request_id: np.ndarray  # object[N] of str
    ts_ms: np.ndarray  # int64[N]
    tasks: tuple[str, ...] = DEFAULT_TASKS
    source: str = ""
    # logged layout only: the decision columns per row (DECISION_COLUMNS, p_/u_<task>, lineage)
    decisions: pa.Table | None = None
    # logged layout only: what loading dropped, joined and masked (counts, windows, as-of)
    info: dict[str, Any] = field(default_factory=dict)
    # per-row loss weight of the observed labels (training.debias "ips"); None = all 1
    weights: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def cat_columns(self) -> CatColumns | None:
        """The categoricals' dictionary form when loaded from Parquet/JSONL (None: given as strings)."""
        return self._cat_columns

    def take(self, rows: np.ndarray) -> LogSet:
        cols = self._cat_columns
        cat = cols.take(_indices(rows)) if cols is not None else self.cat[rows]
        return replace(
            self, num=self.num[rows], cat=cat, labels=self.labels[rows],
            truth=None if self.truth is None else self.truth[rows],
            request_id=self.request_id[rows], ts_ms=self.ts_ms[rows],
            decisions=None if self.decisions is None else self.decisions.take(_indices(rows)),
            weights=None if self.weights is None else self.weights[rows],
        )

    def between(self, since_ms: int | None = None, until_ms: int | None = None) -> LogSet:
        """The rows with since_ms <= ts_ms < until_ms (either bound optional): a retraining
        window, and the newer window a promotion gate holds out."""
        if since_ms is None and until_ms is None:
            return self
        keep = np.ones(len(self), bool)
        if since_ms is not None:
            keep &= self.ts_ms >= since_ms
        if until_ms is not None:
            keep &= self.ts_ms < until_ms
        if not keep.any():
            window = " and ".join(w for w in (None if since_ms is None else f"ts_ms >= {since_ms}",
                                              None if until_ms is None else f"ts_ms < {until_ms}") if w)
            raise DataError(f"{self.source or 'logs'}: empty window: no rows with {window} "
                            f"(the log spans {int(self.ts_ms.min())} .. {int(self.ts_ms.max())})")
        return self if keep.all() else self.take(np.flatnonzero(keep))

    @property
    def masked(self) -> bool:
        """True when some label is unobserved (NaN): logged traffic, not a world log."""
        return bool(np.isnan(self.labels).any())

    def labelled(self) -> dict[str, int]:
        """Rows with an observed label, per task."""
        obs = ~np.isnan(self.labels)
        return {t: int(obs[:, j].sum()) for j, t in enumerate(self.tasks)}

    def observed(self) -> LogSet:
        """The rows whose every task label is observed (all rows of a world log)."""
        keep = ~np.isnan(self.labels).any(axis=1)
        return self if keep.all() else self.take(np.flatnonzero(keep))

    def fingerprint(self) -> str:
        """Digest of row count and request ids: tells whether two loads are the same traffic."""
        h = hashlib.sha256(str(len(self)).encode())
        h.update("\x1f".join(self.request_id.astype(str).tolist()).encode())
        return h.hexdigest()[:16]


def _get_cat(self: LogSet) -> np.ndarray:
    if self._cat is None:
        self._cat = self._cat_columns.decode()
    return self._cat


def _set_cat(self: LogSet, value: np.ndarray | CatColumns) -> None:
    if isinstance(value, CatColumns):
        self._cat, self._cat_columns = None, value
    else:
        self._cat, self._cat_columns = value, None


# after the dataclass is made (a property in the class body would become the field's default):
# the generated __init__ and `replace` go through the setter, so a CatColumns stays undecoded
LogSet.cat = property(_get_cat, _set_cat,  # type: ignore[assignment]
                      doc='object[N, n_cat] of str ("" = missing), decoded from `cat_columns` on first read')


def _indices(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows)
    return np.flatnonzero(rows) if rows.dtype == bool else rows


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
def _s3(location: str, call: Any) -> Any:
    """`call(location)` on an object store, its errors (endpoint, credentials, a path pyarrow
    refuses: ArrowInvalid is no OSError) as one line."""
    try:
        return call(location)
    except (OSError, pa.ArrowException) as exc:
        raise _storage_error(location, exc) from None


def _storage_error(location: str, exc: Exception) -> DataError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return DataError(f"{location}: cannot list ({first})")


def _check_bucket(fs: Any, path: str) -> None:
    bucket = path.split("/", 1)[0]
    if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
        raise OSError(f"no such bucket s3://{bucket}")


def _remote_files(location: str) -> list[RemoteFile]:
    """`_files` on an object store: the object, or the Parquet (else JSONL) objects under the prefix."""
    fs, root = resolve(location)
    info = _s3(location, lambda _: fs.get_file_info(root))
    if info.type == pafs.FileType.File:
        return [RemoteFile(root, fs, info.size)]
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"{location}: no such object or prefix")
    files = _s3(location, lambda loc: list_files(loc, recursive=False))[0]
    found = [f for f in files if f.suffix.lower() in _PARQUET] or [
        f for f in files if f.suffix.lower() in (".jsonl", ".ndjson")]
    if not found:
        raise DataError(f"{location}: no Parquet or JSONL objects under this prefix")
    return found


def _files(path: Path | str) -> list[Path] | list[RemoteFile]:
    if is_uri(path):
        return _remote_files(str(path))
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


def _read_parquet(file: Path | RemoteFile) -> pa.Table:
    """A Parquet file with its string columns (request ids aside) kept dictionary-encoded, as
    the file stores them: faster to read, and categoricals never become one str per row."""
    src, fs = (file.path, file.fs) if isinstance(file, RemoteFile) else (file, None)
    schema = pq.read_schema(src, filesystem=fs)
    words = [f.name for f in schema if f.name != "request_id"
             and (pa.types.is_string(f.type) or pa.types.is_large_string(f.type))]
    return pq.read_table(src, read_dictionary=words, filesystem=fs)


def _read(file: Path | RemoteFile) -> pa.Table:
    remote = isinstance(file, RemoteFile)
    if (file.size if remote else file.stat().st_size) == 0:
        raise DataError(f"{file}: empty file")
    try:
        if file.suffix.lower() in _JSONL:
            table = pa_json.read_json(file.fs.open_input_stream(file.path) if remote else file)
        else:
            table = _read_parquet(file)
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


def _lenient_kinds(tables: list[tuple[Path, pa.Table]], reserved: frozenset[str],
                   counts: dict[str, int]) -> dict[str, str]:
    """The logger's files, hour by hour, need not agree: a feature absent from a whole file, or
    all-missing in it (written as nulls of any type), is missing there; a feature that is a
    number in one file and a string in another is a string (as the logger's own concat does)."""
    kinds: dict[str, str | None] = {}
    for file, table in tables:
        for f in table.schema:
            if f.name in reserved:
                continue
            k = None if table.column(f.name).null_count == table.num_rows else _kind(f, file)
            old = kinds.get(f.name)
            if old is None:
                kinds[f.name] = k
            elif k is not None and k != old:
                kinds[f.name] = CATEGORICAL
                counts["kind_conflicts"] = counts.get("kind_conflicts", 0) + 1
    counts["files_missing_a_feature"] = sum(any(n not in t.schema.names for n in kinds) for _, t in tables)
    return {name: (k or NUMERIC) for name, k in kinds.items()}


def _feature_kinds(tables: list[tuple[Path, pa.Table]], tasks: tuple[str, ...],
                   reserved: frozenset[str] | None = None) -> dict[str, str]:
    """Feature name -> kind, checked to agree across files (else a schema-mismatch error)."""
    if reserved is None:
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
    """object[N] of str, nulls -> "" (one str object per distinct value, shared by reference)."""
    words, index = _dictionary(col.chunks)
    return words[index]


_DICT = pa.dictionary(pa.int32(), pa.string())


def _as_dictionary(chunk: pa.Array) -> pa.Array:
    """One chunk as dictionary<int32, string>: Parquet's own dictionary when it was read as one,
    else the strings (or numbers where other files have strings) encoded here."""
    if pa.types.is_null(chunk.type):
        return pa.DictionaryArray.from_arrays(pa.nulls(len(chunk), pa.int32()), pa.array([], pa.string()))
    if pa.types.is_dictionary(chunk.type):
        return chunk if chunk.type == _DICT else chunk.cast(_DICT)
    return pc.dictionary_encode(chunk.cast(pa.string()))


def _dictionary(chunks: list[pa.Array]) -> tuple[np.ndarray, np.ndarray]:
    """(words object[K + 1] of str whose last word is "", index int32[N]): a column's distinct
    values (nulls -> ""), one dictionary across its chunks, no Python object per row."""
    col = pa.chunked_array([_as_dictionary(c) for c in chunks], type=_DICT).unify_dictionaries()
    if col.num_chunks == 0:
        return np.array([""], dtype=object), np.zeros(0, np.int32)
    dictionary = col.chunk(0).dictionary
    k = len(dictionary)
    words = np.empty(k + 1, dtype=object)
    words[:k] = pc.fill_null(dictionary, "").to_numpy(zero_copy_only=False)
    words[k] = ""
    index = np.concatenate([pc.fill_null(c.indices, k).to_numpy(zero_copy_only=False) for c in col.chunks])
    return words, index.astype(np.int32, copy=False)


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


def _matrices(tables: list[tuple[Path, pa.Table]], spec: FeatureSpec) -> tuple[np.ndarray, CatColumns]:
    """The (num, cat) of `stream.features` (NaN / "" = missing), files concatenated; `cat` in
    its dictionary form (`CatColumns`), decoded only if someone reads `LogSet.cat`."""
    n_rows = sum(t.num_rows for _, t in tables)
    num = np.empty((len(spec.numeric), n_rows), np.float32)  # feature-major: contiguous writes, one transpose
    words, index = [], np.empty((len(spec.categorical), n_rows), np.int32)

    def column(table: pa.Table, c: str) -> pa.ChunkedArray:
        # a feature this file lacks is missing on its rows (lenient logged layouts only)
        return table.column(c) if c in table.schema.names else pa.chunked_array([pa.nulls(table.num_rows)])

    at = 0
    for _, table in tables:
        for j, c in enumerate(spec.numeric):
            num[j, at:at + table.num_rows] = _numeric(column(table, c))
        at += table.num_rows
    for j, c in enumerate(spec.categorical):
        w, index[j] = _dictionary([ch for _, table in tables for ch in column(table, c).chunks])
        words.append(w)
    return np.ascontiguousarray(num.T), CatColumns(tuple(words), index)


def load_logs(path: str | Path, tasks: tuple[str, ...] = DEFAULT_TASKS,
              attribution: Attribution | None = None) -> LogSet:
    """Read logged traffic (a Parquet/JSONL file, a directory of them, or the logged layout of
    `rta log`) into a LogSet; `attribution` applies to the logged layout only."""
    path = path if is_uri(path) else Path(path)
    tasks = tuple(tasks)
    if is_logged_layout(path):
        return load_logged(path, tasks, attribution)
    return _drop_out_of_range(_load_flat(path, tasks), (attribution or Attribution()).clock_ms())


def _drop_out_of_range(logs: LogSet, now_ms: int) -> LogSet:
    """A world log without the rows stamped outside [0, now + skew]: one such row would move
    every "newest row" window (retrain, the gate) past all real traffic."""
    bad = ~ts_in_range(logs.ts_ms, now_ms)
    if not bad.any():
        return logs
    if bad.all():
        raise DataError(f"{logs.source}: every row's ts_ms is outside [0, now + {FUTURE_SKEW_MS // 60_000} min]")
    kept = logs.take(np.flatnonzero(~bad))
    kept.info = {**logs.info, "counts": {"out_of_range_rows": int(bad.sum())}}
    return kept


def _load_flat(path: Path | str, tasks: tuple[str, ...]) -> LogSet:
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

    num, cat = _matrices(tables, spec)
    labels, truth, rid, ts = [], [], [], []
    for file, table in tables:
        n = table.num_rows
        labels.append(_labels(table, file, tasks))
        if has_truth:
            truth.append(np.stack([_numeric(table.column(f"true_{t}")) for t in tasks], axis=1))
        names = table.schema.names
        rid.append(_strings(table.column("request_id")) if "request_id" in names
                   else np.array([f"{file.stem}:{i}" for i in range(n)], dtype=object))
        ts.append(pc.cast(table.column("ts_ms"), pa.int64()).to_numpy(zero_copy_only=False)
                  if "ts_ms" in names else np.zeros(n, np.int64))
    return LogSet(
        spec=spec, num=num, cat=cat, labels=np.concatenate(labels),
        truth=np.concatenate(truth) if has_truth else None, request_id=np.concatenate(rid),
        ts_ms=np.concatenate(ts).astype(np.int64), tasks=tasks, source=str(path),
    )


# ---- the logged layout of `rta log` ---------------------------------------------------------
# Attribution windows: how long after a request its outcome still counts. An ad click comes in
# seconds to minutes, a deal within days; a task's label is only final once its window closed.
DEFAULT_WINDOWS_S: dict[str, float] = {"click": 900.0, "online": 3600.0, "cart": 86_400.0,
                                       "deal": 7 * 86_400.0}
_FALLBACK_WINDOW_S = 86_400.0  # a task outside the four defaults
# An event stamped later than the wall clock plus this is out of range (a producer's clock, a
# microsecond stamp, year 9999): ignored and counted, never the "newest" time of a log.
FUTURE_SKEW_MS = 10 * 60_000
ATTRIBUTION_ENV = "RTA_ATTRIBUTION"
_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86_400.0}
# contract dtypes of the decision columns (stream/logger/schema.py); anything castable is accepted
_DECISION_TYPES: dict[str, pa.DataType] = {
    "decision": pa.string(), "reason": pa.string(), "score": pa.float64(), "uncertainty": pa.float64(),
    "threshold": pa.float64(), "tau_u": pa.float64(), "target_ratio": pa.float64(),
    "propensity": pa.float64(), "model": pa.string(), "decision_ts_ms": pa.int64(),
    "latency_ms": pa.float64(),
}
assert tuple(_DECISION_TYPES) == DECISION_COLUMNS, "stream/logger/schema.py changed: update _DECISION_TYPES"


@dataclass(frozen=True)
class Attribution:
    """Per-task attribution windows (seconds) and the time labels are read "as of" (epoch ms;
    None = the newest event time in the log)."""

    windows_s: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_WINDOWS_S))
    as_of_ms: int | None = None
    now_ms: int | None = None  # the wall clock that bounds event times (None: time.time(); tests set it)

    def clock_ms(self) -> int:
        return int(time.time() * 1000) if self.now_ms is None else int(self.now_ms)

    def window(self, task: str) -> float:
        return float(self.windows_s.get(task, DEFAULT_WINDOWS_S.get(task, _FALLBACK_WINDOW_S)))

    @classmethod
    def parse(cls, text: str | None, as_of_ms: int | None = None) -> Attribution:
        """From "click=15m,deal=7d" (units s, m, h, d; plain numbers are seconds). Without text,
        $RTA_ATTRIBUTION in the same syntax, else the defaults: a deployment (or the demo, whose
        downstream runs faster than real time) sets its windows once for every verb that reads
        logs, including `rta retrain`, which has no flag for them."""
        windows = dict(DEFAULT_WINDOWS_S)
        if text is None:
            text = os.environ.get(ATTRIBUTION_ENV, "")
        for part in filter(None, (p.strip() for p in (text or "").split(","))):
            m = re.fullmatch(r"([A-Za-z_][\w-]*)\s*=\s*([0-9]*\.?[0-9]+)\s*([smhd]?)", part)
            if not m:
                raise DataError(f"attribution window {part!r}: expected TASK=DURATION, e.g. click=15m or deal=7d")
            windows[m.group(1)] = float(m.group(2)) * _UNITS[m.group(3)]
        return cls(windows, as_of_ms)


def ts_in_range(ts_ms: np.ndarray, now_ms: int | None = None) -> np.ndarray:
    """bool[N]: event times in [0, wall clock + FUTURE_SKEW_MS] (and within what a log partition
    can name); anything else is ignored (and counted) by every reader of "newest"."""
    now = int(time.time() * 1000) if now_ms is None else int(now_ms)
    ts = np.asarray(ts_ms, np.int64)
    return (ts >= 0) & (ts <= min(now + FUTURE_SKEW_MS, MAX_LOG_TS_MS))


def is_logged_layout(path: str | Path) -> bool:
    """A directory (or s3:// prefix) holding `impressions/` (what `rta log --out` writes)."""
    if is_uri(path):
        return _s3(str(join(path, IMPRESSIONS_DIR)), kind_of) == "dir"
    return (Path(path) / IMPRESSIONS_DIR).is_dir()


def newest_logged_ts_ms(location: str | Path, now_ms: int | None = None) -> int | None:
    """Newest in-range ts_ms at a log location (a path or s3://; a logged layout's impressions,
    else the Parquet files there), reading that column only; None when nothing is readable."""
    import pyarrow.dataset as ds

    # a storage error (credentials, endpoint, bucket) is its own one-line DataError, never "no
    # rows": only a missing location and files that are no Parquet with ts_ms mean "none here"
    root: Any = join(location, IMPRESSIONS_DIR) if is_logged_layout(location) else location
    fs, path = resolve(root)
    try:
        col = ds.dataset(path, filesystem=fs, format="parquet", exclude_invalid_files=True).to_table(
            columns=["ts_ms"])["ts_ms"]
    except (FileNotFoundError, pa.ArrowInvalid):  # nothing there, JSONL, odd files: callers ask for a window
        if is_uri(root):  # "not found" for a whole bucket is a setting, not an empty log
            _s3(str(root), lambda _: _check_bucket(fs, path))
        return None
    except (OSError, pa.ArrowException) as exc:
        raise _storage_error(str(root), exc) from None
    ts = col.drop_null().to_numpy().astype(np.int64)
    ts = ts[ts_in_range(ts, now_ms)]
    return None if len(ts) == 0 else int(ts.max())


def _layout_files(root: Path | str, counts: dict[str, int], what: str) -> list[Path] | list[RemoteFile]:
    """Parquet files under date=/hour= partitions (temporary/hidden names skipped); an hour
    directory without a file is counted, not an error. On S3 only completed uploads are objects."""
    if is_uri(root):
        found, dirs = _s3(str(root), list_files)
        files = [f for f in found if f.suffix == ".parquet" and not f.name.startswith((".", "_"))]
        hours = {f.parent for f in files}
        counts[f"{what}_empty_hours"] = sum(1 for d in dirs if re.search(r"/date=[^/]*/hour=[^/]*$", d)
                                            and d not in hours)
        return files
    if not root.is_dir():
        return []
    files = sorted(p for p in root.rglob("*.parquet") if p.is_file() and not p.name.startswith((".", "_")))
    hours = {p.parent for p in files}
    empty = [d for d in root.glob("date=*/hour=*") if d.is_dir() and d not in hours]
    counts[f"{what}_empty_hours"] = len(empty)
    return files


def _read_layout(files: list[Path], counts: dict[str, int], what: str) -> list[tuple[Path, pa.Table]]:
    out = []
    counts[f"{what}_empty_files"] = 0
    for file in files:
        try:
            table = _read_parquet(file)
        except (pa.ArrowInvalid, OSError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DataError(f"{file}: unreadable ({first})") from None
        if table.num_rows == 0:
            counts[f"{what}_empty_files"] += 1
            continue
        out.append((file, table))
    return out


def _column(table: pa.Table, file: Path, name: str, dtype: pa.DataType) -> pa.ChunkedArray:
    """A contract column cast to its dtype, or a one-line error naming the file and column."""
    if name not in table.schema.names:
        raise DataError(f"{file}: column {name!r} is missing (the logged layout needs it; see stream/logger/schema.py)")
    col = table.column(name)
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    if col.type == dtype:
        return col
    try:
        return pc.cast(col, dtype)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise DataError(f"{file}: column {name!r} is {col.type}, expected {dtype}") from None


def _first_rows(keys: list[pa.ChunkedArray | pa.Array], names: list[str],
                demote: np.ndarray | None = None) -> np.ndarray:
    """Sorted indices of the first row of every distinct key (pyarrow group-by, no Python loop);
    rows flagged in `demote` are kept only when their key has no other row."""
    n = len(keys[0])
    rank = np.arange(n, dtype=np.int64)
    if demote is not None:
        rank = rank + n * demote.astype(np.int64)
    t = pa.table({**dict(zip(names, keys, strict=True)), "__i": pa.array(rank)})
    first = t.group_by(names, use_threads=False).aggregate([("__i", "min")]).column("__i_min")
    return np.sort(first.to_numpy() % n)


def load_logged(path: str | Path, tasks: tuple[str, ...] = DEFAULT_TASKS,
                attribution: Attribution | None = None) -> LogSet:
    """Read `rta log`'s layout: deduplicated impressions, labels joined from outcomes."""
    path = path if is_uri(path) else Path(path)
    tasks = tuple(tasks)
    att = attribution or Attribution.parse(None)
    counts: dict[str, int] = {}
    imp_files = _layout_files(join(path, IMPRESSIONS_DIR), counts, "impression")
    if not imp_files:
        raise DataError(f"{join(path, IMPRESSIONS_DIR)}: no Parquet files (date=YYYY-MM-DD/hour=HH/*.parquet)")
    tables = _read_layout(imp_files, counts, "impression")
    if not tables:
        raise DataError(f"{join(path, IMPRESSIONS_DIR)}: every file is empty ({len(imp_files)} files, no rows)")
    decision_types = {**_DECISION_TYPES, **{c: pa.float64() for c in task_columns(tasks)}}
    contract = {"request_id": pa.string(), "ts_ms": pa.int64(), **decision_types}
    cols: dict[str, list[pa.ChunkedArray]] = {c: [] for c in contract}
    lineage = all(c in t.schema.names for _, t in tables for c in LINEAGE_COLUMNS)
    for c in LINEAGE_COLUMNS if lineage else ():
        cols[c] = []
    for file, table in tables:
        for name, dtype in contract.items():
            cols[name].append(_column(table, file, name, dtype))
        if lineage:
            cols["kafka_partition"].append(_column(table, file, "kafka_partition", pa.int32()))
            cols["kafka_offset"].append(_column(table, file, "kafka_offset", pa.int64()))
        rid = table.column("request_id")
        if rid.null_count:
            raise DataError(f"{file}: column 'request_id' has {rid.null_count} missing values")
    kinds = _lenient_kinds(tables, reserved_columns(tasks), counts)
    spec = FeatureSpec(tuple(n for n, k in kinds.items() if k == NUMERIC),
                       tuple(n for n, k in kinds.items() if k == CATEGORICAL))
    if not spec.names:
        raise DataError(f"{tables[0][0]}: no feature columns besides the reserved ones")
    merged = pa.table({c: pa.chunked_array([ch for part in parts for ch in part.chunks], type=parts[0].type)
                       for c, parts in cols.items()})
    num, cat = _matrices(tables, spec)
    counts["impression_rows_read"] = merged.num_rows

    # at-least-once: the first copy of every request id stays, preferring one with a decision (a
    # request read again after a crash may expire undecided while its decision was logged before)
    keep = _first_rows([merged.column("request_id")], ["request_id"],
                       demote=pc.is_null(merged.column("decision")).to_numpy(zero_copy_only=False))
    counts["duplicate_impressions"] = merged.num_rows - len(keep)
    if len(keep) < merged.num_rows:
        merged, num, cat = merged.take(pa.array(keep)), num[keep], cat.take(keep)
    now_ms = att.clock_ms()
    in_range = ts_in_range(merged.column("ts_ms").to_numpy().astype(np.int64), now_ms)
    counts["out_of_range_impressions"] = int((~in_range).sum())
    if not in_range.any():
        raise DataError(f"{join(path, IMPRESSIONS_DIR)}: every row's ts_ms is outside [0, now + "
                        f"{FUTURE_SKEW_MS // 60_000} min] (clock {now_ms})")
    if not in_range.all():  # ignored (counted): one such row would be every window's "newest"
        at = np.flatnonzero(in_range)
        merged, num, cat = merged.take(pa.array(at)), num[at], cat.take(at)
    n = merged.num_rows
    rid = merged.column("request_id")
    ts = merged.column("ts_ms").to_numpy().astype(np.int64)
    decision = merged.column("decision")
    passed = pc.fill_null(pc.equal(decision, "pass"), False).to_numpy(zero_copy_only=False)
    blocked = pc.fill_null(pc.equal(decision, "block"), False).to_numpy(zero_copy_only=False)
    counts["undecided"] = int(decision.null_count)
    counts["unknown_decisions"] = int(n - passed.sum() - blocked.sum() - decision.null_count)

    # outcomes: deduplicated (request_id, event), earliest time kept
    out_tables = _read_layout(_layout_files(join(path, OUTCOMES_DIR), counts, "outcome"), counts, "outcome")
    o_rid, o_event, o_ts, o_part = [], [], [], []
    for file, table in out_tables:
        o_rid.append(_column(table, file, OUTCOME_COLUMNS[0], pa.string()))
        o_event.append(_column(table, file, OUTCOME_COLUMNS[1], pa.string()))
        o_ts.append(_column(table, file, OUTCOME_COLUMNS[2], pa.int64()))
        # the outcome's own Kafka partition when the logger records it (else its request's, below)
        o_part.append(_column(table, file, "kafka_partition", pa.int32()) if "kafka_partition" in table.schema.names
                      else pa.chunked_array([pa.nulls(table.num_rows, pa.int32())]))
    first_ts = np.full((n, len(tasks)), -1, dtype=np.int64)  # earliest outcome per (row, task); -1: none
    newest = int(ts.max())
    newest_outcome: int | None = None
    outcome_clock: dict[str, int] = {}
    counts.update(outcome_rows_read=0, duplicate_outcomes=0, orphan_outcomes=0, unknown_events=0,
                  outcomes_for_blocked=0, outcomes_before_request=0, out_of_range_outcomes=0)
    if o_rid:
        outcomes = pa.table({"request_id": pa.chunked_array([c for a in o_rid for c in a.chunks], pa.string()),
                             "event": pa.chunked_array([c for a in o_event for c in a.chunks], pa.string()),
                             "ts_ms": pa.chunked_array([c for a in o_ts for c in a.chunks], pa.int64()),
                             "part": pa.chunked_array([c for a in o_part for c in a.chunks], pa.int32())})
        outcomes = outcomes.filter(pc.and_(pc.is_valid(outcomes["request_id"]), pc.is_valid(outcomes["event"])))
        counts["outcome_rows_read"] = outcomes.num_rows
        o_ok = ts_in_range(pc.fill_null(outcomes["ts_ms"], -1).to_numpy(), now_ms)
        counts["out_of_range_outcomes"] = int((~o_ok).sum())
        outcomes = outcomes.filter(pa.array(o_ok))
        agg = outcomes.group_by(["request_id", "event"], use_threads=False).aggregate([("ts_ms", "min")])
        counts["duplicate_outcomes"] = outcomes.num_rows - agg.num_rows
        if agg.num_rows:
            newest_outcome, outcome_clock = _outcome_clock(outcomes, rid, merged)
        pos = pc.index_in(agg["request_id"], value_set=rid.combine_chunks())
        task_of = pc.index_in(agg["event"], value_set=pa.array(list(tasks), pa.string()))
        counts["orphan_outcomes"] = int(pos.null_count)
        counts["unknown_events"] = int(pc.sum(pc.and_(pc.is_valid(pos), pc.is_null(task_of))).as_py() or 0)
        ok = pc.and_(pc.is_valid(pos), pc.is_valid(task_of)).to_numpy(zero_copy_only=False)
        rows = pos.to_numpy(zero_copy_only=False)[ok].astype(np.int64)
        cols_t = task_of.to_numpy(zero_copy_only=False)[ok].astype(np.int64)
        first_ts[rows, cols_t] = agg["ts_ms_min"].to_numpy()[ok]
        counts["outcomes_for_blocked"] = int((~passed[rows]).sum())
        counts["outcomes_before_request"] = int((first_ts[rows, cols_t] < ts[rows]).sum())

    # the join's rule, per task. "As of" defaults to the time every stream is logged up to: the
    # outcome files lag the impressions (they roll on their own), and each outcome partition is
    # consumed at its own pace, so it is the OLDEST of the partitions' newest outcomes (a window
    # declared closed past what a lagging partition has logged would turn its late outcomes into
    # 0s), never past the wall clock. Outcomes after the as-of time do not count (what was known
    # then, for a backtest with --as-of-ms).
    if att.as_of_ms is not None:
        as_of, as_of_source = int(att.as_of_ms), "given"
    elif newest_outcome is None:
        as_of, as_of_source = min(newest, now_ms), "newest impression (no outcomes)"
    else:
        as_of = min(newest, newest_outcome, now_ms)
        as_of_source = ("newest impression" if as_of == newest else "wall clock" if as_of == now_ms
                        else "oldest outcome partition's newest outcome")
    labels = np.full((n, len(tasks)), np.nan, dtype=np.float32)
    windows, matured = {}, {}
    n_passed = int(passed.sum())
    for j, t in enumerate(tasks):
        w_ms = att.window(t) * 1000.0
        windows[t] = att.window(t)
        has = first_ts[:, j] >= 0
        hit = has & (first_ts[:, j] - ts <= w_ms) & (first_ts[:, j] <= as_of)
        closed = (as_of - ts) >= w_ms
        # matured rows only: a row whose window is still open is unobserved whether or not its
        # outcome has come (labelling early arrivals 1 and the rest "unknown" makes recent
        # labels positives-only)
        labels[:, j] = np.where(passed & closed, hit.astype(np.float32), np.nan)
        done = int((passed & closed).sum())
        matured[t] = {"passed": n_passed, "matured": done, "share": done / n_passed if n_passed else 0.0,
                      "positives": int((passed & closed & hit).sum()),
                      "early_positives_unobserved": int((passed & ~closed & hit).sum())}
    obs = ~np.isnan(labels)
    counts["window_open"] = {t: int((passed & ~obs[:, j]).sum()) for j, t in enumerate(tasks)}
    info = {"layout": "logged", "rows": n, "counts": counts, "attribution_windows_s": windows,
            "as_of_ms": as_of, "as_of_source": as_of_source, "clock_ms": now_ms, "outcome_clock": outcome_clock,
            "passed": n_passed, "blocked": int(blocked.sum()), "matured": matured,
            "labelled": {t: int(obs[:, j].sum()) for j, t in enumerate(tasks)},
            "positives": {t: int(np.nansum(labels[:, j])) for j, t in enumerate(tasks)}}
    return LogSet(spec=spec, num=num, cat=cat, labels=labels, truth=None,
                  request_id=_strings(rid), ts_ms=ts, tasks=tasks, source=str(path),
                  decisions=merged.drop_columns(["request_id", "ts_ms"]), info=info)


def _outcome_clock(outcomes: pa.Table, rid: pa.ChunkedArray, merged: pa.Table) -> tuple[int, dict[str, int]]:
    """(the oldest of the outcome partitions' newest outcomes, {partition: its newest}). An
    outcome's partition is its own `kafka_partition` when logged, else its request's (requests
    and outcomes share the request id as key, so one partition number); without either, all
    outcomes are one partition."""
    part = outcomes["part"].combine_chunks()
    if part.null_count and "kafka_partition" in merged.schema.names:
        pos = pc.index_in(outcomes["request_id"], value_set=rid.combine_chunks())
        of_request = pc.take(merged.column("kafka_partition").combine_chunks(), pos)
        part = pc.coalesce(part, of_request)
    t = pa.table({"part": part, "ts_ms": outcomes["ts_ms"]}).filter(pc.is_valid(part))
    if t.num_rows == 0:
        newest = int(pc.max(outcomes["ts_ms"]).as_py())
        return newest, {"all": newest}
    g = t.group_by("part", use_threads=False).aggregate([("ts_ms", "max")])
    clock = {str(p): int(v) for p, v in zip(g["part"].to_pylist(), g["ts_ms_max"].to_pylist(), strict=True)}
    return min(clock.values()), clock


def describe_labels(logs: LogSet) -> str:
    """One line: how many rows carry an observed label per task (what train/eval used)."""
    lab = logs.labelled()
    per = ", ".join(f"{t} {lab[t]}" for t in logs.tasks)
    if not logs.masked:
        return f"labels observed on all {len(logs)} rows"
    return (f"labels observed only where the outcome could be seen (passed, window closed): "
            f"{per} of {len(logs)} rows")
