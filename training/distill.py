"""Distill the SWAG teacher into the one-pass student and write the servable bundle.

Called once by the training pipeline (`rta train`) after the teacher:

    metrics = distill_and_export(bundle_dir, pre, teacher_pred_train, train,
                                 teacher_pred_valid, valid, profile_cfg)

Steps: targets (labels, teacher mean, teacher uncertainty rescaled) -> train the student (early
stopping on validation loss) -> optionally train the other target mode for the tail comparison
-> export student.onnx -> score validation through onnxruntime (the served path) -> fidelity
report -> default thresholds -> manifest -> publish `<model_dir>/current`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from model import bundle
from model.export import export_bundle
from model.preprocess import Preprocessor
from model.student import LOG_FLOOR, TARGET_MODES, Student, StudentConfig
from stream.features import DEFAULT_TASKS
from training.fidelity import acceptance, fidelity_report

DEFAULT_TARGETS = {"r": 0.3, "p_u": 0.05, "epsilon": 0.01}


def _measure(pred: Any, name: str) -> np.ndarray:
    if hasattr(pred, "measure"):
        return np.asarray(pred.measure(name), np.float32)
    field = {"prob_var": "var", "logit_var": "logit_var", "base_rate_relative": "relative"}[name]
    return np.asarray(getattr(pred, field), np.float32)


def _tasks_of(logset: Any) -> list[str]:
    tasks = getattr(logset, "tasks", None)
    return list(tasks) if tasks else list(DEFAULT_TASKS[: logset.labels.shape[1]])


class _Data:
    """One split as tensors: inputs, labels, teacher mean, head targets."""

    def __init__(self, x: np.ndarray, idx: np.ndarray, y: np.ndarray, soft: np.ndarray,
                 target: np.ndarray) -> None:
        self.x = torch.from_numpy(np.ascontiguousarray(x, np.float32))
        self.idx = torch.from_numpy(np.ascontiguousarray(idx, np.int64))
        self.y = torch.from_numpy(np.ascontiguousarray(soft, np.float32))
        self.target = torch.from_numpy(np.ascontiguousarray(target, np.float32))
        self.n = self.x.shape[0]


def _loss(student: Student, d: _Data, rows: slice | torch.Tensor, u_weight: float
          ) -> tuple[torch.Tensor, torch.Tensor]:
    logit, u_raw = student.raw(d.x[rows], d.idx[rows])
    bce = F.binary_cross_entropy_with_logits(logit, d.y[rows])
    mse = F.mse_loss(student.head_target(u_raw), d.target[rows])
    return bce + u_weight * mse, mse


@torch.no_grad()
def _eval_loss(student: Student, d: _Data, u_weight: float, batch: int = 16384) -> float:
    student.eval()
    total = 0.0
    for s in range(0, d.n, batch):
        loss, _ = _loss(student, d, slice(s, s + batch), u_weight)
        total += float(loss) * min(batch, d.n - s)
    return total / max(d.n, 1)


def _encode_valid(student: Student, u: np.ndarray) -> np.ndarray:
    """Validation targets under the map fitted on training data (no peeking at valid ranks)."""
    if student.target_mode == "mean_match":
        return u * student.rescale.numpy()
    if student.target_mode == "log":
        lu = np.log(np.maximum(u, LOG_FLOOR))
        return (lu - student.log_loc.numpy()) / student.log_scale.numpy()
    table = student.quantiles.numpy()
    grid = np.linspace(0, 1, table.shape[1])
    return np.stack([np.interp(u[:, j], table[j], grid) for j in range(u.shape[1])], axis=1)


def train_student(
    pre: Preprocessor,
    train: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    valid: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    tasks: list[str],
    cfg: StudentConfig,
    progress: bool = True,
) -> tuple[Student, dict[str, Any]]:
    """Fit a student on (x, idx, labels, teacher_mean, teacher_u) per split; best epoch kept."""
    torch.manual_seed(cfg.seed)
    student = Student(pre.n_inputs, pre.cardinalities, tasks, cfg)
    x, idx, y, t_mean, t_u = train
    vx, vidx, vy, vt_mean, vt_u = valid
    a = cfg.soft_label_weight
    tr = _Data(x, idx, y, (1 - a) * y + a * t_mean, student.set_target_map(t_u, y))
    va = _Data(vx, vidx, vy, (1 - a) * vy + a * vt_mean, _encode_valid(student, vt_u))
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = max(1, -(-tr.n // cfg.batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps,
                                                pct_start=0.15)
    gen = torch.Generator().manual_seed(cfg.seed)
    best, best_state, stale, history = float("inf"), None, 0, []
    bar = tqdm(range(cfg.epochs), desc=f"student[{cfg.target_mode}]", disable=not progress, leave=False)
    t0 = time.perf_counter()
    for epoch in bar:
        student.train()
        perm = torch.randperm(tr.n, generator=gen)
        run = 0.0
        for s in range(0, tr.n, cfg.batch_size):
            loss, _ = _loss(student, tr, perm[s:s + cfg.batch_size], cfg.u_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            run += float(loss.detach())
        v = _eval_loss(student, va, cfg.u_weight)
        history.append({"epoch": epoch + 1, "train_loss": run / steps, "valid_loss": v})
        bar.set_postfix(train=f"{run / steps:.4f}", valid=f"{v:.4f}")
        if v < best - 1e-6:
            best, best_state, stale = v, copy.deepcopy(student.state_dict()), 0
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    if best_state is not None:
        student.load_state_dict(best_state)
    student.eval()
    return student, {"history": history, "best_valid_loss": best, "seconds": time.perf_counter() - t0,
                     "parameters": sum(p.numel() for p in student.parameters())}


def default_thresholds(manifest: dict[str, Any], p: np.ndarray, u: np.ndarray,
                       targets: dict[str, float] = DEFAULT_TARGETS) -> dict[str, Any]:
    """theta / tau_u that realise the default targets on validation traffic (a cold-start value
    for the controller before its window fills)."""
    from stream.policy import ScorePolicy

    policy = ScorePolicy.from_manifest(manifest)
    e, unc = policy.score(p), policy.uncertainty(u)
    tau_u = float(np.quantile(unc, 1.0 - targets["p_u"]))
    rest = e[unc < tau_u]
    # block r of ALL traffic, taken from the non-uncertain, non-explore rest
    share = targets["r"] / max(1e-9, (1.0 - targets["epsilon"]) * (1.0 - targets["p_u"]))
    theta = float(np.quantile(rest, min(share, 1.0))) if rest.size else 0.0
    return {**targets, "theta": theta, "tau_u": tau_u, "fitted_on": "validation"}


def distill_and_export(
    bundle_dir: str | Path,
    pre: Preprocessor,
    teacher_pred_train: Any,
    train: Any,
    teacher_pred_valid: Any,
    valid: Any,
    profile_cfg: Any = None,
    publish: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the student, write student.onnx + manifest into `bundle_dir`, publish it as current.

    Returns the metrics stored in the manifest (student training, fidelity, acceptance).
    """
    bundle_dir = Path(bundle_dir)
    cfg = StudentConfig.from_any(getattr(profile_cfg, "student", profile_cfg if isinstance(profile_cfg, dict) else None))
    tasks = _tasks_of(train)
    source_map = getattr(profile_cfg, "source_map", None) or {
        t: bundle.DEFAULT_SOURCE_MAP.get(t, t) for t in tasks}
    x, idx = pre.transform(train.num, train.cat)
    vx, vidx = pre.transform(valid.num, valid.cat)
    tr = (x, idx, train.labels, teacher_pred_train.mean, _measure(teacher_pred_train, cfg.uncertainty_measure))
    t_u_valid = _measure(teacher_pred_valid, cfg.uncertainty_measure)
    va = (vx, vidx, valid.labels, teacher_pred_valid.mean, t_u_valid)

    student, info = train_student(pre, tr, va, tasks, cfg, progress)
    alternatives, alt_info = {}, {}
    if cfg.extra.get("compare_target_modes", True):
        for mode in TARGET_MODES:
            if mode == cfg.target_mode:
                continue
            other, oi = train_student(pre, tr, va, tasks, dataclasses.replace(cfg, target_mode=mode), progress)
            alternatives[mode] = other.predict(vx, vidx)[1]
            alt_info[mode] = {k: oi[k] for k in ("best_valid_loss", "seconds")}

    export_bundle(bundle_dir, pre, student, measure=cfg.uncertainty_measure, source_map=source_map)
    sess = ort.InferenceSession(str(bundle_dir / bundle.STUDENT_ONNX), providers=["CPUExecutionProvider"])
    s_p, s_u = sess.run(["p", "u"], {"num": np.asarray(valid.num, np.float32),
                                     "cat": np.asarray(valid.cat, dtype=object)})
    t_p, t_u = student.predict(vx, vidx)
    parity = {"p": float(np.abs(s_p - t_p).max(initial=0.0)), "u": float(np.abs(s_u - t_u).max(initial=0.0))}

    fid = fidelity_report(teacher_pred_valid.mean, t_u_valid, s_p, s_u, valid.labels, tasks,
                          out_dir=bundle_dir / "fidelity", source_map=source_map,
                          alternatives=alternatives, primary_mode=cfg.target_mode)
    metrics = {
        "student": {"config": cfg.to_dict(), **{k: v for k, v in info.items() if k != "history"},
                    "epochs_run": len(info["history"]), "alternatives": alt_info},
        "onnx_vs_torch_max_abs": parity,
        "fidelity": {
            "tasks": fid["tasks"], "tail_winner": fid["tail_winner"],
            "acceptance": acceptance(fid, source_map.get("deal", "click") if "deal" in tasks else tasks[0]),
            "report": "fidelity/fidelity.json",
        },
    }
    (bundle_dir / "student_train_log.json").write_text(json.dumps(info["history"], indent=2))
    thresholds = default_thresholds(bundle.read_manifest(bundle_dir), s_p, s_u)
    manifest = bundle.update_manifest(bundle_dir, metrics=metrics, thresholds=thresholds)
    if publish:
        bundle.publish(bundle_dir)
    return manifest["metrics"]

