"""A fake Zaber ASCII daisy chain served over TCP, for testing code that uses the real ZML.

The real Zaber Motion Library connects with ``Connection.open_tcp("127.0.0.1", fake.port)``.
Pure standard library; one daemon thread accepts, one serves each client connection.

Default chain: ONE device at address 3 (device id 30341, X-LDA025A), 1 axis, native unit 1 nm,
``limit.min`` 0, ``limit.max`` 25_000_000, position 0, not homed (flag ``WR`` until ``home``).

Usage::

    from fake_zaber import FakeZaber, DeviceConfig, Faults
    with FakeZaber(devices=[DeviceConfig(homed=True)], faults=Faults(reject_move=2)) as fake:
        with Connection.open_tcp("127.0.0.1", fake.port) as conn:
            axis = conn.get_device(3).get_axis(1)
            axis.move_absolute(1_000_000)          # native units (nm)
        assert fake.move_targets() == [1_000_000]
        fake.inject(stall_at_move=3)               # faults can be changed while running

``FakeZaber(devices=None, *, speed_native_per_s=1e8, settle_s=0.002, alert=False, faults=None,
reject_unhomed_moves=True, unhomed_reason="BADCOMMAND", interrupt_flag=True, motion_clears_notices=True,
stop_decel_s=0.02, host="127.0.0.1", port=0)``.
``devices`` entries are ``DeviceConfig`` (address, device_id, axes, limit_min, limit_max, position, homed,
resolution, speed_native_per_s, serial, version, version_build, peripheral_id, flags, settle_tolerance,
storage) or bare addresses (``devices=[1, 2]``); ``flags`` are warning flags latched at power-up (e.g. ``("FS",)``
or ``("NI",)``); ``storage`` holds axis-scope keys answered to ``storage all print [prefix P]`` (ZML's
``Microscope.find``). Default speed 100 mm/s: 50 um takes ~2.5 ms (incl. settle), 25 mm 0.25 s.

Protocol (per /work/shared/zaber-ascii.md): requests ``/DEV AXIS ID CMD:CS\\n`` (ID and checksum
optional; a bad checksum is answered ``RJ ... BADDATA``); replies ``@DD A ID OK|RJ IDLE|BUSY FLAG DATA\\r\\n``
echoing the ID, without checksum; ``/0 ...`` is answered by every device in address order; absent
addresses stay silent. Unknown command or setting -> ``RJ BADCOMMAND``; axis beyond the axis count ->
``RJ BADAXIS``; target outside [limit.min, limit.max] -> ``RJ BADDATA``. With ``reject_unhomed_moves``
``move abs``/``move rel`` on an axis flagged ``WR`` are rejected with ``unhomed_reason`` (the real
firmware's reply is unverified); ``move vel/min/max`` and ``home`` are always allowed.
Velocities (``maxspeed``, ``move vel``) are Zaber native velocity units = native units/s * 1.6384.
Motion is real time: linear at the axis speed, then ``settle_s`` of BUSY at the target. A motion
command or ``stop`` that interrupts a motion sets flag ``NI`` (ZML then raises MovementInterruptedException
in whoever waits for the interrupted move); ``interrupt_flag=False`` turns that off. Any client may
interrupt: a ``stop`` or a move from a second connection (as Zaber Launcher or a second script would
send through Launcher's shared port) interrupts the first client's move just the same. Every reply
carries the axis's status and its highest-priority flag (``@03 1 05 OK BUSY NI 0``), whatever the command.

What a second ZML client does (observed with ZML 10.3 against this fake, tests/test_fake_zaber.py): when the
reply to ITS ``stop`` or move carries ``NI``, its ZML sends ``warnings clear`` at once, within a round
trip -- so the first client finds the flag gone; only the position tells what happened. A ZML
``move_absolute`` whose reply carries a fault flag sends ``warnings clear`` and raises
``MovementFailedException`` (``details.warnings`` lists the flags) while the move it sent runs on.
``generic_command``, ``get_position``, ``is_busy`` and ``warnings.get_flags`` clear nothing.

Closer to the firmware than a plain motion model (each behaviour with its source):

* ``stop`` decelerates: BUSY for up to ``stop_decel_s`` (20 ms), coasting on at half the speed it had
  (linear deceleration) but never past the motion's own end. Protocol manual, reply format ("All
  movement commands, including stop, put the axis into the BUSY state, while they are being executed";
  quoted in lokraszewski/zaber, zaber_types.h). ``stop_decel_s=0`` stops at once.
* the knob, ``fake.turn_knob(distance_native, duration_s)``: manual motion, BUSY with ``NC`` while it
  turns ("NC - Axis is busy due to manual control via the knob. This warning persists until a movement
  command is issued"); ``NI`` only if a movement command was running ("NI - A movement operation (command
  or manual control) was requested while the axis was executing another movement command"); a movement
  command (``stop`` too) clears NC, and NI when the axis is idle or under manual control ("... persists
  until a movement command is issued when the axis is either idle or executing a manual control
  movement"); the command then takes over from the knob. Same source, section "Warning Flags".
* faults that latch at any time, also while the axis stands still: ``fake.latch("FQ")`` (FQ: "The
  encoder-measured position may be unreliable ... due to poor sensor alignment, vibration, dirt"; it need
  not wait for a move), or ``Faults(flag_on_move=N)``: latched an instant before the Nth move arrives,
  so the move's own reply carries it.
* driver disabled (``FD``, ``FO``, ``FH``, ``FV``; ZML's WarningFlags: "Driver Disabled", "Driver Disabled on
  Startup or by Command", "Hardware Emergency Stop Driver Disabled", "Overvoltage or Undervoltage Driver
  Disabled"): every movement command is refused ``RJ IDLE FO DRIVERDISABLED`` (ZML: DriverDisabledException,
  "Thrown when a device cannot carry out a movement command because the motor driver is disabled"; the
  reason string DRIVERDISABLED is in ZML's core). They stay until the driver runs again: ``warnings clear``
  leaves them, ``driver enable`` clears FO, ``fake.unlatch(flag)`` the others (FD "persists until the
  driver returns to normal operating conditions", Warning Flags).
* ``cloop.settle.tolerance`` (``DeviceConfig(settle_tolerance=N)``, readable and settable): a closed-loop
  axis reports IDLE once inside its settle window, not at the exact target; the fake ends each ``move abs``
  at the window's edge, +N then -N (the worst case a verified move must accept). Without it the
  setting is ``RJ BADCOMMAND`` (an open-loop stepper). Setting: Zaber protocol manual, Settings
  ("cloop.settle.tolerance"; ZML's SettingConstants.CLOOP_SETTLE_TOLERANCE); Zaber's own settling example
  (zaber-examples: "For higher accuracy it often helps to tighten the settle tolerance, but tightening
  too much could result in never settling").
* reply latency: ``Faults(reply_delay_s=X)`` (a serial line's round trip; >= ~1 s is a time-out in ZML).

Flag lifetimes follow the Zaber ASCII Protocol Manual, section "Warning Flags" (the passage is quoted
in lokraszewski/zaber, zaber/include/zaber/zaber_types.h): FS, FT, FB, FP, FE, FQ and WL "persist
until acknowledged and cleared by the user with the warnings command" -- so faults stay latched through
any number of motion commands until ``warnings clear``; NI "persists until a movement command is issued
when the axis is either idle or executing a manual control movement" and NC "until a movement command
is issued" -- so a motion command sent to an IDLE axis clears NI/NC (a move that interrupts another one
sets NI instead). ``motion_clears_notices=False`` is stricter than the manual: NI/NC then also stay
until ``warnings clear``. ``WR`` clears only when a ``home`` completes. With ``comm.alert`` 1
(``alert=True`` or ``set comm.alert 1``) arrival sends ``!DD A IDLE FLAG`` to every client.

Faults (``Faults`` fields; ``FakeZaber(faults=Faults(...))`` or ``fake.inject(field=value)``, any time;
``fake.clear_faults()``). "Nth move" counts every ``move abs`` the fake receives (accepted or rejected,
all devices, all connections) from 1; ``fake.move_count`` is the running count. What ZML 10.3 raises:

* ``reject_move=N``          the Nth move is answered ``RJ IDLE -- BADDATA``; nothing moves.
                             -> ``BadDataException`` (a ``CommandFailedException``).
* ``stall_at_move=N``        the Nth move starts, stops at ``stall_fraction`` (0.5) of the way and goes IDLE
                             with flag ``FS`` (listed by ``warnings``; ``warnings clear`` reports then
                             clears it). -> ``MovementFailedException`` ("... Stalled and Stopped (FS).").
* ``disconnect_at_move=N``   on receipt of the Nth move the client socket is closed (no reply, no motion).
                             -> the call in flight: ``RequestTimeoutException`` after ~1 s; the connection's
                             ``disconnected`` event: ``ConnectionFailedException``; later calls:
                             ``ConnectionClosedException`` at once. The fake keeps listening.
* ``silent_after_move=N``    the Nth move is answered and executed; from then on nothing is executed or
                             answered (socket open) until ``fake.inject(silent=False)``.
                             -> ``RequestTimeoutException`` after ~1 s on every call.
* ``busy_forever_at_move=N`` the Nth move runs but the axis reports BUSY until ``stop`` (or a new motion).
                             -> ZML's ``move_absolute``/``wait_until_idle`` block indefinitely (no timeout).
* ``busy_forever_at_home``   every ``home`` runs but the axis reports BUSY until ``stop``.
* ``ignore_stop=True``       ``stop`` is answered but the axis keeps moving (BUSY) -> ZML's ``stop()`` blocks.
* ``miss_at_move=N``         the Nth move ends ``miss_native`` (100) native units beyond its target, IDLE, no flag
                             (as if the axis slipped or was pushed); ZML notices nothing.
* ``fault_at_move=N``        the Nth move arrives, then latches ``fault_flag`` (default ``FQ``, encoder error)
                             until ``warnings clear``.
* ``flag_on_move=N``         ``fault_flag`` latches just before the Nth move arrives; its reply carries it.
* ``slow_at_move=N``         the Nth move runs at ``slow_speed_native_per_s`` (0.1 mm/s): time to act mid-move.
                             -> ``MovementFailedException`` (a fault), ``DriverDisabledException`` (FD/FO/...).
* ``reply_delay_s=X``        every reply is sent X s late (>= ~1 s -> ``RequestTimeoutException``).
* ``silent=True``            execute and answer nothing from now on.
``fake.disconnect_clients()`` drops every connection immediately; ``fake.turn_knob(...)``, ``fake.latch(flag)``,
``fake.unlatch(flag)`` act on the axis at once (see above).

Log (thread-safe): ``fake.log`` (``LogRecord``: t, device, axis, msg_id, text, reply, client, accepted),
``fake.commands()``, ``fake.motion_commands(device=None, axis=None)``, ``fake.move_targets(device=3,
axis=1)`` (accepted ``move abs`` targets), ``fake.position(...)``, ``fake.flags(...)``, ``fake.is_busy(...)``.

Run by hand: ``python tests/fake_zaber.py --port 0 [--homed] [--verbose]`` (prints the port).
"""

from __future__ import annotations

import argparse
import dataclasses
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

VELOCITY_SCALE = 1.6384  # native velocity unit = native units per second * 1.6384
FLAG_PRIORITY = ["FF", "FZ", "FS", "FT", "FO", "FE", "FB", "FP", "FQ", "FM", "FD", "FH", "FV", "FA",
                 "WL", "WH", "WV", "WT", "WM", "WP", "WS", "WR", "NC", "NI", "ND", "NU", "NJ"]
# "warnings clear" clears these; the driver-disabled flags (DRIVER_OFF) reflect a state of the driver
# and stay until it is enabled again ("driver enable" for FO, fake.unlatch() for the others).
CLEARABLE = {"FS", "FT", "FE", "FB", "FP", "FQ", "FM", "FA", "NC", "NI", "ND", "NU", "NJ"}
DRIVER_OFF = {"FD", "FO", "FH", "FV"}  # movement commands are refused: RJ ... DRIVERDISABLED
MOTION_PREFIXES = ("move abs", "move rel", "move vel", "move min", "move max", "home")


@dataclass
class DeviceConfig:
    """One device on the chain. Positions and limits are in native units (1 nm by default)."""
    address: int = 3
    device_id: int = 30341
    axes: int = 1
    limit_min: int = 0
    limit_max: int = 25_000_000
    position: int = 0
    homed: bool = False
    resolution: int = 1
    speed_native_per_s: Optional[float] = None  # None -> FakeZaber's speed_native_per_s
    serial: int = 123456
    version: str = "7.38"
    version_build: int = 17000
    peripheral_id: int = 0
    flags: Tuple[str, ...] = ()  # warning flags latched at power-up, e.g. ("FS",) or ("NI",)
    settle_tolerance: Optional[int] = None  # cloop.settle.tolerance (closed loop); None: open loop, no setting
    # Axis-scope key-value storage, (axis, key, value) entries, e.g. (2, "zaber.microscope.part", "x"):
    # what ZML's Microscope.find reads to identify a microscope's plate and focus axes.
    storage: Tuple[Tuple[int, str, str], ...] = ()


@dataclass
class Faults:
    """Fault injection settings; see the module docstring. ``None`` disables a fault."""
    reject_move: Optional[int] = None
    stall_at_move: Optional[int] = None
    stall_fraction: float = 0.5
    disconnect_at_move: Optional[int] = None
    silent_after_move: Optional[int] = None
    busy_forever_at_move: Optional[int] = None
    busy_forever_at_home: bool = False
    ignore_stop: bool = False
    miss_at_move: Optional[int] = None
    miss_native: int = 100
    fault_at_move: Optional[int] = None
    flag_on_move: Optional[int] = None
    fault_flag: str = "FQ"
    slow_at_move: Optional[int] = None
    slow_speed_native_per_s: float = 100_000.0
    reply_delay_s: float = 0.0
    silent: bool = False


@dataclass
class LogRecord:
    """One received request: wall-clock time, addressed device (0 = broadcast) and axis, message id,
    command text without the header or checksum, the first reply line sent (None if none was), and
    which connection sent it (1, 2, ... in the order they connected)."""
    t: float
    device: int
    axis: int
    msg_id: Optional[str]
    text: str
    reply: Optional[str] = None
    client: int = 0

    @property
    def accepted(self) -> bool:
        return self.reply is not None and " OK " in self.reply


@dataclass
class _Motion:
    start: float
    final: float  # where the axis ends up (target, or the stall point)
    t0: float
    speed: float  # native units/s
    settle_s: float
    kind: str  # "move", "home", "vel", "stop" (decelerating) or "knob" (manual control, not a command)
    stall: bool = False
    end_flag: Optional[str] = None  # latched on arrival (fault injection)

    def end_time(self) -> float:
        return self.t0 + (abs(self.final - self.start) / self.speed if self.speed > 0 else 0.0) + self.settle_s

    def position(self, now: float) -> float:
        dist = self.final - self.start
        done = min(abs(dist), self.speed * max(0.0, now - self.t0))
        return self.start + (done if dist >= 0 else -done)


@dataclass
class _Axis:
    number: int
    pos: float
    lo: int
    hi: int
    speed: float
    resolution: int
    peripheral_id: int
    flags: set = field(default_factory=set)
    motion: Optional[_Motion] = None
    busy_forever: bool = False
    accel: int = 2000
    settle_tol: Optional[int] = None
    settle_sign: int = 1  # where in its settle window the next closed-loop move ends: +tol, then -tol, ...

    def busy(self) -> bool:
        return self.motion is not None or self.busy_forever

    def commanded(self) -> bool:
        """Busy with a movement command (not only with the knob)."""
        return self.busy_forever or (self.motion is not None and self.motion.kind != "knob")


class _Device:
    def __init__(self, cfg: DeviceConfig, speed: float, alert: bool) -> None:
        self.cfg = cfg
        self.address = cfg.address
        self.alert = alert
        spd = cfg.speed_native_per_s or speed
        self.axes = [_Axis(n, float(cfg.position), cfg.limit_min, cfg.limit_max, spd, cfg.resolution,
                           cfg.peripheral_id, (set() if cfg.homed else {"WR"}) | set(cfg.flags),
                           settle_tol=cfg.settle_tolerance)
                     for n in range(1, cfg.axes + 1)]


class _Client:
    def __init__(self, sock: socket.socket, number: int = 0) -> None:
        self.sock = sock
        self.number = number
        self.outbox: List[str] = []
        self.closed = False
        self.drop = False  # set by the disconnect fault: close after the current command, no reply
        self.thread: Optional[threading.Thread] = None


def checksum(body: str) -> str:
    """Zaber ASCII checksum of the bytes between '/' and ':' (two upper-case hex digits)."""
    return "%02X" % ((256 - sum(body.encode("ascii"))) & 0xFF)


def parse_request(line: str) -> Optional[Tuple[int, int, Optional[str], str, bool]]:
    """Parse ``/DEV AXIS ID CMD:CS`` -> (device, axis, id, command, checksum_ok); None if not a request."""
    line = line.strip()
    if not line.startswith("/"):
        return None
    body, ok = line[1:], True
    if len(body) >= 3 and body[-3] == ":":
        body, cs = body[:-3], body[-2:]
        hexdigits = all(c in "0123456789abcdefABCDEF" for c in cs)
        ok = hexdigits and (sum(body.encode("ascii")) + int(cs, 16)) & 0xFF == 0
    tokens = body.split()
    nums: List[str] = []
    while tokens and len(nums) < 3 and tokens[0].isdigit():
        nums.append(tokens.pop(0))
    device = int(nums[0]) if nums else 0
    axis = int(nums[1]) if len(nums) > 1 else 0
    msg_id = nums[2] if len(nums) > 2 else None
    return device, axis, msg_id, " ".join(tokens), ok


class FakeZaber:
    """A fake chain of Zaber ASCII devices on 127.0.0.1:``port`` (0 = ephemeral, see ``.port``)."""

    def __init__(self, devices: Optional[Sequence[Union[DeviceConfig, int]]] = None, *,
                 speed_native_per_s: float = 100_000_000.0, settle_s: float = 0.002, alert: bool = False,
                 faults: Optional[Faults] = None, reject_unhomed_moves: bool = True,
                 unhomed_reason: str = "BADCOMMAND", interrupt_flag: bool = True,
                 motion_clears_notices: bool = True, stop_decel_s: float = 0.02, host: str = "127.0.0.1",
                 port: int = 0) -> None:
        cfgs = [d if isinstance(d, DeviceConfig) else DeviceConfig(address=int(d))
                for d in (devices if devices is not None else [DeviceConfig()])]
        self.devices: Dict[int, _Device] = {c.address: _Device(c, speed_native_per_s, alert) for c in cfgs}
        self.settle_s = settle_s
        self.faults = faults or Faults()
        self.reject_unhomed_moves = reject_unhomed_moves
        self.unhomed_reason = unhomed_reason
        self.interrupt_flag = interrupt_flag
        self.motion_clears_notices = motion_clears_notices
        self.stop_decel_s = stop_decel_s
        self.host, self.port = host, port
        self.log: List[LogRecord] = []
        self.move_count = 0
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._listener: Optional[socket.socket] = None
        self._accept_thread: Optional[threading.Thread] = None
        self._clients: List[_Client] = []
        self._connections = 0
        self._msg_id: Optional[str] = None

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> "FakeZaber":
        """Bind, listen and serve in daemon threads. Returns self; the bound port is ``self.port``."""
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((self.host, self.port))
        self._listener.listen(8)
        self._listener.settimeout(0.05)
        self.port = self._listener.getsockname()[1]
        self._stop.clear()
        self._accept_thread = threading.Thread(target=self._accept_loop, name="fake-zaber-accept", daemon=True)
        self._accept_thread.start()
        return self

    def stop(self) -> None:
        """Close the listener and every client socket and join all threads (idempotent)."""
        self._stop.set()
        if self._accept_thread is not None:
            self._accept_thread.join(timeout=2)
            self._accept_thread = None
        with self._lock:
            clients = list(self._clients)
        for c in clients:
            self._close_client(c)
            if c.thread is not None and c.thread is not threading.current_thread():
                c.thread.join(timeout=2)
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def __enter__(self) -> "FakeZaber":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def inject(self, **changes: Any) -> None:
        """Change fault settings (names as in ``Faults``), e.g. ``fake.inject(stall_at_move=3)``."""
        with self._lock:
            self.faults = dataclasses.replace(self.faults, **changes)

    def clear_faults(self) -> None:
        with self._lock:
            self.faults = Faults()

    def turn_knob(self, distance_native: int, duration_s: float = 0.05, device: int = 3, axis: int = 1) -> None:
        """Someone turns the axis's knob now: manual motion by ``distance_native`` over ``duration_s``
        (BUSY with NC meanwhile; NI too if a movement command was running)."""
        with self._lock:
            now = time.monotonic()
            dev = self.devices[device]
            ax = self._axis(device, axis)
            self._update(dev, ax, now)
            start = self._pos(ax, now)
            if ax.commanded() and self.interrupt_flag:
                ax.flags.add("NI")  # manual control requested while a movement command executes
            ax.flags.add("NC")
            ax.busy_forever = False
            final = float(min(max(start + distance_native, ax.lo), ax.hi))
            speed = abs(final - start) / duration_s if duration_s > 0 else float("inf")
            ax.pos, ax.motion = start, _Motion(start, final, now, speed, 0.0, "knob")

    def latch(self, flag: str, device: int = 3, axis: int = 1) -> None:
        """A warning flag appears now (e.g. ``FQ``, an encoder error while the axis stands still)."""
        with self._lock:
            self._axis(device, axis).flags.add(flag)

    def unlatch(self, flag: str, device: int = 3, axis: int = 1) -> None:
        """The condition behind a flag is gone (e.g. a driver that has cooled down: ``FD``)."""
        with self._lock:
            self._axis(device, axis).flags.discard(flag)

    def disconnect_clients(self) -> None:
        """Close every client connection now (the listener stays open)."""
        with self._lock:
            clients = list(self._clients)
        for c in clients:
            self._close_client(c)

    # ----------------------------------------------------------------- inspection
    def commands(self) -> List[str]:
        """Text of every received command, in order ('' for a status poll)."""
        with self._lock:
            return [r.text for r in self.log]

    def motion_commands(self, device: Optional[int] = None, axis: Optional[int] = None) -> List[str]:
        """Every received command that can move an axis (move abs/rel/vel/min/max, home)."""
        with self._lock:
            return [r.text for r in self.log if r.text.startswith(MOTION_PREFIXES)
                    and (device is None or r.device in (device, 0)) and (axis is None or r.axis in (axis, 0))]

    def move_targets(self, device: int = 3, axis: int = 1) -> List[int]:
        """Native targets of accepted ``move abs`` commands to that device/axis, in order."""
        with self._lock:
            return [int(r.text.split()[2]) for r in self.log if r.text.startswith("move abs") and r.accepted
                    and r.device == device and r.axis == axis]

    def position(self, device: int = 3, axis: int = 1) -> int:
        """Current native position (interpolated mid-move)."""
        with self._lock:
            ax = self._axis(device, axis)
            return int(round(self._pos(ax, time.monotonic())))

    def flags(self, device: int = 3, axis: int = 1) -> List[str]:
        """Active warning flags of an axis, highest priority first."""
        with self._lock:
            ax = self._axis(device, axis)
            self._update(self.devices[device], ax, time.monotonic())
            return sorted(ax.flags, key=FLAG_PRIORITY.index)

    def is_busy(self, device: int = 3, axis: int = 1) -> bool:
        with self._lock:
            ax = self._axis(device, axis)
            self._update(self.devices[device], ax, time.monotonic())
            return ax.busy()

    # ----------------------------------------------------------------- networking
    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                sock, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            sock.settimeout(0.02)
            self._connections += 1
            client = _Client(sock, self._connections)
            client.thread = threading.Thread(target=self._serve, args=(client,), name="fake-zaber-client", daemon=True)
            with self._lock:
                self._clients.append(client)
            client.thread.start()

    def _close_client(self, client: _Client) -> None:
        with self._lock:
            if client.closed:
                return
            client.closed = True
            if client in self._clients:
                self._clients.remove(client)
        try:
            client.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        client.sock.close()

    def _send(self, client: _Client, lines: Iterable[str]) -> None:
        data = "".join(line + "\r\n" for line in lines).encode("ascii")
        if not data or client.closed:
            return
        try:
            client.sock.sendall(data)
        except OSError:
            self._close_client(client)

    def _serve(self, client: _Client) -> None:
        buf = b""
        while not self._stop.is_set() and not client.closed:
            self._tick()
            with self._lock:
                out, client.outbox = client.outbox, []
            self._send(client, out)
            try:
                chunk = client.sock.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
            while True:
                idx = min((i for i in (buf.find(b"\n"), buf.find(b"\r")) if i >= 0), default=-1)
                if idx < 0:
                    break
                line, buf = buf[:idx].decode("ascii", "replace"), buf[idx + 1:]
                if line.strip():
                    self._handle_line(client, line)
                if client.closed:
                    break
        self._close_client(client)

    def _handle_line(self, client: _Client, line: str) -> None:
        parsed = parse_request(line)
        if parsed is None:
            return
        dev_no, axis_no, msg_id, text, cs_ok = parsed
        record = LogRecord(time.time(), dev_no, axis_no, msg_id, text, client=client.number)
        with self._lock:
            self.log.append(record)
            was_silent = self.faults.silent
            targets = [d for a, d in sorted(self.devices.items()) if dev_no in (0, a)]
            replies: List[str] = []
            for dev in targets:
                rep = self._execute(client, dev, axis_no, msg_id, text, cs_ok)
                if rep is not None:
                    replies.append(rep)
        if client.drop:
            self._close_client(client)
            return
        with self._lock:
            if was_silent or client.closed:
                return
            delay = self.faults.reply_delay_s
            if replies:
                record.reply = replies[0]
        if delay > 0 and self._stop.wait(delay):
            return
        self._send(client, replies)

    # ----------------------------------------------------------------- device model
    def _axis(self, device: int, axis: int) -> _Axis:
        return self.devices[device].axes[axis - 1]

    def _pos(self, ax: _Axis, now: float) -> float:
        return ax.motion.position(now) if ax.motion is not None else ax.pos

    def _update(self, dev: _Device, ax: _Axis, now: float) -> None:
        """Finish the axis's motion if it has arrived; queue an alert if alerts are on."""
        m = ax.motion
        if m is None or now < m.end_time():
            return
        ax.pos, ax.motion = m.final, None
        if m.stall:
            ax.flags.add("FS")
        if m.end_flag:
            ax.flags.add(m.end_flag)
        if m.kind == "home":
            ax.flags.discard("WR")
        if dev.alert and not ax.busy_forever and not self.faults.silent:
            alert = "!%02d %d IDLE %s" % (dev.address, ax.number, self._flag([ax]))
            for c in self._clients:
                c.outbox.append(alert)

    def _tick(self) -> None:
        with self._lock:
            now = time.monotonic()
            for dev in self.devices.values():
                for ax in dev.axes:
                    self._update(dev, ax, now)

    @staticmethod
    def _flag(axes: List[_Axis]) -> str:
        flags = set().union(*(a.flags for a in axes))
        return min(flags, key=FLAG_PRIORITY.index) if flags else "--"

    def _notices_on_command(self, ax: _Axis) -> None:
        """What a movement command (stop included) does to NI/NC before it executes: it sets NI when
        it cuts a movement command short; it clears NI when the axis is idle or under manual
        control, and NC in every case (the module docstring quotes the manual)."""
        interrupted = ax.commanded()
        if self.motion_clears_notices:
            ax.flags.discard("NC")
            if not interrupted:
                ax.flags.discard("NI")
        if interrupted and self.interrupt_flag:
            ax.flags.add("NI")

    def _begin(self, ax: _Axis, final: float, kind: str, now: float, speed: Optional[float] = None,
               stall: bool = False, end_flag: Optional[str] = None) -> None:
        start = self._pos(ax, now)
        self._notices_on_command(ax)
        ax.pos = start
        ax.busy_forever = False
        settle = 0.0 if kind == "vel" else self.settle_s
        ax.motion = _Motion(start, final, now, speed or ax.speed, settle, kind, stall, end_flag)

    def _halt(self, ax: _Axis, now: float) -> None:
        """``stop`` (or ``move vel 0``): the axis decelerates, BUSY for ``stop_decel_s``, and comes to
        rest past the point where the command found it (at most at the motion's own end)."""
        moving, was_busy = ax.motion, ax.busy()
        self._notices_on_command(ax)
        pos = self._pos(ax, now)
        ax.pos, ax.motion, ax.busy_forever = pos, None, False
        if not was_busy or self.stop_decel_s <= 0:
            return  # an idle axis has nothing to decelerate
        speed = moving.speed if moving is not None and pos != moving.final else 0.0
        coast = min(speed * self.stop_decel_s / 2, abs(moving.final - pos)) if moving is not None else 0.0
        if coast > 0:  # linear deceleration: average speed speed/2, at most stop_decel_s
            direction = 1.0 if moving.final >= pos else -1.0
            ax.motion = _Motion(pos, pos + direction * coast, now, speed / 2, 0.0, "stop")
        else:  # at its end already (settling, or BUSY forever): BUSY for the deceleration time
            ax.motion = _Motion(pos, pos, now, 1.0, self.stop_decel_s, "stop")

    def _execute(self, client: _Client, dev: _Device, axis_no: int, msg_id: Optional[str], text: str,
                 cs_ok: bool) -> Optional[str]:
        """Run one command on one device; return the reply line (None = no reply)."""
        now = time.monotonic()
        for ax in dev.axes:
            self._update(dev, ax, now)
        if self.faults.silent:
            return None
        self._msg_id = msg_id  # for info messages that follow the reply (storage print)
        ok, data = True, "0"
        words = text.split()
        if not cs_ok:
            ok, data = False, "BADDATA"
        elif axis_no > len(dev.axes):
            ok, data = False, "BADAXIS"
        else:
            axes = dev.axes if axis_no == 0 else [dev.axes[axis_no - 1]]
            try:
                res = self._command(client, dev, axes, axis_no, words, now)
            except (ValueError, IndexError):
                res = "RJ BADDATA"
            if res is None:  # connection dropped / no reply by design
                return None
            ok, data = (False, res[3:]) if res.startswith("RJ ") else (True, res)
        shown = dev.axes if not 0 < axis_no <= len(dev.axes) else [dev.axes[axis_no - 1]]
        status = "BUSY" if any(a.busy() for a in shown) else "IDLE"
        head = "@%02d %d " % (dev.address, axis_no) + (msg_id + " " if msg_id is not None else "")
        return "%s%s %s %s %s" % (head, "OK" if ok else "RJ", status, self._flag(shown), data)

    def _command(self, client: _Client, dev: _Device, axes: List[_Axis], axis_no: int, w: List[str],
                 now: float) -> Optional[str]:
        """Execute ``w`` on ``axes``; returns reply data, 'RJ REASON', or None for no reply."""
        if not w:
            return "0"  # status poll / device detection
        if w[0] == "get" and len(w) >= 2:
            vals = [self._get(dev, axes, name, now) for name in w[1:]]
            return "RJ BADCOMMAND" if None in vals else " ".join(v for v in vals if v is not None)
        if w[0] == "set" and len(w) == 3:
            return self._set(dev, axes, w[1], w[2])
        if w[0] == "warnings":
            flags = sorted(set().union(*(a.flags for a in axes)), key=FLAG_PRIORITY.index)
            if w[1:] == ["clear"]:
                for a in axes:
                    a.flags -= CLEARABLE
            elif w[1:]:
                return "RJ BADCOMMAND"
            return " ".join(["%02d" % len(flags)] + flags)
        if w[0] == "storage":
            return self._storage(client, dev, w)
        if w == ["stop"]:
            for a in axes:
                if not self.faults.ignore_stop:
                    self._halt(a, now)
            return "0"
        if w == ["driver", "enable"]:
            for a in axes:
                a.flags.discard("FO")
            return "0"
        if (w[0] == "move" or w == ["home"]) and any(a.flags & DRIVER_OFF for a in axes):
            return "RJ DRIVERDISABLED"
        if w == ["home"]:
            for a in axes:
                self._begin(a, float(min(max(0, a.lo), a.hi)), "home", now)
                if self.faults.busy_forever_at_home:
                    a.busy_forever = True
            return "0"
        if w[0] != "move" or len(w) < 2:
            return "RJ BADCOMMAND"
        if axis_no == 0 and len(dev.axes) > 1 and w[1] in ("abs", "rel", "vel"):
            return "RJ BADAXIS"
        if w[1] == "abs":
            return self._move_abs(client, dev, axes, w, now)
        for a in axes:
            if w[1] == "rel":
                target = self._pos(a, now) + int(w[2])
                if self.reject_unhomed_moves and "WR" in a.flags:
                    return "RJ " + self.unhomed_reason
                if not a.lo <= target <= a.hi:
                    return "RJ BADDATA"
                self._begin(a, target, "move", now)
            elif w[1] in ("min", "max") and len(w) == 2:
                self._begin(a, float(a.lo if w[1] == "min" else a.hi), "move", now)
            elif w[1] == "vel" and len(w) == 3:
                v = float(w[2]) / VELOCITY_SCALE
                if v == 0:
                    self._halt(a, now)
                else:
                    self._begin(a, float(a.hi if v > 0 else a.lo), "vel", now, speed=abs(v))
            else:
                return "RJ BADCOMMAND"
        return "0"

    def _storage(self, client: _Client, dev: _Device, w: List[str]) -> str:
        """``storage all print [prefix P]``: OK, then one info message per stored key, ``#DD A ID set KEY
        VALUE`` (axis-scope keys carry their axis), sent after the reply -- the form ZML 10.3's
        Microscope.find parses (it sends exactly this command, and finds the axes whose
        ``zaber.microscope.part`` is x, y or focus).  Other storage commands: RJ BADCOMMAND."""
        if w[1:3] != ["all", "print"] or len(w) not in (3, 5) or (len(w) == 5 and w[3] != "prefix"):
            return "RJ BADCOMMAND"
        prefix = w[4] if len(w) == 5 else ""
        msg_id = self._msg_id + " " if self._msg_id is not None else ""
        for axis, key, value in dev.cfg.storage:
            if key.startswith(prefix):
                client.outbox.append("#%02d %d %sset %s %s" % (dev.address, axis, msg_id, key, value))
        return "0"

    def _move_abs(self, client: _Client, dev: _Device, axes: List[_Axis], w: List[str], now: float) -> Optional[str]:
        """``move abs N [speed [accel]]``, with the move-numbered faults applied."""
        self.move_count += 1
        n, f = self.move_count, self.faults
        if f.disconnect_at_move == n:
            client.drop = True
            return None
        if f.reject_move == n:
            return "RJ BADDATA"
        if f.flag_on_move == n:  # latched an instant before this command arrived
            for a in axes:
                a.flags.add(f.fault_flag)
            if any(a.flags & DRIVER_OFF for a in axes):
                return "RJ DRIVERDISABLED"
        target = int(w[2])
        speed = float(w[3]) / VELOCITY_SCALE if len(w) > 3 and float(w[3]) > 0 else None
        if f.slow_at_move == n:
            speed = f.slow_speed_native_per_s
        for a in axes:
            if self.reject_unhomed_moves and "WR" in a.flags:
                return "RJ " + self.unhomed_reason
            if not a.lo <= target <= a.hi:
                return "RJ BADDATA"
        for a in axes:
            final, stall = float(target), f.stall_at_move == n
            if stall:
                start = self._pos(a, now)
                final = start + (target - start) * f.stall_fraction
            elif a.settle_tol:  # closed loop: IDLE anywhere in the settle window (worst case: its edge)
                final = float(min(max(target + a.settle_sign * a.settle_tol, a.lo), a.hi))
                a.settle_sign = -a.settle_sign
            if f.miss_at_move == n:
                final = float(min(max(target + f.miss_native, a.lo), a.hi))
            end_flag = f.fault_flag if f.fault_at_move == n else None
            self._begin(a, final, "move", now, speed=speed, stall=stall, end_flag=end_flag)
            if f.busy_forever_at_move == n:
                a.busy_forever = True
        if f.silent_after_move == n:
            self.faults = dataclasses.replace(f, silent=True)  # this move's reply is still sent
        return "0"

    def _get(self, dev: _Device, axes: List[_Axis], name: str, now: float) -> Optional[str]:
        device_settings = {
            "deviceid": dev.cfg.device_id, "system.serial": dev.cfg.serial, "version": dev.cfg.version,
            "version.build": dev.cfg.version_build, "device.hw.modified": 0, "comm.command.packets.max": 1,
            "comm.word.size.max": 30, "get.settings.max": 1, "system.axiscount": len(dev.axes),
            "comm.packet.size.max": 80, "comm.alert": int(dev.alert), "comm.checksum": 0, "system.access": 1,
            "comm.protocol": 1, "comm.address": dev.address,
        }
        if name in device_settings:
            return str(device_settings[name])
        per_axis = []
        for a in axes:
            values: Dict[str, float] = {
                "pos": self._pos(a, now), "encoder.pos": self._pos(a, now), "limit.min": a.lo, "limit.max": a.hi,
                "maxspeed": round(a.speed * VELOCITY_SCALE), "accel": a.accel, "resolution": a.resolution,
                "peripheralid": a.peripheral_id, "peripheral.serial": 0, "peripheral.hw.modified": 0,
                "limit.home.offset": 0,
            }
            if a.settle_tol is not None:
                values["cloop.settle.tolerance"] = a.settle_tol
            if name not in values:
                return None
            per_axis.append(str(int(round(values[name]))))
        return " ".join(per_axis)

    def _set(self, dev: _Device, axes: List[_Axis], name: str, value: str) -> str:
        v = float(value)
        if name == "comm.alert":
            dev.alert = bool(int(v))
            return "0"
        attr = {"pos": "pos", "limit.min": "lo", "limit.max": "hi", "maxspeed": "speed", "accel": "accel",
                "resolution": "resolution", "cloop.settle.tolerance": "settle_tol"}.get(name)
        if name == "cloop.settle.tolerance" and any(a.settle_tol is None for a in axes):
            return "RJ BADCOMMAND"
        if attr is None:
            return "RJ BADCOMMAND"
        if name == "maxspeed" and v <= 0:
            return "RJ BADDATA"
        for a in axes:
            setattr(a, attr, v / VELOCITY_SCALE if name == "maxspeed" else v if name == "pos" else int(v))
        return "0"


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description="Serve a fake Zaber ASCII chain over TCP.")
    p.add_argument("--port", type=int, default=0, help="TCP port (0 = pick a free one)")
    p.add_argument("--address", type=int, default=3, help="device address")
    p.add_argument("--homed", action="store_true", help="start homed (no WR flag)")
    p.add_argument("--position", type=int, default=0, help="start position, native units")
    p.add_argument("--speed", type=float, default=100_000_000.0, help="native units per second")
    p.add_argument("--settle-s", type=float, default=0.002, help="BUSY time at the target")
    p.add_argument("--reply-delay-s", type=float, default=0.0, help="every reply this late (a serial round trip)")
    p.add_argument("--verbose", action="store_true", help="print every received command")
    p.add_argument("--log-on-exit", action="store_true",
                   help="serve until standard input closes, then print the command log as JSON lines [t, client, text]")
    args = p.parse_args(argv)
    import json
    import sys

    with FakeZaber(devices=[DeviceConfig(address=args.address, homed=args.homed, position=args.position)],
                   speed_native_per_s=args.speed, settle_s=args.settle_s,
                   faults=Faults(reply_delay_s=args.reply_delay_s), port=args.port) as fake:
        print("fake Zaber device %d listening on 127.0.0.1:%d" % (args.address, fake.port), flush=True)
        if args.log_on_exit:  # portable: a caller ends it by closing our stdin (no signal needed)
            sys.stdin.read()
            for r in fake.log:
                print(json.dumps([r.t, r.client, r.text]), flush=True)
            return
        seen = 0
        try:
            while True:
                time.sleep(0.2)
                if args.verbose:
                    for r in fake.log[seen:]:
                        print("%d %d %s -> %s" % (r.device, r.axis, r.text, r.reply), flush=True)
                    seen = len(fake.log)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
