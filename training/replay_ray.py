"""`rta replay --engine ray`: the scoring step of replay on Ray actors (opt-in, extra `[ray]`).

Replay's cost on a large log is scoring (one onnxruntime pass per row); deciding is cheap and
sequential in live mode (one controller on event time). So only scoring moves: the driver loads
the log and computes the worker's codes as the local engine does (`feature_codes`), cuts the
rows in event-time order into blocks of whole `SCORE_CHUNK` chunks, and a pool of actors, each
holding the bundle (`Scorer.load`, the worker's loader), runs the worker's own
`stream.engine.score_batch` over each block chunk by chunk: the same chunk boundaries as the
local path, so every float is the same and the decisions that follow are identical.

Ray starts a new local instance (`address="local"`: never a cluster that `RAY_ADDRESS` or a
`ray start` on this machine points at; `num_cpus` = workers, no dashboard, a small object store)
unless `RTA_RAY_ADDRESS` names a cluster. The actors never read the driver's bundle path (on a
cluster node it does not exist): the driver ships the bundle's serving files (manifest, spec,
graphs) through the object store, and each actor writes them to a temporary directory and loads
them with `Scorer.load`, which checks the manifest's hashes as it does for a serving worker.
Ray is never imported by the serving path, nor by replay's default engine (this module is
imported only for `--engine ray`).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from stream.errors import BundleError, ConfigError, WorkerError

ADDRESS_ENV = "RTA_RAY_ADDRESS"
BLOCKS_ENV = "RTA_RAY_BLOCK_CHUNKS"
# SCORE_CHUNK-row chunks per actor call (2048 x 16 rows: call overhead << work); the env var
# sets it (tests cut a small log into several blocks)
BLOCK_CHUNKS = 16
_OBJECT_STORE_BYTES = 256 << 20  # local mode: the blocks in flight, not the log


def _ray() -> Any:
    try:
        import ray
    except ModuleNotFoundError:
        raise ConfigError("--engine ray needs Ray: pip install 'rta-filter[ray]'") from None
    return ray


def bundle_files(bundle_dir: str | Path) -> dict[str, bytes]:
    """The files an actor needs to load the bundle (JSON and ONNX at its top level; not the
    training checkpoints), as bytes: the driver ships them, so no node reads the driver's path."""
    from stream.scorer import resolve_bundle

    root = resolve_bundle(bundle_dir)
    files = {p.name: p.read_bytes() for p in sorted(root.iterdir())
             if p.is_file() and p.suffix in (".json", ".onnx")}
    if not files:
        raise BundleError(f"{root}: no bundle files to ship to the Ray actors")
    return files


def _first(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def block_chunks() -> int:
    """SCORE_CHUNK chunks per actor call, from RTA_RAY_BLOCK_CHUNKS (default BLOCK_CHUNKS)."""
    raw = os.environ.get(BLOCKS_ENV, "").strip()
    try:
        per_call = int(raw) if raw else BLOCK_CHUNKS
    except ValueError:
        raise ConfigError(f"{BLOCKS_ENV}={raw[:40]!r}: expected a whole number >= 1") from None
    if per_call < 1:
        raise ConfigError(f"{BLOCKS_ENV} must be >= 1, got {per_call}")
    return per_call


class _ScoreActor:
    """One worker process holding the bundle, as a serving worker does; loaded from the bytes
    the driver shipped (checked against the manifest's hashes by Scorer.load)."""

    def __init__(self, files: dict[str, bytes], threads: int) -> None:
        from stream.policy import ScorePolicy
        from stream.scorer import Scorer

        where = tempfile.mkdtemp(prefix="rta-ray-bundle-")
        try:
            for name, data in files.items():
                Path(where, name).write_bytes(data)
            self.scorer = Scorer.load(where, intra_threads=threads)
        finally:  # the session holds the graph's bytes: nothing is read from disk after loading
            shutil.rmtree(where, ignore_errors=True)
        self.policy = ScorePolicy.from_manifest(self.scorer.manifest)

    def score(self, num: np.ndarray, cat: np.ndarray, chunk: int) -> tuple[np.ndarray, ...]:
        from stream.engine import score_batch

        outs = [score_batch(self.scorer, self.policy, num[s:s + chunk], cat[s:s + chunk])
                for s in range(0, len(num), chunk)]
        return tuple(np.concatenate([getattr(o, f) for o in outs]) for f in ("p", "u_tasks", "e", "u"))


class RayScoring:
    """A pool of scoring actors; `blocks(num, cat, chunk)` yields (slice, (p, u_tasks, e, u)) in
    row order. Use as a context manager: Ray is shut down on exit if this process started it."""

    def __init__(self, bundle_dir: str | Path, workers: int = 2, threads: int = 1) -> None:
        if workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {workers}")
        self.per_call = block_chunks()
        files = bundle_files(bundle_dir)
        ray = _ray()
        self.workers = workers
        address = os.environ.get(ADDRESS_ENV, "").strip() or None
        self._started = not ray.is_initialized()
        if self._started:
            # "local": a new instance, never RAY_ADDRESS's or a `ray start` cluster on this box
            kwargs: dict[str, Any] = {"address": address or "local", "include_dashboard": False,
                                      "log_to_driver": False, "logging_level": logging.WARNING,
                                      "configure_logging": False}
            if address is None:  # local mode: this machine's share, not all of it
                kwargs.update(num_cpus=workers, object_store_memory=_OBJECT_STORE_BYTES)
            try:
                ray.init(**kwargs)
            except Exception as exc:  # an unreachable RTA_RAY_ADDRESS, no room for the object store
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                where = f"the cluster at {ADDRESS_ENV}={address}" if address else "a local Ray"
                raise ConfigError(f"--engine ray: cannot start {where} ({first})") from None
        actor = ray.remote(num_cpus=1)(_ScoreActor)
        shipped = ray.put(files)  # once into the object store, not once per actor
        self.actors = [actor.remote(shipped, threads) for _ in range(workers)]

    def blocks(self, num: np.ndarray, cat: np.ndarray, chunk: int) -> Iterator[tuple[slice, tuple[np.ndarray, ...]]]:
        from ray.exceptions import RayError
        from ray.util import ActorPool

        n, size = len(num), chunk * self.per_call
        spans = [slice(s, min(n, s + size)) for s in range(0, n, size)]
        pool = ActorPool(self.actors)
        results = pool.map(lambda a, sl: a.score.remote(num[sl], cat[sl], chunk), spans)  # in order
        try:
            yield from zip(spans, results, strict=True)
        except RayError as exc:  # an actor that could not load the bundle, or died
            raise WorkerError(f"--engine ray: scoring failed ({_first(exc)})") from None

    def __enter__(self) -> RayScoring:
        return self

    def __exit__(self, *exc: object) -> None:
        ray = _ray()
        for a in self.actors:
            ray.kill(a)
        if self._started:
            ray.shutdown()
