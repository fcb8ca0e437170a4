"""The command line on the simulated microscope: the card's command, options, and one-line errors."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

import autofocus
from conftest import FAST_SIM, ROOT


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
