"""The bundle's score distribution: what the ratio controller decides from before its window fills.

A controller sets ``theta`` and ``tau_u`` as quantiles of the window's histograms. On a cold
stack, after a model switch, or on a burst after a quiet night, the window holds few (or no)
rows of the model now serving, and quantiles of nothing are nothing: the first thousands of
requests used to be decided with "block nothing". Training therefore records the served model's
distribution of ``e`` and ``u`` on held-out rows, in the same fixed bins the window uses
(``stream.window.HistSpec``), and the controller blends it in, weighted as ``prior_rows`` rows
less the live rows it already has (``stream.controller``).

``theta`` cuts only the rows that reach the score stage (``u < tau_u``), and ``e`` and ``u`` are
correlated, so one e-histogram of all rows would bias ``theta`` whenever ``p_u > 0``. The
distribution keeps the e-histogram per STRATUM of ``u`` (``strata`` equal-count groups of u-bins,
32 by default): the e-histogram below any ``tau_u`` is the strata wholly below it plus the share
of the stratum ``tau_u`` falls in that lies below it (within a stratum e is taken as independent
of u).

In the manifest (key ``score_distribution``) histograms are sparse strings ``"bin:count ..."``:
one line per stratum in the indented JSON, a few tens of kB, not 33k numbers one per line.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stream.errors import BundleError
from stream.window import HistSpec

FORMAT = 1
KEY = "score_distribution"
SPEC_FIELDS = ("e_bins", "u_bins", "e_lo", "e_hi", "u_lo", "u_hi")


@dataclass(frozen=True)
class ScoreDistribution:
    """Fixed-bin histograms of a model's ``e`` and ``u`` on held-out rows (module docstring)."""

    spec: HistSpec
    u_hist: np.ndarray  # int64[u_bins]: u of every row
    strata_end: np.ndarray  # int64[K]: stratum k holds u-bins [strata_end[k-1], strata_end[k])
    e_hists: np.ndarray  # int64[K, e_bins]: e of the rows of each u-stratum
    fitted_on: str = ""

    @property
    def rows(self) -> int:
        return int(self.u_hist.sum())

    @classmethod
    def fit(cls, e: np.ndarray, u: np.ndarray, spec: HistSpec | None = None, strata: int = 32,
            fitted_on: str = "") -> ScoreDistribution:
        """From served scores and uncertainties of held-out rows (non-finite ones are dropped:
        such a row is invalid live, and invalid rows are in neither histogram)."""
        spec = spec or HistSpec()
        e, u = np.asarray(e, np.float64), np.asarray(u, np.float64)
        keep = np.isfinite(e) & np.isfinite(u)
        if not keep.any():
            raise ValueError("no finite (e, u) row to fit a score distribution on")
        eb, ub = spec.e_index(e[keep]), spec.u_index(u[keep])
        u_hist = np.bincount(ub, minlength=spec.u_bins).astype(np.int64)
        cum = np.cumsum(u_hist)
        cuts = np.searchsorted(cum, np.arange(1, strata) * cum[-1] / strata, side="left") + 1
        ends = np.unique(np.concatenate([cuts[cuts < spec.u_bins], [spec.u_bins]])).astype(np.int64)
        sid = np.searchsorted(ends, ub, side="right")
        e_hists = np.bincount(sid * spec.e_bins + eb, minlength=len(ends) * spec.e_bins)
        return cls(spec, u_hist, ends, e_hists.reshape(len(ends), spec.e_bins).astype(np.int64), fitted_on)

    # --- what the controller reads -----------------------------------------------------------

    def e_below(self, tau_u: float) -> np.ndarray:
        """float64[e_bins]: e-histogram of the rows with ``u < tau_u`` (the score stage's rows)."""
        spec = self.spec
        if not tau_u > 0:
            return np.zeros(spec.e_bins)
        if math.isinf(tau_u):
            return self.e_hists.sum(axis=0).astype(np.float64)
        x = (math.log10(tau_u) - spec.u_lo) * spec.u_bins / (spec.u_hi - spec.u_lo)
        j = min(max(int(math.floor(x)), 0), spec.u_bins)  # bin tau_u falls in (u_bins: above all)
        frac = min(max(x - j, 0.0), 1.0) if j < spec.u_bins else 0.0
        k = int(np.searchsorted(self.strata_end, j, side="right"))  # stratum holding bin j
        out = self.e_hists[:k].sum(axis=0).astype(np.float64)
        if k < len(self.strata_end):
            start = int(self.strata_end[k - 1]) if k > 0 else 0
            mass = float(self.u_hist[start:self.strata_end[k]].sum())
            below = float(self.u_hist[start:j].sum()) + frac * float(self.u_hist[j])
            if mass > 0:
                out += (below / mass) * self.e_hists[k]
        return out

    def window(self, rows: float, tau_u: float, epsilon: float) -> np.ndarray:
        """float64 window-layout vector of ``rows`` requests drawn from this distribution and
        decided at ``tau_u`` with explore share ``epsilon`` (only the fields the controller's
        quantiles read: total, the u-histogram, the score stage's e-histogram)."""
        spec = self.spec
        out = np.zeros(spec.size)
        n = float(self.rows)
        if rows <= 0 or n <= 0:
            return out
        out[0] = rows
        out[spec.u_slice] = self.u_hist * (rows / n)
        out[spec.e_slice] = self.e_below(tau_u) * (rows * (1.0 - epsilon) / n)
        return out

    # --- the manifest --------------------------------------------------------------------------

    def to_manifest(self) -> dict[str, Any]:
        spec = self.spec
        return {
            "format": FORMAT,
            "fitted_on": self.fitted_on,
            "rows": self.rows,
            "spec": {f: getattr(spec, f) for f in SPEC_FIELDS},
            "u_hist": _sparse(self.u_hist),
            "strata": [{"u_bins_end": int(end), "e_hist": _sparse(h)}
                       for end, h in zip(self.strata_end, self.e_hists, strict=True)],
        }

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any], spec: HistSpec | None = None,
                      where: str = "manifest") -> ScoreDistribution | None:
        """The bundle's distribution, or None when it has none (a bundle trained before it
        existed) or one in other bins than ``spec`` (the controller then starts from its window
        alone). A malformed one is a BundleError: the bundle is refused like any corrupt file."""
        spec = spec or HistSpec()
        d = manifest.get(KEY)
        if d is None:
            return None
        try:
            if not isinstance(d, dict) or d.get("format") != FORMAT:
                raise ValueError(f"unsupported format {d.get('format') if isinstance(d, dict) else d!r:.40}")
            if {f: d["spec"][f] for f in SPEC_FIELDS} != {f: getattr(spec, f) for f in SPEC_FIELDS}:
                return None
            u_hist = _dense(d["u_hist"], spec.u_bins, "u_hist")
            strata = d["strata"]
            if not isinstance(strata, list) or not strata:
                raise ValueError("'strata' must be a non-empty list")
            ends = np.array([int(s["u_bins_end"]) for s in strata], np.int64)
            if ends[-1] != spec.u_bins or np.any(np.diff(ends) <= 0) or ends[0] <= 0:
                raise ValueError("strata must end at increasing u-bins, the last at u_bins")
            e_hists = np.stack([_dense(s["e_hist"], spec.e_bins, f"strata[{i}].e_hist")
                                for i, s in enumerate(strata)])
            starts = np.concatenate([[0], ends[:-1]])
            per_stratum = np.add.reduceat(u_hist, starts)
            if not np.array_equal(per_stratum, e_hists.sum(axis=1)):
                raise ValueError("each stratum's e-histogram must count the rows of its u-bins")
            if int(d["rows"]) != int(u_hist.sum()) or u_hist.sum() <= 0:
                raise ValueError(f"'rows' {d['rows']} is not the histogram's {int(u_hist.sum())} (> 0)")
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise BundleError(f"{where}: malformed {KEY!r} ({type(exc).__name__}: {exc})") from None
        return cls(spec, u_hist, ends, e_hists, str(d.get("fitted_on", "")))

    def summary(self) -> dict[str, Any]:
        """What `rta model show` prints: rows and the quantiles an operator can sanity-check."""
        spec = self.spec
        e_all = self.e_hists.sum(axis=0)

        def q(h: np.ndarray, p: float, lo: float, hi: float) -> float:
            from stream.window import hist_quantile

            return hist_quantile(h, p * h.sum(), lo, hi)

        return {"rows": self.rows, "strata": len(self.strata_end), "fitted_on": self.fitted_on,
                "e_quantiles": {str(p): round(spec.e_value(q(e_all, p, spec.e_lo, spec.e_hi)), 6)
                                for p in (0.1, 0.5, 0.9)},
                "u_quantiles": {str(p): float(f"{spec.u_value(q(self.u_hist, p, spec.u_lo, spec.u_hi)):.4g}")
                                for p in (0.1, 0.5, 0.9)}}


def fit_bundle(bundle_dir: str | Path, num: np.ndarray, cat: np.ndarray, fitted_on: str,
               spec: HistSpec | None = None) -> ScoreDistribution:
    """The distribution of what ``bundle_dir`` SERVES (its ONNX graph and score function, via
    the worker's own score step) on raw held-out rows ``num``/``cat`` in the bundle's spec order."""
    from stream.engine import score_batch
    from stream.policy import ScorePolicy
    from stream.scorer import Scorer

    scorer = Scorer.load(bundle_dir)
    policy = ScorePolicy.from_manifest(scorer.manifest)
    num = np.asarray(num, np.float32)
    out = score_batch(scorer, policy, num, scorer.codes(np.asarray(cat, dtype=object)))
    valid = ~np.isinf(num).any(axis=1)  # the decoder refuses such a row: invalid live
    return ScoreDistribution.fit(out.e[valid], out.u[valid], spec, fitted_on=fitted_on)


def write_bundle_distribution(bundle_dir: str | Path, num: np.ndarray, cat: np.ndarray,
                              fitted_on: str) -> ScoreDistribution:
    """Fit and store it in the bundle's manifest (before the bundle is published)."""
    from model.bundle import update_manifest

    dist = fit_bundle(bundle_dir, num, cat, fitted_on)
    update_manifest(bundle_dir, **{KEY: dist.to_manifest()})
    return dist


def _sparse(h: np.ndarray) -> str:
    nz = np.flatnonzero(h)
    return " ".join(f"{i}:{int(c)}" for i, c in zip(nz.tolist(), h[nz].tolist(), strict=True))


def _dense(s: Any, bins: int, name: str) -> np.ndarray:
    if not isinstance(s, str):
        raise TypeError(f"{name} must be a 'bin:count ...' string")
    flat = np.array(s.replace(":", " ").split(), dtype=np.int64) if s.strip() else np.zeros(0, np.int64)
    if len(flat) % 2:
        raise ValueError(f"{name}: odd number of bin/count fields")
    idx, cnt = flat[0::2], flat[1::2]
    if np.any(idx < 0) or np.any(idx >= bins) or np.any(cnt < 0) or len(np.unique(idx)) != len(idx):
        raise ValueError(f"{name}: bins outside 0..{bins - 1}, repeated, or negative counts")
    out = np.zeros(bins, np.int64)
    out[idx] = cnt
    return out
