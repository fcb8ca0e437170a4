"""Issues 9 and 18, Zaber half: the hardware path trusts nothing the real stage does not promise.

The REAL Zaber Motion Library drives tests/fake_zaber.py; ``autofocus.main`` runs in-process (about
0.3 s a run) and the fake's command log says what was sent, by which connection, in which order.
"Another program" on the axis (Zaber Launcher, a second script) is a second REAL ZML connection --
its ZML clears the flags its own commands cause, as the real one does -- and, where a program that
does not clear them is meant, a raw socket.
"""
from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from zaber_motion.ascii import Connection

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


# --- 1. anything the tool did not cause ends the run, and nothing more moves (issue 18) -----------------

@contextlib.contextmanager
def other_program(fake: FakeZaber) -> Iterator[Any]:
    """Another program on the same axis, as Zaber Launcher or a second script is: a REAL ZML connection
    (its ZML clears the NI flag its own stop or move causes, at once)."""
    connection = Connection.open_tcp("127.0.0.1", fake.port)
    try:
        yield connection.get_device(3).get_axis(1)
    finally:
        with contextlib.suppress(Exception):
            connection.close()


def tool_client(fake: FakeZaber) -> int:
    """The connection autofocus.py used (the one that read the travel limits)."""
    return next(r.client for r in fake.log if r.text == "get limit.min")


def sent_after(fake: FakeZaber, index: int, client: int) -> list[str]:
    """What ``client`` sent after log entry ``index``."""
    return [r.text for r in fake.log[index + 1:] if r.client == client]


def first(fake: FakeZaber, text: str, client: int | None = None) -> int:
    return next(i for i, r in enumerate(fake.log) if r.text == text and client in (None, r.client))


STATUS_READS = {"", "get pos", "warnings"}  # all a tool may send once it found the axis taken


@pytest.mark.parametrize("move, frames", [(4, 3), (12, 11)], ids=["sweep move", "final move to best"])
def test_another_zml_clients_stop_mid_move_ends_the_run_and_nothing_moves_after_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], move: int, frames: int) -> None:
    # The Nth move is slow (0.05 mm in 0.5 s): the other program presses Stop while it runs.
    with FakeZaber(devices=[DeviceConfig(homed=True, position=10 * NM)], faults=Faults(slow_at_move=move)) as fake, \
            other_program(fake) as theirs:
        stopper = when(lambda: fake.move_count >= move and fake.is_busy(), theirs.stop)
        code, out, err = run(fake, capsys, "--json", "--save-curve", str(tmp_path / "c.csv"))
        stopper.join(5)
        assert code == autofocus.EXIT_HARDWARE, err
        assert err.count("\n") == 1 and "nothing more was moved" in err
        assert "stopped or moved from outside" in err or "moved or stopped from outside" in err, err
        stop_at = first(fake, "stop")
        assert fake.log[stop_at].client != tool_client(fake)  # they stopped it ...
        assert "warnings clear" in sent_after(fake, stop_at, fake.log[stop_at].client)  # ... and their ZML cleared NI
        assert set(sent_after(fake, stop_at, tool_client(fake))) <= STATUS_READS  # nothing moved after it
        assert "warnings clear" not in [r.text for r in fake.log if r.client == tool_client(fake)]
        result = json.loads(out)
        assert result["exit_code"] == 5 and result["frames"] == frames
        assert len((tmp_path / "c.csv").read_text().splitlines()) - 1 == frames  # partial curve written


@pytest.mark.parametrize("theirs_do", ["move", "home"])
def test_another_zml_clients_move_or_home_mid_move_is_reported_at_once_and_not_fought(
        capsys: pytest.CaptureFixture[str], theirs_do: str) -> None:
    with FakeZaber(devices=[DeviceConfig(homed=True, position=10 * NM)], speed_native_per_s=NM // 2,
                   faults=Faults(slow_at_move=3)) as fake, other_program(fake) as theirs:
        act = (lambda: theirs.move_absolute(12 * NM, wait_until_idle=False)) if theirs_do == "move" else \
            (lambda: theirs.home(wait_until_idle=False))
        mover = when(lambda: fake.move_count >= 3 and fake.is_busy(), act)
        code, _, err = run(fake, capsys)
        mover.join(5)
        assert code == 5 and err.count("\n") == 1 and "nothing more was moved" in err, err
        assert "someone else is moving it" in err or "moved or stopped from outside" in err, err
        assert fake.is_busy(), "the run waited for the other program's motion to end instead of reporting at once"
        theirs_at = next(i for i, r in enumerate(fake.log) if r.client != tool_client(fake)
                         and r.text.startswith(MOTION))
        assert set(sent_after(fake, theirs_at, tool_client(fake))) <= STATUS_READS  # no stop, no move: theirs
        assert fake.flags() == []  # their ZML cleared the NI their command caused: only the motion told


def test_a_stop_from_a_raw_connection_leaves_ni_and_it_is_named(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    # A program that does not clear flags (a terminal, a raw script): the NI stays, and it is what is reported.
    with FakeZaber(devices=[DeviceConfig(homed=True, position=5 * NM)], faults=Faults(busy_forever_at_move=5)) as fake:
        stopper = when(lambda: fake.move_count >= 5 and fake.is_busy(), lambda: stop_from_second_connection(fake))
        code, out, err = run(fake, capsys, "--json", "--save-curve", str(tmp_path / "c.csv"))
        stopper.join(5)
        assert code == 5 and err.count("\n") == 1, err
        assert "moved or stopped from outside (NI (Movement interrupted)" in err and "nothing more was moved" in err
        assert err.startswith("autofocus.py: the move to 10.2000 mm: ")  # seen by the move it cut short
        assert set(sent_after(fake, first(fake, "stop"), tool_client(fake))) <= STATUS_READS
        assert fake.flags() == ["NI"]  # left for whoever took the axis (and the next run's set-up)
        assert json.loads(out)["frames"] == 4


def knob_during_frame(monkeypatch: pytest.MonkeyPatch, fake: FakeZaber, frame: int, distance_native: int,
                      duration_s: float, wait_s: float = 0.0, clear: bool = False) -> dict[str, float]:
    """Someone turns the knob while frame ``frame`` is exposed (the axis is idle then)."""
    real_capture = autofocus.SimCamera.capture
    seen = {"frames": 0, "t": 0.0}

    def capture(self: autofocus.SimCamera) -> Any:
        image = real_capture(self)
        if seen["frames"] == frame:
            seen["t"] = time.time()
            fake.turn_knob(distance_native, duration_s)
            time.sleep(wait_s)
            if clear:  # another program clears the flags (Launcher's ZML can): only the position tells
                with other_program(fake) as theirs:
                    theirs.warnings.clear_flags()
        seen["frames"] += 1
        return image

    monkeypatch.setattr(autofocus.SimCamera, "capture", capture)
    return seen


@pytest.mark.parametrize("wait_s, clear, says", [
    (0.0, False, "moved or stopped from outside (NC (Manual control)"),  # still turning: BUSY with NC
    (0.06, False, "moved or stopped from outside (NC (Manual control)"),  # done: idle, NC latched
    (0.06, True, "where the move to 10.2500 mm left it: it was moved from outside while it stood still"),
], ids=["knob still turning", "knob turned", "knob turned, flags cleared"])
def test_the_knob_during_an_exposure_ends_the_run_and_the_frame_is_dropped(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str], wait_s: float,
        clear: bool, says: str) -> None:
    # Frame 5 is the one at the true focus (10.25 mm): a 0.15 mm nudge while it is exposed used to end
    # "focused", exit 0, off by the nudge.
    with FakeZaber(devices=[DeviceConfig(homed=True, position=5 * NM)]) as fake:
        seen = knob_during_frame(monkeypatch, fake, 6, 150_000, 0.03, wait_s, clear)  # (0: the look before moving)
        code, out, err = run(fake, capsys, "--json", "--save-curve", str(tmp_path / "c.csv"))
        assert code == 5 and err.count("\n") == 1, err
        assert says in err and "nothing more was moved" in err, err
        assert "the frame at z=10.2500 mm, exposed just before, was dropped from the curve" in err
        knob_at = next(i for i, r in enumerate(fake.log) if r.t >= seen["t"])
        assert set(sent_after(fake, knob_at - 1, tool_client(fake))) <= STATUS_READS  # no move after the knob
        result = json.loads(out)
        assert [z for z, _ in result["curve"]] == autofocus.plan_positions(10, 10.2, 0.05)  # not 10.25
        assert len((tmp_path / "c.csv").read_text().splitlines()) - 1 == 5


def test_a_fault_latched_while_the_axis_stands_still_is_caught_before_the_next_move(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    with FakeZaber(devices=[DeviceConfig(homed=True, position=5 * NM)]) as fake:
        real_capture = autofocus.SimCamera.capture
        frames = []

        def capture(self: autofocus.SimCamera) -> Any:
            frames.append(1)
            if len(frames) == 5:  # the 4th frame of the sweep (the 1st: the look before moving)
                fake.latch("FQ")  # an encoder error while the frame is exposed
            return real_capture(self)

        monkeypatch.setattr(autofocus.SimCamera, "capture", capture)
        code, out, err = run(fake, capsys, "--json")
        assert code == 5 and err.count("\n") == 1 and "FQ (Encoder error)" in err and "nothing more was moved" in err
        assert len(fake.move_targets()) == 4 and "stop" not in fake.commands()  # no move was sent after it
        assert fake.flags() == ["FQ"]  # not cleared: a fault is for a person to check
        assert json.loads(out)["frames"] == 3  # the frame exposed as it latched is dropped


def test_a_fault_zml_meets_in_a_moves_reply_is_named_and_said_cleared(capsys: pytest.CaptureFixture[str]) -> None:
    # FQ latches an instant before the 4th move arrives: ZML sees it in the reply, clears it, raises.
    with FakeZaber(devices=[DeviceConfig(homed=True, position=5 * NM)], faults=Faults(flag_on_move=4)) as fake:
        code, _, err = run(fake, capsys)
        assert code == 5 and err.count("\n") == 1, err
        assert "FQ (Encoder error), which ZML had already cleared" in err and "the move was stopped" in err
        met = [i for i, r in enumerate(fake.log) if r.text.startswith("move abs")][3]
        after = sent_after(fake, met, tool_client(fake))
        assert "warnings clear" in after and not [c for c in after if c.startswith(MOTION)]  # nothing moved after
        assert fake.flags() == [] and len(fake.move_targets()) == 4


def test_a_fault_during_a_move_stops_the_tools_own_move_and_nothing_more_moves(
        capsys: pytest.CaptureFixture[str]) -> None:
    # The poll used to read only NI: an FQ latched during a (slow) move went unseen until it ended.
    with FakeZaber(devices=[DeviceConfig(homed=True, position=10 * NM)], faults=Faults(slow_at_move=3)) as fake:
        latcher = when(lambda: fake.move_count >= 3 and fake.is_busy(), lambda: fake.latch("FQ"))
        code, _, err = run(fake, capsys)
        latcher.join(5)
        assert code == 5 and err.count("\n") == 1 and "the move to 10.1000 mm: device 3 axis 1 reported fault FQ" in err
        assert "the move was stopped" in err and "nothing more was moved" in err, err
        # Nothing cleared the fault (the stop went as a generic command: ZML's stop() would have cleared
        # it); the NI is the tool's own stop's, left with it (warnings clear would take FQ too).
        assert "warnings clear" not in fake.commands() and fake.flags() == ["FQ", "NI"]
        stop_at = first(fake, "stop", tool_client(fake))
        assert set(sent_after(fake, stop_at, tool_client(fake))) <= STATUS_READS and len(fake.move_targets()) == 3


@pytest.mark.parametrize("flag", ["FO", "FD"])
def test_a_disabled_driver_is_named_and_nothing_more_moves(capsys: pytest.CaptureFixture[str], flag: str) -> None:
    with FakeZaber(devices=[DeviceConfig(homed=True, position=5 * NM)],
                   faults=Faults(flag_on_move=4, fault_flag=flag)) as fake:
        code, _, err = run(fake, capsys)
        assert code == 5 and err.count("\n") == 1 and f"fault {flag} (Driver disabled" in err, err
        assert "refused the move" in err and "nothing more was moved" in err
        assert len(fake.move_targets()) == 3 and "stop" not in fake.commands()


def test_a_fault_on_arrival_moves_nothing_more(homed: FakeZaber, capsys: pytest.CaptureFixture[str]) -> None:
    homed.inject(fault_at_move=4)  # encoder error latched on arrival: the position cannot be trusted
    code, out, err = run(homed, capsys)
    assert code == 5 and err.count("\n") == 1
    assert "FQ (Encoder error)" in err and "nothing more was moved" in err
    assert len(homed.move_targets()) == 4 and "stop" not in homed.commands()  # no stop, no return


def test_a_stall_moves_nothing_more(homed: FakeZaber, capsys: pytest.CaptureFixture[str]) -> None:
    homed.inject(stall_at_move=4)  # a fault: something may block the objective
    code, _, err = run(homed, capsys)
    assert code == 5 and "FS (Stalled and stopped)" in err and "nothing more was moved" in err
    assert len(homed.move_targets()) == 4 and homed.flags() == ["FS"]


def test_a_move_that_ends_off_target_is_an_outside_event(homed: FakeZaber) -> None:
    stage = autofocus.ZaberStage(url(homed), native_unit_nm=1)
    try:
        homed.inject(miss_at_move=1, miss_native=3)  # within POSITION_TOLERANCE_NATIVE: fine
        stage.move_to(10.0)
        homed.inject(miss_at_move=2, miss_native=100)  # ZML sees nothing wrong; the position check does
        with pytest.raises(autofocus.StageInterrupted, match="100 native units off") as info:
            stage.move_to(10.5)
        assert not info.value.may_move and not info.value.before_move  # nothing more moves; the frame before stands
    finally:
        stage.close()


def test_a_closed_loop_axis_is_accepted_anywhere_in_its_settle_window(capsys: pytest.CaptureFixture[str]) -> None:
    # cloop.settle.tolerance 8: every move ends 8 native units off its target, alternately above and below.
    with FakeZaber(devices=[DeviceConfig(homed=True, position=5 * NM, settle_tolerance=8)]) as fake:
        code, out, err = run(fake, capsys, "--json")
        assert code == 0, err
        assert json.loads(out)["stage_info"]["position_tolerance_native"] == 8
        assert abs(fake.position() - fake.move_targets()[-1]) == 8


def test_equal_moves_are_polled_where_the_last_one_ended_not_all_the_way(capsys: pytest.CaptureFixture[str]) -> None:
    # 0.05 mm at 1 mm/s: 50 ms a step.  Polled from the start, a step costs ~50 status requests on the
    # line; aimed at where the previous equal step ended, a few.
    with FakeZaber(devices=[DeviceConfig(homed=True, position=10 * NM)], speed_native_per_s=NM) as fake:
        code, _, err = run(fake, capsys)
        assert code == 0, err
        ours = [r.text for r in fake.log if r.client == tool_client(fake)]
        moves = [i for i, c in enumerate(ours) if c.startswith("move abs")]
        polls = [ours[a + 1:b].count("get pos") for a, b in zip(moves, moves[1:])]
        # polls[0]: the move to the start, 0 mm; each count also holds the check before the next move.
        # A loaded host may delay one reply past the aimed poll: the typical step takes a few, none ~50.
        steady = sorted(polls[3:-1])
        assert polls[1] > 20 and steady[len(steady) // 2] <= 4 and steady[-1] <= 15, polls


def test_the_tools_own_time_out_still_returns_to_start(capsys: pytest.CaptureFixture[str]) -> None:
    with FakeZaber(devices=[DeviceConfig(homed=True, position=5 * NM)], faults=Faults(busy_forever_at_move=3)) as fake:
        code, _, err = run(fake, capsys, "--move-timeout-s", "0.3")
        assert code == 5 and "still busy after 0.3 s; stopped it" in err and "returned to its start, 5.0000 mm" in err
        assert fake.position() == 5 * NM


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


@pytest.mark.parametrize("zml", [False, True], ids=["raw stop", "another ZML client's stop"])
def test_homing_interrupted_from_outside_is_reported_and_nothing_more_moves(
        capsys: pytest.CaptureFixture[str], zml: bool) -> None:
    # Homing from 5 mm at 5 mm/s: stopped halfway, before it found the home sensor.
    with FakeZaber(devices=[DeviceConfig(position=5 * NM)], speed_native_per_s=5 * NM) as fake, \
            other_program(fake) as theirs:
        stop = theirs.stop if zml else (lambda: stop_from_second_connection(fake))
        stopper = when(lambda: "home" in fake.commands() and fake.position() < 4 * NM, stop)
        code, _, err = run(fake, capsys)
        stopper.join(5)
        assert code == 5 and err.count("\n") == 2  # the homing announcement, then the error
        # Their ZML clears NI at once (unless a poll of ours reads it first); then the reference position
        # that is still missing tells.
        said_ni = "homing: the axis was moved or stopped from outside (NI" in err
        assert said_ni or (zml and "without a reference position (WR)" in err and "stopped from outside" in err), err
        assert motion(fake) == ["home"] and fake.move_targets() == []


def test_home_with_z_min_then_no_peak_never_goes_below_z_min(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    # An axis without a reference at 5 mm: homing (allowed by --home) takes it to 0; a blank field
    # gives no_peak.  The "start" (0 mm, where homing left it) lies below --z-min: it must not go back.
    with FakeZaber(devices=[DeviceConfig(position=5 * NM)]) as fake:
        code, out, err = run(fake, capsys, "--home", "--z-min", "9", "--sim-specimen", "blank", "--json")
        assert code == autofocus.EXIT_NO_PEAK, err
        assert motion(fake)[0] == "home" and min(fake.move_targets()) >= 9 * NM  # nothing sent below 9 mm
        assert fake.position() == 10.5 * NM  # where the last frame was taken: inside --z-min..--z-max
        result = json.loads(out)
        assert result["best_mm"] == 10.5 and result["stage_info"]["homed_now"]
        assert "stage left at the last frame, 10.5000 mm (not returned to where the run started" in err


def test_a_start_outside_the_soft_limits_is_not_gone_back_to(capsys: pytest.CaptureFixture[str]) -> None:
    with FakeZaber(devices=[DeviceConfig(homed=True, position=5 * NM)]) as fake:  # left at 5 mm; --z-min 9
        code, out, err = run(fake, capsys, "--z-min", "9", "--sim-specimen", "blank")
        assert code == autofocus.EXIT_NO_PEAK and min(fake.move_targets()) >= 9 * NM, err
        assert fake.position() == 10.5 * NM and "outside --z-min/--z-max" in out


def test_after_homing_a_fault_only_stops_the_axis(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    real_capture = autofocus.SimCamera.capture
    frames: list[int] = []

    def capture(self: autofocus.SimCamera) -> Any:
        frames.append(1)
        if len(frames) == 5:  # the 4th frame of the sweep (the 1st: the look before moving)
            raise autofocus.CameraError("camera timed out")
        return real_capture(self)

    monkeypatch.setattr(autofocus.SimCamera, "capture", capture)
    with FakeZaber(devices=[DeviceConfig(position=5 * NM)]) as fake:
        code, _, err = run(fake, capsys, "--home", "--z-min", "9")
        assert code == 5 and "camera timed out" in err and "not returned: the axis was homed" in err, err
        assert min(fake.move_targets()) >= 9 * NM and fake.position() == round(10.15 * NM)


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
    header = out.splitlines()[0]
    assert code in (0, 4) and "travel 0..12.5 mm" in header and "native unit 0.5 nm" in header
    # The fake cannot be identified offline (ZML finds no device database): the header says so.
    assert "the travel it implies; not checked against Zaber's device database" in header
    code, out, _ = run(homed, capsys, "--json")
    info = json.loads(out)["stage_info"]
    assert info["travel_mm"] == [0.0, 25.0] and info["native_unit_nm"] == 1 and info["device"] == 3
    assert info["units_checked"] is False


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
        while fake.is_busy():  # the stop decelerates (tens of ms)
            time.sleep(0.005)
        first("move abs 0")  # issued while idle: the manual says this clears NI
        assert "NI" not in fake.flags()
    with FakeZaber(devices=[DeviceConfig(homed=True, flags=("NI",))], motion_clears_notices=False) as strict:
        ask = raw(strict)
        ask("move abs 1000")
        assert strict.flags() == ["NI"]


# --- 4. identification shows the device; set-up works on an axis object the caller owns ----------------

class _Settings:
    """As an identified X-LDA025A with 0.1 nm native units answers (no ZML device database offline here)."""

    def get(self, name: str, unit: object = None) -> float:
        from zaber_motion import Units

        if name == "cloop.settle.tolerance":
            return 8.0  # native
        mm = {"limit.min": 0.0, "limit.max": 25.0}[name]
        return mm * 10_000_000 if unit in (None, Units.NATIVE) else mm

    def convert_to_native_units(self, setting: str, value: float, unit: object) -> float:
        return value * 10_000_000  # 0.1 nm native units, as the device database would say


class _Warnings:
    def get_flags(self) -> set[str]:
        return set()


class _Device:
    device_address, is_identified, name, connection = 3, False, "", None

    def identify(self) -> None:
        self.is_identified, self.name = True, "X-LDA025A-AE53"


class _Axis:
    """Only what set-up touches, answering as an identified X-LDA025A would."""
    axis_number = 1

    def __init__(self) -> None:
        self.device, self.settings, self.warnings = _Device(), _Settings(), _Warnings()

    def generic_command(self, command: str) -> Any:
        from types import SimpleNamespace

        assert command == "get pos"
        return SimpleNamespace(status="IDLE", warning_flag="--", data="123000000")


def identified_stage(native_unit_nm: float | None) -> autofocus.ZaberStage:
    # what from_axis does with a caller's ZML Axis (which it first checks is one)
    return autofocus.ZaberStage("COM3", native_unit_nm=native_unit_nm, move_timeout_s=1, home_timeout_s=1,
                                zml_axis=_Axis())


def test_identified_device_name_and_travel_are_shown_and_setup_needs_only_an_axis() -> None:
    stage = identified_stage(None)
    info = stage.describe()
    assert info["name"] == "X-LDA025A-AE53" and info["travel_mm"] == [0.0, 25.0]
    assert info["native_unit_nm"] == 0.1 and info["units_from"] == "device database"
    assert stage.tolerance_native == 8  # the device's settle window is wider than 5 native units
    assert stage.position_mm  # set-up noted where the axis stands (one status read)
    header = autofocus.stage_header(info, "COM3")
    assert header.startswith("stage: X-LDA025A-AE53, device 3 axis 1 on COM3: travel 0..25 mm")
    stage.close()  # opened no connection: closes nothing


@pytest.mark.parametrize("unit_nm, travel", [(1.0, "not 250 mm"), (0.01, "not 2.5 mm"), (0.102, "not 25.5 mm")])
def test_a_native_unit_the_device_database_contradicts_is_refused(unit_nm: float, travel: str) -> None:
    # Ten times too large, ten times too small (25 mm would read as 2.5 mm), 2% off: the database is the truth.
    with pytest.raises(autofocus.UsageError, match="disagrees with Zaber's device database for X-LDA025A-AE53") as info:
        identified_stage(unit_nm)
    assert "one native unit is 0.1 nm there, so its travel is 25 mm, " + travel in str(info.value)
    assert "nothing moved" in str(info.value)


def test_a_native_unit_within_one_percent_of_the_database_is_confirmed_and_the_database_used() -> None:
    stage = identified_stage(0.1005)
    info = stage.describe()
    assert info["units_checked"] is True and info["native_unit_nm"] == 0.1 and info["travel_mm"] == [0.0, 25.0]
    header = autofocus.stage_header(info, "COM3")
    assert "travel 0..25 mm (25 mm; native unit 0.1 nm from --native-unit-nm, which Zaber's device database " \
           "confirms)" in header
