"""SWAG: a Gaussian posterior over the network's weights from its own SGD trajectory.

Maddox et al. 2019 ("A Simple Baseline for Bayesian Uncertainty in Deep Learning"); the DAUM
paper's Eq. 29. Snapshots theta_1..theta_n of the flattened weights are collected during the
last epochs of training. After n snapshots:

    mu         = (1/n) sum_i theta_i                            (SWA mean)
    sq_mean    = (1/n) sum_i theta_i^2                          (second moment)
    Sigma_diag = max(sq_mean - mu^2, 0)                         (diagonal covariance, clamped)
    D          = [theta_i - mu_i]  for the last K snapshots     (deviation matrix, P x K;
                 mu_i = the running mean right after snapshot i, as in the reference code)

and a weight sample with scale s (s multiplies the covariance) is

    low-rank + diagonal (default):
        w = mu + sqrt(s) * ( Sigma_diag^(1/2) z1 / sqrt(2) + D z2 / sqrt(2 (K - 1)) )
    diagonal only:
        w = mu + sqrt(s) * Sigma_diag^(1/2) z1

with z1 ~ N(0, I_P), z2 ~ N(0, I_K). So Cov(w) = s (Sigma_diag / 2 + D D^T / (2 (K - 1))),
resp. s Sigma_diag; s = 0 gives the SWA mean. Moments are kept in float64: Sigma_diag is a
small difference of two large numbers.

Unlike the reference implementation there is no module surgery: the posterior works on one
flat parameter vector, and inference runs the unchanged network with sampled weights. Two ways
to run the M passes: `"loop"` copies each sample into the model and runs it (the default), and
`"vmap"` runs all M at once with `torch.vmap` over `torch.func.functional_call`. Measured with
`python -m bench.swag_passes` (docs/results.md): the loop is as fast at batch 512 and 1.4-1.7x
faster at batch 4096 - vmap turns every Linear into a batched matmul over M weight copies and
materialises [M, N, ...] activations, while the loop keeps plain addmm on contiguous weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from model.uncertainty import TeacherPrediction, summarise_samples


class SWAG:
    """Running SWAG statistics over a flat weight vector of length `n_params`."""

    def __init__(self, n_params: int, max_rank: int = 20, diag_only: bool = False) -> None:
        if max_rank < 0:
            raise ValueError("max_rank must be >= 0")
        self.n_params = n_params
        self.max_rank = max_rank
        self.diag_only = diag_only or max_rank == 0
        self.n_snapshots = 0
        self.mean = torch.zeros(n_params, dtype=torch.float64)
        self.sq_mean = torch.zeros(n_params, dtype=torch.float64)
        self.deviations = torch.zeros(0, n_params, dtype=torch.float32)  # [K, P], oldest first
        self.base_rate: np.ndarray | None = None  # per-task training base rate (for uncertainty)

    # ---- collecting -----------------------------------------------------------------------
    def collect(self, weights: Tensor) -> None:
        """Add one snapshot (a flat weight vector): running first/second moments + deviation."""
        w = weights.detach().to(torch.float64).flatten()
        if w.numel() != self.n_params:
            raise ValueError(f"snapshot has {w.numel()} weights, expected {self.n_params}")
        n = self.n_snapshots
        self.mean = (self.mean * n + w) / (n + 1)
        self.sq_mean = (self.sq_mean * n + w * w) / (n + 1)
        self.n_snapshots = n + 1
        if not self.diag_only:
            dev = (w - self.mean).to(torch.float32).unsqueeze(0)
            self.deviations = torch.cat([self.deviations, dev])[-self.max_rank :]

    def collect_model(self, model: nn.Module) -> None:
        self.collect(parameters_to_vector(model.parameters()))

    # ---- the posterior --------------------------------------------------------------------
    @property
    def variance(self) -> Tensor:
        """Sigma_diag, clamped at 0 (rounding can make sq_mean - mean^2 slightly negative)."""
        return torch.clamp(self.sq_mean - self.mean**2, min=0.0)

    @property
    def rank(self) -> int:
        """K: deviation columns in use (the low-rank term needs K >= 2)."""
        return 0 if self.diag_only else int(self.deviations.shape[0])

    def sample(self, n: int = 1, scale: float = 1.0, generator: torch.Generator | None = None,
               diag_only: bool | None = None) -> Tensor:
        """n weight vectors [n, P] (float32) drawn from the posterior; see the module docstring."""
        if self.n_snapshots == 0:
            raise RuntimeError("SWAG has no snapshots yet")
        diag_only = self.diag_only if diag_only is None else diag_only
        low_rank = not diag_only and self.rank >= 2
        std = self.variance.sqrt()
        z1 = torch.randn(n, self.n_params, generator=generator, dtype=torch.float64)
        noise = z1 * std
        if low_rank:
            k = self.rank
            z2 = torch.randn(n, k, generator=generator, dtype=torch.float64)
            noise = noise / math.sqrt(2.0) + (z2 @ self.deviations.to(torch.float64)) / math.sqrt(2.0 * (k - 1))
        return (self.mean + math.sqrt(scale) * noise).to(torch.float32)

    def load_mean(self, model: nn.Module) -> None:
        """Put the SWA mean into the model (the single-pass SWA network)."""
        vector_to_parameters(self.mean.to(torch.float32), model.parameters())

    # ---- inference ------------------------------------------------------------------------
    @torch.no_grad()
    def sample_logits(self, model: nn.Module, x: np.ndarray | Tensor, idx: np.ndarray | Tensor,
                      n_samples: int = 11, scale: float = 1.0, seed: int = 0,
                      method: str = "loop", batch_size: int = 4096) -> Tensor:
        """Logits [M, N, T] of the network under M sampled weight vectors."""
        gen = torch.Generator().manual_seed(seed)
        weights = self.sample(n_samples, scale=scale, generator=gen)
        x = torch.as_tensor(x, dtype=torch.float32)
        idx = torch.as_tensor(idx, dtype=torch.long)
        if method not in ("loop", "vmap"):
            raise ValueError(f"method must be 'loop' or 'vmap', got {method!r}")
        run = _forward_vmap if method == "vmap" else _forward_loop
        was_training = model.training
        model.eval()
        try:
            chunks = [run(model, weights, x[s : s + batch_size], idx[s : s + batch_size])
                      for s in range(0, x.shape[0], batch_size)]
        finally:
            model.train(was_training)
        return torch.cat(chunks, dim=1) if chunks else torch.zeros(n_samples, 0, 0)

    def predict(self, model: nn.Module, x: np.ndarray | Tensor, idx: np.ndarray | Tensor,
                n_samples: int = 11, scale: float = 1.0, seed: int = 0,
                base_rate: np.ndarray | None = None, method: str = "loop",
                batch_size: int = 4096) -> TeacherPrediction:
        """Per task: mean and variance of the M sampled probabilities, plus the other measures.

        `method="loop"` (default, measured faster) loads each sample into the model in turn;
        `"vmap"` batches the M passes as one vectorised call. Same numbers.
        """
        logits = self.sample_logits(model, x, idx, n_samples, scale, seed, method, batch_size)
        rate = self.base_rate if base_rate is None else base_rate
        return summarise_samples(logits.numpy(), rate)

    # ---- persistence ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "n_params": self.n_params, "max_rank": self.max_rank, "diag_only": self.diag_only,
            "n_snapshots": self.n_snapshots, "mean": self.mean, "sq_mean": self.sq_mean,
            "deviations": self.deviations,
            "base_rate": None if self.base_rate is None else [float(v) for v in self.base_rate],
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> SWAG:
        swag = cls(state["n_params"], state["max_rank"], state["diag_only"])
        swag.n_snapshots = int(state["n_snapshots"])
        swag.mean = state["mean"].to(torch.float64)
        swag.sq_mean = state["sq_mean"].to(torch.float64)
        swag.deviations = state["deviations"].to(torch.float32)
        if state.get("base_rate") is not None:
            swag.base_rate = np.asarray(state["base_rate"], dtype=np.float64)
        return swag


@dataclass
class _Layout:
    names: list[str]
    shapes: list[torch.Size]
    sizes: list[int]


def _layout(model: nn.Module) -> _Layout:
    named = list(model.named_parameters())
    return _Layout([n for n, _ in named], [p.shape for _, p in named], [p.numel() for _, p in named])


def _unflatten(flat: Tensor, layout: _Layout) -> dict[str, Tensor]:
    parts = torch.split(flat, layout.sizes)
    return {n: p.view(s) for n, p, s in zip(layout.names, parts, layout.shapes, strict=True)}


def _forward_vmap(model: nn.Module, weights: Tensor, x: Tensor, idx: Tensor) -> Tensor:
    """All M weight samples in one vectorised call: torch.vmap over functional_call."""
    layout = _layout(model)
    buffers = dict(model.named_buffers())

    def one(flat: Tensor) -> Tensor:
        return functional_call(model, ({**_unflatten(flat, layout)}, buffers), (x, idx))

    return torch.vmap(one)(weights)


def _forward_loop(model: nn.Module, weights: Tensor, x: Tensor, idx: Tensor) -> Tensor:
    """Reference path: copy each sample into the model, one forward pass each, then restore."""
    original = parameters_to_vector(model.parameters()).clone()
    try:
        outs = []
        for w in weights:
            vector_to_parameters(w, model.parameters())
            outs.append(model(x, idx))
        return torch.stack(outs)
    finally:
        vector_to_parameters(original, model.parameters())
