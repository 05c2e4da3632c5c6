"""Training profiles: every knob of `rta train` in one place, as data.

`tiny` is for tests (well under a minute with everything), `demo` is the results' profile (a
few minutes on 2 cores for a 300k-row world), `loop` is what `rta demo` runs (the demo
profile with a faster student: v1 and the retrained v2 in the demo's time), `paper` follows the paper's layout (PLE with 3
shared + 1 specific Transformer experts per task, full self-attention over feature tokens).
The network's data-dependent sizes (features, vocabularies, tasks) are filled in from the
fitted preprocessor by the pipeline; everything else is here.

SWAG schedule (Maddox et al. 2019): the first `epochs - swag_epochs` epochs train with a
cosine decay from `lr` to `swag_lr`; the last `swag_epochs` epochs keep `swag_lr` constant and
take `snapshots_per_epoch` evenly spaced snapshots each (>= 1 per epoch), of which the last
`max_rank` form the deviation matrix D.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from model.ple import NetConfig
from model.uncertainty import DEFAULT_SOURCE_MAP


@dataclass
class Profile:
    """A named set of teacher (and student) training settings."""

    name: str
    net: NetConfig
    epochs: int = 8
    swag_epochs: int = 3  # the last k epochs collect SWAG snapshots
    snapshots_per_epoch: int = 4
    max_rank: int = 12  # K: deviation vectors kept (0 = diagonal only)
    diag_only: bool = False
    batch_size: int = 1024
    lr: float = 2e-3
    swag_lr: float = 1e-3  # constant learning rate while collecting
    weight_decay: float = 1e-5
    task_weights: tuple[float, ...] | None = None  # BCE weight per task (None = all 1)
    n_samples: int = 11  # M weight samples at inference
    # M for the student's uncertainty targets. 0 = the teacher itself: its M weight draws of
    # the same seed, so the student learns the function it replaces. A larger M teaches a
    # smoother estimate of the posterior instead; the click u of an M = 11 low-rank SWAG
    # teacher is largely its draw (another seed agrees at Spearman ~0.7 on the demo world),
    # so such a student follows the served teacher less closely (docs/results.md).
    distill_samples: int = 0
    swag_scale: float = 1.0  # multiplies the SWAG covariance (1 = the paper's Eq. 29)
    inference: str = "loop"  # "loop" | "vmap": how the M passes run (see docs/results.md)
    test_fraction: float = 0.2  # held out for the evaluation report (the paper's 80/20)
    valid_fraction: float = 0.05  # of the training split: loss curves + the student's validation
    max_train_rows: int | None = None  # subsample the training split (None = all)
    baseline_epochs: int | None = None  # epochs of the Table I baselines (None = `epochs`)
    transformer_net: dict[str, Any] = field(default_factory=lambda: {"d_token": 8})  # Transformer baselines' sizes
    source_map: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_SOURCE_MAP))
    student: dict[str, Any] = field(default_factory=dict)  # the student engineer's section
    # retraining (`--parent`): teacher and student start from the parent's weights and train
    # this many epochs (None = the full `epochs` / the student's own epochs)
    warm_epochs: int | None = None
    warm_student_epochs: int | None = None
    # `--anchor`: share of the student's BCE target taken from the anchor student's p
    anchor_weight: float = 0.5

    def __post_init__(self) -> None:
        if not 1 <= self.swag_epochs <= self.epochs:
            raise ValueError("swag_epochs must be in [1, epochs]")
        if self.snapshots_per_epoch < 1:
            raise ValueError("snapshots_per_epoch must be >= 1")
        if isinstance(self.net, dict):
            self.net = NetConfig(**self.net)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Profile:
        d = dict(d)
        d["net"] = NetConfig(**d["net"])
        if d.get("task_weights") is not None:
            d["task_weights"] = tuple(d["task_weights"])
        return cls(**d)


PROFILES: dict[str, Profile] = {
    "tiny": Profile(
        name="tiny",
        net=NetConfig(arch="ple", expert="mlp", d_token=4, expert_dim=16, mlp_hidden=32,
                      tower_hidden=8, n_latents=4),
        epochs=3, swag_epochs=2, snapshots_per_epoch=3, max_rank=6, batch_size=512, lr=3e-3,
        swag_lr=1.5e-3, n_samples=5, max_train_rows=20_000, baseline_epochs=2,
        student={"hidden": (32, 16), "epochs": 2, "batch_size": 512, "augment_copies": 1,
                 "compare_target_modes": False},
        warm_epochs=2, warm_student_epochs=1,
    ),
    "demo": Profile(
        name="demo",
        net=NetConfig(arch="ple", expert="mlp", d_token=4, expert_dim=32, mlp_hidden=64,
                      tower_hidden=16, n_latents=8),
        epochs=6, swag_epochs=3, snapshots_per_epoch=4, max_rank=12, batch_size=1024,
        lr=2e-3, swag_lr=5e-4, weight_decay=0.05, baseline_epochs=6,
        student={"hidden": (256, 128), "head_hidden": 48, "epochs": 10, "lr": 3e-3, "target_mode": "log",
                 "augment_copies": 4},
        warm_epochs=3, warm_student_epochs=4,
    ),
    "paper": Profile(
        name="paper",
        net=NetConfig(arch="ple", expert="transformer", d_token=16, expert_dim=128, mlp_hidden=256,
                      n_heads=4, n_layers=2, n_latents=0, tower_hidden=64),
        epochs=20, swag_epochs=5, snapshots_per_epoch=4, max_rank=20, batch_size=512,
        lr=1e-3, swag_lr=5e-4, transformer_net={},
        student={"hidden": (256, 128), "epochs": 10, "augment_copies": 2},
    ),
}

# `rta demo`'s: the demo profile's teacher on at most 100k rows; its student with one
# swapped-feature copy, a larger batch and no target-mode comparison, so that v1 and the
# retrained v2 both fit the demo's 6 minutes on 2 cores (docs/results.md, "The loop")
PROFILES["loop"] = replace(
    PROFILES["demo"], name="loop", max_train_rows=100_000, warm_epochs=3, warm_student_epochs=6,
    student={"hidden": (256, 128), "head_hidden": 48, "epochs": 8, "lr": 3e-3, "target_mode": "log",
             "augment_copies": 3, "compare_target_modes": False},
)


def get_profile(name: str, **overrides: Any) -> Profile:
    """A fresh copy of a named profile, with field overrides."""
    if name not in PROFILES:
        raise KeyError(f"unknown profile {name!r}; known: {', '.join(PROFILES)}")
    base = PROFILES[name]
    return replace(base, net=replace(base.net), source_map=dict(base.source_map),
                   student=dict(base.student), transformer_net=dict(base.transformer_net), **overrides)
