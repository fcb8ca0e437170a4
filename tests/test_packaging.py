"""`pip install .`: the wheel holds the one module and the `autofocus` command, importable anywhere.

Builds the wheel offline with the environment's own build backend (no build isolation, no index)
from a copy of the checkout, installs it into a temporary folder, and imports and runs it from
another directory.  Skips when the environment has no setuptools able to build wheels
(setuptools >= 70.1, or an older one with the `wheel` package): `pip install -r
tests/requirements.txt` brings one.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT

CAN_BUILD = (
    "import importlib.util, sys\n"
    "import setuptools\n"
    "major, minor = (int(p) for p in setuptools.__version__.split('.')[:2])\n"
    "ok = (major, minor) >= (70, 1) or ((major, minor) >= (64, 0) and importlib.util.find_spec('wheel') is not None)\n"
    "sys.exit(0 if ok else 3)\n"
)


def test_wheel_installs_the_module_and_the_command(tmp_path: Path) -> None:
    probe = subprocess.run([sys.executable, "-c", CAN_BUILD], capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        pytest.skip("no offline wheel build backend here (setuptools >= 70.1, or >= 64 with wheel): "
                    "pip install -r tests/requirements.txt")
    source = tmp_path / "src"  # a copy: building in the checkout would leave build/ and *.egg-info there
    source.mkdir()
    for name in ("autofocus.py", "pyproject.toml", "requirements.txt", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    build = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w",
                            str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=120)
    assert build.returncode == 0, build.stdout + build.stderr
    wheels = list((tmp_path / "dist").glob("autofocus-*.whl"))
    assert len(wheels) == 1
    with zipfile.ZipFile(wheels[0]) as wheel:  # the optional extras: pip install .[basler], .[mm]
        metadata = next(wheel.read(n).decode() for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    assert "Provides-Extra: mm" in metadata and 'Requires-Dist: pymmcore-plus>=0.18; extra == "mm"' in metadata
    target = tmp_path / "site"
    install = subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(target), str(wheels[0])],
                             capture_output=True, text=True, timeout=120)
    assert install.returncode == 0, install.stdout + install.stderr
    assert sorted(p.name for p in target.glob("*.py")) == ["autofocus.py"]  # one module, no tests, no extras
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(target)  # the installed copy, not the checkout
    check = ("import autofocus, json; print(json.dumps([autofocus.__file__, autofocus.__version__, "
             "callable(autofocus.focus)]))")
    imported = subprocess.run([sys.executable, "-c", check], cwd=elsewhere, env=env, capture_output=True, text=True,
                              timeout=60)
    assert imported.returncode == 0, imported.stderr
    path, version, has_focus = json.loads(imported.stdout)
    assert Path(path).parent == target and has_focus
    # The console script: `autofocus` runs the CLI (exit code and summary line as `python autofocus.py`).
    script = target / "bin" / ("autofocus.exe" if os.name == "nt" else "autofocus")
    run = subprocess.run([str(script), "12", "12.7", "0.05", "--simulate", "--sim-time-scale", "0", "--sim-size",
                          "320x200"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.startswith("best focus at 12.3"), run.stderr
    version_line = subprocess.run([str(script), "--version"], env=env, capture_output=True, text=True, timeout=60)
    assert version_line.stdout.strip().endswith(version)
