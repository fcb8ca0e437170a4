"""Micro-Manager through the REAL pymmcore-plus core (issue 23): MMStage, MMCamera, MMXYStage, mm_autofocus.

The core is pymmcore-plus's UniMMCore with Python devices (tests/mm_devices.py) whose camera renders the
simulator's optics at the focus drive's position; the MDA runs on pymmcore-plus's own MDA engine.
"""
from __future__ import annotations

import logging
import re
import sys
from typing import Any

import numpy as np
import pytest

pytest.importorskip("pymmcore_plus")  # tests/requirements.txt installs it (pip install .[mm])
from pymmcore_plus import FocusDirection  # noqa: E402
from pymmcore_plus.experimental.unicore import UniMMCore  # noqa: E402
from useq import AxesBasedAF, MDASequence, Position, ZRelativePositions  # noqa: E402

import autofocus  # noqa: E402
import mm_devices  # noqa: E402
from conftest import ROOT  # noqa: E402

STEP_20X = 0.004  # about the 20x / 0.40 objective's depth of field (4.2 um)


def mm(scope: mm_devices.Scope, limits_mm: tuple[float, float] = (0.0, 25.0)) -> tuple[autofocus.MMStage,
                                                                                     autofocus.MMCamera]:
    return autofocus.MMStage(scope.core, limits_mm=limits_mm), autofocus.MMCamera(scope.core)


# --- focus() end to end ---------------------------------------------------------------------------------


@pytest.mark.parametrize("search", ["sweep", "fast"])
def test_focus_on_the_real_core_matches_the_simulator(search: str) -> None:
    # 20x, STEP ~ one depth of field, 26 positions (the fast search's coarse pass runs).  The core adds
    # nothing of its own: the same frames give the same answer as the simulator driven directly.
    for focus_mm, within_um in ((12.310, 0.5), (12.312, 0.5), (12.311, 1.0)):  # on the grid, mid-way, a quarter
        with mm_devices.microscope(focus_mm=focus_mm) as scope:
            stage, camera = mm(scope)
            result = autofocus.focus(stage, camera, 12.26, 12.36, STEP_20X, search=search)
            camera.close()
            assert scope.focus.z_um == pytest.approx(result.best_mm * 1000, abs=1e-6)  # the drive is at the answer
            assert len(scope.camera.snaps) == result.frames + 1  # and the look before the first move
        plain = autofocus.focus(*autofocus.simulated_microscope(objective="20x", focus_mm=focus_mm, width=320,
                                                                height=200, time_scale=0, start_mm=12.3),
                                12.26, 12.36, STEP_20X, search=search)
        assert result.verdict.kind == plain.verdict.kind == "focused"
        assert (result.best_mm, result.frames) == (plain.best_mm, plain.frames)
        # Within 0.5 um on the grid and mid-way; a quarter STEP off the grid the 3-point fit's bias reaches
        # ~0.2 STEP (0.8 um; tests/benchmark.py, section mm), bounded here by a quarter STEP.
        assert abs(result.best_mm - focus_mm) * 1000 <= within_um
        if search == "fast":
            assert result.frames < 26


@pytest.mark.parametrize("search", ["sweep", "fast"])
def test_blank_field_is_no_peak_and_back_to_start(search: str) -> None:
    with mm_devices.microscope(specimen="blank", start_um=12305.0) as scope:
        stage, camera = mm(scope)
        result = autofocus.focus(stage, camera, 12.26, 12.36, STEP_20X, search=search)
        assert result.verdict.kind == "no_peak"
        assert scope.focus.z_um == 12305.0 and scope.focus.moves[-1] == 12305.0
        assert result.start_mm == 12.305


# --- the outside world ----------------------------------------------------------------------------------


def test_focus_knob_turned_during_an_exposure_ends_the_run_and_nothing_more_moves() -> None:
    with mm_devices.microscope() as scope:
        stage, camera = mm(scope)
        scope.camera.nudges = {6: 3.0}  # 3 um, while the sixth frame exposes (snap 0: the look before moving)
        with pytest.raises(autofocus.StageInterrupted, match="moved from outside") as info:
            autofocus.focus(stage, camera, 12.26, 12.36, STEP_20X)
        assert len(scope.focus.moves) == 6  # the six frames' moves; no seventh, no return to start
        assert len(info.value.partial.samples) == 6
        assert "nothing more was moved" in info.value.stage_state
        assert not info.value.may_move


def test_a_move_that_ends_off_target_is_an_interruption() -> None:
    with mm_devices.microscope() as scope:
        stage, camera = mm(scope)
        scope.focus.land_off_um = 0.5  # someone holds the knob: moves end 0.5 um short (tolerance 0.2)
        with pytest.raises(autofocus.StageInterrupted, match=r"ended at 12\.2605 mm, 0\.50 um off"):
            autofocus.focus(stage, camera, 12.26, 12.36, STEP_20X)
        assert scope.focus.moves == [12260.0]  # no return to start after it
        scope.focus.land_off_um = 0.1  # within the tolerance: a move, verified
        stage.position_mm()
        stage.move_to(12.3)
        assert stage.position_mm() == 12.3001


def test_moves_are_waited_for() -> None:
    with mm_devices.microscope() as scope:
        stage, camera = mm(scope)
        scope.focus.move_s = 0.03  # busy (and on its way) for 30 ms after each move
        stage.move_to(12.31)
        assert not scope.core.deviceBusy("Z") and stage.position_mm() == 12.31
        camera.close()


# --- limits, devices, settings --------------------------------------------------------------------------


def test_stage_limits_from_the_device_or_the_caller() -> None:
    with mm_devices.microscope(travel_um=(0.0, 20000.0)) as scope:
        assert autofocus.MMStage(scope.core).limits_mm() == (0.0, 20.0)  # the device's Position limits
        narrowed = autofocus.MMStage(scope.core, limits_mm=(12.0, 30.0))
        assert narrowed.limits_mm() == (12.0, 20.0) and narrowed.limits_from == "device and limits_mm"
        with pytest.raises(autofocus.UsageError, match="lies outside the travel"):
            autofocus.MMStage(scope.core, limits_mm=(21.0, 22.0))
        with pytest.raises(autofocus.UsageError, match=r"leaves the allowed interval 12\.\.20 mm"):
            autofocus.focus(narrowed, autofocus.MMCamera(scope.core), 11.9, 12.4, STEP_20X)
        assert scope.focus.moves == []  # refused before anything moved
        with pytest.raises(autofocus.StageError, match="outside its limits"):
            narrowed.move_to(20.5)
    with mm_devices.microscope(travel_um=(0.0, 10000.0)) as scope:  # limits that do not hold the position (12.3 mm)
        with pytest.raises(autofocus.UsageError, match="reports no travel limits: pass limits_mm"):
            autofocus.MMStage(scope.core)
        assert autofocus.MMStage(scope.core, limits_mm=(5, 15)).limits_mm() == (5.0, 15.0)
        with pytest.raises(autofocus.UsageError, match="'Camera' is of type CameraDevice, not StageDevice: pass a focus device"):
            autofocus.MMStage(scope.core, "Camera", limits_mm=(5, 15))
        with pytest.raises(autofocus.UsageError, match="no device 'Piezo' is loaded"):
            autofocus.MMStage(scope.core, "Piezo", limits_mm=(5, 15))
        with pytest.raises(autofocus.UsageError, match="limits_mm"):
            autofocus.MMStage(scope.core, limits_mm=(15, 5))
    empty = UniMMCore()
    with pytest.raises(autofocus.UsageError, match=r"no focus device selected: .*core\.setFocusDevice\(LABEL\)"):
        autofocus.MMStage(empty, limits_mm=(5, 15))
    with pytest.raises(autofocus.UsageError, match=r"no camera selected"):
        autofocus.MMCamera(empty)
    del empty


def test_camera_settings_it_changes_are_restored() -> None:
    with mm_devices.microscope() as scope:
        core = scope.core
        core.startContinuousSequenceAcquisition(0)  # live mode, as Micro-Manager's window leaves it
        with autofocus.MMCamera(core, exposure_ms=3.0, roi=(16, 8, 64, 48)) as camera:
            assert not core.isSequenceRunning()
            assert (core.getExposure(), camera.roi, camera.bit_depth) == (3.0, (16, 8, 64, 48), 8)
            assert camera.capture().shape == (48, 64)
        assert core.isSequenceRunning()  # live mode again
        core.stopSequenceAcquisition()
        assert core.getExposure() == 10.0 and list(core.getROI()) == [0, 0, 320, 200]
        with pytest.raises(autofocus.UsageError, match="refused the ROI 300,8,64,48"):
            autofocus.MMCamera(core, roi=(300, 8, 64, 48))
        assert list(core.getROI()) == [0, 0, 320, 200]
        with pytest.raises(autofocus.UsageError, match="exposure_ms"):
            autofocus.MMCamera(core, exposure_ms=0)


BAD_SETTINGS = [  # (adapter, keywords, the keyword the message names)
    ("MMStage", {"limits_mm": "0..25"}, "limits_mm"),
    ("MMStage", {"limits_mm": (1.0, float("nan"))}, "limits_mm"),
    ("MMStage", {"limits_mm": (5, 15), "tolerance_um": True}, "tolerance_um"),
    ("MMStage", {"limits_mm": (5, 15), "tolerance_um": 0}, "tolerance_um"),
    ("MMStage", {"limits_mm": (5, 15), "label": 5}, "label"),
    ("MMXYStage", {"limits_mm": ((0, 1),)}, "limits_mm"),
    ("MMXYStage", {"limits_mm": ((0, 1), (2, 1))}, "limits_mm"),
    ("MMXYStage", {"limits_mm": ((0, 1), (0, 1)), "tolerance_um": float("inf")}, "tolerance_um"),
    ("MMCamera", {"exposure_ms": "5"}, "exposure_ms"),
    ("MMCamera", {"exposure_ms": 0.0}, "exposure_ms"),
    ("MMCamera", {"roi": (0, 0, 64)}, "roi"),
    ("MMCamera", {"roi": (0.5, 0, 64, 64)}, "roi"),
    ("mm_autofocus", {"limits_mm": (0, 25), "exposure_ms": -1.0}, "exposure_ms"),
    ("mm_autofocus", {"limits_mm": (0, 25), "tolerance_um": np.nan}, "tolerance_um"),
    ("mm_autofocus", {"limits_mm": (0, 25), "search": "quick"}, "search"),
    ("mm_autofocus", {"limits_mm": (0, 25), "on_frame": "print"}, "on_frame"),
]


@pytest.mark.parametrize(("adapter", "keywords", "named"), BAD_SETTINGS)
def test_bad_settings_are_refused_naming_them_and_nothing_changes(adapter: str, keywords: dict, named: str) -> None:
    with mm_devices.microscope(travel_um=(0.0, 20000.0)) as scope:
        core = scope.core
        args = (-0.03, 0.03, STEP_20X) if adapter == "mm_autofocus" else ()
        with pytest.raises(autofocus.UsageError, match=rf"^{named}\b"):
            getattr(autofocus, adapter)(core, *args, **keywords)
        assert (type(core), core.getExposure(), list(core.getROI())) == (UniMMCore, 10.0, [0, 0, 320, 200])
        assert scope.focus.moves == [] and scope.plate.moves == []


def test_a_position_that_is_not_a_number_is_a_stage_error() -> None:
    with mm_devices.microscope() as scope:
        stage = autofocus.MMStage(scope.core, limits_mm=(0, 25))
        scope.focus.land_off_um = float("nan")  # the device reports NaN after the move
        with pytest.raises(autofocus.StageError, match="reports its position as"):
            stage.move_to(12.3)  # the verification must not pass a NaN
        assert scope.focus.moves == [12300.0]


class TwelveBitCore(UniMMCore):
    """A core whose camera is 12-bit in 16-bit pixels, as most scientific cameras' adapters report."""

    def getImageBitDepth(self) -> int:  # noqa: N802
        return 12


def test_saturation_is_judged_at_the_cores_bit_depth() -> None:
    with mm_devices.microscope(core_class=TwelveBitCore, dtype=np.uint16) as scope:
        camera = autofocus.MMCamera(scope.core)
        assert camera.bit_depth == 12 and camera.capture().dtype == np.uint16
        scope.camera.snap = lambda buffer: (buffer.fill(4095), {})[1]  # every pixel at 2^12 - 1
        with pytest.raises(autofocus.CameraError, match=r"saturated frame \(12-bit\)"):
            camera.capture()


def test_xy_stage_adapter() -> None:
    with mm_devices.microscope() as scope:
        with pytest.raises(autofocus.UsageError, match=r"limits_mm=\(\(x_lo, x_hi\), \(y_lo, y_hi\)\)"):
            autofocus.MMXYStage(scope.core)
        xy = autofocus.MMXYStage(scope.core, limits_mm=((-5, 5), (-2, 2)))
        assert xy.limits_mm() == ((-5.0, 5.0), (-2.0, 2.0))
        xy.move_to(1.5, -0.25)
        assert scope.plate.moves == [(1500.0, -250.0)] and xy.position_mm() == (1.5, -0.25)
        with pytest.raises(autofocus.StageError, match="in y to 3 mm: outside its limits"):
            xy.move_to(0, 3)
        scope.plate.xy_um = (1500.0, 20.0)  # the joystick
        with pytest.raises(autofocus.StageInterrupted, match=r"is at \(1\.5000, 0\.0200\) mm, not at \(1\.5000, "
                                                             r"-0\.2500\) mm where this tool last saw it"):
            xy.move_to(0, 0)
        assert len(scope.plate.moves) == 1
        scope.plate.land_off_um = 2.0
        with pytest.raises(autofocus.StageInterrupted, match=r"ended at \(0\.0020, 0\.0000\) mm, 2\.00 um off"):
            xy.move_to(0, 0)
        xy.stop()
        with pytest.raises(autofocus.UsageError, match="'Z' is of type StageDevice, not XYStageDevice"):
            autofocus.MMXYStage(scope.core, "Z", limits_mm=((-5, 5), (-2, 2)))


def test_missing_pymmcore_plus_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pymmcore_plus", None)  # as if it were not installed
    with pytest.raises(autofocus.UsageError, match=r"need pymmcore-plus .*pip install pymmcore-plus .*\.\[mm\]"):
        autofocus.MMCamera(object())


# --- the MDA ----------------------------------------------------------------------------------------------


def tilted(x_um: float, y_um: float) -> float:
    """The slide's focal plane, mm: 12.31 at the origin, rising 5 um per mm in x and 2 um per mm in y."""
    return 12.31 + 5e-6 * x_um + 2e-6 * y_um


def test_mda_with_axes_based_autofocus_images_at_the_focus(caplog: pytest.LogCaptureFixture) -> None:
    positions = [Position(x=0, y=0, z=12300), Position(x=1000, y=500, z=12306), Position(x=400, y=-700, z=12296),
                 Position(x=3000, y=0, z=12300)]  # the last on bare glass
    with mm_devices.microscope(surface_mm=tilted, blank_x_um=2500) as scope:
        core = scope.core
        with pytest.raises(RuntimeError):
            core.fullFocus()  # a plain core has no autofocus
        af = autofocus.mm_autofocus(core, -0.03, 0.03, STEP_20X, limits_mm=(0, 25))
        frames: list[tuple[Any, float]] = []
        core.mda.events.frameReady.connect(lambda img, event, meta: frames.append((event, scope.focus.z_um)))
        with caplog.at_level(logging.WARNING):
            core.mda.run(MDASequence(stage_positions=positions, z_plan=ZRelativePositions(relative=[-4, 0, 4]),
                                     autofocus_plan=AxesBasedAF(axes=("p",))))
        assert [r.verdict.kind for r in af.results] == ["focused"] * 3 + ["no_peak"] * 3  # useq tries 3 times
        assert "Hardware autofocus failed. autofocus.py: no_peak" in caplog.text
        assert len(frames) == 12
        for event, z_um in frames:
            p, k = event.index["p"], event.index["z"]
            if p < 3:  # each stack centred on the autofocus's answer, as the engine applies a hardware one's
                answer = af.results[p]
                assert z_um == pytest.approx(answer.best_mm * 1000 + (k - 1) * 4, abs=1e-6)
                truth = tilted(positions[p].x, positions[p].y)
                assert abs(answer.best_mm - truth) * 1000 <= 1.0  # (quarter STEP)
            else:  # bare glass: no correction
                assert z_um == pytest.approx(12300 + (k - 1) * 4, abs=1e-6)
        af.detach()
        assert type(core) is UniMMCore
        with pytest.raises(RuntimeError):
            core.fullFocus()


def test_mda_stops_when_the_focus_is_moved_from_outside_and_nothing_moves_after() -> None:
    with mm_devices.microscope() as scope:
        core = scope.core
        scope.focus.focus_direction = FocusDirection.TowardSample  # the engine restores positions at the end...
        autofocus.mm_autofocus(core, -0.03, 0.03, STEP_20X, limits_mm=(0, 25))
        scope.camera.nudges = {5: -2.0}  # (snap 0: the look before moving)
        with pytest.raises(autofocus.StageInterrupted, match="moved from outside"):
            core.mda.run(MDASequence(stage_positions=[Position(x=100, y=0, z=12300)],
                                     autofocus_plan=AxesBasedAF(axes=("p",))))
        # ... but not after an outside move: no move after the interruption, XY not sent back to 0
        assert len(scope.focus.moves) == 6 and scope.plate.moves == [(100.0, 0.0)]
        assert core.mda.engine.restore_initial_state is False


def test_mm_autofocus_checks_its_settings_once() -> None:
    with mm_devices.microscope() as scope:
        core = scope.core
        with pytest.raises(autofocus.UsageError, match="unknown option serach"):
            autofocus.mm_autofocus(core, -0.03, 0.03, STEP_20X, limits_mm=(0, 25), serach="fast")
        with pytest.raises(autofocus.UsageError, match="step_mm"):
            autofocus.mm_autofocus(core, -0.03, 0.03, 0, limits_mm=(0, 25))
        with pytest.raises(autofocus.UsageError, match="camera_roi"):
            autofocus.mm_autofocus(core, -0.03, 0.03, STEP_20X, limits_mm=(0, 25), camera_roi=(0, 0, 2, 2))
        with pytest.raises(autofocus.UsageError, match="relative"):
            autofocus.mm_autofocus(core, -0.03, 0.03, STEP_20X, limits_mm=(0, 25), relative="yes")
        with pytest.raises(autofocus.UsageError, match="reports no travel limits"):
            autofocus.mm_autofocus(core, -0.03, 0.03, STEP_20X)
        assert type(core) is UniMMCore  # nothing attached by a refused call
        first = autofocus.mm_autofocus(core, -0.03, 0.03, STEP_20X, limits_mm=(0, 25))
        second = autofocus.mm_autofocus(core, -0.1, 0.1, 0.01, limits_mm=(0, 25), search="fast", exposure_ms=2.0)
        assert core.getAutoFocusDevice() == autofocus.MM_AUTOFOCUS_LABEL
        core.fullFocus()
        assert (first.results, second.results[0].search) == ([], "fast")  # the settings of the last attached
        assert core.getExposure() == 10.0  # the autofocus exposure was for its own frames
        with pytest.raises(autofocus.UsageError, match="no offset motor"):
            core.setAutoFocusOffset(1.0)
        first.detach()  # not the attached one: nothing changes
        assert core.getAutoFocusDevice() == autofocus.MM_AUTOFOCUS_LABEL
        third = autofocus.mm_autofocus(core, -0.03, 0.03, STEP_20X, limits_mm=(0, 25))
        # the focal plane beyond the range: edge, and back to where it was (a failed autofocus to the engine)
        scope.focus.z_um = 12275.0  # searching 12.245..12.305 mm, the focal plane 5 um above it
        with pytest.raises(RuntimeError, match=r"autofocus.py: edge: .*the focus went back to 12\.2750 mm"):
            core.fullFocus()
        assert scope.focus.z_um == 12275.0 and third.results[-1].verdict.kind == "edge"
        # a range that leaves the limits here is a failed autofocus to the engine (RuntimeError), nothing moved
        scope.focus.z_um = 24990.0
        moves = len(scope.focus.moves)
        with pytest.raises(RuntimeError, match="leaves the allowed interval"):
            core.fullFocus()
        assert len(scope.focus.moves) == moves
        third.detach()
        assert core.getAutoFocusDevice() == "" and type(core) is UniMMCore
        second.detach()  # detached already: nothing to do
        assert type(core) is UniMMCore


# --- focus_map (issue 22) on the real core ---------------------------------------------------------------


@pytest.mark.skipif(not hasattr(autofocus, "focus_map"), reason="focus_map (issue 22) is not in autofocus.py yet")
def test_focus_map_on_the_real_core() -> None:
    with mm_devices.microscope(surface_mm=tilted) as scope:
        xy = autofocus.MMXYStage(scope.core, limits_mm=((-1.0, 4.0), (-1.0, 2.0)))
        stage, camera = mm(scope)
        fmap = autofocus.focus_map(xy, stage, camera, area_mm=(0.0, 0.0, 2.0, 1.0), grid=(3, 2), start_mm=12.28,
                                   end_mm=12.34, step_mm=STEP_20X)
        camera.close()
        assert len(fmap.points) == 6 and all(p.result.verdict.kind == "focused" for p in fmap.points)
        for x_mm, y_mm in ((0.0, 0.0), (1.0, 0.5), (2.0, 1.0), (0.5, 0.75)):
            assert abs(fmap.z_at(x_mm, y_mm) - tilted(x_mm * 1000, y_mm * 1000)) * 1000 <= 1.0  # a quarter STEP
        visited = {(round(x / 1000, 6), round(y / 1000, 6)) for x, y in scope.plate.moves}
        assert visited == {(x, y) for x in (0.0, 1.0, 2.0) for y in (0.0, 1.0)}  # verified XY moves, the grid only
        assert all(12280.0 - 1e-6 <= z <= 12340.0 + 1e-6 for z in scope.focus.moves)  # Z within START..END


# --- the README ------------------------------------------------------------------------------------------


def test_readme_micromanager_script_runs_as_written(capsys: pytest.CaptureFixture[str]) -> None:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), re.S)
    (code,) = [b for b in blocks if "mm_autofocus" in b]
    exec(compile(code, "README.md (Micro-Manager)", "exec"), {"__name__": "__readme__"})  # noqa: S102
    out = capsys.readouterr().out
    assert out == ("focused at 12.3099 mm\nposition 0: image at z = 12.3100 mm\n"
                   "position 1: image at z = 12.3100 mm\n")  # what the README says it prints
