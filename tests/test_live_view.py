"""--show-images (a live OpenCV window) and the progress bar."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

import autofocus
from conftest import ROOT


@pytest.fixture(scope="module")
def xvfb_display() -> Iterator[str]:
    """A virtual X display (Xvfb), or skip when Xvfb is not installed."""
    if not shutil.which("Xvfb"):
        pytest.skip("Xvfb is not installed (apt-get install xvfb); the live window needs an X display")
    for number in range(90, 110):
        if not os.path.exists(f"/tmp/.X11-unix/X{number}") and not os.path.exists(f"/tmp/.X{number}-lock"):
            break
    server = subprocess.Popen(["Xvfb", f":{number}", "-screen", "0", "1280x800x24", "-nolisten", "tcp"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not os.path.exists(f"/tmp/.X11-unix/X{number}") and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f":{number}"
    finally:
        server.terminate()
        server.wait(timeout=10)


def run(display: str | None, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    if display:
        env["DISPLAY"] = display
    return subprocess.run([sys.executable, "autofocus.py", *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def test_live_window_runs_a_whole_sweep(xvfb_display: str, tmp_path) -> None:
    proc = run(xvfb_display, "10", "14", "0.05", "--simulate", "--sim-time-scale", "0", "--sim-size", "320x200",
               "--show-images", "--save-images", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "best focus at 12.3" in proc.stdout
    assert len(list(tmp_path.glob("frame_*.png"))) == 81


def test_unreachable_display_is_one_line_not_a_crash() -> None:
    # A stale DISPLAY (e.g. an SSH session that ended) would make Qt abort the process.
    proc = run(":4321", "10", "14", "0.05", "--simulate", "--show-images")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "cannot open a window on DISPLAY=:4321" in proc.stderr and "--save-images" in proc.stderr


def test_compose_view_is_one_picture_of_four_panels() -> None:
    from conftest import sim_frame

    curve = [autofocus.Sample(z, 1.0 + z) for z in (0.0, 0.1, 0.2)]
    view = autofocus.compose_view(sim_frame(0.0), 9, curve, height=120)
    assert view.ndim == 3 and view.shape[0] == 120 and view.shape[2] == 3
    assert view.shape[1] > 4 * 120  # frame, filtered, Laplacian (each 1.6:1) and the curve


def test_progress_bar_on_a_terminal(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    code = autofocus.main(["10", "11", "0.05", "--simulate", "--sim-time-scale", "0", "--sim-size", "64x48",
                           "--sim-focus-mm", "10.5"])
    err = capsys.readouterr().err
    assert code == 0 and "autofocus:" in err and "/21 [" in err and "frame/s" in err


def test_no_progress_bar_when_piped_or_verbose(monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["10", "11", "0.05", "--simulate", "--sim-time-scale", "0", "--sim-size", "64x48", "--sim-focus-mm", "10.5"]
    assert autofocus.main(argv) == 0
    assert "/21 [" not in capsys.readouterr().err
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert autofocus.main([*argv, "--verbose"]) == 0
    assert "/21 [" not in capsys.readouterr().err
