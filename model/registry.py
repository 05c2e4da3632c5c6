"""The model registry over a model directory: versions, lineage, and the audited `current` switch.

    <model_dir>/<version>/        a bundle (model/bundle.py); `gate.json` beside its manifest once gated
    <model_dir>/current           the served version (bundle.publish: one rename)
    <model_dir>/registry.jsonl    append-only: one JSON line per switch of `current`

Every switch of `current` goes through `switch` (one lock, verify under it, audit, log): promote
and rollback (`rta model`), the first bootstrap and `rta train --publish` (`publish_trained`).
The registry line is written (fsynced) BEFORE `current` moves, so a crash between the two leaves
a line for a switch that did not happen, never a switch with no line; such a line is recognised
(the next line's `old`, or `current` itself, says where `current` really was) and ignored by
the chain, so rollback keeps working.

Who promoted what, when and why is on the Kafka audit topic (the durable record, as for
`rta ratio set`) and in `registry.jsonl` (readable without a broker: `rta model list`). A switch
is made only after the audit topic acknowledged the entry (unless `--no-audit-topic`), so there
is never a served version the audit trail does not know about. Rollback goes back along the
chain of versions `current` held (a stack rebuilt from registry.jsonl), not by creation time.

Standard library only at import (the gate and the churn report import training code lazily).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from pathlib import Path
from typing import Any

from model import bundle
from stream.errors import BundleError, ConfigError

REGISTRY_LOG = "registry.jsonl"
GATE_FILE = "gate.json"
TRAIN_LOG = "train_log.json"
LOCK_FILE = ".registry.lock"


def _model_dir(model_dir: str | Path) -> Path:
    path = Path(model_dir)
    if not path.is_dir():
        raise BundleError(f"{path}: no such model directory")
    return path


def version_dirs(model_dir: str | Path) -> list[Path]:
    """Every version directory (one with a manifest), oldest first by manifest time."""
    root = _model_dir(model_dir)
    dirs = [p for p in root.iterdir() if p.is_dir() and not p.is_symlink() and not p.name.startswith(".") and (p / bundle.MANIFEST).is_file()]
    return sorted(dirs, key=lambda p: ((p / bundle.MANIFEST).stat().st_mtime, p.name))


def version_dir(model_dir: str | Path, version: str) -> Path:
    """The directory of `version`, refused unless it is a bundle in this model directory."""
    root = _model_dir(model_dir)
    if not version or "/" in version or version in (".", "..", bundle.CURRENT):
        raise ConfigError(f"{version!r} is not a version name")
    path = root / version
    if path.is_symlink():
        raise BundleError(f"{path} is a symlink: a version must be a directory of {root} (a link would "
                          "switch `current` to a bundle this registry does not hold)")
    if not (path / bundle.MANIFEST).is_file():
        known = ", ".join(p.name for p in version_dirs(root)) or "none"
        raise BundleError(f"{root}: unknown version {version!r} (versions: {known})")
    return path


def lineage(bundle_dir: str | Path) -> dict[str, Any]:
    """The manifest's lineage; for bundles trained before lineage existed, what train_log.json
    knows (logs, fingerprint), with the rest None. Never fails on an old bundle."""
    path = Path(bundle_dir)
    found = bundle.read_manifest(path).get("lineage")
    if isinstance(found, dict):
        return found
    meta: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError, AttributeError):
        meta = json.loads((path / TRAIN_LOG).read_text()).get("meta", {})
    return {"parent": None, "logs": meta.get("logs"), "logs_fingerprint": meta.get("logs_fingerprint"),
            "data_from_ms": None, "data_to_ms": None, "debias": None, "anchor": None,
            "profile": None, "trained_at": None, "recorded": False}


def read_gate(bundle_dir: str | Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(bundle_dir) / GATE_FILE).read_text())
    except (OSError, ValueError):
        return None


def write_gate(bundle_dir: str | Path, result: dict[str, Any]) -> Path:
    """gate.json beside the manifest (not a manifest file entry: the bundle's hashes stay valid)."""
    path = Path(bundle_dir) / GATE_FILE
    bundle._atomic_write(path, json.dumps(result, indent=1, allow_nan=False).encode())
    return path


def read_log(model_dir: str | Path) -> list[dict[str, Any]]:
    """registry.jsonl entries, oldest first; a torn last line (a crash mid-append) is skipped."""
    path = _model_dir(model_dir) / REGISTRY_LOG
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            out.append(entry)
    return out


def _append_log(model_dir: Path, entry: dict[str, Any]) -> None:
    fd = os.open(model_dir / REGISTRY_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, (json.dumps(entry, allow_nan=False) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


_PUSHES = ("promote", "bootstrap", "publish")


def applied_log(model_dir: str | Path) -> list[dict[str, Any]]:
    """registry.jsonl without the lines of switches that never happened (a crash or an error
    between the line and the switch): a line applied iff the next line's `old` is its `new`,
    or, for the last line, `current` is its `new`."""
    log = read_log(model_dir)
    if not log:
        return []
    current = bundle.current_version(model_dir)
    nxt = [e.get("old") for e in log[1:]] + [current]
    return [e for e, after in zip(log, nxt, strict=True) if e.get("new") == after]


def history_chain(model_dir: str | Path) -> list[str]:
    """The versions `current` held, oldest first, as promotes (and bootstraps, publishes) push
    and rollbacks pop them."""
    chain: list[str] = []
    for e in applied_log(model_dir):
        old, new = e.get("old"), e.get("new")
        if e.get("action") == "rollback":
            if chain and chain[-1] == old:
                chain.pop()
            if not chain or chain[-1] != new:
                chain.append(new)
        elif e.get("action") in _PUSHES:
            if old and (not chain or chain[-1] != old):
                chain.append(old)
            chain.append(new)
    return chain


def previous_version(model_dir: str | Path) -> str | None:
    """What a rollback restores: the version before the current one in the chain."""
    current = bundle.current_version(model_dir)
    chain = history_chain(model_dir)
    if current is None or len(chain) < 2 or chain[-1] != current:
        return None
    return chain[-2]


def verify(bundle_dir: str | Path) -> dict[str, Any]:
    """Manifest, every listed file's hash, and the feature spec; the manifest on success."""
    manifest = bundle.read_manifest(bundle_dir)
    bundle.verify_files(bundle_dir, manifest)
    bundle.verify_spec(bundle_dir, manifest)
    return manifest


def switch(model_dir: str | Path, version: str, action: str, who: str, reason: str,
           audit: Any = None, forced: bool = False, gate: dict[str, Any] | None = None,
           expect_current: str | None = None) -> dict[str, Any]:
    """Point `current` at `version` (promote, rollback, bootstrap, publish), locked, verified
    under the lock and audited: the audit topic first (`audit(entry)` returns None when
    acknowledged, else why not; None skips it), then registry.jsonl, then the atomic switch.
    Returns the entry.

    `expect_current`: the version the decision was made against (the gate's `current`, the
    rollback's). Checked under the lock, so of two overlapping retrains the second cannot
    replace the first's promotion with a verdict won against the model before it."""
    if not reason or not reason.strip():
        raise ConfigError(f"{action} needs --reason (kept in the audit trail)")
    root = _model_dir(model_dir)
    target = version_dir(root, version)
    lock = os.open(root / LOCK_FILE, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two switches at once: each records the `old` it replaced
        target = version_dir(root, version)  # again under the lock: not swapped for a link meanwhile
        verify(target)  # under the lock: what is verified is what is served
        now = bundle.current_version(root)
        if expect_current is not None and now != expect_current:
            raise BundleError(f"current moved to {now} while this {action} was decided against {expect_current}; "
                              "NOT changed: decide again against the new current")
        return _switch_locked(root, target, version, action, who, reason, audit, forced, gate)
    finally:
        os.close(lock)


def _switch_locked(root: Path, target: Path, version: str, action: str, who: str, reason: str, audit: Any,
                   forced: bool, gate: dict[str, Any] | None) -> dict[str, Any]:
    old = bundle.current_version(root)
    entry = {"kind": f"model.{action}", "action": action, "who": who, "reason": reason.strip(),
             "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "ts_ms": int(time.time() * 1000),
             "model_dir": str(root.resolve()), "old": old, "new": version, "forced": bool(forced),
             "audit_topic": audit is not None}
    if gate is not None:
        entry["gate"] = {k: gate.get(k) for k in ("passed", "decision", "reasons", "estimate", "window", "targets")}
    if audit is not None:
        why = audit(entry)
        if why is not None:
            raise BundleError(f"audit topic not written ({why}); current NOT changed (still {old}); "
                              "--no-audit-topic skips the topic")
    _append_log(root, entry)  # first: a crash after it leaves a line `applied_log` drops, not a silent switch
    bundle.publish(target)
    return entry


def publish_trained(bundle_dir: str | Path, who: str, reason: str) -> dict[str, Any]:
    """`rta train --publish` and the first bootstrap, through the same locked, audited `switch`:
    `bootstrap` when there is no current yet, else `publish` (recorded as forced: no gate ran)."""
    path = Path(bundle_dir)
    root = path.parent
    action = "bootstrap" if bundle.current_version(root) is None else "publish"
    return switch(root, path.name, action, who, reason, forced=action == "publish")


def summary(model_dir: str | Path) -> list[dict[str, Any]]:
    """One row per version for `rta model list`: metrics that matter, lineage, gate, promotion."""
    root = _model_dir(model_dir)
    current = bundle.current_version(root)
    promoted: dict[str, dict[str, Any]] = {}
    for e in applied_log(root):
        promoted[e.get("new")] = e
    rows = []
    for d in version_dirs(root):
        try:
            m = bundle.read_manifest(d)
        except BundleError as exc:
            rows.append({"version": d.name, "error": str(exc)})
            continue
        lin = lineage(d)
        fid = (m.get("metrics", {}).get("fidelity") or {}).get("acceptance") or {}
        gate = read_gate(d)
        last = promoted.get(d.name)
        rows.append({
            "version": d.name, "current": d.name == current, "created_at": m.get("created_at"),
            "parent": lin.get("parent"), "logs": lin.get("logs"), "debias": lin.get("debias"),
            "fidelity_passed": fid.get("passed"),
            "gate": None if gate is None else (gate.get("decision")  # promote | refuse | inconclusive
                                                 or ("passed" if gate.get("passed") else "refused")),
            "last_switch": None if last is None else {k: last.get(k) for k in ("action", "who", "at", "reason",
                                                                                 "forced")},
        })
    return rows
