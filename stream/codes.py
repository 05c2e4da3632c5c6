"""Categorical values -> the student's integer codes, before onnxruntime (bundle format 2).

Why: handing onnxruntime a string tensor costs more than the student's kernels (every Python
`str` becomes a `std::string`, ~0.7 ms per 512 x 40 batch) and the in-graph LabelEncoder costs
again. A format-2 graph takes `cat` as int64 codes instead, computed here from the vocabulary the
graph itself carries (its metadata, so the bundle stays self-contained and the sha256 of
`student.onnx` covers it). The worker (JSON values) and replay (Parquet dictionary columns) both
come through `CategoryCodes`, and `Preprocessor.transform` gives the same codes:

    "" or None -> 0 (missing), a value outside the column's vocabulary -> 1 (unknown, what the
    novelty score counts as unseen), vocab[j][k] -> k + 2.

An integer value is its decimal string (what the decoder makes of a JSON integer). Standard
library + numpy only.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from itertools import repeat
from typing import Any

import numpy as np

_DECIMAL = re.compile(r"-?[0-9]+")  # what a JSON integer's decimal string looks like

try:  # Arrow's hash lookup is the fast path; the dict pass is complete without it
    import pyarrow as pa
    import pyarrow.compute as pc
except ImportError:  # pragma: no cover - pyarrow is a serving dependency (stream.logger.codec)
    pa = pc = None

MISSING_CODE = 0
UNKNOWN_CODE = 1
FIRST_VOCAB_CODE = 2
CODES_FORMAT = 2  # bundle format of a graph whose `cat` input is codes (1: strings in the graph)


class CategoryCodes:
    """One vocabulary per categorical column; `encode` maps a whole batch in one dict pass.

    Every distinct value of every column gets one id in a union dictionary (C-level
    `dict.get` over the flattened batch, no Python per value); a [n_cat, n_words + 1] table then
    gives each column its own code of that id, as the old in-graph LabelEncoder + Gather did.
    """

    def __init__(self, vocab: Sequence[Sequence[str]]) -> None:
        self.vocab = [list(map(str, col)) for col in vocab]
        words = sorted({w for col in self.vocab for w in col})
        # A JSON integer means its decimal string: a vocabulary word that is one maps from the int
        # too, under an id of its own (>= _first_int), so the decoder can tell which values were ints.
        # ASCII digits only: str.isdigit() is also true for "²" or "①", which int() refuses
        ints = [w for w in words if _DECIMAL.fullmatch(w) and str(int(w)) == w]
        self._unknown = len(words)  # the id of every value in no vocabulary
        self._missing = len(words) + 1  # "" and None
        self._first_int = len(words) + 2
        self._wid: dict[object, int] = {w: i for i, w in enumerate(words)}
        width = self._first_int + len(ints)
        table = np.full((len(self.vocab), width), UNKNOWN_CODE, dtype=np.int64)
        table[:, self._missing] = MISSING_CODE
        for j, col in enumerate(self.vocab):
            if len(set(col)) != len(col) or "" in col:
                raise ValueError(f"vocabulary of categorical column {j} has duplicates or ''")
            table[j, [self._wid[w] for w in col]] = np.arange(FIRST_VOCAB_CODE, FIRST_VOCAB_CODE + len(col))
        for k, w in enumerate(ints):
            table[:, self._first_int + k] = table[:, self._wid[w]]
        self._wid.update({int(w): self._first_int + k for k, w in enumerate(ints)})
        self._wid[""] = self._wid[None] = self._missing  # type: ignore[index]
        self._flat_table = table.ravel()
        self._row = np.arange(len(self.vocab), dtype=np.int64) * width
        self.max_code = np.asarray([len(col) + FIRST_VOCAB_CODE - 1 for col in self.vocab], np.int64)
        self._value_set: Any = None  # Arrow's copy of the vocabulary, built on first use
        self._arrow_to_wid = np.zeros(0, np.int64)

    @property
    def n_columns(self) -> int:
        return len(self.vocab)

    def encode(self, cat: np.ndarray) -> np.ndarray:
        """object[N, n_cat] of str / int / None -> int64[N, n_cat] codes (C-contiguous)."""
        return self.encode_raw(cat)[0]

    def encode_raw(self, cat: np.ndarray, fresh: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(codes, flat positions of int values): what the decoder needs to also write the
        strings of integers, without a type check of every value.

        `fresh`: the strings were just parsed (one object per value, no cached hash), where
        Arrow's C++ lookup beats Python's dict (~2.5 vs ~3.5 us per 32-column request); for
        strings shared per distinct value (a loaded log, a bench pool) the dict pass is faster
        (cached hashes, identity hits: ~1.2 vs ~4.7 us per row)."""
        cat = np.asarray(cat, dtype=object)
        if cat.ndim != 2 or cat.shape[1] != len(self.vocab):
            raise ValueError(f"expected cat [N, {len(self.vocab)}], got {cat.shape}")
        ids = self._arrow_ids(cat) if fresh else None
        if ids is not None:  # strings and nulls only: no ints among them
            ids = ids.reshape(cat.shape)
            ids += self._row
            return self._flat_table[ids], np.zeros(0, np.int64)
        flat = cat.ravel().tolist()
        ids = np.fromiter(map(self._wid.get, flat, repeat(self._unknown)), dtype=np.int64, count=len(flat))
        ints = np.flatnonzero(ids >= self._first_int)
        unknown = np.flatnonzero(ids == self._unknown)
        if unknown.size:  # the vocabulary's tail, new sources: these get a type check
            types = np.fromiter(map(type, cat.ravel()[unknown]), dtype=object, count=unknown.size)
            is_int = np.equal(types, int)  # elementwise over the type objects (bool is not int)
            if is_int.any():
                ints = np.union1d(ints, unknown[is_int])
        ids = ids.reshape(cat.shape)
        ids += self._row
        return self._flat_table[ids], ints

    def union_vocabulary(self) -> tuple[list[str], list[int], int, int]:
        """(words, their union ids, the unknown id, the missing id): what the compiled request
        decoder (stream/_fastreq.c) looks strings up in, so that `codes_from_ids` of its ids
        gives exactly `encode`'s codes."""
        words = [w for w in self._wid if type(w) is str and w != ""]
        return words, [self._wid[w] for w in words], self._unknown, self._missing

    def codes_from_ids(self, ids: np.ndarray) -> np.ndarray:
        """int64[N, n_cat] union ids (`union_vocabulary`) -> codes; `ids` is reused in place."""
        ids += self._row
        return self._flat_table[ids]

    def _arrow_ids(self, cat: np.ndarray) -> np.ndarray | None:
        """Union ids through Arrow's C++ hash lookup, or None when a value is not a string/null
        (an int: the dict pass handles those)."""
        if pa is None or cat.size == 0:
            return None
        try:
            arr = pa.array(cat.ravel(), type=pa.string())
        except (pa.ArrowTypeError, pa.ArrowInvalid):  # ints, or a str Arrow cannot encode
            return None
        if self._value_set is None:
            words = sorted(w for w in self._wid if type(w) is str and w != "")
            # "" and null at the end, both the missing id; Arrow's index -> our union id
            self._value_set = pa.array([*words, "", None], type=pa.string())
            self._arrow_to_wid = np.array([*(self._wid[w] for w in words), self._missing, self._missing,
                                           self._unknown], dtype=np.int64)
        idx = pc.index_in(arr, value_set=self._value_set, skip_nulls=False)
        pos = pc.fill_null(idx, len(self._value_set)).to_numpy(zero_copy_only=False)  # not found -> unknown
        return self._arrow_to_wid[pos]

    def encode_dictionary(self, j: int, dictionary: Sequence[object], indices: np.ndarray,
                          null: np.ndarray | None = None) -> np.ndarray:
        """Codes of one dictionary-encoded column (Parquet/Arrow): the dictionary's few values
        are looked up once, then the int indices gather them, no Python string per row."""
        get, unknown = self._wid.get, self._unknown
        lut = self._flat_table[self._row[j] + np.fromiter(map(get, dictionary, repeat(unknown)), np.int64,
                                                          count=len(dictionary))]
        out = lut[np.asarray(indices, dtype=np.int64)] if len(lut) else np.zeros(len(indices), np.int64)
        if null is not None:
            out[np.asarray(null, dtype=bool)] = MISSING_CODE
        return out
