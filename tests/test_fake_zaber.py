"""Drive the REAL Zaber Motion Library against tests/fake_zaber.py and check it behaves as
/work/shared/zaber-ascii.md describes. Everything is in native units (1 nm); nothing needs the internet.

Note: ``Library.set_idle_polling_period`` is a process-global ZML setting; the module fixture below
sets 5 ms for speed and restores the default (-1) afterwards.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from typing import Iterator, List, Optional

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fake_zaber import DeviceConfig, FakeZaber, Faults, checksum, parse_request  # noqa: E402
from zaber_motion import (  # noqa: E402
    BadCommandException, BadDataException, CommandFailedException, ConnectionClosedException,
    ConnectionFailedException, DeviceDbFailedException, DeviceDbSourceType, DriverDisabledException, Library,
    MotionLibException,
    MovementFailedException, MovementInterruptedException, RequestTimeoutException,
)
from zaber_motion.ascii import Axis, Connection  # noqa: E402

MM = 1_000_000  # native units (nm) per millimetre


@pytest.fixture(scope="module", autouse=True)
def fast_polling() -> Iterator[None]:
    Library.set_idle_polling_period(5)  # process-global!
    yield
    Library.set_idle_polling_period(-1)  # back to ZML's default (~50 ms)


@pytest.fixture
def fake() -> Iterator[FakeZaber]:
    with FakeZaber(devices=[DeviceConfig(homed=True)]) as f:
        yield f


@pytest.fixture
def conn(fake: FakeZaber) -> Iterator[Connection]:
    c = Connection.open_tcp("127.0.0.1", fake.port)
    yield c
    try:
        c.close()
    except MotionLibException:
        pass


@pytest.fixture
def axis(conn: Connection) -> Axis:
    return conn.get_device(3).get_axis(1)


def _open(fake: FakeZaber) -> Connection:
    return Connection.open_tcp("127.0.0.1", fake.port)


class RawClient:
    """Minimal line client for wire-level checks."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=2)
        self.buf = b""

    def send(self, body: str, with_checksum: bool = True) -> None:
        line = "/" + body + (":" + checksum(body) if with_checksum else "") + "\n"
        self.sock.sendall(line.encode("ascii"))

    def read_line(self, timeout: float = 2.0) -> Optional[str]:
        self.sock.settimeout(timeout)
        while b"\r\n" not in self.buf:
            try:
                chunk = self.sock.recv(4096)
            except socket.timeout:
                return None
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line.decode("ascii")

    def ask(self, body: str, **kw: bool) -> Optional[str]:
        self.send(body, **kw)
        return self.read_line()

    def close(self) -> None:
        self.sock.close()


# ------------------------------------------------------------------ detection / identification
def test_detect_devices_without_identification_finds_device_3() -> None:
    with FakeZaber() as fake, _open(fake) as conn:
        devices = conn.detect_devices(identify_devices=False)
        assert [d.device_address for d in devices] == [3]
        assert fake.commands()[:2] == ["", "get comm.packet.size.max"]
        assert fake.log[0].device == 0  # broadcast


def test_detect_devices_reports_other_addresses_when_3_is_absent() -> None:
    with FakeZaber(devices=[1, 2]) as fake, _open(fake) as conn:
        assert [d.device_address for d in conn.detect_devices(identify_devices=False)] == [1, 2]


def test_identify_fails_offline_with_device_db_failed(fake: FakeZaber, conn: Connection) -> None:
    cache = os.path.expanduser("~/.cache/zaber-motion-lib")
    cache_existed = os.path.exists(cache)
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    dead_port = dead.getsockname()[1]
    dead.close()  # nothing listens there: the database lookup is refused at once
    store_was_enabled = Library.is_device_db_store_enabled()
    Library.disable_device_db_store()  # never read or write ~/.cache/zaber-motion-lib
    Library.set_device_db_source(DeviceDbSourceType.WEB_SERVICE, "http://127.0.0.1:%d" % dead_port)
    try:
        t0 = time.monotonic()
        with pytest.raises(DeviceDbFailedException):
            conn.get_device(3).identify()
        assert time.monotonic() - t0 < 5
    finally:
        Library.set_device_db_source(DeviceDbSourceType.WEB_SERVICE)  # default Zaber URL
        if store_was_enabled:
            Library.enable_device_db_store()
    sent = fake.commands()
    for get in ("get deviceid", "get version", "get system.axiscount", "get resolution",
                "get peripheralid", "get peripheral.hw.modified"):
        assert get in sent
    assert os.path.exists(cache) == cache_existed


# ------------------------------------------------------------------ motion in native units
def test_native_move_absolute_and_get_position_round_trip(fake: FakeZaber, axis: Axis) -> None:
    axis.move_absolute(12_500_000)
    assert axis.get_position() == 12_500_000
    assert fake.position() == 12_500_000
    axis.move_relative(-500_000)
    assert axis.get_position() == 12_000_000
    assert fake.commands()[0] == "move abs 12500000"
    assert "move rel -500000" in fake.commands()


def test_not_homed_then_home() -> None:
    with FakeZaber(devices=[DeviceConfig(position=3 * MM)]) as fake, _open(fake) as conn:
        axis = conn.get_device(3).get_axis(1)
        assert axis.is_homed() is False
        assert fake.flags() == ["WR"]
        with pytest.raises(BadCommandException):  # configurable: FakeZaber(unhomed_reason=...)
            axis.move_absolute(MM)
        axis.home()
        assert axis.is_homed() is True
        assert axis.get_position() == 0
        axis.move_absolute(MM)
        assert fake.move_targets() == [MM]
        assert "warnings" in fake.commands() and "home" in fake.motion_commands()


def test_unhomed_moves_allowed_when_configured() -> None:
    with FakeZaber(reject_unhomed_moves=False) as fake, _open(fake) as conn:
        conn.get_device(3).get_axis(1).move_absolute(MM)
        assert fake.position() == MM and fake.flags() == ["WR"]


def test_move_beyond_limit_is_rejected_with_bad_data(fake: FakeZaber, axis: Axis) -> None:
    with pytest.raises(BadDataException) as info:
        axis.move_absolute(25 * MM + 1)
    assert isinstance(info.value, CommandFailedException)
    assert "BADDATA" in str(info.value)
    with pytest.raises(BadDataException):
        axis.move_relative(-1)
    assert fake.position() == 0 and fake.move_targets() == []


def test_settings_in_native_units(fake: FakeZaber, axis: Axis) -> None:
    assert axis.settings.get("limit.max") == 25_000_000
    assert axis.settings.get("limit.min") == 0
    axis.settings.set("maxspeed", 16384)
    assert axis.settings.get("maxspeed") == 16384
    with pytest.raises(BadCommandException):
        axis.settings.get("no.such.setting")


def test_move_velocity_and_stop() -> None:
    with FakeZaber(devices=[DeviceConfig(homed=True)]) as fake, _open(fake) as conn:
        axis = conn.get_device(3).get_axis(1)
        axis.move_velocity(1.6384 * 10 * MM)  # native velocity units: 10 mm/s
        time.sleep(0.05)
        axis.stop()
        assert not axis.is_busy()
        assert 0.2 * MM < axis.get_position() < 1.5 * MM
        assert fake.motion_commands() == ["move vel 16384000"]
        assert "stop" in fake.commands()


def test_stop_mid_move_halts_at_current_position() -> None:
    with FakeZaber(devices=[DeviceConfig(homed=True)], speed_native_per_s=20 * MM) as fake, _open(fake) as conn:
        axis = conn.get_device(3).get_axis(1)
        axis.move_absolute(20 * MM, wait_until_idle=False)
        assert axis.is_busy()
        time.sleep(0.05)
        mid = axis.get_position()
        assert 0 < mid < 20 * MM
        axis.stop()
        stopped = axis.get_position()
        assert mid <= stopped < 20 * MM
        assert not axis.is_busy()
        time.sleep(0.05)
        assert axis.get_position() == stopped == fake.position()


def test_move_without_waiting_then_poll_is_busy() -> None:
    with FakeZaber(devices=[DeviceConfig(homed=True)], speed_native_per_s=50 * MM) as fake, _open(fake) as conn:
        axis = conn.get_device(3).get_axis(1)
        axis.move_absolute(5 * MM, wait_until_idle=False)  # takes 0.1 s
        polls = 0
        deadline = time.monotonic() + 2
        while axis.is_busy():
            polls += 1
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert polls >= 3
        assert axis.get_position() == 5 * MM


def test_command_log_records_targets_in_order(fake: FakeZaber, axis: Axis) -> None:
    for target in (3 * MM, 1 * MM, 2 * MM):
        axis.move_absolute(target)
    with pytest.raises(BadDataException):
        axis.move_absolute(-5)
    assert fake.move_targets() == [3 * MM, 1 * MM, 2 * MM]
    assert fake.move_targets(device=1) == []
    assert fake.motion_commands() == ["move abs 3000000", "move abs 1000000", "move abs 2000000", "move abs -5"]
    assert fake.move_count == 4
    times = [r.t for r in fake.log]
    assert times == sorted(times)


# ------------------------------------------------------------------ faults
def test_reject_nth_move() -> None:
    with FakeZaber(devices=[DeviceConfig(homed=True)], faults=Faults(reject_move=2)) as fake, _open(fake) as conn:
        axis = conn.get_device(3).get_axis(1)
        axis.move_absolute(MM)
        with pytest.raises(BadDataException):
            axis.move_absolute(2 * MM)
        axis.move_absolute(3 * MM)
        assert fake.move_targets() == [MM, 3 * MM]


def test_stall_raises_movement_failed(fake: FakeZaber, axis: Axis) -> None:
    axis.move_absolute(MM)
    fake.inject(stall_at_move=2)
    with pytest.raises(MovementFailedException) as info:
        axis.move_absolute(3 * MM)
    assert "FS" in str(info.value) and "FS" in info.value.details.warnings
    assert axis.get_position() == 2 * MM  # stall_fraction 0.5 of the way from 1 mm to 3 mm
    assert "warnings clear" in fake.commands()
    assert fake.flags() == []  # ZML's "warnings clear" cleared FS
    axis.move_absolute(0)  # the stage is usable again
    assert fake.position() == 0


def test_silent_device_times_out(fake: FakeZaber, axis: Axis) -> None:
    fake.inject(silent_after_move=1)
    t0 = time.monotonic()
    with pytest.raises(RequestTimeoutException):
        axis.move_absolute(MM)  # answered, but the status polls are not
    assert time.monotonic() - t0 < 3
    assert fake.log[0].reply is not None and fake.log[-1].reply is None


def test_absent_device_times_out(conn: Connection) -> None:
    with pytest.raises(RequestTimeoutException):
        conn.get_device(7).get_axis(1).get_position()


def test_disconnect_at_move() -> None:
    with FakeZaber(devices=[DeviceConfig(homed=True)], faults=Faults(disconnect_at_move=2)) as fake:
        conn = _open(fake)
        events: List[Exception] = []
        got = threading.Event()
        conn.disconnected.subscribe(lambda e: (events.append(e), got.set()))
        axis = conn.get_device(3).get_axis(1)
        axis.move_absolute(MM)
        # ZML does not fail the request in flight when the socket closes: it times out (~1 s).
        with pytest.raises(RequestTimeoutException):
            axis.move_absolute(2 * MM)
        assert got.wait(2) and isinstance(events[0], ConnectionFailedException)
        with pytest.raises(ConnectionClosedException):  # every later call fails at once
            axis.stop()
        assert fake.position() == MM and fake.move_targets() == [MM]
        with _open(fake) as again:  # the fake keeps listening
            assert again.get_device(3).get_axis(1).get_position() == MM


def test_busy_forever_blocks_move_absolute_until_stop(fake: FakeZaber, axis: Axis) -> None:
    fake.inject(busy_forever_at_move=1)
    outcome: List[object] = []
    worker = threading.Thread(target=lambda: _capture(outcome, lambda: axis.move_absolute(MM)), daemon=True)
    worker.start()
    worker.join(0.3)
    assert worker.is_alive(), "ZML's move_absolute has no timeout: it waits as long as the axis is BUSY"
    assert axis.is_busy() and fake.is_busy()
    axis.stop()
    worker.join(2)
    assert not worker.is_alive()
    # Depending on whether the worker's poll or stop()'s "warnings clear" sees the NI flag first:
    assert outcome == ["returned"] or isinstance(outcome[0], MovementInterruptedException)
    assert not axis.is_busy() and fake.position() == MM


def test_interrupted_move_raises_movement_interrupted() -> None:
    with FakeZaber(devices=[DeviceConfig(homed=True)], speed_native_per_s=20 * MM) as fake, _open(fake) as conn:
        axis = conn.get_device(3).get_axis(1)
        outcome: List[object] = []
        worker = threading.Thread(target=lambda: _capture(outcome, lambda: axis.move_absolute(10 * MM)), daemon=True)
        worker.start()
        time.sleep(0.05)
        conn.generic_command("stop", device=3, axis=1)  # no "warnings clear" from this side
        worker.join(2)
        assert isinstance(outcome[0], MovementInterruptedException)
        assert 0 < fake.position() < 10 * MM


def test_slow_replies_still_work(fake: FakeZaber, axis: Axis) -> None:
    fake.inject(reply_delay_s=0.1)
    t0 = time.monotonic()
    assert axis.get_position() == 0
    assert 0.1 <= time.monotonic() - t0 < 0.9
    fake.inject(reply_delay_s=0.0)
    axis.move_absolute(MM)
    assert axis.get_position() == MM


# ------------------------------------------------------------------ the device as others see it (issue 18)
def _reply(conn: Connection, command: str = "") -> tuple:
    """(status, flag, data) of one command, read through ZML's generic command (which clears nothing)."""
    r = conn.generic_command(command, device=3, axis=1)
    return r.status, r.warning_flag, r.data


def test_a_second_zml_clients_stop_clears_ni_before_the_first_client_can_read_it() -> None:
    with FakeZaber(devices=[DeviceConfig(homed=True)], speed_native_per_s=10 * MM) as fake, \
            _open(fake) as ours, _open(fake) as theirs:
        ours.get_device(3).get_axis(1).move_absolute(5 * MM, wait_until_idle=False)
        time.sleep(0.05)
        n = len(fake.log)
        theirs.get_device(3).get_axis(1).stop()  # as Zaber Launcher or another script would
        sent = [(r.text, r.reply.split()[5]) for r in fake.log[n:]]  # (command, flag in its reply)
        assert sent[:2] == [("stop", "NI"), ("warnings clear", "--")], sent  # THEIR ZML cleared it
        assert _reply(ours, "warnings")[2] == "00" and fake.flags() == []
        assert 0 < fake.position() < 5 * MM  # only the position tells


def test_a_second_zml_clients_move_clears_ni_and_takes_the_axis() -> None:
    with FakeZaber(devices=[DeviceConfig(homed=True)], speed_native_per_s=10 * MM) as fake, \
            _open(fake) as ours, _open(fake) as theirs:
        ours.get_device(3).get_axis(1).move_absolute(5 * MM, wait_until_idle=False)
        time.sleep(0.05)
        theirs.get_device(3).get_axis(1).move_absolute(1 * MM)
        assert fake.flags() == [] and fake.position() == 1 * MM  # not where we sent it, and no flag


def test_stop_decelerates_busy_for_tens_of_ms() -> None:
    with FakeZaber(devices=[DeviceConfig(homed=True)], speed_native_per_s=10 * MM) as fake, _open(fake) as conn:
        conn.get_device(3).get_axis(1).move_absolute(5 * MM, wait_until_idle=False)
        time.sleep(0.05)
        t0 = time.monotonic()
        assert _reply(conn, "stop")[:2] == ("BUSY", "NI")  # still moving when the stop is answered
        at_stop = fake.position()
        while fake.is_busy():
            time.sleep(0.001)
        assert 0.015 < time.monotonic() - t0 < 0.1
        assert at_stop < fake.position() <= at_stop + 10 * MM * 0.02 / 2 + 1  # coasts on, decelerating
    with FakeZaber(devices=[DeviceConfig(homed=True)]) as fake, _open(fake) as conn:
        assert _reply(conn, "stop")[0] == "IDLE"  # an idle axis has nothing to decelerate


def test_the_knob_keeps_the_axis_busy_with_nc_and_sets_ni_only_over_a_commanded_move() -> None:
    with FakeZaber(devices=[DeviceConfig(homed=True, position=5 * MM)], speed_native_per_s=10 * MM) as fake, \
            _open(fake) as conn:
        axis = conn.get_device(3).get_axis(1)
        fake.turn_knob(200_000, duration_s=0.05)  # idle axis: manual motion only
        assert _reply(conn)[:2] == ("BUSY", "NC")
        time.sleep(0.08)
        assert _reply(conn, "get pos") == ("IDLE", "NC", str(5 * MM + 200_000))  # NC stays until a move
        axis.move_absolute(5 * MM)  # a movement command clears NC
        assert fake.flags() == []
        axis.move_absolute(8 * MM, wait_until_idle=False)
        time.sleep(0.02)
        fake.turn_knob(-100_000, duration_s=0.1)  # over a commanded move: NI too
        assert fake.flags() == ["NC", "NI"]
        n = len(fake.log)
        axis.generic_command("move abs 6000000")  # a move during manual motion clears NI (and NC)
        assert fake.log[n].reply.split()[4:6] == ["BUSY", "--"] and fake.flags() == []
        axis.wait_until_idle()
        assert fake.position() == 6 * MM  # the command took over from the knob


def test_a_fault_latched_while_idle_surfaces_at_the_next_zml_move_which_runs_on() -> None:
    with FakeZaber(devices=[DeviceConfig(homed=True)], speed_native_per_s=10 * MM) as fake, _open(fake) as conn:
        axis = conn.get_device(3).get_axis(1)
        fake.latch("FQ")  # an encoder error while the axis stands still
        assert _reply(conn, "get pos")[:2] == ("IDLE", "FQ")
        with pytest.raises(MovementFailedException) as info:
            axis.move_absolute(5 * MM, wait_until_idle=False)
        assert info.value.details.warnings == ["FQ"] and "Encoder Error (FQ)" in info.value.details.reason
        assert fake.flags() == [] and "warnings clear" in fake.commands()  # ZML cleared it itself ...
        assert fake.is_busy()  # ... and the move it sent runs on
        fake.inject(flag_on_move=2, fault_flag="FS")
        axis.stop()
        with pytest.raises(MovementFailedException, match="FS"):
            axis.move_absolute(0, wait_until_idle=False)


@pytest.mark.parametrize("flag", ["FO", "FD"])
def test_a_disabled_driver_refuses_every_move_until_it_runs_again(flag: str) -> None:
    with FakeZaber(devices=[DeviceConfig(homed=True, flags=(flag,))]) as fake, _open(fake) as conn:
        axis = conn.get_device(3).get_axis(1)
        with pytest.raises(DriverDisabledException):
            axis.move_absolute(MM)
        with pytest.raises(DriverDisabledException):
            axis.home()
        assert fake.log[0].reply.split()[3:] == ["RJ", "IDLE", flag, "DRIVERDISABLED"]
        axis.warnings.clear_flags()
        assert fake.flags() == [flag]  # not a notice: the driver is still off
        if flag == "FO":
            axis.generic_command("driver enable")
        else:
            fake.unlatch(flag)  # it cooled down
        axis.move_absolute(MM)
        assert fake.move_targets() == [MM]


def test_settle_tolerance_is_a_setting_and_moves_end_inside_the_window() -> None:
    with FakeZaber(devices=[DeviceConfig(homed=True, settle_tolerance=8)]) as fake, _open(fake) as conn:
        axis = conn.get_device(3).get_axis(1)
        assert axis.settings.get("cloop.settle.tolerance") == 8
        ends = []
        for target in (MM, 2 * MM, 3 * MM):
            axis.move_absolute(target)
            ends.append(axis.get_position() - target)
        assert ends == [8, -8, 8]
    with FakeZaber(devices=[DeviceConfig(homed=True)]) as fake, _open(fake) as conn:  # open loop
        with pytest.raises(BadCommandException):
            conn.get_device(3).get_axis(1).settings.get("cloop.settle.tolerance")


# ------------------------------------------------------------------ wire level
def test_wire_format_checksum_id_and_rejections() -> None:
    with FakeZaber(devices=[1, DeviceConfig(address=3, homed=True)]) as fake:
        raw = RawClient(fake.port)
        try:
            assert raw.ask("3 1 24 get pos") == "@03 1 24 OK IDLE -- 0"
            assert raw.ask("3 1 get limit.max", with_checksum=False) == "@03 1 OK IDLE -- 25000000"
            raw.sock.sendall(b"/3 1 25 get pos:00\n")
            assert raw.read_line() == "@03 1 25 RJ IDLE -- BADDATA"  # bad checksum
            assert raw.ask("3 2 26 get pos") == "@03 2 26 RJ IDLE -- BADAXIS"
            assert raw.ask("3 1 27 fly away") == "@03 1 27 RJ IDLE -- BADCOMMAND"
            assert raw.ask("3 1 28 get nope") == "@03 1 28 RJ IDLE -- BADCOMMAND"
            assert raw.ask("3 1 28 move abs lots") == "@03 1 28 RJ IDLE -- BADDATA"
            assert raw.ask("1 1 29 warnings") == "@01 1 29 OK IDLE WR 01 WR"
            assert raw.ask("3 0 30 get deviceid") == "@03 0 30 OK IDLE -- 30341"
            raw.send("0 0 31")  # broadcast: every device answers, in address order
            assert [raw.read_line(), raw.read_line()] == ["@01 0 31 OK IDLE WR 0", "@03 0 31 OK IDLE -- 0"]
            assert raw.ask("3 1 32 move abs 1000") == "@03 1 32 OK BUSY -- 0"
            time.sleep(0.05)  # let it arrive (and settle), else the next move would interrupt it (flag NI)
            assert raw.ask("3 1 32") == "@03 1 32 OK IDLE -- 0"
            assert raw.ask("3 1 33 set comm.alert 1") is not None
            assert raw.ask("3 1 34 move abs 2000") == "@03 1 34 OK BUSY -- 0"
            assert raw.read_line() == "!03 1 IDLE --"  # unsolicited alert on arrival
        finally:
            raw.close()


def test_parse_request() -> None:
    assert parse_request("/3 1 24 get pos:" + checksum("3 1 24 get pos")) == (3, 1, "24", "get pos", True)
    assert parse_request("/3 1 24 get pos:00") == (3, 1, "24", "get pos", False)
    assert parse_request("/0 0 05") == (0, 0, "05", "", True)
    assert parse_request("/home") == (0, 0, None, "home", True)
    assert parse_request("@03 1 OK IDLE -- 0") is None


def test_stop_releases_threads_and_port() -> None:
    fake = FakeZaber().start()
    raw = RawClient(fake.port)
    assert raw.ask("3 1 get pos") is not None
    t0 = time.monotonic()
    fake.stop()
    assert time.monotonic() - t0 < 1
    assert raw.read_line(timeout=1) is None  # the client socket was closed
    raw.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("fake-zaber")]
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", fake.port), timeout=1)


def _capture(outcome: List[object], fn) -> None:  # type: ignore[no-untyped-def]
    try:
        fn()
        outcome.append("returned")
    except Exception as exc:  # noqa: BLE001 - recorded for the assertion
        outcome.append(exc)
