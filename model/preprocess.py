"""Raw feature batch -> network inputs, fitted on training traffic.

The same formula runs twice: here in numpy (training, the teacher, tests) and inside the
student's ONNX graph (serving). `model/export.py` reproduces `transform` op for op, so the
two must change together. Numpy only: no torch.

Numeric column j (float32 throughout):
    v = sign(x) * log(1 + |x|)   if num_log[j] else x
    z = clip((v - num_center[j]) / num_scale[j], -clip, clip), NaN -> 0
    x_out = [z..., isnan(x)...]                                  float32[N, 2 * n_num]
Categorical column j: "" -> 0 (missing), out of vocabulary -> 1 (unknown), vocab[j][k] -> k + 2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from stream.codes import FIRST_VOCAB_CODE, MISSING_CODE, UNKNOWN_CODE
from stream.features import FeatureSpec

# One numbering of categorical codes: the serving encoder's (stream.codes), the network's here.
MISSING_INDEX = MISSING_CODE
UNKNOWN_INDEX = UNKNOWN_CODE
FIRST_VOCAB_INDEX = FIRST_VOCAB_CODE
_FIT_SAMPLE = 200_000  # rows used to fit numeric statistics (quantiles/moments are stable by then)
_SKEW_FOR_LOG = 2.0


def signed_log1p(x: np.ndarray) -> np.ndarray:
    """sign(x) * log(1 + |x|) in float32, written the way the ONNX graph computes it."""
    x = np.asarray(x, dtype=np.float32)
    return (np.sign(x) * np.log(np.float32(1.0) + np.abs(x))).astype(np.float32, copy=False)


def _skew(v: np.ndarray) -> float:
    if v.size < 3:
        return 0.0
    v = v.astype(np.float64)
    sd = v.std()
    if not np.isfinite(sd) or sd <= 0:
        return 0.0
    return float(np.mean(((v - v.mean()) / sd) ** 3))


@dataclass
class Preprocessor:
    """Fitted normalisation and vocabularies for one feature spec (stored in the bundle)."""

    spec: FeatureSpec
    num_center: np.ndarray  # float32[n_num]
    num_scale: np.ndarray  # float32[n_num]
    num_log: np.ndarray  # bool[n_num]
    vocab: list[list[str]]  # per categorical column, most frequent first
    clip: float = 5.0

    def __post_init__(self) -> None:
        n_num, n_cat = len(self.spec.numeric), len(self.spec.categorical)
        self.num_center = np.asarray(self.num_center, dtype=np.float32).reshape(n_num)
        self.num_scale = np.asarray(self.num_scale, dtype=np.float32).reshape(n_num)
        self.num_log = np.asarray(self.num_log, dtype=bool).reshape(n_num)
        self.vocab = [list(v) for v in self.vocab]
        if len(self.vocab) != n_cat:
            raise ValueError(f"vocab has {len(self.vocab)} columns, spec has {n_cat} categorical")
        if np.any(self.num_scale <= 0) or not np.all(np.isfinite(self.num_scale)):
            raise ValueError("num_scale must be finite and > 0")
        for j, words in enumerate(self.vocab):
            if "" in words:
                raise ValueError(f"vocab of {self.spec.categorical[j]!r} contains '' (reserved for missing)")
            if len(set(words)) != len(words):
                raise ValueError(f"vocab of {self.spec.categorical[j]!r} has duplicates")
        self._lookup = [{w: i + FIRST_VOCAB_INDEX for i, w in enumerate(words)} for words in self.vocab]

    # ---- fitting -------------------------------------------------------------------------
    @classmethod
    def fit(
        cls,
        spec: FeatureSpec,
        num: np.ndarray,
        cat: np.ndarray,
        max_vocab: int = 1000,
        min_count: int = 5,
        clip: float = 5.0,
        seed: int = 0,
    ) -> Preprocessor:
        """Fit centring/scaling (log for skewed columns) and frequency-capped vocabularies."""
        num = np.asarray(num, dtype=np.float32)
        cat = np.asarray(cat, dtype=object)
        n = num.shape[0]
        if num.shape != (n, len(spec.numeric)) or cat.shape != (n, len(spec.categorical)):
            raise ValueError(f"fit needs num [N, {len(spec.numeric)}] and cat [N, {len(spec.categorical)}], "
                             f"got {num.shape} and {cat.shape}")
        if n > _FIT_SAMPLE:
            rows = np.random.default_rng(seed).choice(n, _FIT_SAMPLE, replace=False)
            sample = num[rows]
        else:
            sample = num
        n_num = len(spec.numeric)
        center = np.zeros(n_num, np.float32)
        scale = np.ones(n_num, np.float32)
        use_log = np.zeros(n_num, bool)
        for j in range(n_num):
            col = sample[:, j]
            col = col[np.isfinite(col)]
            if col.size == 0:
                continue
            logged = signed_log1p(col)
            raw_skew = abs(_skew(col))
            use_log[j] = raw_skew > _SKEW_FOR_LOG and abs(_skew(logged)) < raw_skew
            v = (logged if use_log[j] else col).astype(np.float64)
            center[j] = np.float32(v.mean())
            sd = v.std()
            scale[j] = np.float32(sd) if np.isfinite(sd) and sd > 1e-6 else np.float32(1.0)
        vocab: list[list[str]] = []
        for j in range(len(spec.categorical)):
            values, counts = np.unique(cat[:, j].astype(str), return_counts=True)
            keep = (counts >= min_count) & (values != "")
            values, counts = values[keep], counts[keep]
            order = np.lexsort((values, -counts))[:max_vocab]  # frequency desc, then value
            vocab.append([str(v) for v in values[order]])
        return cls(spec, center, scale, use_log, vocab, clip)

    # ---- applying ------------------------------------------------------------------------
    def transform(self, num: np.ndarray, cat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Raw batch -> (x float32[N, 2*n_num], idx int64[N, n_cat])."""
        n_num, n_cat = len(self.spec.numeric), len(self.spec.categorical)
        num = np.asarray(num, dtype=np.float32)
        if num.ndim != 2 or num.shape[1] != n_num:
            raise ValueError(f"num must be [N, {n_num}], got {num.shape}")
        cat = np.asarray(cat, dtype=object)
        if cat.ndim != 2 or cat.shape[1] != n_cat or cat.shape[0] != num.shape[0]:
            raise ValueError(f"cat must be [{num.shape[0]}, {n_cat}], got {cat.shape}")
        x = self.transform_numeric(num)
        idx = np.empty((num.shape[0], n_cat), dtype=np.int64)
        for j in range(n_cat):
            idx[:, j] = self._encode_column(j, cat[:, j])
        return x, idx

    def transform_numeric(self, num: np.ndarray) -> np.ndarray:
        """The numeric half of `transform`: float32[N, n_num] -> x float32[N, 2 * n_num]. For a
        caller whose categoricals are codes already (stream.codes: the same numbering)."""
        num = np.asarray(num, dtype=np.float32)
        missing = np.isnan(num)
        v = np.where(self.num_log, signed_log1p(num), num)
        with np.errstate(over="ignore", invalid="ignore"):  # +-inf is clipped just below
            z = (v - self.num_center) / self.num_scale
        z = np.clip(z, -self.clip, self.clip)
        z[missing] = 0.0
        return np.concatenate([z, missing.astype(np.float32)], axis=1).astype(np.float32, copy=False)

    def _encode_column(self, j: int, col: np.ndarray) -> np.ndarray:
        if col.size == 0:
            return np.empty(0, np.int64)
        uniques, inverse = np.unique(col.astype(str), return_inverse=True)
        lookup = self._lookup[j]
        codes = np.fromiter(
            (MISSING_INDEX if u == "" else lookup.get(u, UNKNOWN_INDEX) for u in uniques.tolist()),
            dtype=np.int64, count=uniques.size,
        )
        return codes[inverse.reshape(-1)]

    @property
    def n_inputs(self) -> int:
        """Width of the numeric network input x (values + missing indicators)."""
        return 2 * len(self.spec.numeric)

    @property
    def cardinalities(self) -> list[int]:
        """Embedding table size per categorical column (vocab + missing + unknown)."""
        return [len(v) + FIRST_VOCAB_INDEX for v in self.vocab]

    # ---- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": 1,
            "spec": self.spec.to_dict(),
            "num_center": [float(v) for v in self.num_center],
            "num_scale": [float(v) for v in self.num_scale],
            "num_log": [bool(v) for v in self.num_log],
            "vocab": self.vocab,
            "clip": float(self.clip),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessor:
        return cls(
            spec=FeatureSpec.from_dict(d["spec"]),
            num_center=np.asarray(d["num_center"], np.float32),
            num_scale=np.asarray(d["num_scale"], np.float32),
            num_log=np.asarray(d["num_log"], bool),
            vocab=d["vocab"],
            clip=float(d.get("clip", 5.0)),
        )
