"""`rta control serve|token`: run the control plane; add, list and revoke its tokens."""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click

from control.auth import ROLES, Auth, RateLimit, TokenStore
from stream.config import Settings, load_settings, redact
from stream.errors import ConfigError, RtaError
from stream.window import AUDIT_CAP, RedisStore, StoreUnavailable

DEFAULT_PORT = 6066


def tokens_path(settings: Settings, given: str | None) -> Path:
    """The token file: --tokens, else $RTA_CONTROL_TOKENS, else <state_dir>/control-tokens.json."""
    return Path(given or os.environ.get("RTA_CONTROL_TOKENS") or Path(settings.state_dir) / "control-tokens.json")


def check_operator_credentials(store: RedisStore, url: str, worker_user: str) -> str:
    """Refuse the workers' Redis credentials: the control plane writes targets and the audit list,
    which only the operator user may. Returns the Redis user name in use."""
    user = urlsplit(url).username or None
    try:
        who = store._call(lambda: store.r.execute_command("ACL", "WHOAMI"))
        user = who.decode() if isinstance(who, bytes) else str(who)
    except StoreUnavailable as exc:
        if "unreachable" in str(exc):
            raise RtaError(f"redis at {redact(url)}: {exc}; start it (rta dev up) or set RTA_REDIS_URL") from None
        # an ACL user without +acl|whoami: the URL's name, and the write probe below decide
    if user == worker_user:
        raise RtaError(f"redis user {user!r} is the workers' user; the control plane needs the operator "
                       "user (see `rta ratio acl`), not the workers' credentials")
    try:  # a no-op write on the audit list (it is capped at AUDIT_CAP anyway)
        store._call(lambda: store.r.ltrim(store.k_audit, 0, AUDIT_CAP - 1))
    except StoreUnavailable as exc:
        raise RtaError(f"redis user {user or 'default'!r} cannot write {store.k_audit} ({exc}): these are not "
                       "the operator's credentials (the workers'?); use the operator user (`rta ratio acl`)") from None
    return user or "default"


def start_up_warnings(host: str, redis_user: str, secure_cookie: bool, have_tokens: bool,
                      tokens_file: Path) -> list[str]:
    """What an operator should know before trusting this start: each a line on stderr."""
    out = []
    if not have_tokens:
        out.append(f"no tokens in {tokens_file}; add one with `rta control token add`")
    if redis_user == "default":
        out.append("redis user 'default' (no ACL users): the workers' credentials cannot be told from the "
                   "operator's; `rta ratio acl --apply` sets up least privilege")
    if not _loopback(host) and not secure_cookie:
        out.append(f"listening on {host} without --secure-cookie: tokens and session cookies cross the network "
                   "in clear unless TLS terminates in front (then pass --secure-cookie)")
    return out


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@click.group("control")
def control() -> None:
    """Operator control plane: HTTP API with roles + live status page."""


@control.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind (0.0.0.0 only behind TLS and a firewall).")
@click.option("--port", type=click.IntRange(0, 65535), default=DEFAULT_PORT, show_default=True,
              help="Port (0: any free port; the URL is printed).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None, help="Config file.")
@click.option("--redis-url", default=None, help="Redis URL of the OPERATOR user (else RTA_REDIS_URL, ...).")
@click.option("--redis-prefix", default=None, help="Key prefix of this deployment (default rta).")
@click.option("--model-dir", default=None, help="Model directory (else RTA_MODEL_DIR).")
@click.option("--tokens", "tokens_file", default=None,
              help="Token file [default: $RTA_CONTROL_TOKENS or <state_dir>/control-tokens.json].")
@click.option("--reports-dir", type=click.Path(file_okay=False), default=None,
              help="Directory of replay/eval reports listed read-only [default: $RTA_REPORTS_DIR or ./reports].")
@click.option("--worker-user", default="rta-worker", show_default=True,
              help="The workers' Redis user: refused at start-up.")
@click.option("--public-origin", multiple=True, help="Extra Origin accepted on browser writes (a proxy's URL).")
@click.option("--secure-cookie", is_flag=True, help="Mark the session cookie Secure (behind HTTPS).")
@click.option("--writes-per-minute", type=click.FloatRange(0.1), default=20.0, show_default=True,
              help="Sustained writes per principal (burst 5).")
@click.option("--audit-topic/--no-audit-topic", default=True, show_default=True,
              help="Record every change on the Kafka audit topic first (no change without it).")
def serve(host: str, port: int, config_file: str | None, redis_url: str | None, redis_prefix: str | None,
          model_dir: str | None, tokens_file: str | None, reports_dir: str | None, worker_user: str,
          public_origin: tuple[str, ...], secure_cookie: bool, writes_per_minute: float, audit_topic: bool) -> None:
    """Serve the API and the status page until interrupted."""
    try:
        import uvicorn

        from control.app import create_app
        from control.service import ControlService
    except ModuleNotFoundError as exc:
        raise RtaError(f"control serve: needs the 'control' extra (missing module {exc.name!r}); "
                       "pip install 'rta-filter[control]'") from None
    settings = load_settings(config_file, redis_url=redis_url, redis_prefix=redis_prefix, model_dir=model_dir)
    store = RedisStore.from_url(settings.redis_url, settings.redis_prefix, socket_timeout=2.0, connect_timeout=2.0)
    user = check_operator_credentials(store, settings.redis_url, worker_user)
    tokens = TokenStore(tokens_path(settings, tokens_file))
    for warning in start_up_warnings(host, user, secure_cookie, bool(tokens.list()), tokens.path):
        click.echo(f"warning: {warning}", err=True)
    reports = reports_dir or os.environ.get("RTA_REPORTS_DIR") or "reports"
    service = ControlService(settings, store, reports_dir=reports, audit_topic=audit_topic, private=[tokens.path])
    auth = Auth(tokens, RateLimit(writes_per_minute), origins=public_origin)
    app = create_app(service, auth, secure_cookie=secure_cookie)
    sock = _bind(host, port)
    url = f"http://{host if ':' not in host else f'[{host}]'}:{sock.getsockname()[1]}/"
    service.start()
    click.echo(f"control plane on {url} (redis user {user}, prefix {settings.redis_prefix}, tokens {tokens.path})",
               err=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        service.stop()
        sock.close()


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise RtaError(f"control serve: cannot bind {host}:{port} ({exc.strerror}); pick another --port") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


@control.group("token")
def token() -> None:
    """API tokens: add (printed once, stored hashed), list, revoke."""


def _store_from(config_file: str | None, tokens_file: str | None) -> TokenStore:
    return TokenStore(tokens_path(load_settings(config_file), tokens_file))


_token_opts: list[Any] = [
    click.option("--tokens", "tokens_file", default=None,
                 help="Token file [default: $RTA_CONTROL_TOKENS or <state_dir>/control-tokens.json]."),
    click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None, help="Config file."),
]


def _with_token_opts(f: Any) -> Any:
    for opt in reversed(_token_opts):
        f = opt(f)
    return f


@token.command("add")
@click.option("--role", type=click.Choice(ROLES), required=True, help="viewer reads; operator also changes.")
@click.option("--name", required=True, help="Whose token (the name in the audit trail).")
@_with_token_opts
def token_add(role: str, name: str, tokens_file: str | None, config_file: str | None) -> None:
    """Create a token for NAME: printed once on stdout, only its hash is stored."""
    store = _store_from(config_file, tokens_file)
    tok, rec = store.add(name, role)
    click.echo(f"token {rec['id']} for {rec['name']} ({rec['role']}) stored hashed in {store.path}; "
               "it is shown only now:", err=True)
    click.echo(tok)


@token.command("list")
@_with_token_opts
def token_list(tokens_file: str | None, config_file: str | None) -> None:
    """Tokens: id, name, role, created (never the token)."""
    rows = _store_from(config_file, tokens_file).list()
    if not rows:
        click.echo("no tokens")
    for r in rows:
        click.echo(f"{r['id']}  {r['role']:8}  {r['name']}  (created {r['created']})")


@token.command("revoke")
@click.argument("token_id")
@_with_token_opts
def token_revoke(token_id: str, tokens_file: str | None, config_file: str | None) -> None:
    """Remove the token(s) with this id or owner name; sessions end at their next request."""
    n = _store_from(config_file, tokens_file).revoke(token_id)
    if not n:
        raise ConfigError(f"no token with id or name {token_id!r}")
    click.echo(f"revoked {n} token(s)")
