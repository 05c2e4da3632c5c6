"""Multi-task networks of the DAUM teacher and the baselines of the paper's Table I.

Read top to bottom:

    FeatureTokens     one d-dimensional token per feature (numeric projected, categorical embedded)
    MLPExpert         flattened tokens (or a vector) -> MLP -> expert_dim
    LatentPool        (transformer experts) learned latent queries attend over the feature tokens
    TransformerExpert tokens + [CLS] -> self-attention blocks -> expert_dim
    CGC               Customized Gate Control: per task a softmax gate over the task's own
                      experts + the shared experts (Tang et al. 2020, "PLE")
    MultiTaskNet      arch="ple": n_levels CGC levels, then one tower per task -> logits
                      arch="shared_bottom": one expert shared by all towers (the MLP /
                      Transformer rows of Table I)

Input is `(x, idx)` from `model.preprocess.Preprocessor.transform`: x = [standardised numeric
values, missing flags] (float32[N, 2*n_num]), idx = categorical indices (int64[N, n_cat]; 0 =
missing, 1 = unknown / unseen category, 2.. = vocabulary). Output: logits float[N, T].

Normalisation is LayerNorm only, never BatchNorm: SWAG samples weights and would otherwise need
a pass over the training data per sample to refresh BatchNorm statistics (`bn_update`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stream.features import DEFAULT_TASKS

ARCHS = ("ple", "shared_bottom")
EXPERTS = ("mlp", "transformer")


@dataclass
class NetConfig:
    """Everything that decides the network's shape; stored in teacher.pt to rebuild it."""

    tasks: tuple[str, ...] = DEFAULT_TASKS
    n_num: int = 0  # numeric features; x has 2 * n_num columns (values, missing flags)
    cardinalities: tuple[int, ...] = ()  # embedding table size per categorical feature
    arch: str = "ple"  # "ple" | "shared_bottom"
    expert: str = "transformer"  # "mlp" | "transformer" (first level; deeper levels are MLPs)
    n_shared: int = 3  # shared experts per CGC level (the paper: 3)
    n_specific: int = 1  # task-specific experts per task per level (the paper: 1)
    n_levels: int = 1  # CGC extraction levels
    d_token: int = 8  # width of each feature token
    expert_dim: int = 64  # output width of every expert
    mlp_hidden: int = 128
    n_heads: int = 2
    n_layers: int = 1  # self-attention blocks per transformer expert
    n_latents: int = 16  # transformer: >0 = attend over latents pooled from the feature tokens; 0 = over all feature tokens
    tower_hidden: int = 32
    extra: dict = field(default_factory=dict)  # free-form notes carried along (ignored here)

    def __post_init__(self) -> None:
        self.tasks = tuple(self.tasks)
        self.cardinalities = tuple(int(c) for c in self.cardinalities)
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if self.expert not in EXPERTS:
            raise ValueError(f"expert must be one of {EXPERTS}, got {self.expert!r}")
        if self.d_token % self.n_heads:
            raise ValueError("d_token must be divisible by n_heads")

    @property
    def n_tokens(self) -> int:
        return self.n_num + len(self.cardinalities)

    def to_dict(self) -> dict:
        return asdict(self)


# ---- inputs -------------------------------------------------------------------------------
class FeatureTokens(nn.Module):
    """Numeric feature j -> z_j * W_j + missing_j * M_j + b_j; categorical j -> embedding row.

    All categorical columns share one table, offset per column; index 1 of each column is the
    "unknown" row every unseen category maps to (so no hashing is needed at serving time).
    """

    def __init__(self, n_num: int, cardinalities: tuple[int, ...], d: int) -> None:
        super().__init__()
        self.n_num = n_num
        scale = 1.0 / math.sqrt(d)
        self.num_weight = nn.Parameter(torch.randn(n_num, d) * scale)
        self.num_missing = nn.Parameter(torch.randn(n_num, d) * scale)
        self.num_bias = nn.Parameter(torch.zeros(n_num, d))
        self.cat = nn.Embedding(max(sum(cardinalities), 1), d)
        nn.init.normal_(self.cat.weight, std=scale)
        offsets = torch.tensor([0, *cardinalities[:-1]], dtype=torch.long).cumsum(0)
        self.register_buffer("offsets", offsets[: len(cardinalities)], persistent=False)

    def forward(self, x: Tensor, idx: Tensor) -> Tensor:
        z, missing = x[:, : self.n_num, None], x[:, self.n_num :, None]
        num = z * self.num_weight + missing * self.num_missing + self.num_bias  # [N, n_num, d]
        if idx.shape[1] == 0:
            return num
        cat = self.cat(idx + self.offsets)  # [N, n_cat, d]
        return torch.cat([num, cat], dim=1)  # [N, n_tokens, d]


# ---- experts ------------------------------------------------------------------------------
class MLPExpert(nn.Module):
    """Flatten whatever comes in, two layers with GELU, LayerNorm between."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.GELU(), nn.LayerNorm(hidden),
            nn.Linear(hidden, out_dim), nn.GELU(),
        )

    def forward(self, h: Tensor) -> Tensor:
        return self.net(h.flatten(1))


class Attention(nn.Module):
    """Multi-head attention of queries `h` over keys/values `ctx` (self-attention when h is ctx)."""

    def __init__(self, d: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, h: Tensor, ctx: Tensor) -> Tensor:
        n, lq, d = h.shape
        lk, nh = ctx.shape[1], self.n_heads
        q = self.q(h).view(n, lq, nh, d // nh).transpose(1, 2)  # [N, heads, Lq, dh]
        k, v = self.kv(ctx).view(n, lk, 2, nh, d // nh).permute(2, 0, 3, 1, 4)
        att = torch.softmax((q * (d // nh) ** -0.5) @ k.transpose(-2, -1), dim=-1)
        out = (att @ v).transpose(1, 2).reshape(n, lq, d)
        return self.proj(out)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: attention then a 2x-wide MLP, both residual."""

    def __init__(self, d: int, n_heads: int, cross: bool = False) -> None:
        super().__init__()
        self.ln_q = nn.LayerNorm(d)
        self.ln_ctx = nn.LayerNorm(d) if cross else None
        self.attn = Attention(d, n_heads)
        self.ln_mlp = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, h: Tensor, ctx: Tensor | None = None) -> Tensor:
        q = self.ln_q(h)
        kv = q if self.ln_ctx is None else self.ln_ctx(ctx)
        h = h + self.attn(q, kv)
        return h + self.mlp(self.ln_mlp(h))


class LatentPool(nn.Module):
    """n_latents learned queries cross-attend to all feature tokens (attention pooling, as in
    Set Transformer / Perceiver). Shared by every transformer expert, like the embeddings:
    the experts then attend over a few latent tokens instead of ~100 feature tokens, which
    keeps training on a CPU affordable (cost linear in the number of features)."""

    def __init__(self, cfg: NetConfig) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.randn(cfg.n_latents, cfg.d_token) / math.sqrt(cfg.d_token))
        self.block = Block(cfg.d_token, cfg.n_heads, cross=True)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.block(self.latents.expand(tokens.shape[0], -1, -1), tokens)  # [N, n_latents, d]


class TransformerExpert(nn.Module):
    """A [CLS] token joins the incoming tokens; n_layers self-attention blocks; CLS -> expert_dim."""

    def __init__(self, cfg: NetConfig) -> None:
        super().__init__()
        d = cfg.d_token
        self.cls = nn.Parameter(torch.randn(1, 1, d) / math.sqrt(d))
        self.blocks = nn.ModuleList(Block(d, cfg.n_heads) for _ in range(cfg.n_layers))
        self.ln_out = nn.LayerNorm(d)
        self.out = nn.Linear(d, cfg.expert_dim)

    def forward(self, tokens: Tensor) -> Tensor:
        h = torch.cat([self.cls.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        for block in self.blocks:
            h = block(h)
        return F.gelu(self.out(self.ln_out(h[:, 0])))


# ---- PLE ----------------------------------------------------------------------------------
class CGC(nn.Module):
    """One extraction level. Inputs: one per task plus one shared (the same tensor at level 1).

    Task t's output = softmax gate(input_t) over [task t's experts, shared experts].
    The shared output (only needed when another level follows) gates over all experts.
    """

    def __init__(self, make_expert: Callable[[], nn.Module], gate_in: int, n_tasks: int,
                 n_shared: int, n_specific: int, last: bool) -> None:
        super().__init__()
        self.shared = nn.ModuleList(make_expert() for _ in range(n_shared))
        self.specific = nn.ModuleList(
            nn.ModuleList(make_expert() for _ in range(n_specific)) for _ in range(n_tasks)
        )
        self.task_gates = nn.ModuleList(nn.Linear(gate_in, n_specific + n_shared) for _ in range(n_tasks))
        n_all = n_shared + n_tasks * n_specific
        self.shared_gate = None if last else nn.Linear(gate_in, n_all)

    @staticmethod
    def _mix(gate: nn.Linear, inp: Tensor, outs: list[Tensor]) -> Tensor:
        g = torch.softmax(gate(inp.flatten(1)), dim=-1)  # [N, k]
        return (g.unsqueeze(-1) * torch.stack(outs, dim=1)).sum(dim=1)  # [N, expert_dim]

    def forward(self, task_in: list[Tensor], shared_in: Tensor) -> tuple[list[Tensor], Tensor | None]:
        shared_out = [e(shared_in) for e in self.shared]
        specific_out = [[e(inp) for e in experts] for experts, inp in zip(self.specific, task_in, strict=True)]
        task_out = [
            self._mix(gate, inp, own + shared_out)
            for gate, inp, own in zip(self.task_gates, task_in, specific_out, strict=True)
        ]
        if self.shared_gate is None:
            return task_out, None
        every = [o for own in specific_out for o in own] + shared_out
        return task_out, self._mix(self.shared_gate, shared_in, every)


class MultiTaskNet(nn.Module):
    """Feature tokens -> PLE (or a shared bottom) -> one tower per task -> logits [N, T]."""

    def __init__(self, cfg: NetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tokens = FeatureTokens(cfg.n_num, cfg.cardinalities, cfg.d_token)
        pooled = cfg.expert == "transformer" and cfg.n_latents > 0
        self.pool = LatentPool(cfg) if pooled else None
        flat_tokens = (cfg.n_latents if pooled else cfg.n_tokens) * cfg.d_token  # expert/gate input

        def first_expert() -> nn.Module:
            if cfg.expert == "transformer":
                return TransformerExpert(cfg)
            return MLPExpert(flat_tokens, cfg.mlp_hidden, cfg.expert_dim)

        def deeper_expert() -> nn.Module:
            return MLPExpert(cfg.expert_dim, cfg.mlp_hidden, cfg.expert_dim)

        n_tasks = len(cfg.tasks)
        if cfg.arch == "ple":
            self.levels = nn.ModuleList(
                CGC(first_expert if lvl == 0 else deeper_expert,
                    flat_tokens if lvl == 0 else cfg.expert_dim,
                    n_tasks, cfg.n_shared, cfg.n_specific, last=lvl == cfg.n_levels - 1)
                for lvl in range(cfg.n_levels)
            )
            self.bottom = None
        else:
            self.levels = None
            self.bottom = first_expert()
        self.towers = nn.ModuleList(
            nn.Sequential(nn.Linear(cfg.expert_dim, cfg.tower_hidden), nn.GELU(), nn.Linear(cfg.tower_hidden, 1))
            for _ in range(n_tasks)
        )

    def forward(self, x: Tensor, idx: Tensor) -> Tensor:
        tokens = self.tokens(x, idx)
        if self.pool is not None:
            tokens = self.pool(tokens)
        if self.bottom is not None:
            hidden = [self.bottom(tokens)] * len(self.towers)
        else:
            hidden, shared = [tokens] * len(self.towers), tokens
            for level in self.levels:
                hidden, shared = level(hidden, shared)
        return torch.cat([tower(h) for tower, h in zip(self.towers, hidden, strict=True)], dim=1)


# The Table I rows: name -> the config fields that make that model.
BASELINES: dict[str, dict[str, str]] = {
    "MLP": {"arch": "shared_bottom", "expert": "mlp"},
    "Transformer": {"arch": "shared_bottom", "expert": "transformer"},
    "PLE-MLP": {"arch": "ple", "expert": "mlp"},
    "PLE-Transformer": {"arch": "ple", "expert": "transformer"},
}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
