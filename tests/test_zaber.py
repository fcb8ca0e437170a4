"""End to end through the REAL Zaber Motion Library against the project's fake Zaber device.

Each test starts tests/fake_zaber.py on 127.0.0.1, runs ``autofocus.py ... tcp://127.0.0.1:PORT
--camera sim`` as a subprocess (the simulated camera renders what the fake stage's position would
show) and reads the fake's command log: what moved, where, in which order.
"""
from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import autofocus
from conftest import ROOT
from fake_zaber import DeviceConfig, FakeZaber, Faults

NM = 1_000_000  # native units (1 nm) per mm
SIM = ["--camera", "sim", "--native-unit-nm", "1", "--sim-time-scale", "0", "--sim-size", "320x200"]


@pytest.fixture
def fake() -> Iterator[FakeZaber]:
    with FakeZaber(devices=[DeviceConfig(homed=True, position=5 * NM)]) as f:
        yield f


def url(fake: FakeZaber) -> str:
    return f"tcp://127.0.0.1:{fake.port}"


def cli(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "autofocus.py", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def nm(mm: float) -> int:
    return round(mm * NM)


# --- the card's job --------------------------------------------------------------------------------

def test_sweep_visits_every_position_in_order_and_ends_at_the_best() -> None:
    with FakeZaber() as fake:  # not homed: the tool must home it first, and say so
        proc = cli("10", "11", "0.05", url(fake), *SIM, "--sim-focus-mm", "10.52", "--json")
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        positions = autofocus.plan_positions(10, 11, 0.05)
        motion = fake.motion_commands()
        assert motion[0] == "home" and "homing device 3 axis 1" in proc.stderr
        assert fake.move_targets() == [nm(z) for z in positions] + [nm(out["best_mm"])]
        assert fake.position() == nm(out["best_mm"])
        assert abs(out["best_mm"] - 10.52) <= 0.05
        assert out["frames"] == len(positions) and out["verdict"] == "focused"


def test_downward_sweep_with_end_off_the_grid(fake: FakeZaber) -> None:
    proc = cli("11", "10.02", "0.1", url(fake), *SIM, "--sim-focus-mm", "10.5", "--json")
    assert proc.returncode == 0, proc.stderr
    targets = fake.move_targets()
    assert targets[:-1] == [nm(z) for z in autofocus.plan_positions(11, 10.02, 0.1)]
    assert targets[-2] == nm(10.02) and "home" not in fake.motion_commands()


def test_a_homed_axis_is_never_homed_again(fake: FakeZaber, capsys: pytest.CaptureFixture[str]) -> None:
    # Homing drives to the home sensor, across whatever lies between: an axis that has its
    # reference position is not homed by a run, nor by the next run, nor by asking the stage.
    from zaber_motion.ascii import Connection

    for _ in range(2):
        assert autofocus.main(["10", "11", "0.1", url(fake), *SIM, "--sim-focus-mm", "10.52"]) == 0
    with Connection.open_tcp("127.0.0.1", fake.port) as connection:
        stage = autofocus.ZaberStage.from_axis(connection.get_device(3).get_axis(1), native_unit_nm=1)
        assert stage.homed is True and stage.home_if_needed() is False
    assert abs(fake.position() - nm(10.52)) <= nm(0.1) and len(fake.move_targets()) == 2 * (11 + 1)  # two runs
    assert not [c for c in fake.commands() if "home" in c]


def test_fast_search_through_zml(fake: FakeZaber) -> None:
    proc = cli("10", "14", "0.05", url(fake), *SIM, "--search", "fast", "--json")
    out = json.loads(proc.stdout)
    assert proc.returncode == 0 and out["frames"] <= 81 // 4
    assert fake.position() == nm(out["best_mm"]) and abs(out["best_mm"] - 12.34) <= 0.05


def test_no_peak_returns_the_stage_to_where_it_started(fake: FakeZaber) -> None:
    proc = cli("10", "12", "0.05", url(fake), *SIM, "--sim-specimen", "blank", "--json")
    assert proc.returncode == autofocus.EXIT_NO_PEAK
    assert fake.move_targets()[-1] == 5 * NM == fake.position()


def test_slow_replies_still_work(fake: FakeZaber) -> None:
    fake.inject(reply_delay_s=0.02)
    proc = cli("10", "11", "0.05", url(fake), *SIM, "--sim-focus-mm", "10.52")
    assert proc.returncode == 0, proc.stderr


# --- configuration problems: one line, exit 2, nothing moves -------------------------------------------

def test_device_absent_lists_what_was_found(fake: FakeZaber) -> None:
    proc = cli("10", "11", "0.05", url(fake), *SIM, "--device", "5")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "no Zaber device 5" in proc.stderr and "found: device 3" in proc.stderr
    assert "device number (--device N)" in proc.stderr  # the adapter's term, named by the option here
    assert fake.motion_commands() == []


def test_axis_absent(fake: FakeZaber) -> None:
    proc = cli("10", "11", "0.05", url(fake), *SIM, "--axis", "2")
    assert proc.returncode == 2 and "has no axis 2" in proc.stderr and proc.stderr.count("\n") == 1
    assert "axis number (--axis N)" in proc.stderr
    assert fake.motion_commands() == []


def test_offline_identification_names_the_ways_out(fake: FakeZaber) -> None:
    proc = cli("10", "11", "0.05", url(fake), "--camera", "sim", "--sim-time-scale", "0")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "--device-db" in proc.stderr and "--native-unit-nm" in proc.stderr
    assert fake.motion_commands() == []


def test_missing_device_database_file(fake: FakeZaber) -> None:
    proc = cli("10", "11", "0.05", url(fake), "--camera", "sim", "--device-db", "/nonexistent/devices.sqlite")
    assert proc.returncode == 2 and "no such file" in proc.stderr and proc.stderr.count("\n") == 1
    assert fake.commands() == []  # refused before connecting


def test_port_that_does_not_exist() -> None:
    for port in ("/dev/ttyDOESNOTEXIST0", "tcp://127.0.0.1:1"):
        proc = cli("10", "11", "0.05", port, *SIM, "--json")
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "cannot open" in proc.stderr, port
        assert json.loads(proc.stdout)["exit_code"] == 2


def test_bad_tcp_address() -> None:
    proc = cli("10", "11", "0.05", "tcp://nohostport", *SIM)
    assert proc.returncode == 2 and "tcp://HOST:PORT" in proc.stderr


@pytest.mark.parametrize("argv, message", [
    (["20", "30", "0.05"], "leaves the allowed interval 0..25"),
    (["10", "14", "0.05", "--z-max", "12"], "soft limits"),
    (["10", "14", "0.05", "--z-min", "11"], "soft limits"),
    (["0", "2", "0.05", "--backlash-mm", "0.05"], "backlash"),
    (["10", "14", "0.05", "--save-curve", "/nonexistent-dir/c.csv"], "does not exist"),
])
def test_bad_plans_never_move_the_stage(argv: list[str], message: str) -> None:
    with FakeZaber() as fake:  # not homed: even homing must not happen
        proc = cli(*argv, url(fake), *SIM)
        assert proc.returncode == 2 and message in proc.stderr and proc.stderr.count("\n") == 1
        assert fake.motion_commands() == []


@pytest.mark.parametrize("argv", [
    ["nan", "14", "0.05"], ["10", "14", "0"], ["10", "14", "9"], ["10", "10", "0.05"],
    ["10", "14", "0.05", "--blur", "4"], ["10", "14", "0.05", "--metric", "x"],
    ["10", "14", "0.05", "--search", "x"], ["10", "14", "0.05", "--settle-ms", "-1"],
    ["0", "25", "0.000001"],
])
def test_bad_input_never_moves_the_stage(fake: FakeZaber, argv: list[str]) -> None:
    proc = cli(*argv, url(fake), *SIM)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert fake.motion_commands() == []


# --- faults during the run: keep what was measured, exit 5; only the tool's own stop returns to start ---

def run_with_fault(tmp_path: Path, fault: dict, *extra: str) -> tuple[subprocess.CompletedProcess[str], FakeZaber]:
    fake = FakeZaber(devices=[DeviceConfig(homed=True, position=5 * NM)], faults=Faults(**fault)).start()
    try:
        proc = cli("10", "11", "0.05", url(fake), *SIM, "--sim-focus-mm", "10.5", "--json",
                   "--save-curve", str(tmp_path / "curve.csv"), "--save-images", str(tmp_path / "frames"), *extra)
        return proc, fake
    finally:
        fake.stop()


def partial_rows(tmp_path: Path) -> tuple[int, int]:
    curve = (tmp_path / "curve.csv").read_text().splitlines()
    stack = (tmp_path / "frames" / "stack.csv").read_text().splitlines()
    return len(curve) - 1, len(stack) - 1


def test_rejected_move(tmp_path: Path) -> None:
    # The device refused a valid move: an event the tool did not cause, so nothing more moves (issue 18).
    proc, fake = run_with_fault(tmp_path, {"reject_move": 6})
    out = json.loads(proc.stdout)
    assert proc.returncode == 5 and "rejected the move to 10.2500 mm" in proc.stderr
    assert proc.stderr.count("\n") == 1 and "nothing more was moved; the stage is at 10.2000 mm" in proc.stderr
    assert fake.position() == round(10.2 * NM) and "stop" not in fake.commands()
    assert out["frames"] == 5 and len(out["curve"]) == 5 and out["error"] and out["verdict"] == "failed"
    assert partial_rows(tmp_path) == (5, 5)


def test_stall(tmp_path: Path) -> None:
    # A fault: the objective may be blocked, so nothing more moves -- no return through it (issue 18).
    proc, fake = run_with_fault(tmp_path, {"stall_at_move": 4})
    assert proc.returncode == 5 and "Stalled" in proc.stderr and proc.stderr.count("\n") == 1
    assert "nothing more was moved" in proc.stderr
    assert fake.position() == round(10.125 * NM) and len(fake.move_targets()) == 4  # halfway 10.10 -> 10.15
    assert partial_rows(tmp_path) == (3, 3)


def test_disconnect(tmp_path: Path) -> None:
    proc, fake = run_with_fault(tmp_path, {"disconnect_at_move": 4})
    out = json.loads(proc.stdout)
    assert proc.returncode == 5 and proc.stderr.count("\n") == 1
    assert "lost the stage" in proc.stderr and "no longer answers" in proc.stderr
    assert out["frames"] == 3 and partial_rows(tmp_path) == (3, 3)


def test_device_stops_answering(tmp_path: Path) -> None:
    t0 = time.monotonic()
    proc, fake = run_with_fault(tmp_path, {"silent_after_move": 4})
    assert time.monotonic() - t0 < 30  # every wait has a timeout
    assert proc.returncode == 5 and proc.stderr.count("\n") == 1 and "no longer answers" in proc.stderr
    assert partial_rows(tmp_path)[0] == 3


def test_axis_busy_forever_is_stopped_after_the_move_timeout(tmp_path: Path) -> None:
    proc, fake = run_with_fault(tmp_path, {"busy_forever_at_move": 3}, "--move-timeout-s", "1")
    assert proc.returncode == 5 and "still busy after 1 s" in proc.stderr and "raise --move-timeout-s" in proc.stderr
    assert "stop" in fake.commands() and fake.position() == 5 * NM
    assert partial_rows(tmp_path)[0] == 2


def test_ctrl_c_stops_returns_and_keeps_the_partial_curve(tmp_path: Path) -> None:
    with FakeZaber(devices=[DeviceConfig(homed=True, position=5 * NM)]) as fake:
        proc = subprocess.Popen(
            [sys.executable, "autofocus.py", "10", "14", "0.05", url(fake), "--camera", "sim", "--native-unit-nm",
             "1", "--sim-size", "320x200", "--sim-time-scale", "1", "--json", "--save-curve",
             str(tmp_path / "curve.csv")], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while len(fake.move_targets()) < 6 and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 130, err
        assert "interrupted" in err and "returned to its start, 5.0000 mm" in err and err.count("\n") == 1
        assert fake.position() == 5 * NM and "stop" in fake.commands()
        result = json.loads(out)
        rows = (tmp_path / "curve.csv").read_text().splitlines()
        assert 4 <= result["frames"] < 81 and len(rows) - 1 == result["frames"]


def test_serial_port_held_by_another_program() -> None:
    # A pseudo-terminal stands in for the USB serial port; another program (here ZML itself, opened
    # directly, not through Launcher's shared port) holds it open.
    import os
    import pty

    from zaber_motion.ascii import Connection

    master, slave = pty.openpty()
    port = os.ttyname(slave)
    holder = Connection.open_serial_port(port)
    try:
        proc = cli("10", "11", "0.05", port, *SIM)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1
        # ZML shares a port Zaber Launcher holds (direct=False): only a program that does not share it
        # makes it busy, and the line must not send the user to close Launcher.
        assert f"serial port {port} is held by a program that does not share it" in proc.stderr
        assert "Zaber Launcher shares its ports" in proc.stderr
    finally:
        holder.close()
        os.close(master)
        os.close(slave)


# --- native units: a coarse (1 um) axis ------------------------------------------------------------

@pytest.fixture
def micron_fake() -> Any:
    """A homed axis whose native unit is 1 um (coarse): 25 mm of travel, at 10.005 mm."""
    with FakeZaber(devices=[DeviceConfig(homed=True, limit_max=25_000, position=10_005)]) as fake:
        yield fake


def test_a_step_below_a_few_native_units_is_refused_before_anything_moves(micron_fake: FakeZaber,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    code = autofocus.main(["10", "10.02", "0.002", url(micron_fake), "--camera", "sim", "--native-unit-nm", "1000",
                           "--sim-time-scale", "0", "--sim-size", "320x200"])
    err = capsys.readouterr().err
    assert code == 2 and "STEP_MM 0.002 mm is 2 native units of this stage (one unit is 1000 nm)" in err
    assert "at least 3 units" in err and micron_fake.motion_commands() == []


def test_rounding_to_native_units_never_leaves_the_soft_limits(micron_fake: FakeZaber) -> None:
    # 10.0001 and 10.0106 mm are 10000.1 and 10010.6 units: plain rounding would command 10000
    # (below --z-min) and 10011 (above --z-max).
    code = autofocus.main(["10.0001", "10.0106", "0.0035", url(micron_fake), "--camera", "sim", "--native-unit-nm",
                           "1000", "--z-min", "10.0001", "--z-max", "10.0106", "--sim-time-scale", "0", "--sim-size",
                           "320x200", "--sim-focus-mm", "10.005"])
    assert code in (0, 3, 4)
    targets = micron_fake.move_targets()
    assert targets[:4] == [10001, 10004, 10007, 10010]
    assert all(10001 <= t <= 10010 for t in targets)  # the final move (or the return to 10005) too


def test_a_start_outside_the_soft_limits_is_not_returned_to_nor_clamped(micron_fake: FakeZaber) -> None:
    # Issue 18: nothing outside --z-min/--z-max is ever commanded, not even the return to a start
    # outside them (10.005 mm < 10.010): no_peak leaves the stage at the last frame -- never silently
    # at the limit either.
    code = autofocus.main(["10.010", "10.040", "0.005", url(micron_fake), "--camera", "sim", "--native-unit-nm",
                           "1000", "--z-min", "10.010", "--sim-time-scale", "0", "--sim-size", "320x200",
                           "--sim-specimen", "blank"])
    assert code == 3 and min(micron_fake.move_targets()) >= 10_010
    assert micron_fake.move_targets()[-1] == 10_040 and micron_fake.position() == 10_040


# --- bad settings: refused before any device traffic ----------------------------------------------------

ZABER_BAD = [({"native_unit_nm": -1}, "native_unit_nm"), ({"native_unit_nm": "1"}, "native_unit_nm"),
             ({"move_timeout_s": math.nan}, "move_timeout_s"), ({"home_timeout_s": 0}, "home_timeout_s"),
             ({"clear_faults": "yes"}, "clear_faults")]


def test_from_axis_refuses_bad_settings_before_any_device_traffic() -> None:
    from zaber_motion.ascii import Connection

    with FakeZaber(devices=[DeviceConfig(homed=True, position=round(12.3 * NM))]) as fake:
        with Connection.open_tcp("127.0.0.1", fake.port) as connection:
            axis = connection.get_device(3).get_axis(1)
            sent = len(fake.commands())
            for keywords, named in ZABER_BAD:
                with pytest.raises(autofocus.BadValue) as caught:
                    autofocus.ZaberStage.from_axis(axis, **{"native_unit_nm": 1, **keywords})
                assert str(caught.value).startswith(named)
            with pytest.raises(autofocus.UsageError, match="needs a zaber_motion.ascii.Axis"):
                autofocus.ZaberStage.from_axis(None, native_unit_nm=1)  # type: ignore[arg-type]
            assert len(fake.commands()) == sent  # not one request reached the device


@pytest.mark.parametrize("keywords, named", [({"device": 0}, "device"), ({"axis": 1.0}, "axis"),
                                             ({"port": ""}, "port"), ({"device_db": 5}, "device_db")])
def test_zaber_stage_refuses_bad_settings_before_opening_the_port(keywords: dict, named: str) -> None:
    with pytest.raises(autofocus.BadValue) as caught:
        autofocus.ZaberStage(**{"port": "tcp://127.0.0.1:9", **keywords})  # nothing listens there: not opened
    assert str(caught.value).startswith(named)
