"""The model bundle on disk: manifest, file hashes, and the atomic `current` pointer.

    <model_dir>/<version>/   student.onnx, manifest.json, preprocess.json, teacher.pt, reports...
    <model_dir>/current      symlink -> "<version>" (relative), swapped with rename(2)

A version directory is immutable once its manifest is written; publishing a version replaces
`current` in one rename, so a reader sees the old or the new target, never a half state.
Readers resolve `current` ONCE (`resolve_bundle`) and then read only from the resolved version
directory, so a switch during a load cannot mix files of two versions.

Standard library + numpy only: the serving scorer (`stream/scorer.py`) reads bundles through
this module and must not pull in torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
import time
from pathlib import Path
from typing import Any

from stream.errors import BundleError
from stream.features import FeatureSpec

MANIFEST = "manifest.json"
CURRENT = "current"
STUDENT_ONNX = "student.onnx"
FORMAT = 1
DEFAULT_SOURCE_MAP = {"click": "click", "online": "online", "cart": "click", "deal": "click"}
# Read by stream/policy.py (ScorePolicy.from_manifest): weighted in logit space, toward deal.
DEFAULT_SCORE_FUNCTION = {"kind": "weighted", "space": "logit",
                          "weights": {"click": 0.1, "online": 0.2, "cart": 0.3, "deal": 0.4}}


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _bundle_files(bundle_dir: Path) -> list[str]:
    """Every regular file under the bundle except the manifest and temp files, as posix paths."""
    out = []
    for p in sorted(bundle_dir.rglob("*")):
        rel = p.relative_to(bundle_dir).as_posix()
        if p.is_file() and rel != MANIFEST and not p.name.startswith(".tmp"):
            out.append(rel)
    return out


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_manifest(
    bundle_dir: str | Path,
    spec: FeatureSpec,
    tasks: list[str] | tuple[str, ...],
    uncertainty: dict[str, Any],
    source_map: dict[str, str] | None = None,
    score_function: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    thresholds: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Manifest content for a bundle directory (hashes every file currently in it).

    `uncertainty` describes the student's u output: {"measure", "rescale" (mode + factors or
    quantile-table summary)}. `source_map` (task -> task whose u guides it) defaults to
    DEFAULT_SOURCE_MAP restricted to `tasks`; `score_function` to DEFAULT_SCORE_FUNCTION.
    """
    bundle_dir = Path(bundle_dir)
    tasks = list(tasks)
    source = source_map or {t: DEFAULT_SOURCE_MAP.get(t, t) for t in tasks}
    source = {t: (s if s in tasks else t) for t, s in source.items() if t in tasks}
    if score_function is None:
        weights = {t: w for t, w in DEFAULT_SCORE_FUNCTION["weights"].items() if t in tasks}
        score_function = {**DEFAULT_SCORE_FUNCTION, "weights": weights or {t: 1.0 for t in tasks}}
    return {
        "format": FORMAT,
        "version": bundle_dir.name,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "feature_spec": spec.to_dict(),
        "tasks": tasks,
        "model": {"file": STUDENT_ONNX, "inputs": {"num": ["N", len(spec.numeric)], "cat": ["N", len(spec.categorical)]},
                  "outputs": {"p": ["N", len(tasks)], "u": ["N", len(tasks)]}},
        "uncertainty": dict(uncertainty),
        "uncertainty_source": source,
        "score_function": score_function,
        "thresholds": thresholds or {},
        "metrics": metrics or {},
        **(extra or {}),
        "files": {rel: sha256_file(bundle_dir / rel) for rel in _bundle_files(bundle_dir)},
    }


def write_manifest(bundle_dir: str | Path, manifest: dict[str, Any]) -> Path:
    """Write manifest.json atomically (temp file + rename)."""
    path = Path(bundle_dir) / MANIFEST
    _atomic_write(path, json.dumps(manifest, indent=2, sort_keys=False).encode())
    return path


def update_manifest(bundle_dir: str | Path, metrics: dict[str, Any] | None = None,
                    **fields: Any) -> dict[str, Any]:
    """Merge metrics/fields into an existing manifest and re-hash every file (e.g. after a report).

    Call it before `publish`; a published version is not to be modified.
    """
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    if metrics:
        manifest["metrics"] = {**manifest.get("metrics", {}), **metrics}
    manifest.update(fields)
    manifest["files"] = {rel: sha256_file(bundle_dir / rel) for rel in _bundle_files(bundle_dir)}
    write_manifest(bundle_dir, manifest)
    return manifest


def read_manifest(bundle_dir: str | Path) -> dict[str, Any]:
    path = Path(bundle_dir) / MANIFEST
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise BundleError(f"{path}: no manifest; not a model bundle (run `rta train`)") from None
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path}: unreadable manifest ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise BundleError(f"{path}: unsupported manifest format {data.get('format') if isinstance(data, dict) else '?'} "
                          f"(this build reads format {FORMAT})")
    for key in ("version", "feature_spec", "tasks", "files", "uncertainty"):
        if key not in data:
            raise BundleError(f"{path}: manifest lacks {key!r}")
    _check_types(path, data)
    return data


_MANIFEST_TYPES = {"version": str, "feature_spec": dict, "files": dict, "uncertainty": dict,
                   "uncertainty_source": (dict, str), "score_function": dict, "thresholds": dict,
                   "metrics": dict}


def _check_types(path: Path, data: dict[str, Any]) -> None:
    """Wrong JSON types are a refusal naming the key, not a TypeError deep in the scorer."""
    for key, kind in _MANIFEST_TYPES.items():
        if key in data and not isinstance(data[key], kind):
            raise BundleError(f"{path}: manifest {key!r} has the wrong type ({type(data[key]).__name__})")
    tasks = data["tasks"]
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) and t for t in tasks):
        raise BundleError(f"{path}: manifest 'tasks' must be a non-empty list of names, got {tasks!r:.80}")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in data["files"].items()):
        raise BundleError(f"{path}: manifest 'files' must map file names to sha256 strings")


def publish(bundle_dir: str | Path) -> Path:
    """Point `<model_dir>/current` at this version atomically (symlink swapped via rename)."""
    bundle_dir = Path(bundle_dir).resolve()
    read_manifest(bundle_dir)  # never publish something that is not a bundle
    model_dir = bundle_dir.parent
    tmp = model_dir / f".tmp-current-{os.getpid()}-{time.monotonic_ns()}"
    os.symlink(bundle_dir.name, tmp)
    try:
        os.replace(tmp, model_dir / CURRENT)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(model_dir, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return model_dir / CURRENT


def current_version(model_dir: str | Path) -> str | None:
    """Name of the version `current` points at (one readlink), or None if there is none."""
    try:
        return Path(os.readlink(Path(model_dir) / CURRENT)).name
    except (FileNotFoundError, OSError):
        return None


def resolve_bundle(path: str | Path) -> Path:
    """A bundle directory, or a model directory whose `current` is followed (read once)."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    if (path / CURRENT).is_symlink() or (path / CURRENT).exists():
        version = current_version(path)
        if version is None:
            raise BundleError(f"{path / CURRENT}: not a symlink to a version directory")
        target = path / version
        if not target.is_dir():
            raise BundleError(f"{path / CURRENT} points at {version!r}, which does not exist")
        return target
    if not path.exists():
        raise BundleError(f"{path}: no such model directory")
    raise BundleError(f"{path}: neither a bundle (no {MANIFEST}) nor a model directory (no {CURRENT})")


def _entry(bundle_dir: Path, rel: str) -> Path:
    pure = Path(rel)
    if not rel or pure.is_absolute() or ".." in pure.parts or "\\" in rel:
        raise BundleError(f"{bundle_dir / MANIFEST}: file entry {rel!r} is not a path inside the bundle")
    return pure


def bundle_file(bundle_dir: str | Path, rel: str) -> Path:
    """The path of a manifest file entry, refused unless it is a regular file INSIDE the bundle:
    an entry like `/dev/zero` would hang the hash, `../x` would read outside the bundle."""
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / _entry(bundle_dir, rel)
    try:
        real = path.resolve(strict=True)
        inside = real.is_relative_to(bundle_dir.resolve(strict=True))
        mode = os.stat(real).st_mode
    except FileNotFoundError:
        raise BundleError(f"{path}: listed in the manifest but missing") from None
    except OSError as exc:
        raise BundleError(f"{path}: unreadable ({exc.strerror or exc})") from None
    if not inside:
        raise BundleError(f"{path}: resolves outside the bundle ({real})")
    if not stat.S_ISREG(mode):
        raise BundleError(f"{path}: not a regular file")
    return path


def verify_files(bundle_dir: str | Path, manifest: dict[str, Any],
                 preloaded: dict[str, bytes] | None = None, only: set[str] | None = None) -> None:
    """Check the sha256 of the files the manifest lists (`only`: just these, e.g. what serving
    reads; every entry's path is still checked to lie inside the bundle); `preloaded` bytes are
    checked as given. Serving passes `only={STUDENT_ONNX}`: it never hashes training files."""
    bundle_dir = Path(bundle_dir)
    preloaded = preloaded or {}
    files = manifest["files"]
    if not isinstance(files, dict):
        raise BundleError(f"{bundle_dir / MANIFEST}: manifest 'files' must be a mapping")
    if (only is None or STUDENT_ONNX in only) and STUDENT_ONNX not in files:
        raise BundleError(f"{bundle_dir / MANIFEST}: lists no {STUDENT_ONNX}")
    missing = sorted((only or set()) - set(files) - set(preloaded))
    if missing:
        raise BundleError(f"{bundle_dir / MANIFEST}: lists no hash for {', '.join(missing)}")
    for rel in files:
        _entry(bundle_dir, rel)
    for rel, expected in files.items():
        if only is not None and rel not in only:
            continue
        if rel in preloaded:
            got = sha256_bytes(preloaded[rel])
        else:
            path = bundle_file(bundle_dir, rel)
            try:
                got = sha256_file(path)
            except OSError as exc:
                raise BundleError(f"{path}: unreadable ({exc.strerror or exc})") from None
        if got != expected:
            raise BundleError(f"{bundle_dir / rel}: sha256 mismatch (manifest {expected[:12]}..., "
                              f"file {got[:12]}...); the file is corrupt or was modified")


def verify_spec(bundle_dir: str | Path, manifest: dict[str, Any],
                expected_fingerprint: str | None = None) -> FeatureSpec:
    """The manifest's feature spec, checked against its own fingerprint and the caller's."""
    try:
        spec = FeatureSpec.from_dict(manifest["feature_spec"])
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{Path(bundle_dir) / MANIFEST}: bad feature spec ({exc})") from None
    if "fingerprint" not in manifest["feature_spec"]:
        raise BundleError(f"{Path(bundle_dir) / MANIFEST}: feature spec has no fingerprint")
    if expected_fingerprint is not None and spec.fingerprint() != expected_fingerprint:
        raise BundleError(f"{Path(bundle_dir)}: feature fingerprint mismatch (expected {expected_fingerprint}, "
                          f"bundle has {spec.fingerprint()})")
    return spec
