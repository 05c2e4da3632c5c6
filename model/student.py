"""The distilled student: one forward pass gives every task's probability and uncertainty.

DAUM's acceleration (paper Sec. III-E): instead of M SWAG passes of the teacher, a compact
network learns, per task, a probability head (true labels, plus optionally the teacher's mean
as a soft label) and an uncertainty head (regression on the teacher's uncertainty).

    x, idx  --(embeddings, concat)-->  shared bottom MLP  -->  h
    h --> Linear(2*T*head_hidden) --> ReLU --> per-head Linear(head_hidden -> 1)
        first T outputs: probability logits;  last T: raw uncertainty
    p = sigmoid(logit)
    u = softplus(raw) / factor[t]              target_mode "mean_match" (the paper)
    u = interp(sigmoid(raw), quantiles[t])     target_mode "quantile" (distribution matching)
    u = exp(raw * log_scale[t] + log_loc[t])   target_mode "log" (regression on standardised log u)

The student outputs u for EVERY task, each on the teacher's scale for that task; the
manifest's uncertainty source map (deal -> click by default) is applied by the decision policy,
so the map stays overridable at serving time and both click- and deal-uncertainty exist for
the fidelity report. `model/export.py` writes the same computation as an ONNX graph.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import torch
from scipy.stats import rankdata
from torch import nn
from torch.nn import functional as F

TARGET_MODES = ("mean_match", "quantile", "log")
LOG_FLOOR = 1e-12  # u below this is treated as this in "log" mode


@dataclass
class StudentConfig:
    """Student size and distillation knobs (a profile's `student` section)."""

    hidden: tuple[int, ...] = (256, 128)
    emb_dim: int = 8
    head_hidden: int = 32
    epochs: int = 12
    batch_size: int = 1024
    lr: float = 2e-3
    weight_decay: float = 1e-6
    # "mean_match" (the paper) | "quantile" | "log" (distribution matching). "log" kept the
    # teacher's ranking best on the demo world (docs/benchmarks.md, fidelity report).
    target_mode: str = "log"
    u_weight: float = 1.0  # weight of the uncertainty regression loss
    # Rows in the top `tail_share` of a task's teacher u weigh 1 + `tail_weight` in that task's
    # regression (0 = plain MSE): the decision reads the tail (the top p_u), not the bulk.
    tail_share: float = 0.2
    tail_weight: float = 2.0
    soft_label_weight: float = 0.5  # share of BCE on the teacher's mean instead of the label
    quantile_points: int = 1025  # size of the stored u-quantile table (quantile mode)
    uncertainty_measure: str = "prob_var"  # prob_var | logit_var | base_rate_relative
    # Choose the measure and the per-task source map on validation (training.ood.select_uncertainty);
    # the default above and the profile's source map stand unless a choice is clearly better.
    select_uncertainty: bool = True
    # Serve u = ambiguity combined with input novelty (model/novelty.py, stream.policy.combine_uncertainty).
    novelty: bool = True
    novelty_gate_share: float = 0.001  # share of validation traffic past the novelty gate
    # The serving graph's weights: "int8" (static int8 matmuls, kept only where the export's
    # parity gate and the fidelity bars hold, else float32; model.export.quantize_serving) or
    # "none" (float32). On the demo bundle int8 cut the graph's call by a quarter to a third and
    # the worker's score stage by half (docs/benchmarks.md).
    quantize: str = "int8"
    patience: int = 3  # epochs without validation improvement before stopping
    # Distillation inputs beyond the logged rows: `augment_copies` x the training rows, each a
    # logged row with every feature swapped, with probability `augment_swap`, for the same
    # feature of another random row; the teacher labels them (no true label needed). The
    # uncertainty head is a regression on a function of x, and more inputs near the data
    # close most of its train/test gap (docs/results.md).
    augment_copies: int = 0
    augment_swap: float = 0.3
    # Target-mode comparison (the fidelity report's tail_winner): every mode trained alike on
    # `compare_rows` logged training rows for `compare_epochs` epochs, no augmentation, so
    # the comparison is fair and cheap next to the served student's full budget.
    compare_target_modes: bool = True
    compare_rows: int = 60_000
    compare_epochs: int = 6
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.hidden = tuple(int(h) for h in self.hidden)
        if self.target_mode not in TARGET_MODES:
            raise ValueError(f"student target_mode must be one of {TARGET_MODES}, got {self.target_mode!r}")
        if not self.hidden or min(self.hidden) < 1:
            raise ValueError("student hidden sizes must be positive")
        if self.quantile_points < 2:
            raise ValueError("student quantile_points must be >= 2")
        if not 0.0 < self.tail_share < 1.0 or self.tail_weight < 0:
            raise ValueError("student tail_share must be in (0, 1) and tail_weight >= 0")
        if self.quantize not in ("int8", "none"):
            raise ValueError(f"student quantize must be 'int8' or 'none', got {self.quantize!r}")
        if self.augment_copies < 0 or not 0.0 <= self.augment_swap <= 1.0:
            raise ValueError("student augment_copies must be >= 0 and augment_swap in [0, 1]")

    @classmethod
    def from_any(cls, obj: Any) -> StudentConfig:
        """Accept a StudentConfig, a dict, another dataclass or None (defaults)."""
        if obj is None:
            return cls()
        if isinstance(obj, cls):
            return obj
        data = obj if isinstance(obj, dict) else (
            asdict(obj) if hasattr(obj, "__dataclass_fields__") else vars(obj)
        )
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        kwargs["extra"] = {k: v for k, v in data.items() if k not in known}
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d


class Student(nn.Module):
    """Shared bottom + per-task probability and uncertainty heads; outputs on the teacher's scale."""

    def __init__(self, n_inputs: int, cardinalities: list[int], tasks: list[str] | tuple[str, ...],
                 cfg: StudentConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or StudentConfig()
        self.cfg = cfg
        self.tasks = list(tasks)
        self.n_inputs = int(n_inputs)
        self.cardinalities = [int(c) for c in cardinalities]
        n_tasks = len(self.tasks)
        n_cat = len(self.cardinalities)
        # One table for all categorical columns; column j's rows start at offsets[j].
        self.emb = nn.Embedding(max(sum(self.cardinalities), 1), cfg.emb_dim)
        nn.init.normal_(self.emb.weight, std=0.05)
        self.register_buffer("offsets", torch.tensor(np.r_[0, np.cumsum(self.cardinalities)[:-1]]
                                                     if n_cat else [], dtype=torch.int64))
        width = self.n_inputs + n_cat * cfg.emb_dim
        layers: list[nn.Module] = []
        for h in cfg.hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.bottom = nn.Sequential(*layers)
        self.head1 = nn.Linear(width, 2 * n_tasks * cfg.head_hidden)
        self.head2_w = nn.Parameter(torch.randn(2 * n_tasks, cfg.head_hidden) / np.sqrt(cfg.head_hidden))
        self.head2_b = nn.Parameter(torch.zeros(2 * n_tasks))
        # Map from the uncertainty head back to the teacher's scale (set by `set_target_map`).
        self.target_mode = cfg.target_mode
        self.register_buffer("rescale", torch.ones(n_tasks))
        self.register_buffer("quantiles", torch.zeros(n_tasks, cfg.quantile_points))
        self.register_buffer("log_loc", torch.zeros(n_tasks))
        self.register_buffer("log_scale", torch.ones(n_tasks))

    # ---- forward -------------------------------------------------------------------------
    def raw(self, x: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(probability logits [N,T], raw uncertainty-head outputs [N,T]) used by the losses."""
        parts = [x]
        if idx.shape[1]:
            e = self.emb(idx + self.offsets)  # [N, n_cat, d]
            parts.append(e.reshape(e.shape[0], -1))
        h = self.bottom(torch.cat(parts, dim=1))
        a = F.relu(self.head1(h)).view(h.shape[0], self.head2_w.shape[0], -1)
        out = (a * self.head2_w).sum(-1) + self.head2_b
        n_tasks = len(self.tasks)
        return out[:, :n_tasks], out[:, n_tasks:]

    def head_target(self, u_raw: torch.Tensor) -> torch.Tensor:
        """Uncertainty head on the (rescaled) training-target scale."""
        if self.target_mode == "mean_match":
            return F.softplus(u_raw)
        if self.target_mode == "log":
            return u_raw
        return torch.sigmoid(u_raw)

    def to_teacher_scale(self, target: torch.Tensor) -> torch.Tensor:
        """Undo the target rescaling: the same formula the ONNX graph evaluates."""
        if self.target_mode == "mean_match":
            return target / self.rescale
        if self.target_mode == "log":
            return torch.exp(target * self.log_scale + self.log_loc)
        k = self.quantiles.shape[1]
        pos = target * (k - 1)
        lo_i = torch.clamp(torch.floor(pos), 0, k - 2)
        frac = pos - lo_i
        flat = self.quantiles.reshape(-1)
        gidx = lo_i.to(torch.int64) + torch.arange(len(self.tasks), device=target.device) * k
        lo, hi = flat[gidx], flat[gidx + 1]
        return lo + frac * (hi - lo)

    def forward(self, x: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(p [N,T], u [N,T] on the teacher's scale)."""
        logit, u_raw = self.raw(x, idx)
        return torch.sigmoid(logit), self.to_teacher_scale(self.head_target(u_raw))

    # ---- targets -------------------------------------------------------------------------
    def set_target_map(self, u_teacher: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Fix the rescaling from training data; return the head's training targets [N,T].

        mean_match: target = u * factor, factor = mean(label) / mean(u) (paper: neither loss
        dominates). quantile: target = empirical CDF of u (uniform in [0,1]); the stored
        quantile table maps it back, so the tail keeps its rank and its scale. log: target =
        standardised log u (relative errors count alike across the orders of magnitude u spans).
        """
        u = np.asarray(u_teacher, np.float64)
        y = np.asarray(labels, np.float64)
        if self.target_mode == "mean_match":
            mu = np.maximum(u.mean(axis=0), 1e-12)
            factor = np.maximum(y.mean(axis=0), 1e-6) / mu
            self.rescale.copy_(torch.as_tensor(factor, dtype=torch.float32))
            return (u * factor).astype(np.float32)
        if self.target_mode == "log":
            lu = np.log(np.maximum(u, LOG_FLOOR))
            loc, scale = lu.mean(axis=0), np.maximum(lu.std(axis=0), 1e-6)
            self.log_loc.copy_(torch.as_tensor(loc, dtype=torch.float32))
            self.log_scale.copy_(torch.as_tensor(scale, dtype=torch.float32))
            return ((lu - loc) / scale).astype(np.float32)
        k = self.quantiles.shape[1]
        table = np.quantile(u, np.linspace(0, 1, k), axis=0).T  # [T, K], non-decreasing
        self.quantiles.copy_(torch.as_tensor(table, dtype=torch.float32))
        ranks = rankdata(u, axis=0, method="average") - 1.0  # ties share a target
        return (ranks / max(u.shape[0] - 1, 1)).astype(np.float32)

    def target_map(self) -> dict[str, Any]:
        """The rescaling as manifest data."""
        if self.target_mode == "mean_match":
            return {"mode": "mean_match",
                    "factors": {t: float(f) for t, f in zip(self.tasks, self.rescale.tolist(), strict=True)}}
        if self.target_mode == "log":
            return {"mode": "log", "loc": dict(zip(self.tasks, self.log_loc.tolist(), strict=True)),
                    "scale": dict(zip(self.tasks, self.log_scale.tolist(), strict=True))}
        return {"mode": "quantile", "points": int(self.quantiles.shape[1]),
                "max": {t: float(q[-1]) for t, q in zip(self.tasks, self.quantiles.tolist(), strict=True)}}

    # ---- persistence ---------------------------------------------------------------------
    def to_checkpoint(self) -> dict[str, Any]:
        return {"n_inputs": self.n_inputs, "cardinalities": self.cardinalities, "tasks": self.tasks,
                "cfg": self.cfg.to_dict(), "state_dict": self.state_dict()}

    @classmethod
    def from_checkpoint(cls, ck: dict[str, Any]) -> Student:
        model = cls(ck["n_inputs"], ck["cardinalities"], ck["tasks"], StudentConfig.from_any(ck["cfg"]))
        model.load_state_dict(ck["state_dict"])
        return model.eval()

    @torch.no_grad()
    def predict(self, x: np.ndarray, idx: np.ndarray, batch_size: int = 65536) -> tuple[np.ndarray, np.ndarray]:
        """Numpy in, numpy out (p, u), in eval mode."""
        self.eval()
        ps, us = [], []
        for s in range(0, max(len(x), 1), batch_size):
            p, u = self(torch.from_numpy(np.ascontiguousarray(x[s:s + batch_size])),
                        torch.from_numpy(np.ascontiguousarray(idx[s:s + batch_size])))
            ps.append(p.numpy())
            us.append(u.numpy())
        return np.concatenate(ps).astype(np.float32), np.concatenate(us).astype(np.float32)
