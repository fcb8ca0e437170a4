"""--roi (score a region of the frame) and --relative (search around where the stage is), issue 13."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

import autofocus
from fake_zaber import DeviceConfig, FakeZaber

NM = 1_000_000
SIM = ["--simulate", "--sim-time-scale", "0", "--sim-size", "320x200"]
ZABER_SIM = ["--camera", "sim", "--native-unit-nm", "1", "--sim-time-scale", "0", "--sim-size", "320x200"]
LEFT, RIGHT = (10, 10, 140, 180), (170, 10, 140, 180)  # the two halves of a 320x200 frame, clear of the seam


def call_main(capfd: pytest.CaptureFixture[str], argv: list[Any]) -> tuple[int, str, str]:
    try:
        code = autofocus.main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code if isinstance(exc.code, int) else 2
    cap = capfd.readouterr()
    return code, cap.out, cap.err


def small_sim(**options: Any) -> tuple[autofocus.SimStage, autofocus.SimCamera]:
    return autofocus.simulated_microscope(**{"width": 320, "height": 200, "time_scale": 0, **options})


# --- the ROI picks the plane of the region it covers ------------------------------------------------

@pytest.mark.parametrize("search, end, step", [("sweep", 12.7, 0.02), ("fast", 13.4, 0.05)])
def test_roi_picks_the_plane_of_the_region_it_covers(search: str, end: float, step: float) -> None:
    # Cells everywhere, the right half of the field 0.4 mm above the left half.
    for roi, plane in ((LEFT, 12.0), (RIGHT, 12.4)):
        stage, camera = small_sim(focus_mm=12.0, right_focus_mm=12.4, start_mm=11.9)
        result = autofocus.focus(stage, camera, 11.7, end, step, roi=roi, search=search)
        assert result.verdict.kind == "focused", (roi, result.verdict.reason)
        assert abs(result.best_mm - plane) <= step, (search, roi, result.best_mm)
        assert stage.position_mm() == result.best_mm


def test_featureless_half_is_no_peak_and_the_specimen_half_is_found() -> None:
    # The left half is an empty, evenly lit field (only noise); the right half has cells at 12.4 mm.
    options = dict(focus_mm=12.0, specimen="blank", right_specimen="cells", right_focus_mm=12.4, start_mm=11.9)
    stage, camera = small_sim(**options)
    empty = autofocus.focus(stage, camera, 11.7, 12.7, 0.02, roi=LEFT)
    assert empty.verdict.kind == "no_peak" and stage.position_mm() == 11.9  # back where it started
    stage, camera = small_sim(**options)
    found = autofocus.focus(stage, camera, 11.7, 12.7, 0.02, roi=RIGHT)
    assert found.verdict.kind == "focused" and abs(found.best_mm - 12.4) <= 0.02


def test_roi_scores_only_the_region() -> None:
    frame = np.zeros((200, 320), np.uint8)
    frame[50:60, 200:210] = 255  # one bright square, inside the right half only
    scorer = autofocus.Scorer(roi=RIGHT)
    assert scorer(frame) > 0 and scorer.coarse(frame) > 0
    assert autofocus.Scorer(roi=LEFT)(frame) == 0 and autofocus.Scorer(roi=LEFT).coarse(frame) == 0


# --- ROI validation: one line, exit 2, the stage back at its start ---------------------------------

@pytest.fixture
def fake() -> Iterator[FakeZaber]:
    with FakeZaber(devices=[DeviceConfig(homed=True, position=5 * NM)]) as f:
        yield f


@pytest.mark.parametrize("roi, message", [
    ("300,0,100,100", "ROI 300,0,100,100 (pixels x 300..400, y 0..100) does not fit in the 320x200 frame"),
    ("0,190,50,50", "does not fit in the 320x200 frame; give X,Y,W,H with X+W <= 320 and Y+H <= 200"),
])
def test_roi_outside_the_frame_is_refused_before_anything_moves(fake: FakeZaber, capfd: pytest.CaptureFixture[str],
                                                                roi: str, message: str) -> None:
    # Checked against a frame captured where the stage is, before the first move (it once moved
    # to the first position, took a frame there, refused it and came back).
    code, out, err = call_main(capfd, ["4.9", "5.3", "0.02", f"tcp://127.0.0.1:{fake.port}", *ZABER_SIM,
                                       "--roi", roi, "--json"])
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert fake.position() == 5 * NM and json.loads(out)["exit_code"] == 2
    assert fake.motion_commands() == []


@pytest.mark.parametrize("roi, message", [
    ("10,10,0,50", "the region must not be empty"), ("10,10,4,50", "W and H at least 8 pixels"), ("1,2,3", "is not X,Y,W,H"),
    ("=-1,0,50,50", "must be 0 or more"),
])
def test_empty_or_malformed_roi_is_refused_before_anything_moves(fake: FakeZaber, capfd: pytest.CaptureFixture[str],
                                                                 roi: str, message: str) -> None:
    flag = ["--roi" + roi] if roi.startswith("=") else ["--roi", roi]
    code, _, err = call_main(capfd, ["4.9", "5.3", "0.02", f"tcp://127.0.0.1:{fake.port}", *ZABER_SIM, *flag])
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert fake.motion_commands() == []


# --- --save-images records the ROI, --replay reuses it ----------------------------------------------

def test_saved_stack_records_the_roi_and_replay_reuses_it(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    stack = tmp_path / "stack"
    two_planes = ["--sim-focus-mm", "12.0", "--sim-right-focus-mm", "12.4", "--sim-start-mm", "11.9"]
    code, out, err = call_main(capfd, ["11.7", "12.7", "0.02", *SIM, *two_planes, "--roi", ",".join(map(str, RIGHT)),
                                       "--save-images", stack, "--json"])
    recorded = json.loads(out)
    assert code == 0 and abs(recorded["best_mm"] - 12.4) <= 0.02, err
    assert recorded["roi"] == list(RIGHT) and recorded["camera_roi"] is None  # --json says what was scored
    assert json.loads((stack / "roi.json").read_text()) == {"roi": list(RIGHT)}
    assert cv2.imread(str(stack / "frame_00000.png"), cv2.IMREAD_UNCHANGED).shape == (200, 320)  # whole frames
    # Replayed without --roi: the stack's ROI is used (and said), so the same plane is found.
    code, out, err = call_main(capfd, ["11.7", "12.7", "0.02", "--replay", stack, "--json"])
    assert code == 0 and json.loads(out)["curve"] == recorded["curve"] and json.loads(out)["roi"] == list(RIGHT)
    assert "region of interest saved with the stack, 170,10,140,180" in err
    # --roi overrides it.
    code, out, _ = call_main(capfd, ["11.7", "12.7", "0.02", "--replay", stack, "--roi", ",".join(map(str, LEFT)),
                                     "--json"])
    assert code == 0 and abs(json.loads(out)["best_mm"] - 12.0) <= 0.02
    # Saving into the same folder (--overwrite: it holds a recording) without an ROI removes the stale roi.json.
    code, _, _ = call_main(capfd, ["11.7", "12.7", "0.1", *SIM, *two_planes, "--save-images", stack, "--overwrite"])
    assert code in (0, 3, 4) and not (stack / "roi.json").exists()


@pytest.mark.parametrize("content, message", [
    ('{"roi": [1, 2, 3]}', "expected [x, y, width, height]"),
    ('{"roi": [300, 0, 100, 100]}', "does not fit in the 320x200 frame"),
    ("not json", "fix or delete the file"),
    ("[1, 2]", 'expected {"roi": [x, y, width, height]}'),
])
def test_a_broken_roi_file_is_a_stack_error(tmp_path: Path, capfd: pytest.CaptureFixture[str], content: str,
                                            message: str) -> None:
    code, _, _ = call_main(capfd, ["12", "12.3", "0.1", *SIM, "--save-images", tmp_path])
    (tmp_path / "roi.json").write_text(content)
    code, _, err = call_main(capfd, ["12", "12.3", "0.1", "--replay", tmp_path])
    assert code == 2 and err.count("\n") == 1 and "roi.json" in err and message in err, err


def test_live_view_outlines_the_roi() -> None:
    stage, camera = small_sim(focus_mm=12.0, start_mm=12.0)
    frame = camera.capture()
    curve = [autofocus.Sample(12.0, 1.0)]

    def yellow(view: np.ndarray) -> np.ndarray:
        return np.all(view == (0, 255, 255), axis=2)

    plain = autofocus.compose_view(frame, 9, curve, height=200)
    outlined = autofocus.compose_view(frame, 9, curve, height=200, roi=RIGHT)
    assert not yellow(plain).any()
    rows, cols = np.nonzero(yellow(outlined))
    # The outline on the frame panel (the first 320 columns at this height) is where the ROI is.
    first = cols < 320
    assert cols[first].min() == RIGHT[0] and cols[first].max() == RIGHT[0] + RIGHT[2] - 1
    assert rows[first].min() == RIGHT[1] and rows[first].max() == RIGHT[1] + RIGHT[3] - 1
    assert (cols >= 640).any()  # ... and on the filtered and Laplacian panels too


# --- --relative ------------------------------------------------------------------------------------

@pytest.mark.parametrize("start_mm", [5.0, 7.31])
def test_relative_plans_absolute_positions_around_where_the_stage_is(capfd: pytest.CaptureFixture[str],
                                                                     start_mm: float) -> None:
    with FakeZaber(devices=[DeviceConfig(homed=True, position=round(start_mm * NM))]) as fake:
        # (21 positions: with 11, the 4x peak fills the range and too few frames measure the noise)
        code, out, err = call_main(capfd, ["-0.1", "0.1", "0.01", f"tcp://127.0.0.1:{fake.port}", *ZABER_SIM,
                                           "--relative", "--sim-focus-mm", start_mm + 0.03, "--json"])
        result = json.loads(out)
        assert code == 0, err
        planned = autofocus.plan_positions(start_mm - 0.1, start_mm + 0.1, 0.01)
        assert fake.move_targets() == [round(z * NM) for z in planned] + [round(result["best_mm"] * NM)]
        assert abs(result["best_mm"] - (start_mm + 0.03)) <= 0.02 and result["start_mm"] == start_mm
        # The header line gives the absolute range.
        assert f"searching {start_mm - 0.1:.4f}..{start_mm + 0.1:.4f} mm every 0.01 mm " \
               f"(-0.1..+0.1 mm from {start_mm:.4f} mm): 21 positions" in err


@pytest.mark.parametrize("position_mm, extra, message", [
    (0.05, [], "the range -0.05..0.15 mm leaves the allowed interval 0..25 mm"),
    (5.0, ["--z-max", "5.05"], "the range 4.9..5.1 mm leaves the allowed interval 0..5.05 mm"),
    (0.25, ["--backlash-mm", "0.2"], "the range with its backlash overshoot -0.05..0.35 mm leaves"),
])
def test_relative_limits_apply_to_the_absolute_positions(capfd: pytest.CaptureFixture[str], position_mm: float,
                                                         extra: list[str], message: str) -> None:
    with FakeZaber(devices=[DeviceConfig(homed=True, position=round(position_mm * NM))]) as fake:
        code, _, err = call_main(capfd, ["-0.1", "0.1", "0.02", f"tcp://127.0.0.1:{fake.port}", *ZABER_SIM,
                                         "--relative", *extra])
        assert code == 2 and message in err and err.count("\n") == 1, err
        assert fake.motion_commands() == []


def test_relative_refuses_a_stage_that_is_not_homed(capfd: pytest.CaptureFixture[str]) -> None:
    with FakeZaber(devices=[DeviceConfig(homed=False, position=5 * NM)]) as fake:
        code, _, err = call_main(capfd, ["-0.1", "0.1", "0.02", f"tcp://127.0.0.1:{fake.port}", *ZABER_SIM,
                                         "--relative"])
        assert code == 2 and "no reference position" in err and err.count("\n") == 1
        assert fake.motion_commands() == []  # not even homing


def test_relative_on_the_simulator_and_on_a_replay(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    code, out, _ = call_main(capfd, ["-0.3", "0.3", "0.02", *SIM, "--sim-start-mm", "12.2", "--relative", "--json",
                                     "--save-images", tmp_path])
    result = json.loads(out)
    assert code == 0 and abs(result["best_mm"] - 12.34) <= 0.02
    assert [z for z, _ in result["curve"]] == autofocus.plan_positions(11.9, 12.5, 0.02)
    # A replayed stage starts at the lowest recorded z (11.9): 0..0.6 from there is the whole stack.
    code, out, _ = call_main(capfd, ["0", "0.6", "0.02", "--replay", tmp_path, "--relative", "--json"])
    assert code == 0 and json.loads(out)["curve"] == result["curve"]
    code, _, err = call_main(capfd, ["-0.1", "0.1", "0.02", "--replay", tmp_path, "--relative"])
    assert code == 2 and "leaves the allowed interval 11.9..12.5 mm" in err
