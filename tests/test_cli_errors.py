"""Bad input to the `rta` verbs: one line on stderr naming the problem, exit code 2, no traceback.

The serving verbs are checked against unreachable servers and taken ports (real sockets, no
mocks); verbs with their own test files check their own bad input there.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
from student_data import make_bundle

from infra.stack import free_port

RTA = [sys.executable, "-m", "infra.cli"]


def _run(args: list[str], env: dict[str, str], timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run([*RTA, *args], capture_output=True, text=True, timeout=timeout, env=env)


def _one_line(res: subprocess.CompletedProcess, *needles: str) -> str:
    err = res.stderr.strip()
    assert res.returncode == 2, (res.returncode, err[-2000:])
    assert err.startswith("rta: ") and "\n" not in err, err[-2000:]
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture
def models(tmp_path: Path) -> Path:
    make_bundle(tmp_path / "models", "v1", seed=0)
    return tmp_path / "models"


def test_serve_with_no_broker_fails_fast_in_one_line(clean_env, models):
    port = free_port()  # nothing listens there
    res = _run(["serve", "--model-dir", str(models), "--no-metrics", "--bootstrap", f"127.0.0.1:{port}",
                "--redis-url", f"redis://127.0.0.1:{free_port()}/0", "--startup-timeout", "2"], clean_env)
    _one_line(res, f"cannot reach Kafka at 127.0.0.1:{port} within 2s")


def test_serve_with_a_taken_metrics_port_names_it(clean_env, models, kafka):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        res = _run(["serve", "--model-dir", str(models), "--bootstrap", kafka.bootstrap,
                    "--redis-url", f"redis://127.0.0.1:{free_port()}/0", "--metrics-port", str(port)],
                   clean_env)
    _one_line(res, f"metrics port 127.0.0.1:{port}", "in use")


@pytest.mark.parametrize(("text", "needle"), [("x = [", "bad.toml"), ('kafak_bootstrap = "x"\n', "kafak_bootstrap")])
def test_serve_with_a_bad_config_file(clean_env, tmp_path: Path, text: str, needle: str):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    _one_line(_run(["serve", "--config", str(cfg), "--no-metrics"], clean_env), needle)


def test_world_stream_with_no_broker_fails_fast_in_one_line(clean_env):
    port = free_port()
    res = _run(["world", "stream", "--count", "10", "--bootstrap", f"127.0.0.1:{port}",
                "--startup-timeout", "1.5"], clean_env)
    # the message names the wait it gave up after: the flag, not the 10 s default, was used
    _one_line(res, f"cannot reach Kafka at 127.0.0.1:{port} within 1.5s")


def test_dev_down_with_nothing_running(clean_env):
    res = _run(["dev", "down"], clean_env)
    assert res.returncode == 0 and res.stdout.strip() == "no dev stack recorded; nothing to stop", res
    assert res.stderr == ""


@pytest.mark.parametrize(("args", "needle"), [
    (["bench", "controller", "--nope"], "No such option '--nope'"),
    (["bench", "worker", "--loads", "abc"], "--loads must be comma-separated integers"),
    (["bench", "codec", "--batch", "0"], "'--batch'"),
    (["bench", "nope"], "No such command 'nope'"),
    (["bench", "replay", "--rows", "5"], "'--rows'"),
    (["bench", "replay", "--model", "."], "give --model and --logs together"),
    (["bench", "soak", "--workers", "9"], "'--workers'"),
    (["bench", "soak", "--rate", "abc"], "'--rate'"),
    (["bench", "latency", "--fetch-probe", "a,b"], "--fetch-probe takes comma-separated integers"),
    (["bench", "latency", "--rate", "0"], "'--rate'"),
])
def test_bench_verbs_bad_arguments(clean_env, args: list[str], needle: str):
    _one_line(_run(args, clean_env), needle)
