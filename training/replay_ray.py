"""`rta replay --engine ray`: the scoring step of replay on Ray actors (opt-in, extra `[ray]`).

Replay's cost on a large log is scoring (one onnxruntime pass per row); deciding is cheap and
sequential in live mode (one controller on event time). So only scoring moves: the driver loads
the log and computes the worker's codes as the local engine does (`feature_codes`), cuts the
rows in event-time order into blocks of whole `SCORE_CHUNK` chunks, and a pool of actors, each
holding the bundle (`Scorer.load`, the worker's loader), runs the worker's own
`stream.engine.score_batch` over each block chunk by chunk: the same chunk boundaries as the
local path, so every float is the same and the decisions that follow are identical.

Ray starts in local mode (`num_cpus` = workers, no dashboard, a small object store) unless
`RTA_RAY_ADDRESS` names a cluster. Ray is never imported by the serving path, nor by replay's
default engine (this module is imported only for `--engine ray`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from stream.errors import ConfigError

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


class _ScoreActor:
    """One worker process holding the bundle, as a serving worker does."""

    def __init__(self, bundle_dir: str, threads: int) -> None:
        from stream.policy import ScorePolicy
        from stream.scorer import Scorer

        self.scorer = Scorer.load(bundle_dir, intra_threads=threads)
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
        ray = _ray()
        self.workers = workers
        address = os.environ.get(ADDRESS_ENV) or None
        self._started = not ray.is_initialized()
        if self._started:
            kwargs: dict[str, Any] = {"address": address, "include_dashboard": False, "log_to_driver": False,
                                      "logging_level": logging.WARNING, "configure_logging": False}
            if address is None:  # local mode: this machine's share, not all of it
                kwargs.update(num_cpus=workers, object_store_memory=_OBJECT_STORE_BYTES)
            try:
                ray.init(**kwargs)
            except Exception as exc:  # an unreachable RTA_RAY_ADDRESS, no room for the object store
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                where = f"the cluster at {ADDRESS_ENV}={address}" if address else "a local Ray"
                raise ConfigError(f"--engine ray: cannot start {where} ({first})") from None
        actor = ray.remote(num_cpus=1)(_ScoreActor)
        self.actors = [actor.remote(str(bundle_dir), threads) for _ in range(workers)]

    def blocks(self, num: np.ndarray, cat: np.ndarray, chunk: int) -> Iterator[tuple[slice, tuple[np.ndarray, ...]]]:
        from ray.util import ActorPool

        per_call = int(os.environ.get(BLOCKS_ENV) or BLOCK_CHUNKS)
        if per_call < 1:
            raise ConfigError(f"{BLOCKS_ENV} must be >= 1, got {per_call}")
        n, size = len(num), chunk * per_call
        spans = [slice(s, min(n, s + size)) for s in range(0, n, size)]
        pool = ActorPool(self.actors)
        results = pool.map(lambda a, sl: a.score.remote(num[sl], cat[sl], chunk), spans)  # in order
        yield from zip(spans, results, strict=True)

    def __enter__(self) -> RayScoring:
        return self

    def __exit__(self, *exc: object) -> None:
        ray = _ray()
        for a in self.actors:
            ray.kill(a)
        if self._started:
            ray.shutdown()
