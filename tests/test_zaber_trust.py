"""Issue 9, Zaber half: the hardware path trusts nothing the real stage does not promise.

The REAL Zaber Motion Library drives tests/fake_zaber.py; ``autofocus.main`` runs in-process (about
0.3 s a run) and the fake's command log says what was sent, in which order.  A second client
connection stands in for Zaber Launcher or another script sharing the port.
"""
from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import autofocus
from fake_zaber import DeviceConfig, FakeZaber, Faults

NM = 1_000_000  # native units (1 nm) per mm
RANGE = ["10", "10.5", "0.05"]  # 11 positions
SIM = ["--camera", "sim", "--sim-time-scale", "0", "--sim-size", "320x200", "--sim-focus-mm", "10.25"]
NATIVE = ["--native-unit-nm", "1"]
MOTION = ("move ", "home")


def url(fake: FakeZaber) -> str:
    return f"tcp://127.0.0.1:{fake.port}"


def run(fake: FakeZaber, capsys: pytest.CaptureFixture[str], *extra: str, native: bool = True) -> tuple[int, str, str]:
    """autofocus.main on the fake: (exit code, stdout, stderr)."""
    code = autofocus.main([*RANGE, url(fake), *SIM, *(NATIVE if native else []), *extra])
    out, err = capsys.readouterr()
    return code, out, err


def motion(fake: FakeZaber) -> list[str]:
    return fake.motion_commands()


def stop_from_second_connection(fake: FakeZaber) -> None:
    """What Zaber Launcher (or a second script) sends through the shared port."""
    with socket.create_connection(("127.0.0.1", fake.port), timeout=2) as sock:
        sock.sendall(b"/3 1 stop\n")
        sock.recv(100)


def when(condition: Callable[[], bool], action: Callable[[], None]) -> threading.Thread:
    """Run ``action`` in the background as soon as ``condition`` holds (gives up after 20 s)."""

    def watch() -> None:
        deadline = time.monotonic() + 20
        while not condition():
            if time.monotonic() > deadline:
                return
            time.sleep(0.002)
        action()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def homed() -> Iterator[FakeZaber]:
    with FakeZaber(devices=[DeviceConfig(homed=True, position=5 * NM)]) as fake:
        yield fake


# --- 1. every move verified; an interruption ends the run and nothing more moves ---------------------

@pytest.mark.parametrize("move, frames", [(5, 4), (12, 11)], ids=["sweep move", "final move to best"])
def test_stop_from_another_connection_ends_the_run_and_nothing_more_moves(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], move: int, frames: int) -> None:
    # The Nth move stays BUSY until someone stops it: the second connection does, mid-move.
    with FakeZaber(devices=[DeviceConfig(homed=True, position=5 * NM)],
                   faults=Faults(busy_forever_at_move=move)) as fake:
        stopper = when(lambda: fake.move_count >= move and fake.is_busy(), lambda: stop_from_second_connection(fake))
        code, out, err = run(fake, capsys, "--json", "--save-curve", str(tmp_path / "c.csv"))
        stopper.join(5)
        assert code == autofocus.EXIT_HARDWARE, err
        assert err.count("\n") == 1 and "interrupted (NI)" in err and "nothing more was moved" in err
        log = fake.commands()
        stop_at = log.index("stop")
        assert not [c for c in log[stop_at + 1:] if c.startswith(MOTION) or c == "stop"], log[stop_at:]
        assert "warnings clear" not in log  # the flag stays for whoever took the axis (and the next run)
        assert fake.flags() == ["NI"]
        result = json.loads(out)
        assert result["exit_code"] == 5 and result["frames"] == frames and "interrupted" in result["error"]
        assert len((tmp_path / "c.csv").read_text().splitlines()) - 1 == frames  # partial curve written


def test_someone_else_moving_the_axis_is_reported_at_once_and_not_stopped(capsys: pytest.CaptureFixture[str]) -> None:
    # Another program sends its own (long) move while ours is under way, as Launcher's joystick or
    # a second script would: the run ends while their move is still going, and it is not stopped.
    with FakeZaber(devices=[DeviceConfig(homed=True, position=10 * NM)], speed_native_per_s=10 * NM,
                   faults=Faults(busy_forever_at_move=3)) as fake:

        def their_move() -> None:
            with socket.create_connection(("127.0.0.1", fake.port), timeout=2) as sock:
                sock.sendall(b"/3 1 move abs 20000000\n")  # ~1 s of motion at 10 mm/s
                sock.recv(100)

        mover = when(lambda: fake.move_count >= 3 and fake.is_busy(), their_move)
        code, _, err = run(fake, capsys)
        mover.join(5)
        assert code == 5 and "interrupted (NI)" in err and "nothing more was moved" in err
        assert fake.is_busy(), "the run waited for the other program's move to end instead of reporting at once"
        assert "stop" not in fake.commands() and fake.motion_commands()[-1] == "move abs 20000000"


def test_a_fault_that_makes_motion_unsafe_moves_nothing_more(homed: FakeZaber,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    homed.inject(fault_at_move=4)  # encoder error latched on arrival: the position cannot be trusted
    code, out, err = run(homed, capsys)
    assert code == 5 and err.count("\n") == 1
    assert "FQ (Encoder error)" in err and "nothing more was moved" in err
    assert len(homed.move_targets()) == 4 and "stop" not in homed.commands()  # no stop, no return


def test_a_stall_still_returns_to_start(homed: FakeZaber, capsys: pytest.CaptureFixture[str]) -> None:
    homed.inject(stall_at_move=4)  # today's policy for faults other than an interruption
    code, _, err = run(homed, capsys)
    assert code == 5 and "FS (Stalled and stopped)" in err and "returned to its start, 5.0000 mm" in err
    assert homed.position() == 5 * NM


def test_a_move_that_ends_off_target_is_an_error(homed: FakeZaber) -> None:
    stage = autofocus.ZaberStage(url(homed), native_unit_nm=1)
    try:
        homed.inject(miss_at_move=1, miss_native=3)  # within POSITION_TOLERANCE_NATIVE: fine
        stage.move_to(10.0)
        homed.inject(miss_at_move=2, miss_native=100)  # ZML sees nothing wrong; the position check does
        with pytest.raises(autofocus.StageError, match="100 native units off") as info:
            stage.move_to(10.5)
        assert info.value.may_move  # a position check failure still allows the return to start
    finally:
        stage.close()


# --- 2. flags latched before the run -----------------------------------------------------------------

@pytest.mark.parametrize("manual", [True, False], ids=["firmware as documented", "stricter fake"])
def test_latched_notice_is_reported_once_cleared_and_the_run_completes(
        capsys: pytest.CaptureFixture[str], manual: bool) -> None:
    with FakeZaber(devices=[DeviceConfig(homed=True, position=5 * NM, flags=("NI",))],
                   motion_clears_notices=manual) as fake:
        code, _, err = run(fake, capsys)
        assert code == 0, err
        assert err.count("\n") == 1 and "NI (Movement interrupted)" in err and "cleared" in err
        log = fake.commands()
        assert log.index("warnings clear") < min(i for i, c in enumerate(log) if c.startswith(MOTION))
        assert fake.flags() == []


def test_latched_stall_refuses_to_start_without_clear_faults(capsys: pytest.CaptureFixture[str]) -> None:
    with FakeZaber(devices=[DeviceConfig(homed=True, position=5 * NM, flags=("FS",))]) as fake:
        code, _, err = run(fake, capsys)
        assert code == autofocus.EXIT_HARDWARE and err.count("\n") == 1
        assert "FS (Stalled and stopped)" in err and "--clear-faults" in err and "nothing was moved" in err
        assert motion(fake) == [] and "warnings clear" not in fake.commands() and fake.flags() == ["FS"]
        code, _, err = run(fake, capsys, "--clear-faults")
        assert code == 0, err
        assert "FS (Stalled and stopped)" in err and "cleared" in err and fake.flags() == []


def test_an_axis_moving_at_set_up_is_not_commanded(capsys: pytest.CaptureFixture[str]) -> None:
    with FakeZaber(devices=[DeviceConfig(homed=True, position=5 * NM)], speed_native_per_s=NM) as fake:
        with socket.create_connection(("127.0.0.1", fake.port), timeout=2) as other:
            other.sendall(b"/3 1 move abs 9000000\n")  # someone else's 4 s move
            other.recv(100)
            code, _, err = run(fake, capsys)
        assert code == 5 and "is moving" in err and motion(fake) == ["move abs 9000000"]


# --- 3. homing only with consent where it can hurt -----------------------------------------------------

@pytest.mark.parametrize("extra, code, homes", [
    ([], 0, True),                              # no soft limit: homed as before, announced
    (["--z-min", "9"], 2, False),               # a soft limit: refused without --home
    (["--z-max", "11", "--home"], 0, True),     # ... allowed with it
    (["--no-home"], 2, False),                  # never
], ids=["no soft limits", "z-min without --home", "z-max with --home", "--no-home"])
def test_homing_consent(capsys: pytest.CaptureFixture[str], extra: list[str], code: int, homes: bool) -> None:
    with FakeZaber() as fake:  # not homed (WR)
        got, _, err = run(fake, capsys, *extra)
        assert got == code, err
        if homes:
            assert motion(fake)[0] == "home" and "homing device 3 axis 1" in err
        else:
            assert motion(fake) == [] and err.count("\n") == 1 and "nothing moved" in err
            assert ("--home" in err) if "--z-min" in extra else ("--no-home forbids" in err)


def test_homing_interrupted_from_outside_is_reported_and_nothing_more_moves(
        capsys: pytest.CaptureFixture[str]) -> None:
    with FakeZaber(faults=Faults(busy_forever_at_home=True)) as fake:
        stopper = when(lambda: "home" in fake.commands() and fake.is_busy(), lambda: stop_from_second_connection(fake))
        code, _, err = run(fake, capsys)
        stopper.join(5)
        assert code == 5 and err.count("\n") == 2  # the homing announcement, then the error
        assert "homing was interrupted (NI)" in err and motion(fake) == ["home"] and fake.move_targets() == []


def test_no_home_is_harmless_on_a_homed_stage(homed: FakeZaber, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(homed, capsys, "--no-home", "--z-min", "9")
    assert code == 0, err
    assert "home" not in motion(homed)


# --- 4. native units sanity-checked and shown -----------------------------------------------------------

@pytest.mark.parametrize("unit_nm, travel", [("1000", "25000 mm"), ("0.01", "0.25 mm")])
def test_absurd_native_unit_is_refused_before_anything_moves(capsys: pytest.CaptureFixture[str],
                                                              unit_nm: str, travel: str) -> None:
    with FakeZaber() as fake:  # not homed: even homing must not happen
        code, _, err = run(fake, capsys, "--native-unit-nm", unit_nm, native=False)
        assert code == autofocus.EXIT_USAGE and err.count("\n") == 1
        assert travel in err and "1-300 mm" in err and motion(fake) == []


def test_header_and_json_show_the_travel_the_native_unit_implies(homed: FakeZaber,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(homed, capsys, "--native-unit-nm", "0.5", native=False)
    assert code in (0, 4) and "travel 0..12.5 mm" in out.splitlines()[0] and "native unit 0.5 nm" in out
    code, out, _ = run(homed, capsys, "--json")
    info = json.loads(out)["stage_info"]
    assert info["travel_mm"] == [0.0, 25.0] and info["native_unit_nm"] == 1 and info["device"] == 3


# --- 6. no unbounded wait: the move (or homing) that times out sends stop itself ----------------------

def test_a_move_that_times_out_sends_stop_itself(homed: FakeZaber) -> None:
    stage = autofocus.ZaberStage(url(homed), native_unit_nm=1, move_timeout_s=0.2)
    try:
        homed.inject(busy_forever_at_move=1)
        with pytest.raises(autofocus.StageError, match="still busy after 0.2 s; stopped it"):
            stage.move_to(10.0)
        # No clean-up ran here: the stop in the log was sent by move_to itself, and it took effect.
        log = homed.commands()
        assert log.index("stop") > log.index("move abs 10000000") and not homed.is_busy()
    finally:
        stage.close()


def test_homing_that_times_out_sends_stop_itself() -> None:
    with FakeZaber(faults=Faults(busy_forever_at_home=True)) as fake:
        stage = autofocus.ZaberStage(url(fake), native_unit_nm=1, home_timeout_s=0.2)
        try:
            t0 = time.monotonic()
            with pytest.raises(autofocus.StageError, match="homing: the axis was still busy after 0.2 s; stopped"):
                stage.home_if_needed()
            assert time.monotonic() - t0 < 5
            log = fake.commands()
            assert log.index("stop") > log.index("home") and not fake.is_busy()
        finally:
            stage.close()


def test_stop_waits_a_bounded_time(homed: FakeZaber, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(autofocus, "STOP_TIMEOUT_S", 0.2)  # ZML's own stop() would wait forever here
    stage = autofocus.ZaberStage(url(homed), native_unit_nm=1)
    try:
        homed.inject(busy_forever_at_move=1, ignore_stop=True)
        stage._axis.move_absolute(10 * NM, wait_until_idle=False)
        t0 = time.monotonic()
        with pytest.raises(autofocus.StageError, match="still busy 0.2 s after the stop"):
            stage.stop()
        assert time.monotonic() - t0 < 2 and "stop" in homed.commands()
    finally:
        homed.inject(ignore_stop=False, busy_forever_at_move=None)
        stage.close()


# --- 8. the fake is as strict as the manual -----------------------------------------------------------

def raw(fake: FakeZaber) -> Callable[[str], str]:
    sock = socket.create_connection(("127.0.0.1", fake.port), timeout=2)
    buf = b""

    def ask(cmd: str) -> str:
        nonlocal buf
        sock.sendall(f"/3 1 {cmd}\n".encode())
        while b"\r\n" not in buf:
            buf += sock.recv(4096)
        line, buf = buf.split(b"\r\n", 1)
        return line.decode()

    return ask


def test_fake_faults_stay_latched_through_moves_until_warnings_clear() -> None:
    with FakeZaber(devices=[DeviceConfig(homed=True, flags=("FS",))]) as fake:
        ask = raw(fake)
        assert ask("move abs 1000").split()[4] == "FS"
        time.sleep(0.02)
        assert ask("warnings") .endswith("01 FS")
        assert ask("warnings clear").endswith("01 FS") and ask("warnings").endswith("00")


def test_fake_stop_from_a_second_client_sets_ni_and_a_move_to_an_idle_axis_clears_it() -> None:
    with FakeZaber(devices=[DeviceConfig(homed=True)], speed_native_per_s=NM) as fake:
        first, second = raw(fake), raw(fake)
        first("move abs 5000000")
        second("stop")
        assert first("warnings").endswith("01 NI")
        first("move abs 0")  # issued while idle: the manual says this clears NI
        assert "NI" not in fake.flags()
    with FakeZaber(devices=[DeviceConfig(homed=True, flags=("NI",))], motion_clears_notices=False) as strict:
        ask = raw(strict)
        ask("move abs 1000")
        assert strict.flags() == ["NI"]


# --- 4. identification shows the device; set-up works on an axis object the caller owns ----------------

class _Settings:
    def get(self, name: str, unit: object = None) -> float:
        return {"limit.min": 0.0, "limit.max": 25.0, "cloop.settle.tolerance": 8.0}[name]  # mm; settle: native

    def convert_to_native_units(self, setting: str, value: float, unit: object) -> float:
        return value * 10_000_000  # 0.1 nm native units, as the device database would say


class _Warnings:
    def get_flags(self) -> set[str]:
        return set()


class _Device:
    device_address, is_identified, name = 3, False, ""

    def identify(self) -> None:
        self.is_identified, self.name = True, "X-LDA025A-AE53"


class _Axis:
    """Only what set-up touches, answering as an identified X-LDA025A would."""
    axis_number = 1

    def __init__(self) -> None:
        self.device, self.settings, self.warnings = _Device(), _Settings(), _Warnings()

    def is_busy(self) -> bool:
        return False


def test_identified_device_name_and_travel_are_shown_and_setup_needs_only_an_axis() -> None:
    stage = autofocus.ZaberStage.__new__(autofocus.ZaberStage)
    stage._configure("COM3", native_unit_nm=None, move_timeout_s=1, home_timeout_s=1, clear_faults=False)
    stage._setup_axis(_Axis())  # what an adapter over a caller's ZML Axis does
    info = stage.describe()
    assert info["name"] == "X-LDA025A-AE53" and info["travel_mm"] == [0.0, 25.0]
    assert info["native_unit_nm"] == 0.1 and info["units_from"] == "device database"
    assert stage.tolerance_native == 8  # the device's settle window is wider than 5 native units
    header = autofocus.stage_header(info, "COM3")
    assert header.startswith("stage: X-LDA025A-AE53, device 3 axis 1 on COM3: travel 0..25 mm")
    stage.close()  # opened no connection: closes nothing
