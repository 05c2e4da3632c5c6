"""The HTTP layer: thin FastAPI routes over ControlService (control/service.py) and Auth
(control/auth.py). A route authenticates, authorises, calls one service method and returns its
JSON; every error is one JSON object ``{"error": "..."}`` with the status that fits.

    GET  /                       the live status page (control/static/)
    GET  /healthz, /metrics      liveness (Redis answers) and Prometheus text (no auth)
    POST /api/v1/session         {token} -> HttpOnly SameSite cookie; GET: who am I; DELETE: log out
    GET  /api/v1/fleet           targets + version, each worker's status record, models in service
    GET  /api/v1/series          per-second shares, targets and thresholds (?seconds=300)
    GET  /api/v1/targets         live targets; POST {r, p_u?, epsilon?, reason, expected_version}
    GET  /api/v1/audit           newest target changes (?n=50)
    GET  /api/v1/models          versions; GET /api/v1/models/{version}
    POST /api/v1/models/promote  {version, reason, logs?, force?} -> background job (202)
    GET  /api/v1/jobs/{id}       a job's state and result (the gate's verdict)
    POST /api/v1/models/rollback {reason}
    GET  /api/v1/reports         report files; GET /api/v1/reports/{path} one file (path-confined)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)

from control.auth import COOKIE, SESSION_TTL_S, Auth, AuthError, Principal
from control.service import Conflict, ControlService, NotFound, Unavailable
from stream.errors import ConfigError, InfeasibleTargets, RtaError

STATUS_OF: list[tuple[type[Exception], int]] = [
    (Conflict, 409), (NotFound, 404), (Unavailable, 503), (InfeasibleTargets, 422), (ConfigError, 422),
    (RtaError, 422),
]


def _bad(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_app(service: ControlService, auth: Auth, secure_cookie: bool = False) -> FastAPI:
    """The ASGI app. ``secure_cookie``: mark the session cookie Secure (served behind HTTPS)."""
    app = FastAPI(title="rta control", docs_url=None, redoc_url=None, openapi_url=None)
    registry = CollectorRegistry()
    requests = Counter("rta_control_requests", "HTTP requests by route and status.", ["route", "status"],
                       registry=registry)
    writes = Counter("rta_control_writes", "Changes made through the API by kind.", ["kind"], registry=registry)
    Gauge("rta_control_workers", "Workers with a live status record.", registry=registry).set_function(
        lambda: _safe_len(service.workers))
    Gauge("rta_control_series_samples", "Sampler ticks done.", registry=registry).set_function(lambda: service.samples)
    static = resources.files("control") / "static"
    app.mount("/static", StaticFiles(directory=str(static)), name="static")

    @app.middleware("http")
    async def count(request: Request, call_next: Callable[[Request], Any]) -> Response:
        response = await call_next(request)
        route = request.scope.get("route")
        requests.labels(getattr(route, "path", "other"), str(response.status_code)).inc()
        response.headers.setdefault("Cache-Control", "no-store")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("X-Frame-Options", "DENY")
        # everything the page loads is served from here (vendored uPlot, no CDN, no inline script)
        response.headers.setdefault("Content-Security-Policy",
                                    "default-src 'self'; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'")
        return response

    def who(request: Request, role: str, write: bool = False) -> Principal:
        p = auth.authenticate(request.headers.get("authorization"), request.cookies.get(COOKIE))
        auth.authorize(p, role, write, request.headers.get("origin"), request.headers.get("host"),
                       request.url.scheme)
        return p

    async def body(request: Request) -> Any:
        # the media type itself, not a substring: a cross-origin "simple" request (no CORS
        # preflight) may send `text/plain; x=application/json`
        media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media != "application/json":
            raise ConfigError("send the body as application/json")
        try:
            return await request.json()
        except ValueError:
            raise ConfigError("body is not valid JSON") from None

    def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
        """Known errors -> one JSON error with its status (nothing has been changed by then)."""
        import functools

        @functools.wraps(fn)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return await fn(*args, **kwargs)
            except AuthError as exc:
                return _bad(exc.status, exc.message)
            except RtaError as exc:
                status = next(s for cls, s in STATUS_OF if isinstance(exc, cls))
                return _bad(status, str(exc))

        return wrapper

    @app.exception_handler(404)
    async def not_found(request: Request, exc: Exception) -> JSONResponse:
        return _bad(404, f"no such path {request.url.path}")

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        return _bad(500, f"internal error ({type(exc).__name__}); see the control plane's log")

    @app.exception_handler(405)
    async def not_allowed(request: Request, exc: Exception) -> JSONResponse:
        return _bad(405, f"{request.method} is not allowed on {request.url.path}")

    # --- page, health, metrics ----------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(str(static / "index.html"), media_type="text/html")

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        h = service.health()
        return JSONResponse(h, status_code=200 if h["ok"] else 503)

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    # --- session ----------------------------------------------------------------------------------

    @app.post("/api/v1/session")
    @guarded
    async def login(request: Request) -> JSONResponse:
        data = await body(request)
        sid, p = auth.login(data.get("token") if isinstance(data, dict) else None, request.headers.get("origin"),
                            request.headers.get("host"), request.url.scheme)
        resp = JSONResponse({"name": p.name, "role": p.role})
        resp.set_cookie(COOKIE, sid, max_age=SESSION_TTL_S, httponly=True, samesite="strict",
                        secure=secure_cookie, path="/")
        return resp

    @app.get("/api/v1/session")
    @guarded
    async def whoami(request: Request) -> dict[str, Any]:
        p = who(request, "viewer")
        return {"name": p.name, "role": p.role, "via": p.via}

    @app.delete("/api/v1/session")
    @guarded
    async def logout(request: Request) -> JSONResponse:
        auth.logout(request.cookies.get(COOKIE))
        resp = JSONResponse({"ok": True})
        resp.delete_cookie(COOKIE, path="/")
        return resp

    # --- reads ------------------------------------------------------------------------------------

    @app.get("/api/v1/fleet")
    @guarded
    async def fleet(request: Request) -> Any:
        who(request, "viewer")
        return await _thread(service.fleet)

    @app.get("/api/v1/series")
    @guarded
    async def series(request: Request, seconds: str = "300") -> Any:
        who(request, "viewer")
        return service.series(_int_param("seconds", seconds, 1, service.ring_seconds))

    @app.get("/api/v1/targets")
    @guarded
    async def get_targets(request: Request) -> Any:
        who(request, "viewer")
        return await _thread(service.targets)

    @app.get("/api/v1/audit")
    @guarded
    async def audit(request: Request, n: str = "50") -> Any:
        who(request, "viewer")
        n_ = _int_param("n", n, 1, 1000)
        return {"entries": await _thread(service.audit, n_)}

    @app.get("/api/v1/models")
    @guarded
    async def models(request: Request) -> Any:
        who(request, "viewer")
        return await _thread(service.models)

    @app.get("/api/v1/canary")
    @guarded
    async def canary(request: Request) -> Any:
        who(request, "viewer")
        return await _thread(service.canary)

    @app.get("/api/v1/models/{version}")
    @guarded
    async def model(request: Request, version: str) -> Any:
        who(request, "viewer")
        return await _thread(service.model, version)

    @app.get("/api/v1/jobs/{job_id}")
    @guarded
    async def job(request: Request, job_id: str) -> Any:
        who(request, "viewer")
        return service.job(job_id).to_dict()

    @app.get("/api/v1/reports")
    @guarded
    async def reports(request: Request) -> Any:
        who(request, "viewer")
        return {"reports": await _thread(service.reports)}

    @app.get("/api/v1/reports/{path:path}")
    @guarded
    async def report(request: Request, path: str) -> Any:
        who(request, "viewer")
        # a report file (html, svg) runs nothing with the operator's session: a sandboxed origin
        return FileResponse(str(service.report(path)), headers={
            "Content-Security-Policy": "sandbox; default-src 'none'; img-src 'self'; style-src 'unsafe-inline'"})

    # --- writes (operators) ------------------------------------------------------------------------

    @app.post("/api/v1/targets")
    @guarded
    async def set_targets(request: Request) -> Any:
        p = who(request, "operator", write=True)
        entry = await _thread(service.set_targets, p.name, await body(request))
        writes.labels("targets").inc()
        return entry

    @app.post("/api/v1/models/promote")
    @guarded
    async def promote(request: Request) -> JSONResponse:
        p = who(request, "operator", write=True)
        job = await _thread(service.promote, p.name, await body(request))
        writes.labels("promote").inc()
        return JSONResponse(job.to_dict(), status_code=202)

    @app.post("/api/v1/models/rollback")
    @guarded
    async def rollback(request: Request) -> Any:
        p = who(request, "operator", write=True)
        out = await _thread(service.rollback, p.name, await body(request))
        writes.labels("rollback").inc()
        return out

    app.state.started = time.time()
    return app


async def _thread(fn: Callable[..., Any], *args: Any) -> Any:
    """Blocking Redis / Kafka / file work off the event loop."""
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(fn, *args)


def _int_param(name: str, value: str, lo: int, hi: int) -> int:
    try:
        v = int(value)
    except ValueError:
        raise ConfigError(f"'{name}' must be an integer, got {value!r}") from None
    if not lo <= v <= hi:
        raise ConfigError(f"'{name}' must be in [{lo}, {hi}], got {v}")
    return v


def _safe_len(fn: Callable[[], list[Any]]) -> float:
    try:
        return float(len(fn()))
    except RtaError:
        return float("nan")
