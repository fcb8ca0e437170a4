"""Issue 10, signals, outputs and the terminal: the promises held under abuse.

Signals are real (sent to a subprocess, or raised in this process with ``signal.raise_signal``);
the stage is the REAL ZML against tests/fake_zaber.py wherever "the stage was stopped" is
claimed, so the fake's log shows what was actually sent.
"""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import autofocus
from conftest import FAST_SIM, ROOT
from fake_zaber import DeviceConfig, FakeZaber

NM = 1_000_000
ZABER_SIM = ["--camera", "sim", "--native-unit-nm", "1", "--sim-size", "320x200"]
POSIX = os.name == "posix"


def url(fake: FakeZaber) -> str:
    return f"tcp://127.0.0.1:{fake.port}"


def start(*argv: str | Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "autofocus.py", *map(str, argv)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(condition: Any, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


@pytest.fixture
def slow_fake() -> Iterator[FakeZaber]:
    """A stage at 5 mm that moves 5 mm/s: the return to start takes about a second."""
    with FakeZaber(devices=[DeviceConfig(homed=True, position=5 * NM)], speed_native_per_s=5e6) as f:
        yield f


# --- signals ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, code", [("SIGTERM", 143), ("SIGHUP", 129), ("SIGINT", 130)])
def test_a_signal_mid_sweep_stops_returns_and_writes_everything(slow_fake: FakeZaber, tmp_path: Path, name: str,
                                                                code: int) -> None:
    if not hasattr(signal, name):
        pytest.skip(f"{name} does not exist on this platform")
    curve = tmp_path / "curve.csv"
    proc = start("10", "10.5", "0.05", url(slow_fake), *ZABER_SIM, "--sim-time-scale", "0", "--json",
                 "--save-curve", curve)
    wait_for(lambda: len(slow_fake.move_targets()) >= 4)
    proc.send_signal(getattr(signal, name))
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == code, err
    assert err.count("\n") == 1 and "returned to its start, 5.0000 mm" in err
    assert {"SIGTERM": "terminated (SIGTERM)", "SIGHUP": "hung up", "SIGINT": "interrupted (Ctrl-C)"}[name] in err
    assert "stop" in slow_fake.commands() and slow_fake.position() == 5 * NM  # stopped, then sent back
    result = json.loads(out)
    assert result["exit_code"] == code and result["frames"] >= 1
    assert len(curve.read_text().splitlines()) - 1 == result["frames"]  # nothing measured is lost


def test_a_second_interrupt_during_the_return_stops_again_and_reports_the_real_position() -> None:
    with FakeZaber(devices=[DeviceConfig(homed=True, position=5 * NM)], speed_native_per_s=3e6) as slow_fake:
        second_interrupt_during_the_return(slow_fake)  # 3 mm/s: the return to start takes ~1.7 s


def second_interrupt_during_the_return(slow_fake: FakeZaber) -> None:
    proc = start("10", "10.5", "0.05", url(slow_fake), *ZABER_SIM, "--sim-time-scale", "0", "--json")
    wait_for(lambda: len(slow_fake.move_targets()) >= 4)
    proc.send_signal(signal.SIGINT)
    wait_for(lambda: slow_fake.move_targets()[-1] == 5 * NM)  # the return to start has begun
    time.sleep(0.2)  # mid-way: about 1 mm of the 5 mm back
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "the return to 5.0000 mm was interrupted; stop sent again, the stage reports" in err
    reported_mm = float(err.split("the stage reports ")[1].split(" mm")[0])
    assert abs(reported_mm * NM - slow_fake.position()) < 100  # what the stage says, read once it had stopped
    assert 5 * NM < slow_fake.position() < 10 * NM  # stopped on the way, not at start
    assert slow_fake.commands().count("stop") >= 2  # the second interrupt sent stop again
    assert json.loads(out)["exit_code"] == 130 and err.count("\n") == 1


def test_double_interrupt_while_saving_images_keeps_the_stack_consistent(tmp_path: Path) -> None:
    stack = tmp_path / "stack"
    proc = start("10", "14", "0.05", *FAST_SIM[:1], "--sim-size", "320x200", "--sim-time-scale", "0.5",
                 "--save-images", stack)
    wait_for(lambda: (stack / "frame_00003.png").exists())
    proc.send_signal(signal.SIGINT)
    time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    rows = (stack / "stack.csv").read_text().splitlines()[1:]
    pngs = sorted(p.name for p in stack.glob("frame_*.png"))
    assert [r.split(",")[1] for r in rows] == pngs  # every file listed, every listed file there
    assert not list(stack.glob(".*.part"))
    replay = subprocess.run([sys.executable, "autofocus.py", "10", "10.1", "0.05", "--replay", stack],
                            cwd=ROOT, capture_output=True, text=True)
    assert "stack.csv" not in replay.stderr  # the partial stack is a valid stack


def test_interrupt_after_the_last_frame_keeps_every_frame(monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    real_decide = autofocus.decide

    def decide(*args: Any, **kwargs: Any) -> Any:  # every frame is measured; Ctrl-C comes before the final move
        signal.raise_signal(signal.SIGINT)
        return real_decide(*args, **kwargs)

    monkeypatch.setattr(autofocus, "decide", decide)
    code = autofocus.main(["10", "11", "0.05", *FAST_SIM, "--sim-start-mm", "3", "--json"])
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert code == 130 and out["frames"] == 21 and len(out["curve"]) == 21
    assert "before the search started" not in captured.err and "returned to its start, 3.0000 mm" in captured.err


def test_interrupt_while_writing_the_outputs_still_writes_them(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    real_write = autofocus.write_curve_csv

    def write_curve_csv(path: Any, samples: Any) -> None:
        signal.raise_signal(signal.SIGTERM)
        real_write(path, samples)

    monkeypatch.setattr(autofocus, "write_curve_csv", write_curve_csv)
    code = autofocus.main(["10", "11", "0.05", *FAST_SIM, "--json", "--save-curve", str(tmp_path / "c.csv"),
                           "--plot", str(tmp_path / "c.png")])
    captured = capsys.readouterr()
    out = json.loads(captured.out)  # exactly one JSON object
    assert code == 143 and out["exit_code"] == 143 and out["frames"] == 21
    assert len((tmp_path / "c.csv").read_text().splitlines()) == 22 and (tmp_path / "c.png").stat().st_size > 0
    assert "terminated (SIGTERM) after the search had finished" in captured.err and captured.err.count("\n") == 1


def test_interrupt_before_the_search_is_one_line_and_one_json(monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    def open_microscope(args: Any, stack: Any = None) -> Any:
        signal.raise_signal(signal.SIGTERM)
        raise AssertionError("not reached")

    monkeypatch.setattr(autofocus, "open_microscope", open_microscope)
    code = autofocus.main(["10", "11", "0.05", *FAST_SIM, "--json"])
    captured = capsys.readouterr()
    assert code == 143 and json.loads(captured.out)["exit_code"] == 143
    assert captured.err == "autofocus.py: terminated (SIGTERM) before the search started; nothing was measured, " \
                           "and any motion (homing) was stopped\n"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # main() put the handlers back


def test_interrupt_while_importing_is_one_line(tmp_path: Path) -> None:
    # A cv2 that takes a Ctrl-C while loading (as a cold start of OpenCV can take seconds).
    (tmp_path / "cv2").mkdir()
    (tmp_path / "cv2" / "__init__.py").write_text("raise KeyboardInterrupt\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run([sys.executable, "autofocus.py", "10", "11", "0.05", "--simulate", "--json"], cwd=ROOT,
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 130
    assert proc.stderr == "autofocus.py: interrupted while starting; nothing was opened or moved\n"
    assert json.loads(proc.stdout)["exit_code"] == 130


@pytest.mark.skipif(not hasattr(signal, "SIGTERM") or not POSIX, reason="kill from outside is POSIX")
def test_a_kill_while_importing_is_one_line_and_its_own_exit_code(tmp_path: Path) -> None:
    (tmp_path / "cv2").mkdir()
    marker = tmp_path / "loading"
    (tmp_path / "cv2" / "__init__.py").write_text(  # a very slow cold start, that says when it began
        f"import pathlib, time\npathlib.Path({str(marker)!r}).touch()\ntime.sleep(30)\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "autofocus.py", "10", "11", "0.05", "--simulate", "--json"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    wait_for(marker.exists)  # the libraries are loading now
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 143 and err == "autofocus.py: interrupted while starting; nothing was opened or moved\n"
    assert json.loads(out)["exit_code"] == 143


# --- outputs ----------------------------------------------------------------------------------------

def output_cases(tmp_path: Path) -> list[tuple[list[str], str]]:
    (tmp_path / "adir").mkdir()
    (tmp_path / "imgs" / "stack.csv").mkdir(parents=True)
    cases = [
        (["--save-curve", str(tmp_path / "adir")], "is a folder; give a file name"),
        (["--plot", str(tmp_path / "p")], "has no extension"),
        (["--plot", str(tmp_path / "p.xyz")], ".xyz is not a format matplotlib writes"),
        (["--save-curve", str(tmp_path / "same.png"), "--plot", str(tmp_path / "same.png")],
         "is also written as --save-curve"),
        (["--save-images", str(tmp_path / "imgs")], "stack.csv is a folder"),
        (["--save-images", str(tmp_path / "adir"), "--save-curve", str(tmp_path / "adir" / "stack.csv")],
         "is also written as --save-images's stack.csv"),
        (["--save-curve", ""], "empty path"),
    ]
    if POSIX:
        cases.append((["--save-curve", "/dev/full"], "it is a device, not a file; give a file name"))
    return cases


def test_bad_outputs_are_refused_before_anything_moves_even_homing(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    with FakeZaber(devices=[DeviceConfig(homed=False, position=5 * NM)]) as unhomed:
        for extra, message in output_cases(tmp_path):
            code = autofocus.main(["10", "10.5", "0.05", url(unhomed), *ZABER_SIM, "--sim-time-scale", "0", *extra])
            err = capsys.readouterr().err
            assert code == 2 and message in err and err.count("\n") == 1, (extra, err)
        assert unhomed.motion_commands() == []  # not one move, not even homing


def test_a_curve_inside_a_new_images_folder_and_a_frame_like_name_are_fine(tmp_path: Path) -> None:
    images = tmp_path / "new" / "imgs"  # does not exist yet: --save-images creates it
    code = autofocus.main(["12", "12.6", "0.05", *FAST_SIM, "--save-images", str(images), "--save-curve",
                           str(images / "curve.csv"), "--plot", str(images / "frame_scores.png")])
    assert code == 0 and (images / "curve.csv").is_file() and (images / "frame_scores.png").is_file()


def test_saving_images_into_the_replayed_stack_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stack = tmp_path / "stack"
    assert autofocus.main(["12", "12.6", "0.05", *FAST_SIM, "--save-images", str(stack)]) == 0
    before = {p.name: p.read_bytes() for p in stack.iterdir()}
    capsys.readouterr()
    code = autofocus.main(["12", "12.6", "0.05", "--replay", str(stack), "--save-images", str(stack)])
    assert code == 2 and "is the stack being replayed" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in stack.iterdir()} == before  # the recording is untouched


def test_exactly_the_plot_path_given_is_written(tmp_path: Path) -> None:
    assert autofocus.main(["12", "12.6", "0.05", *FAST_SIM, "--plot", str(tmp_path / "curve.pdf")]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["curve.pdf"]
    assert (tmp_path / "curve.pdf").read_bytes().startswith(b"%PDF")


def test_a_curve_file_that_fails_mid_run_is_one_line_and_the_json_keeps_the_curve(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import errno

    def write_curve_csv(path: Any, samples: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(autofocus, "write_curve_csv", write_curve_csv)
    code = autofocus.main(["10", "11", "0.05", *FAST_SIM, "--json", "--save-curve", str(tmp_path / "c.csv")])
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert code == 5 and out["exit_code"] == 5 and len(out["curve"]) == 21
    assert "writing --save-curve" in captured.err and "No space left on device" in captured.err
    assert captured.err.count("\n") == 1


@pytest.mark.skipif(not POSIX, reason="RLIMIT_FSIZE is POSIX")
def test_a_disk_that_fills_up_while_saving_images_stops_the_run_and_leaves_a_replayable_stack(
        tmp_path: Path) -> None:
    import resource

    def small_disk() -> None:  # a file past 37 kB fails with EFBIG, as on a full disk with ENOSPC: the
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # blurred frames' PNGs are ~36.8 kB, sharper ones more
        resource.setrlimit(resource.RLIMIT_FSIZE, (37_000, 37_000))

    stack = tmp_path / "stack"
    proc = subprocess.run([sys.executable, "autofocus.py", "10", "14", "0.05", *FAST_SIM, "--save-images", str(stack), "--json"], cwd=ROOT, capture_output=True, text=True,
                          preexec_fn=small_disk)
    assert proc.returncode == 5, proc.stderr
    assert proc.stderr.count("\n") == 1 and "--save-images: writing" in proc.stderr and "libpng" not in proc.stderr
    out = json.loads(proc.stdout)
    assert 0 < out["frames"] < 81
    rows = (stack / "stack.csv").read_text().splitlines()[1:]
    assert [r.split(",")[1] for r in rows] == sorted(p.name for p in stack.glob("frame_*.png"))
    replay = subprocess.run([sys.executable, "autofocus.py", "10", "10.05", "0.05", "--replay", str(stack)],
                            cwd=ROOT, capture_output=True, text=True)
    assert replay.returncode in (0, 3, 4), replay.stderr  # a valid (partial) stack


# --- terminal ---------------------------------------------------------------------------------------

class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_fault_while_the_progress_bar_is_drawn_starts_its_own_line(monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    real_capture = autofocus.SimCamera.capture
    frames = []

    def capture(self: autofocus.SimCamera) -> Any:
        frames.append(1)
        if len(frames) == 6:
            raise autofocus.CameraError("camera timed out")
        return real_capture(self)

    monkeypatch.setattr(autofocus.SimCamera, "capture", capture)
    code = autofocus.main(["10", "11", "0.05", *FAST_SIM])
    text = terminal.getvalue()
    assert code == 5 and "autofocus:" in text  # the bar was drawn
    line = next(seg for seg in text.split("\n") if "autofocus.py:" in seg)
    assert line.split("\r")[-1].startswith("autofocus.py: camera timed out")  # not glued to the bar


# --- two instances on one port ----------------------------------------------------------------------

def test_two_instances_on_the_same_axis_notice_each_other(slow_fake: FakeZaber) -> None:
    argv = ("10", "10.5", "0.05", url(slow_fake), *ZABER_SIM, "--sim-time-scale", "0", "--sim-focus-mm", "10.25")
    first, second = start(*argv), start(*argv)
    results = [(p.wait(timeout=60), p.stderr.read()) for p in (first, second)]  # type: ignore[union-attr]
    for p in (first, second):
        p.stdout.close()  # type: ignore[union-attr]
        p.stderr.close()  # type: ignore[union-attr]
    codes = sorted(code for code, _ in results)
    assert codes != [0, 0], results  # they fought over the axis: never two successes
    for code, err in results:  # each failure says what happened: its move was cut short, or the
        if code != 0:  # axis was already moving when it started (then it commanded nothing)
            assert code == 5 and err.count("\n") == 1, err
            # (the other instance's set-up may clear the NI notice first: then the move is off target, or the
            # axis is found moving or not where this instance left it)
            assert any(said in err for said in (
                "moved or stopped from outside (NI", "is moving (the knob or joystick, Zaber Launcher or another",
                "was moving, not by this tool's command", "stopped or moved from outside",
                "someone else is moving it", "it was moved from outside while it stood still")), err
            assert "nothing more was moved" in err or "nothing was commanded" in err, err


def test_ctrl_c_during_homing_stops_the_axis_and_says_where_it_is(capsys: pytest.CaptureFixture[str]) -> None:
    import threading

    from fake_zaber import Faults

    with FakeZaber(devices=[DeviceConfig(homed=False, position=5 * NM)],
                   faults=Faults(busy_forever_at_home=True)) as homing:
        def interrupt_mid_homing() -> None:
            deadline = time.monotonic() + 20
            while "home" not in homing.commands() and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.2)
            os.kill(os.getpid(), signal.SIGINT)

        watcher = threading.Thread(target=interrupt_mid_homing)
        watcher.start()
        try:
            code = autofocus.main(["10", "10.5", "0.05", url(homing), *ZABER_SIM, "--sim-time-scale", "0", "--json"])
        finally:
            watcher.join()
        captured = capsys.readouterr()
        assert code == 130 and json.loads(captured.out)["exit_code"] == 130
        lines = captured.err.splitlines()
        assert lines[0].startswith("homing device 3 axis 1") and len(lines) == 2  # announced, then one line
        assert lines[1].startswith("autofocus.py: interrupted (Ctrl-C); homing was interrupted; stop sent again, "
                                   "the stage reports")
        commands = homing.commands()
        assert "home" in commands and "stop" in commands[commands.index("home"):]
        assert not homing.is_busy()
