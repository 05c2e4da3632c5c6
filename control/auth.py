"""Who may do what on the control plane: tokens, roles, browser sessions, write limits.

Everything about authentication and authorisation lives in this module; routes only declare the
role they need (``Auth.require("viewer")`` / ``Auth.require("operator")``).

- Tokens: ``rta control token add --role viewer|operator --name N`` prints a random token ONCE;
  the token file (JSON, mode 0600) keeps only its SHA-256 (the token carries 256 random bits, so
  a fast hash is enough: there is nothing to brute-force). A presented token is hashed and
  compared with EVERY stored hash by ``hmac.compare_digest`` (constant time, no early exit), so
  response time does not say how much of a hash matched.
- Roles: ``viewer`` reads, ``operator`` reads and changes. Anonymous -> 401, too low -> 403.
- API clients send ``Authorization: Bearer <token>``. Browsers log in once (``POST
  /api/v1/session`` with the token) and get a random session id in an HttpOnly, SameSite=Strict
  cookie; the server keeps only its hash. A write authenticated by the cookie must carry an
  ``Origin`` header naming this server (the browser always sends one on a POST): a page on
  another origin cannot make the operator's browser change anything.
- The name in the audit trail is the token's owner, never a request field.
- Writes are rate-limited per principal (a token bucket: ``burst`` writes, refilled at
  ``per_minute``), so a runaway script cannot flap the targets.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stream.errors import ConfigError

ROLES = ("viewer", "operator")
TOKEN_PREFIX = "rta_"
COOKIE = "rta_session"
SESSION_TTL_S = 12 * 3600
MAX_SESSIONS_PER_TOKEN = 50  # a login loop ends its own oldest sessions, never others'


class AuthError(Exception):
    """A refused request: HTTP status and a one-line message (the app turns it into JSON)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: the token owner's name and role, and how it authenticated."""

    name: str
    role: str
    via: str  # "bearer" | "cookie"

    def can(self, role: str) -> bool:
        return ROLES.index(self.role) >= ROLES.index(role)


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


class TokenStore:
    """The token file: ``{"tokens": [{"id", "name", "role", "sha256", "created"}]}``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._mtime: float | None = None
        self._tokens: list[dict[str, Any]] = []

    def _load(self) -> list[dict[str, Any]]:
        """The tokens, re-read when the file changed (a token added or revoked while serving)."""
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            return []
        with self._lock:
            if mtime != self._mtime:
                try:
                    data = json.loads(self.path.read_text())
                    tokens = [t for t in data.get("tokens", []) if t.get("role") in ROLES]
                except (OSError, ValueError, AttributeError) as exc:
                    raise ConfigError(f"{self.path}: unreadable token file ({exc})") from None
                self._tokens, self._mtime = tokens, mtime
            return self._tokens

    def _save(self, tokens: list[dict[str, Any]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # O_CREAT's mode does not apply to a temporary file left behind
        with os.fdopen(fd, "w") as f:
            json.dump({"tokens": tokens}, f, indent=1)
        os.replace(tmp, self.path)

    def add(self, name: str, role: str) -> tuple[str, dict[str, Any]]:
        """A new token for ``name``: returns (the token, its stored record). The token is not kept."""
        name = name.strip()
        if role not in ROLES:
            raise ConfigError(f"role {role!r} is not one of {', '.join(ROLES)}")
        if not name or len(name) > 64 or any(c in name for c in "\r\n\t"):
            raise ConfigError("--name must be 1-64 printable characters")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        digest = _hash(token)
        record = {"id": digest[:12], "name": name, "role": role, "sha256": digest,
                  "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self._save([*self._load(), record])
        return token, record

    def revoke(self, token_id: str) -> int:
        """Remove the tokens whose id (or owner name) is ``token_id``; how many were removed."""
        tokens = self._load()
        keep = [t for t in tokens if token_id not in (t["id"], t["name"])]
        if len(keep) != len(tokens):
            self._save(keep)
        return len(tokens) - len(keep)

    def list(self) -> list[dict[str, Any]]:
        return [{k: t[k] for k in ("id", "name", "role", "created")} for t in self._load()]

    def check(self, token: str) -> tuple[str, str] | None:
        """(name, role) of a presented token, else None; compares with every stored hash."""
        return self.check_digest(_hash(token))

    def check_digest(self, digest: str) -> tuple[str, str] | None:
        """(name, role) of a token's hash, else None (also: is a session's token still valid?)."""
        found = None
        for t in self._load():
            if hmac.compare_digest(digest, str(t.get("sha256", ""))) and found is None:
                found = (t["name"], t["role"])
        return found


class RateLimit:
    """Token bucket per principal: ``burst`` writes at once, ``per_minute`` sustained."""

    def __init__(self, per_minute: float = 20.0, burst: int = 5) -> None:
        self.rate = per_minute / 60.0
        self.burst = float(burst)
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, who: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            level, last = self._buckets.get(who, (self.burst, now))
            level = min(self.burst, level + (now - last) * self.rate)
            if level < 1.0:
                wait = (1.0 - level) / self.rate if self.rate > 0 else float("inf")
                raise AuthError(429, f"too many changes by {who}: retry in {wait:.0f} s")
            self._buckets[who] = (level - 1.0, now)


class Auth:
    """Authenticates a request from its headers and cookie (framework-free: the app adapts it)."""

    def __init__(self, tokens: TokenStore, rate_limit: RateLimit | None = None,
                 origins: tuple[str, ...] = ()) -> None:
        self.tokens = tokens
        self.origins = {o.rstrip("/") for o in origins}  # e.g. the public URL behind a proxy
        self.rate_limit = rate_limit or RateLimit()
        self._sessions: dict[str, tuple[str, float]] = {}  # sha256(session id) -> token hash, expiry
        self._lock = threading.Lock()

    # --- sessions (browsers) ------------------------------------------------------------------

    def login(self, token: Any, origin: str | None = None, host: str | None = None,
              scheme: str = "http") -> tuple[str, Principal]:
        """A session for a valid token: (session id for the cookie, principal). A login posted
        from another origin is refused (login CSRF: a page elsewhere must not log this browser
        in, under any name); one without an Origin (not a browser) is let through."""
        if origin and not self._same_origin(origin, host, scheme):
            raise AuthError(403, f"cross-origin log in refused (Origin {origin})")
        if not isinstance(token, str) or not token:
            raise AuthError(400, "body must be {\"token\": \"...\"}")
        who = self.tokens.check(token)
        if who is None:
            raise AuthError(401, "unknown token")
        sid = secrets.token_urlsafe(32)
        digest = _hash(token)
        with self._lock:
            now = time.time()
            self._sessions = {k: v for k, v in self._sessions.items() if v[1] > now}
            mine = [k for k, v in self._sessions.items() if v[0] == digest]  # oldest first
            for k in mine[: max(0, len(mine) - MAX_SESSIONS_PER_TOKEN + 1)]:
                del self._sessions[k]
            self._sessions[_hash(sid)] = (digest, now + SESSION_TTL_S)
        return sid, Principal(who[0], who[1], "cookie")

    def logout(self, sid: str | None) -> None:
        if sid:
            with self._lock:
                self._sessions.pop(_hash(sid), None)

    def _session(self, sid: str) -> Principal | None:
        with self._lock:
            got = self._sessions.get(_hash(sid))
        if got is None or got[1] < time.time():
            return None
        who = self.tokens.check_digest(got[0])  # a revoked token ends its sessions too
        return None if who is None else Principal(who[0], who[1], "cookie")

    # --- per request ----------------------------------------------------------------------------

    def authenticate(self, authorization: str | None, cookie: str | None) -> Principal:
        """The caller, from a Bearer token or else the session cookie; 401 if neither is valid."""
        if authorization:
            scheme, _, token = authorization.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise AuthError(401, "Authorization must be 'Bearer <token>'")
            who = self.tokens.check(token.strip())
            if who is None:
                raise AuthError(401, "unknown token")
            return Principal(who[0], who[1], "bearer")
        if cookie:
            p = self._session(cookie)
            if p is not None:
                return p
            raise AuthError(401, "session expired; log in again")
        raise AuthError(401, "authentication required: 'Authorization: Bearer <token>' or a session")

    def authorize(self, p: Principal, role: str, write: bool, origin: str | None, host: str | None,
                  scheme: str = "http") -> None:
        """Role check; for writes also the Origin check (cookie sessions) and the rate limit."""
        if not p.can(role):
            raise AuthError(403, f"{p.name} is a {p.role}; this needs the {role} role")
        if not write:
            return
        if p.via == "cookie" and not (origin and self._same_origin(origin, host, scheme)):
            raise AuthError(403, f"cross-origin write refused (Origin {origin or 'missing'})")
        self.rate_limit.take(p.name)

    def _same_origin(self, origin: str, host: str | None, scheme: str) -> bool:
        """Is ``origin`` this server (as the browser addressed it) or a configured public origin?"""
        allowed = self.origins | ({f"{scheme}://{host}"} if host else set())
        return origin.rstrip("/") in allowed
