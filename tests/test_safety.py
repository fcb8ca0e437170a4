"""Safety: no command ever leaves the allowed interval; camera faults leave the stage safe; signals and
interrupts (real ones: sent to a subprocess, or raised in this process with ``signal.raise_signal``) stop
the stage, return it and keep the partial curve; another program on the same axis is noticed.  The stage
is the REAL ZML against tests/fake_zaber.py wherever "the stage was stopped" is claimed, so the fake's
log shows what was actually sent."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import autofocus
from cli_runs import url
from conftest import FAST_SIM, ROOT
from fake_zaber import DeviceConfig, FakeZaber

NM = 1_000_000
ZABER_SIM = ["--camera", "sim", "--native-unit-nm", "1", "--sim-size", "320x200"]
POSIX = os.name == "posix"
TINY_SIM = ["--camera", "sim", "--native-unit-nm", "1", "--sim-time-scale", "0", "--sim-size", "64x48"]


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    travel_mm=st.floats(3, 25),
    start_frac=st.floats(-0.2, 1.2),
    end_frac=st.floats(-0.2, 1.2),
    steps=st.integers(1, 60),
    soft=st.tuples(st.one_of(st.none(), st.floats(-1, 26)), st.one_of(st.none(), st.floats(-1, 26))),
    search=st.sampled_from(["sweep", "fast"]),
    backlash=st.sampled_from([0.0, 0.05, 0.3]),
    position_frac=st.floats(0, 1),
    focus_frac=st.floats(-0.2, 1.2),
)
def test_no_command_ever_leaves_the_allowed_interval(travel_mm: float, start_frac: float, end_frac: float,
                                                     steps: int, soft: tuple, search: str, backlash: float,
                                                     position_frac: float, focus_frac: float) -> None:
    start, end = round(start_frac * travel_mm, 3), round(end_frac * travel_mm, 3)
    assume(abs(end - start) >= 0.01)
    step = round(abs(end - start) / steps, 6)
    assume(step > 0)
    z_min, z_max = soft
    assume(z_min is None or z_max is None or z_min < z_max)
    position = round(position_frac * travel_mm * NM)
    argv = [str(start), str(end), str(step), "", *TINY_SIM, "--search", search, "--backlash-mm", str(backlash),
            "--sim-focus-mm", str(round(focus_frac * travel_mm, 3))]
    argv += ["--z-min", str(z_min)] if z_min is not None else []
    argv += ["--z-max", str(z_max)] if z_max is not None else []
    with FakeZaber(devices=[DeviceConfig(homed=True, limit_max=round(travel_mm * NM), position=position)]) as fake:
        argv[3] = f"tcp://127.0.0.1:{fake.port}"
        code = autofocus.main(argv)
        lo = max(0.0, z_min if z_min is not None else -np.inf)
        hi = min(travel_mm, z_max if z_max is not None else np.inf)
        # Every move the fake received, the ones it rejected included.
        targets = [int(r.text.split()[2]) for r in fake.log if r.text.startswith("move abs")]
        # Nothing outside the limits is ever commanded, not even the return to a start outside them.
        outside = [t for t in targets if not (lo * NM - 1 <= t <= hi * NM + 1)]
        assert outside == [], (argv, outside)
        if code == autofocus.EXIT_USAGE:
            assert fake.motion_commands() == []
        else:
            assert code in (0, 3, 4)
            assert all(r.accepted for r in fake.log if r.text.startswith("move"))


# --- camera faults ---------------------------------------------------------------------------------------

@pytest.fixture
def zaber() -> Iterator[FakeZaber]:
    with FakeZaber(devices=[DeviceConfig(homed=True, position=5 * NM)]) as f:
        yield f


def flir_render(fake: FakeZaber) -> object:
    """A FLIR frame showing what the simulated optics would see at the fake stage's position."""
    optics = autofocus.SimOptics(width=160, height=120)
    stage = autofocus.SimStage(travel_mm=(0, 25), timing=autofocus.SimTiming(scale=0.0))
    sim = autofocus.SimCamera(stage, optics, autofocus.SimTiming(scale=0.0))
    return lambda t: sim.render(fake.position() / NM)


def run_flir(PySpin: ModuleType, zaber: FakeZaber, tmp_path: Path, capsys: pytest.CaptureFixture[str],  # noqa: N803
             **fault: object) -> tuple[int, dict, str]:
    PySpin.fake.reset(cameras=[PySpin.FakeCameraSpec(serial="1", width=160, height=120, exposure_auto="Off",
                                                     exposure_us=1000.0, readout_s=0.0005,
                                                     render=flir_render(zaber), **fault)])
    code = autofocus.main(["12", "12.7", "0.05", f"tcp://127.0.0.1:{zaber.port}", "--native-unit-nm", "1",
                           "--camera-timeout-ms", "200", "--json", "--save-curve", str(tmp_path / "c.csv")])
    captured = capsys.readouterr()
    return code, json.loads(captured.out), captured.err


def test_flir_and_zaber_together_find_focus(PySpin, sp, zaber, tmp_path, capsys) -> None:  # noqa: N803
    code, out, err = run_flir(PySpin, zaber, tmp_path, capsys)
    assert code == 0, err
    assert abs(out["best_mm"] - 12.34) <= 0.05 and zaber.position() == round(out["best_mm"] * NM)
    assert PySpin.fake.camera("1").acquisitions_started == 1 and PySpin.fake.buffers_in_use() == 0


@pytest.mark.parametrize("fault, message", [
    # 501 ms, not 200: the frame timeout is never below the exposure (1 ms) + CAMERA_TIMEOUT_MARGIN_MS.
    # Frame 0 is the look before the first move (check_camera): frames 1-5 are scored, frame 6 fails.
    ({"timeout_from_frame": 6}, "no frame from the FLIR camera within 501 ms"),
    ({"error_at_frame": 6}, "no frame from the FLIR camera"),
    ({"incomplete_at_frame": 6}, "incomplete frame"),
    ({"disconnect_at_frame": 6}, "no frame from the FLIR camera"),
])
def test_camera_fault_mid_sweep(PySpin, sp, zaber, tmp_path, capsys, fault, message) -> None:  # noqa: N803
    code, out, err = run_flir(PySpin, zaber, tmp_path, capsys, **fault)
    assert code == autofocus.EXIT_HARDWARE and message in err and err.count("\n") == 1
    assert "returned to its start, 5.0000 mm" in err and zaber.position() == 5 * NM
    assert out["frames"] == 5 == len((tmp_path / "c.csv").read_text().splitlines()) - 1


@pytest.mark.parametrize("value, message", [(0, "all black"), (255, "fully saturated")])
def test_black_or_saturated_frames_stop_the_run(monkeypatch, tmp_path, capsys, value, message) -> None:
    real_render = autofocus.SimCamera.render

    def render(self: autofocus.SimCamera, z_mm: float) -> np.ndarray:
        frame = real_render(self, z_mm)
        return np.full_like(frame, value) if z_mm >= 10.3 else frame

    monkeypatch.setattr(autofocus.SimCamera, "render", render)
    code = autofocus.main(["10", "11", "0.05", "--simulate", "--sim-time-scale", "0", "--sim-size", "64x48",
                           "--sim-start-mm", "2", "--json"])
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert code == autofocus.EXIT_HARDWARE and message in captured.err
    assert out["frames"] == 6 and "returned to its start, 2.0000 mm" in captured.err


def test_disk_full_while_saving_images(monkeypatch, tmp_path, capsys) -> None:
    import errno

    real_replace = autofocus.os.replace
    written = []

    def replace(src: str, dst: str) -> None:  # the fifth frame finds the disk full
        written.append(dst)
        if len(written) > 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(autofocus.os, "replace", replace)
    code = autofocus.main(["10", "11", "0.05", "--simulate", "--sim-time-scale", "0", "--sim-size", "64x48",
                           "--sim-start-mm", "2", "--save-images", str(tmp_path), "--json"])
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert code == autofocus.EXIT_HARDWARE and "No space left on device" in captured.err
    assert captured.err.count("\n") == 1
    assert "returned to its start, 2.0000 mm" in captured.err
    assert len((tmp_path / "stack.csv").read_text().splitlines()) == 1 + 4  # the frames saved before it failed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frame_00000.png", "frame_00001.png", "frame_00002.png",
                                                          "frame_00003.png", "stack.csv"]  # no partial file left
    assert out["error"] and out["frames"] >= 4


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
