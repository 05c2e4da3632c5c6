"""`rta train`: logged traffic -> PLE teacher with SWAG -> [student + ONNX] -> evaluation report.

Stages, in order (each prints one line; long ones show tqdm bars):

    1. load logs            training.logs.load_logs (one-line DataError on bad input)
    2. split                test (held out for the report) / valid / fit, from --seed
    3. fit preprocessor     model.preprocess.Preprocessor on the fit rows
    4. train teacher        PLE, BCE summed over tasks, AdamW; SWAG snapshots in the last epochs
    5. write teacher part   <out>/<version>/teacher.pt, preprocess.json, train_log.json, loss.png
    6. distill + export     training.distill.distill_and_export (the student engineer's stage)
    7. evaluate             training.evaluate.evaluate_bundle on the test split -> report/

`load_teacher(bundle_dir)` reads the teacher part back.
"""

from __future__ import annotations

import functools
import json
import math
import os
import pickle
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from model.bundle import MANIFEST, read_manifest, sha256_file, update_manifest, verify_files
from model.ple import MultiTaskNet, NetConfig, count_parameters
from model.preprocess import Preprocessor
from model.student import StudentConfig
from model.swag import SWAG
from model.uncertainty import TeacherPrediction
from stream.errors import BundleError, DataError
from stream.logger.storage import LOCATION
from training.debias import DEBIAS_MODES, DEFAULT_DEBIAS, apply_debias
from training.logs import Attribution, LogSet, describe_labels, load_logs, split
from training.profiles import PROFILES, Profile, get_profile

TEACHER_FILE = "teacher.pt"
PREPROCESS_FILE = "preprocess.json"
TEACHER_HASHES = "teacher.sha256.json"
TRAIN_LOG_FILE = "train_log.json"
TEACHER_FORMAT = 1


def use_all_cores(threads: int | None = None) -> int:
    """Set torch's intra-op threads: `threads`, else $RTA_TORCH_THREADS, else every idle core.

    "Idle" matters on a shared machine: with the 1-minute load average at ~4.5 on 2 cores, two
    threads made a training step ~8x slower than one (threads spin waiting for a busy core).
    Idleness is measured over a quarter second from /proc/stat, not from the load average, which
    lags by a minute and would still count a job that just ended.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if threads is None and os.environ.get("RTA_TORCH_THREADS", "").strip():
        threads = int(os.environ["RTA_TORCH_THREADS"])
    if threads is None:
        threads = int(cores - _busy_cores(cores) + 0.5)
    n = max(1, min(int(threads), cores))
    torch.set_num_threads(n)
    return n


def _busy_cores(cores: int, window_s: float = 0.25) -> float:
    """Cores' worth of CPU in use by others right now (the load average where /proc is absent)."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + (v[4] if len(v) > 4 else 0)  # total, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(window_s)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if total1 <= total0:
        return 0.0
    return cores * (1.0 - (idle1 - idle0) / (total1 - total0))


def log(msg: str) -> None:
    click.echo(f"[rta train] {msg}", err=True)


# ---- data ---------------------------------------------------------------------------------
@dataclass
class Splits:
    fit: LogSet  # trains the teacher
    valid: LogSet  # loss curves; the student's validation
    test: LogSet  # never trained on: the evaluation report


def make_splits(logs: LogSet, profile: Profile, seed: int) -> Splits:
    """The same rows for the same (logs, profile, seed): the pipeline and `rta eval` agree."""
    train, test = split(logs, profile.test_fraction, seed)
    fit, valid = split(train, profile.valid_fraction, seed + 1)
    if profile.max_train_rows is not None and len(fit) > profile.max_train_rows:
        rows = np.random.default_rng(seed + 2).choice(len(fit), profile.max_train_rows, replace=False)
        fit = fit.take(np.sort(rows))
    return Splits(fit, valid, test)


@dataclass
class Batch:
    """Network inputs and labels as tensors."""

    x: torch.Tensor
    idx: torch.Tensor
    y: torch.Tensor
    w: torch.Tensor | None = None  # per-row weight of the observed labels (IPS), None = 1

    @classmethod
    def of(cls, pre: Preprocessor, logs: LogSet) -> Batch:
        x, idx = pre.transform(logs.num, logs.cat)
        w = None if logs.weights is None else torch.from_numpy(np.asarray(logs.weights, np.float32))
        return cls(torch.from_numpy(x), torch.from_numpy(idx), torch.from_numpy(logs.labels), w)

    def weight(self, rows: torch.Tensor | slice) -> torch.Tensor | None:
        return None if self.w is None else self.w[rows]

    def __len__(self) -> int:
        return int(self.y.shape[0])


# ---- training -----------------------------------------------------------------------------
def learning_rate(profile: Profile, progress: float, collecting: bool) -> float:
    """Cosine from lr to swag_lr over the pre-SWAG epochs (progress in [0, 1]); then constant."""
    if collecting:
        return profile.swag_lr
    return profile.swag_lr + 0.5 * (profile.lr - profile.swag_lr) * (1 + math.cos(math.pi * progress))


def task_loss(logits: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    """Mean BCE per task, shape [T]; unobserved labels (NaN: logged traffic, blocked or window
    open) carry no loss: the mean is over each task's observed rows. With row weights `w` (IPS)
    it is the self-normalised weighted mean: sum w * bce / sum w over the observed rows."""
    if w is not None:
        obs = (~torch.isnan(y)).float() * w[:, None]
        bce = F.binary_cross_entropy_with_logits(logits, torch.nan_to_num(y), reduction="none") * obs
        return bce.sum(dim=0) / obs.sum(dim=0).clamp(min=1e-6)
    if torch.isnan(y).any():
        obs = ~torch.isnan(y)
        bce = F.binary_cross_entropy_with_logits(logits, torch.nan_to_num(y), reduction="none") * obs
        return bce.sum(dim=0) / obs.sum(dim=0).clamp(min=1)
    return F.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(dim=0)


@torch.no_grad()
def evaluate_loss(model: MultiTaskNet, data: Batch, batch_size: int = 8192) -> np.ndarray:
    model.eval()
    total = torch.zeros(data.y.shape[1], dtype=torch.float64)
    for s in range(0, len(data), batch_size):
        rows = slice(s, s + batch_size)
        logits = model(data.x[rows], data.idx[rows])
        total += task_loss(logits, data.y[rows], data.weight(rows)).double() * logits.shape[0]
    model.train()
    return (total / max(len(data), 1)).numpy()


def fit_network(cfg: NetConfig, profile: Profile, fit: Batch, valid: Batch | None, seed: int,
                epochs: int | None = None, swag: SWAG | None = None, desc: str = "teacher",
                progress: bool = True, init_state: dict[str, torch.Tensor] | None = None,
                swag_epochs: int | None = None) -> tuple[MultiTaskNet, dict[str, Any]]:
    """Train one network; with `swag`, collect snapshots in the last `swag_epochs` epochs.
    `init_state` starts from given weights (a warm start from the parent model) instead of a
    random initialisation."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = MultiTaskNet(cfg)
    if init_state is not None:
        model.load_state_dict(init_state)
    if swag is not None and swag.n_params != count_parameters(model):
        raise ValueError("SWAG size does not match the network")
    epochs = epochs or profile.epochs
    swag_epochs = min(swag_epochs or profile.swag_epochs, epochs)
    pre_epochs = epochs - swag_epochs if swag is not None else epochs
    opt = torch.optim.AdamW(model.parameters(), lr=profile.lr, weight_decay=profile.weight_decay)
    weights = torch.tensor(profile.task_weights or [1.0] * len(cfg.tasks), dtype=torch.float32)
    n, bs = len(fit), profile.batch_size
    steps = max(1, math.ceil(n / bs))
    snap_steps = {round((k + 1) * steps / profile.snapshots_per_epoch) - 1
                  for k in range(profile.snapshots_per_epoch)}
    history: dict[str, Any] = {"tasks": list(cfg.tasks), "epochs": [], "steps": [],
                               "swag_from_epoch": pre_epochs if swag is not None else None}
    model.train()
    for epoch in range(epochs):
        collecting = swag is not None and epoch >= pre_epochs
        started = time.perf_counter()
        order = torch.randperm(n, generator=gen)
        running = torch.zeros(len(cfg.tasks), dtype=torch.float64)
        bar = tqdm(range(steps), desc=f"{desc} epoch {epoch + 1}/{epochs}" + (" [SWAG]" if collecting else ""),
                   leave=False, disable=not progress, file=sys.stderr, mininterval=1.0)
        for step in bar:
            lr = learning_rate(profile, (epoch * steps + step) / max(pre_epochs * steps, 1), collecting)
            for group in opt.param_groups:
                group["lr"] = lr
            rows = order[step * bs : (step + 1) * bs]
            per_task = task_loss(model(fit.x[rows], fit.idx[rows]), fit.y[rows], fit.weight(rows))
            loss = (weights * per_task).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running += per_task.detach().double() * rows.numel()
            if step % 20 == 0:
                history["steps"].append({"epoch": epoch + step / steps, "loss": loss.item(), "lr": lr})
                bar.set_postfix(loss=f"{loss.item():.4f}")
            if collecting and step in snap_steps:
                swag.collect_model(model)
        bar.close()
        row = {"epoch": epoch + 1, "train": (running / n).tolist(), "lr": lr, "swag": collecting,
               "seconds": round(time.perf_counter() - started, 2)}
        if valid is not None:
            row["valid"] = evaluate_loss(model, valid).tolist()
        history["epochs"].append(row)
        log(f"{desc} epoch {epoch + 1}/{epochs}: train {sum(row['train']):.4f}"
            + (f" valid {sum(row['valid']):.4f}" if valid is not None else "")
            + f" ({row['seconds']:.1f}s{', SWAG snapshots ' + str(swag.n_snapshots) if collecting else ''})")
    model.eval()
    return model, history


def net_config(profile: Profile, pre: Preprocessor, tasks: tuple[str, ...], **overrides: Any) -> NetConfig:
    from dataclasses import replace

    return replace(profile.net, tasks=tuple(tasks), n_num=len(pre.spec.numeric),
                   cardinalities=tuple(pre.cardinalities), **overrides)


def train_teacher(profile: Profile, pre: Preprocessor, splits: Splits, seed: int,
                  progress: bool = True, warm: MultiTaskNet | None = None
                  ) -> tuple[MultiTaskNet, SWAG, dict[str, Any]]:
    """The PLE teacher with its SWAG posterior; from `warm`'s weights (the parent) for the
    profile's `warm_epochs` when given: fine-tuning, not a fresh fit."""
    tasks = splits.fit.tasks
    cfg = net_config(profile, pre, tasks)
    fit, valid = Batch.of(pre, splits.fit), Batch.of(pre, splits.valid)
    swag = SWAG(count_parameters(MultiTaskNet(cfg)), max_rank=profile.max_rank, diag_only=profile.diag_only)
    swag.base_rate = _label_rate(splits.fit).astype(np.float64)
    epochs = swag_epochs = None
    if warm is not None:
        epochs = profile.warm_epochs or profile.epochs
        swag_epochs = max(1, min(profile.swag_epochs, epochs - 1)) if epochs > 1 else 1
    model, history = fit_network(cfg, profile, fit, valid, seed, swag=swag, progress=progress,
                                 init_state=None if warm is None else warm.state_dict(), epochs=epochs,
                                 swag_epochs=swag_epochs)
    history["warm_start"] = warm is not None
    return model, swag, history


def _label_rate(logs: LogSet) -> np.ndarray:
    """Observed positive rate per task, weighted like the loss (IPS weights when present)."""
    if logs.weights is None:
        return np.nanmean(logs.labels, axis=0)
    obs = ~np.isnan(logs.labels)
    w = logs.weights[:, None] * obs
    return (np.nan_to_num(logs.labels) * w).sum(axis=0) / np.maximum(w.sum(axis=0), 1e-12)


def teacher_predict(model: MultiTaskNet, swag: SWAG, pre: Preprocessor, logs: LogSet,
                    profile: Profile, seed: int = 0, n_samples: int | None = None) -> TeacherPrediction:
    """DAUM on a log set: M sampled weight vectors (the profile's M unless given), mean +
    uncertainty measures per task."""
    x, idx = pre.transform(logs.num, logs.cat)
    return teacher_predict_inputs(model, swag, profile, x, idx, seed, n_samples)


def teacher_predict_inputs(model: MultiTaskNet, swag: SWAG, profile: Profile, x: np.ndarray, idx: np.ndarray,
                           seed: int = 0, n_samples: int | None = None) -> TeacherPrediction:
    """`teacher_predict` on preprocessed inputs. The weight draws depend on (seed, M) only, so
    every call with the same pair is the same M-network teacher."""
    return swag.predict(model, x, idx, n_samples=n_samples or profile.n_samples, scale=profile.swag_scale,
                        seed=seed, method=profile.inference)


# ---- the bundle's teacher part ------------------------------------------------------------
def save_teacher(bundle_dir: Path, model: MultiTaskNet, swag: SWAG, pre: Preprocessor,
                 profile: Profile, meta: dict[str, Any]) -> None:
    torch.save({
        "format": TEACHER_FORMAT, "net": model.cfg.to_dict(), "state_dict": model.state_dict(),
        "swag": swag.state_dict(), "profile": profile.to_dict(), "meta": meta,
    }, bundle_dir / TEACHER_FILE)
    (bundle_dir / PREPROCESS_FILE).write_text(json.dumps(pre.to_dict()))
    # what load_teacher checks before it loads anything (the manifest takes over once written)
    (bundle_dir / TEACHER_HASHES).write_text(json.dumps(
        {f: sha256_file(bundle_dir / f) for f in (TEACHER_FILE, PREPROCESS_FILE)}))


def resolve_bundle(model_dir: str | Path) -> Path:
    """A version directory, or a model dir (its `current`, else its newest version)."""
    path = Path(model_dir)
    if (path / TEACHER_FILE).exists():
        return path
    if (path / "current" / TEACHER_FILE).exists():
        return (path / "current").resolve()
    if path.is_dir():
        versions = sorted((p for p in path.iterdir() if (p / TEACHER_FILE).exists()),
                          key=lambda p: p.stat().st_mtime)
        if versions:
            return versions[-1]
    raise BundleError(f"{path}: no teacher bundle here (no {TEACHER_FILE} in it, its 'current' or a version dir)")


def _verify_teacher(path: Path) -> None:
    """The sha256 of teacher.pt and preprocess.json against the manifest (a full bundle) or, for a
    teacher-only bundle, the hashes save_teacher wrote; no hash, no load."""
    if (path / MANIFEST).is_file():
        source, files = path / MANIFEST, read_manifest(path)["files"]
    elif (path / TEACHER_HASHES).is_file():
        source = path / TEACHER_HASHES
        try:
            files = json.loads(source.read_text())
        except (OSError, ValueError) as exc:
            raise BundleError(f"{source}: unreadable ({exc})") from None
    else:
        raise BundleError(f"{path}: no manifest and no {TEACHER_HASHES}; refusing to load unverified weights")
    if not isinstance(files, dict):
        raise BundleError(f"{source}: no file hashes in it")
    verify_files(path, {"files": files}, only={TEACHER_FILE, PREPROCESS_FILE})


def load_teacher(bundle_dir: str | Path) -> tuple[MultiTaskNet, SWAG, Preprocessor, dict[str, Any]]:
    """(model with its last-iterate weights, SWAG posterior, preprocessor, stored config dict)."""
    path = resolve_bundle(bundle_dir)
    # Verify before anything is loaded (DESIGN.md, security): the manifest's hashes of the files
    # read here, then torch reads tensors and plain containers only (no pickled code).
    _verify_teacher(path)
    try:
        blob = torch.load(path / TEACHER_FILE, map_location="cpu", weights_only=True)
        pre = Preprocessor.from_dict(json.loads((path / PREPROCESS_FILE).read_text()))
    except (OSError, ValueError, KeyError, RuntimeError, pickle.UnpicklingError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BundleError(f"{path}: teacher bundle unreadable ({first})") from None
    if not isinstance(blob, dict):
        raise BundleError(f"{path / TEACHER_FILE}: not a teacher checkpoint")
    if blob.get("format") != TEACHER_FORMAT:
        raise BundleError(f"{path / TEACHER_FILE}: format {blob.get('format')} is not {TEACHER_FORMAT}")
    cfg = NetConfig(**blob["net"])
    model = MultiTaskNet(cfg)
    model.load_state_dict(blob["state_dict"])
    model.eval()
    swag = SWAG.from_state_dict(blob["swag"])
    return model, swag, pre, {"net": cfg, "profile": Profile.from_dict(blob["profile"]),
                              "meta": blob["meta"], "bundle_dir": path}


# ---- the whole run ------------------------------------------------------------------------
def _version_of(bundle_dir: Path) -> str:
    try:
        return str(read_manifest(bundle_dir)["version"])
    except (BundleError, KeyError):
        return bundle_dir.name


def _warm_start(parent: Path, logs: LogSet, profile: Profile
                ) -> tuple[MultiTaskNet | None, Preprocessor | None, str]:
    """The parent's teacher and preprocessor when its network fits these logs and this profile
    (same feature spec, tasks and sizes); else (None, None, why not)."""
    p_model, _, p_pre, _ = load_teacher(parent)
    if p_pre.spec != logs.spec or tuple(p_model.cfg.tasks) != tuple(logs.tasks):
        return None, None, "the parent's feature spec or tasks differ from these logs"
    if p_model.cfg != net_config(profile, p_pre, logs.tasks):
        return None, None, f"the parent's network is not the {profile.name} profile's"
    return p_model, p_pre, "ok"


def run_training(logs_path: str | Path, out: str | Path, profile: Profile, seed: int = 0,
                 version: str | None = None, teacher_only: bool = False, report: bool = True,
                 progress: bool = True, threads: int | None = None,
                 attribution: Attribution | None = None, *, parent: str | Path | None = None,
                 debias: str = DEFAULT_DEBIAS, anchor: str | Path | None = None,
                 since_ms: int | None = None, until_ms: int | None = None,
                 publish: bool | None = None) -> Path:
    """Every stage of `rta train`; returns the bundle directory.

    `parent` (a bundle dir): warm-start teacher and student from its weights (and reuse its
    preprocessor) when the feature spec matches; recorded in the manifest's lineage either way.
    `debias`: how the biased labels of logged traffic are weighted (training.debias). `anchor`
    (a bundle dir): distil the student toward that student's p too (less decision churn).
    `since_ms`/`until_ms`: train on the logged rows with since_ms <= ts_ms < until_ms only.
    `publish`: True points `<out>/current` at the new version, False never, None only when
    there is no `current` yet (the first version); otherwise the version is a candidate for
    `rta model promote`."""
    from training.report import plot_loss

    t0 = time.perf_counter()
    threads = use_all_cores(threads)
    version = version or time.strftime("v%Y%m%d-%H%M%S", time.gmtime())
    bundle_dir = Path(out) / version
    if bundle_dir.exists() and any(bundle_dir.iterdir()):
        raise BundleError(f"{bundle_dir} already exists; pick another --version")
    parent_dir = None if parent is None else resolve_bundle(parent)
    anchor_dir = None if anchor is None else resolve_bundle(anchor)

    logs = load_logs(logs_path, attribution=attribution).between(since_ms, until_ms)
    logs, debias_info = apply_debias(logs, debias)
    splits = make_splits(logs, profile, seed)
    log(f"loaded {len(logs)} rows ({len(logs.spec.numeric)} numeric + {len(logs.spec.categorical)} "
        f"categorical features) from {logs_path}; fit {len(splits.fit)} / valid {len(splits.valid)} / "
        f"test {len(splits.test)}; profile {profile.name}, seed {seed}, {threads} threads")
    log(f"training split: {describe_labels(splits.fit)}")
    if logs.masked:
        log("logged traffic: the teacher learns from observed labels only (blocked rows and open "
            "windows carry no loss); passed traffic is not a random sample, the explore slice is; "
            f"--debias {debias}: {json.dumps({k: v for k, v in debias_info.items() if k != 'mode'})}")
    if np.nansum(splits.fit.labels, axis=0).min() == 0:
        empty = splits.fit.tasks[int(np.argmin(np.nansum(splits.fit.labels, axis=0)))]
        raise DataError(f"{logs_path}: label column {empty!r} has no positive in the training split")

    warm, pre = None, None
    if parent_dir is not None:
        warm, pre, why = _warm_start(parent_dir, logs, profile)
        log(f"parent {_version_of(parent_dir)}: " + ("warm start from its teacher and preprocessor "
                                                     f"({profile.warm_epochs or profile.epochs} epochs)"
                                                     if warm is not None else f"cold start ({why})"))
    if pre is None:
        pre = Preprocessor.fit(splits.fit.spec, splits.fit.num, splits.fit.cat, seed=seed)
    model, swag, history = train_teacher(profile, pre, splits, seed, progress, warm=warm)
    bundle_dir.mkdir(parents=True, exist_ok=True)
    lineage = {
        "parent": None if parent_dir is None else _version_of(parent_dir),
        "logs": str(logs_path), "logs_fingerprint": logs.fingerprint(),
        "data_from_ms": int(logs.ts_ms.min()) if len(logs) else None,
        "data_to_ms": int(logs.ts_ms.max()) if len(logs) else None,
        "debias": debias, "anchor": None if anchor_dir is None else _version_of(anchor_dir),
        "profile": profile.name, "warm_start": warm is not None,
        "trained_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    meta = {
        "version": version, "seed": seed, "logs": str(logs_path), "logs_fingerprint": logs.fingerprint(),
        "rows": {"fit": len(splits.fit), "valid": len(splits.valid), "test": len(splits.test)},
        "tasks": list(logs.tasks), "base_rate": swag.base_rate.tolist(),
        "n_params": swag.n_params, "swag_snapshots": swag.n_snapshots, "swag_rank": swag.rank,
        "train_seconds": round(time.perf_counter() - t0, 1), "lineage": lineage, "debias": debias_info,
    }
    save_teacher(bundle_dir, model, swag, pre, profile, meta)
    (bundle_dir / TRAIN_LOG_FILE).write_text(json.dumps({"meta": meta, "history": history}, indent=1))
    plot_loss(history, bundle_dir / "loss.png", bundle_dir / "loss.json")
    log(f"teacher written to {bundle_dir} ({swag.n_params} weights, {swag.n_snapshots} SWAG snapshots, "
        f"{time.perf_counter() - t0:.0f}s so far)")

    # ---- stage 6: distill student + export ONNX + manifest --------------------------------
    # The student engineer's stage. ONE call; it writes student.onnx + manifest.json into
    # bundle_dir and publishes <out>/current. A missing module is reported, never skipped silently.
    if teacher_only:
        log("student stage skipped (--teacher-only): the bundle has the teacher only")
    else:
        try:
            from training.distill import distill_and_export
        except ModuleNotFoundError as exc:
            if exc.name != "training.distill":
                raise
            raise BundleError("student stage: training/distill.py is not built yet; the teacher is in "
                              f"{bundle_dir}; rerun with --teacher-only to skip the student") from None
        m_distill = profile.distill_samples or profile.n_samples
        log(f"teacher targets for the student: M = {m_distill} SWAG samples (seed {seed})")
        s_fit, s_valid = splits.fit, splits.valid.observed()
        pred_fit = teacher_predict(model, swag, pre, s_fit, profile, seed, n_samples=m_distill)
        pred_valid = teacher_predict(model, swag, pre, s_valid, profile, seed, n_samples=m_distill)
        if s_fit.masked:  # the student's label head: the teacher's mean where no label was observed
            from dataclasses import replace

            s_fit = replace(s_fit, labels=np.where(np.isnan(s_fit.labels), pred_fit.mean, s_fit.labels)
                            .astype(np.float32))
            log(f"student: unobserved labels replaced by the teacher's mean (soft); validation on "
                f"{len(s_valid)} fully labelled rows")
        label = functools.partial(teacher_predict_inputs, model, swag, profile, seed=seed, n_samples=m_distill)
        copies = StudentConfig.from_any(profile.student).augment_copies
        if copies:
            log(f"student inputs: {len(splits.fit)} logged + {copies * len(splits.fit)} new rows "
                f"({copies} swapped-feature copies), the new ones labelled by the teacher now")
        metrics = distill_and_export(bundle_dir, pre, pred_fit, s_fit, pred_valid, s_valid, profile,
                                     progress=progress, teacher=label, publish=False,
                                     init_student=None if warm is None else parent_dir,
                                     anchor=anchor_dir)
        (bundle_dir / "student_metrics.json").write_text(json.dumps(metrics, indent=1, default=str))
        log(f"student distilled and exported ({time.perf_counter() - t0:.0f}s so far)")

    # ---- stage 7: evaluation report on the held-out test split ----------------------------
    if report:
        from training.evaluate import evaluate_bundle

        test = splits.test.observed()
        if test is not splits.test:
            log(f"report on the {len(test)} of {len(splits.test)} test rows with every label observed "
                "(passed traffic: biased toward what the filter kept)")
        evaluate_bundle(bundle_dir, test, bundle_dir / "report", progress=progress)
        log(f"report written to {bundle_dir / 'report'}")
    if not teacher_only:
        # what the served graph scores on held-out rows: the ratio controller's cold start
        from stream.prior import write_bundle_distribution

        dist = write_bundle_distribution(bundle_dir, splits.test.num, splits.test.cat,
                                         fitted_on=f"test split ({len(splits.test)} held-out rows)")
        log(f"score distribution for the controller's cold start: {dist.rows} rows, {len(dist.strata_end)} u-strata")
        lineage["train_seconds"] = round(time.perf_counter() - t0, 1)
        update_manifest(bundle_dir, lineage=lineage)
        _publish_or_not(bundle_dir, publish)
    log(f"done in {time.perf_counter() - t0:.0f}s: {bundle_dir}")
    return bundle_dir


def _publish_or_not(bundle_dir: Path, publish: bool | None) -> None:
    """Contract: the first version becomes `current` by itself (bootstrap); a later one stays a
    candidate that `rta model promote` (gate + audit) publishes, unless `publish` forces it."""
    from model import registry
    from model.bundle import current_version
    from training.model_cli import who_default

    current = current_version(bundle_dir.parent)
    if publish or (publish is None and current is None):
        # through the registry's one locked, verified, logged switch (registry.jsonl)
        entry = registry.publish_trained(bundle_dir, who_default(None),
                                         "rta train --publish" if current is not None else "rta train: first version")
        log(f"published ({entry['action']}): {bundle_dir.parent / 'current'} -> {bundle_dir.name}")
    else:
        log(f"{bundle_dir.name} is a candidate; current stays {current}. "
            f"promote with: rta model promote {bundle_dir.name} --model-dir {bundle_dir.parent} --reason ...")


@click.command("train")
@click.option("--logs", "logs_path", required=True, type=LOCATION,
              help="Logged traffic: a Parquet/JSONL file, a directory of them, or `rta log`'s layout "
                   "(a path or s3://bucket/prefix).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Model directory; the bundle goes to <out>/<version>/.")
@click.option("--profile", "profile_name", type=click.Choice(sorted(PROFILES)), default="demo",
              show_default=True, help="Training profile (sizes, epochs, SWAG settings).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seeds the split, initialisation, batches and SWAG samples.")
@click.option("--version", default=None, help="Bundle version name (default: UTC timestamp).")
@click.option("--teacher-only", is_flag=True, help="Skip the student/ONNX stage.")
@click.option("--no-report", is_flag=True, help="Skip the evaluation report (run `rta eval` later).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Torch threads (default: every idle core; env RTA_TORCH_THREADS).")
@click.option("--attribution", default=None,
              help="Logged layout: attribution windows, e.g. 'click=15m,deal=7d' [default: click 15m, "
                   "online 1h, cart 1d, deal 7d].")
@click.option("--as-of-ms", type=int, default=None, help="Logged layout: labels as of [default: newest event].")
@click.option("--debias", type=click.Choice(DEBIAS_MODES), default=DEFAULT_DEBIAS, show_default=True,
              help="Logged layout: how the labels the filter let through are weighted (docs/results.md).")
@click.option("--parent", default=None,
              help="Version (in --out) or bundle dir to warm-start from; recorded as the lineage's parent.")
@click.option("--anchor", default=None,
              help="Version (in --out) or bundle dir whose student the new one is distilled toward (churn).")
@click.option("--since-ms", type=int, default=None, help="Train on rows with ts_ms >= this only.")
@click.option("--until-ms", type=int, default=None, help="Train on rows with ts_ms < this only.")
@click.option("--publish/--no-publish", default=None,
              help="Point <out>/current at the new version [default: only when there is no current yet].")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def train(logs_path: Path | str, out: Path, profile_name: str, seed: int, version: str | None,
          teacher_only: bool, no_report: bool, threads: int | None, attribution: str | None,
          as_of_ms: int | None, debias: str, parent: str | None, anchor: str | None,
          since_ms: int | None, until_ms: int | None, publish: bool | None, quiet: bool) -> None:
    """Train the PLE teacher with SWAG (+ student and ONNX) and write the model bundle."""
    profile = get_profile(profile_name)
    bundle_dir = run_training(logs_path, out, profile, seed=seed, version=version,
                              teacher_only=teacher_only, report=not no_report, progress=not quiet,
                              threads=threads, attribution=Attribution.parse(attribution, as_of_ms),
                              parent=_in_model_dir(out, parent), debias=debias,
                              anchor=_in_model_dir(out, anchor), since_ms=since_ms, until_ms=until_ms,
                              publish=publish)
    click.echo(json.dumps({"bundle": str(bundle_dir), "profile": profile_name, "seed": seed}))


def _in_model_dir(model_dir: Path, ref: str | None) -> Path | None:
    """A version name inside the model dir, or a path to a bundle."""
    if ref is None:
        return None
    return model_dir / ref if (model_dir / ref).is_dir() else Path(ref)
