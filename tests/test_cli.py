"""The command line: the card's command on the simulated microscope, options, one-line errors for bad and
extreme values (nothing moves: the REAL ZML against tests/fake_zaber.py shows even a homing)."""
from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

import autofocus
from cli_runs import call, strict, url
from conftest import FAST_SIM, LEFT, RIGHT, ROOT
from fake_zaber import DeviceConfig, FakeZaber

NM = 1_000_000
SIM = ["--simulate", "--sim-time-scale", "0", "--sim-size", "96x64"]
ZABER_SIM = ["--camera", "sim", "--native-unit-nm", "1", "--sim-time-scale", "0", "--sim-size", "320x200"]


def cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "autofocus.py", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_the_card_command_finds_the_simulated_focal_plane() -> None:
    # Exactly the README's quick start (real 1920x1200 frames, real-time hardware model).
    proc = cli("10", "14", "0.05", "--simulate")
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith("best focus at ") and "81 frames" in line and "score" in line and " s " in line
    best = float(line.split("best focus at ")[1].split()[0])
    assert abs(best - autofocus.SimOptics.focus_mm) <= 0.05


def test_help_documents_every_option() -> None:
    proc = cli("--help")
    assert proc.returncode == 0
    for action in autofocus.build_parser()._actions:
        for flag in action.option_strings:
            assert flag in proc.stdout
    assert "exit codes" in proc.stdout


@pytest.mark.parametrize("focus", [10.73, 12.34, 13.61])
def test_simulated_runs_land_within_a_step(capsys: pytest.CaptureFixture[str], focus: float) -> None:
    code = autofocus.main(["10", "14", "0.05", *FAST_SIM, "--sim-focus-mm", str(focus), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["verdict"] == "focused"
    assert abs(out["best_mm"] - focus) <= 0.05


def test_verbose_logs_one_line_per_step_with_timings(capsys: pytest.CaptureFixture[str]) -> None:
    code = autofocus.main(["10", "11", "0.1", *FAST_SIM, "--verbose", "--sim-focus-mm", "10.5"])
    err = capsys.readouterr().err
    steps = [line for line in err.splitlines() if line.startswith("frame ")]
    assert code == 0 and len(steps) == 11
    assert all("z=" in s and "score=" in s and "move " in s and "capture " in s and "score " in s and s.endswith(" ms)")
               for s in steps)


def test_sixteen_bit_and_16_bit_noise_run(capsys: pytest.CaptureFixture[str]) -> None:
    code = autofocus.main(["11", "13", "0.05", *FAST_SIM, "--sim-bits", "16", "--sim-photons", "300", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and abs(out["best_mm"] - 12.34) <= 0.05


def test_blank_field_is_no_peak_and_returns_to_start(capsys: pytest.CaptureFixture[str]) -> None:
    code = autofocus.main(["10", "14", "0.05", *FAST_SIM, "--sim-specimen", "blank", "--sim-start-mm", "3",
                           "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == autofocus.EXIT_NO_PEAK and out["verdict"] == "no_peak" and out["best_mm"] == 3.0


def test_focus_beyond_the_range_is_an_edge(capsys: pytest.CaptureFixture[str]) -> None:
    code = autofocus.main(["10", "14", "0.05", *FAST_SIM, "--sim-focus-mm", "14.2", "--json"])
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert code == autofocus.EXIT_EDGE and out["verdict"] == "edge" and out["best_mm"] == 14.0
    lo, hi = out["suggested_range_mm"]
    assert lo < 14.2 < hi
    assert "high end of the range" in captured.err


def test_show_images_without_display_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    env_cmd = [sys.executable, "-c", "import os,sys; os.environ.pop('DISPLAY',None); os.environ.pop('WAYLAND_DISPLAY',"
               "None); sys.argv=['autofocus.py','10','14','0.05','--simulate','--show-images'];"
               "import runpy; runpy.run_path('autofocus.py', run_name='__main__')"]
    proc = subprocess.run(env_cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "--save-images" in proc.stderr and "display" in proc.stderr


BAD_INPUTS = [
    (["ten", "14", "0.05"], "not a number"),
    (["nan", "14", "0.05"], "not a finite number"),
    (["10", "inf", "0.05"], "not a finite number"),
    (["10", "14", "0"], "STEP_MM: 0 is out of range: must be from 1e-06 to 2000 mm"),
    (["10", "14", "-0.05"], "out of range: must be from 1e-06"),
    (["10", "14", "5"], "larger than the range"),
    (["10", "10", "0.05"], "START_MM equals END_MM"),
    (["0", "20", "0.000001"], "--allow-many"),
    (["10", "14", "0.05", "--blur", "8"], "must be odd"),
    (["10", "14", "0.05", "--blur", "1"], "must be odd"),
    (["10", "14", "0.05", "--blur", "1001"], "must be odd"),
    (["10", "14", "0.05", "--metric", "sharpness"], "invalid choice"),
    (["10", "14", "0.05", "--search", "brent"], "invalid choice"),
    (["10", "14", "0.05", "--settle-ms", "-5"], "--settle-ms: -5 is out of range: must be from 0 to 60000 ms"),
    (["10", "14", "0.05", "--z-min", "12", "--z-max", "11"], "--z-min"),
]


@pytest.mark.parametrize("argv, message", BAD_INPUTS)
def test_bad_input_is_one_line_and_exit_2(argv: list[str], message: str) -> None:
    proc = cli(*argv, "--simulate")
    assert proc.returncode == 2
    assert message in proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_no_port_without_simulate_or_replay() -> None:
    proc = cli("10", "14", "0.05")
    assert proc.returncode == 2 and "no PORT" in proc.stderr and proc.stderr.count("\n") == 1


@pytest.mark.parametrize("argv, message", [
    (["0", "30", "0.05"], "leaves the allowed interval 0..25"),
    (["-1", "3", "0.05"], "leaves the allowed interval 0..25"),
    (["10", "14", "0.05", "--z-max", "13"], "soft limits"),
    (["10", "14", "0.05", "--z-min", "10.5"], "soft limits"),
    (["0", "4", "0.05", "--backlash-mm", "0.1"], "backlash overshoot"),
])
def test_range_outside_the_limits_is_refused_before_moving(argv: list[str], message: str,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    code = autofocus.main([*argv, *FAST_SIM])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1


def test_many_positions_allowed_when_confirmed(capsys: pytest.CaptureFixture[str]) -> None:
    # 10,001 positions refused without the flag; accepted (then refused by the limit) with it.
    argv = ["10", "10.10001", "0.00001", *FAST_SIM]
    assert autofocus.main(argv) == 2 and "--allow-many" in capsys.readouterr().err
    assert autofocus.main([*argv, "--allow-many", "--z-max", "10.05"]) == 2
    assert "soft limits" in capsys.readouterr().err


def test_unwritable_outputs_are_refused_before_moving(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for flag, value, message in (("--save-curve", str(tmp_path / "missing" / "c.csv"), "does not exist"),
                                 ("--plot", str(tmp_path / "nope" / "p.png"), "does not exist"),
                                 ("--save-images", str(blocker / "sub"), "cannot create")):
        code = autofocus.main(["10", "14", "0.05", *FAST_SIM, flag, value])
        err = capsys.readouterr().err
        assert code == 2 and message in err and flag in err, (flag, err)


@pytest.mark.parametrize("search", ["sweep", "fast"])
def test_too_noisy_for_fine_detail_falls_back_to_the_coarse_scale(capsys: pytest.CaptureFixture[str],
                                                                   search: str) -> None:
    # 100 photons at the brightest structure on an unbinned 640x400 frame: the full-resolution
    # Laplacian is swamped by shot noise; the binned (coarse-scale) score still finds focus.
    code = autofocus.main(["10", "14", "0.05", "--simulate", "--sim-time-scale", "0", "--sim-size", "640x400",
                           "--sim-photons", "100", "--search", search, "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["verdict"] == "focused" and out["verdict_scale"] == "coarse"
    assert abs(out["best_mm"] - 12.34) <= 0.05


def test_focus_far_beyond_the_range_is_an_edge_with_a_range_to_try(capsys: pytest.CaptureFixture[str]) -> None:
    # 1 mm (14 depths of field at 4x) below the range: the rise toward the low end is what is seen
    # (at the fine scale or the coarse one, as the noise falls), and the range to try covers 9 mm.
    code = autofocus.main(["10", "14", "0.05", "--simulate", "--sim-time-scale", "0", "--sim-size", "640x400",
                           "--sim-focus-mm", "9", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == autofocus.EXIT_EDGE and out["verdict"] == "edge"
    assert out["best_mm"] == 10.0 and out["suggested_range_mm"][0] < 9.0


# --- extreme numbers and documented values ------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["10", "14", "5e-324"], "STEP_MM: 5e-324 is out of range"),
    (["1e300", "14", "0.05"], "START_MM: 1e+300 is out of range"),
    (["10", "1e300", "0.05"], "END_MM: 1e+300 is out of range"),
    (["10", "14", "0.05", "--settle-ms", "1e308"], "--settle-ms: 1e+308 is out of range"),
    (["10", "14", "0.05", "--camera-timeout-ms", "1000000000000"], "--camera-timeout-ms: 1000000000000 is out"),
    (["10", "14", "0.05", "--move-timeout-s", "1e308"], "--move-timeout-s: 1e+308 is out of range"),
    (["10", "14", "0.05", "--backlash-mm", "1e300"], "--backlash-mm: 1e+300 is out of range"),
    (["10", "14", "0.05", "--sim-seed", "-1"], "--sim-seed: -1 is out of range: must be from 0 to 4294967295"),
    (["10", "14", "0.05", "--sim-time-scale", "1e300"], "--sim-time-scale: 1e+300 is out of range"),
    (["10", "14", "0.05", "--sim-photons", "1e308"], "--sim-photons: 1e+308 is out of range"),
    (["10", "14", "0.05", "--sim-size", "10000x10000"], "at most 25 MP"),
    (["0", "20", "0.00000001", "--allow-many"], "STEP_MM: 1e-08 is out of range"),
    (["0", "20", "0.000002", "--allow-many"], "more than 1,000,000, even with --allow-many"),
    (["12", "12.000005", "0.000001", "--search", "fast"], "STEP_MM 1e-06 mm is 1 native units of this stage"),
])
def test_extreme_numbers_are_one_line_exit_2_and_nothing_moves(capsys: pytest.CaptureFixture[str], argv: list[str],
                                                               message: str) -> None:
    with FakeZaber(devices=[DeviceConfig(homed=False, position=5 * NM)]) as unhomed:
        code = autofocus.main([*argv, url(unhomed), "--camera", "sim", "--native-unit-nm", "1", "--json"])
        captured = capsys.readouterr()
        assert code == 2 and message in captured.err and captured.err.count("\n") == 1, captured.err
        assert strict(captured.out)["exit_code"] == 2
        assert unhomed.motion_commands() == []  # not even homing


@pytest.mark.parametrize("extra", [["--sim-seed", "5000"], ["--sim-seed", "4294967295"], ["--z-min", "-1e-3"],
                                   ["--z-max", "1e2"]])
def test_documented_values_work(extra: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    # Seeds above 2^31/1e6 overflowed OpenCV's C-int seed; "-1e-3" was taken for an option.
    assert autofocus.main(["12", "12.6", "0.05", *FAST_SIM, *extra]) == 0, capsys.readouterr().err


# --- frames too narrow to bin, an ROI larger than the frame, numbers beyond a float -------------------

def test_a_frame_too_narrow_to_bin_is_a_camera_error_before_anything_moves(capfd: pytest.CaptureFixture[str],
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # (1, 1_500_001) and (2_000_000, 1) frames reached the 2x2 binning and raised OpenCV's own error.
    moves: list[float] = []
    real_move = autofocus.SimStage.move_to
    monkeypatch.setattr(autofocus.SimStage, "move_to", lambda self, z: (moves.append(z), real_move(self, z))[1])
    for shape in ((1, 1_500_001), (2_000_000, 1)):
        monkeypatch.setattr(autofocus.SimCamera, "capture", lambda self, s=shape: np.full(s, 100, np.uint8))
        code, _, err = call(capfd, "12", "12.5", "0.05", *SIM)
        assert code == autofocus.EXIT_HARDWARE and err.count("\n") == 1, err
        assert f"a {shape[0]}x{shape[1]} frame; each side needs at least 16 pixels to be scored" in err
    assert moves == []


def test_an_roi_larger_than_the_frame_moves_nothing(capfd: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    moves: list[float] = []
    real_move = autofocus.SimStage.move_to
    monkeypatch.setattr(autofocus.SimStage, "move_to", lambda self, z: (moves.append(z), real_move(self, z))[1])
    code, out, err = call(capfd, "12", "12.5", "0.05", *SIM, "--roi", "0,0,500,500", "--json")
    assert code == 2 and err.count("\n") == 1 and "ROI 0,0,500,500" in err and "does not fit in the 96x64" in err
    assert json.loads(out)["exit_code"] == 2 and moves == []


@pytest.mark.parametrize("typed", ["1e400", "-1e400", "1e-400"])
def test_a_number_beyond_a_float_is_shown_as_typed(typed: str, capfd: pytest.CaptureFixture[str]) -> None:
    code, _, err = call(capfd, typed, "12.5", "0.05", *SIM)
    assert code == 2 and err.count("\n") == 1 and f"'{typed}'" in err and "inf" not in err.replace("info", ""), err
    code, _, err = call(capfd, "12", "12.5", "0.05", *SIM, "--z-max", typed)
    assert code == 2 and f"'{typed}'" in err, err


# --- --roi (score a region of the frame) and --relative (search around where the stage is) --------------

def call_main(capfd: pytest.CaptureFixture[str], argv: list[Any]) -> tuple[int, str, str]:
    try:
        code = autofocus.main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code if isinstance(exc.code, int) else 2
    cap = capfd.readouterr()
    return code, cap.out, cap.err


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
    code, out, err = call_main(capfd, ["11.7", "12.7", "0.02", *FAST_SIM, *two_planes, "--roi", ",".join(map(str, RIGHT)),
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
    code, _, _ = call_main(capfd, ["11.7", "12.7", "0.1", *FAST_SIM, *two_planes, "--save-images", stack, "--overwrite"])
    assert code in (0, 3, 4) and not (stack / "roi.json").exists()


@pytest.mark.parametrize("content, message", [
    ('{"roi": [1, 2, 3]}', "expected [x, y, width, height]"),
    ('{"roi": [300, 0, 100, 100]}', "does not fit in the 320x200 frame"),
    ("not json", "fix or delete the file"),
    ("[1, 2]", 'expected {"roi": [x, y, width, height]}'),
])
def test_a_broken_roi_file_is_a_stack_error(tmp_path: Path, capfd: pytest.CaptureFixture[str], content: str,
                                            message: str) -> None:
    code, _, _ = call_main(capfd, ["12", "12.3", "0.1", *FAST_SIM, "--save-images", tmp_path])
    (tmp_path / "roi.json").write_text(content)
    code, _, err = call_main(capfd, ["12", "12.3", "0.1", "--replay", tmp_path])
    assert code == 2 and err.count("\n") == 1 and "roi.json" in err and message in err, err


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
    code, out, _ = call_main(capfd, ["-0.3", "0.3", "0.02", *FAST_SIM, "--sim-start-mm", "12.2", "--relative", "--json",
                                     "--save-images", tmp_path])
    result = json.loads(out)
    assert code == 0 and abs(result["best_mm"] - 12.34) <= 0.02
    assert [z for z, _ in result["curve"]] == autofocus.plan_positions(11.9, 12.5, 0.02)
    # A replayed stage starts at the lowest recorded z (11.9): 0..0.6 from there is the whole stack.
    code, out, _ = call_main(capfd, ["0", "0.6", "0.02", "--replay", tmp_path, "--relative", "--json"])
    assert code == 0 and json.loads(out)["curve"] == result["curve"]
    code, _, err = call_main(capfd, ["-0.1", "0.1", "0.02", "--replay", tmp_path, "--relative"])
    assert code == 2 and "leaves the allowed interval 11.9..12.5 mm" in err


@pytest.mark.parametrize("argv, message", [
    (["--sim-condenser-na", "-1"], "--sim-condenser-na: -1 is out of range: must be above 0 to 1.4"),
    (["--sim-dust-height-mm", "inf"], "--sim-dust-height-mm: inf is not a finite number"),
    (["--sim-bits", "10"], "--sim-bits: 10 is not one of 8, 12, 16"),
    (["--sim-size", "8x8"], "--sim-size: 8 is out of range: must be from 16 to 10000 pixels"),
    (["--device", "0"], "--device: 0 is out of range"),
    (["--camera-roi", "0,0,4,4"], "--camera-roi: (0, 0, 4, 4) is not a region"),
])
def test_the_cli_names_a_bad_value_by_its_option(argv: list[str], message: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    code = autofocus.main(["12", "12.6", "0.05", *FAST_SIM, *argv])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"autofocus.py: {message}") and err.count("\n") == 1, err
