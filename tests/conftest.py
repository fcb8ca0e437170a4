"""Shared fixtures: the repository root, the read-only shared stacks, and small simulated frames."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
SHARED_STACKS = ROOT.parent / "shared" / "stacks"
for p in (str(ROOT), str(TESTS)):
    if p not in sys.path:
        sys.path.insert(0, p)

import autofocus  # noqa: E402

# Small, fast simulator settings for tests (the defaults are 1920x1200 in real time).
FAST_SIM = ["--simulate", "--sim-time-scale", "0", "--sim-size", "320x200"]


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
