"""Event codecs: request, decision, outcome and dead-letter envelopes (docs/events.md).

The request decoder sits on the serving hot path. It turns a batch of raw Kafka values into
the feature matrices of `stream.features` and never raises on bad input: every message gets
exactly one row, in order, and an invalid one carries a precise error code instead of
features (the worker dead-letters it and passes it with reason `invalid`). Work is done per
batch and per column wherever a C-level builtin (orjson, map, numpy) can do it; Python runs
per message only for the envelope, and per field only on a batch that holds a bad value.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from itertools import chain, compress, repeat
from operator import attrgetter, itemgetter, methodcaller
from typing import Any, NamedTuple

import numpy as np
import orjson

from stream.codes import MISSING_CODE, CategoryCodes
from stream.features import DEFAULT_TASKS, FeatureSpec
from stream.policy import REASONS  # one numbering of reasons: the policy's

try:  # optional accelerator of the request decoder; the checked path is complete without it
    import msgspec
except ImportError:  # pragma: no cover - exercised only where msgspec is not installed
    msgspec = None

try:  # the compiled decoder (setup.py builds it at install); the Python path is complete without it
    from stream import _fastreq
except ImportError:  # pragma: no cover - exercised where the extension was not built
    _fastreq = None

VERSION = 1
MAX_BYTES = 64 * 1024
MAX_REQUEST_ID_CHARS = 256
MAX_TS_MS = 2**63 - 1

DECISIONS = ("pass", "block")
OUTCOME_EVENTS = DEFAULT_TASKS  # click, online, cart, deal

# Header names (bytes values). The decision carries the model version in a header too, so a
# consumer can route or filter without parsing the body.
MODEL_HEADER = "rta-model"
ERROR_HEADER = "rta-error"
ERROR_CODE_HEADER = "rta-error-code"
SOURCE_TOPIC_HEADER = "rta-source-topic"
SOURCE_PARTITION_HEADER = "rta-source-partition"
SOURCE_OFFSET_HEADER = "rta-source-offset"

# Every code decode_requests can return, with what it means (docs/events.md mirrors this).
ERROR_CODES: dict[str, str] = {
    "empty": "the message has no value (null/tombstone or zero bytes)",
    "oversized": "the value is larger than the size limit",
    "not_utf8": "the value is not valid UTF-8",
    "not_json": "the value is not one JSON document",
    "non_finite": "NaN/Infinity literal, a number that overflows a double, or a feature outside float32",
    "not_object": "the JSON document is not an object",
    "bad_version": "`v` is missing or not 1",
    "missing_request_id": "`request_id` is absent or null",
    "bad_request_id": "`request_id` is not a non-empty string of at most 256 characters",
    "bad_ts": "`ts_ms` is absent or not a non-negative integer",
    "bad_fingerprint": "a positional request whose `fp` is not the served spec's fingerprint",
    "bad_features": "`features` is not an object, or `x` is not an array of the spec's length",
    "non_numeric": "a numeric feature holds a string, boolean, array or object",
    "bad_categorical": "a categorical feature holds something other than a string or integer",
    "bad_binary": "a binary (msgpack) request that is not the array [v, request_id, ts_ms, fp, num, cat]",
}

_NUMERIC_TYPES = frozenset({int, float, type(None)})
_CATEGORICAL_TYPES = frozenset({str, int, type(None)})
_F32_MAX = float(np.finfo(np.float32).max)


class DecodeError(NamedTuple):
    """Why message `index` of a batch is invalid."""

    index: int
    code: str
    message: str


@dataclass
class RequestBatch:
    """One decoded batch: row i is message i, valid or not.

    Invalid rows keep their slot with every feature missing, a request id (from the body,
    else the Kafka key, else `invalid:<sha1 of the value>`) and `ts_ms` 0 when the body does
    not give one.
    """

    request_id: np.ndarray  # object[N] of str
    ts_ms: np.ndarray  # int64[N]
    num: np.ndarray  # float32[N, n_num], NaN = missing
    cat: np.ndarray  # object[N, n_cat] of str, "" = missing
    valid: np.ndarray  # bool[N]
    errors: list[DecodeError] = field(default_factory=list)  # sorted by index
    unknown_features: int = 0  # feature names not in the spec (ignored, counted)
    codes: np.ndarray | None = None  # int64[N, n_cat] (stream.codes), when the decoder was given an encoder

    def __len__(self) -> int:
        return len(self.valid)

    @property
    def n_invalid(self) -> int:
        return len(self.errors)

    def error_codes(self) -> np.ndarray:
        """object[N]: the error code of each row, "" for valid ones."""
        codes = np.full(len(self.valid), "", dtype=object)
        for e in self.errors:
            codes[e.index] = e.code
        return codes


class _Invalid(Exception):
    def __init__(self, code: str, message: str, request_id: str | None = None,
                 ts_ms: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id
        self.ts_ms = ts_ms


# --------------------------------------------------------------------------- requests


_KINDS = {str: "a string", bool: "a boolean", int: "an integer", float: "a number",
          list: "an array", dict: "an object", type(None): "null"}


def _kind(value: Any) -> str:
    """The JSON kind of a parsed value, for messages."""
    return _KINDS.get(type(value), type(value).__name__)


def _brief(value: Any) -> str:
    """A short, safe rendering of a parsed value (repr of a deep array could recurse)."""
    if type(value) in (list, dict):
        return _kind(value)
    if type(value) is str:
        return repr(value[:40])
    return repr(value)[:40]


def _valid_request_id(rid: Any) -> bool:
    return type(rid) is str and 0 < len(rid) <= MAX_REQUEST_ID_CHARS


def _valid_ts(ts: Any) -> bool:
    return type(ts) is int and 0 <= ts <= MAX_TS_MS


def _parse_failure(raw: bytes) -> _Invalid:
    """Classify a value orjson refused; salvage the request id when the stdlib can read it."""
    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError as exc:
        return _Invalid("not_utf8", f"invalid UTF-8 at byte {exc.start}")
    try:
        orjson.loads(raw)
        orjson_msg = "not a JSON document"
    except orjson.JSONDecodeError as exc:
        orjson_msg = str(exc)[:200]
    seen: list[str] = []

    def constant(name: str) -> float:
        seen.append(name)
        return math.nan

    def number(s: str) -> float:
        value = float(s)
        if math.isinf(value):
            seen.append(s[:32])
        return value

    try:
        doc: Any = json.loads(text, parse_constant=constant, parse_float=number)
    except Exception:  # noqa: BLE001 - any failure (incl. RecursionError) means "not JSON"
        doc = None
    if seen or "infinity" in orjson_msg:
        rid = doc.get("request_id") if type(doc) is dict else None
        ts = doc.get("ts_ms") if type(doc) is dict else None
        what = f"literal {seen[0]!r}" if seen else "number"
        return _Invalid("non_finite", f"non-finite {what}: JSON numbers must be finite ({orjson_msg})"
                        if not seen else f"non-finite {what}: JSON has no NaN/Infinity",
                        rid if _valid_request_id(rid) else None, ts if _valid_ts(ts) else None)
    return _Invalid("not_json", orjson_msg)


def _envelope(doc: Any, fingerprint: str, n_features: int) -> tuple[str, int, Any, bool]:
    """(request_id, ts_ms, payload, positional) of one parsed document, or raise _Invalid."""
    if type(doc) is not dict:
        raise _Invalid("not_object", f"expected a JSON object, got {_kind(doc)}")
    rid = doc.get("request_id")
    ts = doc.get("ts_ms")
    salvage_rid = rid if _valid_request_id(rid) else None
    salvage_ts = ts if _valid_ts(ts) else None
    v = doc.get("v")
    if type(v) is not int or v != VERSION:
        raise _Invalid("bad_version", "missing v" if v is None else f"unsupported v={_brief(v)}",
                       salvage_rid, salvage_ts)
    if rid is None:
        raise _Invalid("missing_request_id", "request_id is absent or null", None, salvage_ts)
    if salvage_rid is None:
        what = f"{len(rid)} characters" if type(rid) is str else _kind(rid)
        raise _Invalid("bad_request_id",
                       f"request_id must be a string of 1-{MAX_REQUEST_ID_CHARS} characters, got {what}",
                       None, salvage_ts)
    if salvage_ts is None:
        msg = "ts_ms is absent" if ts is None else f"ts_ms must be a non-negative integer, got {_brief(ts)}"
        raise _Invalid("bad_ts", msg, rid)
    if "x" in doc:
        fp = doc.get("fp")
        if fp != fingerprint:
            raise _Invalid("bad_fingerprint",
                           f"positional request with fp={_brief(fp)}, served spec is {fingerprint}",
                           rid, ts)
        x = doc["x"]
        if type(x) is not list or len(x) != n_features:
            what = f"{len(x)} values" if type(x) is list else _kind(x)
            raise _Invalid("bad_features", f"x must be an array of {n_features} values, got {what}",
                           rid, ts)
        return rid, ts, x, True
    features = doc.get("features")
    if type(features) is not dict:
        what = "absent" if features is None else _kind(features)
        raise _Invalid("bad_features", f"features must be an object, got {what}", rid, ts)
    return rid, ts, features, False


def _fallback_id(raw: bytes | None, key: bytes | None) -> str:
    if key:
        try:
            k = key if isinstance(key, str) else bytes(key).decode("utf-8")
        except (UnicodeDecodeError, TypeError):
            k = ""
        if 0 < len(k) <= MAX_REQUEST_ID_CHARS:
            return k
    return "invalid:" + hashlib.sha1(bytes(raw or b"")).hexdigest()


def _first_bad(block: np.ndarray, ok: frozenset[type]) -> list[tuple[int, int]]:
    """(row, column) of the first value of a type outside `ok` in each bad row of an object block."""
    bad: dict[int, int] = {}
    width = block.shape[1]
    flat = block.ravel().tolist()
    for pos in compress(range(len(flat)), [type(v) not in ok for v in flat]):
        bad.setdefault(pos // width, pos % width)
    return list(bad.items())


def _row_getter(names: tuple[str, ...]) -> Any:
    """A C-level dict -> tuple-of-values in `names` order (raises KeyError on an absent name)."""
    if len(names) > 1:
        return itemgetter(*names)
    if len(names) == 1:
        name = names[0]
        return lambda d: (d[name],)
    return lambda d: ()


def decode_requests(
    values: Sequence[bytes | None],
    keys: Sequence[bytes | None] | None,
    spec: FeatureSpec,
    *,
    fingerprint: str | None = None,
    max_bytes: int = MAX_BYTES,
    codes: CategoryCodes | None = None,
) -> RequestBatch:
    """Decode raw request values (with their Kafka keys) into one `RequestBatch`.

    Never raises on message content. `fingerprint` is what a positional request must carry
    (default: the spec's own); `max_bytes` bounds one value. With `codes` (the bundle's
    vocabulary) the batch also carries the categorical codes the student reads, computed from
    the parsed values in the same pass that normalises them (no second scan of the strings). The cyclic garbage collector is
    paused meanwhile: a batch allocates ~10^5 acyclic objects (parsed JSON) that would
    otherwise trigger several useless collections, all freed by refcount on return.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        batch = _decode(values, keys, spec, fingerprint, max_bytes, codes)
        if codes is not None and batch.codes is None:  # the checked path was involved: rare
            batch.codes = codes.encode(batch.cat)
        return batch
    finally:
        if was_enabled:
            gc.enable()


def _decode(values: Sequence[bytes | None], keys: Sequence[bytes | None] | None, spec: FeatureSpec,
            fingerprint: str | None, max_bytes: int, encoder: CategoryCodes | None = None) -> RequestBatch:
    """Binary requests apart; JSON ones through the compiled parser where built (else, and for
    what it does not accept, the typed msgspec path, then the checked one)."""
    n = len(values)
    fingerprint = fingerprint or spec.fingerprint()
    keys = keys if keys is not None else [None] * n
    if len(keys) != n:
        raise ValueError(f"{len(keys)} keys for {n} values")
    is_bin = _binary_mask(values)
    if any(is_bin):  # binary requests (first byte 0x96: never the start of a JSON document)
        if all(is_bin):
            return _decode_binary(values, keys, spec, fingerprint, max_bytes, encoder)
        parts = []
        for want in (True, False):
            at = [i for i, b in enumerate(is_bin) if b is want]
            sub_v, sub_k = [values[i] for i in at], [keys[i] for i in at]
            sub = (_decode_binary(sub_v, sub_k, spec, fingerprint, max_bytes, encoder) if want
                   else _decode(sub_v, sub_k, spec, fingerprint, max_bytes, encoder))
            if encoder is not None and sub.codes is None:
                sub.codes = encoder.encode(sub.cat)
            parts.append((at, sub))
        return _merge(n, len(spec.numeric), len(spec.categorical), parts, encoder is not None)
    native = _native_decoder(spec.numeric, spec.categorical, encoder) if _decoder != "python" else None
    if native is not None:
        return _decode_native(native, values, keys, spec, fingerprint, max_bytes, encoder)
    return _decode_python(values, keys, spec, fingerprint, max_bytes, encoder)


def _decode_python(values: Sequence[bytes | None], keys: Sequence[bytes | None], spec: FeatureSpec,
                   fingerprint: str, max_bytes: int, encoder: CategoryCodes | None) -> RequestBatch:
    """The Python decoder of JSON requests (msgspec's typed path, then the checked one): the
    whole decoder where the compiled one is absent or switched off, and the rest of a batch
    (whatever the compiled one does not accept) where it is on. Same rows either way."""
    n = len(values)
    decoder = _typed_decoder(spec.numeric, spec.categorical) if _use_typed else None
    if decoder is None:
        return _decode_checked(values, keys, spec, fingerprint, max_bytes)
    at, rids, tss, num, cat, codes = _decode_typed(decoder, values, spec, fingerprint, max_bytes, encoder)
    if len(at) == n:
        return RequestBatch(np.array(rids, dtype=object), np.array(tss, dtype=np.int64), num, cat,
                            np.ones(n, dtype=bool), codes=codes)
    # Some messages need the checked path (it says why they are invalid, or handles what the
    # typed one refuses but is valid, e.g. unknown feature names); rows go back to their slots.
    rest = sorted(set(range(n)).difference(at))
    sub = _decode_checked([values[i] for i in rest], [keys[i] for i in rest], spec, fingerprint,
                          max_bytes)
    out = RequestBatch(np.empty(n, dtype=object), np.zeros(n, dtype=np.int64),
                       np.empty((n, num.shape[1]), dtype=np.float32), np.empty((n, cat.shape[1]), dtype=object),
                       np.ones(n, dtype=bool),
                       [DecodeError(rest[e.index], e.code, e.message) for e in sub.errors],  # rest is sorted
                       sub.unknown_features)
    for dst, fast_rows, checked_rows in ((out.request_id, rids, sub.request_id), (out.ts_ms, tss, sub.ts_ms),
                                         (out.num, num, sub.num), (out.cat, cat, sub.cat),
                                         (out.valid, True, sub.valid)):
        dst[at] = fast_rows
        dst[rest] = checked_rows
    return out


# --------------------------------------------------------------------------- compiled path
#
# stream/_fastreq.c parses canonical requests straight into the float32 matrix and the
# vocabulary's union ids (no Python object per number; vocabulary words are shared, not copied).
# It accepts a strict subset of valid requests and gives exactly the Python path's row for each;
# every message it does not accept (anything invalid, and valid but rarer forms: escapes,
# integer categoricals, unknown names, positional requests) goes through `_decode_python`, so
# a malformed message still costs only itself. `RTA_DECODER=python` (or `set_decoder`) turns
# it off; without the compiled module the Python path is used, with the same results.

DECODERS = ("auto", "native", "python")
_decoder = os.environ.get("RTA_DECODER", "auto")
if _decoder not in DECODERS:  # a typo must not turn the service off: the default, and tests catch it
    _decoder = "auto"


def set_decoder(name: str) -> str:
    """Choose the request decoder ("auto": compiled if built, "native": compiled or an error,
    "python"); returns the previous choice. Both give the same rows: this is for tests and benches."""
    global _decoder
    if name not in DECODERS:
        raise ValueError(f"unknown decoder {name!r}; known: {', '.join(DECODERS)}")
    if name == "native" and _fastreq is None:
        raise RuntimeError("the compiled request decoder (stream._fastreq) is not built; "
                           "reinstall with a C compiler (pip install -e .)")
    previous, _decoder = _decoder, name
    return previous


def decoder_in_use() -> str:
    """"native" or "python": what decode_requests uses for JSON requests now."""
    return "native" if _decoder != "python" and _fastreq is not None else "python"


@lru_cache(maxsize=16)
def _native_decoder(numeric: tuple[str, ...], categorical: tuple[str, ...],
                    encoder: CategoryCodes | None) -> Any:
    """The compiled decoder of one spec (and vocabulary), or None without the extension."""
    if _fastreq is None:
        return None
    if encoder is None:
        return _fastreq.Decoder(numeric, categorical)
    words, ids, unknown, missing = encoder.union_vocabulary()
    return _fastreq.Decoder(numeric, categorical, words, ids, unknown, missing)


def _decode_native(native: Any, values: Sequence[bytes | None], keys: Sequence[bytes | None],
                   spec: FeatureSpec, fingerprint: str, max_bytes: int,
                   encoder: CategoryCodes | None) -> RequestBatch:
    """The compiled parser for the messages it accepts, `_decode_python` for the rest."""
    n, n_num, n_cat = len(values), len(spec.numeric), len(spec.categorical)
    num = np.empty((n, n_num), np.float32)
    ids = None if encoder is None else np.empty((n, n_cat), np.int64)
    ts_ms = np.zeros(n, np.int64)
    ok = np.zeros(n, np.uint8)
    rids, flat_cat = native.decode(values if type(values) is list else list(values), num, ids, ts_ms, ok,
                                   max_bytes)
    cat = np.array(flat_cat, dtype=object).reshape(n, n_cat)
    codes = None if ids is None else encoder.codes_from_ids(ids)
    valid = ok.astype(bool)
    batch = RequestBatch(np.array(rids, dtype=object), ts_ms, num, cat, valid, codes=codes)
    if n == 0 or valid.all():
        return batch
    rest = np.flatnonzero(~valid).tolist()
    sub = _decode_python([values[i] for i in rest], [keys[i] for i in rest], spec, fingerprint,
                         max_bytes, encoder)
    if encoder is not None and sub.codes is None:
        sub.codes = encoder.encode(sub.cat)
    for name in ("request_id", "ts_ms", "num", "cat", "valid", *(("codes",) if encoder is not None else ())):
        getattr(batch, name)[rest] = getattr(sub, name)
    batch.errors = [DecodeError(rest[e.index], e.code, e.message) for e in sub.errors]  # rest is sorted
    batch.unknown_features = sub.unknown_features
    return batch


def _merge(n: int, n_num: int, n_cat: int, parts: list[tuple[list[int], RequestBatch]], codes: bool) -> RequestBatch:
    """One batch from sub-batches decoded separately, each row back in its slot."""
    out = RequestBatch(np.empty(n, dtype=object), np.zeros(n, dtype=np.int64), np.empty((n, n_num), np.float32),
                       np.empty((n, n_cat), dtype=object), np.ones(n, dtype=bool), [],
                       sum(b.unknown_features for _, b in parts),
                       np.empty((n, n_cat), np.int64) if codes else None)
    for at, b in parts:
        for name in ("request_id", "ts_ms", "num", "cat", "valid", *(("codes",) if codes else ())):
            getattr(out, name)[at] = getattr(b, name)
        out.errors += [DecodeError(at[e.index], e.code, e.message) for e in b.errors]
    out.errors.sort(key=attrgetter("index"))
    return out


# --------------------------------------------------------------------------- binary requests
#
# A binary request is the msgpack array [v, request_id, ts_ms, fp, num, cat]: `num` the numeric
# features as little-endian float32 bytes in spec order (NaN = missing), `cat` an array of the
# categoricals (str, int or nil) in spec order, `fp` the served spec's fingerprint (as for a
# positional JSON request). The numbers go straight into the float32 matrix (one frombuffer for
# the batch): no Python float per value, which is most of what a JSON request costs to decode.

BINARY_FIRST_BYTE = b"\x96"  # msgpack fixarray of 6
_STARTS_BINARY = methodcaller("startswith", BINARY_FIRST_BYTE)


_NUM, _CAT, _RID, _TS = (attrgetter(a) for a in ("num", "cat", "request_id", "ts_ms"))


def _binary_mask(values: Sequence[bytes | None]) -> list[bool]:
    """Which values are binary requests (C-level map; a null value is not)."""
    if all(values):
        return list(map(_STARTS_BINARY, values))
    return [bool(v) and _STARTS_BINARY(v) for v in values]


@lru_cache(maxsize=16)
def _binary_decoder(n_cat: int) -> Any:
    """msgspec's typed msgpack decoder of the binary layout (None without msgspec)."""
    if msgspec is None:
        return None
    request = msgspec.defstruct("BinaryRequest", [
        ("v", int), ("request_id", str), ("ts_ms", int), ("fp", str), ("num", bytes),
        ("cat", tuple[tuple([str | int | None] * n_cat)] if n_cat else tuple[()]),
    ], array_like=True)
    return msgspec.msgpack.Decoder(request)


def _check_shapes(request_ids: Sequence[str], ts_ms: Sequence[int] | np.ndarray, num: np.ndarray,
                  cat: np.ndarray, spec: FeatureSpec) -> int:
    """Rows of a batch to encode; ValueError when its columns disagree with each other or the spec."""
    n = len(request_ids)
    if num.shape != (n, len(spec.numeric)) or cat.shape != (n, len(spec.categorical)) or len(ts_ms) != n:
        raise ValueError(f"request_ids ({n}), ts_ms ({len(ts_ms)}), num {num.shape} and cat {cat.shape} "
                         f"do not match {n} rows of {len(spec.numeric)} numeric + "
                         f"{len(spec.categorical)} categorical features")
    return n


def encode_requests_binary(request_ids: Sequence[str], ts_ms: Sequence[int] | np.ndarray, num: np.ndarray,
                           cat: np.ndarray, spec: FeatureSpec) -> list[bytes]:
    """A batch of binary requests (module comment above; "" -> nil). Needs msgspec."""
    if msgspec is None:  # pragma: no cover
        raise RuntimeError("binary requests need msgspec")
    num = np.asarray(num, dtype="<f4")
    cat = np.asarray(cat, dtype=object)
    n = _check_shapes(request_ids, ts_ms, num, cat, spec)
    cat_rows = map(tuple, np.where((cat == "") | np.equal(cat, None), None, cat).tolist())
    blocks = np.ascontiguousarray(num).tobytes()
    width = 4 * len(spec.numeric)
    fp, enc = spec.fingerprint(), msgspec.msgpack.Encoder().encode
    return list(map(enc, zip(repeat(VERSION), map(str, request_ids), np.asarray(ts_ms, np.int64).tolist(),
                             repeat(fp), (blocks[i * width:(i + 1) * width] for i in range(n)), cat_rows,
                             strict=False)))


def _binary_invalid(raw: bytes, fingerprint: str, n_num: int, n_cat: int, max_bytes: int) -> _Invalid:
    """Why a binary request the typed decoder refused (or a batch check dropped) is invalid."""
    if len(raw) > max_bytes:
        return _Invalid("oversized", f"{len(raw)} bytes > limit {max_bytes}")
    try:
        doc = msgspec.msgpack.decode(raw)
    except Exception as exc:  # noqa: BLE001 - any failure means "not msgpack"
        return _Invalid("bad_binary", f"not one msgpack document ({str(exc)[:120]})")
    if type(doc) is not list or len(doc) != 6:
        return _Invalid("bad_binary", f"expected an array of 6, got {_kind(doc)}"
                        + (f" of {len(doc)}" if type(doc) is list else ""))
    v, rid, ts, fp, block, cats = doc
    salvage_rid = rid if _valid_request_id(rid) else None
    salvage_ts = ts if _valid_ts(ts) else None
    if type(v) is not int or v != VERSION:
        return _Invalid("bad_version", f"unsupported v={_brief(v)}", salvage_rid, salvage_ts)
    if salvage_rid is None:
        return _Invalid("bad_request_id", f"request_id must be a string of 1-{MAX_REQUEST_ID_CHARS} characters, "
                        f"got {_kind(rid)}", None, salvage_ts)
    if salvage_ts is None:
        return _Invalid("bad_ts", f"ts_ms must be a non-negative integer, got {_brief(ts)}", rid)
    if fp != fingerprint:
        return _Invalid("bad_fingerprint", f"binary request with fp={_brief(fp)}, served spec is {fingerprint}", rid, ts)
    if type(block) is not bytes or len(block) != 4 * n_num:
        what = f"{len(block)} bytes" if type(block) is bytes else _kind(block)
        return _Invalid("bad_features", f"num must be {4 * n_num} bytes (float32 x {n_num}), got {what}", rid, ts)
    if type(cats) is not list or len(cats) != n_cat:
        what = f"{len(cats)} values" if type(cats) is list else _kind(cats)
        return _Invalid("bad_features", f"cat must be an array of {n_cat} values, got {what}", rid, ts)
    for c, value in enumerate(cats):
        if type(value) not in _CATEGORICAL_TYPES or (type(value) is int and not _ORJSON_INT[0] <= value <= _ORJSON_INT[1]):
            return _Invalid("bad_categorical", f"categorical {c} is {_kind(value)}, expected a string or integer", rid, ts)
    return _Invalid("non_finite", "a numeric feature is infinite (NaN is missing; inf is not a value)", rid, ts)


def _decode_binary(values: Sequence[bytes | None], keys: Sequence[bytes | None], spec: FeatureSpec,
                   fingerprint: str, max_bytes: int, encoder: CategoryCodes | None) -> RequestBatch:
    """Binary requests -> a RequestBatch; a message that fails any check gets its error code."""
    n, n_num, n_cat = len(values), len(spec.numeric), len(spec.categorical)
    decoder = _binary_decoder(n_cat)
    if decoder is None:  # pragma: no cover - without msgspec every binary request is refused
        batch = RequestBatch(np.array([_fallback_id(v, k) for v, k in zip(values, keys, strict=True)], dtype=object),
                             np.zeros(n, np.int64), np.full((n, n_num), np.nan, np.float32),
                             np.full((n, n_cat), "", dtype=object), np.zeros(n, bool),
                             [DecodeError(i, "bad_binary", "binary requests need msgspec") for i in range(n)])
        return batch
    decode = decoder.decode
    try:
        if max(map(len, values), default=0) > max_bytes:
            raise ValueError
        reqs = list(map(decode, values))
        ok = [True] * n
    except Exception:  # noqa: BLE001 - which message and why: _binary_invalid
        reqs, ok = [], []
        for raw in values:
            try:
                if len(raw) > max_bytes:
                    raise ValueError
                reqs.append(decode(raw))
                ok.append(True)
            except Exception:  # noqa: BLE001
                reqs.append(None)
                ok.append(False)
    width = 4 * n_num
    good = [r for r in reqs if r is not None]
    if good:
        vs, rids, tss, fps, blocks, cats = map(list, zip(*map(attrgetter("v", "request_id", "ts_ms", "fp", "num", "cat"),
                                                              good), strict=True))
        lens = list(map(len, rids))
        checks = (vs.count(VERSION) == len(good) and fps.count(fingerprint) == len(good) and min(lens) > 0
                  and max(lens) <= MAX_REQUEST_ID_CHARS and min(tss) >= 0 and max(tss) <= MAX_TS_MS
                  and set(map(len, blocks)) == {width})
        if not checks:
            keep = [v == VERSION and fp == fingerprint and 0 < k <= MAX_REQUEST_ID_CHARS and 0 <= t <= MAX_TS_MS
                    and len(b) == width for v, fp, k, t, b in zip(vs, fps, lens, tss, blocks, strict=True)]
            it = iter(keep)
            ok = [o and next(it) for o in ok]
    rows = [i for i, o in enumerate(ok) if o]
    kept = [reqs[i] for i in rows]
    m = len(kept)
    num = np.full((n, n_num), np.nan, np.float32)
    cat = np.full((n, n_cat), "", dtype=object)
    codes = None if encoder is None else np.zeros((n, n_cat), np.int64)
    request_id = np.empty(n, dtype=object)
    ts_ms = np.zeros(n, np.int64)
    valid = np.zeros(n, bool)
    if m:
        block = np.frombuffer(b"".join(map(_NUM, kept)), dtype="<f4").reshape(m, n_num).astype(np.float32)
        drop = np.isinf(block).any(axis=1)
        cblock = np.fromiter(chain.from_iterable(map(_CAT, kept)), dtype=object, count=m * n_cat).reshape(m, n_cat)
        ccodes = _categoricals(cblock, encoder, drop)
        if drop.any():
            for r in np.flatnonzero(drop).tolist():
                ok[rows[r]] = False
            keep_rows = ~drop
            rows = [i for i, k in zip(rows, keep_rows.tolist(), strict=True) if k]
            kept = [r for r, k in zip(kept, keep_rows.tolist(), strict=True) if k]
            block, cblock = block[keep_rows], cblock[keep_rows]
            ccodes = None if ccodes is None else ccodes[keep_rows]
        num[rows], cat[rows], valid[rows] = block, cblock, True
        if codes is not None:
            codes[rows] = ccodes
        request_id[rows] = list(map(_RID, kept))
        ts_ms[rows] = list(map(_TS, kept))
    errors = []
    for i in (i for i, o in enumerate(ok) if not o):
        exc = _binary_invalid(bytes(values[i]), fingerprint, n_num, n_cat, max_bytes)
        errors.append(DecodeError(i, exc.code, exc.message))
        request_id[i] = exc.request_id or _fallback_id(values[i], keys[i])
        ts_ms[i] = exc.ts_ms or 0
    return RequestBatch(request_id, ts_ms, num, cat, valid, errors, 0, codes)


def _categoricals(cat: np.ndarray, encoder: CategoryCodes | None, drop: np.ndarray) -> np.ndarray | None:
    """Normalise a parsed categorical block in place (int -> its decimal string, null -> ""),
    and its codes when `encoder` is given; rows with an integer orjson would read as a float
    are marked in `drop`."""
    codes = None
    if encoder is not None:  # codes, and where the ints are, in one pass (stream.codes)
        codes, int_at = encoder.encode_raw(cat, fresh=True)
        if int_at.size:
            _ints_to_strings(cat, int_at, drop)
        if cat.size:
            cat[codes == MISSING_CODE] = ""  # null (and "") -> ""
    else:
        types = set(map(type, cat.ravel().tolist()))
        if int in types:
            _ints_to_strings(cat, np.flatnonzero(_type_is(cat, int)), drop)
        if type(None) in types:
            cat[np.equal(cat, None)] = ""
    return codes


# --------------------------------------------------------------------------- typed fast path
#
# msgspec decodes a request straight into typed fields (numeric: float|null, categorical:
# str|int|null), validating every value while it parses: no dict per message, no key-order
# check, no per-value type check in Python. Its contract: a message it keeps decodes to exactly
# the row the checked path would give; everything else (refused by msgspec, or failing a batch
# check below) goes to the checked path. Unknown names are refused at both levels, so nothing
# is skipped unvalidated and unknown features are still counted there.

_use_typed = msgspec is not None  # tests switch it off to compare both paths
_ORJSON_INT = (-(2**63), 2**64 - 1)  # orjson's integer range: beyond it a JSON integer is a float


@lru_cache(maxsize=16)
def _typed_decoder(numeric: tuple[str, ...], categorical: tuple[str, ...]) -> Any:
    """The msgspec decoder of one feature spec (None without msgspec)."""
    if msgspec is None:
        return None
    kinds = [float | None] * len(numeric) + [str | int | None] * len(categorical)
    attrs = [f"f{i}" for i in range(len(kinds))]  # feature names need not be identifiers
    features = msgspec.defstruct("Features", [(a, k, None) for a, k in zip(attrs, kinds, strict=True)],
                                 rename=dict(zip(attrs, numeric + categorical, strict=True)),
                                 forbid_unknown_fields=True)
    unset, unset_t = msgspec.UNSET, msgspec.UnsetType
    request = msgspec.defstruct("Request", [
        ("v", int), ("request_id", str), ("ts_ms", int),
        ("features", features | unset_t, unset),
        ("fp", str | unset_t, unset),
        ("x", tuple[tuple(kinds)] | unset_t, unset),  # positional: the spec's length and kinds
    ], forbid_unknown_fields=True)
    return msgspec.json.Decoder(request)


def _decode_typed(decoder: Any, values: Sequence[bytes | None], spec: FeatureSpec, fingerprint: str,
                  max_bytes: int, encoder: CategoryCodes | None = None
                  ) -> tuple[list[int], list[str], list[int], np.ndarray, np.ndarray, np.ndarray | None]:
    """(indices, request ids, timestamps, num, cat, codes or None) of the messages that decode clean."""
    n_num, n_feat = len(spec.numeric), len(spec.names)
    decode = decoder.decode
    # 1. Parse. A clean batch is one C-level map; any failure -> message by message.
    try:
        if max(map(len, values), default=0) > max_bytes or not all(values):
            raise ValueError
        at, reqs = list(range(len(values))), list(map(decode, values))
    except Exception:  # noqa: BLE001 - which message and why is the checked path's job
        at, reqs = [], []
        for i, raw in enumerate(values):
            try:
                if raw and len(raw) <= max_bytes:
                    reqs.append(decode(raw))
                    at.append(i)
            except Exception:  # noqa: BLE001 - as above
                pass
    if not reqs:
        return ([], [], [], np.empty((0, n_num), np.float32), np.empty((0, n_feat - n_num), object),
                None if encoder is None else np.empty((0, n_feat - n_num), np.int64))

    # 2. Envelope, checked per column (types are msgspec's already).
    vs, rids, tss, feats, fps, xs = map(list, zip(*map(
        attrgetter("v", "request_id", "ts_ms", "features", "fp", "x"), reqs), strict=True))
    m, unset = len(reqs), msgspec.UNSET
    canonical = xs.count(unset) == m
    lens = list(map(len, rids))
    if not (vs.count(VERSION) == m and min(lens) > 0 and max(lens) <= MAX_REQUEST_ID_CHARS
            and min(tss) >= 0 and max(tss) <= MAX_TS_MS
            and (feats.count(unset) == 0 if canonical else fps.count(fingerprint) == m - xs.count(unset))
            and (canonical or all(f is not unset for f, x in zip(feats, xs, strict=True) if x is unset))):
        keep = [v == VERSION and 0 < k <= MAX_REQUEST_ID_CHARS and 0 <= t <= MAX_TS_MS
                and (f is not unset if x is unset else fp == fingerprint)
                for v, k, t, f, fp, x in zip(vs, lens, tss, feats, fps, xs, strict=True)]
        at, rids, tss, feats, xs = ([c for c, k in zip(col, keep, strict=True) if k]
                                    for col in (at, rids, tss, feats, xs))
        m = len(at)
        canonical = xs.count(unset) == m

    # 3. Rows in spec order: a struct's fields are the spec's names, a positional array is too.
    astuple = msgspec.structs.astuple
    payloads = map(astuple, feats) if canonical else (
        astuple(f) if x is unset else x for f, x in zip(feats, xs, strict=True))
    grid = np.fromiter(chain.from_iterable(payloads), dtype=object, count=m * n_feat).reshape(m, n_feat)
    with np.errstate(over="ignore"):
        num = grid[:, :n_num].astype(np.float32)  # floats and None (-> NaN) only
    drop = np.isinf(num).any(axis=1)  # beyond float32: the checked path words the error

    # 4. Categoricals: strings as they are, null -> "", integers as their decimal string (an
    #    integer orjson would read as a float is the checked path's: bad_categorical).
    cat = np.ascontiguousarray(grid[:, n_num:])
    codes = _categoricals(cat, encoder, drop)
    if drop.any():
        keep = (~drop).tolist()
        at, rids, tss = ([c for c, k in zip(col, keep, strict=True) if k] for col in (at, rids, tss))
        num, cat = num[~drop], cat[~drop]
        codes = None if codes is None else codes[~drop]
    return at, rids, tss, num, cat, codes


def _ints_to_strings(cat: np.ndarray, flat_at: np.ndarray, drop: np.ndarray) -> None:
    """Integer categoricals -> their decimal string, in place; a row with an integer orjson would
    read as a float is dropped to the checked path (bad_categorical)."""
    lo, hi = _ORJSON_INT
    width = cat.shape[1]
    flat = cat.reshape(-1)  # a view: cat is C-contiguous
    at = flat_at.tolist()
    vals = flat[flat_at].tolist()
    flat[flat_at] = [str(v) for v in vals]
    for i, v in zip(at, vals, strict=True):
        if not lo <= v <= hi:
            drop[i // width] = True


def _type_is(block: np.ndarray, t: type) -> np.ndarray:
    """bool mask of an object array's values of exactly type `t` (bool is not int here)."""
    flat = block.ravel().tolist()
    return np.fromiter((type(v) is t for v in flat), dtype=bool, count=len(flat)).reshape(block.shape)


def _decode_checked(values: Sequence[bytes | None], keys: Sequence[bytes | None], spec: FeatureSpec,
                    fingerprint: str, max_bytes: int) -> RequestBatch:
    """Every message parsed by orjson and checked in Python: exact error codes and messages."""
    n = len(values)
    names = spec.names
    n_num, n_cat, n_feat = len(spec.numeric), len(spec.categorical), len(spec.names)

    request_id = np.empty(n, dtype=object)
    ts_ms = np.zeros(n, dtype=np.int64)
    valid = np.zeros(n, dtype=bool)
    errors: dict[int, DecodeError] = {}

    def invalid(i: int, exc: _Invalid) -> None:
        errors[i] = DecodeError(i, exc.code, exc.message)
        request_id[i] = exc.request_id or _fallback_id(values[i], keys[i])
        if exc.ts_ms is not None:
            ts_ms[i] = exc.ts_ms

    # 1. Parse, message by message: a bad one costs only itself (a one-call parse of the
    #    joined batch was measured no faster, and crafted values could merge across messages).
    docs: list[Any] = []
    parsed: list[int] = []
    loads, add_doc, add_index = orjson.loads, docs.append, parsed.append
    for i, raw in enumerate(values):
        if not raw:
            invalid(i, _Invalid("empty", "no value (null or zero bytes)"))
        elif len(raw) > max_bytes:
            invalid(i, _Invalid("oversized", f"{len(raw)} bytes > limit {max_bytes}"))
        else:
            try:
                add_doc(loads(raw))
                add_index(i)
            except orjson.JSONDecodeError:
                invalid(i, _parse_failure(raw))
            except TypeError:
                invalid(i, _Invalid("not_json", f"value is {type(raw).__name__}, not bytes"))

    # 2. Envelope: request id, timestamp, canonical or positional payload.
    rows_at: list[int] = []
    rids: list[str] = []
    tss: list[int] = []
    canon_at: list[int] = []  # positions in rows_at that are canonical (feature dicts)
    payloads: list[Any] = []
    for i, doc in zip(parsed, docs, strict=True):
        try:
            rid, ts, payload, positional = _envelope(doc, fingerprint, n_feat)
        except _Invalid as exc:
            invalid(i, exc)
            continue
        if not positional:
            canon_at.append(len(rows_at))
        rows_at.append(i)
        rids.append(rid)
        tss.append(ts)
        payloads.append(payload)

    # 3. Canonical dicts -> rows in spec order. A dict whose keys are exactly the spec's names
    #    in order (what encode_requests writes) gives its values view as the row; any other
    #    gets a C-level itemgetter, or .get per name when some are absent.
    unknown = 0
    if canon_at:
        # orjson interns short keys, so comparing with a parsed key tuple mostly hits identity.
        first = tuple(payloads[canon_at[0]])
        ref = first if first == names else names
        same_keys = list(map(ref.__eq__, map(tuple, (payloads[j] for j in canon_at))))
        if not all(same_keys):
            name_set = frozenset(names)
            getter = _row_getter(names)
            for j, same in zip(canon_at, same_keys, strict=True):
                if not same:
                    f = payloads[j]
                    try:
                        payloads[j] = getter(f)
                        unknown += len(f) - n_feat
                    except KeyError:
                        payloads[j] = tuple(map(f.get, names))
                        unknown += len(f.keys() - name_set)
        for j, same in zip(canon_at, same_keys, strict=True):
            if same:
                payloads[j] = payloads[j].values()

    num = np.full((n, n_num), np.nan, dtype=np.float32)
    cat = np.full((n, n_cat), "", dtype=object)
    m = len(rows_at)
    if m:
        keep = np.ones(m, dtype=bool)
        bad_at: dict[int, _Invalid] = {}
        # One object matrix for the batch; fromiter never mistakes a list value for a dimension.
        grid = np.fromiter(chain.from_iterable(payloads), dtype=object, count=m * n_feat)
        grid = grid.reshape(m, n_feat)

        # 4. Numeric block: one type check, then one conversion (None -> NaN).
        if n_num:
            block = grid[:, :n_num]
            if not set(map(type, block.flat)) <= _NUMERIC_TYPES:
                for r, c in _first_bad(block, _NUMERIC_TYPES):
                    v = block[r, c]
                    bad_at[r] = _Invalid("non_numeric",
                                         f"feature {spec.numeric[c]!r} is {_kind(v)}, expected a number",
                                         rids[r], tss[r])
                    block[r] = None
            try:
                with np.errstate(over="ignore"):
                    block32 = block.astype(np.float32)  # None -> NaN; beyond float32 -> inf
            except OverflowError:  # an integer beyond float64
                block32 = np.array([[v if v is None or abs(v) < 1e308 else math.inf for v in row]
                                    for row in block.tolist()], dtype=np.float64)
                with np.errstate(over="ignore"):
                    block32 = block32.astype(np.float32)
            over = np.isinf(block32)  # orjson never yields inf: these overflowed float32
            if over.any():
                for r in np.flatnonzero(over.any(axis=1)).tolist():
                    c = int(np.argmax(over[r]))
                    bad_at.setdefault(r, _Invalid(
                        "non_finite", f"feature {spec.numeric[c]!r} = {block[r, c]:.6g} overflows float32",
                        rids[r], tss[r]))
                block32[over] = np.nan
            if m == n:
                num = block32
            else:
                num[rows_at] = block32

        # 5. Categorical block: strings as they are, integers as their decimal string, null -> "".
        if n_cat:
            block = np.ascontiguousarray(grid[:, n_num:])  # a copy, fixed in place below
            types = set(map(type, block.ravel()))
            if not types <= _CATEGORICAL_TYPES:
                for r, c in _first_bad(block, _CATEGORICAL_TYPES):
                    v = block[r, c]
                    bad_at.setdefault(r, _Invalid(
                        "bad_categorical",
                        f"feature {spec.categorical[c]!r} is {_kind(v)}, expected a string or integer",
                        rids[r], tss[r]))
                    block[r] = None
                types = set(map(type, block.ravel()))
            if int in types:
                is_int = np.fromiter((type(v) is int for v in block.ravel()), dtype=bool,
                                     count=block.size).reshape(block.shape)
                block[is_int] = [str(v) for v in block[is_int]]
            if type(None) in types:
                block[np.equal(block, None)] = ""
            if m == n:
                cat = block
            else:
                cat[rows_at] = block

        for r, exc in bad_at.items():
            keep[r] = False
            i = rows_at[r]
            num[i] = np.nan
            cat[i] = ""
            invalid(i, exc)
        good = [i for i, k in zip(rows_at, keep.tolist(), strict=True) if k]
        valid[good] = True
        request_id[rows_at] = rids  # invalid rows among them keep the body's id (same value)
        ts_ms[rows_at] = tss
    return RequestBatch(request_id, ts_ms, num, cat, valid,
                        [errors[i] for i in sorted(errors)], unknown)


def encode_request(request_id: str, ts_ms: int, features: dict[str, Any]) -> bytes:
    """One canonical request. NaN and None features are written as null (= missing)."""
    return orjson.dumps({"v": VERSION, "request_id": request_id, "ts_ms": int(ts_ms),
                         "features": features},
                        option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)


def _request_arrays(request_ids: Sequence[str], ts_ms: Sequence[int] | np.ndarray, num: np.ndarray,
                    cat: np.ndarray, spec: FeatureSpec) -> tuple[list[str], list[int], bytes, list[list]]:
    """Checked columns: ids, timestamps, the numeric matrix as JSON text, categorical rows.

    The numeric matrix is written by one orjson call: float32 in its shortest round-trip form
    (not the 17 digits of its float64 widening), NaN and inf as null.
    """
    num = np.asarray(num)
    if num.dtype != np.float32 and num.dtype != np.float64:
        num = num.astype(np.float64)
    cat = np.asarray(cat, dtype=object)
    _check_shapes(request_ids, ts_ms, num, cat, spec)
    num_text = orjson.dumps(np.ascontiguousarray(num), option=orjson.OPT_SERIALIZE_NUMPY)
    cat_rows = np.where((cat == "") | np.equal(cat, None), None, cat).tolist()
    return [str(r) for r in request_ids], np.asarray(ts_ms, dtype=np.int64).tolist(), num_text, cat_rows


def encode_requests(request_ids: Sequence[str], ts_ms: Sequence[int] | np.ndarray,
                    num: np.ndarray, cat: np.ndarray, spec: FeatureSpec) -> list[bytes]:
    """A batch of canonical requests from the matrices of `stream.features` (missing -> null).

    Features are written in spec order, every name present (the decoder's fastest case).
    """
    ids, tss, num_text, cat_rows = _request_arrays(request_ids, ts_ms, num, cat, spec)
    num_rows = orjson.loads(num_text) if spec.numeric else [[]] * len(ids)  # short-repr floats
    names = spec.names
    dumps = orjson.dumps
    return [dumps({"v": VERSION, "request_id": rid, "ts_ms": ts,
                   "features": dict(zip(names, nr + cr, strict=True))})
            for rid, ts, nr, cr in zip(ids, tss, num_rows, cat_rows, strict=True)]


def encode_requests_positional(request_ids: Sequence[str], ts_ms: Sequence[int] | np.ndarray,
                               num: np.ndarray, cat: np.ndarray, spec: FeatureSpec) -> list[bytes]:
    """A batch of positional requests (`fp` + `x` in `spec.names` order), spliced as bytes."""
    ids, tss, num_text, cat_rows = _request_arrays(request_ids, ts_ms, num, cat, spec)
    n = len(ids)
    # "[[a,b],[c,d]]" -> [b"a,b", b"c,d"]; numbers and null hold no brackets.
    num_rows = num_text[2:-2].split(b"],[") if n and spec.numeric else [b""] * n
    fp = spec.fingerprint().encode()
    sep = b"," if spec.numeric and spec.categorical else b""
    dumps = orjson.dumps
    return [b'{"v":1,"request_id":%b,"ts_ms":%d,"fp":"%b","x":[%b%b%b]}'
            % (dumps(rid), ts, fp, nt, sep, dumps(cr)[1:-1])
            for rid, ts, nt, cr in zip(ids, tss, num_rows, cat_rows, strict=True)]


# --------------------------------------------------------------------------- decisions


def round_sig(x: np.ndarray | float, digits: int = 6) -> np.ndarray:
    """Round to `digits` significant digits, vectorised (so JSON floats stay short)."""
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        mag = np.floor(np.log10(np.abs(x)))
        dec = np.clip(digits - 1 - np.nan_to_num(mag, nan=0.0, neginf=0.0, posinf=0.0), 0, 22)
        scale = 10.0 ** dec
        out = np.round(x * scale) / scale
    return np.where(np.isfinite(out), out, x)


def _column(x: Any, n: int, dtype: Any = np.float64) -> np.ndarray:
    arr = np.asarray(x, dtype=dtype)
    if arr.ndim == 0:
        return np.full(n, arr[()], dtype=dtype)
    if arr.shape[0] != n:
        raise ValueError(f"column of length {arr.shape[0]} for {n} decisions")
    return arr


def encode_decisions(
    request_id: Sequence[str] | np.ndarray,
    block: np.ndarray,
    reason: np.ndarray | Sequence[str],
    score: np.ndarray,
    uncertainty: np.ndarray,
    p: np.ndarray,
    *,
    threshold: float | np.ndarray,
    target_ratio: float | np.ndarray,
    model: str,
    ts_ms: np.ndarray | Sequence[int],
    latency_ms: float | np.ndarray,
    tasks: Sequence[str] = DEFAULT_TASKS,
    propensity: float | np.ndarray | None = None,
    tau_u: float | np.ndarray | None = None,
    u_tasks: np.ndarray | None = None,
) -> list[bytes]:
    """Decision event bodies, one per request, in order.

    `block` is bool[N]; `reason` is str[N] or int codes into REASONS; `p` is float[N, T] in
    `tasks` order. Invalid rows (reason "invalid") get null `score`, `uncertainty` and `p`;
    any NaN becomes null. `propensity` (per row, or one value for all), when given, is
    written on every row: the probability that the request took the path it took (stream.policy:
    epsilon for explore, 1 - epsilon for the rule path, 1 for invalid), for inverse-propensity
    weighting of the logged labels. `tau_u` (the uncertainty threshold in force) and `u_tasks`
    (float[N, T], per-task uncertainty) are written when given, so that a logged decision can be
    replayed exactly (`rta replay --thresholds logged`). Scores, probabilities and uncertainties
    are rounded to 6 significant digits; the thresholds are written at full precision, since a
    replay compares freshly computed scores against them.
    """
    n = len(request_id)
    reason_arr = np.asarray(reason)
    if reason_arr.dtype.kind in "iu":
        codes = _column(reason_arr, n, np.int64)
        if n and (codes.min() < 0 or codes.max() >= len(REASONS)):
            raise ValueError(f"decision reason codes outside 0..{len(REASONS) - 1}")
    else:
        names = _column(reason_arr, n, object)
        unknown = set(names.tolist()) - set(REASONS)
        if unknown:
            raise ValueError(f"unknown decision reason(s) {sorted(map(str, unknown))}; known: {REASONS}")
        codes = np.fromiter(map(_REASON_CODE.__getitem__, names.tolist()), np.int64, count=n)
    if n == 0:
        return []
    invalid = np.flatnonzero(codes == _INVALID_CODE).tolist()
    tasks = list(tasks)
    rid = request_id.tolist() if isinstance(request_id, np.ndarray) else list(request_id)
    parts: list[Any] = [
        repeat(b'{"v":1,"request_id":'), map(orjson.dumps, rid),  # one C call per id, escaped
        _DECISION_TEXT[codes * 2 + _column(block, n, bool)].tolist(),
        repeat(b',"score":'), _numbers(round_sig(_column(score, n)), invalid),
        repeat(b',"uncertainty":'), _numbers(round_sig(_column(uncertainty, n)), invalid),
        repeat(b',"p":'), _task_objects(p, n, tasks, invalid),
        repeat(b',"threshold":'), _numbers(_column(threshold, n)),  # full precision: replays compare to it
        repeat(b',"target_ratio":'), _numbers(round_sig(_column(target_ratio, n))),
        repeat(b',"model":' + orjson.dumps(model) + b',"ts_ms":'), _numbers(_column(ts_ms, n, np.int64)),
        repeat(b',"latency_ms":'), _numbers(round_sig(_column(latency_ms, n), 4))]
    # Optional fields, only when supplied.
    if propensity is not None:
        parts += [repeat(b',"propensity":'), _numbers(round_sig(_column(propensity, n)))]
    if tau_u is not None:
        parts += [repeat(b',"tau_u":'), _numbers(_column(tau_u, n))]
    if u_tasks is not None:
        parts += [repeat(b',"u":'), _task_objects(u_tasks, n, tasks, invalid)]
    parts.append(repeat(b"}"))
    return _rows(parts)


# `"decision":..,"reason":..` text per (reason code, blocked) (stream.policy.REASONS numbering).
_REASON_CODE = {r: i for i, r in enumerate(REASONS)}
_INVALID_CODE = REASONS.index("invalid")
_DECISION_TEXT = np.array([b',"decision":"%s","reason":"%s"' % (d, r.encode()) for r in REASONS
                           for d in (b"pass", b"block")], dtype=object)


def _rows(columns: list[Any]) -> list[bytes]:
    """Row i = the concatenation of every column's item i (constants as `repeat`): zip + join,
    both C, so building a batch's messages runs no Python per row."""
    return list(map(b"".join, zip(*columns, strict=False)))  # repeat() columns are endless


def _numbers(x: np.ndarray, null: list[int] | None = None) -> list[bytes]:
    """JSON text of each value of a 1-D column (orjson's shortest repr; NaN/inf -> null): one
    orjson call for the whole column, split at its commas. `null`: rows written as null."""
    out = orjson.dumps(np.ascontiguousarray(x), option=orjson.OPT_SERIALIZE_NUMPY)[1:-1].split(b",")
    for i in null or ():
        out[i] = b"null"
    return out


def _task_objects(v: np.ndarray, n: int, tasks: list[str], null: list[int]) -> list[bytes]:
    """{"task": value, ...} per row of float[N, T] (6 significant digits); null on `null` rows."""
    arr = round_sig(np.asarray(v, dtype=np.float64).reshape(n, len(tasks)))
    cols: list[Any] = []
    for k, t in enumerate(tasks):
        cols += [repeat((b"{" if k == 0 else b",") + orjson.dumps(t) + b":"), _numbers(arr[:, k])]
    out = _rows([*cols, repeat(b"}")]) if tasks else [b"{}"] * n
    for i in null:
        out[i] = b"null"
    return out


def decision_headers(model: str) -> list[tuple[str, bytes]]:
    """Kafka headers of a decision message: the model version that made it."""
    return [(MODEL_HEADER, model.encode("utf-8"))]


def decode_decision(raw: bytes) -> dict[str, Any]:
    """Parse one decision event (tests, replay, downstream consumers); ValueError if malformed."""
    doc = _loads_object(raw, "decision")
    if doc.get("v") != VERSION or doc.get("decision") not in DECISIONS or doc.get("reason") not in REASONS:
        raise ValueError(f"not a v{VERSION} decision event: {bytes(raw)[:120]!r}")
    if not _valid_request_id(doc.get("request_id")):
        raise ValueError("decision event without a valid request_id")
    return doc


# --------------------------------------------------------------------------- outcomes


def encode_outcome(request_id: str, event: str, ts_ms: int) -> bytes:
    """One outcome event: a funnel step (click/online/cart/deal) observed for a request."""
    if event not in OUTCOME_EVENTS:
        raise ValueError(f"unknown outcome event {event!r}; known: {', '.join(OUTCOME_EVENTS)}")
    return orjson.dumps({"request_id": request_id, "event": event, "ts_ms": int(ts_ms)})


def decode_outcome(raw: bytes) -> dict[str, Any]:
    """Parse and check one outcome event; ValueError if malformed."""
    doc = _loads_object(raw, "outcome")
    if not _valid_request_id(doc.get("request_id")):
        raise ValueError("outcome event without a valid request_id")
    if doc.get("event") not in OUTCOME_EVENTS:
        raise ValueError(f"outcome event {_brief(doc.get('event'))} not one of {OUTCOME_EVENTS}")
    if not _valid_ts(doc.get("ts_ms")):
        raise ValueError("outcome event ts_ms must be a non-negative integer")
    return doc


def _loads_object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"{what} event is not JSON: {exc}") from None
    if type(doc) is not dict:
        raise ValueError(f"{what} event is not a JSON object")
    return doc


# --------------------------------------------------------------------------- dead letters


class DeadLetter(NamedTuple):
    """What the worker produces to the DLQ topic for one invalid request."""

    index: int
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]


def dead_letter_headers(code: str, message: str, source_topic: str,
                        partition: int | None = None, offset: int | None = None) -> list[tuple[str, bytes]]:
    """Headers that say why a message was dead-lettered and where it came from."""
    headers = [
        (ERROR_HEADER, f"{code}: {message}".encode()),
        (ERROR_CODE_HEADER, code.encode()),
        (SOURCE_TOPIC_HEADER, source_topic.encode()),
    ]
    if partition is not None:
        headers.append((SOURCE_PARTITION_HEADER, str(int(partition)).encode()))
    if offset is not None:
        headers.append((SOURCE_OFFSET_HEADER, str(int(offset)).encode()))
    return headers


def dead_letters(batch: RequestBatch, values: Sequence[bytes | None], keys: Sequence[bytes | None] | None,
                 source_topic: str, partitions: Sequence[int] | None = None,
                 offsets: Sequence[int] | None = None) -> list[DeadLetter]:
    """One DeadLetter per invalid row: the original bytes (b"" for a null value) plus headers."""
    out = []
    for e in batch.errors:
        headers = dead_letter_headers(e.code, e.message, source_topic,
                                      partitions[e.index] if partitions is not None else None,
                                      offsets[e.index] if offsets is not None else None)
        key = keys[e.index] if keys is not None else None
        out.append(DeadLetter(e.index, key, bytes(values[e.index] or b""), headers))
    return out


# --------------------------------------------------------------------------- schemas


SCHEMAS = ("request", "decision", "outcome", "dead-letter-headers")


def load_schema(name: str) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of an event, shipped as package data."""
    if name not in SCHEMAS:
        raise ValueError(f"unknown schema {name!r}; known: {', '.join(SCHEMAS)}")
    return orjson.loads(resources.files("stream").joinpath(f"schemas/{name}.schema.json").read_bytes())
