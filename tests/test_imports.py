"""The serving path's promise (DESIGN.md): nothing in `stream/` imports torch or `training/`.

Checked for every module of the package, each in a fresh interpreter, so a module that pulls
torch in at import time cannot hide behind another test having imported torch already.
"""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import stream

FORBIDDEN = ("torch", "training")
MODULES = sorted(f"stream.{m.name}" for m in pkgutil.walk_packages(stream.__path__) if not m.ispkg)
_ROOT = Path(__file__).resolve().parents[1]


def test_every_stream_module_is_listed():
    # the walk found the package's modules (an empty list would make the check below vacuous)
    assert {"stream.worker", "stream.scorer", "stream.events", "stream.controller"} <= set(MODULES)


def test_no_stream_module_imports_torch_or_training():
    code = (
        "import importlib, sys\n"
        f"mods = {MODULES!r}\n"
        "bad = {}\n"
        "for m in mods:\n"
        "    before = set(sys.modules)\n"
        "    importlib.import_module(m)\n"
        f"    got = sorted(n for n in set(sys.modules) - before if n.split('.')[0] in {FORBIDDEN!r})\n"
        "    if got:\n"
        "        bad[m] = got[:3]  # the first module to pull one in is named\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=_ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "{}", f"stream modules importing torch/training: {out.stdout.strip()}"


@pytest.mark.parametrize("module", ["stream.worker", "stream.operators"])
def test_cli_modules_alone_import_no_torch(module: str):
    # the verbs the serving image runs, each alone in a fresh interpreter
    code = (f"import sys, {module}\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=_ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("module", ["control.app", "control.cli", "control.service", "control.auth"])
def test_control_plane_imports_no_torch_training_or_ray(module: str):
    # the control image carries the serving core + fastapi/uvicorn only (DESIGN.md)
    forbidden = (*FORBIDDEN, "ray")
    code = (f"import sys, {module}\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {forbidden!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=_ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
