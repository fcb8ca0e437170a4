"""Image-based autofocus for a motorized microscope.

Steps the focus (Z) axis of a Zaber microscope through a range, scores each camera frame by
the variance of the Laplacian of the bilateral-filtered image, and moves to the sharpest
position.  Hardware: the Zaber Motion Library (ZML) for the stage, a Teledyne FLIR camera
through simple-pyspin, or a Basler camera through pypylon.  No hardware?  ``--simulate`` uses a
built-in simulated microscope and ``--replay DIR`` a recorded through-focus stack.  From Python,
any Micro-Manager microscope too, through pymmcore-plus (``MMStage``, ``MMCamera``, ``mm_autofocus``).

Example::

    python autofocus.py 10 14 0.05 COM3            # MVR focus stage: device 3, axis 1
    python autofocus.py 10 14 0.05 --simulate      # no hardware needed
    python autofocus.py 10 14 0.05 COM3 --camera basler   # a Basler camera (pip install pypylon)
    python autofocus.py 10 14 0.01 COM3 --map 5x4 --map-area 20,10,28,16   # a focus map of the slide

Exit codes:

    0    focused: a real peak was found and the stage was sent to it
    1    unexpected internal error (a bug: please report it with --verbose output)
    2    usage or configuration error (bad input, broken replay stack); nothing moved
    3    no_peak: the focus curve is flat or noise-only; the stage went back to where it started
         (after homing, or from outside --z-min/--z-max: it stays at the last frame)
    4    edge: the best focus lies at the start or end of the range; the focus may be outside it
    5    hardware or communication error (stage, camera); after anything the tool did not cause
         (the axis moved or stopped from outside, a fault) nothing more is moved, otherwise the
         stage was stopped and returned; also an output that could not be written (a full disk,
         a stdout nobody reads)
    130  interrupted (Ctrl-C, SIGINT, or q / Esc / the close button of the --show-images window);
         the stage was stopped and sent back to where it started
    143  terminated (SIGTERM: kill, a job scheduler); handled exactly like Ctrl-C
    129  hung up (SIGHUP: the terminal or SSH session closed; POSIX only); handled like Ctrl-C
    149  Ctrl-Break (SIGBREAK; Windows only); handled like Ctrl-C

    With --map: 0 the slide's surface was fitted and its leave-one-out error is within half the
    depth of field, 4 a surface less certain than that, 3 no surface (too few points focused);
    2, 5 and 130 as above (after a fault or Ctrl-C nothing more moves and the points so far are
    written).

Python API (``__all__``; everything else is internal):

    focus, focus_map, decide     one field; a grid over the XY plate (FocusMap.z_at); a curve's answer
    simulated_microscope, simulated_slide, replay_microscope, mm_autofocus, main
    Stage, Camera, XYStage       the protocols a part implements; StageExtras, StageDefaults: the rest
    ZaberStage, ZaberPlate, FlirCamera, BaslerCamera, MMStage, MMXYStage, MMCamera, MMAutofocus
    SimStage, SimCamera, SimOptics, SimTiming, ReplayStage, ReplayCamera
    FocusResult, Verdict, PeakFit, Extremum, Sample, Timing, FocusMap, MapPoint, Surface
    VerdictKind, Search, PeakPolicy, Scale, DefocusModel, Specimen   (Literal types of their strings)
    AutofocusError and its tree (UsageError, BadValue, StackError, HardwareError, StageError,
    StageInterrupted, CameraError, OutputError, RunFailed), Interrupted (a KeyboardInterrupt)

Sections, in dependency order (each uses only names defined in itself or above it, which
tests/test_layout.py checks): Constants; Small helpers; Result types; Exceptions; Interrupt guard;
Checked values; Focus scores; Decision (pure); Focus maps: the slide's surface (pure); Device
interfaces; Search; Image files; Backends: what the GenICam cameras share; Backends: Zaber stage
and FLIR camera; Backends: Basler camera (pypylon); Backends: simulated microscope; Backends:
replay of a recorded stack; Backends: Micro-Manager (pymmcore-plus); Python API; Python API:
Micro-Manager autofocus; Output; Command line.
"""
from __future__ import annotations

import sys

import _signal  # `signal`'s C core, loaded with the interpreter: importing `signal` itself loads `enum` first

# Signals while the tool starts (a cold start of OpenCV can take seconds): until main() installs its
# own handlers, Ctrl-C and the termination signals end the run with one line (and one JSON object
# with --json) and exit 128 + N, never a traceback.  While the libraries load the signal aborts the
# loading; afterwards it is noted and main() reports it before doing anything.
_early_signal: int | None = None


def _while_loading(signum: int, frame: object) -> None:
    """A signal while the libraries load: abort the loading (see the except clause below)."""
    global _early_signal
    _early_signal = signum
    raise KeyboardInterrupt


def _while_starting(signum: int, frame: object) -> None:
    """A signal after loading, before main() took over: noted; main() reports it first thing."""
    global _early_signal
    _early_signal = _early_signal or signum


# --json's object when nothing was measured: every key of ``result_json`` (a test keeps them equal);
# here because an interrupt while the libraries load is reported before the rest of this file exists.
NO_RESULT_JSON = {
    "best_mm": None, "best_score": None, "best_sample_mm": None, "fit_mm": None, "fit_used": False,
    "fit_reason": None, "verdict": None, "reason": None, "suggested_range_mm": None, "verdict_scale": None,
    "uncertainty_mm": None, "notes": [], "prominence": None, "noise": None, "threshold": None, "frames": 0, "moves": 0, "elapsed_s": None,
    "search": None, "metric": None, "start_mm": None, "curve": [], "transparent": False, "peaks": [], "dips": [],
    "timing": {"move_s": 0.0, "capture_s": 0.0, "score_s": 0.0}, "exit_code": None, "error": None, "stage": None,
    "stage_info": None, "roi": None, "camera_roi": None,
}
EARLY_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP", "SIGBREAK")  # SIGHUP: POSIX only; SIGBREAK: Windows only
# Run as the command (python autofocus.py, or the `autofocus` command pip installs), not imported by a
# script: only then are the signals this file's to handle.
_AS_COMMAND = __name__ == "__main__" or sys.argv[0].replace("\\", "/").rsplit("/", 1)[-1] in (
    "autofocus", "autofocus.exe", "autofocus-script.py")

if _AS_COMMAND:
    for _name in EARLY_SIGNALS:
        if hasattr(_signal, _name):
            _signal.signal(getattr(_signal, _name), _while_loading)
try:
    import argparse
    import bisect
    import concurrent.futures
    import contextlib
    import csv
    import dataclasses
    import functools
    import importlib
    import inspect
    import io
    import itertools
    import json
    import logging
    import math
    import numbers
    import os
    import re
    import signal
    import stat
    import subprocess
    import threading
    import time
    import warnings
    import weakref
    from collections.abc import Callable, Iterator, Mapping, Sequence
    from pathlib import Path
    from typing import Any, Literal, Protocol, TypeVar

    import cv2
    import numpy as np
except KeyboardInterrupt:  # Ctrl-C (or kill) while the libraries load: one line
    if not _AS_COMMAND:
        raise
    for _name in EARLY_SIGNALS:  # a second signal must not cut this message short
        if hasattr(_signal, _name):
            _signal.signal(getattr(_signal, _name), _signal.SIG_IGN)
    import json
    import os

    _code = 128 + int(_early_signal or _signal.SIGINT)
    _say = [(2, "autofocus.py: interrupted while starting; nothing was opened or moved\n")]
    if "--json" in sys.argv:
        _say.append((1, json.dumps({**NO_RESULT_JSON, "exit_code": _code, "error": "interrupted while starting"})
                     + "\n"))
    for _fd, _text in _say:  # straight to the descriptors: sys.stdout may be None (closed) or failing
        try:
            os.write(_fd, _text.encode())
        except OSError:
            pass
    raise SystemExit(_code) from None
if _AS_COMMAND:
    for _name in EARLY_SIGNALS:
        if hasattr(_signal, _name):
            _signal.signal(getattr(_signal, _name), _while_starting)

__version__ = "1.0.0"
__all__ = [
    "focus", "focus_map", "decide", "simulated_microscope", "simulated_slide", "replay_microscope", "mm_autofocus",
    "main", "Stage", "Camera", "XYStage", "StageExtras", "StageDefaults", "ZaberStage", "ZaberPlate", "FlirCamera",
    "BaslerCamera", "MMStage", "MMXYStage", "MMCamera", "MMAutofocus", "SimStage", "SimCamera", "SimOptics",
    "SimTiming", "ReplayStage", "ReplayCamera", "FocusResult", "Verdict", "PeakFit", "Extremum", "Sample", "Timing",
    "FocusMap", "MapPoint", "Surface", "VerdictKind", "Search", "PeakPolicy", "Scale", "DefocusModel", "Specimen",
    "AutofocusError", "UsageError", "BadValue", "StackError", "HardwareError", "StageError", "StageInterrupted",
    "CameraError", "OutputError", "RunFailed", "Interrupted",
]

log = logging.getLogger("autofocus")

###############################################################################
# Constants ###################################################################
###############################################################################

EXIT_OK = 0
EXIT_BUG = 1
EXIT_USAGE = 2
EXIT_NO_PEAK = 3
EXIT_EDGE = 4
EXIT_HARDWARE = 5
EXIT_INTERRUPTED = 130

VERDICT_EXIT = {"focused": EXIT_OK, "no_peak": EXIT_NO_PEAK, "edge": EXIT_EDGE}

DEFAULT_DEVICE = 3  # Zaber MVR microscope: the focus stage (X-LDA025A) is device 3 ...
DEFAULT_AXIS = 1  # ... axis 1
DEFAULT_BLUR = 9  # bilateral filter diameter, pixels (the seed's blur)
MAX_BLUR = 99
MAX_POSITIONS = 10_000  # more sweep positions than this need --allow-many
MAX_POSITIONS_ALLOWED = 1_000_000  # ... and more than this are refused even then (memory, days of run)
# Sane ranges for every number the tool takes (refused outside them, before anything moves).
MAX_ABS_POSITION_MM = 1000.0  # START, END, --z-min/--z-max: no focus axis travels a metre
MIN_STEP_MM = 1e-6  # 1 nm: below any stage's resolution
MIN_STEP_NATIVE = 3  # a STEP must span a few native units of the stage (when its unit is known)
MAX_SETTLE_MS = 60_000.0
MAX_BACKLASH_MM = 10.0
MAX_TIMEOUT_S = 3600.0  # --move-timeout-s, --home-timeout-s
MAX_EXPOSURE_MS = 60_000.0
MAX_CAMERA_TIMEOUT_MS = 600_000
MAX_SIM_PHOTONS = 1e7
MAX_SIM_TIME_SCALE = 100.0
MAX_SIM_PIXELS = 25_000_000
# The simulator's defocus blur is at most this many frames wide (a focal plane millimetres away at high
# NA would need a kernel of gigabytes): mirrored at its borders, a frame blurred that far keeps 1-2 %
# of its contrast, and stays so farther out (no step in the curve where the cap begins).
FLAT_BLUR_FRAMES = 2.0
BOX_ABOVE_PX = 256.0  # ... and a blur still wider than this once the frame is halved (a thin strip) is boxed
POSITION_DECIMALS = 9  # positions are rounded to 1 pm so that float noise never leaks into commands
# Float noise, not a real difference: a position this close to a limit is on it (1 pm, far below any
# stage's resolution: 12.3 + 0.1 must not leave a range that ends at 12.4); a ratio this close to a
# whole number is one (a span of exactly N STEPs); a target this close to a whole native unit is that unit.
FLOAT_SLACK_MM = 1e-9
FLOAT_SLACK_RATIO = 1e-9
FLOAT_SLACK_NATIVE = 1e-6  # native units
SCORE_MAX_PIXELS = 1_500_000  # larger frames are 2x2 binned before scoring (see focus scores)
COARSE_FACTOR = 8  # fast search: coarse pass every 8 STEPs, scored on an 8x binned image
# Fast search: the peak lies within one coarse spacing of the coarse maximum, so the climb from there
# takes at most two spacings, plus a few steps that noise may add; a longer one is wandering.
CLIMB_EXTRA_STEPS = 4
STOP_ATTEMPTS = 3  # a stop (or the read after it) is tried again when a further Ctrl-C cuts it short
Specimen = Literal["cells", "blank", "dusty", "transparent"]  # what the simulator shows
SIM_SPECIMENS: tuple[Specimen, ...] = ("cells", "blank", "dusty", "transparent")  # --sim-specimen
DefocusModel = Literal["gaussian", "pillbox"]  # --sim-defocus: how the simulator blurs out of focus
DEFOCUS_MODELS: tuple[DefocusModel, ...] = ("gaussian", "pillbox")
VerdictKind = Literal["focused", "edge", "no_peak"]
Scale = Literal["fine", "coarse"]  # which curve decided: the score, or the same score on a binned frame
PeakPolicy = Literal["sharpest", "lowest", "highest", "nearest"]  # --peak: which of several peaks
Search = Literal["sweep", "fast"]  # every STEP, or coarse then fine around the peak (SEARCHES)
RuleKind = Literal["number", "whole", "flag", "choice", "text", "roi", "interval"]  # what a Rule admits
PEAK_CHOICES: tuple[PeakPolicy, ...] = ("sharpest", "lowest", "highest", "nearest")
MIN_FAST_POSITIONS = 24  # shorter grids are swept: a coarse pass would hold too few frames to judge
COARSE_MIN_SIDE_PX = 32  # ... but the binned image keeps at least this many pixels a side
MIN_FRAMES_FOR_VERDICT = 5  # fewer frames cannot separate a peak from noise
# The decision (see "Decision (pure)").  Noise alone passes one significance test with at most this
# probability, wherever on the grid it is highest (a run makes at most ~10: two scales, a fast search's looks).
FALSE_PEAK_RATE = 1e-4
MIN_NOISE_RESIDUALS = 3  # fewer residuals off the peaks cannot measure the curve's noise
NOISE_KEEP_RESIDUALS = 6  # ... and a peak that fills the range keeps at least this many (curvature included)
NOISE_CLIP_SIGMA = 5.0  # a residual this many robust sigmas out is a peak's curvature or a glitch, not noise
NOISE_EXCLUDE_SIGMA = 3.0  # frames this far above the baseline belong to a peak, not to the noise
LOCATE_RATE = 1e-3  # ... and near a peak the coarse scale found, when the fine score locates it
NARROW_SHARE = 0.10  # ... and a peak whose neighbours lie below half its height and each rise less than this
# share of it above the frame beyond them (a broad pedestal of blurred structure lifts both) is narrower than STEP
NEIGHBOUR_RATE = 0.01  # a neighbour below this one-frame noise quantile is at the floor (a one-frame peak)
FIT_REACH = 2  # the sub-step fit uses the best frame and up to 2 grid neighbours on each side
STALE_FRAMES = 2 * FIT_REACH  # the fast search takes a fit frame again when it is older than the others by more
LAMP_TOLERANCE = 0.005  # ... and the light changed by more than this since (frame means; the score moves 2-5x as much)
FIT_INTERVAL = 0.90  # the error bar (uncertainty_mm) is the half-width of this central interval
# A score's frame-to-frame scatter grows with the score (shot noise moves edges through the bilateral
# filter): near focus at least this share of its rise above the floor, on top of the floor's own noise.
SCORE_SCATTER = 0.025
PEAK_SHAPES = tuple(round(-1.0 + 0.1 * i, 1) for i in range(26))  # fit_peak's shape parameter s
# The peak model's own limit, in frame spacings: its bias on simulated and real-texture peaks
# (both defocus models, 4x-60x) that the frames' scatter does not show; added to every interval.
FIT_MODEL_FLOOR = 0.015
# A peak narrower than STEP shows the frames only its flanks, whose shape they cannot tell: its error
# bar is at least this many frame spacings (real-texture peaks at 20x-60x, both defocus models).
FIT_SHARP_FLOOR = 0.15
# A focused peak narrower than a few STEPs (a grid neighbour of its best frame below TOP_SHARE of its
# height: a Gaussian under 1-1.4 STEP sigma) whose error bar is at least HALF_STEP_ABOVE STEPs asks for
# the frames half a STEP either side of its best one (Decision.finer_mm; the fast search measures
# them).  At STEP ~ one depth of field a sharp specimen's score peak can be a fifth of a STEP wide.
TOP_SHARE = 0.6
HALF_STEP_ABOVE = 0.15
ON_GRID_SHARE = 0.25  # a frame within this share of the grid's spacing of a grid position is that position's
FIT_INTERVAL_RESOLUTION = 1e-6  # frame spacings: how finely the error bar's half-width is found
FIT_FLOORS = 6  # ... and how many floors under the peak it weighs (from the baseline up to the fit's lowest frame)
IN_FLIGHT_FRAMES = 4  # frames captured but not yet scored: bounds memory when scoring lags
DEFAULT_MOVE_TIMEOUT_S = 30.0
DEFAULT_HOME_TIMEOUT_S = 120.0  # homing crosses the whole travel, at the (slower) homing speed
STOP_TIMEOUT_S = 5.0  # after `stop`, the axis must be at rest within this (a decelerating stop takes ms)
# A verified move ends within this many native units of its target (or the device's own settle window,
# cloop.settle.tolerance, when larger): a few steps of a stepper, a few counts of a direct-drive stage.
POSITION_TOLERANCE_NATIVE = 5
MOTION_MARGIN_MM = 0.01  # a moving axis may stray this far off its path (overshoot) before it is someone else's
MOTION_POLL_S = 0.001  # at most one status request a millisecond while the axis moves
# The first poll of a move as long as earlier ones goes this long after the latest poll that found
# one still busy (the jitter of a move's duration); that bound creeps this much earlier at each move
# found idle at once, so a stage that got faster is followed.
ARRIVAL_MARGIN_S = 0.001
ARRIVAL_CREEP_S = 0.00005
NATIVE_UNIT_MISMATCH = 0.01  # --native-unit-nm more than 1% off Zaber's device database is refused
HOMING_FLAGS = frozenset({"WR", "WH"})  # no reference position: expected until homing ends
OUTSIDE_FLAGS = frozenset({"NI", "NC", "WM"})  # interrupted, the knob, displaced while still: someone else
# A focus axis travels 1..300 mm: a --native-unit-nm implying a travel outside this is a typo
# (a factor of 1000, um typed for nm) and is refused before anything moves.
PLAUSIBLE_TRAVEL_MM = (1.0, 300.0)
DEFAULT_CAMERA_TIMEOUT_MS = 2000
CAMERA_TIMEOUT_MARGIN_MS = 500  # frame timeout >= exposure + this (read-out ~25 ms, transfer, a busy USB bus)
# A replay image is checked from its header before it is decoded: a 69-byte PNG may declare
# 50000x50000 pixels (a decompression bomb).  50 MP is twice the largest microscope sensors.
MAX_IMAGE_PIXELS = 50_000_000
# ... and a file at most as large as the largest such frame uncompressed (4 channels of float32).
MAX_IMAGE_FILE_BYTES = MAX_IMAGE_PIXELS * 16
MAX_STACK_BYTES = 4 << 30  # all decoded frames of a replay stack are held in memory: at most 4 GiB
FRAME_DTYPES = ("uint8", "uint16", "float32")  # what a camera, a saved stack or a replay may deliver
# Names Windows reserves for devices in every folder (writing "nul.csv" writes to NUL).
WINDOWS_RESERVED_NAMES = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)),
                          *(f"LPT{i}" for i in range(1, 10))}
ROI_FILE = "roi.json"  # next to a saved stack's stack.csv: the region of interest it was scored on
MIN_ROI_PX = 8  # a region of interest narrower than this has too few pixels for any score (Brenner needs 3)
# --show-images: the panels' height at the view's own size (a 16:10 frame makes it 1536x264 in all),
# never below MIN_VIEW_HEIGHT_PX to fit a screen, which keeps SCREEN_MARGIN_PX free (borders, a title
# bar, a task bar); keys are read every PAUSE_POLL_MS while paused or held open at the end.
VIEW_HEIGHT_PX = 240
MIN_VIEW_HEIGHT_PX = 32
SCREEN_MARGIN_PX = (32, 96)
PAUSE_POLL_MS = HOLD_POLL_MS = 50

###############################################################################
# Small helpers ###############################################################
###############################################################################


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (ZML messages run over several lines)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def finite_only(value: Any) -> Any:
    """``value`` with every NaN or infinity replaced by None (recursively)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_only(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_only(v) for v in value]
    return value


###############################################################################
# Result types ################################################################
###############################################################################


@dataclasses.dataclass(frozen=True)
class Sample:
    """One frame: where it was taken, its focus score and (fast search) its coarse score."""

    z_mm: float
    score: float
    coarse: float | None = None


@dataclasses.dataclass(frozen=True)
class Timing:
    """Seconds spent moving (incl. settling), capturing and scoring, as measured by the tool."""

    move_s: float = 0.0
    capture_s: float = 0.0
    score_s: float = 0.0


@dataclasses.dataclass(frozen=True)
class PeakFit:
    """A sub-step peak estimate (see ``fit_peak``); ``used`` when it could be made."""

    z_mm: float | None
    used: bool
    reason: str
    uncertainty_mm: float | None = None  # half-width of a FIT_INTERVAL interval for the true peak
    points: int = 0  # frames the fit rests on
    scale: Scale = "fine"  # which score was fitted: the full-resolution one or the coarse (binned) one


@dataclasses.dataclass(frozen=True)
class Verdict:
    """Whether the curve has a real peak, and where it lies in the range.

    ``height`` is how far the chosen peak's best frame stands above the curve's baseline (the median
    of the frames off every peak); ``prominence`` how far it stands above the higher of its two
    surroundings (topographic prominence; at an end of the curve, the one side).  A peak is real when
    its height clears ``threshold`` (what noise reaches anywhere on the grid), and ``focused`` when the
    curve also falls on both sides of it, within the range, by more than noise reaches there;
    otherwise ``edge``: the focus may lie beyond the end it does not fall toward."""

    kind: VerdictKind
    prominence: float
    noise: float
    threshold: float
    reason: str
    suggestion_mm: tuple[float, float] | None = None
    scale: Scale = "fine"
    height: float = float("nan")
    narrow: bool = False  # the peak is narrower than STEP: its neighbours far down it (or at the floor)


@dataclasses.dataclass(frozen=True)
class Extremum:
    """A significant local maximum (a peak) or minimum (a dip) of the focus curve."""

    z_mm: float  # the frame at the extremum
    score: float
    prominence: float  # topographic: above the higher of its two surroundings (dips: below the lower)
    fit_mm: float | None  # sub-step estimate (fit_peak), when one could be made
    uncertainty_mm: float | None = None  # the fit's error bar


@dataclasses.dataclass(frozen=True)
class FocusResult:
    """Everything a run found; ``best_mm`` is where the stage was finally sent."""

    search: Search
    metric: str
    samples: tuple[Sample, ...]  # capture order
    best_sample_mm: float
    best_score: float
    fit: PeakFit
    verdict: Verdict
    best_mm: float
    start_mm: float
    moves: int
    elapsed_s: float
    timing: Timing
    transparent: bool = False  # --transparent: scores are 1/contrast, the focus is the contrast minimum
    peaks: tuple[Extremum, ...] = ()  # every significant peak of the curve that decided, by z
    dips: tuple[Extremum, ...] = ()  # every significant dip between rising flanks, by z
    uncertainty_mm: float | None = None  # focused: half-width of a ~90 % interval for the true focus
    notes: tuple[str, ...] = ()  # what the user should know beyond the verdict (one line each)

    @property
    def frames(self) -> int:
        """Frames captured."""
        return len(self.samples)

    @property
    def exit_code(self) -> int:
        """The exit code for this verdict."""
        return VERDICT_EXIT[self.verdict.kind]


Z_AT_MARGIN = 0.05  # z_at answers up to 5% of the area's span beyond its edges (tiles on the border)


def _normalised(area_mm: Sequence[float], x_mm: Any, y_mm: Any) -> tuple[np.ndarray, np.ndarray]:
    """Plate coordinates mapped so that the area spans [-1, 1] along its longer side."""
    x0, y0, x1, y1 = area_mm
    half = max(abs(x1 - x0), abs(y1 - y0)) / 2.0 or 1.0
    return ((np.asarray(x_mm, float) - (x0 + x1) / 2.0) / half,
            (np.asarray(y_mm, float) - (y0 + y1) / 2.0) / half)


def _poly_basis(model: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Columns 1, u, v (plane) and u^2, uv, v^2 (quadratic); one row per point."""
    cols = [np.ones_like(u), u, v]
    if model == "quadratic":
        cols += [u * u, u * v, v * v]
    return np.stack(cols, axis=-1)


def _tps_kernel(r: np.ndarray) -> np.ndarray:
    """The thin-plate spline's radial function r^2 log r (0 at r = 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(r > 0, r * r * np.log(np.where(r > 0, r, 1.0)), 0.0)


@dataclasses.dataclass(frozen=True)
class Surface:
    """A fitted focal surface of the slide over the mapped area; ``z_at(x, y)`` in mm.

    ``model`` is "plane", "quadratic" or "spline" (a thin-plate spline: ``knots`` are the points
    it was fitted to, in normalised coordinates, ``weights`` their kernel weights, and
    ``coefficients`` its plane part).  ``to_json``/``from_json`` carry it to a scan script."""

    model: str
    area_mm: tuple[float, float, float, float]  # X0, Y0, X1, Y1 as mapped
    coefficients: tuple[float, ...]
    knots: tuple[tuple[float, float], ...] = ()
    weights: tuple[float, ...] = ()
    smoothing: float = 0.0

    def z_at(self, x_mm: Any, y_mm: Any) -> Any:
        """The surface's focus at (x, y), mm (a float, or an array for arrays of x and y).

        Raises ValueError beyond the mapped area (by more than Z_AT_MARGIN of its span): the
        map says nothing there, and an extrapolated curve can run into the slide."""
        x, y = np.broadcast_arrays(np.asarray(x_mm, float), np.asarray(y_mm, float))
        x0, y0, x1, y1 = self.area_mm
        mx, my = Z_AT_MARGIN * abs(x1 - x0), Z_AT_MARGIN * abs(y1 - y0)
        inside = ((min(x0, x1) - mx <= x) & (x <= max(x0, x1) + mx) & (min(y0, y1) - my <= y)
                  & (y <= max(y0, y1) + my))
        if not np.all(inside):
            bad = np.argwhere(~inside)[0]
            raise ValueError(f"({float(x[tuple(bad)]):g}, {float(y[tuple(bad)]):g}) mm is outside the mapped area "
                             f"X {min(x0, x1):g}..{max(x0, x1):g}, Y {min(y0, y1):g}..{max(y0, y1):g} mm: "
                             "map that area too")
        u, v = _normalised(self.area_mm, x, y)
        if self.model == "spline":
            knots = np.asarray(self.knots, float)
            r = np.hypot(u[..., None] - knots[:, 0], v[..., None] - knots[:, 1])
            z = _tps_kernel(r) @ np.asarray(self.weights) + _poly_basis("plane", u, v) @ np.asarray(self.coefficients)
        else:
            z = _poly_basis(self.model, u, v) @ np.asarray(self.coefficients)
        return float(z) if z.ndim == 0 else z

    def gradient_um_per_mm(self, x_mm: float, y_mm: float, h_mm: float = 1e-3) -> tuple[float, float]:
        """dz/dx and dz/dy at (x, y), um per mm (central differences)."""
        dx = (self.z_at(x_mm + h_mm, y_mm) - self.z_at(x_mm - h_mm, y_mm)) / (2 * h_mm)
        dy = (self.z_at(x_mm, y_mm + h_mm) - self.z_at(x_mm, y_mm - h_mm)) / (2 * h_mm)
        return 1000.0 * dx, 1000.0 * dy

    def to_json(self) -> dict[str, Any]:
        """A plain dict (JSON-ready); ``Surface.from_json`` rebuilds the same surface."""
        return {"model": self.model, "area_mm": list(self.area_mm), "coefficients": list(self.coefficients),
                "knots": [list(k) for k in self.knots], "weights": list(self.weights), "smoothing": self.smoothing}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Surface:
        """The surface ``to_json`` wrote (e.g. ``json.load(f)["surface"]`` of a --map-json file)."""
        try:
            surface = cls(str(data["model"]), tuple(float(v) for v in data["area_mm"]),  # type: ignore[arg-type]
                          tuple(float(v) for v in data["coefficients"]),
                          tuple((float(k[0]), float(k[1])) for k in data.get("knots", ())),
                          tuple(float(v) for v in data.get("weights", ())), float(data.get("smoothing", 0.0)))
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ValueError(f"not a focus-map surface: {exc}") from exc
        need = {"plane": 3, "quadratic": 6, "spline": 3}.get(surface.model)
        if (need is None or len(surface.area_mm) != 4 or len(surface.coefficients) != need
                or len(surface.knots) != len(surface.weights)):
            raise ValueError(f"not a focus-map surface: model {surface.model!r} with {len(surface.coefficients)} "
                             "coefficients")
        return surface


@dataclasses.dataclass(frozen=True)
class MapPoint:
    """One position of a focus map and what was found there.

    ``result`` is the search that decided the point (its narrow window, or the whole range after it);
    ``searches`` holds every search run there, in order.  ``status``: "used" (in the surface),
    "not_focused" (bare glass, an empty field, the focus outside START..END), "outlier" (focused, but
    far off the surface the others make), "failed" (the map stopped here)."""

    x_mm: float
    y_mm: float
    result: FocusResult | None
    searches: tuple[FocusResult, ...] = ()
    status: str = "used"
    note: str = ""
    noise_frames: int = 0  # frames repeated here to measure the score's noise
    added: bool = False  # added where the map was uncertain (refine)
    loo_um: float | None = None  # used points: how far the surface fitted to the others misses it

    @property
    def z_mm(self) -> float | None:
        """The focus found here (None when there is none)."""
        r = self.result
        return r.best_mm if r is not None and r.verdict.kind == "focused" and math.isfinite(r.best_mm) else None

    @property
    def verdict(self) -> str:
        """The decisive search's verdict ("failed" when it did not finish)."""
        return "failed" if self.status == "failed" or self.result is None else self.result.verdict.kind

    @property
    def frames(self) -> int:
        """Frames captured at this point (every search, and the noise frames)."""
        return sum(r.frames for r in self.searches) + self.noise_frames


@dataclasses.dataclass(frozen=True)
class FocusMap:
    """A focus map of the slide: the points measured and the surface fitted to them.

    ``z_at(x, y)`` is the surface's focus (mm) in the mapped area (ValueError beyond it, or without a
    surface).  ``model``: the surface chosen by leave-one-out error ("plane", "quadratic", "spline";
    None with too few focused points); ``tilt_x_um_per_mm`` / ``tilt_y_um_per_mm`` the best plane's
    slope; ``rms_um`` and ``loo_rms_um`` the used points' residuals and leave-one-out residuals
    (weighted by their error bars); ``trusted``: the leave-one-out error is within half the depth of
    field; ``frames`` every frame captured; ``to_json()`` all of it."""

    area_mm: tuple[float, float, float, float]
    grid: tuple[int, int]
    points: tuple[MapPoint, ...]
    surface: Surface | None
    depth_of_field_mm: float
    range_mm: tuple[float, float]
    step_mm: float
    loo_by_model_um: dict[str, float] = dataclasses.field(default_factory=dict)
    rms_um: float | None = None
    loo_rms_um: float | None = None
    tilt_um_per_mm: tuple[float, float] | None = None
    rel_noise: float | None = None
    complete: bool = True
    warnings: tuple[str, ...] = ()
    suggestions_mm: tuple[tuple[float, float], ...] = ()
    elapsed_s: float = 0.0

    @property
    def model(self) -> str | None:
        return None if self.surface is None else self.surface.model

    @property
    def tilt_x_um_per_mm(self) -> float | None:
        return None if self.tilt_um_per_mm is None else self.tilt_um_per_mm[0]

    @property
    def tilt_y_um_per_mm(self) -> float | None:
        return None if self.tilt_um_per_mm is None else self.tilt_um_per_mm[1]

    @property
    def frames(self) -> int:
        """Every frame the map captured."""
        return sum(p.frames for p in self.points)

    @property
    def trusted(self) -> bool:
        """A surface whose leave-one-out error is at most half the depth of field."""
        return self.loo_rms_um is not None and self.loo_rms_um <= 500.0 * self.depth_of_field_mm

    @property
    def exit_code(self) -> int:
        """The CLI's exit code: 0 a trusted surface, 4 a surface less certain than DOF/2, 3 none."""
        return EXIT_NO_PEAK if self.surface is None else EXIT_OK if self.trusted else EXIT_EDGE

    def z_at(self, x_mm: Any, y_mm: Any) -> Any:
        """The surface's focus at (x, y), mm (floats or arrays); see ``Surface.z_at``."""
        if self.surface is None:
            raise ValueError("the focus map has no surface: too few points were focused (see its warnings)")
        return self.surface.z_at(x_mm, y_mm)

    def z_grid(self, grid: tuple[int, int] | None = None) -> np.ndarray:
        """The surface on an NX x NY grid spanning the area (the map's own by default): shape
        (NY, NX), row i at Y0 + i (Y1 - Y0)/(NY - 1), column j at X0 + j (X1 - X0)/(NX - 1), mm."""
        nx, ny = grid or self.grid
        x0, y0, x1, y1 = self.area_mm
        gx, gy = np.meshgrid(np.linspace(x0, x1, nx), np.linspace(y0, y1, ny))
        return np.asarray(self.z_at(gx, gy), float).reshape(ny, nx)

    def offsets_um(self, grid: tuple[int, int] | None = None) -> np.ndarray:
        """The layout of Zaber's high-throughput scanning example (``focus_map.npy``): an m x n array,
        m scan passes (rows: along x, at each y from Y0 to Y1) by n images along each pass (x from X0
        to X1), each entry the focus offset of that imaging location from the first one (X0, Y0),
        in um.  In plate order: the example's scan does the snake itself."""
        z = self.z_grid(grid)
        return (z - z[0, 0]) * 1000.0

    def to_json(self) -> dict[str, Any]:
        """Everything about the map as plain JSON-ready values (NaN as None)."""
        def point(p: MapPoint) -> dict[str, Any]:
            r = p.result
            return {"x_mm": p.x_mm, "y_mm": p.y_mm, "z_mm": p.z_mm, "verdict": p.verdict, "status": p.status,
                    "uncertainty_mm": None if r is None else r.uncertainty_mm, "frames": p.frames,
                    "noise_frames": p.noise_frames, "added": p.added, "loo_um": p.loo_um, "note": p.note,
                    "surface_mm": self.z_at(p.x_mm, p.y_mm) if self.surface is not None else None,
                    "searches": [{"range_mm": [min(q.z_mm for q in s.samples), max(q.z_mm for q in s.samples)]
                                  if s.samples else None,
                                  "search": s.search, "verdict": s.verdict.kind, "reason": s.verdict.reason,
                                  "frames": s.frames, "best_mm": s.best_mm,
                                  "curve": [[q.z_mm, q.score] for q in s.samples]} for s in p.searches]}

        return finite_only({
            "area_mm": list(self.area_mm), "grid": list(self.grid), "complete": self.complete,
            "model": self.model, "trusted": self.trusted, "tilt_um_per_mm": list(self.tilt_um_per_mm or []) or None,
            "rms_um": self.rms_um, "loo_rms_um": self.loo_rms_um, "loo_by_model_um": dict(self.loo_by_model_um),
            "depth_of_field_um": 1000.0 * self.depth_of_field_mm, "range_mm": list(self.range_mm),
            "step_mm": self.step_mm, "frames": self.frames,
            "frames_per_point": self.frames / len(self.points) if self.points else None,
            "relative_noise": self.rel_noise, "elapsed_s": round(self.elapsed_s, 4),
            "warnings": list(self.warnings), "suggested_points_mm": [list(s) for s in self.suggestions_mm],
            "surface": None if self.surface is None else self.surface.to_json(),
            "points": [point(p) for p in self.points]})


###############################################################################
# Exceptions ##################################################################
###############################################################################


class AutofocusError(Exception):
    """Base of every error this tool reports as one line.

    AutofocusError
     +-- UsageError        bad input or configuration; nothing moved      (exit 2)
     |    +-- BadValue     an argument outside what it may be             (exit 2)
     |    +-- StackError   a replay stack that cannot be used             (exit 2)
     +-- HardwareError     the stage or camera failed                     (exit 5)
     |    +-- StageError   a stage fault: nothing more is moved
     |    |    +-- StageInterrupted   moved or stopped from outside
     |    +-- CameraError
     +-- OutputError       an output could not be written mid-run         (exit 5)

    Raised by ``focus()`` after the stage has started moving, an error also carries what the run
    measured (``partial``: a FocusResult of the frames so far; ``focus_map()``'s: a FocusMap of the
    points so far) and where the stage was left (``stage_state``: one sentence); both are None before
    any move.  Any other exception from a run arrives as RunFailed, or Interrupted for a
    KeyboardInterrupt (``as_run_failure``).
    """

    exit_code = EXIT_BUG
    partial: FocusResult | FocusMap | None = None
    stage_state: str | None = None

    def __init__(self, message: str | Callable[..., str] = "", scope: str = "", fields: tuple[str, ...] = ()) -> None:
        """``message``: the text, or ``text(*labels)`` writing it with a label for each of ``fields``:
        the keyword of ``scope`` (a backend's own term, as a script gives it) unless ``relabel``
        names it otherwise (the command line: by its option).  Adapters speak in device terms."""
        self.scope, self.fields = scope, fields
        self._text = message if callable(message) else lambda *_: message
        self._labels: dict[str, str] = {}
        super().__init__(str(self))

    def extend(self, more: str) -> None:
        """Add ``more`` to the end of the message."""
        text = self._text
        self._text = lambda *labels: text(*labels) + more
        self.args = (str(self),)

    def relabel(self, labels: Mapping[tuple[str, str], str]) -> AutofocusError:
        """Name each field as ``labels[(scope, field)]`` says (fields it does not list keep their keyword)."""
        self._labels = {f: labels[(self.scope, f)] for f in self.fields if (self.scope, f) in labels}
        self.args = (str(self),)
        return self

    def __str__(self) -> str:
        return self._text(*(self._labels.get(f, f) for f in self.fields))


class UsageError(AutofocusError):
    """The command line or the configuration cannot work; nothing has moved."""

    exit_code = EXIT_USAGE


class BadValue(UsageError):
    """An argument the tool cannot use: its message names it by its keyword (``settle_ms``), and
    the command line names it by its option instead (``relabel``: ``--settle-ms``).

    ``scope`` says whose keyword it is -- "request" (focus()), "simulator" (simulated_microscope(),
    SimOptics, SimTiming), "zaber" (ZaberStage), "camera" (FlirCamera, BaslerCamera), "micromanager"
    (MMStage, MMXYStage, MMCamera, mm_autofocus) -- and ``fields`` which keywords the message names;
    ``text(*labels)`` writes it."""

    def __init__(self, scope: str, fields: tuple[str, ...], text: Callable[..., str]) -> None:
        super().__init__(text, scope, fields)


class StackError(UsageError):
    """A replay stack is missing, malformed or inconsistent."""


class HardwareError(AutofocusError):
    """The stage or the camera failed or stopped answering."""

    exit_code = EXIT_HARDWARE


class StageError(HardwareError):
    """The focus stage refused a command, faulted, or stopped answering: an event the tool did
    not cause, so nothing more is moved (see make_safe)."""

    # True only when the tool itself stopped the axis for its own reason (its own time-out): then
    # the axis may be sent back to where the run started.  False: no stop, no return, no retry.
    may_move = False
    # True when found by the check before a move was sent: the frame exposed just before may not
    # have been exposed where it was labelled, so the run drops it from the curve.
    before_move = False


class StageInterrupted(StageError):
    """The axis was moved or stopped from outside: a person at the knob or joystick, Zaber
    Launcher or another program (flag NI or NC, a move that ended off target, an axis found
    moving or not where the tool left it), so nothing more is commanded."""


class CameraError(HardwareError):
    """The camera failed, timed out, or delivered an unusable frame."""


class OutputError(AutofocusError):
    """An output file could not be written during the run (disk full, folder gone)."""

    exit_code = EXIT_HARDWARE


class RunFailed(AutofocusError):
    """A run stopped by an exception that is not the tool's own (from the caller's Stage or Camera,
    or a bug: exit 1); the original is its ``__cause__``."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or a termination signal (SIGTERM, SIGHUP, SIGBREAK): handled as Ctrl-C always was
    (stop, return to start, outputs written), exit code 128 + the signal; ``partial`` and
    ``stage_state`` as AutofocusError's."""

    partial: FocusResult | FocusMap | None = None
    stage_state: str | None = None

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.signal_name = signal.Signals(signum).name
        super().__init__(self.signal_name)

    @property
    def exit_code(self) -> int:
        """128 + N, the shell's convention (130 for SIGINT, 143 for SIGTERM, 129 for SIGHUP)."""
        return 128 + self.signum

    def describe(self) -> str:
        """"interrupted (Ctrl-C)", "terminated (SIGTERM)", ..."""
        return {"SIGINT": "interrupted (Ctrl-C)", "SIGTERM": "terminated (SIGTERM)",
                "SIGHUP": "hung up (SIGHUP: the terminal closed)", "SIGBREAK": "interrupted (Ctrl-Break)",
                }.get(self.signal_name, f"interrupted ({self.signal_name})")


class WindowStop(Interrupted):
    """q, Esc or the close button of the --show-images window: the user stopped the run, which is
    handled exactly as Ctrl-C (stop, return to start, outputs written) and exits 130 as Ctrl-C does."""

    def __init__(self, how: str) -> None:
        super().__init__(signal.SIGINT)
        self.how = how  # "q", "Esc", "the close button"

    def describe(self) -> str:
        return f"stopped from the --show-images window ({self.how})"


def as_run_failure(error: BaseException, partial: FocusResult | FocusMap | None,
                   stage_state: str | None) -> AutofocusError | Interrupted:
    """The exception a run that failed raises: the tool's own error itself, else the tool's own
    (Interrupted for a KeyboardInterrupt, RunFailed for anything else; raise it ``from error``),
    carrying the partial result and where the stage was left."""
    own = error if isinstance(error, (AutofocusError, Interrupted)) else (
        Interrupted(signal.SIGINT) if isinstance(error, KeyboardInterrupt)
        else RunFailed(f"{type(error).__name__}: {first_line(error)}"))
    own.partial, own.stage_state = partial, stage_state
    return own


###############################################################################
# Interrupt guard #############################################################
###############################################################################


def interrupt_code(exc: BaseException) -> int:
    """130 for Ctrl-C, 128 + N for signal N."""
    return exc.exit_code if isinstance(exc, Interrupted) else EXIT_INTERRUPTED


def interrupt_text(exc: BaseException) -> str:
    """"interrupted (Ctrl-C)", "terminated (SIGTERM)", ..."""
    return exc.describe() if isinstance(exc, Interrupted) else "interrupted (Ctrl-C)"


def failure_line(failed: BaseException) -> tuple[int, str]:
    """The exit code and the one-line error of a run that failed once it had started."""
    if isinstance(failed, RunFailed) and failed.__cause__ is not None:
        failed = failed.__cause__  # a bug: named by its own type
    if isinstance(failed, KeyboardInterrupt):
        return interrupt_code(failed), interrupt_text(failed)
    if isinstance(failed, AutofocusError):
        return failed.exit_code, first_line(failed)
    return EXIT_BUG, (f"internal error {type(failed).__name__}: {first_line(failed)} (please report it with the "
                      "--verbose output)")


class InterruptSignals:
    """Ctrl-C and the termination signals as one exception, Interrupted, in the main thread.

    Installed by ``main()`` for the length of a run: SIGINT, SIGTERM, and where the platform has them
    SIGHUP (POSIX: the terminal or SSH session closed) and SIGBREAK (Windows: Ctrl-Break).  Inside
    ``held()`` a signal is remembered in ``pending`` instead of raised, so that closing the stack and
    writing the outputs are never cut short.  On Windows ``taskkill /F`` and closing the console
    window cannot be caught; use Ctrl-C or Ctrl-Break there.
    """

    NAMES = EARLY_SIGNALS  # the same signals as while the tool starts

    def __init__(self) -> None:
        self.pending: Interrupted | None = None
        self._holding = 0
        self._finished = False
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        exc = Interrupted(signum)
        if self._holding or self._finished:
            self.pending = self.pending or exc
            return
        raise exc

    def finish(self) -> None:
        """The run has said everything: from now on a signal is only noted (no second JSON)."""
        self._finished = True

    def __enter__(self) -> InterruptSignals:
        self.pending, self._finished = None, False
        if threading.current_thread() is threading.main_thread():  # signals go to the main thread only
            for name in self.NAMES:
                number = getattr(signal, name, None)
                if number is not None:
                    self._previous[number] = signal.signal(number, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, previous)
        self._previous.clear()

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Signals arriving inside the block are kept in ``pending``, not raised."""
        self._holding += 1
        try:
            yield
        finally:
            self._holding -= 1


INTERRUPTS = InterruptSignals()

###############################################################################
# Checked values ##############################################################
###############################################################################
# Every argument the tool takes -- focus()'s request, the simulator's options, the backends'
# settings -- is checked against one row of a table (REQUEST_RULES, SIM_RULES, ZABER_RULES,
# CAMERA_RULES, MM_RULES) before anything moves: its type (a bool is not a number, the string
# "False" is not False, 8.0 is not a whole number) and its range, the same for the command line
# (which only parses text and renames the argument in the message) and for a script.


@dataclasses.dataclass(frozen=True)
class Rule:
    """What one argument may be.

    ``kind``: "number" (a finite real from ``lo`` to ``hi``, above ``lo`` with ``above``), "whole"
    (an integer from ``lo`` to ``hi``; odd with ``odd``; one of ``choices`` when given), "flag"
    (True or False), "choice" (one of ``choices``), "text" (a non-empty string), "roi" (x, y, width,
    height in whole pixels: x, y >= 0, width and height >= MIN_ROI_PX) or "interval" (two numbers
    within +-``hi``, lowest first).  ``optional``: None is allowed too."""

    kind: RuleKind
    lo: float = -math.inf
    hi: float = math.inf
    unit: str = ""
    above: bool = False
    odd: bool = False
    choices: tuple[Any, ...] = ()
    optional: bool = False


def show_value(value: Any) -> str:
    """A value as a message shows it: 5 for 5.0, 1e+300, 'text', (1, 2)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_number(value: Any) -> bool:
    """A finite real number (not a bool)."""
    return (isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
            and (isinstance(value, numbers.Integral) or math.isfinite(value)))  # 10**400 has no float


def _span(rule: Rule) -> str:
    """"from 0 to 60000 ms", "above 0 to 1e+07"."""
    fmt = (lambda v: str(int(v))) if rule.kind == "whole" else (lambda v: f"{v:g}")
    return f"{'above' if rule.above else 'from'} {fmt(rule.lo)} to {fmt(rule.hi)}{rule.unit}"


def check_value(scope: str, name: str, value: Any, rule: Rule) -> Any:
    """``value`` as the tool uses it (a float, an int, a bool, a tuple) when ``rule`` allows it;
    BadValue naming ``name`` otherwise."""
    def bad(problem: str) -> BadValue:
        return BadValue(scope, (name,), lambda label: f"{label}: {show_value(value)} {problem}")

    if value is None:
        if rule.optional:
            return None
        raise bad("is not given (None)")
    kind = rule.kind
    if kind in ("number", "whole"):
        if not isinstance(value, numbers.Real) or isinstance(value, (bool, np.bool_)):
            raise bad("is not a number")
        if kind == "whole" and not isinstance(value, numbers.Integral):
            raise bad("is not a whole number")
        if not _is_number(value):
            raise bad("is not a finite number")
        if rule.choices:
            if value not in rule.choices:
                raise bad(f"is not one of {', '.join(map(str, rule.choices))}")
        elif rule.odd and (value % 2 == 0 or not rule.lo <= value <= rule.hi):
            raise bad(f"must be odd, {_span(rule)} (e.g. 5, 9, 15)")
        elif value < rule.lo or value > rule.hi or (rule.above and value == rule.lo):
            raise bad(f"is out of range: must be {_span(rule)}")
        return int(value) if kind == "whole" else float(value)
    if kind == "flag":
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
        raise bad("must be True or False")
    if kind == "choice":
        if isinstance(value, str) and value in rule.choices:
            return value
        raise bad(f"is unknown; choose one of {', '.join(map(str, rule.choices))}")
    if kind == "text":
        if isinstance(value, str) and value.strip():
            return value
        raise bad("must be a non-empty string")
    if kind == "roi":
        if not (isinstance(value, (Sequence, np.ndarray)) and not isinstance(value, str) and len(value) == 4
                and all(isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_)) for v in value)):
            raise bad("must be (x, y, width, height) in whole camera pixels")
        x, y, w, h = (int(v) for v in value)
        if x < 0 or y < 0 or w < MIN_ROI_PX or h < MIN_ROI_PX:
            raise bad(f"is not a region: X and Y must be 0 or more, and W and H at least {MIN_ROI_PX} pixels "
                      "(the region must not be empty)")
        return x, y, w, h
    if kind == "interval":
        if not (isinstance(value, (Sequence, np.ndarray)) and not isinstance(value, str) and len(value) == 2
                and all(_is_number(v) and abs(v) <= rule.hi for v in value) and value[0] < value[1]):
            raise bad(f"must be two numbers (lowest, highest) within +-{rule.hi:g}{rule.unit}")
        return float(value[0]), float(value[1])
    raise AssertionError(f"unknown rule kind {kind!r}")


def check_values(scope: str, rules: Mapping[str, Rule], values: Mapping[str, Any]) -> dict[str, Any]:
    """Every value checked against its rule (``check_value``); keywords without a rule are refused."""
    unknown = sorted(set(values) - set(rules))
    if unknown:
        raise UsageError(f"unknown option {', '.join(unknown)}; choose from {', '.join(sorted(rules))}")
    return {name: check_value(scope, name, value, rules[name]) for name, value in values.items()}


POSITION_RULE = Rule("number", -MAX_ABS_POSITION_MM, MAX_ABS_POSITION_MM, " mm")  # START, END, limits, ...

###############################################################################
# Focus scores ################################################################
###############################################################################
# A score maps a frame to a float that is largest at best focus.  Every score sees the same
# preparation (``prepare_gray``): grayscale float32, 2x2-binned when the frame is larger than
# SCORE_MAX_PIXELS (within the camera's frame period, and less shot noise), and divided by its own
# mean: defocus conserves light, so the division only cancels illumination drift and exposure
# changes between the frames of a sweep.


def frame_problem(image: Any) -> str | None:
    """Why ``image`` is not a frame the scores can use (None when it is): a numpy array, HxW or
    HxWxC with 1, 3 (BGR) or 4 (BGRA) channels, 8- or 16-bit or float32, at least MIN_ROI_PX pixels
    a side after the binning ``score_binning`` gives it.  Looks at the array's shape and type only
    (no pass over its pixels): the scores themselves assume a frame that passed."""
    if not isinstance(image, np.ndarray):
        return "no frame (None)" if image is None else f"a {type(image).__name__}, not an image (a numpy array)"
    channels = image.shape[2] if image.ndim == 3 else 1
    if image.ndim not in (2, 3) or channels not in (1, 3, 4) or image.dtype.name not in FRAME_DTYPES:
        return (f"a {'x'.join(map(str, image.shape))} {image.dtype} array; a frame must be HxW or HxWx3/4 (BGR, "
                f"BGRA), {', '.join(FRAME_DTYPES)}")
    if image.size == 0:
        return f"an empty frame ({'x'.join(map(str, image.shape))})"
    side = MIN_ROI_PX * score_binning(image.shape)  # a large frame is binned 2x2 first: its sides halve
    if min(image.shape[:2]) < side:
        return f"a {image.shape[0]}x{image.shape[1]} frame; each side needs at least {side} pixels to be scored"
    return None


def to_gray_float(image: np.ndarray) -> np.ndarray:
    """Grayscale float32 in the frame's own units, of a frame ``frame_problem`` accepts (8- or
    16-bit or float32, mono or BGR/BGRA)."""
    if image.ndim == 3:
        if image.shape[2] == 1:
            image = image[:, :, 0]
        else:
            code = cv2.COLOR_BGRA2GRAY if image.shape[2] == 4 else cv2.COLOR_BGR2GRAY
            image = cv2.cvtColor(image, code)
    return image.astype(np.float32, copy=False)


def bin_image(gray: np.ndarray, factor: int) -> np.ndarray:
    """Average ``factor`` x ``factor`` blocks (pixel binning); factor 1 returns the input."""
    if factor <= 1:
        return gray
    h, w = gray.shape[0] // factor, gray.shape[1] // factor
    return cv2.resize(gray[: h * factor, : w * factor], (w, h), interpolation=cv2.INTER_AREA)


def score_binning(shape: tuple[int, ...]) -> int:
    """The binning applied before scoring a frame of this shape."""
    return 2 if shape[0] * shape[1] > SCORE_MAX_PIXELS else 1


def float_in_range(gray: np.ndarray) -> np.ndarray:
    """A float frame scaled by a power of two (exactly) when its largest value is far from 1 (3e38,
    1e-40): sums over its pixels (binning, the mean) then neither overflow nor lose subnormal bits.
    The scores divide by the mean, so the scale changes none of them."""
    top = float(np.max(np.abs(gray)))
    if top == 0.0 or 2.0**-32 < top < 2.0**32:
        return gray
    return (gray.astype(np.float64) * 2.0 ** -math.frexp(top)[1]).astype(np.float32)


def prepare_gray(image: np.ndarray, binning: int | None = None) -> np.ndarray:
    """Gray, binned and mean-normalised frame that every focus score starts from (a frame
    ``frame_problem`` accepts)."""
    gray = to_gray_float(image)
    if image.dtype.kind == "f":  # only a float frame can be far from 1 (8- and 16-bit ones never are)
        gray = float_in_range(gray)
    gray = bin_image(gray, score_binning(gray.shape) if binning is None else binning)
    mean = float(cv2.mean(gray)[0])
    if not mean > 0:
        return np.zeros_like(gray)
    return gray * np.float32(1.0 / mean)


def _variance(image: np.ndarray) -> float:
    """Population variance, with OpenCV (much faster than numpy's float64 ``.var()``)."""
    _, std = cv2.meanStdDev(image)
    return float(std[0, 0]) ** 2


def bilateral(gray: np.ndarray, blur: int) -> np.ndarray:
    """Edge-preserving smoothing of a mean-normalised frame: diameter ``blur`` pixels."""
    # sigmaColor 0.25 of the mean: photon noise at a few hundred photons/pixel (~0.06 of the
    # mean) is smoothed, edges of real structure (contrast > 0.25) are kept.
    return cv2.bilateralFilter(gray, blur, 0.25, blur / 2.0)


def filtered_gray(image: np.ndarray, blur: int, binning: int | None = None) -> np.ndarray:
    """``prepare_gray`` then ``bilateral``; ``blur`` is in camera pixels, so a binned frame
    gets the diameter that covers the same area (9 camera pixels = 5 binned pixels)."""
    factor = score_binning(image.shape) if binning is None else binning
    diameter = max(3, int(round(blur / factor)) | 1)
    return bilateral(prepare_gray(image, factor), diameter)


def laplacian_views(image: np.ndarray, blur: int, binning: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The filtered frame and its Laplacian: what the default score sees."""
    filtered = filtered_gray(image, blur, binning)
    return filtered, cv2.Laplacian(filtered, cv2.CV_32F)


def score_laplacian_variance(image: np.ndarray, blur: int = DEFAULT_BLUR, binning: int | None = None) -> float:
    """Variance of the Laplacian of the bilateral-filtered frame (the default score).

    Pech-Pacheco et al. 2000, "Diatom autofocusing in brightfield microscopy"; the seed
    article's score.  Range [0, inf): 0 for a uniform frame, larger when sharper.
    """
    return _variance(laplacian_views(image, blur, binning)[1])


def score_tenengrad(image: np.ndarray, blur: int = DEFAULT_BLUR, binning: int | None = None) -> float:
    """Tenengrad: mean squared Sobel gradient magnitude of the filtered frame.

    Krotkov 1987; Yeo et al. 1993.  Range [0, inf).  Robust on noisy frames with large edges.
    """
    filtered = filtered_gray(image, blur, binning)
    gx = cv2.Sobel(filtered, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(filtered, cv2.CV_32F, 0, 1, ksize=3)
    return float(cv2.mean(gx * gx + gy * gy)[0])


def score_normalized_variance(image: np.ndarray, blur: int = DEFAULT_BLUR, binning: int | None = None) -> float:
    """Normalised variance: intensity variance divided by the mean (the frame is mean-normalised).

    Groen et al. 1985; Sun et al. 2004 rank it best for brightfield.  Range [0, inf).
    Broad capture range; good for low-texture and fluorescence fields.  ``blur`` is unused.
    """
    return _variance(prepare_gray(image, binning))


def score_vollath_f4(image: np.ndarray, blur: int = DEFAULT_BLUR, binning: int | None = None) -> float:
    """Vollath F4 autocorrelation: mean(I(x)I(x+1)) - mean(I(x)I(x+2)), on the filtered frame.

    Vollath 1987.  Range roughly [0, 1) for mean-normalised frames.  Insensitive to
    uncorrelated pixel noise: a good choice at low light.
    """
    f = filtered_gray(image, blur, binning)
    a = float(cv2.mean(f[:, :-2] * f[:, 1:-1])[0])
    b = float(cv2.mean(f[:, :-2] * f[:, 2:])[0])
    return a - b


def score_brenner(image: np.ndarray, blur: int = DEFAULT_BLUR, binning: int | None = None) -> float:
    """Brenner gradient: mean of (I(x+2) - I(x))^2 on the filtered frame.

    Brenner et al. 1976.  Range [0, inf).  Cheap and sharply peaked; needs texture along x.
    """
    f = filtered_gray(image, blur, binning)
    d = f[:, 2:] - f[:, :-2]
    return float(cv2.mean(d * d)[0])


ScoreFunction = Callable[..., float]

METRICS: dict[str, ScoreFunction] = {
    "laplacian": score_laplacian_variance,
    "tenengrad": score_tenengrad,
    "normvar": score_normalized_variance,
    "vollath": score_vollath_f4,
    "brenner": score_brenner,
}


Roi = tuple[int, int, int, int]  # x, y, width, height in camera pixels (x to the right, y down)


@dataclasses.dataclass(frozen=True)
class Scorer:
    """A chosen metric and filter size: ``scorer(image) -> float``; with ``roi`` only that
    region of the frame is scored (every score, the coarse one too)."""

    metric: str = "laplacian"
    blur: int = DEFAULT_BLUR
    roi: Roi | None = None
    # --transparent: the score negated, so that the contrast minimum of an unstained specimen is a
    # peak to every search and verdict (both only compare scores and differences of scores).
    invert: bool = False

    def crop(self, image: np.ndarray) -> np.ndarray:
        """The part of the frame that is scored (a view, no copy), checked: CameraError for what is
        not a frame (``frame_problem``), UsageError for a region that does not fit in it."""
        if (problem := frame_problem(image)) is not None:
            raise CameraError(f"cannot score {problem}")
        if self.roi is not None:
            check_roi(self.roi, image.shape)
        return self._region(image)

    def __call__(self, image: np.ndarray) -> float:
        return self._fine(self.crop(image))

    def coarse(self, image: np.ndarray) -> float:
        """The same score on a binned frame: a wide capture range, robust to photon noise
        (the fast search's coarse pass and the verdict's fallback, see ``decide``)."""
        return self._coarse(self.crop(image))

    def scores(self, frame: np.ndarray, coarse: bool) -> tuple[float, float | None]:
        """The score, and with ``coarse`` the coarse score, of a frame ``check_frame`` accepted in a
        run whose first frame the ROI fits: cropped once, not checked again (the Acquisition's path)."""
        region = self._region(frame)
        return self._fine(region), self._coarse(region) if coarse else None

    def _region(self, frame: np.ndarray) -> np.ndarray:
        if self.roi is None:
            return frame
        x, y, w, h = self.roi
        return frame[y: y + h, x: x + w]

    def _fine(self, region: np.ndarray) -> float:
        return self._sign(METRICS[self.metric](region, self.blur))

    def _coarse(self, region: np.ndarray) -> float:
        return self._sign(METRICS[self.metric](region, self.blur, coarse_binning(region.shape)))

    def _sign(self, score: float) -> float:
        return -score if self.invert else score


def check_roi(roi: Roi, frame_shape: tuple[int, ...]) -> None:
    """Raise UsageError unless the region lies wholly inside a frame of this shape."""
    x, y, w, h = roi
    height, width = frame_shape[0], frame_shape[1]
    if w < MIN_ROI_PX or h < MIN_ROI_PX:
        raise UsageError(f"ROI {x},{y},{w},{h} is {w}x{h} pixels: at least {MIN_ROI_PX}x{MIN_ROI_PX} are needed "
                         "to score focus; give a larger W,H")
    if x < 0 or y < 0 or x + w > width or y + h > height:
        raise UsageError(f"ROI {x},{y},{w},{h} (pixels x {x}..{x + w}, y {y}..{y + h}) does not fit in the "
                         f"{width}x{height} frame; give X,Y,W,H with X+W <= {width} and Y+H <= {height}")


def coarse_binning(shape: tuple[int, ...]) -> int:
    """Binning for the coarse score: COARSE_FACTOR, less when the frame is small."""
    return max(1, min(COARSE_FACTOR, min(shape[0], shape[1]) // COARSE_MIN_SIDE_PX))


###############################################################################
# Decision (pure) #############################################################
###############################################################################
# ``decide`` turns the frames of a run into its answer: the verdict, the chosen peak, the fitted
# position with its error bar, and the reasons; both searches, the CLI, the API and replay use it.
# Its parts: the curve's noise (``estimate_noise``), how high noise alone could reach
# (``noise_threshold``), the peaks and the edge rule (``find_peaks``), the sub-step position
# (``fit_peak``).  Nothing here moves or measures.


def by_z(samples: Sequence[Sample]) -> list[Sample]:
    """Samples sorted by position; a position measured twice keeps its latest frame (capture order:
    the fast search takes a frame again when the light may have changed since)."""
    seen: dict[float, Sample] = {}
    for s in samples:
        seen[s.z_mm] = s
    return sorted(seen.values(), key=lambda s: s.z_mm)


def best_sample(samples: Sequence[Sample]) -> Sample:
    """The highest-scoring sample (the first of equals, in capture order)."""
    if not samples:
        raise ValueError("no samples")
    return max(samples, key=lambda s: s.score)


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz, as in Numerical
    Recipes 6.4)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        for aa in (m * (b - m) * x / ((a - 1.0 + 2 * m) * (a + 2 * m)),
                   -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 1.0 + 2 * m))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-13:
            break
    return h


def student_t_sf(t: float, dof: float) -> float:
    """P(T > t) for Student's t with ``dof`` degrees of freedom (t >= 0)."""
    x = dof / (dof + t * t)
    a, b = dof / 2.0, 0.5
    if x <= 0.0:
        return 0.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return 0.5 * front * _betacf(a, b, x) / a
    return 0.5 * (1.0 - front * _betacf(b, a, 1.0 - x) / b)


def student_t_isf(p: float, dof: float) -> float:
    """The t with P(T > t) = p (0 < p < 0.5), by bisection; ``dof`` above 1000 counts as 1000."""
    dof = min(dof, 1000.0)
    lo, hi = 0.0, 1.0
    while student_t_sf(hi, dof) > p:
        lo, hi = hi, hi * 4.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if student_t_sf(mid, dof) > p else (lo, mid)
        if hi - lo < 1e-9 * hi:
            break
    return 0.5 * (lo + hi)


@dataclasses.dataclass(frozen=True)
class Noise:
    """A curve's frame-to-frame noise and what it rests on (see ``estimate_noise``)."""

    sigma: float  # one standard deviation of a score (nan: too few frames off the peaks)
    dof: float  # degrees of freedom of sigma (neighbouring residuals share frames)
    residuals: int  # how many residuals it rests on
    baseline: float  # the median score of the frames off every peak
    baseline_frames: int
    off_peak: tuple[bool, ...]  # per frame (in z order): not part of a peak


def _residuals(z: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Each interior frame minus the straight line through its two neighbours, scaled so that white
    noise of sigma s gives residuals of sigma s; and the line's weights and the scales."""
    span = z[2:] - z[:-2]
    wl = (z[2:] - z[1:-1]) / span
    wr = (z[1:-1] - z[:-2]) / span
    norm = np.sqrt(1.0 + wl**2 + wr**2)
    return (y[1:-1] - wl * y[:-2] - wr * y[2:]) / norm, wl, wr, norm


def estimate_noise(z: np.ndarray, y: np.ndarray) -> Noise:
    """The noise of a curve (z ascending), from the frames off every peak.

    Each interior frame is compared with the straight line through its neighbours (straight trends
    such as drift cancel).  A frame belongs to a peak when it is the highest, or stands more than
    NOISE_EXCLUDE_SIGMA sigma above the median of the other frames next to a peak frame (a lone high
    frame is as likely noise, and stays).  Residuals touching a peak measure its curvature, not noise,
    and are left out, as is one next to a peak that lies NOISE_CLIP_SIGMA robust sigmas out (a flank
    the mask missed); sigma (their root mean square) is estimated again until the set settles, or
    until fewer than NOISE_KEEP_RESIDUALS would be left (a peak that fills the range: its flanks then
    count as noise, which only makes the verdict more cautious).  Neighbouring residuals share frames,
    so m of them carry about m/2 degrees of freedom (Satterthwaite's approximation, for any spacing).
    """
    n = len(y)
    if n < 3:
        return Noise(float("nan"), 0.0, 0, float(np.median(y)) if n else float("nan"), n, (True,) * n)
    r, wl, wr, norm = _residuals(z, y)

    def kept(peak: np.ndarray) -> np.ndarray:
        """Residuals touching no peak frame, and not far out (a curvature the mask missed, a glitch)."""
        keep = ~(peak[:-2] | peak[1:-1] | peak[2:])
        if keep.sum() >= MIN_NOISE_RESIDUALS:  # next to a peak, a residual far out is its flank's curvature
            robust = 1.4826 * float(np.median(np.abs(r[keep])))
            near_peak = peak.copy()
            for shift in (1, 2, 3):
                near_peak[shift:] |= peak[:-shift]
                near_peak[:-shift] |= peak[shift:]
            flank = near_peak[1:-1]  # residuals centred within 3 frames of a peak frame
            keep &= ~(flank & (np.abs(r) > NOISE_CLIP_SIGMA * robust))
        return keep

    peak = np.zeros(n, bool)
    peak[int(np.argmax(y))] = True
    level = float(np.median(y[~peak]))  # fixed: a median recomputed without the masked frames would creep down a ramp
    keep = kept(peak)
    for _ in range(6):
        if keep.sum() < MIN_NOISE_RESIDUALS:
            break
        high = y > level + NOISE_EXCLUDE_SIGMA * float(np.sqrt(np.mean(r[keep] ** 2)))
        grown = peak | (high & _in_runs(high, peak))
        if (grown == peak).all():
            break
        grown_keep = kept(grown)
        if grown_keep.sum() < NOISE_KEEP_RESIDUALS:  # the peak fills the range: keep what measures noise best
            break
        peak, keep = grown, grown_keep
    off = tuple(bool(v) for v in ~peak)
    base, m = float(np.median(y[~peak])), int(keep.sum())
    if m < MIN_NOISE_RESIDUALS:
        return Noise(float("nan"), 0.0, m, base, int((~peak).sum()), off)
    sigma = float(np.sqrt(np.mean(r[keep] ** 2)))
    # Correlations of neighbouring residuals (unit variance each): one frame shared at distance 1
    # (two of them) and at distance 2.
    rho1 = -(wl[1:] + wr[:-1]) / (norm[:-1] * norm[1:])
    rho2 = wr[:-2] * wl[2:] / (norm[:-2] * norm[2:])
    shared = m + 2 * float(np.sum(rho1[keep[:-1] & keep[1:]] ** 2)) + 2 * float(np.sum(rho2[keep[:-2] & keep[2:]] ** 2))
    return Noise(sigma, m * m / shared, m, base, int((~peak).sum()), off)


def _in_runs(high: np.ndarray, peak: np.ndarray) -> np.ndarray:
    """Frames in a run of ``high`` frames that touches ``peak`` or is at least two frames long (one
    lone high frame elsewhere is as likely noise: leaving it out would make the noise look smaller)."""
    out = np.zeros_like(high)
    i, n = 0, len(high)
    while i < n:
        if not high[i]:
            i += 1
            continue
        j = i
        while j + 1 < n and high[j + 1]:
            j += 1
        if j > i or peak[max(0, i - 1): j + 2].any():
            out[i: j + 1] = True
        i = j + 1
    return out


def curve_noise_and_count(samples: Sequence[Sample]) -> tuple[float, int]:
    """``estimate_noise`` of the samples' curve: sigma and how many residuals it rests on."""
    ordered = by_z(samples)
    noise = estimate_noise(np.array([s.z_mm for s in ordered]), np.array([s.score for s in ordered]))
    return noise.sigma, noise.residuals


def curve_noise(samples: Sequence[Sample]) -> float:
    """The frame-to-frame noise of the scores (one standard deviation; see ``estimate_noise``)."""
    return curve_noise_and_count(samples)[0]


def noise_threshold(noise: Noise, n_grid: int, rate: float = FALSE_PEAK_RATE) -> float:
    """How far above the baseline noise alone reaches, at most, anywhere on an n_grid grid.

    A search picks its best frame from every grid position it could have measured, so each frame
    exceeds the bound with probability FALSE_PEAK_RATE / n_grid.  The noise is itself estimated, so
    the quantile is Student's t with the estimate's degrees of freedom (a sparse curve needs a larger
    margin, never a luckier one), widened for the uncertainty of the baseline (a median of b frames:
    sigma * 1.25 / sqrt(b)).
    """
    if not math.isfinite(noise.sigma) or noise.dof <= 0:
        return float("nan")
    k = student_t_isf(rate / max(n_grid, 1), noise.dof)
    return noise.sigma * k * math.sqrt(1.0 + math.pi / (2.0 * max(noise.baseline_frames, 1)))


def _maxima(y: np.ndarray) -> list[tuple[int, int, float | None, float | None]]:
    """Every local maximum of y: (first index, last index (a plateau), low-side base, high-side base).

    A base is the lowest point between the maximum and the next higher sample on that side, or
    the curve's end; None when the maximum is at that end (nothing beyond it was measured)."""
    out = []
    n = len(y)
    for i in range(n):
        if i > 0 and y[i - 1] >= y[i]:
            continue
        j = i
        while j + 1 < n and y[j + 1] == y[i]:
            j += 1
        if j < n - 1 and y[j + 1] > y[j]:
            continue
        low = high = None
        if i > 0:
            k, low = i - 1, float(y[i])
            while k >= 0 and y[k] <= y[i]:
                low, k = min(low, float(y[k])), k - 1
        if j < n - 1:
            k, high = j + 1, float(y[i])
            while k < n and y[k] <= y[i]:
                high, k = min(high, float(y[k])), k + 1
        out.append((i, j, low, high))
    return out


def prominence_of(value: float, low: float | None, high: float | None) -> float:
    """Topographic prominence: above the higher of the bases there are (0 for a lone frame)."""
    bases = [b for b in (low, high) if b is not None]
    return value - max(bases) if bases else 0.0


def _G(u: np.ndarray, s: float) -> np.ndarray:
    """The Box-Cox transform with lambda = -s (log at s = 0): increasing in u > 0."""
    return np.log(u) if s == 0 else (u ** (-s) - 1.0) / (-s)


def _G_inverse(g: np.ndarray, s: float) -> np.ndarray:
    if s == 0:
        return np.exp(np.minimum(g, 700.0))
    v = 1.0 - s * g
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        return np.where(v > 0, np.abs(v) ** (-1.0 / s), np.inf if s > 0 else 0.0)


def fit_peak(samples: Sequence[Sample], *, floor: float | Sequence[float] | None = None, noise: float = 0.0,
             shapes: Sequence[float] | None = None) -> PeakFit:
    """The sub-step peak position, and the half-width of a FIT_INTERVAL interval around it.

    Uses the best sample and up to FIT_REACH neighbours on each side (``decide`` gives STEP-spaced
    ones).  The model is a symmetric peak on a floor, score = floor + A (1 + q (z - c)^2)^(-1/s): a
    Gaussian at s = 0, a Lorentzian at s = 1, a parabola at s = -1, flat-topped below 0.  Each s of
    PEAK_SHAPES is fitted by weighted least squares (each frame's noise: ``noise`` plus SCORE_SCATTER
    of its rise) on each ``floor`` given, and every (floor, shape) is weighted by its chi-square
    (scaled up by the best fit's misfit when the frames are noisier than assumed).  The position is
    the weighted mean; the interval covers the spread of the shapes the frames allow and the noise of
    each.  Each vertex is kept between the midpoints to the best frame's neighbours, where a symmetric
    peak must lie.  ``shapes=(-1,)`` fits a parabola (--transparent's contrast minimum; the default
    when every score is negative).  The best frame needs a lower neighbour on each side.
    """
    ordered = by_z(samples)
    if len(ordered) < 3:
        return PeakFit(None, False, "fewer than 3 positions")
    best = best_sample(ordered)
    i = ordered.index(best)
    if i == 0 or i == len(ordered) - 1:
        return PeakFit(None, False, "best sample at the edge of the measured range")
    if not (ordered[i - 1].score < best.score and ordered[i + 1].score < best.score):
        return PeakFit(None, False, "flat top: a neighbour scores as high as the best")
    window = ordered[max(0, i - FIT_REACH): i + FIT_REACH + 1]
    i -= max(0, i - FIT_REACH)
    z = np.array([s.z_mm for s in window])
    y = np.array([s.score for s in window])
    if shapes is None:
        shapes = (-1.0,) if y.max() < 0 else PEAK_SHAPES
    if floor is None:
        floor = 0.0 if y.min() > 0 else float(y.min())
    floors = [float(floor)] if isinstance(floor, numbers.Real) else [float(f) for f in floor]
    lowest = min(floors)
    if not y[i] - lowest > 0:
        return PeakFit(None, False, "the best frame does not rise above the floor")
    # Frames beyond the neighbours that are within the floor's noise carry no shape: left out.
    lo, hi = 0, len(y) - 1
    while lo < i - 1 and y[lo] - lowest <= 2 * noise:
        lo += 1
    while hi > i + 1 and y[hi] - lowest <= 2 * noise:
        hi -= 1
    z, y, i = z[lo: hi + 1], y[lo: hi + 1], i - lo
    h = float(np.median(np.diff(z)))
    x = (z - z[i]) / h  # in STEPs, the best frame at 0
    left, right = (x[i - 1] + x[i]) / 2, (x[i] + x[i + 1]) / 2  # a symmetric peak lies between these
    design = np.vstack([np.ones_like(x), x, x * x]).T
    fits = []  # (vertex, its variance, chi-square)
    for b in floors:
        height = float(y[i] - b)
        if not height > 0:
            continue
        u = np.maximum(y - b, max(0.5 * noise, 1e-9 * height)) / height
        sig = np.sqrt((noise / height) ** 2 + (SCORE_SCATTER * u) ** 2)
        # Every shape on this floor at once: row k of ``root_w`` is 1 / sd of g (delta method) for
        # shapes[k]; the weighted least squares of all of them through one stacked pseudo-inverse
        # (its product with its transpose is each fit's covariance).
        g = np.array([_G(u, s) for s in shapes])
        root_w = 1.0 / (u[None, :] ** (-np.asarray(shapes, dtype=float)[:, None] - 1.0) * sig[None, :])
        pinv = np.linalg.pinv(design[None, :, :] * root_w[:, :, None])
        coefs = np.einsum("kjn,kn->kj", pinv, g * root_w)
        covs = pinv @ np.swapaxes(pinv, 1, 2)
        for s, coef, cov in zip(shapes, coefs, covs):
            _, a1, a2 = (float(v) for v in coef)
            if not a2 < 0:
                continue
            vertex = -a1 / (2 * a2)
            grad = np.array([0.0, -1.0 / (2 * a2), a1 / (2 * a2 * a2)])
            predicted = _G_inverse(design @ coef, s)
            chi2 = float(np.sum(((u - predicted) / sig) ** 2))
            if not math.isfinite(chi2):
                continue
            fits.append((min(max(vertex, left), right), max(float(grad @ cov @ grad), 0.0), chi2))
    if not fits:
        return PeakFit(None, False, "no peak shape fits the frames around the best one")
    chi2 = np.array([f[2] for f in fits])
    spread = max(1.0, float(chi2.min()) / max(len(x) - 4, 1))  # the frames are noisier than assumed
    weight = np.exp(-(chi2 - chi2.min()) / (2 * spread))
    weight /= weight.sum()
    vertices = np.array([f[0] for f in fits])
    # Each shape's own uncertainty, and the model's limit (the bias of the best of these shapes on
    # real peaks, which five frames cannot reveal: FIT_MODEL_FLOOR of the spacing).
    sds = np.sqrt(np.array([f[1] for f in fits]) * spread + FIT_MODEL_FLOOR**2) + 1e-6
    centre = float(np.sum(weight * vertices))

    # The mixture's probability within +-half of the centre (a sum of normal CDF differences), in
    # Python floats: the bisection below evaluates it some twenty times.  Shapes the frames rule out
    # (weight below 1e-15) change no probability and are left out.
    terms = [(wt, v, 1.0 / (sd * math.sqrt(2.0))) for wt, v, sd in zip(weight.tolist(), vertices.tolist(), sds.tolist())
             if wt > 1e-15]

    def covered(half: float) -> float:
        return 0.5 * sum(wt * (math.erf((centre + half - v) * k) - math.erf((centre - half - v) * k))
                         for wt, v, k in terms)

    lo_u, hi_u = 0.0, float(x[-1] - x[0]) + 1.0
    while hi_u - lo_u > FIT_INTERVAL_RESOLUTION:
        mid = 0.5 * (lo_u + hi_u)
        lo_u, hi_u = (mid, hi_u) if covered(mid) < FIT_INTERVAL else (lo_u, mid)
    what = "parabola fit on 3 points (contrast minimum)" if tuple(shapes) == (-1.0,) and len(x) == 3 else \
        f"{'parabola' if tuple(shapes) == (-1.0,) else 'symmetric peak'} fit on {len(x)} points"
    return PeakFit(float(round(z[i] + centre * h, POSITION_DECIMALS)), True, what, hi_u * h, len(x))


def find_peaks(samples: Sequence[Sample], threshold: float, baseline: float | None = None,
               noise: float = 0.0, fit: bool = True) -> list[Extremum]:
    """Every significant peak, in z order, each fitted (unless ``fit`` is False: ``fit_extremum``
    fits one later): a local maximum standing more than
    ``threshold`` above ``baseline`` (default: the median score) and above its surroundings
    (topographic prominence); the highest frame counts when it clears the baseline test alone
    (a curve still rising at an end of the range has its best frame there or before it)."""
    ordered = by_z(samples)
    if len(ordered) < 3 or not math.isfinite(threshold):
        return []
    y = np.array([s.score for s in ordered])
    base = float(np.median(y)) if baseline is None else baseline
    top = int(np.argmax(y))
    found = []
    for i, _, low, high in _maxima(y):
        prominence = prominence_of(float(y[i]), low, high)
        if y[i] - base > threshold and (prominence > threshold or i == top):
            peak = Extremum(ordered[i].z_mm, ordered[i].score, prominence, None)
            found.append(fit_extremum(ordered, peak, base, noise) if fit else peak)
    return found


def fit_extremum(ordered: Sequence[Sample], peak: Extremum, baseline: float, noise: float) -> Extremum:
    """``peak`` with its own sub-step fit (``fit_peak`` on its FIT_REACH neighbours each side)."""
    i = [s.z_mm for s in ordered].index(peak.z_mm)
    fit = fit_peak(ordered[max(i - FIT_REACH, 0): i + FIT_REACH + 1], floor=baseline, noise=noise)
    return dataclasses.replace(peak, fit_mm=fit.z_mm if fit.used else None,
                               uncertainty_mm=fit.uncertainty_mm if fit.used else None)


def find_dips(samples: Sequence[Sample], threshold: float) -> list[Extremum]:
    """Every local minimum between rising flanks (never at an end of the range) whose depth below
    the lower of its surroundings exceeds ``threshold``, in z order; fitted on the reciprocal
    score (a dip is its peak)."""
    ordered = by_z(samples)
    if len(ordered) < 3 or not math.isfinite(threshold):
        return []
    y = np.array([s.score for s in ordered])
    found = []
    for i, j, low, high in _maxima(-y):
        depth = prominence_of(float(-y[i]), low, high)
        if low is not None and high is not None and depth > threshold:
            window = [Sample(s.z_mm, 1.0 / s.score) for s in ordered[max(i - 1, 0): i + 2] if s.score > 0]
            fit = fit_peak(window, floor=0.0) if len(window) == 3 else PeakFit(None, False, "non-positive scores")
            found.append(Extremum(ordered[i].z_mm, ordered[i].score, depth, fit.z_mm if fit.used else None,
                                  fit.uncertainty_mm if fit.used else None))
    return found


def choose_peak(peaks: Sequence[Extremum], policy: PeakPolicy, start_mm: float | None) -> Extremum:
    """The peak ``--peak`` asks for: the sharpest (highest score), the lowest or highest in z, or
    the one nearest where the stage started."""
    if policy == "lowest":
        return min(peaks, key=lambda p: p.z_mm)
    if policy == "highest":
        return max(peaks, key=lambda p: p.z_mm)
    if policy == "nearest" and start_mm is not None:
        return min(peaks, key=lambda p: abs(p.z_mm - start_mm))
    return max(peaks, key=lambda p: p.score)


@dataclasses.dataclass(frozen=True)
class Decision:
    """What ``decide`` concludes from a run's frames."""

    verdict: Verdict
    fit: PeakFit
    best: Sample | None  # the chosen peak's best frame (no_peak: the highest frame, if any)
    target_mm: float | None  # where the stage should go; None: back to where it started
    uncertainty_mm: float | None  # focused: half-width of a ~90 % interval for the true focus
    peaks: tuple[Extremum, ...] = ()
    dips: tuple[Extremum, ...] = ()
    notes: tuple[str, ...] = ()
    more_mm: tuple[float, ...] = ()  # grid positions to measure before the answer is final
    finer_mm: tuple[float, ...] = ()  # off the grid: half a STEP either side of a peak the grid cannot place


def _length(value_mm: float) -> str:
    """A length for a person: um below 1 mm, two significant digits (0.49 um, 25 um)."""
    um = abs(value_mm) * 1000.0
    return f"{um:.2g} \N{MICRO SIGN}m" if um < 1000 else f"{value_mm:g} mm"


def _round_step(step_mm: float) -> float:
    """A STEP to suggest: the nearest (on a log scale) of 1, 1.5, 2, 3, 5 x a power of ten
    (70 um -> 0.05 mm, 1.5 um -> 0.0015 mm, 0.88 um -> 0.001 mm)."""
    if not step_mm > 0:
        return step_mm
    power = math.floor(math.log10(step_mm))
    nice = [m * 10.0**p for p in (power - 1, power, power + 1) for m in (1, 1.5, 2, 3, 5)]
    return float(f"{min(nice, key=lambda v: abs(math.log(v / step_mm))):.3g}")


def step_advice(step_mm: float, depth_of_field_um: float | None) -> str | None:
    """One clause when STEP is much coarser than the depth of field (None when it suits it)."""
    if depth_of_field_um is None:
        return None
    dof_mm = depth_of_field_um / 1000.0
    if step_mm > 2.0 * dof_mm:
        return (f"STEP {step_mm:g} mm is {step_mm / dof_mm:.0f} depths of field of the objective "
                f"({_length(dof_mm)}): a focus between two frames can be missed; use STEP {_round_step(dof_mm):g} mm")
    return None


def decide(samples: Sequence[Sample], grid_mm: Sequence[float], *, peak: PeakPolicy = "sharpest",
           start_mm: float | None = None, transparent: bool = False, depth_of_field_um: float | None = None,
           allowed_mm: tuple[float, float] | None = None) -> Decision:
    """The answer from a run's frames: verdict, chosen peak, fitted position, error bar, reasons.

    ``samples`` are the frames measured so far (any order); ``grid_mm`` every position the search could
    have measured (its size bounds where noise may happen to peak; the fit's STEP neighbours come from
    it; a frame farther than a quarter STEP from every position of it, such as the fast search's
    half-STEP frames, only refines a focused peak's fit); ``peak`` chooses among several significant
    peaks; ``start_mm`` is where the stage started (``peak="nearest"``); ``transparent``: the scores are
    -contrast (fitted as a parabola); ``depth_of_field_um`` (``--objective``) names the STEP to use;
    ``allowed_mm`` (travel and soft limits) keeps a suggested range where the stage may go.

    The fine (full-resolution) curve decides when it shows a real peak; else the coarse-scale curve
    (the score on a binned frame: less photon noise, a longer reach) gets the same test.  ``more_mm``
    lists grid positions to measure before the answer is final (the fit's STEP neighbours, the STEP
    grid across a coarse-scale peak); a caller measures them and decides again.  ``finer_mm`` lists
    positions off the grid, half a STEP either side of a peak the grid cannot place (TOP_SHARE,
    HALF_STEP_ABOVE), that would place it better: the fast search measures them.
    """
    grid = sorted({float(g) for g in grid_mm})
    # Frames off the grid (the fast search's half-STEP ones) refine the fitted position only: the
    # noise, the verdict and the STEP in every message are the grid's.
    # A frame within ON_GRID_SHARE of a STEP of a grid position (a position read back) is that position's.
    tolerance = _grid_tolerance(grid)
    nearest = [_on_grid(grid, s.z_mm) for s in samples]
    on_grid = [s if g == s.z_mm else dataclasses.replace(s, z_mm=g)
               for s, g in zip(samples, nearest) if abs(g - s.z_mm) <= tolerance]
    finer = by_z([s for s, g in zip(samples, nearest) if abs(g - s.z_mm) > tolerance])
    ordered = by_z(on_grid)
    n = len(ordered)
    if n < MIN_FRAMES_FOR_VERDICT:
        verdict = Verdict("no_peak", float("nan"), float("nan"), float("nan"),
                          f"only {n} positions: at least {MIN_FRAMES_FOR_VERDICT} are needed to tell a peak "
                          "from noise; use a smaller STEP")
        return Decision(verdict, PeakFit(None, False, "too few positions"), best_sample(ordered) if ordered else None,
                        None, None)
    options = dict(grid=grid, policy=peak, start_mm=start_mm, transparent=transparent,
                   depth_of_field_um=depth_of_field_um, allowed_mm=allowed_mm)
    fine = _decide_curve(ordered, [s.score for s in ordered], "fine", finer=finer, **options)  # type: ignore[arg-type]
    if fine.verdict.kind != "no_peak" or any(s.coarse is None for s in ordered):
        return fine
    coarse = _decide_curve(ordered, [s.coarse for s in ordered], "coarse", finer=finer, **options)  # type: ignore[misc, arg-type]
    if coarse.verdict.kind == "no_peak":
        return fine
    if coarse.verdict.kind != "focused" or coarse.more_mm or coarse.best is None:
        return coarse
    # Found at the coarse scale: the full-resolution score may still show the peak well enough
    # to locate it (though not above the noise of every position): then it gives the position.
    gi = min(range(len(grid)), key=lambda k: abs(grid[k] - coarse.best.z_mm))  # type: ignore[union-attr]
    bracket = (grid[max(0, gi - FIT_REACH)], grid[min(len(grid) - 1, gi + FIT_REACH)])
    located = _decide_curve(ordered, [s.score for s in ordered], "fine", locate=bracket, finer=finer,  # type: ignore[arg-type]
                            **options)
    return located if located.verdict.kind == "focused" else coarse


def _decide_curve(ordered: list[Sample], scores: list[float], scale: Scale, *, grid: list[float],
                  policy: PeakPolicy, start_mm: float | None, transparent: bool, depth_of_field_um: float | None,
                  allowed_mm: tuple[float, float] | None, locate: tuple[float, float] | None = None,
                  finer: Sequence[Sample] = ()) -> Decision:
    """``decide`` on one curve (the fine scores or the coarse ones).  ``locate`` (lo, hi): a peak
    is already known to lie there (found at the coarse scale); look for it on this curve within
    that bracket only, where noise has only those few frames to peak on.  ``finer``: frames off the
    grid, for the fit of a focused peak only (their fine or coarse score, as this curve's)."""
    z = np.array([s.z_mm for s in ordered])
    y = np.array(scores, dtype=float)
    curve = [Sample(a, float(b)) for a, b in zip(z, y)]
    lo, hi = grid[0], grid[-1]
    step = float(np.min(np.diff(grid))) if len(grid) > 1 else 0.0
    noise = estimate_noise(z, y)
    inside = [k for k in range(len(z)) if locate is not None and locate[0] <= z[k] <= locate[1]]
    threshold = noise_threshold(noise, len(grid)) if locate is None else \
        noise_threshold(noise, len(inside), LOCATE_RATE)
    top = int(np.argmax(y))
    maxima = {i: (low, high) for i, _, low, high in _maxima(y)}
    if not math.isfinite(threshold):
        verdict = Verdict("no_peak", float("nan"), noise.sigma, threshold,
                          f"only {noise.residuals} frames away from the peak to measure the curve's noise: too few to "
                          "tell a peak from noise; widen the range or use a smaller STEP", scale=scale)
        return Decision(verdict, _top_fit(curve, top, noise), ordered[top], None, None)
    base = noise.baseline
    peaks = find_peaks(curve, threshold, base, noise.sigma, fit=False)  # fitted once chosen (below)
    if locate is not None:
        peaks = [p for p in peaks if locate[0] <= p.z_mm <= locate[1]]
    dips = find_dips(curve, threshold) if scale == "fine" and locate is None else []
    top_low, top_high = maxima.get(top, (None, None))
    if not peaks:
        advice = step_advice(step, depth_of_field_um)
        sigmas = (y[top] - base) / noise.sigma if noise.sigma > 0 else 0.0
        needed = threshold / noise.sigma if noise.sigma > 0 else 0.0
        well_measured = noise_threshold(dataclasses.replace(noise, dof=1000.0), len(grid)) / max(noise.sigma, 1e-300)
        if sigmas > well_measured:  # it would count with a well-measured noise: the range is too short
            reason = (f"no peak: the best frame stands {sigmas:.1f} sigma above the curve's median, but the "
                      f"noise is measured on only {noise.residuals} residuals off the peak, too few to tell it from "
                      f"noise (it would need {needed:.1f} sigma); widen the range so that more frames lie away from "
                      "the peak" + (f" (and {advice})" if advice else ""))
        else:
            reason = (f"no peak: the best frame stands {sigmas:.1f} sigma above the curve's median, within its noise "
                      f"(threshold {needed:.1f} sigma); blank field, no specimen, focus far outside the range"
                      + (f", or {advice}" if advice else ", or a STEP much coarser than the depth of field "
                         "(--objective checks it)"))
        verdict = Verdict("no_peak", prominence_of(float(y[top]), top_low, top_high), noise.sigma, threshold, reason,
                          scale=scale, height=float(y[top] - base))
        return Decision(verdict, _top_fit(curve, top, noise), ordered[top], None, None, dips=tuple(dips))
    chosen = choose_peak(peaks, policy, start_mm)
    # Every other peak gets its own fit; the chosen one the answer's (focused) or its own (edge).
    peaks = [p if p is chosen else fit_extremum(curve, p, base, noise.sigma) for p in peaks]
    i = int(np.searchsorted(z, chosen.z_mm))
    low, high = maxima.get(i, (None, None))
    prominence = prominence_of(float(y[i]), low, high)
    # The edge rule: once the height has shown a real peak (above what noise reaches anywhere),
    # whether the curve falls on each side is a question about those few frames: a drop larger
    # than noise reaches there (LOCATE_RATE), within the range.
    fall = min(threshold, noise_threshold(noise, len(grid), LOCATE_RATE))
    falls_low = low is not None and y[i] - low > fall
    falls_high = high is not None and y[i] - high > fall
    several = f"; the {policy} of {len(peaks)} significant peaks (--peak {policy})" if len(peaks) > 1 and \
        policy != "sharpest" else ""
    # The STEP grid around the chosen frame: what the fit needs, and what is not measured yet.
    gi = int(np.argmin(np.abs(np.array(grid) - z[i])))
    measured = {float(v) for v in z}
    def grid_at(k: int) -> float | None:
        return grid[k] if 0 <= k < len(grid) else None
    more: list[float] = []
    for side in (-1, 1):
        near = grid_at(gi + side)
        if near is not None and near not in measured:
            more.append(near)
    if scale == "coarse":  # measure the STEP grid across the coarse peak (between its coarse neighbours)
        span_lo = z[i - 1] if i > 0 else z[i]
        span_hi = z[i + 1] if i < len(z) - 1 else z[i]
        more += [g for g in grid if span_lo < g < span_hi and g not in measured]
    if falls_low and falls_high:
        for side in (-1, 1):  # the second neighbour, where the first stands above the floor
            first, second = grid_at(gi + side), grid_at(gi + 2 * side)
            if first in measured and second is not None and second not in measured:
                if y[int(np.searchsorted(z, first))] - base > 2 * noise.sigma:
                    more.append(second)
    more_mm = tuple(sorted(set(more)))
    word = "contrast minimum" if transparent else "peak"
    if not (falls_low and falls_high):
        # The edge rule: the chosen peak does not fall by more than the threshold on a side (or
        # sits at an end): the focus may lie beyond that end.
        if falls_low != falls_high:
            at_low = not falls_low
        else:  # neither side falls: the side that falls the least
            at_low = (y[i] - low if low is not None else 0.0) <= (y[i] - high if high is not None else 0.0)
        end = lo if at_low else hi
        where, toward = ("low", "below") if at_low else ("high", "above")
        still = "the contrast is still falling" if transparent else "the curve is still high"
        reason = f"{still} at the {where} end of the range ({end:.4f} mm): the {'focus' if not transparent else word} may lie {toward} it"
        suggestion, limit_note = _suggest(end, at_low, hi - lo, allowed_mm)
        verdict = Verdict("edge", prominence, noise.sigma, threshold, reason + limit_note + several, suggestion,
                          scale, float(y[i] - base))
        peaks = [fit_extremum(curve, p, base, noise.sigma) if p is chosen else p for p in peaks]
        return Decision(verdict, PeakFit(None, False, "edge"), ordered[i], float(z[i]), None, tuple(peaks),
                        tuple(dips), more_mm=more_mm)
    # Focused: fit the STEP-spaced frames around the chosen one.
    window = set(grid[max(0, gi - FIT_REACH): gi + FIT_REACH + 1])
    near = [s for s in curve if s.z_mm in window]
    k = next(n for n, s in enumerate(near) if s.z_mm == z[i])
    lo_k, hi_k = k, k  # down each flank only while it falls: beyond a rise lies another peak
    while lo_k > 0 and near[lo_k - 1].score <= near[lo_k].score:
        lo_k -= 1
    while hi_k < len(near) - 1 and near[hi_k + 1].score <= near[hi_k].score:
        hi_k += 1
    near = near[lo_k: hi_k + 1]
    fit = dataclasses.replace(fit_peak(near, floor=_fit_floors(near, base), noise=noise.sigma,
                                       shapes=(-1.0,) if transparent else None), scale=scale)
    neighbours = [k for k in (i - 1, i + 1) if 0 <= k < len(z)]
    gaps = [abs(z[k] - z[i]) for k in neighbours]
    # A sharp peak of a real specimen often stands on a broad pedestal (blurred structure keeps some
    # contrast for several STEPs), which lifts both neighbours without widening the peak: each side
    # is measured from its local floor, the frame beyond the neighbour when that one is lower (the
    # neighbour itself when it is not), never below the curve's baseline.
    def local_floor(k: int) -> float:
        beyond = 2 * k - i
        return float(max(base, min(y[k], y[beyond]) if 0 <= beyond < len(z) else base))
    floor_level = noise.sigma * student_t_isf(NEIGHBOUR_RATE, noise.dof)  # one frame within the floor's noise
    # Each neighbour below half the peak's height (half-width at half height under a STEP): a
    # broad peak sampled finely has them close to its top, however flat and noisy its sides.  One
    # frame wide: each neighbour also within the noise of the floor, or of its local floor.
    # Narrower than STEP: each below NARROW_SHARE of the peak's height above its local floor (a
    # Lorentzian that low at both neighbours has a half-width under 1/3 STEP); the frames see its
    # flanks only, and the fit's interval (the shapes those flanks allow, at least FIT_SHARP_FLOOR)
    # says how well they place it.
    def far_down(k: int) -> bool:
        return y[k] - local_floor(k) < NARROW_SHARE * (y[i] - local_floor(k))
    below_half = all(y[i] - y[k] > 0.5 * (y[i] - base) for k in neighbours)
    narrow = below_half and all(y[k] - base <= floor_level or (y[k] - local_floor(k) <= floor_level and far_down(k))
                                for k in neighbours)
    sharp = below_half and not narrow and all(far_down(k) for k in neighbours)
    notes: list[str] = []
    ratio = f"{float(y[i] - base) / threshold:.1f}x the noise threshold" if threshold > 0 else "above a noise-free curve"
    reason = f"{word} height {ratio}{several}"
    if narrow or not fit.used or fit.uncertainty_mm is None or fit.uncertainty_mm > max(gaps) / 2.0:
        # A one-frame peak, or a fit no surer than the frames' spacing: the best frame, +-half a gap.
        target, uncertainty = float(z[i]), max(gaps) / 2.0
        if fit.used and fit.uncertainty_mm is not None and not narrow:
            uncertainty = max(fit.uncertainty_mm, uncertainty)
    else:
        target, uncertainty = fit.z_mm, fit.uncertainty_mm  # type: ignore[assignment]
        if sharp:
            uncertainty = max(uncertainty, FIT_SHARP_FLOOR * max(gaps))
    # A narrow peak (a grid neighbour below TOP_SHARE of its height) that the grid places no better
    # than HALF_STEP_ABOVE STEPs: the frames half a STEP either side of the best one show its top
    # (``finer_mm``, for the fast search, once the grid neighbours are measured).  Frames off the grid
    # there give a second fit at their spacing, which replaces the grid's answer (below); broad peaks
    # keep the grid's (their error bar is noise, which frames closer together do not beat).
    narrow_top = len(neighbours) == 2 and any(y[i] - y[k] > (1 - TOP_SHARE) * (y[i] - base) for k in neighbours)
    value = {s.z_mm: s.score if scale == "fine" else s.coarse for s in finer}
    between = [Sample(s.z_mm, float(value[s.z_mm])) for s in finer  # type: ignore[arg-type]
               if near[0].z_mm < s.z_mm < near[-1].z_mm and value[s.z_mm] is not None]
    finer_mm: tuple[float, ...] = ()
    on_grid_neighbours = all(float(z[k]) in (grid_at(gi - 1), grid_at(gi + 1)) for k in neighbours)
    if narrow_top and on_grid_neighbours and not more_mm and uncertainty >= HALF_STEP_ABOVE * max(gaps) - FLOAT_SLACK_MM:
        finer_mm = tuple(round((z[i] + z[k]) / 2.0, POSITION_DECIMALS) for k in neighbours
                         if not any(min(z[i], z[k]) < s.z_mm < max(z[i], z[k]) for s in finer))
    best_frame = ordered[i]
    # A peak one frame wide on the grid stays so (the best frame, +-STEP/2) unless a frame off the
    # grid stands out of the floor's noise: then it is narrower than STEP, and fitted.
    if narrow:  # (above the grid neighbour beyond it, or the floor)
        def stands_out(s: Sample) -> bool:
            k = next((k for k in neighbours if min(z[i], z[k]) < s.z_mm < max(z[i], z[k])), None)
            return k is not None and s.score - max(base, float(y[k])) > floor_level
        between = between if any(stands_out(s) for s in between) else []
    if between and narrow_top:
        both = by_z([*near, *between])
        refit = dataclasses.replace(fit_peak(both, floor=_fit_floors(both, base), noise=noise.sigma,
                                             shapes=(-1.0,) if transparent else None), scale=scale)
        top_k = both.index(best_sample(both))
        spacing = max((abs(both[k].z_mm - both[top_k].z_mm) for k in (top_k - 1, top_k + 1) if 0 <= k < len(both)),
                      default=max(gaps))
        # Used when its own interval is the narrower; its error bar is then at least as far as the
        # grid's fit lies from it (two fits of one top that disagree: the shape decides, not the
        # noise), and FIT_SHARP_FLOOR of this spacing (the frames show the top of a peak narrower than
        # STEP, whose shape -- a cusp, a flat top -- they still cannot tell), so it may end wider.
        if refit.used and refit.z_mm is not None and refit.uncertainty_mm is not None \
                and refit.uncertainty_mm <= min(uncertainty, spacing / 2):
            u2 = max(refit.uncertainty_mm, FIT_SHARP_FLOOR * spacing,
                     abs(refit.z_mm - target) if fit.used and target == fit.z_mm else 0.0)
            fit, target, uncertainty = refit, refit.z_mm, u2
            narrow, sharp = False, narrow or sharp  # its note: narrower than STEP, not one frame wide
            originals = {s.z_mm: s for s in finer}
            if both[top_k].z_mm in originals and both[top_k].score > y[i]:
                best_frame = originals[both[top_k].z_mm]
    # The STEP to suggest for a peak narrower than this one: the objective's depth of field when
    # that is finer, else a quarter of it (a sharp specimen's peak can be narrower than the DOF).
    dof_step = _round_step(depth_of_field_um / 1000.0) if depth_of_field_um else math.inf
    use = dof_step if dof_step < max(gaps) - FLOAT_SLACK_MM else _round_step(max(gaps) / 4)
    if sharp:
        notes.append(f"note: the {word} is narrower than STEP (each neighbour is below half its height, and below "
                     f"{NARROW_SHARE:.0%} of it above the floor there or the frame beyond it): the frames see only its flanks, so the focus is known to within "
                     f"\N{PLUS-MINUS SIGN}{_length(uncertainty)} of {target:.4f} mm; for a sharp image search "
                     f"{max(lo, z[i] - max(gaps)):g} {min(hi, z[i] + max(gaps)):g} with STEP {use:g} mm")
    if narrow:
        notes.append(f"note: the {word} is one frame wide (no neighbour stands out of the noise above the floor or "
                     f"the frame beyond it): it is narrower than STEP, so the focus is known only to within \N{PLUS-MINUS SIGN}{_length(uncertainty)} of {target:.4f} mm; for a "
                     f"sharp image search {max(lo, z[i] - max(gaps)):g} {min(hi, z[i] + max(gaps)):g} with STEP "
                     f"{use:g} mm"
                     + ("" if depth_of_field_um else " (--objective names the STEP that suits the objective)"))
    if locate is not None:
        reason += (" (the coarse-scale score shows the peak above the noise of every position; the "
                   "full-resolution score locates it)")
    elif scale == "coarse":
        narrow = narrow or step_advice(step, depth_of_field_um) is not None
        cause = "the peak is narrower than STEP" if narrow else "fine detail is lost in noise"
        reason += f" (on the coarse-scale score only: {cause})"
        if cause.startswith("fine"):
            notes.append("note: the full-resolution score is flat within its noise; the coarse (binned) score found "
                         "the focus, less precisely: more light, a longer exposure, or --metric tenengrad/normvar help")
    verdict = Verdict("focused", prominence, noise.sigma, threshold, reason, None,
                      "coarse" if locate is not None else scale, float(y[i] - base), narrow or sharp)
    # The chosen peak's entry says what the answer says (its own fit and error bar).
    peaks = [dataclasses.replace(p, fit_mm=target, uncertainty_mm=uncertainty) if p is chosen else p for p in peaks]
    return Decision(verdict, fit, best_frame, target, uncertainty, tuple(peaks), tuple(dips), tuple(notes), more_mm,
                    finer_mm)


def _on_grid(grid: list[float], z_mm: float) -> float:
    """The position of a sorted grid nearest z (z itself when the grid is empty)."""
    k = bisect.bisect_left(grid, z_mm)
    return min((grid[j] for j in (k - 1, k) if 0 <= j < len(grid)), key=lambda g: abs(g - z_mm), default=z_mm)


def _grid_tolerance(grid: list[float]) -> float:
    """How near a grid position (of a sorted grid) a frame counts as that position's."""
    return ON_GRID_SHARE * float(np.min(np.diff(grid))) if len(grid) > 1 else FLOAT_SLACK_MM


def _top_fit(curve: list[Sample], top: int, noise: Noise) -> PeakFit:
    """The fit around the highest frame of a curve that showed no peak: the stage does not go
    there, but a caller with its own evidence (a focus map's window) may use it."""
    near = curve[max(0, top - FIT_REACH): top + FIT_REACH + 1]
    base = noise.baseline if math.isfinite(noise.baseline) else min(s.score for s in near)
    return fit_peak(near, floor=_fit_floors(near, base), noise=noise.sigma if math.isfinite(noise.sigma) else 0.0)


def _fit_floors(near: list[Sample], baseline: float) -> list[float]:
    """The floors a peak may stand on, for fit_peak to weigh: from the curve's baseline (far from
    focus) up to just below the lowest frame of the fit (a broad pedestal under a sharp peak:
    blurred structure still has some contrast several STEPs out)."""
    lowest = min(s.score for s in near)
    top = max(s.score for s in near)
    end = lowest - 0.05 * (top - lowest)
    return [float(v) for v in np.linspace(baseline, max(baseline, end), FIT_FLOORS)]


def _suggest(end_mm: float, at_low: bool, width_mm: float,
             allowed_mm: tuple[float, float] | None) -> tuple[tuple[float, float] | None, str]:
    """A range to try next, centred on the end the focus may lie beyond, kept inside where the
    stage may go; or none (and why) when the range already ends at that limit."""
    lo, hi = end_mm - width_mm / 2, end_mm + width_mm / 2
    if allowed_mm is None:
        return (round(lo, 6), round(hi, 6)), ""
    a_lo, a_hi = min(allowed_mm), max(allowed_mm)
    limit = a_lo if at_low else a_hi
    if (at_low and end_mm <= a_lo + FLOAT_SLACK_MM) or (not at_low and end_mm >= a_hi - FLOAT_SLACK_MM):
        return None, (f"; the range already ends at the stage's {'lowest' if at_low else 'highest'} allowed "
                      f"position ({limit:g} mm: its travel or --z-min/--z-max), so no range beyond it can be tried")
    lo, hi = max(lo, a_lo), min(hi, a_hi)
    return (round(lo, 6), round(hi, 6)), ""


###############################################################################
# Focus maps: the slide's surface (pure) ######################################
###############################################################################
# A focus map (``focus_map``, below) focuses at a grid of plate positions and fits the slide's
# focal surface z(x, y) to the answers; this section is pure: points in, a surface, a search window
# or a verdict out.  Surfaces: a plane, a quadratic, and a thin-plate spline, each a weighted
# least-squares fit and a linear smoother (fitted = H z), so the leave-one-out residual of point i
# is exactly r_i / (1 - H_ii), no refitting.  The simplest surface whose leave-one-out error is
# within MODEL_TOLERANCE of the best one's is chosen; outliers (a focus on dust, a false peak) are
# removed one at a time, worst first (``choose_surface``).

MAP_MODELS = ("plane", "quadratic", "spline")  # simplest first: the order of preference
MAP_MAX_SIDE = 30  # --map NXxNY: at most 30 points a side (900 focus searches)
SPLINE_MAX_POINTS = 400  # the spline's fit grows as n^3: beyond 400 points only the plane and quadratic
MAP_MAX_REFINE = 500  # --map-refine: at most this many added points
MODEL_TOLERANCE = 0.10  # a more complex surface must cut the leave-one-out error by more than 10%
OUTLIER_SIGMAS = 4.0  # a leave-one-out residual beyond 4 robust sigmas (and DOF/2) is an outlier
OUTLIER_MAX_FRACTION = 1.0 / 3.0  # never call more than a third of the focused points outliers
SPLINE_SMOOTHING = tuple(10.0 ** (k / 2) for k in range(-14, 7))  # lambda grid (normalised units)
# A point's search window covers the predicted focus +- WINDOW_SIGMAS of the prediction's own
# uncertainty, plus one STEP so that the peak has a measured neighbour on each side; at least
# WINDOW_MIN_HALF_STEPS STEPs each way (5 frames: the fewest a verdict is made from).
WINDOW_SIGMAS = 2.5
WINDOW_MIN_HALF_STEPS = 2
# The prior the first predictions rest on (before the points pin the surface down): a slide
# tilted by up to ~10 um/mm and bowed by up to ~0.3 um/mm^2 (one standard deviation each).
PRIOR_TILT_MM_PER_MM = 0.010
PRIOR_BOW_MM_PER_MM2 = 0.0003
NOISE_REPEATS = 6  # frames repeated at the first focus: the score's frame-to-frame noise
# A peak another search found inside a window counts as shown there when the window's frame at it
# stands above its lowest frames by this many sigma of that noise (a position given, not sought).
WINDOW_SHOWS_SIGMAS = 2.0
SIGMA_PER_90 = 1.0 / 1.645  # uncertainty_mm is a ~90% half-width: one sigma is 1/1.645 of it
XY_TOLERANCE_MM = 0.002  # a plate move must end within 2 um of its target (a Zaber axis: its own tolerance too)


@dataclasses.dataclass(frozen=True, eq=False)
class SurfaceFit:
    """One model fitted to the points: the surface, each point's residual and leave-one-out
    residual (mm), and the weighted leave-one-out RMS that ranks the models."""

    surface: Surface
    residuals_mm: np.ndarray
    loo_mm: np.ndarray
    loo_rms_mm: float


def _weights(sigma_mm: np.ndarray) -> np.ndarray:
    """1/sigma^2, normalised to a mean of 1."""
    w = 1.0 / np.square(sigma_mm)
    return w / w.mean()


def _weighted_rms(values: np.ndarray, w: np.ndarray) -> float:
    return float(np.sqrt(np.sum(w * values * values) / np.sum(w)))


def fit_surface(x_mm: Sequence[float], y_mm: Sequence[float], z_mm: Sequence[float], sigma_mm: Sequence[float],
                model: str, area_mm: Sequence[float], smoothing: float | None = None) -> SurfaceFit | None:
    """Fit one model (MAP_MODELS) by weighted least squares; None when the points cannot determine
    it (too few for a leave-one-out error, or all on a line).  The spline's ``smoothing`` (lambda,
    in units of the weights normalised to a mean of 1) is the one of SPLINE_SMOOTHING with the
    lowest leave-one-out error unless given."""
    u, v = _normalised(area_mm, x_mm, y_mm)
    z = np.asarray(z_mm, float)
    n = len(z)
    if n < 4:
        return None
    w = _weights(np.asarray(sigma_mm, float))
    area = tuple(float(a) for a in area_mm)
    plane = _poly_basis("plane", u, v)
    if np.linalg.matrix_rank(plane * np.sqrt(w)[:, None]) < 3:
        return None
    if model in ("plane", "quadratic"):
        basis = _poly_basis(model, u, v)
        p = basis.shape[1]
        a = basis * np.sqrt(w)[:, None]
        if n < p + 1 or np.linalg.matrix_rank(a) < p:
            return None
        q, r = np.linalg.qr(a)
        beta = np.linalg.solve(r, q.T @ (np.sqrt(w) * z))
        leverage = np.sum(q * q, axis=1)  # diagonal of the hat matrix
        if np.any(leverage > 1 - FLOAT_SLACK_RATIO):
            return None  # a point that alone fixes a parameter has no leave-one-out residual
        residuals = z - basis @ beta
        loo = residuals / (1 - leverage)
        return SurfaceFit(Surface(model, area, tuple(float(b) for b in beta)),  # type: ignore[arg-type]
                          residuals, loo, _weighted_rms(loo, w))
    if model != "spline":
        raise ValueError(f"unknown surface model {model!r}; choose one of {', '.join(MAP_MODELS)}")
    if n < 5 or n > SPLINE_MAX_POINTS:
        return None
    kernel = _tps_kernel(np.hypot(u[:, None] - u[None, :], v[:, None] - v[None, :]))
    best: SurfaceFit | None = None
    for lam in SPLINE_SMOOTHING if smoothing is None else (smoothing,):
        # Minimise sum w_i (z_i - f_i)^2 + lam * bending energy: (K + lam/W) c + P a = z, P' c = 0.
        system = np.zeros((n + 3, n + 3))
        system[:n, :n] = kernel + np.diag(lam / w)
        system[:n, n:] = plane
        system[n:, :n] = plane.T
        try:
            solution = np.linalg.solve(system, np.vstack([np.eye(n), np.zeros((3, n))]))
        except np.linalg.LinAlgError:
            continue
        hat = kernel @ solution[:n] + plane @ solution[n:]
        leverage = np.diag(hat)
        if np.any(leverage > 1 - FLOAT_SLACK_RATIO):
            continue
        c, coef = solution[:n] @ z, solution[n:] @ z
        residuals = z - hat @ z
        loo = residuals / (1 - leverage)
        fit = SurfaceFit(Surface("spline", area, tuple(float(b) for b in coef),  # type: ignore[arg-type]
                                 tuple((float(a), float(b)) for a, b in zip(u, v)), tuple(float(b) for b in c),
                                 float(lam)), residuals, loo, _weighted_rms(loo, w))
        if best is None or fit.loo_rms_mm < best.loo_rms_mm * (1 - FLOAT_SLACK_RATIO):
            best = fit
    return best


def select_model(fits: dict[str, SurfaceFit]) -> str:
    """The simplest model whose leave-one-out RMS is within MODEL_TOLERANCE of the best (1 pm slack
    for exact fits)."""
    best = min(f.loo_rms_mm for f in fits.values())
    return next(m for m in MAP_MODELS if m in fits and fits[m].loo_rms_mm <= best * (1 + MODEL_TOLERANCE) + 1e-9)


@dataclasses.dataclass(frozen=True, eq=False)
class SurfaceChoice:
    """The chosen surface (None when the points cannot determine one), every model's
    leave-one-out RMS, which points it rests on, and the outliers left out (indices)."""

    fit: SurfaceFit | None
    loo_by_model_mm: dict[str, float]
    used: np.ndarray  # bool, one per input point
    outliers: tuple[int, ...]


def choose_surface(x_mm: Sequence[float], y_mm: Sequence[float], z_mm: Sequence[float],
                   sigma_mm: Sequence[float], area_mm: Sequence[float], outlier_floor_mm: float,
                   models: Sequence[str] = MAP_MODELS, own_sigma_mm: Sequence[float] | None = None) -> SurfaceChoice:
    """Fit every model (weights from ``sigma_mm``), pick one by leave-one-out error, and leave out
    outliers (worst first).

    A point is an outlier when its leave-one-out residual under the chosen model exceeds both
    OUTLIER_SIGMAS robust sigmas (of all the leave-one-out residuals, or of its own error bar
    ``own_sigma_mm``; default ``sigma_mm``) and ``outlier_floor_mm`` (half the depth of field: closer
    it is in focus anyway).  At most OUTLIER_MAX_FRACTION of the points are left out, and never so
    many that fewer than 5 remain."""
    x, y, z, s = (np.asarray(a, float) for a in (x_mm, y_mm, z_mm, sigma_mm))
    own = s if own_sigma_mm is None else np.asarray(own_sigma_mm, float)
    used = np.ones(len(z), bool)
    outliers: list[int] = []
    most = int(len(z) * OUTLIER_MAX_FRACTION)
    while True:
        idx = np.flatnonzero(used)
        fits = {m: f for m in models if (f := fit_surface(x[idx], y[idx], z[idx], s[idx], m, area_mm)) is not None}
        if not fits:
            return SurfaceChoice(None, {}, used, tuple(outliers))
        fit = fits[select_model(fits)]
        loo = np.abs(fit.loo_mm)
        robust = 1.4826 * float(np.median(loo))
        limit = np.maximum(OUTLIER_SIGMAS * np.maximum(robust, own[idx]), outlier_floor_mm)
        worst = int(np.argmax(loo / limit))
        if loo[worst] <= limit[worst] or len(outliers) >= most or len(idx) - 1 < 5:
            return SurfaceChoice(fit, {m: f.loo_rms_mm for m, f in fits.items()}, used, tuple(outliers))
        used[idx[worst]] = False
        outliers.append(int(idx[worst]))


def predict_focus(x_mm: Sequence[float], y_mm: Sequence[float], z_mm: Sequence[float], sigma_mm: Sequence[float],
                  at_mm: tuple[float, float]) -> tuple[float, float]:
    """Where the focus is expected at ``at_mm`` = (x, y), and how uncertain that is (one sigma, mm).

    A Bayesian quadratic through the points measured so far: any offset, tilts of about
    PRIOR_TILT_MM_PER_MM and bows of about PRIOR_BOW_MM_PER_MM2 a priori, each point weighted by its
    error bar (one point predicts the same focus nearby, less certain farther away).  When the points
    scatter about the fit by more than their error bars, the uncertainty is scaled up by that excess
    (the Birge ratio)."""
    x, y, z, s = (np.asarray(a, float) for a in (x_mm, y_mm, z_mm, sigma_mm))
    xr, yr = float(x.mean()), float(y.mean())

    def basis(px: Any, py: Any) -> np.ndarray:
        dx, dy = np.asarray(px, float) - xr, np.asarray(py, float) - yr
        return np.stack([np.ones_like(dx), dx, dy, dx * dx, dx * dy, dy * dy], axis=-1)

    t2, b2 = PRIOR_TILT_MM_PER_MM ** 2, PRIOR_BOW_MM_PER_MM2 ** 2
    prior = np.array([1e6, t2, t2, b2, b2, b2])  # the offset is free (1 km^2)
    phi = basis(x, y)
    inv_noise = 1.0 / np.square(s)
    precision = phi.T @ (phi * inv_noise[:, None]) + np.diag(1.0 / prior)
    cov = np.linalg.inv(precision)
    mean = cov @ (phi.T @ (inv_noise * z))
    hat_trace = float(np.trace(phi @ cov @ phi.T * inv_noise[None, :]))
    chi2 = float(np.sum(np.square(z - phi @ mean) * inv_noise))
    birge = chi2 / (len(z) - hat_trace) if len(z) - hat_trace >= 1.0 else 1.0
    at = basis(*at_mm)
    var = float(at @ cov @ at) * max(1.0, birge)
    return float(at @ mean), math.sqrt(max(var, 0.0))


def full_search_frames(n_positions: int, search: Search) -> int:
    """About how many frames a search over the whole range costs (sweep: all; fast: its coarse
    pass and a refinement) -- a window costing as much is no saving."""
    if search == "sweep" or n_positions < MIN_FAST_POSITIONS:
        return n_positions
    return math.ceil(n_positions / max(2, min(COARSE_FACTOR, n_positions // 10))) + 4


def plan_window(predicted_mm: float, sigma_mm: float, positions: Sequence[float], step_mm: float,
                full_frames: int) -> tuple[float, float] | None:
    """The first and last position of a point's search window on the range's grid ``positions``
    (START..END every STEP, in sweep order), or None when a window would cost as many frames as the
    whole range (``full_frames``).  Next to an end of the range the window is shifted inside rather
    than cut short."""
    n = len(positions)
    half = max(WINDOW_MIN_HALF_STEPS, math.ceil(WINDOW_SIGMAS * sigma_mm / step_mm + 1.0 - FLOAT_SLACK_RATIO))
    size = 2 * half + 1
    if size >= min(n, full_frames):
        return None
    centre = min(range(n), key=lambda i: abs(positions[i] - predicted_mm))
    lo = min(max(centre - half, 0), n - size)
    return positions[lo], positions[lo + size - 1]


WINDOW_MARGIN_SIGMA = 3.0  # a map window's peak must clear the expected noise maximum by this many sigma


def relative_noise(scores: Sequence[float]) -> float:
    """The frame-to-frame noise of repeated frames at one position, relative to their score
    (std / |mean|), raised by 1.64/sqrt(dof) for the few frames it rests on."""
    a = np.asarray(scores, float)
    if len(a) < 2 or not np.all(np.isfinite(a)) or float(np.mean(np.abs(a))) == 0.0:
        return float("nan")
    dof = len(a) - 1
    return float(np.std(a, ddof=1) / np.mean(np.abs(a))) * (1 + 1.64 / math.sqrt(dof))


def judge_window(samples: Sequence[Sample], rel_noise: float) -> Verdict:
    """Is there a focus inside a map point's narrow search window?

    ``decide`` cannot tell: it takes the noise from the frames off the peak, and a window of 5-9
    frames around the predicted focus is nearly all peak.  This rule takes the noise from repeated
    frames on the same slide instead (``relative_noise``; it grows with the score): ``focused`` when
    the best frame is inside the window and the curve falls from it to the lowest frame on each side
    by more than sqrt(2 ln n) + WINDOW_MARGIN_SIGMA of that noise (the sigma of the difference of the
    two frames; n the window's frames); ``edge`` when the best frame is at the window's end (the focus
    may lie beyond it), else ``no_peak``."""
    ordered = by_z(samples)
    n = len(ordered)
    nan = float("nan")
    if n < MIN_FRAMES_FOR_VERDICT or not math.isfinite(rel_noise):
        return Verdict("no_peak", nan, nan, nan, f"a window of {n} frames cannot be judged (at least "
                       f"{MIN_FRAMES_FOR_VERDICT}, and the slide's frame noise, are needed)")
    scores = np.array([s.score for s in ordered])
    i = int(np.argmax(scores))
    best = float(scores[i])
    margin = math.sqrt(2 * math.log(n)) + WINDOW_MARGIN_SIGMA
    if i in (0, n - 1):
        return Verdict("edge", nan, rel_noise * abs(best), nan, "the best frame is at the end of the window: the "
                       "focus may lie beyond it")
    drops, thresholds = [], []
    for side in (scores[:i], scores[i + 1:]):
        low = float(side.min())
        drops.append(best - low)
        thresholds.append(margin * rel_noise * math.hypot(best, low))
    k = int(np.argmin(np.array(drops) - np.array(thresholds)))
    if not all(d > t for d, t in zip(drops, thresholds)):
        return Verdict("no_peak", drops[k], rel_noise * abs(best), thresholds[k],
                       f"no peak in the window: the curve falls by {drops[k]:.3g} on one side, within its noise "
                       f"(threshold {thresholds[k]:.3g})")
    return Verdict("focused", drops[k], rel_noise * abs(best), thresholds[k],
                   f"peak in the window, {drops[k] / thresholds[k]:.1f}x the noise threshold "
                   "(noise from repeated frames on this slide)")


def window_shows(samples: Sequence[Sample], z_mm: float, rel_noise: float) -> bool:
    """Whether a window's frames show a rise at ``z_mm`` (a peak found there by another search):
    the frame nearest it stands above the lowest frame on each side of it by more than
    WINDOW_SHOWS_SIGMAS of the noise (``relative_noise``; no look-elsewhere allowance, as the
    position was found independently).  A window that "showed no peak" by ``judge_window``'s stricter rule
    can still show a weak real one this way; on an empty field it does not."""
    ordered = by_z(samples)
    if len(ordered) < 3 or not math.isfinite(rel_noise):
        return True  # nothing to contradict it with
    i = min(range(len(ordered)), key=lambda k: abs(ordered[k].z_mm - z_mm))
    if i in (0, len(ordered) - 1):
        return True
    s = ordered[i].score
    return all(s - low > WINDOW_SHOWS_SIGMAS * rel_noise * math.hypot(s, low)
               for low in (min(o.score for o in ordered[:i]), min(o.score for o in ordered[i + 1:])))


def snake_path(area_mm: Sequence[float], grid: tuple[int, int]) -> list[tuple[float, float]]:
    """The grid's points in visiting order: rows along x from X0 to X1 and back (a snake), the
    rows stepping from Y0 to Y1."""
    x0, y0, x1, y1 = area_mm
    nx, ny = grid
    xs = np.linspace(x0, x1, nx) if nx > 1 else np.array([(x0 + x1) / 2.0])
    ys = np.linspace(y0, y1, ny) if ny > 1 else np.array([(y0 + y1) / 2.0])
    path = []
    for row, yv in enumerate(ys):
        for xv in (xs if row % 2 == 0 else xs[::-1]):
            path.append((round(float(xv), POSITION_DECIMALS), round(float(yv), POSITION_DECIMALS)))
    return path


def suggest_points(x_mm: Sequence[float], y_mm: Sequence[float], loo_mm: Sequence[float],
                   measured_mm: Sequence[tuple[float, float]], area_mm: Sequence[float], grid: tuple[int, int],
                   count: int) -> list[tuple[float, float]]:
    """Where the map most needs more points: up to ``count`` positions of the half-spaced grid
    (the cell centres and edge midpoints between the grid's points), not measured yet, ranked by
    the leave-one-out error nearby (inverse-distance weighted over the used points) times
    (1 + the distance to the nearest used point in grid spacings); at least one grid spacing
    apart.  ``x_mm, y_mm, loo_mm`` are the used points and their leave-one-out residuals."""
    x0, y0, x1, y1 = area_mm
    nx, ny = grid
    xs = np.linspace(x0, x1, max(2 * nx - 1, 1))
    ys = np.linspace(y0, y1, max(2 * ny - 1, 1))
    spacing = float(np.mean([abs(x1 - x0) / max(nx - 1, 1), abs(y1 - y0) / max(ny - 1, 1)]))
    px, py, err = (np.asarray(a, float) for a in (x_mm, y_mm, loo_mm))
    taken = np.asarray(measured_mm, float).reshape(-1, 2)
    candidates = []
    for yv in ys:
        for xv in xs:
            if len(taken) and np.min(np.hypot(taken[:, 0] - xv, taken[:, 1] - yv)) < 1e-6:
                continue
            if len(px):
                d = np.hypot(px - xv, py - yv)
                weight = 1.0 / np.maximum(d, 1e-9) ** 2
                score = float(np.sum(weight * np.abs(err)) / np.sum(weight)) * (1 + float(d.min()) / spacing)
            else:
                score = 1.0
            candidates.append((score, float(xv), float(yv)))
    chosen: list[tuple[float, float]] = []
    for _, xv, yv in sorted(candidates, key=lambda c: -c[0]):  # stable: ties keep the grid's order
        if len(chosen) >= count:
            break
        if all(math.hypot(xv - cx, yv - cy) >= 0.99 * spacing for cx, cy in chosen):
            chosen.append((round(xv, POSITION_DECIMALS), round(yv, POSITION_DECIMALS)))
    return chosen


###############################################################################
# Device interfaces ###########################################################
###############################################################################
# The search needs only these; the Zaber stage, the FLIR camera, the simulator and the replay
# all implement them.


class Stage(Protocol):
    """A focus axis: what the search needs and nothing more."""

    def limits_mm(self) -> tuple[float, float]:
        """The travel limits (lowest, highest), mm."""
        ...

    def position_mm(self) -> float:
        """Where the axis is now, mm."""
        ...

    def move_to(self, z_mm: float) -> None:
        """Move to z and return once it has arrived (or raise StageError).  A stage that checks,
        before moving, that it stood still since its last move (ZaberStage does) raises a
        StageError with ``before_move`` True when it did not: the frame taken there is dropped."""
        ...

    def stop(self) -> None:
        """Stop any motion now."""
        ...


class Camera(Protocol):
    """A camera: one call, one frame exposed after the call began."""

    def capture(self) -> np.ndarray:
        """One frame exposed after this call began: a numpy array, HxW or HxWx3/4 (BGR, BGRA),
        uint8, uint16 or float32, the same size and type for every frame of a run."""
        ...


class XYStage(Protocol):
    """An XY plate (the slide's stage): what a focus map needs and nothing more."""

    def move_to(self, x_mm: float, y_mm: float) -> None:
        """Move to (x, y) and return once it has arrived (or raise StageError)."""
        ...

    def position_mm(self) -> tuple[float, float]:
        """Where the plate is now, (x, y) mm."""
        ...

    def limits_mm(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """The travel limits ((x_lo, x_hi), (y_lo, y_hi)), mm."""
        ...

    def stop(self) -> None:
        """Stop any motion now."""
        ...


class StageExtras(Protocol):
    """What a run asks a stage (or a plate) beyond Stage/XYStage.  A stage class declares them by
    deriving from StageDefaults and overriding what it has; a stage with only the four methods gets
    the defaults (``extras_of``): it has a reference position, no native grid, a frame anywhere."""

    homed: bool  # whether the axis has a reference position (a Zaber axis after power-up has none)
    axis_name: str  # names the axis in messages: "device 3 axis 1"
    native_unit_mm: float  # one step of the axis, mm (0: continuous)

    def home_if_needed(self) -> bool:
        """Find the reference position when there is none (it may cross any position); True when it homed."""
        ...

    def run_scope(self, allowed_mm: Any) -> contextlib.AbstractContextManager[None]:
        """One run: the axis taken as it stands (moving or faulted: refused), every move rounded
        inside ``allowed_mm`` (travel and soft limits: (lo, hi), or a plate's ((x..), (y..))) until it ends."""
        ...

    def reachable(self, positions: tuple[float, ...]) -> tuple[tuple[float, ...], str | None]:
        """The positions this stage has frames at (a replay: its recorded slices), and a note when they differ."""
        ...


class StageDefaults:
    """StageExtras for a stage that has none of them; the backends derive from it."""

    homed, axis_name, native_unit_mm = True, "the focus axis", 0.0

    def home_if_needed(self) -> bool:
        return False

    def run_scope(self, allowed_mm: Any) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def reachable(self, positions: tuple[float, ...]) -> tuple[tuple[float, ...], str | None]:
        return positions, None


def extras_of(stage: Stage | XYStage) -> StageExtras:
    """The stage's own StageExtras when its class declares them (derives from StageDefaults), else the
    defaults: the one place a stage's kind is looked at, so that a four-method stage keeps working."""
    return stage if isinstance(stage, StageDefaults) else StageDefaults()


_PROTOCOLS = {"stage": "a Stage needs limits_mm(), position_mm(), move_to(z_mm) and stop()",
              "camera": "a Camera needs capture()",
              "plate": "an XYStage needs move_to(x_mm, y_mm), position_mm(), limits_mm() and stop()"}


def call_part(part: Any, what: str, method: str) -> Any:
    """``part.method()`` on a stage, camera or plate a caller gave, the way the readers below call
    it -- before anything moves.  A part without that method, or whose ``method`` is not callable or
    takes other arguments, is the caller's mistake: UsageError naming what is missing, not an
    AttributeError or TypeError from deep in a run.  (Errors raised inside the method are its own.)"""
    def called(value: Any) -> str:  # None, "a str", "an object"
        kind = type(value).__name__
        return "None" if value is None else f"{'an' if kind[:1].lower() in 'aeiou' else 'a'} {kind}"

    label = called(part)
    try:
        bound = getattr(part, method)
    except AttributeError as exc:
        if exc.__traceback__ is not None and exc.__traceback__.tb_next is not None:
            raise  # raised inside a property or __getattr__ of the part: its own error
        raise UsageError(f"the {what} ({label}) has no {method}() method: {_PROTOCOLS[what]} (see the Device "
                         "interfaces section); nothing was moved") from None
    if not callable(bound):
        shown = show_value(bound)
        raise UsageError(f"the {what}'s {method} is {called(bound) if chr(10) in shown else shown}, not callable: "
                         f"{_PROTOCOLS[what]} (methods, see the Device interfaces section); nothing was moved")
    try:
        return bound()
    except TypeError as exc:
        if exc.__traceback__ is not None and exc.__traceback__.tb_next is not None:
            raise  # raised inside the method
        raise UsageError(f"the {what}'s {method}() cannot be called without arguments ({exc}): "
                         f"{_PROTOCOLS[what]}; nothing was moved") from None


def stage_limits(stage: Stage) -> tuple[float, float]:
    """The stage's travel limits, checked before any use: two finite numbers of mm, lowest first
    (a NaN would pass every comparison of the plan check); StageError otherwise."""
    limits = call_part(stage, "stage", "limits_mm")
    try:
        lo, hi = limits
        usable = _is_number(lo) and _is_number(hi) and lo <= hi
    except (TypeError, ValueError):
        usable = False
    if not usable:
        raise StageError(f"the stage reports its travel limits as {show_value(limits)}, not two finite numbers of mm, "
                         "lowest first; nothing was moved: check the stage (its limits_mm())")
    return float(lo), float(hi)


def stage_position(stage: Stage) -> float:
    """Where the stage says it is, checked before any use: a finite number of mm; StageError otherwise."""
    z_mm = call_part(stage, "stage", "position_mm")
    if not _is_number(z_mm):
        raise StageError(f"the stage reports its position as {show_value(z_mm)}, not a finite number of mm; "
                         "nothing was moved: check the stage (its position_mm())")
    return float(z_mm)


def plate_limits(xy: XYStage) -> tuple[tuple[float, float], tuple[float, float]]:
    """The plate's travel limits, checked before any use: ((x_lo, x_hi), (y_lo, y_hi)), finite
    numbers of mm, lowest first; StageError otherwise."""
    limits = call_part(xy, "plate", "limits_mm")
    try:
        (x_lo, x_hi), (y_lo, y_hi) = limits
        usable = all(_is_number(v) for v in (x_lo, x_hi, y_lo, y_hi)) and x_lo <= x_hi and y_lo <= y_hi
    except (TypeError, ValueError):
        usable = False
    if not usable:
        raise StageError(f"the plate reports its travel limits as {show_value(limits)}, not ((x_lo, x_hi), (y_lo, "
                         "y_hi)) in finite mm, lowest first; nothing was moved: check the plate (its limits_mm())")
    return (float(x_lo), float(x_hi)), (float(y_lo), float(y_hi))


def plate_position(xy: XYStage) -> tuple[float, float]:
    """Where the plate says it is, checked before any use: (x, y), finite numbers of mm."""
    at = call_part(xy, "plate", "position_mm")
    try:
        x, y = at
        usable = _is_number(x) and _is_number(y)
    except (TypeError, ValueError):
        usable = False
    if not usable:
        raise StageError(f"the plate reports its position as {show_value(at)}, not (x, y) in finite mm; check the "
                         "plate (its position_mm())")
    return float(x), float(y)


###############################################################################
# Search ######################################################################
###############################################################################


def plan_positions(start_mm: float, end_mm: float, step_mm: float) -> list[float]:
    """START to END inclusive every STEP; END below START sweeps downward; END always included."""
    if not step_mm > 0:
        raise ValueError("step must be positive")
    direction = 1.0 if end_mm >= start_mm else -1.0
    span = abs(end_mm - start_mm)
    n = math.floor(span / step_mm + FLOAT_SLACK_RATIO)
    positions = [float(round(start_mm + direction * i * step_mm, POSITION_DECIMALS)) for i in range(n + 1)]
    end = float(round(end_mm, POSITION_DECIMALS))
    if abs(positions[-1] - end) > FLOAT_SLACK_MM:
        positions.append(end)
    else:
        positions[-1] = end
    return positions


FrameHook = Callable[[int, float, np.ndarray, float], None]


class PendingScore:
    """A frame's score to come (what ``Acquisition.measure`` returns): the frame goes to the scoring
    thread when the next exposure starts, or as soon as someone waits for its score."""

    def __init__(self, acq: Acquisition, job: tuple[int, float, np.ndarray, float, float]) -> None:
        self._acq = acq
        # The frame, dropped once handed over: a search may hold every PendingScore of its run.
        self.job: tuple[int, float, np.ndarray, float, float] | None = job
        self.future: concurrent.futures.Future[Sample] | None = None

    def result(self) -> Sample:
        """The frame's sample, once scored (the scoring thread's error, if it failed)."""
        if self.future is None:
            self._acq.flush()
        assert self.future is not None
        return self.future.result()


class Acquisition:
    """Moves, captures and scores, scoring frame k while frame k+1 is exposed.

    ``measure(z)`` returns a score to come; a search waits only for the scores it needs.  A frame
    is handed to the scoring thread when the next exposure starts, not when it was read out: the
    host's cores are then idle, while during the stage's round trips (the check after the exposure,
    the move, its arrival) a busy scoring thread would delay each reply.  At most IN_FLIGHT_FRAMES
    frames wait for scoring, so memory stays bounded.  ``samples`` always holds every frame scored
    so far, so a run that fails still has its partial curve (``drain`` scores what is pending).
    """

    def __init__(self, stage: Stage, camera: Camera, scorer: Scorer, *, settle_ms: float = 0.0,
                 backlash_mm: float = 0.0, direction: float = 1.0, coarse: bool = False, lights: bool = False,
                 on_frame: FrameHook | None = None) -> None:
        self.stage, self.camera, self.scorer = stage, camera, scorer
        self.settle_s = settle_ms / 1000.0
        self.backlash_mm = backlash_mm
        self.direction = direction
        self.coarse = coarse
        self.lights = lights  # measure each frame's mean level (``light_of``; the fast search's retake)
        self.on_frame = on_frame
        self.samples: list[Sample] = []
        self.scored: dict[float, Sample] = {}  # position -> its latest frame
        self.frame_of: dict[float, int] = {}  # position -> the capture index of that frame
        self._lights: dict[int, float] = {}  # capture index -> its frame's mean level (with ``lights``)
        self._taken: set[float] = set()  # positions measured or in flight
        self.moves = 0
        self.move_s = self.capture_s = self.score_s = 0.0
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(IN_FLIGHT_FRAMES)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="score")
        self._frame_index = 0
        self._first: np.ndarray | None = None  # the run's first frame: every frame has its size and type
        self._last_z: float | None = None
        self._failed: BaseException | None = None  # the scoring thread's first error (e.g. disk full)
        self._indices: list[int] = []  # frame index of each entry of samples
        self._dropped: set[int] = set()  # frames the stage's check found unvouched for (see move_to)
        self._frame_z = float("nan")  # where the last frame was captured
        self._pending: PendingScore | None = None  # the last frame, until the next exposure starts

    def approach(self, z_mm: float) -> float:
        """Move to z; with backlash, arrive from the sweep's direction (overshoot first).

        Returns the seconds it took, settling included."""
        t0 = time.perf_counter()
        try:
            coming_from_wrong_side = (
                self._last_z is not None and (z_mm - self._last_z) * self.direction < 0
            )
            if self.backlash_mm > 0 and (coming_from_wrong_side or self._last_z is None):
                self.move_to(round(z_mm - self.direction * self.backlash_mm, POSITION_DECIMALS))
            self.move_to(z_mm)
            self._last_z = z_mm
            if self.settle_s > 0:
                time.sleep(self.settle_s)
        finally:
            dt = time.perf_counter() - t0
            self.move_s += dt
        return dt

    @property
    def last_z(self) -> float | None:
        """The last position approached (None before the first)."""
        return self._last_z

    def move_to(self, z_mm: float) -> None:
        """One stage move, counted.  When the stage's check before the move finds that it was
        disturbed (``StageError.before_move``: moved, moving or flagged since it arrived), the frame
        exposed last is dropped from the curve: it may not have been exposed where it is labelled."""
        try:
            self.stage.move_to(z_mm)
        except StageError as exc:
            if exc.before_move:
                self._drop_last_frame(exc)
            raise
        self.moves += 1

    def _drop_last_frame(self, exc: StageError) -> None:
        with self._lock:
            index = self._frame_index - 1
            if index < 0 or index in self._dropped:
                return
            self._dropped.add(index)  # not scored yet: it never will be listed (see _score)
            if self._indices and self._indices[-1] == index:
                self._indices.pop()
                dropped = self.samples.pop()
                # What it replaced at its position (a frame taken again) counts again, if any.
                self.scored.pop(dropped.z_mm, None)
                self.frame_of.pop(dropped.z_mm, None)
                for sample, k in zip(reversed(self.samples), reversed(self._indices)):
                    if sample.z_mm == dropped.z_mm:
                        self.scored[sample.z_mm], self.frame_of[sample.z_mm] = sample, k
                        break
        exc.extend(f" (the frame at z={self._frame_z:.4f} mm, exposed just before, was dropped from the curve: "
                   "the stage may not have stood there)")

    def measure(self, z_mm: float) -> PendingScore:
        """Move to z, capture a frame; the frame before it is scored while this one is exposed."""
        if self._failed is not None:  # a frame already failed (its hook could not save it): stop here
            raise self._failed
        if not self._slots.acquire(blocking=False):  # every slot taken: the pending frame frees one
            self.flush()
            self._slots.acquire()
        try:
            move_dt = self.approach(z_mm)
            self.flush()
            t0 = time.perf_counter()
            try:
                frame = self.camera.capture()
            finally:
                capture_dt = time.perf_counter() - t0
                self.capture_s += capture_dt
            check_frame(frame, z_mm, self._first)
            if self._first is None:
                if self.scorer.roi is not None:
                    check_roi(self.scorer.roi, frame.shape)  # the frame size is known only now
                self._first = frame  # every later frame must be like it
        except BaseException:
            self._slots.release()
            raise
        index = self._frame_index
        self._frame_index += 1
        self._taken.add(z_mm)
        self._frame_z = z_mm
        self._pending = PendingScore(self, (index, z_mm, frame, move_dt, capture_dt))
        return self._pending

    def flush(self) -> None:
        """Hand the pending frame, if any, to the scoring thread."""
        pending, self._pending = self._pending, None
        if pending is not None and pending.job is not None:
            pending.future = self._pool.submit(self._score, *pending.job)
            pending.job = None  # the scoring thread holds the frame until it is scored, then nobody

    def measure_all(self, positions: Sequence[float]) -> None:
        """Measure every position not measured yet, all in flight before waiting for any, in the
        sweep's direction (no backlash overshoot between them)."""
        self.retake([z for z in positions if z not in self._taken])

    def retake(self, positions: Sequence[float]) -> None:
        """Measure these positions (again, where measured before), all in flight before waiting for
        any, in the sweep's direction.  Earlier frames stay in ``samples`` (the curve keeps everything
        measured); ``scored`` and the decision (``by_z``) use the new ones."""
        todo = sorted(set(positions), key=lambda z: z * self.direction)
        for f in [self.measure(z) for z in todo]:
            f.result()

    def light_of(self, z_mm: float) -> float:
        """The mean level of the frame ``scored`` holds for z (nan without ``lights``)."""
        return self._lights[self.frame_of[z_mm]]

    def _score(self, index: int, z_mm: float, frame: np.ndarray, move_dt: float, capture_dt: float) -> Sample:
        try:
            t0 = time.perf_counter()
            score, coarse = self.scorer.scores(frame, self.coarse)  # check_frame has checked it
            # The frame's mean level, for the fast search: defocus keeps it (within ~0.3 % over a few
            # depths of field), a drifting lamp does not.  Every pixel: a sparse sample aliases texture.
            light = float(np.mean(frame, dtype=np.float64)) if self.lights else math.nan
            dt = time.perf_counter() - t0
            sample = Sample(z_mm, score, coarse)
            with self._lock:
                self.score_s += dt
                if index in self._dropped:
                    return sample
                self.samples.append(sample)
                self.scored[z_mm] = sample
                self.frame_of[z_mm] = index
                self._lights[index] = light
                self._indices.append(index)
            log.info("frame %d: z=%.4f mm score=%.6g (move %.1f ms, capture %.1f ms, score %.1f ms)",
                     index, z_mm, score, move_dt * 1e3, capture_dt * 1e3, dt * 1e3)
            if self.on_frame is not None:
                self.on_frame(index, z_mm, frame, score)
            return sample
        except BaseException as exc:
            self._failed = self._failed or exc
            raise
        finally:
            self._slots.release()

    def drain(self) -> None:
        """Wait for every frame in flight to be scored (errors are the caller's to read); more
        frames may be measured afterwards."""
        self.flush()
        self._pool.shutdown(wait=True)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="score")

    def timing(self) -> Timing:
        """Totals so far."""
        return Timing(self.move_s, self.capture_s, self.score_s)


def check_frame(frame: Any, z_mm: float, first: np.ndarray | None = None) -> None:
    """Reject frames that cannot be scored (``frame_problem``), that differ in size or type from
    the run's ``first`` frame (a region of interest would score another part of them), or that
    cannot carry focus information: all black or all saturated."""
    if (problem := frame_problem(frame)) is not None:
        raise CameraError(f"the camera delivered {problem} at z={z_mm:.4f} mm; check the camera (its connection, "
                          "its capture())")
    if first is not None and (frame.shape, frame.dtype) != (first.shape, first.dtype):
        raise CameraError(f"the frame at z={z_mm:.4f} mm is {'x'.join(map(str, frame.shape))} {frame.dtype}, the "
                          f"run's first was {'x'.join(map(str, first.shape))} {first.dtype}: the camera changed its "
                          "format during the run (another program, or its capture())")
    if frame.dtype.kind == "f" and not np.isfinite(frame).all():
        raise CameraError(f"frame at z={z_mm:.4f} mm has non-finite pixels (NaN or infinity); no score can be "
                          "computed from it")
    lo, hi = float(frame.min()), float(frame.max())
    if hi <= 0:
        raise CameraError(f"frame at z={z_mm:.4f} mm is all black; check the light source, shutter and exposure")
    if np.issubdtype(frame.dtype, np.integer) and lo >= np.iinfo(frame.dtype).max:
        raise CameraError(f"frame at z={z_mm:.4f} mm is fully saturated; lower the exposure or the light")


Conclude = Callable[[], "Decision"]  # the decision on every frame so far (measuring what it asks for first)


def sweep_search(acq: Acquisition, positions: Sequence[float], conclude: Conclude) -> None:
    """The card's exhaustive search: one frame at every position, in order."""
    for f in [acq.measure(z) for z in positions]:
        f.result()


def fast_search(acq: Acquisition, positions: Sequence[float], conclude: Conclude) -> None:
    """Coarse-to-fine search on the STEP grid, reusing every frame it takes.

    1. Coarse pass: every few grid positions (and the last), each frame also scored on a copy binned
       COARSE_FACTOR times: far from focus the full score sinks into its noise while the coarse one
       still rises toward focus.
    2. Prediction: a peak fitted through the best coarse frame and its neighbours; that position and
       FIT_REACH neighbours each side are measured together.
    3. Refinement: hill-climb on the full score until the best frame of the run has both grid
       neighbours measured and lower; ``conclude`` measures what the decision needs.
    No peak at either scale: the spacing is halved and the peak sought again, down to a sweep.  Once
    there is one, a frame of its fit window much older than the others, whose light level has
    changed since (a drifting lamp), is taken again (``Acquisition.retake``).
    4. A peak the grid cannot place: the two positions half a STEP either side of the best frame
       (``half_steps``).
    Grids shorter than MIN_FAST_POSITIONS are swept (then step 4).
    """
    n = len(positions)
    if n < MIN_FAST_POSITIONS:
        sweep_search(acq, positions, conclude)
        half_steps(acq, positions, conclude())
        return
    # Coarse spacing: COARSE_FACTOR STEPs on long grids, closer on short ones, so that the coarse
    # pass has at least ~10 frames: enough for a noise estimate and a bracket around the peak.
    spacing = max(2, min(COARSE_FACTOR, n // 10))
    index = {z: i for i, z in enumerate(positions)}

    def ensure(indices: list[int]) -> None:
        acq.measure_all([positions[i] for i in indices])

    def score(i: int) -> float:
        return acq.scored[positions[i]].score

    def best_index() -> int:  # the grid index of the run's best frame so far
        return index[best_sample(list(acq.scored.values())).z_mm]

    while True:
        coarse_idx = list(range(0, n, spacing))
        if coarse_idx[-1] != n - 1:
            coarse_idx.append(n - 1)
        ensure(coarse_idx)
        coarse_samples = [Sample(positions[i], acq.scored[positions[i]].coarse or 0.0) for i in coarse_idx]
        top = max(range(len(coarse_idx)), key=lambda k: coarse_samples[k].score)
        guess = coarse_idx[top]
        if 0 < top < len(coarse_idx) - 1:
            fit = fit_peak(coarse_samples[top - 1: top + 2])
            if fit.used and fit.z_mm is not None:
                step = positions[1] - positions[0]
                guess = min(max(int(round((fit.z_mm - positions[0]) / step)), 0), n - 1)
        current = guess
        # The prediction and two grid neighbours on each side, in one go (in flight together, so
        # close in time: a drifting lamp changes them alike); the fit needs them where the peak
        # is wide enough to reach them, and the climb starts from them.
        ensure([j for j in range(guess - FIT_REACH, guess + FIT_REACH + 1) if 0 <= j < n])
        for _ in range(2 * spacing + CLIMB_EXTRA_STEPS):
            neighbours = [j for j in (current - 1, current + 1) if 0 <= j < n]
            ensure([current, *neighbours])
            if all(score(j) < score(current) for j in neighbours):
                # A local maximum; but the best frame of the run may lie elsewhere (a coarse frame
                # the prediction passed by): refine there too, so the answer is never unrefined.
                overall = best_index()
                if overall == current:
                    break
                current = overall
            else:
                current = max(neighbours, key=score)
        # A peak narrower than the spacing (high NA, STEP ~ one depth of field), or too weak for
        # this many frames, leaves the verdict at no_peak: halve the spacing and look again, down
        # to the full grid.  A blank field costs a sweep's frames; a missed focus would cost more.
        if conclude().verdict.kind != "no_peak":
            break
        if spacing == 1:
            return
        spacing = max(1, spacing // 2)
    # The frames the fit will use (the best one and FIT_REACH grid neighbours each side) should see
    # the same light: a coarse-pass frame among them was taken many frames earlier, and a lamp that
    # drifted since moves the score by more than the fit's noise.  Such a frame is taken again when
    # its mean level differs from the newest frame's (only once there is a peak to fit).
    for _ in range(FIT_REACH):  # a frame taken again may make another the best: its window then
        best = best_index()
        window = [positions[j] for j in range(best - FIT_REACH, best + FIT_REACH + 1)
                  if 0 <= j < n and positions[j] in acq.scored]
        newest = max(window, key=lambda z: acq.frame_of[z])
        light = acq.light_of(newest)
        stale = [z for z in window if acq.frame_of[newest] - acq.frame_of[z] > STALE_FRAMES
                 and abs(acq.light_of(z) - light) > LAMP_TOLERANCE * abs(light)]
        if not stale:
            break
        acq.retake(stale)
    half_steps(acq, positions, conclude())


def half_steps(acq: Acquisition, positions: Sequence[float], decision: Decision) -> None:
    """The fast search's last frames: those the decision asks for half a STEP either side of a peak
    the grid cannot place (``Decision.finer_mm``), where the stage can go (a replay: its recorded
    slices), in its native units and at least MIN_STEP_NATIVE of them from the grid.  They refine
    the fitted position only; the verdict stays the grid's."""
    extras = extras_of(acq.stage)
    unit = extras.native_unit_mm
    grid = sorted(positions)

    def off_grid_mm(z: float) -> float:
        return abs(_on_grid(grid, z) - z)

    halves = []
    for z in decision.finer_mm:
        if unit > 0:
            if off_grid_mm(z) < MIN_STEP_NATIVE * unit * (1 - FLOAT_SLACK_RATIO):
                continue
            z = round(z / unit) * unit
        halves.append(round(z, POSITION_DECIMALS))
    reachable, _ = extras.reachable(tuple(halves))
    # A recorded slice that decide() would count as a grid position's frame (``_grid_tolerance``) is not one.
    acq.measure_all([z for z in reachable if z not in acq.scored and off_grid_mm(z) > _grid_tolerance(grid)])


SEARCHES: dict[Search, Callable[[Acquisition, Sequence[float], Conclude], None]] = {
    "sweep": sweep_search,
    "fast": fast_search,
}


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a run will do, checked against the limits before anything moves."""

    positions: tuple[float, ...]
    search: Search = "sweep"
    backlash_mm: float = 0.0
    settle_ms: float = 0.0
    peak: PeakPolicy = "sharpest"  # which of several significant peaks (PEAK_CHOICES)
    depth_of_field_um: float | None = None  # --objective's: names the STEP to use in the reasons
    allowed_mm: tuple[float, float] | None = None  # travel and soft limits: a suggested range stays inside
    notes: tuple[str, ...] = ()  # said with the result (a replay grid snapped to the recorded slices)

    @property
    def direction(self) -> float:
        """+1 for an upward sweep, -1 for a downward one."""
        return 1.0 if self.positions[-1] >= self.positions[0] else -1.0

    def envelope_mm(self) -> tuple[float, float]:
        """Every position the run may command: the range, widened by the backlash overshoot."""
        lo, hi = min(self.positions), max(self.positions)
        if self.backlash_mm > 0:
            if self.direction > 0:
                lo -= self.backlash_mm
            else:
                hi += self.backlash_mm
        return round(lo, POSITION_DECIMALS), round(hi, POSITION_DECIMALS)


def check_plan(plan: Plan, limits_mm: tuple[float, float], soft_mm: tuple[float | None, float | None]) -> None:
    """Raise UsageError unless every position the plan may command lies inside both limits."""
    lo, hi = plan.envelope_mm()
    travel_lo, travel_hi = limits_mm
    soft_lo, soft_hi = soft_mm
    allowed_lo = travel_lo if soft_lo is None else max(travel_lo, soft_lo)
    allowed_hi = travel_hi if soft_hi is None else min(travel_hi, soft_hi)
    what = "range" if plan.backlash_mm <= 0 else "range with its backlash overshoot"
    if lo < allowed_lo - FLOAT_SLACK_MM or hi > allowed_hi + FLOAT_SLACK_MM:
        raise UsageError(
            f"the {what} {lo:g}..{hi:g} mm leaves the allowed interval {allowed_lo:g}..{allowed_hi:g} mm "
            f"(travel {travel_lo:g}..{travel_hi:g} mm"
            + (f", soft limits {soft_lo if soft_lo is not None else '-'}..{soft_hi if soft_hi is not None else '-'} mm"
               if soft_lo is not None or soft_hi is not None else "")
            + "); choose a range inside it"
        )


def run_autofocus(stage: Stage, camera: Camera, scorer: Scorer, plan: Plan, *,
                  on_frame: FrameHook | None = None, return_to_start: bool = True,
                  soft_mm: tuple[float | None, float | None] = (None, None)) -> FocusResult:
    """Search, decide, and send the stage to the answer (or back to where it started).

    Faults and Ctrl-C make the stage safe (``make_safe``) and raise the tool's own exception with the
    partial curve (``as_run_failure``).  There is no start to go back to when ``return_to_start`` is
    False (the axis was homed for this run) or the start lies outside the soft limits ``soft_mm``:
    then no_peak leaves the stage where the last frame was taken, inside the range, and a fault only
    stops it.
    """
    t0 = time.perf_counter()
    start_mm = stage_position(stage)
    soft_lo, soft_hi = soft_mm
    inside = (soft_lo is None or start_mm >= soft_lo - FLOAT_SLACK_MM) and (soft_hi is None or start_mm <= soft_hi + FLOAT_SLACK_MM)
    origin_mm = start_mm if return_to_start and inside else None
    acq = Acquisition(stage, camera, scorer, settle_ms=plan.settle_ms, backlash_mm=plan.backlash_mm,
                      direction=plan.direction, coarse=True, lights=plan.search == "fast",
                      on_frame=on_frame)
    allowed = plan.allowed_mm or stage.limits_mm()

    def conclude() -> Decision:
        """The decision on every frame so far, after measuring the positions it asks for."""
        while True:
            decision = decide(list(acq.samples), plan.positions, peak=plan.peak, start_mm=start_mm,
                              transparent=scorer.invert, depth_of_field_um=plan.depth_of_field_um,
                              allowed_mm=allowed)
            if not decision.more_mm:
                return decision
            acq.measure_all(decision.more_mm)

    def result(samples: Sequence[Sample], target: float, decision: Decision) -> FocusResult:
        best = decision.best or Sample(float("nan"), float("nan"))
        return FocusResult(plan.search, scorer.metric, tuple(samples), best.z_mm, best.score, decision.fit,
                           decision.verdict, target, start_mm, acq.moves, time.perf_counter() - t0, acq.timing(),
                           scorer.invert, decision.peaks, decision.dips, decision.uncertainty_mm,
                           plan.notes + decision.notes)

    try:
        try:
            SEARCHES[plan.search](acq, plan.positions, conclude)
            decision = conclude()
        finally:
            acq.drain()
        if decision.target_mm is None:
            # Never to a noise maximum: back to where the user left it -- or, with no start to go back
            # to, stay at the last frame (a move of length zero, so that it is checked like any other).
            target = start_mm if origin_mm is not None or acq.last_z is None else acq.last_z
            acq.move_to(target)
        else:
            target = decision.target_mm
            acq.approach(target)
        return result(list(acq.samples), target, decision)
    except BaseException as exc:  # faults, Ctrl-C, and bugs alike: the stage is made safe first
        where = make_safe(stage, origin_mm, exc)  # a second Ctrl-C may interrupt the return: it re-stops
        with INTERRUPTS.held():  # from here on nothing may lose the partial curve
            samples = list(acq.samples)
            verdict = Verdict("no_peak", float("nan"), float("nan"), float("nan"), "run did not finish")
            fit = fit_peak(samples) if samples else PeakFit(None, False, "no samples")
            best = best_sample(samples) if samples else None
            failure = as_run_failure(exc, result(samples, float("nan"), Decision(verdict, fit, best, None, None)),
                                     where)
            if failure is exc:
                raise
            raise failure from exc


def make_safe(stage: Stage, start_mm: float | None, cause: BaseException | None = None) -> str:
    """Stop the axis and send it back to where it started; say where it is now.

    After an event the tool did not cause -- a StageError that may not move: the axis was moved or
    stopped from outside, or it faulted -- nothing is commanded at all.  Only the tool's own reasons
    (Ctrl-C, its own time-out, a camera or disk fault, a bug) stop and return.  ``start_mm`` None:
    no start to go back to (homed for this run, or outside the soft limits); the axis is only stopped.
    A stop that fails does not end the clean-up: the original fault is reported, the return still tried."""
    if isinstance(cause, StageError) and not cause.may_move:
        try:
            return f"nothing more was moved; the stage is at {stage.position_mm():.4f} mm"
        except (Exception, KeyboardInterrupt):  # noqa: BLE001 - a custom Stage's own error too
            return "nothing more was moved; the stage position is unknown (it no longer answers)"
    stop_note = ""
    try:
        stage.stop()
    except KeyboardInterrupt:  # a second Ctrl-C: the axis may still be moving
        return stop_and_locate(stage, "the stop was interrupted")
    except Exception as exc:  # noqa: BLE001 - the cause is what is reported; the return is still tried
        log.debug("making the stage safe: the stop failed: %s", exc)
        stop_note = f"stopping it failed ({first_line(exc)}); "
    if start_mm is None:
        try:
            where = f"the stage is at {stage.position_mm():.4f} mm"
        except (Exception, KeyboardInterrupt):  # noqa: BLE001
            where = "the stage position is unknown"
        return (f"{stop_note}stopped; {where} (not returned: the axis was homed for this run, or where it started "
                "lies outside --z-min/--z-max)")
    try:
        stage.move_to(start_mm)
    except KeyboardInterrupt:  # a second Ctrl-C: the axis may still be moving
        return stop_and_locate(stage, f"the return to {start_mm:.4f} mm was interrupted")
    except Exception as exc:  # noqa: BLE001
        log.debug("making the stage safe: the return failed: %s", exc)
        try:
            return (f"{stop_note}stage stopped at {stage.position_mm():.4f} mm (could not return to "
                    f"{start_mm:.4f} mm: {first_line(exc)})")
        except (Exception, KeyboardInterrupt):  # noqa: BLE001
            return f"{stop_note}stage position unknown (it no longer answers); check it before the next run"
    return f"{stop_note}stage returned to its start, {start_mm:.4f} mm"


def stop_and_locate(stage: Stage, what: str) -> str:
    """Send ``stop`` again (a further Ctrl-C cannot skip it: STOP_ATTEMPTS tries), then say
    where the stage reports it is -- never a position read while it may still be moving."""
    for _ in range(STOP_ATTEMPTS):
        try:
            stage.stop()
            break
        except KeyboardInterrupt:
            continue
        except AutofocusError as exc:
            return f"{what}; stopping it failed ({first_line(exc)}): check the stage before the next run"
    else:
        return f"{what}; the stop could not be confirmed: check the stage before the next run"
    for _ in range(STOP_ATTEMPTS):
        try:
            return f"{what}; stop sent again, the stage reports {stage.position_mm():.4f} mm"
        except KeyboardInterrupt:
            continue
        except AutofocusError:
            break
    return f"{what}; stop sent again, the stage position is unknown: check it before the next run"


def check_home_consent(home: bool | None, z_min: float | None, z_max: float | None, axis: str) -> None:
    """Homing crosses positions --z-min/--z-max may forbid: refuse it unless it is allowed
    (``home``: True allowed, False never, None only without a soft limit)."""
    if home is False:
        raise UsageError(f"{axis} has no reference position (not homed) and --no-home forbids homing: home it "
                         "yourself (e.g. in Zaber Launcher) once the path to the home sensor is clear; nothing moved")
    soft = [name for name, v in (("--z-min", z_min), ("--z-max", z_max)) if v is not None]
    if soft and home is not True:
        raise UsageError(f"{axis} has no reference position and must be homed, but homing drives to the home sensor "
                         f"(toward position 0, the low end of the travel) through positions {'/'.join(soft)} may "
                         "forbid: check that the objective's path is clear, then pass --home (or home the stage "
                         "yourself); nothing moved")


###############################################################################
# Image files #################################################################
###############################################################################

# Every image format this OpenCV build can decode is recognised by its signature, as OpenCV's
# decoders recognise it (by content, not by extension), and its size is read from its header before
# anything is decoded: a 69-byte PNG may declare 50000x50000 pixels (a decompression bomb).  A
# format whose size cannot be read cheaply (AVIF, OpenEXR, ...) is refused.  (OpenCV's own limit,
# OPENCV_IO_MAX_IMAGE_PIXELS, is read when cv2 is loaded: too late if a script imported cv2 first.)
# The readers walk at most MAX_HEADER_STEPS segments, boxes or blocks, reading only those parts.
HEADER_FORMATS = "PNG, TIFF, JPEG, BMP, WebP, JPEG 2000, GIF, PNM/PAM/PFM, Sun raster, Radiance HDR"
MAX_HEADER_STEPS = 4096  # a real file has a few dozen segments before its size (JPEG's ICC profile: 255 at most)

ImageBytes = Any  # bytes, or a _FileBytes: what the header readers index (data[a:b], len(data))


class _FileBytes:
    """An image file's bytes as the header readers index them (``data[a:b]``, ``len(data)``), read
    from the file in blocks only where a reader looks: a header check of a file of any size reads a
    few KiB (a TIFF's directory may lie at its end, a JPEG's frame header behind large segments).
    ``verify`` then checks the whole file, read afterwards, against every block the check saw."""

    BLOCK = 4096

    def __init__(self, file: Any, size: int) -> None:
        self._file, self._size = file, size
        self._blocks: dict[int, bytes] = {}

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, key: slice) -> bytes:
        start, stop, _ = key.indices(self._size)
        if stop <= start:
            return b""
        first, last = start // self.BLOCK, (stop - 1) // self.BLOCK
        missing = [i for i in range(first, last + 1) if i not in self._blocks]
        if missing:  # one read for the blocks missing, from the first to the last of them
            self._file.seek(missing[0] * self.BLOCK)
            chunk = self._file.read((missing[-1] - missing[0] + 1) * self.BLOCK)
            for i in range(missing[0], missing[-1] + 1):
                at = (i - missing[0]) * self.BLOCK
                self._blocks.setdefault(i, chunk[at: at + self.BLOCK])
        joined = b"".join(self._blocks[i] for i in range(first, last + 1))
        return joined[start - first * self.BLOCK: stop - first * self.BLOCK]

    def verify(self, data: bytes) -> bool:
        """Whether ``data`` (the whole file) holds every byte the header check read."""
        return all(data[i * self.BLOCK: (i + 1) * self.BLOCK] == block for i, block in self._blocks.items())


def _steps(what: str) -> Iterator[int]:
    """A header reader's walk: MAX_HEADER_STEPS steps, then ValueError (a damaged or hostile file)."""
    yield from range(MAX_HEADER_STEPS)
    raise ValueError(f"its {what} runs on for more than {MAX_HEADER_STEPS} segments before giving its size")


def _bytes(data: ImageBytes, at: int, size: int) -> bytes:
    """``size`` bytes at ``at``; ValueError past the end of the data."""
    chunk = data[at: at + size] if at >= 0 else b""
    if len(chunk) != size:
        raise ValueError("the header is cut short")
    return chunk


def _uint(data: ImageBytes, at: int, size: int, order: str = "big") -> int:
    """An unsigned integer of ``size`` bytes at ``at``; ValueError past the end of the data."""
    return int.from_bytes(_bytes(data, at, size), order)  # type: ignore[arg-type]


def _tiff_size(data: ImageBytes) -> tuple[int, int, int | None]:
    """TIFF or BigTIFF: width, length and samples per pixel of the first image (the one OpenCV
    decodes); where a tag is repeated, the largest value counts."""
    order = "little" if data[:2] == b"II" else "big"
    big = _uint(data, 2, 2, order) == 43
    at = _uint(data, 8, 8, order) if big else _uint(data, 4, 4, order)
    count = _uint(data, at, 8 if big else 2, order)
    at += 8 if big else 2
    entry, value_at = (20, 12) if big else (12, 8)
    sizes = {3: 2, 4: 4, 16: 8}  # SHORT, LONG, LONG8
    table = _bytes(data, at, min(count, MAX_HEADER_STEPS) * entry)  # the directory: one read
    tags: dict[int, int] = {}
    for e in range(0, len(table), entry):
        tag, kind = _uint(table, e, 2, order), _uint(table, e + 2, 2, order)
        if tag in (256, 257, 277) and kind in sizes:  # ImageWidth, ImageLength, SamplesPerPixel
            tags[tag] = max(tags.get(tag, 0), _uint(table, e + value_at, sizes[kind], order))
    if 256 not in tags or 257 not in tags:
        raise ValueError("its first TIFF directory gives no width or height")
    return tags[256], tags[257], tags.get(277, 1)


# JPEG frame headers (SOFn): every C0..CF marker except DHT (C4), JPG (C8) and DAC (CC).
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_size(data: ImageBytes) -> tuple[int, int, int | None]:
    """JPEG: the frame header (SOFn), found by walking the marker segments as libjpeg does;
    anything a strict reader would not accept (bytes between segments, no frame header before the
    scan, a height of 0 to be given later by a DNL marker) is refused."""
    at = 2
    for _ in _steps("JPEG header"):
        run = data[at: at + 256]  # a marker: fill bytes (FF) and its code
        fill = len(run) - len(run.lstrip(b"\xff"))
        if not fill or fill == len(run):  # no marker here, or a run of fill bytes no encoder writes
            raise ValueError("its JPEG markers are damaged" if at + len(run) < len(data) else "the header is cut short")
        marker = run[fill]
        at += fill + 1
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # TEM, RSTn: no length
            continue
        if marker in (0xD9, 0xDA):  # EOI or the scan itself before any frame header
            raise ValueError("the JPEG has no frame header before its image data")
        if marker in _JPEG_SOF:
            height, width, components = _uint(data, at + 3, 2), _uint(data, at + 5, 2), _uint(data, at + 7, 1)
            if height == 0:
                raise ValueError("the JPEG leaves its height to a later DNL marker")
            return width, height, components
        at += _uint(data, at, 2)
    raise AssertionError("unreachable")


def _jp2_size(data: ImageBytes) -> tuple[int, int, int | None]:
    """JPEG 2000: a raw codestream's SIZ marker, or a JP2 file's image header box (ihdr) and the
    SIZ of its codestream box (jp2c): the larger of the two, since the decoder reads the latter."""
    def siz(at: int) -> tuple[int, int, int]:
        if data[at: at + 4] != b"\xff\x4f\xff\x51":
            raise ValueError("the JPEG 2000 codestream does not start with SOC, SIZ")
        return (_uint(data, at + 8, 4) - _uint(data, at + 16, 4), _uint(data, at + 12, 4) - _uint(data, at + 20, 4),
                _uint(data, at + 40, 2))

    if data[:4] == b"\xff\x4f\xff\x51":
        return siz(0)
    found: list[tuple[int, int, int]] = []
    steps = _steps("JPEG 2000 header")

    def boxes(start: int, end: int) -> Iterator[tuple[bytes, int, int]]:
        at = start
        while at + 8 <= end and next(steps) >= 0:
            length, kind, body = _uint(data, at, 4), data[at + 4: at + 8], at + 8
            if length == 1:
                length, body = _uint(data, at + 8, 8), at + 16
            elif length == 0:
                length = end - at
            if length < body - at or at + length > end:
                raise ValueError("a JPEG 2000 box runs past the end of the file")
            yield kind, body, at + length
            at += length

    codestreams = 0
    for kind, body, end in boxes(0, len(data)):
        if kind == b"jp2h":
            for inner, inner_body, _ in boxes(body, end):
                if inner == b"ihdr":
                    found.append((_uint(data, inner_body + 4, 4), _uint(data, inner_body, 4),
                                  _uint(data, inner_body + 8, 2)))
        elif kind == b"jp2c":
            found.append(siz(body))
            codestreams += 1
    if not codestreams:
        raise ValueError("the JP2 file has no codestream")
    return max(w for w, _, _ in found), max(h for _, h, _ in found), max(c for _, _, c in found)


def _netpbm_size(data: ImageBytes) -> tuple[int, int, int | None]:
    """PBM/PGM/PPM (P1-P6), PFM (PF, Pf): width and height after the magic, comments skipped;
    PAM (P7): its WIDTH, HEIGHT and DEPTH lines."""
    head = data[:4096]
    if head[:2] == b"P7":
        fields = dict(line.split(None, 1) for line in head.split(b"\n")[1:] if b" " in line.strip())
        try:
            return int(fields[b"WIDTH"]), int(fields[b"HEIGHT"]), int(fields.get(b"DEPTH", b"1"))
        except (KeyError, ValueError):
            raise ValueError("its PAM header gives no WIDTH or HEIGHT") from None
    text = re.sub(rb"#[^\n]*", b" ", head[2:])
    tokens = text.split()
    try:
        return int(tokens[0]), int(tokens[1]), None
    except (IndexError, ValueError):
        raise ValueError("its PNM header gives no width or height") from None


def _hdr_size(data: ImageBytes) -> tuple[int, int, int | None]:
    """Radiance HDR: the resolution line after the header's blank line (only the standard
    "-Y rows +X columns" orientation, the one OpenCV reads)."""
    head = data[:65536]
    end = head.find(b"\n\n")
    match = re.match(rb"-Y (\d+) \+X (\d+)\n", head[end + 2: end + 64]) if end >= 0 else None
    if match is None:
        raise ValueError("its Radiance header has no -Y ROWS +X COLUMNS line")
    return int(match.group(2)), int(match.group(1)), 3


def _webp_size(data: ImageBytes) -> tuple[int, int, int | None]:
    """WebP: the canvas (VP8X) or the frame size of a lossy (VP8) or lossless (VP8L) image."""
    chunk = data[12:16]
    if chunk == b"VP8X":
        return _uint(data, 24, 3, "little") + 1, _uint(data, 27, 3, "little") + 1, None
    if chunk == b"VP8L":
        bits = _uint(data, 21, 4, "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1, None
    if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
        return _uint(data, 26, 2, "little") & 0x3FFF, _uint(data, 28, 2, "little") & 0x3FFF, None
    raise ValueError("its WebP header is not one of VP8, VP8L or VP8X")


def _bmp_size(data: ImageBytes) -> tuple[int, int, int | None]:
    """BMP: the info header (BITMAPCOREHEADER or a later one; a negative height is top-down)."""
    if _uint(data, 14, 4, "little") == 12:
        return _uint(data, 18, 2, "little"), _uint(data, 20, 2, "little"), None
    width, height = (int.from_bytes(_bytes(data, at, 4), "little", signed=True) for at in (18, 22))
    return abs(width), abs(height), None


def _gif_size(data: ImageBytes) -> tuple[int, int, int | None]:
    """GIF: the logical screen, or the first image where it reaches beyond the screen (the image a
    decoder reads and allocates)."""
    width, height, flags = _uint(data, 6, 2, "little"), _uint(data, 8, 2, "little"), _uint(data, 10, 1)
    at = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)  # after the global colour table
    steps = _steps("GIF header")
    while _uint(data, at, 1) == 0x21 and next(steps) >= 0:  # extensions (graphic control, comments...)
        at += 2
        while (size := _uint(data, at, 1)) != 0 and next(steps) >= 0:  # their sub-blocks, skipped
            at += size + 1
        at += 1
    if _uint(data, at, 1) != 0x2C:
        raise ValueError("the GIF has no image descriptor")
    left, top = _uint(data, at + 1, 2, "little"), _uint(data, at + 3, 2, "little")
    w, h = _uint(data, at + 5, 2, "little"), _uint(data, at + 7, 2, "little")
    return max(width, left + w), max(height, top + h), None


def _starts(*magics: bytes) -> Callable[[ImageBytes], bool]:
    """A signature test: the data starts with one of ``magics``."""
    return lambda d: any(d[:len(m)] == m for m in magics)


def _sizes_at(width_at: int, height_at: int) -> Callable[[ImageBytes], tuple[int, int, int | None]]:
    """A size reader for a header with width and height as 32-bit big-endian numbers at fixed places."""
    return lambda d: (_uint(d, width_at, 4), _uint(d, height_at, 4), None)


# (name, signature test, size reader) in the order OpenCV's decoders are tried.
_IMAGE_FORMATS: tuple[tuple[str, Callable[[ImageBytes], bool],
                            Callable[[ImageBytes], tuple[int, int, int | None]]], ...] = (
    ("BMP", _starts(b"BM"), _bmp_size),
    ("Radiance HDR", _starts(b"#?RGBE", b"#?RADIANCE"), _hdr_size),
    ("JPEG", _starts(b"\xff\xd8\xff"), _jpeg_size),
    ("WebP", lambda d: d[:4] == b"RIFF" and d[8:12] == b"WEBP", _webp_size),
    ("Sun raster", _starts(b"\x59\xa6\x6a\x95"), _sizes_at(4, 8)),
    ("PNM", lambda d: d[:1] == b"P" and d[1:2] in (*(b"%d" % i for i in range(1, 8)), b"F", b"f")
     and d[2:3].isspace(), _netpbm_size),  # PBM/PGM/PPM, PAM (P7) and PFM (PF, Pf)
    ("TIFF", _starts(b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"), _tiff_size),
    ("PNG", lambda d: d[:8] == b"\x89PNG\r\n\x1a\n" and d[12:16] == b"IHDR", _sizes_at(16, 20)),
    ("JPEG 2000", _starts(b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\xff\x4f\xff\x51"), _jp2_size),
    ("GIF", _starts(b"GIF87a", b"GIF89a"), _gif_size),
)


def image_header(data: ImageBytes) -> tuple[str, int, int, int | None]:
    """(format, width, height, samples per pixel or None) of an image file's bytes (or a
    ``_FileBytes``), from its header alone.  ValueError for a format it does not know (see
    HEADER_FORMATS) or a header that does not say."""
    for name, matches, size in _IMAGE_FORMATS:
        if matches(data):
            return (name, *size(data))
    raise ValueError(f"not one of the formats whose size can be checked before decoding ({HEADER_FORMATS}); "
                     "convert it to PNG or TIFF")


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (libpng and libtiff write there directly, bypassing OpenCV's
    logger).  Only around a decode in the main thread, before a run starts."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)


def read_image(path: Path, what: str) -> np.ndarray:
    """Decode one replay image after checking its header; StackError (one line) for a file
    too large, truncated, of an unsupported format, type or channel count, or with non-finite pixels.
    The whole file is read and decoded from memory only once its header passes: OpenCV is never given
    a path (its Python binding crashes on a file name that is not valid UTF-8, and on Windows it
    cannot open non-ASCII paths), and the bytes checked are the bytes decoded."""
    too_large = f"{what} is more than {MAX_IMAGE_FILE_BYTES >> 20} MiB; too large for a microscope frame"
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_IMAGE_FILE_BYTES:
                raise StackError(too_large)
            head = _FileBytes(f, size)
            try:
                kind, width, height, channels = image_header(head)
            except ValueError as exc:
                raise StackError(f"{what} cannot be read as an image: {exc}") from None
            if width * height > MAX_IMAGE_PIXELS:
                raise StackError(f"{what} declares {width}x{height} pixels, more than {MAX_IMAGE_PIXELS / 1e6:g} MP, "
                                 f"in its {kind} header; not a microscope frame (or a damaged file)")
            if channels is not None and channels not in (1, 3, 4):
                raise StackError(f"{what} has {channels} channels; a stack must hold gray, colour or colour+alpha "
                                 "images")
            f.seek(0)
            data = f.read(MAX_IMAGE_FILE_BYTES + 1)
    except OSError as exc:
        raise StackError(f"{what} cannot be read ({exc.strerror})") from exc
    if len(data) > MAX_IMAGE_FILE_BYTES:
        raise StackError(too_large)
    if not head.verify(data):
        raise StackError(f"{what} changed while it was read; replay the stack when nothing writes to it")
    try:
        with quiet_stderr():
            image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:  # OpenCV's own limits (CV_IO_MAX_IMAGE_WIDTH: 2^20 pixels a side), ...
        raise StackError(f"{what} ({width}x{height} {kind}) cannot be decoded: OpenCV refuses it "
                         f"({getattr(exc, 'err', '') or first_line(exc)})") from exc
    if image is None:
        raise StackError(f"{what} cannot be read as an image (truncated, damaged or not an image)")
    if image.shape[0] * image.shape[1] > MAX_IMAGE_PIXELS:  # the decoder's word against the header's
        raise StackError(f"{what} is {image.shape}; more than {MAX_IMAGE_PIXELS / 1e6:g} MP")
    channels = 1 if image.ndim == 2 else image.shape[2]
    if image.dtype.name not in FRAME_DTYPES:
        raise StackError(f"{what} has {image.dtype} pixels; a stack must hold {', '.join(FRAME_DTYPES)} images "
                         "(as cameras deliver them)")
    if channels not in (1, 3, 4):
        raise StackError(f"{what} has {channels} channels; a stack must hold gray, colour or colour+alpha images")
    if image.dtype.kind == "f" and not np.isfinite(image).all():
        raise StackError(f"{what} has non-finite pixels (NaN or infinity); no score can be computed from them")
    image.flags.writeable = False  # shared by every row that names the file
    return image


###############################################################################
# Backends: what the GenICam cameras share ####################################
###############################################################################
# Pieces every GenICam camera backend (FLIR, Basler) shares.  The contract of a camera backend: it
# changes only what the run needs, through a SettingsJournal, and ``close()`` (or a borrowed
# camera's ``restore()``) puts all of it back on every exit path.

# The settings of a camera backend (FlirCamera, BaslerCamera: their constructors and from_camera),
# checked before the camera is opened or changed.
CAMERA_RULES: dict[str, Rule] = {
    "serial": Rule("text", optional=True),
    "exposure_ms": Rule("number", 0.0, MAX_EXPOSURE_MS, " ms", above=True, optional=True),
    "timeout_ms": Rule("whole", 1, MAX_CAMERA_TIMEOUT_MS, " ms"),
    "roi": Rule("roi", optional=True),
}


def timeout_error(what: str) -> CameraError:
    """CameraError ``what``, advising a longer frame time-out (the camera's ``timeout_ms``)."""
    return CameraError(lambda o: f"{what}; check the cable, or raise {o}", "camera", ("timeout_ms",))


def fit_roi(roi: Roi, sensor_px: tuple[int, int], *, offset_step_px: tuple[int, int] = (1, 1),
            size_step_px: tuple[int, int] = (1, 1), min_size_px: tuple[int, int] = (1, 1)) -> Roi:
    """The region a camera can set that covers ``roi``: offsets rounded down to their increment,
    sizes rounded up to ``min + N * increment`` (GenICam's rule), kept on the sensor.

    UsageError when ``roi`` does not lie on the sensor (``sensor_px`` = width, height).
    """
    x, y, w, h = roi
    sw, sh = sensor_px
    if x + w > sw or y + h > sh:
        raise UsageError(lambda o: f"{o} {x},{y},{w},{h} reaches pixel {x + w},{y + h}, outside the sensor's "
                         f"{sw}x{sh} pixels; choose a region inside it", "camera", ("roi",))
    fitted = []
    for start, size, full, off_step, size_step, least in ((x, w, sw, offset_step_px[0], size_step_px[0],
                                                           min_size_px[0]),
                                                          (y, h, sh, offset_step_px[1], size_step_px[1],
                                                           min_size_px[1])):
        lo = start // off_step * off_step
        need = max(start + size - lo, least)
        n = least + -(-(need - least) // size_step) * size_step
        n = min(n, full - (full - least) % size_step)  # the largest size the camera accepts
        if lo + n > full:  # the rounded-up size runs off the sensor: move the region back onto it
            lo = (full - n) // off_step * off_step
        while lo + n < start + size and n + size_step <= full - lo:
            n += size_step
        fitted += [lo, n]
    return fitted[0], fitted[2], fitted[1], fitted[3]


# GenICam names a Bayer tile from its top-left pixel (BayerRG: R G / G B); OpenCV's classic names
# count from the second row and column, so GenICam BayerRG is OpenCV's BayerBG (the newer
# COLOR_BayerRGGB2GRAY aliases say the same).  Checked by tests/test_flir_camera.py on a known tile.
BAYER_TO_GRAY = {
    "BayerRG": cv2.COLOR_BayerBG2GRAY,
    "BayerBG": cv2.COLOR_BayerRG2GRAY,
    "BayerGR": cv2.COLOR_BayerGB2GRAY,
    "BayerGB": cv2.COLOR_BayerGR2GRAY,
}


PACKED_MONO = ("Mono12p", "Mono12Packed", "Mono10p", "Mono10Packed", "Mono14p")


def choose_pixel_format(offered: Sequence[str], sensor_bits: int, *, packed_ok: bool = False) -> str | None:
    """The pixel format to score: for a sensor deeper than 8 bits Mono16, else the deepest unpacked
    Mono14/12/10 (16-bit pixels, e.g. a Basler's Mono12), else Mono8; for an 8-bit sensor Mono8
    first.  A colour camera offering no mono format gets its unpacked Bayer format (converted to
    gray before scoring).  Packed formats (Mono12p, Mono12Packed, BayerRG10p...) only with
    ``packed_ok`` (a backend whose SDK unpacks them, pylon's converter), after every unpacked one
    of the sensor's depth; None: nothing usable."""
    deep = ["Mono16", "Mono14", "Mono12", "Mono10"] + (list(PACKED_MONO) if packed_ok else [])
    mono = (*deep, "Mono8") if sensor_bits > 8 else ("Mono8", *deep)
    for name in mono:
        if name in offered:
            return name
    bayer = [f for f in offered if f[:7] in BAYER_TO_GRAY and f[7:] in ("8", "10", "12", "14", "16")]
    bayer.sort(key=lambda f: (f.endswith("8")) == (sensor_bits > 8))
    if not bayer and packed_ok:
        bayer = [f for f in offered if f[:7] in BAYER_TO_GRAY and f[7:] in ("10p", "12p", "10Packed", "12Packed")]
    return bayer[0] if bayer else None


def is_packed(name: str) -> bool:
    """A packed PFNC/GigE Vision format (Mono12p, BayerRG12Packed): its bytes are not pixels."""
    return name.endswith(("p", "Packed"))


def offered_bits(offered: Sequence[str]) -> int:
    """A sensor's depth as its formats tell it: the deepest 10/12/14-bit one (Mono16 alone does not,
    it is a container); 8 when there is none."""
    return max((format_bits(f) for f in offered if not f.endswith("16")), default=8)


def format_bits(name: str) -> int:
    """Significant bits of a PFNC pixel format name (Mono12p -> 12, BayerRG8 -> 8); 0 if unknown."""
    digits = "".join(c for c in name.split("Bayer")[-1] if c.isdigit())
    return int(digits) if digits else 0


class SettingsJournal:
    """Camera settings a run changed, with the values they had before, to put them back.

    ``read(name)`` and ``write(name, value)`` are the backend's node accessors.  ``set`` records a
    node's value the first time the run changes it (a write of the value it already has is skipped).
    ``set_trigger`` changes one TriggerSelector entry's node and records all of that entry's trigger
    nodes (TRIGGER_NODES) the first time it changes any.  ``restore`` writes them back in GenICam's
    dependency order (``restore_plan``), goes on past failures, and returns the ones it could not.
    """

    def __init__(self, read: Callable[[str], Any], write: Callable[[str, Any], None]) -> None:
        self.read, self.write = read, write
        self.original: dict[str, Any] = {}
        self.triggers: dict[str, dict[str, Any]] = {}  # TriggerSelector entry -> its trigger nodes before

    def set(self, name: str, value: Any) -> None:
        """Change a node, remembering its value before the first change."""
        current = self.read(name)
        if current == value:
            return
        self.original.setdefault(name, current)
        self.write(name, value)

    def set_trigger(self, entry: str, name: str, value: Any, nodes: Sequence[str]) -> None:
        """Change trigger node ``name`` of TriggerSelector entry ``entry``; ``nodes``: the trigger
        nodes this camera has, all recorded for the entry before its first change."""
        self.set("TriggerSelector", entry)
        if self.read(name) == value:
            return
        if entry not in self.triggers:
            self.triggers[entry] = {n: self.read(n) for n in nodes}
        self.write(name, value)

    def restore(self) -> list[str]:
        """Put every changed node back; returns "name=value (why)" for each that failed."""
        failed = []
        selected = True  # False after a TriggerSelector write failed: its trigger writes would hit another entry
        for name, value in restore_plan(self.original, self.triggers):
            if name in TRIGGER_NODES and not selected:
                failed.append(f"{name}={value} (its TriggerSelector entry could not be selected)")
                continue
            try:
                if self.read(name) != value:
                    self.write(name, value)
            except Exception as exc:  # noqa: BLE001 - a vendor error of any kind: report, go on
                failed.append(f"{name}={value} ({first_line(exc)})")
                selected = selected and name != "TriggerSelector"
                continue
            selected = selected or name == "TriggerSelector"
        self.original.clear()
        self.triggers.clear()
        return failed


TRIGGER_NODES = ("TriggerMode", "TriggerSource", "TriggerActivation")  # per TriggerSelector entry

ROI_NODES = ("OffsetX", "OffsetY", "Width", "Height")


def set_sensor_roi(journal: SettingsJournal, roi: Roi, sensor_px: tuple[int, int], inc: dict[str, int],
                   min_size_px: tuple[int, int], *, bayer: bool) -> Roi:
    """Set the sensor's own ROI (fewer rows read, a faster read-out) through ``journal``, rounded by
    ``fit_roi`` to the node increments ``inc`` (per ROI_NODES name); returns the region set."""
    even = 2 if bayer else 1  # a Bayer mosaic keeps its pattern only when the offsets are even
    fitted = fit_roi(roi, sensor_px, offset_step_px=(math.lcm(inc["OffsetX"], even), math.lcm(inc["OffsetY"], even)),
                     size_step_px=(inc["Width"], inc["Height"]), min_size_px=min_size_px)
    if fitted != tuple(roi):
        log.warning("sensor region %s rounded to the camera's increments: %s", ",".join(map(str, roi)),
                    ",".join(map(str, fitted)))
    x, y, w, h = fitted
    for name, value in (("OffsetX", 0), ("OffsetY", 0), ("Width", w), ("Height", h), ("OffsetX", x),
                        ("OffsetY", y)):
        journal.set(name, value)
    return fitted


def freeze_auto(journal: SettingsJournal, has: Callable[[str], bool], errors: tuple[type[BaseException], ...],
                camera: str, viewer: str) -> None:
    """Auto exposure and auto gain off for the sweep: a gain or exposure that changes between frames
    changes the noise, and so the score.  CameraError when the camera refuses."""
    for auto, what in (("ExposureAuto", "exposure"), ("GainAuto", "gain")):
        if not has(auto):
            continue  # no automatic mode on this camera: nothing to freeze
        state = "unreadable"
        try:
            state = journal.read(auto)
            journal.set(auto, "Off")
        except errors as exc:
            raise CameraError(f"the {camera}'s auto {what} ({auto} {state}) cannot be turned off "
                              f"({first_line(exc)}); a {what} that changes between frames changes the score: "
                              f"turn {auto} off in {viewer} (or the camera's user set) and try again") from exc


def software_trigger(journal: SettingsJournal, has: Callable[[str], bool],
                     entries: Callable[[str], Sequence[str]]) -> None:
    """Continuous acquisition, each frame started by a software trigger (FrameStart), through
    ``journal`` so that all of it is put back.  The trigger nodes belong to the selected
    TriggerSelector entry (``entries(node)``: the entries a camera offers): every other trigger
    (AcquisitionStart, FrameBurstStart, ... left on by a user) is turned off, or it would gate or
    time the frames."""
    journal.set("AcquisitionMode", "Continuous")
    if not has("TriggerSelector"):  # one trigger only: its nodes are plain nodes
        journal.set("TriggerMode", "Off")  # the source is only writable with the trigger off
        journal.set("TriggerSource", "Software")
        journal.set("TriggerMode", "On")
        return
    nodes = [n for n in TRIGGER_NODES if has(n)]
    for entry in entries("TriggerSelector"):
        if entry != "FrameStart":
            journal.set_trigger(entry, "TriggerMode", "Off", nodes)
    journal.set_trigger("FrameStart", "TriggerMode", "Off", nodes)  # the source is only writable with it off
    journal.set_trigger("FrameStart", "TriggerSource", "Software", nodes)
    journal.set_trigger("FrameStart", "TriggerMode", "On", nodes)


def frame_timeout_ms(timeout_ms: int, exposure_ms: float) -> int:
    """How long to wait for a triggered frame: never less than its exposure plus a margin."""
    return max(int(timeout_ms), int(math.ceil(exposure_ms + CAMERA_TIMEOUT_MARGIN_MS)))


def bayer_code(pixel_format: str, reported_filter: str | None) -> int | None:
    """The OpenCV code that turns this format's mosaic to gray (None for mono); the camera's
    PixelColorFilter, when it reports one, overrides the pattern in the format's name."""
    if not pixel_format.startswith("Bayer"):
        return None
    pattern = reported_filter if reported_filter in BAYER_TO_GRAY else pixel_format[:7]
    return BAYER_TO_GRAY[pattern]


_Adapter = TypeVar("_Adapter", bound="GenicamAdapter")


class GenicamAdapter:
    """What the GenICam camera backends share at the end of a run: ``restore()`` puts back every
    node the run changed (their SettingsJournal), ``close()`` also releases a camera the adapter
    opened, on every exit path (a ``with`` block).  A backend calls ``__init__`` first, then
    configures the camera, and defines the vendor calls below."""

    vendor = "camera"  # "FLIR camera": for messages
    viewer = "its viewer"  # the vendor's program to check the camera with
    _shape: tuple[int, int]
    _configure: Callable[[float | None, int, Roi | None], None]  # the vendor's set-up: (exposure_ms, timeout_ms, roi)

    def __init__(self, cam: Any, *, owned: bool, running: bool, timeout_ms: int,
                 read: Callable[[str], Any], write: Callable[[str, Any], None]) -> None:
        """The state every backend shares: the camera, whether this adapter opened it (and closes
        it) or it is lent (and was streaming: ``running``), and the journal of the nodes a run changes."""
        self._cam, self._owned, self._was_running = cam, owned, running
        self._journal = SettingsJournal(read, write)
        self._closed = False
        self._bayer_code: int | None = None
        self.pixel_format: str | None = None
        self.roi: Roi | None = None
        self.timeout_ms = timeout_ms

    @classmethod
    def from_camera(cls: type[_Adapter], camera: Any, *, exposure_ms: float | None = None,
                    timeout_ms: int = DEFAULT_CAMERA_TIMEOUT_MS, roi: Roi | None = None) -> _Adapter:
        """An adapter over an open camera that the caller owns and keeps (FlirCamera: a simple-pyspin
        ``Camera``; BaslerCamera: a ``pylon.InstantCamera``; README), configured as a run needs and
        streaming; ``restore()`` (or leaving its ``with`` block) puts every node back and restarts a
        stream that was running.  Never closed here."""
        return cls(camera=camera, exposure_ms=exposure_ms, timeout_ms=timeout_ms, roi=roi)  # type: ignore[call-arg]

    def _start(self, stop: Callable[[], None], start: Callable[[], None], errors: tuple[type[BaseException], ...],
               exposure_ms: float | None, timeout_ms: int, roi: Roi | None) -> None:
        """Configure the camera for the sweep and start streaming; on any failure put it back."""
        try:
            stop()  # a lent camera may be streaming: format, ROI and trigger are locked then
            self._configure(exposure_ms, timeout_ms, roi)
            start()
        except errors as exc:
            self.close()
            raise CameraError(f"cannot configure the {self.vendor}: {first_line(exc)}") from exc
        except BaseException:
            self.close()
            raise

    def _stop(self) -> None:
        """Stop streaming."""
        raise NotImplementedError

    def _gone(self) -> bool:
        """The camera was unplugged (or closed by someone else)."""
        raise NotImplementedError

    def _restart(self) -> None:
        """Stream again (a lent camera that was streaming when lent)."""
        raise NotImplementedError

    def _release(self) -> None:
        """Close the camera this adapter opened; never raises."""
        raise NotImplementedError

    def _gray(self, frame: np.ndarray) -> np.ndarray:
        """The frame as the score must see it: checked against the configured size and depth (a
        packed format's bytes are never scored as pixels), a Bayer mosaic converted to gray."""
        if frame.shape != self._shape or frame.dtype not in (np.uint8, np.uint16):
            raise CameraError(f"the {self.vendor} delivered a {frame.shape} {frame.dtype} array for a "
                              f"{self._shape[1]}x{self._shape[0]} {self.pixel_format} frame; is another program "
                              "changing its pixel format?")
        if self._bayer_code is not None:
            frame = cv2.cvtColor(frame, self._bayer_code)  # a Bayer mosaic is never scored raw
        return frame

    def restore(self) -> None:
        """Stop streaming and put back every node this adapter changed; a lent camera that was
        streaming is restarted.  Safe to call more than once; never raises a vendor error."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self._stop()
        try:
            gone = self._gone()
        except Exception:  # noqa: BLE001
            gone = True
        if gone:  # unplugged: nothing to put back (a camera powers up with its own defaults)
            log.info("the %s is gone: its settings were not restored", self.vendor)
            return
        failed = self._journal.restore()
        if failed:
            log.warning("the %s did not take back %d setting(s) this run changed (%s%s); check it in %s",
                        self.vendor, len(failed), failed[0], ", ..." if len(failed) > 1 else "", self.viewer)
        if not self._owned and self._was_running:
            try:
                self._restart()
            except Exception as exc:  # noqa: BLE001
                log.warning("could not restart the lent %s's acquisition: %s", self.vendor, first_line(exc))

    def close(self) -> None:
        """Restore, then (for a camera this adapter opened) release it -- released even when the
        restore is cut short (Ctrl-C in a script), so the next open does not find it held."""
        try:
            self.restore()
        finally:
            if self._owned and self._cam is not None:
                self._release()
                self._cam = None

    def __enter__(self: _Adapter) -> _Adapter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def restore_plan(original: dict[str, Any], triggers: dict[str, dict[str, Any]] | None = None,
                 ) -> list[tuple[str, Any]]:
    """The writes that put ``original`` (plain nodes) and ``triggers`` (per TriggerSelector entry:
    its trigger nodes before) back on a GenICam camera, in an order it accepts.

    Each entry's TriggerMode goes Off first and back last (source and activation are writable only
    with the trigger off), the TriggerSelector back at the very end; offsets go to 0 before the sizes
    are restored (an offset plus a size may not exceed the sensor); everything else in reverse order
    of change (ExposureTime before ExposureAuto, which makes it writable).
    """
    triggers = triggers or {}
    plan: list[tuple[str, Any]] = []
    for entry, nodes in triggers.items():
        plan.append(("TriggerSelector", entry))
        if "TriggerMode" in nodes:
            plan.append(("TriggerMode", "Off"))
        plan += [(n, v) for n, v in nodes.items() if n != "TriggerMode"]
    if "TriggerMode" in original:
        plan.append(("TriggerMode", "Off"))
    offsets = [n for n in ("OffsetX", "OffsetY") if n in original]
    if any(n in original for n in ROI_NODES):
        plan += [(n, 0) for n in offsets]
        plan += [(n, original[n]) for n in ("Width", "Height") if n in original]
        plan += [(n, original[n]) for n in offsets]
    last = ("TriggerMode", "TriggerSelector")
    plan += [(n, original[n]) for n in reversed(original) if n not in last and n not in ROI_NODES]
    for entry, nodes in triggers.items():
        if nodes.get("TriggerMode", "Off") != "Off":
            plan += [("TriggerSelector", entry), ("TriggerMode", nodes["TriggerMode"])]
    if "TriggerMode" in original:
        plan.append(("TriggerMode", original["TriggerMode"]))
    if "TriggerSelector" in original:
        plan.append(("TriggerSelector", original["TriggerSelector"]))
    return plan


###############################################################################
# Backends: Zaber stage and FLIR camera #######################################
###############################################################################


def lazy_import(missing: UsageError, *modules: str) -> list[Any]:
    """Import ``modules`` on first use, each package before its submodules (a loaded submodule is found
    even when its package is gone); ``missing``, which says how to install them, when one is not there."""
    try:
        return [importlib.import_module(name) for name in modules]
    except ImportError as exc:
        raise missing from exc


def _zml() -> Any:
    """Import the Zaber Motion Library on first use (it is in requirements.txt)."""
    missing = UsageError("the Zaber Motion Library is missing: pip install -r requirements.txt")
    return lazy_import(missing, "zaber_motion", "zaber_motion.ascii")[0]


# The settings of a ZaberStage (its constructor and from_axis), checked before the port is opened.
ZABER_RULES: dict[str, Rule] = {
    "port": Rule("text"),
    "device": Rule("whole", 1, 99),
    "axis": Rule("whole", 1, 99),
    "native_unit_nm": Rule("number", 0.0, 1e6, " nm", above=True, optional=True),
    "device_db": Rule("text", optional=True),
    "move_timeout_s": Rule("number", 0.0, MAX_TIMEOUT_S, " s", above=True),
    "home_timeout_s": Rule("number", 0.0, MAX_TIMEOUT_S, " s", above=True),
    "clear_faults": Rule("flag"),
}


class ZaberStage(StageDefaults):
    """The focus axis of a Zaber device through ZML (serial port or tcp://HOST:PORT).

    Set-up (and ``run_scope``, at the start of every focus() run) reads the axis's warning flags
    before anything moves: notices (N*, and W* other than "not homed") are reported and cleared,
    faults (F*) refuse the run unless ``clear_faults``; an axis that is moving is refused.

    Every move (and homing) is bracketed by status reads (``get pos``: status, flag and position in
    one round trip), so a frame counts only if the stage stood still where it was labelled: before a
    move the axis must be idle, show no new flag and stand where this tool left it; while it moves it
    must stay on its path; once idle it must show no new flag and lie within ``tolerance_native``
    native units of the target.  Anything else -- whatever ZML did to the flags (a second ZML client
    clears the NI its own stop or move causes; ZML clears a fault it meets in a reply) -- is an event
    this tool did not cause: StageInterrupted or StageError, and nothing more is moved.  Waits are
    bounded (``move_timeout_s``, ``home_timeout_s``, STOP_TIMEOUT_S); a move or homing that runs out
    of time sends ``stop`` itself (the only stop after which a run may return to its start).  Move
    the axis only through this object while a run uses it; between focus() runs a script may move it
    with ZML (``run_scope`` notes where).
    """

    role = "focus"  # what the axis does, for messages ("X" and "Y" for a plate's axes: ZaberPlate)

    def __init__(self, port: str, device: int = DEFAULT_DEVICE, axis: int = DEFAULT_AXIS, *,
                 native_unit_nm: float | None = None, device_db: str | None = None,
                 move_timeout_s: float = DEFAULT_MOVE_TIMEOUT_S, home_timeout_s: float = DEFAULT_HOME_TIMEOUT_S,
                 clear_faults: bool = False, zml_axis: Any = None) -> None:
        """Open ``port`` and take device ``device``'s axis ``axis``; or take ``zml_axis``, an axis on
        the caller's connection (``from_axis``: ``port`` then only names it in messages)."""
        check_values("zaber", ZABER_RULES, {"port": port, "device": device, "axis": axis, "device_db": device_db,
                                            "native_unit_nm": native_unit_nm, "move_timeout_s": move_timeout_s,
                                            "home_timeout_s": home_timeout_s, "clear_faults": clear_faults})
        self.port = port
        self.native_unit_nm = native_unit_nm
        self.move_timeout_s, self.home_timeout_s = move_timeout_s, home_timeout_s
        self.clear_faults = clear_faults
        self._allowed_mm: tuple[float, float] | None = None  # the current run's: moves are rounded inside them
        self.name: str | None = None  # the device's product name, when ZML could identify it
        self._connection: Any = None
        self._owns_connection = False  # ``close`` leaves a connection it did not open alone
        self._zm = _zml()
        self._exc = self._zm.exceptions
        if zml_axis is not None:
            self._connection = zml_axis.device.connection
            self._setup_axis(zml_axis)
            return
        self.device_number, self.axis_number = device, axis
        # A library-wide setting, so only for a connection the tool opens (from_axis leaves it alone).
        self._zm.Library.set_idle_polling_period(10)  # ms; ZML's 50 ms default would add ~25 ms a move
        if device_db:
            self._zm.Library.set_device_db_source(self._zm.DeviceDbSourceType.FILE, device_db)
        self._connection = self._open(port)
        self._owns_connection = True
        try:
            self._setup_axis(self._connection.get_device(device).get_axis(axis))
        except BaseException:
            self.close()
            raise

    @classmethod
    def from_axis(cls, axis: Any, *, native_unit_nm: float | None = None,
                  move_timeout_s: float = DEFAULT_MOVE_TIMEOUT_S, home_timeout_s: float = DEFAULT_HOME_TIMEOUT_S,
                  clear_faults: bool = False) -> ZaberStage:
        """A stage over a ZML ``Axis`` the caller already holds, e.g.
        ``connection.get_device(3).get_axis(1)`` or ``Microscope.find(connection).focus_axis``.

        The caller owns the connection: ``close()`` leaves it open, and no ZML-wide setting (idle
        polling, device database) is changed.  Units, limits, the homed state and latched flags are
        handled as for a port the tool opens itself (``clear_faults`` as ``--clear-faults``); nothing
        moves here.
        """
        if not isinstance(axis, _zml().ascii.Axis):
            raise UsageError(f"ZaberStage.from_axis needs a zaber_motion.ascii.Axis (e.g. "
                             f"connection.get_device(3).get_axis(1)), not {show_value(axis)}")
        return cls("the caller's connection", native_unit_nm=native_unit_nm, move_timeout_s=move_timeout_s,
                   home_timeout_s=home_timeout_s, clear_faults=clear_faults, zml_axis=axis)

    def _open(self, port: str) -> Any:
        """Open the serial port or tcp://HOST:PORT; errors are one UsageError."""
        conn = self._zm.ascii.Connection
        try:
            if port.startswith("tcp://"):
                host, _, tcp_port = port[len("tcp://"):].rpartition(":")
                if not host or not tcp_port.isdigit():
                    raise UsageError(f"bad PORT {port!r}: expected tcp://HOST:PORT")
                return conn.open_tcp(host, int(tcp_port))
            # direct=False (ZML's default): when Zaber Launcher holds the port, ZML connects through
            # Launcher and both can command the axis; a move Launcher makes during the run is caught
            # as an interruption (NI).  Only a program that does not share the port makes it busy.
            return conn.open_serial_port(port)
        except self._exc.SerialPortBusyException as exc:
            raise UsageError(f"serial port {port} is held by a program that does not share it (a terminal, "
                             "another script or Zaber Console; Zaber Launcher shares its ports and is not the "
                             "cause): close that program and try again") from exc
        except self._exc.ConnectionFailedException as exc:
            raise UsageError(f"cannot open {port}: {first_line(exc)}; check the port name "
                             "(Device Manager on Windows, ls /dev/ttyUSB* /dev/ttyACM* on Linux)") from exc
        except self._exc.MotionLibException as exc:
            raise UsageError(f"cannot open {port}: {first_line(exc)}") from exc

    def _setup_axis(self, axis: Any) -> None:
        """Probe the axis, choose units, read the limits, settle latched flags; nothing moves."""
        self._axis = axis
        self.device_number, self.axis_number = axis.device.device_address, axis.axis_number
        flags = self._probe_flags()
        self._choose_units(axis.device)
        self._limits = (self._setting("limit.min"), self._setting("limit.max"))
        self._check_travel()
        self.tolerance_native = self._tolerance_native()
        # While a move runs the axis stays on its path (start to target) within this margin (a
        # closed-loop stage may overshoot a little); someone else's move leaves it.
        self._margin_native = max(self.tolerance_native, MOTION_MARGIN_MM * self._native_per_mm)
        # Per move length (native units): seconds after its command was sent when such a move was
        # last seen busy, and first seen idle (see ``_await``).
        self._arrival: dict[int, tuple[float, float]] = {}
        self._take_over(flags)

    @contextlib.contextmanager
    def run_scope(self, allowed_mm: tuple[float, float] | None) -> Iterator[None]:
        """One focus() run: the axis taken as it is now, as set-up does (refused when it is moving
        or faulted, notices cleared, its position noted; from here on, an axis found anywhere but
        where this tool left it was moved from outside); moves rounded inside ``allowed_mm`` until it ends."""
        try:
            flags = set(self._axis.warnings.get_flags())
        except self._exc.MotionLibException as exc:
            raise StageError(f"reading the warning flags of {self._where()}: {first_line(exc)}") from exc
        self._take_over(flags)
        self._allowed_mm = allowed_mm
        try:
            yield
        finally:
            self._allowed_mm = None

    def _take_over(self, flags: set[str]) -> None:
        busy, _, at = self._state()
        if busy:
            raise StageError(f"{self._where()} is moving (the knob or joystick, Zaber Launcher or another "
                             "program): wait until it stops and run again; nothing was commanded")
        left = self._settle_flags(flags)
        self._homed = not left & HOMING_FLAGS
        # Flags that stay after clearing are standing conditions (a warm controller: WT); any other
        # flag that shows from now on is news.
        self._baseline = frozenset(left - HOMING_FLAGS)
        self._expect_native, self._left_by = at, "where it stood when the run began"

    def _where(self) -> str:
        """"device 3 axis 1" for messages."""
        return f"device {self.device_number} axis {self.axis_number}"

    axis_name = property(_where)  # type: ignore[assignment]

    def _probe_flags(self) -> set[str]:
        """The axis's warning flags; the first request, so it also tells an absent device or axis."""
        try:
            return set(self._axis.warnings.get_flags())
        except (self._exc.RequestTimeoutException, self._exc.DeviceAddressConflictException) as exc:
            found = self._found()
            raise UsageError(lambda d: f"no Zaber device {self.device_number} on {self.port}; {found}; give the right "
                             f"device number ({d} N)", "zaber", ("device",)) from exc
        except (self._exc.BadDataException, self._exc.CommandFailedException) as exc:
            if isinstance(exc, self._exc.BadDataException) or "BADAXIS" in str(exc) or "axis" in str(exc).lower():
                raise UsageError(lambda a: f"device {self.device_number} has no axis {self.axis_number}; give the "
                                 f"right axis number ({a} N)", "zaber", ("axis",)) from exc
            raise StageError(f"device {self.device_number} rejected a status request: {first_line(exc)}") from exc
        except self._exc.MotionLibException as exc:
            raise StageError(f"device {self.device_number} on {self.port} does not answer: {first_line(exc)}") from exc

    def _choose_units(self, device: Any) -> None:
        """Millimetres through Zaber's device database, or native units of a known size
        (``native_unit_nm``) -- checked against the database whenever ZML can identify the device:
        there the database's unit is the truth, and a --native-unit-nm more than 1% off is refused."""
        zm = self._zm
        database = self._database_unit(device, needed=self.native_unit_nm is None)
        self.units_checked = database is not None and self.native_unit_nm is not None
        if self.native_unit_nm is not None:
            given = 1e6 / self.native_unit_nm
            if database is not None and abs(given / database - 1) > NATIVE_UNIT_MISMATCH:
                self._unit_mismatch(given, database)
            if database is None:
                self._unit = zm.Units.NATIVE
                self._scale = self._native_per_mm = given  # device values per mm (native units per mm)
                return
        self._unit, self._scale, self._native_per_mm = zm.Units.LENGTH_MILLIMETRES, 1.0, database

    def _database_unit(self, device: Any, *, needed: bool) -> float | None:
        """Native units per mm by Zaber's device database (ZML identifies the device: from its cache,
        --device-db, or online); None when it cannot and ``needed`` is False."""
        zm = self._zm
        try:
            if not device.is_identified:
                device.identify()
            self.name = device.name or None
            return float(self._axis.settings.convert_to_native_units("pos", 1.0, zm.Units.LENGTH_MILLIMETRES))
        except (self._exc.DeviceDbFailedException, self._exc.DeviceNotIdentifiedException) as exc:
            if needed:
                why = first_line(exc)  # (``exc`` is gone once this handler ends; the message is written later)
                raise UsageError(lambda db, nm: (
                    "cannot convert millimetres: ZML could not load Zaber's device database "
                    f"({why}); connect once with internet, or give Zaber's offline database ({db} FILE) "
                    f"or the size of one native unit ({nm} N)"), "zaber", ("device_db", "native_unit_nm")) from exc
            log.info("ZML could not identify device %s (%s): the native unit given, %g nm, is not cross-checked",
                     self.device_number, first_line(exc), self.native_unit_nm)
        except self._exc.MotionLibException as exc:
            if needed:
                raise StageError(f"identifying device {self.device_number} failed: {first_line(exc)}") from exc
            log.info("identifying device %s failed (%s): the native unit given, %g nm, is not cross-checked",
                     self.device_number, first_line(exc), self.native_unit_nm)
        return None

    def _unit_mismatch(self, given_per_mm: float, database_per_mm: float) -> None:
        """UsageError: the native unit given contradicts Zaber's device database."""
        try:
            span = (self._axis.settings.get("limit.max", self._zm.Units.NATIVE)
                    - self._axis.settings.get("limit.min", self._zm.Units.NATIVE))
            travel = f"its travel is {span / database_per_mm:g} mm, not {span / given_per_mm:g} mm"
        except self._exc.MotionLibException:
            travel = "the travel would be wrong by the same factor"
        raise UsageError(lambda nm: f"{nm} {self.native_unit_nm:g} disagrees with Zaber's device database for "
                         f"{self.name or 'device ' + str(self.device_number)} ({self._where()}): one native unit is "
                         f"{1e6 / database_per_mm:.6g} nm there, so {travel}; drop {nm} (ZML knows this "
                         "device) or correct it; nothing moved", "zaber", ("native_unit_nm",))

    def _check_travel(self) -> None:
        """Refuse a native unit size that makes the travel implausible for a focus axis (when the
        device database could not check it)."""
        lo_mm, hi_mm = PLAUSIBLE_TRAVEL_MM
        travel = self._limits[1] - self._limits[0]
        if self.native_unit_nm is not None and not self.units_checked and not lo_mm <= travel <= hi_mm:
            native = round(travel * self._native_per_mm)
            raise UsageError(lambda nm: f"{nm} {self.native_unit_nm:g} makes the travel of {self._where()} "
                             f"{travel:g} mm ({native} native units); a focus axis travels {lo_mm:g}-{hi_mm:g} mm: "
                             "check the native unit size in the stage's datasheet (nm, not um); nothing moved",
                             "zaber", ("native_unit_nm",))

    def _tolerance_native(self) -> float:
        """How far from its target a finished move may be, in native units (see the constant)."""
        try:
            settle = float(self._axis.settings.get("cloop.settle.tolerance"))
        except self._exc.MotionLibException:  # open-loop devices have no such setting (RJ BADCOMMAND)
            settle = 0.0
        return max(float(POSITION_TOLERANCE_NATIVE), settle)

    def _settle_flags(self, flags: set[str]) -> set[str]:
        """Report and clear notices left from earlier work; refuse latched faults unless told to
        clear them.  Returns the flags still active (e.g. WR, not homed)."""
        faults = sorted(f for f in flags if f.startswith("F"))
        notices = sorted(f for f in flags if not f.startswith("F") and f not in ("WR", "WH"))
        if faults and not self.clear_faults:
            first = faults[0]
            also = f" (also {', '.join(describe_flag(f) for f in faults[1:])})" if len(faults) > 1 else ""
            raise StageError(lambda c: f"{self._where()} reports fault {describe_flag(first)}{also}: "
                             f"{FAULT_ADVICE.get(first, 'see the Warning Flags section of the Zaber ASCII manual')}"
                             f"; once checked, run again with {c} to clear it; nothing was moved",
                             "zaber", ("clear_faults",))
        if not faults and not notices:
            return flags
        try:
            self._axis.warnings.clear_flags()
            left = set(self._axis.warnings.get_flags())
        except self._exc.MotionLibException as exc:
            raise StageError(f"clearing the warning flags of {self._where()}: {first_line(exc)}") from exc
        what = ", ".join(describe_flag(f) for f in faults + notices)
        log.warning("%s had %s latched from earlier work: cleared%s", self._where(), what,
                    " (as asked: clear_faults)" if faults else "")
        still = sorted(f for f in left if f.startswith("F"))
        if still:
            raise StageError(f"{self._where()} still reports fault {describe_flag(still[0])} after clearing: "
                             f"{FAULT_ADVICE.get(still[0], 'the cause is still there')}; nothing was moved")
        return left

    def _found(self) -> str:
        """Which devices answer on this port (for the "device absent" message)."""
        try:
            found = self._axis.device.connection.detect_devices(identify_devices=False)
        except self._exc.MotionLibException:
            return "no devices answered"
        return "found: " + (", ".join(f"device {d.device_address}" for d in found) or "none")

    def _setting(self, name: str) -> float:
        """An axis setting in mm."""
        try:
            return self._axis.settings.get(name, self._unit) / self._scale
        except self._exc.MotionLibException as exc:
            raise StageError(f"reading {name} from device {self.device_number}: {first_line(exc)}") from exc

    def describe(self) -> dict[str, Any]:
        """What was found, for the run's header and --json."""
        lo, hi = self._limits
        return {"device": self.device_number, "axis": self.axis_number, "name": self.name,
                "travel_mm": [round(lo, 6), round(hi, 6)], "native_unit_nm": round(1e6 / self._native_per_mm, 6),
                "units_from": "--native-unit-nm" if self.native_unit_nm is not None else "device database",
                # --native-unit-nm confirmed by the device database (None: no --native-unit-nm)
                "units_checked": None if self.native_unit_nm is None else self.units_checked,
                "homed": self._homed, "homed_now": False, "position_tolerance_native": self.tolerance_native}

    @property  # type: ignore[override]
    def homed(self) -> bool:
        """Whether the axis has a reference position (no WR/WH at set-up, or homed since)."""
        return self._homed

    def home_if_needed(self) -> bool:
        """Home the axis when it has no reference position; True when it homed.

        Homing drives to the home sensor and may cross any position: the caller decides whether
        that is allowed (see ``run``).  It is checked like a move (see ``move_to``)."""
        if self._homed:
            return False
        log.warning("homing %s: it has no reference position (the stage moves to its home sensor)", self._where())
        try:
            start = self._check_still("homing", allow=HOMING_FLAGS)
            self._send(lambda: self._axis.home(wait_until_idle=False), "homing")
            flags, at = self._await("homing", self.home_timeout_s, "home_timeout_s", start, None, HOMING_FLAGS)
        except KeyboardInterrupt as exc:  # Ctrl-C at any point of the homing: stop it, whatever comes next
            failure = as_run_failure(exc, None, stop_and_locate(self, "homing was interrupted"))
            if failure is exc:
                raise
            raise failure from exc
        if flags & HOMING_FLAGS:
            raise StageError(f"homing {self._where()} ended without a reference position "
                             f"({', '.join(sorted(flags & HOMING_FLAGS))}) at {self._mm(at):.4f} mm: it was stopped "
                             "from outside (another program's ZML clears the NI flag its stop causes) or the home "
                             "sensor was not found; check the stage")
        self._homed = True
        self._expect_native, self._left_by = at, "where homing left it"
        return True

    def limits_mm(self) -> tuple[float, float]:
        return self._limits

    def position_mm(self) -> float:
        try:
            return round(self._axis.get_position(self._unit) / self._scale, POSITION_DECIMALS)
        except self._exc.MotionLibException as exc:
            raise StageError(f"reading the position of device {self.device_number}: {first_line(exc)}") from exc

    def move_to(self, z_mm: float) -> None:
        """Move to z, verified before and after (the class's contract): anything else is an event
        this tool did not cause, StageInterrupted (moved or stopped from outside) or a StageError (a fault),
        and then nothing more is moved."""
        lo, hi = self._limits
        if not lo - FLOAT_SLACK_MM <= z_mm <= hi + FLOAT_SLACK_MM:  # last line of defence; plans are checked earlier
            raise StageError(f"refusing to move to {z_mm} mm: outside the travel {lo}..{hi} mm")
        what = f"the {'' if self.role == 'focus' else self.role + ' '}move to {z_mm:.4f} mm"
        target = self._native_inside(z_mm)
        start = self._check_still(what)
        sent = time.monotonic()
        self._send(lambda: self._axis.move_absolute(target, self._zm.Units.NATIVE, wait_until_idle=False), what)
        _, at = self._await(what, self.move_timeout_s, "move_timeout_s", start, target, sent_at=sent)
        off_native = abs(at - target)
        if off_native > self.tolerance_native + FLOAT_SLACK_NATIVE:
            raise StageInterrupted(
                f"{what} ended {off_native:.0f} native units off the target (tolerance {self.tolerance_native:g}), at "
                f"{self._readback()}: the axis was stopped or moved from outside (the knob or joystick, Zaber "
                "Launcher or another program, whose ZML clears the NI flag at once) or something blocked it")
        self._expect_native, self._left_by = target, f"where {what} left it"

    @property  # type: ignore[override]
    def native_unit_mm(self) -> float:
        """The size of one native unit (one step of the axis), mm."""
        return 1.0 / self._native_per_mm

    def _native_inside(self, z_mm: float) -> int:
        """z in whole native units, rounded to the nearest unit unless that lies outside the
        travel or the run's allowed interval (``run_scope``): then toward the inside.  With coarse
        units, plain rounding could command a position just past --z-max."""
        per_mm = self._native_per_mm
        lo, hi = self._allowed_mm or self._limits
        exact = z_mm * per_mm
        target = round(exact)
        # Only the rounding is moved inside (a target within one unit of a limit): a position
        # outside the limits on purpose (the start, where the user left the stage) is kept.
        if exact <= hi * per_mm + FLOAT_SLACK_NATIVE and target > hi * per_mm + FLOAT_SLACK_NATIVE:
            target = math.floor(hi * per_mm + FLOAT_SLACK_NATIVE)
        if exact >= lo * per_mm - FLOAT_SLACK_NATIVE and target < lo * per_mm - FLOAT_SLACK_NATIVE:
            target = math.ceil(lo * per_mm - FLOAT_SLACK_NATIVE)
        return target

    def _mm(self, native: float) -> float:
        return native / self._native_per_mm

    def _state(self) -> tuple[bool, set[str], float]:
        """(busy, active warning flags, position in native units), in ONE round trip while no flag is up.

        Every ASCII reply carries the axis's status (IDLE/BUSY) and its highest-priority warning
        flag (``@03 1 07 OK IDLE -- 10200000``); the reply to ``get pos`` adds the position.  Only
        when a flag shows is the full list asked for.  ZML's generic_command clears nothing (its own
        motion calls send ``warnings clear`` when they see a flag)."""
        try:
            reply = self._axis.generic_command("get pos")
            flags = set() if reply.warning_flag in ("--", "") else set(self._axis.warnings.get_flags())
            return reply.status == "BUSY", flags, float(reply.data.split()[0])
        except self._exc.MotionLibException as exc:
            raise StageError(f"lost the stage: {self._where()} does not answer ({first_line(exc)})") from exc

    def _readback(self) -> str:
        """"10.1713 mm, flag NC up": where the axis is now and what it shows, read back for a message."""
        try:
            _, flags, at = self._state()
        except StageError:
            return "an unknown position (it no longer answers)"
        return f"{self._mm(at):.4f} mm, " + (f"flag {', '.join(sorted(flags))} up" if flags else "no flag up")

    def _check_still(self, doing: str, allow: frozenset[str] = frozenset()) -> float:
        """Before a move or homing is sent: the axis is idle, shows no new flag and stands where this
        tool left it (a frame exposed there was exposed standing still).  Returns its position."""
        busy, flags, at = self._state()
        if flags - self._baseline - allow:
            raise self._flag_error(flags - self._baseline - allow, f"before {doing}", before_move=True)
        expect = self._expect_native
        if busy:
            err: StageError = StageInterrupted(
                f"before {doing}: {self._where()} was moving, not by this tool's command (the knob or joystick, "
                f"Zaber Launcher or another program); it is at {self._readback()}")
        elif expect is not None and abs(at - expect) > self.tolerance_native + FLOAT_SLACK_NATIVE:
            err = StageInterrupted(
                f"before {doing}: {self._where()} is at {self._mm(at):.4f} mm (no flag up), not at "
                f"{self._mm(expect):.4f} mm {self._left_by}: it was moved from outside while it stood still (the "
                "knob or joystick, Zaber Launcher or another program)")
        else:
            return at
        err.before_move = True
        raise err

    def _send(self, command: Callable[[], None], what: str) -> None:
        """Send a motion command; ZML's errors in this tool's terms (the flag policy of ``_flag_error``)."""
        exc = self._exc
        try:
            command()
        except (exc.MovementFailedException, exc.MovementInterruptedException) as error:
            # ZML saw a flag in the reply, sent "warnings clear" and raised; the motion the command
            # started may be running: the tool's own, so it is stopped.  The flags seen are the news.
            seen = set(error.details.warnings) or {"NI" if isinstance(error, exc.MovementInterruptedException)
                                                    else "FF"}
            note = self._stop_own()
            try:
                cleared = seen - set(self._axis.warnings.get_flags())
            except exc.MotionLibException:
                cleared = set()
            raise self._flag_error(seen - self._baseline or seen, what, cleared=cleared, note=note) from error
        except exc.DriverDisabledException as error:
            try:
                off = set(self._axis.warnings.get_flags())
            except exc.MotionLibException:
                off = set()
            if not any(f.startswith("F") for f in off):
                raise StageError(f"{self._where()} refused {what}: its driver is disabled ({first_line(error)}); "
                                 "enable it in Zaber Launcher once the cause is checked") from error
            raise self._flag_error(off, what, note=" and refused the move (driver disabled)") from error
        except exc.CommandFailedException as error:
            raise StageError(f"device {self.device_number} rejected {what}: {first_line(error)}") from error
        except exc.MotionLibException as error:
            raise StageError(f"lost the stage during {what}: {first_line(error)}") from error

    def _await(self, what: str, timeout_s: float, option: str, start: float, target: float | None,
               allow: frozenset[str] = frozenset(), sent_at: float | None = None) -> tuple[set[str], float]:
        """Poll until the axis is idle (one round trip a poll, see ``_state``; a move as long as an
        earlier one, sent at ``sent_at``, is first polled about when that one ended); returns its flags and
        position then.  While it moves: a new flag, or (``target`` given) a position off the path
        from ``start`` to ``target``, ends the wait at once -- someone else's motion is not stopped,
        the tool's own is stopped after a fault.  After ``timeout_s`` the tool sends ``stop`` itself."""
        t0 = time.monotonic()
        deadline = t0 + timeout_s
        path = (min(start, target) - self._margin_native, max(start, target) + self._margin_native) \
            if target is not None else None
        # A move as long as earlier ones (a sweep's steps) ends about when they did.  Between the
        # latest time such a move was seen busy (a lower bound on its duration, whatever the line's
        # delays) and the earliest it was seen idle, the first poll is aimed halfway while that
        # interval is wide, then ARRIVAL_MARGIN_S after the busy bound: most moves take one poll,
        # not a round trip's granularity of them; a poll too early costs one more round trip.
        key = round(abs(target - start)) if target is not None and sent_at is not None else None
        lo, hi = self._arrival.get(key, (0.0, 0.0)) if key is not None else (0.0, 0.0)
        aim = (lo + hi) / 2 if hi - lo > 2 * ARRIVAL_MARGIN_S else lo + ARRIVAL_MARGIN_S
        last_busy = None
        try:
            if hi > 0 and sent_at is not None:  # inside the try: a Ctrl-C while waiting stops the axis too
                time.sleep(max(0.0, sent_at + aim - time.monotonic()))
            while True:
                sent = time.monotonic()
                busy, flags, at = self._state()
                new = flags - self._baseline - allow
                if new:
                    faulted = any(f.startswith("F") for f in new)
                    raise self._flag_error(new, what, note=self._stop_own() if busy and faulted else "")
                if not busy:
                    if key is not None and sent_at is not None:
                        idle = sent - sent_at
                        if last_busy is None:  # idle at the first poll: the bound creeps earlier
                            lo = max(0.0, lo - ARRIVAL_CREEP_S)
                        else:
                            lo = max(lo, last_busy - sent_at)
                        self._arrival[key] = (lo, idle if hi <= lo else min(hi, idle))
                    return flags, at
                last_busy = sent
                if path is not None and not path[0] <= at <= path[1]:
                    raise StageInterrupted(
                        f"{what}: {self._where()} went to {self._mm(at):.4f} mm (no flag up), off its path from "
                        f"{self._mm(start):.4f} mm: someone else is moving it (the knob or joystick, Zaber Launcher "
                        "or another program); it was not stopped")
                if time.monotonic() > deadline:
                    where = self._stop_now()
                    err = StageError(lambda o: f"{what}: the axis was still busy after {timeout_s:g} s; stopped it{where} "
                                     f"(raise {o} if the stage is slow)", "zaber", (option,))
                    err.may_move = True  # the tool's own stop, for its own reason: it may return to start
                    raise err
                # Poll again at once on a slow line (the round trip paces it), at most every MOTION_POLL_S
                # on a fast one: each poll sent after the axis stops is what its arrival waits for.
                time.sleep(max(0.0, MOTION_POLL_S - (time.monotonic() - sent)))
        except KeyboardInterrupt:
            for _ in range(STOP_ATTEMPTS):
                try:
                    self._stop_now()
                    break
                except KeyboardInterrupt:
                    continue
                except Exception:  # noqa: BLE001 - the interrupt is what is reported
                    break
            raise
        except self._exc.MotionLibException as exc:
            raise StageError(f"lost the stage during {what}: {first_line(exc)}") from exc

    def _flag_error(self, flags: set[str], what: str, *, cleared: set[str] | frozenset[str] = frozenset(),
                    note: str = "", before_move: bool = False) -> StageError:
        """The one policy for a flag the tool did not expect, whether it read the flag itself or ZML
        met it (and cleared it: ``cleared``): NI/NC/WM -> StageInterrupted (moved or stopped from
        outside); a fault (F*) or any other warning -> a StageError that moves nothing more."""
        faults = sorted(f for f in flags if f.startswith("F"))
        outside = sorted(f for f in flags if f in OUTSIDE_FLAGS)
        rest = sorted(set(flags) - set(faults) - set(outside))
        named = ", ".join(describe_flag(f) for f in faults + outside + rest)
        if cleared:
            named += (", which ZML had already cleared" if set(cleared) >= set(flags) else
                      f" (ZML had already cleared {', '.join(sorted(cleared))})")
        where = self._readback()
        err: StageError
        if faults:
            err = StageError(f"{what}: {self._where()} reported fault {named}{note}; it is at {where}: "
                             f"{FAULT_ADVICE.get(faults[0], 'see the Warning Flags section of the Zaber ASCII manual')}")
        elif outside:
            err = StageInterrupted(f"{what}: the axis was moved or stopped from outside ({named}: the knob or "
                                   f"joystick, Zaber Launcher or another program){note}; it is at {where}")
        else:
            err = StageError(f"{what}: {self._where()} reported {named}{note}, so where it stands cannot be vouched "
                             f"for; it is at {where}")
        err.before_move = before_move
        return err

    def _stop_now(self) -> str:
        """Send ``stop`` and wait (at most STOP_TIMEOUT_S) for the axis to come to rest (a stop
        decelerates); returns "" or a note that it did not.  Sent as a generic command: ZML's own
        stop() waits for idle with no time limit, and on a flag in its reply clears it (a fault
        too) and raises.  The axis then stands where the tool's stop left it; the NI that stop set
        is the tool's own and is cleared here (only when it is the one new flag)."""
        self._axis.generic_command("stop")
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while True:
            busy, flags, at = self._state()
            if not busy:
                break
            if time.monotonic() > deadline:
                return f", but it was still busy {STOP_TIMEOUT_S:g} s after the stop"
            time.sleep(MOTION_POLL_S)
        if flags - self._baseline == {"NI"}:
            self._axis.warnings.clear_flags()
        self._expect_native, self._left_by = at, "where the tool's stop left it"
        return ""

    def _stop_own(self) -> str:
        """Stop the tool's own motion after a fault (stopping is always allowed); a note for the message."""
        try:
            return "; the move was stopped" + self._stop_now()
        except (StageError, self._exc.MotionLibException):
            return "; stopping the move failed"

    def stop(self) -> None:
        try:
            note = self._stop_now()
        except self._exc.MotionLibException as exc:
            raise StageError(f"stopping device {self.device_number}: {first_line(exc)}") from exc
        if note:
            raise StageError(f"stopping {self._where()}: the axis was still busy {STOP_TIMEOUT_S:g} s after the stop")

    def close(self) -> None:
        """Close the connection this object opened (never one the caller owns)."""
        if self._owns_connection and self._connection is not None:
            with contextlib.suppress(Exception):
                self._connection.close()


class ZaberPlate(StageDefaults):
    """A Zaber microscope's XY plate through ZML: two ZaberStage axes, so every plate move is
    verified exactly as a focus move is.

    ``from_microscope(connection)`` finds the plate with ZML's ``microscopy.Microscope.find`` (by the
    axes' ``zaber.microscope.part`` storage keys); ``from_device(connection, n)`` takes device n's
    axis 2 as x and axis 1 as y, as Zaber's scanning examples do.  Units: millimetres through Zaber's
    device database, or ``native_unit_nm`` (one native unit of both axes).  The caller owns the
    connection."""

    def __init__(self, x: ZaberStage, y: ZaberStage) -> None:
        x.role, y.role = "X", "Y"
        self.x, self.y = x, y

    @classmethod
    def from_axes(cls, x_axis: Any, y_axis: Any, **stage_options: Any) -> ZaberPlate:
        """A plate over two ZML ``Axis`` objects; ``stage_options`` as ``ZaberStage.from_axis``."""
        try:
            return cls(ZaberStage.from_axis(x_axis, **stage_options), ZaberStage.from_axis(y_axis, **stage_options))
        except UsageError as exc:  # the plate's own options (its device, its native unit), not the focus axis's
            text = functools.partial(lambda error, *labels: "XY plate: " + error._text(*labels), exc)
            raise (BadValue("plate", exc.fields, text) if isinstance(exc, BadValue)
                   else UsageError(text, "plate", exc.fields)) from exc

    @classmethod
    def from_device(cls, connection: Any, device: int, **stage_options: Any) -> ZaberPlate:
        """Device ``device``'s axis 2 as x and axis 1 as y (as in Zaber's examples)."""
        dev = connection.get_device(device)
        return cls.from_axes(dev.get_axis(2), dev.get_axis(1), **stage_options)

    @classmethod
    def from_microscope(cls, connection: Any, **stage_options: Any) -> ZaberPlate:
        """The plate ZML's ``Microscope.find`` identifies on the connection (UsageError when it
        finds none: then name the device, ``from_device``)."""
        zm = _zml()
        from zaber_motion.microscopy import Microscope  # noqa: PLC0415

        try:
            scope = Microscope.find(connection)
        except zm.exceptions.MotionLibException as exc:
            why = first_line(exc)
            raise UsageError(lambda d: f"ZML's microscope detection failed ({why}); name the XY plate's "
                             f"device ({d} N: x = its axis 2, y = axis 1)", "plate", ("device",)) from exc
        if scope.x_axis is None or scope.y_axis is None:
            raise UsageError(lambda d, nm: "ZML's microscope detection found no XY plate on this connection (no axis "
                             f"carries a zaber.microscope.part storage key of x and y); name its device with {d} N "
                             f"(x = its axis 2, y = axis 1) and its native unit with {nm} NM offline",
                             "plate", ("device", "native_unit_nm"))
        return cls.from_axes(scope.x_axis, scope.y_axis, **stage_options)

    def move_to(self, x_mm: float, y_mm: float) -> None:
        self.x.move_to(x_mm)
        self.y.move_to(y_mm)

    def position_mm(self) -> tuple[float, float]:
        return self.x.position_mm(), self.y.position_mm()

    def limits_mm(self) -> tuple[tuple[float, float], tuple[float, float]]:
        return self.x.limits_mm(), self.y.limits_mm()

    def stop(self) -> None:
        failures = []
        for axis in (self.x, self.y):  # both, even when the first one fails
            try:
                axis.stop()
            except StageError as exc:
                failures.append(exc)
        if failures:
            raise failures[0]

    axis_name = "the XY plate"

    @property  # type: ignore[override]
    def homed(self) -> bool:
        """Whether both axes have a reference position."""
        return self.x.homed and self.y.homed

    def home_if_needed(self) -> bool:
        """Home each axis that has no reference position (x first); True when one homed."""
        homed_x = self.x.home_if_needed()
        return self.y.home_if_needed() or homed_x

    @contextlib.contextmanager
    def run_scope(self, allowed_mm: tuple[tuple[float, float], tuple[float, float]]) -> Iterator[None]:
        """A focus map: positions rounded inside ``allowed_mm`` ((x_lo, x_hi), (y_lo, y_hi)) until it ends."""
        self.x._allowed_mm, self.y._allowed_mm = allowed_mm
        try:
            yield
        finally:
            self.x._allowed_mm = self.y._allowed_mm = None

    def describe(self) -> dict[str, Any]:
        """Both axes, as ZaberStage.describe (the unit from --xy-native-unit-nm, not the focus axis's option)."""
        def axis(stage: ZaberStage) -> dict[str, Any]:
            info = stage.describe()
            if info["units_from"] == "--native-unit-nm":
                info["units_from"] = "--xy-native-unit-nm"
            return info

        return {"x": axis(self.x), "y": axis(self.y)}


def describe_flag(flag: str) -> str:
    """"FS (Stalled and stopped)": the flag and its meaning, from ZML's WarningFlags names."""
    from zaber_motion.ascii import WarningFlags  # noqa: PLC0415 - ZML is loaded by now

    names = {v: k for k, v in vars(WarningFlags).items() if isinstance(v, str) and not k.startswith("_")}
    name = names.get(flag)
    return f"{flag} ({name.replace('_', ' ').capitalize()})" if name else flag


# What to check for a fault flag (meanings: ZML's warning_flags module and the Warning Flags
# section of the Zaber ASCII protocol manual).
FAULT_ADVICE = {
    "FS": "something may block the objective or the stage (a slide, a cable, the knob); check its path",
    "FQ": "the encoder reading may be unreliable (dirt, vibration, a loose peripheral); home the stage after checking",
    "FD": "the driver disabled itself (overheating); let it cool and check the load",
    "FO": "the driver is disabled; enable it (Zaber Launcher, or the 'driver enable' command)",
    "FH": "the hardware emergency stop is active; release it",
    "FV": "the supply voltage is out of range; check the power supply",
    "FM": "the motor is too hot; let it cool and check the load and duty cycle",
    "FC": "the current inrush protection tripped; check the power supply and the cabling",
    "FE": "a limit sensor cannot be reached or is faulty; check the stage's travel",
    "FF": "a critical system error; power-cycle the device and contact Zaber if it persists",
    "FZ": "the peripheral is inactive; check the stage's cable and connector",
    "FN": "the connected peripheral is not supported by the controller",
}


PYSPIN_HELP = (
    "the FLIR camera needs Teledyne FLIR's Spinnaker SDK and its PySpin wheel (not on PyPI): "
    "install the SDK and the spinnaker_python wheel matching your Python from Teledyne FLIR's "
    "download site, then pip install simple-pyspin; or use {}"
)
NO_CAMERA = "simulated_microscope() or replay_microscope()"  # the CLI names its options (option_labels)


def _pyspin() -> tuple[Any, Any]:
    """Import PySpin and simple-pyspin on first use."""
    spin, sp = lazy_import(UsageError(PYSPIN_HELP.format, "camera", (NO_CAMERA,)), "PySpin", "simple_pyspin")
    return spin, sp


class FlirCamera(GenicamAdapter):
    """A FLIR camera through simple-pyspin, streaming with a software trigger.

    Set-up, each change recorded in a SettingsJournal: a mono pixel format (Mono16 on a sensor deeper
    than 8 bits, else Mono8; a colour camera offering neither streams its 8/16-bit Bayer mosaic, which
    ``capture`` converts to gray; never a packed format); the sensor ROI (``roi``, rounded to the
    camera's increments); continuous acquisition with a software trigger; auto exposure and auto gain
    off (CameraError when the camera does not allow it); ``exposure_ms``; a frame timeout of at least
    the exposure plus CAMERA_TIMEOUT_MARGIN_MS.  Each ``capture`` drains stale buffers, triggers one
    exposure and waits for that frame, so no frame exposed before the call is returned.  ``close()``
    stops acquisition, puts back every node it changed and releases the camera (DeInit), whatever
    ended the run; a camera lent by the caller (``from_camera``) is only restored.
    """

    vendor, viewer = "FLIR camera", "SpinView"

    def __init__(self, serial: str | None = None, *, exposure_ms: float | None = None,
                 timeout_ms: int = DEFAULT_CAMERA_TIMEOUT_MS, roi: Roi | None = None, camera: Any = None) -> None:
        """Open the camera ``serial`` (default: the first one), or adapt ``camera`` (``from_camera``)."""
        check_values("camera", CAMERA_RULES, {"serial": serial, "exposure_ms": exposure_ms, "timeout_ms": timeout_ms,
                                              "roi": roi})
        spin, sp = _pyspin()
        if camera is not None:
            if not getattr(camera, "initialized", False):
                raise UsageError("FlirCamera.from_camera needs an initialised simple_pyspin.Camera: call its init() "
                                 "or open it with `with simple_pyspin.Camera() as cam:` first")
            self._setup(spin, sp, camera, owned=False, exposure_ms=exposure_ms, timeout_ms=timeout_ms, roi=roi)
            return
        name = f"the FLIR camera{' ' + serial if serial else ''}"
        try:
            cam = sp.Camera(serial if serial else 0)
        except (sp.CameraError, spin.SpinnakerException) as exc:
            raise CameraError(f"cannot open {name}: {first_line(exc)}; check the USB cable and that no other "
                              "program (SpinView) holds it") from exc
        try:
            cam.init()
        except spin.SpinnakerException as exc:  # Init failed: nothing to DeInit (it may be another's)
            with contextlib.suppress(Exception):
                cam.close()
            busy = getattr(exc, "errorcode", None) == -1004  # SPINNAKER_ERR_RESOURCE_IN_USE
            raise CameraError(f"cannot open {name}: {first_line(exc)}; " + (
                "another program (SpinView, another script) or an earlier run that was not closed still holds "
                "it: close that program, or unplug and replug the camera" if busy else
                "check the USB cable and that no other program (SpinView) holds it")) from exc
        except BaseException:  # Ctrl-C during init(): Init may have succeeded, so DeInit, or the next open fails
            _release_spin(cam)
            raise
        try:
            self._setup(spin, sp, cam, owned=True, exposure_ms=exposure_ms, timeout_ms=timeout_ms, roi=roi)
        except BaseException:  # _setup closes on its failures; a Ctrl-C before its own guard too
            _release_spin(cam)
            raise

    def _setup(self, spin: Any, sp: Any, cam: Any, *, owned: bool, exposure_ms: float | None,
               timeout_ms: int, roi: Roi | None) -> None:
        """Configure the camera for the sweep and start streaming; on any failure put it back."""
        super().__init__(cam, owned=owned, running=bool(getattr(cam, "running", False)), timeout_ms=timeout_ms,
                         read=lambda n: getattr(cam, n), write=lambda n, v: setattr(cam, n, v))
        self._spin, self._sp = spin, sp
        self._start(cam.stop, cam.start, (sp.CameraError, spin.SpinnakerException), exposure_ms, timeout_ms, roi)

    def _has(self, name: str) -> bool:
        return name in self._cam.camera_attributes

    def _entries(self, name: str) -> list[str]:
        """The entries of enumeration node ``name`` this camera offers."""
        spin = self._spin
        entries = (spin.CEnumEntryPtr(e) for e in self._cam.camera_attributes[name].GetEntries())
        return [e.GetSymbolic() for e in entries if spin.IsAvailable(e) and spin.IsReadable(e)]

    def _configure(self, exposure_ms: float | None, timeout_ms: int, roi: Roi | None) -> None:
        cam, journal = self._cam, self._journal
        self._set_pixel_format()
        if roi is not None:
            self._set_roi(roi)
        software_trigger(journal, self._has, self._entries)
        self._freeze_auto()
        if exposure_ms is not None:
            journal.set("ExposureTime", exposure_ms * 1000.0)
        exposure_now_ms = cam.ExposureTime / 1000.0 if self._has("ExposureTime") else 0.0
        self.timeout_ms = frame_timeout_ms(timeout_ms, exposure_now_ms)
        self._shape = (int(cam.Height), int(cam.Width))
        log.info("FLIR camera: %s %dx%d, exposure %.3f ms, frame timeout %d ms", self.pixel_format,
                 self._shape[1], self._shape[0], exposure_now_ms, self.timeout_ms)

    def _set_pixel_format(self) -> None:
        """Mono8/Mono16, or an unpacked Bayer format (converted to gray in ``capture``)."""
        spin, cam = self._spin, self._cam
        node = cam.camera_attributes.get("PixelFormat")
        if node is None:
            raise CameraError("the FLIR camera has no PixelFormat node: cannot tell what its frames hold")
        offered = self._entries("PixelFormat")
        if self._has("AdcBitDepth") and spin.IsReadable(cam.camera_attributes["AdcBitDepth"]):
            sensor_bits = format_bits(str(cam.AdcBitDepth))
        else:
            sensor_bits = offered_bits(offered)  # without AdcBitDepth, its 10/12/14-bit formats tell
        choice = choose_pixel_format(offered, sensor_bits)
        if choice is None:
            raise CameraError(f"the FLIR camera offers no pixel format this tool can score ({', '.join(offered)}); "
                              "it needs Mono8, Mono16 or an 8- or 16-bit Bayer format")
        self._journal.set("PixelFormat", choice)
        self.pixel_format = choice
        if choice.startswith("Bayer"):
            reported = None
            if self._has("PixelColorFilter") and spin.IsReadable(cam.camera_attributes["PixelColorFilter"]):
                reported = str(cam.PixelColorFilter)
            self._bayer_code = bayer_code(choice, reported)
            log.info("FLIR camera: colour sensor (%s): frames are converted to gray before scoring", choice)

    def _set_roi(self, roi: Roi) -> None:
        """The sensor's own ROI: fewer rows read, a faster read-out."""
        cam, attrs = self._cam, self._cam.camera_attributes
        self.roi = set_sensor_roi(self._journal, roi, (int(cam.WidthMax), int(cam.HeightMax)),
                                  {n: int(attrs[n].GetInc()) for n in ROI_NODES},
                                  (int(attrs["Width"].GetMin()), int(attrs["Height"].GetMin())),
                                  bayer=self._bayer_code is not None)

    def _freeze_auto(self) -> None:
        """Auto exposure and auto gain off for the sweep (see ``freeze_auto``)."""
        freeze_auto(self._journal, self._has, (self._sp.CameraError, self._spin.SpinnakerException),
                    "FLIR camera", "SpinView")

    def capture(self) -> np.ndarray:
        spin, raw = self._spin, self._cam.cam
        try:
            while True:  # drop anything exposed before now
                try:
                    stale = raw.GetNextImage(spin.EVENT_TIMEOUT_NONE)
                except spin.SpinnakerException:
                    break
                stale.Release()
            self._cam.TriggerSoftware()
            image = raw.GetNextImage(int(self.timeout_ms))  # the SDK wants a plain int
        except spin.SpinnakerException as exc:
            raise timeout_error(f"no frame from the FLIR camera within {self.timeout_ms} ms: {first_line(exc)}") from exc
        try:
            if image.IsIncomplete():
                raise CameraError(f"the FLIR camera delivered an incomplete frame (status {image.GetImageStatus()}); "
                                  "check the USB bandwidth")
            frame = np.array(image.GetNDArray(), copy=True)
        finally:
            image.Release()
        return self._gray(frame)

    def _stop(self) -> None:
        self._cam.stop()

    def _gone(self) -> bool:
        return not self._cam.cam.IsValid()

    def _restart(self) -> None:
        self._cam.start()

    def _release(self) -> None:
        _release_spin(self._cam)


def _release_spin(cam: Any) -> None:
    """Release a simple_pyspin Camera whatever state it is in; never raises, safe to repeat."""
    with contextlib.suppress(Exception):
        cam.cam.DeInit()  # simple_pyspin's close() does not: the next Init would fail (-1004)
    with contextlib.suppress(Exception):
        cam.close()


###############################################################################
# Backends: Basler camera (pypylon) ###########################################
###############################################################################
# pypylon is Basler's own wheel on PyPI with the pylon runtime inside; its camera emulator
# (PYLON_CAMEMU=N presents N emulated cameras) drives this adapter through the real SDK in tests.

PYPYLON_HELP = ("the Basler camera needs Basler's pypylon (on PyPI): pip install pypylon; "
                "or use {}")


def _pylon() -> tuple[Any, Any]:
    """Import pypylon on first use: (pylon, genicam)."""
    _, genicam, pylon = lazy_import(UsageError(PYPYLON_HELP.format, "camera", (NO_CAMERA,)), "pypylon",
                                    "pypylon.genicam", "pypylon.pylon")
    return pylon, genicam


class BaslerCamera(GenicamAdapter):
    """A Basler camera through pypylon, streaming with a software trigger (FlirCamera's contract).

    Set-up as FlirCamera's, with pylon's node names: the pixel format by ``choose_pixel_format``
    (Mono16 or an unpacked Mono12/10 on a sensor deeper than 8 bits, else Mono8; a packed one such as
    Mono12p only when nothing unpacked of that depth is offered, unpacked by pylon's
    ImageFormatConverter); the software trigger on FrameStart; ``exposure_ms`` as ExposureTime, or
    ExposureTimeAbs on older GigE cameras.

    ``serial`` chooses among several cameras (pylon Viewer shows it); without it the first one pylon
    lists is used (a warning names the others).  Each ``capture`` drains frames already delivered,
    waits until the camera accepts a trigger, triggers, and waits for that frame.
    """

    vendor, viewer = "Basler camera", "pylon Viewer"

    def __init__(self, serial: str | None = None, *, exposure_ms: float | None = None,
                 timeout_ms: int = DEFAULT_CAMERA_TIMEOUT_MS, roi: Roi | None = None, camera: Any = None) -> None:
        """Open the camera ``serial`` (default: the first one), or adapt ``camera`` (``from_camera``)."""
        check_values("camera", CAMERA_RULES, {"serial": serial, "exposure_ms": exposure_ms, "timeout_ms": timeout_ms,
                                              "roi": roi})
        pylon, genicam = _pylon()
        if camera is not None:
            if not (hasattr(camera, "IsOpen") and camera.IsOpen()):
                raise UsageError("BaslerCamera.from_camera needs an open pylon.InstantCamera: call its Open() first")
            self._setup(pylon, genicam, camera, owned=False, exposure_ms=exposure_ms, timeout_ms=timeout_ms, roi=roi)
            return
        try:
            factory = pylon.TlFactory.GetInstance()
            devices = list(factory.EnumerateDevices())
        except genicam.GenericException as exc:
            raise CameraError(f"cannot list the Basler cameras: {first_line(exc)}") from exc
        found = [d.GetSerialNumber() for d in devices]
        if not devices:
            raise CameraError("no Basler camera found: check its cable and power (a GigE camera must be on "
                              "this PC's subnet: pylon IP Configurator), and that pylon Viewer sees it "
                              "(PYLON_CAMEMU=1 presents an emulated one)")
        if serial:
            devices = [d for d in devices if d.GetSerialNumber() == serial]
            if not devices:
                raise CameraError(lambda o: f"{o} {serial}: no such Basler camera; found {', '.join(found)}",
                                  "camera", ("serial",))
        elif len(devices) > 1:
            log.warning("%d Basler cameras found (%s): using %s; choose one by its serial number",
                        len(devices), ", ".join(found), found[0])
        info = devices[0]
        name = f"the Basler camera {info.GetSerialNumber()}"
        cam: Any = None
        try:
            cam = pylon.InstantCamera(factory.CreateDevice(info))
            cam.Open()
        except genicam.GenericException as exc:
            _release_pylon(cam)
            raise CameraError(f"cannot open {name} ({info.GetModelName()}): {first_line(exc)}; another program "
                              "(pylon Viewer, another script) may hold it: close it, or unplug and replug the "
                              "camera") from exc
        except BaseException:  # Ctrl-C during Open(): close what was opened, or the next open finds it held
            _release_pylon(cam)
            raise
        try:
            self._setup(pylon, genicam, cam, owned=True, exposure_ms=exposure_ms, timeout_ms=timeout_ms, roi=roi)
        except BaseException:
            _release_pylon(cam)
            raise

    def _setup(self, pylon: Any, genicam: Any, cam: Any, *, owned: bool, exposure_ms: float | None,
               timeout_ms: int, roi: Roi | None) -> None:
        """Configure the camera for the sweep and start grabbing; on any failure put it back."""
        super().__init__(cam, owned=owned, running=bool(cam.IsGrabbing()), timeout_ms=timeout_ms,
                         read=lambda n: getattr(cam, n).Value, write=self._write)
        self._pylon, self._genicam = pylon, genicam
        self._converter: Any = None
        self.stale_frames = 0  # frames delivered before a capture began, dropped (diagnostics)
        self._start(cam.StopGrabbing, lambda: cam.StartGrabbing(pylon.GrabStrategy_OneByOne),
                    (genicam.GenericException,), exposure_ms, timeout_ms, roi)

    def _write(self, name: str, value: Any) -> None:
        getattr(self._cam, name).Value = value

    def _has(self, name: str) -> bool:
        node = self._cam.GetNodeMap().GetNode(name)
        return node is not None and self._genicam.IsAvailable(node)

    def _configure(self, exposure_ms: float | None, timeout_ms: int, roi: Roi | None) -> None:
        cam, journal = self._cam, self._journal
        self._set_pixel_format()
        if roi is not None:
            self.roi = set_sensor_roi(journal, roi, (int(cam.WidthMax.Value), int(cam.HeightMax.Value)),
                                      {n: int(getattr(cam, n).Inc) for n in ROI_NODES},
                                      (int(cam.Width.Min), int(cam.Height.Min)), bayer=self._bayer_code is not None)
        software_trigger(journal, self._has, lambda name: list(getattr(cam, name).Symbolics))
        freeze_auto(journal, self._has, (self._genicam.GenericException,), "Basler camera", "pylon Viewer")
        exposure = next((n for n in ("ExposureTime", "ExposureTimeAbs") if self._has(n)), None)
        if exposure_ms is not None:
            if exposure is None:
                raise CameraError(lambda o: f"the Basler camera has no ExposureTime node: {o} cannot be set; "
                                  "drop it and set the exposure in pylon Viewer", "camera", ("exposure_ms",))
            journal.set(exposure, exposure_ms * 1000.0)
        exposure_now_ms = getattr(cam, exposure).Value / 1000.0 if exposure else 0.0
        self.timeout_ms = frame_timeout_ms(timeout_ms, exposure_now_ms)
        self._shape = (int(cam.Height.Value), int(cam.Width.Value))
        log.info("Basler camera %s: %s %dx%d, exposure %.3f ms, frame timeout %d ms",
                 cam.GetDeviceInfo().GetSerialNumber(), self.pixel_format, self._shape[1], self._shape[0],
                 exposure_now_ms, self.timeout_ms)

    def _set_pixel_format(self) -> None:
        """Mono, an unpacked Bayer format (gray in ``capture``), or a packed one pylon unpacks."""
        pylon, cam = self._pylon, self._cam
        if not self._has("PixelFormat"):
            raise CameraError("the Basler camera has no PixelFormat node: cannot tell what its frames hold")
        offered = list(cam.PixelFormat.Symbolics)  # the entries available now
        choice = choose_pixel_format(offered, offered_bits(offered), packed_ok=True)
        if choice is None:
            raise CameraError(f"the Basler camera offers no pixel format this tool can score ({', '.join(offered)}); "
                              "it needs a Mono or a Bayer format")
        self._journal.set("PixelFormat", choice)
        self.pixel_format = choice
        if is_packed(choice):  # Mono12p, BayerRG12Packed...: pylon unpacks (and demosaics) to Mono16
            self._converter = pylon.ImageFormatConverter()
            self._converter.OutputPixelFormat = pylon.PixelType_Mono16
            log.info("Basler camera: %s frames are unpacked to Mono16 by pylon's converter", choice)
        elif choice.startswith("Bayer"):
            reported = None
            if self._has("PixelColorFilter") and self._genicam.IsReadable(cam.PixelColorFilter.Node):
                reported = str(cam.PixelColorFilter.Value)
            self._bayer_code = bayer_code(choice, reported)
            log.info("Basler camera: colour sensor (%s): frames are converted to gray before scoring", choice)

    def capture(self) -> np.ndarray:
        pylon, genicam, cam = self._pylon, self._genicam, self._cam
        try:
            while True:  # drop anything delivered before now
                stale = cam.RetrieveResult(0, pylon.TimeoutHandling_Return)
                if not stale.IsValid():
                    break
                stale.Release()
                self.stale_frames += 1
            if not cam.WaitForFrameTriggerReady(int(self.timeout_ms), pylon.TimeoutHandling_Return):
                raise timeout_error(f"the Basler camera was not ready for a trigger within {self.timeout_ms} ms")
            cam.ExecuteSoftwareTrigger()
            result = cam.RetrieveResult(int(self.timeout_ms), pylon.TimeoutHandling_ThrowException)
        except genicam.GenericException as exc:
            raise timeout_error(f"no frame from the Basler camera within {self.timeout_ms} ms: {first_line(exc)}") from exc
        try:
            if not result.GrabSucceeded():
                raise CameraError(f"the Basler camera delivered a failed frame ({result.GetErrorDescription()}, "
                                  f"code {result.GetErrorCode():#x}); check the USB3 bandwidth or the GigE packet "
                                  "size (README, Basler camera)")
            if self._converter is not None:
                frame = np.array(self._converter.Convert(result).GetArray(), copy=True)
            else:
                frame = np.array(result.GetArray(), copy=True)
        except genicam.GenericException as exc:
            raise CameraError(f"cannot read the Basler camera's {self.pixel_format} frame: {first_line(exc)}") from exc
        finally:
            result.Release()
        return self._gray(frame)

    def _stop(self) -> None:
        self._cam.StopGrabbing()

    def _gone(self) -> bool:
        return bool(self._cam.IsCameraDeviceRemoved()) or not self._cam.IsOpen()

    def _restart(self) -> None:
        self._cam.StartGrabbing()

    def _release(self) -> None:
        _release_pylon(self._cam)


def _release_pylon(cam: Any) -> None:
    """Close a pylon InstantCamera and release its device; never raises, safe to repeat."""
    if cam is None:
        return
    with contextlib.suppress(Exception):
        cam.Close()
    with contextlib.suppress(Exception):
        cam.DestroyDevice()


# The live cameras --camera can name (besides "sim"); each takes (serial, *, exposure_ms, timeout_ms, roi).
LIVE_CAMERAS: dict[str, Callable[..., Any]] = {"flir": FlirCamera, "basler": BaslerCamera}

###############################################################################
# Backends: simulated microscope ##############################################
###############################################################################
# Defaults model the seed's hardware.  Sources: BFLY-U3-23S6M (Sony IMX249): 1920x1200, 5.86 um
# pixels, 41 fps (datasheet); read noise 7 e- (estimate for IMX249); X-LDA025A focus stage: 25 mm
# travel (datasheet), speed and settle (estimates); a 4x / NA 0.10 objective (estimate: a typical MVR one).


@dataclasses.dataclass(frozen=True)
class SimTiming:
    """Modelled hardware time, seconds.  ``scale`` 0 runs as fast as the host can."""

    command_s: float = 0.005  # ZML request + reply over USB serial (estimate)
    poll_s: float = 0.010  # idle polling period we set in ZML
    speed_mm_s: float = 40.0  # X-LDA025A cruise speed for short focus moves (estimate)
    accel_mm_s2: float = 2000.0  # (estimate)
    settle_s: float = 0.010  # direct-drive settle at ~1 um (estimate)
    exposure_s: float = 0.010  # (estimate; set by the user on hardware)
    readout_s: float = 1.0 / 41.0  # 41 fps at 1920x1200 (datasheet)
    acquisition_start_stop_s: float = 0.100  # one-shot BeginAcquisition/EndAcquisition (estimate, 50-150 ms)
    scale: float = 1.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # SIM_RULES; ``scale`` is simulated_microscope's time_scale
            name = "time_scale" if f.name == "scale" else f.name
            object.__setattr__(self, f.name, check_value("simulator", name, getattr(self, f.name), SIM_RULES[name]))

    def move_s(self, distance_mm: float) -> float:
        """Trapezoidal move time plus settle, rounded up to ZML's idle polls."""
        d = abs(distance_mm)
        t_acc = self.speed_mm_s / self.accel_mm_s2
        if d < self.speed_mm_s * t_acc:
            t = 2 * math.sqrt(d / self.accel_mm_s2)
        else:
            t = 2 * t_acc + (d - self.speed_mm_s * t_acc) / self.speed_mm_s
        t += self.settle_s
        return self.command_s + math.ceil(t / self.poll_s) * self.poll_s

    def readout_rows_s(self, rows: int, sensor_rows: int) -> float:
        """Read-out of ``rows`` of a ``sensor_rows``-row sensor: a CMOS sensor reads row by row,
        so a sensor ROI of fewer rows reads out proportionally faster (estimate: FLIR and Sony
        quote frame rates rising about in inverse proportion to the ROI height)."""
        return self.readout_s * rows / sensor_rows


@dataclasses.dataclass(frozen=True)
class SimOptics:
    """The simulated microscope's optics, specimen and sensor (deterministic for a seed)."""

    focus_mm: float = 12.34
    magnification: float = 4.0
    na: float = 0.10
    immersion_index: float = 1.0  # refractive index between objective and specimen: 1.0 air (dry)
    wavelength_um: float = 0.55
    pixel_um: float = 5.86  # camera pixel
    width: int = 1920
    height: int = 1200
    photons: float = 1000.0  # mean photons per pixel at the brightest structure
    read_noise_e: float = 7.0
    bit_depth: int = 8
    specimen: Specimen = "cells"  # "dusty": cells, plus dust on the coverslip above them
    dust_height_mm: float = 0.17  # "dusty": the dust plane lies this far above the cells (a #1.5 coverslip)
    phase_rad: float = 1.5  # "transparent": the phase delay through a cell's centre, radians
    condenser_na: float = 0.3  # "transparent": brightfield condenser aperture (partial coherence)
    seed: int = 0
    # A two-region field (for --roi): the right half of the frame shows right_specimen (default:
    # the same specimen) in the plane right_focus_mm (default: focus_mm); None, None = one plane.
    right_specimen: Specimen | None = None
    right_focus_mm: float | None = None
    # How defocus blurs: "gaussian" (a Gaussian of the geometric blur disc's second moment) or
    # "pillbox" (the geometric blur disc itself, a uniform disc, as ray optics has it).
    defocus: DefocusModel = "gaussian"
    specimen_image: str | None = None  # a micrograph (file path) in place of the synthetic cells

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # every value against SIM_RULES (as the tool uses it), then together
            object.__setattr__(self, f.name, check_value("simulator", f.name, getattr(self, f.name), SIM_RULES[f.name]))
        if self.width * self.height > MAX_SIM_PIXELS:
            raise BadValue("simulator", ("width",), lambda a: (
                f"{a}: a {self.width}x{self.height} frame is too large: at most {MAX_SIM_PIXELS / 1e6:g} MP in all"))
        if self.na >= self.immersion_index:
            raise BadValue("simulator", ("na", "immersion_index"), lambda a, b: (
                f"{a} {self.na:g} must be below {b} {self.immersion_index:g} (NA = n sin(half-angle))"))

    @property
    def sample_pixel_um(self) -> float:
        """One camera pixel, in the specimen plane."""
        return self.pixel_um / self.magnification

    @property
    def depth_of_field_um(self) -> float:
        """Wave-optical plus geometric depth of field, n lambda / NA^2 + n e / (M NA) (Inoue;
        Nikon MicroscopyU, "Depth of field and depth of focus")."""
        n = self.immersion_index
        return n * self.wavelength_um / self.na**2 + n * self.pixel_um / (self.magnification * self.na)

    def diffraction_sigma_px(self) -> float:
        """The in-focus PSF: a Gaussian of sigma ~ 0.21 lambda/NA (the Airy disc), in pixels."""
        return 0.21 * self.wavelength_um / self.na / self.sample_pixel_um

    def blur_radius_px(self, defocus_mm: float) -> float:
        """Radius of the geometric blur disc, pixels: |dz| tan(theta), theta = asin(NA/n) the
        half-angle of the light cone (at NA 0.85 that is 1.61 |dz|, not the small-angle 0.85 |dz|)."""
        half_angle = math.asin(min(self.na / self.immersion_index, 1.0))
        return math.tan(half_angle) * abs(defocus_mm) * 1000.0 / self.sample_pixel_um

    def blur_sigma_px(self, defocus_mm: float) -> float:
        """PSF sigma in pixels (the "gaussian" model): diffraction plus geometric defocus blur.

        A Gaussian of sigma = radius / 2 matches the blur disc's second moment.  Near focus
        diffraction dominates: that flat top is the depth of field.
        """
        return math.hypot(self.diffraction_sigma_px(), self.blur_radius_px(defocus_mm) / 2.0)

    def blur(self, image: np.ndarray, defocus_mm: float) -> np.ndarray:
        """``image`` as seen ``defocus_mm`` from its plane, by the ``defocus`` model."""
        if self.defocus == "pillbox":
            return blur_pillbox(image, self.blur_radius_px(defocus_mm), self.diffraction_sigma_px())
        return blur_sigma(image, self.blur_sigma_px(defocus_mm))

    def texture(self) -> np.ndarray:
        """The in-focus specimen of "cells" and "dusty": the synthetic culture, or ``specimen_image``."""
        if self.specimen_image is not None:
            return specimen_from_image(self.specimen_image, self.width, self.height)
        return make_specimen(self.width, self.height, "cells", self.seed)


# Objectives the simulator offers (--sim-objective): magnification, NA, immersion index.  Plan
# achromats/fluorites as found on Zaber MVR and other inverted microscopes.  Choose STEP about
# one depth of field (SimOptics.depth_of_field_um; README, "The simulated microscope").
OBJECTIVES: dict[str, tuple[float, float, float]] = {
    "4x": (4.0, 0.10, 1.0),  # DOF ~70 um: STEP 0.05 mm
    "10x": (10.0, 0.25, 1.0),  # DOF ~11 um: STEP 0.01 mm
    "20x": (20.0, 0.40, 1.0),  # DOF ~4.2 um: STEP 0.004 mm
    "40x": (40.0, 0.65, 1.0),  # DOF ~1.5 um: STEP 0.0015 mm
    "60x": (60.0, 0.85, 1.0),  # DOF ~0.9 um: STEP 0.001 mm
    "60x-oil": (60.0, 1.40, 1.515),  # DOF ~0.5 um: STEP 0.0005 mm
    "100x": (100.0, 1.40, 1.515),  # oil; DOF ~0.5 um: STEP 0.0005 mm
}
IMMERSION = {"": 1.0, "air": 1.0, "water": 1.33, "glycerol": 1.47, "oil": 1.515}


def objective_optics(name: str) -> dict[str, float]:
    """SimOptics fields for an objective: a name of OBJECTIVES, or MAGx/NA[/MEDIUM] (20x/0.75,
    100x/1.3/oil; the medium air, water, glycerol or oil, air by default)."""
    m = None if name in OBJECTIVES or not isinstance(name, str) else re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*[xX]\s*/\s*(\d*\.?\d+)\s*(?:/\s*([a-z]+))?\s*", str(name))
    if m and m.group(3) in (None, *IMMERSION):
        magnification, na, n = float(m.group(1)), float(m.group(2)), IMMERSION[m.group(3) or ""]
        if 1 <= magnification <= 200 and 0.01 <= na < n:
            return {"magnification": magnification, "na": na, "immersion_index": n}
    if m is not None or (isinstance(name, str) and name not in OBJECTIVES):
        raise BadValue("request", ("objective",), lambda label: (
            f"{label}: {name!r} is not an objective; give one of {', '.join(OBJECTIVES)} or MAGx/NA[/MEDIUM] (e.g. "
            "20x/0.75, 100x/1.3/oil; the NA below the medium's index: air 1, water 1.33, oil 1.515)"))
    magnification, na, n = OBJECTIVES[check_value("simulator", "objective", name, SIM_RULES["objective"])]
    return {"magnification": magnification, "na": na, "immersion_index": n}


def depth_of_field_um(objective: str) -> float:
    """The depth of field of an objective (``objective_optics``), for green light and the
    simulator's 5.86 um camera pixels: n lambda / NA^2 + n e / (M NA)."""
    return SimOptics(**objective_optics(objective)).depth_of_field_um


def objective_line(objective: str, step_mm: float) -> str:
    """One line for --objective: its depth of field, the STEP it suggests, and the STEP given."""
    lens = objective_optics(objective)
    dof_mm = depth_of_field_um(objective) / 1000.0
    ratio = step_mm / dof_mm
    line = (f"objective {lens['magnification']:g}x/{lens['na']:g}: depth of field {_length(dof_mm)}, STEP "
            f"{_round_step(dof_mm):g} mm suits it; STEP {step_mm:g} mm is {ratio:.2g} depths of field")
    if ratio > 2:
        return line + ": coarser than the depth of field, a focus between two frames can be missed (and is " \
                      f"known only to \N{PLUS-MINUS SIGN}STEP/2); use STEP {_round_step(dof_mm):g} mm"
    if ratio < 0.25:
        return line + ": finer than needed (more frames, no better answer); STEP " \
                      f"{_round_step(dof_mm):g} mm is enough"
    return line


SECONDS_RULE = Rule("number", 0.0, 60.0, " s")
# Every option of the simulated microscope (SimOptics, SimTiming, simulated_microscope()): what it
# models.  A new option is one row here (and a field, and a --sim-* option with a row in SIM_OPTIONS).
SIM_RULES: dict[str, Rule] = {
    # SimOptics: optics, specimen and sensor
    "focus_mm": POSITION_RULE,
    "magnification": Rule("number", 0.0, 500.0, above=True),
    "na": Rule("number", 0.0, 1.7, above=True),
    "immersion_index": Rule("number", 1.0, 2.0),
    "wavelength_um": Rule("number", 0.2, 2.0, " um"),
    "pixel_um": Rule("number", 0.0, 100.0, " um", above=True),
    "width": Rule("whole", 16, 10000, " pixels"),
    "height": Rule("whole", 16, 10000, " pixels"),
    "photons": Rule("number", 0.01, MAX_SIM_PHOTONS),
    "read_noise_e": Rule("number", 0.0, 1000.0, " e"),
    "bit_depth": Rule("whole", choices=(8, 12, 16)),
    "specimen": Rule("choice", choices=SIM_SPECIMENS),
    "dust_height_mm": Rule("number", -5.0, 5.0, " mm"),
    "phase_rad": Rule("number", 0.0, 20.0, " rad"),
    "condenser_na": Rule("number", 0.0, 1.4, above=True),
    "seed": Rule("whole", 0, 2**32 - 1),
    "right_specimen": Rule("choice", choices=SIM_SPECIMENS, optional=True),
    "right_focus_mm": dataclasses.replace(POSITION_RULE, optional=True),
    # SimTiming: modelled hardware time
    "command_s": SECONDS_RULE,
    "poll_s": Rule("number", 0.0, 1.0, " s", above=True),
    "speed_mm_s": Rule("number", 0.0, 1000.0, " mm/s", above=True),
    "accel_mm_s2": Rule("number", 0.0, 1e6, " mm/s^2", above=True),
    "settle_s": SECONDS_RULE,
    "exposure_s": SECONDS_RULE,
    "readout_s": SECONDS_RULE,
    "acquisition_start_stop_s": SECONDS_RULE,
    "time_scale": Rule("number", 0.0, MAX_SIM_TIME_SCALE),
    # simulated_microscope(): the stage and the session
    "start_mm": POSITION_RULE,
    "travel_mm": Rule("interval", hi=MAX_ABS_POSITION_MM, unit=" mm"),
    "one_shot": Rule("flag"),
    "camera_roi": Rule("roi", optional=True),
    "objective": Rule("choice", choices=tuple(OBJECTIVES), optional=True),
    # The defocus model and a micrograph as the specimen
    "defocus": Rule("choice", choices=DEFOCUS_MODELS),
    "specimen_image": Rule("text", optional=True),
}


@functools.lru_cache(maxsize=4)
def make_specimen(width: int, height: int, kind: Specimen = "cells", seed: int = 0) -> np.ndarray:
    """A deterministic synthetic specimen, relative brightness 0..1 (float32, height x width).

    "cells": cell bodies with a bright membrane and nucleus, granules, filaments and a fibrous
    texture, on a dim background.  "blank": even, gently vignetted light, nothing to focus on.
    "dust": a transmission mask (1 = clear) with sparse dark specks and fibres ("dusty"'s dust plane).
    "phase": the phase map of an unstained culture (smooth bumps; 1 = a cell's full delay), for the
    "transparent" specimen.
    """
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    cx, cy = width / 2.0, height / 2.0
    vignette = 1.0 - 0.15 * (((xx - cx) / cx) ** 2 + ((yy - cy) / cy) ** 2) / 2.0
    if kind == "blank":
        return (0.6 * vignette).astype(np.float32)
    rng = np.random.default_rng(seed)
    if kind == "phase":  # an unstained culture: phase delay (in units of one cell's), no absorption
        phase = np.zeros((height, width), np.float32)
        for _ in range(max(2, int(width * height / 110**2))):
            c = (int(rng.uniform(0, width)), int(rng.uniform(0, height)))
            axes = (int(rng.uniform(14, 28)), int(rng.uniform(9, 18)))
            angle = float(rng.uniform(0, 180))
            cv2.ellipse(phase, c, axes, angle, 0, 360, 0.7, -1)  # cell body
            cv2.ellipse(phase, c, (max(2, axes[0] // 3), max(2, axes[1] // 3)), angle, 0, 360, 1.0, -1)  # nucleus
            for _ in range(10):  # granules
                g = (c[0] + int(rng.normal(0, axes[0] / 2.5)), c[1] + int(rng.normal(0, axes[1] / 2.5)))
                cv2.circle(phase, g, 1, 0.9, -1)
        return cv2.GaussianBlur(phase, (0, 0), 1.5)  # smooth bumps: cells are lenses, not steps
    if kind == "dust":  # a transmission mask: clear glass with sparse dark specks and lint fibres
        mask = np.ones((height, width), np.float32)
        for _ in range(max(3, int(width * height / 1500))):
            cv2.circle(mask, (int(rng.uniform(0, width)), int(rng.uniform(0, height))),
                       int(rng.integers(1, 5)), float(rng.uniform(0.0, 0.3)), -1)
        for _ in range(max(1, int(width * height / 100**2))):
            p0 = np.array([rng.uniform(0, width), rng.uniform(0, height)])
            p1 = p0 + rng.uniform(-60, 60, 2)
            cv2.line(mask, tuple(int(v) for v in p0), tuple(int(v) for v in p1), 0.1, 2, cv2.LINE_AA)
        return mask
    img = np.full((height, width), 0.12, np.float32)
    texture = rng.standard_normal((height, width)).astype(np.float32)
    img += 0.03 * cv2.GaussianBlur(texture, (0, 0), 1.2) / 0.25  # fibrous background texture
    # Sizes are in pixels of the 4x objective's 1.465 um sample pixel: cells 25-80 um across.
    n_cells = max(2, int(width * height / 110**2))
    for _ in range(n_cells):
        c = (int(rng.uniform(0, width)), int(rng.uniform(0, height)))
        axes = (int(rng.uniform(14, 28)), int(rng.uniform(9, 18)))
        angle = float(rng.uniform(0, 180))
        cv2.ellipse(img, c, axes, angle, 0, 360, 0.35, -1)
        cv2.ellipse(img, c, axes, angle, 0, 360, 0.75, 2)  # membrane
        nucleus = (max(2, axes[0] // 3), max(2, axes[1] // 3))
        offset = (c[0] + int(rng.uniform(-0.2, 0.2) * axes[0]), c[1] + int(rng.uniform(-0.2, 0.2) * axes[1]))
        cv2.ellipse(img, offset, nucleus, angle, 0, 360, 0.9, -1)
        for _ in range(10):  # granules
            g = (c[0] + int(rng.normal(0, axes[0] / 2.5)), c[1] + int(rng.normal(0, axes[1] / 2.5)))
            cv2.circle(img, g, 1, 0.65, -1)
    for _ in range(max(1, int(width * height / 300**2))):  # filaments
        pts = [np.array([rng.uniform(0, width), rng.uniform(0, height)])]
        heading = rng.uniform(0, 2 * np.pi)
        for _ in range(40):
            heading += rng.normal(0, 0.25)
            pts.append(pts[-1] + 5.0 * np.array([np.cos(heading), np.sin(heading)]))
        cv2.polylines(img, [np.array(pts, np.int32)], False, 0.55, 1, cv2.LINE_AA)
    img = cv2.GaussianBlur(img, (0, 0), 0.5)  # no structure finer than the optics pass
    return np.clip(img * vignette, 0.0, 1.0).astype(np.float32)


def blur_sigma(image: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian blur of any width in a few ms: halve the image until sigma is small, then upsample."""
    h, w = image.shape
    small, s = image, min(sigma_px, FLAT_BLUR_FRAMES * max(h, w))  # wider: the same (nearly flat) field
    while s > 3.0 and min(small.shape) > 32:
        small = cv2.pyrDown(small)  # pyrDown itself blurs by ~1 source pixel
        s = math.sqrt(max(s * s - 1.0, 0.0)) / 2.0
    if s > BOX_ABOVE_PX:  # a strip of a frame: three box passes (each O(1) a pixel) have the variance
        for _ in range(3):  # s^2, where a kernel of 6 s taps would take minutes
            small = _wide_box(small, 2.0 * s)
    elif s > 0.3:
        small = cv2.GaussianBlur(small, (0, 0), s)
    if small.shape != image.shape:
        small = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    return small


def _wide_box(image: np.ndarray, side_px: float) -> np.ndarray:
    """A box blur ``side_px`` wide, mirrored at the borders; along an axis shorter than half of it
    the box is that axis's mirrored period, its mean (a wider one would pad the image to its size)."""
    h, w = image.shape
    side = max(1, int(round(side_px)))
    return cv2.blur(image, (min(side, 2 * w), min(side, 2 * h)), borderType=cv2.BORDER_REFLECT)


@functools.lru_cache(maxsize=64)
def disc_kernel(radius_px: float) -> np.ndarray:
    """A uniform disc of this radius (the geometric blur of defocus), anti-aliased: each tap is
    the share of its pixel inside the circle (8x8 sub-samples, 2x2 beyond 24 pixels, where the rim
    is a small part of the disc and 8x8 would take hundreds of MB); a delta below half a pixel."""
    n = int(math.ceil(radius_px + 0.5))
    k = 8 if radius_px <= 24 else 2
    sub = (np.arange(k) + 0.5) / k - 0.5
    offsets = (np.arange(-n, n + 1)[:, None] + sub[None, :]).ravel()
    inside = (offsets[:, None] ** 2 + offsets[None, :] ** 2) <= radius_px**2
    taps = inside.reshape(2 * n + 1, k, 2 * n + 1, k).mean(axis=(1, 3)).astype(np.float32)
    if taps.sum() <= taps[n, n] or radius_px < 0.5:
        taps = np.zeros_like(taps)
        taps[n, n] = 1.0
    return taps / taps.sum()


def blur_pillbox(image: np.ndarray, radius_px: float, sigma_px: float) -> np.ndarray:
    """A uniform disc of ``radius_px`` after a Gaussian of ``sigma_px`` (diffraction); large discs
    on a halved image (pyrDown's own ~1 pixel blur is small beside a disc of 12+ pixels)."""
    h, w = image.shape
    small = blur_sigma(image, sigma_px)
    r = min(radius_px, FLAT_BLUR_FRAMES * max(h, w))  # wider: the same (nearly flat) field
    while r > 12.0 and min(small.shape) > 64:
        small = cv2.pyrDown(small)
        r /= 2.0
    if r > BOX_ABOVE_PX:  # a strip of a frame: a box of the disc's area (a disc kernel that wide is GBs)
        small = _wide_box(small, r * math.sqrt(math.pi))
    elif r >= 0.5:
        small = cv2.filter2D(small, -1, disc_kernel(round(r, 2)), borderType=cv2.BORDER_REFLECT)
    if small.shape != image.shape:
        small = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    return small


@functools.lru_cache(maxsize=4)
def specimen_from_image(path: str, width: int, height: int) -> np.ndarray:
    """A micrograph as the simulated specimen: gray, relative brightness 0..1 (its 99.9th
    percentile is 1), the frame's size taken from its centre, or mirrored tiles of it when it
    is smaller.  It is the in-focus specimen: use a sharp image (a stack's best slice)."""
    gray = to_gray_float(read_image(Path(path), f"specimen image {path}"))
    top = float(np.percentile(gray, 99.9))
    if not top > 0:
        raise UsageError(f"specimen image {path} is black; use a micrograph with some light in it")
    gray = np.clip(gray / np.float32(top), 0.0, 1.0)
    h, w = gray.shape
    if h < height or w < width:  # mirrored tiles: no seams, no rescaling (the image keeps its sharpness)
        gray = np.pad(gray, ((0, max(0, height - h)), (0, max(0, width - w))), mode="symmetric")
        h, w = gray.shape
    y, x = (h - height) // 2, (w - width) // 2
    return np.ascontiguousarray(gray[y: y + height, x: x + width], dtype=np.float32)


class SimClock:
    """Modelled hardware seconds, and real sleeping scaled by ``scale`` (0: no sleeping)."""

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale
        self.modeled_s = 0.0

    def spend(self, seconds: float, since: float | None = None) -> None:
        """Account ``seconds`` of hardware time; sleep what the host has not already spent."""
        self.modeled_s += seconds
        if self.scale > 0:
            already = 0.0 if since is None else time.perf_counter() - since
            remaining = seconds * self.scale - already
            if remaining > 0:
                time.sleep(remaining)


class SimStage(StageDefaults):
    """A simulated focus stage: travel 0-25 mm like the X-LDA025A, with modelled move time."""

    def __init__(self, travel_mm: tuple[float, float] = (0.0, 25.0), position_mm: float = 0.0,
                 timing: SimTiming | None = None, clock: SimClock | None = None) -> None:
        self.travel = travel_mm
        self.z = position_mm
        self.timing = timing or SimTiming()
        self.clock = clock or SimClock(self.timing.scale)

    def limits_mm(self) -> tuple[float, float]:
        return self.travel

    def position_mm(self) -> float:
        return self.z

    def move_to(self, z_mm: float) -> None:
        lo, hi = self.travel
        if not lo - FLOAT_SLACK_MM <= z_mm <= hi + FLOAT_SLACK_MM:
            raise StageError(f"simulated stage rejected a move to {z_mm} mm: outside the travel {lo}..{hi} mm")
        self.clock.spend(self.timing.move_s(z_mm - self.z))
        self.z = z_mm

    def stop(self) -> None:
        pass


class SimCamera:
    """Renders what the stage's position would show through the simulated optics.

    Streaming with a software trigger (exposure + readout per frame) by default; ``one_shot`` adds an
    acquisition start/stop per frame, as the seed's loop does.  ``roi`` (x, y, w, h) crops the frame
    like a sensor ROI, and the modelled read-out shrinks with the rows read.
    """

    def __init__(self, stage: Stage, optics: SimOptics | None = None, timing: SimTiming | None = None,
                 clock: SimClock | None = None, one_shot: bool = False, roi: Roi | None = None) -> None:
        self.stage = stage
        self.optics = optics or SimOptics()
        self.timing = timing or SimTiming()
        self.clock = clock or SimClock(self.timing.scale)
        self.one_shot = one_shot
        self.frames = 0
        self.roi = None if roi is None else fit_roi(roi, (self.optics.width, self.optics.height))
        # The lamp's brightness for frame k, relative (None: steady): flicker, warm-up, slow drift.
        # It scales the light before shot noise and the camera's fixed gain, as a real lamp does.
        self.lamp: Callable[[int], float] | None = None
        # Uneven illumination (a gradient across the field): relative light per pixel, in the light
        # path rather than the specimen plane, so defocus does not blur it (None: even).
        self.illumination: np.ndarray | None = None

    def render(self, z_mm: float) -> np.ndarray:
        """The frame at z: defocus blur, shot noise, read noise, quantisation."""
        o = self.optics
        if o.specimen == "transparent":
            blurred = self.render_phase(z_mm)
        elif o.specimen == "blank":  # an even field: defocus changes nothing (resampling it in
            blurred = make_specimen(o.width, o.height, "blank", o.seed)  # blur_sigma would add ripples)
        else:
            blurred = o.blur(o.texture(), z_mm - o.focus_mm)
        if o.specimen == "dusty":  # dust on the coverslip, in its own plane: bright specks and lint
            # (scattered light, as dust and autofluorescent fibres look on this dark-background field)
            dust = make_specimen(o.width, o.height, "dust", o.seed)
            blurred = blurred + 0.8 * (1.0 - o.blur(dust, z_mm - o.focus_mm - o.dust_height_mm))
        if o.right_specimen is not None or o.right_focus_mm is not None:
            right_plane = o.focus_mm if o.right_focus_mm is None else o.right_focus_mm
            kind = o.right_specimen or o.specimen
            right = o.blur(make_specimen(o.width, o.height, "blank", o.seed) if kind == "blank" else o.texture(),
                           z_mm - right_plane)
            half = o.width // 2  # a new array: blur_sigma may return the cached specimen itself
            blurred = np.concatenate([blurred[:, :half], right[:, half:]], axis=1)
        if self.illumination is not None:
            blurred = blurred * self.illumination
        electrons = blurred * np.float32(o.photons * (1.0 if self.lamp is None else self.lamp(self.frames)))
        noise = np.empty_like(electrons)
        # OpenCV's RNG is faster than numpy's normals but per-thread and global: seeding it from
        # (seed, frame number) right before use keeps every camera's frames reproducible.
        cv2.setRNGSeed((self.optics.seed * 1_000_003 + self.frames + 1) % (2**31 - 1))
        cv2.randn(noise, 0.0, 1.0)
        self.frames += 1
        # Shot noise (Gaussian approximation of Poisson, fine above ~10 photons) plus read noise.
        electrons += noise * np.sqrt(electrons + np.float32(o.read_noise_e**2))
        full_scale = (1 << o.bit_depth) - 1
        gain = 0.8 * full_scale / o.photons  # the brightest structure sits at 80% of full scale
        dn = np.clip(electrons * np.float32(gain), 0, full_scale)
        return dn.astype(np.uint8 if o.bit_depth <= 8 else np.uint16)

    def render_phase(self, z_mm: float) -> np.ndarray:
        """An unstained specimen in partially coherent brightfield, relative intensity.

        Transport of intensity to first order in defocus: I = I0 (1 - dz lambda/(2 pi) lap(phi)),
        so contrast vanishes at focus and grows, with opposite signs, on either side.  The
        condenser aperture (illumination NA, at most the objective's) adds a blur growing with
        defocus, |dz| tan(asin(NA_c)) / 2, which fades the contrast again farther out.
        """
        o = self.optics
        phase = o.phase_rad * make_specimen(o.width, o.height, "phase", o.seed)
        laplacian = cv2.Laplacian(phase, cv2.CV_32F) / np.float32(o.sample_pixel_um**2)  # rad / um^2
        dz_um = (z_mm - o.focus_mm) * 1000.0
        contrast = np.float32(-dz_um * o.wavelength_um / (2 * math.pi)) * laplacian
        na_c = min(o.condenser_na, o.na)
        sigma_c = math.tan(math.asin(min(na_c / o.immersion_index, 1.0))) * abs(dz_um) / 2.0 / o.sample_pixel_um
        if o.defocus == "pillbox":  # the condenser's blur disc itself
            blurred = blur_pillbox(contrast, 2.0 * sigma_c, o.diffraction_sigma_px())
        else:
            blurred = blur_sigma(contrast, math.hypot(o.diffraction_sigma_px(), sigma_c))
        return np.float32(0.6) * (1.0 + np.clip(blurred, -0.95, 0.6))

    def capture(self) -> np.ndarray:
        t0 = time.perf_counter()
        frame = self.render(self.stage.position_mm())
        rows = self.optics.height
        if self.roi is not None:
            x, y, w, rows = self.roi
            frame = np.ascontiguousarray(frame[y: y + rows, x: x + w])
        t = self.timing
        modeled = (t.exposure_s + t.readout_rows_s(rows, self.optics.height)
                   + (t.acquisition_start_stop_s if self.one_shot else 0.0))
        self.clock.spend(modeled, since=t0)
        return frame


class SimXYStage(StageDefaults):
    """A simulated XY plate (travel 0-100 x 0-75 mm), both axes moving at once, with modelled move
    time on the clock it shares with the focus stage and the camera."""

    def __init__(self, travel_mm: tuple[tuple[float, float], tuple[float, float]] = ((0.0, 100.0), (0.0, 75.0)),
                 position_mm: tuple[float, float] = (50.0, 37.5), timing: SimTiming | None = None,
                 clock: SimClock | None = None) -> None:
        self.travel = travel_mm
        self.xy = position_mm
        self.timing = timing or SimTiming()
        self.clock = clock or SimClock(self.timing.scale)

    def move_to(self, x_mm: float, y_mm: float) -> None:
        (x_lo, x_hi), (y_lo, y_hi) = self.travel
        if not (x_lo - FLOAT_SLACK_MM <= x_mm <= x_hi + FLOAT_SLACK_MM and y_lo - FLOAT_SLACK_MM <= y_mm <= y_hi + FLOAT_SLACK_MM):
            raise StageError(f"simulated plate rejected a move to ({x_mm}, {y_mm}) mm: outside the travel "
                             f"X {x_lo}..{x_hi}, Y {y_lo}..{y_hi} mm")
        self.clock.spend(self.timing.move_s(max(abs(x_mm - self.xy[0]), abs(y_mm - self.xy[1]))))
        self.xy = (x_mm, y_mm)

    def position_mm(self) -> tuple[float, float]:
        return self.xy

    def limits_mm(self) -> tuple[tuple[float, float], tuple[float, float]]:
        return self.travel

    def stop(self) -> None:
        pass


@dataclasses.dataclass(frozen=True)
class SimSlide:
    """A simulated slide on the plate: its focal surface z(x, y) and where it is bare glass.

    z = focus_mm + tilt . (p - centre) + bow |p - centre|^2 + ripple sin(2 pi (dx + dy) / ripple_mm),
    p = (x, y) in mm: tilted (um/mm), bowed (um/mm^2; positive: the centre lies lowest) and, with
    ``ripple_um``, warped in a way no polynomial follows.  Inside a ``bare_glass`` box
    (X0, Y0, X1, Y1 mm) there is no specimen: an empty field."""

    focus_mm: float = SimOptics.focus_mm  # the focal surface at the slide's centre
    centre_mm: tuple[float, float] = (50.0, 37.5)
    tilt_um_per_mm: tuple[float, float] = (4.0, -2.5)
    bow_um_per_mm2: float = 0.15
    ripple_um: float = 0.0
    ripple_mm: float = 10.0
    bare_glass: tuple[tuple[float, float, float, float], ...] = ()

    def z_mm(self, x_mm: Any, y_mm: Any) -> Any:
        """The focal surface at (x, y), mm (arrays broadcast)."""
        dx, dy = np.asarray(x_mm, float) - self.centre_mm[0], np.asarray(y_mm, float) - self.centre_mm[1]
        um = (self.tilt_um_per_mm[0] * dx + self.tilt_um_per_mm[1] * dy + self.bow_um_per_mm2 * (dx * dx + dy * dy)
              + self.ripple_um * np.sin(2 * np.pi * (dx + dy) / self.ripple_mm))
        z = self.focus_mm + um / 1000.0
        return float(z) if np.ndim(z) == 0 else z

    def bare(self, x_mm: float, y_mm: float) -> bool:
        """Whether (x, y) lies on bare glass."""
        return any(min(x0, x1) <= x_mm <= max(x0, x1) and min(y0, y1) <= y_mm <= max(y0, y1)
                   for x0, y0, x1, y1 in self.bare_glass)


class SlideCamera(SimCamera):
    """The simulated camera over a SimSlide on a plate: every field of view (a frame's width and
    height in the specimen plane) shows its own specimen (re-seeded per field), in focus at the
    slide's surface at the plate's position, or bare glass (an empty field)."""

    def __init__(self, stage: Stage, plate: XYStage, slide: SimSlide, optics: SimOptics | None = None,
                 timing: SimTiming | None = None, clock: SimClock | None = None, one_shot: bool = False,
                 roi: Roi | None = None) -> None:
        super().__init__(stage, optics, timing, clock, one_shot, roi)
        self.plate, self.slide, self.base_optics = plate, slide, self.optics

    def field(self, x_mm: float, y_mm: float) -> SimOptics:
        """What the camera sees at plate position (x, y)."""
        o = self.base_optics
        fov_w_mm, fov_h_mm = o.width * o.sample_pixel_um / 1000.0, o.height * o.sample_pixel_um / 1000.0
        ix, iy = math.floor(x_mm / fov_w_mm), math.floor(y_mm / fov_h_mm)
        seed = (o.seed * 1_000_003 + ix * 7_919 + iy * 104_729) % 2**32
        return dataclasses.replace(o, focus_mm=self.slide.z_mm(x_mm, y_mm), seed=seed,
                                   specimen="blank" if self.slide.bare(x_mm, y_mm) else o.specimen)

    def capture(self) -> np.ndarray:
        self.optics = self.field(*self.plate.position_mm())
        return super().capture()


###############################################################################
# Backends: replay of a recorded stack ########################################
###############################################################################


def file_exists(path: Path, what: str, error: type[UsageError] = StackError) -> bool:
    """Whether a file (of a replay stack, by default) is there; ``error`` when the system refuses
    the name (longer than it allows, a path through a file it cannot search)."""
    try:
        return path.is_file()
    except OSError as exc:
        raise error(f"{what} cannot be read ({exc.strerror or exc})") from exc


class ReplayStack:
    """A recorded through-focus stack: ``stack.csv`` (z_mm, file, ...) and its images."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        csv_path = self.folder / "stack.csv"
        if not file_exists(csv_path, f"replay stack {self.folder}: stack.csv"):
            raise StackError(f"replay stack {self.folder}: no stack.csv there (expected columns z_mm,file)")
        marked = self._read_rows(csv_path)
        rows = [(z, name) for z, name, _ in marked]
        # Every file the replay reads, as its row names it (the folder resolved, the last part as
        # named: a link itself) and as it resolves (the file a link leads to): what no output of a
        # run that replays this stack may write, replace or remove (``check_outputs``).
        named = [csv_path, self.folder / ROI_FILE, *(self.folder / name for _, name in rows)]
        try:
            self.files = sorted({q for f in named for q in (f.parent.resolve() / f.name, f.resolve())})
        except OSError as exc:
            raise StackError(f"replay stack {csv_path}: a file it names cannot be found ({exc.strerror or exc})") \
                from exc
        # A position may appear again only as a frame taken again (the fast search's, marked in the
        # ``retake`` column): that later frame replays.  Any other repeat is ambiguous.
        seen: set[float] = set()
        for line, (z, _, again) in enumerate(marked, start=2):
            if z in seen and not again:
                raise StackError(f"replay stack {csv_path}: duplicate z_mm {z:g}; each position must appear once "
                                 "(a frame taken again is marked retake=1)")
            if again and z not in seen:
                raise StackError(f"replay stack {csv_path}, line {line}: retake=1 marks a frame taken again, but no "
                                 f"row before it has z_mm {z:g}")
            seen.add(z)
        latest = {z: k for k, (z, _) in enumerate(rows)}
        rows = [rows[k] for k in sorted(latest.values())]
        zs = [z for z, _ in rows]
        self.z_mm = np.array(zs)
        self.frames: list[np.ndarray] = []
        decoded: dict[Path, np.ndarray] = {}  # each distinct file is decoded once, however many rows name it
        shape = None
        total_bytes = 0
        for z, name in rows:
            path = self.folder / name
            if not file_exists(path, f"replay stack {csv_path}: image {name}"):
                raise StackError(f"replay stack {csv_path}: image {name} (z={z:g} mm) is missing")
            key = path.resolve()
            if key not in decoded:
                decoded[key] = image = read_image(path, f"replay stack {csv_path}: image {name}")
                total_bytes += image.nbytes
                if total_bytes > MAX_STACK_BYTES:
                    raise StackError(f"replay stack {csv_path}: its images need more than "
                                     f"{MAX_STACK_BYTES >> 30} GiB of memory; replay a shorter or smaller stack")
            image = decoded[key]
            if shape is not None and (image.shape, image.dtype) != shape:
                raise StackError(f"replay stack {csv_path}: image {name} is {image.shape} {image.dtype}, the first "
                                 f"was {shape[0]} {shape[1]}; all images must have the same size and bit depth")
            shape = (image.shape, image.dtype)
            self.frames.append(image)
        order = np.argsort(self.z_mm, kind="stable")  # by z: a query half-way picks the lower slice
        self.z_mm = self.z_mm[order]
        self.frames = [self.frames[i] for i in order]
        self.roi = self._read_roi(self.folder / ROI_FILE, self.frames[0].shape)

    @staticmethod
    def _read_roi(path: Path, frame_shape: tuple[int, ...]) -> Roi | None:
        """The region of interest recorded with the stack (``--save-images`` with ``--roi``), if any."""
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, dict) or "roi" not in data:
                raise ValueError('expected {"roi": [x, y, width, height]}')
            value = data["roi"]
            if value is None:
                return None
            if not (isinstance(value, list) and len(value) == 4 and
                    all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
                raise ValueError(f"roi is {value!r}, expected [x, y, width, height] in whole pixels")
            roi: Roi = (value[0], value[1], value[2], value[3])
            check_roi(roi, frame_shape)
        except (OSError, UnicodeDecodeError, ValueError, UsageError) as exc:
            raise StackError(f"replay stack {path}: {first_line(exc)}; fix or delete the file") from exc
        return roi

    @staticmethod
    def _read_rows(csv_path: Path) -> list[tuple[float, str, bool]]:
        """(z_mm, file, marked retake=1) rows of stack.csv, validated."""
        try:
            with open(csv_path, newline="", encoding="utf-8-sig") as f:
                reader = csv.DictReader(f)
                fields = [name.strip() for name in (reader.fieldnames or [])]
                if "z_mm" not in fields or "file" not in fields:
                    raise StackError(f"replay stack {csv_path}: the header must name z_mm and file "
                                     f"(found {','.join(fields) or 'nothing'})")
                rows = []
                for line, row in enumerate(reader, start=2):
                    row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
                    try:
                        z = float(row["z_mm"])
                    except ValueError:
                        raise StackError(f"replay stack {csv_path}, line {line}: z_mm {row['z_mm']!r} "
                                         "is not a number") from None
                    if not math.isfinite(z) or not row["file"]:
                        raise StackError(f"replay stack {csv_path}, line {line}: needs a finite z_mm and a file")
                    if "\x00" in row["file"]:
                        raise StackError(f"replay stack {csv_path}, line {line}: the file name holds a NUL byte, "
                                         "which no file system allows; fix the row")
                    rows.append((z, row["file"], row.get("retake", "") == "1"))
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise StackError(f"replay stack {csv_path}: cannot read it ({exc})") from exc
        if not rows:
            raise StackError(f"replay stack {csv_path}: no rows (an empty stack)")
        return rows

    @property
    def range_mm(self) -> tuple[float, float]:
        """The lowest and highest recorded z."""
        return float(self.z_mm.min()), float(self.z_mm.max())

    def nearest(self, z_mm: float) -> np.ndarray:
        """The recorded frame nearest z."""
        return self.frames[int(np.argmin(np.abs(self.z_mm - z_mm)))]


class ReplayStage(SimStage):
    """The stage of a replay: its travel is the stack's z range, and only the recorded slices
    have frames (``focus`` snaps its grid to them: ``snap_to_recorded``)."""

    def __init__(self, stack: ReplayStack) -> None:
        lo, hi = stack.range_mm
        super().__init__(travel_mm=(lo, hi), position_mm=lo, timing=SimTiming(scale=0.0))
        self.recorded_mm = tuple(float(z) for z in stack.z_mm)

    def reachable(self, positions: tuple[float, ...]) -> tuple[tuple[float, ...], str | None]:
        return snap_to_recorded(positions, self.recorded_mm)  # never invent frames between the slices


class ReplayCamera:
    """Returns the frame recorded at the stage's position; a position between slices is refused
    (a nearest slice there would repeat a frame as if it had been taken at another z)."""

    def __init__(self, stage: Stage, stack: ReplayStack) -> None:
        self.stage, self.stack = stage, stack

    def capture(self) -> np.ndarray:
        z = self.stage.position_mm()
        k = int(np.argmin(np.abs(self.stack.z_mm - z)))
        if abs(self.stack.z_mm[k] - z) > slice_tolerance_mm(self.stack.z_mm):
            raise CameraError(f"replay: no slice was recorded at z={z:.6f} mm (the nearest is at "
                              f"{self.stack.z_mm[k]:.6f} mm); search through focus() with a ReplayStage "
                              "(replay_microscope), which keeps to the recorded slices")
        return self.stack.frames[k]


def slice_tolerance_mm(recorded_mm: Sequence[float] | np.ndarray) -> float:
    """How close a position must be to a recorded slice to be that slice: 1 % of the closest spacing."""
    z = np.unique(np.asarray(recorded_mm, dtype=float))
    return 0.01 * float(np.min(np.diff(z))) if len(z) > 1 else 1e-9


def snap_to_recorded(positions: Sequence[float], recorded_mm: Sequence[float]) -> tuple[tuple[float, ...], str | None]:
    """The plan's positions on a recording: unchanged when each lands on a recorded slice, else
    the recorded slice nearest each, each slice once, in the plan's order, and a note that says so
    (never a slice repeated at positions between slices: a curve of repeated frames has steps
    that look like peaks)."""
    rec = np.unique(np.asarray(recorded_mm, dtype=float))
    tol = slice_tolerance_mm(rec)
    nearest = [float(rec[int(np.argmin(np.abs(rec - z)))]) for z in positions]
    if all(abs(a - b) <= tol for a, b in zip(nearest, positions)):
        return tuple(positions), None
    snapped = tuple(dict.fromkeys(nearest))
    gaps = np.diff(rec)
    spacing = (f"every {float(np.median(gaps)):g} mm" if len(gaps) and np.ptp(gaps) <= 0.02 * np.median(gaps)
               else f"at uneven spacing ({float(gaps.min()):g} to {float(gaps.max()):g} mm)" if len(gaps)
               else "at one position")
    lo, hi = min(positions), max(positions)
    step = abs(positions[1] - positions[0]) if len(positions) > 1 else 0.0
    tip = ("; a STEP that is a multiple of the recorded spacing, from a recorded START, lands on them"
           if spacing.startswith("every") else "")
    return snapped, (f"note: the grid {lo:g}..{hi:g} mm every {step:g} mm asks for positions the stack has no slice "
                     f"at (recorded {spacing}, {len(rec)} slices from {rec[0]:g} to {rec[-1]:g} mm): searched the "
                     f"{len(snapped)} recorded slices nearest to it instead{tip}")


def replay_microscope(folder: str | Path) -> tuple[ReplayStage, ReplayCamera]:
    """A recorded stack (``--replay DIR``) as a stage and a camera for ``focus()``."""
    stack = ReplayStack(folder)
    stage = ReplayStage(stack)
    return stage, ReplayCamera(stage, stack)


###############################################################################
# Backends: Micro-Manager (pymmcore-plus) #####################################
###############################################################################
# pymmcore-plus is Micro-Manager's Python core (CMMCorePlus; UniMMCore for Python devices) and
# acquisition engine.  These adapters use only the core's public API (um; mm here), on a core the
# caller owns and keeps: nothing is loaded, unloaded or closed.  ``mm_autofocus`` makes fullFocus()
# run this tool, so that the MDA engine's autofocus plans (useq's AxesBasedAF) use it.

PYMMCORE_HELP = ("Micro-Manager microscopes need pymmcore-plus (on PyPI): pip install pymmcore-plus "
                 "(or pip install .[mm])")
# A verified move ends within this of its target.  Motorized focus drives resolve 0.01-0.1 um
# (Nikon Ti, Olympus IX83, Zeiss, Prior, ASI); a 60x objective's depth of field is ~0.9 um.
MM_FOCUS_TOLERANCE_UM = 0.2
MM_XY_TOLERANCE_UM = 1.0  # XY stages: steppers of 0.05-1 um; a field of view is hundreds of um
MM_AUTOFOCUS_LABEL = "autofocus.py"  # what core.getAutoFocusDevice() answers while mm_autofocus is attached


def _mm() -> Any:
    """Import pymmcore-plus on first use."""
    return lazy_import(UsageError(PYMMCORE_HELP), "pymmcore_plus")[0]


# The core's device roles: DeviceType -> (its getter, its setter, what it is called here).
MM_ROLES = {"Stage": ("getFocusDevice", "setFocusDevice", "focus device"),
            "XYStage": ("getXYStageDevice", "setXYStageDevice", "XY stage"),
            "Camera": ("getCameraDevice", "setCameraDevice", "camera")}


def _mm_label(core: Any, label: str | None, kind: str) -> str:
    """``label``, or the core's current device of the role ``kind`` (a key of MM_ROLES), checked
    to be a loaded device of that DeviceType."""
    device_type = _mm().DeviceType
    getter, setter, what = MM_ROLES[kind]
    label = check_value("micromanager", "label", label, MM_RULES["label"])
    if label is None:
        label = getattr(core, getter)()
        if not label:
            raise UsageError(f"the Micro-Manager core has no {what} selected: load one and select it "
                             f"(core.{setter}(LABEL)), or pass label=")
    try:
        found = core.getDeviceType(label)
    except Exception as exc:  # noqa: BLE001 - the core's CMMError (a RuntimeError) or a Python device's error
        raise UsageError(f"no device {label!r} is loaded in the Micro-Manager core ({first_line(exc)}); "
                         f"loaded: {', '.join(core.getLoadedDevices()) or 'none'}") from exc
    if int(found) != int(device_type[kind]):
        raise UsageError(f"Micro-Manager device {label!r} is of type {device_type(int(found)).name}, not "
                         f"{device_type[kind].name}: pass a {what}")
    return label


MM_LIMITS_RULE = Rule("interval", hi=MAX_ABS_POSITION_MM, unit=" mm")  # (lowest, highest), mm
MM_RULES: dict[str, Rule] = {  # the Micro-Manager adapters' settings (BadValue scope "micromanager")
    "label": Rule("text", optional=True),
    "stage_label": Rule("text", optional=True),
    "tolerance_um": Rule("number", 0.0, 1000.0, " um", above=True),
    "exposure_ms": CAMERA_RULES["exposure_ms"],
    "roi": CAMERA_RULES["roi"],
    "camera_roi": CAMERA_RULES["roi"],
}


class _MMPositioner(StageDefaults):
    """What MMStage and MMXYStage share: moves through the core, waited for and verified.

    Before a move is sent, the device must still be where the last move left it (within
    ``tolerance_um``: most adapters report no motion of their own, so a position read is the only way
    to notice the focus knob or another program); once ``waitForDevice`` returns, it must be at its
    target.  Either mismatch raises StageInterrupted: nothing more is commanded."""

    what = "stage"
    axes: tuple[str, ...] = ()
    core: Any
    label: str
    tolerance_um: float
    _limits_axes: tuple[tuple[float, float], ...]

    def _init(self, core: Any, label: str, tolerance_um: float) -> None:
        self.core, self.label = core, label
        self.tolerance_um = check_value("micromanager", "tolerance_um", tolerance_um, MM_RULES["tolerance_um"])
        self._left_at: tuple[float, ...] | None = None  # where it was last seen (mm): a verified move's end, a read

    def _read_um(self) -> tuple[float, ...]:
        raise NotImplementedError

    def _send_um(self, target_um: tuple[float, ...]) -> None:
        raise NotImplementedError

    def _name(self) -> str:
        return f"the Micro-Manager {self.what} {self.label!r}"

    @staticmethod
    def _text(mm: tuple[float, ...]) -> str:
        return f"{mm[0]:.4f} mm" if len(mm) == 1 else "(" + ", ".join(f"{v:.4f}" for v in mm) + ") mm"

    def _read(self) -> tuple[float, ...]:
        """The position now, mm (a read also becomes the reference for the next move's check)."""
        try:
            um = self._read_um()
        except Exception as exc:  # noqa: BLE001 - the core's CMMError or a Python device's error
            raise StageError(f"reading the position of {self._name()}: {first_line(exc)}") from exc
        if not all(math.isfinite(v) for v in um):  # a NaN would pass every comparison of the checks
            raise StageError(f"{self._name()} reports its position as {show_value(um)} um, not finite numbers; "
                             "check the device")
        self._left_at = tuple(round(v / 1000.0, POSITION_DECIMALS) for v in um)
        return self._left_at

    def _off_um(self, a: tuple[float, ...], b: tuple[float, ...]) -> float:
        return max(abs(x - y) for x, y in zip(a, b)) * 1000.0

    def _move(self, target: tuple[float, ...]) -> None:
        """Move to ``target`` (mm, one value per axis): limits, check, send, wait, verify."""
        for value, (lo, hi), axis in zip(target, self._limits_axes, self.axes):
            if not (_is_number(value) and lo - FLOAT_SLACK_MM <= value <= hi + FLOAT_SLACK_MM):  # plans are checked earlier
                raise StageError(f"refusing to move {self._name()}{axis} to {value} mm: outside its limits "
                                 f"{lo:g}..{hi:g} mm")
        what = f"move of {self._name()} to {self._text(target)}"
        left = self._left_at
        if left is not None:
            at = self._read()
            if self._off_um(at, left) > self.tolerance_um:
                raise StageInterrupted(f"before the {what}: it is at {self._text(at)}, not at {self._text(left)} where "
                                       "this tool last saw it: it was moved from outside (the focus knob or joystick, "
                                       "a Micro-Manager window or another program); nothing more is moved")
        self._left_at = None
        try:
            self._send_um(tuple(v * 1000.0 for v in target))
            self.core.waitForDevice(self.label)
        except KeyboardInterrupt:
            self._stop_quietly()
            raise
        except Exception as exc:  # noqa: BLE001 - the core's CMMError, its time-out, or a Python device's error
            stopped = self._stop_quietly()
            raise StageError(f"the {what} failed: {first_line(exc)}; "
                             + ("stopped it" if stopped else "stopping it failed too: check the stage")) from exc
        at = self._read()
        off = self._off_um(at, target)
        if off > self.tolerance_um:
            raise StageInterrupted(f"the {what} ended at {self._text(at)}, {off:.2f} um off (tolerance_um "
                                   f"{self.tolerance_um:g}): it was moved or stopped from outside "
                                   "(the focus knob or joystick, a Micro-Manager window or another program), or it "
                                   "cannot reach that position; nothing more is moved")

    def _stop_quietly(self) -> bool:
        """Send stop, whatever happened; True when the core took it."""
        for _ in range(STOP_ATTEMPTS):
            try:
                self.core.stop(self.label)
                return True
            except KeyboardInterrupt:
                continue
            except Exception:  # noqa: BLE001 - the failure being reported matters more
                return False
        return False

    def stop(self) -> None:
        try:
            self.core.stop(self.label)
            self.core.waitForDevice(self.label)
        except Exception as exc:  # noqa: BLE001 - the core's CMMError or a Python device's error
            raise StageError(f"stopping {self._name()}: {first_line(exc)}") from exc


class MMStage(_MMPositioner):
    """A Micro-Manager stage as this tool's focus axis: the core's focus device, or ``label``.

    Limits: the device's own (its Position property's, when the position lies inside them), narrowed
    to ``limits_mm`` (lowest, highest) when given; a device that reports none needs ``limits_mm``
    (UsageError otherwise: they guard the objective).  Moves: setPosition (um), waitForDevice,
    verified (_MMPositioner), every wait bounded by the core's time-out (core.setTimeoutMs).
    """

    what = "focus drive"
    axes = ("",)

    def __init__(self, core: Any, label: str | None = None, *, limits_mm: tuple[float, float] | None = None,
                 tolerance_um: float = MM_FOCUS_TOLERANCE_UM) -> None:
        self._init(core, _mm_label(core, label, "Stage"), tolerance_um)
        caller = None if limits_mm is None else check_value("micromanager", "limits_mm", limits_mm, MM_LIMITS_RULE)
        device = self._device_limits_mm()
        if device is None and caller is None:
            raise UsageError(f"{self._name()} reports no travel limits: pass limits_mm=(lowest, highest), the "
                             "focus positions this tool may use (mm), so that no move can reach the specimen")
        lo, hi = device or caller  # type: ignore[misc]
        if device is not None and caller is not None:
            lo, hi = max(device[0], caller[0]), min(device[1], caller[1])
            if lo >= hi:
                raise UsageError(f"limits_mm {caller[0]:g}..{caller[1]:g} mm lies outside the travel "
                                 f"{device[0]:g}..{device[1]:g} mm that {self._name()} reports")
        self._limits_axes = ((lo, hi),)
        self.limits_from = "device" if caller is None else "limits_mm" if device is None else "device and limits_mm"

    def _device_limits_mm(self) -> tuple[float, float] | None:
        """The travel the device reports (its Position property's limits, um), if believable."""
        core, label = self.core, self.label
        try:
            if not (core.hasProperty(label, "Position") and core.hasPropertyLimits(label, "Position")):
                return None
            lo_um = float(core.getPropertyLowerLimit(label, "Position"))
            hi_um = float(core.getPropertyUpperLimit(label, "Position"))
            now_um = float(core.getPosition(label))
        except Exception:  # noqa: BLE001 - a device that cannot say has no limits to use
            return None
        if not (math.isfinite(lo_um) and math.isfinite(hi_um) and lo_um < hi_um and lo_um <= now_um <= hi_um):
            log.warning("%s reports Position limits %g..%g with the position %g: not used as travel limits",
                        self._name(), lo_um, hi_um, now_um)
            return None
        return lo_um / 1000.0, hi_um / 1000.0

    def _read_um(self) -> tuple[float, ...]:
        return (float(self.core.getPosition(self.label)),)

    def _send_um(self, target_um: tuple[float, ...]) -> None:
        self.core.setPosition(self.label, target_um[0])

    def describe(self) -> dict[str, Any]:
        """What was found, for logs."""
        lo, hi = self._limits_axes[0]
        return {"device": self.label, "limits_mm": [lo, hi], "limits_from": self.limits_from,
                "tolerance_um": self.tolerance_um}

    def limits_mm(self) -> tuple[float, float]:
        return self._limits_axes[0]

    def position_mm(self) -> float:
        return self._read()[0]

    def move_to(self, z_mm: float) -> None:
        self._move((z_mm,))


class MMXYStage(_MMPositioner):
    """A Micro-Manager XY stage (the core's XY stage device, or ``label``) with the XY stage
    interface of ``focus_map`` (XYStage).

    The core has no call that reports an XY stage's travel, so ``limits_mm`` is required.  Moves are
    setXYPosition (um), waitForDevice, and verified on both axes (see _MMPositioner).
    """

    what = "XY stage"
    axes = (" in x", " in y")

    def __init__(self, core: Any, label: str | None = None, *,
                 limits_mm: tuple[tuple[float, float], tuple[float, float]] | None = None,
                 tolerance_um: float = MM_XY_TOLERANCE_UM) -> None:
        self._init(core, _mm_label(core, label, "XYStage"), tolerance_um)
        if limits_mm is None:
            raise UsageError(f"{self._name()}: pass limits_mm=((x_lo, x_hi), (y_lo, y_hi)) in mm, the area this "
                             "tool may move to (Micro-Manager does not report an XY stage's travel)")
        if not (isinstance(limits_mm, Sequence) and not isinstance(limits_mm, str) and len(limits_mm) == 2):
            raise BadValue("micromanager", ("limits_mm",), lambda a: (
                f"{a}: {show_value(limits_mm)} must be ((x_lo, x_hi), (y_lo, y_hi)) in mm"))
        self._limits_axes = tuple(check_value("micromanager", "limits_mm", pair, MM_LIMITS_RULE) for pair in limits_mm)

    def _read_um(self) -> tuple[float, ...]:
        x, y = self.core.getXYPosition(self.label)
        return float(x), float(y)

    def _send_um(self, target_um: tuple[float, ...]) -> None:
        self.core.setXYPosition(self.label, target_um[0], target_um[1])

    def limits_mm(self) -> tuple[tuple[float, float], tuple[float, float]]:
        return self._limits_axes  # type: ignore[return-value]

    def position_mm(self) -> tuple[float, float]:
        x, y = self._read()
        return x, y

    def move_to(self, x_mm: float, y_mm: float) -> None:
        self._move((x_mm, y_mm))


class MMCamera:
    """The Micro-Manager core's camera (or ``label``): one ``snapImage`` per frame.

    snapImage starts its exposure (and the auto-shutter) when it is called, so every frame
    is exposed after the move before it; a running sequence acquisition (live mode), whose buffer
    would hold frames exposed during the move, is stopped for the run and restarted afterwards.

    ``exposure_ms`` and ``roi`` (x, y, w, h: the camera's own ROI) change the camera for the run;
    ``close()`` (or leaving the ``with`` block) puts every setting it changed back, and the selected
    camera too.  The bit depth (``bit_depth``: a frame all at 2^bits - 1 is saturated) and the ROI
    are read from the core; a colour frame is scored in gray.
    """

    def __init__(self, core: Any, label: str | None = None, *, exposure_ms: float | None = None,
                 roi: Roi | None = None) -> None:
        self.core = core
        self.label = _mm_label(core, label, "Camera")
        self._journal = SettingsJournal(self._setting, self._set_setting)
        self._live = False
        self._closed = False
        check_values("micromanager", MM_RULES, {"exposure_ms": exposure_ms, "roi": roi})
        try:
            if core.isSequenceRunning():  # live mode: the core refuses snapImage while a sequence runs
                core.stopSequenceAcquisition()
                self._live = True
            self._journal.set("Camera", self.label)
            if exposure_ms is not None:
                self._journal.set("Exposure", float(exposure_ms))
            if roi is not None:
                self._set_roi(tuple(int(v) for v in roi))  # type: ignore[arg-type]
            self.roi: Roi = tuple(int(v) for v in core.getROI())  # type: ignore[assignment]
            self.bit_depth = int(core.getImageBitDepth())
            self.exposure_ms = float(core.getExposure())
            self._shape = (int(core.getImageHeight()), int(core.getImageWidth()))
        except BaseException as exc:
            self.close()
            if isinstance(exc, Exception) and not isinstance(exc, AutofocusError):
                raise CameraError(f"cannot set up the Micro-Manager camera {self.label!r}: {first_line(exc)}") from exc
            raise
        log.info("Micro-Manager camera %r: %dx%d, %d-bit, ROI %s, exposure %.3f ms", self.label, self._shape[1],
                 self._shape[0], self.bit_depth, ",".join(map(str, self.roi)), self.exposure_ms)

    def _setting(self, name: str) -> Any:
        core = self.core
        return {"Camera": core.getCameraDevice, "Exposure": core.getExposure,
                "ROI": lambda: tuple(int(v) for v in core.getROI())}[name]()

    def _set_setting(self, name: str, value: Any) -> None:
        core = self.core
        if name == "Camera":
            core.setCameraDevice(value)
        elif name == "Exposure":
            core.setExposure(value)
        else:  # the full frame may be what clearROI gives, not a setROI of its size
            core.clearROI()
            if tuple(int(v) for v in core.getROI()) != tuple(value):
                core.setROI(*value)

    def _set_roi(self, roi: Roi) -> None:
        try:
            self._journal.set("ROI", roi)
        except Exception as exc:  # noqa: BLE001 - the camera's refusal, in its own words
            raise UsageError(f"the Micro-Manager camera {self.label!r} refused the ROI {','.join(map(str, roi))}: "
                             f"{first_line(exc)}; choose a region on its sensor") from exc
        got = tuple(int(v) for v in self.core.getROI())
        if got != roi:
            log.warning("ROI %s rounded by the camera to %s", ",".join(map(str, roi)), ",".join(map(str, got)))

    def describe(self) -> dict[str, Any]:
        """What was found, for logs."""
        return {"camera": self.label, "bit_depth": self.bit_depth, "roi": list(self.roi),
                "exposure_ms": self.exposure_ms}

    def capture(self) -> np.ndarray:
        try:
            self.core.snapImage()
            frame = np.array(self.core.getImage(), copy=True)  # the next snap may reuse the core's buffer
        except Exception as exc:  # noqa: BLE001 - the core's CMMError or a Python device's error
            raise CameraError(f"the Micro-Manager camera {self.label!r} delivered no frame: {first_line(exc)}; "
                              "check it in Micro-Manager") from exc
        if frame.shape[:2] != self._shape:
            raise CameraError(f"the Micro-Manager camera {self.label!r} delivered a {frame.shape} frame for its "
                              f"{self._shape[1]}x{self._shape[0]} ROI; is another program changing its ROI or binning?")
        if frame.ndim == 3:  # pymmcore-plus gives RGB (fixImage); a plain core's RGB32 is BGRA
            frame = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY if frame.shape[2] == 3 else cv2.COLOR_BGRA2GRAY)
        if frame.dtype.kind == "u" and 0 < self.bit_depth < 8 * frame.dtype.itemsize \
                and int(frame.min()) >= (1 << self.bit_depth) - 1:
            raise CameraError(f"the Micro-Manager camera {self.label!r} delivered a fully saturated frame "
                              f"({self.bit_depth}-bit); lower the exposure or the light")
        return frame

    def restore(self) -> None:
        """Put back every setting this adapter changed and restart live mode if it ran; safe to
        call more than once; never raises a device error."""
        if self._closed:
            return
        self._closed = True
        failed = self._journal.restore()
        if failed:
            log.warning("the Micro-Manager core did not take back %d camera setting(s) (%s%s)", len(failed),
                        failed[0], ", ..." if len(failed) > 1 else "")
        if self._live:
            try:
                self.core.startContinuousSequenceAcquisition(0)
            except Exception as exc:  # noqa: BLE001
                log.warning("could not restart the camera's live mode: %s", first_line(exc))

    close = restore  # the core and its camera are the caller's: nothing to release

    def __enter__(self) -> MMCamera:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


###############################################################################
# Python API ##################################################################
###############################################################################
# For scripts that already hold a stage and a camera (a tiling loop, a notebook).  The command line
# runs through focus() as well: one path for the checks, the search, the verdict, the final move
# and the fault handling.  focus()'s keywords are named like the command-line options
# (``--settle-ms`` is ``settle_ms``); the CLI passes every option that has a keyword of the same
# name (``focus_keywords``), so a new keyword and its option join in one step.

plan_log = logging.getLogger("autofocus.plan")  # the header line: what will be searched (absolute mm)


@dataclasses.dataclass(frozen=True)
class Request:
    """One autofocus request: focus()'s arguments, which the command line builds from its options.

    Checked as a whole by ``check_request`` before anything moves; its fields are focus()'s
    keywords (and the command line's option names), and their defaults are focus()'s.  ``metric``
    None means "laplacian", or "normvar" with ``transparent``."""

    start_mm: float
    end_mm: float
    step_mm: float
    search: Search = "sweep"
    metric: str | None = None
    blur: int = DEFAULT_BLUR
    roi: Roi | None = None
    settle_ms: float = 0.0
    backlash_mm: float = 0.0
    z_min: float | None = None
    z_max: float | None = None
    relative: bool = False
    home: bool | None = None
    peak: PeakPolicy = "sharpest"
    transparent: bool = False
    allow_many: bool = False
    objective: str | None = None  # --objective: names the STEP that suits it (objective_optics)


REQUEST_RULES: dict[str, Rule] = {
    "start_mm": POSITION_RULE,
    "end_mm": POSITION_RULE,  # relative: offsets from where the stage is; the plan check sees the sums
    "step_mm": Rule("number", MIN_STEP_MM, 2 * MAX_ABS_POSITION_MM, " mm"),
    "search": Rule("choice", choices=tuple(SEARCHES)),
    "metric": Rule("choice", choices=tuple(METRICS), optional=True),
    "blur": Rule("whole", 3, MAX_BLUR, odd=True),
    "roi": Rule("roi", optional=True),
    "settle_ms": Rule("number", 0.0, MAX_SETTLE_MS, " ms"),
    "backlash_mm": Rule("number", 0.0, MAX_BACKLASH_MM, " mm"),
    "z_min": dataclasses.replace(POSITION_RULE, optional=True),
    "z_max": dataclasses.replace(POSITION_RULE, optional=True),
    "relative": Rule("flag"),
    "home": Rule("flag", optional=True),
    "peak": Rule("choice", choices=PEAK_CHOICES),
    "transparent": Rule("flag"),
    "allow_many": Rule("flag"),
    "objective": Rule("text", optional=True),  # a name of OBJECTIVES or MAGx/NA[/MEDIUM]: see check_request
}


def check_request(request: Request) -> Request:
    """The request with every field checked (REQUEST_RULES), and then as a whole (a range of at
    least one STEP, a sane number of positions, soft limits in order, --peak on a sweep); the
    metric resolved.  BadValue (a UsageError) otherwise.  Nothing here needs the stage."""
    r = Request(**check_values("request", REQUEST_RULES, dataclasses.asdict(request)))
    span = abs(r.end_mm - r.start_mm)
    if span == 0:
        raise BadValue("request", ("start_mm", "end_mm", "step_mm"), lambda a, b, c: (
            f"{a} equals {b}: nothing to search; give a range of at least one {c}"))
    if r.step_mm > span + 1e-12:
        raise BadValue("request", ("step_mm",), lambda a: (
            f"{a} {r.step_mm:g} mm is larger than the range {span:g} mm; use a smaller {a}"))
    whole_steps = math.floor(span / r.step_mm + FLOAT_SLACK_RATIO)
    n = whole_steps + 1 + (abs(whole_steps * r.step_mm - span) > FLOAT_SLACK_MM)
    if n > MAX_POSITIONS_ALLOWED:
        raise BadValue("request", ("allow_many",), lambda a: (
            f"{n:,} positions (range {span:g} mm / STEP {r.step_mm:g} mm) is more than {MAX_POSITIONS_ALLOWED:,}, "
            f"even with {a}; check the units (mm) or split the range"))
    if n > MAX_POSITIONS and not r.allow_many:
        raise BadValue("request", ("allow_many",), lambda a: (
            f"{n:,} positions (range {span:g} mm / STEP {r.step_mm:g} mm) is more than {MAX_POSITIONS:,}: check "
            f"the units (mm), or confirm with {a}"))
    if r.z_min is not None and r.z_max is not None and r.z_min >= r.z_max:
        raise BadValue("request", ("z_min", "z_max"), lambda a, b: f"{a} {r.z_min:g} must be below {b} {r.z_max:g}")
    if r.peak != "sharpest" and r.search != "sweep":
        raise BadValue("request", ("peak", "search"), lambda a, b: (
            f"{a} {r.peak} compares every peak of the curve, which only a sweep measures: use {b} sweep "
            "(the default)"))
    if r.objective is not None and r.objective not in OBJECTIVES:
        objective_optics(r.objective)  # MAGx/NA[/MEDIUM], or BadValue naming it
    return dataclasses.replace(r, metric=r.metric or ("normvar" if r.transparent else "laplacian"))


_in_use: dict[int, str] = {}  # id() of every stage and camera inside a focus() call -> "stage"/"camera"
_in_use_lock = threading.Lock()


@contextlib.contextmanager
def exclusive_use(stage: Stage, camera: Camera) -> Iterator[None]:
    """One focus() call at a time per stage object and per camera object.  A second call on either
    -- from another thread, or from the first call's own on_frame -- is refused (UsageError, before
    it reads or moves anything): its moves would interleave with the first call's, and one result's
    best_mm would not be where the stage ended.  A Zaber axis refuses a second program the same way."""
    parts = {id(stage): "stage", id(camera): "camera"}
    with _in_use_lock:
        busy = [what for key, what in parts.items() if key in _in_use]
        if busy:
            raise UsageError(f"this {busy[0]} object is already in another focus() call (another thread, or that "
                             f"call's on_frame): one call at a time per {busy[0]}; wait for it to return")
        _in_use.update(parts)
    try:
        yield
    finally:
        with _in_use_lock:
            for key in parts:
                _in_use.pop(key, None)


def check_on_frame(on_frame: Any) -> None:
    """BadValue unless ``on_frame`` is a function (or None)."""
    if on_frame is not None and not callable(on_frame):
        raise BadValue("request", ("on_frame",), lambda a: (
            f"{a}: {show_value(on_frame)} must be a function on_frame(index, z_mm, frame, score), or None"))


def check_camera(camera: Camera, roi: Roi | None) -> None:
    """One frame captured where the stage is, before the first move (a capture moves nothing): the
    camera answers (``call_part``) with a frame the scores can use (CameraError) that the region of
    interest fits (UsageError).  The run's first frame is checked again: the camera may change."""
    frame = call_part(camera, "camera", "capture")
    if (problem := frame_problem(frame)) is not None:
        raise CameraError(f"the camera delivered {problem} (a frame captured before anything moved); check the "
                          "camera (its connection, its capture())")
    if roi is not None:
        check_roi(roi, frame.shape)


def check_step_native(axis: StageExtras, step_mm: float) -> None:
    """Refuse a STEP of fewer than MIN_STEP_NATIVE native units of the stage (BadValue)."""
    unit_mm = axis.native_unit_mm
    if unit_mm > 0:
        if step_mm < MIN_STEP_NATIVE * unit_mm * (1 - FLOAT_SLACK_RATIO):
            raise BadValue("request", ("step_mm",), lambda a: (
                f"{a} {step_mm:g} mm is {step_mm / unit_mm:.3g} native units of this stage (one unit is "
                f"{unit_mm * 1e6:.4g} nm); a {a} must be at least {MIN_STEP_NATIVE} units, "
                f"{MIN_STEP_NATIVE * unit_mm:.4g} mm"))


def relative_origin(stage: Stage, relative: bool) -> float:
    """What START and END are offsets from: where the axis is now with ``relative`` (refused for an
    axis without a reference position), else 0."""
    if not relative:
        return 0.0
    if not extras_of(stage).homed:
        raise UsageError("--relative: the axis has no reference position, so where it is now means nothing; "
                         "home it first (or give absolute START and END)")
    return stage_position(stage)


def focus(stage: Stage, camera: Camera, start_mm: float, end_mm: float, step_mm: float, *,
          search: Search = Request.search, metric: str | None = Request.metric, blur: int = Request.blur,
          roi: Sequence[int] | None = Request.roi, settle_ms: float = Request.settle_ms,
          backlash_mm: float = Request.backlash_mm, z_min: float | None = Request.z_min,
          z_max: float | None = Request.z_max, relative: bool = Request.relative, home: bool | None = Request.home,
          peak: PeakPolicy = Request.peak, transparent: bool = Request.transparent,
          allow_many: bool = Request.allow_many, objective: str | None = Request.objective,
          on_frame: FrameHook | None = None) -> FocusResult:
    """Find the sharpest focus between START and END every STEP (mm) and send the stage there.

    Exactly what ``python autofocus.py START END STEP ...`` does, on a stage and a camera the caller
    holds (nothing is opened or closed here):

    1. checks every argument, and the plan (backlash overshoot included) against the travel and the
       soft limits ``z_min``/``z_max`` (``relative=True``: START and END are offsets from where the
       axis is); one frame is captured and checked, the ROI against it -- all before anything moves;
    2. homes an axis without a reference position (StageExtras), announced: with a soft limit only
       with ``home=True``, never with ``home=False`` (UsageError, nothing moved);
    3. searches (``search``), scoring ``roi=(x, y, w, h)`` or the whole frame with ``metric``;
    4. judges the curve: ``focused`` or ``edge`` sends the stage to the best position, ``no_peak``
       back to where it started.  The verdict is ``result.verdict.kind``, never an exception.

    ``transparent=True`` focuses an unstained specimen at its contrast minimum; ``peak`` chooses among
    several significant peaks (``result.peaks``, ``result.dips``); ``on_frame(index, z_mm, frame,
    score)`` is called for every frame (from the scoring thread).  A fault or Ctrl-C stops the axis
    and returns it to its start when it still answers (never after a StageError), then raises the
    tool's own exception (``as_run_failure``) with ``partial`` and ``stage_state``.
    """
    request = check_request(Request(start_mm, end_mm, step_mm, search=search, metric=metric, blur=blur,
                                    roi=roi, settle_ms=settle_ms, backlash_mm=backlash_mm,  # type: ignore[arg-type]
                                    z_min=z_min, z_max=z_max, relative=relative, home=home, peak=peak,
                                    transparent=transparent, allow_many=allow_many, objective=objective))
    return run_request(stage, camera, request, on_frame=on_frame)


def run_request(stage: Stage, camera: Camera, request: Request, *, on_frame: FrameHook | None = None) -> FocusResult:
    """focus() for a request already checked by ``check_request`` (the command line checks its
    own before it opens anything): the parts checked, then plan, homing, search and final move."""
    check_on_frame(on_frame)
    with exclusive_use(stage, camera):
        return _run_request(stage, camera, request, on_frame)


def _run_request(stage: Stage, camera: Camera, r: Request, on_frame: FrameHook | None, *,
                 look_first: bool = True) -> FocusResult:
    """run_request() inside its exclusive use; ``look_first``: a frame is captured and checked
    (``check_camera``) before anything moves (a focus map looks once, not at every point)."""
    axis = extras_of(stage)
    check_step_native(axis, r.step_mm)
    travel_lo, travel_hi = stage_limits(stage)
    allowed_mm = (travel_lo if r.z_min is None else max(travel_lo, r.z_min),
                  travel_hi if r.z_max is None else min(travel_hi, r.z_max))
    with axis.run_scope(allowed_mm):  # the axis as it stands now: moving, faulted or not, and where
        return _run_scoped(stage, axis, camera, r, on_frame, look_first, allowed_mm)


def _run_scoped(stage: Stage, axis: StageExtras, camera: Camera, r: Request, on_frame: FrameHook | None,
                look_first: bool, allowed_mm: tuple[float, float]) -> FocusResult:
    """_run_request() inside the stage's run scope: plan, homing, search and final move."""
    origin_mm = relative_origin(stage, r.relative)
    dof_um = depth_of_field_um(r.objective) if r.objective is not None else None
    plan = Plan(tuple(plan_positions(r.start_mm + origin_mm, r.end_mm + origin_mm, r.step_mm)), r.search,
                r.backlash_mm, r.settle_ms, r.peak, dof_um)
    check_plan(plan, stage_limits(stage), (r.z_min, r.z_max))
    if look_first:
        stage_position(stage)  # checked first: a simulated camera renders where the stage says it is
        check_camera(camera, r.roi)
    positions, note = axis.reachable(plan.positions)
    plan = dataclasses.replace(plan, positions=positions, notes=(note,) if note else (), allowed_mm=allowed_mm)
    homed_now = False  # after homing there is no start to return to (the home sensor may be below --z-min)
    if not axis.homed:
        check_home_consent(r.home, r.z_min, r.z_max, axis.axis_name)
        homed_now = bool(axis.home_if_needed())
        check_plan(plan, stage_limits(stage), (r.z_min, r.z_max))
    if dof_um is not None:  # a STEP too coarse for it: said always; else only with --verbose
        log.log(logging.WARNING if r.step_mm / (dof_um / 1000) > 2 else logging.INFO, "%s",
                objective_line(r.objective, r.step_mm))  # type: ignore[arg-type]
    first, last = plan.positions[0], plan.positions[-1]
    plan_log.info("searching %.4f..%.4f mm every %g mm%s: %d positions, %s search, %s score%s",
                  first, last, r.step_mm,
                  f" ({r.start_mm:+g}..{r.end_mm:+g} mm from {origin_mm:.4f} mm)" if r.relative else "",
                  len(plan.positions), r.search, r.metric,
                  f", ROI {','.join(map(str, r.roi))}" if r.roi else "")
    return run_autofocus(stage, camera, Scorer(r.metric, r.blur, r.roi, invert=r.transparent), plan,  # type: ignore[arg-type]
                         on_frame=on_frame, return_to_start=not homed_now, soft_mm=(r.z_min, r.z_max))


def simulated_microscope(**options: Any) -> tuple[SimStage, SimCamera]:
    """A simulated focus stage and camera, to try ``focus()`` without hardware.

    Keywords: every ``SimOptics`` field (``focus_mm``, ``photons``, ``seed``, ``width``, ``height``,
    ``read_noise_e``, ``bit_depth``, ``specimen``, ``right_specimen``, ``right_focus_mm``,
    ``magnification``, ``na``, ...); ``time_scale`` (1, the default: real hardware timing; 0: no
    waiting) and every other ``SimTiming`` field (``exposure_s``, ``readout_s``, ...); ``start_mm``
    (default 0), ``travel_mm`` (default (0, 25)), ``objective`` (a name of OBJECTIVES: "4x" ...
    "100x"; sets magnification, na and immersion_index), ``one_shot`` (an acquisition start/stop per
    frame), ``camera_roi`` ((x, y, w, h): the sensor region read out), ``defocus`` ("gaussian" or
    "pillbox") and ``specimen_image`` (a micrograph's path, in place of the synthetic cells).  The
    camera's ``lamp`` and ``illumination`` model a flickering or drifting lamp and uneven light.
    """
    optics_names = {f.name for f in dataclasses.fields(SimOptics)}
    timing_names = {f.name for f in dataclasses.fields(SimTiming)} - {"scale"}
    if isinstance(options.get("specimen_image"), os.PathLike):
        options = {**options, "specimen_image": os.fspath(options["specimen_image"])}
    # Each value is checked once, where it is used: SimOptics and SimTiming check their own fields
    # (time_scale is SimTiming's scale), objective_optics the objective, and here the rest.
    built = optics_names | timing_names | {"time_scale", "objective"}
    given = check_values("simulator", SIM_RULES, {k: v for k, v in options.items() if k not in built})
    lens = objective_optics(options["objective"]) if options.get("objective") is not None else {}
    optics = SimOptics(**{**lens, **{k: v for k, v in options.items() if k in optics_names}})
    if optics.specimen_image is not None:
        if optics.specimen not in ("cells", "dusty"):
            raise BadValue("simulator", ("specimen_image", "specimen"), lambda a, b: (
                f"{a} replaces the synthetic cells; it cannot be combined with {b} {optics.specimen!r} (use cells "
                "or dusty)"))
        optics.texture()  # read it now: a missing or broken file is one line before anything moves
    timing = SimTiming(scale=options.get("time_scale", 1.0), **{k: v for k, v in options.items() if k in timing_names})
    travel = given.get("travel_mm", (0.0, 25.0))
    start = given.get("start_mm", 0.0)
    if not travel[0] <= start <= travel[1]:
        raise BadValue("simulator", ("start_mm",), lambda a: (
            f"{a}: the stage must start inside its travel: {start:g} mm is outside {travel[0]:g}..{travel[1]:g} mm"))
    clock = SimClock(timing.scale)
    stage = SimStage(travel_mm=travel, position_mm=start, timing=timing, clock=clock)
    return stage, SimCamera(stage, optics, timing, clock, one_shot=given.get("one_shot", False),
                            roi=given.get("camera_roi"))


def simulated_slide(**options: Any) -> tuple[SimXYStage, SimStage, SlideCamera]:
    """A simulated XY plate, focus stage and camera over a tilted, bowed slide, to try
    ``focus_map()`` without hardware: ``plate, stage, camera = simulated_slide(objective="20x")``.

    Keywords: every ``simulated_microscope`` keyword (``focus_mm``: the slide's focal surface at its
    centre), every other ``SimSlide`` field (``centre_mm``, ``tilt_um_per_mm``, ``bow_um_per_mm2``,
    ``ripple_um``, ``ripple_mm``, ``bare_glass``), ``xy_travel_mm`` ((x_lo, x_hi), (y_lo, y_hi);
    default 0-100 x 0-75 mm) and ``xy_start_mm`` (where the plate starts; default the slide's centre)."""
    slide_names = {f.name for f in dataclasses.fields(SimSlide)} - {"focus_mm"}
    slide_options = {k: options.pop(k) for k in list(options) if k in slide_names}
    travel = options.pop("xy_travel_mm", ((0.0, 100.0), (0.0, 75.0)))
    start = options.pop("xy_start_mm", None)
    stage, camera = simulated_microscope(**options)

    def numbers(value: Any, count: int) -> bool:
        return (isinstance(value, Sequence) and len(value) == count
                and all(_is_number(v) and abs(v) <= MAX_ABS_POSITION_MM for v in value))

    checks: dict[str, tuple[Callable[[Any], bool], str]] = {
        "centre_mm": (lambda v: numbers(v, 2), "(x, y) in mm"),
        "tilt_um_per_mm": (lambda v: numbers(v, 2), "(x, y) in um/mm"),
        "bow_um_per_mm2": (lambda v: _is_number(v) and abs(v) <= 100, "a number of um/mm^2 within +-100"),
        "ripple_um": (lambda v: _is_number(v) and abs(v) <= 1000, "a number of um within +-1000"),
        "ripple_mm": (lambda v: _is_number(v) and 0 < v <= MAX_ABS_POSITION_MM, "a wavelength above 0 mm"),
        "bare_glass": (lambda v: isinstance(v, Sequence) and all(numbers(b, 4) for b in v),
                       "boxes (X0, Y0, X1, Y1) in mm"),
        "xy_travel_mm": (lambda v: isinstance(v, Sequence) and len(v) == 2 and all(numbers(t, 2) and t[0] < t[1]
                                                                                   for t in v),
                         "((x_lo, x_hi), (y_lo, y_hi)) in mm, lowest first"),
        "xy_start_mm": (lambda v: v is None or numbers(v, 2), "(x, y) in mm"),
    }
    for name, value in {**slide_options, "xy_travel_mm": travel, "xy_start_mm": start}.items():
        ok, what = checks[name]
        if not ok(value):
            raise BadValue("slide", (name,), lambda a, v=value, w=what: f"{a} {show_value(v)} must be {w}")
    slide = SimSlide(focus_mm=camera.optics.focus_mm, **{k: (tuple(tuple(b) for b in v) if k == "bare_glass" else
                                                           tuple(v) if isinstance(v, Sequence) else v)
                                                        for k, v in slide_options.items()})
    xy_travel = (tuple(travel[0]), tuple(travel[1]))
    at = tuple(start) if start is not None else slide.centre_mm
    if not all(lo <= v <= hi for v, (lo, hi) in zip(at, xy_travel)):
        raise BadValue("slide", ("xy_start_mm",), lambda a: f"the plate must start inside its travel "
                       f"{show_value(xy_travel)} mm: {a} {show_value(at)}")
    plate = SimXYStage(xy_travel, at, stage.timing, stage.clock)  # type: ignore[arg-type]
    return plate, stage, SlideCamera(stage, plate, slide, camera.optics, camera.timing, camera.clock,
                                     camera.one_shot, camera.roi)


def point_sigma_mm(result: FocusResult, step_mm: float) -> float:
    """A focused point's error bar as one sigma: from its ``uncertainty_mm`` (a ~90% half-width)
    where the search gives one, else STEP/4 (about the sweep's worst error at STEP ~ one depth
    of field)."""
    u = result.uncertainty_mm
    return u * SIGMA_PER_90 if u is not None and math.isfinite(u) and u > 0 else step_mm / 4.0


def _where(points: Sequence[tuple[float, float]], most: int = 6) -> str:
    """"(20, 10), (22, 10) mm" (at most ``most`` of them)."""
    text = ", ".join(f"({x:g}, {y:g})" for x, y in points[:most])
    return text + (f" and {len(points) - most} more" if len(points) > most else "") + " mm"


def summarise_map(points: Sequence[MapPoint], *, area_mm: tuple[float, float, float, float], grid: tuple[int, int],
                  depth_of_field_mm: float, range_mm: tuple[float, float], step_mm: float, complete: bool = True,
                  rel_noise: float | None = None, elapsed_s: float = 0.0) -> FocusMap:
    """The FocusMap of these points: the surface (``choose_surface``), each point's status, the
    tilt, and the warnings -- points without focus, outliers, too few points, a leave-one-out error
    above half the depth of field (with where points are missing).  Pure."""
    focused = [i for i, p in enumerate(points) if p.status != "failed" and p.z_mm is not None]
    x = [points[i].x_mm for i in focused]
    y = [points[i].y_mm for i in focused]
    z = [points[i].z_mm for i in focused]
    s = [point_sigma_mm(points[i].result, step_mm) for i in focused]  # type: ignore[arg-type]
    # An assumed error bar (STEP/4, where a search gives none) weights the fit but does not widen
    # the outlier test: that rests on the points' own scatter then.
    own = [sigma if points[i].result.uncertainty_mm is not None else 0.0  # type: ignore[union-attr]
           for i, sigma in zip(focused, s)]
    choice = choose_surface(x, y, z, s, area_mm, depth_of_field_mm / 2.0, own_sigma_mm=own)  # type: ignore[arg-type]
    fit = choice.fit
    new = list(points)
    for i, p in enumerate(points):
        if p.status != "failed":
            new[i] = dataclasses.replace(p, status="not_focused" if p.z_mm is None else "used", loo_um=None)
    warnings: list[str] = []
    tilt = rms = loo_rms = None
    suggestions: list[tuple[float, float]] = []
    if fit is not None:
        used = [focused[k] for k in np.flatnonzero(choice.used)]
        w = _weights(np.asarray(s, float)[choice.used])
        rms, loo_rms = 1000.0 * _weighted_rms(fit.residuals_mm, w), 1000.0 * fit.loo_rms_mm
        for k, i in enumerate(used):
            new[i] = dataclasses.replace(new[i], loo_um=1000.0 * float(fit.loo_mm[k]))
        off = []
        for k in choice.outliers:
            i = focused[k]
            miss_um = 1000.0 * (z[k] - fit.surface.z_at(x[k], y[k]))  # type: ignore[operator]
            new[i] = dataclasses.replace(new[i], status="outlier", note=(new[i].note + "; " if new[i].note else "")
                                         + f"{miss_um:+.1f} um off the surface the other points make")
            off.append(f"({x[k]:g}, {y[k]:g}) mm {miss_um:+.1f} um")
        if off:
            warnings.append(f"{len(off)} outlier{'s' if len(off) > 1 else ''} left out of the surface (a focus on dust "
                            f"or debris, a second layer): {', '.join(off)}")
        plane = fit if fit.surface.model == "plane" else fit_surface(
            [x[k] for k in np.flatnonzero(choice.used)], [y[k] for k in np.flatnonzero(choice.used)],
            [z[k] for k in np.flatnonzero(choice.used)], np.asarray(s)[choice.used], "plane", area_mm)
        x0, y0, x1, y1 = area_mm
        tilt = (plane or fit).surface.gradient_um_per_mm((x0 + x1) / 2.0, (y0 + y1) / 2.0)
        if loo_rms > 500.0 * depth_of_field_mm:
            loo = [abs(float(v)) for v in fit.loo_mm]
            suggestions = suggest_points([x[k] for k in np.flatnonzero(choice.used)],
                                         [y[k] for k in np.flatnonzero(choice.used)], loo,
                                         [(p.x_mm, p.y_mm) for p in points], area_mm, grid, 6)
            warnings.append(f"the surface is uncertain: its leave-one-out error, {loo_rms:.2f} um, exceeds half the "
                            f"depth of field ({500.0 * depth_of_field_mm:.2f} um); points are missing near "
                            f"{_where(suggestions)} (--map-refine N / refine=N adds up to N there)")
    else:
        warnings.append(f"no surface: only {len(focused)} point{'s' if len(focused) != 1 else ''} focused (at least 4, "
                        "not all on one line, are needed); check START..END and the area")
    empty = [(p.x_mm, p.y_mm) for p in new if p.status == "not_focused"]
    if empty:
        warnings.append(f"{len(empty)} point{'s' if len(empty) > 1 else ''} without a focus (bare glass, an empty "
                        f"field, or the focus outside START..END), left out: {_where(empty)}")
    if not complete:
        warnings.append(f"the map was cut short after {sum(p.status != 'failed' for p in new)} of "
                        f"{grid[0] * grid[1]} grid points")
    return FocusMap(area_mm, grid, tuple(new), None if fit is None else fit.surface, depth_of_field_mm, range_mm,
                    step_mm, {m: 1000.0 * v for m, v in choice.loo_by_model_mm.items()}, rms, loo_rms, tilt, rel_noise,
                    complete, tuple(warnings), tuple(suggestions), elapsed_s)


MAP_RULES: dict[str, Rule] = {
    "refine": Rule("whole", 0, MAP_MAX_REFINE),
    "depth_of_field_mm": Rule("number", 0.0, 10.0, " mm", above=True, optional=True),
}


def check_map_request(area_mm: Any, grid: Any, *, xy_limits_mm: Any = None, refine: Any = 0,
                      depth_of_field_mm: Any = None) -> tuple[tuple[float, float, float, float], tuple[int, int]]:
    """Check a focus map's area (X0, Y0, X1, Y1 mm), grid (NX, NY), XY soft limits (a box, or
    None), ``refine`` and ``depth_of_field_mm`` before anything moves; BadValue (one line, naming
    the keyword, or on the command line its option) otherwise.  Returns the area and grid as
    floats and ints."""
    def bad(name: str, text: Callable[[str], str]) -> BadValue:
        return BadValue("map", (name,), text)

    def box(name: str, value: Any) -> tuple[float, float, float, float]:
        if not (isinstance(value, Sequence) and len(value) == 4 and all(_is_number(v) for v in value)):
            raise bad(name, lambda a: f"{a} {show_value(value)} must be X0,Y0,X1,Y1: four finite numbers of mm")
        corners = tuple(float(v) for v in value)
        if max(abs(v) for v in corners) > MAX_ABS_POSITION_MM:
            raise bad(name, lambda a: f"{a} {show_value(value)} is out of range: within +-{MAX_ABS_POSITION_MM:g} mm")
        x0, y0, x1, y1 = corners
        if x0 == x1 or y0 == y1:
            raise bad(name, lambda a: f"{a} {x0:g},{y0:g},{x1:g},{y1:g} mm has no "
                      f"{'width' if x0 == x1 else 'height'}: give two opposite corners X0,Y0,X1,Y1")
        return corners  # type: ignore[return-value]

    area = box("area_mm", area_mm)
    if not (isinstance(grid, Sequence) and len(grid) == 2
            and all(isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_)) for v in grid)):
        raise bad("grid", lambda a: f"{a} {show_value(grid)} must be NXxNY: two whole numbers of points")
    nx, ny = int(grid[0]), int(grid[1])
    if not (2 <= nx <= MAP_MAX_SIDE and 2 <= ny <= MAP_MAX_SIDE):
        raise bad("grid", lambda a: f"{a} {nx}x{ny}: each side needs 2 to {MAP_MAX_SIDE} points (a surface needs "
                  "both directions)")
    check_values("map", MAP_RULES, {"refine": refine, "depth_of_field_mm": depth_of_field_mm})
    if xy_limits_mm is not None:
        box("xy_limits_mm", xy_limits_mm)
    return area, (nx, ny)


def check_area_inside(area_mm: tuple[float, float, float, float],
                      travel_mm: tuple[tuple[float, float], tuple[float, float]], xy_limits_mm: Sequence[float] | None,
                      ) -> tuple[tuple[float, float], tuple[float, float]]:
    """Refuse an area that leaves the plate's travel or the XY soft limits (UsageError, nothing
    moved); returns the allowed box ((x_lo, x_hi), (y_lo, y_hi))."""
    (tx0, tx1), (ty0, ty1) = travel_mm
    allowed = [[tx0, tx1], [ty0, ty1]]
    if xy_limits_mm is not None:
        lx0, ly0, lx1, ly1 = xy_limits_mm
        allowed = [[max(tx0, min(lx0, lx1)), min(tx1, max(lx0, lx1))],
                   [max(ty0, min(ly0, ly1)), min(ty1, max(ly0, ly1))]]
    x0, y0, x1, y1 = area_mm
    for name, (lo, hi), (a, b) in (("X", allowed[0], (x0, x1)), ("Y", allowed[1], (y0, y1))):
        if min(a, b) < lo - FLOAT_SLACK_MM or max(a, b) > hi + FLOAT_SLACK_MM:
            raise UsageError(f"the map area's {name} {min(a, b):g}..{max(a, b):g} mm leaves the allowed "
                             f"{lo:g}..{hi:g} mm (plate travel X {tx0:g}..{tx1:g}, Y {ty0:g}..{ty1:g} mm"
                             + (", and the XY soft limits" if xy_limits_mm is not None else "")
                             + "); choose an area inside it; nothing moved")
    return (allowed[0][0], allowed[0][1]), (allowed[1][0], allowed[1][1])


class _Mapper:
    """One focus map's acquisition: the plate moves, each point's search, the noise frames."""

    def __init__(self, xy: XYStage, z: Stage, camera: Camera, *, positions: list[float], full: Request,
                 window: Request, on_frame: FrameHook | None, scorer: Scorer, direction: float) -> None:
        self.xy, self.z, self.camera = xy, z, camera
        self.positions, self.step_mm = positions, full.step_mm
        self.full, self.window, self.on_frame, self.scorer = full, window, on_frame, scorer
        self.backlash_mm, self.direction = full.backlash_mm, direction
        self.full_frames = full_search_frames(len(positions), full.search)
        self.rel_noise: float | None = None
        self.left_at: tuple[float, float] | None = None  # where the map last sent the plate
        self.points: list[MapPoint] = []
        self.current: tuple[float, float] | None = None  # the point being measured (for a failure)
        self.searches: list[FocusResult] = []

    def move_plate(self, x_mm: float, y_mm: float) -> None:
        """Move the plate and verify it, and that nothing else moved it since the last point."""
        if self.left_at is not None:
            at = plate_position(self.xy)
            if math.hypot(at[0] - self.left_at[0], at[1] - self.left_at[1]) > XY_TOLERANCE_MM:
                raise StageInterrupted(f"the plate is at ({at[0]:.4f}, {at[1]:.4f}) mm, not where the map left it "
                                       f"({self.left_at[0]:.4f}, {self.left_at[1]:.4f}) mm: it was moved from outside "
                                       "(the joystick, Zaber Launcher or another program)")
        self.xy.move_to(x_mm, y_mm)
        at = plate_position(self.xy)
        if math.hypot(at[0] - x_mm, at[1] - y_mm) > XY_TOLERANCE_MM:
            err = StageError(f"the plate move to ({x_mm:.4f}, {y_mm:.4f}) mm ended at ({at[0]:.4f}, {at[1]:.4f}) mm: "
                             "it did not reach its target (blocked, or moved by someone else)")
            err.may_move = False
            raise err
        self.left_at = (x_mm, y_mm)

    def approach_z(self, z_mm: float) -> int:
        """Send the focus stage to z the way the searches arrive (from the sweep's side with
        backlash); returns the moves made."""
        if self.backlash_mm > 0:
            self.z.move_to(round(z_mm - self.direction * self.backlash_mm, POSITION_DECIMALS))
            self.z.move_to(z_mm)
            return 2
        self.z.move_to(z_mm)
        return 1

    def measure_noise(self) -> int:
        """Repeat frames where the stage is (the first focus): the score's relative noise."""
        scores = []
        z_now = stage_position(self.z)
        for _ in range(NOISE_REPEATS):
            frame = self.camera.capture()
            check_frame(frame, z_now)
            scores.append(self.scorer(frame))
        self.rel_noise = relative_noise(scores)
        if not math.isfinite(self.rel_noise):
            self.rel_noise = None
        return NOISE_REPEATS

    def measure(self, x_mm: float, y_mm: float, added: bool = False) -> MapPoint:
        """Focus at one plate position: a narrow window around the predicted focus when the
        points so far predict one, else (or when the window shows no peak) the whole range."""
        self.current, self.searches = (x_mm, y_mm), []
        self.move_plate(x_mm, y_mm)
        used = [p for p in self.points if p.z_mm is not None and p.status == "used"]
        window = None
        if used and self.rel_noise is not None:
            sigmas = [point_sigma_mm(p.result, self.step_mm) for p in used]  # type: ignore[arg-type]
            predicted, sigma = predict_focus([p.x_mm for p in used], [p.y_mm for p in used],
                                             [p.z_mm for p in used], sigmas, (x_mm, y_mm))  # type: ignore[misc]
            window = plan_window(predicted, sigma, self.positions, self.step_mm, self.full_frames)
        note = ""
        if window is not None:
            found = _run_request(self.z, self.camera, check_request(dataclasses.replace(
                self.window, start_mm=window[0], end_mm=window[1])), self.on_frame,
                                 look_first=False)
            verdict = judge_window(found.samples, self.rel_noise)  # type: ignore[arg-type]
            if verdict.kind == "focused":
                fit = found.fit
                target = fit.z_mm if fit.used and fit.z_mm is not None else best_sample(found.samples).z_mm
                moves = found.moves
                if not (found.verdict.kind == "focused" and found.best_mm == target):
                    moves += self.approach_z(target)  # focus() judged the window by its own rule: go there
                found = dataclasses.replace(found, verdict=verdict, best_mm=target, moves=moves)
                self.searches.append(found)
                return MapPoint(x_mm, y_mm, found, (found,), "used", f"window {window[0]:.4f}..{window[1]:.4f} mm",
                                added=added)
            self.searches.append(dataclasses.replace(found, verdict=verdict))
            note = f"window {window[0]:.4f}..{window[1]:.4f} mm: {verdict.kind}; searched the whole range"
        found = _run_request(self.z, self.camera, self.full, self.on_frame, look_first=False)
        self.searches.append(found)
        if (window is not None and found.verdict.kind == "focused"
                and min(window) + self.step_mm - FLOAT_SLACK_MM <= found.best_mm <= max(window) - self.step_mm + FLOAT_SLACK_MM
                and not window_shows(self.searches[0].samples, found.best_mm, self.rel_noise)):  # type: ignore[arg-type]
            # The whole range's peak lies inside the window (a STEP or more from its ends), and the
            # window's frames there stand no higher than its lowest ones: a noise maximum (the
            # verdict's known weakness on empty fields), not a focus.  Back to where that search began.
            moves = found.moves + self.approach_z(found.start_mm)
            found = dataclasses.replace(found, best_mm=found.start_mm, moves=moves, verdict=dataclasses.replace(
                found.verdict, kind="no_peak", reason=f"its peak at {found.best_mm:.4f} mm lies inside the window "
                f"{min(window):.4f}..{max(window):.4f} mm, whose frames show nothing there: noise"))
            note += "; its peak lay in the window, whose frames show nothing there: taken as noise"
        noise_frames = self.measure_noise() if found.verdict.kind == "focused" and self.rel_noise is None else 0
        return MapPoint(x_mm, y_mm, found, tuple(self.searches), "used" if found.verdict.kind == "focused"
                        else "not_focused", note, noise_frames, added)


def focus_map(xy_stage: XYStage, z_stage: Stage, camera: Camera, *, area_mm: Sequence[float], grid: Sequence[int],
              start_mm: float, end_mm: float, step_mm: float, xy_limits_mm: Sequence[float] | None = None,
              refine: int = 0, depth_of_field_mm: float | None = None,
              on_point: Callable[[MapPoint, int, int], None] | None = None, search: Search = "fast",
              **options: Any) -> FocusMap:
    """Focus at an NX x NY grid over the plate area X0, Y0, X1, Y1 (mm) and fit the slide's surface.

    Every point is a ``focus()`` between START and END every STEP (``options``: focus()'s keywords;
    ``search`` over the whole range, "fast" by default), visited in a snake.  Once a point has
    focused, the score's noise is measured there (NOISE_REPEATS frames), and every later point first
    searches a narrow window around the focus the points so far predict (``predict_focus``,
    ``judge_window``), else the whole range.  Points without a focus and outliers are left out of the
    surface and reported.  When the leave-one-out error exceeds half the depth of field
    (``depth_of_field_mm``, default STEP), the map says where points are missing, and with
    ``refine=N`` measures up to N more.  ``on_point(point, done, total)`` is called after each point.

    Everything is checked before anything moves (UsageError); Z is only commanded inside START..END
    and the soft limits; every plate move is verified (XY_TOLERANCE_MM).  A fault or Ctrl-C stops the
    map at once, nothing more moves, and the error carries ``partial`` (``complete=False``) and
    ``stage_state``.  A complete map leaves the plate at its last point, focused there."""
    t0 = time.perf_counter()
    unknown = sorted(set(options) - set(focus.__kwdefaults__ or {}))
    if unknown:
        raise TypeError(f"focus_map() got an unexpected keyword argument {unknown[0]!r}")
    area, cells = check_map_request(area_mm, grid, xy_limits_mm=xy_limits_mm, refine=refine,
                                    depth_of_field_mm=depth_of_field_mm)
    on_frame = options.get("on_frame")
    request = check_request(Request(start_mm, end_mm, step_mm, search=search,  # type: ignore[arg-type]
                                    **{k: v for k, v in options.items() if k != "on_frame"}))
    check_on_frame(on_frame)
    with exclusive_use(z_stage, camera):
        return _focus_map(xy_stage, z_stage, camera, request, area, cells, t0=t0, xy_limits_mm=xy_limits_mm,
                          refine=refine, depth_of_field_mm=depth_of_field_mm, on_point=on_point, on_frame=on_frame)


def _focus_map(xy_stage: XYStage, z_stage: Stage, camera: Camera, r: Request,
               area: tuple[float, float, float, float], cells: tuple[int, int], *, t0: float,
               xy_limits_mm: Sequence[float] | None, refine: int, depth_of_field_mm: float | None,
               on_point: Callable[[MapPoint, int, int], None] | None, on_frame: FrameHook | None) -> FocusMap:
    """focus_map() once its arguments are checked and its parts are its own."""
    dof_mm = float(depth_of_field_mm) if depth_of_field_mm is not None else r.step_mm
    check_step_native(extras_of(z_stage), r.step_mm)
    origin = relative_origin(z_stage, r.relative)
    first, last = r.start_mm + origin, r.end_mm + origin
    direction = 1.0 if last >= first else -1.0
    # Z stays inside START..END and the soft limits: every search gets their intersection as its
    # limits, and with a backlash overshoot the frames begin one overshoot inside START.
    z_lo = min(first, last) if r.z_min is None else max(min(first, last), r.z_min)
    z_hi = max(first, last) if r.z_max is None else min(max(first, last), r.z_max)
    positions = plan_positions(round(first + direction * r.backlash_mm, POSITION_DECIMALS), last, r.step_mm)
    if len(positions) < 2 * WINDOW_MIN_HALF_STEPS + 1 or (last - positions[0]) * direction < 0:
        raise UsageError(f"the range {first:g}..{last:g} mm holds fewer than {2 * WINDOW_MIN_HALF_STEPS + 1} STEPs "
                         "(after the backlash overshoot): give a wider range or a smaller STEP")
    plan = Plan(tuple(positions), r.search, r.backlash_mm, r.settle_ms, r.peak)
    check_plan(plan, stage_limits(z_stage), (r.z_min, r.z_max))
    allowed = check_area_inside(area, plate_limits(xy_stage), xy_limits_mm)
    plate_position(xy_stage)  # the plate answers, before anything moves
    check_camera(camera, r.roi)
    # Homing (with consent) before anything else moves; both are checked first.
    z_axis, plate = extras_of(z_stage), extras_of(xy_stage)
    z_unhomed, xy_unhomed = not z_axis.homed, not plate.homed
    if z_unhomed:
        check_home_consent(r.home, r.z_min, r.z_max, z_axis.axis_name)
    if xy_unhomed and (r.home is False or (xy_limits_mm is not None and r.home is not True)):
        raise UsageError("the XY plate has no reference position (not homed) and must be homed first, but "
                         + ("--no-home forbids homing" if r.home is False else
                            "homing drives it to its home corner through positions --xy-limits may forbid: check "
                            "that its path is clear, then pass --home")
                         + " (or home it yourself, e.g. in Zaber Launcher); nothing moved")
    if z_unhomed:
        z_axis.home_if_needed()
        check_plan(plan, stage_limits(z_stage), (r.z_min, r.z_max))
    if xy_unhomed:
        plate.home_if_needed()
    full = check_request(dataclasses.replace(r, start_mm=positions[0], end_mm=positions[-1], relative=False,
                                             home=False, z_min=z_lo, z_max=z_hi))
    mapper = _Mapper(xy_stage, z_stage, camera, positions=positions, full=full,
                     window=dataclasses.replace(full, search="sweep", peak="sharpest"), on_frame=on_frame,
                     scorer=Scorer(full.metric, full.blur, full.roi, invert=full.transparent),  # type: ignore[arg-type]
                     direction=direction)
    path = snake_path(area, cells)
    total = len(path)

    def summary(complete: bool) -> FocusMap:
        return summarise_map(mapper.points, area_mm=area, grid=cells, depth_of_field_mm=dof_mm,
                             range_mm=(first, last), step_mm=r.step_mm, complete=complete, rel_noise=mapper.rel_noise,
                             elapsed_s=time.perf_counter() - t0)

    with plate.run_scope(allowed):  # plate moves rounded inside the area's limits
        try:
            if not z_lo - FLOAT_SLACK_MM <= stage_position(z_stage) <= z_hi + FLOAT_SLACK_MM:
                mapper.approach_z(positions[0])  # into the range first: every search then starts (and returns) inside it
            for x, y in path:
                mapper.points.append(mapper.measure(x, y))
                if on_point is not None:
                    on_point(mapper.points[-1], len(mapper.points), total)
            result = summary(True)
            added = 0
            while added < refine and result.surface is not None and not result.trusted:
                used = [p for p in result.points if p.status == "used"]
                batch = suggest_points([p.x_mm for p in used], [p.y_mm for p in used], [p.loo_um or 0.0 for p in used],
                                       [(p.x_mm, p.y_mm) for p in mapper.points], area, cells,
                                       min(refine - added, max(2, len(path) // 5)))
                if not batch:
                    break
                total += len(batch)
                here = mapper.left_at or batch[0]
                while batch:  # nearest first: short plate moves
                    nxt = min(batch, key=lambda p: math.hypot(p[0] - here[0], p[1] - here[1]))
                    batch.remove(nxt)
                    mapper.points.append(mapper.measure(*nxt, added=True))
                    added += 1
                    here = nxt
                    if on_point is not None:
                        on_point(mapper.points[-1], len(mapper.points), total)
                result = summary(True)
            return result
        except BaseException as exc:  # a fault or Ctrl-C: nothing more moves; what was measured is kept
            with INTERRUPTS.held():
                carried = exc if isinstance(exc, (AutofocusError, Interrupted)) else None
                where = carried.stage_state if carried is not None else None
                if where is None:  # the plate (or our own check) failed: no search was under way
                    plate_may_move = not (isinstance(exc, StageError) and not exc.may_move)
                    if plate_may_move:
                        with contextlib.suppress(AutofocusError, KeyboardInterrupt):
                            xy_stage.stop()
                    where = "nothing more was moved"
                    with contextlib.suppress(AutofocusError, KeyboardInterrupt):
                        where += f"; the focus stage is at {z_stage.position_mm():.4f} mm"
                try:
                    at = xy_stage.position_mm()
                    where += f"; the plate is at ({at[0]:.4f}, {at[1]:.4f}) mm"
                except (AutofocusError, KeyboardInterrupt):
                    where += "; the plate's position is unknown (it no longer answers)"
                if mapper.current is not None and (not mapper.points or
                                                   (mapper.points[-1].x_mm, mapper.points[-1].y_mm) != mapper.current):
                    partial = carried.partial if carried is not None else None
                    mapper.points.append(MapPoint(mapper.current[0], mapper.current[1], partial,
                                                  tuple(mapper.searches) + ((partial,) if partial is not None else ()),
                                                  "failed", failure_line(exc)[1]))
                try:
                    partial_map: FocusMap | None = summary(False)
                except Exception:  # noqa: BLE001 - the error being raised is what matters
                    log.debug("summarising the partial map failed", exc_info=True)
                    partial_map = None
                failure = as_run_failure(exc, partial_map, where)
                if failure is exc:
                    raise
                raise failure from exc


###############################################################################
# Python API: Micro-Manager autofocus #########################################
###############################################################################


class MMAutofocus:
    """This tool's autofocus standing in for a Micro-Manager core's autofocus device; made and
    attached by ``mm_autofocus``.  ``results`` holds the FocusResult of every search that ended
    with a verdict (``no_peak`` and ``edge`` too)."""

    def __init__(self, core: Any, request: Request, *, on_frame: FrameHook | None, stage_label: str | None,
                 limits_mm: tuple[float, float] | None, tolerance_um: float, exposure_ms: float | None,
                 camera_roi: Roi | None) -> None:
        # Held weakly (as the MDA engine holds it): the core holds this object, and a core that is
        # not dropped before Python exits can abort the process (pymmcore-plus 0.18.1, Python devices).
        self._core = weakref.ref(core)
        self.request, self.on_frame = request, on_frame  # checked: the range, STEP and focus() options
        self.stage_label, self.limits_mm, self.tolerance_um = stage_label, limits_mm, tolerance_um
        self.exposure_ms, self.camera_roi = exposure_ms, camera_roi
        self.results: list[FocusResult] = []
        self.core_class = _core_class(core)  # the core's own class, put back by detach()

    @property
    def core(self) -> Any:
        """The core this autofocus belongs to."""
        core = self._core()
        if core is None:
            raise UsageError("the Micro-Manager core of this autofocus no longer exists")
        return core

    def full_focus(self) -> FocusResult:
        """Run focus() once on the core's focus device and camera, as they are now.

        ``focused``: the focus is left at the answer.  ``edge``, ``no_peak`` and a range that leaves the
        limits: the focus goes back to where it was and RuntimeError (a hardware autofocus's failure to
        the MDA engine, which logs it and keeps its z correction).  A hardware fault raises the tool's own
        error (the MDA stops); after an outside interruption the engine's restore_initial_state is turned
        off, so nothing moves."""
        stage = MMStage(self.core, self.stage_label, limits_mm=self.limits_mm, tolerance_um=self.tolerance_um)
        try:
            with MMCamera(self.core, exposure_ms=self.exposure_ms, roi=self.camera_roi) as camera:
                result = run_request(stage, camera, self.request, on_frame=self.on_frame)
                self.results.append(result)
                if result.verdict.kind == "edge":
                    stage.move_to(result.start_mm)
        except UsageError as exc:
            if exc.partial is None:  # before any move: the range leaves the limits at this position
                raise RuntimeError(f"autofocus.py: {exc}") from exc
            raise
        except StageError as exc:
            if not exc.may_move:
                self._keep_engine_still()
            raise
        if result.verdict.kind != "focused":
            raise RuntimeError(f"autofocus.py: {result.verdict.kind}: {result.verdict.reason}; the focus went back "
                               f"to {result.start_mm:.4f} mm")
        return result

    def _keep_engine_still(self) -> None:
        """Turn off the MDA engine's return to the initial XY and z at the end of the run."""
        engine = self.core.mda.engine
        if isinstance(engine, _mm().mda.MDAEngine) and engine.restore_initial_state:
            engine.restore_initial_state = False
            log.warning("the MDA engine's restore_initial_state was turned off: the stage was moved from outside, "
                        "so the engine must not move it back (set it again for the next run)")

    def detach(self) -> None:
        """The core's own fullFocus() and autofocus device again."""
        if type(self.core) is not self.core_class and self.core._autofocus is self:
            self.core.__class__ = self.core_class
            del self.core._autofocus


class _AutofocusCoreMethods:
    """What mm_autofocus gives a core: a subclass of the core's own class with these methods first."""

    _autofocus: MMAutofocus

    def getAutoFocusDevice(self) -> str:  # noqa: N802 - the core's own method names
        return MM_AUTOFOCUS_LABEL

    def fullFocus(self) -> None:  # noqa: N802
        self._autofocus.full_focus()

    def setAutoFocusOffset(self, offset: float) -> None:  # noqa: N802
        raise UsageError(f"autofocus.py has no offset motor (autofocus_motor_offset {offset}): leave "
                         "autofocus_motor_offset unset in the autofocus plan")


_AUTOFOCUS_CORES: dict[type, type] = {}  # a core class -> its subclass whose fullFocus() runs this tool


def _autofocus_core_class(base: type) -> type:
    """The subclass of a core class whose autofocus is an MMAutofocus (made once per class; with
    the base's own metaclass: pymmcore's is SWIG's)."""
    if base not in _AUTOFOCUS_CORES:
        _AUTOFOCUS_CORES[base] = type(base)(f"{base.__name__}WithAutofocus", (_AutofocusCoreMethods, base), {})
    return _AUTOFOCUS_CORES[base]


def _core_class(core: Any) -> type:
    """The core's own class: the one mm_autofocus made a subclass of, or its class."""
    return next((base for base, sub in _AUTOFOCUS_CORES.items() if type(core) is sub), type(core))


def mm_autofocus(core: Any, start_mm: float, end_mm: float, step_mm: float, *, relative: bool = True,
                 stage_label: str | None = None, limits_mm: tuple[float, float] | None = None,
                 tolerance_um: float = MM_FOCUS_TOLERANCE_UM, exposure_ms: float | None = None,
                 camera_roi: Roi | None = None, **options: Any) -> MMAutofocus:
    """Make ``core.fullFocus()`` run this tool's autofocus, so that a pymmcore-plus MDA with
    ``autofocus_plan=AxesBasedAF(...)`` focuses with it at each position.

    The range (relative to where the focus is when fullFocus() is called, unless ``relative=False``),
    STEP and every ``focus()`` option (``search``, ``metric``, ``roi``, ``z_min``, ...) are set here,
    once, and checked now (UsageError).  ``stage_label``, ``limits_mm`` and ``tolerance_um`` are
    MMStage's (the core's focus device by default); ``exposure_ms`` and ``camera_roi`` MMCamera's, for
    the autofocus frames only.  The core becomes an instance of a subclass of its own class providing
    fullFocus() and getAutoFocusDevice() (which answers MM_AUTOFOCUS_LABEL): the calls the MDA engine
    makes for a hardware autofocus, so the engine applies the z correction as it does for one.
    ``detach()`` on the returned MMAutofocus puts the core's class back; attaching again replaces the
    settings.
    """
    fields = {f.name for f in dataclasses.fields(Request)} - {"start_mm", "end_mm", "step_mm"}
    unknown = sorted(set(options) - fields - {"on_frame"})
    if unknown:
        mine = {"stage_label", "limits_mm", "tolerance_um", "exposure_ms", "camera_roi", "on_frame"}
        raise UsageError(f"mm_autofocus: unknown option {', '.join(unknown)}; choose from "
                         f"{', '.join(sorted(fields | mine))}")
    on_frame = options.pop("on_frame", None)
    if on_frame is not None and not callable(on_frame):
        raise BadValue("request", ("on_frame",), lambda a: (
            f"{a}: {show_value(on_frame)} must be a function on_frame(index, z_mm, frame, score), or None"))
    request = check_request(Request(start_mm, end_mm, step_mm, relative=relative, **options))
    check_values("micromanager", MM_RULES, {"stage_label": stage_label, "tolerance_um": tolerance_um,
                                            "exposure_ms": exposure_ms, "camera_roi": camera_roi})
    MMStage(core, stage_label, limits_mm=limits_mm, tolerance_um=tolerance_um)  # the stage and its limits, now
    _mm_label(core, None, "Camera")
    autofocus = MMAutofocus(core, request, on_frame=on_frame, stage_label=stage_label, limits_mm=limits_mm,
                            tolerance_um=tolerance_um, exposure_ms=exposure_ms, camera_roi=camera_roi)
    core.__class__ = _autofocus_core_class(autofocus.core_class)
    core._autofocus = autofocus
    return autofocus


###############################################################################
# Output ######################################################################
###############################################################################


def result_json(result: FocusResult | None, *, exit_code: int, error: str | None = None,
                where: str | None = None, stage_info: dict[str, Any] | None = None,
                roi: Sequence[int] | None = None, camera_roi: Sequence[int] | None = None) -> dict[str, Any]:
    """The machine-readable summary printed by --json: the same keys on every exit (NO_RESULT_JSON's
    when nothing was measured)."""

    def num(x: float | None) -> float | None:
        return None if x is None or not math.isfinite(x) else float(x)

    run_keys = {"exit_code": exit_code, "error": error, "stage": where, "stage_info": stage_info,
                "roi": list(roi) if roi else None, "camera_roi": list(camera_roi) if camera_roi else None}
    r = result
    if r is None:
        return {**NO_RESULT_JSON, **run_keys}
    verdict = r.verdict.kind if error is None else "failed"
    return {
        "best_mm": num(r.best_mm),
        "best_score": num(r.best_score),
        "best_sample_mm": num(r.best_sample_mm),
        "fit_mm": num(r.fit.z_mm),
        "fit_used": r.fit.used,
        "fit_reason": r.fit.reason,
        "verdict": verdict,
        "reason": r.verdict.reason,
        "suggested_range_mm": list(r.verdict.suggestion_mm) if r.verdict.suggestion_mm else None,
        "verdict_scale": r.verdict.scale,
        "uncertainty_mm": num(r.uncertainty_mm),  # focused: half-width of a ~90 % interval for the true focus
        "notes": list(r.notes),
        "prominence": num(r.verdict.prominence),
        "noise": num(r.verdict.noise),
        "threshold": num(r.verdict.threshold),
        "frames": r.frames,
        "moves": r.moves,
        "elapsed_s": round(r.elapsed_s, 4),
        "search": r.search,
        "metric": r.metric,
        "start_mm": num(r.start_mm),
        "curve": [[s.z_mm, s.score] for s in r.samples],
        "transparent": r.transparent,  # then the curve holds -score (the minimum is the peak)
        "peaks": [dataclasses.asdict(e) for e in r.peaks],
        "dips": [dataclasses.asdict(e) for e in r.dips],
        "timing": {k: round(v, 4) for k, v in dataclasses.asdict(r.timing).items()},
        # exit_code, error, stage (where it was left), stage_info (Zaber runs: device, axis, name,
        # travel_mm, ...), roi (the scored region [x, y, w, h], None: the whole frame), camera_roi
        **run_keys,
    }


def strict_json(data: dict[str, Any]) -> str:
    """One line of strict JSON (RFC 8259 has no NaN or Infinity: non-finite numbers become null)."""
    return json.dumps(finite_only(data), allow_nan=False)


def write_replacing(path: str | Path, write: Callable[[Path], None]) -> None:
    """``write`` a new file next to ``path`` (a name this call creates, exclusively: "." + the start
    of the name + 8 random hex digits + ".part"), then rename it onto ``path``: a failure (a full
    disk) leaves the old file or none, never half a file, and a link planted at ``path`` (or at a
    temporary name) is replaced or passed over, never written through.  Every output file of the
    tool is written so (the curve, the plot, the map's files, each --save-images frame)."""
    path = Path(path)
    for _ in range(100):  # a free temporary name (claimed exclusively: nothing there is followed)
        temporary = path.with_name(f".{path.name[:32]}.{os.urandom(4).hex()}.part")
        try:
            open(temporary, "xb").close()  # noqa: SIM115
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(f"no free temporary name next to {path} (100 tried)")
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise


def write_curve_csv(path: str | Path, samples: Sequence[Sample]) -> None:
    """The focus curve in capture order: index,z_mm,score."""
    def write(temporary: Path) -> None:
        with open(temporary, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["index", "z_mm", "score"])
            for i, s in enumerate(samples):
                w.writerow([i, repr(float(s.z_mm)), repr(float(s.score))])

    write_replacing(path, write)


def plot_curve(path: str | Path, result: FocusResult) -> None:
    """A plot of the focus curve (the format from the name's extension): samples, chosen position,
    fitted peak."""
    load_matplotlib("--plot")
    from matplotlib import pyplot as plt  # noqa: PLC0415

    ordered = by_z(result.samples)
    sign = -1.0 if result.transparent else 1.0  # --transparent: plot the contrast itself (a V), not -score
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    try:
        if ordered:
            ax.plot([s.z_mm for s in ordered], [sign * s.score for s in ordered], "-", color="0.6", lw=1)
            ax.plot([s.z_mm for s in result.samples], [sign * s.score for s in result.samples], "o", ms=4,
                    color="tab:blue", label=f"samples ({result.frames} frames, {result.search})")
        if math.isfinite(result.best_mm):
            ax.axvline(result.best_mm, color="tab:red", lw=1.5, label=f"stage sent to {result.best_mm:.4f} mm")
        if result.fit.used and result.fit.z_mm is not None:
            ax.axvline(result.fit.z_mm, color="tab:green", ls="--", lw=1,
                       label=f"fitted {'minimum' if result.transparent else 'peak'} {result.fit.z_mm:.4f} mm")
        ax.set_xlabel("focus position z (mm)")
        ax.set_ylabel(f"contrast ({result.metric}; focus at its minimum)" if result.transparent
                      else f"focus score ({result.metric}, a.u.)")
        ax.set_title(f"verdict: {result.verdict.kind}")
        ax.legend(loc="best", fontsize=8)
        fig.tight_layout()
        ext = Path(path).suffix.lower().lstrip(".")
        write_replacing(path, lambda temporary: fig.savefig(temporary, format=ext))
    finally:
        plt.close(fig)


MAP_CSV_HEADER = ("x_mm", "y_mm", "z_mm", "verdict", "uncertainty_mm", "status", "frames", "loo_um", "note")


def write_map_csv(path: str | Path, fmap: FocusMap) -> None:
    """One row per map point in visiting order: x_mm, y_mm, z_mm (empty without a focus), verdict,
    uncertainty_mm (the point's +-, empty where its search gives none), status, frames, loo_um, note."""
    def cell(v: float | None) -> str:
        return "" if v is None or not math.isfinite(v) else repr(float(v))

    def write(temporary: Path) -> None:
        with open(temporary, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(MAP_CSV_HEADER)
            for p in fmap.points:
                w.writerow([repr(float(p.x_mm)), repr(float(p.y_mm)), cell(p.z_mm), p.verdict,
                            cell(None if p.result is None else p.result.uncertainty_mm), p.status, p.frames,
                            cell(p.loo_um), p.note])

    write_replacing(path, write)


def write_map_json(path: str | Path, fmap: FocusMap) -> None:
    """``fmap.to_json()`` as a strict JSON file."""
    text = strict_json(fmap.to_json()) + "\n"
    write_replacing(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def write_map_npy(path: str | Path, fmap: FocusMap, grid: tuple[int, int] | None = None) -> None:
    """The m x n float64 array of Zaber's high-throughput scanning example (``FocusMap.offsets_um``);
    ValueError without a surface."""
    offsets = fmap.offsets_um(grid)

    def write(temporary: Path) -> None:
        with open(temporary, "wb") as f:  # np.save(str) would append ".npy" to a name without it
            np.save(f, offsets)

    write_replacing(path, write)


def plot_map(path: str | Path, fmap: FocusMap) -> None:
    """A heat map of the fitted surface (um from its mean) with every measured point marked by
    what became of it; the title gives the model, tilt and leave-one-out error against DOF/2."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # noqa: PLC0415

    x0, y0, x1, y1 = fmap.area_mm
    fig, ax = plt.subplots(figsize=(7, 5), dpi=100)
    try:
        if fmap.surface is not None:
            gx, gy = np.meshgrid(np.linspace(x0, x1, 121), np.linspace(y0, y1, 121))  # the surface: the area only
            z_um = 1000.0 * np.asarray(fmap.z_at(gx, gy))
            mean = float(z_um.mean())
            mesh = ax.pcolormesh(gx, gy, z_um - mean, shading="auto", cmap="viridis")
            ax.contour(gx, gy, z_um - mean, levels=10, colors="white", linewidths=0.5, alpha=0.6)
            fig.colorbar(mesh, ax=ax, label=f"focus, um from {mean / 1000.0:.4f} mm")
        marks = {"used": ("o", "black", "used"), "not_focused": ("x", "tab:red", "no focus (bare glass, ...)"),
                 "outlier": ("X", "tab:orange", "outlier (left out)"), "failed": ("s", "tab:red", "failed")}
        for status, (marker, colour, label) in marks.items():
            pts = [p for p in fmap.points if p.status == status]
            if pts:
                ax.scatter([p.x_mm for p in pts], [p.y_mm for p in pts], marker=marker, c=colour,
                           s=36 if marker == "o" else 80, label=f"{label}: {len(pts)}",
                           edgecolors="white" if marker == "o" else None, linewidths=0.6 if marker == "o" else 2.0)
        added = [p for p in fmap.points if p.added]
        if added:
            ax.scatter([p.x_mm for p in added], [p.y_mm for p in added], marker="o", facecolors="none",
                       edgecolors="tab:cyan", s=110, linewidths=1.2, label=f"added where uncertain: {len(added)}")
        if fmap.suggestions_mm:
            ax.scatter([s[0] for s in fmap.suggestions_mm], [s[1] for s in fmap.suggestions_mm], marker="+",
                       c="tab:pink", s=90, label="points missing here")
        pad = 0.04 * max(abs(x1 - x0), abs(y1 - y0))  # the border points whole, not cut in half
        ax.set_xlim(min(x0, x1) - pad, max(x0, x1) + pad)
        ax.set_ylim(min(y0, y1) - pad, max(y0, y1) + pad)
        ax.set_aspect("equal")
        ax.set_xlabel("plate x (mm)")
        ax.set_ylabel("plate y (mm)")
        if fmap.surface is None:
            title = "no surface (too few points focused)"
        else:
            tx, ty = fmap.tilt_um_per_mm or (float("nan"), float("nan"))
            title = (f"{fmap.model}: tilt {tx:+.2f} / {ty:+.2f} um/mm, leave-one-out {fmap.loo_rms_um:.2f} um "
                     f"({'within' if fmap.trusted else 'ABOVE'} DOF/2 = {500 * fmap.depth_of_field_mm:.2f} um)")
        ax.set_title(title, fontsize=9)
        ax.legend(loc="upper left", bbox_to_anchor=(0, -0.12), ncol=3, fontsize=7, frameon=False)
        fig.tight_layout()
        ext = Path(path).suffix.lower().lstrip(".")
        write_replacing(path, lambda temporary: fig.savefig(temporary, format=ext))
    finally:
        plt.close(fig)


# The files --save-images writes besides stack.csv and roi.json (and --overwrite removes): frames,
# and a frame being written (``write_replacing``'s temporary name, with or without its random digits).
FRAME_FILE = re.compile(r"frame_\d{5}\.(png|tif)|\.frame_\d{5}\.(png|tif)(\.[0-9a-f]{8})?\.part")


def recording_files(folder: Path) -> list[Path]:
    """The files of a recording in ``folder`` (stack.csv, roi.json, frames, frames cut short)."""
    return sorted(p for p in folder.iterdir() if p.name in ("stack.csv", ROI_FILE) or FRAME_FILE.fullmatch(p.name))


def encode_frame(frame: np.ndarray) -> tuple[str, bytes]:
    """(extension, file bytes) of a lossless image of the frame: PNG for 8- and 16-bit frames,
    32-bit float TIFF for float32 ones (PNG has no float pixels; OpenCV would round them to 8 bits)."""
    ext = ".tif" if frame.dtype == np.float32 else ".png"
    params = [] if ext == ".tif" else [cv2.IMWRITE_PNG_COMPRESSION, 1]
    ok, encoded = cv2.imencode(ext, frame, params)
    if not ok:
        raise OutputError(f"OpenCV could not encode a {frame.dtype} frame as {ext[1:].upper()}")
    return ext, encoded.tobytes()


class ImageSaver:
    """Writes every frame losslessly (``encode_frame``: PNG, or float TIFF for float32 frames) and
    appends a row to DIR/stack.csv as it goes.

    Every file is created here (``write_replacing``; stack.csv exclusively), so nothing is written
    through a link that was there before.  A recording already in DIR (stack.csv, roi.json, frames)
    is refused unless ``overwrite``, which removes it first (links are removed, never followed).
    Frames are saved whole; a region of interest goes to DIR/roi.json, so that ``--replay DIR``
    scores the same region."""

    def __init__(self, folder: str | Path, roi: Roi | None = None, *, overwrite: bool = False) -> None:
        self.folder = Path(folder)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            old = recording_files(self.folder)
            if old and not overwrite:
                raise OutputError(f"--save-images: {self.folder} already holds a recording; pass --overwrite to "
                                  "replace it")
            for path in old:
                path.unlink()
            if roi is not None:
                text = json.dumps({"roi": list(roi)}) + "\n"
                write_replacing(self.folder / ROI_FILE, lambda temporary: temporary.write_text(text, encoding="utf-8"))
            self._csv = open(self.folder / "stack.csv", "x", newline="", encoding="utf-8")  # noqa: SIM115
            self._writer = csv.writer(self._csv)
            self._writer.writerow(["z_mm", "file", "score", "retake"])
            self._csv.flush()
        except OSError as exc:
            raise OutputError(f"--save-images: starting the recording in {self.folder} failed "
                              f"({exc.strerror or exc})") from exc
        self._lock = threading.Lock()
        self._written: set[float] = set()  # positions with a row: a frame taken again is marked retake=1

    def __call__(self, index: int, z_mm: float, frame: np.ndarray, score: float) -> None:
        """Write one frame, then its row: a row is only ever listed for a file completely written.

        The frame is encoded in memory and written by ``write_replacing``, so a full disk is one
        OSError here (no libpng messages) and never leaves a truncated frame behind a row.  The
        first failure stops the run (OutputError, exit 5)."""
        with self._lock:  # close() waits for a frame being written, and no frame follows it
            if self._csv.closed:
                return
            ext, encoded = encode_frame(frame)
            name = f"frame_{index:05d}{ext}"
            path = self.folder / name
            try:
                write_replacing(path, lambda temporary: temporary.write_bytes(encoded))
                again = z_mm in self._written
                self._writer.writerow([repr(float(z_mm)), name, repr(float(score)), "1" if again else ""])
                self._csv.flush()
                self._written.add(z_mm)
            except OSError as exc:
                raise OutputError(f"--save-images: writing {path} failed ({exc.strerror or exc}); the frames "
                                  f"before it are in {self.folder / 'stack.csv'}") from exc

    def close(self) -> None:
        with self._lock:
            self._csv.close()


# The --show-images view (``compose_view``), in the live window with a status line below.
VIEW_FONT = cv2.FONT_HERSHEY_SIMPLEX
CURVE_ASPECT = 1.6  # the curve panel is this many times as wide as it is high
KEY_ESC = 27


def curve_title(metric: str | None = None, transparent: bool = False) -> str:
    """The curve panel's title: the score and its metric (as focus() picks it)."""
    metric = metric or ("normvar" if transparent else "laplacian")
    return f"score: -contrast ({metric})" if transparent else f"focus score ({metric})"


def font_scale(height: int) -> float:
    """OpenCV text scale for a view ``height`` pixels high: capitals ~11 px at 240, never below ~8 px."""
    return max(0.35, height / 480)


def put_label(img: np.ndarray, text: str, org: tuple[int, int], scale: float,
              color: tuple[int, int, int] = (255, 255, 255)) -> None:
    """Text readable on any image: ``color`` on a darkened box (an outline drawn thicker would
    not line up: OpenCV 5's font spaces thick text wider)."""
    (w, h), base = cv2.getTextSize(text, VIEW_FONT, scale, 1)
    x, y = org
    box = img[max(y - h - 3, 0): y + base + 1, max(x - 3, 0): x + w + 3]
    box //= 3
    cv2.putText(img, text, org, VIEW_FONT, scale, color, 1, cv2.LINE_AA)


def put_text(img: np.ndarray, text: str, org: tuple[int, int], scale: float,
             color: tuple[int, int, int] = (40, 40, 40), right: bool = False) -> None:
    """Plain text (on the curve panel's white), left-aligned at ``org`` or right-aligned to it."""
    if right:
        org = (org[0] - cv2.getTextSize(text, VIEW_FONT, scale, 1)[0][0], org[1])
    cv2.putText(img, text, org, VIEW_FONT, scale, color, 1, cv2.LINE_AA)


def fitted(text: str, width: int, scale: float) -> float:
    """``scale``, made smaller (down to 60%) when ``text`` would not fit ``width`` pixels."""
    need = cv2.getTextSize(text, VIEW_FONT, scale, 1)[0][0]
    return scale if need <= width else max(scale * 0.6, scale * width / need)


def status_bar_px(height: int) -> int:
    """Height of the status line under a view whose panels are ``height`` pixels high."""
    return max(16, round(height / 10))


def view_size_px(frame_shape: tuple[int, ...], height: int, status: bool = True) -> tuple[int, int]:
    """(width, height) of the picture ``compose_view`` draws for frames of this shape."""
    panel_w = max(1, int(round(frame_shape[1] * height / frame_shape[0])))
    return 3 * panel_w + int(height * CURVE_ASPECT), height + (status_bar_px(height) if status else 0)


def fit_view_height(frame_shape: tuple[int, ...], screen_px: tuple[int, int] | None,
                    height: int = VIEW_HEIGHT_PX) -> int:
    """The panel height at which the whole view fits the screen (less SCREEN_MARGIN_PX), at
    most ``height``: the view is drawn at the size it is shown, so its labels stay sharp."""
    if screen_px is None:
        return height
    room_w, room_h = screen_px[0] - SCREEN_MARGIN_PX[0], screen_px[1] - SCREEN_MARGIN_PX[1]
    while height > MIN_VIEW_HEIGHT_PX:
        w, h = view_size_px(frame_shape, height)
        if w <= room_w and h <= room_h:
            break
        height = max(MIN_VIEW_HEIGHT_PX, min(height - 1, int(height * min(room_w / w, room_h / h))))
    return height


def compose_view(frame: np.ndarray, blur: int, curve: Sequence[Sample], height: int = VIEW_HEIGHT_PX,
                 roi: Roi | None = None, *, frame_mm: float | None = None, positions: Sequence[float] = (),
                 todo_label: str = "to go", result: FocusResult | None = None, score_name: str = curve_title(),
                 status: str | None = None) -> np.ndarray:
    """One BGR picture: the frame, the filtered frame, its Laplacian, and the focus curve,
    ``height`` pixels high, each titled with its display scale (fixed, so that the panels compare
    across a sweep); the ROI outlined in yellow on the three images; ``status`` in a line below.

    ``frame_mm``: where the frame was taken (default: the last sample's position); ``positions``: the
    planned grid (the curve spans it and shades the positions not measured yet, labelled
    ``todo_label``); ``result``: a finished run, whose fitted peak, its +- and verdict the curve shows.
    """
    filtered, lap = laplacian_views(frame, blur)
    gray = to_gray_float(frame)
    peak = float(np.iinfo(frame.dtype).max) if np.issubdtype(frame.dtype, np.integer) else 1.0

    def panel(img: np.ndarray, lo: float, hi: float, cmap: int | None) -> np.ndarray:
        u8 = np.clip((img - lo) * (255.0 / max(hi - lo, 1e-12)), 0, 255).astype(np.uint8)
        w = max(1, int(round(img.shape[1] * height / img.shape[0])))
        u8 = cv2.resize(u8, (w, height), interpolation=cv2.INTER_AREA)
        return cv2.applyColorMap(u8, cmap) if cmap is not None else cv2.cvtColor(u8, cv2.COLOR_GRAY2BGR)

    panels = [
        panel(gray, 0.0, peak, None),  # camera counts
        panel(filtered, 0.0, 4.0, cv2.COLORMAP_VIRIDIS),  # in units of the frame's mean
        panel(np.abs(lap), 0.0, 0.5, None),
    ]
    z_mm = frame_mm if frame_mm is not None else (curve[-1].z_mm if curve else None)
    titles = [f"frame{f' at {z_mm:.4f} mm' if z_mm is not None else ''}, 0-{peak:g}",
              "filtered, 0-4x mean (viridis)", "|Laplacian|, 0-0.5x mean"]
    if roi is not None:
        scale = height / frame.shape[0]  # every image panel is the whole frame, resized to `height`
        x, y, w, h = (int(round(v * scale)) for v in roi)
        for p in panels:
            cv2.rectangle(p, (x, y), (x + max(w, 1) - 1, y + max(h, 1) - 1), (0, 255, 255), 1)
        titles[0] += " (ROI scored)"
    size = font_scale(height)
    for p, t in zip(panels, titles):
        s = fitted(t, p.shape[1] - 12, size)
        put_label(p, t, (6, 6 + cv2.getTextSize(t, VIEW_FONT, s, 1)[0][1]), s)
    span = (min(positions), max(positions)) if len(positions) else None
    measured = {round(s.z_mm, 6) for s in curve}
    todo = [z for z in positions if round(z, 6) not in measured]
    panels.append(draw_curve(curve, height, span_mm=span, todo_mm=todo, todo_label=todo_label, result=result,
                             score_name=score_name))
    view = np.hstack(panels)
    if status is not None:
        bar = np.full((status_bar_px(height), view.shape[1], 3), 48, np.uint8)
        s = fitted(status, view.shape[1] - 12, size)
        put_text(bar, status, (6, (bar.shape[0] + cv2.getTextSize(status, VIEW_FONT, s, 1)[0][1]) // 2), s,
                 (235, 235, 235))
        view = np.vstack([view, bar])
    return view


def draw_curve(curve: Sequence[Sample], height: int, width: int | None = None, *,
               span_mm: tuple[float, float] | None = None, todo_mm: Sequence[float] = (), todo_label: str = "to go",
               result: FocusResult | None = None, score_name: str = curve_title()) -> np.ndarray:
    """The focus curve as a BGR plot: every frame (a dot), the best frame (red ring), the fitted
    peak (green dashed line, with its +/- as an error bar when ``result`` has one), where the
    stage was sent (red line), the positions still to measure (grey band; none once there is a
    ``result``), the verdict, and the scales (z in mm below, the score's range at the left).
    It spans ``span_mm`` (the planned range) or else the measured one."""
    width = width or int(height * CURVE_ASPECT)
    canvas = np.full((height, width, 3), 255, np.uint8)
    size, small = font_scale(height), font_scale(height) * 0.85
    line_px = int(cv2.getTextSize("Ag", VIEW_FONT, size, 1)[0][1] * 1.9)
    right, top, bottom = width - 8, int(3.3 * line_px), height - int(1.3 * line_px)
    red, green, grey = (0, 0, 220), (0, 140, 0), (110, 110, 110)
    put_text(canvas, score_name, (6, line_px - 4), fitted(score_name, width - 12, size), (0, 0, 0))
    ordered = by_z(curve)
    zs = [s.z_mm for s in ordered]
    y = np.array([s.score for s in ordered])
    ylabels = (f"{y.max():.3g}", f"{y.min():.3g}") if ordered else ("", "")
    left = 10 + max(cv2.getTextSize(t, VIEW_FONT, small, 1)[0][0] for t in ylabels)  # room for the score scale
    lo, hi = span_mm if span_mm is not None else ((min(zs), max(zs)) if zs else (0.0, 1.0))
    zspan = (hi - lo) or 1.0

    def px(z: float) -> int:
        return int(round(left + (z - lo) / zspan * (right - left)))

    if len(todo_mm) and result is None:  # the positions not measured yet: a grey band a grid step wide
        gaps = np.diff(sorted(todo_mm))
        step_mm = float(gaps[gaps > 0].min()) if (gaps > 0).any() else zspan / 100
        half = max(1, int(math.ceil(step_mm / zspan * (right - left) / 2)))
        for z in todo_mm:
            cv2.rectangle(canvas, (px(z) - half, top), (px(z) + half, bottom), (225, 225, 225), -1)
        put_text(canvas, todo_label, (right - 2, bottom - 4), small, (130, 130, 130), right=True)
    cv2.line(canvas, (left, bottom), (right, bottom), (150, 150, 150), 1)  # the z axis
    fit = result.fit if result is not None else fit_peak(ordered)
    shows_fit = fit.used and fit.z_mm is not None and lo - FLOAT_SLACK_MM <= fit.z_mm <= hi + FLOAT_SLACK_MM
    legend_y = 3 * line_px - 6
    if ordered:
        ylo, yhi = float(y.min()), float(y.max())
        yspan = (yhi - ylo) or 1.0
        pts = np.stack([[px(z) for z in zs], np.round(bottom - 4 - (y - ylo) / yspan * (bottom - top - 8))],
                       axis=1).astype(np.int32)
        cv2.polylines(canvas, [pts], False, (200, 120, 40), 1, cv2.LINE_AA)
        for p in pts:
            cv2.circle(canvas, (int(p[0]), int(p[1])), 2, (40, 40, 40), -1, cv2.LINE_AA)
        best = int(np.argmax(y))
        bx, by = int(pts[best][0]), int(pts[best][1])
        cv2.circle(canvas, (bx, by), 6, red, 2, cv2.LINE_AA)
        put_text(canvas, ylabels[0], (left - 4, top + 8), small, grey, right=True)  # the score's scale
        put_text(canvas, ylabels[1], (left - 4, bottom - 2), small, grey, right=True)
        # The legend: the best frame's ring and the fit's dashes, named (shorter where it would not fit).
        names = ("best frame", "fitted peak")
        if 60 + sum(cv2.getTextSize(f"{n} 00.0000", VIEW_FONT, small, 1)[0][0] for n in names) > width:
            names = ("best", "fit")
        cv2.circle(canvas, (12, legend_y - line_px // 4), 5, red, 2, cv2.LINE_AA)
        legend = f"{names[0]} {ordered[best].z_mm:.4f}"
        put_text(canvas, legend, (22, legend_y), small, red)
        if shows_fit:
            x = px(fit.z_mm)  # type: ignore[arg-type]
            for y0 in range(top, bottom, 6):
                cv2.line(canvas, (x, y0), (x, min(y0 + 3, bottom)), green, 1)
            lx = 22 + cv2.getTextSize(legend, VIEW_FONT, small, 1)[0][0] + 12
            for x0 in (lx, lx + 6):
                cv2.line(canvas, (x0, legend_y - line_px // 4), (x0 + 3, legend_y - line_px // 4), green, 2)
            put_text(canvas, f"{names[1]} {fit.z_mm:.4f}", (lx + 14, legend_y), small, green)
            u = result.uncertainty_mm if result is not None else None
            if u is not None and math.isfinite(u) and u > 0:  # the +/- as an error bar through the peak
                a, b = max(px(fit.z_mm - u), left), min(px(fit.z_mm + u), right)  # type: ignore[operator]
                ey = max(by - 12, top)  # just above the best frame's ring
                cv2.line(canvas, (a, ey), (b, ey), green, 2)
                for end in (a, b):
                    cv2.line(canvas, (end, ey - 4), (end, ey + 4), green, 2)
        if result is None:
            now = f"now at {curve[-1].z_mm:.4f} mm, score {curve[-1].score:.4g}"
            put_text(canvas, now, (6, 2 * line_px - 5), fitted(now, width - 12, size), (70, 70, 70))
    if result is not None:
        kind = result.verdict.kind
        u = result.uncertainty_mm
        pm = f" +/- {u:.4f}" if u is not None and math.isfinite(u) else ""
        text, color = {
            "focused": (f"focused at {result.best_mm:.4f}{pm} mm", green),
            "edge": (f"edge: best at {result.best_mm:.4f} mm (focus may be outside)", (0, 110, 230)),
            "no_peak": (f"no peak: stage back at {result.best_mm:.4f} mm", red),
        }[kind]
        if kind != "no_peak" and lo - FLOAT_SLACK_MM <= result.best_mm <= hi + FLOAT_SLACK_MM:
            cv2.line(canvas, (px(result.best_mm), top), (px(result.best_mm), bottom), red, 1)  # the stage's
        put_text(canvas, text, (6, 2 * line_px - 5), fitted(text, width - 12, size), color)
    put_text(canvas, f"{lo:.3f}", (left, height - 6), small, grey)
    put_text(canvas, f"{hi:.3f} mm", (right, height - 6), small, grey, right=True)
    return canvas


def screen_size_px() -> tuple[int, int] | None:
    """The size of the screen a new window opens on, in the units windows are sized in (None
    when it cannot be told): Windows' work area (the task bar left out), the X11 monitor marked
    primary (XRandR) or else the whole X screen, macOS's main display."""
    import ctypes  # noqa: PLC0415  (only for --show-images)
    import ctypes.util  # noqa: PLC0415

    try:
        if sys.platform == "win32":
            rect = (ctypes.c_long * 4)()
            if ctypes.windll.user32.SystemParametersInfoW(0x30, 0, ctypes.byref(rect), 0):  # SPI_GETWORKAREA
                return rect[2] - rect[0], rect[3] - rect[1]
            return None
        if sys.platform == "darwin":
            cg = ctypes.cdll.LoadLibrary(ctypes.util.find_library("CoreGraphics") or "CoreGraphics")
            cg.CGMainDisplayID.restype = ctypes.c_uint32
            cg.CGDisplayPixelsWide.argtypes = cg.CGDisplayPixelsHigh.argtypes = [ctypes.c_uint32]
            cg.CGDisplayPixelsWide.restype = cg.CGDisplayPixelsHigh.restype = ctypes.c_size_t
            main = cg.CGMainDisplayID()
            return int(cg.CGDisplayPixelsWide(main)), int(cg.CGDisplayPixelsHigh(main))
        return x11_screen_px() if os.environ.get("DISPLAY") else None
    except (OSError, AttributeError, ValueError):
        return None


def x11_screen_px() -> tuple[int, int] | None:
    """The X11 primary monitor's size (XRandR), or the whole screen's; None without an X server."""
    import ctypes  # noqa: PLC0415

    class Monitor(ctypes.Structure):  # XRRMonitorInfo
        _fields_ = [("name", ctypes.c_ulong), ("primary", ctypes.c_int), ("automatic", ctypes.c_int),
                    ("noutput", ctypes.c_int), ("x", ctypes.c_int), ("y", ctypes.c_int), ("width", ctypes.c_int),
                    ("height", ctypes.c_int), ("mwidth", ctypes.c_int), ("mheight", ctypes.c_int),
                    ("outputs", ctypes.c_void_p)]

    x11 = ctypes.cdll.LoadLibrary("libX11.so.6")  # OpenCV's Qt and GTK backends load it too
    x11.XOpenDisplay.restype = ctypes.c_void_p
    x11.XOpenDisplay.argtypes = [ctypes.c_char_p]
    for name in ("XDefaultScreen", "XCloseDisplay"):
        getattr(x11, name).argtypes = [ctypes.c_void_p]
    for name in ("XDisplayWidth", "XDisplayHeight", "XRootWindow"):
        getattr(x11, name).argtypes = [ctypes.c_void_p, ctypes.c_int]
    x11.XRootWindow.restype = ctypes.c_ulong
    display = x11.XOpenDisplay(None)
    if not display:
        return None
    try:
        screen = x11.XDefaultScreen(display)
        size = (int(x11.XDisplayWidth(display, screen)), int(x11.XDisplayHeight(display, screen)))
        try:
            xrandr = ctypes.cdll.LoadLibrary("libXrandr.so.2")
        except OSError:
            return size
        xrandr.XRRGetMonitors.restype = ctypes.POINTER(Monitor)
        xrandr.XRRGetMonitors.argtypes = [ctypes.c_void_p, ctypes.c_ulong, ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
        xrandr.XRRFreeMonitors.argtypes = [ctypes.POINTER(Monitor)]
        count = ctypes.c_int(0)
        monitors = xrandr.XRRGetMonitors(display, x11.XRootWindow(display, screen), 1, ctypes.byref(count))
        if not monitors:
            return size
        try:
            found = [monitors[i] for i in range(count.value)]
            chosen = next((m for m in found if m.primary), found[0] if found else None)
            return (chosen.width, chosen.height) if chosen is not None and chosen.width > 0 else size
        finally:
            xrandr.XRRFreeMonitors(monitors)
    finally:
        x11.XCloseDisplay(display)


def display_problem() -> str | None:
    """Why no window can be opened here, or None when one can.

    Linux needs X11 or Wayland; a DISPLAY that is set but unreachable (a stale SSH session)
    would make OpenCV's Qt backend abort the whole process, so a child process tries first.
    """
    if not sys.platform.startswith("linux"):
        return None
    if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return "DISPLAY is not set"
    probe = "import cv2; cv2.namedWindow('probe'); cv2.waitKey(1); cv2.destroyAllWindows()"
    try:
        child = subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return "opening a test window did not finish"
    if child.returncode != 0:
        return f"cannot open a window on DISPLAY={os.environ.get('DISPLAY') or os.environ.get('WAYLAND_DISPLAY')}"
    return None


def final_view(frame: np.ndarray, frame_mm: float, result: FocusResult, *, blur: int = DEFAULT_BLUR,
               roi: Roi | None = None, positions: Sequence[float] = (), score_name: str = curve_title(),
               height: int = VIEW_HEIGHT_PX) -> np.ndarray:
    """The view the window shows when held open at the end of a run: the frame where the stage
    was left (``frame_mm``), the whole curve with the best frame, the fitted peak and its +-, the
    verdict, and what the keys do now."""
    what = {"focused": "focused", "edge": "best focus at the edge of the range", "no_peak": "no focus found"}
    status = (f"done: {what[result.verdict.kind]}, {result.frames} frames ({result.search} search)   "
              "s: save view   any other key or the close button: exit")
    return compose_view(frame, blur, result.samples, height, roi, frame_mm=frame_mm, positions=positions,
                        result=result, score_name=score_name, status=status)


class LiveView:
    """The --show-images window: the newest frame, its filtered image and Laplacian, and the
    curve so far, drawn from the main thread between frames (OpenCV's windows live there).

    It opens at the view's own size, or smaller to fit the screen, aspect kept, in a plain window the
    user may resize.  Keys, read between frames (``poll``): space pauses before the next frame
    (nothing moves and nothing waits on the camera, so nothing times out) and resumes; ``s`` saves
    the view as a PNG in ``save_dir``; q, Esc or the close button raise WindowStop, which stops the
    run exactly as Ctrl-C does.  ``hold`` shows a finished run until a key.  Only the newest frame and
    the best one are kept.
    """

    WINDOW = "autofocus"

    def __init__(self, blur: int, roi: Roi | None = None, *, positions: Sequence[float] = (),
                 relative: bool = False, search: Search = "sweep", score_name: str = curve_title(),
                 save_dir: str | Path = ".", say: Callable[[str], None] | None = None,
                 screen_px: tuple[int, int] | None = None) -> None:
        self.blur, self.roi, self.search, self.score_name = blur, roi, search, score_name
        self.positions: list[float] = list(positions)
        self._relative = relative  # positions are offsets: placed on the first frame's position
        self.save_dir = Path(save_dir)
        self.say = say or (lambda line: print(line, file=sys.stderr))
        self.screen_px = screen_px
        self.height: int | None = None  # the panels' height, chosen on the first frame
        self.paused = False
        self._curve: list[Sample] = []
        self._latest: tuple[np.ndarray, list[Sample]] | None = None
        self._best: tuple[float, np.ndarray, float] | None = None  # (score, frame, z_mm)
        self._shown: np.ndarray | None = None
        self._frame: tuple[np.ndarray, list[Sample]] | None = None  # what the window shows
        self._can_tell_closed = False
        self._lock = threading.Lock()

    def offer(self, index: int, z_mm: float, frame: np.ndarray, score: float) -> None:
        """Called from the scoring thread: keep only the newest frame (and the best one)."""
        with self._lock:
            if self._relative and not self._curve and self.positions:
                origin = z_mm - self.positions[0]
                self.positions = [round(z + origin, POSITION_DECIMALS) for z in self.positions]
            self._curve.append(Sample(z_mm, score))
            self._latest = (frame, list(self._curve))
            if self._best is None or score > self._best[0]:
                self._best = (score, frame, z_mm)

    def best_frame(self) -> tuple[np.ndarray, float] | None:
        """The best-scoring frame so far and where it was taken."""
        with self._lock:
            return None if self._best is None else (self._best[1], self._best[2])

    def _status(self) -> str:
        n = len(self._frame[1]) if self._frame else 0
        where = f"frame {n} of {len(self.positions)}" if self.search == "sweep" and self.positions else \
            f"frame {n} ({self.search} search)"
        if self.paused:
            return f"PAUSED after {where}: the stage stands still   space: resume   s: save view   q/Esc: stop"
        return f"{where}   space: pause   s: save view   q/Esc: stop the run"

    def _compose(self, frame: np.ndarray, curve: Sequence[Sample], status: str) -> np.ndarray:
        if self.height is None:
            self.height = fit_view_height(frame.shape, self.screen_px)
        return compose_view(frame, self.blur, curve, self.height, self.roi, positions=self.positions,
                            todo_label="to go" if self.search == "sweep" else "not measured",
                            score_name=self.score_name, status=status)

    def _show(self, view: np.ndarray) -> None:
        first = self._shown is None
        self._shown = view
        if first:
            # Opened with the first view, at its size: WINDOW_NORMAL alone opens at the backend's
            # default size (Qt: ~400x300, squeezed by a toolbar), WINDOW_AUTOSIZE cannot be resized.
            # A plain window (WINDOW_GUI_NORMAL: no toolbar) sized to the view shows it pixel for
            # pixel, and the user may still resize it, the aspect kept.
            cv2.namedWindow(self.WINDOW, cv2.WINDOW_NORMAL | cv2.WINDOW_KEEPRATIO | cv2.WINDOW_GUI_NORMAL)
            with contextlib.suppress(cv2.error):  # a backend without it keeps its default size
                cv2.resizeWindow(self.WINDOW, view.shape[1], view.shape[0])
        cv2.imshow(self.WINDOW, view)
        if first:
            cv2.waitKey(1)
            # A backend that cannot report visibility says < 1 for an open window: never read it.
            self._can_tell_closed = self._visible() >= 1

    def _visible(self) -> float:
        try:
            return float(cv2.getWindowProperty(self.WINDOW, cv2.WND_PROP_VISIBLE))
        except cv2.error:  # Qt: the window is gone (closed by the user)
            return -1.0

    def closed(self) -> bool:
        """The user closed the window (its close button, Alt+F4)."""
        return self._can_tell_closed and self._visible() < 1

    def refresh(self, force: bool = False) -> None:
        """Show the newest frame (main thread only), if there is a new one or ``force``."""
        with self._lock:
            latest, self._latest = self._latest, None
        if latest is not None:
            self._frame = latest
        if (latest is not None or force) and self._frame is not None and not self.closed():
            self._show(self._compose(self._frame[0], self._frame[1], self._status()))

    def poll(self) -> None:
        """Between two frames (main thread): show the newest, then act on the keys pressed.

        Space pauses here until space again; q, Esc and the close button raise WindowStop."""
        self.refresh()
        self._act(cv2.waitKey(1))
        while self.paused:
            self.refresh()
            self._act(cv2.waitKey(PAUSE_POLL_MS))

    def _act(self, key: int) -> None:
        if self.closed():
            raise WindowStop("the close button")
        key = key & 0xFF if key != -1 else -1
        if key in (ord("q"), ord("Q"), KEY_ESC):
            raise WindowStop("Esc" if key == KEY_ESC else "q")
        if key == ord(" "):
            self.paused = not self.paused
            self.say("autofocus.py: paused: the stage stands still (space in the window resumes, q stops)"
                     if self.paused else "autofocus.py: resumed")
            self.refresh(force=True)
        elif key in (ord("s"), ord("S")):
            self.save()

    def save(self) -> Path | None:
        """Write the view the window shows as a PNG in ``save_dir`` (autofocus_view_NNN.png, never
        overwriting); a failure is one line and the run goes on."""
        if self._shown is None:
            return None
        n = 1
        while (path := self.save_dir / f"autofocus_view_{n:03d}.png").exists():
            n += 1
        try:
            save_png(path, self._shown)
        except (OSError, OutputError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else first_line(exc)
            self.say(f"autofocus.py: could not save the view as {path} ({reason}); the run goes on")
            return None
        self.say(f"autofocus.py: saved the view as {path}")
        return path

    def hold(self, frame: np.ndarray, frame_mm: float, result: FocusResult) -> None:
        """The end of a finished run -- the frame at the chosen position, the curve with its fitted
        peak, +- and verdict -- until a key (s saves first), the close button, or a signal."""
        if self.closed():
            return
        if self.height is None:
            self.height = fit_view_height(frame.shape, self.screen_px)
        self._show(final_view(frame, frame_mm, result, blur=self.blur, roi=self.roi, positions=self.positions,
                              score_name=self.score_name, height=self.height))
        self.say("autofocus.py: the window stays open until you press a key in it or close it "
                 "(--no-hold-window: never wait)")
        while True:
            key = cv2.waitKey(HOLD_POLL_MS)
            if self.closed() or INTERRUPTS.pending is not None:
                return
            if key != -1 and key & 0xFF in (ord("s"), ord("S")):
                self.save()
            elif key != -1:
                return

    def close(self) -> None:
        with contextlib.suppress(cv2.error):
            cv2.destroyWindow(self.WINDOW)
            cv2.waitKey(1)  # let the backend take the window off the screen


class LiveCamera:
    """A camera whose every capture first lets the live window refresh and read its keys (from
    the main thread, after the stage has moved and before the frame is taken: a pause there
    leaves the stage standing and no frame waited for; a stop there loses no frame)."""

    def __init__(self, camera: Camera, view: LiveView) -> None:
        self.camera, self.view = camera, view

    def capture(self) -> np.ndarray:
        self.view.poll()
        return self.camera.capture()


def save_png(path: Path, image: np.ndarray, compression: int | None = None) -> None:
    """An 8- or 16-bit image as a PNG at ``path`` (encoded in memory: OpenCV never sees the path);
    ``compression`` 0-9 (OpenCV's default when None)."""
    ok, encoded = cv2.imencode(".png", image, [] if compression is None else [cv2.IMWRITE_PNG_COMPRESSION, compression])
    if not ok:
        raise OutputError(f"OpenCV could not encode {path.name} as PNG")
    write_replacing(path, lambda temporary: temporary.write_bytes(encoded.tobytes()))


def make_figures(folder: str | Path, optics: SimOptics, blur: int = DEFAULT_BLUR) -> list[Path]:
    """The README's figures, from the simulator: blurry and focused frames with their Laplacians,
    a sweep animation, the live view of a two-plane field scored on a region of interest (roi.png),
    the V-shaped contrast curve of an unstained specimen with --transparent (transparent.png), the
    heat map of a focus map over a tilted, bowed slide (focus_map.png), and the --show-images window
    held open at the end of a run (show_images.png)."""
    from PIL import Image  # noqa: PLC0415  (pillow comes with matplotlib)

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stage = SimStage(timing=SimTiming(scale=0.0), position_mm=optics.focus_mm)
    camera = SimCamera(stage, optics, SimTiming(scale=0.0))
    h, w = optics.height, optics.width

    def crop(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        cw, ch = size
        return frame[(h - ch) // 2: (h + ch) // 2, (w - cw) // 2: (w + cw) // 2]

    written = []
    for name, dz in (("blurry", 0.15), ("focused", 0.0)):
        stage.z = optics.focus_mm + dz
        frame = crop(camera.capture(), (480, 300))
        _, lap = laplacian_views(frame, blur)
        lap_u8 = np.clip(np.abs(lap) * (255.0 / 0.5), 0, 255).astype(np.uint8)
        for suffix, img in (("image", frame), ("laplacian", lap_u8)):
            path = folder / f"{name}_{suffix}.png"
            save_png(path, img)
            written.append(path)
    frames, curve = [], []
    sweep = plan_positions(optics.focus_mm - 0.5, optics.focus_mm + 0.5, 0.05)
    for z in sweep:
        stage.z = z
        frame = crop(camera.capture(), (240, 150))
        curve.append(Sample(z, score_laplacian_variance(frame, blur)))
        view = compose_view(frame, blur, curve, height=120, positions=sweep)
        rgb = Image.fromarray(cv2.cvtColor(view, cv2.COLOR_BGR2RGB))
        frames.append(rgb.quantize(colors=64, dither=Image.Dither.NONE))  # keeps the GIF small
    gif = folder / "autofocus.gif"
    write_replacing(gif, lambda temporary: frames[0].save(temporary, format="GIF", save_all=True,
                                                          append_images=frames[1:], duration=200, loop=0,
                                                          optimize=True))
    written.append(gif)
    # --roi: a two-plane field (the right half 0.2 mm above the left), only the outlined right
    # part scored: the curve peaks at the right half's plane, where the view is taken.
    two_plane = dataclasses.replace(optics, width=480, height=300, right_focus_mm=optics.focus_mm + 0.2)
    roi: Roi = (270, 20, 190, 260)
    camera = SimCamera(stage, two_plane, SimTiming(scale=0.0))
    scorer = Scorer(blur=blur, roi=roi)
    curve = []
    for z in plan_positions(optics.focus_mm - 0.3, optics.focus_mm + 0.5, 0.025):
        stage.z = z
        curve.append(Sample(z, scorer(camera.capture())))
    stage.z = best_sample(curve).z_mm
    path = folder / "roi.png"
    save_png(path, compose_view(camera.capture(), blur, curve, height=150, roi=roi, frame_mm=stage.z))
    written.append(path)
    # --transparent: an unstained specimen at 40x; the contrast (normvar) curve is V-shaped, its
    # minimum at focus, and the edge score (laplacian) peaks on either side of it.
    lens = dataclasses.replace(optics, **objective_optics("40x"), specimen="transparent", width=480, height=300)
    stage = SimStage(timing=SimTiming(scale=0.0), position_mm=lens.focus_mm)
    result = focus(stage, SimCamera(stage, lens, SimTiming(scale=0.0)), lens.focus_mm - 0.006, lens.focus_mm + 0.006,
                   0.0005, transparent=True)
    path = folder / "transparent.png"
    plot_curve(path, result)
    written.append(path)
    # --map: a tilted, bowed slide with a patch of bare glass, 20x, STEP ~ one depth of field (the
    # README's command, on 320x200 frames).
    plate, z_stage, slide_camera = simulated_slide(objective="20x", width=320, height=200, time_scale=0.0,
                                                   seed=optics.seed, photons=optics.photons, start_mm=12.3,
                                                   bare_glass=((48.5, 35.0, 51.5, 40.5),))
    fmap = focus_map(plate, z_stage, slide_camera, area_mm=(44, 33, 56, 42), grid=(5, 4), start_mm=12.26,
                     end_mm=12.42, step_mm=0.004)
    path = folder / "focus_map.png"
    plot_map(path, fmap)
    written.append(path)
    # --show-images: the window held open at the end of the card's run on the simulator, as the screen
    # shows it (at --sim-size 960x600: at the default size the cells would be specks in the window).
    fields = {f.name: getattr(optics, f.name) for f in dataclasses.fields(optics)}
    stage, camera = simulated_microscope(**{**fields, "width": 960, "height": 600}, time_scale=0)
    result = focus(stage, camera, 10.0, 14.0, 0.05, blur=blur)
    path = folder / "show_images.png"
    save_png(path, final_view(camera.capture(), result.best_mm, result, blur=blur,
                              positions=plan_positions(10.0, 14.0, 0.05)), compression=9)
    written.append(path)
    return written


def load_matplotlib(flag: str) -> Any:
    """matplotlib, for ``flag`` (--plot, --make-figures); UsageError when it cannot start -- it
    needs a writable folder for its cache and configuration (HOME, the temporary folder, or
    MPLCONFIGDIR) -- instead of a traceback."""
    try:
        import matplotlib  # noqa: PLC0415 - only for the plots

        matplotlib.use("Agg")
    except OSError as exc:
        raise UsageError(f"{flag} needs matplotlib, which cannot start: {first_line(exc)}") from exc
    return matplotlib


###############################################################################
# Command line ################################################################
###############################################################################


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit code 2 (``last_error`` keeps it
    for --json), no option may be abbreviated (--js is not --json), and a negative number in any
    form (-1e-3, -.5, -inf) is a value, not an option.  It only parses: every value is checked with
    the others (``validate``), as focus() checks a script's."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, allow_abbrev=False, **kwargs)
        self.last_error: str | None = None
        self._negative_number_matcher = re.compile(
            r"^-(\d+\.?\d*(e[+-]?\d+)?|\.\d+(e[+-]?\d+)?|inf|infinity|nan)$", re.I)

    def error(self, message: str) -> Any:  # type: ignore[override]
        """One line on stderr, exit code 2."""
        self.last_error = message
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def number(text: str) -> float:
    """A number, as text (its range is checked with the other values, see ``validate``); one that a
    float cannot hold (1e400 is no infinity, 1e-400 no zero) is refused as typed."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if math.isinf(value) and not re.fullmatch(r"\s*[+-]?inf(inity)?\s*", text, re.I):
        raise argparse.ArgumentTypeError(f"{text!r} is beyond the largest number a float holds (about 1.8e308)")
    if value == 0 and re.search(r"[1-9]", re.split(r"[eE]", text)[0]):
        raise argparse.ArgumentTypeError(f"{text!r} is too small to tell apart from 0 (a float holds down to about "
                                         "5e-324)")
    return value


def whole_number(text: str) -> int:
    """An integer, as text."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def two_by(text: str, example: str) -> tuple[int, int]:
    """"AxB": two whole numbers (argparse's one-line error naming ``example`` otherwise)."""
    try:
        a, b = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {example}") from None
    return a, b


def frame_size(text: str) -> tuple[int, int]:
    """WIDTHxHEIGHT in pixels, e.g. 1920x1200."""
    w, h = two_by(text, "WIDTHxHEIGHT, e.g. 1920x1200")
    return w, h


def path_text(text: str) -> str:
    """A file or folder path: not empty (an empty path would silently write nothing)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty path; give a file or folder name")
    return text


def pixel_box(text: str) -> Roi:
    """X,Y,W,H in camera pixels, e.g. 640,400,640,400 (--roi, --camera-roi)."""
    try:
        x, y, w, h = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not X,Y,W,H in whole camera pixels, e.g. 640,400,640,400") \
            from None
    return x, y, w, h


def number_list(count: int, example: str) -> Callable[[str], tuple[float, ...]]:
    """An argparse type: ``count`` comma-separated finite numbers (mm or um), e.g. ``example``."""

    def parse(text: str) -> tuple[float, ...]:
        parts = text.split(",")
        if len(parts) != count:
            raise argparse.ArgumentTypeError(f"{text!r} is not {count} comma-separated numbers, e.g. {example}")
        values = tuple(number(v.strip()) for v in parts)
        if not all(math.isfinite(v) for v in values):
            raise argparse.ArgumentTypeError(f"{text!r}: {next(v for v in values if not math.isfinite(v))} is not a "
                                             "finite number")
        if any(abs(v) > MAX_ABS_POSITION_MM for v in values):
            raise argparse.ArgumentTypeError(f"{text!r}: each number must be within +-{MAX_ABS_POSITION_MM:g}")
        return values

    parse.__name__ = "numbers"
    return parse


def grid_size(text: str) -> tuple[int, int]:
    """NXxNY points, e.g. 5x4 (2 to MAP_MAX_SIDE a side)."""
    nx, ny = two_by(text, "NXxNY, e.g. 5x4 (points along x and y)")
    if not (2 <= nx <= MAP_MAX_SIDE and 2 <= ny <= MAP_MAX_SIDE):
        raise argparse.ArgumentTypeError(f"{text!r}: each side needs 2 to {MAP_MAX_SIDE} points")
    return nx, ny


def build_parser() -> argparse.ArgumentParser:
    """The command line: positionals as on the card, options in groups."""
    p = OneLineParser(
        prog="autofocus.py",
        usage="%(prog)s START_MM END_MM STEP_MM [PORT] [options]",
        description="Find the sharpest focus position of a motorized microscope and move there.",
        epilog="exit codes: 0 focused, 1 internal error (a bug), 2 usage error, 3 no peak (stage back at start), "
               "4 best at the edge of the range, 5 hardware error, 130 interrupted (Ctrl-C, or q in the "
               "--show-images window), 143 terminated (SIGTERM), 129 hung up (SIGHUP), 149 Ctrl-Break "
               "(Windows).  Example: python autofocus.py 10 14 0.05 COM3",
    )
    p.add_argument("start_mm", metavar="START_MM", type=number, nargs="?",
                   help="first focus position, mm")
    p.add_argument("end_mm", metavar="END_MM", type=number, nargs="?", help="last focus position, mm (below START sweeps downward)")
    p.add_argument("step_mm", metavar="STEP_MM", type=number, nargs="?",
                   help=f"distance between frames, mm (about one depth of field; at least {MIN_STEP_MM:g} mm and "
                        f"{MIN_STEP_NATIVE} native units of the stage)")
    p.add_argument("port", metavar="PORT", nargs="?", help="serial port (COM3, /dev/ttyUSB0) or tcp://HOST:PORT; "
                                           "not needed with --simulate or --replay")
    src = p.add_argument_group("microscope")
    src.add_argument("--simulate", action="store_true", help="use the built-in simulated microscope")
    src.add_argument("--replay", metavar="DIR", help="use a recorded stack (DIR/stack.csv with z_mm,file)")
    src.add_argument("--camera", choices=(*LIVE_CAMERAS, "sim"), help="camera: flir (default with a PORT), basler "
                     "(pypylon) or sim "
                     "(renders what the stage's position would show; default with --simulate)")
    src.add_argument("--device", metavar="N", type=whole_number, default=DEFAULT_DEVICE,
                     help="Zaber device number of the focus stage (default 3: Zaber MVR)")
    src.add_argument("--axis", metavar="N", type=whole_number, default=DEFAULT_AXIS, help="axis number (default 1)")
    src.add_argument("--device-db", metavar="FILE", help="Zaber's offline device database file, for offline PCs")
    src.add_argument("--native-unit-nm", type=number, metavar="NM",
                     help="size of one native unit of the axis in nm: skips identification (offline PCs)")
    src.add_argument("--move-timeout-s", metavar="S", type=number, default=DEFAULT_MOVE_TIMEOUT_S,
                     help=f"give up on a move after this long and stop it (default {DEFAULT_MOVE_TIMEOUT_S:g})")
    src.add_argument("--home-timeout-s", metavar="S", type=number, default=DEFAULT_HOME_TIMEOUT_S,
                     help=f"give up on homing after this long and stop it (default {DEFAULT_HOME_TIMEOUT_S:g})")
    homing = src.add_mutually_exclusive_group()
    homing.add_argument("--home", dest="home", action="store_true", default=None,
                        help="allow homing an unhomed stage although --z-min/--z-max are given (homing drives to "
                             "the home sensor, toward position 0, the low end of the travel; whether that raises "
                             "or lowers the objective on an MVR is not documented: check yours)")
    homing.add_argument("--no-home", dest="home", action="store_false",
                        help="never home: an unhomed stage is refused (exit 2)")
    src.add_argument("--clear-faults", action="store_true",
                     help="clear fault flags (e.g. FS, a stall) latched on the axis and go on; without it a "
                          "latched fault refuses the run (exit 5). Check the stage first")
    src.add_argument("--camera-serial", metavar="SERIAL",
                     help="camera serial number, to choose among several (FLIR: SpinView; Basler: pylon Viewer; "
                          "default: the first camera)")
    src.add_argument("--exposure-ms", metavar="MS", type=number,
                     help="exposure time of the FLIR or Basler camera (default: the camera's setting)")
    src.add_argument("--camera-timeout-ms", metavar="MS", type=whole_number,
                     default=DEFAULT_CAMERA_TIMEOUT_MS,
                     help=f"give up waiting for a frame after this long (default {DEFAULT_CAMERA_TIMEOUT_MS}; never "
                          f"less than the exposure + {CAMERA_TIMEOUT_MARGIN_MS} ms)")
    src.add_argument("--camera-roi", metavar="X,Y,W,H", type=pixel_box,
                     help="read only this region of the sensor (camera pixels): the FLIR or Basler camera's own "
                          "ROI, rounded to its increments and restored afterwards (a faster read-out); the simulated camera "
                          "crops its frame")
    srch = p.add_argument_group("search")
    srch.add_argument("--search", choices=tuple(SEARCHES), default=None,
                      help="sweep: every position (default); fast: coarse-to-fine, about a fifth of the frames "
                           "when there is a focus in the range (a blank field costs a sweep); --map searches the "
                           "whole range fast unless this says sweep")
    srch.add_argument("--metric", choices=tuple(METRICS), default=None,
                      help="focus score (default laplacian: variance of the Laplacian; normvar with --transparent)")
    srch.add_argument("--transparent", action="store_true",
                      help="an unstained (transparent) specimen in brightfield: live cells, yeast, bacteria. Its "
                           "contrast vanishes at focus and grows on either side, so focus on the contrast minimum "
                           "(scored by normvar unless --metric says otherwise)")
    srch.add_argument("--blur", "-b", metavar="N", type=whole_number, default=DEFAULT_BLUR,
                      help="bilateral filter diameter in pixels, odd, 3-99 (default 9); larger suppresses more noise")
    srch.add_argument("--settle-ms", metavar="MS", type=number, default=0.0,
                      help="wait after each move before exposing (default 0; raise at high magnification)")
    srch.add_argument("--backlash-mm", metavar="MM", type=number, default=0.0,
                      help="approach every position from the sweep's direction, overshooting by this much "
                           "(default 0: direct-drive stages like the MVR's X-LDA; ~0.01-0.05 for leadscrews)")
    srch.add_argument("--z-min", metavar="MM", type=number, help="soft limit: never command a position below this (mm)")
    srch.add_argument("--z-max", metavar="MM", type=number, help="soft limit: never command a position above this (mm)")
    srch.add_argument("--relative", action="store_true",
                      help="START and END are offsets from where the stage is now (e.g. -0.1 0.1 0.01: +-0.1 mm "
                           "around the current focus); limits apply to the absolute positions")
    srch.add_argument("--roi", metavar="X,Y,W,H", type=pixel_box,
                      help="score only this region of the frame (camera pixels: left, top, width, height); "
                           "with --replay, the ROI saved with the stack is the default")
    srch.add_argument("--peak", choices=PEAK_CHOICES, default="sharpest",
                      help="with several significant peaks (dust on the coverslip ~0.17 mm above the cells, two "
                           "layers): sharpest (default), lowest or highest z (which is nearer the slide depends "
                           "on which way your focus axis points: on an inverted stand higher z usually moves the "
                           "objective up, toward the specimen), or nearest where the stage started; sweep only")
    srch.add_argument("--objective", metavar="NAME", type=str,
                      help=f"the objective: {', '.join(OBJECTIVES)}, or MAGx/NA[/MEDIUM] (20x/0.75, 100x/1.3/oil): "
                           "says its depth of field and the STEP that suits it, checks STEP, and names the STEP to "
                           "use when a peak is narrower than STEP (default with --simulate: --sim-objective)")
    srch.add_argument("--allow-many", action="store_true",
                      help=f"allow more than {MAX_POSITIONS:,} positions in a sweep (at most {MAX_POSITIONS_ALLOWED:,})")
    out = p.add_argument_group("output")
    out.add_argument("--verbose", "-v", action="store_true", help="log every step (and tracebacks on errors)")
    out.add_argument("--show-images", action="store_true",
                     help="a live window: frame, filtered frame, Laplacian and the curve so far (needs a display). "
                          "Keys in it: space pauses and resumes, s saves the view as a PNG beside the outputs, "
                          "q, Esc or its close button stop the run as Ctrl-C does (exit 130)")
    out.add_argument("--hold-window", action=argparse.BooleanOptionalAction, default=None,
                     help="--show-images: keep the window open at the end (the frame at the chosen position, the "
                          "curve with its fitted peak, the verdict) until a key or its close button; default: "
                          "only when run from a terminal (stdin and stdout), never with --json")
    out.add_argument("--json", action="store_true", help="print one JSON object on stdout at the end")
    out.add_argument("--save-images", metavar="DIR", type=path_text,
                     help="save every frame (PNG; float32 frames as TIFF) and DIR/stack.csv (replayable); not the "
                          "--replay folder; a DIR holding a recording needs --overwrite")
    out.add_argument("--overwrite", action="store_true",
                     help="--save-images into a folder that holds a recording: remove its stack.csv, roi.json and "
                          "frames first, then record")
    out.add_argument("--save-curve", metavar="FILE", type=path_text, help="save the focus curve as CSV (index,z_mm,score)")
    out.add_argument("--plot", metavar="FILE", type=path_text,
                     help="save a plot of the focus curve; the extension picks the format (.png, .pdf, .svg, ...)")
    out.add_argument("--make-figures", metavar="DIR",
                     help="write the README's figures (from the simulator) to DIR and exit")
    sim = p.add_argument_group("simulated microscope")
    sim.add_argument("--sim-focus-mm", metavar="MM", type=number, default=SimOptics.focus_mm,
                     help=f"focal plane of the simulated specimen (default {SimOptics.focus_mm})")
    sim.add_argument("--sim-photons", metavar="N", type=number, default=SimOptics.photons,
                     help=f"photons per pixel at the brightest structure (default {SimOptics.photons:g}); "
                          "lower is noisier")
    sim.add_argument("--sim-read-noise-e", metavar="E", type=number, default=SimOptics.read_noise_e,
                     help=f"camera read noise, electrons (default {SimOptics.read_noise_e:g})")
    sim.add_argument("--sim-objective", choices=tuple(OBJECTIVES), default="4x",
                     help="the simulated objective (magnification/NA): 4x/0.10 (default), 10x/0.25, 20x/0.40, "
                          "40x/0.65, 60x/0.85, 60x-oil/1.40, 100x/1.40 (oil); use a STEP of about one depth of field "
                          "(0.05, 0.01, 0.004, 0.0015, 0.001, 0.0005, 0.0005 mm)")
    sim.add_argument("--sim-specimen", choices=SIM_SPECIMENS, default="cells",
                     help="cells (default); blank: an empty field with nothing to focus on; dusty: the cells plus "
                          "dust on the coverslip --sim-dust-height-mm above them (two peaks); transparent: "
                          "unstained cells in brightfield (contrast vanishes at focus: use --transparent)")
    sim.add_argument("--sim-specimen-image", metavar="PATH", type=path_text,
                     help="a micrograph (any image OpenCV reads: PNG, TIFF, ...) as the specimen, in place of the "
                          "synthetic cells: its centre, at the camera's pixel scale (mirrored tiles if smaller "
                          "than the frame); use a sharp, in-focus image")
    sim.add_argument("--sim-defocus", choices=DEFOCUS_MODELS, default="gaussian",
                     help="how defocus blurs: gaussian (default; a Gaussian as wide as the geometric blur disc) "
                          "or pillbox (the geometric blur disc itself: a uniform disc, as in ray optics)")
    sim.add_argument("--sim-phase-rad", metavar="RAD", type=number, default=SimOptics.phase_rad,
                     help=f"transparent: phase delay through a cell (default {SimOptics.phase_rad})")
    sim.add_argument("--sim-condenser-na", metavar="NA", type=number,
                     default=SimOptics.condenser_na,
                     help=f"transparent: condenser aperture, NA (default {SimOptics.condenser_na}; at most the "
                          "objective's counts)")
    sim.add_argument("--sim-dust-height-mm", metavar="MM", type=number,
                     default=SimOptics.dust_height_mm,
                     help=f"dusty: the dust plane's height above the cells (default {SimOptics.dust_height_mm})")
    sim.add_argument("--sim-right-specimen", choices=SIM_SPECIMENS,
                     help="the right half of the field shows this specimen (a two-region field, e.g. for --roi)")
    sim.add_argument("--sim-right-focus-mm", metavar="MM", type=number,
                     help="the right half of the field is in focus at this position (a two-plane field)")
    sim.add_argument("--sim-size", type=frame_size, default=(SimOptics.width, SimOptics.height),
                     metavar="WxH", help="simulated frame size (default 1920x1200)")
    sim.add_argument("--sim-bits", metavar="BITS", type=whole_number, default=8,
                     help="simulated pixel depth: 8, 12 or 16")
    sim.add_argument("--sim-start-mm", metavar="MM", type=number, default=0.0,
                     help="where the simulated stage starts (default 0)")
    sim.add_argument("--sim-time-scale", metavar="X", type=number, default=1.0,
                     help="1 = real hardware timing (default), 0 = as fast as possible")
    sim.add_argument("--sim-seed", metavar="N", type=whole_number, default=0, help="seed of the specimen and noise")
    fmap = p.add_argument_group("focus map (slide scanning)")
    fmap.add_argument("--map", metavar="NXxNY", type=grid_size,
                      help="focus at an NX x NY grid over --map-area on the XY plate and fit the slide's surface")
    fmap.add_argument("--map-area", metavar="X0,Y0,X1,Y1", type=number_list(4, "20,10,28,16"),
                      help="the plate area to map, two opposite corners in mm (the snake starts at X0,Y0)")
    fmap.add_argument("--xy-device", metavar="N", type=whole_number,
                      help="Zaber device number of the XY plate (x = its axis 2, y = axis 1); default: found by "
                           "ZML's microscope detection")
    fmap.add_argument("--xy-native-unit-nm", metavar="NM", type=number,
                      help="size of one native unit of the plate's axes in nm (offline PCs, as --native-unit-nm)")
    fmap.add_argument("--xy-limits", metavar="X0,Y0,X1,Y1", type=number_list(4, "10,5,90,70"),
                      help="soft limits: never send the plate outside this box (mm)")
    fmap.add_argument("--map-refine", metavar="N", type=whole_number, default=0,
                      help="when the surface is uncertain (leave-one-out error above half the depth of field), add "
                           "up to N points where they are missing (default 0: only say where)")
    fmap.add_argument("--map-dof-um", metavar="UM", type=number,
                      help="the objective's depth of field, um (default: STEP)")
    fmap.add_argument("--map-out", metavar="FILE", type=path_text,
                      help="save the map's points as CSV (x_mm,y_mm,z_mm,verdict,uncertainty_mm,status,...)")
    fmap.add_argument("--map-json", metavar="FILE", type=path_text,
                      help="save the whole map as JSON (points, curves, the surface: autofocus.Surface.from_json)")
    fmap.add_argument("--map-npy", metavar="FILE", type=path_text,
                      help="save the surface as the focus_map.npy of Zaber's high-throughput scanning example "
                           "(m passes x n images, um from the first)")
    fmap.add_argument("--map-npy-grid", metavar="NXxNY", type=grid_size,
                      help="the scan's imaging grid for --map-npy (default: the --map grid)")
    fmap.add_argument("--sim-tilt-um-per-mm", metavar="X,Y", type=number_list(2, "4,-2.5"),
                      default=SimSlide.tilt_um_per_mm, help="simulated slide: its tilt along x and y (default 4,-2.5)")
    fmap.add_argument("--sim-bow-um-per-mm2", metavar="B", type=number,
                      default=SimSlide.bow_um_per_mm2,
                      help=f"simulated slide: its bow, um per mm^2 from its centre at (50, 37.5) mm "
                           f"(default {SimSlide.bow_um_per_mm2})")
    fmap.add_argument("--sim-ripple-um", metavar="UM", type=number, default=0.0,
                      help="simulated slide: a ripple no polynomial follows, amplitude (wavelength 10 mm; default 0)")
    fmap.add_argument("--sim-bare-glass", metavar="X0,Y0,X1,Y1", type=number_list(4, "48,35,52,40"),
                      action="append", help="simulated slide: a box of bare glass, no specimen (repeatable)")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def validate_map(args: argparse.Namespace) -> None:
    """The focus-map options' checks (one line, exit 2, nothing moved)."""
    given = [flag for flag, value in (
        ("--map-area", args.map_area), ("--xy-device", args.xy_device), ("--xy-native-unit-nm", args.xy_native_unit_nm),
        ("--xy-limits", args.xy_limits), ("--map-dof-um", args.map_dof_um), ("--map-out", args.map_out),
        ("--map-json", args.map_json), ("--map-npy", args.map_npy), ("--map-npy-grid", args.map_npy_grid),
        ("--sim-bare-glass", args.sim_bare_glass), ("--map-refine", args.map_refine or None)) if value is not None]
    if args.map is None:
        if given:
            raise UsageError(f"{given[0]} belongs to a focus map: add --map NXxNY --map-area X0,Y0,X1,Y1")
        return
    if args.map_area is None:
        raise UsageError("--map needs --map-area X0,Y0,X1,Y1: the plate area to map, two opposite corners in mm")
    if args.replay:
        raise UsageError("--map needs an XY plate: a PORT (a Zaber microscope) or --simulate, not --replay")
    for flag, value in (("--save-images", args.save_images), ("--save-curve", args.save_curve),
                        ("--show-images", args.show_images or None)):
        if value is not None:
            raise UsageError(f"{flag} is for a single focus, not a map: the map's curves are in --map-json")
    if args.map_npy_grid is not None and args.map_npy is None:
        raise UsageError("--map-npy-grid needs --map-npy FILE")
    if args.map_dof_um is not None and not 0 < args.map_dof_um <= 10_000:
        raise UsageError(f"--map-dof-um: {show_value(args.map_dof_um)} is out of range: must be above 0 to 10000 um")
    check_map_request(args.map_area, args.map, xy_limits_mm=args.xy_limits, refine=args.map_refine,
                      depth_of_field_mm=None if args.map_dof_um is None else args.map_dof_um / 1000.0)
    check_values("plate", ZABER_RULES, {"device": 1 if args.xy_device is None else args.xy_device,
                                        "native_unit_nm": args.xy_native_unit_nm})
    if args.simulate or args.camera == "sim":
        simulated_slide(**sim_options(args), **slide_options(args))  # builds nothing heavy: every value checked


# The simulator's keywords and the options that set them (--sim-size sets width and height): how
# sim_options() builds simulated_microscope()'s keywords, and how a message names them.
SIM_OPTIONS: dict[str, str] = {
    "focus_mm": "sim_focus_mm", "photons": "sim_photons", "read_noise_e": "sim_read_noise_e",
    "specimen": "sim_specimen", "right_specimen": "sim_right_specimen", "right_focus_mm": "sim_right_focus_mm",
    "width": "sim_size", "height": "sim_size", "bit_depth": "sim_bits", "seed": "sim_seed",
    "time_scale": "sim_time_scale", "start_mm": "sim_start_mm", "camera_roi": "camera_roi",
    "objective": "sim_objective", "dust_height_mm": "sim_dust_height_mm", "phase_rad": "sim_phase_rad",
    "condenser_na": "sim_condenser_na", "defocus": "sim_defocus", "specimen_image": "sim_specimen_image",
}
ZABER_OPTIONS = {name: name for name in ZABER_RULES}  # ZaberStage's keywords are the options' names
# focus_map(), the simulated slide and the plate's axes: their keywords and the options that set them
MAP_OPTIONS = {"area_mm": "map_area", "grid": "map", "xy_limits_mm": "xy_limits", "refine": "map_refine"}
SLIDE_OPTIONS = {"tilt_um_per_mm": "sim_tilt_um_per_mm", "bow_um_per_mm2": "sim_bow_um_per_mm2",
                 "ripple_um": "sim_ripple_um", "bare_glass": "sim_bare_glass"}
PLATE_OPTIONS = {"device": "xy_device", "native_unit_nm": "xy_native_unit_nm", "move_timeout_s": "move_timeout_s",
                 "home_timeout_s": "home_timeout_s", "clear_faults": "clear_faults", "device_db": "device_db"}
CAMERA_OPTIONS = {"serial": "camera_serial", "exposure_ms": "exposure_ms", "timeout_ms": "camera_timeout_ms",
                  "roi": "camera_roi"}


def option_labels(parser: argparse.ArgumentParser) -> dict[tuple[str, str], str]:
    """How the command line names each keyword a BadValue may name: (scope, keyword) -> its
    option (--settle-ms) or positional (STEP_MM)."""
    by_dest: dict[str, str] = {}
    for action in parser._actions:
        long = [o for o in action.option_strings if o.startswith("--")]
        by_dest[action.dest] = long[0] if long else str(action.metavar or action.dest.upper())
    labels = {("request", name): by_dest[name] for name in REQUEST_RULES if name in by_dest}
    for scope, table in (("simulator", SIM_OPTIONS), ("zaber", ZABER_OPTIONS), ("camera", CAMERA_OPTIONS),
                         ("map", MAP_OPTIONS), ("slide", SLIDE_OPTIONS), ("plate", PLATE_OPTIONS)):
        labels.update({(scope, name): by_dest[dest] for name, dest in table.items() if dest in by_dest})
    labels[("camera", NO_CAMERA)] = "--camera sim / --simulate / --replay"
    return labels


def focus_keywords(args: argparse.Namespace) -> dict[str, Any]:
    """focus()'s keywords from the command line: each one that has an option of the same name."""
    return {name: getattr(args, name) for name in (focus.__kwdefaults__ or {}) if hasattr(args, name)}


def sim_options(args: argparse.Namespace) -> dict[str, Any]:
    """simulated_microscope()'s keywords from the --sim-* options."""
    options = {name: getattr(args, dest) for name, dest in SIM_OPTIONS.items()}
    options["width"], options["height"] = args.sim_size
    return options


def validate(args: argparse.Namespace) -> Request:
    """Every check that needs no hardware, before anything is opened: the options together, then
    the request, the simulator's options and the backends' settings with the checks focus() and the
    backends make themselves (REQUEST_RULES, SIM_RULES, ...).  Each failure is one line and exit 2."""
    if args.step_mm is None:
        raise UsageError("START, END and STEP (mm) are required, e.g. autofocus.py 10 14 0.05 COM3")
    if args.search is None:  # a map searches the whole range fast unless told to sweep
        args.search = "fast" if args.map else "sweep"
    validate_map(args)
    if args.simulate and args.replay:
        raise UsageError("choose one of --simulate and --replay")
    if (args.simulate or args.replay) and args.port:
        raise UsageError(f"PORT {args.port!r} given with --{'simulate' if args.simulate else 'replay'}: drop one")
    if args.replay and args.camera_roi:
        raise UsageError("--camera-roi needs a live camera (FLIR, Basler or --camera sim / --simulate), not --replay")
    if (args.replay or args.simulate) and args.camera:
        raise UsageError(f"--{'replay' if args.replay else 'simulate'} brings its own camera: drop --camera "
                         "(use --camera sim with a PORT to put the simulated camera on a real stage)")
    if not (args.simulate or args.replay) and not args.port:
        raise UsageError("no PORT: give the stage's serial port (e.g. COM3, /dev/ttyUSB0) or tcp://HOST:PORT, "
                         "or use --simulate or --replay DIR")
    request = check_request(Request(args.start_mm, args.end_mm, args.step_mm, **focus_keywords(args)))
    if args.simulate or args.camera == "sim":
        simulated_microscope(**sim_options(args))  # builds nothing heavy: every value checked
    # The stage's and camera's settings too, whichever backend runs: a value out of its range is a
    # mistake wherever it is given.
    check_values("zaber", ZABER_RULES, {name: getattr(args, name) for name in ZABER_RULES if name != "port"})
    check_values("camera", CAMERA_RULES, {name: getattr(args, dest) for name, dest in CAMERA_OPTIONS.items()})
    if args.device_db and not file_exists(Path(args.device_db), f"--device-db {args.device_db}", UsageError):
        raise UsageError(f"--device-db {args.device_db}: no such file; download Zaber's offline device database "
                         "or use --native-unit-nm")
    if args.hold_window and not args.show_images:
        raise UsageError("--hold-window keeps the --show-images window open at the end: add --show-images")
    if args.show_images and (problem := display_problem()):
        raise UsageError(f"--show-images needs a display and none is available ({problem}); "
                         "use --save-images DIR to keep the frames, or --plot FILE for the curve")
    return request


def check_plot_format(path: str) -> None:
    """--plot PATH: an extension matplotlib writes, and a trial plot in that format (in memory),
    so that a format needing a program that is missing (.pgf: xelatex) fails before anything moves."""
    load_matplotlib("--plot")
    from matplotlib.backend_bases import FigureCanvasBase  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415

    ext = Path(path).suffix.lower().lstrip(".")
    formats = set(FigureCanvasBase.get_supported_filetypes())
    if ext not in formats:
        what = "has no extension" if not ext else f".{ext} is not a format matplotlib writes"
        raise UsageError(f"--plot {path}: {what}; end the name with one of "
                         f"{', '.join('.' + f for f in sorted(formats))} (e.g. curve.png)")
    trial = Figure(figsize=(1, 1))
    trial.text(0.5, 0.5, "z (mm)")  # text: some formats lay it out with an outside program
    try:
        trial.savefig(io.BytesIO(), format=ext)
    except Exception as exc:  # noqa: BLE001 - whatever the backend raises, it would raise after the sweep
        raise UsageError(f"--plot {path}: matplotlib cannot write .{ext} here ({first_line(exc)}); "
                         "use .png, .pdf or .svg") from exc


def _special_file(path: Path) -> str | None:
    """What ``path`` leads to, in words, when an output must not be written there: the standard
    output or error (/dev/stdout; "the standard output (a pipe)"), a terminal, a pipe, a socket or a
    device (/dev/null, /dev/full); None for a file or folder of its own, or nothing."""
    try:
        st = path.stat()
    except OSError:
        return None

    def same(fd: int) -> bool:
        try:
            return os.path.samestat(st, os.fstat(fd))
        except OSError:
            return False

    mode = st.st_mode
    kind = (None if stat.S_ISREG(mode) or stat.S_ISDIR(mode) else "a pipe" if stat.S_ISFIFO(mode)
            else "a socket" if stat.S_ISSOCK(mode)
            else "a terminal" if stat.S_ISCHR(mode) and any(same(fd) and os.isatty(fd) for fd in (0, 1, 2))
            else "a device")
    stream = next((name for fd, name in ((1, "the standard output"), (2, "the standard error")) if same(fd)), None)
    if stream is not None:
        return f"{stream} ({kind})" if kind else stream
    return kind


def _not_a_file(path: Path, *, folder: bool = False) -> str | None:
    """Why ``path`` cannot be an output file (or with ``folder``, an output folder), and what to do:
    a Windows device name, the standard output, a terminal, a pipe, a device, a symbolic link."""
    want = "a folder" if folder else "a file name"
    if os.name == "nt" and path.name.split(".")[0].upper() in WINDOWS_RESERVED_NAMES:
        return f"{path.name} is a Windows device name; give {want}"
    if special := _special_file(path):
        own = " of its own" if special.startswith("the standard") else ""
        return f"it is {special}, not {'a folder' if folder else 'a file'}{own}; give {want}"
    if path.is_symlink():
        return (f"it is a symbolic link to {os.readlink(path)}, and the tool never writes through a link; give that "
                f"{'folder' if folder else 'file'}'s own path, or another name")
    return None


def _os_problem(flag: str, path: Path, exc: OSError) -> UsageError:
    """An operating system's refusal (a name too long, a path through a file, /proc) as one line."""
    return UsageError(f"{flag} {path}: {exc.strerror or exc} (checked before anything moved); pick another path")


def check_file_output(flag: str, path: Path, *, inside_new_folder: bool = False) -> None:
    """A file output (--save-curve, --plot) can be written exactly there: not a link, a device or a
    folder, in a folder that exists and is writable, and a name the file system takes (a trial open
    that leaves an existing file untouched and removes a file it created)."""
    try:
        if problem := _not_a_file(path):
            raise UsageError(f"{flag} {path}: {problem}")
        if path.is_dir():
            raise UsageError(f"{flag} {path} is a folder; give a file name inside it, e.g. {path / 'curve.csv'}")
        if inside_new_folder:
            return  # the --save-images folder: created later, checked there
        parent = path.resolve().parent
        if not parent.is_dir():
            raise UsageError(f"{flag} {path}: folder {parent} does not exist; create it or pick another path")
        if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
            raise UsageError(f"{flag} {path}: cannot write there; pick another path")
        existed = path.exists()
        with open(path, "ab"):  # appends nothing: an existing file keeps its bytes
            pass
        if not existed:
            path.unlink()
    except OSError as exc:
        raise _os_problem(flag, path, exc) from exc


def check_output_folder(flag: str, folder: Path) -> None:
    """A folder output (--save-images, --make-figures): not a link, a file or a device; created
    (with its parents) when missing, and writable."""
    try:
        if problem := _not_a_file(folder, folder=True):
            raise UsageError(f"{flag} {folder}: {problem}")
        if folder.exists() and not folder.is_dir():
            raise UsageError(f"{flag} {folder}: is a file, not a folder; pick another name")
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK):
            raise UsageError(f"{flag} {folder}: cannot write there; pick another folder")
    except OSError as exc:
        raise UsageError(f"{flag} {folder}: cannot create the folder ({exc.strerror or exc}); "
                         "pick another folder") from exc


def check_outputs(args: argparse.Namespace, stack: ReplayStack | None = None) -> None:
    """Fail before anything moves (homing included) when an output cannot be written as given.

    Each file output must be a writable file path (not a folder, a link, a device or another output's
    path); --plot needs a format matplotlib can write here; --save-images must be a folder that holds
    no earlier recording unless --overwrite.  No output may be a file the replayed ``stack`` reads,
    however its rows reach it (``ReplayStack.files``).  Exactly the paths given are written."""
    replay_files = set() if stack is None else {os.path.normcase(str(f)) for f in stack.files}
    taken: dict[str, str] = {}

    def key_of(path: Path) -> str:  # one spelling per file: case-insensitive where the OS is
        return os.path.normcase(str(path.resolve()))

    images = None if args.save_images is None else Path(args.save_images)
    if images is not None:
        try:
            where = key_of(images)
            if stack is not None and where == key_of(stack.folder):
                raise UsageError(f"--save-images {images} is the stack being replayed: it would overwrite the "
                                 "recording; save into another folder")
            read_there = sorted(f for f in replay_files if os.path.dirname(f) == where
                                and (os.path.basename(f) in ("stack.csv", ROI_FILE)
                                     or FRAME_FILE.fullmatch(os.path.basename(f))))
            if read_there:
                raise UsageError(f"--save-images {images} holds {Path(read_there[0]).name}, which the replayed "
                                 "stack reads: it would overwrite the recording; save into another folder")
            for name in ("stack.csv", ROI_FILE):
                inside = images / name
                if inside.exists() and not inside.is_file() and not inside.is_symlink():
                    raise UsageError(f"--save-images {images}: {inside} is a folder; remove it or pick another folder")
                taken[key_of(inside)] = f"--save-images's {name}"
            old = recording_files(images) if images.is_dir() else []
        except OSError as exc:
            raise _os_problem("--save-images", images, exc) from exc
        if old and not args.overwrite:
            frames = sum(1 for f in old if FRAME_FILE.fullmatch(f.name))
            raise UsageError(f"--save-images {images} already holds a recording ({frames} frames"
                             f"{', stack.csv' if (images / 'stack.csv') in old else ''}): pass --overwrite to replace "
                             "it (its frames are removed first), or pick another folder")
    for flag, value in (("--save-curve", args.save_curve), ("--plot", args.plot), ("--map-out", args.map_out),
                        ("--map-json", args.map_json), ("--map-npy", args.map_npy)):
        if value is None:
            continue
        path = Path(value)
        try:
            key = key_of(path)
            in_images = images is not None and key_of(path.parent) == key_of(images)
        except OSError as exc:
            raise _os_problem(flag, path, exc) from exc
        if key in taken or (in_images and FRAME_FILE.fullmatch(path.name.lower())):
            raise UsageError(f"{flag} {path} is also written as {taken.get(key, '--save-images frames')}; "
                             "give each output its own path")
        if key in replay_files or (stack is not None and key_of(path.parent) == key_of(stack.folder)
                                   and (path.exists() or path.name in ("stack.csv", ROI_FILE))):
            raise UsageError(f"{flag} {path} is a file of the stack being replayed; write elsewhere")
        taken[key] = flag
        check_file_output(flag, path, inside_new_folder=in_images and not images.is_dir())  # type: ignore[union-attr]
    if args.plot is not None:
        check_plot_format(args.plot)
    if images is not None:
        check_output_folder("--save-images", images)


def zaber_stage(args: argparse.Namespace) -> ZaberStage:
    """The focus axis the arguments name, on the PORT they give."""
    return ZaberStage(args.port, args.device, args.axis, native_unit_nm=args.native_unit_nm,
                      device_db=args.device_db, move_timeout_s=args.move_timeout_s,
                      home_timeout_s=args.home_timeout_s, clear_faults=args.clear_faults)


def live_camera(args: argparse.Namespace) -> Camera:
    """The FLIR (default) or Basler camera the arguments ask for."""
    return LIVE_CAMERAS[args.camera or "flir"](args.camera_serial, exposure_ms=args.exposure_ms,
                                               timeout_ms=args.camera_timeout_ms, roi=args.camera_roi)


def close_hardware(camera: Any, zaber: ZaberStage) -> None:
    """Close the camera (when it was opened) and then the stage's connection."""
    with INTERRUPTS.held():  # a second Ctrl-C must not leave the camera half restored
        try:
            if camera is not None and hasattr(camera, "close"):
                camera.close()
        finally:
            zaber.close()


@contextlib.contextmanager
def open_microscope(args: argparse.Namespace, stack: ReplayStack | None = None) -> Iterator[tuple[Stage, Camera]]:
    """The stage and camera the arguments ask for (with --replay, ``stack``, read by the caller);
    closes them afterwards."""
    if stack is not None:
        lo, hi = stack.range_mm
        # (--relative: offsets; the plan check against the stage's travel, the stack's range, says it)
        for name, z in () if args.relative else (("START", args.start_mm), ("END", args.end_mm)):
            if not lo - FLOAT_SLACK_MM <= z <= hi + FLOAT_SLACK_MM:
                raise UsageError(f"{name} {z!r} mm is outside the replay stack's range {lo!r}..{hi!r} mm")
        stage: Any = ReplayStage(stack)
        yield stage, ReplayCamera(stage, stack)
        return
    if args.simulate:
        yield simulated_microscope(**sim_options(args))
        return
    zaber = zaber_stage(args)
    camera: Any = None
    try:
        if args.camera == "sim":  # the simulated camera shows what the real stage's position would
            _, sim = simulated_microscope(**sim_options(args))
            camera = SimCamera(zaber, sim.optics, sim.timing, sim.clock, roi=args.camera_roi)
        else:
            camera = live_camera(args)
        yield zaber, camera
    finally:
        close_hardware(camera, zaber)


def configure_logging(verbose: bool) -> None:
    """Log to stderr: every step with --verbose, else warnings only.  matplotlib's notes (a cache
    folder it had to make in the temporary folder) are shown with --verbose only, so that an error
    stays one line, and never its debug lines (hundreds of "findfont: ..."); Python warnings are
    --verbose lines too (``log_warning``)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if verbose else logging.WARNING)
    log.propagate = False
    mpl = logging.getLogger("matplotlib")
    mpl.handlers[:] = [handler]
    mpl.setLevel(logging.INFO if verbose else logging.ERROR)
    mpl.propagate = False


def log_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None,
                line: str | None = None) -> None:
    """warnings.showwarning for a run: a Python warning (numpy's RuntimeWarning, a library's
    DeprecationWarning) is a --verbose line, never a second line beside an error."""
    log.debug("%s: %s (%s:%d)", category.__name__, message, filename, lineno)


def stage_header(info: dict[str, Any], port: str) -> str:
    """The run's header line for a Zaber stage: which stage, its travel, where the unit came from."""
    lo, hi = info["travel_mm"]
    name = f"{info['name']}, " if info.get("name") else ""
    checked = {None: "", True: ", which Zaber's device database confirms",
               False: ": the travel it implies; not checked against Zaber's device database (ZML could not "
                      "identify the device)"}[info.get("units_checked")]
    return (f"stage: {name}device {info['device']} axis {info['axis']} on {port}: travel {lo:g}..{hi:g} mm "
            f"({hi - lo:g} mm; native unit {info['native_unit_nm']:g} nm from {info['units_from']}{checked})")


def curve_note(result: FocusResult, policy: PeakPolicy) -> str | None:
    """One line when the curve is not one clean peak: several significant peaks (and the option
    that picks another), or a dip between two peaks (an unstained specimen's focus)."""
    peaks = result.peaks
    if result.transparent:  # the faded contrast far from focus makes maxima at the range's ends too
        return None
    between = [d for d in result.dips if any(p.z_mm < d.z_mm for p in peaks) and any(p.z_mm > d.z_mm for p in peaks)]
    unstained = (f"an unstained (transparent) specimen in brightfield is in focus at the dip at "
                 f"{between[0].z_mm:.4f} mm between them: --transparent focuses there") if between else ""
    if len(peaks) > 1:
        where = ", ".join(f"{p.z_mm:.4f}" for p in peaks)
        others = [c for c in PEAK_CHOICES if c != policy and
                  choose_peak(peaks, c, result.start_mm).z_mm != choose_peak(peaks, policy, result.start_mm).z_mm]
        return (f"note: {len(peaks)} significant peaks, at {where} mm: dust above the specimen or two layers "
                f"(the {policy} was chosen" + (f"; --peak {' / '.join(others)} picks another" if others else "")
                + ")" + (f", or {unstained}" if unstained else ""))
    if result.dips:  # a minimum between rising flanks
        return (f"note: the curve dips at {result.dips[0].z_mm:.4f} mm between higher flanks: an unstained "
                "(transparent) specimen in brightfield is in focus at such a minimum; --transparent focuses there")
    return None


def summary_line(result: FocusResult) -> str:
    """The human summary: where, how sharp, how many frames, how long, and the verdict."""
    fit = f" (fitted peak; best frame at {result.best_sample_mm:.4f} mm)" if result.fit.used and \
        result.best_mm == result.fit.z_mm else ""
    at = "best focus (contrast minimum, --transparent)" if result.transparent else "best focus"
    plus = f" \N{PLUS-MINUS SIGN} {_length(result.uncertainty_mm)}" if result.uncertainty_mm is not None else ""
    head = {
        "focused": f"{at} at {result.best_mm:.4f} mm{plus}{fit}",
        "edge": f"best focus at the edge of the range, {result.best_mm:.4f} mm",
        "no_peak": f"no focus found; stage returned to {result.best_mm:.4f} mm" if result.best_mm == result.start_mm
        else f"no focus found; stage left at the last frame, {result.best_mm:.4f} mm (not returned to where the run "
             f"started, {result.start_mm:.4f} mm: the axis was homed for this run, or that lies outside --z-min/--z-max)",
    }[result.verdict.kind]
    if result.verdict.kind == "focused" and result.fit.scale == "coarse":  # the coarse score gave the position
        head += (" (found at the coarse scale: " + ("the peak is narrower than STEP)" if result.verdict.narrow
                                                     else "fine detail is lost in noise)"))
    line = (f"{head}: score {result.best_score:.4g}, {result.frames} frames, {result.moves} moves, "
            f"{result.elapsed_s:.2f} s ({result.search} search)")
    if result.verdict.kind != "focused":
        line += f"\n{result.verdict.reason}"
        if result.verdict.suggestion_mm:
            lo, hi = result.verdict.suggestion_mm
            line += f"; try the range {lo:g} {hi:g}"
    return line


def slide_options(args: argparse.Namespace) -> dict[str, Any]:
    """SimSlide's fields from the --sim-* slide options."""
    return dict(tilt_um_per_mm=tuple(args.sim_tilt_um_per_mm), bow_um_per_mm2=args.sim_bow_um_per_mm2,
                ripple_um=args.sim_ripple_um, bare_glass=tuple(tuple(b) for b in args.sim_bare_glass or ()))


@contextlib.contextmanager
def open_map_microscope(args: argparse.Namespace) -> Iterator[tuple[XYStage, Stage, Camera, dict[str, Any] | None]]:
    """The plate, focus stage and camera a --map run asks for (and, on a Zaber microscope, what
    was found); closes them afterwards."""
    if args.simulate:
        plate, stage, camera = simulated_slide(**sim_options(args), **slide_options(args))
        yield plate, stage, camera, None
        return
    zaber = zaber_stage(args)
    camera: Any = None
    try:
        axes = dict(native_unit_nm=args.xy_native_unit_nm, move_timeout_s=args.move_timeout_s,
                    home_timeout_s=args.home_timeout_s, clear_faults=args.clear_faults)
        connection = zaber._connection
        if args.xy_device is not None:
            try:
                plate = ZaberPlate.from_device(connection, args.xy_device, **axes)
            except UsageError as exc:
                raise UsageError(str(exc).replace("pass --device N", "pass --xy-device N")) from exc
        else:
            plate = ZaberPlate.from_microscope(connection, **axes)
        if args.camera == "sim":  # the simulated slide, seen at the real stages' positions
            _, sim = simulated_microscope(**sim_options(args))
            camera = SlideCamera(zaber, plate, SimSlide(focus_mm=args.sim_focus_mm, **slide_options(args)),
                                 sim.optics, sim.timing, sim.clock, roi=args.camera_roi)
        else:
            camera = live_camera(args)
        yield plate, zaber, camera, {"focus": zaber.describe(), "plate": plate.describe()}
    finally:
        close_hardware(camera, zaber)


def plate_header(info: dict[str, Any]) -> str:
    """The header line for a Zaber plate: which device and axes, their travel and unit."""
    x, y = info["x"], info["y"]
    return (f"plate: device {x['device']} axis {x['axis']} (x), device {y['device']} axis {y['axis']} (y): travel "
            f"X {x['travel_mm'][0]:g}..{x['travel_mm'][1]:g}, Y {y['travel_mm'][0]:g}..{y['travel_mm'][1]:g} mm "
            f"(native unit {x['native_unit_nm']:g} nm from {x['units_from']})")


def map_summary(fmap: FocusMap) -> str:
    """The human summary of a map: its surface, how far to trust it, its points and its cost."""
    x0, y0, x1, y1 = fmap.area_mm
    nx, ny = fmap.grid
    counts = {s: sum(p.status == s for p in fmap.points) for s in ("used", "not_focused", "outlier", "failed")}
    head = f"focus map {nx}x{ny} over X {x0:g}..{x1:g}, Y {y0:g}..{y1:g} mm: "
    if fmap.surface is None:
        head += "no surface"
    else:
        tx, ty = fmap.tilt_um_per_mm or (float("nan"), float("nan"))
        head += (f"{fmap.model} surface, tilt {tx:+.2f} / {ty:+.2f} um/mm; residual RMS {fmap.rms_um:.2f} um, "
                 f"leave-one-out {fmap.loo_rms_um:.2f} um ({'within' if fmap.trusted else 'ABOVE'} half the depth of "
                 f"field, {500 * fmap.depth_of_field_mm:.2f} um)")
    n = len(fmap.points)
    return (f"{head}; {counts['used']} of {n} points used, {counts['not_focused']} without focus, "
            f"{counts['outlier']} outlier{'s' if counts['outlier'] != 1 else ''}"
            + (f", {counts['failed']} failed" if counts["failed"] else "")
            + f"; {fmap.frames} frames ({fmap.frames / max(n, 1):.1f} a point), {fmap.elapsed_s:.2f} s")


def write_map_outputs(args: argparse.Namespace, fmap: FocusMap) -> str | None:
    """Write --map-out, --map-json, --map-npy and --plot (the heat map); returns the first failure
    as one line (None: all written).  Without a surface --map-npy is skipped with a note."""
    outputs: list[tuple[str, str | None, Callable[[str, FocusMap], None]]] = [
        ("--map-out", args.map_out, write_map_csv), ("--map-json", args.map_json, write_map_json),
        ("--map-npy", args.map_npy, lambda path, m: write_map_npy(path, m, args.map_npy_grid)),
        ("--plot", args.plot, plot_map)]
    for flag, path, write in outputs:
        if not path:
            continue
        if flag == "--map-npy" and fmap.surface is None:
            print(f"note: --map-npy {path} not written: the map has no surface", file=sys.stderr)
            continue
        try:
            write(path, fmap)
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else first_line(exc)
            return f"writing {flag} {path} failed ({reason})"
    return None


def report_map(args: argparse.Namespace, fmap: FocusMap | None, code: int, error: str | None, where: str | None,
               info: dict[str, Any] | None) -> int:
    """A map run's line(s), its output files and its JSON; returns the exit code."""
    text = sys.stderr if args.json else sys.stdout
    try:
        if error is not None:
            print(f"autofocus.py: {error}; {where}", file=sys.stderr)
        if fmap is not None:
            failed_output = write_map_outputs(args, fmap)
            if failed_output and error is None:
                code, error, where = EXIT_HARDWARE, failed_output, "the map had finished"
                print(f"autofocus.py: {error}; the map's summary follows", file=sys.stderr)
            late = INTERRUPTS.pending
            if error is None and late is not None:
                code, error = interrupt_code(late), f"{interrupt_text(late)} after the map had finished"
                print(f"autofocus.py: {error}; every output was written", file=sys.stderr)
            print(map_summary(fmap), file=text if error is None else sys.stderr)
            for warning in fmap.warnings:
                print(f"note: {warning}", file=text if error is None else sys.stderr)
        if args.json:
            doc = fmap.to_json() if fmap is not None else {"points": []}
            print(strict_json({**doc, "exit_code": code, "error": error, "stage": where, "stage_info": info}))
        sys.stdout.flush()
    except BrokenPipeError:
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return code


def run_map(args: argparse.Namespace, request: Request) -> int:
    """--map: open the plate, focus stage and camera, map (``request``: each point's search, checked
    by ``validate``), write the outputs; returns the exit code."""
    check_outputs(args)
    fmap: FocusMap | None = None
    error: str | None = None
    where: str | None = None
    info: dict[str, Any] | None = None
    code = EXIT_OK
    progress: Any = None
    refused = False
    try:
        with open_map_microscope(args) as (plate, stage, camera, info):
            if info is not None and not args.json:
                print(stage_header(info["focus"], args.port))
                print(plate_header(info["plate"]))
            nx, ny = args.map
            if sys.stderr.isatty() and not args.verbose:
                from tqdm import tqdm  # noqa: PLC0415

                progress = tqdm(total=nx * ny, unit="point", desc="focus map", file=sys.stderr, leave=False)

            def on_point(point: MapPoint, done: int, total: int) -> None:
                if progress is not None:
                    progress.total = total
                    progress.set_postfix_str(f"({point.x_mm:g}, {point.y_mm:g}) {point.verdict}, {point.frames} frames",
                                             refresh=False)
                    progress.update(1)

            fmap = focus_map(plate, stage, camera, area_mm=args.map_area, grid=args.map, start_mm=args.start_mm,
                             end_mm=args.end_mm, step_mm=args.step_mm, xy_limits_mm=args.xy_limits,
                             refine=args.map_refine, on_point=on_point,
                             depth_of_field_mm=None if args.map_dof_um is None else args.map_dof_um / 1000.0,
                             **{k: v for k, v in dataclasses.asdict(request).items()
                                if k not in ("start_mm", "end_mm", "step_mm")})
            code = fmap.exit_code
    except BaseException as failed:  # noqa: BLE001 - only a map that had started is handled here
        with INTERRUPTS.held():
            origin = with_stage_state(failed)
            if origin is not None:
                fmap, where = origin.partial, origin.stage_state  # type: ignore[assignment]
            elif fmap is not None and isinstance(failed, (KeyboardInterrupt, AutofocusError)):
                where = "the map had finished"  # closing the camera or the stage was cut short
            else:
                refused = True
                raise
            code, error = failure_line(in_option_terms(failed))
            if args.verbose:
                log.debug("traceback", exc_info=failed)
    finally:
        with INTERRUPTS.held():
            if progress is not None:
                progress.close()
            if not refused:
                code = report_map(args, fmap, code, error, where, info)
                INTERRUPTS.finish()
    return code


def run_make_figures(args: argparse.Namespace) -> int:
    """--make-figures DIR: the README's figures; their paths on stdout (stderr with --json, whose
    one object is then the only thing on stdout)."""
    folder = Path(args.make_figures)
    check_output_folder("--make-figures", folder)
    load_matplotlib("--make-figures")
    optics = SimOptics(seed=args.sim_seed, photons=args.sim_photons)
    try:
        written = make_figures(folder, optics, args.blur)
    except OSError as exc:
        raise OutputError(f"--make-figures {folder}: writing the figures failed ({exc.strerror or exc})") from exc
    for path in written:
        print(path, file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(strict_json(result_json(None, exit_code=EXIT_OK)))
    return EXIT_OK


def run(args: argparse.Namespace, request: Request) -> int:
    """Open the microscope, run the autofocus (``request``, checked by ``validate``), write the
    outputs; returns the exit code."""
    if args.map is not None:
        return run_map(args, request)
    stack = ReplayStack(args.replay) if args.replay else None  # read once: its files are checked, then replayed
    check_outputs(args, stack)
    n_positions = len(plan_positions(args.start_mm, args.end_mm, args.step_mm))
    result: FocusResult | None = None
    error: str | None = None
    where: str | None = None
    stage_info: dict[str, Any] | None = None
    zaber: ZaberStage | None = None
    code = EXIT_OK
    saver: ImageSaver | None = None
    live: LiveView | None = None
    held: tuple[np.ndarray, float] | None = None  # the frame the window shows when held open at the end
    progress: Any = None
    roi: Roi | None = args.roi
    refused = False

    def say(line: str) -> None:  # a line on stderr, under the progress bar when there is one
        if progress is not None:
            progress.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr)

    plan_log.setLevel(logging.INFO if args.relative else logging.NOTSET)  # --relative: say where, in absolute mm
    try:
        with open_microscope(args, stack) as (stage, camera):
            if isinstance(stage, ZaberStage):
                zaber = stage
                stage_info = stage.describe()
                if not args.json:
                    print(stage_header(stage_info, args.port))
            recorded = getattr(getattr(camera, "stack", None), "roi", None)
            if roi is None and recorded is not None:
                roi = recorded
                log.warning("scoring the region of interest saved with the stack, %s (--roi X,Y,W,H to change it)",
                            ",".join(map(str, roi)))
            if args.show_images:
                live = LiveView(args.blur, roi, positions=plan_positions(args.start_mm, args.end_mm, args.step_mm),
                                relative=args.relative, search=args.search,
                                score_name=curve_title(args.metric, args.transparent),
                                save_dir=outputs_folder(args), say=say, screen_px=screen_size_px())
            if sys.stderr.isatty() and not args.verbose:
                from tqdm import tqdm  # noqa: PLC0415

                progress = tqdm(total=n_positions if args.search == "sweep" else None, unit="frame",
                                desc="autofocus", file=sys.stderr, leave=False)

            def on_frame(index: int, z_mm: float, frame: np.ndarray, score: float) -> None:
                nonlocal saver
                if args.save_images:
                    if saver is None:  # on the first frame: a plan refused before moving leaves no stack
                        saver = ImageSaver(args.save_images, roi, overwrite=args.overwrite)
                    saver(index, z_mm, frame, score)
                if live is not None:
                    live.offer(index, z_mm, frame, score)
                if progress is not None:
                    progress.update(1)

            if roi != request.roi:  # the region recorded with a replayed stack: checked as a --roi would be
                request = check_request(dataclasses.replace(request, roi=roi))
            if request.objective is None and (args.simulate or args.camera == "sim"):  # its objective is known
                request = dataclasses.replace(request, objective=args.sim_objective)
            elif args.objective and args.step_mm / (depth_of_field_um(args.objective) / 1000) <= 2:
                print(objective_line(args.objective, args.step_mm), file=sys.stderr)  # (else focus() warns)
            result = run_request(stage, camera if live is None else LiveCamera(camera, live), request,
                                 on_frame=on_frame)
            if live is not None:
                live.refresh()
                if hold_window(args):
                    held = final_frame(camera, live, result)
            code = result.exit_code
    except BaseException as failed:  # noqa: BLE001 - only a run that had started is handled here
        with INTERRUPTS.held():  # a further Ctrl-C now must not lose what was measured
            origin = with_stage_state(failed)
            if origin is not None:
                result, where = origin.partial, origin.stage_state  # type: ignore[assignment]
            elif result is not None and isinstance(failed, (KeyboardInterrupt, AutofocusError)):
                # The search had finished and the stage had been sent to its answer (closing the
                # camera or the live view was cut short): the run's result stands.
                where = f"the stage is at {result.best_mm:.4f} mm (the search had finished)"
            else:
                refused = True
                raise  # refused before anything moved: main() reports it
            code, error = failure_line(in_option_terms(failed))
            if args.verbose:
                log.debug("traceback", exc_info=failed)
    finally:
        with INTERRUPTS.held():  # a second Ctrl-C must not cut the stack, the window or the outputs short
            if progress is not None:
                progress.close()  # before any message: a line printed over the bar would be glued to it
            if saver is not None:
                saver.close()
            if not refused:
                code = report(args, result, code, error, where, stage_info, zaber, roi)
                INTERRUPTS.finish()  # everything is said: a signal from now on changes nothing
            if live is not None:
                try:  # a finished run, everything written and said: it stays on screen until a key
                    if held is not None and result is not None and error is None and INTERRUPTS.pending is None:
                        live.hold(held[0], held[1], result)
                finally:
                    live.close()
    return code


def hold_window(args: argparse.Namespace) -> bool:
    """Whether the --show-images window stays open at the end: --hold-window / --no-hold-window,
    else only in an interactive run (a terminal on stdin and on stdout), never with --json."""
    if args.hold_window is not None:
        return bool(args.hold_window)
    try:
        return not args.json and all(f is not None and f.isatty() for f in (sys.stdin, sys.stdout))
    except (ValueError, OSError):  # a closed stream
        return False


def final_frame(camera: Camera, live: LiveView, result: FocusResult) -> tuple[np.ndarray, float] | None:
    """A frame where the run left the stage (its answer, or its start after no_peak), for the
    window held open at the end; the best frame of the run when the camera cannot give one."""
    try:
        return camera.capture(), result.best_mm
    except AutofocusError as exc:  # the result stands: the picture is only a picture
        log.warning("no frame at %.4f mm for the window (%s); it shows the best frame", result.best_mm,
                    first_line(exc))
        return live.best_frame()


def outputs_folder(args: argparse.Namespace) -> Path:
    """Where the window's ``s`` saves views: beside the outputs (--save-curve's or --plot's
    folder, else --save-images DIR), else the current folder."""
    for path in (args.save_curve, args.plot):
        if path:
            return Path(path).parent
    return Path(args.save_images) if args.save_images else Path(".")


def with_stage_state(exc: BaseException) -> AutofocusError | Interrupted | None:
    """The run's failure that says where the stage was left: ``exc``, or the one it was raised while
    handling (closing the camera failed after the run had failed)."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, (AutofocusError, Interrupted)) and exc.stage_state is not None:
            return exc
        exc, seen = exc.__context__, seen + 1  # type: ignore[assignment]
    return None


def report(args: argparse.Namespace, result: FocusResult | None, code: int, error: str | None, where: str | None,
           stage_info: dict[str, Any] | None, zaber: ZaberStage | None, roi: Roi | None) -> int:
    """The run's line(s), its output files and its JSON; returns the exit code.  (A stdout or stderr
    that cannot be written is main()'s to report: see GuardedStream.)"""
    if error is not None:
        print(f"autofocus.py: {error}; {where}", file=sys.stderr)
    if result is not None:
        failed_output = write_outputs(args, result)
        if failed_output and error is None:
            code, error, where = EXIT_HARDWARE, failed_output, f"the stage is at {result.best_mm:.4f} mm"
            print(f"autofocus.py: {error}; {where}", file=sys.stderr)
        if error is None:
            late = INTERRUPTS.pending
            if late is not None:  # the run had finished: say so, and exit as interrupted
                code, error = interrupt_code(late), f"{interrupt_text(late)} after the search had finished"
                where = f"the stage is at {result.best_mm:.4f} mm"
                print(f"autofocus.py: {error}; {where}; every output was written", file=sys.stderr)
            else:
                print(summary_line(result), file=sys.stderr if args.json else sys.stdout)
                for line in result.notes:
                    print(line, file=sys.stderr if args.json else sys.stdout)
                if note := curve_note(result, args.peak):
                    print(note, file=sys.stderr if args.json else sys.stdout)
    if stage_info is not None and zaber is not None:
        stage_info["homed_now"] = not stage_info["homed"] and zaber.homed
    if args.json:
        print(strict_json(result_json(result, exit_code=code, error=error, where=where, stage_info=stage_info,
                                     roi=roi, camera_roi=args.camera_roi)))
    sys.stdout.flush()
    return code


def write_outputs(args: argparse.Namespace, result: FocusResult) -> str | None:
    """Write --save-curve and --plot; returns the first failure as one line (None: all written)."""
    for flag, path, write in (("--save-curve", args.save_curve, write_curve_csv),
                              ("--plot", args.plot, plot_curve)):
        if not path:
            continue
        try:
            write(path, result.samples if write is write_curve_csv else result)  # type: ignore[operator]
        except Exception as exc:  # noqa: BLE001 - disk full, folder removed, a backend failing: one line
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else first_line(exc)
            return f"writing {flag} {path} failed ({reason}); the result is in the --json output and on screen"
    return None


def in_option_terms(failed: BaseException) -> BaseException:
    """The error as the command line says it: every keyword it names given by its option."""
    for error in (failed, failed.__cause__):
        if isinstance(error, AutofocusError):
            error.relabel(option_labels(build_parser()))
    return failed


class GuardedStream:
    """stdout or stderr for the length of main(): writing never raises into the run.

    A stream closed when the tool started (``2>&-``: Python makes it None) is /dev/null.  A stream
    that fails (a full disk, a reader that went away, ``> /dev/full``) is written no more: ``error``
    keeps why, and its descriptor is pointed at /dev/null so that nothing still buffered fails again
    when Python exits.  main() then reports a failed stdout (exit code)."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.error: BaseException | None = None

    def write(self, text: str) -> int:
        if self.stream is not None and self.error is None:
            try:
                self.stream.write(text)
            except (OSError, ValueError) as exc:  # ValueError: written after it was closed
                self._failed(exc)
        return len(text)

    def flush(self) -> None:
        if self.stream is not None and self.error is None:
            try:
                self.stream.flush()
            except (OSError, ValueError) as exc:
                self._failed(exc)

    def isatty(self) -> bool:
        try:
            return self.stream is not None and self.error is None and bool(self.stream.isatty())
        except (OSError, ValueError):
            return False

    def fileno(self) -> int:
        if self.stream is None:
            raise io.UnsupportedOperation("the stream was closed when the tool started")
        return int(self.stream.fileno())

    def __getattr__(self, name: str) -> Any:  # encoding, errors, ... as the stream has them
        return getattr(self.stream, name)

    def _failed(self, exc: BaseException) -> None:
        self.error = exc
        with contextlib.suppress(Exception):  # a test's capture object has no descriptor: nothing to do
            fd = self.stream.fileno()
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, fd)
            os.close(null)


@contextlib.contextmanager
def guarded_streams() -> Iterator[tuple[GuardedStream, GuardedStream]]:
    """sys.stdout and sys.stderr as GuardedStreams for the block.  A descriptor 0-2 closed when the
    tool started is first opened on /dev/null, so that no file the run opens takes its number
    (libpng and OpenCV write to descriptor 2 directly; a saved frame must not receive them)."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            with contextlib.suppress(OSError):
                null = os.open(os.devnull, os.O_RDWR)
                if null != fd:
                    os.dup2(null, fd)
                    os.close(null)
    saved = sys.stdout, sys.stderr
    out, err = GuardedStream(sys.stdout), GuardedStream(sys.stderr)
    sys.stdout, sys.stderr = out, err  # type: ignore[assignment]
    try:
        yield out, err
    finally:
        out.flush()
        err.flush()
        sys.stdout, sys.stderr = saved


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, run, and turn every error into one line and an exit code.

    A stdout that cannot be written (a full disk, a closed pipe) does not change what the run
    does to the stage; it turns a verdict's exit code (0, 3, 4) into 5, with one line on stderr:
    the result did not reach the reader."""
    argv = list(sys.argv[1:] if argv is None else argv)
    with guarded_streams() as (out, err):
        code = _main(argv)
        out.flush()
        if out.error is not None and code in VERDICT_EXIT.values():
            reason = getattr(out.error, "strerror", None) or first_line(out.error)
            print(f"autofocus.py: could not write to stdout ({reason}); the result did not reach it: exit code "
                  f"{EXIT_HARDWARE}, not {code}", file=sys.stderr)
            code = EXIT_HARDWARE
    return code


def _main(argv: list[str]) -> int:
    """main() inside its guarded streams: the signal handlers from the first moment (parsing too),
    then parse, check, run; every exit prints one JSON object with --json."""
    global _early_signal
    wants_json, verbose = "--json" in argv, False  # until the options are parsed (no abbreviations)

    def say(code: int, message: str, json_error: str) -> int:
        print(f"autofocus.py: {message}", file=sys.stderr)
        if wants_json:
            print(strict_json(result_json(None, exit_code=code, error=json_error)))
        return code

    with INTERRUPTS, warnings.catch_warnings():
        warnings.showwarning = log_warning
        try:
            if _early_signal is not None:  # arrived while this file loaded, before the handlers
                signum, _early_signal = _early_signal, None
                raise Interrupted(signum)
            parser = build_parser()
            try:
                args = parser.parse_intermixed_args(argv)  # options may stand between the positionals
            except SystemExit as exc:  # argparse: --help, --version, or a one-line usage error
                code = exc.code if isinstance(exc.code, int) else EXIT_USAGE
                if code and wants_json:
                    print(strict_json(result_json(None, exit_code=code, error=getattr(parser, "last_error", None)
                                                  or "usage error (see stderr)")))
                return code
            wants_json, verbose = args.json, args.verbose
            configure_logging(args.verbose)
            if args.make_figures:
                return run_make_figures(args)
            request = validate(args)
            return run(args, request)
        except AutofocusError as exc:
            INTERRUPTS.finish()
            exc.relabel(option_labels(build_parser()))  # named by its option, not its keyword
            if verbose:
                log.debug("traceback", exc_info=exc)
            return say(exc.exit_code, str(exc), str(exc))
        except KeyboardInterrupt as exc:
            INTERRUPTS.finish()
            return say(interrupt_code(exc), f"{interrupt_text(exc)} before the search started; nothing was measured, "
                       "and any motion (homing) was stopped", interrupt_text(exc))


if __name__ == "__main__":
    raise SystemExit(main())
