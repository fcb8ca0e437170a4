"""Shared fixtures: the repository root, the read-only shared stacks, and small simulated frames."""
from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
SHARED_STACKS = ROOT.parent / "shared" / "stacks"
FAKE_PYSPIN_DIR = TESTS / "fake_pyspin"
for p in (str(ROOT), str(TESTS)):
    if p not in sys.path:
        sys.path.insert(0, p)

import autofocus  # noqa: E402

# Small, fast simulator settings for tests (the defaults are 1920x1200 in real time).
FAST_SIM = ["--simulate", "--sim-time-scale", "0", "--sim-size", "320x200"]
CAMERA_BAD = [({"exposure_ms": -1}, "exposure_ms"), ({"exposure_ms": "5"}, "exposure_ms"),  # a camera's bad settings
              ({"timeout_ms": 0}, "timeout_ms"), ({"timeout_ms": 200.0}, "timeout_ms"),
              ({"roi": (0, 0, 4, 4)}, "roi"), ({"roi": [0, 0, 80]}, "roi")]
LEFT, RIGHT = (10, 10, 140, 180), (170, 10, 140, 180)  # the two halves of a 320x200 frame, clear of the seam


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def shared_stacks() -> Path:
    if not SHARED_STACKS.is_dir():
        pytest.skip(f"../shared/stacks is absent ({SHARED_STACKS}); real-stack tests need it")
    return SHARED_STACKS


def sim_frame(defocus_mm: float, *, photons: float = 1000.0, bits: int = 8, seed: int = 0,
              size: tuple[int, int] = (320, 200), specimen: str = "cells") -> np.ndarray:
    """One simulated frame at a given defocus (deterministic)."""
    optics = autofocus.SimOptics(focus_mm=0.0, width=size[0], height=size[1], photons=photons,
                                 bit_depth=bits, seed=seed, specimen=specimen)
    stage = autofocus.SimStage(travel_mm=(-25, 25), position_mm=defocus_mm,
                               timing=autofocus.SimTiming(scale=0.0))
    return autofocus.SimCamera(stage, optics, autofocus.SimTiming(scale=0.0)).capture()


def small_sim(**options: Any) -> tuple[autofocus.SimStage, autofocus.SimCamera]:
    return autofocus.simulated_microscope(**{"width": 320, "height": 200, "time_scale": 0, **options})


@pytest.fixture
def PySpin(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:  # noqa: N802 - the module's name
    """The fake PySpin (tests/fake_pyspin), imported fresh; sys.modules restored afterwards."""
    monkeypatch.delenv("FAKE_PYSPIN_CONFIG", raising=False)
    monkeypatch.syspath_prepend(str(FAKE_PYSPIN_DIR))
    monkeypatch.delitem(sys.modules, "PySpin", raising=False)
    monkeypatch.delitem(sys.modules, "simple_pyspin", raising=False)
    mod = importlib.import_module("PySpin")
    assert Path(mod.__file__).resolve() == FAKE_PYSPIN_DIR / "PySpin.py"
    assert mod.__fake_pyspin__
    yield mod
    mod.fake.reset()
    sys.modules.pop("PySpin", None)
    sys.modules.pop("simple_pyspin", None)


@pytest.fixture
def sp(PySpin: ModuleType) -> ModuleType:  # noqa: N803
    """The real simple_pyspin, imported fresh on top of the fake PySpin (no cached _SYSTEM)."""
    mod = importlib.import_module("simple_pyspin")
    assert mod.PySpin is PySpin
    assert mod._SYSTEM is None
    return mod


@pytest.fixture
def verdicts_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """``decide`` without the sub-step fit of a curve that showed no peak (``_top_fit``: most of a
    no_peak decision's time, and only ever its ``fit`` field, decided after the verdict): for tests
    that count false alarms over hundreds of noise curves.  A curve that does show a peak is
    decided and fitted exactly as always."""
    monkeypatch.setattr(autofocus, "_top_fit", lambda curve, top, noise: autofocus.PeakFit(None, False, "not fitted"))
