"""Every argument of the Python API is checked before anything moves.

focus() and its stage and camera: a value of the wrong type or out of its range is the tool's
UsageError (BadValue) and nothing moved or changed (the backends' own checks are in their files:
test_zaber, test_flir, test_basler, test_simulator).  Numbers from a stage (limits,
positions) are checked before use: a StageError.  Frames a camera delivers are checked before
they are scored: a CameraError.  One focus() at a time per stage and per camera.
"""
from __future__ import annotations

import math
import threading
from typing import Any

import numpy as np
import pytest

import autofocus
from conftest import FAST_SIM


class CountingStage(autofocus.SimStage):
    """A simulated stage at 12.3 mm that counts every call the run makes on it."""

    def __init__(self, limits: Any = (0.0, 25.0), position: Any = 12.3) -> None:
        super().__init__(position_mm=12.3, timing=autofocus.SimTiming(scale=0.0))
        self.reported_limits, self.reported_position = limits, position
        self.moves: list[float] = []

    def limits_mm(self) -> Any:
        return self.reported_limits

    def position_mm(self) -> Any:
        return self.reported_position if not self.moves else self.z

    def move_to(self, z_mm: float) -> None:
        self.moves.append(z_mm)
        super().move_to(z_mm)


class CountingCamera:
    """Renders the simulated optics (focus at 12.34 mm) at the stage's position, or ``frames``."""

    def __init__(self, stage: autofocus.Stage, frames: list[Any] | None = None) -> None:
        optics = autofocus.SimOptics(focus_mm=12.34, width=96, height=64)
        self.sim = autofocus.SimCamera(stage, optics, autofocus.SimTiming(scale=0.0))
        self.frames, self.captures = frames, 0

    def capture(self) -> Any:
        self.captures += 1
        if self.frames is not None:
            return self.frames[min(self.captures, len(self.frames)) - 1]
        return self.sim.capture()


# --- focus(): every argument, bad values, nothing moved -------------------------------------------

BAD_ARGUMENTS = [
    # (positional START, END, STEP), keywords, the keyword or argument the message names
    ((None, 12.7, 0.1), {}, "start_mm"), (("12", 12.7, 0.1), {}, "start_mm"), ((True, 12.7, 0.1), {}, "start_mm"),
    ((math.inf, 12.7, 0.1), {}, "start_mm"), (([12], 12.7, 0.1), {}, "start_mm"), ((10**400, 12.7, 0.1), {}, "start_mm"),
    ((12, math.nan, 0.1), {}, "end_mm"), ((12, -1e300, 0.1), {}, "end_mm"),
    ((12, 12.7, -0.1), {}, "step_mm"), ((12, 12.7, "0.1"), {}, "step_mm"), ((12, 12.7, False), {}, "step_mm"),
    ((12, 12.7, 0.1), {"search": "quick"}, "search"), ((12, 12.7, 0.1), {"search": None}, "search"),
    ((12, 12.7, 0.1), {"metric": "sobel"}, "metric"), ((12, 12.7, 0.1), {"metric": 3}, "metric"),
    ((12, 12.7, 0.1), {"blur": 9.0}, "blur"), ((12, 12.7, 0.1), {"blur": "9"}, "blur"),
    ((12, 12.7, 0.1), {"blur": True}, "blur"), ((12, 12.7, 0.1), {"blur": 101}, "blur"),
    ((12, 12.7, 0.1), {"blur": 10**400 + 1}, "blur"),  # no float holds it
    ((12, 12.7, 0.1), {"roi": "0,0,50,50"}, "roi"), ((12, 12.7, 0.1), {"roi": (0.5, 0, 50, 50)}, "roi"),
    ((12, 12.7, 0.1), {"roi": (True, 0, 50, 50)}, "roi"), ((12, 12.7, 0.1), {"roi": (0, 0, 50, 7)}, "roi"),
    ((12, 12.7, 0.1), {"settle_ms": "5"}, "settle_ms"), ((12, 12.7, 0.1), {"settle_ms": math.nan}, "settle_ms"),
    ((12, 12.7, 0.1), {"backlash_mm": -0.01}, "backlash_mm"), ((12, 12.7, 0.1), {"backlash_mm": 11}, "backlash_mm"),
    ((12, 12.7, 0.1), {"z_min": "12"}, "z_min"), ((12, 12.7, 0.1), {"z_max": math.nan}, "z_max"),
    ((12, 12.7, 0.1), {"z_max": True}, "z_max"),
    ((-0.2, 0.4, 0.1), {"relative": "False"}, "relative"), ((12, 12.7, 0.1), {"relative": 1}, "relative"),
    ((12, 12.7, 0.1), {"relative": None}, "relative"),
    ((12, 12.7, 0.1), {"home": "yes"}, "home"), ((12, 12.7, 0.1), {"home": 0}, "home"),
    ((12, 12.7, 0.1), {"peak": "lowest z"}, "peak"), ((12, 12.7, 0.1), {"peak": None}, "peak"),
    ((12, 12.7, 0.1), {"transparent": "no"}, "transparent"), ((12, 12.7, 0.1), {"transparent": 0}, "transparent"),
    ((12, 12.7, 0.1), {"allow_many": "yes"}, "allow_many"),
    ((12, 12.7, 0.1), {"on_frame": "print"}, "on_frame"), ((12, 12.7, 0.1), {"on_frame": 5}, "on_frame"),
]


@pytest.mark.parametrize("args, keywords, named", BAD_ARGUMENTS)
def test_every_bad_argument_is_a_usage_error_naming_it_and_nothing_moves(args: tuple, keywords: dict,
                                                                         named: str) -> None:
    stage = CountingStage()
    camera = CountingCamera(stage)
    with pytest.raises(autofocus.BadValue) as caught:
        autofocus.focus(stage, camera, *args, **keywords)
    assert isinstance(caught.value, autofocus.UsageError) and str(caught.value).startswith(named)
    assert stage.moves == [] and camera.captures == 0 and caught.value.partial is None


class NoPosition:
    """A stage whose position_mm is missing."""

    def limits_mm(self) -> tuple[float, float]:
        return 0.0, 25.0

    def move_to(self, z_mm: float) -> None:
        raise AssertionError("moved")

    def stop(self) -> None:
        pass


class LimitsAttribute(NoPosition):
    limits_mm = (0.0, 25.0)  # type: ignore[assignment]  # a plain attribute, not a method

    def position_mm(self) -> float:
        return 12.3


class PositionWithArgument(NoPosition):
    def position_mm(self, axis: int) -> float:  # type: ignore[override]
        return 12.3


class CaptureAttribute:
    capture = np.zeros((64, 96), np.uint8)  # a frame, not a method


@pytest.mark.parametrize("stage_arg, camera_arg, message", [
    (None, "camera", r"the stage \(None\) has no limits_mm\(\) method: a Stage needs limits_mm\(\), position_mm"),
    ("COM3", "camera", r"the stage \(a str\) has no limits_mm\(\) method"),
    (NoPosition(), "camera", r"the stage \(a NoPosition\) has no position_mm\(\) method"),
    (LimitsAttribute(), "camera", r"the stage's limits_mm is \(0.0, 25.0\), not callable"),
    (PositionWithArgument(), "camera", r"the stage's position_mm\(\) cannot be called without arguments"),
    ("stage", None, r"the camera \(None\) has no capture\(\) method: a Camera needs capture\(\)"),
    ("stage", object(), r"the camera \(an object\) has no capture\(\) method"),
    ("stage", lambda: np.zeros((8, 8)), r"the camera \(a function\) has no capture\(\) method"),
    ("stage", CaptureAttribute(), r"the camera's capture is a ndarray, not callable"),
])
def test_a_stage_or_camera_that_is_not_one_is_refused_before_anything_moves(stage_arg: Any, camera_arg: Any,
                                                                            message: str) -> None:
    # Found by calling them (the readers that run before anything moves), not by probing them: a
    # limits_mm that is a tuple once passed an isinstance() check and failed later with a TypeError.
    stage = CountingStage()
    camera = CountingCamera(stage)
    stage_arg = stage if isinstance(stage_arg, str) and stage_arg == "stage" else stage_arg
    camera_arg = camera if isinstance(camera_arg, str) else camera_arg
    with pytest.raises(autofocus.UsageError, match=message) as caught:
        autofocus.focus(stage_arg, camera_arg, 12, 12.7, 0.1)
    assert stage.moves == [] and camera.captures == 0 and "nothing was moved" in str(caught.value)


def test_errors_raised_inside_a_parts_method_stay_its_own() -> None:
    class Broken(NoPosition):
        def position_mm(self) -> float:
            raise TypeError("a bug inside position_mm")

    with pytest.raises(TypeError, match="a bug inside position_mm"):  # not taken for a missing method
        autofocus.focus(Broken(), CountingCamera(CountingStage()), 12, 12.7, 0.1)


def test_a_plate_that_is_not_one_is_refused_before_anything_moves() -> None:
    plate, stage, camera = autofocus.simulated_slide(width=96, height=64, time_scale=0, start_mm=12.3)

    class PlateWithoutPosition:
        def limits_mm(self) -> Any:
            return plate.limits_mm()

    for xy, message in ((None, r"the plate \(None\) has no limits_mm\(\) method: an XYStage needs move_to"),
                        (PlateWithoutPosition(), r"the plate \(a PlateWithoutPosition\) has no position_mm\(\)")):
        with pytest.raises(autofocus.UsageError, match=message):
            autofocus.focus_map(xy, stage, camera, area_mm=(40, 30, 60, 45), grid=(2, 2), start_mm=12.0,
                                end_mm=12.7, step_mm=0.05)
    assert stage.position_mm() == 12.3 and plate.position_mm() == (50.0, 37.5)  # neither moved


def test_strings_are_never_taken_for_true() -> None:
    # relative="False" once searched 24-24.7 mm (12.3 + 12..12.7), transparent="no" ran the inverted search.
    stage = CountingStage()
    for keywords in ({"relative": "False"}, {"transparent": "no"}, {"home": "False"}, {"allow_many": "0"}):
        with pytest.raises(autofocus.UsageError, match="must be True or False"):
            autofocus.focus(stage, CountingCamera(stage), 12, 12.7, 0.1, **keywords)
    assert stage.moves == []
    # (21 positions: on 8 the peak fills the range, too few frames to measure the noise -- issue 20)
    result = autofocus.focus(stage, CountingCamera(stage), 11.7, 12.7, 0.05, relative=np.bool_(False),  # numpy's own
                             roi=np.array([20, 10, 60, 40]), blur=np.int64(9))
    assert min(stage.moves) >= 11.7 and result.verdict.kind == "focused"


def test_the_request_fields_are_focus_keywords_and_each_has_a_rule() -> None:
    fields = [f.name for f in autofocus.dataclasses.fields(autofocus.Request)]
    assert fields[:3] == ["start_mm", "end_mm", "step_mm"]
    assert set(fields[3:]) == set(autofocus.focus.__kwdefaults__) - {"on_frame"}
    assert set(fields) == set(autofocus.REQUEST_RULES)


# --- numbers from the stage --------------------------------------------------------------------------

@pytest.mark.parametrize("limits, position", [
    ((0.0, math.nan), 12.3), ((math.nan, 25.0), 12.3), ((None, None), 12.3), ((25.0, 0.0), 12.3),
    (("0", "25"), 12.3), ((0.0, 25.0, 50.0), 12.3), (None, 12.3), ((0.0, math.inf), 12.3),
    ((0.0, 25.0), math.nan), ((0.0, 25.0), None), ((0.0, 25.0), "12.3"), ((0.0, 25.0), math.inf),
])
@pytest.mark.parametrize("relative", [False, True])
def test_limits_and_positions_from_a_stage_are_checked_before_use(limits: Any, position: Any, relative: bool) -> None:
    # (0, nan) once passed the plan check (NaN comparisons are false) and 12..20 mm was commanded
    # past z_max=13.
    stage = CountingStage(limits, position)
    span = (-0.2, 0.2, 0.1) if relative else (12, 20, 0.5) if position == 12.3 else (12, 12.5, 0.1)
    with pytest.raises(autofocus.StageError, match="the stage reports its (travel limits|position) as"):
        autofocus.focus(stage, CountingCamera(stage), *span, z_max=None if position != 12.3 else 13,
                        relative=relative)
    assert stage.moves == []


def test_the_cli_reports_a_stage_number_as_a_stage_error(monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(autofocus.SimStage, "limits_mm", lambda self: (0.0, math.nan))
    code = autofocus.main(["12", "12.6", "0.05", *FAST_SIM])
    err = capsys.readouterr().err
    assert code == autofocus.EXIT_HARDWARE and err.count("\n") == 1 and "travel limits as (0.0, nan)" in err


# --- frames ----------------------------------------------------------------------------------------

GOOD = (np.random.default_rng(5).random((64, 96)) * 200 + 20).astype(np.uint8)


BAD_FRAMES = [
    (np.dstack([GOOD, GOOD]), "96x2 uint8 array"),  # HxWx2
    (np.dstack([GOOD] * 5), "64x96x5 uint8 array"),
    (np.dstack([GOOD] * 3).astype(np.int8), "int8 array"),
    (GOOD.astype(np.float64), "float64 array"),
    (GOOD.tolist(), "a list, not an image"),
    (GOOD[None], "1x64x96 uint8 array"),
    (None, "no frame"),
    (np.zeros((64, 0), np.uint8), "an empty frame"),
    (GOOD[:1], "a 1x96 frame; each side needs at least 8 pixels"),
]


@pytest.mark.parametrize("frame, message", BAD_FRAMES)
def test_a_first_frame_that_cannot_be_scored_is_refused_before_anything_moves(frame: Any, message: str) -> None:
    stage = CountingStage()
    with pytest.raises(autofocus.CameraError, match=message) as caught:
        autofocus.focus(stage, CountingCamera(stage, [frame]), 12, 12.7, 0.1, roi=(60, 10, 30, 30))
    assert "captured before anything moved" in str(caught.value)
    assert stage.moves == [] and caught.value.partial is None


@pytest.mark.parametrize("frames, message", [
    *(([GOOD, frame], message) for frame, message in BAD_FRAMES),  # the look before moving was fine
    ([GOOD, GOOD, GOOD[:, :40]], "the run's first was 64x96 uint8"),  # shrinks under the ROI
    ([GOOD, GOOD, GOOD.astype(np.uint16)], "the run's first was 64x96 uint8"),
])
def test_frames_that_cannot_be_scored_are_a_camera_error_and_the_stage_goes_back(frames: list[Any],
                                                                                 message: str) -> None:
    stage = CountingStage()
    with pytest.raises(autofocus.CameraError, match=message) as caught:
        autofocus.focus(stage, CountingCamera(stage, frames), 12, 12.7, 0.1, roi=(60, 10, 30, 30))
    assert stage.z == 12.3 and caught.value.stage_state == "stage returned to its start, 12.3000 mm"


def test_a_roi_larger_than_the_frame_is_refused_before_anything_moves() -> None:
    # Once checked on the first frame only, after the move to the first position (and back).
    stage = CountingStage()
    with pytest.raises(autofocus.UsageError, match=r"ROI 0,0,500,500 .* does not fit in the 96x64 frame"):
        autofocus.focus(stage, CountingCamera(stage), 12, 12.7, 0.1, roi=(0, 0, 500, 500))
    assert stage.moves == []
    with pytest.raises(autofocus.UsageError, match="does not fit in the 40x64 frame"):  # the last line of defence:
        autofocus.focus(stage, CountingCamera(stage, [GOOD, GOOD[:, :40]]), 12, 12.7, 0.1, roi=(50, 0, 30, 30))
    assert stage.z == 12.3  # ... after the first move, and back


@pytest.mark.parametrize("frame", [np.dstack([GOOD, GOOD]), np.dstack([GOOD] * 5), GOOD.astype(np.int8), [[1, 2]],
                                   None, np.zeros((0, 5), np.uint8), np.zeros((1, 1_500_001), np.uint8),
                                   np.zeros((2_000_000, 1), np.uint16), np.zeros((12, 200_000), np.uint8)])
def test_the_scores_refuse_odd_frames_with_a_camera_error(frame: Any) -> None:
    # A 1 x 1,500,001 frame once reached the 2x2 binning and raised OpenCV's own error.
    for scorer in (autofocus.Scorer(), autofocus.Scorer("normvar"), autofocus.Scorer(roi=(0, 0, 8, 8))):
        with pytest.raises(autofocus.CameraError):
            scorer(frame)
        with pytest.raises(autofocus.CameraError):
            scorer.coarse(frame)


# --- one focus() at a time per stage and camera -------------------------------------------------------

def test_a_second_focus_on_the_same_stage_is_refused_while_the_first_runs() -> None:
    stage, camera = autofocus.simulated_microscope(width=96, height=64, time_scale=0, start_mm=12.3)
    first_frame, refused = threading.Event(), threading.Event()
    results: list[Any] = []

    def hold(index: int, z_mm: float, frame: Any, score: float) -> None:
        if index == 0:
            first_frame.set()
            assert refused.wait(10)

    worker = threading.Thread(target=lambda: results.append(autofocus.focus(stage, camera, 12, 12.7, 0.05,
                                                                            on_frame=hold)))
    worker.start()
    assert first_frame.wait(10)
    moves_before = stage.z
    for other_camera in (camera, CountingCamera(stage)):  # the same stage, with its own or another camera
        with pytest.raises(autofocus.UsageError, match="stage object is already in another focus"):
            autofocus.focus(stage, other_camera, 12.2, 12.4, 0.05)
    other_stage = CountingStage()
    with pytest.raises(autofocus.UsageError, match="camera object is already in another focus"):
        autofocus.focus(other_stage, camera, 12.2, 12.4, 0.05)
    assert stage.z == moves_before and other_stage.moves == []
    refused.set()
    worker.join(10)
    assert results[0].verdict.kind == "focused" and results[0].best_mm == stage.position_mm()
    # Once it returned, the stage is free again.
    assert autofocus.focus(stage, camera, 12.2, 12.5, 0.05).best_mm == stage.position_mm()


def test_on_frame_cannot_start_a_focus_on_its_own_stage() -> None:
    stage, camera = autofocus.simulated_microscope(width=96, height=64, time_scale=0, start_mm=12.3)

    def nested(index: int, z_mm: float, frame: Any, score: float) -> None:
        autofocus.focus(stage, camera, 12.2, 12.4, 0.05)

    with pytest.raises(autofocus.UsageError, match="already in another focus"):
        autofocus.focus(stage, camera, 12, 12.7, 0.05, on_frame=nested)
    assert stage.position_mm() == 12.3  # the outer run stopped and went back
