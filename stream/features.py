"""Feature spec: which named features a model reads, of which kind, in which order.

The spec is data (it travels in the bundle manifest as JSON) and its fingerprint is what a
positional request must carry to skip name lookup. Both the trainer and the codec use this
module; it needs only the standard library and numpy.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import orjson

NUMERIC = "numeric"
CATEGORICAL = "categorical"
RESERVED_COLUMNS = frozenset(
    {"request_id", "ts_ms", "click", "online", "cart", "deal", "passed", "propensity",
     "true_click", "true_online", "true_cart", "true_deal",
     # synthetic worlds: which traffic source a row came from ("known", "new", ...); truth,
     # for evaluation only, never a feature
     "true_source"}
)
DEFAULT_TASKS = ("click", "online", "cart", "deal")


@dataclass(frozen=True)
class FeatureSpec:
    """Ordered numeric and categorical feature names.

    A batch of requests becomes `num: float32[N, len(numeric)]` (NaN = missing) and
    `cat: object[N, len(categorical)]` of str ("" = missing), in this order.
    """

    numeric: tuple[str, ...]
    categorical: tuple[str, ...]

    def __post_init__(self) -> None:
        names = self.numeric + self.categorical
        if len(set(names)) != len(names):
            raise ValueError("feature names must be unique across kinds")

    @property
    def names(self) -> tuple[str, ...]:
        return self.numeric + self.categorical

    def fingerprint(self) -> str:
        """Stable 16-hex-digit digest of names, kinds and order."""
        blob = orjson.dumps({"numeric": list(self.numeric), "categorical": list(self.categorical)})
        return hashlib.sha256(blob).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return {"numeric": list(self.numeric), "categorical": list(self.categorical),
                "fingerprint": self.fingerprint()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureSpec:
        spec = cls(tuple(data["numeric"]), tuple(data["categorical"]))
        if "fingerprint" in data and data["fingerprint"] != spec.fingerprint():
            raise ValueError(
                f"feature spec fingerprint {data['fingerprint']} does not match its names "
                f"({spec.fingerprint()})"
            )
        return spec
