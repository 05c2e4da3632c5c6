"""`rta retrain` as cron runs it: a child process, one JSON line out, exit 0 promoted / 3 refused.

Trains tiny-profile candidates on the first 20k rows of a 30k-row world and gates them on the
last 10k (a world log: every label, `--gate-logs`), against an untrained spread bundle v0.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from gate_support import rta, split_world_and_v0

from infra.stack import free_port
from model import bundle, registry

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("retrain")
    train, holdout, models = split_world_and_v0(tmp, 30_000, seed=5)
    small = tmp / "split" / "train-small.parquet"  # the refusal needs a candidate, not a good one
    pq.write_table(pq.read_table(train).slice(0, 6_000), small)
    return {"models": models, "train": train, "small": small, "holdout": holdout}


def retrain(setup, version: str, *extra: str, logs: str = "train"):
    return rta("retrain", "--logs", str(setup[logs]), "--gate-logs", str(setup["holdout"]),
               "--model-dir", str(setup["models"]), "--since-hours", "24", "--profile", "tiny",
               "--version", version, "--reason", "nightly", "--ratio", "0.5", "--pass-share", "0.02",
               "--redis-url", f"redis://127.0.0.1:{free_port()}/0", "--no-audit-topic", "--quiet",
               "--threads", "1", *extra)


def fresh_models(setup, tmp_path) -> Path:
    """A copy of the module's model dir with `current` back at v0 (earlier tests promote)."""
    import shutil

    md = tmp_path / "models"
    shutil.copytree(setup["models"], md, symlinks=True)
    (md / "current").unlink()
    (md / "current").symlink_to("v0")
    return md


def _outcome(res) -> tuple[dict, list[str]]:
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1, res.stdout
    human = [line for line in res.stderr.splitlines() if line.startswith("rta retrain:")]
    assert len(human) == 1, res.stderr[-2000:]
    return json.loads(lines[0]), human


def test_refused_when_the_gate_refuses_and_current_stays(setup):
    # the tiny profile's student does not meet the fidelity acceptance; required by default
    res = retrain(setup, "c1", logs="small")
    out, human = _outcome(res)
    print(human[0])
    assert res.returncode == 3, res.stderr[-2000:]
    assert out["outcome"] == "refused" and out["candidate"] == "c1" and out["current"] == "v0"
    assert "fidelity failed beyond its interval on the gate window" in human[0]
    assert bundle.current_version(setup["models"]) == "v0"
    assert registry.read_gate(setup["models"] / "c1")["retrain"]["profile"] == "tiny"
    assert not list(setup["models"].glob(".staging-*"))


def test_promoted_when_the_gate_passes(setup):
    res = retrain(setup, "c2", "--fidelity", "no-regression")
    out, human = _outcome(res)
    print(human[0])
    assert res.returncode == 0, res.stderr[-2000:]
    assert out["outcome"] == "promoted" and out["gate"]["passed"]
    assert out["gate"]["estimate"]["difference_ci"][0] > 0
    assert bundle.current_version(setup["models"]) == "c2"
    entry = registry.read_log(setup["models"])[-1]
    assert (entry["action"], entry["old"], entry["new"], entry["reason"]) == ("promote", "v0", "c2", "retrain: nightly")


def test_bad_input_is_one_line(setup, tmp_path, capsys, monkeypatch):
    from test_operators import rta as in_process

    monkeypatch.delenv("RTA_ATTRIBUTION", raising=False)
    empty = tmp_path / "m"
    empty.mkdir()
    no_redis = ("--redis-url", f"redis://127.0.0.1:{free_port()}/0")
    cases = [
        (("retrain", "--logs", str(setup["train"]), "--model-dir", str(empty), "--since-hours", "1",
          "--reason", "x"), "no current version"),
        (("retrain", "--logs", str(setup["train"]), "--model-dir", str(setup["models"]), "--since-hours", "1"),
         "retrain needs --reason"),
        (("retrain", "--logs", str(setup["train"]), "--model-dir", str(setup["models"]), "--since-hours", "1",
          "--holdout-hours", "2", "--reason", "x"), "leaves nothing to train on"),
        (("retrain", "--logs", str(tmp_path / "none"), "--model-dir", str(setup["models"]), "--since-hours", "1",
          "--reason", "x"), "no logged rows"),
        # checked before training, not after it: no live r, and a gate task whose labels cannot
        # have arrived in the held-out window (deal's default 7 d window, a 4.8 h holdout)
        (("retrain", "--logs", str(setup["train"]), "--model-dir", str(setup["models"]), "--since-hours", "24",
          "--reason", "x", *no_redis), "no live r"),
    ]
    for args, want in cases:
        code, _, err = in_process(capsys, *args)
        assert code == 2 and want in err and len(err.strip().splitlines()) == 1, (args, err)
    # a gate task whose labels cannot have arrived in the held-out window (deal's default 7 d
    # window, a 4.8 h holdout): refused (exit 3, what the gate would say) before any training
    code, out, err = in_process(capsys, "retrain", "--logs", str(setup["train"]), "--model-dir", str(setup["models"]),
                                "--since-hours", "24", "--reason", "x", "--ratio", "0.5", *no_redis)
    assert code == 3 and json.loads(out)["outcome"] == "refused", (out, err)
    assert len(err.strip().splitlines()) == 1
    assert "refused before training" in err and "has its label yet" in err


def test_refused_before_training_when_labels_have_not_matured(setup, tmp_path, capsys, monkeypatch):
    # v0's logged traffic of the first 6k rows (6 event-seconds): with any window longer than
    # that, no label has matured (a positive whose window is open is unobserved, like a
    # negative), so no task can be trained: refused in one line, before training, no candidate
    from test_operators import rta as in_process

    from training.logs import load_logs
    from training.offline_log import make_logged_layout
    from training.replay import Step

    monkeypatch.delenv("RTA_ATTRIBUTION", raising=False)
    models = fresh_models(setup, tmp_path)
    log = tmp_path / "log"
    make_logged_layout(models / "v0", load_logs(setup["small"]), log, Step(0.5, 0.02, 0.1), seed=2,
                       delays_s={"click": 1.0, "online": 1.0, "cart": 1.0, "deal": 1.0})
    code, out, err = in_process(capsys, "retrain", "--logs", str(log), "--gate-logs", str(setup["holdout"]),
                                "--model-dir", str(models), "--since-hours", "24", "--profile", "tiny",
                                "--version", "never", "--reason", "x", "--ratio", "0.5", "--no-audit-topic",
                                "--attribution", "click=1m,online=1m,cart=1m,deal=1m",
                                "--redis-url", f"redis://127.0.0.1:{free_port()}/0")
    assert code == 3, err
    assert len(err.strip().splitlines()) == 1 and "refused before training: too few matured labels" in err
    res = json.loads(out)
    labels = res["gate"]["retrain"]["labels"]["tasks"]
    assert all(v["matured"] == 0 and v["positives"] == 0 for v in labels.values()), labels
    assert not (models / "never").exists() and bundle.current_version(models) == "v0"
    # with windows that have closed it gets past that check, to the next one: a serving-only
    # current (v0 has no teacher) records no training settings, so --profile is needed
    code, _, err = in_process(capsys, "retrain", "--logs", str(log), "--gate-logs", str(setup["holdout"]),
                              "--model-dir", str(models), "--since-hours", "24", "--reason", "x",
                              "--ratio", "0.5", "--no-audit-topic", "--attribution", "click=1s,online=1s,cart=1s,deal=1s",
                              "--min-matured", "1", "--redis-url", f"redis://127.0.0.1:{free_port()}/0")
    assert code == 2 and "serving-only bundle" in err and len(err.strip().splitlines()) == 1, err


def test_a_current_that_moves_during_the_gate_is_not_overwritten(setup, tmp_path, capsys, monkeypatch):
    # two overlapping retrains: while this one gates against v0, another promotes a version.
    # retrain's switch names the current it was judged against (expect_current), so it must
    # refuse in one line and leave the other's promotion alone; without it, it would replace it
    from test_operators import rta as in_process

    import training.retrain as rt

    models = fresh_models(setup, tmp_path)
    real_gate = rt.gate_from_options

    def gate_then_move(candidate, current, logs, settings, opts):
        result = real_gate(candidate, current, logs, settings, opts)
        (models / "current").unlink()  # the other run switched `current`
        (models / "current").symlink_to("c-other")
        return result

    import shutil

    shutil.copytree(models / "v0", models / "c-other", symlinks=True)
    monkeypatch.setattr(rt, "gate_from_options", gate_then_move)
    # --force: the switch is attempted whatever the gate says (what is under test is the switch)
    code, _, err = in_process(capsys, "retrain", "--logs", str(setup["train"]), "--gate-logs", str(setup["holdout"]),
                              "--model-dir", str(models), "--since-hours", "24", "--profile", "tiny", "--version",
                              "c-race", "--reason", "race", "--ratio", "0.5", "--quiet", "--force", "--pass-share",
                              "0.02", "--fidelity", "no-regression", "--no-audit-topic", "--threads", "1",
                              "--redis-url", f"redis://127.0.0.1:{free_port()}/0")
    last = err.strip().splitlines()[-1]  # (the trainer's progress lines come before it)
    assert code == 2 and "current moved to c-other" in last and "Traceback" not in err, err[-2000:]
    assert bundle.current_version(models) == "c-other"


def test_warm_starts_from_current_with_the_profile_it_was_trained_with(setup, tmp_path):
    # no --profile: the candidate is trained with the current model's own settings (its teacher
    # checkpoint's profile) and warm-started from it (lineage parent, warm_start)
    from gate_support import train_tiny

    models = fresh_models(setup, tmp_path)
    bundle.publish(train_tiny(setup["small"], models, "p1"))
    res = rta("retrain", "--logs", str(setup["small"]), "--gate-logs", str(setup["holdout"]),
              "--model-dir", str(models), "--since-hours", "24", "--version", "w1", "--reason", "warm",
              "--ratio", "0.5", "--pass-share", "0.02", "--fidelity", "no-regression", "--no-audit-topic",
              "--quiet", "--threads", "1", "--redis-url", f"redis://127.0.0.1:{free_port()}/0")
    out, human = _outcome(res)
    print(human[0])
    assert res.returncode in (0, 3, 4) and out["candidate"] == "w1" and out["current"] == "p1", res.stderr[-2000:]
    lin = registry.lineage(models / "w1")
    assert lin["parent"] == "p1" and lin["warm_start"] is True and lin["profile"] == "tiny"
    assert registry.read_gate(models / "w1")["retrain"]["profile"] == "tiny"
