"""Codecs of the logger: raw request / decision / outcome values of one partition -> Arrow rows.

Spec-free: a request's features are kept under their own names (numbers float64, strings
string, null = missing), so one logger serves every model. A clean batch is parsed in one
pyarrow JSON call; a batch holding anything unusual goes message by message (orjson), where
each bad message costs only itself. Both paths give the same rows (tests/test_logger_codec.py).
Imported by the logger only: the worker never loads pyarrow.
"""

from __future__ import annotations

import io
from collections import Counter as Tally
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pajson

from stream.events import DECISIONS, MAX_BYTES, decode_decision, decode_outcome
from stream.features import CATEGORICAL, NUMERIC
from stream.logger.schema import DECISION_COLUMNS, MAX_LOG_TS_MS
from stream.policy import REASONS

_STRING_FIELDS = ("decision", "reason", "model")

# --------------------------------------------------------------------------- decoding


# Causes of odd feature values (`rta_log_odd_values{what}`): the row is kept, the value is not
# (or not exactly), and the count says so.
ODD_TYPE = "feature_type"  # boolean / object / array, or a kind its column cannot hold -> null
ODD_BIG_INT = "int_beyond_2^53"  # an integer a float64 cannot hold exactly (logged rounded)
_EXACT_INT = 2**53


def _big_ints(values: list[Any]) -> int:
    return sum(1 for v in values if type(v) is int and not -_EXACT_INT <= v <= _EXACT_INT)


def _arrow_big_ints(arr: pa.Array) -> int:
    if not pa.types.is_integer(arr.type) or not len(arr) or arr.null_count == len(arr):
        return 0
    lo, hi = pc.min_max(arr).values()
    if lo.as_py() >= -_EXACT_INT and hi.as_py() <= _EXACT_INT:
        return 0
    return int(pc.sum(pc.greater(pc.abs(arr), _EXACT_INT)).as_py() or 0)


def _feature_array(values: np.ndarray, kind: str | None, odd: Tally) -> pa.Array:
    """One feature column (object values of one batch) -> float64 or string. Never drops a row.

    `kind` is what the bundles say the feature is (None: no bundle reads it). Numeric: numbers
    as float64 (an integer beyond 2^53 rounded, counted). Categorical: strings, integers as
    their decimals (as the worker reads a categorical). Unknown: numbers as float64, or, when
    strings come too, a string column with integers as decimals. A value its column cannot hold
    (booleans, objects, arrays; a float among strings) is logged null and counted: the worker
    ignores such a field, or passes the request as invalid, and the impression is still its.
    """
    vals = values.tolist()
    if kind != CATEGORICAL:
        try:
            arr = pa.array(vals, from_pandas=False)
            t = arr.type
            if (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_null(t)) and (
                    kind == NUMERIC or kind is None):
                big = _arrow_big_ints(arr)
                if big:
                    odd[ODD_BIG_INT] += big
                return arr.cast(pa.float64(), safe=False)
            if (pa.types.is_string(t) or pa.types.is_large_string(t)) and kind is None:
                return arr.cast(pa.string())
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError):
            pass
    types = list(map(type, vals))
    kinds = set(types)
    as_string = kind == CATEGORICAL or (kind is None and str in kinds)
    out: list[Any] = []
    n_odd = 0
    if as_string:
        for v, t in zip(vals, types, strict=True):
            if t is str or v is None:
                out.append(v)
            elif t is int:
                out.append(str(v))
            else:
                out.append(None)
                n_odd += 1
        if n_odd:
            odd[ODD_TYPE] += n_odd
        return pa.array(out, pa.string())
    for v, t in zip(vals, types, strict=True):
        if t is float or t is int or v is None:
            out.append(v if t is not int else float(v))
        else:
            out.append(None)
            n_odd += 1
    if n_odd:
        odd[ODD_TYPE] += n_odd
    big = _big_ints(vals)
    if big:
        odd[ODD_BIG_INT] += big
    return pa.array(out, pa.float64())


@dataclass
class Decoded:
    """Rows of one batch of one (topic, partition) that decoded: a table plus join keys."""

    table: pa.Table
    ids: list[str]
    ts: np.ndarray  # int64: request event time (requests: ts_ms; decisions: ts_ms - latency_ms)
    offsets: np.ndarray  # int64
    odd: Tally = field(default_factory=Tally)  # odd feature values kept as null / rounded, by cause


def _parse_all(values: list[bytes | None], parse: Any, max_bytes: int = MAX_BYTES) -> tuple[list[Any], list[int]]:
    """(parsed documents, their positions); values `parse` refuses (ValueError) or oversized
    ones are left out."""
    docs, at = [], []
    for i, raw in enumerate(values):
        if raw and len(raw) <= max_bytes:
            try:
                docs.append(parse(raw))
                at.append(i)
            except ValueError:  # orjson.JSONDecodeError is one
                pass
    return docs, at


def _features(d: Any, positional: dict[str, tuple[str, ...]]) -> dict[str, Any] | None:
    """The named features of a parsed request, or None if its envelope is not a valid request's.
    A positional one (`fp` + `x`) is named by the spec of that fingerprint, if it is known."""
    if not (type(d) is dict and d.get("v") == 1 and type(d.get("request_id")) is str
            and 0 < len(d["request_id"]) <= 256 and type(d.get("ts_ms")) is int
            and 0 <= d["ts_ms"] <= MAX_LOG_TS_MS):
        return None
    f = d.get("features")
    if type(f) is dict:
        return f
    x, names = d.get("x"), positional.get(d.get("fp"))  # type: ignore[arg-type]
    if names is not None and type(x) is list and len(x) == len(names):
        return dict(zip(names, x, strict=True))
    return None


_ENVELOPE_TYPES = {"v": pa.int64(), "request_id": pa.string(), "ts_ms": pa.int64()}


def _read_json_batch(values: list[bytes | None], max_bytes: int) -> pa.Table | None:
    """One JSON document per value -> one table (pyarrow's reader), or None if any value is
    empty, oversized, not one line of JSON, or the batch's types do not agree."""
    n = len(values)
    if not n or None in values:
        return None
    data = b"\n".join(values)  # type: ignore[arg-type]
    if data.count(b"\n") != n - 1 or min(map(len, values)) == 0 or max(map(len, values)) > max_bytes:  # type: ignore[arg-type]
        return None
    try:
        t = pajson.read_json(io.BytesIO(data), read_options=pajson.ReadOptions(block_size=len(data) + 1,
                                                                               use_threads=False))
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        return None
    return t if t.num_rows == n else None


def _envelope_ok(t: pa.Table) -> bool:
    """v == 1, a request_id of 1-256 characters and a non-negative integer ts_ms on every row."""
    if not set(_ENVELOPE_TYPES) <= set(t.column_names):
        return False
    if any(t.schema.field(c).type != ty or t.column(c).null_count for c, ty in _ENVELOPE_TYPES.items()):
        return False
    lens = pc.utf8_length(t.column("request_id"))
    return bool(pc.all(pc.equal(t.column("v"), 1)).as_py() and pc.min(lens).as_py() > 0
                and pc.max(lens).as_py() <= 256 and pc.min(t.column("ts_ms")).as_py() >= 0
                and pc.max(t.column("ts_ms")).as_py() <= MAX_LOG_TS_MS)


def _decode_requests_arrow(values: list[bytes | None], offsets: np.ndarray, partition: int,
                           reserved: frozenset[str], max_bytes: int, kinds: dict[str, str]
                           ) -> tuple[Decoded, int, int] | None:
    """The whole batch parsed by pyarrow's JSON reader (C++, no Python object per value): the
    common case of a clean batch of canonical requests, ~2-3x the per-message path. Anything
    unusual (a bad or positional message, a column mixing kinds) returns None, and the batch
    takes the per-message path, which judges every message on its own."""
    t = _read_json_batch(values, max_bytes)
    if t is None or set(t.column_names) != {*_ENVELOPE_TYPES, "features"} or not _envelope_ok(t):
        return None
    rid, ts = t.column("request_id"), t.column("ts_ms")
    feats = t.column("features").combine_chunks()
    if not pa.types.is_struct(feats.type) or feats.null_count:
        return None
    cols: dict[str, pa.Array] = {}
    n_reserved = 0
    odd: Tally = Tally()
    for f, child in zip(feats.type, feats.flatten(), strict=True):
        kind = kinds.get(f.name)
        number = pa.types.is_integer(f.type) or pa.types.is_floating(f.type)
        if f.name in reserved:
            n_reserved += len(child) - child.null_count
        elif pa.types.is_null(f.type):
            cols[f.name] = child.cast(pa.string() if kind == CATEGORICAL else pa.float64())
        elif kind == CATEGORICAL and (pa.types.is_integer(f.type) or pa.types.is_string(f.type)):
            cols[f.name] = child.cast(pa.string())  # integers as their decimals, as the worker
        elif kind != CATEGORICAL and number:
            big = _arrow_big_ints(child)
            if big:
                odd[ODD_BIG_INT] += big
            cols[f.name] = child.cast(pa.float64(), safe=False)
        elif kind is None and pa.types.is_string(f.type):
            cols[f.name] = child
        elif kind is None and (pa.types.is_boolean(f.type) or pa.types.is_struct(f.type)
                               or pa.types.is_list(f.type)):
            odd[ODD_TYPE] += len(child) - child.null_count  # a field no bundle reads: not logged
        else:  # a kind the bundle's column cannot hold: the per-message path nulls those values
            return None
    ts_np = ts.to_numpy()
    offs = np.asarray(offsets, np.int64)
    table = pa.table({"request_id": rid, "ts_ms": ts, **cols,
                      "kafka_partition": pa.array(np.full(len(offs), partition, np.int32)),
                      "kafka_offset": pa.array(offs, pa.int64())})
    return Decoded(table, rid.to_pylist(), ts_np, offs, odd), 0, n_reserved


def decode_requests_generic(values: list[bytes | None], offsets: np.ndarray, partition: int,
                            reserved: frozenset[str], max_bytes: int = MAX_BYTES,
                            positional: dict[str, tuple[str, ...]] | None = None,
                            kinds: dict[str, str] | None = None) -> tuple[Decoded, int, int]:
    """Requests of one partition -> (rows, malformed count, reserved features dropped).

    Every feature under its own name (the logger serves every model); `kinds` (name ->
    numeric | categorical, from the bundles) types the features a bundle reads as the bundle
    does. A positional request (`fp` + `x`) is named by `positional` (fingerprint -> feature
    names); with an unknown fingerprint it has no names to log and counts as malformed.
    A clean canonical batch is parsed in one pyarrow call, any other per message; whatever
    fails on a batch is retried message by message, so one message can cost only itself.
    """
    kinds = kinds or {}
    try:
        fast = _decode_requests_arrow(values, offsets, partition, reserved, max_bytes, kinds)
    except (pa.ArrowException, ValueError, TypeError, OverflowError):
        fast = None
    if fast is not None:
        return fast
    try:
        return _decode_requests_slow(values, offsets, partition, reserved, max_bytes, positional or {}, kinds)
    except (pa.ArrowException, ValueError, TypeError, OverflowError):
        if len(values) == 1:
            return _no_rows(partition), 1, 0
    parts = [decode_requests_generic([v], offsets[i:i + 1], partition, reserved, max_bytes, positional, kinds)
             for i, v in enumerate(values)]
    return _concat_decoded([p[0] for p in parts]), sum(p[1] for p in parts), sum(p[2] for p in parts)


def _no_rows(partition: int) -> Decoded:
    empty = np.empty(0, np.int64)
    return Decoded(pa.table({"request_id": pa.array([], pa.string()), "ts_ms": pa.array([], pa.int64()),
                             "kafka_partition": pa.array([], pa.int32()), "kafka_offset": pa.array([], pa.int64())}),
                   [], empty, empty)


def _concat_decoded(parts: list[Decoded]) -> Decoded:
    """Rows decoded message by message, as one (a column's kinds may differ: `concat` says how)."""
    parts = [p for p in parts if len(p.ids)] or parts[:1]
    odd: Tally = Tally()
    for p in parts:
        odd.update(p.odd)
    return Decoded(concat([p.table for p in parts]), list(chain.from_iterable(p.ids for p in parts)),
                   np.concatenate([p.ts for p in parts]), np.concatenate([p.offsets for p in parts]), odd)


def _decode_requests_slow(values: list[bytes | None], offsets: np.ndarray, partition: int,
                          reserved: frozenset[str], max_bytes: int, positional: dict[str, tuple[str, ...]],
                          kinds: dict[str, str]) -> tuple[Decoded, int, int]:
    """The per-message path: each message parsed by orjson and judged on its own."""
    docs, at = _parse_all(values, orjson.loads, max_bytes)
    named = [_features(d, positional) for d in docs]
    ok = [f is not None for f in named]
    docs = [d for d, k in zip(docs, ok, strict=True) if k]
    at = [i for i, k in zip(at, ok, strict=True) if k]
    n = len(docs)
    feats = [f for f in named if f is not None]
    ids = [d["request_id"] for d in docs]
    ts = np.fromiter((d["ts_ms"] for d in docs), np.int64, n)
    # Feature names: the first row's, when every row has exactly those in that order (what the
    # world and the encoders write); else the union in order of first appearance.
    first = tuple(feats[0]) if n else ()
    if n and all(map(first.__eq__, map(tuple, feats))):
        names = first
        grid = np.fromiter(chain.from_iterable(f.values() for f in feats), object, n * len(names))
    else:
        names = tuple(dict.fromkeys(chain.from_iterable(feats)))
        grid = np.fromiter(chain.from_iterable(map(f.get, names) for f in feats), object, n * len(names))
    # one contiguous row per feature: pyarrow converts a strided object column ~10x slower
    grid = np.ascontiguousarray(grid.reshape(n, len(names)).T)
    dropped = [j for j, name in enumerate(names) if name in reserved]
    n_reserved = int(sum(np.count_nonzero(np.not_equal(grid[j], None)) for j in dropped))
    cols: dict[str, pa.Array] = {}
    odd: Tally = Tally()
    for j, name in enumerate(names):
        if j in dropped:
            continue
        kind = kinds.get(name)
        before = odd[ODD_TYPE]
        arr = _feature_array(grid[j], kind, odd)
        if kind is None and odd[ODD_TYPE] - before and arr.null_count == len(arr):
            continue  # a field no bundle reads that holds no number or string: not logged
        cols[name] = arr
    offs = np.asarray(offsets, np.int64)[at] if n else np.empty(0, np.int64)
    table = pa.table({"request_id": pa.array(ids, pa.string()), "ts_ms": pa.array(ts, pa.int64()), **cols,
                      "kafka_partition": pa.array(np.full(n, partition, np.int32)),
                      "kafka_offset": pa.array(offs, pa.int64())})
    return Decoded(table, ids, ts, offs, odd), len(values) - len(ids), n_reserved


def decision_schema(tasks: tuple[str, ...]) -> pa.Schema:
    """The decision part of an impression row (request_id excluded)."""
    fields = [pa.field(c, pa.string() if c in _STRING_FIELDS else
                       pa.int64() if c == "decision_ts_ms" else pa.float64()) for c in DECISION_COLUMNS]
    fields += [pa.field(f"{k}_{t}", pa.float64()) for k in ("p", "u") for t in tasks]
    return pa.schema(fields)


def _float_column(values: list[Any]) -> tuple[pa.Array, np.ndarray | None]:
    try:
        return pa.array(values, pa.float64()), None
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError):
        bad = np.fromiter((v is not None and (type(v) not in (int, float)) for v in values), bool, len(values))
        return pa.array([None if b else v for v, b in zip(values, bad, strict=True)], pa.float64()), bad


def _as(col: pa.ChunkedArray | pa.Array | None, ty: pa.DataType, n: int) -> pa.Array | None:
    """A decision field as its schema type (absent -> nulls); None if its JSON kind is wrong."""
    if col is None:
        return pa.nulls(n, ty)
    t = col.type
    if pa.types.is_null(t) or t == ty or (ty == pa.float64() and (pa.types.is_integer(t) or pa.types.is_floating(t))):
        return col.cast(ty)
    return None


def _decode_decisions_arrow(values: list[bytes | None], offsets: np.ndarray, tasks: tuple[str, ...]
                            ) -> tuple[Decoded, int] | None:
    """A clean batch of decision events in one pyarrow call; None: the per-message path decides."""
    t = _read_json_batch(values, MAX_BYTES)
    if t is None or "decision" not in t.column_names or "reason" not in t.column_names or not _envelope_ok(t):
        return None
    n = t.num_rows
    if not (pc.all(pc.is_in(t.column("decision"), value_set=pa.array(DECISIONS))).as_py()
            and pc.all(pc.is_in(t.column("reason"), value_set=pa.array(REASONS))).as_py()
            and not t.column("decision").null_count and not t.column("reason").null_count):
        return None
    source = {c: c for c in DECISION_COLUMNS} | {"decision_ts_ms": "ts_ms"}
    schema = decision_schema(tasks)
    cols: dict[str, pa.Array] = {}
    for c in DECISION_COLUMNS:
        col = _as(t.column(source[c]).combine_chunks() if source[c] in t.column_names else None,
                  schema.field(c).type, n)
        if col is None:
            return None
        cols[c] = col
    for key in ("p", "u"):
        st = t.column(key).combine_chunks() if key in t.column_names else None
        if st is not None and pa.types.is_null(st.type):
            st = None
        if st is not None and not pa.types.is_struct(st.type):
            return None
        children = dict(zip([f.name for f in st.type], st.flatten(), strict=True)) if st is not None else {}
        for task in tasks:
            col = _as(children.get(task), pa.float64(), n)
            if col is None:
                return None
            cols[f"{key}_{task}"] = col
    table = pa.table({"request_id": t.column("request_id"), **cols})
    return _decided(table, table.column("request_id").to_pylist(), np.asarray(offsets, np.int64)), 0


def _decided(table: pa.Table, ids: list[str], offs: np.ndarray) -> Decoded:
    """Decision rows keyed for the join: their request time is ts_ms - latency_ms."""
    dts = table.column("decision_ts_ms").to_numpy()
    lat = table.column("latency_ms").fill_null(0.0).to_numpy()
    ts = dts - np.nan_to_num(lat, nan=0.0, posinf=0.0, neginf=0.0).astype(np.int64)
    return Decoded(table, ids, ts, offs)


def decode_decisions_generic(values: list[bytes | None], offsets: np.ndarray, tasks: tuple[str, ...]
                             ) -> tuple[Decoded, int]:
    """Decision events of one partition -> (rows, malformed count); columns as `decision_schema`.
    A clean batch is parsed in one pyarrow call; any other per message."""
    try:
        fast = _decode_decisions_arrow(values, offsets, tasks)
    except (pa.ArrowException, ValueError, TypeError, OverflowError):
        fast = None
    if fast is not None:
        return fast
    try:
        return _decode_decisions_slow(values, offsets, tasks)
    except (pa.ArrowException, ValueError, TypeError, OverflowError):
        if len(values) == 1:
            empty = pa.schema([pa.field("request_id", pa.string()), *decision_schema(tasks)]).empty_table()
            return _decided(empty, [], np.empty(0, np.int64)), 1
    parts = [decode_decisions_generic([v], offsets[i:i + 1], tasks) for i, v in enumerate(values)]
    return _concat_decoded([p[0] for p in parts]), sum(p[1] for p in parts)


def _decode_decisions_slow(values: list[bytes | None], offsets: np.ndarray, tasks: tuple[str, ...]
                           ) -> tuple[Decoded, int]:
    """The per-message path of decisions: each judged on its own."""
    docs, at = _parse_all(values, decode_decision)
    n = len(docs)
    source = {c: c for c in DECISION_COLUMNS}
    source["decision_ts_ms"] = "ts_ms"
    bad = np.zeros(n, bool)
    cols: dict[str, pa.Array] = {}
    for c in DECISION_COLUMNS:
        vals = [d.get(source[c]) for d in docs]
        if c in _STRING_FIELDS:
            wrong = np.fromiter((v is not None and type(v) is not str for v in vals), bool, n)
            bad |= wrong
            cols[c] = pa.array([None if w else v for v, w in zip(vals, wrong.tolist(), strict=True)], pa.string())
        elif c == "decision_ts_ms":
            wrong = np.fromiter((type(v) is not int or not 0 <= v < 2**63 for v in vals), bool, n)
            bad |= wrong
            cols[c] = pa.array([0 if w else v for v, w in zip(vals, wrong.tolist(), strict=True)], pa.int64())
        else:
            cols[c], b = _float_column(vals)
            if b is not None:
                bad |= b
    for key in ("p", "u"):
        maps = [d.get(key) for d in docs]
        maps = [m if type(m) is dict else {} for m in maps]
        for t in tasks:
            cols[f"{key}_{t}"], b = _float_column([m.get(t) for m in maps])
            if b is not None:
                bad |= b
    ids = [d["request_id"] for d in docs]
    table = pa.table({"request_id": pa.array(ids, pa.string()), **cols})
    offs = np.asarray(offsets, np.int64)[at] if n else np.empty(0, np.int64)
    if bad.any():
        keep = ~bad
        table = table.filter(pa.array(keep))
        ids = [r for r, k in zip(ids, keep.tolist(), strict=True) if k]
        offs = offs[keep]
    return _decided(table, ids, offs), len(values) - len(ids)


def _decode_loggable_outcome(raw: bytes) -> dict[str, Any]:
    doc = decode_outcome(raw)
    if doc["ts_ms"] > MAX_LOG_TS_MS:
        raise ValueError(f"outcome ts_ms {doc['ts_ms']} is past year 9999 (microseconds?)")
    return doc


def decode_outcomes_generic(values: list[bytes | None], offsets: np.ndarray) -> tuple[Decoded, int]:
    """Outcome events of one partition -> (rows: request_id, event, ts_ms; malformed count)."""
    docs, at = _parse_all(values, _decode_loggable_outcome)
    n = len(docs)
    ids = [d["request_id"] for d in docs]
    ts = np.fromiter((d["ts_ms"] for d in docs), np.int64, n)
    table = pa.table({"request_id": pa.array(ids, pa.string()),
                      "event": pa.array([d["event"] for d in docs], pa.string()),
                      "ts_ms": pa.array(ts, pa.int64())})
    offs = np.asarray(offsets, np.int64)[at] if n else np.empty(0, np.int64)
    return Decoded(table, ids, ts, offs), len(values) - n


# --------------------------------------------------------------------------- tables


def concat(tables: list[pa.Table]) -> pa.Table:
    """Concatenate tables whose columns may differ: missing columns become null; a column that is
    a number in one and a string in another becomes a string in all (a file has one schema)."""
    if len(tables) == 1:
        return tables[0]
    try:
        return pa.concat_tables(tables, promote_options="default")
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        kinds: dict[str, set[pa.DataType]] = {}
        for t in tables:
            for f in t.schema:
                if not pa.types.is_null(f.type):
                    kinds.setdefault(f.name, set()).add(f.type)
        mixed = {name for name, ts in kinds.items() if len(ts) > 1}
        fixed = []
        for t in tables:
            for name in mixed & set(t.column_names):
                i = t.schema.get_field_index(name)
                t = t.set_column(i, name, pc.cast(t.column(i), pa.string()))
            fixed.append(t)
        return pa.concat_tables(fixed, promote_options="default")
