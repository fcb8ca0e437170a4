"""Image-based autofocus for a motorized microscope.

Steps the focus (Z) axis of a Zaber microscope through a range, scores each camera frame by
the variance of the Laplacian of the bilateral-filtered image, and moves to the sharpest
position.  Hardware: the Zaber Motion Library (ZML) for the stage, a Teledyne FLIR camera
through simple-pyspin, or a Basler camera through pypylon.  No hardware?  ``--simulate`` uses a
built-in simulated microscope and ``--replay DIR`` a recorded through-focus stack.

Example::

    python autofocus.py 10 14 0.05 COM3            # MVR focus stage: device 3, axis 1
    python autofocus.py 10 14 0.05 --simulate      # no hardware needed
    python autofocus.py 10 14 0.05 COM3 --camera basler   # a Basler camera (pip install pypylon)

Exit codes:

    0    focused: a real peak was found and the stage was sent to it
    1    unexpected internal error (a bug: please report it with --verbose output)
    2    usage or configuration error (bad input, broken replay stack); nothing moved
    3    no_peak: the focus curve is flat or noise-only; the stage went back to where it started
    4    edge: the best focus lies at the start or end of the range; the focus may be outside it
    5    hardware or communication error (stage, camera); the stage was stopped and returned
         when possible -- after an interruption from outside (flag NI) nothing more is moved
    130  interrupted (Ctrl-C, SIGINT, or q / Esc / the close button of the --show-images window);
         the stage was stopped and sent back to where it started
    143  terminated (SIGTERM: kill, a job scheduler); handled exactly like Ctrl-C
    129  hung up (SIGHUP: the terminal or SSH session closed; POSIX only); handled like Ctrl-C
    149  Ctrl-Break (SIGBREAK; Windows only); handled like Ctrl-C

Sections, in dependency order: constants, exceptions, result types, focus scores, peak
fitting and verdict, search, device interfaces, backends (Zaber + FLIR, Basler, simulated, replay),
output, command line.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import csv
import dataclasses
import functools
import json
import logging
import math
import numbers
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

_early_signal = signal.SIGINT


def _while_loading(signum: int, frame: Any) -> None:
    """SIGTERM/SIGHUP while the libraries load: handled as Ctrl-C is (below)."""
    global _early_signal
    _early_signal = signal.Signals(signum)
    raise KeyboardInterrupt


_loading_handlers = {}
if __name__ == "__main__":
    for _name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, _name):
            _loading_handlers[getattr(signal, _name)] = signal.signal(getattr(signal, _name), _while_loading)
try:
    import cv2
    import numpy as np
except KeyboardInterrupt:  # Ctrl-C (or kill) while the libraries load (seconds on a cold start): one line
    if __name__ != "__main__":
        raise
    _code = 128 + int(_early_signal)
    sys.stderr.write("autofocus.py: interrupted while starting; nothing was opened or moved\n")
    if "--json" in sys.argv:
        sys.stdout.write(f'{{"verdict": null, "exit_code": {_code}, "error": "interrupted", "curve": []}}\n')
    raise SystemExit(_code) from None
finally:
    for _number, _previous in _loading_handlers.items():
        signal.signal(_number, _previous)

__version__ = "1.0.0"

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
POSITION_DECIMALS = 9  # positions are rounded to 1 pm so that float noise never leaks into commands
SCORE_MAX_PIXELS = 1_500_000  # larger frames are 2x2 binned before scoring (see focus scores)
COARSE_FACTOR = 8  # fast search: coarse pass every 8 STEPs, scored on an 8x binned image
SIM_SPECIMENS = ("cells", "blank", "dusty", "transparent")  # --sim-specimen
PEAK_CHOICES = ("sharpest", "lowest", "highest", "nearest")  # --peak: which of several peaks
MIN_FAST_POSITIONS = 24  # shorter grids are swept: a coarse pass would hold too few frames to judge
COARSE_MIN_SIDE_PX = 32  # ... but the binned image keeps at least this many pixels a side
MIN_FRAMES_FOR_VERDICT = 5  # fewer frames cannot separate a peak from noise
PEAK_MARGIN_SIGMA = 3.0  # a peak must clear the expected noise maximum by this many sigma
IN_FLIGHT_FRAMES = 4  # frames captured but not yet scored: bounds memory when scoring lags
DEFAULT_MOVE_TIMEOUT_S = 30.0
DEFAULT_HOME_TIMEOUT_S = 120.0  # homing crosses the whole travel, at the (slower) homing speed
STOP_TIMEOUT_S = 5.0  # after `stop`, the axis must be at rest within this (a decelerating stop takes ms)
# A verified move ends within this many native units of its target (or within the device's own
# settle window, cloop.settle.tolerance, when it has a larger one): a few steps of a stepper, a few
# encoder counts of a direct-drive stage.
POSITION_TOLERANCE_NATIVE = 5
# A focus axis travels 1..300 mm: a --native-unit-nm implying a travel outside this is a typo
# (a factor of 1000, um typed for nm) and is refused before anything moves.
PLAUSIBLE_TRAVEL_MM = (1.0, 300.0)
DEFAULT_CAMERA_TIMEOUT_MS = 2000
CAMERA_TIMEOUT_MARGIN_MS = 500  # frame timeout >= exposure + this (read-out ~25 ms, transfer, a busy USB bus)
# A replay image is checked from its header before it is decoded: a 69-byte PNG may declare
# 50000x50000 pixels (a decompression bomb).  50 MP is twice the largest microscope sensors.
MAX_IMAGE_PIXELS = 50_000_000
MAX_STACK_BYTES = 4 << 30  # all decoded frames of a replay stack are held in memory: at most 4 GiB
REPLAY_DTYPES = ("uint8", "uint16", "float32")  # what a camera or a saved stack delivers
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
# Exceptions ##################################################################
###############################################################################


class AutofocusError(Exception):
    """Base of every error this tool reports as one line.

    AutofocusError
     +-- UsageError        bad input or configuration; nothing moved      (exit 2)
     |    +-- StackError   a replay stack that cannot be used             (exit 2)
     +-- HardwareError     the stage or camera failed                     (exit 5)
     |    +-- StageError
     |    +-- CameraError
     +-- OutputError       an output could not be written mid-run         (exit 5)

    Raised by ``focus()`` after the stage has started moving, an error also carries what the
    run measured (``partial``: a FocusResult with the frames scored so far) and where the stage
    was left (``stage_state``: one sentence); both are None for errors raised before any move.
    """

    exit_code = EXIT_BUG
    partial: FocusResult | None = None
    stage_state: str | None = None


class UsageError(AutofocusError):
    """The command line or the configuration cannot work; nothing has moved."""

    exit_code = EXIT_USAGE


class StackError(UsageError):
    """A replay stack is missing, malformed or inconsistent."""


class HardwareError(AutofocusError):
    """The stage or the camera failed or stopped answering."""

    exit_code = EXIT_HARDWARE


class StageError(HardwareError):
    """The focus stage refused a command, faulted, or stopped answering."""

    # False when the axis must not be commanded again in this run (no stop, no return to start):
    # it was taken from outside, or its fault makes any further motion unsafe.  See make_safe.
    may_move = True


class StageInterrupted(StageError):
    """A move was cut short from outside (flag NI): a person at the knob or joystick, Zaber
    Launcher or another program has the axis, so nothing more is commanded."""

    may_move = False


class CameraError(HardwareError):
    """The camera failed, timed out, or delivered an unusable frame."""


class OutputError(AutofocusError):
    """An output file could not be written during the run (disk full, folder gone)."""

    exit_code = EXIT_HARDWARE


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or a termination signal (SIGTERM, SIGHUP, SIGBREAK) during a CLI run: handled as
    Ctrl-C always was (stop, return to start, outputs written), exit code 128 + the signal."""

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
    """A sub-step peak estimate; ``used`` only when every gate passed (see ``fit_peak``)."""

    z_mm: float | None
    used: bool
    reason: str


@dataclasses.dataclass(frozen=True)
class Verdict:
    """Whether the curve has a real peak, and where it lies in the range."""

    kind: str  # "focused", "edge" or "no_peak"
    prominence: float
    noise: float
    threshold: float
    reason: str
    suggestion_mm: tuple[float, float] | None = None
    scale: str = "fine"  # which curve decided: "fine" (the score) or "coarse" (the binned score)


@dataclasses.dataclass(frozen=True)
class Extremum:
    """A significant local maximum (a peak) or minimum (a dip) of the focus curve."""

    z_mm: float  # the frame at the extremum
    score: float
    prominence: float  # how far it stands out from the curve on its lower side (peaks) / higher (dips)
    fit_mm: float | None  # sub-step estimate, when the 3-point fit passes its gates


@dataclasses.dataclass(frozen=True)
class FocusResult:
    """Everything a run found; ``best_mm`` is where the stage was finally sent."""

    search: str
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
    peaks: tuple[Extremum, ...] = ()  # every significant peak of the fine curve, by z
    dips: tuple[Extremum, ...] = ()  # every significant dip between rising flanks, by z
    uncertainty_mm: float | None = None  # the decision's +- of best_mm, mm; None when it gives none

    @property
    def frames(self) -> int:
        """Frames captured."""
        return len(self.samples)

    @property
    def exit_code(self) -> int:
        """The exit code for this verdict."""
        return VERDICT_EXIT[self.verdict.kind]


###############################################################################
# Focus scores ################################################################
###############################################################################
# A score maps a frame to a float that is largest at best focus.  Every score sees the
# same preparation (``prepare_gray``): grayscale float32, 2x2-binned when the frame is larger
# than SCORE_MAX_PIXELS (keeps a 1920x1200 frame well inside the camera's 24 ms frame period
# and halves shot noise), and divided by its own mean.  Dividing by the mean is not a contrast
# stretch: defocus conserves light, so the mean is the same at every z and the division only
# cancels illumination drift and exposure changes between the frames of a sweep.


def to_gray_float(image: np.ndarray) -> np.ndarray:
    """Grayscale float32 in the frame's own units (8- or 16-bit, mono or BGR/BGRA)."""
    if image.ndim == 3:
        if image.shape[2] == 1:
            image = image[:, :, 0]
        else:
            code = cv2.COLOR_BGRA2GRAY if image.shape[2] == 4 else cv2.COLOR_BGR2GRAY
            image = cv2.cvtColor(image, code)
    elif image.ndim != 2:
        raise CameraError(f"cannot score a frame of shape {image.shape}: expected HxW or HxWxC")
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


def prepare_gray(image: np.ndarray, binning: int | None = None) -> np.ndarray:
    """Gray, binned and mean-normalised frame that every focus score starts from."""
    gray = to_gray_float(image)
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
    gray = to_gray_float(image)
    factor = score_binning(gray.shape) if binning is None else binning
    diameter = max(3, int(round(blur / factor)) | 1)
    return bilateral(prepare_gray(gray, factor), diameter)


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
        """The part of the frame that is scored (a view, no copy)."""
        if self.roi is None:
            return image
        x, y, w, h = self.roi
        return image[y: y + h, x: x + w]

    def __call__(self, image: np.ndarray) -> float:
        return self._sign(METRICS[self.metric](self.crop(image), self.blur))

    def _sign(self, score: float) -> float:
        return -score if self.invert else score

    def coarse(self, image: np.ndarray) -> float:
        """The same score on a binned frame: a wide capture range, robust to photon noise
        (the fast search's coarse pass and the verdict's fallback, see ``decide``)."""
        image = self.crop(image)
        return self._sign(METRICS[self.metric](image, self.blur, coarse_binning(image.shape)))


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
# Peak fitting and verdict (pure) #############################################
###############################################################################


def by_z(samples: Sequence[Sample]) -> list[Sample]:
    """Samples sorted by position; a position measured twice keeps its first frame."""
    seen: dict[float, Sample] = {}
    for s in samples:
        seen.setdefault(s.z_mm, s)
    return sorted(seen.values(), key=lambda s: s.z_mm)


def best_sample(samples: Sequence[Sample]) -> Sample:
    """The highest-scoring sample (the first of equals, in capture order)."""
    if not samples:
        raise ValueError("no samples")
    return max(samples, key=lambda s: s.score)


def fit_peak(samples: Sequence[Sample]) -> PeakFit:
    """Gaussian peak through the best sample and its two neighbours (a parabola on log scores).

    The fit is used only when it can be trusted: the best sample has a measured neighbour on
    each side, both neighbours score lower (positive scores), the log-parabola opens downward,
    and its vertex lies between the two neighbours.  Exact for a Gaussian-shaped peak.
    """
    ordered = by_z(samples)
    if len(ordered) < 3:
        return PeakFit(None, False, "fewer than 3 positions")
    best = best_sample(ordered)
    i = ordered.index(best)
    if i == 0 or i == len(ordered) - 1:
        return PeakFit(None, False, "best sample at the edge of the measured range")
    left, mid, right = ordered[i - 1], ordered[i], ordered[i + 1]
    negated = max(left.score, mid.score, right.score) < 0  # --transparent: -contrast, a V-shaped dip
    if min(left.score, mid.score, right.score) <= 0 and not negated:
        return PeakFit(None, False, "non-positive scores")
    if not (left.score < mid.score and right.score < mid.score):
        return PeakFit(None, False, "flat top: a neighbour scores as high as the best")
    x = np.array([left.z_mm, mid.z_mm, right.z_mm]) - mid.z_mm
    # A contrast score falls off from focus like a Gaussian: a parabola on its log.  A contrast
    # minimum (normalised variance ~ dz^2 near the focus of a phase object) is a parabola itself.
    scores = [left.score, mid.score, right.score]
    y = np.array(scores) if negated else np.log(scores)
    # Parabola through three points: y = a x^2 + b x + c.
    denom = (x[0] - x[1]) * (x[0] - x[2]) * (x[1] - x[2])
    a = (x[2] * (y[1] - y[0]) + x[1] * (y[0] - y[2]) + x[0] * (y[2] - y[1])) / denom
    b = (x[2] ** 2 * (y[0] - y[1]) + x[1] ** 2 * (y[2] - y[0]) + x[0] ** 2 * (y[1] - y[2])) / denom
    if not a < 0:
        return PeakFit(None, False, "curvature of the wrong sign")
    vertex = -b / (2 * a)
    if not x[0] < vertex < x[2]:
        return PeakFit(None, False, "vertex outside the bracket")
    return PeakFit(float(round(mid.z_mm + vertex, POSITION_DECIMALS)), True,
                   "parabola fit on 3 points (contrast minimum)" if negated else "gaussian fit on 3 points")


def curve_noise(samples: Sequence[Sample]) -> float:
    """Robust estimate of the frame-to-frame noise of the scores (one standard deviation)."""
    return curve_noise_and_count(samples)[0]


def curve_noise_and_count(samples: Sequence[Sample]) -> tuple[float, int]:
    """The noise estimate and how many residuals it rests on.

    Each interior sample is compared with the straight line through its two neighbours; for
    white noise of sigma s the residual has sigma s*sqrt(1 + wl^2 + wr^2).  The residuals at
    the best sample and its neighbours are left out, and the median of the rest (x 1.4826, MAD
    to sigma) ignores the few that the peak's flanks make large; straight trends
    (illumination drift, a slope) cancel.
    """
    ordered = by_z(samples)
    z = np.array([s.z_mm for s in ordered])
    y = np.array([s.score for s in ordered])
    if len(ordered) < 3:
        return float("nan"), 0
    span = z[2:] - z[:-2]
    wl = (z[2:] - z[1:-1]) / span
    wr = (z[1:-1] - z[:-2]) / span
    residual = y[1:-1] - (wl * y[:-2] + wr * y[2:])
    scaled = np.abs(residual) / np.sqrt(1 + wl**2 + wr**2)
    # The residuals on the peak measure its curvature, not noise: leave out the peak's extent
    # (the run of samples around the best one that stand above the median by more than a
    # quarter of the prominence) and one sample beyond it on each side.  On noise alone that is
    # the highest sample and its neighbours; on a fast search's curve it is the refined frames
    # around the peak, so the noise comes from the frames away from it, coarse or refined.
    lo_i, hi_i = peak_extent(y)
    keep = np.array([not lo_i - 1 <= i + 1 <= hi_i + 1 for i in range(len(scaled))])
    if keep.sum() >= 2:
        scaled = scaled[keep]
    return float(1.4826 * np.median(scaled)), len(scaled)


def peak_extent(scores: np.ndarray) -> tuple[int, int]:
    """First and last index of the run around the highest score that stands above the median
    by more than a quarter of the prominence (scores in z order)."""
    top = int(np.argmax(scores))
    level = float(np.median(scores)) + 0.25 * float(scores[top] - np.median(scores))
    lo_i = hi_i = top
    while lo_i > 0 and scores[lo_i - 1] > level:
        lo_i -= 1
    while hi_i < len(scores) - 1 and scores[hi_i + 1] > level:
        hi_i += 1
    return lo_i, hi_i


def judge(samples: Sequence[Sample], range_mm: tuple[float, float],
          noise_samples: Sequence[Sample] | None = None) -> Verdict:
    """Decide focused / edge / no_peak from the curve alone.

    A peak is real when its prominence (best score minus the median score) exceeds the
    curve's own noise (``curve_noise``: from the residuals of every frame off the peak, refined
    frames included, the same for both searches; raised to its upper bound for the few residuals
    it rests on) times sqrt(2 ln n) + 3, n the number of grid positions spanned (a fast search
    picks its best from all of them): sqrt(2 ln n) is about the largest of n samples of pure
    noise, in sigmas, and the margin of 3 sigma keeps false peaks rare.  A real peak is
    ``focused`` only when the curve also falls by more than that threshold on both sides of
    it, within the range; where it does not, the focus may lie beyond that end: ``edge``.
    No constant depends on the specimen, the metric or the units of the score.
    """
    ordered = by_z(samples)
    n = len(ordered)
    lo, hi = min(range_mm), max(range_mm)
    if n < MIN_FRAMES_FOR_VERDICT:
        return Verdict("no_peak", float("nan"), float("nan"), float("nan"),
                       f"only {n} positions: at least {MIN_FRAMES_FOR_VERDICT} are needed to tell a peak "
                       "from noise; use a smaller STEP")
    scores = np.array([s.score for s in ordered])
    sigma, m = curve_noise_and_count(noise_samples if noise_samples is not None and len(noise_samples) >= 3
                                     else ordered)
    # A MAD from m residuals is itself uncertain (relative standard error ~1.2-1.35/sqrt(m) for
    # Gaussian noise at small m, by Monte Carlo): raise it by 1.64/sqrt(m), about 1.2-1.4 standard
    # errors, so a sparse curve (fast search) is not overconfident.  Together with the 3-sigma
    # margin this keeps false peaks at or below 1% (tests/test_verdict_objectives.py).
    noise = sigma * (1 + 1.64 / math.sqrt(max(m, 1)))
    prominence = float(scores.max() - np.median(scores))
    # The largest of how many noise values?  Of every grid position the search could have picked
    # its best frame from, not just those measured: a fast search refines around its highest
    # frame, so the grid's size (span / finest spacing) counts, not its frame count.
    z = np.array([s.z_mm for s in ordered])
    finest = float(np.min(np.diff(z))) if n > 1 else 0.0
    n_grid = max(n, int(round((z[-1] - z[0]) / finest)) + 1) if finest > 0 else n
    threshold = noise * (math.sqrt(2 * math.log(n_grid)) + PEAK_MARGIN_SIGMA)
    if not prominence > threshold:
        return Verdict("no_peak", prominence, noise, threshold,
                       f"no peak: prominence {prominence:.3g} is within the curve's noise "
                       f"(threshold {threshold:.3g}); blank field, no specimen, or focus far outside the range")
    i = int(np.argmax(scores))
    best = scores[i]
    drop_low = best - scores[:i].min() if i > 0 else 0.0
    drop_high = best - scores[i + 1:].min() if i < n - 1 else 0.0
    width = hi - lo
    if drop_low <= threshold:
        return Verdict("edge", prominence, noise, threshold,
                       f"the curve is still high at the low end of the range ({lo:.4f} mm): the focus may lie "
                       "below it", (round(lo - width / 2, 6), round(lo + width / 2, 6)))
    if drop_high <= threshold:
        return Verdict("edge", prominence, noise, threshold,
                       f"the curve is still high at the high end of the range ({hi:.4f} mm): the focus may lie "
                       "above it", (round(hi - width / 2, 6), round(hi + width / 2, 6)))
    ratio = f"{prominence / threshold:.1f}x the noise threshold" if threshold > 0 else "above a noise-free curve"
    return Verdict("focused", prominence, noise, threshold, f"peak prominence {ratio}")


def _prominences(y: np.ndarray) -> list[tuple[int, int, float]]:
    """(first index, last index, topographic prominence) of every local maximum of y (a plateau
    spans first..last): how far it rises above the
    higher of the two lowest points between it and the next higher sample on each side (or the
    curve's end).  Plateaus count once, at their first sample."""
    out = []
    n = len(y)
    for i in range(n):
        left_ok = i == 0 or y[i] > y[i - 1]
        j = i
        while j + 1 < n and y[j + 1] == y[i]:
            j += 1
        right_ok = j == n - 1 or y[j] > y[j + 1]
        if not (left_ok and right_ok) or (i > 0 and y[i - 1] == y[i]):
            continue
        lo_left = y[i]
        k = i - 1
        while k >= 0 and y[k] <= y[i]:
            lo_left = min(lo_left, y[k])
            k -= 1
        lo_right = y[i]
        k = j + 1
        while k < n and y[k] <= y[i]:
            lo_right = min(lo_right, y[k])
            k += 1
        # At the curve's end there is no rising flank beyond: only the other side counts.
        bases = [b for b, edge in ((lo_left, i == 0), (lo_right, j == n - 1)) if not edge]
        out.append((i, j, float(y[i] - max(bases)) if bases else 0.0))
    return out


def find_peaks(samples: Sequence[Sample], threshold: float) -> list[Extremum]:
    """Every local maximum whose prominence exceeds ``threshold`` (the verdict's noise rule),
    in z order, each with its 3-point fit."""
    ordered = by_z(samples)
    if len(ordered) < 3 or not math.isfinite(threshold):
        return []
    y = np.array([s.score for s in ordered])
    found = []
    for i, _, prominence in _prominences(y):
        if prominence > threshold:
            fit = fit_peak(ordered[max(i - 1, 0): i + 2])
            found.append(Extremum(ordered[i].z_mm, ordered[i].score, prominence, fit.z_mm if fit.used else None))
    return found


def find_dips(samples: Sequence[Sample], threshold: float) -> list[Extremum]:
    """Every local minimum between rising flanks (never at an end of the range) whose depth
    exceeds ``threshold``, in z order; fitted on the reciprocal score (a dip is its peak)."""
    ordered = by_z(samples)
    if len(ordered) < 3 or not math.isfinite(threshold):
        return []
    y = np.array([s.score for s in ordered])
    found = []
    for i, j, depth in _prominences(-y):
        if i > 0 and j < len(ordered) - 1 and depth > threshold:  # flanks rise on both sides
            window = [Sample(s.z_mm, 1.0 / s.score) for s in ordered[i - 1: i + 2] if s.score > 0]
            fit = fit_peak(window) if len(window) == 3 else PeakFit(None, False, "non-positive scores")
            found.append(Extremum(ordered[i].z_mm, ordered[i].score, depth, fit.z_mm if fit.used else None))
    return found


def choose_peak(peaks: Sequence[Extremum], policy: str, start_mm: float) -> Extremum:
    """The peak ``--peak`` asks for: the sharpest (highest score), the lowest or highest in z, or
    the one nearest where the stage started."""
    if policy == "lowest":
        return min(peaks, key=lambda p: p.z_mm)
    if policy == "highest":
        return max(peaks, key=lambda p: p.z_mm)
    if policy == "nearest":
        return min(peaks, key=lambda p: abs(p.z_mm - start_mm))
    return max(peaks, key=lambda p: p.score)


###############################################################################
# Search ######################################################################
###############################################################################


def plan_positions(start_mm: float, end_mm: float, step_mm: float) -> list[float]:
    """START to END inclusive every STEP; END below START sweeps downward; END always included."""
    if not step_mm > 0:
        raise ValueError("step must be positive")
    direction = 1.0 if end_mm >= start_mm else -1.0
    span = abs(end_mm - start_mm)
    n = math.floor(span / step_mm + 1e-9)
    positions = [float(round(start_mm + direction * i * step_mm, POSITION_DECIMALS)) for i in range(n + 1)]
    end = float(round(end_mm, POSITION_DECIMALS))
    if abs(positions[-1] - end) > 1e-9:
        positions.append(end)
    else:
        positions[-1] = end
    return positions


FrameHook = Callable[[int, float, np.ndarray, float], None]


class Acquisition:
    """Moves, captures and scores, overlapping the scoring of frame k with the move to k+1.

    ``measure(z)`` returns a future score; a search waits only for the scores it needs.  At
    most IN_FLIGHT_FRAMES frames wait for scoring, so memory stays bounded when the scoring
    (or a frame hook that saves images) is slower than the hardware.  ``samples`` always holds
    every frame scored so far, so a run that fails still has its partial curve.
    """

    def __init__(self, stage: Stage, camera: Camera, scorer: Scorer, *, settle_ms: float = 0.0,
                 backlash_mm: float = 0.0, direction: float = 1.0, coarse: bool = False,
                 on_frame: FrameHook | None = None) -> None:
        self.stage, self.camera, self.scorer = stage, camera, scorer
        self.settle_s = settle_ms / 1000.0
        self.backlash_mm = backlash_mm
        self.direction = direction
        self.coarse = coarse
        self.on_frame = on_frame
        self.samples: list[Sample] = []
        self.moves = 0
        self.move_s = self.capture_s = self.score_s = 0.0
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(IN_FLIGHT_FRAMES)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="score")
        self._frame_index = 0
        self._last_z: float | None = None
        self._failed: BaseException | None = None  # the scoring thread's first error (e.g. disk full)

    def approach(self, z_mm: float) -> float:
        """Move to z; with backlash, arrive from the sweep's direction (overshoot first).

        Returns the seconds it took, settling included."""
        t0 = time.perf_counter()
        try:
            coming_from_wrong_side = (
                self._last_z is not None and (z_mm - self._last_z) * self.direction < 0
            )
            if self.backlash_mm > 0 and (coming_from_wrong_side or self._last_z is None):
                self.stage.move_to(round(z_mm - self.direction * self.backlash_mm, POSITION_DECIMALS))
                self.moves += 1
            self.stage.move_to(z_mm)
            self.moves += 1
            self._last_z = z_mm
            if self.settle_s > 0:
                time.sleep(self.settle_s)
        finally:
            dt = time.perf_counter() - t0
            self.move_s += dt
        return dt

    def measure(self, z_mm: float) -> concurrent.futures.Future[Sample]:
        """Move to z, capture a frame, and hand it to the scoring thread."""
        if self._failed is not None:  # a frame already failed (its hook could not save it): stop here
            raise self._failed
        self._slots.acquire()
        try:
            move_dt = self.approach(z_mm)
            t0 = time.perf_counter()
            try:
                frame = self.camera.capture()
            finally:
                capture_dt = time.perf_counter() - t0
                self.capture_s += capture_dt
            check_frame(frame, z_mm)
            if self.scorer.roi is not None and self._frame_index == 0:
                check_roi(self.scorer.roi, frame.shape)  # the frame size is known only now
        except BaseException:
            self._slots.release()
            raise
        index = self._frame_index
        self._frame_index += 1
        return self._pool.submit(self._score, index, z_mm, frame, move_dt, capture_dt)

    def _score(self, index: int, z_mm: float, frame: np.ndarray, move_dt: float, capture_dt: float) -> Sample:
        try:
            t0 = time.perf_counter()
            score = self.scorer(frame)
            coarse = self.scorer.coarse(frame) if self.coarse else None
            dt = time.perf_counter() - t0
            sample = Sample(z_mm, score, coarse)
            with self._lock:
                self.score_s += dt
                self.samples.append(sample)
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
        self._pool.shutdown(wait=True)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="score")

    def timing(self) -> Timing:
        """Totals so far."""
        return Timing(self.move_s, self.capture_s, self.score_s)


def check_frame(frame: np.ndarray, z_mm: float) -> None:
    """Reject frames that cannot carry focus information: all black or all saturated."""
    if frame is None or frame.size == 0:
        raise CameraError(f"camera returned an empty frame at z={z_mm:.4f} mm; check the camera connection")
    if frame.dtype.kind == "f" and not np.isfinite(frame).all():
        raise CameraError(f"frame at z={z_mm:.4f} mm has non-finite pixels (NaN or infinity); no score can be "
                          "computed from it")
    lo, hi = float(frame.min()), float(frame.max())
    if hi <= 0:
        raise CameraError(f"frame at z={z_mm:.4f} mm is all black; check the light source, shutter and exposure")
    if np.issubdtype(frame.dtype, np.integer) and lo >= np.iinfo(frame.dtype).max:
        raise CameraError(f"frame at z={z_mm:.4f} mm is fully saturated; lower the exposure or the light")


def sweep_search(acq: Acquisition, positions: Sequence[float]) -> list[Sample]:
    """The card's exhaustive search: one frame at every position, in order.

    Returns the samples to estimate the curve's noise from: all of them."""
    futures = [acq.measure(z) for z in positions]
    return [f.result() for f in futures]


def fast_search(acq: Acquisition, positions: Sequence[float]) -> list[Sample]:
    """Coarse-to-fine search on the STEP grid, reusing every frame it takes.

    1. Coarse pass: every COARSE_FACTOR-th grid position (and the last), each frame also scored
       on a copy binned COARSE_FACTOR times.  Far from focus the full-resolution score sinks
       into its noise floor while the coarse score still rises toward focus over a range
       several times wider (defocus blur grows in proportion to the distance from focus, so
       coarser detail stays visible proportionally farther away): the coarse samples lead to
       a narrow peak that they straddle.
    2. Prediction: a Gaussian through the best coarse sample and its coarse neighbours (on
       the coarse scores) predicts the peak; that grid position and both neighbours are
       measured, all in flight before waiting.
    3. Refinement: hill-climb on the full-resolution score one grid STEP at a time until the
       best frame of the whole run has both grid neighbours measured and lower.

    Typical cost: N/8 + 3 frames for N grid positions (15 of 81 in the median benchmark case);
    each halving of the spacing (nothing found yet) adds the new coarse frames and a refinement.
    Grids of fewer than MIN_FAST_POSITIONS positions are swept exhaustively; up to 80
    positions the coarse spacing is n/10 STEPs (at least 2).  When the frames so far show no
    peak at either scale (the verdict's own rule), the spacing is halved and the peak sought
    again, until one shows or every position is measured: a blank field costs a sweep.  Assumes STEP is
    about the depth of field (as for a sweep); a peak much narrower than the coarse spacing
    with no coarse-scale signal can be missed.  Returns the evenly spaced coarse samples, to
    estimate the curve's noise from.
    """
    n = len(positions)
    if n < MIN_FAST_POSITIONS:
        return sweep_search(acq, positions)
    # Coarse spacing: COARSE_FACTOR STEPs on long grids, closer on short ones, so that the coarse
    # pass has at least ~10 frames: enough for a noise estimate and a bracket around the peak.
    spacing = max(2, min(COARSE_FACTOR, n // 10))
    measured: dict[int, Sample] = {}

    def ensure(indices: list[int]) -> None:
        """Measure the grid positions not measured yet, all in flight before waiting for any."""
        # Ascending grid index is the sweep's direction: no backlash overshoot between them.
        pending = [(i, acq.measure(positions[i])) for i in sorted(set(indices)) if i not in measured]
        for i, f in pending:
            measured[i] = f.result()

    range_mm = (positions[0], positions[-1])
    while True:
        coarse_idx = list(range(0, n, spacing))
        if coarse_idx[-1] != n - 1:
            coarse_idx.append(n - 1)
        ensure(coarse_idx)
        coarse_samples = [Sample(positions[i], measured[i].coarse or 0.0) for i in coarse_idx]
        top = max(range(len(coarse_idx)), key=lambda k: coarse_samples[k].score)
        guess = coarse_idx[top]
        if 0 < top < len(coarse_idx) - 1:
            fit = fit_peak(coarse_samples[top - 1: top + 2])
            if fit.used and fit.z_mm is not None:
                step = positions[1] - positions[0]
                guess = min(max(int(round((fit.z_mm - positions[0]) / step)), 0), n - 1)
        current = guess
        for _ in range(2 * spacing + 4):
            neighbours = [j for j in (current - 1, current + 1) if 0 <= j < n]
            ensure([current, *neighbours])
            if all(measured[j].score < measured[current].score for j in neighbours):
                # A local maximum; but the best frame of the run may lie elsewhere (a coarse frame
                # the prediction passed by): refine there too, so the answer is never unrefined.
                overall = max(measured, key=lambda j: measured[j].score)
                if overall == current:
                    break
                current = overall
            else:
                current = max(neighbours, key=lambda j: measured[j].score)
        # A peak narrower than the spacing (high NA, STEP ~ one depth of field), or too weak for
        # this many frames, leaves the verdict at no_peak: halve the spacing and look again, down
        # to the full grid.  A blank field costs a sweep's frames; a missed focus would cost more.
        if spacing == 1 or decide(list(measured.values()), [measured[i] for i in coarse_idx],
                                  range_mm)[1].kind != "no_peak":
            break
        spacing = max(1, spacing // 2)
    return [measured[i] for i in coarse_idx]


SEARCHES: dict[str, Callable[[Acquisition, Sequence[float]], list[Sample]]] = {
    "sweep": sweep_search,
    "fast": fast_search,
}


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a run will do, checked against the limits before anything moves."""

    positions: tuple[float, ...]
    search: str = "sweep"
    backlash_mm: float = 0.0
    settle_ms: float = 0.0
    peak: str = "sharpest"  # which of several significant peaks (PEAK_CHOICES)

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
    if lo < allowed_lo - 1e-9 or hi > allowed_hi + 1e-9:
        raise UsageError(
            f"the {what} {lo:g}..{hi:g} mm leaves the allowed interval {allowed_lo:g}..{allowed_hi:g} mm "
            f"(travel {travel_lo:g}..{travel_hi:g} mm"
            + (f", soft limits {soft_lo if soft_lo is not None else '-'}..{soft_hi if soft_hi is not None else '-'} mm"
               if soft_lo is not None or soft_hi is not None else "")
            + "); choose a range inside it"
        )


class RunFailed(Exception):
    """A run stopped by a fault or Ctrl-C; carries the partial result and the cause."""

    def __init__(self, partial: FocusResult | None, cause: BaseException, where: str) -> None:
        super().__init__(str(cause))
        self.partial, self.cause, self.where = partial, cause, where


def run_autofocus(stage: Stage, camera: Camera, scorer: Scorer, plan: Plan, *,
                  on_frame: FrameHook | None = None) -> FocusResult:
    """Search, judge, and send the stage to the answer (or back to where it started).

    Faults and Ctrl-C stop the axis, send it back to where it started when it still answers,
    and raise RunFailed with the partial curve.
    """
    t0 = time.perf_counter()
    start_mm = stage.position_mm()
    acq = Acquisition(stage, camera, scorer, settle_ms=plan.settle_ms, backlash_mm=plan.backlash_mm,
                      direction=plan.direction, coarse=True,
                      on_frame=on_frame)
    range_mm = (plan.positions[0], plan.positions[-1])

    def result(samples: Sequence[Sample], target: float, fit: PeakFit, verdict: Verdict,
               best_z: float | None = None) -> FocusResult:
        best = best_sample(samples) if samples else Sample(float("nan"), float("nan"))
        if best_z is not None:  # the coarse-scale curve decided: its best frame
            best = next(s for s in samples if s.z_mm == best_z)
        return FocusResult(plan.search, scorer.metric, tuple(samples), best.z_mm, best.score, fit, verdict,
                           target, start_mm, acq.moves, time.perf_counter() - t0, acq.timing())

    try:
        try:
            noise_samples = SEARCHES[plan.search](acq, plan.positions)
        finally:
            acq.drain()
        samples = list(acq.samples)
        fit, verdict, best_z = decide(samples, noise_samples, range_mm)
        if verdict.scale == "coarse" and (bracket := coarse_bracket(samples, noise_samples)) is not None:
            # Found at the coarse scale only: measure the STEP grid across the coarse peak's
            # bracket before deciding, so the answer comes from STEP-spaced frames.
            lo, hi = min(bracket), max(bracket)
            todo = [z for z in plan.positions if lo <= z <= hi and z not in {s.z_mm for s in samples}]
            try:
                futures = [acq.measure(z) for z in sorted(todo, key=lambda z: z * plan.direction)]
                for f in futures:
                    f.result()
            finally:
                acq.drain()
            samples = list(acq.samples)
            fit, verdict, best_z = decide(samples, noise_samples, range_mm)
        peaks: list[Extremum] = []
        dips: list[Extremum] = []
        if verdict.scale == "fine" and math.isfinite(verdict.threshold):
            peaks, dips = find_peaks(samples, verdict.threshold), find_dips(samples, verdict.threshold)
        if verdict.kind != "no_peak" and plan.peak != "sharpest" and len(peaks) > 1:
            chosen = choose_peak(peaks, plan.peak, start_mm)
            ordered = by_z(samples)
            at_end = chosen.z_mm in (ordered[0].z_mm, ordered[-1].z_mm)
            i = [s.z_mm for s in ordered].index(chosen.z_mm)
            fit = fit_peak(ordered[max(i - 1, 0): i + 2])
            verdict = dataclasses.replace(
                verdict, kind="edge" if at_end else "focused",
                reason=f"{verdict.reason}; the {plan.peak} of {len(peaks)} significant peaks (--peak {plan.peak})")
            best_z = chosen.z_mm
        if verdict.kind == "no_peak":
            target = start_mm  # never move to a noise maximum: back to where the user left it
            stage.move_to(target)
            acq.moves += 1
        else:
            fitted = verdict.kind == "focused" and fit.used and fit.z_mm is not None
            target = fit.z_mm if fitted else best_z  # type: ignore[assignment]
            acq.approach(target)
        return dataclasses.replace(result(samples, target, fit, verdict, best_z), peaks=tuple(peaks),
                                   dips=tuple(dips), transparent=scorer.invert)
    except BaseException as exc:  # faults, Ctrl-C, and bugs alike: the stage is made safe first
        where = make_safe(stage, start_mm, exc)  # a second Ctrl-C may interrupt the return: it re-stops
        with INTERRUPTS.held():  # from here on nothing may lose the partial curve
            samples = list(acq.samples)
            fit = fit_peak(samples) if samples else PeakFit(None, False, "no samples")
            verdict = Verdict("no_peak", float("nan"), float("nan"), float("nan"), "run did not finish")
            raise RunFailed(result(samples, float("nan"), fit, verdict), exc, where) from exc


def decide(samples: Sequence[Sample], noise_samples: Sequence[Sample],
           range_mm: tuple[float, float]) -> tuple[PeakFit, Verdict, float]:
    """The verdict, the peak fit and the best position, from the fine curve or else the coarse one.

    When the full-resolution curve shows no peak, the coarse-scale curve (the same score on a
    binned frame: averages photon noise away and reaches farther from focus) gets the same
    test.  It can tell a focal plane beyond the range (``edge``) from an empty field, and find
    a peak in frames too noisy for fine detail.  Both curves are judged with the same rule.
    """
    fine = judge(samples, range_mm)  # one rule for both searches: noise from every frame off the peak
    if fine.kind != "no_peak" or any(s.coarse is None for s in noise_samples):
        return fit_peak(samples), fine, best_sample(samples).z_mm
    # The coarse scale is judged on the evenly spaced frames (a sweep's all, a fast search's
    # coarse passes): frames refined around a fine-scale noise maximum would bias it upward.
    curve = [Sample(s.z_mm, s.coarse) for s in noise_samples]  # type: ignore[arg-type]
    coarse = judge(curve, range_mm)
    # ... and confirmed by every frame's coarse score, the STEP-spaced frames refined across the
    # claimed peak included: a noise maximum of the coarse pass does not survive them.
    if coarse.kind == "no_peak" or (len(samples) > len(noise_samples) and judge(
            [Sample(s.z_mm, s.coarse) for s in samples], range_mm).kind == "no_peak"):  # type: ignore[arg-type]
        return fit_peak(samples), fine, best_sample(samples).z_mm
    what = "a peak" if coarse.kind == "focused" else "a rise toward the end of the range"
    coarse = dataclasses.replace(coarse, scale="coarse", reason=f"{coarse.reason} (fine detail is lost in noise; "
                                 f"the coarse-scale score shows {what})")
    # The position comes from STEP-spaced frames: the coarse-scale scores of every frame within
    # the coarse peak's bracket (its coarse neighbours), which run_autofocus measures on the
    # STEP grid before deciding; the best of them, fitted when the fit can be trusted.
    lo, hi = coarse_bracket(samples, noise_samples) or range_mm
    near = [Sample(s.z_mm, s.coarse) for s in samples  # type: ignore[arg-type]
            if s.coarse is not None and min(lo, hi) <= s.z_mm <= max(lo, hi)] or curve
    return fit_peak(near), coarse, best_sample(near).z_mm


def coarse_bracket(samples: Sequence[Sample], noise_samples: Sequence[Sample]) -> tuple[float, float] | None:
    """The z range between the coarse neighbours of the coarse-scale peak (None without one)."""
    curve = [Sample(s.z_mm, s.coarse) for s in noise_samples if s.coarse is not None]
    if len(curve) < 3:
        return None
    ordered = by_z(curve)
    i = ordered.index(best_sample(ordered))
    return ordered[max(i - 1, 0)].z_mm, ordered[min(i + 1, len(ordered) - 1)].z_mm


def make_safe(stage: Stage, start_mm: float, cause: BaseException | None = None) -> str:
    """Stop the axis and send it back to where it started; say where it is now.

    After an interruption from outside (or a fault that makes motion unsafe) nothing is
    commanded at all: the axis belongs to whoever took it."""
    if isinstance(cause, StageError) and not cause.may_move:
        try:
            return f"nothing more was moved; the stage is at {stage.position_mm():.4f} mm"
        except (AutofocusError, KeyboardInterrupt):
            return "nothing more was moved; the stage position is unknown (it no longer answers)"
    for attempt in (stage.stop, lambda: stage.move_to(start_mm)):
        try:
            attempt()
        except (AutofocusError, KeyboardInterrupt) as exc:
            log.debug("making the stage safe: %s", exc)
            if isinstance(exc, KeyboardInterrupt):  # a second Ctrl-C: the axis may still be moving
                return stop_and_locate(stage, f"the return to {start_mm:.4f} mm was interrupted")
            try:
                return f"stage stopped at {stage.position_mm():.4f} mm (could not return to {start_mm:.4f} mm)"
            except (AutofocusError, KeyboardInterrupt):
                return "stage position unknown (it no longer answers); check it before the next run"
    return f"stage returned to its start, {start_mm:.4f} mm"


def stop_and_locate(stage: Stage, what: str) -> str:
    """Send ``stop`` again (a further Ctrl-C cannot skip it: tried up to three times), then say
    where the stage reports it is -- never a position read while it may still be moving."""
    for _ in range(3):
        try:
            stage.stop()
            break
        except KeyboardInterrupt:
            continue
        except AutofocusError as exc:
            return f"{what}; stopping it failed ({first_line(exc)}): check the stage before the next run"
    else:
        return f"{what}; the stop could not be confirmed: check the stage before the next run"
    for _ in range(3):
        try:
            return f"{what}; stop sent again, the stage reports {stage.position_mm():.4f} mm"
        except KeyboardInterrupt:
            continue
        except AutofocusError:
            break
    return f"{what}; stop sent again, the stage position is unknown: check it before the next run"


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
        """Move to z and return once it has arrived (or raise StageError)."""
        ...

    def stop(self) -> None:
        """Stop any motion now."""
        ...


class Camera(Protocol):
    """A camera: one call, one frame exposed after the call began."""

    def capture(self) -> np.ndarray:
        """One frame (HxW or HxWxC, 8- or 16-bit), exposed after this call began."""
        ...


# Pieces every GenICam camera backend (FLIR through PySpin, Basler through pypylon) shares: the
# sensor ROI, the pixel format choice, and putting back every setting a run changed.  The
# contract of a camera backend: it changes only what the run needs, through a SettingsJournal,
# and ``close()`` (or a borrowed camera's ``restore()``) puts all of it back on every exit path.

Roi = tuple[int, int, int, int]  # x, y, width, height in camera pixels


def fit_roi(roi: Roi, sensor_px: tuple[int, int], *, offset_step_px: tuple[int, int] = (1, 1),
            size_step_px: tuple[int, int] = (1, 1), min_size_px: tuple[int, int] = (1, 1),
            flag: str = "--camera-roi") -> Roi:
    """The region a camera can set that covers ``roi``: offsets rounded down to their increment,
    sizes rounded up to ``min + N * increment`` (GenICam's rule), kept on the sensor.

    UsageError when ``roi`` does not lie on the sensor (``sensor_px`` = width, height).
    """
    x, y, w, h = roi
    sw, sh = sensor_px
    if x + w > sw or y + h > sh:
        raise UsageError(f"{flag} {x},{y},{w},{h} reaches pixel {x + w},{y + h}, outside the sensor's "
                         f"{sw}x{sh} pixels; choose a region inside it")
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

    ``read(name)`` and ``write(name, value)`` are the backend's node accessors.  ``set`` records
    a node's value the first time the run changes it (a write of the value it already has is
    skipped).  ``restore`` writes them back in GenICam's dependency order (``restore_plan``),
    goes on past failures, and returns the ones it could not put back.
    """

    def __init__(self, read: Callable[[str], Any], write: Callable[[str, Any], None]) -> None:
        self.read, self.write = read, write
        self.original: dict[str, Any] = {}

    def set(self, name: str, value: Any) -> None:
        """Change a node, remembering its value before the first change."""
        current = self.read(name)
        if current == value:
            return
        self.original.setdefault(name, current)
        self.write(name, value)

    def restore(self) -> list[str]:
        """Put every changed node back; returns "name=value (why)" for each that failed."""
        failed = []
        for name, value in restore_plan(self.original):
            try:
                if self.read(name) != value:
                    self.write(name, value)
            except Exception as exc:  # noqa: BLE001 - a vendor error of any kind: report, go on
                failed.append(f"{name}={value} ({first_line(exc)})")
        self.original.clear()
        return failed


ROI_NODES = ("OffsetX", "OffsetY", "Width", "Height")


def set_sensor_roi(journal: SettingsJournal, roi: Roi, sensor_px: tuple[int, int], inc: dict[str, int],
                   min_size_px: tuple[int, int], *, bayer: bool) -> Roi:
    """Set the sensor's own ROI (fewer rows read, a faster read-out) through ``journal``, rounded by
    ``fit_roi`` to the node increments ``inc`` (per ROI_NODES name); returns the region set."""
    even = 2 if bayer else 1  # a Bayer mosaic keeps its pattern only when the offsets are even
    fitted = fit_roi(roi, sensor_px, offset_step_px=(math.lcm(inc["OffsetX"], even), math.lcm(inc["OffsetY"], even)),
                     size_step_px=(inc["Width"], inc["Height"]), min_size_px=min_size_px)
    if fitted != tuple(roi):
        log.warning("--camera-roi %s rounded to the camera's increments: %s", ",".join(map(str, roi)),
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


def software_trigger(journal: SettingsJournal, has: Callable[[str], bool]) -> None:
    """Continuous acquisition, each frame started by a software trigger (FrameStart), through
    ``journal`` so that all of it is put back."""
    journal.set("AcquisitionMode", "Continuous")
    journal.set("TriggerMode", "Off")  # the selector and source are only writable with the trigger off
    if has("TriggerSelector"):
        journal.set("TriggerSelector", "FrameStart")
    journal.set("TriggerSource", "Software")
    journal.set("TriggerMode", "On")


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
    opened, on every exit path (a ``with`` block).  A backend sets ``_cam``, ``_journal``,
    ``_owned``, ``_was_running``, ``_closed`` and defines the vendor calls below."""

    vendor = "camera"  # "FLIR camera": for messages
    viewer = "its viewer"  # the vendor's program to check the camera with
    pixel_format: str | None
    _shape: tuple[int, int]
    _bayer_code: int | None
    _cam: Any
    _journal: SettingsJournal
    _owned: bool
    _was_running: bool
    _closed: bool

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
            if self._owned and getattr(self, "_cam", None) is not None:
                self._release()
                self._cam = None

    def __enter__(self: _Adapter) -> _Adapter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def restore_plan(original: dict[str, Any]) -> list[tuple[str, Any]]:
    """The writes that put ``original`` back on a GenICam camera, in an order it accepts.

    The trigger selector and source are writable only with the trigger off, so TriggerMode goes
    Off first and back last; an offset plus a size may not exceed the sensor, so offsets go to 0
    before the sizes are restored; everything else in reverse order of change (ExposureTime
    before ExposureAuto, which makes it writable).
    """
    plan: list[tuple[str, Any]] = []
    if "TriggerMode" in original:
        plan.append(("TriggerMode", "Off"))
    offsets = [n for n in ("OffsetX", "OffsetY") if n in original]
    if any(n in original for n in ROI_NODES):
        plan += [(n, 0) for n in offsets]
        plan += [(n, original[n]) for n in ("Width", "Height") if n in original]
        plan += [(n, original[n]) for n in offsets]
    plan += [(n, original[n]) for n in reversed(original) if n != "TriggerMode" and n not in ROI_NODES]
    if "TriggerMode" in original:
        plan.append(("TriggerMode", original["TriggerMode"]))
    return plan


###############################################################################
# Backends: Zaber stage and FLIR camera #######################################
###############################################################################


def _zml() -> Any:
    """Import the Zaber Motion Library on first use."""
    try:
        import zaber_motion  # noqa: PLC0415
        import zaber_motion.ascii  # noqa: PLC0415
    except ImportError as exc:  # pragma: no cover - it is in requirements.txt
        raise UsageError("the Zaber Motion Library is missing: pip install -r requirements.txt") from exc
    return zaber_motion


class ZaberStage:
    """The focus axis of a Zaber device through ZML (serial port or tcp://HOST:PORT).

    Set-up reads the axis's warning flags before anything moves: notices (N*, and W* other than
    "not homed") are reported and cleared, faults (F*) refuse the run unless ``clear_faults``.
    Every move (and homing) is verified once the axis is idle: its flags are read BEFORE anything
    clears them (ZML's own ``wait_until_idle`` sends ``warnings clear`` and would hide an
    interruption), and its position must lie within ``tolerance_native`` native units of the
    target.  Waits are bounded: moves by ``move_timeout_s``, homing by ``home_timeout_s``, a stop
    by STOP_TIMEOUT_S; a move or homing that runs out of time sends ``stop`` itself.
    """

    def __init__(self, port: str, device: int = DEFAULT_DEVICE, axis: int = DEFAULT_AXIS, *,
                 native_unit_nm: float | None = None, device_db: str | None = None,
                 move_timeout_s: float = DEFAULT_MOVE_TIMEOUT_S, home_timeout_s: float = DEFAULT_HOME_TIMEOUT_S,
                 clear_faults: bool = False) -> None:
        self._configure(port, native_unit_nm=native_unit_nm, move_timeout_s=move_timeout_s,
                        home_timeout_s=home_timeout_s, clear_faults=clear_faults)
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

    def _configure(self, port: str, *, native_unit_nm: float | None, move_timeout_s: float,
                   home_timeout_s: float, clear_faults: bool) -> None:
        """Settings every way of making a ZaberStage shares; no device traffic.  (An adapter over
        an axis the caller owns sets these, then calls ``_setup_axis``; ``close`` leaves a
        connection it did not open alone.)"""
        self.port = port
        self.native_unit_nm = native_unit_nm
        self.move_timeout_s, self.home_timeout_s = move_timeout_s, home_timeout_s
        self.clear_faults = clear_faults
        # --z-min/--z-max of the current focus() call: positions are rounded to native units inside them
        self.soft_limits_mm: tuple[float | None, float | None] = (None, None)
        self.name: str | None = None  # the device's product name, when ZML could identify it
        self._connection: Any = None
        self._owns_connection = False
        zm = _zml()
        self._zm = zm
        self._exc = zm.exceptions

    @classmethod
    def from_axis(cls, axis: Any, *, native_unit_nm: float | None = None,
                  move_timeout_s: float = DEFAULT_MOVE_TIMEOUT_S, home_timeout_s: float = DEFAULT_HOME_TIMEOUT_S,
                  clear_faults: bool = False) -> ZaberStage:
        """A stage over a ZML ``Axis`` the caller already holds, e.g.
        ``connection.get_device(3).get_axis(1)`` or ``Microscope.find(connection).focus_axis``.

        The caller owns the connection: ``close()`` leaves it open, and no ZML-wide setting
        (idle polling, device database) is changed (``Library.set_idle_polling_period(10)`` saves
        ~25 ms a move if your script allows it).  Units, limits and the homed state are read
        from the axis as for a port the tool opens itself, latched flags are handled the same way
        (``clear_faults`` as ``--clear-faults``), and nothing moves here.
        """
        self = cls.__new__(cls)
        self._configure("the caller's connection", native_unit_nm=native_unit_nm, move_timeout_s=move_timeout_s,
                        home_timeout_s=home_timeout_s, clear_faults=clear_faults)
        self._connection = axis.device.connection
        self._setup_axis(axis)
        return self

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
        if self._busy():
            raise StageError(f"{self._where()} is moving (the knob or joystick, Zaber Launcher or another "
                             "program): wait until it stops and run again; nothing was commanded")
        flags = self._settle_flags(flags)
        self._homed = "WR" not in flags and "WH" not in flags

    def _where(self) -> str:
        """"device 3 axis 1" for messages."""
        return f"device {self.device_number} axis {self.axis_number}"

    def _probe_flags(self) -> set[str]:
        """The axis's warning flags; the first request, so it also tells an absent device or axis."""
        try:
            return set(self._axis.warnings.get_flags())
        except (self._exc.RequestTimeoutException, self._exc.DeviceAddressConflictException) as exc:
            raise UsageError(f"no Zaber device {self.device_number} on {self.port}; {self._found()}; "
                             "pass --device N") from exc
        except self._exc.BadDataException as exc:
            raise UsageError(f"device {self.device_number} has no axis {self.axis_number}; "
                             "pass --axis N") from exc
        except self._exc.CommandFailedException as exc:
            if "BADAXIS" in str(exc) or "axis" in str(exc).lower():
                raise UsageError(f"device {self.device_number} has no axis {self.axis_number}; pass --axis N") from exc
            raise StageError(f"device {self.device_number} rejected a status request: {first_line(exc)}") from exc
        except self._exc.MotionLibException as exc:
            raise StageError(f"device {self.device_number} on {self.port} does not answer: {first_line(exc)}") from exc

    def _choose_units(self, device: Any) -> None:
        """Native units of a known size, or millimetres through Zaber's device database."""
        zm = self._zm
        if self.native_unit_nm is not None:
            self._unit = zm.Units.NATIVE
            self._scale = 1e6 / self.native_unit_nm  # device values per mm (native units per mm)
            self._native_per_mm = self._scale
            return
        try:
            if not device.is_identified:
                device.identify()
            self.name = device.name or None
            self._native_per_mm = self._axis.settings.convert_to_native_units(
                "pos", 1.0, zm.Units.LENGTH_MILLIMETRES)
        except (self._exc.DeviceDbFailedException, self._exc.DeviceNotIdentifiedException) as exc:
            raise UsageError(
                "cannot convert millimetres: ZML could not load Zaber's device database "
                f"({first_line(exc)}); connect once with internet, or pass --device-db FILE "
                "(Zaber's offline database), or --native-unit-nm N (size of one native unit)") from exc
        except self._exc.MotionLibException as exc:
            raise StageError(f"identifying device {self.device_number} failed: {first_line(exc)}") from exc
        self._unit = zm.Units.LENGTH_MILLIMETRES
        self._scale = 1.0

    def _check_travel(self) -> None:
        """Refuse a --native-unit-nm that makes the travel implausible for a focus axis."""
        lo_mm, hi_mm = PLAUSIBLE_TRAVEL_MM
        travel = self._limits[1] - self._limits[0]
        if self.native_unit_nm is not None and not lo_mm <= travel <= hi_mm:
            native = round(travel * self._native_per_mm)
            raise UsageError(f"--native-unit-nm {self.native_unit_nm:g} makes the travel of {self._where()} "
                             f"{travel:g} mm ({native} native units); a focus axis travels {lo_mm:g}-{hi_mm:g} mm: "
                             "check the native unit size in the stage's datasheet (nm, not um); nothing moved")

    def _tolerance_native(self) -> float:
        """How far from its target a finished move may be, in native units (see the constant)."""
        try:
            settle = float(self._axis.settings.get("cloop.settle.tolerance"))
        except self._exc.MotionLibException:  # open-loop devices have no such setting (RJ BADCOMMAND)
            settle = 0.0
        return max(float(POSITION_TOLERANCE_NATIVE), settle)

    def _busy(self) -> bool:
        """Whether the axis is moving now (one status request)."""
        try:
            return bool(self._axis.is_busy())
        except self._exc.MotionLibException as exc:
            raise StageError(f"reading the status of {self._where()}: {first_line(exc)}") from exc

    def _settle_flags(self, flags: set[str]) -> set[str]:
        """Report and clear notices left from earlier work; refuse latched faults unless told to
        clear them.  Returns the flags still active (e.g. WR, not homed)."""
        faults = sorted(f for f in flags if f.startswith("F"))
        notices = sorted(f for f in flags if not f.startswith("F") and f not in ("WR", "WH"))
        if faults and not self.clear_faults:
            first = faults[0]
            also = f" (also {', '.join(describe_flag(f) for f in faults[1:])})" if len(faults) > 1 else ""
            raise StageError(f"{self._where()} reports fault {describe_flag(first)}{also}: "
                             f"{FAULT_ADVICE.get(first, 'see the Warning Flags section of the Zaber ASCII manual')}"
                             "; once checked, run again with --clear-faults to clear it; nothing was moved")
        if not faults and not notices:
            return flags
        try:
            self._axis.warnings.clear_flags()
            left = set(self._axis.warnings.get_flags())
        except self._exc.MotionLibException as exc:
            raise StageError(f"clearing the warning flags of {self._where()}: {first_line(exc)}") from exc
        what = ", ".join(describe_flag(f) for f in faults + notices)
        log.warning("%s had %s latched from earlier work: cleared%s", self._where(), what,
                    " (--clear-faults)" if faults else "")
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
                "travel_mm": [round(lo, 6), round(hi, 6)],
                "native_unit_nm": self.native_unit_nm if self.native_unit_nm is not None
                else round(1e6 / self._native_per_mm, 6),
                "units_from": "--native-unit-nm" if self.native_unit_nm is not None else "device database",
                "homed": self._homed, "homed_now": False, "position_tolerance_native": self.tolerance_native}

    @property
    def homed(self) -> bool:
        """Whether the axis has a reference position (no WR/WH at set-up, or homed since)."""
        return self._homed

    def home_if_needed(self) -> bool:
        """Home the axis when it has no reference position; True when it homed.

        Homing drives to the home sensor and may cross any position: the caller decides whether
        that is allowed (see ``run``)."""
        if self._homed:
            return False
        log.warning("homing %s: it has no reference position (the stage moves to its home sensor)", self._where())
        try:
            try:
                self._axis.home(wait_until_idle=False)
            except self._exc.MotionLibException as exc:
                raise StageError(f"homing {self._where()} failed: {first_line(exc)}") from exc
            self._await_idle("homing", self.home_timeout_s, "--home-timeout-s")
        except KeyboardInterrupt as exc:  # Ctrl-C at any point of the homing: stop it, whatever comes next
            exc.stage_state = stop_and_locate(self, "homing was interrupted")  # type: ignore[attr-defined]
            raise
        flags = self._flags_after("homing")
        if "WR" in flags or "WH" in flags:
            raise StageError(f"homing {self._where()} ended without a reference position "
                             f"({', '.join(sorted(flags & {'WR', 'WH'}))}); check the home sensor")
        self._homed = True
        return True

    def limits_mm(self) -> tuple[float, float]:
        return self._limits

    def position_mm(self) -> float:
        try:
            return round(self._axis.get_position(self._unit) / self._scale, POSITION_DECIMALS)
        except self._exc.MotionLibException as exc:
            raise StageError(f"reading the position of device {self.device_number}: {first_line(exc)}") from exc

    def move_to(self, z_mm: float) -> None:
        lo, hi = self._limits
        if not lo - 1e-9 <= z_mm <= hi + 1e-9:  # last line of defence; plans are checked earlier
            raise StageError(f"refusing to move to {z_mm} mm: outside the travel {lo}..{hi} mm")
        what = f"focus move to {z_mm:.4f} mm"
        target = self._native_inside(z_mm)
        try:
            self._axis.move_absolute(target, self._zm.Units.NATIVE, wait_until_idle=False)
        except self._exc.MovementFailedException as exc:
            raise StageError(f"move to {z_mm:.4f} mm failed: {first_line(exc)}") from exc
        except self._exc.CommandFailedException as exc:
            raise StageError(f"device {self.device_number} rejected the move to {z_mm:.4f} mm: "
                             f"{first_line(exc)}") from exc
        except self._exc.MotionLibException as exc:
            raise StageError(f"lost the stage while moving to {z_mm:.4f} mm: {first_line(exc)}") from exc
        self._await_idle(f"moving to {z_mm:.4f} mm", self.move_timeout_s, "--move-timeout-s", what)
        self._flags_after(what)
        at = self.position_mm()
        off_native = abs(at * self._native_per_mm - target)
        if off_native > self.tolerance_native + 1e-6:
            raise StageError(f"{what} ended at {at:.4f} mm, {off_native:.0f} native units off the target "
                             f"(tolerance {self.tolerance_native:g}): the axis did not reach it (something blocked it, "
                             "or another program or the knob moved it)")

    @property
    def native_unit_mm(self) -> float:
        """The size of one native unit (one step of the axis), mm."""
        return 1.0 / self._native_per_mm

    def _native_inside(self, z_mm: float) -> int:
        """z in whole native units, rounded to the nearest unit unless that lies outside the
        travel or the soft limits (``soft_limits_mm``): then toward the inside.  With coarse
        units, plain rounding could command a position just past --z-max."""
        per_mm = self._native_per_mm
        lo, hi = self._limits
        soft_lo, soft_hi = self.soft_limits_mm
        lo = lo if soft_lo is None else max(lo, soft_lo)
        hi = hi if soft_hi is None else min(hi, soft_hi)
        exact = z_mm * per_mm
        target = round(exact)
        # Only the rounding is moved inside (a target within one unit of a limit): a position
        # outside the limits on purpose (the start, where the user left the stage) is kept.
        if exact <= hi * per_mm + 1e-6 and target > hi * per_mm + 1e-6:
            target = math.floor(hi * per_mm + 1e-6)  # 1e-6 unit: float noise, not a unit
        if exact >= lo * per_mm - 1e-6 and target < lo * per_mm - 1e-6:
            target = math.ceil(lo * per_mm - 1e-6)
        return target

    def _await_idle(self, doing: str, timeout_s: float, option: str, what: str | None = None) -> None:
        """Poll until the axis is idle, at most ``timeout_s``; on time-out send ``stop`` at once.

        While it is busy the flags are read too (every ~0.1 s), so an interruption by someone
        else (NI; e.g. the knob keeps the axis busy) is reported at once, without stopping them."""
        deadline = time.monotonic() + timeout_s
        next_flags = time.monotonic() + 0.1
        try:
            while self._axis.is_busy():
                now = time.monotonic()
                if now > deadline:
                    where = self._stop_now()
                    raise StageError(f"{doing}: the axis was still busy after {timeout_s:g} s; stopped it{where} "
                                     f"(raise {option} if the stage is slow)")
                if what is not None and now >= next_flags:
                    next_flags = now + 0.1
                    if "NI" in self._axis.warnings.get_flags():
                        self._interrupted(what)
                time.sleep(0.005)
        except KeyboardInterrupt:
            for _ in range(3):  # a second Ctrl-C must not cut the stop short
                try:
                    self._stop_now()
                    break
                except KeyboardInterrupt:
                    continue
                except Exception:  # noqa: BLE001 - the interrupt is what is reported
                    break
            raise
        except self._exc.MotionLibException as exc:
            raise StageError(f"lost the stage while {doing}: {first_line(exc)}") from exc

    def _flags_after(self, what: str) -> set[str]:
        """The flags once a motion has ended: NI -> StageInterrupted; a fault -> StageError."""
        try:
            flags = set(self._axis.warnings.get_flags())  # read, not cleared (see the class docstring)
        except self._exc.MotionLibException as exc:
            raise StageError(f"lost the stage after the {what}: {first_line(exc)}") from exc
        if "NI" in flags:
            self._interrupted(what)
        faults = sorted(f for f in flags if f.startswith("F"))
        if faults:
            at = self._position_text()
            if faults == ["FS"]:  # a stall: cleared so that the stage can go back to where it started
                with contextlib.suppress(self._exc.MotionLibException):
                    self._axis.warnings.clear_flags()
                raise StageError(f"{what} failed: {describe_flag('FS')} at {at}: "
                                 f"{FAULT_ADVICE['FS']}")
            err = StageError(f"{what} ended with fault {describe_flag(faults[0])} at {at}: "
                             f"{FAULT_ADVICE.get(faults[0], 'see the Warning Flags section of the Zaber ASCII manual')}")
            err.may_move = False  # the drive or the position cannot be trusted: move nothing more
            raise err
        return flags

    def _interrupted(self, what: str) -> None:
        """Raise StageInterrupted naming where the axis is."""
        raise StageInterrupted(f"{what} was interrupted (NI) at {self._position_text()}: the axis was moved or "
                               "stopped from outside (the knob or joystick, Zaber Launcher or another program)")

    def _position_text(self) -> str:
        """"10.1713 mm", or "an unknown position" when it cannot be read."""
        try:
            return f"{self.position_mm():.4f} mm"
        except StageError:
            return "an unknown position"

    def _stop_now(self) -> str:
        """Send ``stop`` and wait (at most STOP_TIMEOUT_S) for the axis to come to rest; returns
        "" or a note that it did not.  ZML's own stop() waits for idle with no time limit."""
        self._axis.stop(wait_until_idle=False)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while self._axis.is_busy():
            if time.monotonic() > deadline:
                return f", but it was still busy {STOP_TIMEOUT_S:g} s after the stop"
            time.sleep(0.005)
        return ""

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
    "download site, then pip install simple-pyspin; or use --camera sim / --simulate / --replay"
)


def _pyspin() -> tuple[Any, Any]:
    """Import PySpin and simple-pyspin on first use."""
    try:
        import PySpin  # noqa: PLC0415
        import simple_pyspin  # noqa: PLC0415
    except ImportError as exc:
        raise UsageError(PYSPIN_HELP) from exc
    return PySpin, simple_pyspin


class FlirCamera(GenicamAdapter):
    """A FLIR camera through simple-pyspin, streaming with a software trigger.

    Set-up, each change recorded in a SettingsJournal: a mono pixel format (Mono16 on a sensor
    deeper than 8 bits, else Mono8; a colour camera offering neither streams its 8/16-bit Bayer
    mosaic, which ``capture`` converts to gray: a mosaic is never scored as if it were gray;
    packed formats are never used); the sensor ROI (``roi``, rounded to the camera's increments);
    continuous acquisition with a software trigger; auto exposure and auto gain turned off for the
    sweep (refused with a CameraError when the camera does not allow it); ``exposure_ms``.  The
    frame timeout is the larger of ``timeout_ms`` and the exposure plus CAMERA_TIMEOUT_MARGIN_MS.

    Acquisition starts once; each ``capture`` drains stale buffers, triggers one exposure and
    waits for that frame with the timeout, so no frame exposed before the call (e.g. during the
    previous move) is ever returned, buffers are always released, and nothing blocks forever.
    ``close()`` stops acquisition, puts back every node it changed and releases the camera
    (DeInit), whatever ended the run; a camera lent by the caller (``from_camera``) is only
    restored, never closed.
    """

    vendor, viewer = "FLIR camera", "SpinView"

    def __init__(self, serial: str | None = None, *, exposure_ms: float | None = None,
                 timeout_ms: int = DEFAULT_CAMERA_TIMEOUT_MS, roi: Roi | None = None) -> None:
        spin, sp = _pyspin()
        name = f"the FLIR camera{' ' + serial if serial else ''}"
        try:
            cam = sp.Camera(serial if serial else 0)
        except (sp.CameraError, spin.SpinnakerException) as exc:
            raise CameraError(f"cannot open {name}: {first_line(exc)}; check the USB cable and that no other "
                              "program (SpinView) holds it") from exc
        try:
            cam.init()
        except spin.SpinnakerException as exc:
            busy = getattr(exc, "errorcode", None) == -1004  # SPINNAKER_ERR_RESOURCE_IN_USE
            raise CameraError(f"cannot open {name}: {first_line(exc)}; " + (
                "another program (SpinView, another script) or an earlier run that was not closed still holds "
                "it: close that program, or unplug and replug the camera" if busy else
                "check the USB cable and that no other program (SpinView) holds it")) from exc
        self._setup(spin, sp, cam, owned=True, exposure_ms=exposure_ms, timeout_ms=timeout_ms, roi=roi)

    @classmethod
    def from_camera(cls, camera: Any, *, exposure_ms: float | None = None,
                    timeout_ms: int = DEFAULT_CAMERA_TIMEOUT_MS, roi: Roi | None = None) -> FlirCamera:
        """An adapter over an open simple-pyspin ``Camera`` that the caller owns and keeps.

        Configures it as a run needs (see the class) and starts streaming; ``restore()`` (or
        leaving the ``with`` block: the adapter is a context manager) stops streaming and puts
        every node back as it was, restarting the stream if the camera was streaming when lent.
        The camera is never closed or de-initialised here.  One adapter per use::

            with simple_pyspin.Camera() as cam:             # yours: opened and closed by you
                with autofocus.FlirCamera.from_camera(cam) as camera:
                    ...                                      # focus with ``camera``
                # here cam's settings are as they were before
        """
        spin, sp = _pyspin()
        if not getattr(camera, "initialized", False):
            raise UsageError("FlirCamera.from_camera needs an initialised simple_pyspin.Camera: call its init() "
                             "or open it with `with simple_pyspin.Camera() as cam:` first")
        self = cls.__new__(cls)
        self._setup(spin, sp, camera, owned=False, exposure_ms=exposure_ms, timeout_ms=timeout_ms, roi=roi)
        return self

    def _setup(self, spin: Any, sp: Any, cam: Any, *, owned: bool, exposure_ms: float | None,
               timeout_ms: int, roi: Roi | None) -> None:
        """Configure the camera for the sweep and start streaming; on any failure put it back."""
        self._spin, self._sp, self._cam, self._owned = spin, sp, cam, owned
        self._was_running = bool(getattr(cam, "running", False))
        self._journal = SettingsJournal(lambda n: getattr(cam, n), lambda n, v: setattr(cam, n, v))
        self._closed = False
        self._bayer_code: int | None = None
        self.pixel_format: str | None = None
        self.roi: Roi | None = None
        self.timeout_ms = timeout_ms
        try:
            cam.stop()  # a lent camera may be streaming: image format and trigger are locked then
            self._configure(exposure_ms, timeout_ms, roi)
            cam.start()
        except (sp.CameraError, spin.SpinnakerException) as exc:
            self.close()
            raise CameraError(f"cannot configure the FLIR camera: {first_line(exc)}") from exc
        except BaseException:
            self.close()
            raise

    def _has(self, name: str) -> bool:
        return name in self._cam.camera_attributes

    def _configure(self, exposure_ms: float | None, timeout_ms: int, roi: Roi | None) -> None:
        cam, journal = self._cam, self._journal
        self._set_pixel_format()
        if roi is not None:
            self._set_roi(roi)
        software_trigger(journal, self._has)
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
        offered = []
        for entry in node.GetEntries():
            entry = spin.CEnumEntryPtr(entry)
            if spin.IsAvailable(entry) and spin.IsReadable(entry):
                offered.append(entry.GetSymbolic())
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
            raise CameraError(f"no frame from the FLIR camera within {self.timeout_ms} ms: {first_line(exc)}; "
                              "check the cable, or raise --camera-timeout-ms") from exc
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
        with contextlib.suppress(Exception):
            self._cam.cam.DeInit()  # simple_pyspin's close() does not: the next Init would fail (-1004)
        with contextlib.suppress(Exception):
            self._cam.close()


###############################################################################
# Backends: Basler camera (pypylon) ###########################################
###############################################################################
# pypylon is Basler's own wheel on PyPI with the pylon runtime inside; its camera emulator
# (PYLON_CAMEMU=N presents N emulated cameras) drives this adapter through the real SDK in tests.

PYPYLON_HELP = ("the Basler camera needs Basler's pypylon (on PyPI): pip install pypylon; "
                "or use --camera sim / --simulate / --replay")


def _pylon() -> tuple[Any, Any]:
    """Import pypylon on first use: (pylon, genicam)."""
    try:
        from pypylon import genicam, pylon  # noqa: PLC0415
    except ImportError as exc:
        raise UsageError(PYPYLON_HELP) from exc
    return pylon, genicam


class BaslerCamera(GenicamAdapter):
    """A Basler camera through pypylon, streaming with a software trigger (FlirCamera's contract).

    Set-up, each change recorded in a SettingsJournal: a mono pixel format (``choose_pixel_format``:
    Mono16 or an unpacked Mono12/10 on a sensor deeper than 8 bits, else Mono8; a packed one such
    as Mono12p only when nothing unpacked of that depth is offered, unpacked by pylon's
    ImageFormatConverter; a colour camera without mono formats streams its Bayer mosaic, converted
    to gray); the sensor ROI (``roi``); continuous acquisition with a software trigger on
    FrameStart; ExposureAuto and GainAuto off; ``exposure_ms`` (ExposureTime, or ExposureTimeAbs
    on older GigE cameras).  Frame timeout: the larger of ``timeout_ms`` and exposure +
    CAMERA_TIMEOUT_MARGIN_MS.

    ``serial`` chooses among several cameras (pylon Viewer shows it); without it the first one pylon
    lists is used (a warning names the others).  Each ``capture`` drains frames already delivered,
    waits until the camera accepts a trigger, triggers, and waits for that frame.  ``close()`` stops
    grabbing, puts back every node it changed and closes the camera on every exit path; a camera
    lent by the caller (``from_camera``) is only restored, never closed.
    """

    vendor, viewer = "Basler camera", "pylon Viewer"

    def __init__(self, serial: str | None = None, *, exposure_ms: float | None = None,
                 timeout_ms: int = DEFAULT_CAMERA_TIMEOUT_MS, roi: Roi | None = None) -> None:
        pylon, genicam = _pylon()
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
                raise CameraError(f"--camera-serial {serial}: no such Basler camera; found {', '.join(found)}")
        elif len(devices) > 1:
            log.warning("%d Basler cameras found (%s): using %s; choose one with --camera-serial",
                        len(devices), ", ".join(found), found[0])
        info = devices[0]
        name = f"the Basler camera {info.GetSerialNumber()}"
        try:
            cam = pylon.InstantCamera(factory.CreateDevice(info))
            cam.Open()
        except genicam.GenericException as exc:
            raise CameraError(f"cannot open {name} ({info.GetModelName()}): {first_line(exc)}; another program "
                              "(pylon Viewer, another script) may hold it: close it, or unplug and replug the "
                              "camera") from exc
        self._setup(pylon, genicam, cam, owned=True, exposure_ms=exposure_ms, timeout_ms=timeout_ms, roi=roi)

    @classmethod
    def from_camera(cls, camera: Any, *, exposure_ms: float | None = None,
                    timeout_ms: int = DEFAULT_CAMERA_TIMEOUT_MS, roi: Roi | None = None) -> BaslerCamera:
        """An adapter over an open ``pylon.InstantCamera`` that the caller owns and keeps.

        Configures it as a run needs and starts grabbing; ``restore()`` (or leaving the ``with``
        block) stops grabbing and puts every node back, restarting grabbing if it was grabbing when
        lent.  The camera is never closed here::

            cam = pylon.InstantCamera(pylon.TlFactory.GetInstance().CreateFirstDevice())
            cam.Open()                                       # yours: opened and closed by you
            with autofocus.BaslerCamera.from_camera(cam) as camera:
                ...                                          # focus with ``camera``
            cam.Close()
        """
        pylon, genicam = _pylon()
        if not (hasattr(camera, "IsOpen") and camera.IsOpen()):
            raise UsageError("BaslerCamera.from_camera needs an open pylon.InstantCamera: call its Open() first")
        self = cls.__new__(cls)
        self._setup(pylon, genicam, camera, owned=False, exposure_ms=exposure_ms, timeout_ms=timeout_ms, roi=roi)
        return self

    def _setup(self, pylon: Any, genicam: Any, cam: Any, *, owned: bool, exposure_ms: float | None,
               timeout_ms: int, roi: Roi | None) -> None:
        """Configure the camera for the sweep and start grabbing; on any failure put it back."""
        self._pylon, self._genicam, self._cam, self._owned = pylon, genicam, cam, owned
        self._was_running = bool(cam.IsGrabbing())
        self._journal = SettingsJournal(lambda n: getattr(cam, n).Value, self._write)
        self._closed = False
        self._bayer_code: int | None = None
        self._converter: Any = None
        self.pixel_format: str | None = None
        self.roi: Roi | None = None
        self.timeout_ms = timeout_ms
        self.stale_frames = 0  # frames delivered before a capture began, dropped (diagnostics)
        try:
            cam.StopGrabbing()  # a lent camera may be grabbing: format, ROI and trigger are locked then
            self._configure(exposure_ms, timeout_ms, roi)
            cam.StartGrabbing(pylon.GrabStrategy_OneByOne)
        except genicam.GenericException as exc:
            self.close()
            raise CameraError(f"cannot configure the Basler camera: {first_line(exc)}") from exc
        except BaseException:
            self.close()
            raise

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
        software_trigger(journal, self._has)
        freeze_auto(journal, self._has, (self._genicam.GenericException,), "Basler camera", "pylon Viewer")
        exposure = next((n for n in ("ExposureTime", "ExposureTimeAbs") if self._has(n)), None)
        if exposure_ms is not None:
            if exposure is None:
                raise CameraError("the Basler camera has no ExposureTime node: --exposure-ms cannot be set; "
                                  "drop it and set the exposure in pylon Viewer")
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
                raise CameraError(f"the Basler camera was not ready for a trigger within {self.timeout_ms} ms; "
                                  "check the cable, or raise --camera-timeout-ms")
            cam.ExecuteSoftwareTrigger()
            result = cam.RetrieveResult(int(self.timeout_ms), pylon.TimeoutHandling_ThrowException)
        except genicam.GenericException as exc:
            raise CameraError(f"no frame from the Basler camera within {self.timeout_ms} ms: {first_line(exc)}; "
                              "check the cable, or raise --camera-timeout-ms") from exc
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
        with contextlib.suppress(Exception):
            self._cam.Close()
        with contextlib.suppress(Exception):
            self._cam.DestroyDevice()


# The live cameras --camera can name (besides "sim"); each takes (serial, *, exposure_ms, timeout_ms, roi).
LIVE_CAMERAS: dict[str, Callable[..., Any]] = {"flir": FlirCamera, "basler": BaslerCamera}


###############################################################################
# Backends: simulated microscope ##############################################
###############################################################################
# Defaults model the seed's hardware.  Sources: BFLY-U3-23S6M (Sony IMX249): 1920x1200,
# 5.86 um pixels, 41 fps (datasheet); read noise 7 e- (estimate for IMX249); X-LDA025A
# focus stage: 25 mm travel (datasheet), speed and settle (estimates); a 4x / NA 0.10
# objective (estimate of a typical low-magnification MVR objective, depth of field ~70 um).


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
    specimen: str = "cells"  # "cells", "blank" or "dusty" (cells, plus dust on the coverslip above them)
    dust_height_mm: float = 0.17  # "dusty": the dust plane lies this far above the cells (a #1.5 coverslip)
    phase_rad: float = 1.5  # "transparent": the phase delay through a cell's centre, radians
    condenser_na: float = 0.3  # "transparent": brightfield condenser aperture (partial coherence)
    seed: int = 0
    # A two-region field (for --roi): the right half of the frame shows right_specimen (default:
    # the same specimen) in the plane right_focus_mm (default: focus_mm); None, None = one plane.
    right_specimen: str | None = None
    right_focus_mm: float | None = None

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

    def blur_sigma_px(self, defocus_mm: float) -> float:
        """PSF sigma in pixels: diffraction (Airy ~ 0.21 lambda/NA) plus geometric defocus blur.

        The geometric blur disc has radius |dz| tan(theta), theta = asin(NA/n) the half-angle of
        the light cone (at NA 0.85 that is 1.61 |dz|, not the small-angle 0.85 |dz|); a Gaussian of
        sigma = radius / 2 matches its second moment.  Near focus diffraction dominates: that
        flat top is the depth of field.
        """
        diffraction = 0.21 * self.wavelength_um / self.na / self.sample_pixel_um
        half_angle = math.asin(min(self.na / self.immersion_index, 1.0))
        geometric = math.tan(half_angle) * abs(defocus_mm) * 1000.0 / 2.0 / self.sample_pixel_um
        return math.hypot(diffraction, geometric)


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
}


def objective_optics(name: str) -> dict[str, float]:
    """SimOptics fields for an objective of OBJECTIVES."""
    if name not in OBJECTIVES:
        raise UsageError(f"objective {name!r} is unknown; choose one of {', '.join(OBJECTIVES)}")
    magnification, na, n = OBJECTIVES[name]
    return {"magnification": magnification, "na": na, "immersion_index": n}


@functools.lru_cache(maxsize=4)
def make_specimen(width: int, height: int, kind: str = "cells", seed: int = 0) -> np.ndarray:
    """A deterministic synthetic specimen, relative brightness 0..1 (float32, height x width).

    "cells": cell bodies with a bright membrane and nucleus, granules, filaments and a fine
    fibrous texture, on a dim background.  "blank": even illumination with gentle vignetting
    and no structure at all (nothing to focus on).  "dust": a transmission mask (1 = clear)
    with sparse dark specks and fibres, for the dust plane of the "dusty" specimen.  "phase": the
    phase map of an unstained culture (cells, nuclei, granules as smooth bumps; 1 = a cell's full
    delay), for the "transparent" specimen.
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
    small, s = image, sigma_px
    while s > 3.0 and min(small.shape) > 32:
        small = cv2.pyrDown(small)  # pyrDown itself blurs by ~1 source pixel
        s = math.sqrt(max(s * s - 1.0, 0.0)) / 2.0
    if s > 0.3:
        small = cv2.GaussianBlur(small, (0, 0), s)
    if small.shape != image.shape:
        small = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    return small


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


class SimStage:
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
        if not lo - 1e-9 <= z_mm <= hi + 1e-9:
            raise StageError(f"simulated stage rejected a move to {z_mm} mm: outside the travel {lo}..{hi} mm")
        self.clock.spend(self.timing.move_s(z_mm - self.z))
        self.z = z_mm

    def stop(self) -> None:
        pass


class SimCamera:
    """Renders what the stage's position would show through the simulated optics.

    Streaming with a software trigger (exposure + readout per frame) by default;
    ``one_shot`` adds an acquisition start/stop per frame, as the seed's loop does.  ``roi``
    (x, y, w, h; ``--camera-roi``) crops the frame like a sensor ROI, and the modelled read-out
    shrinks with the rows read.
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

    def render(self, z_mm: float) -> np.ndarray:
        """The frame at z: defocus blur, shot noise, read noise, quantisation."""
        o = self.optics
        if o.specimen == "transparent":
            blurred = self.render_phase(z_mm)
        elif o.specimen == "blank":  # an even field: defocus changes nothing (resampling it in
            blurred = make_specimen(o.width, o.height, "blank", o.seed)  # blur_sigma would add ripples)
        else:
            specimen = make_specimen(o.width, o.height, "cells" if o.specimen == "dusty" else o.specimen, o.seed)
            blurred = blur_sigma(specimen, o.blur_sigma_px(z_mm - o.focus_mm))
        if o.specimen == "dusty":  # dust on the coverslip, in its own plane: bright specks and lint
            # (scattered light, as dust and autofluorescent fibres look on this dark-background field)
            dust = make_specimen(o.width, o.height, "dust", o.seed)
            blurred = blurred + 0.8 * (1.0 - blur_sigma(dust, o.blur_sigma_px(z_mm - o.focus_mm - o.dust_height_mm)))
        if o.right_specimen is not None or o.right_focus_mm is not None:
            right_plane = o.focus_mm if o.right_focus_mm is None else o.right_focus_mm
            right = blur_sigma(make_specimen(o.width, o.height, o.right_specimen or o.specimen, o.seed),
                               o.blur_sigma_px(z_mm - right_plane))
            half = o.width // 2  # a new array: blur_sigma may return the cached specimen itself
            blurred = np.concatenate([blurred[:, :half], right[:, half:]], axis=1)
        electrons = blurred * np.float32(o.photons)
        noise = np.empty_like(electrons)
        # OpenCV's RNG is 3x faster than numpy's normals but per-thread and global: seeding it
        # from (seed, frame number) right before use keeps every camera's frames reproducible.
        # (cv2's seed is a C int: reduced modulo 2^31 - 1, the same noise as before for small seeds)
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
        sigma = math.hypot(o.blur_sigma_px(0.0), sigma_c)
        return np.float32(0.6) * (1.0 + np.clip(blur_sigma(contrast, sigma), -0.95, 0.6))

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


###############################################################################
# Backends: replay of a recorded stack ########################################
###############################################################################


def image_header(path: Path) -> tuple[int, int, int | None] | None:
    """(width, height, samples per pixel or None) from a PNG or TIFF header, without decoding;
    None for other formats."""
    with open(path, "rb") as f:
        head = f.read(16)
        if head.startswith(b"\x89PNG\r\n\x1a\n") and head[12:16] == b"IHDR":
            w, h = (int.from_bytes(f.read(4), "big") for _ in range(2))
            return w, h, None
        if head[:4] in (b"II*\x00", b"MM\x00*"):
            order = "little" if head[:2] == b"II" else "big"
            f.seek(int.from_bytes(head[4:8], order))
            count = int.from_bytes(f.read(2), order)
            tags = {}
            for _ in range(min(count, 4096)):
                entry = f.read(12)
                if len(entry) < 12:
                    break
                tag, kind = int.from_bytes(entry[0:2], order), int.from_bytes(entry[2:4], order)
                if tag in (256, 257, 277):  # ImageWidth, ImageLength, SamplesPerPixel: SHORT (3) or LONG
                    tags[tag] = int.from_bytes(entry[8:10] if kind == 3 else entry[8:12], order)
            if 256 in tags and 257 in tags:
                return tags[256], tags[257], tags.get(277, 1)
        return None


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
    too large, truncated, of an unsupported type or channel count, or with non-finite pixels."""
    try:
        size = image_header(path)
    except OSError as exc:
        raise StackError(f"{what} cannot be read ({exc.strerror})") from exc
    if size is not None and size[0] * size[1] > MAX_IMAGE_PIXELS:
        raise StackError(f"{what} declares {size[0]}x{size[1]} pixels, more than {MAX_IMAGE_PIXELS / 1e6:g} MP; "
                         "not a microscope frame (or a damaged file)")
    if size is not None and size[2] is not None and size[2] not in (1, 3, 4):
        raise StackError(f"{what} has {size[2]} channels; a stack must hold gray, colour or colour+alpha images")
    if size is None and path.stat().st_size > MAX_IMAGE_PIXELS * 8:
        raise StackError(f"{what} is {path.stat().st_size / 1e6:.0f} MB; too large for a microscope frame")
    with quiet_stderr():
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise StackError(f"{what} cannot be read as an image (truncated, damaged or not an image)")
    if image.size > MAX_IMAGE_PIXELS * 4:
        raise StackError(f"{what} is {image.shape}; more than {MAX_IMAGE_PIXELS / 1e6:g} MP")
    channels = 1 if image.ndim == 2 else image.shape[2]
    if image.dtype.name not in REPLAY_DTYPES:
        raise StackError(f"{what} has {image.dtype} pixels; a stack must hold {', '.join(REPLAY_DTYPES)} images "
                         "(as cameras deliver them)")
    if channels not in (1, 3, 4):
        raise StackError(f"{what} has {channels} channels; a stack must hold gray, colour or colour+alpha images")
    if image.dtype.kind == "f" and not np.isfinite(image).all():
        raise StackError(f"{what} has non-finite pixels (NaN or infinity); no score can be computed from them")
    image.flags.writeable = False  # shared by every row that names the file
    return image


class ReplayStack:
    """A recorded through-focus stack: ``stack.csv`` (z_mm, file, ...) and its images."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        csv_path = self.folder / "stack.csv"
        if not csv_path.is_file():
            raise StackError(f"replay stack {self.folder}: no stack.csv there (expected columns z_mm,file)")
        rows = self._read_rows(csv_path)
        zs = [z for z, _ in rows]
        dupes = sorted(z for z, count in collections.Counter(zs).items() if count > 1)
        if dupes:
            raise StackError(f"replay stack {csv_path}: duplicate z_mm {dupes[0]:g}; each position must appear once")
        self.z_mm = np.array(zs)
        self.frames: list[np.ndarray] = []
        decoded: dict[Path, np.ndarray] = {}  # each distinct file is decoded once, however many rows name it
        shape = None
        total_bytes = 0
        for z, name in rows:
            path = self.folder / name
            if not path.is_file():
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
    def _read_rows(csv_path: Path) -> list[tuple[float, str]]:
        """(z_mm, file) rows of stack.csv, validated."""
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
                    rows.append((z, row["file"]))
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


class ReplayCamera:
    """Returns the recorded frame nearest the stage's position."""

    def __init__(self, stage: Stage, stack: ReplayStack) -> None:
        self.stage, self.stack = stage, stack

    def capture(self) -> np.ndarray:
        return self.stack.nearest(self.stage.position_mm())


###############################################################################
# Output ######################################################################
###############################################################################


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (ZML messages run over several lines)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def result_json(result: FocusResult | None, *, exit_code: int, error: str | None = None,
                where: str | None = None, stage_info: dict[str, Any] | None = None,
                roi: Sequence[int] | None = None, camera_roi: Sequence[int] | None = None) -> dict[str, Any]:
    """The machine-readable summary printed by --json: the same keys on every exit."""

    def num(x: float | None) -> float | None:
        return None if x is None or not math.isfinite(x) else float(x)

    r = result
    verdict = None if r is None else (r.verdict.kind if error is None else "failed")
    return {
        "best_mm": num(r.best_mm) if r else None,
        "best_score": num(r.best_score) if r else None,
        "best_sample_mm": num(r.best_sample_mm) if r else None,
        "fit_mm": num(r.fit.z_mm) if r else None,
        "fit_used": r.fit.used if r else False,
        "fit_reason": r.fit.reason if r else None,
        "verdict": verdict,
        "reason": r.verdict.reason if r else None,
        "suggested_range_mm": list(r.verdict.suggestion_mm) if r and r.verdict.suggestion_mm else None,
        "verdict_scale": r.verdict.scale if r else None,
        "prominence": num(r.verdict.prominence) if r else None,
        "noise": num(r.verdict.noise) if r else None,
        "threshold": num(r.verdict.threshold) if r else None,
        "frames": r.frames if r else 0,
        "moves": r.moves if r else 0,
        "elapsed_s": round(r.elapsed_s, 4) if r else None,
        "search": r.search if r else None,
        "metric": r.metric if r else None,
        "start_mm": num(r.start_mm) if r else None,
        "curve": [[s.z_mm, s.score] for s in r.samples] if r else [],
        "transparent": r.transparent if r else False,  # then the curve holds -score (the minimum is the peak)
        "peaks": [dataclasses.asdict(e) for e in r.peaks] if r else [],
        "dips": [dataclasses.asdict(e) for e in r.dips] if r else [],
        "timing": {k: round(v, 4) for k, v in dataclasses.asdict(r.timing if r else Timing()).items()},
        "exit_code": exit_code,
        "error": error,
        "stage": where,
        "stage_info": stage_info,  # Zaber runs: device, axis, name, travel_mm, native_unit_nm, ...
        "roi": list(roi) if roi else None,  # the scored region [x, y, w, h] (camera pixels), None: whole frame
        "camera_roi": list(camera_roi) if camera_roi else None,  # the sensor region read out, None: whole sensor
    }


def finite_only(value: Any) -> Any:
    """``value`` with every NaN or infinity replaced by None (recursively)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_only(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_only(v) for v in value]
    return value


def strict_json(data: dict[str, Any]) -> str:
    """One line of strict JSON (RFC 8259 has no NaN or Infinity: non-finite numbers become null)."""
    return json.dumps(finite_only(data), allow_nan=False)


def write_curve_csv(path: str | Path, samples: Sequence[Sample]) -> None:
    """The focus curve in capture order: index,z_mm,score."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "z_mm", "score"])
        for i, s in enumerate(samples):
            w.writerow([i, repr(float(s.z_mm)), repr(float(s.score))])


def plot_curve(path: str | Path, result: FocusResult) -> None:
    """A PNG of the focus curve: samples, chosen position, fitted peak."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
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
        fig.savefig(path)
    finally:
        plt.close(fig)


class ImageSaver:
    """Writes every frame as a lossless PNG and appends a row to DIR/stack.csv as it goes.

    Frames are saved whole; a region of interest is recorded in DIR/roi.json (and a stale one
    from an earlier run without it removed), so that ``--replay DIR`` scores the same region."""

    def __init__(self, folder: str | Path, roi: Roi | None = None) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        roi_path = self.folder / ROI_FILE
        try:
            if roi is not None:
                roi_path.write_text(json.dumps({"roi": list(roi)}) + "\n", encoding="utf-8")
            else:
                roi_path.unlink(missing_ok=True)
        except OSError as exc:
            raise OutputError(f"--save-images: writing {roi_path} failed ({exc.strerror})") from exc
        self._csv = open(self.folder / "stack.csv", "w", newline="")  # noqa: SIM115
        self._writer = csv.writer(self._csv)
        self._writer.writerow(["z_mm", "file", "score"])
        self._csv.flush()
        self._lock = threading.Lock()

    def __call__(self, index: int, z_mm: float, frame: np.ndarray, score: float) -> None:
        """Write one frame, then its row: a row is only ever listed for a file completely written.

        The PNG is encoded in memory and written under a temporary name, then renamed, so a
        full disk is one OSError here (no libpng messages) and never leaves a truncated frame
        behind a row.  The first failure stops the run (OutputError, exit 5)."""
        name = f"frame_{index:05d}.png"
        path = self.folder / name
        with self._lock:  # close() waits for a frame being written, and no frame follows it
            if self._csv.closed:
                return
            ok, encoded = cv2.imencode(".png", frame, [cv2.IMWRITE_PNG_COMPRESSION, 1])
            if not ok:
                raise OutputError(f"--save-images: OpenCV could not encode frame {index} as PNG")
            partial = path.with_name(f".{name}.part")
            try:
                with open(partial, "wb") as fh:
                    fh.write(encoded.tobytes())
                os.replace(partial, path)
                self._writer.writerow([repr(float(z_mm)), name, repr(float(score))])
                self._csv.flush()
            except OSError as exc:
                with contextlib.suppress(OSError):
                    partial.unlink(missing_ok=True)
                raise OutputError(f"--save-images: writing {path} failed ({exc.strerror or exc}); the frames "
                                  f"before it are in {self.folder / 'stack.csv'}") from exc

    def close(self) -> None:
        with self._lock:
            self._csv.close()


# The --show-images view: the frame, the filtered frame, its Laplacian and the focus curve side
# by side, each ``height`` pixels high and titled with its display scale; in the live window a
# status line below them says what is happening and which keys do what.
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
    """One BGR picture: the frame, the filtered frame, its Laplacian, and the focus curve, ``height``
    pixels high, each titled with its display scale; the region of interest (the part that is
    scored) outlined in yellow on the three images; ``status``, when given, in a line below.

    The image scales are fixed (not per frame) so that the panels compare across a sweep.
    ``frame_mm``: where the frame was taken (default: the last sample's position);
    ``positions``: the planned grid (the curve spans it and shades the positions not measured
    yet, labelled ``todo_label``); ``result``: a finished run, whose fitted peak, its +- and the
    verdict the curve shows.
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
    shows_fit = fit.used and fit.z_mm is not None and lo - 1e-9 <= fit.z_mm <= hi + 1e-9
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
        if kind != "no_peak" and lo - 1e-9 <= result.best_mm <= hi + 1e-9:
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

    It opens at the view's own size, or smaller to fit the screen, with the aspect kept: the view
    is drawn at the size it is shown (its labels stay sharp), in a plain window (no Qt toolbar)
    the user may resize.  Keys, read between frames (``poll``): space pauses before the next
    frame -- nothing moves and nothing waits on the camera, so nothing times out -- and resumes;
    ``s`` saves the view as a PNG in ``save_dir``; q, Esc or the close button raise WindowStop,
    which stops the run exactly as Ctrl-C does.  ``hold`` shows a finished run until a key.
    Memory stays flat: only the newest frame and the best one are kept.
    """

    WINDOW = "autofocus"

    def __init__(self, blur: int, roi: Roi | None = None, *, positions: Sequence[float] = (),
                 relative: bool = False, search: str = "sweep", score_name: str = curve_title(),
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
            # Opened with the first view, at its size.  WINDOW_NORMAL alone opens at the backend's
            # default size (Qt: ~400x300, with a toolbar and a status bar that squeeze the image
            # further) and scales the view into it; WINDOW_AUTOSIZE fixes the size (no resizing)
            # and keeps Qt's toolbar.  A plain window (WINDOW_GUI_NORMAL: no toolbar; other
            # backends ignore the flag) sized to the view shows it pixel for pixel, and the user may
            # still resize it, the aspect kept.
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
        ok, encoded = cv2.imencode(".png", self._shown)
        try:
            if not ok:
                raise OSError("OpenCV could not encode it")
            path.write_bytes(encoded.tobytes())
        except OSError as exc:
            self.say(f"autofocus.py: could not save the view as {path} ({exc.strerror or exc}); the run goes on")
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


def make_figures(folder: str | Path, optics: SimOptics, blur: int = DEFAULT_BLUR) -> list[Path]:
    """The README's figures, from the simulator: blurry and focused frames with their
    Laplacians, a sweep animation (frame, filtered, Laplacian, curve so far), the live view
    of a two-plane field scored on a region of interest (roi.png), the V-shaped contrast
    curve of an unstained specimen with --transparent (transparent.png), and the --show-images
    window held open at the end of a run (show_images.png)."""
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
            cv2.imwrite(str(path), img)
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
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=200, loop=0, optimize=True)
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
    cv2.imwrite(str(path), compose_view(camera.capture(), blur, curve, height=150, roi=roi, frame_mm=stage.z))
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
    # --show-images: the window held open at the end of the card's run on the simulator, exactly as
    # the screen shows it (python autofocus.py 10 14 0.05 --simulate --sim-size 960x600 --show-images:
    # a quarter of the default frame, whose cells would be specks at the window's size).
    fields = {f.name: getattr(optics, f.name) for f in dataclasses.fields(optics)}
    stage, camera = simulated_microscope(**{**fields, "width": 960, "height": 600}, time_scale=0)
    result = focus(stage, camera, 10.0, 14.0, 0.05, blur=blur)
    path = folder / "show_images.png"
    cv2.imwrite(str(path), final_view(camera.capture(), result.best_mm, result, blur=blur,
                                      positions=plan_positions(10.0, 14.0, 0.05)), [cv2.IMWRITE_PNG_COMPRESSION, 9])
    written.append(path)
    return written


###############################################################################
# Python API ##################################################################
###############################################################################
# For scripts that already hold a stage and a camera (a tiling loop, a notebook):
#
#     stage, camera = autofocus.simulated_microscope(focus_mm=12.34, start_mm=12.3)
#     result = autofocus.focus(stage, camera, 12.0, 12.7, 0.01)
#
# The command line runs through focus() as well: one path for the checks, the search, the
# verdict, the final move and the fault handling.  focus()'s keywords are named like the
# command-line options (``--settle-ms`` is ``settle_ms``); the CLI passes every option that has
# a keyword of the same name (``focus_keywords``), so a new keyword and its option join in one step.

plan_log = logging.getLogger("autofocus.plan")  # the header line: what will be searched (absolute mm)


def _is_number(value: Any) -> bool:
    """A finite real number (not a bool)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_request(start_mm: float, end_mm: float, step_mm: float, *, search: str = "sweep",
                  metric: str | None = "laplacian", blur: int = DEFAULT_BLUR, roi: Sequence[int] | None = None,
                  settle_ms: float = 0.0, backlash_mm: float = 0.0, z_min: float | None = None,
                  z_max: float | None = None, allow_many: bool = False, peak: str = "sharpest",
                  **_others: Any) -> None:
    """Everything about a request that can be checked before anything moves; UsageError (one
    line) otherwise.  The CLI runs it before opening the hardware, focus() on every call."""
    for name, value in (("START", start_mm), ("END", end_mm), ("STEP", step_mm)):
        if not _is_number(value):
            raise UsageError(f"{name} {value!r} is not a finite number of mm")
        if abs(value) > MAX_ABS_POSITION_MM:
            raise UsageError(f"{name} {value!r} mm is out of range: must be within +-{MAX_ABS_POSITION_MM:g} mm")
    if not step_mm > 0:
        raise UsageError(f"STEP {step_mm!r} must be greater than 0")
    if step_mm < MIN_STEP_MM:
        raise UsageError(f"STEP {step_mm!r} mm is below {MIN_STEP_MM:g} mm (1 nm), finer than any stage moves")
    span = abs(end_mm - start_mm)
    if span == 0:
        raise UsageError("START equals END: nothing to search; give a range of at least one STEP")
    if step_mm > span + 1e-12:
        raise UsageError(f"STEP {step_mm:g} mm is larger than the range {span:g} mm; use a smaller STEP")
    whole_steps = math.floor(span / step_mm + 1e-9)
    n = whole_steps + 1 + (abs(whole_steps * step_mm - span) > 1e-9)
    if n > MAX_POSITIONS_ALLOWED:
        raise UsageError(f"{n:,} positions (range {span:g} mm / STEP {step_mm:g} mm) is more than {MAX_POSITIONS_ALLOWED:,}, "
                         "even with --allow-many; check the units (mm) or split the range")
    if n > MAX_POSITIONS and not allow_many:
        raise UsageError(f"{n:,} positions (range {span:g} mm / STEP {step_mm:g} mm) is more than "
                         f"{MAX_POSITIONS:,}: check the units (mm), or confirm with --allow-many")
    if search not in SEARCHES:
        raise UsageError(f"search {search!r} is unknown; choose one of {', '.join(SEARCHES)}")
    if peak not in PEAK_CHOICES:
        raise UsageError(f"peak {peak!r} is unknown; choose one of {', '.join(PEAK_CHOICES)}")
    if peak != "sharpest" and search != "sweep":
        raise UsageError(f"--peak {peak} compares every peak of the curve, which only a sweep measures: "
                         "use --search sweep (the default)")
    if metric is not None and metric not in METRICS:
        raise UsageError(f"metric {metric!r} is unknown; choose one of {', '.join(METRICS)}")
    if not (isinstance(blur, numbers.Integral) and 3 <= blur <= MAX_BLUR and blur % 2 == 1):
        raise UsageError(f"blur {blur!r} must be an odd whole number of pixels from 3 to {MAX_BLUR} (e.g. 5, 9, 15)")
    for name, value, most in (("settle_ms", settle_ms, MAX_SETTLE_MS), ("backlash_mm", backlash_mm, MAX_BACKLASH_MM)):
        if not (_is_number(value) and 0 <= value <= most):
            raise UsageError(f"{name} {value!r} must be a number from 0 to {most:g}")
    for name, value in (("z_min", z_min), ("z_max", z_max)):
        if value is not None and not (_is_number(value) and abs(value) <= MAX_ABS_POSITION_MM):
            raise UsageError(f"{name} {value!r} must be a number of mm within +-{MAX_ABS_POSITION_MM:g} (or None)")
    if z_min is not None and z_max is not None and z_min >= z_max:
        raise UsageError(f"--z-min {z_min:g} must be below --z-max {z_max:g}")
    if roi is not None:
        if not (isinstance(roi, Sequence) and len(roi) == 4 and
                all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in roi)):
            raise UsageError(f"roi {roi!r} must be (x, y, width, height) in whole camera pixels")
        if roi[0] < 0 or roi[1] < 0 or roi[2] < MIN_ROI_PX or roi[3] < MIN_ROI_PX:
            raise UsageError(f"ROI {','.join(map(str, roi))}: X and Y must be 0 or more, and W and H at least "
                             f"{MIN_ROI_PX} pixels (the region must not be empty)")


def focus(stage: Stage, camera: Camera, start_mm: float, end_mm: float, step_mm: float, *,
          search: str = "sweep", metric: str | None = None, blur: int = DEFAULT_BLUR,
          roi: Sequence[int] | None = None, settle_ms: float = 0.0, backlash_mm: float = 0.0,
          z_min: float | None = None, z_max: float | None = None, relative: bool = False,
          home: bool | None = None, peak: str = "sharpest", transparent: bool = False, allow_many: bool = False,
          on_frame: FrameHook | None = None) -> FocusResult:
    """Find the sharpest focus between START and END every STEP (mm) and send the stage there.

    Exactly what ``python autofocus.py START END STEP ...`` does, on a stage and a camera the
    caller holds (nothing is opened or closed here):

    1. checks the request (``check_request``) and the plan against the stage's travel limits
       and the soft limits ``z_min``/``z_max``, backlash overshoot included (UsageError,
       nothing moved); ``relative=True`` reads the stage's position and makes START and END
       offsets from it (an axis without a reference position is refused);
    2. homes a Zaber axis that has no reference position (announced, as the CLI does; home it
       yourself to choose when).  Homing drives to the home sensor through positions ``z_min``/
       ``z_max`` may forbid, so with a soft limit it needs ``home=True``; ``home=False`` never
       homes (UsageError, nothing moved);
    3. searches (``search``: "sweep" or "fast"), scoring ``roi=(x, y, w, h)`` (camera pixels;
       checked against the first frame) or the whole frame with ``metric`` and ``blur``;
    4. judges the curve: ``focused`` or ``edge`` sends the stage to the best position;
       ``no_peak`` sends it back to where it started.  The verdict is in ``result.verdict.kind``
       (``result.exit_code`` is the CLI's exit code for it), never an exception.

    ``transparent=True`` (``--transparent``) focuses an unstained specimen at its contrast
    minimum: ``metric`` defaults to "normvar" then, and the curve holds -score.
    ``peak`` ("sharpest", "lowest", "highest", "nearest": ``--peak``) chooses among several
    significant peaks (dust above the specimen, two layers); ``result.peaks`` and
    ``result.dips`` list every significant one.
    ``on_frame(index, z_mm, frame, score)`` is called for every frame (from the scoring thread).
    A fault (stage, camera, a bad ROI, Ctrl-C, or an exception from your own Stage/Camera)
    stops the axis, returns it to where it started when it still answers, and re-raises the
    error with ``partial`` (a FocusResult of the frames scored so far) and ``stage_state`` (where
    the stage was left) attached.  The tool's own errors are AutofocusError subclasses:
    UsageError, StageError, CameraError, OutputError.
    """
    metric = metric or ("normvar" if transparent else "laplacian")
    check_request(start_mm, end_mm, step_mm, search=search, metric=metric, blur=blur, roi=roi,
                  settle_ms=settle_ms, backlash_mm=backlash_mm, z_min=z_min, z_max=z_max, allow_many=allow_many,
                  peak=peak)
    box: Roi | None = None if roi is None else (int(roi[0]), int(roi[1]), int(roi[2]), int(roi[3]))
    if isinstance(stage, ZaberStage):
        stage.soft_limits_mm = (z_min, z_max)
        unit_mm = stage.native_unit_mm
        if step_mm < MIN_STEP_NATIVE * unit_mm * (1 - 1e-9):
            raise UsageError(f"STEP {step_mm:g} mm is {step_mm / unit_mm:.3g} native units of this stage (one unit is "
                             f"{unit_mm * 1e6:.4g} nm); a STEP must be at least {MIN_STEP_NATIVE} units, "
                             f"{MIN_STEP_NATIVE * unit_mm:.4g} mm")
    origin_mm = 0.0
    if relative:
        if getattr(stage, "homed", True) is False:
            raise UsageError("--relative: the axis has no reference position, so where it is now means nothing; "
                             "home it first (or give absolute START and END)")
        origin_mm = stage.position_mm()
    plan = Plan(tuple(plan_positions(start_mm + origin_mm, end_mm + origin_mm, step_mm)), search, backlash_mm,
                settle_ms, peak)
    check_plan(plan, stage.limits_mm(), (z_min, z_max))
    home_if_needed = getattr(stage, "home_if_needed", None)
    if home_if_needed is not None and getattr(stage, "homed", True) is False:
        axis = f"device {stage.device_number} axis {stage.axis_number}" if isinstance(stage, ZaberStage) \
            else "the focus axis"
        check_home_consent(home, z_min, z_max, axis)
        home_if_needed()
        check_plan(plan, stage.limits_mm(), (z_min, z_max))
    first, last = plan.positions[0], plan.positions[-1]
    plan_log.info("searching %.4f..%.4f mm every %g mm%s: %d positions, %s search, %s score%s",
                  first, last, step_mm,
                  f" ({start_mm:+g}..{end_mm:+g} mm from {origin_mm:.4f} mm)" if relative else "",
                  len(plan.positions), search, metric,
                  f", ROI {','.join(map(str, box))}" if box else "")
    try:
        return run_autofocus(stage, camera, Scorer(metric, blur, box, invert=transparent), plan, on_frame=on_frame)
    except RunFailed as failed:
        stopped = failed
    finally:
        if isinstance(stage, ZaberStage):
            stage.soft_limits_mm = (None, None)  # this call's limits; a later move_to is the caller's
    # Raised here, outside the handler, so that the error keeps its own cause and traceback.
    with INTERRUPTS.held():
        error = stopped.cause
        with contextlib.suppress(AttributeError, TypeError):  # an exception class with __slots__
            error.partial, error.stage_state = stopped.partial, stopped.where  # type: ignore[union-attr]
        raise error


def simulated_microscope(**options: Any) -> tuple[SimStage, SimCamera]:
    """A simulated focus stage and camera, to try ``focus()`` without hardware.

    Keywords: every ``SimOptics`` field (``focus_mm``, ``photons``, ``seed``, ``width``,
    ``height``, ``read_noise_e``, ``bit_depth``, ``specimen``, ``right_specimen``,
    ``right_focus_mm``, ``magnification``, ``na``, ...); ``time_scale`` (1, the default: real
    hardware timing; 0: no waiting) and every other ``SimTiming`` field (``exposure_s``,
    ``readout_s``, ...); ``start_mm`` (where the stage starts, default 0), ``travel_mm``
    (default (0, 25)), ``objective`` (a name of OBJECTIVES: "4x", "10x", "20x", "40x", "60x",
    "60x-oil"; sets magnification, na and immersion_index), ``one_shot`` (an acquisition
    start/stop per frame) and ``camera_roi``
    ((x, y, w, h): the sensor region read out, as ``--camera-roi``).
    """
    optics_names = {f.name for f in dataclasses.fields(SimOptics)}
    timing_names = {f.name for f in dataclasses.fields(SimTiming)} - {"scale"}
    stage_names = {"time_scale", "start_mm", "travel_mm", "one_shot", "camera_roi", "objective"}
    unknown = sorted(set(options) - optics_names - timing_names - stage_names)
    if unknown:
        raise UsageError(f"simulated_microscope: unknown option {', '.join(unknown)}; choose from "
                         f"{', '.join(sorted(optics_names | timing_names | stage_names))}")
    for name in ("specimen", "right_specimen"):
        if options.get(name) not in (None, *SIM_SPECIMENS):
            raise UsageError(f"simulated_microscope: {name}={options[name]!r}; choose {', '.join(SIM_SPECIMENS)}")
    lens = objective_optics(options["objective"]) if options.get("objective") is not None else {}
    optics = SimOptics(**{**lens, **{k: v for k, v in options.items() if k in optics_names}})
    if not (16 <= optics.width <= 10000 and 16 <= optics.height <= 10000
            and optics.width * optics.height <= MAX_SIM_PIXELS):
        raise UsageError(f"simulated_microscope: width and height must be 16 to 10000 pixels, at most "
                         f"{MAX_SIM_PIXELS / 1e6:g} MP in all")
    if not (_is_number(optics.photons) and 0 < optics.photons <= MAX_SIM_PHOTONS):
        raise UsageError(f"simulated_microscope: photons {optics.photons!r} must be above 0 and at most "
                         f"{MAX_SIM_PHOTONS:g}")
    if not (isinstance(optics.seed, numbers.Integral) and 0 <= optics.seed < 2**32):
        raise UsageError(f"simulated_microscope: seed {optics.seed!r} must be a whole number from 0 to {2**32 - 1}")
    scale = options.get("time_scale", 1.0)
    if not (_is_number(scale) and 0 <= scale <= MAX_SIM_TIME_SCALE):
        raise UsageError(f"simulated_microscope: time_scale {scale!r} must be from 0 to {MAX_SIM_TIME_SCALE:g}")
    if optics.bit_depth not in (8, 12, 16):
        raise UsageError(f"simulated_microscope: bit_depth {optics.bit_depth!r}; choose 8, 12 or 16")
    travel = tuple(options.get("travel_mm", (0.0, 25.0)))
    for name in ("focus_mm", "right_focus_mm", "start_mm"):
        value = options.get(name)
        if value is not None and not (_is_number(value) and abs(value) <= MAX_ABS_POSITION_MM):
            raise UsageError(f"simulated_microscope: {name} {value!r} must be a number of mm within "
                             f"+-{MAX_ABS_POSITION_MM:g}")
    start = options.get("start_mm", 0.0)
    if not (len(travel) == 2 and _is_number(travel[0]) and _is_number(travel[1]) and travel[0] < travel[1]
            and travel[0] <= start <= travel[1]):
        raise UsageError(f"simulated_microscope: the stage must start inside its travel: start_mm {start!r} "
                         f"is outside {travel!r} (--sim-start-mm)")
    timing = SimTiming(scale=options.get("time_scale", 1.0), **{k: v for k, v in options.items() if k in timing_names})
    clock = SimClock(timing.scale)
    stage = SimStage(travel_mm=tuple(options.get("travel_mm", (0.0, 25.0))),  # type: ignore[arg-type]
                     position_mm=options.get("start_mm", 0.0), timing=timing, clock=clock)
    camera_roi = options.get("camera_roi")
    return stage, SimCamera(stage, optics, timing, clock, one_shot=options.get("one_shot", False),
                            roi=None if camera_roi is None else tuple(camera_roi))  # type: ignore[arg-type]


###############################################################################
# Command line ################################################################
###############################################################################


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit code 2, and a negative number in
    any form (-1e-3, -.5, -inf) is a value, not an option."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(
            r"^-(\d+\.?\d*(e[+-]?\d+)?|\.\d+(e[+-]?\d+)?|inf|infinity|nan)$", re.I)

    def error(self, message: str) -> Any:  # type: ignore[override]
        """One line on stderr, exit code 2."""
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def finite_float(text: str) -> float:
    """A finite number (rejects nan, inf and words)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive_float(text: str) -> float:
    """A finite number above 0."""
    value = finite_float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be greater than 0")
    return value


def non_negative_float(text: str) -> float:
    """A finite number, 0 or more."""
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must not be negative")
    return value


def bounded(lo: float, hi: float, unit: str = "", *, integer: bool = False,
            above: bool = False) -> Callable[[str], Any]:
    """An argparse type: a finite number (whole with ``integer``) from lo to hi (above lo with
    ``above``); outside, one line naming the range."""

    def parse(text: str) -> Any:
        value = whole_number(text) if integer else finite_float(text)
        if value > hi or value < lo or (above and value == lo):
            low, high = (f"{int(lo)}", f"{int(hi)}") if integer else (f"{lo:g}", f"{hi:g}")
            span = f"above {low}" if above else f"from {low}"
            raise argparse.ArgumentTypeError(f"{text} is out of range: must be {span} to {high}{unit}")
        return value

    parse.__name__ = "number"
    return parse


def whole_number(text: str) -> int:
    """An integer."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def blur_size(text: str) -> int:
    """The bilateral filter diameter: an odd integer from 3 to MAX_BLUR."""
    value = whole_number(text)
    if value < 3 or value % 2 == 0 or value > MAX_BLUR:
        raise argparse.ArgumentTypeError(f"{value} must be odd, from 3 to {MAX_BLUR} (e.g. 5, 9, 15)")
    return value


def positive_int(text: str) -> int:
    """An integer, 1 or more."""
    value = whole_number(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be 1 or more")
    return value


def frame_size(text: str) -> tuple[int, int]:
    """WIDTHxHEIGHT in pixels, e.g. 1920x1200."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not WIDTHxHEIGHT, e.g. 1920x1200") from None
    if not (16 <= w <= 10000 and 16 <= h <= 10000) or w * h > MAX_SIM_PIXELS:
        raise argparse.ArgumentTypeError(f"{text!r}: width and height must be 16 to 10000 pixels, "
                                         f"at most {MAX_SIM_PIXELS / 1e6:g} MP in all")
    return w, h


def path_text(text: str) -> str:
    """A file or folder path: not empty (an empty path would silently write nothing)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty path; give a file or folder name")
    return text


def pixel_roi(text: str) -> Roi:
    """X,Y,W,H in camera pixels, e.g. 640,400,640,400 (a region of a 1920x1200 sensor)."""
    try:
        x, y, w, h = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not X,Y,W,H in camera pixels, e.g. 640,400,640,400") from None
    if x < 0 or y < 0 or w < 1 or h < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: X and Y must be 0 or more, W and H 1 or more")
    return x, y, w, h


def roi_box(text: str) -> Roi:
    """X,Y,W,H in camera pixels: the region of interest (checked against the frame size later)."""
    try:
        x, y, w, h = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not X,Y,W,H in whole pixels, e.g. 800,400,320,240") from None
    if x < 0 or y < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: X and Y (the top-left corner) must be 0 or more")
    if w < MIN_ROI_PX or h < MIN_ROI_PX:
        raise argparse.ArgumentTypeError(f"{text!r}: the region is {'empty' if w < 1 or h < 1 else 'too small'}; "
                                         f"W and H must be at least {MIN_ROI_PX} pixels")
    return x, y, w, h


def build_parser() -> argparse.ArgumentParser:
    """The command line: positionals as on the card, options in groups."""
    p = OneLineParser(
        prog="autofocus.py",
        usage="%(prog)s START_MM END_MM STEP_MM [PORT] [options]",
        description="Find the sharpest focus position of a motorized microscope and move there.",
        epilog="exit codes: 0 focused, 2 usage error, 3 no peak (stage back at start), 4 best at the edge of "
               "the range, 5 hardware error, 130 interrupted (Ctrl-C, or q in the --show-images window).  "
               "Example: python autofocus.py 10 14 0.05 COM3",
    )
    p.add_argument("start_mm", metavar="START_MM", type=bounded(-MAX_ABS_POSITION_MM, MAX_ABS_POSITION_MM, " mm"), nargs="?",
                   help="first focus position, mm")
    p.add_argument("end_mm", metavar="END_MM", type=bounded(-MAX_ABS_POSITION_MM, MAX_ABS_POSITION_MM, " mm"), nargs="?", help="last focus position, mm (below START sweeps downward)")
    p.add_argument("step_mm", metavar="STEP_MM", type=bounded(MIN_STEP_MM, 2 * MAX_ABS_POSITION_MM, " mm"), nargs="?",
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
    src.add_argument("--device", metavar="N", type=bounded(1, 99, integer=True), default=DEFAULT_DEVICE,
                     help="Zaber device number of the focus stage (default 3: Zaber MVR)")
    src.add_argument("--axis", metavar="N", type=bounded(1, 99, integer=True), default=DEFAULT_AXIS, help="axis number (default 1)")
    src.add_argument("--device-db", metavar="FILE", help="Zaber's offline device database file, for offline PCs")
    src.add_argument("--native-unit-nm", type=bounded(0, 1e6, " nm", above=True), metavar="NM",
                     help="size of one native unit of the axis in nm: skips identification (offline PCs)")
    src.add_argument("--move-timeout-s", metavar="S", type=bounded(0, MAX_TIMEOUT_S, " s", above=True), default=DEFAULT_MOVE_TIMEOUT_S,
                     help=f"give up on a move after this long and stop it (default {DEFAULT_MOVE_TIMEOUT_S:g})")
    src.add_argument("--home-timeout-s", metavar="S", type=bounded(0, MAX_TIMEOUT_S, " s", above=True), default=DEFAULT_HOME_TIMEOUT_S,
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
    src.add_argument("--exposure-ms", metavar="MS", type=bounded(0, MAX_EXPOSURE_MS, " ms", above=True),
                     help="exposure time of the FLIR or Basler camera (default: the camera's setting)")
    src.add_argument("--camera-timeout-ms", metavar="MS", type=bounded(1, MAX_CAMERA_TIMEOUT_MS, " ms", integer=True),
                     default=DEFAULT_CAMERA_TIMEOUT_MS,
                     help=f"give up waiting for a frame after this long (default {DEFAULT_CAMERA_TIMEOUT_MS}; never "
                          f"less than the exposure + {CAMERA_TIMEOUT_MARGIN_MS} ms)")
    src.add_argument("--camera-roi", metavar="X,Y,W,H", type=pixel_roi,
                     help="read only this region of the sensor (camera pixels): the FLIR or Basler camera's own "
                          "ROI, rounded to its increments and restored afterwards (a faster read-out); the simulated camera "
                          "crops its frame")
    srch = p.add_argument_group("search")
    srch.add_argument("--search", choices=tuple(SEARCHES), default="sweep",
                      help="sweep: every position (default); fast: coarse-to-fine, about a fifth of the frames "
                           "when there is a focus in the range (a blank field costs a sweep)")
    srch.add_argument("--metric", choices=tuple(METRICS), default=None,
                      help="focus score (default laplacian: variance of the Laplacian; normvar with --transparent)")
    srch.add_argument("--transparent", action="store_true",
                      help="an unstained (transparent) specimen in brightfield: live cells, yeast, bacteria. Its "
                           "contrast vanishes at focus and grows on either side, so focus on the contrast minimum "
                           "(scored by normvar unless --metric says otherwise)")
    srch.add_argument("--blur", "-b", metavar="N", type=blur_size, default=DEFAULT_BLUR,
                      help="bilateral filter diameter in pixels, odd, 3-99 (default 9); larger suppresses more noise")
    srch.add_argument("--settle-ms", metavar="MS", type=bounded(0, MAX_SETTLE_MS, " ms"), default=0.0,
                      help="wait after each move before exposing (default 0; raise at high magnification)")
    srch.add_argument("--backlash-mm", metavar="MM", type=bounded(0, MAX_BACKLASH_MM, " mm"), default=0.0,
                      help="approach every position from the sweep's direction, overshooting by this much "
                           "(default 0: direct-drive stages like the MVR's X-LDA; ~0.01-0.05 for leadscrews)")
    srch.add_argument("--z-min", metavar="MM", type=bounded(-MAX_ABS_POSITION_MM, MAX_ABS_POSITION_MM, " mm"), help="soft limit: never command a position below this (mm)")
    srch.add_argument("--z-max", metavar="MM", type=bounded(-MAX_ABS_POSITION_MM, MAX_ABS_POSITION_MM, " mm"), help="soft limit: never command a position above this (mm)")
    srch.add_argument("--relative", action="store_true",
                      help="START and END are offsets from where the stage is now (e.g. -0.1 0.1 0.01: +-0.1 mm "
                           "around the current focus); limits apply to the absolute positions")
    srch.add_argument("--roi", metavar="X,Y,W,H", type=roi_box,
                      help="score only this region of the frame (camera pixels: left, top, width, height); "
                           "with --replay, the ROI saved with the stack is the default")
    srch.add_argument("--peak", choices=PEAK_CHOICES, default="sharpest",
                      help="with several significant peaks (dust on the coverslip ~0.17 mm above the cells, two "
                           "layers): sharpest (default), lowest or highest z (which is nearer the slide depends "
                           "on which way your focus axis points: on an inverted stand higher z usually moves the "
                           "objective up, toward the specimen), or nearest where the stage started; sweep only")
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
                     help="save every frame (PNG) and DIR/stack.csv (replayable); not the --replay folder")
    out.add_argument("--save-curve", metavar="FILE", type=path_text, help="save the focus curve as CSV (index,z_mm,score)")
    out.add_argument("--plot", metavar="FILE", type=path_text,
                     help="save a plot of the focus curve; the extension picks the format (.png, .pdf, .svg, ...)")
    out.add_argument("--make-figures", metavar="DIR",
                     help="write the README's figures (from the simulator) to DIR and exit")
    sim = p.add_argument_group("simulated microscope")
    sim.add_argument("--sim-focus-mm", metavar="MM", type=bounded(-MAX_ABS_POSITION_MM, MAX_ABS_POSITION_MM, " mm"), default=SimOptics.focus_mm,
                     help=f"focal plane of the simulated specimen (default {SimOptics.focus_mm})")
    sim.add_argument("--sim-photons", metavar="N", type=bounded(0, MAX_SIM_PHOTONS, above=True), default=SimOptics.photons,
                     help=f"photons per pixel at the brightest structure (default {SimOptics.photons:g}); "
                          "lower is noisier")
    sim.add_argument("--sim-read-noise-e", metavar="E", type=bounded(0, 1000, " e"), default=SimOptics.read_noise_e,
                     help=f"camera read noise, electrons (default {SimOptics.read_noise_e:g})")
    sim.add_argument("--sim-objective", choices=tuple(OBJECTIVES), default="4x",
                     help="the simulated objective (magnification/NA): 4x/0.10 (default), 10x/0.25, 20x/0.40, "
                          "40x/0.65, 60x/0.85, 60x-oil/1.40; use a STEP of about one depth of field "
                          "(0.05, 0.01, 0.004, 0.0015, 0.001, 0.0005 mm)")
    sim.add_argument("--sim-specimen", choices=SIM_SPECIMENS, default="cells",
                     help="cells (default); blank: an empty field with nothing to focus on; dusty: the cells plus "
                          "dust on the coverslip --sim-dust-height-mm above them (two peaks); transparent: "
                          "unstained cells in brightfield (contrast vanishes at focus: use --transparent)")
    sim.add_argument("--sim-phase-rad", metavar="RAD", type=bounded(0, 20, " rad"), default=SimOptics.phase_rad,
                     help=f"transparent: phase delay through a cell (default {SimOptics.phase_rad})")
    sim.add_argument("--sim-condenser-na", metavar="NA", type=bounded(0, 1.4, above=True),
                     default=SimOptics.condenser_na,
                     help=f"transparent: condenser aperture, NA (default {SimOptics.condenser_na}; at most the "
                          "objective's counts)")
    sim.add_argument("--sim-dust-height-mm", metavar="MM", type=bounded(-5, 5, " mm"),
                     default=SimOptics.dust_height_mm,
                     help=f"dusty: the dust plane's height above the cells (default {SimOptics.dust_height_mm})")
    sim.add_argument("--sim-right-specimen", choices=SIM_SPECIMENS,
                     help="the right half of the field shows this specimen (a two-region field, e.g. for --roi)")
    sim.add_argument("--sim-right-focus-mm", metavar="MM", type=bounded(-MAX_ABS_POSITION_MM, MAX_ABS_POSITION_MM, " mm"),
                     help="the right half of the field is in focus at this position (a two-plane field)")
    sim.add_argument("--sim-size", type=frame_size, default=(SimOptics.width, SimOptics.height),
                     metavar="WxH", help="simulated frame size (default 1920x1200)")
    sim.add_argument("--sim-bits", metavar="BITS", type=int, choices=(8, 12, 16), default=8, help="simulated pixel depth")
    sim.add_argument("--sim-start-mm", metavar="MM", type=bounded(-MAX_ABS_POSITION_MM, MAX_ABS_POSITION_MM, " mm"), default=0.0,
                     help="where the simulated stage starts (default 0)")
    sim.add_argument("--sim-time-scale", metavar="X", type=bounded(0, MAX_SIM_TIME_SCALE), default=1.0,
                     help="1 = real hardware timing (default), 0 = as fast as possible")
    sim.add_argument("--sim-seed", metavar="N", type=bounded(0, 2**32 - 1, integer=True), default=0, help="seed of the specimen and noise")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def validate(args: argparse.Namespace) -> None:
    """Checks that need more than one argument; each failure is one line and exit 2."""
    if args.make_figures:
        return
    if args.step_mm is None:
        raise UsageError("START, END and STEP (mm) are required, e.g. autofocus.py 10 14 0.05 COM3")
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
    check_request(args.start_mm, args.end_mm, args.step_mm, **focus_keywords(args))
    if args.device_db and not Path(args.device_db).is_file():
        raise UsageError(f"--device-db {args.device_db}: no such file; download Zaber's offline device database "
                         "or use --native-unit-nm")
    if args.hold_window and not args.show_images:
        raise UsageError("--hold-window keeps the --show-images window open at the end: add --show-images")
    if args.show_images and (problem := display_problem()):
        raise UsageError(f"--show-images needs a display and none is available ({problem}); "
                         "use --save-images DIR to keep the frames, or --plot FILE for the curve")


def plot_formats() -> set[str]:
    """The file extensions matplotlib can save a figure as (png, pdf, svg, ...)."""
    from matplotlib.backend_bases import FigureCanvasBase  # noqa: PLC0415 - only for --plot

    return set(FigureCanvasBase.get_supported_filetypes())


def _not_a_file(path: Path) -> str | None:
    """Why ``path`` cannot be a regular output file: a device, a pipe, a Windows reserved name."""
    if os.name == "nt" and path.name.split(".")[0].upper() in WINDOWS_RESERVED_NAMES:
        return f"{path.name} is a Windows device name"
    if path.exists() and not path.is_file() and not path.is_dir():  # /dev/full, /dev/null, a FIFO
        return "it is a device or a pipe, not a file"
    return None


def check_outputs(args: argparse.Namespace) -> None:
    """Fail before anything moves (homing included) when an output cannot be written as given.

    Each file output must be a writable file path (not a folder, a device or another output's
    path); --plot needs an extension matplotlib writes; --save-images must be a folder that does
    not hold the stack being replayed; exactly the paths given are written."""
    files = [(flag, Path(value)) for flag, value in (("--save-curve", args.save_curve), ("--plot", args.plot))
             if value is not None]
    taken: dict[str, str] = {}

    def key_of(path: Path) -> str:  # one spelling per file: case-insensitive where the OS is
        return os.path.normcase(str(path.resolve()))

    if args.save_images is not None:
        folder = Path(args.save_images)
        if problem := _not_a_file(folder):
            raise UsageError(f"--save-images {folder}: {problem}; give a folder")
        if folder.exists() and not folder.is_dir():
            raise UsageError(f"--save-images {folder}: is a file, not a folder; pick another name")
        if args.replay and folder.resolve() == Path(args.replay).resolve():
            raise UsageError(f"--save-images {folder} is the stack being replayed: it would overwrite the "
                             "recording; save into another folder")
        for name in ("stack.csv", ROI_FILE):
            inside = folder / name
            if inside.exists() and not inside.is_file():
                raise UsageError(f"--save-images {folder}: {inside} is a folder; remove it or pick another folder")
            taken[key_of(inside)] = f"--save-images's {name}"
    for flag, path in files:
        if problem := _not_a_file(path):
            raise UsageError(f"{flag} {path}: {problem}; give a file name")
        if path.is_dir():
            raise UsageError(f"{flag} {path} is a folder; give a file name inside it, e.g. {path / 'curve.csv'}")
        key = key_of(path)
        images = None if args.save_images is None else key_of(Path(args.save_images))
        in_images = images is not None and key_of(path.parent) == images
        if key in taken or (in_images and re.fullmatch(r"frame_\d{5}\.png", path.name.lower())):
            raise UsageError(f"{flag} {path} is also written as {taken.get(key, '--save-images frames')}; "
                             "give each output its own path")
        if args.replay and key.parent == Path(args.replay).resolve() and path.exists():
            raise UsageError(f"{flag} {path} is a file of the stack being replayed; write elsewhere")
        taken[key] = flag
        parent = path.resolve().parent
        if in_images:
            continue  # the --save-images folder: created below, checked there
        if not parent.is_dir():
            raise UsageError(f"{flag} {path}: folder {parent} does not exist; create it or pick another path")
        if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
            raise UsageError(f"{flag} {path}: cannot write there; pick another path")
    if args.plot is not None:
        ext = Path(args.plot).suffix.lower().lstrip(".")
        formats = plot_formats()
        if ext not in formats:
            what = "has no extension" if not ext else f".{ext} is not a format matplotlib writes"
            raise UsageError(f"--plot {args.plot}: {what}; end the name with one of "
                             f"{', '.join('.' + f for f in sorted(formats))} (e.g. curve.png)")
    if args.save_images is not None:
        folder = Path(args.save_images)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"--save-images {folder}: cannot create the folder ({exc.strerror})") from exc
        if not os.access(folder, os.W_OK):
            raise UsageError(f"--save-images {folder}: cannot write there; pick another folder")


def focus_keywords(args: argparse.Namespace) -> dict[str, Any]:
    """focus()'s keywords from the command line: each one that has an option of the same name."""
    return {name: getattr(args, name) for name in (focus.__kwdefaults__ or {}) if hasattr(args, name)}


def sim_options(args: argparse.Namespace) -> dict[str, Any]:
    """simulated_microscope()'s keywords from the --sim-* options."""
    return dict(focus_mm=args.sim_focus_mm, photons=args.sim_photons, read_noise_e=args.sim_read_noise_e,
                specimen=args.sim_specimen, right_specimen=args.sim_right_specimen,
                right_focus_mm=args.sim_right_focus_mm, width=args.sim_size[0], height=args.sim_size[1],
                bit_depth=args.sim_bits, seed=args.sim_seed, time_scale=args.sim_time_scale,
                start_mm=args.sim_start_mm, camera_roi=args.camera_roi, objective=args.sim_objective,
                dust_height_mm=args.sim_dust_height_mm, phase_rad=args.sim_phase_rad,
                condenser_na=args.sim_condenser_na)


@contextlib.contextmanager
def open_microscope(args: argparse.Namespace) -> Iterator[tuple[Stage, Camera]]:
    """The stage and camera the arguments ask for; closes them afterwards."""
    if args.replay:
        stack = ReplayStack(args.replay)
        lo, hi = stack.range_mm
        # (--relative: offsets; the plan check against the stage's travel, the stack's range, says it)
        for name, z in () if args.relative else (("START", args.start_mm), ("END", args.end_mm)):
            if not lo - 1e-9 <= z <= hi + 1e-9:
                raise UsageError(f"{name} {z!r} mm is outside the replay stack's range {lo!r}..{hi!r} mm")
        stage: Any = SimStage(travel_mm=(lo, hi), position_mm=lo, timing=SimTiming(scale=0.0))
        yield stage, ReplayCamera(stage, stack)
        return
    if args.simulate:
        yield simulated_microscope(**sim_options(args))
        return
    zaber = ZaberStage(args.port, args.device, args.axis, native_unit_nm=args.native_unit_nm,
                       device_db=args.device_db, move_timeout_s=args.move_timeout_s,
                       home_timeout_s=args.home_timeout_s, clear_faults=args.clear_faults)
    camera: Any = None
    try:
        if args.camera == "sim":  # the simulated camera shows what the real stage's position would
            _, sim = simulated_microscope(**sim_options(args))
            camera = SimCamera(zaber, sim.optics, sim.timing, sim.clock, roi=args.camera_roi)
        else:
            camera = LIVE_CAMERAS[args.camera or "flir"](args.camera_serial, exposure_ms=args.exposure_ms,
                                                         timeout_ms=args.camera_timeout_ms, roi=args.camera_roi)
        yield zaber, camera
    finally:
        with INTERRUPTS.held():  # a second Ctrl-C must not leave the camera half restored
            try:
                if camera is not None and hasattr(camera, "close"):
                    camera.close()
            finally:
                zaber.close()


def configure_logging(verbose: bool) -> None:
    """Log to stderr: every step with --verbose, else warnings only."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if verbose else logging.WARNING)
    log.propagate = False


def stage_header(info: dict[str, Any], port: str) -> str:
    """The run's header line for a Zaber stage: which stage, its travel, where the unit came from."""
    lo, hi = info["travel_mm"]
    name = f"{info['name']}, " if info.get("name") else ""
    return (f"stage: {name}device {info['device']} axis {info['axis']} on {port}: travel {lo:g}..{hi:g} mm "
            f"({hi - lo:g} mm; native unit {info['native_unit_nm']:g} nm from {info['units_from']})")


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


def curve_note(result: FocusResult, policy: str) -> str | None:
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
    head = {
        "focused": f"{at} at {result.best_mm:.4f} mm{fit}",
        "edge": f"best focus at the edge of the range, {result.best_mm:.4f} mm",
        "no_peak": f"no focus found; stage returned to {result.best_mm:.4f} mm",
    }[result.verdict.kind]
    if result.verdict.scale == "coarse" and result.verdict.kind == "focused":
        head += " (found at the coarse scale: fine detail is lost in noise)"
    line = (f"{head}: score {result.best_score:.4g}, {result.frames} frames, {result.moves} moves, "
            f"{result.elapsed_s:.2f} s ({result.search} search)")
    if result.verdict.kind != "focused":
        line += f"\n{result.verdict.reason}"
        if result.verdict.suggestion_mm:
            lo, hi = result.verdict.suggestion_mm
            line += f"; try the range {lo:g} {hi:g}"
    return line


def run(args: argparse.Namespace) -> int:
    """Open the microscope, run the autofocus, write the outputs; returns the exit code."""
    if args.make_figures:
        optics = SimOptics(seed=args.sim_seed, photons=args.sim_photons)
        for path in make_figures(args.make_figures, optics, args.blur):
            print(path)
        return EXIT_OK
    check_outputs(args)
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
        with open_microscope(args) as (stage, camera):
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
                        saver = ImageSaver(args.save_images, roi)
                    saver(index, z_mm, frame, score)
                if live is not None:
                    live.offer(index, z_mm, frame, score)
                if progress is not None:
                    progress.update(1)

            result = focus(stage, camera if live is None else LiveCamera(camera, live), args.start_mm, args.end_mm,
                           args.step_mm, **{**focus_keywords(args), "roi": roi, "on_frame": on_frame})
            if live is not None:
                live.refresh()
                if hold_window(args):
                    held = final_frame(camera, live, result)
            code = result.exit_code
    except BaseException as failed:  # noqa: BLE001 - only a run that had started is handled here
        with INTERRUPTS.held():  # a further Ctrl-C now must not lose what was measured
            origin = with_stage_state(failed)
            if origin is not None:
                result, where = getattr(origin, "partial", None), origin.stage_state  # type: ignore[attr-defined]
            elif result is not None and isinstance(failed, (KeyboardInterrupt, AutofocusError)):
                # The search had finished and the stage had been sent to its answer (closing the
                # camera or the live view was cut short): the run's result stands.
                where = f"the stage is at {result.best_mm:.4f} mm (the search had finished)"
            else:
                refused = True
                raise  # refused before anything moved: main() reports it
            if isinstance(failed, KeyboardInterrupt):
                code, error = interrupt_code(failed), interrupt_text(failed)
            elif isinstance(failed, AutofocusError):
                code, error = failed.exit_code, first_line(failed)
            else:
                code, error = EXIT_BUG, f"internal error {type(failed).__name__}: {first_line(failed)} (please " \
                                        "report it with the --verbose output)"
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


def with_stage_state(exc: BaseException) -> BaseException | None:
    """The exception, or one it was raised while handling, that says where the stage was left."""
    seen = 0
    while exc is not None and seen < 8:
        if getattr(exc, "stage_state", None) is not None:
            return exc
        exc, seen = exc.__context__, seen + 1  # type: ignore[assignment]
    return None


def report(args: argparse.Namespace, result: FocusResult | None, code: int, error: str | None, where: str | None,
           stage_info: dict[str, Any] | None, zaber: ZaberStage | None, roi: Roi | None) -> int:
    """The run's line(s), its output files and its JSON; returns the exit code."""
    try:
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
                    if note := curve_note(result, args.peak):
                        print(note, file=sys.stderr if args.json else sys.stdout)
        if stage_info is not None and zaber is not None:
            stage_info["homed_now"] = not stage_info["homed"] and zaber.homed
        if args.json:
            print(strict_json(result_json(result, exit_code=code, error=error, where=where, stage_info=stage_info,
                                         roi=roi, camera_roi=args.camera_roi)))
        sys.stdout.flush()
    except BrokenPipeError:  # stdout closed early (--json | head): nothing more to say there
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return code


def write_outputs(args: argparse.Namespace, result: FocusResult) -> str | None:
    """Write --save-curve and --plot; returns the first failure as one line (None: all written)."""
    for flag, path, write in (("--save-curve", args.save_curve, write_curve_csv),
                              ("--plot", args.plot, plot_curve)):
        if not path:
            continue
        try:
            write(path, result.samples if write is write_curve_csv else result)  # type: ignore[operator]
        except (OSError, ValueError) as exc:  # disk full, folder removed, a format matplotlib refuses
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else first_line(exc)
            return f"writing {flag} {path} failed ({reason}); the result is in the --json output and on screen"
    return None


def interrupt_code(exc: BaseException) -> int:
    """130 for Ctrl-C, 128 + N for signal N."""
    return exc.exit_code if isinstance(exc, Interrupted) else EXIT_INTERRUPTED


def interrupt_text(exc: BaseException) -> str:
    """"interrupted (Ctrl-C)", "terminated (SIGTERM)", ..."""
    return exc.describe() if isinstance(exc, Interrupted) else "interrupted (Ctrl-C)"


class InterruptSignals:
    """Ctrl-C and the termination signals as one exception, Interrupted, in the main thread.

    Installed by ``main()`` for the length of a run: SIGINT, SIGTERM, and where the platform has
    them SIGHUP (POSIX: the terminal or SSH session closed) and SIGBREAK (Windows: Ctrl-Break).
    Inside ``held()`` a signal is remembered in ``pending`` instead of raised, so that closing
    the stack and writing the outputs are never cut short.  Windows has no SIGTERM from outside
    (``taskkill /F`` cannot be caught) and closing the console window is not a signal Python
    can handle; use Ctrl-C or Ctrl-Break there.
    """

    NAMES = ("SIGINT", "SIGTERM", "SIGHUP", "SIGBREAK")

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


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, run, and turn every error into one line and an exit code."""
    parser = build_parser()
    try:
        args = parser.parse_intermixed_args(argv)  # options may stand between the positionals
    except SystemExit as exc:  # argparse: --help, --version, or a one-line usage error
        code = exc.code if isinstance(exc.code, int) else EXIT_USAGE
        if code and "--json" in (sys.argv[1:] if argv is None else argv):
            print(strict_json(result_json(None, exit_code=code, error="usage error (see stderr)")))
        return code
    configure_logging(args.verbose)
    with INTERRUPTS:
        try:
            validate(args)
            return run(args)
        except AutofocusError as exc:
            INTERRUPTS.finish()
            print(f"autofocus.py: {exc}", file=sys.stderr)
            if args.verbose:
                log.debug("traceback", exc_info=exc)
            if args.json:
                print(strict_json(result_json(None, exit_code=exc.exit_code, error=str(exc))))
            return exc.exit_code
        except KeyboardInterrupt as exc:
            INTERRUPTS.finish()
            print(f"autofocus.py: {interrupt_text(exc)} before the search started; nothing was measured, and any "
                  "motion (homing) was stopped", file=sys.stderr)
            if args.json:
                print(strict_json(result_json(None, exit_code=interrupt_code(exc), error=interrupt_text(exc))))
            return interrupt_code(exc)


if __name__ == "__main__":
    raise SystemExit(main())
